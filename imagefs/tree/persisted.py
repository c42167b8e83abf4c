"""Serve an image from its persisted tree, building it once in a child process.

The first mount of an image scans and merges its layers (:mod:`~imagefs.tree.loader`) and
writes the merged tree to ``CACHE/trees/`` (:mod:`~imagefs.tree.packed`); every later
mount just maps that file, so a remount scans nothing and its cost does not
depend on the number of layers.

The build runs in a forked child that exits when done: scanning and merging
a million entries needs hundreds of MB of Python objects, and the daemon,
which may live for weeks, must not keep that high-water mark. Forking is safe
here because the build is the first thing that starts threads (decompression),
and they start in the child. The child reports failure by pickling the
:class:`ImageFSError` it hit into a pipe; the parent raises it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from imagefs.cachedir import TREE, build_lock
from imagefs.errors import ImageFSError
from imagefs.image import Image
from imagefs.layers.index import blob_identity
from imagefs.progress import Progress
from imagefs.tree.gcpause import gc_paused
from imagefs.tree.loader import LoadedImage, scan_layers, with_readers
from imagefs.tree.overlay import merge_layers
from imagefs.tree.packed import PackedTree, open_packed_tree, write_packed_root

log = logging.getLogger(__name__)


def tree_sources(image: Image, lazy: Mapping[int, str] | None = None) -> dict[str, Any]:
    """What a persisted tree depends on; any change makes it stale.

    Layer digests name the content; the identity of each local blob file
    (layers.index.blob_identity: range, device, inode, size, mtime, ctime)
    catches a file replaced or rewritten in place since the tree was built,
    whose digest was verified back then. The tree also keys on each blob's
    path, which the layer index does not need. And on the layers'
    annotations: an eStargz or zstd:chunked TOC is checked against the digest
    they give (layers.toc), so a tree built under other annotations must not
    let a mount skip that check.

    ``lazy``: for the layers mounted lazily from a registry (no blob file),
    what names their TOC (imagefs.layers.toc.lazy.toc_key: its location and
    the annotated digests it was checked against) instead of a file identity.
    """
    lazy = lazy or {}
    blobs = [
        ["lazy", lazy[index]] if index in lazy else [layer.blob.path, *blob_identity(layer)]
        for index, layer in enumerate(image.layers)
    ]
    return {
        "version": TREE.tag,
        "layers": [layer.descriptor.digest for layer in image.layers],
        # A layer trusted by its diff_id (Layer.verify_diff_id) was checked
        # against that diff_id; another image claiming another one for the
        # same blob must not be served this tree.
        "diff_ids": [layer.diff_id if layer.verify_diff_id else None for layer in image.layers],
        "blobs": blobs,
        "annotations": [sorted(layer.descriptor.annotations) for layer in image.layers],
    }


def tree_path(cache_dir: Path, image: Image) -> Path:
    chain = "\n".join(
        f"{layer.descriptor.digest} {layer.diff_id}" if layer.verify_diff_id
        else layer.descriptor.digest
        for layer in image.layers
    )  # fmt: skip
    # The version tag is part of the key: a tree of other merge rules, scanner
    # or encoding has another name and is never opened (imagefs.cachedir).
    key = hashlib.sha256(f"{TREE.tag}\n{chain}".encode()).hexdigest()
    return cache_dir / "trees" / f"{key}.tree"


def _build_in_child(build: Callable[[], None]) -> None:
    """Run ``build`` in a forked child; re-raise its ImageFSError here."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - exit status and pipe are checked by the parent
        os.close(read_fd)
        code = 0
        try:
            build()
        except ImageFSError as exc:
            os.write(write_fd, pickle.dumps(exc))
            code = 1
        except BaseException as exc:
            log.exception("building the image index failed")
            os.write(write_fd, pickle.dumps(ImageFSError(f"building the index failed: {exc!r}")))
            code = 2
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    if report:
        error = pickle.loads(report)  # our own child's exception, never outside input
        raise error
    if os.waitstatus_to_exitcode(status) != 0:
        raise ImageFSError(f"building the index failed (status {status})")


def load_cached(
    image: Image,
    *,
    cache_dir: Path,
    warn: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> LoadedImage:
    """The image's merged tree from the cache (built first if needed) and its readers."""
    sources = tree_sources(image)
    path = tree_path(cache_dir, image)
    tree = open_packed_tree(path, sources)
    if tree is None:
        # Concurrent first mounts of an image build its tree once.
        with build_lock(path):
            # Another mount of the same image may have built it while we waited.
            tree = open_packed_tree(path, sources) or _build(
                image, path, sources, cache_dir=cache_dir, warn=warn, progress=progress
            )
    resources = ExitStack()
    resources.callback(tree.close)
    return with_readers(image, tree, cache_dir, resources)


def _build(
    image: Image,
    path: Path,
    sources: dict[str, Any],
    *,
    cache_dir: Path,
    warn: Callable[[str], None] | None,
    progress: Progress | None,
) -> PackedTree:
    """Scan, merge and persist the tree in a child process; then map it."""

    def build() -> None:
        report = warn or log.warning
        shown = progress or Progress(False)
        with gc_paused():
            layer_entries = scan_layers(image, warn=report, progress=shown, cache_dir=cache_dir)
            root = merge_layers(layer_entries, report)
            del layer_entries
            write_packed_root(root, path, sources)

    log.debug("building the index of %s into %s", image.source, path)
    _build_in_child(build)
    tree = open_packed_tree(path, sources)
    if tree is None:
        raise ImageFSError(f"the index written to {path} cannot be read back")
    return tree
