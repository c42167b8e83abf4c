"""imagefs.digest: the one digest type, its checks and its one error shape."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from imagefs.digest import Digest, Hasher, InvalidDigestError
from imagefs.errors import DigestMismatchError, ManifestError

DATA = b"hello layer\n"
SHA256 = "sha256:" + hashlib.sha256(DATA).hexdigest()
SHA512 = "sha512:" + hashlib.sha512(DATA).hexdigest()


def test_a_digest_is_the_string_it_parses() -> None:
    digest = Digest(SHA256)
    assert digest == SHA256 and str(digest) == SHA256 and hash(digest) == hash(SHA256)
    assert f"{digest}" == SHA256
    assert digest.algorithm == "sha256" and digest.encoded == SHA256[7:]
    assert digest.short() == SHA256[:19]
    assert {SHA256: 1}[digest] == 1
    assert Digest(digest) is digest


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sha256", "malformed digest"),
        ("sha256:", "malformed digest"),
        ("SHA256:" + "0" * 64, "malformed digest"),
        ("md5:" + "0" * 32, "unsupported digest algorithm"),
        ("sha256+b64:abc", "unsupported digest algorithm"),
        ("sha256:" + "0" * 63, "malformed sha256 digest"),
        ("sha256:" + "A" * 64, "malformed sha256 digest"),
        ("sha512:" + "0" * 64, "malformed sha512 digest"),
        ("sha256:" + "0" * 64 + "\n", "malformed digest"),
    ],
)
def test_only_verifiable_digests_are_accepted(value: str, message: str) -> None:
    with pytest.raises(InvalidDigestError, match=message):
        Digest(value)
    with pytest.raises(ManifestError, match=f"^index.json: {message}"):
        Digest.parse(value, "index.json")


@pytest.mark.parametrize("value", [None, 7, ["sha256:"], {"a": 1}, True])
def test_a_digest_from_json_must_be_a_string(value: object) -> None:
    with pytest.raises(InvalidDigestError, match=r"^where: digest must be a string"):
        Digest.parse(value, "where")


def test_of_and_verify() -> None:
    assert Digest.of(DATA) == SHA256
    assert Digest.of(DATA, "sha512") == SHA512
    Digest(SHA256).verify(DATA, where="blob", over="12 bytes")
    Digest(SHA512).verify(memoryview(DATA), where="blob", over="12 bytes")
    with pytest.raises(DigestMismatchError) as caught:
        Digest(SHA256).verify(b"other", where="layer 1/2", over="the compressed blob")
    assert str(caught.value) == (
        f"layer 1/2: digest mismatch: expected {SHA256}, found {Digest.of(b'other')}, "
        "over the compressed blob"
    )


def test_incremental_hasher() -> None:
    hasher = Digest(SHA256).hasher()
    for i in range(0, len(DATA), 5):
        hasher.update(DATA[i : i + 5])
    assert hasher.verify(where="w", over="o") == SHA256
    hasher.update(b"x")
    with pytest.raises(DigestMismatchError, match=r"expected sha256:.*found sha256:"):
        hasher.verify(where="w", over="o")
    plain = Hasher("sha512")
    plain.update(DATA)
    assert plain.result() == SHA512
    with pytest.raises(InvalidDigestError):
        Hasher("md5")


def test_pickles_as_a_digest() -> None:
    # Errors and results cross the tree builder's pipe pickled.
    copy = pickle.loads(pickle.dumps(Digest(SHA256)))
    assert isinstance(copy, Digest) and copy == SHA256
