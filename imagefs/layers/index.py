"""Per-layer tar indexes in the cache, so a layer is scanned once for every image.

Images share layers (every ``FROM debian`` image starts with the same one),
and the merged tree is persisted per image (:mod:`imagefs.tree.persisted`). Without a cache of
each layer's own entries, the first mount of a second image would decompress
and scan the shared layers again. This module keeps the scanner's output for a
layer beside its gzip checkpoints or zstd seek file, keyed by the layer's
digest and its version (:data:`imagefs.cachedir.TAR_INDEX`).

The entries are correct for the content the digest names, so serving them
for a blob is only right if that blob has that digest. A reuse therefore
either finds the very blob file the index was built from (same device,
inode, range, size, mtime and ctime, as ``tree.persisted.tree_sources`` trusts for
whole trees) or hashes the blob first: sha256 runs at ~1.7 GB/s, far faster than
decompressing and parsing the tar.

File layout (little-endian)::

    magic "IMGFS-LX" | u32 header length | header (JSON) | zstd(records)

The header holds the version tag, digest, source identity, entry count, the
scan's warnings (replayed on reuse, so a reused layer reports what a scan
would), and the records' length and CRC32. A file that fails any check is
ignored and rebuilt, never served.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import zstandard

from imagefs.cachedir import TAR_INDEX, AtomicFile, FormatVersion
from imagefs.image import Layer
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.plumbing import DigestCheck, cache_path, check_blob, digest_check

log = logging.getLogger(__name__)

_MAGIC = b"IMGFS-LX"
_HEADER_LENGTH = struct.Struct("<I")
# type (| _BOOKKEEPING), mode, uid, gid, size, mtime_ns, devmajor, devminor, data_offset,
# xattr count, sparse segment count (-1: not sparse), then the lengths of
# path, linkname, uname, gname; the strings, xattrs and segments follow.
_RECORD = struct.Struct("<BIQQQqIIQHiIIHH")
_XATTR = struct.Struct("<HI")
_SEGMENT = struct.Struct("<QQ")
_BOOKKEEPING = 0x80  # in the type byte: TarEntry.bookkeeping
_ZSTD_LEVEL = 3  # paths compress ~5x; level 3 costs ~10 ms per 10k entries
_ENCODING = ("utf-8", "surrogateescape")  # how the scanner decodes names (os.fsdecode)


class _UnrepresentableError(Exception):
    """An entry this format cannot hold (a 2**64 uid, a name with a lone surrogate)."""


def index_path(
    cache_dir: str, layer: Layer, version: FormatVersion = TAR_INDEX, key: str = ""
) -> str:
    """Where ``layer``'s index of kind ``version`` (TAR_INDEX or TOC_INDEX) lives.

    ``key``: what else it depends on (a TOC index: which TOC, checked against
    which digests; see layers.toc.local).
    """
    return cache_path(cache_dir, layer, version, key)


def blob_identity(layer: Layer) -> list[int | str]:
    """What makes a blob file "the same one we verified": range, inode, size, times.

    Not the path: layouts that hardlink their blobs (as skopeo and our bench
    do), or one blob store seen through two paths, name the same verified
    file. The ctime is there because anyone who can write a file can set its
    mtime back (utimensat) and may get a deleted blob's inode number again;
    nobody but the clock sets a ctime.
    """
    if layer.blob.assembly is not None:  # tar-split hook: a rebuilt layer says what it is
        return layer.blob.assembly.identity()
    st = layer.blob.stat()
    return [layer.blob.offset, layer.blob.length,
            st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]  # fmt: skip


def save(
    cache_dir: str,
    layer: Layer,
    entries: Sequence[TarEntry],
    warnings: Sequence[str],
    *,
    version: FormatVersion = TAR_INDEX,
    key: str = "",
) -> None:
    """Persist a layer's entries, scanned from a blob whose digest was verified.

    Best effort: a cache that cannot be written only costs a rescan later.
    ``version``: TAR_INDEX or TOC_INDEX (imagefs.cachedir), whichever made
    them; ``key``: see :func:`index_path`.
    """
    assembly = layer.blob.assembly
    if assembly is not None and not assembly.cacheable:  # tar-split hook (--allow-modified)
        return
    try:
        records = _encode(entries)
    except _UnrepresentableError as exc:
        log.debug("layer %s: index not cached: %s", layer.descriptor.digest, exc)
        return
    try:
        # A blob still downloading has no final file yet: the next reuse
        # hashes it instead (cheap next to decompressing it).
        identity = blob_identity(layer) if layer.blob.feed is None else None
        header = json.dumps(
            {
                "version": version.tag,
                "digest": layer.descriptor.digest,
                # The diff_id the pass checked over the uncompressed stream,
                # when it was asked to (Layer.verify_diff_id).
                "diff_id": layer.diff_id if layer.verify_diff_id else None,
                "identity": identity,
                "entries": len(entries),
                "warnings": list(warnings),
                "records": len(records),
                "crc32": zlib.crc32(records),
            }
        ).encode()
        body = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(records)
        with AtomicFile(index_path(cache_dir, layer, version, key)) as out:
            out.file.write(_MAGIC + _HEADER_LENGTH.pack(len(header)) + header)
            out.file.write(body)
    except OSError as exc:
        log.warning("layer %s: cannot cache its index: %s", layer.descriptor.digest, exc)


def load(
    cache_dir: str,
    layer: Layer,
    hasher: DigestCheck | None = None,
    *,
    version: FormatVersion = TAR_INDEX,
    key: str = "",
) -> tuple[list[TarEntry], list[str]] | None:
    """The cached entries and scan warnings of ``layer``, or None to scan it.

    The blob is verified first unless it is the very file the index was
    built from: DigestMismatchError (and the other BlobErrors of a scan) if
    it does not hash to its digest, exactly as a scan would fail.
    ``hasher``: a digest check of the blob already under way, used (or
    cancelled) here.
    """
    path = index_path(cache_dir, layer, version, key)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("layer %s: cannot read its cached index: %s", layer.descriptor.digest, exc)
        return None
    try:
        header, records = _decode_file(data, layer, version)
        entries = _decode(records, header["entries"])
    except (ValueError, KeyError, IndexError, TypeError, struct.error, zstandard.ZstdError) as exc:
        log.warning("layer %s: cached index %s is corrupt (%s); rescanning",
                    layer.descriptor.digest, path, exc)  # fmt: skip
        return None
    if layer.verify_diff_id and header.get("diff_id") != layer.diff_id:
        # These bytes were never shown to decompress to this diff_id: the
        # blob's digest alone is not what this layer is trusted by.
        log.debug("layer %s: cached index not checked against diff_id %s; rescanning",
                  layer.descriptor.digest, layer.diff_id)  # fmt: skip
        if hasher is not None:
            hasher.cancel()
        return None
    _verify_blob(layer, header["identity"], hasher)
    return entries, [str(w) for w in header["warnings"]]


def _verify_blob(layer: Layer, identity: object, hasher: DigestCheck | None) -> None:
    try:
        same_file = layer.blob.feed is None and blob_identity(layer) == identity
    except OSError:
        same_file = False  # the hash below reports why the blob cannot be read
    if same_file:
        if hasher is not None:
            hasher.cancel()
        return
    if layer.blob.assembly is None:  # tar-split hook: a rebuilt layer has no file to size
        fd = layer.blob.open_fd()
        try:
            check_blob(layer, fd)
        finally:
            os.close(fd)
    (hasher or digest_check(layer)).verify()


def _decode_file(data: bytes, layer: Layer, version: FormatVersion) -> tuple[dict[str, Any], bytes]:
    if not data.startswith(_MAGIC):
        raise ValueError("bad magic")
    start = len(_MAGIC) + _HEADER_LENGTH.size
    (length,) = _HEADER_LENGTH.unpack_from(data, len(_MAGIC))
    header = json.loads(data[start : start + length])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    if header["version"] != version.tag or header["digest"] != layer.descriptor.digest:
        raise ValueError("index of another layer or version")
    records = zstandard.ZstdDecompressor().decompress(
        data[start + length :], max_output_size=header["records"]
    )
    if len(records) != header["records"] or zlib.crc32(records) != header["crc32"]:
        raise ValueError("checksum mismatch")
    if not isinstance(header["warnings"], list) or not isinstance(header["entries"], int):
        raise ValueError("malformed header")
    return header, records


def _text(value: str) -> bytes:
    try:
        return value.encode(*_ENCODING)
    except UnicodeEncodeError as exc:
        raise _UnrepresentableError(str(exc)) from exc


def _encode(entries: Sequence[TarEntry]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    try:
        for entry in entries:
            path, linkname = _text(entry.path), _text(entry.linkname)
            uname, gname = _text(entry.uname), _text(entry.gname)
            sparse = entry.sparse
            kind = entry.type | (_BOOKKEEPING if entry.bookkeeping else 0)
            record = _RECORD.pack(
                kind, entry.mode, entry.uid, entry.gid, entry.size, entry.mtime_ns,
                entry.devmajor, entry.devminor, entry.data_offset, len(entry.xattrs),
                -1 if sparse is None else len(sparse),
                len(path), len(linkname), len(uname), len(gname),
            )  # fmt: skip
            append(record)
            append(path + linkname + uname + gname)
            for name, value in entry.xattrs:
                encoded = _text(name)
                append(_XATTR.pack(len(encoded), len(value)) + encoded + value)
            for segment in sparse or ():
                append(_SEGMENT.pack(*segment))
    except struct.error as exc:
        raise _UnrepresentableError(str(exc)) from exc
    return b"".join(parts)


def _decode(records: bytes, count: int) -> list[TarEntry]:
    entries: list[TarEntry] = []
    append = entries.append
    unpack_record = _RECORD.unpack_from
    record_size = _RECORD.size
    types = list(EntryType)
    view = memoryview(records)
    at = 0
    for _ in range(count):
        (kind, mode, uid, gid, size, mtime_ns, devmajor, devminor, data_offset,
         nxattrs, nsparse, lpath, llink, luname, lgname) = unpack_record(records, at)  # fmt: skip
        at += record_size
        end = at + lpath + llink + luname + lgname
        if end > len(records):
            raise ValueError("record runs past the end")
        # Each string decodes alone: a name may end in an incomplete UTF-8
        # sequence that the next one would otherwise complete.
        path = str(view[at : at + lpath], *_ENCODING)
        at += lpath
        linkname = str(view[at : at + llink], *_ENCODING) if llink else ""
        at += llink
        uname = str(view[at : at + luname], *_ENCODING) if luname else ""
        at += luname
        gname = str(view[at : at + lgname], *_ENCODING) if lgname else ""
        at = end
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if nxattrs:
            pairs = []
            for _ in range(nxattrs):
                lname, lvalue = _XATTR.unpack_from(records, at)
                at += _XATTR.size
                name = str(view[at : at + lname], *_ENCODING)
                pairs.append((name, bytes(view[at + lname : at + lname + lvalue])))
                at += lname + lvalue
            xattrs = tuple(pairs)
        sparse: tuple[tuple[int, int], ...] | None = None
        if nsparse >= 0:
            sparse = tuple(_SEGMENT.unpack_from(records, at + i * _SEGMENT.size)
                           for i in range(nsparse))  # fmt: skip
            at += nsparse * _SEGMENT.size
        entry = TarEntry(path, types[kind & ~_BOOKKEEPING], mode, uid, gid, size, mtime_ns,
                         linkname, devmajor, devminor, xattrs, data_offset, sparse, uname, gname,
                         bool(kind & _BOOKKEEPING))  # fmt: skip
        append(entry)
    if at != len(records):
        raise ValueError("trailing bytes after the last record")
    return entries
