"""zstd layers: a frame-by-frame pass, random access through a seek table.

A zstd frame can only be decoded from its start, so random access works at
frame granularity. The pass walks the blob frame by frame (finding each
frame's end from its block headers, so no decoder ever reads past it) and
records, per frame, where it sits in the uncompressed stream. Frames small
enough to decode on every miss (<= IN_PLACE_MAX) are then read in place
from the blob. Bigger frames (a typical single-frame layer is one frame of
the whole tar) are re-encoded during the pass into independent frames of
REENCODE_FRAME bytes, written to a cache file after the seek table that
covers both kinds. Skippable frames (zstd:chunked's table of contents) are
skipped.

Seek file layout (little-endian)::

    re-encoded frames, back to back
    table: one _ENTRY per frame (uncompressed offset, source, offset, length)
    footer: _FOOTER (magic, entry count, table offset, uncompressed size,
            blob length, crc32 of the table)

Source 0 is the blob (offset relative to the blob's start), 1 this file.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, cast

import zstandard

from imagefs.cachedir import AtomicFile
from imagefs.errors import BlobError, CompressionError, ImageFSError
from imagefs.image import Layer
from imagefs.layers.plumbing import BufferedStream, DecodedCache, InUse, new_owner, pread_exact

__all__ = [
    "IN_PLACE_MAX",
    "REENCODE_FRAME",
    "SeekableBuilder",
    "ZstdLayerData",
    "ZstdStream",
    "set_frame_cache_bytes",
]

# Uncompressed bytes per re-encoded frame. A cache miss decodes one frame
# (~0.7 ms for 1 MiB here), and bigger frames barely compress better at
# level 1 (ratio 2.33 at 1 MiB, 2.34 at 4 MiB on the /usr test tar).
REENCODE_FRAME = 1 << 20
# Level 1: ~390 MB/s per thread, ratio 2.54; level -3: ~540 MB/s, ratio
# 2.11. On 2 cores the whole pass was not measurably faster at -1 or -3
# (within run-to-run noise), so the smaller file wins.
REENCODE_LEVEL = 1
# Original frames up to this size are served in place instead of re-encoded.
IN_PLACE_MAX = 4 << 20
# Decoded frames kept in memory, over all layers: a 128 KiB FUSE read of a
# big file then decodes each frame once, not eight times.
FRAME_CACHE_BYTES = 32 << 20

log = logging.getLogger(__name__)

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # low 4 bits are free (0x184D2A50..5F)
_MAX_BLOCK = 128 << 10  # zstd spec: Block_Maximum_Size
_MAX_FRAME_HEADER = 18  # magic 4 + descriptor 1 + window 1 + dict id 4 + content size 8
_READ_SIZE = 1 << 20
_MAX_INFLIGHT_PER_THREAD = 2

_SEEK_MAGIC = b"IFZSEEK\0"
_ENTRY = struct.Struct("<QBQQ")  # uncompressed offset, source, offset, compressed length
_FOOTER = struct.Struct("<8sQQQQI")  # magic, count, table offset, size, blob length, crc32
_SRC_BLOB = 0
_SRC_SEEKFILE = 1


def _compress_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


@contextmanager
def _decoding(layer: Layer) -> Iterator[None]:
    """Turn zstandard's and the OS's errors into imagefs errors that name the layer."""
    try:
        yield
    except ImageFSError:
        raise
    except zstandard.ZstdError as exc:
        raise CompressionError(
            f"layer {layer.descriptor.digest}: corrupt zstd stream: {exc}"
        ) from exc
    except OSError as exc:
        raise BlobError(
            f"layer {layer.descriptor.digest}: cannot read {layer.blob.path}: {exc}"
        ) from exc


class _FrameSource:
    """The compressed bytes of one zstd frame, and no more, as a file for zstandard.

    The frame's end is found by walking its block headers (3 bytes each,
    read with pread just ahead of the data), so the decoder never sees the
    next frame's bytes and the pass learns exactly where each frame ends.
    """

    def __init__(
        self, layer: Layer, fd: int, start: int, header_size: int, has_checksum: bool
    ) -> None:
        self._layer = layer
        self._fd = fd
        self.start = start
        self.pos = start
        self.known_end = start + header_size  # bytes known to belong to this frame
        self.done = False  # the last block has been seen: known_end is the frame's end
        self._checksum = 4 if has_checksum else 0

    def _corrupt(self, what: str) -> CompressionError:
        return CompressionError(
            f"layer {self._layer.descriptor.digest}: corrupt zstd stream: {what}"
        )

    def _extend(self, want: int) -> None:
        length = self._layer.blob.length
        base = self._layer.blob.offset
        while not self.done and self.known_end < want:
            at = self.known_end
            if at + 3 <= length:
                self._layer.blob.wait_for(at + 3)
            header = pread_exact(self._fd, 3, base + at) if at + 3 <= length else b""
            if len(header) < 3:
                raise self._corrupt(f"truncated: frame at byte {self.start} has no end")
            value = int.from_bytes(header, "little")
            last, block_type, block_size = value & 1, (value >> 1) & 3, value >> 3
            if block_type == 3:
                raise self._corrupt(f"reserved block type at byte {at}")
            if block_size > _MAX_BLOCK:
                raise self._corrupt(f"block of {block_size} bytes at byte {at}")
            end = at + 3 + (1 if block_type == 1 else block_size)  # RLE blocks store 1 byte
            if last:
                end += self._checksum
                self.done = True
            if end > length:
                raise self._corrupt(f"truncated: frame at byte {self.start} runs past the end")
            self.known_end = end

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = _READ_SIZE
        self._extend(self.pos + size)
        size = min(size, self.known_end - self.pos)
        if size <= 0:
            return b""
        self._layer.blob.wait_for(self.pos + size)
        data = pread_exact(self._fd, size, self._layer.blob.offset + self.pos)
        if len(data) != size:
            raise BlobError(
                f"layer {self._layer.descriptor.digest}: {self._layer.blob.path} shrank"
            )
        self.pos += size
        return data


@dataclass(frozen=True, slots=True)
class _FrameHeader:
    header_size: int
    content_size: int | None
    has_checksum: bool


class ZstdStream(BufferedStream):
    """The uncompressed bytes of a zstd layer, for one sequential pass.

    Handles any number of frames, with or without content sizes, and
    skippable frames. If a SeekableBuilder is given, every decoded byte also
    goes to it (skipped bytes included), so the pass builds the random-access
    cache as it goes.
    """

    def __init__(self, layer: Layer, fd: int, builder: SeekableBuilder | None = None) -> None:
        super().__init__(_READ_SIZE, layer)
        self._layer = layer
        self._fd = fd
        self._builder = builder
        self._dctx = zstandard.ZstdDecompressor()
        self._next = 0  # blob offset of the next frame
        self._frame: _FrameSource | None = None
        self._reader: zstandard.ZstdDecompressionReader | None = None
        self._content_size: int | None = None
        self._frame_start = 0  # uncompressed offset where the current frame starts
        self._decoded = 0  # uncompressed bytes decoded so far
        self._eof = False

    def _error(self, what: str) -> CompressionError:
        return CompressionError(f"layer {self._layer.descriptor.digest}: {what}")

    def _parse_header(self, at: int, data: bytes) -> _FrameHeader:
        try:
            header_size = zstandard.frame_header_size(data)
            params = zstandard.get_frame_parameters(data[:header_size])
        except zstandard.ZstdError as exc:
            if at + len(data) >= self._layer.blob.length and len(data) < _MAX_FRAME_HEADER:
                raise self._error(f"truncated zstd frame header at byte {at}") from exc
            raise self._error(f"corrupt zstd frame header at byte {at}: {exc}") from exc
        if params.dict_id:
            raise self._error(f"zstd frame at byte {at} needs dictionary {params.dict_id}")
        size = params.content_size
        known = size not in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR)
        return _FrameHeader(header_size, size if known else None, bool(params.has_checksum))

    def _start_frame(self) -> bool:
        """Position the decoder at the next data frame; False at the end of the blob."""
        length = self._layer.blob.length
        while self._next < length:
            at = self._next
            self._layer.blob.wait_for(at + min(_MAX_FRAME_HEADER, length - at))
            data = pread_exact(
                self._fd, min(_MAX_FRAME_HEADER, length - at), self._layer.blob.offset + at
            )
            if len(data) < 4:
                raise self._error(f"{len(data)} stray bytes after the last zstd frame")
            magic = int.from_bytes(data[:4], "little")
            if magic & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
                # zstd:chunked keeps its table of contents in one of these.
                if len(data) < 8:
                    raise self._error(f"truncated skippable frame at byte {at}")
                end = at + 8 + int.from_bytes(data[4:8], "little")
                if end > length:
                    raise self._error(f"truncated skippable frame at byte {at}")
                self._next = end
                continue
            if magic != _ZSTD_MAGIC:
                raise self._error(f"no zstd frame at byte {at} (trailing garbage?)")
            header = self._parse_header(at, data)
            self._frame = _FrameSource(
                self._layer, self._fd, at, header.header_size, header.has_checksum
            )
            # zstandard only calls read() on its source; the stub wants IO[bytes].
            source = cast("IO[bytes]", self._frame)
            self._reader = self._dctx.stream_reader(
                source, read_size=_READ_SIZE, read_across_frames=False
            )
            self._content_size = header.content_size
            self._frame_start = self._decoded
            if self._builder is not None:
                self._builder.begin_frame(header.content_size)
            return True
        return False

    def _end_frame(self) -> None:
        frame = self._frame
        assert frame is not None
        produced = self._decoded - self._frame_start
        if not frame.done or frame.pos != frame.known_end:
            raise self._error(f"corrupt zstd stream: frame at byte {frame.start} ends early")
        if self._content_size is not None and produced != self._content_size:
            raise self._error(
                f"corrupt zstd stream: frame at byte {frame.start} holds {produced} bytes, "
                f"header says {self._content_size}"
            )
        if self._builder is not None:
            self._builder.end_frame(frame.start, frame.known_end - frame.start, produced)
        self._next = frame.known_end
        self._frame = None
        self._reader = None

    def _fill(self, view: memoryview) -> int:
        while True:
            if self._reader is None:
                if self._eof:
                    return 0
                with _decoding(self._layer):
                    started = self._start_frame()
                if not started:
                    self._eof = True
                    return 0
            assert self._reader is not None
            with _decoding(self._layer):
                n = self._reader.readinto(view)
            if n:
                self._decoded += n
                if self._builder is not None:
                    self._builder.data(view[:n])
                return n
            self._end_frame()

    def finish(self) -> None:
        """Decode the rest, checking every frame up to the blob's last byte."""
        self.drain()

    def close(self) -> None:
        self._reader = None
        self._frame = None


class SeekableBuilder:
    """Builds a layer's seek file (see module docstring) from the pass's output.

    Re-encoding runs in a thread pool (zstandard releases the GIL), one frame
    per task, in order; at most a few frames are in flight so memory stays
    bounded. Nothing is visible at ``path`` until :meth:`commit`. The cache
    is an optimisation: if writing fails (disk full), the builder logs,
    gives up and lets the pass go on; ``commit`` then returns False.
    Creating the builder raises OSError if the file cannot be created.
    """

    def __init__(self, path: str, blob_length: int) -> None:
        self._out = AtomicFile(path)
        self._failed = False
        self._blob_length = blob_length
        self._written = 0
        self._entries: list[list[int]] = []  # [uncompressed offset, source, offset, length]
        threads = _compress_threads()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imagefs-zstd")
        self._max_inflight = threads * _MAX_INFLIGHT_PER_THREAD
        self._inflight: deque[tuple[Future[bytes], list[int]]] = deque()
        self._local = threading.local()
        self._pos = 0  # uncompressed bytes seen
        self._frame_start = 0
        self._pending = bytearray()  # decoded bytes of this frame not yet re-encoded
        self._pending_start = 0
        self._in_place: bool | None = None  # None: undecided (frame size unknown so far)

    def begin_frame(self, content_size: int | None) -> None:
        self._frame_start = self._pending_start = self._pos
        self._in_place = None if content_size is None else content_size <= IN_PLACE_MAX
        del self._pending[:]

    def data(self, chunk: memoryview) -> None:
        self._pos += len(chunk)
        if self._in_place or self._failed:
            return
        self._pending += chunk
        if self._in_place is None:
            if len(self._pending) <= IN_PLACE_MAX:
                return  # may still turn out small enough to serve in place
            self._in_place = False
        while len(self._pending) >= REENCODE_FRAME and not self._failed:
            self._submit(bytes(self._pending[:REENCODE_FRAME]))
            del self._pending[:REENCODE_FRAME]

    def end_frame(self, offset: int, length: int, size: int) -> None:
        if self._failed:
            return
        if self._in_place is not False:
            if size:
                self._entries.append([self._frame_start, _SRC_BLOB, offset, length])
        elif self._pending:
            self._submit(bytes(self._pending))
        del self._pending[:]

    def _compress(self, piece: bytes) -> bytes:
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            # Checksums: the cache file is not fsynced, so a torn file must be
            # detectable when a frame is decoded.
            cctx = zstandard.ZstdCompressor(
                level=REENCODE_LEVEL, write_checksum=True, write_content_size=True
            )
            self._local.cctx = cctx
        return cctx.compress(piece)

    def _submit(self, piece: bytes) -> None:
        if self._failed:
            return
        entry = [self._pending_start, _SRC_SEEKFILE, -1, -1]
        self._pending_start += len(piece)
        self._entries.append(entry)
        self._inflight.append((self._pool.submit(self._compress, piece), entry))
        while len(self._inflight) > self._max_inflight and not self._failed:
            self._write_oldest()

    def _write_oldest(self) -> None:
        future, entry = self._inflight.popleft()
        data = future.result()
        try:
            self._out.file.write(data)
        except OSError as exc:
            self._give_up(exc)
            return
        entry[2], entry[3] = self._written, len(data)
        self._written += len(data)

    def _give_up(self, exc: OSError) -> None:
        if self._failed:
            return  # said once per layer; later writes fail for the same reason
        log.warning("cannot write %s, continuing without it: %s", self._out.path, exc)
        self._failed = True
        self.abort()

    def commit(self) -> bool:
        """Write the table and footer and move the file into place; False if given up."""
        while self._inflight and not self._failed:
            self._write_oldest()
        if self._failed:
            return False
        self._pool.shutdown()
        table = b"".join(_ENTRY.pack(*entry) for entry in self._entries)
        footer = _FOOTER.pack(
            _SEEK_MAGIC,
            len(self._entries),
            self._written,
            self._pos,
            self._blob_length,
            zlib.crc32(table),
        )
        try:
            self._out.file.write(table + footer)
            self._out.commit()
        except OSError as exc:
            self._give_up(exc)
            return False
        return True

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._inflight.clear()
        self._out.abort()


@dataclass(frozen=True, slots=True)
class _SeekTable:
    starts: list[int]  # uncompressed offset of each frame, strictly increasing
    sources: list[int]
    offsets: list[int]
    lengths: list[int]
    size: int  # uncompressed size of the layer


def _load_table(fd: int, blob_length: int) -> _SeekTable | None:
    """The seek table of an open seek file, or None if the file is not a whole one."""
    file_size = os.fstat(fd).st_size
    if file_size < _FOOTER.size:
        return None
    magic, count, table_at, size, blob_len, crc = _FOOTER.unpack(
        pread_exact(fd, _FOOTER.size, file_size - _FOOTER.size)
    )
    if magic != _SEEK_MAGIC or blob_len != blob_length:
        return None
    if table_at + count * _ENTRY.size + _FOOTER.size != file_size:
        return None
    table = pread_exact(fd, count * _ENTRY.size, table_at)
    if len(table) != count * _ENTRY.size or zlib.crc32(table) != crc:
        return None
    starts: list[int] = []
    sources: list[int] = []
    offsets: list[int] = []
    lengths: list[int] = []
    limits = {_SRC_BLOB: blob_length, _SRC_SEEKFILE: table_at}
    for start, source, offset, length in _ENTRY.iter_unpack(table):
        if source not in limits or offset + length > limits[source] or length <= 0:
            return None
        if start >= size or (starts and start <= starts[-1]) or (not starts and start != 0):
            return None
        starts.append(start)
        sources.append(source)
        offsets.append(offset)
        lengths.append(length)
    if not starts and size:
        return None
    return _SeekTable(starts, sources, offsets, lengths, size)


_FRAME_CACHE = DecodedCache(FRAME_CACHE_BYTES)


def set_frame_cache_bytes(max_bytes: int) -> None:
    """Bound the decoded-frame LRU (process-wide); extra frames go at the next put."""
    _FRAME_CACHE.max_bytes = max_bytes


_THREAD_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # A ZstdDecompressor must not be used by two threads at once.
    dctx: zstandard.ZstdDecompressor | None = getattr(_THREAD_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _THREAD_LOCAL.dctx = zstandard.ZstdDecompressor()
    return dctx


class ZstdLayerData:
    """Random access to a zstd layer through its seek file (thread-safe).

    Reads run in parallel (zstandard releases the GIL): pread on shared
    descriptors is thread-safe, each thread decodes with its own context,
    and decoded frames go to a shared LRU.
    """

    def __init__(
        self, layer: Layer, seek_fd: int, table: _SeekTable, owned_dir: str | None = None
    ) -> None:
        self._layer = layer
        self._seek_fd = seek_fd
        self._table = table
        self._owned_dir = owned_dir
        self._owner = new_owner()
        self._blob_fd = layer.blob.open_fd()
        self._in_use = InUse()
        self.size = table.size

    @classmethod
    def open(cls, layer: Layer, path: str, owned_dir: str | None = None) -> ZstdLayerData | None:
        """Open the seek file at ``path``; None if it is missing or not a whole file."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            table = _load_table(fd, layer.blob.length)
            if table is None:
                os.close(fd)
                return None
            return cls(layer, fd, table, owned_dir)
        except BaseException:
            os.close(fd)
            raise

    def _frame(self, index: int) -> bytes:
        key = (self._owner, index)
        data = _FRAME_CACHE.get(key)
        if data is not None:
            return data
        table = self._table
        end = table.starts[index + 1] if index + 1 < len(table.starts) else table.size
        size = end - table.starts[index]
        if table.sources[index] == _SRC_BLOB:
            fd, base = self._blob_fd, self._layer.blob.offset
        else:
            fd, base = self._seek_fd, 0
        with _decoding(self._layer):
            compressed = pread_exact(fd, table.lengths[index], base + table.offsets[index])
            data = _decompressor().decompress(compressed, max_output_size=size)
        if len(data) != size:
            raise CompressionError(
                f"layer {self._layer.descriptor.digest}: zstd frame {index} decoded to "
                f"{len(data)} bytes, seek table says {size}"
            )
        _FRAME_CACHE.put(key, data)
        return data

    def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer only at the end (blocking)."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size ({offset}, {size})")
        with self._in_use:
            return self._read(offset, min(offset + size, self.size))

    def _read(self, offset: int, end: int) -> bytes:
        if offset >= end:
            return b""
        starts = self._table.starts
        index = bisect.bisect_right(starts, offset) - 1
        parts: list[bytes | memoryview] = []
        pos = offset
        while pos < end:
            frame = self._frame(index)
            start = starts[index]
            piece = memoryview(frame)[pos - start : end - start]
            parts.append(piece)
            pos += len(piece)
            index += 1
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def close(self) -> None:
        if not self._in_use.close():
            return
        _FRAME_CACHE.drop(self._owner)
        os.close(self._blob_fd)
        os.close(self._seek_fd)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def __enter__(self) -> ZstdLayerData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
