"""Decoded, verified chunks kept in memory, shared by every TOC layer reader of a process.

One LRU bounded in bytes (``imagefs mount --decoded-cache`` sets it, with the
other decoded caches): a 128 KiB FUSE read of a big file then decodes each
4 MiB eStargz chunk once, not 32 times. Keys are ``(owner, chunk index)``;
each reader takes an owner number (:func:`new_owner`) and drops its chunks
when it closes. Local (:mod:`~.local`) and lazy registry (:mod:`~.lazy`)
layers share it, so the bound holds over both.
"""

from __future__ import annotations

from imagefs.layers.plumbing import DecodedCache, new_owner

__all__ = ["CHUNK_CACHE_BYTES", "DECODED", "new_owner", "set_chunk_cache_bytes"]

CHUNK_CACHE_BYTES = 32 << 20
DECODED = DecodedCache(CHUNK_CACHE_BYTES)


def set_chunk_cache_bytes(max_bytes: int) -> None:
    """Bound the decoded-chunk LRU (process-wide); extra chunks go at the next put."""
    DECODED.max_bytes = max_bytes
