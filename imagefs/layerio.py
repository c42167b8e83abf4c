"""Reading layer blobs: compression detection, one sequential pass, random access.

(Interface stub: the implementation replaces the bodies below.)
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from .image import Layer


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class LayerStream(Protocol):
    """Sequential reader of a layer's *uncompressed* bytes (one indexing pass)."""

    def read(self, n: int) -> bytes:
        """Return exactly ``n`` bytes, fewer only at end of stream."""
        ...

    def skip(self, n: int) -> None:
        """Advance ``n`` bytes (may seek; must still hash what it skips)."""
        ...

    def tell(self) -> int:
        """Position in the uncompressed stream."""
        ...


class LayerData(Protocol):
    """Thread-safe random access to a layer's uncompressed bytes."""

    def pread(self, offset: int, size: int) -> bytes: ...

    def close(self) -> None: ...


def detect_compression(layer: Layer) -> Compression:
    raise NotImplementedError


@contextmanager
def open_layer_stream(layer: Layer) -> Iterator[LayerStream]:
    raise NotImplementedError
    yield


def open_layer_data(layer: Layer, cache_dir: str | None = None) -> LayerData:
    raise NotImplementedError
