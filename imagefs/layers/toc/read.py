"""From a located TOC to a verified, checked :class:`~.model.Toc`.

The order is the trust chain's: read the compressed TOC; check it against
every digest the layer's annotations give (zstd:chunked's
``manifest-checksum`` over the compressed frame, eStargz's ``toc.digest``
over the JSON) before decoding anything from it beyond what that needs; only
then parse the JSON. A TOC whose digest does not match raises
DigestMismatchError, which refuses the mount.

Where the TOC's bytes come from is the caller's (:class:`BlobReader`): a
local blob file, or (later) Range requests to a registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from imagefs.digest import Digest, check
from imagefs.errors import TocError
from imagefs.layers.entry import TarEntry
from imagefs.layers.toc import estargz, zstdchunked
from imagefs.layers.toc.jsontoc import parse_entries
from imagefs.layers.toc.limits import MAX_TOC_BYTES, NotServable
from imagefs.layers.toc.locate import TocLocation
from imagefs.layers.toc.model import TOC_DATA_BASE, Chunk, Toc, TocFormat
from imagefs.layers.toc.table import ChunkTable

__all__ = ["TOC_PIECE", "BlobReader", "read_toc"]

# stargz.index.json is listed as a file of the layer (it is one, in the tar):
# its data, inside the TOC member, is served in pieces of this size, each
# with its own digest, so a read of it holds one piece, not the whole TOC.
TOC_PIECE = 4 << 20


class BlobReader(Protocol):
    """Where a layer's bytes come from, by offset in the blob."""

    def read_at(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` of the blob (blocking); raises if it cannot."""
        ...


def read_toc(
    blob: BlobReader,
    location: TocLocation,
    *,
    where: str,
    warn: Callable[[str], None],
    require_digest: bool = False,
) -> Toc | NotServable:
    """Read, verify and parse the TOC at ``location``.

    ``require_digest``: refuse (TocError) a TOC no annotation names a digest
    for; a registry's lazy reads must (the verified manifest is all that
    vouches for the TOC), a local blob whose own digest is checked need not.
    """
    if location.length > MAX_TOC_BYTES + zstdchunked.SKIPPABLE_HEADER:
        return NotServable(f"its TOC is {location.length} bytes compressed, over {MAX_TOC_BYTES}")
    expected = location.uncompressed_length
    if expected is not None and expected > MAX_TOC_BYTES:
        return NotServable(f"its TOC is {expected} bytes, over {MAX_TOC_BYTES}")
    if require_digest and location.json_digest is None and location.compressed_digest is None:
        raise TocError(
            f"{where}: no annotation gives the digest of its {location.format.value} TOC"
        )
    raw = blob.read_at(location.offset, location.length)
    toc_entry: TarEntry | None = None
    if location.format is TocFormat.ZSTD_CHUNKED:
        if location.compressed_digest is not None:
            location.compressed_digest.verify(
                memoryview(raw)[zstdchunked.SKIPPABLE_HEADER :],
                where=f"{where}: zstd:chunked TOC",
                over="the compressed TOC frame (manifest-checksum)",
            )
        assert expected is not None  # zstd:chunked positions always say
        document = zstdchunked.decode_toc_frame(raw, expected, where)
    else:
        decoded = estargz.decode_toc_member(raw, where, warn)
        if isinstance(decoded, NotServable):
            return decoded
        document, toc_entry = decoded
    digest = Digest.of(document)
    expected_json = location.json_digest
    if expected_json is not None:
        # Hashed once: a big TOC is tens of MB of JSON.
        found = digest if expected_json.algorithm == digest.algorithm else None
        check(
            expected_json,
            found or Digest.of(document, expected_json.algorithm),
            where=f"{where}: {location.format.value} TOC",
            over="the TOC JSON (toc.digest)",
        )
    parsed = parse_entries(document, toc_format=location.format,
                           payload_end=location.payload_end, where=where, warn=warn)  # fmt: skip
    if isinstance(parsed, NotServable):
        return parsed
    entries, chunks = parsed
    if toc_entry is not None:
        # The TOC's own tar entry: a file of the layer, whose bytes are the JSON.
        entries = (*entries, _toc_file(toc_entry, document, location, chunks, len(entries)))
    return Toc(location.format, digest, entries, chunks, location.payload_end)


def _toc_file(
    entry: TarEntry, document: bytes, location: TocLocation, chunks: ChunkTable, position: int
) -> TarEntry:
    """The TOC's tar entry as entry ``position``, its pieces appended to ``chunks``."""
    base = chunks.data_size
    for start in range(0, len(document), TOC_PIECE):
        piece = Chunk(
            file_offset=start,
            size=min(TOC_PIECE, len(document) - start),
            offset=location.offset,
            length=location.length,
            inner_offset=entry.data_offset + start,
            digest=Digest.of(document[start : start + TOC_PIECE]),
        )
        chunks.append(base + start, piece, position)
    chunks.data_size = base + len(document)
    return replace(entry, data_offset=TOC_DATA_BASE + base)
