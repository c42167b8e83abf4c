"""Glue between a registry source and the mount lifecycle (``daemon.mount.serve``).

Layers with a TOC that are not cached are mounted lazily (``--lazy auto``,
the default; :mod:`imagefs.registry.lazy`): only their footers and TOCs are
fetched before the mount is live. The rest is as follows.

A registry image whose layers are all cached is loaded like a local one
(``tree.persisted.load_cached``: the persisted tree is mapped). One with downloads in
flight is loaded in this process, so the layer pass reads each blob while it
downloads (``tree.persisted`` builds in a forked child, which would not see this
process's download threads); its merged tree is then persisted and served
from the mapped file, like every later mount of the image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from imagefs.digest import Digest
from imagefs.errors import DigestMismatchError, ImageFSError
from imagefs.image import Image, Platform
from imagefs.progress import Progress
from imagefs.reference import Reference, parse_reference
from imagefs.registry.config import LazyMode, PrefetchMode, RegistryOptions
from imagefs.registry.lazy import LazyImage
from imagefs.registry.pull import RegistrySource, Resolved, without_feeds
from imagefs.tree.gcpause import gc_paused
from imagefs.tree.loader import LoadedImage, load_image, scan_layers, with_readers
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import merge_layers
from imagefs.tree.packed import PackedTree, open_packed_tree, write_packed_root, write_packed_tree
from imagefs.tree.persisted import load_cached, tree_path, tree_sources

log = logging.getLogger(__name__)


def load_registry_image(
    source: str,
    *,
    platform: Platform | None,
    options: RegistryOptions,
    cache_dir: Path,
    stack: ExitStack,
    warn: Callable[[str], None],
    progress: Progress,
    lazy: LazyMode = LazyMode.AUTO,
    prefetch: PrefetchMode = PrefetchMode.LANDMARK,
) -> tuple[Image, LoadedImage]:
    """Resolve, download (streaming) or fetch TOCs, and load; ``stack`` owns it all (blocking).

    With ``lazy`` AUTO, layers with a TOC that are not cached are mounted
    lazily (imagefs.registry.lazy): the returned LoadedImage's ``on_live``
    starts the ``prefetch`` work.
    """
    ref = parse_reference(source)
    registry = RegistrySource(options, cache_dir)
    stack.callback(registry.close)
    resolved = registry.resolve(ref, platform)
    if lazy is LazyMode.AUTO:
        lazy_image = LazyImage(registry, ref, cache_dir, prefetch, offline=options.offline)
        # Closed before the registry: its threads use the client.
        stack.callback(lazy_image.close)
        if lazy_image.locate(registry.layers_of(ref, resolved)):
            return _load_lazy(source, ref, resolved, registry, lazy_image, cache_dir=cache_dir,
                              stack=stack, warn=warn, progress=progress)  # fmt: skip
    image, downloads = registry.open_resolved(source, ref, resolved)
    stack.callback(downloads.close)
    if downloads.count == 0:
        try:
            return image, load_cached(image, cache_dir=cache_dir, warn=warn, progress=progress)
        except DigestMismatchError:
            # A cached blob went bad on disk; the registry still has the real
            # one. Drop what no longer matches its digest and fetch it again.
            evicted = evict_corrupt_layers(image)
            if not evicted:
                raise
            warn(f"{source}: cached {', '.join(evicted)} did not match its digest; refetching")
            image, downloads = registry.open_resolved(source, ref, resolved)
            stack.callback(downloads.close)
    loaded = load_image(image, cache_dir=cache_dir, warn=warn, progress=progress)
    try:
        downloads.wait()  # the pass read every byte; this only waits for the renames
        path = tree_path(cache_dir, image)
        write_packed_tree(loaded.tree, path, tree_sources(image))
    except (ImageFSError, OSError) as exc:
        # The mount works without it; the next one scans again.
        log.warning("cannot persist the index of %s: %s", source, exc)
        return image, loaded
    # Serve from the mapped file like any later mount, so the daemon does not
    # keep one Python object per entry for its whole life.
    loaded.close()
    image = without_feeds(image)
    return image, load_cached(image, cache_dir=cache_dir, warn=warn, progress=progress)


def _load_lazy(
    source: str,
    ref: Reference,
    resolved: Resolved,
    registry: RegistrySource,
    lazy_image: LazyImage,
    *,
    cache_dir: Path,
    stack: ExitStack,
    warn: Callable[[str], None],
    progress: Progress,
) -> tuple[Image, LoadedImage]:
    """Mount with the located TOC layers lazy; the others downloaded (or cached) as usual.

    A tree persisted by an earlier mount of the same layers, TOCs and
    annotations is served as it is (no TOC parsed, nothing fetched);
    otherwise the TOCs are verified and parsed here, in the daemon, which
    already runs the HTTP threads a forked build could not share, and the
    merged tree is persisted and mapped as for a download.
    """
    store = registry.store
    layers = registry.layers_of(ref, resolved)
    others_cached = all(
        store.has(layer.descriptor.digest, layer.descriptor.size)
        for index, layer in enumerate(layers)
        if index not in lazy_image.tocs
    )
    path = None
    if others_cached:
        image, _ = registry.open_resolved(source, ref, resolved, lazy=frozenset(lazy_image.tocs))
        path = tree_path(cache_dir, image)
        tree = open_packed_tree(path, tree_sources(image, lazy_image.identities()))
        if tree is not None:
            log.debug("%s: the merged tree of its lazy layers from the cache", source)
            return image, _lazy_loaded(image, tree, cache_dir, lazy_image)
    with gc_paused():  # the TOCs' entries and the merge: see tree.gcpause
        known = lazy_image.entries(warn)  # may drop a layer whose TOC cannot be served
        image, downloads = registry.open_resolved(source, ref, resolved, lazy=frozenset(known))
        stack.callback(downloads.close)
        layer_entries = scan_layers(image, warn=warn, progress=progress, cache_dir=cache_dir,
                                    known=known)  # fmt: skip
        del known
        # Packed straight from the merge (write_packed_root), as a first local
        # mount's build is: freezing an in-memory tree first only to pack it cost
        # a fifth of the time to live of a 34k-entry image.
        root = merge_layers(layer_entries, warn)
        del layer_entries
        downloads.wait()
        image = without_feeds(image)
        path = tree_path(cache_dir, image)
        sources = tree_sources(image, lazy_image.identities())
        try:
            write_packed_root(root, path, sources)
            tree = open_packed_tree(path, sources)
            if tree is None:
                raise ImageFSError(f"the index written to {path} cannot be read back")
        except (ImageFSError, OSError) as exc:
            log.warning("cannot persist the index of %s: %s", source, exc)
            loaded = with_readers(image, freeze(root), cache_dir, ExitStack(), lazy_image.open_data)
            loaded.on_live = lazy_image.start
            loaded.lazy_layers = tuple(
                lazy_image.layers[i].descriptor for i in sorted(lazy_image.tocs)
            )
            return image, loaded
        del root  # before the collector is back: nothing left for it to walk
    return image, _lazy_loaded(image, tree, cache_dir, lazy_image)


def _lazy_loaded(image: Image, tree: PackedTree, cache_dir: Path, lazy: LazyImage) -> LoadedImage:
    resources = ExitStack()
    resources.callback(tree.close)
    loaded = with_readers(image, tree, cache_dir, resources, lazy.open_data)
    loaded.on_live = lazy.start
    loaded.lazy_layers = tuple(lazy.layers[index].descriptor for index in sorted(lazy.tocs))
    return loaded


def evict_corrupt_layers(image: Image) -> list[Digest]:
    """Delete cached layer blobs whose content no longer hashes to their digest."""
    evicted = []
    for layer in image.layers:
        digest = layer.descriptor.digest
        hasher = digest.hasher()
        try:
            with open(layer.blob.path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
        except FileNotFoundError:
            continue
        if hasher.result() != digest:
            Path(layer.blob.path).unlink(missing_ok=True)
            evicted.append(digest)
    return evicted
