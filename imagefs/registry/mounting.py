"""Glue between a registry source and the mount lifecycle (``daemon.mount.serve``).

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
from imagefs.registry.config import RegistryOptions
from imagefs.registry.pull import open_registry_image, without_feeds
from imagefs.tree.loader import LoadedImage, load_image
from imagefs.tree.packed import write_packed_tree
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
) -> tuple[Image, LoadedImage]:
    """Resolve, download (streaming) and load; ``stack`` owns the downloads (blocking)."""
    image, downloads, registry = open_registry_image(
        source, platform=platform, options=options, cache_dir=cache_dir
    )
    stack.callback(registry.close)
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
            image, downloads, registry = open_registry_image(
                source, platform=platform, options=options, cache_dir=cache_dir
            )
            stack.callback(registry.close)
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
