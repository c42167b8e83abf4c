"""From a reference to an :class:`Image` whose layers stream in from the registry.

Resolution (manifest, index platform selection, config) is done up front and
cached in the :class:`BlobStore`. Layers not in the cache start downloading in
background threads, several at once, base layer first; each becomes a
``BlobRange`` over its cache file with a ``feed`` (the download), so the layer
pass indexes the bytes as they arrive and the mount is live as soon as the
last layer is indexed. A layer already cached is a plain ``BlobRange``.

Everything here runs in the mount daemon, after the fork (it starts threads).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar

from imagefs.digest import Digest
from imagefs.errors import (
    BlobError,
    DigestMismatchError,
    ImageFSError,
    ManifestError,
    NotCachedError,
    RegistryError,
)
from imagefs.image import BlobRange, Descriptor, Image, Layer, Platform
from imagefs.progress import human_bytes
from imagefs.reference import Reference, parse_reference
from imagefs.registry.auth import CredentialStore
from imagefs.registry.blobstore import BlobDownload, BlobStore, DownloadCancelledError
from imagefs.registry.client import Endpoint, RegistryClient, TransportOptions
from imagefs.registry.config import RegistryOptions, endpoints, http_mirror_hosts, with_config_file
from imagefs.sources.manifest import (
    MAX_INDEX_DEPTH,
    ImageIndex,
    ImageManifest,
    parse_config,
    parse_manifest_or_index,
    select_platform,
)
from imagefs.sources.platform import host_platform

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PARALLEL_DOWNLOADS = 4  # Docker's default is 3; one more keeps a loopback link busy


@dataclass(frozen=True)
class Resolved:
    reference: Reference  # with the manifest's digest
    manifest_digest: Digest
    manifest: ImageManifest
    config_digest: Digest
    config: bytes
    platform: Platform | None


class RegistrySource:
    """One registry session: client, cache and the endpoints of a reference."""

    def __init__(self, options: RegistryOptions, cache_dir: Path) -> None:
        self.options = with_config_file(options)
        self.store = BlobStore(cache_dir)
        credentials = CredentialStore(
            explicit=self.options.credentials,
            explicit_host=self.options.credentials_host,
            auth_file=self.options.auth_file,
        )
        self.client = RegistryClient(
            credentials,
            TransportOptions(
                ca_bundle=self.options.ca_bundle,
                insecure=self.options.insecure,
                http_hosts=http_mirror_hosts(self.options),
            ),
        )
        self._failed: set[Endpoint] = set()  # mirrors that failed once are skipped after

    def close(self) -> None:
        self.client.close()

    def _endpoints(self, ref: Reference) -> list[Endpoint]:
        found = endpoints(ref, self.options)
        usable = [e for e in found if e not in self._failed]
        return usable or found[-1:]

    def _each_endpoint(self, ref: Reference, what: str, fetch: Callable[[Endpoint], _T]) -> _T:
        """``fetch`` from the mirrors, then the upstream (Docker's registry-mirrors order)."""
        candidates = self._endpoints(ref)
        for endpoint in candidates[:-1]:
            try:
                return fetch(endpoint)
            except RegistryError as exc:
                log.warning("mirror %s failed for %s (%s); trying the next", endpoint, what, exc)
                self._failed.add(endpoint)
        return fetch(candidates[-1])

    # -- manifests ---------------------------------------------------------------

    def _manifest_by_digest(self, ref: Reference, digest: Digest) -> bytes:
        data = self.store.read(digest)
        if data is not None:
            return data
        if self.options.offline:
            raise NotCachedError(f"{ref}: manifest {digest} is not in the cache (--offline)")
        manifest = self._each_endpoint(
            ref, digest, lambda e: self.client.get_manifest(e, ref.path, digest)
        )
        self.store.put(digest, manifest.data)
        return manifest.data

    def _manifest_by_tag(self, ref: Reference, tag: str) -> tuple[Digest, bytes]:
        if self.options.offline:
            digest = self.store.tag(ref.repository, tag)
            if digest is None:
                raise NotCachedError(f"{ref}: tag {tag} was never pulled here (--offline)")
            return digest, self._manifest_by_digest(ref, digest)

        def fetch(endpoint: Endpoint) -> tuple[Digest, bytes]:
            # A HEAD costs one round trip and no body: when the tag still points
            # at a cached manifest, that is all a warm mount asks the registry.
            known = self.client.head_manifest(endpoint, ref.path, tag)
            if known is not None:
                cached = self.store.read(known)
                if cached is not None:
                    return known, cached
            manifest = self.client.get_manifest(endpoint, ref.path, tag)
            return manifest.digest, manifest.data

        digest, data = self._each_endpoint(ref, f"{ref.path}:{tag}", fetch)
        if not self.store.has(digest):
            self.store.put(digest, data)
        self.store.set_tag(ref.repository, tag, digest)
        return digest, data

    def resolve(self, ref: Reference, platform: Platform | None) -> Resolved:
        """Manifest (through any index), config; cached. Blocks on the network."""
        if ref.digest:
            digest = ref.digest
            data = self._manifest_by_digest(ref, digest)
        else:
            assert ref.tag is not None
            digest, data = self._manifest_by_tag(ref, ref.tag)
        wanted = platform or host_platform()
        where = f"{ref}"
        document = parse_manifest_or_index(data, where)
        chosen: Platform | None = None
        for _ in range(MAX_INDEX_DEPTH):
            if isinstance(document, ImageManifest):
                break
            assert isinstance(document, ImageIndex)
            entry = select_platform(document.manifests, wanted, where)
            chosen = entry.platform or chosen
            data = self._manifest_by_digest(ref, entry.digest)
            if len(data) != entry.size:
                raise DigestMismatchError(
                    f"{where}: manifest {entry.digest} is {len(data)} bytes, index says "
                    f"{entry.size}"
                )
            digest, where = entry.digest, f"{ref.repository}@{entry.digest}"
            document = parse_manifest_or_index(data, where, entry.media_type)
        else:
            raise ManifestError(f"{ref}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
        config = self._config(ref, document.config)
        return Resolved(ref.with_digest(digest), digest, document, document.config.digest,
                        config, chosen)  # fmt: skip

    def _config(self, ref: Reference, desc: Descriptor) -> bytes:
        data = self.store.read(desc.digest)
        if data is None:
            if self.options.offline:
                raise NotCachedError(f"{ref}: config {desc.digest} is not in the cache")
            data = self._each_endpoint(
                ref, desc.digest, lambda e: self.client.get_blob_bytes(e, ref.path, desc.digest)
            )
            self.store.put(desc.digest, data)
        if len(data) != desc.size:
            raise DigestMismatchError(
                f"{ref}: config {desc.digest} is {len(data)} bytes, manifest says {desc.size}"
            )
        return data

    # -- layers ------------------------------------------------------------------

    def open(
        self,
        source: str,
        ref: Reference,
        platform: Platform | None,
        progress: DownloadProgress | None = None,
    ) -> tuple[Image, Downloads]:
        """The image, its missing layers downloading in the background (close the Downloads)."""
        return self.open_resolved(source, ref, self.resolve(ref, platform), progress)

    def layers_of(self, ref: Reference, resolved: Resolved) -> list[Layer]:
        """The resolved image's layers, each as a range of its (perhaps absent) cache file."""
        where = f"{resolved.reference.repository}@{resolved.config_digest}"
        config = parse_config(resolved.config, where)
        layers_desc = resolved.manifest.layers
        if config.diff_ids and len(config.diff_ids) != len(layers_desc):
            raise ManifestError(
                f"{ref}: manifest has {len(layers_desc)} layers, config {len(config.diff_ids)}"
            )
        return [
            Layer(desc, BlobRange(str(self.store.blob_path(desc.digest)), 0, desc.size),
                  config.diff_ids[i] if config.diff_ids else None)
            for i, desc in enumerate(layers_desc)
        ]  # fmt: skip

    def open_resolved(
        self,
        source: str,
        ref: Reference,
        resolved: Resolved,
        progress: DownloadProgress | None = None,
        lazy: frozenset[int] = frozenset(),
    ) -> tuple[Image, Downloads]:
        """Like :meth:`open`; the layers ``lazy`` (indexes) are neither fetched nor required.

        Those are left as ranges of their absent cache files: a lazy registry
        mount (imagefs.registry.lazy) reads them with Range requests instead.
        """
        where = f"{resolved.reference.repository}@{resolved.config_digest}"
        config = parse_config(resolved.config, where)
        layers_desc = resolved.manifest.layers
        if config.diff_ids and len(config.diff_ids) != len(layers_desc):
            raise ManifestError(
                f"{ref}: manifest has {len(layers_desc)} layers, config {len(config.diff_ids)}"
            )
        downloads = Downloads(self, ref, progress)
        layers: list[Layer] = []
        try:
            for i, desc in enumerate(layers_desc):
                path = str(self.store.blob_path(desc.digest))
                if self.store.has(desc.digest, desc.size) or i in lazy:
                    blob = BlobRange(path, 0, desc.size)
                elif self.options.offline:
                    raise NotCachedError(f"{ref}: layer {desc.digest} is not in the cache")
                else:
                    download = self.store.begin(desc.digest, desc.size)
                    downloads.add(download, i, len(layers_desc))
                    blob = BlobRange(path, 0, desc.size, feed=download)
                diff_id = config.diff_ids[i] if config.diff_ids else None
                layers.append(Layer(desc, blob, diff_id))
            downloads.start()
        except BaseException:
            downloads.close()
            raise
        image = Image(
            source=source,
            transport="registry",
            manifest_digest=resolved.manifest_digest,
            config_digest=resolved.config_digest,
            config=config.raw,
            layers=tuple(layers),
            platform=resolved.platform or config.platform,
        )
        return image, downloads


class Downloads:
    """Layer downloads in worker threads, base layer first; ``close`` stops them."""

    def __init__(
        self, source: RegistrySource, ref: Reference, progress: DownloadProgress | None
    ) -> None:
        self._source = source
        self._ref = ref
        self._progress = progress
        self._jobs: list[tuple[BlobDownload, int, int]] = []
        self._queue: queue.SimpleQueue[tuple[BlobDownload, int, int] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._cancelled = threading.Event()
        self.errors: list[ImageFSError] = []

    @property
    def count(self) -> int:
        return len(self._jobs)

    def add(self, download: BlobDownload, index: int, total: int) -> None:
        self._jobs.append((download, index, total))

    def start(self) -> None:
        for job in self._jobs:
            self._queue.put(job)
        workers = min(PARALLEL_DOWNLOADS, len(self._jobs))
        for n in range(workers):
            self._queue.put(None)
            thread = threading.Thread(target=self._work, name=f"imagefs-pull-{n}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while not self._cancelled.is_set():
            job = self._queue.get()
            if job is None:
                return
            download, index, total = job
            try:
                self._fetch(download, index, total)
            except ImageFSError as exc:
                download.fail(exc)
                self.errors.append(exc)
            except Exception as exc:  # an unexpected bug must still wake the readers
                error = BlobError(f"blob {download.digest}: download failed: {exc!r}")
                download.fail(error)
                self.errors.append(error)

    def _fetch(self, download: BlobDownload, index: int, total: int) -> None:
        ref, source = self._ref, self._source
        report = self._progress.layer(index, total, download) if self._progress else None
        started = time.monotonic()

        def fetch(endpoint: Endpoint) -> None:
            source.client.fetch_blob(
                endpoint, ref.path, download, progress=report, cancelled=self._cancelled
            )

        try:
            source._each_endpoint(ref, download.digest, fetch)
        except DigestMismatchError:
            raise
        if self._cancelled.is_set():
            raise DownloadCancelledError(f"blob {download.digest}: download cancelled")
        download.commit()
        log.debug(
            "layer %d/%d %s: %d bytes in %.2f s",
            index + 1,
            total,
            download.digest,
            download.size,
            time.monotonic() - started,
        )
        if self._progress:
            self._progress.done(index, total, download, time.monotonic() - started)

    def wait(self) -> None:
        """Block until every download ended; raise the first error."""
        for thread in self._threads:
            thread.join()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        """Stop what still runs and release the files (cache keeps what completed)."""
        self._cancelled.set()
        for download, _, _ in self._jobs:
            if not download.done:
                download.fail(DownloadCancelledError(f"blob {download.digest}: download cancelled"))
        for thread in self._threads:
            thread.join()
        for download, _, _ in self._jobs:
            download.close()


class DownloadProgress:
    """Per-layer download lines on a terminal (``imagefs pull``); silent otherwise."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self._lock = threading.Lock()
        self._bytes: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._started = time.monotonic()
        self._last = 0.0

    def layer(self, index: int, total: int, download: BlobDownload) -> Callable[[int], None]:
        with self._lock:
            self._bytes[index] = download.written
            self._sizes[index] = download.size

        def report(count: int) -> None:
            with self._lock:
                self._bytes[index] += count
                now = time.monotonic()
                if not self.enabled or now - self._last < 0.1:
                    return
                self._last = now
                got, want = sum(self._bytes.values()), sum(self._sizes.values())
                rate = human_bytes(got / max(now - self._started, 1e-6))
                self.stream.write(
                    f"\rdownloading {len(self._sizes)} layers: {human_bytes(got)} of "
                    f"{human_bytes(want)} ({rate}/s)\x1b[K"
                )
                self.stream.flush()

        return report

    def done(self, index: int, total: int, download: BlobDownload, seconds: float) -> None:
        if not self.enabled:
            return
        rate = human_bytes(download.size / max(seconds, 1e-6))
        with self._lock:
            self.stream.write(
                f"\rlayer {index + 1}/{total} {download.digest[:19]}: "
                f"{human_bytes(download.size)} in {seconds:.1f} s ({rate}/s)\x1b[K\n"
            )
            self.stream.flush()


def open_registry_image(
    source: str,
    *,
    platform: Platform | None,
    options: RegistryOptions,
    cache_dir: Path,
    progress: DownloadProgress | None = None,
) -> tuple[Image, Downloads, RegistrySource]:
    """Resolve ``source`` (a reference) and start its downloads; close both handles."""
    ref = parse_reference(source)
    registry = RegistrySource(options, cache_dir)
    try:
        image, downloads = registry.open(source, ref, platform, progress)
    except BaseException:
        registry.close()
        raise
    return image, downloads, registry


def pull(
    source: str,
    *,
    platform: Platform | None,
    options: RegistryOptions,
    cache_dir: Path,
    progress: DownloadProgress | None = None,
) -> Image:
    """Fill the cache with ``source``'s manifest, config and layers (blocking)."""
    image, downloads, registry = open_registry_image(
        source, platform=platform, options=options, cache_dir=cache_dir, progress=progress
    )
    try:
        downloads.wait()
    finally:
        downloads.close()
        registry.close()
    # The downloads are finished and closed: hand back plain cached blobs, not
    # ranges that would wait on (closed) feeds when read.
    return without_feeds(image)


def without_feeds(image: Image) -> Image:
    """``image`` with every layer's blob as a plain cache file range."""
    layers = tuple(
        dataclasses.replace(
            layer, blob=BlobRange(layer.blob.path, layer.blob.offset, layer.blob.length)
        )
        for layer in image.layers
    )
    return dataclasses.replace(image, layers=layers)
