"""A lazy layer's verified chunks on disk, as the compressed bytes the registry sent.

Layout, under the cache directory::

    chunks/<alg>-<hex>.<LAZY_CHUNKS tag>/<offset>   bytes [offset, offset + size) of the blob

one file per gzip member (eStargz) or zstd frame (zstd:chunked) that holds a
verified chunk, written whole through :class:`imagefs.cachedir.AtomicFile`
(two mounts storing the same member each rename a whole, identical file).
The bytes are the *compressed* ones, for three reasons: they are what a
later read decodes and checks against the TOC's chunk digest again, so a
cache file changed on disk gives EIO, never wrong data; they take the
layer's compressed size at most, not its uncompressed size; and they are
the blob's own bytes, so their total says how much of the layer is local.

Only bytes that decoded to a chunk whose digest matched are stored
(:mod:`~.lazy` stores a member after every chunk in it verified).
"""

from __future__ import annotations

import contextlib
import logging
import os

from imagefs.cachedir import LAZY_CHUNKS, write_atomically
from imagefs.digest import Digest

__all__ = ["ChunkStore", "chunk_dir", "layer_local_bytes", "stored_bytes"]

log = logging.getLogger(__name__)


def chunk_dir(cache_dir: str, digest: Digest) -> str:
    """Where the verified members of the layer ``digest`` are kept."""
    name = f"{digest.algorithm}-{digest.encoded}.{LAZY_CHUNKS.tag}"
    return os.path.join(cache_dir, "chunks", name)


class ChunkStore:
    """The verified members of one lazy layer (thread-safe; every method may block on disk)."""

    def __init__(self, cache_dir: str, digest: Digest) -> None:
        self.directory = chunk_dir(cache_dir, digest)
        self._writable = True

    def _path(self, offset: int) -> str:
        return os.path.join(self.directory, str(offset))

    def get(self, offset: int, max_size: int) -> bytes | None:
        """The stored bytes of the member at ``offset`` (at most ``max_size``); None if absent."""
        try:
            fd = os.open(self._path(offset), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            # A file grown on disk is cut at what its member may hold; the
            # decoder's digest check decides whether what remains is good.
            return os.pread(fd, max_size, 0) or None
        except OSError:
            return None
        finally:
            os.close(fd)

    def has(self, offset: int) -> bool:
        return os.path.exists(self._path(offset))

    def put(self, offset: int, data: bytes) -> None:
        """Keep ``data`` (verified) as the member at ``offset``; a failure only costs a refetch."""
        if not self._writable:
            return
        try:
            write_atomically(self._path(offset), data)
        except OSError as exc:
            self._writable = False  # one warning, not one per chunk
            log.warning("cannot keep fetched chunks in %s: %s", self.directory, exc)

    def local_bytes(self) -> int:
        """How many of the blob's bytes are stored (for ``imagefs mounts`` and ``inspect``)."""
        return stored_bytes(self.directory)


def stored_bytes(directory: str) -> int:
    """The total size of the member files in ``directory`` (0 if it does not exist)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def layer_local_bytes(cache_dir: str, digest: Digest, size: int) -> int:
    """How many bytes of a lazy layer the cache holds: all once its blob is there."""
    whole = os.path.join(cache_dir, "blobs", digest.algorithm, digest.encoded)
    if os.path.exists(whole):
        return size
    return min(size, stored_bytes(chunk_dir(cache_dir, digest)))
