"""Does a layer carry a TOC, and where: from its annotations and the blob's last bytes.

An eStargz blob ends in its footer (the gzip TOC needs it: its annotation
gives only the digest). A zstd:chunked blob is found by its
``manifest-position`` annotation, or else by its footer (a docker-archive
drops annotations). The digests that the annotations give are kept for the
TOC's check: eStargz's ``toc.digest`` over the TOC JSON, zstd:chunked's
``manifest-checksum`` over the compressed TOC frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imagefs.digest import Digest
from imagefs.errors import TocError
from imagefs.layers.toc import estargz, zstdchunked
from imagefs.layers.toc.model import TocFormat

__all__ = ["TAIL_SIZE", "TocLocation", "locate"]

# The most of the blob's end a footer can take: zstd:chunked's skippable frame
# header and 64-byte footer (an eStargz footer is 51 bytes).
TAIL_SIZE = zstdchunked.SKIPPABLE_HEADER + max(zstdchunked.FOOTER_SIZES)


@dataclass(frozen=True, slots=True)
class TocLocation:
    """Where a layer's TOC is, and the digests that must match it.

    ``offset``/``length``: the compressed TOC (eStargz: its gzip member; zstd:
    the skippable frame *with* its 8-byte header, so it can be checked).
    ``uncompressed_length``: the JSON's size, when the format records it
    (zstd:chunked). ``payload_end``: where the TOC's bytes begin, so every
    chunk must end by then. ``json_digest`` (``toc.digest``) and
    ``compressed_digest`` (``manifest-checksum``), when annotated.
    """

    format: TocFormat
    offset: int
    length: int
    uncompressed_length: int | None
    payload_end: int
    json_digest: Digest | None
    compressed_digest: Digest | None


def locate(
    blob_size: int, annotations: Mapping[str, str], tail: bytes, where: str
) -> TocLocation | None:
    """The TOC of a blob of ``blob_size`` bytes ending in ``tail``; None if it has none.

    ``tail`` is the blob's last :data:`TAIL_SIZE` bytes (all of it if
    shorter). TocError if a footer or annotation says there is a TOC but
    cannot be right (malformed, outside the blob); InvalidDigestError for a
    malformed digest annotation.
    """
    json_digest = _digest(annotations, estargz.TOC_DIGEST_ANNOTATION, where)
    footer = estargz.parse_footer(tail, where)
    if footer is not None:
        end = blob_size - footer.size
        if not 0 <= footer.toc_offset < end:
            raise TocError(
                f"{where}: eStargz footer puts the TOC at {footer.toc_offset}, outside the "
                f"{end} bytes before the footer"
            )
        length = end - footer.toc_offset
        return TocLocation(
            TocFormat.ESTARGZ, footer.toc_offset, length, None, footer.toc_offset,
            json_digest, None,
        )  # fmt: skip
    position_value = zstdchunked.annotation(annotations, zstdchunked.POSITION)
    position = (
        zstdchunked.parse_position(position_value, where)
        if position_value is not None
        else zstdchunked.parse_footer(tail, where)
    )
    if position is None:
        return None
    checksum = zstdchunked.annotation(annotations, zstdchunked.CHECKSUM)
    compressed_digest = (
        Digest.parse(checksum, f"{where}: zstd:chunked manifest-checksum")
        if checksum is not None
        else None
    )
    start = position.offset - zstdchunked.SKIPPABLE_HEADER
    end = position.offset + position.length
    if start < 0 or position.length <= 0 or end > blob_size - position.footer_size:
        raise TocError(
            f"{where}: zstd:chunked TOC at {position.offset} ({position.length} bytes) is "
            f"outside the blob's {blob_size} bytes"
        )
    return TocLocation(
        TocFormat.ZSTD_CHUNKED, start, end - start, position.uncompressed_length, start,
        json_digest, compressed_digest,
    )  # fmt: skip


def _digest(annotations: Mapping[str, str], key: str, where: str) -> Digest | None:
    value = annotations.get(key)
    return None if value is None else Digest.parse(value, f"{where}: annotation {key}")
