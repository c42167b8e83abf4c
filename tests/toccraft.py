"""Crafted eStargz and zstd:chunked blobs, for tests the real writers cannot make.

Written from the formats' descriptions (stargz-snapshotter ``estargz/types.go``
and ``build.go``, containers/storage ``pkg/chunked/compressor``), not from
imagefs: a blob is made member by member with ``gzip``/``zstandard`` and
``tarfile`` headers, and its TOC is a plain ``dict`` a test may break on
purpose (``mutate``) before it is written. The tar stream the blob
decompresses to is returned too, as an oracle for what a tar reader sees.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import json
import struct
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zstandard

from imagefs.errors import TocError

Toc = dict[str, Any]
Mutate = Callable[[Toc], None]


@dataclass
class Item:
    """One member: ``kind`` is a TOC type (reg, dir, symlink, hardlink, char, block, fifo)."""

    name: str
    kind: str = "reg"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    link: str = ""
    uname: str = ""
    gname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    dev: tuple[int, int] = (0, 0)


@dataclass
class Crafted:
    blob: bytes
    toc: Toc
    toc_json: bytes
    tar: bytes  # what the blob decompresses to
    annotations: dict[str, str]


_TAR_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _header(item: Item) -> bytes:
    info = tarfile.TarInfo(item.name)
    info.type = _TAR_TYPES[item.kind]
    info.mode = item.mode
    info.uid, info.gid = item.uid, item.gid
    info.uname, info.gname = item.uname, item.gname
    info.mtime = item.mtime
    info.size = len(item.data) if item.kind == "reg" else 0
    info.linkname = item.link
    info.devmajor, info.devminor = item.dev
    if item.xattrs:
        info.pax_headers = {
            f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
            for name, value in item.xattrs.items()
        }
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(size: int) -> bytes:
    return bytes(-size % 512)


def _toc_entry(item: Item, estargz: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": item.name, "type": item.kind, "mode": item.mode}
    if item.mtime:
        entry["modtime"] = _rfc3339(item.mtime)
    if item.uid:
        entry["uid"] = item.uid
    if item.gid:
        entry["gid"] = item.gid
    if estargz and item.uname:
        entry["userName"] = item.uname
    if estargz and item.gname:
        entry["groupName"] = item.gname
    if item.link:
        entry["linkName"] = item.link
    if item.kind in ("char", "block"):
        entry["devMajor"], entry["devMinor"] = item.dev
    if item.kind == "reg" and item.data:
        entry["size"] = len(item.data)
        entry["digest"] = sha256(item.data)
    if item.xattrs:
        entry["xattrs"] = {k: base64.b64encode(v).decode() for k, v in item.xattrs.items()}
    return entry


def _rfc3339(seconds: int) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte footer (estargz/types.go): an empty gzip member with an extra field."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + bytes(8)


def legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte footer of original stargz: the 22 bytes are the whole extra field."""
    extra = b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + bytes(8)


def estargz(
    items: Sequence[Item],
    *,
    chunk_size: int = 4 << 20,
    mutate: Mutate | None = None,
    legacy: bool = False,
    landmark: bool = True,
) -> Crafted:
    """An eStargz blob, as estargz.Writer lays it out (one member per chunk)."""
    members: list[bytes] = []
    pending = bytearray()  # the open member's uncompressed bytes
    tar = bytearray()
    offset = 0
    entries: list[dict[str, Any]] = []

    def close() -> None:
        nonlocal offset
        if pending:
            member = gzip.compress(bytes(pending), mtime=0)
            members.append(member)
            offset += len(member)
            pending.clear()

    all_items = [Item(".no.prefetch.landmark", data=b"\x0f", mode=0, mtime=0)] if landmark else []
    for item in [*all_items, *items]:
        header = _header(item)
        pending += header
        tar += header
        entry = _toc_entry(item, estargz=True)
        if item.kind != "reg" or not item.data:
            entries.append(entry)
            continue
        written = 0
        while written < len(item.data):
            close()
            size = min(chunk_size, len(item.data) - written)
            if size == chunk_size and written + size < len(item.data):
                entry["chunkSize"] = size
            entry["offset"] = offset
            if written:
                entry["chunkOffset"] = written
            piece = item.data[written : written + size]
            entry["chunkDigest"] = sha256(piece)
            pending += piece
            entries.append(entry)
            written += size
            entry = {"name": item.name, "type": "chunk"}
        pending += _pad(len(item.data))
        tar += item.data + _pad(len(item.data))
    close()
    toc: Toc = {"version": 1, "entries": entries}
    if mutate is not None:
        mutate(toc)
    toc_json = json.dumps(toc, indent="\t").encode()
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(toc_json)
    info.mtime = 0
    toc_tar = info.tobuf(tarfile.USTAR_FORMAT) + toc_json + _pad(len(toc_json)) + bytes(1024)
    tar += toc_tar
    toc_offset = offset
    footer = legacy_footer(toc_offset) if legacy else estargz_footer(toc_offset)
    blob = b"".join(members) + gzip.compress(toc_tar, mtime=0) + footer
    annotations = {"containerd.io/snapshot/stargz/toc.digest": sha256(toc_json)}
    return Crafted(blob, toc, toc_json, bytes(tar), annotations)


def skippable(data: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(data)) + data


def zstd_chunked(
    items: Sequence[Item],
    *,
    chunk_size: int = 64 << 10,
    mutate: Mutate | None = None,
    prefix: str = "io.github.containers.zstd-chunked.",
    magic: bytes = b"GNUlInUx",
) -> Crafted:
    """A containers/storage zstd:chunked blob: headers and each chunk in frames of their own."""
    compressor = zstandard.ZstdCompressor(level=3)
    frames: list[bytes] = []
    pending = bytearray()
    tar = bytearray()
    offset = 0
    entries: list[dict[str, Any]] = []

    def close() -> int:
        nonlocal offset
        if pending:
            frame = compressor.compress(bytes(pending))
            frames.append(frame)
            offset += len(frame)
            pending.clear()
        return offset

    for item in items:
        header = _header(item)
        pending += header
        tar += header
        entry = _toc_entry(item, estargz=False)
        entries.append(entry)
        if item.kind != "reg" or not item.data:
            continue
        chunks = []
        start = close()
        for written in range(0, len(item.data), chunk_size):
            piece = item.data[written : written + chunk_size]
            at = close()
            pending += piece
            chunks.append((written, at, len(piece), sha256(piece)))
        end = close()
        entry["offset"], entry["endOffset"] = start, end
        if len(chunks) > 1:
            for index, (written, at, size, digest) in enumerate(chunks):
                target: dict[str, Any] = (
                    entry if index == 0 else {"type": "chunk", "name": item.name}
                )
                target.update(chunkOffset=written, offset=at, chunkSize=size, chunkDigest=digest)
                if index:
                    entries.append(target)
        pending += _pad(len(item.data))
        tar += item.data + _pad(len(item.data))
    pending += bytes(1024)
    tar += bytes(1024)
    close()
    toc: Toc = {"version": 1, "entries": entries}
    if mutate is not None:
        mutate(toc)
    toc_json = json.dumps(toc, separators=(",", ":")).encode()
    compressed = compressor.compress(toc_json)
    toc_offset = offset + 8
    footer = struct.pack("<QQQQ", toc_offset, len(compressed), len(toc_json), 1) + magic
    blob = b"".join(frames) + skippable(compressed) + skippable(footer)
    annotations = {
        prefix + "manifest-checksum": sha256(compressed),
        prefix + "manifest-position": f"{toc_offset}:{len(compressed)}:{len(toc_json)}:1",
    }
    return Crafted(blob, toc, toc_json, bytes(tar), annotations)


class BytesBlob:
    """A blob in memory as a TOC byte source (imagefs.layers.toc.read.BlobReader)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.reads: list[tuple[int, int]] = []

    def read_at(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        if offset < 0 or offset + size > len(self.blob):
            raise TocError(f"{size} bytes at {offset} are outside the blob")
        return self.blob[offset : offset + size]
