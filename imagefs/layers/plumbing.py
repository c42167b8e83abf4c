"""Plumbing shared by the :mod:`imagefs.layers.reader` readers.

Blob byte ranges as files, digest checking in a background thread, and cache
file naming (publishing and versions are imagefs.cachedir's). Nothing here
knows about compression.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from typing import Protocol

from imagefs.cachedir import FormatVersion
from imagefs.digest import Digest, check
from imagefs.errors import BlobError, CompressionError, DigestMismatchError, ImageFSError
from imagefs.image import BlobFeed, Layer

__all__ = [
    "BlobHasher",
    "BufferedStream",
    "DecodedCache",
    "DigestCheck",
    "DownloadCheck",
    "InUse",
    "RangeFile",
    "blob_bytes",
    "cache_path",
    "check_blob",
    "digest_check",
    "expansion_limit",
    "new_owner",
    "pread_exact",
]

# Decompression bombs: a compressed layer may decode to at most
# max(EXPANSION_FLOOR, MAX_EXPANSION x its compressed size) bytes, else the
# pass stops with a CompressionError. 1100 is above deflate's own ceiling
# (about 1032:1), so no gzip layer is ever refused by the ratio: a gzip bomb
# costs the sender 1 byte per KB it makes us decode. zstd has no such
# ceiling (a 4-byte RLE block makes 128 KiB), and that is what this stops: a
# tiny blob that would decode for hours. Environment overrides (bytes and a
# ratio): IMAGEFS_EXPANSION_FLOOR, IMAGEFS_MAX_EXPANSION.
EXPANSION_FLOOR = 1 << 30
MAX_EXPANSION = 1100

_HASH_CHUNK = 1 << 20  # large enough that hashlib and pread release the GIL


def blob_bytes(layer: Layer) -> str:
    """Which bytes a layer's blob digest covers, for messages ("over ...")."""
    blob = layer.blob
    if blob.offset == 0:
        return f"the blob ({blob.length} bytes of {blob.path})"
    return f"the blob ({blob.length} bytes at offset {blob.offset} of {blob.path})"


def check_blob(layer: Layer, fd: int) -> None:
    """Fail early if the blob range cannot hold the descriptor's bytes.

    The descriptor size is checked here rather than after the pass: a size
    mismatch (a truncated download, a wrong offset into an outer tar) would
    otherwise show up as a confusing compression or tar error first.
    """
    blob, desc = layer.blob, layer.descriptor
    if desc.size > 0 and desc.size != blob.length:
        raise DigestMismatchError(
            f"layer {desc.digest}: blob is {blob.length} bytes, descriptor says {desc.size}"
        )
    file_size = os.fstat(fd).st_size
    if blob.offset < 0 or blob.length < 0 or blob.offset + blob.length > file_size:
        raise DigestMismatchError(
            f"layer {desc.digest}: {blob.path} has {file_size} bytes, too few for "
            f"{blob.length} bytes at offset {blob.offset} (truncated?)"
        )


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """``os.pread`` that retries short reads; fewer bytes only at end of file."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class BlobHasher:
    """Hashes a layer's blob range on a worker thread, to be checked against its digest.

    The readers never see the compressed bytes in order (rapidgzip reads
    chunks in parallel, the plain tar reader seeks past file data), so the
    digest is computed by one sequential read of the range on the side.
    ``hashlib`` and ``os.pread`` release the GIL on large buffers, so this
    overlaps with decompression and tar parsing; sha256 runs at ~1.7 GB/s
    here (SHA-NI), far ahead of any decompressor.

    With an ``executor``, the hash waits for one of its workers: that is how
    the digests of plain layers are checked ahead of their scan, a core's
    worth at a time (:func:`digests_checked_ahead`). Without one it gets a
    thread of its own at once.
    """

    def __init__(self, layer: Layer, executor: Executor | None = None) -> None:
        self._layer = layer
        self._stop = threading.Event()
        self._own: ThreadPoolExecutor | None = None
        if executor is None:
            name = f"imagefs-hash-{layer.descriptor.digest.short()}"
            executor = self._own = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._future: Future[tuple[Digest, int]] = executor.submit(self._hash_blob)
        if self._own is not None:
            self._own.shutdown(wait=False)  # the thread ends with its one job

    def _hash_blob(self) -> tuple[Digest, int]:
        """``(digest, bytes read)`` of the range; stops early once cancelled."""
        blob = self._layer.blob
        hasher = self._layer.descriptor.digest.hasher()
        fd = blob.open_fd()
        try:
            try:
                os.posix_fadvise(fd, blob.offset, blob.length, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass  # only a readahead hint
            pos, end = blob.offset, blob.offset + blob.length
            while pos < end and not self._stop.is_set():
                blob.wait_for(pos - blob.offset + min(_HASH_CHUNK, end - pos))
                chunk = os.pread(fd, min(_HASH_CHUNK, end - pos), pos)
                if not chunk:
                    break  # file shrank under us: the digest will not match
                hasher.update(chunk)
                pos += len(chunk)
            return hasher.result(), pos - blob.offset
        finally:
            os.close(fd)

    def result(self) -> Digest:
        """Wait for the hash of the whole range (blocking)."""
        layer = self._layer
        try:
            digest, read = self._future.result()
        except ImageFSError:
            raise  # a download that failed (BlobRange.wait_for) says why itself
        except CancelledError:
            raise BlobError(f"layer {layer.descriptor.digest}: digest check cancelled") from None
        except Exception as exc:
            raise BlobError(
                f"layer {layer.descriptor.digest}: cannot read {layer.blob.path}: {exc}"
            ) from exc
        if read != layer.blob.length:
            raise DigestMismatchError(
                f"layer {layer.descriptor.digest}: {layer.blob.path} ended after "
                f"{read} of {layer.blob.length} bytes"
            )
        return digest

    def verify(self) -> None:
        """Raise DigestMismatchError unless the blob hashes to its descriptor digest."""
        layer = self._layer
        check(layer.descriptor.digest, self.result(), where=f"layer {layer.descriptor.digest}",
              over=blob_bytes(layer))  # fmt: skip

    def cancel(self) -> None:
        """Stop (a job not started yet never starts) and wait until it has."""
        self._stop.set()
        if not self._future.cancel():
            try:
                self._future.exception()  # wait: the worker may be inside os.pread
            except CancelledError:
                pass


class DigestCheck(Protocol):
    """A blob's digest check under way: :class:`BlobHasher` or :class:`DownloadCheck`."""

    def verify(self) -> None:
        """Block until done; DigestMismatchError (or the download's error) if it fails."""
        ...

    def cancel(self) -> None:
        """Stop early; the result no longer matters."""
        ...


class DownloadCheck:
    """The digest check of a blob still downloading: the download's own.

    The download hashes every byte as it writes it and only publishes a
    blob whose digest matches (``BlobDownload.commit``); hashing the file
    again while the layer pass reads it would double the work.
    """

    def __init__(self, feed: BlobFeed) -> None:
        self._feed = feed

    def verify(self) -> None:
        self._feed.wait_verified()

    def cancel(self) -> None:
        pass  # the download goes on for the cache, or is cancelled by its owner


def digest_check(layer: Layer, executor: Executor | None = None) -> DigestCheck:
    """Start checking ``layer``'s blob against its digest (see DigestCheck)."""
    if layer.blob.feed is not None:
        return DownloadCheck(layer.blob.feed)
    if layer.blob.assembly is not None:  # tar-split hook: rebuild and check it (layers.rebuilt)
        from imagefs.layers.rebuilt import RebuiltCheck  # noqa: PLC0415 - rebuilt imports us

        return RebuiltCheck(layer)
    return BlobHasher(layer, executor)


class RangeFile:
    """A read-only, seekable file object over ``length`` bytes at ``offset`` of ``fd``.

    This is how rapidgzip reads a blob that is a member of an outer tar. It
    deliberately has no ``fileno()``: given one, rapidgzip would read the
    whole underlying file from its start. ``close()`` leaves the descriptor
    open (its owner closes it). An ``OSError`` from reading, or the error of
    ``wait`` (a download that failed, see BlobRange.wait_for), is kept in
    ``error``, because rapidgzip replaces exceptions from Python callbacks
    with a generic message.
    """

    def __init__(
        self, fd: int, offset: int, length: int, wait: Callable[[int], None] | None = None
    ) -> None:
        self._fd = fd
        self._offset = offset
        self._length = length
        self._pos = 0
        self._wait = wait
        self.error: OSError | ImageFSError | None = None

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._pos
        if size < 0 or size > remaining:
            size = max(remaining, 0)
        if size == 0:
            return b""
        try:
            if self._wait is not None:
                self._wait(self._pos + size)
            data = pread_exact(self._fd, size, self._offset + self._pos)
        except (OSError, ImageFSError) as exc:
            self.error = exc
            raise
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._length + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        raise io.UnsupportedOperation("read-only")

    def close(self) -> None:
        pass  # the descriptor belongs to whoever made this object


def cache_path(cache_dir: str, layer: Layer, version: FormatVersion, key: str = "") -> str:
    """Where ``layer``'s cache file of kind ``version`` lives: ``<alg>-<hex>[.<key>].<tag>``.

    Keyed by the layer's digest, so images sharing a layer share the file;
    the tag (always the last dot-separated part) makes files of other
    versions other names (imagefs.cachedir). ``key``: what else the file
    depends on, if anything (hex; see layers.toc.local).
    """
    digest = layer.descriptor.digest
    middle = f".{key}" if key else ""
    return os.path.join(cache_dir, f"{digest.algorithm}-{digest.encoded}{middle}.{version.tag}")


class InUse:
    """Counts reads in progress so that ``close`` can wait for them.

    Closing a descriptor while another thread is inside ``pread`` on it could
    make that read hit whatever file reuses the number next.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self.closed = False

    def __enter__(self) -> None:
        with self._cond:
            if self.closed:
                raise ValueError("read from a closed layer")
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def close(self) -> bool:
        """Mark closed and wait for reads in progress; False if it was closed already."""
        with self._cond:
            if self.closed:
                return False
            self.closed = True
            while self._active:
                self._cond.wait()
            return True


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return max(int(value), 0)
    except ValueError:
        raise ImageFSError(f"{name}={value!r} is not a whole number") from None


def expansion_limit(compressed: int) -> int:
    """How many bytes a layer of ``compressed`` bytes may decode to (see MAX_EXPANSION)."""
    floor = _env_int("IMAGEFS_EXPANSION_FLOOR", EXPANSION_FLOOR)
    return max(floor, _env_int("IMAGEFS_MAX_EXPANSION", MAX_EXPANSION) * compressed)


class BufferedStream:
    """``read``/``skip``/``tell`` over a decoder that fills a reused buffer.

    The tar scanner asks for 512-byte headers and skips file data. Serving
    both from one big buffer means the decoder only ever sees large reads
    (the fast path of rapidgzip and zstandard) and skipping allocates
    nothing. Skipped bytes are decoded like read ones: rapidgzip's own
    forward seek does not check the CRC of what it passes over.
    """

    def __init__(self, buffer_size: int, layer: Layer | None = None) -> None:
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._pos = 0
        self._produced = 0
        self._bomb_layer = layer
        self._limit = None if layer is None else expansion_limit(layer.blob.length)
        # Every decoded byte (skipped ones too) is hashed when the layer's
        # diff_id is to be checked over the uncompressed stream.
        self._diff_hash = (
            layer.diff_id.hasher()
            if layer is not None and layer.verify_diff_id and layer.diff_id is not None
            else None
        )

    def _fill(self, view: memoryview) -> int:
        """Decode into ``view``; the byte count, 0 only at the end of the stream."""
        raise NotImplementedError

    def _refill(self) -> bool:
        self._start = 0
        self._end = self._fill(self._view)
        self._produced += self._end
        if self._diff_hash is not None:
            self._diff_hash.update(self._view[: self._end])
        if self._limit is not None and self._produced > self._limit:
            assert self._bomb_layer is not None
            blob = self._bomb_layer.blob
            raise CompressionError(
                f"layer {self._bomb_layer.descriptor.digest}: decompresses to more than "
                f"{self._limit} bytes from {blob.length} (a decompression bomb?); the limit "
                f"is max(IMAGEFS_EXPANSION_FLOOR, IMAGEFS_MAX_EXPANSION x compressed size)"
            )
        return self._end > 0

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        start = self._start
        if self._end - start >= n:
            self._start = start + n
            self._pos += n
            return bytes(self._view[start : start + n])
        out = bytearray(self._view[start : self._end])
        self._start = self._end
        while len(out) < n and self._refill():
            take = min(n - len(out), self._end)
            out += self._view[:take]
            self._start = take
        self._pos += len(out)
        return bytes(out)

    def skip(self, n: int) -> None:
        while n > 0:
            if self._start == self._end and not self._refill():
                return
            take = min(n, self._end - self._start)
            self._start += take
            self._pos += take
            n -= take

    def tell(self) -> int:
        return self._pos

    def drain(self) -> None:
        """Decode everything that is left."""
        self._pos += self._end - self._start
        self._start = self._end
        while self._refill():
            self._pos += self._end
            self._start = self._end

    def verify_diff_id(self) -> None:
        """After :meth:`drain`: DigestMismatchError unless the stream hashes to the diff_id."""
        if self._diff_hash is None:
            return
        layer = self._bomb_layer
        assert layer is not None
        self._diff_hash.verify(
            where=f"layer {layer.descriptor.digest}",
            over=f"the uncompressed layer tar ({self._produced} bytes), the config's diff_id",
        )


class DecodedCache:
    """A process-wide LRU of decoded layer data, bounded in bytes (thread-safe).

    Keys are ``(owner, index)``: each reader takes an owner number
    (:func:`new_owner`) and drops its entries when it closes. zstd frames
    (layers.zstd) and TOC chunks (layers.toc.memcache) each keep one, so a
    128 KiB FUSE read of a big file decodes each frame or chunk once, not once
    per read; ``imagefs mount --decoded-cache`` sets their bounds.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._entries.popitem(last=False)[1])

    def drop(self, owner: int) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == owner]:
                self._bytes -= len(self._entries.pop(key))


_OWNER_IDS = itertools.count(1)
_OWNER_LOCK = threading.Lock()


def new_owner() -> int:
    """A key prefix of a :class:`DecodedCache` that no other reader of this process uses."""
    with _OWNER_LOCK:
        return next(_OWNER_IDS)
