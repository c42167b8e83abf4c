"""The merged tree as the file system serves it: inode numbers, names, links.

:func:`freeze` turns the root :class:`~imagefs.tree.overlay.Node` built by the
overlay merge into a :class:`MergedTree` with stable inode numbers (depth
first, children in byte order of their names, so the same image always gets
the same numbers), per-directory name tables for ``lookup`` and sorted entry
lists for ``readdir``, and link counts: ``st_nlink`` of a file is the number of
names that survived the merge; of a directory, 2 plus its subdirectories.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from imagefs.layers.entry import EntryType
from imagefs.tree.overlay import Node

ROOT_INO = 1  # FUSE_ROOT_ID


@dataclass(slots=True, eq=False)
class Inode:
    """One inode of the served tree (hardlinked names share one)."""

    ino: int
    node: Node
    nlink: int
    parent: int  # directories: the parent directory's inode (root: itself)
    names: dict[bytes, int] | None = None  # directories: name -> ino
    listing: Sequence[tuple[bytes, int]] | None = None  # directories: sorted (name, ino)


class Stat(NamedTuple):
    """What ``stat`` reports for an inode (``stored``: bytes with data, for st_blocks)."""

    ino: int
    type: EntryType
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    stored: int
    mtime_ns: int


def stat_of(inode: Inode) -> Stat:
    node = inode.node
    stored = node.size if node.sparse is None else sum(length for _, length in node.sparse)
    return Stat(
        inode.ino, node.type, node.mode, inode.nlink, node.uid, node.gid, node.rdev,
        node.size, stored, node.mtime_ns,
    )  # fmt: skip


class MergedTree:
    """Read-only view of a merged image tree, addressed by inode number."""

    def __init__(self, inodes: list[Inode | None]) -> None:
        self._inodes = inodes
        self.count = len(inodes) - 1
        self.total_size = sum(
            i.node.size for i in inodes if i is not None and i.node.type is EntryType.FILE
        )

    def get(self, ino: int) -> Inode | None:
        if 0 < ino < len(self._inodes):
            return self._inodes[ino]
        return None

    def stat(self, ino: int) -> Stat | None:
        """Attributes only (readdir's hot path; subclasses answer it cheaper)."""
        inode = self.get(ino)
        return None if inode is None else stat_of(inode)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        directory = self.get(parent)
        if directory is None or directory.names is None:
            return None
        if name == b".":
            return directory
        if name == b"..":
            return self.get(directory.parent)
        ino = directory.names.get(name)
        return None if ino is None else self._inodes[ino]

    def resolve(self, path: str) -> Inode | None:
        """The inode at a root-relative path, without following symlinks."""
        current = self.get(ROOT_INO)
        for part in path.split("/"):
            if not part or current is None:
                continue
            current = self.lookup(current.ino, os.fsencode(part))
        return current

    def walk(self) -> list[tuple[str, Inode]]:
        """Every (path, inode) pair, depth first; the root's path is ""."""
        out: list[tuple[str, Inode]] = []
        root = self.get(ROOT_INO)
        assert root is not None
        stack: list[tuple[str, Inode]] = [("", root)]
        while stack:
            path, inode = stack.pop()
            out.append((path, inode))
            for name, ino in reversed(list(inode.listing or ())):
                child = self.get(ino)
                assert child is not None
                child_path = f"{path}/{os.fsdecode(name)}" if path else os.fsdecode(name)
                stack.append((child_path, child))
        return out


def freeze(root: Node) -> MergedTree:
    """Number the merged tree's inodes and count links (iterative: no depth limit)."""
    inodes: list[Inode | None] = [None]
    by_node: dict[int, Inode] = {}

    def number(node: Node, parent: int) -> tuple[Inode, bool]:
        existing = by_node.get(id(node))
        if existing is not None:
            existing.nlink += 1
            return existing, False
        inode = Inode(ino=len(inodes), node=node, nlink=1, parent=parent)
        if node.is_dir:
            inode.nlink = 2
            inode.names = {}
            inode.listing = []
        inodes.append(inode)
        by_node[id(node)] = inode
        return inode, True

    root_inode, _ = number(root, ROOT_INO)
    stack = [root_inode]
    while stack:
        directory = stack.pop()
        assert directory.node.children is not None and directory.names is not None
        listing: list[tuple[bytes, int]] = []
        directory.listing = listing
        children = sorted(
            (os.fsencode(name), child) for name, child in directory.node.children.items()
        )
        new_dirs = []
        for name, child in children:
            inode, is_new = number(child, directory.ino)
            directory.names[name] = inode.ino
            listing.append((name, inode.ino))
            if child.is_dir:
                directory.nlink += 1
                if is_new:
                    new_dirs.append(inode)
        # Depth first in name order: push in reverse so the first name pops first.
        stack.extend(reversed(new_dirs))
    return MergedTree(inodes)
