"""Lazy registry mounts (issue #14): layers with a TOC served by Range requests.

For each layer that is not in the cache and whose annotations name a TOC
digest (:func:`imagefs.layers.toc.lazy.lazy_candidate`), :class:`LazyImage`
fetches the footer and the TOC (two Range requests, ``TOC_FETCHES`` layers
at once), the TOC is checked against the verified manifest's annotation
and parsed, and the layer's entries go into the merged tree as a scan's
would. Its reads then go through :class:`~imagefs.layers.toc.lazy.LazyTocLayerData`
over :class:`RegistryRanges`: Range requests with the client's auth,
mirrors, retries and resume, at most ``RANGE_REQUESTS_IN_FLIGHT`` at once
over the whole mount. Layers without a usable TOC are downloaded as before.

Once the mount is live, :meth:`LazyImage.start` begins the background work
``--prefetch`` asks for: ``landmark`` fetches the files the eStargz writer
put before ``.prefetch.landmark``; ``all`` does that and then downloads each
lazy blob whole into the blob store, where its digest is checked once
(``BlobDownload.commit``) and from then on reads come from the local file;
``none`` fetches nothing unasked.

Everything here runs in the mount daemon after the fork (it starts threads).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imagefs.errors import BlobError, ImageFSError
from imagefs.image import Layer
from imagefs.layers.entry import TarEntry
from imagefs.layers.plumbing import pread_exact
from imagefs.layers.toc.bookkeeping import mark_bookkeeping
from imagefs.layers.toc.lazy import (
    FetchedToc,
    LazyTocLayerData,
    fetch_toc,
    lazy_candidate,
    parse_fetched,
)
from imagefs.layers.toc.limits import NotServable
from imagefs.reference import Reference
from imagefs.registry.client import Endpoint
from imagefs.registry.config import LazyMode, PrefetchMode
from imagefs.registry.pull import RegistrySource

__all__ = [
    "RANGE_REQUESTS_IN_FLIGHT",
    "LazyImage",
    "LazyMode",
    "PrefetchMode",
    "RegistryRanges",
]

log = logging.getLogger(__name__)

# Range requests in flight over one mount (FUSE reads, prefetch): enough to
# keep a link busy, few enough not to look like a flood to a registry.
RANGE_REQUESTS_IN_FLIGHT = 8
CLOSE_WAIT = 10.0  # s an unmount waits for the background prefetch to notice
TOC_FETCHES = 4  # layers whose footer and TOC are fetched at once (as PARALLEL_DOWNLOADS)


class RegistryRanges:
    """One lazy layer's bytes by Range request (a RangeSource; thread-safe).

    After :meth:`use_local` (the whole blob downloaded and verified) they
    come from the blob file instead.
    """

    def __init__(
        self,
        fetch_range: Callable[[Endpoint | None, int, int], bytes],
        layer: Layer,
        in_flight: threading.BoundedSemaphore,
    ) -> None:
        self._fetch_range = fetch_range
        self._layer = layer
        self._in_flight = in_flight
        self._lock = threading.Lock()
        self._local_fd: int | None = None
        self.requests = 0
        self.bytes = 0

    def fetch(self, offset: int, length: int) -> bytes:
        size = self._layer.descriptor.size
        if offset < 0 or length < 0 or offset + length > size:
            raise BlobError(
                f"layer {self._layer.descriptor.digest}: {length} bytes at {offset} are outside "
                f"the blob's {size}"
            )
        if length == 0:
            return b""
        with self._lock:
            local = self._local_fd
        if local is not None:
            return pread_exact(local, length, offset)
        with self._in_flight:
            data = self._fetch_range(None, offset, length)
        with self._lock:
            self.requests += 1
            self.bytes += len(data)
        return data

    def use_local(self, path: Path) -> None:
        """Read from ``path`` (the verified blob) from now on."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            if self._local_fd is not None:
                os.close(self._local_fd)
            self._local_fd = fd

    @property
    def is_local(self) -> bool:
        with self._lock:
            return self._local_fd is not None

    def close(self) -> None:
        with self._lock:
            if self._local_fd is not None:
                os.close(self._local_fd)
                self._local_fd = None


class LazyImage:
    """The lazy layers of one registry mount: their TOCs, readers and background work.

    Close it before the registry source.
    """

    def __init__(
        self,
        registry: RegistrySource,
        ref: Reference,
        cache_dir: Path,
        prefetch: PrefetchMode,
        *,
        offline: bool,
    ) -> None:
        self._registry = registry
        self._ref = ref
        self._cache = str(cache_dir)
        self._prefetch = prefetch
        self._offline = offline
        self._in_flight = threading.BoundedSemaphore(RANGE_REQUESTS_IN_FLIGHT)
        self.tocs: dict[int, FetchedToc] = {}
        self.layers: dict[int, Layer] = {}
        self.ranges: dict[int, RegistryRanges] = {}
        self.readers: dict[int, LazyTocLayerData] = {}
        self._count = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- TOCs --------------------------------------------------------------------------

    def _ranges(self, layer: Layer) -> RegistryRanges | None:
        if self._offline:
            return None
        registry, ref, digest = self._registry, self._ref, layer.descriptor.digest

        def fetch_range(_: Endpoint | None, offset: int, length: int) -> bytes:
            return registry._each_endpoint(
                ref, digest,
                lambda e: registry.client.fetch_range(e, ref.path, digest, offset, length),
            )  # fmt: skip

        return RegistryRanges(fetch_range, layer, self._in_flight)

    def locate(self, layers: list[Layer]) -> frozenset[int]:
        """Find the TOC of every candidate layer (Range requests, in parallel; blocking).

        Returns the indexes of the layers that have one. A layer in the blob
        store is never lazy: it is read locally.
        """
        store = self._registry.store
        self._count = len(layers)
        candidates = [
            index
            for index, layer in enumerate(layers)
            if lazy_candidate(layer)
            and not store.has(layer.descriptor.digest, layer.descriptor.size)
        ]
        for index in candidates:
            self.layers[index] = layers[index]
            ranges = self._ranges(layers[index])
            if ranges is not None:
                self.ranges[index] = ranges

        def locate_one(index: int) -> tuple[int, FetchedToc | None]:
            # A TOC fetched before is only read (its bytes) if the tree must be built.
            return index, fetch_toc(self.layers[index], self.ranges.get(index), self._cache,
                                    with_raw=False)  # fmt: skip

        started = time.monotonic()
        with ThreadPoolExecutor(max(1, min(TOC_FETCHES, len(candidates))),
                                thread_name_prefix="imagefs-toc") as pool:  # fmt: skip
            for index, fetched in pool.map(locate_one, candidates):
                if fetched is None:
                    self._drop(index)
                else:
                    self.tocs[index] = fetched
        if candidates:
            log.debug("%d of %d layers have a TOC to mount lazily (located in %.3f s)",
                      len(self.tocs), len(layers), time.monotonic() - started)  # fmt: skip
        return frozenset(self.tocs)

    def _drop(self, index: int) -> None:
        self.tocs.pop(index, None)
        self.layers.pop(index, None)
        ranges = self.ranges.pop(index, None)
        if ranges is not None:
            ranges.close()

    def identities(self) -> dict[int, str]:
        """What names each lazy layer's TOC in a persisted tree's sources."""
        return {index: fetched.key for index, fetched in self.tocs.items()}

    def entries(self, warn: Callable[[str], None]) -> dict[int, list[TarEntry]]:
        """Each lazy layer's entries from its TOC, verified (blocking).

        A TOC that cannot be served chunk by chunk drops its layer (it is
        downloaded instead); one that does not match its annotated digest
        raises DigestMismatchError, which refuses the mount.
        """
        found: dict[int, list[TarEntry]] = {}
        for index in sorted(self.tocs):
            layer, fetched = self.layers[index], self.tocs[index]
            if fetched.raw is None:
                fetched = fetch_toc(layer, self.ranges.get(index), self._cache) or fetched
            name = layer.descriptor.digest.short()

            def warn_layer(message: str, name: str = name) -> None:
                warn(f"layer {name}: {message}")

            try:
                parsed = parse_fetched(layer, fetched, self._cache, warn=warn_layer)
            except ImageFSError as exc:
                raise type(exc)(f"layer {index + 1}/{self._count} ({layer.descriptor.digest}): "
                                f"{exc}") from exc  # fmt: skip
            if isinstance(parsed, NotServable):
                log.info("layer %s: %s, so it is downloaded", name, parsed.reason)
                self._drop(index)
                continue
            toc, fetched = parsed
            self.tocs[index] = fetched
            found[index] = mark_bookkeeping(layer, toc.entries)
            log.debug("layer %s: %d entries from its %s TOC, fetched by range (%d bytes)", name,
                      len(found[index]), toc.format.value, fetched.location.length)  # fmt: skip
        return found

    # -- readers -----------------------------------------------------------------------

    def open_data(self, index: int, layer: Layer) -> LazyTocLayerData | None:
        """The reader of layer ``index`` if it is lazy (for tree.loader.with_readers)."""
        fetched = self.tocs.get(index)
        if fetched is None:
            return None
        ranges = self.ranges.get(index)
        reader = LazyTocLayerData(
            layer, fetched, ranges, self._cache,
            reload_toc=lambda: fetch_toc(layer, ranges, self._cache),
        )  # fmt: skip
        self.readers[index] = reader
        return reader

    # -- background work ---------------------------------------------------------------

    def start(self) -> None:
        """Begin the ``--prefetch`` work in a background thread (once the mount is live)."""
        if self._prefetch is PrefetchMode.NONE or not self.readers or self._offline:
            return
        thread = threading.Thread(target=self._background, name="imagefs-prefetch", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _background(self) -> None:
        for index in sorted(self.readers):
            if self._stop.is_set():
                return
            reader = self.readers[index]
            name = self.layers[index].descriptor.digest.short()
            try:
                indices = reader.prefetch_indices(landmark_only=True)
                if indices:
                    fetched = reader.prefetch(indices, self._stop)
                    log.info("layer %s: prefetched its %d prioritised chunks (%d bytes fetched)",
                             name, len(indices), fetched)  # fmt: skip
            except ImageFSError as exc:
                log.warning("layer %s: prefetch stopped: %s", name, exc)
        if self._prefetch is not PrefetchMode.ALL:
            return
        for index in sorted(self.readers):
            if self._stop.is_set():
                return
            try:
                self._complete(index)
            except ImageFSError as exc:
                log.warning("layer %s: download stopped, its reads stay lazy: %s",
                            self.layers[index].descriptor.digest.short(), exc)  # fmt: skip

    def _complete(self, index: int) -> None:
        """Download layer ``index`` whole; its digest checked, serve it from the file."""
        layer = self.layers[index]
        desc = layer.descriptor
        store, ref, registry = self._registry.store, self._ref, self._registry
        ranges = self.ranges[index]
        started = time.monotonic()
        if not store.has(desc.digest, desc.size):
            download = store.begin(desc.digest, desc.size)
            try:
                registry._each_endpoint(
                    ref, desc.digest,
                    lambda e: registry.client.fetch_blob(e, ref.path, download,
                                                         cancelled=self._stop),
                )  # fmt: skip
                if self._stop.is_set():
                    return
                download.commit()  # size and digest verified, then renamed into place
            finally:
                download.close()
        ranges.use_local(store.blob_path(desc.digest))
        log.info("layer %s: all %d bytes local, blob digest verified (%.1f s)",
                 desc.digest.short(), desc.size, time.monotonic() - started)  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            # A Range request stalled on a dead link ends at the client's read
            # timeout; unmounting need not wait for it (the thread is a daemon).
            thread.join(CLOSE_WAIT)
        for ranges in self.ranges.values():
            ranges.close()
