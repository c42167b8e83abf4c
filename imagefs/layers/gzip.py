"""gzip layers: one parallel pass with rapidgzip, random access from its index.

rapidgzip decodes a gzip stream in parallel (it finds deflate block
boundaries speculatively). On the way it records a checkpoint (bit offset
and 32 KiB window) about every GZIP_CHUNK_SIZE of output. After the pass
the index is exported in gztool format (windows compressed, ~2.3 KB per
checkpoint) and cached. A fresh single-threaded reader imports it for
random access. See :mod:`imagefs.layers.reader` for the measurements behind the
chunk size and thread counts.

rapidgzip quirks handled here: it reports a truncated stream only on
stderr, so the pass checks that decoding ended at the blob's last byte.
Its forward ``seek`` does not check the CRC of the bytes it passes over,
so the pass decodes skipped data into a buffer instead. Python exceptions
inside its file callbacks come back as generic errors, so I/O errors are
recovered from the RangeFile.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import rapidgzip

from imagefs.cachedir import write_atomically
from imagefs.errors import BlobError, CompressionError, ImageFSError
from imagefs.image import Layer
from imagefs.layers.plumbing import BufferedStream, RangeFile

__all__ = [
    "GZIP_CHUNK_SIZE",
    "GzipLayerData",
    "GzipStream",
    "load_index",
    "save_index",
    "set_open_reader_limit",
]

# rapidgzip's chunk size for the indexing pass. Measured, the exported index
# then has a checkpoint every ~chunk size of *uncompressed* data (median
# 1.07 MB, max 3.4 MB at 1 MiB), which is what one random read decodes.
# 1 MiB: pass 4.2 s, random 4 KiB read median 1.6 ms; 4 MiB: pass ~3.3 s
# but ~6 ms per read (see imagefs.layers.reader for the whole table).
GZIP_CHUNK_SIZE = 1 << 20

# How many random-access rapidgzip readers stay open at once, over all
# layers. Each one caches up to 16 decoded chunks (~20 MB RSS at the chunk
# size above); a reader beyond the limit is closed and re-imported from the
# in-memory index on its next read (~15 ms).
MAX_OPEN_READERS = 4

_INDEX_MAGIC = b"IFGZIDX\0"
_INDEX_HEADER = struct.Struct("<8sQQI")  # magic, uncompressed size, index length, crc32
_BUFFER = 4 << 20  # decoded bytes per rapidgzip call in the pass


def _parallelism() -> int:
    # rapidgzip's "0 = automatic" counts the host's CPUs, not the ones this
    # process may use (containers, taskset).
    return max(1, len(os.sched_getaffinity(0)))


@contextmanager
def _decoding(layer: Layer, source: RangeFile) -> Iterator[None]:
    """Turn whatever rapidgzip raises into CompressionError (or BlobError for I/O)."""
    try:
        yield
    except ImageFSError:
        raise
    except Exception as exc:
        digest = layer.descriptor.digest
        if isinstance(source.error, ImageFSError):
            raise source.error from exc  # the download behind the blob failed
        if source.error is not None:
            raise BlobError(
                f"layer {digest}: cannot read {layer.blob.path}: {source.error}"
            ) from source.error
        lines = str(exc).strip().splitlines()
        detail = lines[0][:200] if lines else type(exc).__name__
        raise CompressionError(f"layer {digest}: corrupt gzip stream: {detail}") from exc


def _read_full(reader: Any, size: int) -> bytes:
    """Read ``size`` bytes from a RapidgzipFile; fewer only at end of stream."""
    data: bytes = reader.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more: bytes = reader.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class GzipStream(BufferedStream):
    """The uncompressed bytes of a gzip layer, for one sequential pass."""

    def __init__(self, layer: Layer, fd: int) -> None:
        super().__init__(_BUFFER, layer)
        self._layer = layer
        self._source = RangeFile(fd, layer.blob.offset, layer.blob.length, layer.blob.wait_for)
        self._reader: Any = None
        with _decoding(layer, self._source):
            self._reader = rapidgzip.RapidgzipFile(
                self._source, parallelization=_parallelism(), chunk_size=GZIP_CHUNK_SIZE
            )

    def _fill(self, view: memoryview) -> int:
        with _decoding(self._layer, self._source):
            n: int = self._reader.readinto(view)
        return n

    def finish(self, want_index: bool) -> tuple[bytes, int] | None:
        """Decode the rest, check the stream ended exactly at the blob's end.

        Returns ``(gztool index, uncompressed size)`` if ``want_index``.
        """
        layer = self._layer
        self.drain()
        with _decoding(layer, self._source):
            end_bits = self._reader.tell_compressed()
        # rapidgzip stops quietly at a truncated deflate stream (it only logs
        # to stderr); a complete stream ends exactly at the blob's last byte.
        if end_bits != 8 * layer.blob.length:
            raise CompressionError(
                f"layer {layer.descriptor.digest}: gzip stream ends at byte {end_bits // 8} "
                f"of {layer.blob.length} (truncated)"
            )
        if not want_index:
            return None
        out = io.BytesIO()
        with _decoding(layer, self._source):
            self._reader.export_index(out, rapidgzip.IndexFormat.GZTOOL)
        return out.getvalue(), self.tell()

    def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                reader.close()
            except Exception:
                pass  # closing after a decode error may complain again


def save_index(path: str, index: bytes, size: int) -> None:
    """Cache a gztool index with a header that lets a torn file be detected."""
    header = _INDEX_HEADER.pack(_INDEX_MAGIC, size, len(index), zlib.crc32(index))
    write_atomically(path, header + index)


def load_index(path: str) -> tuple[bytes, int] | None:
    """``(index, uncompressed size)`` from the cache, or None if absent or damaged."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _INDEX_HEADER.size:
        return None
    magic, size, length, crc = _INDEX_HEADER.unpack_from(data)
    index = data[_INDEX_HEADER.size :]
    if magic != _INDEX_MAGIC or length != len(index) or zlib.crc32(index) != crc:
        return None
    return index, size


class _OpenReaders:
    """Process-wide LRU of GzipLayerData objects that hold an open rapidgzip reader."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        # Weak references: this list must not keep an unclosed layer alive.
        self._order: OrderedDict[int, weakref.ref[GzipLayerData]] = OrderedDict()

    def touch(self, data: GzipLayerData) -> list[GzipLayerData]:
        """Mark ``data`` as just used; return the layers whose readers should close.

        The caller closes them after releasing its own lock: closing takes the
        victim's lock, and holding two layer locks at once could deadlock.
        """
        with self._lock:
            self._order[id(data)] = weakref.ref(data)
            self._order.move_to_end(id(data))
            victims = []
            while len(self._order) > max(self.limit, 1):
                victim = self._order.popitem(last=False)[1]()
                if victim is not None:
                    victims.append(victim)
            return victims

    def forget(self, data: GzipLayerData) -> None:
        with self._lock:
            self._order.pop(id(data), None)


_OPEN_READERS = _OpenReaders(MAX_OPEN_READERS)


def set_open_reader_limit(limit: int) -> None:
    """How many rapidgzip readers may stay open at once (process-wide, >= 1).

    Readers over the limit close on their layers' next touch of the LRU.
    """
    _OPEN_READERS.limit = max(1, limit)


class _ReaderState:
    """What must be released even if a GzipLayerData is never closed.

    An unclosed rapidgzip reader aborts the interpreter at exit, so a
    ``weakref.finalize`` (which also runs at exit) closes it as a last resort.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reader: Any = None

    def close_reader(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            try:
                reader.close()
            except Exception:
                pass

    def close(self) -> None:
        self.close_reader()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class GzipLayerData:
    """Random access to a gzip layer through a rapidgzip index (thread-safe).

    The reader is opened on first use and may be closed again when more than
    MAX_OPEN_READERS are open; reads of one layer are serialised (a reader
    has one file position), reads of different layers run in parallel.
    """

    def __init__(self, layer: Layer, index: bytes, size: int) -> None:
        self._layer = layer
        self._index = index
        self.size = size
        self._lock = threading.Lock()
        self._closed = False
        self._state = _ReaderState(layer.blob.open_fd())
        self._source = RangeFile(self._state.fd, layer.blob.offset, layer.blob.length)
        self._finalizer = weakref.finalize(self, self._state.close)

    def _open_reader(self) -> Any:
        with _decoding(self._layer, self._source):
            # One thread: a random read decodes one chunk, and prefetching
            # neighbours in parallel made median latency worse (7.5 vs 6.1 ms
            # with 4 MiB chunks).
            reader = rapidgzip.RapidgzipFile(
                self._source, parallelization=1, chunk_size=GZIP_CHUNK_SIZE
            )
            try:
                reader.import_index(io.BytesIO(self._index))
            except BaseException:
                reader.close()
                raise
        self._state.reader = reader
        return reader

    def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer only at the end (blocking)."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size ({offset}, {size})")
        with self._lock:
            if self._closed:
                raise ValueError("read from a closed layer")
            if size == 0 or offset >= self.size:
                return b""
            size = min(size, self.size - offset)
            reader = self._state.reader or self._open_reader()
            with _decoding(self._layer, self._source):
                reader.seek(offset)
                data = _read_full(reader, size)
        if len(data) != size:
            raise CompressionError(
                f"layer {self._layer.descriptor.digest}: gzip data ends at "
                f"{offset + len(data)}, index says {self.size}"
            )
        for victim in _OPEN_READERS.touch(self):
            if victim is not self:
                victim._release_reader()
        return data

    def _release_reader(self) -> None:
        with self._lock:
            self._state.close_reader()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            _OPEN_READERS.forget(self)
            self._finalizer()

    def __enter__(self) -> GzipLayerData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
