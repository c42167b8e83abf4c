"""The TOC format library on crafted blobs: footers, TOCs, chunks, local layers.

Blobs come from tests.toccraft (written from the format descriptions, with
the TOC a dict a test breaks on purpose); what a tar reader sees of the same
blob (its decompressed stream, scanned by the tar scanner) is the oracle for
the entries. Real producers are in test_toc_layers.py; fuzzing in
test_fuzz.py.
"""

from __future__ import annotations

import datetime
import gzip
import io
import os
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from imagefs.cachedir import TOC_CHUNKS, TOC_INDEX
from imagefs.digest import Digest
from imagefs.errors import CompressionError, DigestMismatchError, ImageFSError, TocError
from imagefs.image import BlobRange, Descriptor, Layer
from imagefs.layers import index as layer_index
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.reader import open_layer_data
from imagefs.layers.tarscan import scan_tar
from imagefs.layers.toc import (
    TOC_DATA_BASE,
    Chunk,
    NotServable,
    Toc,
    TocFormat,
    decode_chunk,
    locate,
    read_toc,
)
from imagefs.layers.toc import limits as toc_limits
from imagefs.layers.toc.bookkeeping import mark_bookkeeping
from imagefs.layers.toc.jsontoc import parse_rfc3339_ns
from imagefs.layers.toc.locate import TAIL_SIZE
from imagefs.layers.toc.read import TOC_PIECE
from imagefs.progress import Progress
from imagefs.sources import open_image
from imagefs.tree.loader import scan_layer
from imagefs.tree.overlay import merge_layers
from tests import builder
from tests.toccraft import BytesBlob, Crafted, Item, estargz, sha256, zstd_chunked

WHERE = "layer test"
RANDOM = bytes((i * 7919 + (i >> 8) * 31) & 0xFF for i in range(300_000))
ITEMS = [
    Item("etc/", kind="dir", mode=0o755),
    Item("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", uname="root", gname="root"),
    Item("etc/shadow", data=b"root:*::\n", mode=0o640, gid=42, gname="shadow"),
    Item("bin/big", data=RANDOM, mode=0o4755),
    Item("bin/big-link", kind="hardlink", link="bin/big"),
    Item("bin/sh", kind="symlink", link="/bin/big", mode=0o777),
    Item("dev/null", kind="char", dev=(1, 3), mode=0o666),
    Item("run/fifo", kind="fifo", mode=0o600),
    Item("empty", data=b""),
    Item("x/attrs", data=b"x", xattrs={"user.a": b"\x00\xff", "trusted.b": b"t"}),
    Item("x/.wh.gone", data=b""),
    Item("usr/n", data=b"owned", uid=1000, gid=1000, uname="user", gname="users"),
    Item("usr/m", data=b"same uid, name not repeated", uid=1000, gid=1000),
]


def _locate(crafted: Crafted, annotations: dict[str, str] | None = None) -> Any:
    chosen = crafted.annotations if annotations is None else annotations
    return locate(len(crafted.blob), chosen, crafted.blob[-TAIL_SIZE:], WHERE)


def _read(crafted: Crafted, annotations: dict[str, str] | None = None) -> Toc:
    toc = read_toc(BytesBlob(crafted.blob), _locate(crafted, annotations), where=WHERE, warn=print)
    assert isinstance(toc, Toc)
    return toc


def _scanned(tar: bytes) -> list[TarEntry]:
    class Stream:
        def __init__(self) -> None:
            self.pos = 0

        def read(self, n: int) -> bytes:
            data = tar[self.pos : self.pos + n]
            self.pos += len(data)
            return data

        def skip(self, n: int) -> None:
            self.pos = min(self.pos + n, len(tar))

        def tell(self) -> int:
            return self.pos

    return list(scan_tar(Stream(), print))


def _file_bytes(crafted: Crafted, toc: Toc, path: str) -> bytes:
    return b"".join(
        decode_chunk(toc.format, chunk, crafted.blob[chunk.offset : chunk.offset + chunk.length],
                     where=WHERE)
        for chunk in _chunks(toc, path)
    )  # fmt: skip


def _chunks(toc: Toc, path: str) -> tuple[Chunk, ...]:
    position = next(i for i, entry in enumerate(toc.entries) if entry.path == path)
    return toc.chunks.chunks_of(position)


# --------------------------------------------------------------------------- whole TOCs


@pytest.mark.parametrize("kind", ["estargz", "estargz-legacy", "zstd:chunked"])
def test_entries_are_what_the_tar_scanner_sees(kind: str) -> None:
    if kind == "zstd:chunked":
        crafted = zstd_chunked(ITEMS, chunk_size=64 << 10)
    else:
        crafted = estargz(ITEMS, chunk_size=100_000, legacy=kind == "estargz-legacy")
    toc = _read(crafted)
    tar = _scanned(crafted.tar)
    from_toc = list(toc.entries)
    assert len(from_toc) == len(tar)
    for mine, theirs in zip(from_toc, tar, strict=True):
        # What the formats cannot say: containers/storage records no user or
        # group names, eStargz only changes of them (see the next test); the
        # attributes' order is the JSON object's.
        assert _comparable(mine) == _comparable(replace(theirs, data_offset=mine.data_offset))
    for item in ITEMS:
        if item.kind == "reg":
            assert _file_bytes(crafted, toc, item.name) == item.data
    if kind != "zstd:chunked":
        assert _file_bytes(crafted, toc, "stargz.index.json") == crafted.toc_json
        assert toc.digest == sha256(crafted.toc_json)


def _comparable(entry: TarEntry) -> TarEntry:
    return replace(entry, uname="", gname="", xattrs=tuple(sorted(entry.xattrs)))


def test_the_data_space_is_the_files_back_to_back() -> None:
    toc = _read(estargz(ITEMS, chunk_size=100_000))
    expected = TOC_DATA_BASE
    for position, entry in enumerate(toc.entries):
        if entry.type is EntryType.FILE:
            assert entry.data_offset == expected
            assert sum(chunk.size for chunk in toc.chunks.chunks_of(position)) == entry.size
            expected += entry.size
    assert toc.data_size == expected - TOC_DATA_BASE
    assert [chunk.file_offset for chunk in _chunks(toc, "bin/big")] == [0, 100_000, 200_000]


def test_estargz_user_names_carry_forward_per_uid() -> None:
    toc = _read(estargz(ITEMS))
    by_path = {entry.path: entry for entry in toc.entries}
    assert (by_path["usr/m"].uname, by_path["usr/m"].gname) == ("user", "users")
    assert by_path["etc/shadow"].gname == "shadow"


def test_both_zstd_chunked_annotation_prefixes_and_the_footer_locate_the_toc() -> None:
    for prefix in ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked."):
        for magic in (b"GNUlInUx", b"GnUlInUx"):
            crafted = zstd_chunked(ITEMS, prefix=prefix, magic=magic)
            by_annotation = _locate(crafted)
            by_footer = _locate(crafted, {})
            assert (
                by_annotation.compressed_digest == crafted.annotations[prefix + "manifest-checksum"]
            )
            assert (by_footer.offset, by_footer.length) == (
                by_annotation.offset,
                by_annotation.length,
            )
            assert by_footer.compressed_digest is None
            assert len(_read(crafted).entries) == len(ITEMS)


def test_a_blob_without_a_toc_has_none() -> None:
    tar = builder.make_layer_tar([builder.file("a", "a")])
    for blob in (gzip.compress(tar), zstandard.ZstdCompressor().compress(tar), tar, b""):
        assert locate(len(blob), {}, blob[-TAIL_SIZE:], WHERE) is None


# --------------------------------------------------------------------------- digests


def test_a_toc_json_that_does_not_match_toc_digest_is_refused() -> None:
    crafted = estargz(ITEMS)
    wrong = {"containerd.io/snapshot/stargz/toc.digest": sha256(b"another TOC")}
    with pytest.raises(DigestMismatchError, match=r"layer test: eStargz TOC: digest mismatch"):
        _read(crafted, wrong)


def test_a_zstd_chunked_toc_that_does_not_match_its_checksum_is_refused() -> None:
    crafted = zstd_chunked(ITEMS)
    annotations = dict(crafted.annotations)
    key = "io.github.containers.zstd-chunked.manifest-checksum"
    annotations[key] = sha256(b"x")
    with pytest.raises(DigestMismatchError, match="compressed TOC frame"):
        _read(crafted, annotations)


def test_a_registry_read_requires_a_digest() -> None:
    crafted = estargz(ITEMS)
    location = _locate(crafted, {})
    with pytest.raises(TocError, match="no annotation gives the digest"):
        read_toc(BytesBlob(crafted.blob), location, where=WHERE, warn=print, require_digest=True)
    assert read_toc(BytesBlob(crafted.blob), _locate(crafted), where=WHERE, warn=print,
                    require_digest=True)  # fmt: skip


# --------------------------------------------------------------------------- footers


def test_truncated_and_malformed_footers() -> None:
    crafted = estargz(ITEMS)
    blob = crafted.blob
    # Cut by one byte: no footer at all (the layer is read the ordinary way).
    assert locate(len(blob) - 1, {}, blob[:-1][-TAIL_SIZE:], WHERE) is None
    # "STARGZ" but not an offset, or not an empty gzip member: claims eStargz, is not.
    bad_hex = blob[:-29] + b"zz" + blob[-27:]
    with pytest.raises(TocError, match="not 16 hex digits"):
        locate(len(bad_hex), {}, bad_hex[-TAIL_SIZE:], WHERE)
    bad_tail = blob[:-6] + b"\x01" + blob[-5:]
    with pytest.raises(TocError, match="gzip member"):
        locate(len(bad_tail), {}, bad_tail[-TAIL_SIZE:], WHERE)
    # An offset past the footer.
    far = blob[:-51] + _estargz_footer_at(len(blob))
    with pytest.raises(TocError, match="outside"):
        locate(len(far), {}, far[-TAIL_SIZE:], WHERE)


def _estargz_footer_at(offset: int) -> bytes:
    from tests.toccraft import estargz_footer  # noqa: PLC0415

    return estargz_footer(offset)


def test_zstd_chunked_positions_outside_the_blob_or_malformed() -> None:
    crafted = zstd_chunked(ITEMS)
    key = "io.github.containers.zstd-chunked.manifest-position"
    for value, problem in (
        ("1:2:3", "is not offset:length"),
        ("-1:2:3:1", "is not offset:length"),
        ("10:20:30:2", "manifest type 2"),
        (f"{len(crafted.blob)}:100:100:1", "outside the blob"),
        ("4:10:10:1", "outside the blob"),  # starts before its skippable header could
    ):
        with pytest.raises(TocError, match=problem):
            _locate(crafted, {key: value})
    # A position that points at other bytes: no skippable frame there.
    with pytest.raises(TocError, match="skippable frame"):
        _read(crafted, {key: "100:50:50:1"})


# --------------------------------------------------------------------------- inconsistent TOCs


def _estargz_with(mutate: Any) -> Crafted:
    return estargz(ITEMS, chunk_size=100_000, mutate=mutate)


def _entry(toc: dict[str, Any], name: str, kind: str = "reg") -> dict[str, Any]:
    entry: dict[str, Any] = next(
        e for e in toc["entries"] if e["name"] == name and e["type"] == kind
    )
    return entry


def _a_chunk_missing(toc: dict[str, Any]) -> None:
    """bin/big says 400000 bytes, its chunks 300000 (the last one's size made explicit)."""
    [e for e in toc["entries"] if e["name"] == "bin/big"][-1]["chunkSize"] = 100_000
    _entry(toc, "bin/big")["size"] = 400_000


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda toc: _entry(toc, "etc/passwd").update(name="../../etc/passwd"), "leaves the root"),
        (lambda toc: _entry(toc, "etc/passwd").update(name="a/../../b"), "leaves the root"),
        (
            lambda toc: _entry(toc, "bin/big-link", "hardlink").update(linkName="../x"),
            "leaves the root",
        ),
        (lambda toc: _entry(toc, "etc/passwd").update(name="a\0b"), "NUL"),
        # A lone surrogate names no file (Go's encoding/json writes U+FFFD instead).
        (lambda toc: _entry(toc, "etc/passwd").update(name="\ud800"), "not valid JSON"),
        (lambda toc: _entry(toc, "etc/passwd").update(name=""), "has no name"),
        (lambda toc: _entry(toc, "etc/passwd").update(type="socket"), "unknown type"),
        (lambda toc: _entry(toc, "etc/passwd").update(mode=-1), "mode -1"),
        (lambda toc: _entry(toc, "etc/passwd").update(uid=1 << 32), "uid"),
        (lambda toc: _entry(toc, "etc/passwd").update(size=True), "size True"),
        (lambda toc: _entry(toc, "etc/passwd").update(modtime="yesterday"), "RFC 3339"),
        (lambda toc: _entry(toc, "x/attrs").update(xattrs={"user.a": "***"}), "base64"),
        (lambda toc: _entry(toc, "etc/passwd").update(chunkDigest="md5:00"), "chunkDigest"),
        (
            lambda toc: _entry(toc, "etc/passwd").update(chunkDigest="sha512:" + "0" * 128),
            "not a sha256",
        ),
        # Checked all at once, then one by one for the message: hex that
        # bytes.fromhex would take but a digest may not hold.
        (
            lambda toc: _entry(toc, "etc/passwd").update(chunkDigest="sha256:" + "A" * 64),
            "TOC entry [0-9]+: chunkDigest",
        ),
        (
            lambda toc: _entry(toc, "etc/passwd").update(chunkDigest="sha256:" + "0" * 62 + " 0"),
            "TOC entry [0-9]+: chunkDigest",
        ),
        (
            lambda toc: _entry(toc, "bin/big", "chunk").update(chunkDigest="sha256:zz"),
            "TOC entry [0-9]+: chunkDigest",
        ),
        # Chunks that do not add up, overlap, or lie outside the blob's data.
        (lambda toc: _entry(toc, "bin/big", "chunk").update(chunkOffset=150_000), "end at 100000"),
        (_a_chunk_missing, "cover 300000 of its 400000"),
        (lambda toc: _entry(toc, "bin/big", "chunk").update(chunkSize=250_000), "past the file's"),
        (lambda toc: _entry(toc, "bin/big", "chunk").update(offset=1), "overlaps"),
        (lambda toc: _entry(toc, "etc/shadow").update(offset=1 << 40), "past the data's end"),
        (lambda toc: toc["entries"].insert(1, {"name": "a", "type": "chunk"}), "follows no"),
        (lambda toc: _entry(toc, "bin/big", "chunk").update(name="other"), "follows the entry"),
        (lambda toc: _entry(toc, "bin/big", "chunk").update(chunkType="hole"), "chunkType"),
        (lambda toc: toc.update(entries={}), "not an array"),
        (lambda toc: toc["entries"].append(7), "is not an object"),
    ],
)
def test_inconsistent_tocs_are_toc_errors(mutate: Any, problem: str) -> None:
    crafted = _estargz_with(mutate)
    with pytest.raises(TocError, match=problem) as raised:
        _read(crafted)
    assert str(raised.value).startswith("layer test: TOC")
    assert "\n" not in str(raised.value)


def test_a_bad_file_digest_is_named_where_it_stands_in_for_the_chunks() -> None:
    # zstd:chunked gives a file in one chunk only its "digest".
    def bad_digest(toc: dict[str, Any]) -> None:
        entry = next(e for e in toc["entries"] if e["name"] == "etc/passwd")
        assert "chunkDigest" not in entry
        entry["digest"] = "sha256:" + "0" * 63

    position = next(i for i, item in enumerate(ITEMS) if item.name == "etc/passwd")
    with pytest.raises(TocError, match=f"TOC entry {position}: digest: malformed"):
        _read(zstd_chunked(ITEMS, mutate=bad_digest))


def test_zstd_chunked_end_offsets_bound_the_last_chunk() -> None:
    def far_end(toc: dict[str, Any]) -> None:
        entry = next(e for e in toc["entries"] if e["name"] == "etc/passwd")
        entry["endOffset"] = entry["offset"] + 10_000_000

    with pytest.raises(TocError, match="ends at blob offset"):
        _read(zstd_chunked(ITEMS, mutate=far_end))


def _without_chunk_digests(toc: dict[str, Any]) -> None:
    """As original stargz wrote them."""
    for entry in toc["entries"]:
        entry.pop("chunkDigest", None)
        entry.pop("digest", None)


def test_tocs_too_big_to_serve_are_read_the_ordinary_way(monkeypatch: pytest.MonkeyPatch) -> None:
    crafted = estargz(ITEMS, chunk_size=100_000)
    location = _locate(crafted)

    def read() -> object:
        return read_toc(BytesBlob(crafted.blob), location, where=WHERE, warn=print)

    from imagefs.layers.toc import jsontoc  # noqa: PLC0415

    monkeypatch.setattr(jsontoc, "MAX_CHUNK_SIZE", 50_000)
    assert isinstance(read(), NotServable)
    monkeypatch.undo()
    monkeypatch.setattr(jsontoc, "MAX_TOC_ENTRIES", 3)
    assert isinstance(read(), NotServable)
    monkeypatch.undo()
    undigested = estargz(ITEMS, mutate=_without_chunk_digests)
    served = read_toc(BytesBlob(undigested.blob), _locate(undigested), where=WHERE, warn=print)
    assert isinstance(served, NotServable) and "no digest" in served.reason
    version_2 = estargz(ITEMS, mutate=lambda toc: toc.update(version=2))
    served = read_toc(BytesBlob(version_2.blob), _locate(version_2), where=WHERE, warn=print)
    assert isinstance(served, NotServable) and "version 2" in served.reason


def test_mtimes_beyond_the_range_are_clamped_with_a_warning() -> None:
    crafted = estargz(
        ITEMS, mutate=lambda toc: _entry(toc, "etc/passwd").update(modtime="9999-12-31T23:59:59Z")
    )
    seen: list[str] = []
    toc = read_toc(BytesBlob(crafted.blob), _locate(crafted), where=WHERE, warn=seen.append)
    assert isinstance(toc, Toc)
    entry = next(e for e in toc.entries if e.path == "etc/passwd")
    assert entry.mtime_ns == (1 << 63) - 1
    assert seen == ["TOC entry 'etc/passwd': mtime out of range, clamped"]


# --------------------------------------------------------------------------- times


@pytest.mark.parametrize(
    "text",
    [
        "2020-01-02T03:04:05Z",
        "2020-01-02T03:04:05.5Z",
        "2020-01-02T03:04:05.123456789+02:00",
        "1969-12-31T23:59:59.999999999-07:30",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59z",
        "2024-02-29t12:00:00Z",
    ],
)
def test_rfc3339_times_to_nanoseconds(text: str) -> None:
    main, _, rest = text.replace("z", "Z").replace("t", "T").partition(".")
    fraction = ""
    if rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        fraction, zone = rest[:digits], rest[digits:]
        main += zone
    moment = datetime.datetime.fromisoformat(main)
    seconds = int((moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)).total_seconds())
    expected = seconds * 10**9 + int(fraction.ljust(9, "0") or "0")
    assert parse_rfc3339_ns(text) == expected


@pytest.mark.parametrize(
    "text", ["2020-13-01T00:00:00Z", "2020-01-01 00:00:00Z", "2020-01-01T00:00:00", "", "1e9"]
)
def test_malformed_times_are_refused(text: str) -> None:
    assert parse_rfc3339_ns(text) is None


# --------------------------------------------------------------------------- chunks


def _chunk(data: bytes, compressed: bytes, inner: int = 0) -> Chunk:
    return Chunk(0, len(data), 0, len(compressed), inner, Digest(sha256(data)))


def test_a_chunk_decodes_to_its_bytes_only_when_its_digest_matches() -> None:
    data = b"chunk data " * 1000
    member = gzip.compress(b"HEADER" + data + b"padding and the next header", mtime=0)
    chunk = _chunk(data, member, inner=6)
    assert decode_chunk(TocFormat.ESTARGZ, chunk, member, where=WHERE) == data
    frame = zstandard.ZstdCompressor().compress(data)
    assert decode_chunk(TocFormat.ZSTD_CHUNKED, _chunk(data, frame), frame, where=WHERE) == data
    wrong = replace(chunk, digest=Digest(sha256(b"other")))
    with pytest.raises(DigestMismatchError, match="layer test: chunk at 0"):
        decode_chunk(TocFormat.ESTARGZ, wrong, member, where=WHERE)


def test_short_and_corrupt_chunks() -> None:
    data = os.urandom(50_000)
    member = gzip.compress(data, mtime=0)
    chunk = _chunk(data, member)
    with pytest.raises(CompressionError, match="ends after"):
        decode_chunk(TocFormat.ESTARGZ, chunk, member[: len(member) // 2], where=WHERE)
    longer = replace(chunk, size=len(data) + 1)
    with pytest.raises(CompressionError, match="ends after 50000 decoded bytes"):
        decode_chunk(TocFormat.ESTARGZ, longer, member, where=WHERE)
    with pytest.raises(CompressionError, match="corrupt gzip member"):
        decode_chunk(TocFormat.ESTARGZ, chunk, b"\x1f\x8b\x08\x00garbage" * 10, where=WHERE)
    with pytest.raises(CompressionError, match="corrupt zstd frame"):
        decode_chunk(
            TocFormat.ZSTD_CHUNKED, chunk, b"\x28\xb5\x2f\xfd\xff" + bytes(20), where=WHERE
        )


def test_a_hostile_member_cannot_make_a_chunk_decode_more_than_it_says() -> None:
    # A zstd frame of 1 GiB of zeros is a few KB; the chunk says 10 bytes.
    frame = zstandard.ZstdCompressor().compress(bytes(1 << 30))
    chunk = _chunk(bytes(10), frame)
    assert decode_chunk(TocFormat.ZSTD_CHUNKED, chunk, frame, where=WHERE) == bytes(10)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = deflate.compress(bytes(64 << 20)) + deflate.flush()
    assert decode_chunk(TocFormat.ESTARGZ, _chunk(bytes(10), bomb), bomb, where=WHERE) == bytes(10)


# --------------------------------------------------------------------------- local layers


def _layout(tmp_path: Path, crafted: list[Crafted], media: str) -> str:
    layout = builder.init_layout(tmp_path / "layout")
    layers = []
    for item in crafted:
        descriptor = builder.write_blob(layout, item.blob, media)
        descriptor["annotations"] = item.annotations
        layers.append(descriptor)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(item.tar) for item in crafted]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": builder.OCI_MANIFEST,
        "config": builder.write_json_blob(layout, config, builder.OCI_CONFIG),
        "layers": layers,
    }
    builder.set_tag(layout, builder.write_json_blob(layout, manifest, builder.OCI_MANIFEST), "t")
    return f"oci:{layout}:t"


def _scan(source: str, cache: Path | None, warnings: list[str] | None = None) -> list[TarEntry]:
    image = open_image(source)
    seen = warnings if warnings is not None else []
    return scan_layer(image.layers[0], 0, 1, warn=seen.append, progress=Progress(False),
                      cache_dir=cache)  # fmt: skip


def test_a_local_estargz_layer_is_indexed_and_read_from_its_toc(tmp_path: Path) -> None:
    crafted = estargz(ITEMS, chunk_size=100_000)
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["gzip"])
    cache = tmp_path / "cache"
    entries = _scan(source, cache)
    assert all(entry.data_offset >= TOC_DATA_BASE for entry in entries if entry.size)
    bookkeeping = {entry.path for entry in entries if entry.bookkeeping}
    assert bookkeeping == {".no.prefetch.landmark", "stargz.index.json"}
    assert list(cache.glob(f"*.{TOC_INDEX.tag}"))
    assert _scan(source, cache) == entries  # from the cached TOC index
    layer = open_image(source).layers[0]
    data = open_layer_data(layer, str(cache))
    try:
        for entry in entries:
            if entry.type is EntryType.FILE and not entry.bookkeeping:
                want = next(item.data for item in ITEMS if item.name == entry.path)
                assert data.pread(entry.data_offset, entry.size) == want
        big = next(entry for entry in entries if entry.path == "bin/big")
        assert data.pread(big.data_offset + 99_990, 20) == RANDOM[99_990:100_010]  # two chunks
        toc_file = next(entry for entry in entries if entry.path == "stargz.index.json")
        assert data.pread(toc_file.data_offset, toc_file.size) == crafted.toc_json
    finally:
        data.close()
    merged = merge_layers([entries], print)
    assert merged.children is not None
    assert not {".no.prefetch.landmark", "stargz.index.json"} & merged.children.keys()


def test_tar_stream_offsets_go_to_the_ordinary_reader(tmp_path: Path) -> None:
    """A TOC layer indexed the ordinary way (a registry download) reads at tar offsets."""
    crafted = estargz(ITEMS)
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["gzip"])
    layer = open_image(source).layers[0]
    data = open_layer_data(layer, str(tmp_path / "cache"))
    try:
        for entry in _scanned(crafted.tar):
            if entry.type is EntryType.FILE and entry.size:
                assert (
                    data.pread(entry.data_offset, entry.size)
                    == crafted.tar[entry.data_offset : entry.data_offset + entry.size]
                )
    finally:
        data.close()


def test_a_toc_piece_at_a_time_for_a_big_toc_file(tmp_path: Path) -> None:
    many = [Item(f"d/file-{i:05d}-{'x' * 40}", data=b"%d" % i) for i in range(14_000)]
    crafted = estargz(many)
    assert len(crafted.toc_json) > TOC_PIECE
    toc = _read(crafted)
    assert toc.entries[-1].path == "stargz.index.json"
    assert len(toc.chunks.chunks_of(len(toc.entries) - 1)) > 1
    assert _file_bytes(crafted, toc, "stargz.index.json") == crafted.toc_json


def test_a_corrupt_toc_in_a_verified_blob_is_a_toc_error(tmp_path: Path) -> None:
    crafted = estargz(ITEMS, mutate=lambda toc: _entry(toc, "etc/passwd").update(name="../x"))
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["gzip"])
    with pytest.raises(TocError, match=r"layer 1/1 \(sha256:[0-9a-f]{64}\): .* leaves the root"):
        _scan(source, None)


def test_a_blob_that_is_not_its_digest_is_refused_before_its_toc_is_trusted(
    tmp_path: Path,
) -> None:
    crafted = estargz(ITEMS)
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["gzip"])
    layer = open_image(source).layers[0]
    path = Path(layer.blob.path)
    blob = bytearray(path.read_bytes())
    blob[5] ^= 1  # the first member's header: the TOC is still whole
    path.write_bytes(bytes(blob))
    with pytest.raises(DigestMismatchError):
        _scan(source, tmp_path / "cache")


def test_bookkeeping_names_are_only_marked_in_estargz_layers(tmp_path: Path) -> None:
    entries = [TarEntry(name, EntryType.FILE, 0o644, 0, 0, 1, 0)
               for name in ("./.prefetch.landmark", "stargz.index.json", "etc/x")]  # fmt: skip
    plain = builder.make_layer_tar([builder.file("a", "a")])
    source = builder.write_oci_layout(tmp_path / "plain", [plain], compression="gzip", tag="t")
    layer = open_image(f"oci:{source}:t").layers[0]
    assert mark_bookkeeping(layer, entries) == entries
    annotated = replace(
        layer,
        descriptor=replace(
            layer.descriptor,
            annotations=(("containerd.io/snapshot/stargz/toc.digest", sha256(b"")),),
        ),
    )
    marked = mark_bookkeeping(annotated, entries)
    assert [entry.bookkeeping for entry in marked] == [True, True, False]


def test_the_layer_index_keeps_the_bookkeeping_mark(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    layer = Layer(
        Descriptor("application/vnd.oci.image.layer.v1.tar", Digest(sha256(b"x")), 1),
        BlobRange(str(blob), 0, 1),
    )
    entries = [TarEntry("a", EntryType.FILE, 0o644, 0, 0, 1, 0, bookkeeping=True),
               TarEntry("b", EntryType.DIRECTORY, 0o755, 0, 0, 0, 0)]  # fmt: skip
    layer_index.save(str(tmp_path), layer, entries, [], version=TOC_INDEX)
    assert layer_index.load(str(tmp_path), layer, version=TOC_INDEX) == (entries, [])
    assert layer_index.load(str(tmp_path), layer) is None  # the tar index is another file


def test_a_toc_layer_that_cannot_be_served_reads_as_an_ordinary_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagefs.layers.toc import jsontoc  # noqa: PLC0415

    monkeypatch.setattr(jsontoc, "MAX_CHUNK_SIZE", 1000)
    crafted = estargz(ITEMS)
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["gzip"])
    entries = _scan(source, tmp_path / "cache")
    assert [replace(e, bookkeeping=False) for e in entries] == _scanned(crafted.tar)
    assert {entry.path for entry in entries if entry.bookkeeping} == {
        ".no.prefetch.landmark",
        "stargz.index.json",
    }


def test_errors_name_the_layer_and_the_file(tmp_path: Path) -> None:
    crafted = zstd_chunked(ITEMS, prefix="io.containers.zstd-chunked.")
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["zstd"])
    entries = _scan(source, None)
    layer = open_image(source).layers[0]
    passwd = next(entry for entry in entries if entry.path == "etc/passwd")
    toc = _read(crafted)
    chunk = _chunks(toc, "etc/passwd")[0]
    path = Path(layer.blob.path)
    blob = bytearray(path.read_bytes())
    data = open_layer_data(layer)
    try:
        blob[chunk.offset + chunk.length - 6] ^= 0xFF  # inside the frame, after the header
        path.write_bytes(bytes(blob))
        with pytest.raises(ImageFSError) as raised:  # CompressionError or DigestMismatchError
            data.pread(passwd.data_offset, passwd.size)
        message = str(raised.value)
        assert layer.descriptor.digest in message and "'etc/passwd'" in message, message
        shadow = next(entry for entry in entries if entry.path == "etc/shadow")
        assert data.pread(shadow.data_offset, shadow.size) == b"root:*::\n"
    finally:
        data.close()


def test_the_stream_reader_is_opened_only_for_tar_offsets(tmp_path: Path) -> None:
    from imagefs.layers.toc.local import open_toc_layer_data  # noqa: PLC0415

    crafted = estargz(ITEMS)
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["gzip"])
    layer = open_image(source).layers[0]
    opened: list[int] = []

    class Stream:
        def pread(self, offset: int, size: int) -> bytes:
            return b"s" * size

        def close(self) -> None:
            opened.append(-1)

    def open_stream() -> Stream:
        opened.append(1)
        return Stream()

    data = open_toc_layer_data(layer, "gzip", None, open_stream)
    assert data is not None
    entries = _scan(source, None)
    passwd = next(entry for entry in entries if entry.path == "etc/passwd")
    assert data.pread(passwd.data_offset, 5) == b"root:"
    assert opened == []
    assert data.pread(512, 3) == b"sss"
    data.close()
    assert opened == [1, -1]
    assert open_toc_layer_data(layer, "zstd", None, open_stream) is None  # a gzip blob's TOC only


def test_crafted_blobs_are_valid_streams() -> None:
    """The crafted blobs decompress to their tar with ordinary tools (so they are realistic)."""
    crafted = estargz(ITEMS)
    assert gzip.decompress(crafted.blob) == crafted.tar
    z = zstd_chunked(ITEMS)
    with zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(z.blob), read_across_frames=True
    ) as r:
        assert r.read() == z.tar


def test_toc_limits_are_coherent() -> None:
    assert toc_limits.MAX_INNER_OFFSET > toc_limits.MAX_TOC_BYTES
    assert TOC_PIECE <= toc_limits.MAX_CHUNK_SIZE


def test_the_daemon_reads_the_chunk_table_the_scan_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagefs.layers.toc import local  # noqa: PLC0415

    crafted = estargz(ITEMS, chunk_size=100_000)
    source = _layout(tmp_path, [crafted], builder.OCI_LAYER["gzip"])
    cache = tmp_path / "cache"
    entries = _scan(source, cache)
    big = next(entry for entry in entries if entry.path == "bin/big")
    parsed: list[int] = []
    real_read_toc = read_toc

    def counting_read_toc(*args: Any, **kwargs: Any) -> Any:
        parsed.append(1)
        return real_read_toc(*args, **kwargs)

    monkeypatch.setattr(local, "read_toc", counting_read_toc)
    layer = open_image(source).layers[0]
    with local.TocLayerData(layer, _locate(crafted), lambda: None, str(cache)) as data:  # type: ignore[arg-type,return-value]
        assert data.pread(big.data_offset + 150_000, 10) == RANDOM[150_000:150_010]
    assert parsed == []
    (table,) = cache.glob(f"*.{TOC_CHUNKS.tag}")
    table.write_bytes(table.read_bytes()[:-1] + b"\0")  # torn or tampered: parse again
    with local.TocLayerData(layer, _locate(crafted), lambda: None, str(cache)) as data:  # type: ignore[arg-type,return-value]
        assert data.pread(big.data_offset + 150_000, 10) == RANDOM[150_000:150_010]
    assert parsed == [1]
