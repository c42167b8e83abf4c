"""The merged tree in memory and mapped: merge, freeze, memory, and the served look-ups.

Usage: .venv/bin/python scripts/bench_tree.py [ROOT] (default /usr)

No image and no FUSE: the entries are made from a walk of ROOT (this
machine's /usr: ~140k entries), split into three layers with a symlinked
parent (usrmerge style) in the top one, so figures compare code, not disks.
Prints the best of 7 rounds each (CPU time):

* merge and freeze seconds (the cold mount's in-process steps);
* the Python heap a frozen MergedTree keeps (tracemalloc, after the merge's
  garbage is gone), in bytes per inode;
* per call, in microseconds, over every inode: ``get``, ``stat``, ``lookup``
  of every name in its directory, and reading every directory's listing, for
  the in-memory tree and for the packed tree mapped from its file (the warm
  path of every later mount).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import merge_layers
from imagefs.tree.packed import open_packed_tree, write_packed_root

ROUNDS = 7


def entries_of(root: Path) -> list[list[TarEntry]]:
    layers: list[list[TarEntry]] = [[], [], []]
    for directory, dirs, files in os.walk(root):
        relative = os.path.relpath(directory, root.parent)
        layer = layers[hash(relative.split("/")[1:2].__repr__()) % 2]
        layer.append(TarEntry(relative, EntryType.DIRECTORY, 0o755, 0, 0, 0, 0))
        for name in files:
            path = os.path.join(directory, name)
            kind, target, size = EntryType.FILE, "", 0
            if os.path.islink(path):
                kind, target = EntryType.SYMLINK, os.readlink(path)
            else:
                size = os.lstat(path).st_size
            layer.append(
                TarEntry(f"{relative}/{name}", kind, 0o644, 0, 0, size, 0, linkname=target)
            )
        dirs.sort()
    # The top layer writes through a symlinked parent, as usrmerge images do.
    top = root.name
    layers[2].append(TarEntry("lib", EntryType.SYMLINK, 0o777, 0, 0, 0, 0, linkname=f"{top}/lib"))
    layers[2].extend(
        TarEntry(f"lib/added{i}", EntryType.FILE, 0o644, 0, 0, 1, 0) for i in range(1000)
    )
    return layers


def best(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        # CPU time, not wall time: other work on a shared machine stays out of it.
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


def listing_of(tree: Any, ino: int) -> Sequence[tuple[bytes, int]] | None:
    # Before the Tree protocol the listing hung off the inode record.
    if hasattr(tree, "listing"):
        return tree.listing(ino)  # type: ignore[no-any-return]
    return tree.get(ino).listing  # type: ignore[no-any-return]


def served(label: str, tree: Any) -> None:
    count = tree.count
    inos = range(1, count + 1)
    directories = [(ino, list(listing_of(tree, ino) or ())) for ino in inos]
    directories = [(ino, listing) for ino, listing in directories if listing]
    names = sum(len(listing) for _, listing in directories)

    def get_all() -> None:
        for ino in inos:
            tree.get(ino)

    def stat_all() -> None:
        for ino in inos:
            tree.stat(ino)

    def lookup_all() -> None:
        for ino, listing in directories:
            for name, _ in listing:
                tree.lookup(ino, name)

    def list_all() -> None:
        for ino, _ in directories:
            for _entry in listing_of(tree, ino) or ():
                pass

    print(
        f"{label}: get {best(get_all) / count * 1e6:.2f} us, "
        f"stat {best(stat_all) / count * 1e6:.2f} us, "
        f"lookup {best(lookup_all) / names * 1e6:.2f} us, "
        f"listing {best(list_all) / names * 1e6:.3f} us per entry"
    )


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr")
    layers = entries_of(root)
    total = sum(map(len, layers))
    print(f"{total} entries from {root}")
    merge_seconds = best(lambda: merge_layers(layers, lambda message: None))
    merged = merge_layers(layers, lambda message: None)
    freeze_seconds = best(lambda: freeze(merged))
    print(f"merge {merge_seconds:.2f} s, freeze {freeze_seconds:.2f} s")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tree = freeze(merge_layers(layers, lambda message: None))
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"MergedTree heap: {held / 1e6:.1f} MB, {held / tree.count:.0f} bytes per inode")
    served("MergedTree", tree)
    with tempfile.TemporaryDirectory(prefix="imagefs-bench-tree-") as scratch:
        path = Path(scratch, "image.tree")
        write_packed_root(merged, path, {})
        packed = open_packed_tree(path, {})
        assert packed is not None
        served("PackedTree", packed)
        packed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
