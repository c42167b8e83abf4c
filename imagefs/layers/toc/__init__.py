"""Tables of contents of lazily pullable layers: eStargz and zstd:chunked.

Both formats keep a layer an ordinary compressed tar (any tool can still
decompress it) while compressing each file's data, or each chunk of a big
file, on its own, and listing every entry and chunk in a TOC at the blob's
end, so a reader can index the layer without decompressing it and decode
only the chunks it needs.

The format library (no I/O of its own, so the registry's Range reads can use
it as the local reads do):

* :mod:`~.locate` (with :mod:`~.estargz`, :mod:`~.zstdchunked`): footers and
  annotations -> where the TOC is and which digests it must match;
* :mod:`~.read`: the TOC read through a :class:`~.read.BlobReader`, checked
  against those digests, parsed (:mod:`~.jsontoc`, both JSON dialects) into
  a :class:`~.model.Toc`: the :class:`~imagefs.layers.entry.TarEntry` of
  every member, and every file's :class:`~.model.Chunk` s in one
  :class:`~.table.ChunkTable`;
* :mod:`~.chunks`: a chunk's compressed bytes -> its verified bytes;
* :mod:`~.limits`: what a TOC may cost.

On top of it, for layers on local disk: :mod:`~.local` (index from the TOC,
serve reads chunk by chunk; the trust chain, and how it differs for a
registry), :mod:`~.blob` (the blob as a byte source) and
:mod:`~.bookkeeping` (the formats' own files, hidden from merged trees).
"""

from __future__ import annotations

from imagefs.layers.toc.chunks import decode_chunk
from imagefs.layers.toc.limits import NotServable
from imagefs.layers.toc.locate import TocLocation, locate
from imagefs.layers.toc.model import TOC_DATA_BASE, Chunk, Toc, TocFormat
from imagefs.layers.toc.read import BlobReader, read_toc

__all__ = [
    "TOC_DATA_BASE",
    "BlobReader",
    "Chunk",
    "NotServable",
    "Toc",
    "TocFormat",
    "TocLocation",
    "decode_chunk",
    "locate",
    "read_toc",
]
