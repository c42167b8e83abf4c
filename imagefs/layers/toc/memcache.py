"""Decoded, verified chunks kept in memory, shared by every TOC layer reader of a process.

One LRU bounded in bytes (``imagefs mount --decoded-cache`` sets it, with the
other decoded caches): a 128 KiB FUSE read of a big file then decodes each
4 MiB eStargz chunk once, not 32 times. Keys are ``(owner, chunk index)``;
each reader takes an owner number (:func:`new_owner`) and drops its chunks
when it closes. Local (:mod:`~.local`) and lazy registry (:mod:`~.lazy`)
layers share it, so the bound holds over both.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

__all__ = ["CHUNK_CACHE_BYTES", "DECODED", "DecodedChunks", "new_owner", "set_chunk_cache_bytes"]

CHUNK_CACHE_BYTES = 32 << 20


class DecodedChunks:
    """Process-wide LRU of decoded, verified chunks, bounded in bytes (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._chunks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._chunks.get(key)
            if data is not None:
                self._chunks.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._chunks[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._chunks.popitem(last=False)[1])

    def drop(self, owner: int) -> None:
        with self._lock:
            for key in [k for k in self._chunks if k[0] == owner]:
                self._bytes -= len(self._chunks.pop(key))


DECODED = DecodedChunks(CHUNK_CACHE_BYTES)
_OWNER_IDS = itertools.count(1)
_OWNER_LOCK = threading.Lock()


def new_owner() -> int:
    """A key prefix no other reader of this process uses."""
    with _OWNER_LOCK:
        return next(_OWNER_IDS)


def set_chunk_cache_bytes(max_bytes: int) -> None:
    """Bound the decoded-chunk LRU (process-wide); extra chunks go at the next put."""
    DECODED.max_bytes = max_bytes
