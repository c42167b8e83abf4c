"""zstd:chunked: where the TOC is (annotations or footer), and its zstd frame.

A zstd:chunked blob (containers/storage ``pkg/chunked/compressor``, written by
podman, buildah and skopeo ``--dest-compress-format zstd:chunked``; and
stargz-snapshotter's ``estargz/zstdchunked``, written by ``ctr-remote
convert --zstdchunked``) is a sequence of zstd frames that decompresses to a
layer tar, every file's data (or each chunk of it) in frames of its own, then
two or three zstd *skippable* frames, which decoders pass over::

    [frames] [skippable: TOC (one zstd frame)] ([skippable: tar-split]) [skippable: footer]

A skippable frame is a 4-byte magic ``0x184D2A5?`` and a 4-byte
little-endian length (RFC 8878, 3.1.2). The footer's payload is
little-endian u64s: TOC offset (of the zstd frame, past its skippable
header), compressed length, uncompressed length, manifest type (1, "CRFS"),
and in newer containers/storage also the tar-split's offset and lengths,
then an 8-byte magic: 40 bytes in all (containers/storage before 1.48 and
ctr-remote), 64 with the tar-split. The magic was ``GnUlInUx`` and is now
``GNUlInUx`` (containers/storage ``internal/minimal``): both are accepted.

The layer annotation ``...zstd-chunked.manifest-position`` says the same as
``offset:length:uncompressed-length:type``, and ``...manifest-checksum`` is
the sha256 of the *compressed* TOC frame. Writers spell the prefix
``io.github.containers.zstd-chunked.`` (containers/storage since late 2022)
or ``io.containers.zstd-chunked.`` (before, ctr-remote, skopeo 1.9): both
are read. The annotation wins when given (containers/storage itself never
reads the footer: the digest that makes a TOC trustworthy is in the
manifest anyway). ctr-remote's TOC is eStargz's JSON, also named by the
eStargz ``toc.digest`` annotation; containers/storage's has its own fields
(:mod:`imagefs.layers.toc.jsontoc` reads both).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import zstandard

from imagefs.errors import TocError

__all__ = [
    "ANNOTATION_PREFIXES",
    "ZstdChunkedPosition",
    "annotation",
    "decode_toc_frame",
    "parse_footer",
    "parse_position",
]

ANNOTATION_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
POSITION = "manifest-position"
CHECKSUM = "manifest-checksum"
MANIFEST_TYPE_CRFS = 1
FOOTER_MAGICS = (b"GnUlInUx", b"GNUlInUx")
FOOTER_SIZES = (64, 40)  # payload bytes: with the tar-split fields, and without
SKIPPABLE_HEADER = 8

_SKIPPABLE = struct.Struct("<II")
_FOOTER_FIELDS = struct.Struct("<QQQQ")
_POSITION = re.compile(r"([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19})")


@dataclass(frozen=True, slots=True)
class ZstdChunkedPosition:
    """Where the TOC's zstd frame is: ``offset`` is past its skippable frame header."""

    offset: int
    length: int
    uncompressed_length: int
    footer_size: int  # the footer's skippable frame, 0 when the annotation said where


def is_skippable(header: bytes) -> bool:
    return len(header) >= 4 and _SKIPPABLE.unpack_from(header.ljust(8, b"\0"))[0] >> 4 == 0x184D2A5


def annotation(annotations: Mapping[str, str], name: str) -> str | None:
    """The value of ``...zstd-chunked.NAME`` under either prefix, if present."""
    for prefix in ANNOTATION_PREFIXES:
        value = annotations.get(prefix + name)
        if value is not None:
            return value
    return None


def parse_position(value: str, where: str) -> ZstdChunkedPosition:
    """The ``manifest-position`` annotation: ``offset:length:uncompressed-length:type``."""
    match = _POSITION.fullmatch(value)
    if match is None:
        raise TocError(
            f"{where}: zstd:chunked manifest-position {value!r} is not "
            "offset:length:uncompressed-length:type"
        )
    offset, length, uncompressed, kind = map(int, match.groups())
    if kind != MANIFEST_TYPE_CRFS:
        raise TocError(f"{where}: zstd:chunked manifest type {kind} is not 1 (CRFS)")
    return ZstdChunkedPosition(offset, length, uncompressed, 0)


def parse_footer(tail: bytes, where: str) -> ZstdChunkedPosition | None:
    """The position the footer frame at the end of ``tail`` gives; None if there is none."""
    for size in FOOTER_SIZES:
        frame = tail[-(SKIPPABLE_HEADER + size) :]
        if len(frame) != SKIPPABLE_HEADER + size or not is_skippable(frame):
            continue
        if _SKIPPABLE.unpack_from(frame)[1] != size or frame[-8:] not in FOOTER_MAGICS:
            continue
        offset, length, uncompressed, kind = _FOOTER_FIELDS.unpack_from(frame, SKIPPABLE_HEADER)
        if kind != MANIFEST_TYPE_CRFS:
            raise TocError(f"{where}: zstd:chunked footer: manifest type {kind} is not 1 (CRFS)")
        return ZstdChunkedPosition(offset, length, uncompressed, SKIPPABLE_HEADER + size)
    return None


def decode_toc_frame(frame_and_header: bytes, uncompressed_length: int, where: str) -> bytes:
    """The TOC JSON from its skippable frame header and the zstd frame inside it.

    The header must be a skippable frame exactly as long as the TOC frame
    (what both writers produce), and the frame must decode to exactly
    ``uncompressed_length`` bytes.
    """
    header, compressed = frame_and_header[:SKIPPABLE_HEADER], frame_and_header[SKIPPABLE_HEADER:]
    if not is_skippable(header) or _SKIPPABLE.unpack_from(header)[1] != len(compressed):
        raise TocError(
            f"{where}: zstd:chunked TOC is not in a skippable frame of its length "
            f"({len(compressed)} bytes)"
        )
    parts: list[bytes] = []
    got = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(compressed), read_across_frames=False
        ) as reader:
            # One byte more than said, to tell "longer" from "exact".
            while got <= uncompressed_length:
                part = reader.read(uncompressed_length + 1 - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
    except zstandard.ZstdError as exc:
        raise TocError(f"{where}: zstd:chunked TOC frame is corrupt: {exc}") from exc
    data = b"".join(parts)
    if len(data) != uncompressed_length:
        raise TocError(
            f"{where}: zstd:chunked TOC decodes to {len(data)}"
            f"{'+' if len(data) > uncompressed_length else ''} bytes, its position says "
            f"{uncompressed_length}"
        )
    return data
