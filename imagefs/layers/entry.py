"""One tar entry of a layer, as the tar scanner reports it.

The scanner decodes headers (ustar, GNU, PAX) but does not interpret paths:
``path`` is the raw member name decoded with ``os.fsdecode`` semantics
(UTF-8, ``surrogateescape``), and the overlay merge cleans and checks it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EntryType(enum.IntEnum):
    FILE = 0
    DIRECTORY = 1
    SYMLINK = 2
    HARDLINK = 3
    CHAR_DEVICE = 4
    BLOCK_DEVICE = 5
    FIFO = 6


@dataclass(frozen=True, slots=True)
class TarEntry:
    """A member of a layer tar.

    ``data_offset`` is where the member's data starts in the *uncompressed*
    layer stream. For sparse files ``sparse`` lists ``(offset_in_file, length)``
    data segments stored back to back from ``data_offset``; holes read as
    zeros and ``size`` is the file's full (logical) size. For non-sparse files
    ``sparse`` is None and the data is ``size`` contiguous bytes. For a layer
    indexed from its table of contents (:mod:`imagefs.layers.toc`),
    ``data_offset`` is in the TOC's data space instead (``TOC_DATA_BASE`` and
    up, see :mod:`imagefs.layers.toc.model`); the layer's reader serves both.

    ``bookkeeping`` marks an entry that the layer's format adds and that is
    not image content: eStargz's ``stargz.index.json`` and prefetch
    landmarks (:mod:`imagefs.layers.toc.bookkeeping`). The merged tree leaves
    it out; the layer's own view (``--layers``' ``layers/N``) shows it.
    """

    path: str
    type: EntryType
    mode: int  # permission bits including setuid/setgid/sticky (mask 0o7777)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""  # symlink target verbatim, or hardlink target member name
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    data_offset: int = 0
    sparse: tuple[tuple[int, int], ...] | None = None
    uname: str = ""
    gname: str = ""
    bookkeeping: bool = False
