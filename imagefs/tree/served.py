"""The merged tree as it is served: the :class:`Tree` interface and its records.

What the file system (``daemon.operations``), the forensics commands and the
tree writer need of a finished tree, whichever keeps it: the in-memory
:class:`~imagefs.tree.merged.MergedTree` (a tree just merged, or the
``--layers`` views) or the :class:`~imagefs.tree.packed.PackedTree` mapped
from the cache. Both number inodes the same way (depth first, names in byte
order) and answer with the same read-only records: an :class:`Inode` per
object (hardlinked names share one), a :class:`Stat` where only attributes
are wanted, and a directory's entries as a sorted sequence of (name, inode
number) pairs, apart from the inode itself.

Paths are looked up with the one resolver (:mod:`imagefs.tree.resolve`)
over :meth:`Tree.lookup`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol

from imagefs.layers.entry import EntryType
from imagefs.tree.resolve import LITERAL, MAX_SYMLINK_HOPS, Resolved, resolve

ROOT_INO = 1  # FUSE_ROOT_ID


class Attributes(Protocol):
    """What every object of a merged tree carries, a merge's ``Node`` or a served :class:`Inode`.

    ``layer`` is the index (0 = base) of the layer whose entry made the
    object; ``data_offset`` and ``sparse`` locate a file's bytes in that
    layer's uncompressed stream (:mod:`imagefs.tree.content`).
    """

    @property
    def type(self) -> EntryType: ...
    @property
    def mode(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def layer(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def target(self) -> str: ...
    @property
    def rdev(self) -> int: ...
    @property
    def xattrs(self) -> Mapping[str, bytes]: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def sparse(self) -> tuple[tuple[int, int], ...] | None: ...


class Inode(NamedTuple):
    """One served inode, read-only: what the image says of it, its links and parent.

    A NamedTuple rather than a frozen dataclass, measured: a mapped tree
    makes one per ``get`` (every lookup, getattr, open, read and getxattr),
    and a frozen dataclass of these 15 fields took 3-4 us to construct here
    (its ``__init__`` sets each field through ``object.__setattr__``), a
    NamedTuple 0.6-1 us.
    """

    ino: int
    type: EntryType
    mode: int  # permission bits with setuid/setgid/sticky (no type bits)
    uid: int
    gid: int
    mtime_ns: int
    layer: int
    size: int
    target: str  # symlink target, verbatim
    rdev: int
    xattrs: Mapping[str, bytes]
    data_offset: int
    sparse: tuple[tuple[int, int], ...] | None
    nlink: int  # names of a file that survived the merge; a directory: 2 + subdirectories
    parent: int  # directories: the parent directory's inode (root: itself); others: first parent

    @property
    def is_dir(self) -> bool:
        return self.type is EntryType.DIRECTORY


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
    stored = inode.size if inode.sparse is None else sum(length for _, length in inode.sparse)
    return Stat(
        inode.ino, inode.type, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev,
        inode.size, stored, inode.mtime_ns,
    )  # fmt: skip


class Tree(Protocol):
    """A finished merged tree, addressed by inode number (1 is the root)."""

    @property
    def count(self) -> int:
        """How many inodes: they are numbered 1 to count."""
        ...

    @property
    def total_size(self) -> int:
        """The sum of regular files' sizes, each inode once (statfs)."""
        ...

    def get(self, ino: int) -> Inode | None:
        """The inode numbered ``ino``, or None if there is none."""
        ...

    def stat(self, ino: int) -> Stat | None:
        """Only the attributes of ``ino`` (readdir's hot path: may be cheaper than get)."""
        ...

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        """The entry ``name`` of directory ``parent`` (``.`` and ``..`` too), or None."""
        ...

    def listing(self, ino: int) -> Sequence[tuple[bytes, int]] | None:
        """A directory's entries, sorted by name bytes (no ``.``/``..``); None if not one."""
        ...

    def close(self) -> None:
        """Release what the tree holds (a mapping); it is not used afterwards."""
        ...


def resolve_in_tree(
    tree: Tree, path: str, *, follow_last: bool = False, hop_limit: int = MAX_SYMLINK_HOPS
) -> Resolved[Inode]:
    """Resolve ``path`` in ``tree`` with the one resolver (:mod:`imagefs.tree.resolve`)."""
    root = tree.get(ROOT_INO)
    assert root is not None

    def child(directory: Inode, name: str) -> Inode | None:
        return tree.lookup(directory.ino, os.fsencode(name))

    return resolve(root, path, child, follow_last=follow_last, hop_limit=hop_limit)


def lookup_path(tree: Tree, path: str) -> Inode | None:
    """The inode at a root-relative path as the tree spells it (no symlink followed)."""
    return resolve_in_tree(tree, path, hop_limit=LITERAL).node


def walk(tree: Tree, top: Inode | None = None) -> Iterator[tuple[str, Inode]]:
    """Every (path, inode) pair below ``top`` (default: the root), depth first in
    name order; ``top``'s own path is "". Iterative: no depth limit."""
    start = tree.get(ROOT_INO) if top is None else top
    assert start is not None
    stack: list[tuple[str, Inode]] = [("", start)]
    while stack:
        path, inode = stack.pop()
        yield path, inode
        listing = tree.listing(inode.ino)
        if not listing:
            continue
        children = []
        for name, ino in listing:
            child = tree.get(ino)
            assert child is not None
            decoded = os.fsdecode(name)
            children.append((f"{path}/{decoded}" if path else decoded, child))
        stack.extend(reversed(children))
