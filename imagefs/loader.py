"""From a resolved :class:`Image` to a servable tree: scan, merge, open.

Each layer is read once, sequentially: its blob digest is verified while the
tar headers are indexed. The merged tree is then frozen, and each layer gets a
random-access reader for file data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from . import layerindex
from .content import ContentReader
from .entry import TarEntry
from .errors import ImageFSError
from .image import Image, Layer
from .layerio import LayerData, open_layer_data, open_layer_stream, random_access_cached
from .layerio_base import BlobHasher
from .overlay import Node, merge_layers
from .progress import Progress
from .tree import MergedTree, freeze

log = logging.getLogger(__name__)

_PROGRESS_EVERY = 512  # entries between progress updates

# Makes the tree to serve from the scanned layers (base first); the default is
# the merged root file system, imagefs.views makes the --layers tree.
TreeBuilder = Callable[[Sequence[Sequence[TarEntry]], Callable[[str], None]], Node]


def short_digest(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}"


@dataclass
class LoadedImage:
    """An image ready to serve. Owns the layer readers: call :meth:`close`."""

    image: Image
    tree: MergedTree
    content: ContentReader
    _resources: ExitStack = field(repr=False)

    def close(self) -> None:
        self._resources.close()


def scan_layer(
    layer: Layer,
    index: int,
    count: int,
    *,
    warn: Callable[[str], None],
    progress: Progress,
    cache_dir: Path | None = None,
    hasher: BlobHasher | None = None,
) -> list[TarEntry]:
    """Index one layer's tar headers, verifying its digest (blocking).

    With ``cache_dir``, a layer indexed before (by any image) is loaded from
    its cached index instead (see :mod:`imagefs.layerindex`), and a layer
    scanned now is cached for the next image that shares it. ``hasher``:
    the layer's digest check, if started ahead (layerio.check_digests_ahead).
    """
    # The scanner compiles its header patterns at import (~30 ms); a mount
    # served from the persisted tree never scans, so load it on first use.
    from .tarscan import scan_tar  # noqa: PLC0415

    name = short_digest(layer.descriptor.digest)
    progress.start(f"layer {index + 1}/{count} {name}")
    cache = str(cache_dir) if cache_dir else None
    entries: list[TarEntry] = []
    warnings: list[str] = []

    def warn_layer(message: str) -> None:
        warnings.append(message)
        warn(f"layer {name}: {message}")

    try:
        if cache is not None and random_access_cached(layer, cache):
            cached = layerindex.load(cache, layer, hasher)
            if cached is not None:
                entries, warnings = cached
                for message in warnings:
                    warn(f"layer {name}: {message}")
                progress.finish(len(entries), layer.blob.length)
                return entries
        # With a cache dir the same pass also leaves the gzip checkpoints or
        # the zstd seekable re-encoding there, so open_layer_data decodes nothing.
        with open_layer_stream(layer, cache, hasher) as stream:
            for entry in scan_tar(stream, warn_layer):
                entries.append(entry)
                if len(entries) % _PROGRESS_EVERY == 0:
                    progress.update(len(entries), stream.tell())
            position = stream.tell()
    except ImageFSError as exc:
        progress.finish(len(entries), 0)
        raise type(exc)(f"layer {index + 1}/{count} ({layer.descriptor.digest}): {exc}") from exc
    # Only now is the digest verified (the stream checks it on exit).
    if cache is not None:
        layerindex.save(cache, layer, entries, warnings)
    progress.finish(len(entries), position)
    return entries


def load_image(
    image: Image,
    *,
    cache_dir: Path | None,
    warn: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    build: TreeBuilder = merge_layers,
) -> LoadedImage:
    """Scan and merge ``image``'s layers and open them for reading (blocking).

    ``build`` makes the tree from the layers' entries (default: the merge).
    """
    warn = warn or log.warning
    progress = progress or Progress(False)
    count = len(image.layers)
    layer_entries = [
        scan_layer(layer, index, count, warn=warn, progress=progress, cache_dir=cache_dir)
        for index, layer in enumerate(image.layers)
    ]
    tree = freeze(build(layer_entries, warn))
    del layer_entries
    return with_readers(image, tree, cache_dir, ExitStack())


def with_readers(
    image: Image, tree: MergedTree, cache_dir: Path | None, resources: ExitStack
) -> LoadedImage:
    """Open a random-access reader per layer; ``resources`` will close them."""
    try:
        readers: list[LayerData] = []
        for layer in image.layers:
            reader = open_layer_data(layer, str(cache_dir) if cache_dir else None)
            resources.callback(reader.close)
            readers.append(reader)
    except BaseException:
        resources.close()
        raise
    names = [layer.descriptor.digest for layer in image.layers]
    return LoadedImage(image, tree, ContentReader(readers, names), resources)
