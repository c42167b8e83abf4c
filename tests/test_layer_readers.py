"""imagefs.layers.reader on real compressed tar blobs (no mocks).

One tar of ~16 MiB (random and text files; it compresses about 2.7:1) is
compressed by Python's gzip, GNU gzip, several concatenated gzip members,
the zstd CLI (with and without a content size) and python-zstandard in
many frames of mixed kinds. Each blob is read standalone and as a byte range
inside a bigger file with junk on both sides, and compared with the tar.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import random
import struct
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from imagefs.cachedir import AtomicFile, sweep_temporaries
from imagefs.digest import Digest, InvalidDigestError
from imagefs.errors import (
    CompressionError,
    DigestMismatchError,
    MediaTypeError,
    TarFormatError,
)
from imagefs.image import BlobRange, Descriptor, Layer
from imagefs.layers import gzip as gzip_layer
from imagefs.layers import zstd as zstd_layer
from imagefs.layers.reader import (
    Compression,
    LayerData,
    detect_compression,
    open_layer_data,
    open_layer_stream,
)

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MIB = 1 << 20


# ---------------------------------------------------------------- test data


def _make_tar() -> bytes:
    rng = random.Random(1234)
    words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(400)]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        sizes = [0, 1, 511, 512, 513, 4096, 100_000] + [
            rng.randrange(1, 300_000) for _ in range(60)
        ]
        sizes += [3 * MIB, 5 * MIB + 17]
        for i, size in enumerate(sizes):
            if i % 3 == 0:
                data = rng.randbytes(size)  # incompressible
            else:
                text = " ".join(rng.choices(words, k=size // 4 + 1)).encode()
                data = text[:size]
            info = tarfile.TarInfo(f"dir{i % 5}/file{i:03d}-" + "x" * (i % 7) * 20)
            info.size = size
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


TAR = _make_tar()


def _run(cmd: list[str], data: bytes) -> bytes:
    return subprocess.run(cmd, input=data, stdout=subprocess.PIPE, check=True).stdout


def _gzip_cli(tmp: Path) -> bytes:
    src = tmp / "layer.tar"  # from a file, gzip stores its name (FNAME) in the header
    src.write_bytes(TAR)
    return _run(["gzip", "-1", "-c", str(src)], b"")


def _zstd_cli(tmp: Path, *, content_size: bool) -> bytes:
    if content_size:  # from a file, the CLI records the size in the frame header
        src = tmp / "in.tar"
        src.write_bytes(TAR)
        out = tmp / "out.zst"
        subprocess.run(["zstd", "-q", "-3", "-T0", str(src), "-o", str(out)], check=True)
        return out.read_bytes()
    return _run(["zstd", "-q", "-3", "-T0", "-c"], TAR)  # from a pipe: size unknown


def _zstd_multi() -> bytes:
    """Frames of every kind the seek table handles, plus a skippable frame."""
    with_size = zstandard.ZstdCompressor(level=1, write_content_size=True)
    no_size = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=True)
    cuts = [300_000, MIB, 6 * MIB, 5 * MIB, 2 * MIB, 2 * MIB, len(TAR)]
    makers = [with_size, no_size, with_size, no_size, with_size, no_size, with_size]
    frames, start = [], 0
    for i, (cut, maker) in enumerate(zip(cuts, makers, strict=True)):
        end = min(start + cut, len(TAR))
        frames.append(maker.compress(TAR[start:end]))
        if i == 1:
            frames.append(struct.pack("<II", 0x184D2A5E, 7) + b"skipped")
        if i == 2:
            frames.append(with_size.compress(b""))  # an empty frame
        start = end
    assert start == len(TAR)
    return b"".join(frames)


def _gzip_members() -> bytes:
    thirds = [0, len(TAR) // 3, 2 * len(TAR) // 3, len(TAR)]
    return b"".join(
        gzip.compress(TAR[a:b], compresslevel=1, mtime=0) for a, b in itertools.pairwise(thirds)
    )


@dataclass(frozen=True)
class Blob:
    name: str
    data: bytes
    compression: Compression
    media_type: str


@pytest.fixture(scope="session")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Blob]:
    tmp = tmp_path_factory.mktemp("zstdcli")
    made = [
        Blob("plain", TAR, Compression.NONE, OCI_TAR),
        Blob(
            "gzip-python", gzip.compress(TAR, compresslevel=1, mtime=0), Compression.GZIP, OCI_GZIP
        ),
        Blob("gzip-cli", _gzip_cli(tmp), Compression.GZIP, OCI_GZIP),
        Blob("gzip-members", _gzip_members(), Compression.GZIP, OCI_GZIP),
        Blob("zstd-cli-size", _zstd_cli(tmp, content_size=True), Compression.ZSTD, OCI_ZSTD),
        Blob("zstd-cli-pipe", _zstd_cli(tmp, content_size=False), Compression.ZSTD, OCI_ZSTD),
        Blob("zstd-multi", _zstd_multi(), Compression.ZSTD, OCI_ZSTD),
    ]
    return {blob.name: blob for blob in made}


BLOB_NAMES = [
    "plain",
    "gzip-python",
    "gzip-cli",
    "gzip-members",
    "zstd-cli-size",
    "zstd-cli-pipe",
    "zstd-multi",
]
COMPRESSED = BLOB_NAMES[1:]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def place(
    tmp: Path,
    data: bytes,
    media_type: str,
    *,
    inside: bool = False,
    digest: str | None = None,
    size: int | None = None,
) -> Layer:
    """Write ``data`` as its own file, or as a range of a bigger file with junk around it."""
    path = tmp / f"blob-{os.urandom(4).hex()}"
    offset = 0
    if inside:
        # The junk starts with gzip and zstd magic: reading outside the range shows.
        before = b"\x1f\x8b\x08\x00" + b"\x28\xb5\x2f\xfd" + random.Random(1).randbytes(4089)
        after = b"\x1f\x8b\x08\x00" + random.Random(2).randbytes(777)
        path.write_bytes(before + data + after)
        offset = len(before)
    else:
        path.write_bytes(data)
    descriptor = Descriptor(
        media_type,
        Digest(sha256(data) if digest is None else digest),
        len(data) if size is None else size,
    )
    return Layer(descriptor, BlobRange(str(path), offset, len(data)))


def read_all(layer: Layer, cache_dir: str | None = None, step: int = 100_000) -> bytes:
    parts = []
    with open_layer_stream(layer, cache_dir) as stream:
        while chunk := stream.read(step):
            parts.append(chunk)
        assert stream.tell() == sum(map(len, parts))
    return b"".join(parts)


# ------------------------------------------------------- detect_compression


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        (OCI_TAR, Compression.NONE),
        (OCI_GZIP, Compression.GZIP),
        (OCI_ZSTD, Compression.ZSTD),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", Compression.NONE),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.docker.image.rootfs.diff.tar", Compression.NONE),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression.GZIP),
    ],
)
def test_media_types_when_content_agrees(
    blobs: dict[str, Blob], tmp_path: Path, media_type: str, expected: Compression
) -> None:
    data = {
        Compression.NONE: TAR[:4096],
        Compression.GZIP: gzip.compress(TAR[:4096]),
        Compression.ZSTD: zstandard.compress(TAR[:4096]),
    }[expected]
    assert detect_compression(place(tmp_path, data, media_type)) is expected


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("gzip-python", OCI_TAR),
        ("gzip-cli", OCI_ZSTD),
        ("zstd-cli-size", OCI_GZIP),
        ("zstd-multi", "application/vnd.docker.image.rootfs.diff.tar"),
        ("plain", OCI_GZIP),  # skopeo --dest-oci-accept-uncompressed-layers does this
        ("plain", OCI_ZSTD),
    ],
)
def test_magic_bytes_win_over_media_type(
    blobs: dict[str, Blob], tmp_path: Path, name: str, label: str
) -> None:
    blob = blobs[name]
    layer = place(tmp_path, blob.data, label, inside=True)
    assert detect_compression(layer) is blob.compression
    assert read_all(layer, step=3 * MIB) == TAR


@pytest.mark.parametrize(
    "media_type",
    [
        "",
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        "application/octet-stream",
    ],
)
def test_non_layer_media_type_is_rejected(tmp_path: Path, media_type: str) -> None:
    layer = place(tmp_path, gzip.compress(b"x"), media_type)
    with pytest.raises(MediaTypeError) as info:
        detect_compression(layer)
    assert repr(media_type) in str(info.value)
    assert layer.descriptor.digest in str(info.value)
    with pytest.raises(MediaTypeError):
        open_layer_data(layer)


def test_empty_blob_is_an_empty_tar(tmp_path: Path) -> None:
    layer = place(tmp_path, b"", OCI_GZIP, inside=True)
    assert detect_compression(layer) is Compression.NONE
    assert read_all(layer) == b""
    data = open_layer_data(layer)
    try:
        assert data.pread(0, 100) == b""
    finally:
        data.close()


@pytest.mark.parametrize("size", [0, 1, 10240])
@pytest.mark.parametrize("media_type", [OCI_GZIP, OCI_ZSTD])
def test_tiny_compressed_layers(tmp_path: Path, size: int, media_type: str) -> None:
    raw = TAR[:size]
    blob = gzip.compress(raw) if media_type == OCI_GZIP else zstandard.compress(raw)
    layer = place(tmp_path, blob, media_type, inside=True)
    for cache in (None, str(tmp_path / "cache")):
        assert read_all(layer, cache) == raw
        with closing(open_layer_data(layer, cache)) as data:
            assert data.pread(0, size + 10) == raw
            assert data.pread(size, 1) == b""


# ------------------------------------------------------- the sequential pass


@pytest.mark.parametrize("inside", [False, True], ids=["file", "range"])
@pytest.mark.parametrize("name", BLOB_NAMES)
def test_sequential_read_gives_the_tar(
    blobs: dict[str, Blob], tmp_path: Path, name: str, inside: bool
) -> None:
    blob = blobs[name]
    layer = place(tmp_path, blob.data, blob.media_type, inside=inside)
    assert detect_compression(layer) is blob.compression
    assert read_all(layer, step=1_000_003) == TAR


@pytest.mark.parametrize("name", BLOB_NAMES)
def test_skip_and_read_combinations(blobs: dict[str, Blob], tmp_path: Path, name: str) -> None:
    blob = blobs[name]
    layer = place(tmp_path, blob.data, blob.media_type, inside=True)
    rng = random.Random(name)
    with open_layer_stream(layer) as stream:
        pos = 0
        while pos < len(TAR):
            # Mostly tar-like steps (512-byte headers, file-sized skips), some odd ones.
            n = rng.choice([0, 1, 512, 512, 1000, rng.randrange(1, 3 * MIB)])
            if rng.random() < 0.5:
                assert stream.read(n) == TAR[pos : pos + n]
            else:
                stream.skip(n)
            pos = min(pos + n, len(TAR))
            assert stream.tell() == pos
        stream.skip(10)  # past the end: stays at the end
        assert stream.tell() == len(TAR)
        assert stream.read(512) == b""


@pytest.mark.parametrize("name", ["plain", "gzip-cli", "zstd-cli-pipe", "zstd-multi"])
def test_early_exit_still_verifies_everything(
    blobs: dict[str, Blob], tmp_path: Path, name: str
) -> None:
    """The scanner stops at the end-of-archive marker; the rest is still checked."""
    blob = blobs[name]
    bad = place(tmp_path, blob.data, blob.media_type, digest=sha256(b"something else"))
    with pytest.raises(DigestMismatchError) as info, open_layer_stream(bad) as stream:
        assert stream.read(512) == TAR[:512]
    assert str(info.value) == (
        f"layer {sha256(b'something else')}: digest mismatch: expected "
        f"{sha256(b'something else')}, found {sha256(blob.data)}, over the blob "
        f"({len(blob.data)} bytes of {bad.blob.path})"
    )


def test_sha512_digest(blobs: dict[str, Blob], tmp_path: Path) -> None:
    data = blobs["gzip-members"].data
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    assert read_all(place(tmp_path, data, OCI_GZIP, digest=digest)) == TAR
    wrong = "sha512:" + hashlib.sha512(b"no").hexdigest()
    with pytest.raises(DigestMismatchError):
        read_all(place(tmp_path, data, OCI_GZIP, digest=wrong))


@pytest.mark.parametrize("digest", ["md5:abc", "sha256:XYZ", "sha256", ""])
def test_a_layer_cannot_carry_an_unusable_digest(tmp_path: Path, digest: str) -> None:
    # Refused where the descriptor is made (sources parse with Digest.parse),
    # so no reader ever starts on a layer it could not verify.
    with pytest.raises(InvalidDigestError):
        place(tmp_path, TAR[:1024], OCI_TAR, digest=digest)


def test_size_mismatch(tmp_path: Path) -> None:
    layer = place(tmp_path, TAR[:4096], OCI_TAR, size=4097)
    with pytest.raises(DigestMismatchError, match="4096 bytes, descriptor says 4097"):
        read_all(layer)


def test_range_past_end_of_file(tmp_path: Path) -> None:
    layer = place(tmp_path, TAR[:4096], OCI_TAR)
    short = Layer(layer.descriptor, BlobRange(layer.blob.path, 100, 4096))
    with pytest.raises(DigestMismatchError, match="truncated"):
        read_all(short)


def _damaged(data: bytes, how: str) -> bytes:
    if how == "truncated-half":
        return data[: len(data) // 2]
    if how == "truncated-tail":
        return data[:-3]
    if how == "flipped":
        damaged = bytearray(data)
        for at in range(len(data) // 3, len(data) // 3 + 64):
            damaged[at] ^= 0x55
        return bytes(damaged)
    assert how == "garbage"
    return data + b"trailing garbage!"


DAMAGE = [
    (name, how)
    for name in ("gzip-cli", "gzip-members", "zstd-cli-size", "zstd-multi")
    for how in ("truncated-half", "truncated-tail", "flipped", "garbage")
    # zstd-multi has frames without checksums: a flipped byte there may decode
    # to wrong data that only the digest catches.
    if (name, how) != ("zstd-multi", "flipped")
]


@pytest.mark.parametrize(("name", "how"), DAMAGE)
def test_damaged_stream_is_a_compression_error(
    blobs: dict[str, Blob], tmp_path: Path, name: str, how: str
) -> None:
    """The digest matches the damaged bytes: only the decoder can tell."""
    blob = blobs[name]
    layer = place(tmp_path, _damaged(blob.data, how), blob.media_type, inside=True)
    with pytest.raises(CompressionError) as info:
        read_all(layer, step=MIB)
    assert layer.descriptor.digest in str(info.value)
    cache = tmp_path / "cache"
    with pytest.raises(CompressionError):
        open_layer_data(layer, str(cache))
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-built left


@pytest.mark.parametrize("name", ["gzip-python", "zstd-cli-size"])
def test_damage_skipped_over_is_still_found(
    blobs: dict[str, Blob], tmp_path: Path, name: str
) -> None:
    blob = blobs[name]
    layer = place(tmp_path, _damaged(blob.data, "flipped"), blob.media_type)
    with pytest.raises(CompressionError), open_layer_stream(layer) as stream:
        stream.read(512)
        stream.skip(len(TAR))


def test_corrupt_layer_with_wrong_digest_reports_the_digest(
    blobs: dict[str, Blob], tmp_path: Path
) -> None:
    data = _damaged(blobs["gzip-cli"].data, "truncated-half")
    layer = place(tmp_path, data, OCI_GZIP, digest=sha256(blobs["gzip-cli"].data), size=len(data))
    with pytest.raises(DigestMismatchError) as info:
        read_all(layer)
    assert isinstance(info.value.__cause__, CompressionError)


def test_error_in_the_body_propagates_and_caches_nothing(
    blobs: dict[str, Blob], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    for name in ("gzip-cli", "zstd-cli-pipe"):
        blob = blobs[name]
        layer = place(tmp_path, blob.data, blob.media_type)
        with (
            pytest.raises(TarFormatError, match="scanner says no"),
            open_layer_stream(layer, str(cache)) as stream,
        ):
            stream.read(512)
            raise TarFormatError("scanner says no")
    assert not cache.exists() or not list(cache.iterdir())


# ------------------------------------------------------------ random access


@pytest.fixture(scope="module")
def opened(
    blobs: dict[str, Blob], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LayerData]]:
    tmp = tmp_path_factory.mktemp("opened")
    readers = {}
    try:
        for name in BLOB_NAMES:
            blob = blobs[name]
            layer = place(tmp, blob.data, blob.media_type, inside=True)
            readers[name] = open_layer_data(layer, str(tmp / "cache"))
        yield readers
    finally:
        for reader in readers.values():
            reader.close()


def _probes(seed: str) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    n = len(TAR)
    probes = [(0, 0), (0, 1), (0, 512), (n - 1, 1), (n - 10, 100), (n, 10), (n + 5, 10)]
    probes += [(k * MIB - 3, 7) for k in range(1, n // MIB + 1)]  # frame/chunk seams
    probes += [
        (rng.randrange(n), rng.choice([1, 512, 4096, 128 << 10, 3 * MIB])) for _ in range(150)
    ]
    return probes


@pytest.mark.parametrize("name", BLOB_NAMES)
def test_pread_matches_the_tar(opened: dict[str, LayerData], name: str) -> None:
    data = opened[name]
    for offset, size in _probes(name):
        assert data.pread(offset, size) == TAR[offset : offset + size], (offset, size)
    assert data.pread(0, len(TAR) + 100) == TAR


@pytest.mark.parametrize("name", BLOB_NAMES)
def test_pread_from_eight_threads(opened: dict[str, LayerData], name: str) -> None:
    data = opened[name]
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            offset = rng.randrange(len(TAR))
            size = rng.choice([512, 65536, 128 << 10, 2 * MIB])
            if data.pread(offset, size) != TAR[offset : offset + size]:
                failures.append(f"{offset}+{size}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_pread_argument_checks(opened: dict[str, LayerData]) -> None:
    for data in opened.values():
        with pytest.raises(ValueError):
            data.pread(-1, 10)
        with pytest.raises(ValueError):
            data.pread(0, -1)


def test_gzip_readers_beyond_the_limit_are_reopened(
    blobs: dict[str, Blob], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gzip_layer._OPEN_READERS, "limit", 1)
    readers = [
        open_layer_data(place(tmp_path, blobs[name].data, OCI_GZIP), str(tmp_path))
        for name in ("gzip-python", "gzip-cli", "gzip-members")
    ]
    try:
        rng = random.Random(5)
        for _ in range(30):
            reader = rng.choice(readers)
            offset = rng.randrange(len(TAR))
            assert reader.pread(offset, 5000) == TAR[offset : offset + 5000]
    finally:
        for reader in readers:
            reader.close()


# ------------------------------------------------------------------- caching


def _cache_files(cache: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()}


@pytest.mark.parametrize("name", ["gzip-cli", "zstd-cli-size", "zstd-multi"])
def test_stream_leaves_the_cache_for_open_layer_data(
    blobs: dict[str, Blob], tmp_path: Path, name: str
) -> None:
    blob = blobs[name]
    layer = place(tmp_path, blob.data, blob.media_type, inside=True)
    cache = tmp_path / "cache"
    assert read_all(layer, str(cache), step=333_333) == TAR
    built = _cache_files(cache)
    assert len(built) == 1 and not any(n.endswith(".part") for n in built)
    assert next(iter(built)).startswith(layer.descriptor.digest.replace(":", "-"))
    for _ in range(2):
        # A second pass and two opens reuse the same file: not rebuilt.
        read_all(layer, str(cache))
        with closing(open_layer_data(layer, str(cache))) as data:
            assert data.pread(7 * MIB, 1000) == TAR[7 * MIB : 7 * MIB + 1000]
        assert _cache_files(cache) == built


@pytest.mark.parametrize("name", ["gzip-members", "zstd-cli-pipe"])
def test_second_open_layer_data_reuses_the_cache(
    blobs: dict[str, Blob], tmp_path: Path, name: str
) -> None:
    blob = blobs[name]
    layer = place(tmp_path, blob.data, blob.media_type)
    cache = tmp_path / "cache"
    with closing(open_layer_data(layer, str(cache))) as first:
        built = _cache_files(cache)
        assert len(built) == 1
        with closing(open_layer_data(layer, str(cache))) as second:
            assert (
                second.pread(5 * MIB, 10) == first.pread(5 * MIB, 10) == TAR[5 * MIB : 5 * MIB + 10]
            )
    assert _cache_files(cache) == built


def test_zstd_seek_file_is_small_for_small_frames(blobs: dict[str, Blob], tmp_path: Path) -> None:
    """In-place frames cost a table entry; only the big frames are re-encoded."""
    cache = tmp_path / "cache"
    read_all(place(tmp_path, blobs["zstd-multi"].data, OCI_ZSTD), str(cache))
    (seek_file,) = cache.iterdir()
    re_encoded = 6 * MIB + 5 * MIB  # the two frames over IN_PLACE_MAX
    assert seek_file.stat().st_size < re_encoded  # compressed, without the small frames
    assert seek_file.stat().st_size > re_encoded // 10


def test_damaged_cache_file_is_rebuilt(blobs: dict[str, Blob], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name in ("gzip-members", "zstd-cli-pipe"):
        blob = blobs[name]
        layer = place(tmp_path, blob.data, blob.media_type)
        read_all(layer, str(cache))
    for path in cache.iterdir():
        damaged = bytearray(path.read_bytes())
        damaged[-30] ^= 1  # in the seek table footer / the gzip index
        path.write_bytes(bytes(damaged[: len(damaged) - 1]))
    for name in ("gzip-members", "zstd-cli-pipe"):
        blob = blobs[name]
        layer = place(tmp_path, blob.data, blob.media_type)
        with closing(open_layer_data(layer, str(cache))) as data:
            assert data.pread(len(TAR) - 5000, 9999) == TAR[-5000:]


def test_zstd_without_cache_dir_cleans_up(blobs: dict[str, Blob], tmp_path: Path) -> None:
    blob = blobs["zstd-cli-size"]
    layer = place(tmp_path, blob.data, OCI_ZSTD)
    data = open_layer_data(layer)
    assert isinstance(data, zstd_layer.ZstdLayerData)
    owned = data._owned_dir
    assert owned is not None and os.path.isdir(owned)
    assert data.pread(MIB, 10) == TAR[MIB : MIB + 10]
    data.close()
    assert not os.path.exists(owned)
    with pytest.raises(ValueError):
        data.pread(0, 1)


def test_two_builders_at_once(blobs: dict[str, Blob], tmp_path: Path) -> None:
    """Two mounts building the same cache file: both succeed, one whole file remains."""
    blob = blobs["zstd-cli-pipe"]
    layer = place(tmp_path, blob.data, OCI_ZSTD)
    cache = str(tmp_path / "cache")
    results: list[bytes] = []

    def build() -> None:
        with closing(open_layer_data(layer, cache)) as data:
            results.append(data.pread(0, len(TAR)))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [TAR, TAR]
    assert [p.name.endswith(".part") for p in Path(cache).iterdir()] == [False]


def test_unusable_cache_dir_is_not_fatal(
    blobs: dict[str, Blob], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    for name in ("gzip-cli", "zstd-cli-size"):
        blob = blobs[name]
        layer = place(tmp_path, blob.data, blob.media_type)
        assert read_all(layer, str(not_a_dir)) == TAR
        with closing(open_layer_data(layer, str(not_a_dir))) as data:
            assert data.pread(3 * MIB, 100) == TAR[3 * MIB : 3 * MIB + 100]
    assert "unusable" in caplog.text


def test_stale_temporary_files_are_swept(blobs: dict[str, Blob], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    # A writer that died leaves an unlocked temporary file; a live one holds
    # its lock (here: this process, writing another cache file right now).
    dead = cache / f".sha256-{'0' * 64}.gzidx1.{'1' * 16}.part"
    dead.write_bytes(b"x")
    # Older imagefs wrote temporary files without a lock: removed once abandoned.
    legacy_stale, legacy_fresh = cache / ".layerio-tmp-dead.part", cache / ".tag-live.part"
    legacy_stale.write_bytes(b"x")
    legacy_fresh.write_bytes(b"x")
    os.utime(legacy_stale, (0, 0))
    live = AtomicFile(cache / "other-file")  # sweeps the directory: its first write here
    assert not dead.exists() and not legacy_stale.exists()
    blob = blobs["gzip-python"]
    read_all(place(tmp_path, blob.data, OCI_GZIP), str(cache))
    assert Path(live.temporary).exists() and legacy_fresh.exists()
    live.abort()
    # cache prune sweeps too, whenever it runs: a writer that dies now leaves
    # a file the next prune removes.
    orphan = cache / f".sha256-{'0' * 64}.gzidx1.{'2' * 16}.part"
    orphan.write_bytes(b"x")
    assert sweep_temporaries(cache) == (1, 1) and not orphan.exists()
