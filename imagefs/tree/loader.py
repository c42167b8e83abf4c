"""From a resolved :class:`Image` to a servable tree: scan, merge, open.

Each layer is read once, sequentially: its blob digest is verified while the
tar headers are indexed. The merged tree is then frozen, and each layer gets a
random-access reader for file data.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from imagefs.cachedir import build_lock
from imagefs.errors import ImageFSError
from imagefs.image import Descriptor, Image, Layer
from imagefs.layers import index as layer_index
from imagefs.layers.entry import TarEntry
from imagefs.layers.plumbing import DigestCheck
from imagefs.layers.reader import (
    Compression,
    LayerData,
    detect_compression,
    digests_checked_ahead,
    open_layer_data,
    open_layer_stream,
    random_access_cached,
)
from imagefs.layers.toc.blob import toc_format
from imagefs.layers.toc.bookkeeping import mark_bookkeeping, tolerates_missing_end
from imagefs.layers.toc.local import scan_toc_layer
from imagefs.progress import Progress
from imagefs.tree.content import ContentReader
from imagefs.tree.gcpause import gc_paused
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import Node, merge_layers
from imagefs.tree.served import Tree

log = logging.getLogger(__name__)

_PROGRESS_EVERY = 512  # entries between progress updates

# Makes the tree to serve from the scanned layers (base first); the default is
# the merged root file system, imagefs.forensics.views makes the --layers tree.
TreeBuilder = Callable[[Sequence[Sequence[TarEntry]], Callable[[str], None]], Node]


# Opens a reader for layer ``index`` some other way than open_layer_data (a
# lazy registry layer, imagefs.registry.lazy); None: the ordinary way.
LayerOpener = Callable[[int, Layer], "LayerData | None"]


@dataclass
class LoadedImage:
    """An image ready to serve. Owns the layer readers: call :meth:`close`.

    ``on_live``: what to start once the mount is live (a lazy registry
    image's background prefetch); ``lazy_layers``: the descriptors of the
    layers served by Range requests, for ``imagefs mounts``.
    """

    image: Image
    tree: Tree
    content: ContentReader
    _resources: ExitStack = field(repr=False)
    on_live: Callable[[], None] | None = None
    lazy_layers: tuple[Descriptor, ...] = ()

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
    hasher: DigestCheck | None = None,
    stop: threading.Event | None = None,
    compression: Compression | None = None,
) -> list[TarEntry]:
    """Index one layer's tar headers, verifying its digest (blocking).

    With ``cache_dir``, a layer indexed before (by any image) is loaded from
    its cached index instead (see :mod:`imagefs.layers.index`), and a layer
    scanned now is cached for the next image that shares it. ``hasher``:
    the layer's digest check, if started ahead (layers.reader.digests_checked_ahead).
    ``stop``: set when another layer failed; the scan then gives up early.
    ``compression``: the layer's, if already detected.
    """
    # The scanner compiles its header patterns at import (~30 ms); a mount
    # served from the persisted tree never scans, so load it on first use.
    from imagefs.layers.tarscan import MISSING_END_MARKER, scan_tar  # noqa: PLC0415

    name = layer.descriptor.digest.short()
    task = progress.start(f"layer {index + 1}/{count} {name}")
    cache = str(cache_dir) if cache_dir else None
    entries: list[TarEntry] = []
    warnings: list[str] = []

    def warn_layer(message: str) -> None:
        # zstd:chunked streams end without end-of-archive blocks by design
        # (imagefs.layers.toc.bookkeeping): not worth a warning on every mount.
        if message.endswith(MISSING_END_MARKER) and tolerates_missing_end(layer):
            log.debug("layer %s: %s (as zstd:chunked streams do)", name, message)
            return
        warnings.append(message)
        warn(f"layer {name}: {message}")

    try:
        # Mounts of images that share this layer (a fleet starting at once)
        # scan it once: the others wait here, then read the index it leaves.
        lock = (
            build_lock(Path(layer_index.index_path(cache, layer)), best_effort=True)
            if cache is not None
            else nullcontext()
        )
        with lock:
            if cache is not None and random_access_cached(layer, cache, compression):
                cached = layer_index.load(cache, layer, hasher)
                if cached is not None:
                    log.debug("layer %s: entries from its cached index", name)
                    entries, warnings = cached
                    for message in warnings:
                        warn(f"layer {name}: {message}")
                    task.finish(len(entries), layer.blob.length)
                    return entries
            # --- TOC layers (issue #14 item 4): entries from the TOC, nothing decompressed ---
            toc_entries = scan_toc_layer(
                layer,
                detect_compression(layer).value,
                cache_dir=cache,
                hasher=hasher,
                warn=warn_layer,
            )
            if toc_entries is not None:
                task.finish(len(toc_entries), layer.blob.length)
                return toc_entries
            # --- end TOC layers ---
            log.debug("layer %s: scanning", name)
            # With a cache dir the same pass also leaves the gzip checkpoints or
            # the zstd seekable re-encoding there, so open_layer_data decodes nothing.
            with open_layer_stream(
                layer, cache, hasher, compression=compression, scanned=entries
            ) as stream:
                for entry in scan_tar(stream, warn_layer):
                    entries.append(entry)
                    if len(entries) % _PROGRESS_EVERY == 0:
                        task.update(len(entries), stream.tell())
                        if stop is not None and stop.is_set():
                            raise _ScanStoppedError
                position = stream.tell()
            # Only now is the digest verified (the stream checked it on exit).
            entries = mark_bookkeeping(layer, entries)  # eStargz's own files (issue #12)
            if cache is not None:
                layer_index.save(cache, layer, entries, warnings)
    except _ScanStoppedError:
        task.finish(len(entries), 0)
        raise
    except ImageFSError as exc:
        task.finish(len(entries), 0)
        raise type(exc)(f"layer {index + 1}/{count} ({layer.descriptor.digest}): {exc}") from exc
    task.finish(len(entries), position)
    return entries


class _ScanStoppedError(Exception):
    """A layer scan given up because another layer of the image failed."""


def scan_layers(
    image: Image,
    *,
    warn: Callable[[str], None],
    progress: Progress,
    cache_dir: Path | None,
    known: Mapping[int, Sequence[TarEntry]] | None = None,
) -> list[list[TarEntry]]:
    """Index every layer (blocking); the entries per layer, base first.

    ``known``: entries of layers indexed elsewhere (a lazy registry layer's
    TOC, imagefs.registry.lazy), by layer index; those are not read here.

    Layers are scanned at once, a few threads' worth. A registry downloads
    all layers in parallel, so scanning them in turn would leave the base
    layer (often the biggest, so the last to arrive) holding up the others,
    which had long arrived; and a plain tar's scan would wait on its own
    digest check while other layers could be parsed. The first layer to
    fail stops the others; its error is raised.
    """
    count = len(image.layers)
    known = known or {}
    # Each layer's compression is sniffed once here (one open and pread) and
    # handed down to the hash-ahead, the decode gate and the scan.
    compressions = [
        None if index in known else _compression(layer) for index, layer in enumerate(image.layers)
    ]
    # Layers another image already indexed are verified by layer_index.load.
    ahead = [
        compression
        if cache_dir is None or not os.path.exists(layer_index.index_path(str(cache_dir), layer))
        else None
        for layer, compression in zip(image.layers, compressions, strict=True)
    ]
    stop = threading.Event()

    # One local compressed layer decodes at a time: rapidgzip and the zstd
    # re-encoder already use every core, and two such passes at once were
    # slower than in turn (gzip bench image: 18.2 s vs 16.3 s). A download
    # still arriving is not gated: it waits on the network, not the CPU.
    decoding = threading.Semaphore(1)

    with digests_checked_ahead(image.layers, ahead) as hashers:

        def scan(index: int) -> list[TarEntry]:
            if stop.is_set():
                raise _ScanStoppedError
            if index in known:
                return list(known[index])
            layer, compression = image.layers[index], compressions[index]
            # A TOC layer is indexed from its TOC, with one hash and no decoder.
            local_decode = (
                layer.blob.feed is None
                and compression not in (None, Compression.NONE)
                and toc_format(layer) is None
            )
            try:
                with decoding if local_decode else nullcontext():
                    return scan_layer(layer, index, count, warn=warn, progress=progress,
                                      cache_dir=cache_dir, hasher=hashers[index], stop=stop,
                                      compression=compression)  # fmt: skip
            except BaseException:
                stop.set()
                raise

        workers = min(count, scan_threads())
        if workers <= 1:
            return [scan(index) for index in range(count)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagefs-scan") as pool:
            futures = [pool.submit(scan, index) for index in range(count)]
            wait(futures)
    # The lowest layer's own error, not a "stopped" from a layer it stopped.
    failures = [exc for exc in map(Future.exception, futures) if exc is not None]
    for failure in failures:
        if not isinstance(failure, _ScanStoppedError):
            raise failure
    return [future.result() for future in futures]


def _compression(layer: Layer) -> Compression | None:
    """The layer's compression, or None if it cannot be told (its scan reports why)."""
    try:
        return detect_compression(layer)
    except ImageFSError:
        return None


def scan_threads() -> int:
    """How many layers are scanned at once (``IMAGEFS_SCAN_THREADS``, default: cores, >= 2)."""
    value = os.environ.get("IMAGEFS_SCAN_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(2, len(os.sched_getaffinity(0)))


def load_image(
    image: Image,
    *,
    cache_dir: Path | None,
    warn: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    build: TreeBuilder = merge_layers,
    known: Mapping[int, Sequence[TarEntry]] | None = None,
    open_data: LayerOpener | None = None,
) -> LoadedImage:
    """Scan and merge ``image``'s layers and open them for reading (blocking).

    ``build`` makes the tree from the layers' entries (default: the merge);
    ``known`` and ``open_data``: layers indexed and read another way (see
    :func:`scan_layers`, :func:`with_readers`).
    """
    warn = warn or log.warning
    progress = progress or Progress(False)
    with gc_paused():
        layer_entries = scan_layers(
            image, warn=warn, progress=progress, cache_dir=cache_dir, known=known
        )
        tree = freeze(build(layer_entries, warn))
        del layer_entries
    return with_readers(image, tree, cache_dir, ExitStack(), open_data)


def with_readers(
    image: Image,
    tree: Tree,
    cache_dir: Path | None,
    resources: ExitStack,
    open_data: LayerOpener | None = None,
) -> LoadedImage:
    """Open a random-access reader per layer; ``resources`` will close them.

    ``open_data`` may open some layers itself (a lazy registry layer).
    """
    try:
        readers: list[LayerData] = []
        for index, layer in enumerate(image.layers):
            opened = open_data(index, layer) if open_data is not None else None
            reader = opened or open_layer_data(layer, str(cache_dir) if cache_dir else None)
            resources.callback(reader.close)
            readers.append(reader)
    except BaseException:
        resources.close()
        raise
    names = [layer.descriptor.digest for layer in image.layers]
    return LoadedImage(image, tree, ContentReader(readers, names), resources)
