"""A TOC's chunks as flat arrays, in memory and in the cache.

A mounted TOC layer needs, to serve a read, only where each chunk lies: not
the names, modes or owners the tree already holds. This keeps that as
arrays (about 80 bytes a chunk, no Python object per chunk, since the daemon
may keep it for weeks), and persists it beside the layer's index so the
daemon's first read of a layer loads it (milliseconds) instead of parsing
the TOC again (about a second per 50k entries).

File layout (little-endian)::

    magic "IMGFS-TC" | u32 header length | header (JSON) | arrays

The header holds the schema, the layer digest, the TOC's key (its location
and annotated digests, as the TOC index uses), the format, the data-space
size, the chunk count and the CRC-32 of the arrays. A file that fails any
check is ignored (the TOC is parsed again), never served. It is written
only from a TOC read out of a verified blob.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any

from imagefs.cachedir import TOC_CHUNKS, write_atomically
from imagefs.digest import Digest
from imagefs.errors import ImageFSError
from imagefs.layers.toc.model import Chunk, Toc, TocFormat

__all__ = ["ChunkTable", "ChunkTableOnce"]

log = logging.getLogger(__name__)

_MAGIC = b"IMGFS-TC"
_HEADER_LENGTH = struct.Struct("<I")
# starts, sizes, offsets, lengths, inner offsets, file offsets (u64 each),
# then the owning TOC entry's index (u32), then the digests (32 bytes each).
_U64_ARRAYS = ("starts", "sizes", "offsets", "lengths", "inner", "file_offsets")
_DIGEST_SIZE = 32


class ChunkTable:
    """Every chunk of a TOC in data-space order.

    The chunks tile the data space: chunk ``i`` holds its bytes
    ``starts[i]`` to ``starts[i] + sizes[i]`` (offsets from
    ``TOC_DATA_BASE``). ``entry_index[i]`` is the TOC entry it belongs to.
    """

    def __init__(self, toc_format: TocFormat, data_size: int) -> None:
        self.format = toc_format
        self.data_size = data_size
        self.starts = array("Q")
        self.sizes = array("Q")
        self.offsets = array("Q")
        self.lengths = array("Q")
        self.inner = array("Q")
        self.file_offsets = array("Q")
        self.entry_index = array("I")
        self.digests = b""

    @classmethod
    def from_columns(
        cls,
        toc_format: TocFormat,
        data_size: int,
        *,
        starts: list[int],
        sizes: list[int],
        offsets: list[int],
        lengths: list[int],
        inner: list[int],
        file_offsets: list[int],
        entry_index: list[int],
        digests: bytes,
    ) -> ChunkTable:
        """A table from one list per column (the TOC parser's), converted in C."""
        table = cls(toc_format, data_size)
        table.starts = array("Q", starts)
        table.sizes = array("Q", sizes)
        table.offsets = array("Q", offsets)
        table.lengths = array("Q", lengths)
        table.inner = array("Q", inner)
        table.file_offsets = array("Q", file_offsets)
        table.entry_index = array("I", entry_index)
        if len(digests) != _DIGEST_SIZE * len(starts) or not all(
            len(column) == len(starts)
            for column in (sizes, offsets, lengths, inner, file_offsets, entry_index)
        ):
            raise ValueError("chunk table columns of different lengths")
        table.digests = digests
        return table

    def append(self, start: int, chunk: Chunk, position: int) -> None:
        """Add ``chunk`` at data-space offset ``start``, of TOC entry ``position``."""
        self.starts.append(start)
        self.sizes.append(chunk.size)
        self.offsets.append(chunk.offset)
        self.lengths.append(chunk.length)
        self.inner.append(chunk.inner_offset)
        self.file_offsets.append(chunk.file_offset)
        self.entry_index.append(position)
        self.digests += bytes.fromhex(chunk.digest.encoded)

    def chunks_of(self, position: int) -> tuple[Chunk, ...]:
        """The chunks of TOC entry ``position``, in order (entry_index never decreases)."""
        first = bisect_left(self.entry_index, position)
        end = bisect_right(self.entry_index, position, first)
        return tuple(self.chunk(index) for index in range(first, end))

    def __len__(self) -> int:
        return len(self.starts)

    def chunk(self, index: int) -> Chunk:
        at = index * _DIGEST_SIZE
        digest = Digest("sha256:" + self.digests[at : at + _DIGEST_SIZE].hex())
        return Chunk(
            self.file_offsets[index], self.sizes[index], self.offsets[index],
            self.lengths[index], self.inner[index], digest,
        )  # fmt: skip

    # -- in the cache ------------------------------------------------------------------

    def _arrays(self) -> bytes:
        parts = [getattr(self, name).tobytes() for name in _U64_ARRAYS]
        return b"".join([*parts, self.entry_index.tobytes(), self.digests])

    def save(self, path: str, layer_digest: str, key: str) -> None:
        """Write the table to ``path`` (best effort: a rebuild only costs a parse)."""
        body = self._arrays()
        header = json.dumps(
            {
                "version": TOC_CHUNKS.tag,
                "digest": layer_digest,
                "key": key,
                "format": self.format.value,
                "data_size": self.data_size,
                "count": len(self),
                "crc32": zlib.crc32(body),
            }
        ).encode()
        try:
            write_atomically(path, _MAGIC + _HEADER_LENGTH.pack(len(header)) + header + body)
        except OSError as exc:
            log.warning("cannot cache the chunk table %s: %s", path, exc)

    @classmethod
    def load(cls, path: str, layer_digest: str, key: str) -> ChunkTable | None:
        """The table saved at ``path`` for this layer and TOC key; None if absent or bad."""
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            return None
        try:
            return cls._decode(data, layer_digest, key)
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("chunk table %s is unusable (%s); parsing the TOC again", path, exc)
            return None

    @classmethod
    def _decode(cls, data: bytes, layer_digest: str, key: str) -> ChunkTable:
        if not data.startswith(_MAGIC):
            raise ValueError("bad magic")
        (length,) = _HEADER_LENGTH.unpack_from(data, len(_MAGIC))
        start = len(_MAGIC) + _HEADER_LENGTH.size
        header: dict[str, Any] = json.loads(data[start : start + length])
        wanted = (TOC_CHUNKS.tag, layer_digest, key)
        if (header["version"], header["digest"], header["key"]) != wanted:
            raise ValueError("a table of another layer, TOC or schema")
        count = header["count"]
        body = data[start + length :]
        expected = count * (8 * len(_U64_ARRAYS) + 4 + _DIGEST_SIZE)
        if len(body) != expected or zlib.crc32(body) != header["crc32"]:
            raise ValueError("checksum mismatch")
        table = cls(TocFormat(header["format"]), int(header["data_size"]))
        at = 0
        for name in _U64_ARRAYS:
            getattr(table, name).frombytes(body[at : at + 8 * count])
            at += 8 * count
        table.entry_index.frombytes(body[at : at + 4 * count])
        at += 4 * count
        table.digests = body[at:]
        return table


class ChunkTableOnce:
    """A TOC layer reader's chunk table, made at its first use (thread-safe).

    Loaded from ``path`` (None: no cache), else built from ``parse()`` and
    saved there. A failure (an ImageFSError from ``parse``) is kept and
    raised again at each later use, so a bad TOC is not parsed at every read.
    """

    def __init__(
        self, path: str | None, layer_digest: str, key: str, parse: Callable[[], Toc]
    ) -> None:
        self._path = path
        self._layer_digest = layer_digest
        self._key = key
        self._parse = parse
        self._lock = threading.Lock()
        self._table: ChunkTable | None = None
        self._error: ImageFSError | None = None

    def get(self) -> ChunkTable:
        with self._lock:
            if self._table is not None:
                return self._table
            if self._error is not None:
                raise type(self._error)(str(self._error))
            path, digest, key = self._path, self._layer_digest, self._key
            table = ChunkTable.load(path, digest, key) if path is not None else None
            if table is None:
                try:
                    table = self._parse().chunks
                except ImageFSError as exc:
                    self._error = exc
                    raise
                if path is not None:
                    table.save(path, digest, key)
            self._table = table
            return table
