"""Streaming tar header scanner: a layer's tar bytes in, one TarEntry per member out.

One pass over the uncompressed layer stream reads the 512-byte headers (and
the few extension payloads), skips every member's data with
``LayerStream.skip`` and yields :class:`~imagefs.layers.entry.TarEntry` records that
say where each member's data lies. Nothing is retained between members except
pending extension headers, so memory does not grow with the archive.

Formats understood (POSIX.1-2008 "pax" for ustar/pax, the GNU tar manual's
"Basic Tar Format" and "GNU Extensions to the Archive Format" for the rest):

* **ustar** (``magic "ustar\\0" version "00"``): the name is ``prefix/name``.
* **old V7** (no magic): name, mode, ids, size, mtime, linkname only; a
  regular-file (``'\\0'``) entry whose name ends in ``/`` is a directory.
* **GNU** (``magic "ustar  \\0"``): ``L``/``K`` long name / long link name
  members, base-256 numeric fields (first byte ``0x80`` positive, ``0xff``
  negative, two's complement), old sparse files (typeflag ``S`` with the map in
  the header and in extension blocks), ``D`` dumpdir (a directory), ``V``
  volume labels and ``M`` multi-volume continuations (skipped with a warning).
* **pax** ``x`` (next member) and ``g`` (all following members) extended
  headers: ``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``uname``,
  ``gname``, ``mtime`` (exact to the nanosecond), ``SCHILY.xattr.NAME``,
  ``LIBARCHIVE.xattr.NAME`` (URL-encoded name, base64 value),
  ``SCHILY.devmajor``/``SCHILY.devminor`` and the GNU sparse formats 0.0, 0.1
  and 1.0 (``GNU.sparse.*``). Other keywords (``atime``, ``comment``,
  ``hdrcharset``...) are ignored.

Typeflags map to :class:`~imagefs.layers.entry.EntryType`: ``0``, ``\\0``, ``7``
(contiguous) and unknown ones are files (POSIX: "any unrecognized typeflag
value shall be treated as a regular file", with a warning here), ``1``
hardlink, ``2`` symlink, ``3``/``4`` character/block device, ``5`` and GNU
``D`` directory, ``6`` FIFO. As in Go's ``archive/tar`` (which writes most
layers) and Python's ``tarfile``, types ``1``-``6`` carry no data whatever
their size field says, and their ``size`` is reported as 0; so pax "hard
links with data" (which POSIX permits and nothing common writes) are not
supported. Sparse files report their real size, the map of the data
segments, and ``data_offset`` where the stored segments start (past any
extension blocks or 1.0 map); the map is checked to be ordered, inside the
file, and to add up to the stored bytes.

Paths are not interpreted: ``path`` is the raw name decoded like
``os.fsdecode`` (UTF-8, ``surrogateescape``). pax values are UTF-8 unless
``hdrcharset=BINARY`` says they are raw bytes; decoding UTF-8 with
``surrogateescape`` gives the right answer in both cases, so that keyword
needs no special handling.

End of archive: two zero blocks (POSIX), or one zero block and then the end
of the stream. Like GNU tar, a lone zero block followed by more headers
still ends the archive, with a warning; so does a stream that stops at a
header boundary without any zero block.

Hostile input: every malformed header (bad checksum, non-numeric field,
negative or huge number, truncated header or data, bogus pax record, an
extension payload over 1 MiB) raises :class:`~imagefs.errors.TarFormatError`
with the stream offset and, when known, the member name; no other exception
escapes the parser itself (the stream's own errors pass through).

Speed (the target is GNU ``tar -tf`` times two): the common header (ustar or
GNU magic, canonical zero-padded octal fields, a plain member type, perhaps
after GNU long names) is validated and split by one precompiled regex and
handled inline in the scan loop; its checksum comes from ``zlib.adler32``
(see ``_byte_sum``), and entries are built without the frozen dataclass's
slow ``__init__`` (see ``_entry_factory``). Anything else takes the general
path, which checks every field. Each member's data is skipped except its
last byte, which is read together with the next header: a stream that ends
inside member data is then told apart from one that ends cleanly at a header
boundary, without an extra read call.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote_to_bytes

from imagefs.errors import TarFormatError
from imagefs.layers.entry import EntryType, TarEntry

if TYPE_CHECKING:
    from imagefs.layers.reader import LayerStream

__all__ = ["MISSING_END_MARKER", "new_entry", "scan_tar"]

BLOCK = 512
# Bound on any one extension payload (pax record set, GNU long name, sparse
# map) and on all extensions pending before one member: hostile input must not
# make us buffer without limit.
MAX_EXTENSION = 1 << 20
MAX_SIZE = (1 << 63) - 1  # st_size and file offsets are signed 64-bit
MAX_ID = (1 << 32) - 1  # uid_t, gid_t, and Linux major/minor numbers are 32-bit
# The warning for a stream that stops at a header boundary with no zero
# block: zstd:chunked streams legitimately end so (tree.loader logs it at debug).
MISSING_END_MARKER = "the stream ends without an end-of-archive marker"
MIN_TIME_NS = -(1 << 63)
MAX_TIME_NS = (1 << 63) - 1
NS = 1_000_000_000

_ZERO_BLOCK = bytes(BLOCK)
_OCTAL_DIGITS = b"01234567"
_ASCII = bytes(range(128))

# The fast path: ustar or GNU magic, every numeric field zero-padded octal
# with a NUL terminator (what GNU tar, Go's archive/tar and Python's tarfile
# write). Groups: 1 name, 2 mode, 3 uid, 4 gid, 5 size, 6 mtime, 7 checksum
# digits, 8 uname, 9 gname, 10 prefix.
# The lookahead groups capture a NUL-terminated string inside a fixed-width
# field, then ``.{N}`` steps over the whole field (measured: cheaper than
# cutting the strings out with ``bytes.find`` and slices afterwards).
_FAST_HEADER = re.compile(
    rb"(?s)"
    rb"(?=([^\0]{0,100})).{100}"  # name
    rb"([0-7]{7})\0"  # mode
    rb"([0-7]{7})\0"  # uid
    rb"([0-7]{7})\0"  # gid
    rb"([0-7]{11})\0"  # size
    rb"([0-7]{11})\0"  # mtime
    rb"([0-7]{6})\0 "  # chksum: six digits, NUL, space
    rb"."  # typeflag
    rb".{100}"  # linkname, decoded only for links
    rb"(?:ustar\x0000|ustar  \0)"  # magic + version: POSIX, GNU
    rb"(?=([^\0]{0,32})).{32}"  # uname
    rb"(?=([^\0]{0,32})).{32}"  # gname
    rb"(?:[0-7]{7}\0|\0{8}){2}"  # devmajor, devminor (GNU leaves them NUL)
    rb"(?=([^\0]{0,155}))"  # prefix (POSIX only; GNU keeps atime/ctime here)
)

# What a member typeflag means: its entry type, whether data blocks follow
# the header, and which extra fields it uses.
_PLAIN, _LINK, _DEVICE = 0, 1, 2
_MEMBER_TYPES: dict[int, tuple[EntryType, bool, int]] = {
    ord("0"): (EntryType.FILE, True, _PLAIN),
    0: (EntryType.FILE, True, _PLAIN),  # pre-POSIX "AREGTYPE"
    ord("7"): (EntryType.FILE, True, _PLAIN),  # contiguous file: POSIX says treat as regular
    ord("1"): (EntryType.HARDLINK, False, _LINK),
    ord("2"): (EntryType.SYMLINK, False, _LINK),
    ord("3"): (EntryType.CHAR_DEVICE, False, _DEVICE),
    ord("4"): (EntryType.BLOCK_DEVICE, False, _DEVICE),
    ord("5"): (EntryType.DIRECTORY, False, _PLAIN),
    ord("6"): (EntryType.FIFO, False, _PLAIN),
    # GNU dumpdir (--incremental): a directory whose data lists its contents.
    ord("D"): (EntryType.DIRECTORY, True, _PLAIN),
}
_UNKNOWN_TYPE = (EntryType.FILE, True, _PLAIN)
_DEVICE_TYPEFLAGS = (ord("3"), ord("4"))
_GLOBAL_TYPEFLAG = ord("g")
_LONGNAME_TYPEFLAG = ord("L")
_LONGLINK_TYPEFLAG = ord("K")
_SPARSE_TYPEFLAG = ord("S")
_EXTENSION_NAMES = {
    ord("x"): "pax extended header",
    ord("X"): "pax extended header",
    ord("g"): "pax global header",
    ord("L"): "GNU long name header",
    ord("K"): "GNU long link name header",
}
_SKIPPED_TYPEFLAGS = {ord("V"): "volume label", ord("M"): "multi-volume continuation"}

_XATTR_PREFIX = b"SCHILY.xattr."
_LIBARCHIVE_XATTR_PREFIX = b"LIBARCHIVE.xattr."
_SPARSE_KEYS = (b"GNU.sparse.major", b"GNU.sparse.size", b"GNU.sparse.map")
_SPARSE_VERSIONS = ((b"0", b"0"), (b"0", b"1"), (b"1", b"0"))
_SPECIAL_PREFIXES = (_XATTR_PREFIX, _LIBARCHIVE_XATTR_PREFIX, b"GNU.sparse.")
_SPARSE_OFFSET = b"GNU.sparse.offset"
_SPARSE_NUMBYTES = b"GNU.sparse.numbytes"

_PAX_DECIMAL = re.compile(rb"0*([0-9]{1,20})")
_PAX_TIME = re.compile(rb"(-?)0*([0-9]{1,20})(?:\.([0-9]*))?")


def _entry_factory() -> Callable[
    [
        str,
        EntryType,
        int,
        int,
        int,
        int,
        int,
        str,
        int,
        int,
        tuple[tuple[str, bytes], ...],
        int,
        tuple[tuple[int, int], ...] | None,
        str,
        str,
    ],
    TarEntry,
]:
    """A positional TarEntry constructor that is fast for a frozen dataclass.

    A frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``: about 2 us for TarEntry's 15 fields, a quarter of
    the per-member budget. Writing the slots through their descriptors builds
    the same object (TarEntry has no ``__post_init__``) in under half the
    time. If TarEntry stops being a frozen slots dataclass in this field
    order, its plain constructor is used instead.
    """
    params = getattr(TarEntry, "__dataclass_params__", None)
    order = tuple(field.name for field in dataclasses.fields(TarEntry))
    expected = (
        "path",
        "type",
        "mode",
        "uid",
        "gid",
        "size",
        "mtime_ns",
        "linkname",
        "devmajor",
        "devminor",
        "xattrs",
        "data_offset",
        "sparse",
        "uname",
        "gname",
        "bookkeeping",
    )
    if (
        params is None
        or not params.frozen
        or order != expected
        or hasattr(TarEntry, "__post_init__")
        or "__slots__" not in vars(TarEntry)
    ):
        return TarEntry
    (s_path, s_type, s_mode, s_uid, s_gid, s_size, s_mtime, s_link, s_major, s_minor) = (
        vars(TarEntry)[name].__set__ for name in expected[:10]
    )
    (s_xattrs, s_offset, s_sparse, s_uname, s_gname, s_bookkeeping) = (
        vars(TarEntry)[name].__set__ for name in expected[10:]
    )
    new = object.__new__

    def new_entry(  # noqa: PLR0917 - positional, in TarEntry's field order, for speed
        path: str,
        etype: EntryType,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        linkname: str,
        devmajor: int,
        devminor: int,
        xattrs: tuple[tuple[str, bytes], ...],
        data_offset: int,
        sparse: tuple[tuple[int, int], ...] | None,
        uname: str,
        gname: str,
    ) -> TarEntry:
        entry: TarEntry = new(TarEntry)
        s_path(entry, path)
        s_type(entry, etype)
        s_mode(entry, mode)
        s_uid(entry, uid)
        s_gid(entry, gid)
        s_size(entry, size)
        s_mtime(entry, mtime_ns)
        s_link(entry, linkname)
        s_major(entry, devmajor)
        s_minor(entry, devminor)
        s_xattrs(entry, xattrs)
        s_offset(entry, data_offset)
        s_sparse(entry, sparse)
        s_uname(entry, uname)
        s_gname(entry, gname)
        s_bookkeeping(entry, False)
        return entry

    return new_entry


_new_entry = _entry_factory()
# The same, for other readers of tar metadata (imagefs.layers.toc): positional,
# in TarEntry's field order, ``bookkeeping`` False.
new_entry = _new_entry


class _FieldError(Exception):
    """A malformed field; the scanner adds the member context and raises TarFormatError."""


class _Header(NamedTuple):
    """The fields of one 512-byte header, decoded but not yet combined with extensions."""

    name: bytes  # prefix/name for ustar
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int  # seconds
    typeflag: int
    linkname: bytes
    uname: bytes
    gname: bytes
    devmajor: int
    devminor: int


def scan_tar(stream: LayerStream, warn: Callable[[str], None]) -> Iterator[TarEntry]:
    """Yield one :class:`TarEntry` per member of the tar in ``stream``, in order.

    Reads headers sequentially from ``stream.tell()`` on and skips member data
    with ``stream.skip``; ``data_offset`` values are absolute positions in the
    stream. ``warn`` receives one-line messages about oddities that do not
    stop the scan (unknown typeflags, a missing end-of-archive marker...).
    Raises :class:`TarFormatError` for a corrupt or truncated archive. Blocks
    while reading the stream.
    """
    return _Scanner(stream, warn).scan()


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated string field (the whole field if it has no NUL)."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _field_repr(raw: bytes) -> str:
    return repr(raw if len(raw) <= 40 else raw[:40] + b"...")


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 binary.

    Octal may be padded with leading spaces and ends at a NUL or space, as
    GNU tar and POSIX writers produce; an empty field reads as 0 (as Python's
    tarfile does). Base-256 (GNU tar manual, "Basic Tar Format"): the first
    byte has its top bit set; ``0x80`` means (256**n)/2 + N, and a set second
    bit (``0xff``) makes the field a two's complement negative number.
    """
    first = field[0]
    if first & 0x80:
        value = int.from_bytes(field, "big", signed=True)
        if not first & 0x40:
            value += 1 << (8 * len(field) - 1)
        return value
    digits = _cstr(field).strip(b" ")
    if digits.translate(None, _OCTAL_DIGITS):
        raise _FieldError(f"{what} field {_field_repr(field)} is not an octal number")
    return int(digits, 8) if digits else 0


def _bounded(value: int, what: str, limit: int) -> int:
    if value < 0:
        raise _FieldError(f"negative {what} {value}")
    if value > limit:
        raise _FieldError(f"{what} {value} is too large")
    return value


def _pax_number(value: bytes, what: str, limit: int) -> int:
    """A pax decimal value (POSIX: "decimal number" for size, uid, gid...)."""
    match = _PAX_DECIMAL.fullmatch(value)
    if match is None:
        raise _FieldError(f"pax {what} value {_field_repr(value)} is not a decimal number")
    return _bounded(int(match[1]), what, limit)


def _pax_time_ns(value: bytes) -> int:
    """A pax time ("seconds[.fraction]", maybe negative) in nanoseconds, exactly.

    Parsed as decimal text, never through float, so sub-second mtimes survive
    exactly; digits beyond nanoseconds are dropped rounding toward minus
    infinity (the value lies in the nanosecond it names).
    """
    match = _PAX_TIME.fullmatch(value)
    if match is None:
        raise _FieldError(f"pax mtime value {_field_repr(value)} is not a decimal time")
    negative, seconds, fraction = match.groups()
    fraction = fraction or b""
    ns = int(seconds) * NS + int(fraction[:9].ljust(9, b"0"))
    if negative:
        if fraction[9:].strip(b"0"):
            ns += 1
        ns = -ns
    return ns


def _parse_pax(payload: bytes) -> list[tuple[bytes, bytes]]:
    """The records of a pax extended header, in order.

    POSIX: each record is ``"%d %s=%s\\n" % (length, keyword, value)`` where
    length counts the whole record, itself included. The value may hold any
    byte, so the length is the only framing; it must land on the newline.
    Like Python's tarfile, a NUL where a record would start ends the list.
    """
    records: list[tuple[bytes, bytes]] = []
    pos = 0
    end = len(payload)
    while pos < end and payload[pos] != 0:
        space = payload.find(b" ", pos, pos + 21)
        digits = payload[pos:space] if space > pos else payload[pos : pos + 21]
        if space <= pos or not digits.isdigit():  # bytes.isdigit(): ASCII digits only
            raise _FieldError(
                f"pax record at byte {pos} has no valid length ({_field_repr(digits)})"
            )
        length = int(digits)
        record_end = pos + length
        # The shortest record is "N k=\n": digits, space, keyword, '=', newline.
        if length < len(digits) + 4 or record_end > end or payload[record_end - 1] != 0x0A:
            raise _FieldError(f"pax record at byte {pos} has a bogus length {length}")
        equals = payload.find(b"=", space + 1, record_end - 1)
        if equals <= space + 1:
            raise _FieldError(f"pax record at byte {pos} has no keyword=value")
        records.append((payload[space + 1 : equals], payload[equals + 1 : record_end - 1]))
        pos = record_end
    return records


def _is_xattr(keyword: bytes) -> bool:
    return keyword.startswith((_XATTR_PREFIX, _LIBARCHIVE_XATTR_PREFIX))


def _verify_checksum(block: bytes) -> None:
    """Check the header checksum; raise _FieldError on a mismatch.

    POSIX: the sum of all header bytes as unsigned chars, the checksum field
    itself counted as eight spaces. Some old tars summed signed chars; GNU tar
    accepts either, and so do we.
    """
    stored = _number(block[148:156], "checksum")
    unsigned = _byte_sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return
    high = len(block[:148].translate(None, _ASCII)) + len(block[156:].translate(None, _ASCII))
    if stored == unsigned - 256 * high:
        return
    raise _FieldError(f"header checksum mismatch (stored {stored:o}, computed {unsigned:o})")


def _byte_sum(block: bytes) -> int:
    """The sum of a block's bytes, computed in C.

    Adler-32's "A" half is 1 + the byte sum, modulo 65521. It cannot wrap
    over 256 bytes (1 + 256 * 255 < 65521), nor over a 512-byte block that
    is all ASCII (1 + 512 * 127 < 65521) - the usual header. Python's
    ``sum(block)`` is several times slower.
    """
    if block.isascii():
        return (zlib.adler32(block) & 0xFFFF) - 1
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _fast_checksum_ok(block: bytes, chksum: bytes) -> bool:
    """Checksum test for a header the fast regex matched: the field counts as 8 spaces."""
    return _byte_sum(block) - sum(chksum) - 32 + 8 * 32 == int(chksum, 8)


def _parse_header(block: bytes, match: re.Match[bytes] | None) -> _Header:
    """Decode any header (ustar, GNU, V7), checking every field.

    ``match`` is the fast regex's match of the block, if any: its fields are
    already validated, so only the checksum is left to check.
    """
    if match is not None:
        name, mode, uid, gid, size, mtime, chksum, uname, gname, prefix = match.groups()
        if _fast_checksum_ok(block, chksum):
            typeflag = block[156]
            if prefix and block[262] == 0:
                name = prefix + b"/" + name
            devmajor = devminor = 0
            if typeflag in _DEVICE_TYPEFLAGS:
                devmajor = int(block[329:336], 8) if block[329] else 0
                devminor = int(block[337:344], 8) if block[337] else 0
            return _Header(
                name,
                int(mode, 8) & 0o7777,
                int(uid, 8),
                int(gid, 8),
                int(size, 8),
                int(mtime, 8),
                typeflag,
                _cstr(block[157:257]),
                uname,
                gname,
                devmajor,
                devminor,
            )
    _verify_checksum(block)
    typeflag = block[156]
    magic = block[257:265]
    posix = magic[:6] == b"ustar\0"
    # GNU tar treats any magic it does not recognise as V7; so do we.
    v7 = not posix and magic != b"ustar  \0"
    name = _cstr(block[:100])
    if posix:
        prefix = _cstr(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    devmajor = devminor = 0
    if typeflag in _DEVICE_TYPEFLAGS and not v7:
        devmajor = _bounded(_number(block[329:337], "devmajor"), "devmajor", MAX_ID)
        devminor = _bounded(_number(block[337:345], "devminor"), "devminor", MAX_ID)
    return _Header(
        name=name,
        # Some old tars store the file type bits in mode too; keep permissions only.
        mode=_bounded(_number(block[100:108], "mode"), "mode", MAX_SIZE) & 0o7777,
        uid=_bounded(_number(block[108:116], "uid"), "uid", MAX_ID),
        gid=_bounded(_number(block[116:124], "gid"), "gid", MAX_ID),
        size=_bounded(_number(block[124:136], "size"), "size", MAX_SIZE),
        mtime=_number(block[136:148], "mtime"),
        typeflag=typeflag,
        linkname=_cstr(block[157:257]),
        uname=b"" if v7 else _cstr(block[265:297]),
        gname=b"" if v7 else _cstr(block[297:329]),
        devmajor=devmajor,
        devminor=devminor,
    )


def _old_gnu_sparse_slots(
    block: bytes, start: int, count: int, into: list[tuple[int, int]]
) -> bool:
    """Append the (offset, numbytes) slots of an old GNU sparse array.

    GNU tar (sparse.c, oldgnu_add_sparse) ends the map at the first slot whose
    numbytes field starts with NUL. Returns False once the map has ended.
    """
    for pos in range(start, start + 24 * count, 24):
        if block[pos + 12] == 0:
            return False
        offset = _bounded(
            _number(block[pos : pos + 12], "sparse offset"), "sparse offset", MAX_SIZE
        )
        length = _bounded(
            _number(block[pos + 12 : pos + 24], "sparse numbytes"), "sparse numbytes", MAX_SIZE
        )
        into.append((offset, length))
    return True


def _pairs(numbers: list[int], what: str) -> list[tuple[int, int]]:
    if len(numbers) % 2:
        raise _FieldError(f"{what} has an odd number of values")
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _check_sparse(
    segments: list[tuple[int, int]], real_size: int, stored: int
) -> tuple[tuple[int, int], ...]:
    """Validate a sparse map against the file's real size and its stored bytes.

    Segments must be in ascending order, not overlap, lie within the file, and
    add up to exactly the bytes stored in the archive (GNU tar writes them so;
    the content reader depends on it). Empty segments (GNU tar ends a map that
    finishes in a hole with one at the file's end) carry no data and are dropped.
    """
    kept: list[tuple[int, int]] = []
    end = 0
    total = 0
    for offset, length in segments:
        if offset + length > real_size:
            raise _FieldError(
                f"sparse segment ({offset}, {length}) lies beyond the file size {real_size}"
            )
        if not length:
            continue
        if offset < end:
            raise _FieldError(f"sparse segment ({offset}, {length}) is out of order or overlaps")
        kept.append((offset, length))
        end = offset + length
        total += length
    if total != stored:
        raise _FieldError(f"sparse map covers {total} bytes but {stored} are stored")
    return tuple(kept)


class _Scanner:
    """State of one scan: stream position and extension headers pending for the next member."""

    def __init__(self, stream: LayerStream, warn: Callable[[str], None]) -> None:
        self.stream = stream
        self.warn = warn
        self.pos = stream.tell()
        # Extension headers seen since the last member, and where the first began.
        self.long_name: bytes | None = None
        self.long_link: bytes | None = None
        self.pax: dict[bytes, bytes] | None = None
        # GNU sparse 0.0 repeats its offset/numbytes keywords: all of them, in order.
        self.sparse00: list[tuple[bytes, bytes]] = []
        self.pending_at = -1
        self.pending_bytes = 0
        self.special = False  # the pending pax records include xattrs or sparse keywords
        self.globals: dict[bytes, bytes] = {}
        self.globals_bytes = 0
        self.globals_special = False  # global records include xattrs
        # Set by skip_data(): the member whose last data byte comes with the next
        # header, and how much of what was skipped for it is padding.
        self.tail: str | None = None
        self.tail_padding = 0
        # Decoded user and group names, shared between entries (saves memory).
        self.names: dict[bytes, str] = {}

    def scan(self) -> Iterator[TarEntry]:
        # The hot loop keeps everything in locals, and the fast path (a plain
        # member header, possibly after GNU long names) is inline.
        read = self.stream.read
        skip = self.stream.skip
        fast_match = _FAST_HEADER.match
        adler32 = zlib.adler32
        member_types = _MEMBER_TYPES
        names = self.names
        entry = _new_entry
        directory = EntryType.DIRECTORY
        symlink = EntryType.SYMLINK
        ns = NS
        pos = self.pos
        pax_pending = False  # pax 'x' or 'g' values apply: the general path builds the entry
        long_pending = False  # only GNU long names apply: the fast path can still build it
        tail: str | None = None  # the member whose last data byte is read with the header
        tail_at = 0
        tail_padding = 0  # how many of the bytes skipped for it were padding
        while True:
            header_at = pos
            if tail is None:
                block = read(BLOCK)
            else:
                block = read(BLOCK + 1)
                if not block:
                    self.cut_in_tail(tail, tail_at, pos, tail_padding)
                    return
                block = block[1:]
                tail = None
            if len(block) != BLOCK:
                if block:
                    raise TarFormatError(
                        f"tar header at offset {header_at}: truncated "
                        f"({len(block)} of {BLOCK} bytes before the end of the stream)"
                    )
                self.end(header_at, MISSING_END_MARKER)
                return
            pos += BLOCK
            match = fast_match(block)
            kind = member_types.get(block[156])
            if match is not None and kind is not None and not pax_pending:
                name, mode, uid, gid, size, mtime, chksum, uname, gname, prefix = match.groups()
                # Byte sum via Adler-32 (see _byte_sum); the checksum field
                # (six digits, NUL, space) counts as eight spaces.
                if block.isascii():
                    total = (adler32(block) & 0xFFFF) - 1
                else:
                    total = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
                if total - sum(chksum) + 224 == int(chksum, 8):
                    etype, has_data, extra = kind
                    if prefix and block[262] == 0:  # "ustar\0": POSIX, so a real prefix
                        name = prefix + b"/" + name
                    linkname = ""
                    devmajor = devminor = 0
                    if long_pending:
                        name = self.long_name or name
                        if extra == _LINK:
                            linkname = _decode(self.long_link or _cstr(block[157:257]))
                        self.clear_pending()
                        long_pending = False
                    elif extra == _LINK:
                        linkname = _decode(_cstr(block[157:257]))
                    if extra == _DEVICE:
                        devmajor = int(block[329:336], 8) if block[329] else 0
                        devminor = int(block[337:344], 8) if block[337] else 0
                    elif has_data and not block[156] and name.endswith(b"/"):
                        etype = directory  # V7 convention, as tarfile and Go read it
                        has_data = False
                    path = name.decode("utf-8", "surrogateescape")
                    uname_s = names.get(uname)
                    if uname_s is None:
                        uname_s = self.name(uname)
                    gname_s = names.get(gname)
                    if gname_s is None:
                        gname_s = self.name(gname)
                    size_i = int(size, 8) if has_data else 0
                    yield entry(
                        path,
                        etype,
                        # lstat(2) of any symlink on Linux gives 0777 (and so do
                        # overlayfs and umoci), whatever the header says (Bazel
                        # writes 0755).
                        0o777 if etype is symlink else int(mode, 8) & 0o7777,
                        int(uid, 8),
                        int(gid, 8),
                        size_i,
                        int(mtime, 8) * ns,
                        linkname,
                        devmajor,
                        devminor,
                        (),
                        pos,
                        None,
                        uname_s,
                        gname_s,
                    )
                    if size_i:
                        padded = (size_i + BLOCK - 1) & -BLOCK
                        skip(padded - 1)
                        pos += padded
                        tail = path
                        tail_at = header_at
                        tail_padding = padded - size_i
                    continue
            if match is None and block == _ZERO_BLOCK:
                self.end_marker(header_at)
                return
            self.pos = pos
            self.tail = None
            result = self.general(block, match, header_at)
            pos = self.pos
            tail = self.tail
            tail_at = header_at
            tail_padding = self.tail_padding
            pax_pending = self.pax is not None or bool(self.globals)
            long_pending = self.long_name is not None or self.long_link is not None
            if result is not None:
                yield result

    def name(self, raw: bytes) -> str:
        """A user or group name, decoded once and shared by the entries that use it."""
        decoded = self.names.get(raw)
        if decoded is None:
            decoded = _decode(raw)
            if len(self.names) < 4096:  # hostile input may use a new name every member
                self.names[raw] = decoded
        return decoded

    def cut_in_tail(self, name: str, header_at: int, next_header: int, padding: int) -> None:
        """The stream ended after member ``name``'s last header, before the next one.

        If its data is all there and only (some of) its padding is missing,
        the archive is whole but for the end-of-archive marker: umoci 0.4.7's
        ``insert`` writes such layers, and umoci, containerd and Go's
        archive/tar read them. Taken with one warning. Data cut short is an
        error: the member's bytes are not all there.
        """
        data_end = next_header - padding
        reached = self.stream.tell()
        if reached >= data_end:
            self.end(
                next_header - BLOCK,
                f"the stream ends inside the padding after member {name!r} "
                f"({next_header - reached} of {padding} padding bytes missing), "
                "without an end-of-archive marker",
            )
            return
        raise TarFormatError(
            f"tar member {name!r} (header at offset {header_at}): truncated data, "
            f"the stream ends at offset {reached}, before its data ends at {data_end}"
        )

    def end_marker(self, at: int) -> None:
        """A zero block: the end of the archive, whatever follows it.

        POSIX ends an archive with two zero blocks. A lone zero block followed
        by a header is reported and still taken as the end, as GNU tar does
        (list.c: "A lone zero block at %s"); a zero block followed by the end
        of the stream is a complete archive.
        """
        after = self.stream.read(BLOCK)
        if len(after) == BLOCK and after != _ZERO_BLOCK:
            self.end(at, "a lone zero block ends the archive (data after it is ignored)")
        else:
            self.end(at, None)

    def end(self, at: int, problem: str | None) -> None:
        if problem is not None:
            self.warn(f"tar stream at offset {at}: {problem}")
        if self.pending_at >= 0:
            self.warn(
                f"tar extension header at offset {self.pending_at} applies to no member: "
                "the archive ends after it"
            )

    def context(self, header: _Header | None, block: bytes, at: int) -> str:
        """How an error message names a header: the member's best-known name, its offset."""
        kind = _EXTENSION_NAMES.get(block[156])
        if kind is not None:
            return f"tar {kind} at offset {at}"
        raw = None
        if self.pax is not None:
            raw = self.pax.get(b"GNU.sparse.name") or self.pax.get(b"path")
        if not raw:
            raw = self.long_name or (header.name if header is not None else _cstr(block[:100]))
        if raw:
            return f"tar member {_decode(raw)!r} (header at offset {at})"
        return f"tar header at offset {at}"

    def general(self, block: bytes, match: re.Match[bytes] | None, at: int) -> TarEntry | None:
        """Any header the fast path did not take: extensions, odd formats, errors."""
        header = None
        try:
            typeflag = block[156]
            what = _EXTENSION_NAMES.get(typeflag)
            if what is not None:
                # Only the checksum and size of an extension header matter.
                if match is not None and _fast_checksum_ok(block, match[7]):
                    size = int(match[5], 8)
                else:
                    size = _parse_header(block, None).size
                if typeflag == _GLOBAL_TYPEFLAG:
                    self.add_global(self.payload(size, at, what, attached=False))
                elif typeflag == _LONGNAME_TYPEFLAG:
                    self.long_name = _cstr(self.payload(size, at, what))
                elif typeflag == _LONGLINK_TYPEFLAG:
                    self.long_link = _cstr(self.payload(size, at, what))
                else:
                    self.add_pax(self.payload(size, at, what))
                return None
            header = _parse_header(block, match)
            if typeflag in _SKIPPED_TYPEFLAGS:
                skipped = _SKIPPED_TYPEFLAGS[typeflag]
                self.warn(f"{self.context(header, block, at)}: GNU {skipped} skipped")
                self.skip_data(self.pax_size(header), _decode(header.name))
                self.clear_pending()
                return None
            return self.member(header, block, at)
        except _FieldError as exc:
            raise TarFormatError(f"{self.context(header, block, at)}: {exc}") from None

    def payload(self, size: int, at: int, what: str, *, attached: bool = True) -> bytes:
        """Read an extension header's data (pax records, a GNU long name), bounded.

        ``attached`` payloads belong to the next member and count towards the
        limit on what may be pending before it.
        """
        if size > MAX_EXTENSION:
            raise _FieldError(f"{what} of {size} bytes exceeds the {MAX_EXTENSION} byte limit")
        if attached:
            if self.pending_at < 0:
                self.pending_at = at
            self.pending_bytes += size
            if self.pending_bytes > MAX_EXTENSION:
                raise _FieldError(
                    f"extension headers before one member exceed {MAX_EXTENSION} bytes"
                )
        padded = (size + BLOCK - 1) & -BLOCK
        data = self.stream.read(padded)
        if len(data) != padded:
            raise _FieldError(f"truncated {what}: the stream ends inside it")
        self.pos += padded
        return data[:size]

    def add_pax(self, payload: bytes) -> None:
        records = _parse_pax(payload)
        if self.pax is None:
            self.pax = {}
        for keyword, value in records:
            self.pax[keyword] = value
            if keyword.startswith(_SPECIAL_PREFIXES):
                self.special = True  # xattrs or GNU sparse keywords: member() looks closer
                if keyword in (_SPARSE_OFFSET, _SPARSE_NUMBYTES):
                    # GNU sparse 0.0 repeats these two keywords, one pair per
                    # segment (GNU tar manual, "PAX Format, Versions 0.0 and
                    # 0.1"): the order matters, so they are kept as a list.
                    self.sparse00.append((keyword, value))

    def add_global(self, payload: bytes) -> None:
        """A 'g' header: its records apply to every following member (POSIX).

        An empty value deletes the keyword. GNU sparse keywords describe one
        file and mean nothing globally; they are ignored here.
        """
        for keyword, value in _parse_pax(payload):
            if keyword.startswith(b"GNU.sparse."):
                continue
            old = self.globals.pop(keyword, None)
            if old is not None:
                self.globals_bytes -= len(keyword) + len(old)
            if value or _is_xattr(keyword):
                self.globals[keyword] = value
                self.globals_bytes += len(keyword) + len(value)
                self.globals_special = self.globals_special or _is_xattr(keyword)
        if self.globals_bytes > MAX_EXTENSION:
            raise _FieldError(f"pax global headers exceed {MAX_EXTENSION} bytes")

    def clear_pending(self) -> None:
        self.long_name = self.long_link = None
        self.pax = None
        self.special = False
        self.sparse00 = []
        self.pending_at = -1
        self.pending_bytes = 0

    def pax_size(self, header: _Header) -> int:
        if self.pax is not None:
            value = self.pax.get(b"size")
            if value:
                return _pax_number(value, "size", MAX_SIZE)
        if b"size" in self.globals:
            return _pax_number(self.globals[b"size"], "size", MAX_SIZE)
        return header.size

    def skip_data(self, size: int, name: str) -> None:
        """Skip a member's data and padding, keeping its last byte for the next read."""
        if size:
            padded = (size + BLOCK - 1) & -BLOCK
            self.stream.skip(padded - 1)
            self.pos += padded
            self.tail = name
            self.tail_padding = padded - size

    def member(self, header: _Header, block: bytes, at: int) -> TarEntry:
        """Combine a member header with pending extensions into its TarEntry."""
        pax = {**self.globals, **(self.pax or {})} if self.globals else self.pax or {}
        special = self.special or self.globals_special
        sparse00 = self.sparse00
        get = pax.get
        typeflag = header.typeflag
        # Name precedence: GNU.sparse.name (the real name of a 1.0 sparse file,
        # whose header name is a placeholder), pax path, GNU long name, header.
        # An empty pax value means "use the header field" (POSIX).
        raw_name = get(b"GNU.sparse.name") or get(b"path") or self.long_name or header.name
        raw_link = get(b"linkpath") or self.long_link or header.linkname
        kind = _MEMBER_TYPES.get(typeflag)
        if typeflag == _SPARSE_TYPEFLAG:
            kind = _UNKNOWN_TYPE
        elif kind is None:
            kind = _UNKNOWN_TYPE
            self.warn(
                f"{self.context(header, block, at)}: unknown typeflag {chr(typeflag)!r}, "
                "treated as a regular file (POSIX)"
            )
        etype, has_data, extra = kind
        if typeflag == 0 and raw_name.endswith(b"/"):
            etype, has_data, extra = EntryType.DIRECTORY, False, _PLAIN
        path = _decode(raw_name)

        value = get(b"size")
        stored = _pax_number(value, "size", MAX_SIZE) if value else header.size
        value = get(b"uid")
        uid = _pax_number(value, "uid", MAX_ID) if value else header.uid
        value = get(b"gid")
        gid = _pax_number(value, "gid", MAX_ID) if value else header.gid
        value = get(b"mtime")
        mtime_ns = _pax_time_ns(value) if value else header.mtime * NS
        if not MIN_TIME_NS <= mtime_ns <= MAX_TIME_NS:
            self.warn(f"{self.context(header, block, at)}: mtime out of range, clamped")
            mtime_ns = max(MIN_TIME_NS, min(MAX_TIME_NS, mtime_ns))
        devmajor = devminor = 0
        if extra == _DEVICE:
            value = get(b"SCHILY.devmajor")
            devmajor = _pax_number(value, "devmajor", MAX_ID) if value else header.devmajor
            value = get(b"SCHILY.devminor")
            devminor = _pax_number(value, "devminor", MAX_ID) if value else header.devminor
        value = get(b"uname")
        uname = self.name(value) if value else self.name(header.uname)
        value = get(b"gname")
        gname = self.name(value) if value else self.name(header.gname)
        xattrs = self.xattrs(pax, header, block, at) if special else ()

        if not has_data:
            stored = 0
        size = stored
        sparse = None
        if typeflag == _SPARSE_TYPEFLAG:
            segments, size = self.old_gnu_sparse(block)
            sparse = _check_sparse(segments, size, stored)
        elif special and etype is EntryType.FILE and any(key in pax for key in _SPARSE_KEYS):
            segments, size, map_bytes = self.pax_sparse(pax, sparse00, stored)
            sparse = _check_sparse(segments, size, stored - map_bytes)
            stored -= map_bytes
        data_offset = self.pos
        self.clear_pending()
        self.skip_data(stored, path)
        return _new_entry(
            path,
            etype,
            0o777 if etype is EntryType.SYMLINK else header.mode,  # as lstat(2) shows it
            uid,
            gid,
            size,
            mtime_ns,
            _decode(raw_link) if extra == _LINK else "",
            devmajor,
            devminor,
            xattrs,
            data_offset,
            sparse,
            uname,
            gname,
        )

    def xattrs(
        self, pax: dict[bytes, bytes], header: _Header, block: bytes, at: int
    ) -> tuple[tuple[str, bytes], ...]:
        """Extended attributes from pax keywords, in order of first appearance.

        ``SCHILY.xattr.NAME=VALUE`` (star, GNU tar, Go): the value is the raw
        attribute bytes. ``LIBARCHIVE.xattr.NAME=VALUE`` (bsdtar): NAME is
        URL-encoded and VALUE base64 without padding; bsdtar writes both forms
        for the same attribute, which then collapse to one.
        """
        found: dict[str, bytes] = {}
        for keyword, value in pax.items():
            if keyword.startswith(_XATTR_PREFIX):
                found[_decode(keyword[len(_XATTR_PREFIX) :])] = value
            elif keyword.startswith(_LIBARCHIVE_XATTR_PREFIX):
                name = _decode(unquote_to_bytes(keyword[len(_LIBARCHIVE_XATTR_PREFIX) :]))
                try:
                    found[name] = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
                except (binascii.Error, ValueError):
                    self.warn(
                        f"{self.context(header, block, at)}: xattr {name!r} has an invalid "
                        "base64 value; ignored"
                    )
        return tuple(found.items())

    def old_gnu_sparse(self, block: bytes) -> tuple[list[tuple[int, int]], int]:
        """The map of an old GNU sparse member ('S'): header slots plus extension blocks.

        GNU tar manual, "Old GNU Format": four (offset, numbytes) slots at byte
        386, an "isextended" flag at 482 and the real size at 483; while the
        flag is set, another block of 21 slots (flag at byte 504) follows the
        header, before the data.
        """
        segments: list[tuple[int, int]] = []
        more = _old_gnu_sparse_slots(block, 386, 4, segments)
        real_size = _bounded(_number(block[483:495], "sparse real size"), "real size", MAX_SIZE)
        extended = block[482]
        blocks = 0
        while extended:
            blocks += 1
            if blocks * BLOCK > MAX_EXTENSION:
                raise _FieldError(f"GNU sparse extension headers exceed {MAX_EXTENSION} bytes")
            ext = self.stream.read(BLOCK)
            if len(ext) != BLOCK:
                raise _FieldError(
                    "truncated GNU sparse extension header: the stream ends inside it"
                )
            self.pos += BLOCK
            if more:
                more = _old_gnu_sparse_slots(ext, 0, 21, segments)
            extended = ext[504]
        return segments, real_size

    def pax_sparse(
        self, pax: dict[bytes, bytes], sparse00: list[tuple[bytes, bytes]], stored: int
    ) -> tuple[list[tuple[int, int]], int, int]:
        """The map of a pax GNU sparse file: (segments, real size, map bytes in the data).

        GNU tar manual, "Storing Sparse Files":
        0.0 - ``GNU.sparse.size`` is the real size, the segments are repeated
        ``GNU.sparse.offset``/``GNU.sparse.numbytes`` pairs;
        0.1 - the same size, the segments as ``GNU.sparse.map=o,n,o,n...``;
        1.0 - ``GNU.sparse.major=1``, ``minor=0``, ``GNU.sparse.realsize``, and
        the map is text at the start of the member data ("count\\n" then
        "offset\\nnumbytes\\n" per segment), padded with NULs to a block.
        """
        major = pax.get(b"GNU.sparse.major")
        minor = pax.get(b"GNU.sparse.minor")
        if major is not None and (major, minor) not in _SPARSE_VERSIONS:
            raise _FieldError(
                f"unsupported GNU sparse format {_decode(major)}.{_decode(minor or b'?')}"
            )
        if major == b"1":
            value = pax.get(b"GNU.sparse.realsize") or pax.get(b"GNU.sparse.size")
            if not value:
                raise _FieldError("GNU sparse 1.0 member without GNU.sparse.realsize")
            real_size = _pax_number(value, "GNU.sparse.realsize", MAX_SIZE)
            numbers, map_bytes = self.sparse10_map(stored)
            return _pairs(numbers, "GNU sparse 1.0 map"), real_size, map_bytes
        real_size = _pax_number(pax.get(b"GNU.sparse.size", b""), "GNU.sparse.size", MAX_SIZE)
        if b"GNU.sparse.map" in pax:
            text = pax[b"GNU.sparse.map"]
            numbers = (
                [_pax_number(item, "GNU.sparse.map", MAX_SIZE) for item in text.split(b",")]
                if text
                else []
            )
            segments = _pairs(numbers, "GNU.sparse.map")
        else:
            offsets = [
                _pax_number(value, "GNU.sparse.offset", MAX_SIZE)
                for keyword, value in sparse00
                if keyword == _SPARSE_OFFSET
            ]
            lengths = [
                _pax_number(value, "GNU.sparse.numbytes", MAX_SIZE)
                for keyword, value in sparse00
                if keyword == _SPARSE_NUMBYTES
            ]
            if len(offsets) != len(lengths):
                raise _FieldError("GNU.sparse.offset and GNU.sparse.numbytes do not pair up")
            segments = list(zip(offsets, lengths, strict=True))
        value = pax.get(b"GNU.sparse.numblocks")
        if value and _pax_number(value, "GNU.sparse.numblocks", MAX_SIZE) != len(segments):
            raise _FieldError(
                f"GNU.sparse.numblocks is {_decode(value)} but the map has {len(segments)}"
            )
        return segments, real_size, 0

    def sparse10_map(self, stored: int) -> tuple[list[int], int]:
        """Read a GNU sparse 1.0 map from the data area: (numbers, bytes it occupies)."""
        # GNU tar counts the map, padded to a block, in the member's size.
        limit = min(MAX_EXTENSION, stored)
        chunks: list[bytes] = []
        newlines = 0
        needed = -1
        while needed < 0 or newlines < needed:
            if (len(chunks) + 1) * BLOCK > limit:
                raise _FieldError("GNU sparse 1.0 map is too large or runs past the member data")
            chunk = self.stream.read(BLOCK)
            if len(chunk) != BLOCK:
                raise _FieldError("truncated data: the stream ends inside the GNU sparse 1.0 map")
            self.pos += BLOCK
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
            if needed < 0 and newlines:
                text = b"".join(chunks)
                count = _pax_number(text[: text.index(b"\n")], "sparse map count", MAX_EXTENSION)
                needed = 1 + 2 * count
        lines = b"".join(chunks).split(b"\n", needed)
        numbers = [_pax_number(line, "sparse map entry", MAX_SIZE) for line in lines[1:needed]]
        return numbers, len(chunks) * BLOCK
