"""Content digests, parsed once and checked one way (OCI image-spec ``descriptor.md``).

A :class:`Digest` is a validated ``algorithm:encoded`` string, as go-digest's
``digest.Digest`` is: it compares, hashes, formats and serialises as the
string it is, so it can sit in descriptors, dict keys and JSON unchanged.
Only algorithms imagefs can verify are accepted (sha256 and sha512, with
their exact lower-case hex encodings); anything else is refused where it is
first read, never carried along to fail later.

Every check goes through :meth:`Digest.verify` or :meth:`Hasher.verify` and
fails with one message shape::

    <where>: digest mismatch: expected sha256:..., found sha256:..., over <what bytes>

``over`` says which bytes were hashed ("the compressed blob", "the
uncompressed layer tar", "48 bytes of config"), because a docker-archive's
trust chain runs over the uncompressed stream while a registry's runs over
the compressed blob, and an investigator must know which one failed.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from imagefs.errors import DigestMismatchError, ManifestError

__all__ = ["ALGORITHMS", "Digest", "Hasher", "InvalidDigestError"]

# Registered algorithms (descriptor.md "Registered algorithms") and the length
# of their hex encoding. These are the only ones imagefs can verify.
ALGORITHMS = {"sha256": 64, "sha512": 128}
# descriptor.md: the general grammar, for telling "malformed" from "unsupported".
_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HEX = frozenset("0123456789abcdef")
# What every valid digest looks like, checked in one C call: a TOC holds one
# chunk digest per chunk (tens of thousands), and the part-by-part checks
# cost 20 us each. Only a digest that fails it gets the precise message.
_VALID = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


class InvalidDigestError(ManifestError):
    """A digest string that is malformed or uses an algorithm imagefs cannot verify."""


class Digest(str):
    """A validated digest: ``Digest("sha256:<64 hex>")``; InvalidDigestError otherwise."""

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if isinstance(value, Digest):
            return value
        if _VALID.fullmatch(value) is None:
            raise InvalidDigestError(f"{_problem(value) or 'malformed digest'} {value!r}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, value: object, where: str) -> Digest:
        """A digest read from untrusted input; the error names ``where`` it was read."""
        if not isinstance(value, str):
            raise InvalidDigestError(
                f"{where}: digest must be a string, not {type(value).__name__}"
            )
        if _VALID.fullmatch(value) is None:
            problem = _problem(value) or "malformed digest"
            raise InvalidDigestError(f"{where}: {problem} {value!r}")
        return super().__new__(cls, value)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")

    @property
    def algorithm(self) -> str:
        return self.partition(":")[0]

    @property
    def encoded(self) -> str:
        """The hex part: the file name of the blob in ``blobs/<algorithm>/``."""
        return self.partition(":")[2]

    def short(self) -> str:
        """``sha256:0123456789ab``: enough to tell layers apart in progress lines."""
        return f"{self.algorithm}:{self.encoded[:12]}"

    def hasher(self) -> Hasher:
        """An incremental hash of this digest's algorithm, to be checked against it."""
        return Hasher(self.algorithm, expected=self)

    def verify(self, data: bytes | bytearray | memoryview, *, where: str, over: str) -> None:
        """DigestMismatchError unless ``data`` hashes to this digest."""
        check(self, Digest.of(data, self.algorithm), where=where, over=over)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled errors and trees cross the build child's pipe: keep the type.
        return (Digest, (str(self),))


class Hasher:
    """An incremental hash (``update`` as bytes arrive), optionally with its expected digest."""

    __slots__ = ("_hash", "algorithm", "expected")

    def __init__(self, algorithm: str = "sha256", *, expected: Digest | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise InvalidDigestError(f"unsupported digest algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.expected = expected
        self._hash = hashlib.new(algorithm)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def result(self) -> Digest:
        """The digest of everything so far (the hasher may go on)."""
        return Digest(f"{self.algorithm}:{self._hash.hexdigest()}")

    def verify(self, *, where: str, over: str) -> Digest:
        """DigestMismatchError unless the bytes so far hash to ``expected``; the digest."""
        assert self.expected is not None, "verify() needs the expected digest"
        found = self.result()
        check(self.expected, found, where=where, over=over)
        return found


def check(expected: Digest, found: Digest, *, where: str, over: str) -> None:
    """The one digest comparison: DigestMismatchError naming both digests and the bytes."""
    if found != expected:
        raise DigestMismatchError(
            f"{where}: digest mismatch: expected {expected}, found {found}, over {over}"
        )


def _problem(value: str) -> str | None:
    algorithm, sep, encoded = value.partition(":")
    if not sep or not _GRAMMAR.fullmatch(value):
        return "malformed digest"
    length = ALGORITHMS.get(algorithm)
    if length is None:
        return "unsupported digest algorithm in"
    if len(encoded) != length or not _HEX.issuperset(encoded):
        return f"malformed {algorithm} digest"
    return None
