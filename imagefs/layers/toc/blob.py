"""A layer blob on local disk as a TOC's byte source, and the question "has it a TOC?".

The blob may be a range of an outer file (a layer inside a docker-archive):
every read is bounded by the layer's range and retried until whole.
"""

from __future__ import annotations

import os

from imagefs.errors import BlobError, BlobMissingError, TocError
from imagefs.image import Layer
from imagefs.layers.plumbing import check_blob, pread_exact
from imagefs.layers.toc import estargz, zstdchunked
from imagefs.layers.toc.locate import TAIL_SIZE, TocLocation, locate
from imagefs.layers.toc.model import TocFormat

__all__ = ["LayerBlob", "find_toc", "has_estargz_toc", "toc_format"]

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class LayerBlob:
    """Reads of a layer's blob by offset (a :class:`~.read.BlobReader`); owns a descriptor."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.where = f"layer {layer.descriptor.digest}"
        try:
            self.fd = layer.blob.open_fd()
        except FileNotFoundError as exc:
            raise BlobMissingError(f"{self.where}: {layer.blob.path} is missing") from exc
        except OSError as exc:
            raise BlobError(f"{self.where}: cannot open {layer.blob.path}: {exc}") from exc
        try:
            check_blob(layer, self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def size(self) -> int:
        return self.layer.blob.length

    def read_at(self, offset: int, size: int) -> bytes:
        blob = self.layer.blob
        if offset < 0 or size < 0 or offset + size > blob.length:
            raise TocError(
                f"{self.where}: {size} bytes at {offset} are outside the blob's {blob.length}"
            )
        try:
            data = pread_exact(self.fd, size, blob.offset + offset)
        except OSError as exc:
            raise BlobError(f"{self.where}: cannot read {blob.path}: {exc}") from exc
        if len(data) != size:
            raise BlobError(
                f"{self.where}: {blob.path} ends after {len(data)} of {size} bytes at "
                f"{blob.offset + offset} (truncated?)"
            )
        return data

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> LayerBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tail(blob: LayerBlob) -> bytes:
    size = blob.size
    return blob.read_at(size - min(size, TAIL_SIZE), min(size, TAIL_SIZE))


def find_toc(blob: LayerBlob) -> TocLocation | None:
    """Where the blob's TOC is; None if it has none (two small reads).

    Annotations locate a zstd:chunked TOC; the footer an eStargz one (and a
    zstd:chunked one without annotations). The blob's first bytes must be of
    the format's compression: a gzip footer on a zstd stream is no TOC.
    """
    layer = blob.layer
    if blob.size < 4:
        return None
    location = locate(blob.size, dict(layer.descriptor.annotations), _tail(blob), blob.where)
    if location is None:
        return None
    head = blob.read_at(0, 4)
    expected = _GZIP_MAGIC if location.format is TocFormat.ESTARGZ else _ZSTD_MAGIC
    if not head.startswith(expected):
        return None
    return location


def toc_format(layer: Layer) -> TocFormat | None:
    """The TOC format the layer's annotations or footer say it has (for any complete blob).

    Unlike :func:`find_toc` this does not check that the TOC can be found,
    only which format the layer is written in, which decides what its tar
    stream legitimately looks like (:mod:`~.bookkeeping`). Unreadable or
    malformed footers count as none.
    """
    annotations = dict(layer.descriptor.annotations)
    if zstdchunked.annotation(annotations, zstdchunked.POSITION) is not None:
        return TocFormat.ZSTD_CHUNKED
    try:
        layer.blob.wait_for(layer.blob.length)
        with LayerBlob(layer) as blob:
            if blob.size < 4:
                return None
            tail = _tail(blob)
    except (BlobError, TocError):
        return None
    try:
        if estargz.parse_footer(tail, "") is not None:
            return TocFormat.ESTARGZ
        if zstdchunked.parse_footer(tail, "") is not None:
            return TocFormat.ZSTD_CHUNKED
    except TocError:
        pass
    return None


def has_estargz_toc(layer: Layer) -> bool:
    """Whether the layer was written by the eStargz library: its footer or annotation.

    That covers ctr-remote's zstd:chunked layers too, which carry the eStargz
    ``toc.digest`` annotation and, like every eStargz layer, a prefetch
    landmark file.
    """
    if estargz.TOC_DIGEST_ANNOTATION in dict(layer.descriptor.annotations):
        return True
    return toc_format(layer) is TocFormat.ESTARGZ
