"""eStargz: the footer that locates the TOC, and the TOC's own gzip member.

An eStargz blob (stargz-snapshotter ``estargz/``; written by BuildKit with
``estargz=true``, ctr-remote, kaniko, ko, go-containerregistry) is a gzip
stream of many members that decompresses to an ordinary layer tar::

    [member: headers + data of the first files] ... [member: a chunk] ...
    [TOC member: tar of "stargz.index.json" + end-of-archive] [footer]

Each regular file's data starts a new member (a big file one member per
chunk, 4 MiB by default), so it can be decoded on its own; the member also
holds the tar padding and the headers that follow, until the next file's data.

The footer (``estargz/types.go``, ``FooterSize``) is an empty gzip member of
51 bytes whose header has an extra field: subfield ``SG``, 22 bytes,
``"%016xSTARGZ" % toc_offset``. Original stargz (the "legacy" footer, 47
bytes) put those 22 bytes in the extra field without a subfield header. The
TOC member decompresses to a tar whose first entry is ``stargz.index.json``,
the TOC JSON; the ``containerd.io/snapshot/stargz/toc.digest`` layer
annotation is the sha256 of that JSON (``gzip.go``, ``WriteTOCAndFooter``).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from imagefs.errors import TarFormatError, TocError
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.toc.limits import MAX_TOC_BYTES, NotServable

__all__ = [
    "FOOTER_SIZE",
    "LEGACY_FOOTER_SIZE",
    "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME",
    "EstargzFooter",
    "decode_toc_member",
    "parse_footer",
]

TOC_TAR_NAME = "stargz.index.json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47

# ID1 ID2, CM=8 (deflate), FLG=FEXTRA only: the footer has a fixed layout.
_GZIP_FEXTRA = b"\x1f\x8b\x08\x04"
_U16 = struct.Struct("<H")
_SUBFIELD = b"SG"
_MAGIC = b"STARGZ"
_HEX16 = re.compile(rb"[0-9a-fA-F]{16}")
# What the tar in the TOC member may hold before the JSON: its header, and
# pax or GNU long-name extensions (the tar scanner's own bound), rounded up.
_TOC_HEADERS = (1 << 20) + 4 * 512


@dataclass(frozen=True, slots=True)
class EstargzFooter:
    """Where the TOC member starts, and how long the footer after it is."""

    toc_offset: int
    size: int  # FOOTER_SIZE, or LEGACY_FOOTER_SIZE


def parse_footer(tail: bytes, where: str) -> EstargzFooter | None:
    """The eStargz (or legacy stargz) footer at the end of ``tail``; None if there is none.

    ``tail`` holds the blob's last bytes (at least 51 when the blob has
    them). A footer that says ``STARGZ`` but is malformed is a TocError: the
    blob claims to be eStargz and is not.
    """
    for size, extra_at, extra_length, subfield in (
        (FOOTER_SIZE, 12, 26, True),
        (LEGACY_FOOTER_SIZE, 12, 22, False),
    ):
        footer = tail[-size:]
        if len(footer) != size or not footer.startswith(_GZIP_FEXTRA):
            continue
        (xlen,) = _U16.unpack_from(footer, 10)
        extra = footer[extra_at : extra_at + extra_length]
        if xlen != extra_length or not extra.endswith(_MAGIC):
            continue
        if subfield:
            if extra[:2] != _SUBFIELD or _U16.unpack_from(extra, 2)[0] != 22:
                continue
            extra = extra[4:]
        return EstargzFooter(_toc_offset(footer, extra[:16], where), size)
    return None


def _toc_offset(footer: bytes, digits: bytes, where: str) -> int:
    if not _HEX16.fullmatch(digits):
        raise TocError(f"{where}: eStargz footer: TOC offset {digits!r} is not 16 hex digits")
    # The rest must be an empty deflate stream and a gzip trailer of zeros: the
    # footer is a whole, empty gzip member (which is why the blob stays a
    # valid gzip stream).
    decoder = zlib.decompressobj(31)
    try:
        data = decoder.decompress(footer)
    except zlib.error as exc:
        raise TocError(f"{where}: eStargz footer is not a gzip member: {exc}") from exc
    if data or not decoder.eof or decoder.unused_data:
        raise TocError(f"{where}: eStargz footer is not an empty gzip member")
    return int(digits, 16)


def decode_toc_member(
    compressed: bytes, where: str, warn: Callable[[str], None]
) -> tuple[bytes, TarEntry] | NotServable:
    """The TOC JSON in the TOC's gzip member, and the tar entry that holds it.

    The entry is what the tar scanner reports for ``stargz.index.json`` in a
    full decompression of the layer, except ``data_offset``, which is where
    the JSON starts in the *decompressed member*. Untrusted: the caller
    checks the JSON against its digest.
    """
    # Imported on first use, as tree.loader does: a mount served from its
    # persisted tree never parses a tar header.
    from imagefs.layers.tarscan import scan_tar  # noqa: PLC0415

    decoder = zlib.decompressobj(31)
    try:
        data = decoder.decompress(compressed, MAX_TOC_BYTES + _TOC_HEADERS)
    except zlib.error as exc:
        raise TocError(f"{where}: eStargz TOC member is corrupt: {exc}") from exc
    try:
        entry = next(iter(scan_tar(_BytesStream(data), warn)), None)
    except TarFormatError as exc:
        if len(data) >= MAX_TOC_BYTES:
            return NotServable(f"its TOC is over {MAX_TOC_BYTES} bytes")
        raise TocError(f"{where}: eStargz TOC member: {exc}") from exc
    if entry is None or entry.path != TOC_TAR_NAME or entry.type is not EntryType.FILE:
        name = "nothing" if entry is None else repr(entry.path)
        raise TocError(f"{where}: eStargz TOC member holds {name}, not {TOC_TAR_NAME!r}")
    if entry.sparse is not None:
        raise TocError(f"{where}: eStargz TOC {TOC_TAR_NAME!r} is a sparse file")
    if entry.size > MAX_TOC_BYTES:
        return NotServable(f"its TOC is {entry.size} bytes, over {MAX_TOC_BYTES}")
    end = entry.data_offset + entry.size
    if end > len(data):
        raise TocError(
            f"{where}: eStargz TOC member ends after {len(data)} bytes, inside "
            f"{TOC_TAR_NAME!r} ({entry.size} bytes at {entry.data_offset})"
        )
    return data[entry.data_offset : end], entry


class _BytesStream:
    """A LayerStream over bytes in memory (the decompressed TOC member)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int) -> bytes:
        data = self._data[self._pos : self._pos + max(n, 0)]
        self._pos += len(data)
        return data

    def skip(self, n: int) -> None:
        self._pos = min(self._pos + max(n, 0), len(self._data))

    def tell(self) -> int:
        return self._pos
