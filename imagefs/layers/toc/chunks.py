"""One chunk: its compressed bytes in, its verified uncompressed bytes out.

A chunk's bytes start ``inner_offset`` bytes into the gzip member (eStargz)
or zstd frame (zstd:chunked) at its ``offset``; that member may hold more
after it (tar padding, the next headers, other small files), which is not
decoded. Decoding stops at ``inner_offset + size`` bytes and keeps only the
chunk's ``size`` (the bytes before it are thrown away as they come), and the
compressed input is taken as it is needed: a hostile member cannot make the
decoder hold more than the chunk the TOC declared, and the TOC's
declarations are bounded (:mod:`~.limits`). Nothing is returned before the
chunk's sha256 matches the TOC's: that is what lets a reader trust bytes it
fetched from anywhere, given a trusted TOC.
"""

from __future__ import annotations

import io
import threading
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, cast

import zstandard

from imagefs.errors import CompressionError
from imagefs.layers.toc.model import Chunk, TocFormat

__all__ = ["decode_chunk", "decode_chunk_from"]

_STEP = 1 << 20  # decoded bytes per decoder call
_THREAD_LOCAL = threading.local()


def decode_chunk(
    toc_format: TocFormat, chunk: Chunk, compressed: bytes | memoryview, *, where: str
) -> bytes:
    """The chunk's ``size`` bytes, decoded from ``compressed`` and verified (blocking).

    ``compressed`` starts at the chunk's member or frame (``chunk.offset`` in
    the blob) and holds at least what decoding the chunk needs (at most
    ``chunk.length`` bytes). ``where`` names the layer and file in messages.
    CompressionError if the bytes do not decode to that much,
    DigestMismatchError if they decode to other bytes than the TOC says.
    """
    return decode_chunk_from(toc_format, chunk, (compressed,), where=where)


def decode_chunk_from(
    toc_format: TocFormat,
    chunk: Chunk,
    pieces: Iterable[bytes | memoryview],
    *,
    where: str,
) -> bytes:
    """Like :func:`decode_chunk`, with the compressed bytes as consecutive pieces.

    Pieces are taken one at a time until the chunk is decoded, so a caller
    reading them from the blob reads no further than decoding needs.
    """
    if toc_format is TocFormat.ESTARGZ:
        out, decoded = _gunzip(iter(pieces), chunk, where)
        kind = "gzip member"
    else:
        out, decoded = _unzstd(iter(pieces), chunk, where)
        kind = "zstd frame"
    if len(out) < chunk.size:
        raise CompressionError(
            f"{where}: the {kind} at blob offset {chunk.offset} ends after {decoded} decoded "
            f"bytes, before the chunk's end at {chunk.inner_offset + chunk.size}"
        )
    data = bytes(out)
    chunk.digest.verify(
        data,
        where=f"{where}: chunk at {chunk.file_offset} ({chunk.size} bytes, blob offset "
        f"{chunk.offset})",
        over="the chunk's uncompressed bytes",
    )
    return data


class _Collector:
    """Throws away the first ``skip`` decoded bytes, keeps the next ``size``."""

    def __init__(self, skip: int, size: int) -> None:
        self.skip = skip
        self.out = bytearray()
        self.size = size
        self.decoded = 0

    def want(self) -> int:
        return min(_STEP, self.skip + self.size - len(self.out))

    def take(self, data: bytes) -> None:
        self.decoded += len(data)
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
        self.out += data

    @property
    def done(self) -> bool:
        return not self.skip and len(self.out) >= self.size


def _gunzip(
    pieces: Iterator[bytes | memoryview], chunk: Chunk, where: str
) -> tuple[bytearray, int]:
    # One member only: wbits 31 stops at its end (the next member is another chunk).
    decoder = zlib.decompressobj(31)
    collector = _Collector(chunk.inner_offset, chunk.size)
    data: bytes | memoryview = b""
    try:
        while not collector.done and not decoder.eof:
            out = decoder.decompress(data, collector.want())
            data = decoder.unconsumed_tail
            collector.take(out)
            if not out and not data:
                piece = next(pieces, None)
                if piece is None:
                    break
                data = piece
    except zlib.error as exc:
        raise CompressionError(f"{where}: corrupt gzip member at {chunk.offset}: {exc}") from exc
    return collector.out, collector.decoded


class _Pieces(io.RawIOBase):
    """A read-only file over the pieces, for zstandard's stream reader (which only calls read)."""

    def __init__(self, pieces: Iterator[bytes | memoryview]) -> None:
        super().__init__()
        self._pieces = pieces
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self._pending:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._pending = memoryview(piece)
        size = len(self._pending) if size < 0 else size
        out, self._pending = self._pending[:size], self._pending[size:]
        return bytes(out)


def _unzstd(
    pieces: Iterator[bytes | memoryview], chunk: Chunk, where: str
) -> tuple[bytearray, int]:
    # A ZstdDecompressor must not be used by two threads at once.
    dctx: zstandard.ZstdDecompressor | None = getattr(_THREAD_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _THREAD_LOCAL.dctx = zstandard.ZstdDecompressor()
    collector = _Collector(chunk.inner_offset, chunk.size)
    try:
        # One frame only, the chunk's: a stream reader, unlike decompressobj,
        # produces no more than asked however much a block expands.
        with dctx.stream_reader(
            cast(IO[bytes], _Pieces(pieces)), read_across_frames=False
        ) as reader:
            while not collector.done:
                out = reader.read(collector.want())
                if not out:
                    break
                collector.take(out)
    except zstandard.ZstdError as exc:
        raise CompressionError(f"{where}: corrupt zstd frame at {chunk.offset}: {exc}") from exc
    return collector.out, collector.decoded
