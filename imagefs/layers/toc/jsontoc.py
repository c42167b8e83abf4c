"""The TOC JSON of both formats, checked and turned into :class:`~.model.TocEntry` records.

Two dialects share most fields (both descend from CRFS):

* eStargz's ``JTOC`` (stargz-snapshotter ``estargz/types.go``; also the TOC of
  ctr-remote's zstd:chunked): ``name``, ``type`` (``dir reg symlink hardlink
  char block fifo chunk``), ``size``, ``modtime`` (RFC 3339, whole seconds:
  the writer rounds to the nearest second), ``linkName``, ``mode``, ``uid``,
  ``gid``, ``userName``/``groupName`` (written only when they change for
  that uid/gid, so carried forward here as the eStargz reader does),
  ``devMajor``/``devMinor``, ``xattrs`` (base64 values), ``digest`` (the
  whole file), ``offset`` (where the gzip member / zstd frame holding the
  chunk starts), ``innerOffset`` (where the chunk starts inside it),
  ``chunkOffset``, ``chunkSize`` (0: to the end of the file), ``chunkDigest``.
* containers/storage's ``FileMetadata`` (``pkg/chunked/internal``): the same
  names, ``modtime`` to the nanosecond (with the writer's UTC offset), also
  ``accesstime``/``changetime`` (ignored, as the tar scanner ignores pax
  ``atime``), ``endOffset`` (where the file's last frame ends) and
  ``chunkType`` (``""`` data or ``"zeros"``, a hole, still stored as
  compressed zeros); no user or group names. A file split into several
  chunks has the first chunk's fields on its ``reg`` entry; a file in one
  chunk has none, and its ``digest`` is that chunk's.

In both, a big regular file is a ``reg`` entry followed directly by one
``chunk`` entry per further chunk. Everything is checked, since the TOC is
untrusted: field types and ranges, chunks that follow each other and add up
to the file's size, chunks inside the blob's payload and in blob order (so
none overlaps another member), every chunk with a sha256 digest, names that
stay inside the root, and hardlinks too. Inconsistencies are TocErrors; a
TOC too big to serve chunk by chunk is :class:`~.limits.NotServable`.

The entries are those the tar scanner reports for the same members (names
verbatim, ``mode & 0o7777``, sizes 0 except for regular files), with the
differences the formats make: eStargz mtimes are whole seconds, only
``SCHILY.xattr.*`` attributes are listed, containers/storage records no
user or group names, and a sparse file is a plain file with its holes as
zeros. ``data_offset`` is in the TOC data space (:mod:`~.model`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from imagefs.digest import Digest, InvalidDigestError
from imagefs.errors import TocError
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.toc.limits import (
    MAX_CHUNK_SIZE,
    MAX_INNER_OFFSET,
    MAX_TOC_ENTRIES,
    NotServable,
)
from imagefs.layers.toc.model import TOC_DATA_BASE, Chunk, TocEntry

__all__ = ["parse_entries", "parse_rfc3339_ns"]

# The tar scanner's bounds (imagefs.layers.tarscan), so a TOC cannot say what
# a tar header could not.
MAX_SIZE = (1 << 63) - 1
MAX_ID = (1 << 32) - 1
MIN_TIME_NS = -(1 << 63)
MAX_TIME_NS = (1 << 63) - 1
MAX_OFFSET = (1 << 63) - 1
# The data space must stay below 2**63 above TOC_DATA_BASE (model docstring).
MAX_DATA_SIZE = (1 << 62) - 1

_TYPES = {
    "dir": EntryType.DIRECTORY,
    "reg": EntryType.FILE,
    "symlink": EntryType.SYMLINK,
    "hardlink": EntryType.HARDLINK,
    "char": EntryType.CHAR_DEVICE,
    "block": EntryType.BLOCK_DEVICE,
    "fifo": EntryType.FIFO,
}
_CHUNK_TYPES = ("", "zeros")  # containers/storage minimal.ChunkTypeData, ChunkTypeZeros
_ENCODING = ("utf-8", "surrogateescape")  # what the tar scanner produces (os.fsdecode)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_NS = 1_000_000_000


def parse_rfc3339_ns(value: str) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 time as Go writes it; None if malformed.

    Written out rather than with ``datetime``, which stops at microseconds
    and at year 1 (Go's zero time is ``0001-01-01T00:00:00Z``; a TOC may say
    year 0000).
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    fraction = match.group(7) or ""
    offset = 0
    if match.group(9):
        offset = int(match.group(10)) * 3600 + int(match.group(11)) * 60
        offset = -offset if match.group(9) == "-" else offset
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    return (seconds - offset) * _NS + int(fraction.ljust(9, "0") or "0")


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


@dataclass(slots=True)
class _PendingChunk:
    file_offset: int
    size: int
    offset: int
    inner_offset: int
    digest: Digest | None
    length: int = 0


@dataclass(slots=True)
class _File:
    """A regular file whose ``chunk`` entries may still follow."""

    raw_name: str
    entry: TarEntry
    digest: Digest | None
    end_offset: int  # containers/storage's endOffset (0: not given)
    chunks: list[_PendingChunk] = field(default_factory=list)
    covered: int = 0


class _Parser:
    def __init__(self, payload_end: int, where: str, warn: Callable[[str], None]) -> None:
        self.payload_end = payload_end
        self.where = where
        self.warn = warn
        self.results: list[tuple[TarEntry, _File | None]] = []
        self.chunks: list[tuple[_File, _PendingChunk]] = []  # all of them, in TOC order
        self.file: _File | None = None  # the last regular file, while chunks may follow
        self.undigested: str | None = None  # a file with a chunk that has no digest
        self.unames: dict[int, str] = {}
        self.gnames: dict[int, str] = {}
        self.index = 0

    def error(self, message: str) -> TocError:
        return TocError(f"{self.where}: TOC entry {self.index}: {message}")

    # -- fields ----------------------------------------------------------

    def integer(self, raw: dict[str, Any], key: str, high: int) -> int:
        value = raw.get(key, 0)
        if value is None:
            return 0
        if type(value) is not int or not 0 <= value <= high:
            raise self.error(f"{key} {value!r} is not a whole number in 0..{high}")
        return value

    def text(self, raw: dict[str, Any], key: str, *, path: bool = False) -> str:
        value = raw.get(key, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.error(f"{key} is not a string")
        try:
            value.encode(*_ENCODING)
        except UnicodeEncodeError:
            raise self.error(f"{key} {value!r} is not a file name") from None
        if path and "\0" in value:
            raise self.error(f"{key} {value!r} holds a NUL byte")
        return value

    def digest(self, raw: dict[str, Any], key: str) -> Digest | None:
        value = raw.get(key)
        if value in (None, ""):
            return None
        try:
            digest = Digest.parse(value, f"{self.where}: TOC entry {self.index}: {key}")
        except InvalidDigestError as exc:
            raise TocError(str(exc)) from None
        if digest.algorithm != "sha256":
            raise self.error(f"{key} {value!r} is not a sha256 digest")
        return digest

    def mtime(self, raw: dict[str, Any], name: str) -> int:
        value = raw.get("modtime")
        if value in (None, ""):
            return 0
        if not isinstance(value, str) or (ns := parse_rfc3339_ns(value)) is None:
            raise self.error(f"modtime {value!r} is not an RFC 3339 time")
        if not MIN_TIME_NS <= ns <= MAX_TIME_NS:
            self.warn(f"TOC entry {name!r}: mtime out of range, clamped")
            ns = max(MIN_TIME_NS, min(MAX_TIME_NS, ns))
        return ns

    def xattrs(self, raw: dict[str, Any]) -> tuple[tuple[str, bytes], ...]:
        value = raw.get("xattrs")
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise self.error("xattrs is not an object")
        pairs = []
        for name, encoded in value.items():
            self.text({"xattr name": name}, "xattr name")
            if not isinstance(encoded, str):
                raise self.error(f"xattr {name!r} is not a base64 string")
            try:
                pairs.append((name, base64.b64decode(encoded, validate=True)))
            except (binascii.Error, ValueError):
                raise self.error(f"xattr {name!r} is not valid base64") from None
        return tuple(pairs)

    def name_inside_root(self, key: str, name: str) -> None:
        depth = 0
        for part in name.split("/"):
            if part == "..":
                if depth == 0:
                    raise self.error(f"{key} {name!r} leaves the root")
                depth -= 1
            elif part not in ("", "."):
                depth += 1

    # -- entries ---------------------------------------------------------

    def entry(self, raw: object) -> None:
        if not isinstance(raw, dict):
            raise self.error("is not an object")
        kind = raw.get("type")
        if kind == "chunk":
            self.chunk(raw)
            return
        self.finish_file()
        etype = _TYPES.get(kind) if isinstance(kind, str) else None
        if etype is None:
            raise self.error(f"unknown type {kind!r}")
        name = self.text(raw, "name", path=True)
        if not name:
            raise self.error("has no name")
        self.name_inside_root("name", name)
        uid = self.integer(raw, "uid", MAX_ID)
        gid = self.integer(raw, "gid", MAX_ID)
        # eStargz writes a user or group name only when it changes for that
        # id (estargz.go, nameIfChanged); its reader carries it forward.
        uname = self.text(raw, "userName")
        if uname:
            self.unames[uid] = uname
        else:
            uname = self.unames.get(uid, "")
        gname = self.text(raw, "groupName")
        if gname:
            self.gnames[gid] = gname
        else:
            gname = self.gnames.get(gid, "")
        linkname = ""
        if etype in (EntryType.SYMLINK, EntryType.HARDLINK):
            linkname = self.text(raw, "linkName", path=True)
            if etype is EntryType.HARDLINK:
                if not linkname:
                    raise self.error(f"hardlink {name!r} has no target")
                self.name_inside_root("linkName", linkname)
        devmajor = devminor = 0
        if etype in (EntryType.CHAR_DEVICE, EntryType.BLOCK_DEVICE):
            devmajor = self.integer(raw, "devMajor", MAX_ID)
            devminor = self.integer(raw, "devMinor", MAX_ID)
        size = self.integer(raw, "size", MAX_SIZE) if etype is EntryType.FILE else 0
        entry = TarEntry(
            path=name,
            type=etype,
            mode=self.integer(raw, "mode", MAX_OFFSET) & 0o7777,
            uid=uid,
            gid=gid,
            size=size,
            mtime_ns=self.mtime(raw, name),
            linkname=linkname,
            devmajor=devmajor,
            devminor=devminor,
            xattrs=self.xattrs(raw),
            uname=uname,
            gname=gname,
        )
        if etype is not EntryType.FILE:
            self.results.append((entry, None))
            return
        digest = self.digest(raw, "digest")
        end_offset = self.integer(raw, "endOffset", MAX_OFFSET)
        self.file = _File(name, entry, digest, end_offset)
        self.results.append((entry, self.file))
        if size:
            self.chunk(raw)

    def chunk(self, raw: dict[str, Any]) -> None:
        file = self.file
        if file is None or file.covered >= file.entry.size:
            raise self.error("a chunk that follows no regular file still missing data")
        name = self.text(raw, "name", path=True)
        if name and name != file.raw_name:
            raise self.error(f"chunk of {name!r} follows the entry for {file.raw_name!r}")
        chunk_type = raw.get("chunkType", "")
        if chunk_type not in _CHUNK_TYPES:
            raise self.error(f"unknown chunkType {chunk_type!r}")
        file_offset = self.integer(raw, "chunkOffset", MAX_SIZE)
        if file_offset != file.covered:
            raise self.error(
                f"chunk of {file.raw_name!r} at {file_offset}, where the chunks before it "
                f"end at {file.covered}"
            )
        size = self.integer(raw, "chunkSize", MAX_SIZE) or file.entry.size - file_offset
        if file_offset + size > file.entry.size:
            raise self.error(
                f"chunk of {file.raw_name!r} ends at {file_offset + size}, past the file's "
                f"{file.entry.size} bytes"
            )
        offset = self.integer(raw, "offset", MAX_OFFSET)
        inner = self.integer(raw, "innerOffset", MAX_OFFSET)
        chunk = _PendingChunk(file_offset, size, offset, inner, self.digest(raw, "chunkDigest"))
        file.chunks.append(chunk)
        file.covered += size
        self.chunks.append((file, chunk))

    def finish_file(self) -> None:
        file, self.file = self.file, None
        if file is None:
            return
        if file.covered != file.entry.size:
            raise TocError(
                f"{self.where}: TOC: the chunks of {file.raw_name!r} cover {file.covered} of "
                f"its {file.entry.size} bytes"
            )
        if len(file.chunks) == 1 and file.chunks[0].digest is None:
            file.chunks[0].digest = file.digest  # one chunk: the file's digest is its digest
        if self.undigested is None and any(chunk.digest is None for chunk in file.chunks):
            # Original stargz wrote no digests: nothing to verify chunks by,
            # which is no inconsistency, but no way to serve them safely.
            self.undigested = file.raw_name

    # -- extents ---------------------------------------------------------

    def place_chunks(self) -> NotServable | None:
        """Each chunk's compressed length: up to the next member or frame that starts later.

        The members (or frames) must come in TOC order, as both writers put
        them, so two never overlap; chunks sharing one member (eStargz
        ``innerOffset``) must follow each other inside it. containers/storage
        gives each file's ``endOffset``, which then bounds its last chunk.
        """
        chunks = self.chunks
        next_start = self.payload_end
        for position in range(len(chunks) - 1, -1, -1):
            file, chunk = chunks[position]
            if chunk.offset >= self.payload_end:
                raise TocError(
                    f"{self.where}: TOC: chunk at {chunk.file_offset} of {file.raw_name!r} "
                    f"starts at blob offset {chunk.offset}, past the data's end at "
                    f"{self.payload_end}"
                )
            if position + 1 < len(chunks):
                following = chunks[position + 1][1]
                if following.offset < chunk.offset or (
                    following.offset == chunk.offset
                    and following.inner_offset < chunk.inner_offset + chunk.size
                ):
                    raise TocError(
                        f"{self.where}: TOC: chunk at {chunk.file_offset} of "
                        f"{file.raw_name!r} (blob offset {chunk.offset}, inner offset "
                        f"{chunk.inner_offset}) overlaps or comes after the next one"
                    )
                if following.offset > chunk.offset:
                    next_start = following.offset
            end = next_start
            if file.end_offset and chunk is file.chunks[-1]:
                if not chunk.offset < file.end_offset <= next_start:
                    raise TocError(
                        f"{self.where}: TOC: {file.raw_name!r} ends at blob offset "
                        f"{file.end_offset}, outside {chunk.offset}..{next_start}"
                    )
                end = file.end_offset
            chunk.length = end - chunk.offset
            if chunk.size > MAX_CHUNK_SIZE:
                return NotServable(
                    f"a chunk of {file.raw_name!r} is {chunk.size} bytes, over {MAX_CHUNK_SIZE}"
                )
            if chunk.inner_offset > MAX_INNER_OFFSET:
                return NotServable(
                    f"a chunk of {file.raw_name!r} starts {chunk.inner_offset} bytes into its "
                    f"member, over {MAX_INNER_OFFSET}"
                )
        return None


def parse_entries(
    data: bytes, *, payload_end: int, where: str, warn: Callable[[str], None]
) -> tuple[tuple[TocEntry, ...], int] | NotServable:
    """The TOC JSON ``data`` as entries (in TOC order) and the size of their data space.

    ``payload_end``: where the TOC starts in the blob; every chunk must lie
    before it. Call only with JSON already checked against its digest (or
    from a verified blob). ``where`` starts every message; ``warn`` gets
    oddities that do not stop the parse (an mtime clamped to range).
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TocError(f"{where}: TOC is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise TocError(f"{where}: TOC is not a JSON object")
    version = document.get("version")
    if version != 1 or type(version) is not int:
        return NotServable(f"its TOC has version {version!r}, and imagefs reads version 1")
    raw_entries = document.get("entries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise TocError(f"{where}: TOC entries is not an array")
    if len(raw_entries) > MAX_TOC_ENTRIES:
        return NotServable(f"its TOC lists {len(raw_entries)} entries, over {MAX_TOC_ENTRIES}")
    parser = _Parser(payload_end, where, warn)
    for index, raw in enumerate(raw_entries):
        parser.index = index
        parser.entry(raw)
    parser.finish_file()
    if parser.undigested is not None:
        return NotServable(f"its TOC gives no digest for a chunk of {parser.undigested!r}")
    unservable = parser.place_chunks()
    if unservable is not None:
        return unservable
    entries: list[TocEntry] = []
    data_size = 0
    for entry, file in parser.results:
        if file is None:
            entries.append(TocEntry(entry))
            continue
        chunks = tuple(
            Chunk(c.file_offset, c.size, c.offset, c.length, c.inner_offset, c.digest)
            for c in file.chunks
            if c.digest is not None  # all of them (undigested TOCs are not served)
        )
        entries.append(TocEntry(replace(entry, data_offset=TOC_DATA_BASE + data_size), chunks))
        data_size += entry.size
        if data_size > MAX_DATA_SIZE:
            raise TocError(f"{where}: TOC: its files add up to more than {MAX_DATA_SIZE} bytes")
    return tuple(entries), data_size
