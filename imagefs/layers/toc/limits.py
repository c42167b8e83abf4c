"""Bounds on what a table of contents may make imagefs do, and the fallback signal.

A TOC is untrusted input: these bound the memory one costs to parse and one
chunk costs to decode. Past them the TOC is not an error (the layer is still a
valid gzip or zstd tar) but it cannot be served chunk by chunk within bounded
memory, so the layer is read the ordinary way instead (:class:`NotServable`),
as containers/storage falls back to an ordinary download for a TOC over its
own 150 MiB limit (``pkg/chunked/compression_linux.go``, ``maxTocSize``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_CHUNK_SIZE",
    "MAX_INNER_OFFSET",
    "MAX_TOC_BYTES",
    "MAX_TOC_ENTRIES",
    "NotServable",
]

# The TOC, compressed and as JSON: containers/storage's limit. ~150 bytes of
# JSON per entry, so about a million files; json.loads needs ~10x in memory.
MAX_TOC_BYTES = 150 << 20
MAX_TOC_ENTRIES = 1 << 22
# A chunk is decoded and verified whole (its digest covers all of it) and
# cached whole, so its uncompressed size is bounded. eStargz writers default
# to 4 MiB chunks (BuildKit, ctr-remote); containers/storage splits files with
# a rolling checksum (~64 KiB on average) but leaves an unsplittable file whole.
MAX_CHUNK_SIZE = 32 << 20
# What may be decoded and thrown away before a chunk inside its member
# (eStargz innerOffset, and the TOC JSON behind its tar header): enough for
# the TOC member itself, so a hostile offset cannot make one read decode for
# long.
MAX_INNER_OFFSET = MAX_TOC_BYTES + (4 << 20)


@dataclass(frozen=True, slots=True)
class NotServable:
    """A well-formed TOC that cannot be served chunk by chunk; ``reason`` says why."""

    reason: str
