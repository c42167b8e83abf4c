"""Hand-crafted raw tar bytes for parser tests: headers field by field, pax records.

Real writers (GNU tar, Python's tarfile) never produce broken or exotic
archives, so the tests that need one build it here, one 512-byte header at a
time. Numeric fields given as ``int`` are written the canonical way (zero
padded octal, NUL terminated); ``raw`` overrides any field with exact bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

BLOCK = 512
USTAR_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"
V7_MAGIC = bytes(8)

# name -> (offset, width), POSIX ustar layout (magic includes the version).
FIELDS: dict[str, tuple[int, int]] = {
    "name": (0, 100),
    "mode": (100, 8),
    "uid": (108, 8),
    "gid": (116, 8),
    "size": (124, 12),
    "mtime": (136, 12),
    "chksum": (148, 8),
    "typeflag": (156, 1),
    "linkname": (157, 100),
    "magic": (257, 8),
    "uname": (265, 32),
    "gname": (297, 32),
    "devmajor": (329, 8),
    "devminor": (337, 8),
    "prefix": (345, 155),
}


def octal(value: int, width: int) -> bytes:
    """Zero-padded octal digits and a NUL: what GNU tar, Go and tarfile write."""
    return b"%0*o\0" % (width - 1, value)


def base256(value: int, width: int) -> bytes:
    """GNU base-256: two's complement, top bit set (0x80... positive, 0xff... negative)."""
    if value >= 0:
        raw = bytearray(value.to_bytes(width, "big"))
        raw[0] |= 0x80
        return bytes(raw)
    return (value + (1 << (8 * width))).to_bytes(width, "big")


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def put(block: bytearray, field: str, value: bytes) -> None:
    offset, width = FIELDS[field]
    if len(value) > width:
        raise ValueError(f"{field} value {value!r} is wider than {width}")
    block[offset : offset + width] = value.ljust(width, b"\0")


def header_sum(block: bytes | bytearray, *, signed: bool = False) -> int:
    """The header checksum, the checksum field counted as spaces."""
    data = bytes(block[:148]) + b" " * 8 + bytes(block[156:])
    if signed:
        return sum(b - 256 if b >= 128 else b for b in data)
    return sum(data)


def set_checksum(block: bytearray, value: int | None = None, *, signed: bool = False) -> None:
    """Write the checksum (computed unless given) as GNU tar does: six digits, NUL, space."""
    if value is None:
        value = header_sum(block, signed=signed)
    block[148:156] = b"%06o\0 " % (value & 0o777777)


def header(
    name: bytes = b"file",
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_600_000_000,
    linkname: bytes = b"",
    magic: bytes = USTAR_MAGIC,
    uname: bytes = b"root",
    gname: bytes = b"root",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: bytes = b"",
    raw: Mapping[str, bytes] | None = None,
    signed_checksum: bool = False,
) -> bytes:
    """One 512-byte header with a valid checksum (computed after ``raw`` overrides)."""
    block = bytearray(BLOCK)
    put(block, "name", name)
    put(block, "mode", octal(mode, 8))
    put(block, "uid", octal(uid, 8))
    put(block, "gid", octal(gid, 8))
    put(block, "size", octal(size, 12))
    put(block, "mtime", octal(mtime, 12))
    put(block, "typeflag", typeflag)
    put(block, "linkname", linkname)
    put(block, "magic", magic)
    if magic != V7_MAGIC:
        put(block, "uname", uname)
        put(block, "gname", gname)
        put(block, "devmajor", octal(devmajor, 8))
        put(block, "devminor", octal(devminor, 8))
        put(block, "prefix", prefix)
    for field, value in (raw or {}).items():
        put(block, field, value)
    set_checksum(block, signed=signed_checksum)
    return bytes(block)


def member(name: bytes = b"file", data: bytes = b"", **fields: Any) -> bytes:
    """A header plus its data, padded to whole blocks."""
    return header(name, size=len(data), **fields) + pad(data)


def pax_record(keyword: bytes, value: bytes) -> bytes:
    """One ``"%d %s=%s\\n"`` record, the length counting itself (POSIX pax)."""
    body = b" " + keyword + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax_payload(records: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(pax_record(keyword, value) for keyword, value in records)


def extension(payload: bytes, typeflag: bytes = b"x", name: bytes = b"PaxHeader") -> bytes:
    """An extension header ('x', 'g', 'L', 'K') carrying ``payload``."""
    return header(name, typeflag=typeflag, size=len(payload)) + pad(payload)


def pax(records: Iterable[tuple[bytes, bytes]], typeflag: bytes = b"x") -> bytes:
    return extension(pax_payload(records), typeflag)


def end() -> bytes:
    """The end-of-archive marker: two zero blocks."""
    return bytes(2 * BLOCK)
