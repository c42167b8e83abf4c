"""The merged tree in memory, as the file system serves it: inode numbers, names, links.

:func:`freeze` turns the root :class:`~imagefs.tree.overlay.Node` built by the
overlay merge into a :class:`MergedTree` (a :class:`~imagefs.tree.served.Tree`)
with stable inode numbers (depth first, children in byte order of their
names, so the same image always gets the same numbers) and link counts:
``st_nlink`` of a file is the number of names that survived the merge; of a
directory, 2 plus its subdirectories.

The frozen tree keeps no ``Node``: one read-only :class:`~imagefs.tree.served.Inode`
per inode, and per directory one sorted array of names with a parallel array
of inode numbers, which serves both ``lookup`` (bisection) and ``readdir``
(by position), so the merge's objects can be freed once it is frozen.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import overload

from imagefs.layers.entry import EntryType
from imagefs.tree.overlay import Node
from imagefs.tree.served import ROOT_INO, Inode, Stat, stat_of

# Shared by every inode without xattrs (most): one empty read-only mapping.
NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})


class _Directory:
    """One directory's entries: names in byte order, and their inode numbers."""

    __slots__ = ("inos", "names")

    def __init__(self, names: list[bytes], inos: array[int]) -> None:
        self.names = names
        self.inos = inos

    def find(self, name: bytes) -> int | None:
        index = bisect_left(self.names, name)
        if index < len(self.names) and self.names[index] == name:
            return self.inos[index]
        return None


class _Listing(Sequence[tuple[bytes, int]]):
    """A directory's (name, ino) entries as a read-only sequence."""

    __slots__ = ("_directory",)

    def __init__(self, directory: _Directory) -> None:
        self._directory = directory

    def __len__(self) -> int:
        return len(self._directory.names)

    @overload
    def __getitem__(self, index: int) -> tuple[bytes, int]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[bytes, int]]: ...

    def __getitem__(self, index: int | slice) -> tuple[bytes, int] | list[tuple[bytes, int]]:
        directory = self._directory
        if isinstance(index, slice):
            return list(zip(directory.names[index], directory.inos[index]))  # noqa: B905
        return directory.names[index], directory.inos[index]

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        # Same lengths by construction (freeze): zip's strict check is only cost here.
        return zip(self._directory.names, self._directory.inos)  # noqa: B905


class MergedTree:
    """A merged image tree held in memory (:class:`~imagefs.tree.served.Tree`)."""

    def __init__(self, inodes: list[Inode | None], directories: list[_Directory | None]) -> None:
        # Both indexed by inode number; index 0 is unused (inode 0 is no inode).
        self._inodes = inodes
        self._directories = directories
        self.count = len(inodes) - 1
        self.total_size = sum(i.size for i in inodes if i is not None and i.type is EntryType.FILE)

    def close(self) -> None:
        """Nothing to release: the tree is only Python objects."""

    def get(self, ino: int) -> Inode | None:
        if 0 < ino < len(self._inodes):
            return self._inodes[ino]
        return None

    def stat(self, ino: int) -> Stat | None:
        inode = self.get(ino)
        return None if inode is None else stat_of(inode)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        if not 0 < parent < len(self._inodes):
            return None
        directory = self._directories[parent]
        if directory is None:
            return None
        if name == b".":
            return self._inodes[parent]
        if name == b"..":
            inode = self._inodes[parent]
            assert inode is not None
            return self._inodes[inode.parent]
        ino = directory.find(name)
        return None if ino is None else self._inodes[ino]

    def listing(self, ino: int) -> Sequence[tuple[bytes, int]] | None:
        if not 0 < ino < len(self._directories):
            return None
        directory = self._directories[ino]
        return None if directory is None else _Listing(directory)


# os.fsencode's, spelled out: the str method is C, os.fsencode a Python call
# per name (a tenth of packing 70k entries). Names come from the tar scanner
# and the TOCs, decoded this way (imagefs.layers.tarscan).
NAME_ENCODING = ("utf-8", "surrogateescape")


def children_in_byte_order(directory: Node) -> list[tuple[bytes, Node]]:
    """A directory's children by name, in byte order: how inodes are numbered."""
    assert directory.children is not None
    named = [(name.encode(*NAME_ENCODING), child) for name, child in directory.children.items()]
    return sorted(named)


def _inode(node: Node, ino: int, nlink: int, parent: int) -> Inode:
    return Inode(
        ino, node.type, node.mode, node.uid, node.gid, node.mtime_ns, node.layer, node.size,
        node.target, node.rdev, MappingProxyType(node.xattrs) if node.xattrs else NO_XATTRS,
        node.data_offset, node.sparse, nlink, parent,
    )  # fmt: skip


def freeze(root: Node) -> MergedTree:
    """Number the merged tree's inodes and count links (iterative: no depth limit)."""
    # Per inode (index ino - 1) while numbering: its node, parent and link count.
    nodes: list[Node] = [root]
    parents = [ROOT_INO]
    nlinks = [2]
    ino_of = {id(root): ROOT_INO}  # nodes stay alive in the tree meanwhile
    directories: list[_Directory | None] = [None, None]
    stack = [(root, ROOT_INO)]
    while stack:
        directory, directory_ino = stack.pop()
        children = children_in_byte_order(directory)
        inos = array("I")
        new_dirs = []
        for _, child in children:
            ino = ino_of.get(id(child))
            if ino is None:
                ino = len(nodes) + 1
                ino_of[id(child)] = ino
                nodes.append(child)
                parents.append(directory_ino)
                nlinks.append(2 if child.is_dir else 1)
                directories.append(None)
                if child.is_dir:
                    new_dirs.append((child, ino))
            else:
                nlinks[ino - 1] += 1  # another name for a hardlinked file
            inos.append(ino)
            if child.is_dir:
                nlinks[directory_ino - 1] += 1
        directories[directory_ino] = _Directory([name for name, _ in children], inos)
        # Depth first in name order: push in reverse so the first name pops first.
        stack.extend(reversed(new_dirs))
    inodes: list[Inode | None] = [None]
    inodes.extend(
        _inode(node, ino, nlink, parent)
        for ino, (node, nlink, parent) in enumerate(zip(nodes, nlinks, parents, strict=True), 1)
    )
    return MergedTree(inodes, directories)
