"""``imagefs cache ls`` and ``imagefs cache prune``: what the blob cache holds.

A blob is *in use* when a cached tag reaches it: the tag's manifest, the
manifests of an index's platforms that were pulled, their configs and layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagefs.digest import Digest
from imagefs.errors import ImageFSError
from imagefs.registry.blobstore import BlobStore, PruneResult, TagEntry
from imagefs.sources.manifest import MAX_INDEX_DEPTH, ImageIndex, parse_manifest_or_index


@dataclass(frozen=True, slots=True)
class CachedImage:
    entry: TagEntry
    blobs: frozenset[Digest]  # every cached blob the tag reaches
    size: int  # their total size
    complete: bool  # the tag's manifest and at least one platform's layers are all cached


def reachable(store: BlobStore, digest: Digest) -> tuple[set[Digest], bool]:
    """Blobs reachable from a manifest or index digest; and whether an image is complete."""
    seen: set[Digest] = set()
    complete = False
    pending = [(digest, 0)]
    while pending:
        current, depth = pending.pop()
        data = store.read(current)
        if data is None or depth > MAX_INDEX_DEPTH:
            continue
        seen.add(current)
        try:
            document = parse_manifest_or_index(data, current)
        except ImageFSError:
            continue  # not ours to judge here; the blob stays reachable
        if isinstance(document, ImageIndex):
            pending.extend((d.digest, depth + 1) for d in document.manifests)
            continue
        parts = [document.config, *document.layers]
        present = [d.digest for d in parts if store.has(d.digest, d.size)]
        # Every layer, cached or not: a lazy layer has no blob here, only its
        # TOC and chunks (layers.toc.lazy), which prune keeps by its digest.
        seen.update(d.digest for d in parts)
        complete = complete or len(present) == len(parts)
    return seen, complete


def list_cache(store: BlobStore) -> list[CachedImage]:
    sizes = store.blob_digests()
    images = []
    for entry in store.tags():
        blobs, complete = reachable(store, entry.digest)
        images.append(
            CachedImage(entry, frozenset(blobs), sum(sizes.get(b, 0) for b in blobs), complete)
        )
    return images


def prune_cache(store: BlobStore, *, everything: bool = False) -> PruneResult:
    """Remove blobs no tag reaches (all of them, and the tags, with ``everything``)."""
    keep: set[Digest] = set()
    if everything:
        for entry in store.tags():
            store.remove_tag(entry.repository, entry.tag)
    else:
        for entry in store.tags():
            keep |= reachable(store, entry.digest)[0]
    return store.prune(keep)
