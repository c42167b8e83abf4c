"""Merge layer changesets into one tree, following the OCI image-spec.

The rules implemented here are those of image-spec ``layer.md`` ("Applying
Changesets", "Whiteouts", "Opaque Whiteout"):

* A whiteout ``DIR/.wh.NAME`` removes ``DIR/NAME`` (and its subtree) from the
  *lower* layers only; entries of the same layer are never hidden by it.
* An opaque marker ``DIR/.wh..wh..opq`` hides every child ``DIR`` had in lower
  layers; the same layer's children stay. Both kinds of whiteout "MUST" be
  applied before the layer's other entries "regardless of the ordering in
  which the whiteout file was encountered", so each layer is applied in two
  passes: removals first, then additions.
* An entry over an existing path: directory over directory replaces the
  attributes and keeps the children; anything else replaces the old entry
  (and a replaced directory takes its whole subtree with it).
* Within one layer the last entry for a path wins (it is applied last).
* Missing parent directories are implied (mode 0755, root-owned, mtime 0).
* Hardlinks name an entry already applied (earlier in the same layer, or a
  lower layer, as extracting the layers in order onto one directory does);
  all names share one inode and ``st_nlink`` counts the surviving names.
* Whiteout files themselves are never part of the result, nor are entries
  a layer format adds for itself (``TarEntry.bookkeeping``: eStargz's
  ``stargz.index.json`` and prefetch landmarks), as stargz-snapshotter
  leaves them out of the layers it mounts.

Parent directories are resolved the way container runtimes extract layers
(containerd, umoci: a secure join inside the root): when a lower layer made
``lib`` a symlink to ``usr/lib``, an upper entry ``lib/x`` lands in
``usr/lib/x``. Symlinks are followed only inside the tree being built, never on
the host, and never past the root; a symlink that leads to no directory
(dangling, a loop, too many hops) is a non-directory in the way and is replaced
by an implied directory. The rules are :mod:`imagefs.tree.resolve`'s, shared
with every other path look-up.

Paths are cleaned first; an entry whose path would leave the root (``..``
above the top), contains NUL, or has a component longer than NAME_MAX is
dropped with a warning: the image is never allowed to place anything outside
the tree.

A merge can report what each layer does (``on_change``, one :class:`Change`
per effect, at the path as resolved in the tree): what was added, and what
was removed (by a whiteout, an opaque marker, or a newer entry taking the
path). Removed nodes are detached and never changed again, so an observer may
keep them: that is how deleted and overwritten files stay reachable
(:mod:`imagefs.forensics.views`), and how ``imagefs which`` tells a path's history.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.resolve import Resolved, resolve

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# aufs kept its own bookkeeping under names starting with ".wh..wh." (hardlink
# directories, ".wh..wh.plnk"); they are not part of the image's content.
AUFS_META_PREFIX = ".wh..wh."

NAME_MAX = 255

IMPLIED_DIR_MODE = 0o755
ROOT_LAYER = -1  # "layer" of the root and of implied directories without a layer

Warn = Callable[[str], None]


@dataclass(slots=True, eq=False)
class Node:
    """A file-system object of the merged tree.

    Hardlinked names share one ``Node``; directories are never shared. ``layer``
    is the index (0 = base) of the layer whose entry produced the object.
    """

    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    layer: int
    size: int = 0
    target: str = ""  # symlink target, verbatim
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data_offset: int = 0
    sparse: tuple[tuple[int, int], ...] | None = None
    children: dict[str, Node] | None = None  # directories only

    @property
    def is_dir(self) -> bool:
        return self.type is EntryType.DIRECTORY


def child_node(directory: Node, name: str) -> Node | None:
    """The child ``name`` of ``directory`` (None: absent, or not a directory)."""
    children = directory.children
    return None if children is None else children.get(name)


class ChangeKind(enum.Enum):
    """What a layer did at one path (see :class:`Change`)."""

    ADD = "add"  # a new node at the path (file, directory, symlink, hardlink name...)
    UPDATE = "update"  # a directory entry over a directory: new attributes, same children
    IMPLY = "imply"  # a directory created because a deeper path needs it
    WHITEOUT = "whiteout"  # removed (with its subtree) by a .wh. entry
    OPAQUE = "opaque"  # removed because its parent directory became opaque
    REPLACE = "replace"  # removed (with its subtree) because a new node took the path


REMOVALS = frozenset({ChangeKind.WHITEOUT, ChangeKind.OPAQUE, ChangeKind.REPLACE})


@dataclass(frozen=True, slots=True)
class Change:
    """One effect of layer ``layer`` at ``path`` (root-relative, parents resolved).

    For an addition, ``node`` is the node now at the path; for a removal
    (:data:`REMOVALS`), the node taken away, detached with its subtree. A
    REPLACE is reported before the ADD or IMPLY of what replaces it.
    """

    layer: int
    path: str
    kind: ChangeKind
    node: Node


OnChange = Callable[[Change], None]


# A component of 64 characters or more (UTF-8 takes at most 4 bytes per
# character: shorter ones always fit NAME_MAX).
_LONG_COMPONENT = re.compile(f"[^/]{{{NAME_MAX // 4 + 1}}}")


def clean_path(name: str) -> str | None:
    """Normalise a member name to a root-relative path ("" is the root).

    Returns None for names that must be refused: NUL bytes, components longer
    than NAME_MAX, or ``..`` climbing above the root (``../../etc/passwd``).
    A leading ``/`` is removed as GNU tar does; ``.`` and empty components
    (``./a//b``) are dropped.
    """
    if "\x00" in name:
        return None
    # Fast path, a few substring scans: after the usual "./" prefix and "/"
    # suffix, nothing to drop or climb, and no component can reach NAME_MAX
    # bytes. Per-component Python would make a 10,000-level deep tree
    # (paths of 20 KB) cost seconds.
    body = name[2:] if name.startswith("./") else name
    body = body[:-1] if body.endswith("/") else body
    padded = f"/{body}/"
    if (
        "//" not in padded
        and "/./" not in padded
        and "/../" not in padded
        and (len(body) <= NAME_MAX // 4 or _LONG_COMPONENT.search(body) is None)
    ):
        return body
    return _clean_slow(name.split("/"))


def _clean_slow(components: list[str]) -> str | None:
    parts: list[str] = []
    for component in components:
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                return None
            parts.pop()
            continue
        if len(os.fsencode(component)) > NAME_MAX:
            return None
        parts.append(component)
    return "/".join(parts)


def new_directory(mode: int, uid: int, gid: int, mtime_ns: int, layer: int) -> Node:
    return Node(EntryType.DIRECTORY, mode, uid, gid, mtime_ns, layer, children={})


def implied_directory(layer: int) -> Node:
    return new_directory(IMPLIED_DIR_MODE, 0, 0, 0, layer)


def node_from_entry(entry: TarEntry, layer: int) -> Node:
    # Positional, in Node's field order, and one branch per type: this runs
    # once per entry of every layer (a third of merging a 70k-entry image
    # when it was keyword arguments and attribute writes).
    etype = entry.type
    xattrs = dict(entry.xattrs) if entry.xattrs else {}
    mode = entry.mode & 0o7777
    if etype is EntryType.FILE:
        return Node(etype, mode, entry.uid, entry.gid, entry.mtime_ns, layer, entry.size, "", 0,
                    xattrs, entry.data_offset, entry.sparse)  # fmt: skip
    if etype is EntryType.DIRECTORY:
        return Node(etype, mode, entry.uid, entry.gid, entry.mtime_ns, layer, 0, "", 0, xattrs,
                    0, None, {})  # fmt: skip
    if etype is EntryType.SYMLINK:
        target = entry.linkname
        size = len(target.encode("utf-8", "surrogateescape"))  # os.fsencode's, in C
        return Node(etype, mode, entry.uid, entry.gid, entry.mtime_ns, layer, size, target, 0,
                    xattrs)  # fmt: skip
    rdev = 0
    if etype is EntryType.CHAR_DEVICE or etype is EntryType.BLOCK_DEVICE:
        rdev = os.makedev(entry.devmajor, entry.devminor)
    return Node(etype, mode, entry.uid, entry.gid, entry.mtime_ns, layer, 0, "", rdev, xattrs)


def set_dir_attrs(directory: Node, entry: TarEntry, layer: int) -> None:
    """A directory entry over an existing directory: its attributes replace the
    old ones, the children stay (image-spec, "Changeset over existing files")."""
    directory.mode = entry.mode & 0o7777
    directory.uid = entry.uid
    directory.gid = entry.gid
    directory.mtime_ns = entry.mtime_ns
    directory.xattrs = dict(entry.xattrs)
    directory.layer = layer


class _Merger:
    """Applies layers, base first, onto one tree of :class:`Node`."""

    def __init__(self, warn: Warn, on_change: OnChange | None = None) -> None:
        self.root = implied_directory(ROOT_LAYER)
        self.warn = warn
        self.on_change = on_change
        # Parent directories resolved during one layer's additions, keyed by
        # the entry's parent path: the last parent looked up, and the last
        # directory added. Tars list a directory before its children, so
        # most entries hit one of them; without them each entry walks from
        # the root, and a 10,000-level deep tree costs 50 million steps.
        # Both are dropped whenever a node is replaced (that can change what
        # a path resolves to); adding where nothing was cannot.
        self._last_parent: tuple[str, tuple[Node, tuple[str, ...]]] | None = None
        self._last_dir: tuple[str, tuple[Node, tuple[str, ...]]] | None = None

    def _report(self, layer: int, names: Sequence[str], kind: ChangeKind, node: Node) -> None:
        # Callers test self.on_change first, so a merge nobody observes
        # builds no path strings.
        assert self.on_change is not None
        self.on_change(Change(layer, "/".join(names), kind, node))

    # -- resolution inside the tree (imagefs.tree.resolve) --------------------

    def _resolve(self, path: str, create_layer: int | None) -> Resolved[Node]:
        """Find (or, with ``create_layer``, create) the directory at ``path``.

        Symlinks on the way are followed inside the tree, the last one too
        (see :mod:`imagefs.tree.resolve`). When creating, a missing or
        non-directory component is replaced by an implied directory, as
        extracting ``a/b`` over a file ``a`` must do to honour the layer.
        """
        if create_layer is None:
            return resolve(self.root, path, child_node, follow_last=True)

        def make_directory(
            parent: Node, name: str, existing: Node | None, names: tuple[str, ...]
        ) -> Node:
            assert parent.children is not None
            if existing is not None:
                # A cached path may run through this (followed) symlink.
                self._forget_parents()
                if self.on_change is not None:
                    self._report(create_layer, [*names, name], ChangeKind.REPLACE, existing)
            directory = implied_directory(create_layer)
            parent.children[name] = directory
            if self.on_change is not None:
                self._report(create_layer, [*names, name], ChangeKind.IMPLY, directory)
            return directory

        return resolve(self.root, path, child_node, follow_last=True, make_directory=make_directory)

    def _lookup(self, path: str) -> Node | None:
        """The node at a cleaned path, following symlinks in its parents only."""
        return resolve(self.root, path, child_node).node

    # -- applying one layer ------------------------------------------------

    def apply_layer(self, layer: int, entries: Iterable[TarEntry]) -> None:
        # (path, its parent's path, its name, the entry)
        additions: list[tuple[str, str, str, TarEntry]] = []
        whiteouts: list[tuple[str, str]] = []
        opaque_dirs: list[str] = []
        for entry in entries:
            if entry.bookkeeping:
                continue  # a layer format's own entry, not image content (TarEntry.bookkeeping)
            path = clean_path(entry.path)
            if path is None:
                self.warn(f"layer {layer}: refusing entry {entry.path!r}: path leaves the root")
                continue
            if entry.path.startswith("/") and path:
                self.warn(f"layer {layer}: removing leading '/' from {entry.path!r}")
            parent, _, name = path.rpartition("/")
            if WHITEOUT_PREFIX in parent and "/" + WHITEOUT_PREFIX in "/" + parent:
                # Nothing can live below a whiteout name; aufs kept its own
                # bookkeeping there (".wh..wh.plnk/..."), which is not content.
                if not parent.startswith(AUFS_META_PREFIX):
                    self.warn(f"layer {layer}: ignoring {entry.path!r}: inside a whiteout name")
                continue
            if not name.startswith(WHITEOUT_PREFIX):  # most entries: one test, not three
                additions.append((path, parent, name, entry))
            elif name == OPAQUE_MARKER:
                opaque_dirs.append(parent)
            elif name.startswith(AUFS_META_PREFIX):
                continue
            elif name.startswith(WHITEOUT_PREFIX):
                victim = name[len(WHITEOUT_PREFIX) :]
                if victim in ("", ".", ".."):
                    self.warn(f"layer {layer}: ignoring whiteout {entry.path!r}: names no entry")
                    continue
                whiteouts.append((parent, victim))

        # Removals first, and only of what lower layers made (image-spec).
        for parent in opaque_dirs:
            found = self._resolve(parent, None)
            directory = found.node
            if directory is not None and directory.children is not None:
                if self.on_change is not None:
                    for name, child in sorted(directory.children.items()):
                        self._report(layer, [*found.names, name], ChangeKind.OPAQUE, child)
                directory.children.clear()
        for parent, victim in whiteouts:
            found = self._resolve(parent, None)
            directory = found.node
            if directory is not None and directory.children is not None:
                removed = directory.children.pop(victim, None)
                if removed is not None and self.on_change is not None:
                    self._report(layer, [*found.names, victim], ChangeKind.WHITEOUT, removed)
        # An opaque directory exists in this layer even if nothing else says so.
        for parent in opaque_dirs:
            self._resolve(parent, layer)

        self._forget_parents()
        add = self._add
        for path, parent_path, name, entry in additions:
            add(layer, path, parent_path, name, entry)
        self._forget_parents()

    def _forget_parents(self) -> None:
        self._last_parent = self._last_dir = None

    def _parent_for_add(self, parent_path: str, layer: int) -> tuple[Node, tuple[str, ...]]:
        """``_resolve(parent_path, layer)``, from the caches when they hold it."""
        for cached in (self._last_dir, self._last_parent):
            if cached is not None and cached[0] == parent_path:
                return cached[1]
        found = self._resolve(parent_path, layer)
        assert found.node is not None  # created where missing
        parent = (found.node, found.names)
        self._last_parent = (parent_path, parent)
        return parent

    def _add(self, layer: int, path: str, parent_path: str, name: str, entry: TarEntry) -> None:
        if path == "":
            # The root entry ("./") only carries the root directory's attributes.
            if entry.type is not EntryType.DIRECTORY:
                self.warn(f"layer {layer}: ignoring non-directory entry for the root")
                return
            set_dir_attrs(self.root, entry, layer)
            if self.on_change is not None:
                self._report(layer, [], ChangeKind.UPDATE, self.root)
            return
        parent, names = self._parent_for_add(parent_path, layer)
        children = parent.children
        assert children is not None
        existing = children.get(name)
        etype = entry.type
        if etype is EntryType.DIRECTORY and existing is not None and existing.is_dir:
            set_dir_attrs(existing, entry, layer)
            self._last_dir = (path, (existing, (*names, name)))
            if self.on_change is not None:
                self._report(layer, [*names, name], ChangeKind.UPDATE, existing)
            return
        if etype is EntryType.HARDLINK:
            target_path = clean_path(entry.linkname)
            target = self._lookup(target_path) if target_path is not None else None
            if target is None or target.is_dir:
                what = "a directory" if target is not None else "a missing entry"
                self.warn(
                    f"layer {layer}: dropping hardlink {path!r} -> {entry.linkname!r}: "
                    f"target is {what}"
                )
                return
            new = target
        else:
            new = node_from_entry(entry, layer)
        if existing is not None and existing is not new:
            if self.on_change is not None:
                self._report(layer, [*names, name], ChangeKind.REPLACE, existing)
            self._forget_parents()
        if self.on_change is not None:
            self._report(layer, [*names, name], ChangeKind.ADD, new)
        children[name] = new
        if new.type is EntryType.DIRECTORY:
            self._last_dir = (path, (new, (*names, name)))


def merge_layers(
    layers: Iterable[Iterable[TarEntry]], warn: Warn, on_change: OnChange | None = None
) -> Node:
    """Apply the layers (base first) and return the merged root directory."""
    merger = _Merger(warn, on_change)
    for index, entries in enumerate(layers):
        merger.apply_layer(index, entries)
    return merger.root


def merge_steps(
    layers: Iterable[Iterable[TarEntry]], warn: Warn, on_change: OnChange | None = None
) -> Iterator[Node]:
    """Like :func:`merge_layers`, yielding the root after each layer.

    The same root is yielded each time and changed in place by the next
    layer: copy what must outlive a step (:func:`imagefs.forensics.views.clone_tree`).
    """
    merger = _Merger(warn, on_change)
    for index, entries in enumerate(layers):
        merger.apply_layer(index, entries)
        yield merger.root
