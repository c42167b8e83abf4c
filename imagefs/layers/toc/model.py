"""A layer's table of contents as plain data, the same for eStargz and zstd:chunked.

Both formats compress every regular file's data (in pieces, "chunks", for
big files) as separate gzip members or zstd frames, and list each file's
metadata and chunks in a JSON table of contents at the end of the blob. A
parsed TOC is a :class:`Toc`: per entry the :class:`~imagefs.layers.entry.TarEntry`
the tar scanner would report for that member, plus where its chunks lie.

The data space of a TOC layer
-----------------------------
The tar scanner's ``data_offset`` is a position in the *uncompressed tar
stream*; a TOC does not say where that is (the tar headers between the files
are not listed), so a TOC layer has its own data space: the contents of its
regular files, back to back in TOC order, starting at :data:`TOC_DATA_BASE`.
A file's ``data_offset`` is ``TOC_DATA_BASE`` plus the sizes of the regular
files listed before it, so ``LayerData.pread(node.data_offset + x, n)``
(:mod:`imagefs.tree.content`) reads bytes ``x..x+n`` of that file exactly as
for a tar layer. Offsets below the base are the tar stream's: a layer indexed
the ordinary way (a registry download, read as it arrives) keeps them, and
:class:`imagefs.layers.toc.local.TocLayerData` serves both, so a persisted
tree or cached index can never be read in the wrong space. 2**62 is far above
any real stream (and keeps ``TOC_DATA_BASE`` plus any file offset within the
signed 64-bit range the packed tree and layer index store).

The layout is a pure function of the TOC's bytes; changing how it is derived
means bumping the layer index and tree schemas.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagefs.digest import Digest
from imagefs.layers.entry import TarEntry

if TYPE_CHECKING:  # the table module builds on this one
    from imagefs.layers.toc.table import ChunkTable

__all__ = ["TOC_DATA_BASE", "Chunk", "Toc", "TocFormat"]

TOC_DATA_BASE = 1 << 62


class TocFormat(enum.Enum):
    """Which table of contents a layer carries (and so how its chunks are compressed)."""

    ESTARGZ = "eStargz"  # gzip members, TOC in a gzip member located by a footer
    ZSTD_CHUNKED = "zstd:chunked"  # zstd frames, TOC in a zstd skippable frame


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently compressed piece of a regular file.

    ``file_offset`` and ``size`` place its uncompressed bytes in the file.
    ``offset`` is where the gzip member or zstd frame that holds it starts in
    the blob, ``length`` how many compressed bytes from there may be needed
    (up to the next member or frame, which may hold more than this chunk: tar
    padding, the next headers, or, with eStargz's ``innerOffset``, other small
    files), and ``inner_offset`` where the chunk starts in the decompressed
    member. ``digest`` is the sha256 of the chunk's uncompressed bytes.
    """

    file_offset: int
    size: int
    offset: int
    length: int
    inner_offset: int
    digest: Digest


@dataclass(frozen=True, slots=True)
class Toc:
    """A verified, checked table of contents.

    ``entries`` are the layer's members in TOC order, as the tar scanner
    would report them (``data_offset`` in the TOC data space); ``chunks``
    holds where every regular file's chunks lie, by entry position
    (:class:`~.table.ChunkTable`: flat arrays, no object per chunk, since
    a TOC may list hundreds of thousands). ``digest`` is the sha256 of the
    TOC JSON (what eStargz's ``containerd.io/snapshot/stargz/toc.digest``
    annotation names). ``payload_end`` is where the TOC starts in the blob:
    every chunk lies before it.
    """

    format: TocFormat
    digest: Digest
    entries: tuple[TarEntry, ...]
    chunks: ChunkTable
    payload_end: int

    @property
    def data_size(self) -> int:
        """The size of the data space (the sum of the regular files' sizes)."""
        return self.chunks.data_size
