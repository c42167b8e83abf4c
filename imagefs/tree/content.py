"""File contents served from the layers, including sparse files.

Nothing is extracted: a regular file is a byte range of its layer's
uncompressed stream (``data_offset``, of a served
:class:`~imagefs.tree.served.Inode` or a merge's ``Node``), read through the layer's
:class:`~imagefs.layers.reader.LayerData`; for a layer indexed from its
eStargz or zstd:chunked TOC, a range of the TOC's data space instead (from
``TOC_DATA_BASE`` up, :mod:`imagefs.layers.toc.model`), which the same
LayerData serves. Blocking: every read may decompress, so callers on an
event loop run it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from imagefs.errors import LayerError
from imagefs.layers.reader import LayerData
from imagefs.tree.served import Attributes


class ContentReader:
    """Reads file data for merged-tree files (inodes or nodes) from the image's layers."""

    def __init__(self, layers: Sequence[LayerData], layer_names: Sequence[str]) -> None:
        self._layers = layers
        self._names = layer_names
        # Only plain layers can answer from the page cache without blocking;
        # resolved once here rather than on every read.
        self._cached_readers: list[Callable[[int, int], memoryview | None] | None] = [
            getattr(layer, "pread_cached", None) for layer in layers
        ]

    def read(self, node: Attributes, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` of a regular file (blocking)."""
        if offset >= node.size or size <= 0:
            return b""
        size = min(size, node.size - offset)
        if node.sparse is None:
            return self._pread(node, node.data_offset + offset, size)
        return self._read_sparse(node, offset, size)

    def read_cached(self, node: Attributes, offset: int, size: int) -> memoryview | None:
        """Like :meth:`read`, but only if it cannot block; None means "use read".

        Only plain (uncompressed) layers can answer: their bytes are a range
        of the blob, and the page cache either has it or not. The view is
        only valid until the next call (see _PlainLayerData.pread_cached).
        """
        if node.sparse is not None or offset >= node.size or size <= 0:
            return None
        pread_cached = self._cached_readers[node.layer]
        if pread_cached is None:
            return None
        return pread_cached(node.data_offset + offset, min(size, node.size - offset))

    def _pread(self, node: Attributes, layer_offset: int, size: int) -> bytes:
        data = self._layers[node.layer].pread(layer_offset, size)
        if len(data) != size:
            raise LayerError(
                f"layer {self._names[node.layer]}: file data ends early "
                f"(wanted {size} bytes at {layer_offset}, got {len(data)})"
            )
        return data

    def _read_sparse(self, node: Attributes, offset: int, size: int) -> bytes:
        # GNU sparse: the data segments (offset_in_file, length) are stored back
        # to back from data_offset; everything between them is a hole of zeros.
        assert node.sparse is not None
        out = bytearray(size)
        end = offset + size
        stored = node.data_offset
        for seg_offset, seg_length in node.sparse:
            seg_end = seg_offset + seg_length
            lo, hi = max(offset, seg_offset), min(end, seg_end)
            if lo < hi:
                chunk = self._pread(node, stored + (lo - seg_offset), hi - lo)
                out[lo - offset : hi - offset] = chunk
            stored += seg_length
            if seg_offset >= end:
                break
        return bytes(out)
