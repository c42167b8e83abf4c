"""The TOC JSON of both formats, checked and turned into entries and a chunk table.

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
from typing import Annotated, Any, cast

import msgspec

from imagefs.digest import Digest, InvalidDigestError
from imagefs.errors import TocError
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.toc.limits import (
    MAX_CHUNK_SIZE,
    MAX_INNER_OFFSET,
    MAX_TOC_ENTRIES,
    NotServable,
)
from imagefs.layers.toc.model import TOC_DATA_BASE, TocFormat
from imagefs.layers.toc.table import ChunkTable

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
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_NS = 1_000_000_000
_SHA256_LENGTH = len("sha256:") + 64
_LOWER_HEX = re.compile("[0-9a-f]*")

# The fields both dialects use, decoded and type- and range-checked in C by
# msgspec (a TOC of 50k entries: 40 ms, against 120 ms for json.loads alone
# and ~1 s for the same checks in Python on the decoded dicts). Absent and
# null read as None; unknown fields (accesstime, changetime, the writers'
# extensions) are skipped. Keys match exactly, as written by both writers.
_Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
_Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)]
_Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_OFFSET)]


class _RawEntry(msgspec.Struct, rename="camel", gc=False):
    name: str | None = None
    type: str | None = None
    size: _Size | None = None
    modtime: str | None = None
    link_name: str | None = None
    mode: _Offset | None = None
    uid: _Id | None = None
    gid: _Id | None = None
    user_name: str | None = None
    group_name: str | None = None
    dev_major: _Id | None = None
    dev_minor: _Id | None = None
    xattrs: dict[str, str] | None = None
    digest: str | None = None
    offset: _Offset | None = None
    inner_offset: _Offset | None = None
    chunk_offset: _Size | None = None
    chunk_size: _Size | None = None
    chunk_digest: str | None = None
    end_offset: _Offset | None = None
    chunk_type: str | None = None


class _RawToc(msgspec.Struct, gc=False):
    version: Any = None
    entries: list[_RawEntry] | None = None


_DECODER = msgspec.json.Decoder(_RawToc)
# "Expected `int` >= 0 - at `$.entries[3].mode`": where msgspec found a value invalid.
_AT = re.compile(r"(?s)(.*) - at `\$(?:\.entries(?:\[(\d+)\](?:\.(\w+))?)?)?(.*)`")


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


class _Parser:
    """One pass over the entries; chunks go to flat columns, checked as a whole at the end.

    Written for speed (a TOC of 70k entries is most of a lazy mount's time to
    live): no object per chunk (the columns become a :class:`~.table.ChunkTable`
    in C), a file in one chunk (most) handled without a second call, chunk
    digests checked all at once, mtimes parsed once per distinct string,
    names checked with the cheap test first.
    """

    def __init__(self, payload_end: int, where: str, warn: Callable[[str], None]) -> None:
        # Imported here, as tree.loader does: a mount served from its
        # persisted tree never needs the tar scanner.
        from imagefs.layers.tarscan import new_entry  # noqa: PLC0415

        self.new_entry = new_entry
        self.payload_end = payload_end
        self.where = where
        self.warn = warn
        self.entries: list[TarEntry] = []
        self.data_size = 0
        # The chunk columns, in TOC order: owner (index in entries), where the
        # chunk starts in the data space and in its file, its size, the blob
        # offset of its member, where it starts inside the member, its digest
        # as written (None: none), the TOC entry that gave it (for messages),
        # and (from place_chunks) its compressed length.
        self.owner: list[int] = []
        self.starts: list[int] = []
        self.file_offsets: list[int] = []
        self.sizes: list[int] = []
        self.offsets: list[int] = []
        self.inners: list[int] = []
        self.digests: list[str | None] = []
        self.raw_index: list[int] = []
        self.lengths: list[int] = []
        # Per regular file with data: its end offset (containers/storage), by entry index.
        self.end_offsets: dict[int, int] = {}
        # The regular file whose chunk entries may follow.
        self.file = -1
        self.file_name = ""
        self.file_size = 0
        self.file_base = 0  # where its data starts in the data space
        self.file_digest: str | None = None
        self.file_first_chunk = 0
        self.covered = 0
        self.undigested: str | None = None  # a file with a chunk that has no digest
        self.unames: dict[int, str] = {}
        self.gnames: dict[int, str] = {}
        self.mtimes: dict[str, int] = {}
        self.index = 0

    def error(self, message: str) -> TocError:
        return TocError(f"{self.where}: TOC entry {self.index}: {message}")

    # -- fields ----------------------------------------------------------

    def path(self, key: str, value: str | None) -> str:
        # Any string msgspec decodes encodes as UTF-8 (it refuses lone
        # surrogates, which no file name could be); NUL ends a C string.
        if not value:
            return ""
        if "\0" in value:
            raise self.error(f"{key} {value!r} holds a NUL byte")
        return value

    def check_digest(self, key: str, value: str) -> None:
        """Raise the TocError for ``value`` unless it is a sha256 digest."""
        try:
            parsed = Digest(value)  # one regex for the usual case
        except InvalidDigestError:
            pass
        else:
            if parsed.algorithm == "sha256":
                return
            raise self.error(f"{key} {parsed!r} is not a sha256 digest")
        try:
            Digest.parse(value, f"{self.where}: TOC entry {self.index}: {key}")
        except InvalidDigestError as exc:
            raise TocError(str(exc)) from None
        raise AssertionError("Digest.parse accepted what Digest refused")  # pragma: no cover

    def mtime(self, value: str | None, name: str) -> int:
        if not value:
            return 0
        cached = self.mtimes.get(value)
        if cached is not None:
            return cached
        ns = parse_rfc3339_ns(value)
        if ns is None:
            raise self.error(f"modtime {value!r} is not an RFC 3339 time")
        if not MIN_TIME_NS <= ns <= MAX_TIME_NS:
            self.warn(f"TOC entry {name!r}: mtime out of range, clamped")
            return max(MIN_TIME_NS, min(MAX_TIME_NS, ns))
        if len(self.mtimes) < 4096:  # hostile input may use a new time every entry
            self.mtimes[value] = ns
        return ns

    def xattrs(self, value: dict[str, str]) -> tuple[tuple[str, bytes], ...]:
        pairs = []
        for name, encoded in value.items():
            try:
                pairs.append((name, base64.b64decode(encoded, validate=True)))
            except (binascii.Error, ValueError):
                raise self.error(f"xattr {name!r} is not valid base64") from None
        return tuple(pairs)

    def name_inside_root(self, key: str, name: str) -> None:
        if ".." not in name:
            return
        depth = 0
        for part in name.split("/"):
            if part == "..":
                if depth == 0:
                    raise self.error(f"{key} {name!r} leaves the root")
                depth -= 1
            elif part not in ("", "."):
                depth += 1

    # -- entries ---------------------------------------------------------

    def entry(self, raw: _RawEntry) -> None:
        kind = raw.type
        if kind == "chunk":
            self.chunk(raw)
            return
        if self.file >= 0:
            self.finish_file()
        etype = _TYPES.get(kind) if kind is not None else None
        if etype is None:
            raise self.error(f"unknown type {kind!r}")
        name = raw.name
        if not name:
            raise self.error("has no name")
        if "\0" in name or ".." in name:  # the cheap test first
            self.path("name", name)
            self.name_inside_root("name", name)
        uid = raw.uid or 0
        gid = raw.gid or 0
        # eStargz writes a user or group name only when it changes for that
        # id (estargz.go, nameIfChanged); its reader carries it forward.
        uname = raw.user_name
        if uname:
            self.unames[uid] = uname
        else:
            uname = self.unames.get(uid, "")
        gname = raw.group_name
        if gname:
            self.gnames[gid] = gname
        else:
            gname = self.gnames.get(gid, "")
        linkname = ""
        devmajor = devminor = size = 0
        if etype is EntryType.FILE:
            size = raw.size or 0
        elif etype is EntryType.SYMLINK or etype is EntryType.HARDLINK:
            linkname = self.path("linkName", raw.link_name)
            if etype is EntryType.HARDLINK:
                if not linkname:
                    raise self.error(f"hardlink {name!r} has no target")
                self.name_inside_root("linkName", linkname)
        elif etype is EntryType.CHAR_DEVICE or etype is EntryType.BLOCK_DEVICE:
            devmajor = raw.dev_major or 0
            devminor = raw.dev_minor or 0
        xattrs = self.xattrs(raw.xattrs) if raw.xattrs else ()
        mode = (raw.mode or 0) & 0o7777
        mtime_ns = self.mtime(raw.modtime, name)
        base = self.data_size
        data_offset = TOC_DATA_BASE + base if etype is EntryType.FILE else 0
        entry = self.new_entry(
            name, etype, mode, uid, gid, size, mtime_ns, linkname, devmajor, devminor,
            xattrs, data_offset, None, uname, gname,
        )  # fmt: skip
        entries = self.entries
        entries.append(entry)
        if etype is not EntryType.FILE or not size:
            return
        self.data_size = base + size
        if self.data_size > MAX_DATA_SIZE:
            raise self.error(f"the files add up to more than {MAX_DATA_SIZE} bytes")
        file = len(entries) - 1
        if raw.end_offset:
            self.end_offsets[file] = raw.end_offset
        chunk_size = raw.chunk_size
        chunk_type = raw.chunk_type
        if (
            not raw.chunk_offset
            and (not chunk_size or chunk_size == size)
            and (not chunk_type or chunk_type in _CHUNK_TYPES)
        ):
            # The whole file in one chunk (most files): its digest, if no
            # chunkDigest, is the file's (finish_file's rule).
            digest = raw.chunk_digest or raw.digest or None
            self.owner.append(file)
            self.starts.append(base)
            self.file_offsets.append(0)
            self.sizes.append(size)
            self.offsets.append(raw.offset or 0)
            self.inners.append(raw.inner_offset or 0)
            self.digests.append(digest)
            self.raw_index.append(self.index)
            if digest is None and self.undigested is None:
                self.undigested = name
            return
        self.file = file
        self.file_name = name
        self.file_size = size
        self.file_base = base
        self.file_digest = raw.digest or None  # checked only if a chunk needs it
        self.file_first_chunk = len(self.sizes)
        self.covered = 0
        self.chunk(raw)

    def chunk(self, raw: _RawEntry) -> None:
        if self.file < 0:
            raise self.error("a chunk that follows no regular file still missing data")
        name = raw.name
        if name and name != self.file_name:
            raise self.error(f"chunk of {name!r} follows the entry for {self.file_name!r}")
        chunk_type = raw.chunk_type
        if chunk_type and chunk_type not in _CHUNK_TYPES:
            raise self.error(f"unknown chunkType {chunk_type!r}")
        file_offset = raw.chunk_offset or 0
        if file_offset != self.covered:
            raise self.error(
                f"chunk of {self.file_name!r} at {file_offset}, where the chunks before it "
                f"end at {self.covered}"
            )
        size = raw.chunk_size or self.file_size - file_offset
        if file_offset + size > self.file_size:
            raise self.error(
                f"chunk of {self.file_name!r} ends at {file_offset + size}, past the file's "
                f"{self.file_size} bytes"
            )
        self.owner.append(self.file)
        self.starts.append(self.file_base + file_offset)
        self.file_offsets.append(file_offset)
        self.sizes.append(size)
        self.offsets.append(raw.offset or 0)
        self.inners.append(raw.inner_offset or 0)
        self.digests.append(raw.chunk_digest or None)
        self.raw_index.append(self.index)
        self.covered += size
        if self.covered == self.file_size:
            self.finish_file()

    def finish_file(self) -> None:
        """The file's chunks are all there: check they cover it; give them digests."""
        if self.file < 0:
            return
        if self.covered != self.file_size:
            raise TocError(
                f"{self.where}: TOC: the chunks of {self.file_name!r} cover {self.covered} of "
                f"its {self.file_size} bytes"
            )
        first, digests = self.file_first_chunk, self.digests
        if len(digests) - first == 1 and digests[first] is None:
            # One chunk: the file's digest is its digest.
            digests[first] = self.file_digest
        if self.undigested is None and None in digests[first:]:
            # Original stargz wrote no digests: nothing to verify chunks by,
            # which is no inconsistency, but no way to serve them safely.
            self.undigested = self.file_name
        self.file = -1

    def digest_column(self, raw_entries: list[_RawEntry]) -> bytes:
        """Every chunk's digest as 32 raw bytes, back to back; TocError for the first bad one.

        Checked all at once (a length and prefix test per digest, one regex
        and one ``bytes.fromhex`` over all of them) rather than one
        :class:`Digest` each, which was a tenth of the parse. Only when that
        fails are they checked one by one, for the message. Chunks with no
        digest (then :attr:`undigested` says which file) are skipped.
        """
        digests = self.digests
        if self.undigested is None:
            present = cast("list[str]", digests)  # no None, or undigested would name its file
            prefix, length = "sha256:", _SHA256_LENGTH
            if all(len(value) == length and value.startswith(prefix) for value in present):
                hexes = "".join([value[7:] for value in present])
                if _LOWER_HEX.fullmatch(hexes):
                    return bytes.fromhex(hexes)
        column = bytearray()
        for position, value in enumerate(digests):
            if value is None:
                column += bytes(32)  # never served: the TOC is NotServable
                continue
            self.index = self.raw_index[position]
            raw = raw_entries[self.index]
            self.check_digest("chunkDigest" if raw.chunk_digest else "digest", value)
            column += bytes.fromhex(value[7:])
        return bytes(column)

    # -- extents ---------------------------------------------------------

    def place_chunks(self) -> NotServable | None:
        """Each chunk's compressed length: up to the next member or frame that starts later.

        The members (or frames) must come in TOC order, as both writers put
        them, so two never overlap; chunks sharing one member (eStargz
        ``innerOffset``) must follow each other inside it. containers/storage
        gives each file's ``endOffset``, which then bounds its last chunk.
        """
        offsets, inners, sizes, owner = self.offsets, self.inners, self.sizes, self.owner
        count = len(offsets)
        lengths = [0] * count
        payload_end = self.payload_end
        next_start = payload_end
        end_offsets = self.end_offsets
        for position in range(count - 1, -1, -1):
            offset = offsets[position]
            if offset >= payload_end:
                raise self.chunk_error(position, f"past the data's end at {payload_end}")
            if position + 1 < count:
                following = offsets[position + 1]
                if following < offset or (
                    following == offset
                    and inners[position + 1] < inners[position] + sizes[position]
                ):
                    raise self.chunk_error(position, "overlaps or comes after the next one")
                if following > offset:
                    next_start = following
            end = next_start
            if end_offsets:
                file = owner[position]
                end_offset = end_offsets.get(file)
                if end_offset and (position + 1 == count or owner[position + 1] != file):
                    if not offset < end_offset <= next_start:
                        name = self.entries[file].path
                        raise TocError(
                            f"{self.where}: TOC: {name!r} ends at blob offset {end_offset}, "
                            f"outside {offset}..{next_start}"
                        )
                    end = end_offset
            lengths[position] = end - offset
        self.lengths = lengths
        # Checked after every chunk is placed, so a TOC that is both
        # inconsistent and too costly is reported as inconsistent.
        if sizes and max(sizes) > MAX_CHUNK_SIZE:
            position = next(i for i, size in enumerate(sizes) if size > MAX_CHUNK_SIZE)
            return NotServable(
                f"a chunk of {self.entries[owner[position]].path!r} is {sizes[position]} bytes, "
                f"over {MAX_CHUNK_SIZE}"
            )
        if inners and max(inners) > MAX_INNER_OFFSET:
            position = next(i for i, inner in enumerate(inners) if inner > MAX_INNER_OFFSET)
            return NotServable(
                f"a chunk of {self.entries[owner[position]].path!r} starts {inners[position]} "
                f"bytes into its member, over {MAX_INNER_OFFSET}"
            )
        return None

    def chunk_error(self, position: int, problem: str) -> TocError:
        name = self.entries[self.owner[position]].path
        return TocError(
            f"{self.where}: TOC: chunk at {self.file_offsets[position]} of {name!r} (blob "
            f"offset {self.offsets[position]}, inner offset {self.inners[position]}) {problem}"
        )

    def table(self, toc_format: TocFormat, digests: bytes) -> ChunkTable:
        return ChunkTable.from_columns(
            toc_format, self.data_size, starts=self.starts, sizes=self.sizes,
            offsets=self.offsets, lengths=self.lengths, inner=self.inners,
            file_offsets=self.file_offsets, entry_index=self.owner, digests=digests,
        )  # fmt: skip


def parse_entries(
    data: bytes,
    *,
    toc_format: TocFormat,
    payload_end: int,
    where: str,
    warn: Callable[[str], None],
) -> tuple[tuple[TarEntry, ...], ChunkTable] | NotServable:
    """The TOC JSON ``data`` as entries (in TOC order) and the table of their chunks.

    ``payload_end``: where the TOC starts in the blob; every chunk must lie
    before it. Call only with JSON already checked against its digest (or
    from a verified blob). ``where`` starts every message; ``warn`` gets
    oddities that do not stop the parse (an mtime clamped to range).
    """
    try:
        document = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, data, where) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise TocError(f"{where}: TOC is not valid JSON: {exc}") from None
    version = document.version
    if version != 1 or type(version) is not int:
        return NotServable(f"its TOC has version {version!r}, and imagefs reads version 1")
    raw_entries = document.entries or []
    if len(raw_entries) > MAX_TOC_ENTRIES:
        return NotServable(f"its TOC lists {len(raw_entries)} entries, over {MAX_TOC_ENTRIES}")
    parser = _Parser(payload_end, where, warn)
    entry = parser.entry
    for index, raw in enumerate(raw_entries):
        parser.index = index
        entry(raw)
    if parser.file >= 0:
        parser.index = len(raw_entries)
        parser.finish_file()
    digests = parser.digest_column(raw_entries)
    if parser.undigested is not None:
        return NotServable(f"its TOC gives no digest for a chunk of {parser.undigested!r}")
    unservable = parser.place_chunks()
    if unservable is not None:
        return unservable
    return tuple(parser.entries), parser.table(toc_format, digests)


def _invalid(exc: msgspec.ValidationError, data: bytes, where: str) -> TocError:
    """The TocError for a value msgspec refused, naming the entry, the field and the value.

    msgspec says what it expected and where, not what it found: that is
    looked up in the JSON again (only on this error path).
    """
    message = str(exc)
    match = _AT.fullmatch(message)
    if match is None:  # at the top: not an object
        return TocError(f"{where}: TOC is not a JSON object ({message[:1].lower()}{message[1:]})")
    expected, index, key, _ = match.groups()  # the last: within the field (xattrs[...])
    expected = expected[:1].lower() + expected[1:]
    if index is None:  # only the entries have a type to check
        return TocError(f"{where}: TOC entries is not an array ({expected})")
    if key is None:
        return TocError(f"{where}: TOC entry {index}: is not an object ({expected})")
    try:
        value = json.loads(data)["entries"][int(index)][key]
    except (ValueError, RecursionError, LookupError, TypeError):
        value = "?"
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return TocError(f"{where}: TOC entry {index}: {key} {shown} is invalid ({expected})")
