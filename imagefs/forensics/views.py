"""Layer views for incident response: ``imagefs mount --layers`` and ``--upto``.

With ``--layers`` the mount's root is not the image's root file system but a
tree of views of the image, all read-only, all served from the layers in
place (nothing is extracted)::

    MNT/rootfs/       the image's root file system: what a plain mount shows
    MNT/layers/N/     exactly the entries of layer N (0 = base), at the paths
                      its tar gives them; whiteouts stay visible as the empty
                      ``.wh.NAME`` and ``.wh..wh..opq`` files the tar holds
    MNT/upto/N/       the root file system as it stood after layer N
                      (what ``imagefs mount --upto N`` shows)
    MNT/deleted/N/    what layer N deleted (whiteouts, opaque directories),
                      at the paths it had, as it was before layer N
    MNT/shadowed/N/   what layer N overwrote: the older version of every
                      path that an entry of layer N replaced (a lower
                      layer's, or an earlier duplicate in layer N's own tar)

So every version of every file any layer holds is readable in ``rootfs``,
``deleted`` or ``shadowed``, and ``grep -r SECRET MNT/deleted MNT/shadowed``
finds what a later layer tried to hide. Directories in ``deleted/N`` and
``shadowed/N`` that only lead to a removed path carry the attributes the
directory had before layer N. If layer N overwrote one path several times
(duplicate entries in its tar), the later victims are named ``NAME.~2~``,
``NAME.~3~``... in the order they were overwritten, like ``cp
--backup=numbered``.

Every view has its own inode numbers: a file present in several views is a
separate inode in each, so link counts, ``cp -a`` and ``tar`` of one view
see exactly that view's hardlinks. The views cost memory: each ``upto/N``
is a copy of the tree's directories and nodes, so ``--layers`` holds about
(number of layers + 1) times the nodes of a plain mount.

Building a view needs no FUSE: :func:`build_layer_views` returns one
:class:`~imagefs.tree.overlay.Node` tree that :func:`~imagefs.tree.merged.freeze` numbers
like any other; file nodes keep their layer index and data offset, so
:class:`~imagefs.tree.content.ContentReader` reads them unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from imagefs.errors import UsageError
from imagefs.image import Image
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.overlay import (
    REMOVALS,
    ROOT_LAYER,
    Change,
    ChangeKind,
    Node,
    Warn,
    child_node,
    clean_path,
    implied_directory,
    merge_steps,
    new_directory,
    node_from_entry,
    set_dir_attrs,
)
from imagefs.tree.resolve import LITERAL, resolve

ROOTFS = "rootfs"
LAYERS = "layers"
UPTO = "upto"
DELETED = "deleted"
SHADOWED = "shadowed"
# The directories imagefs makes up (the top, layers/, upto/...): readable by
# all, visibly not writable; root-owned, mtime 0 (they are not in the image).
SYNTHETIC_DIR_MODE = 0o555


def upto_image(image: Image, upto: int) -> Image:
    """``image`` with only its layers 0..``upto`` (negative: counted from the end)."""
    count = len(image.layers)
    index = upto + count if upto < 0 else upto
    if not 0 <= index < count:
        last = f"0 to {count - 1}" if count else "none"
        raise UsageError(f"--upto {upto}: {image.source} has {count} layers ({last})")
    return dataclasses.replace(image, layers=image.layers[: index + 1])


# -- copying trees ---------------------------------------------------------------


def copy_node(node: Node) -> Node:
    """A detached copy of one node; a directory's copy has no children yet.

    The xattrs dict is shared: it is never mutated after the merge (replaced whole).
    """
    return dataclasses.replace(node, children={} if node.is_dir else None)


def clone_tree(root: Node, memo: dict[int, Node] | None = None) -> Node:
    """Copy a tree (iteratively: no depth limit).

    Non-directories shared within the tree (hardlinks) stay shared in the
    copy; ``memo`` (id of original -> copy) extends that sharing across
    several calls, for one view made of several removed subtrees.
    """
    memo = {} if memo is None else memo

    def copy(node: Node) -> Node:
        if node.is_dir:
            return copy_node(node)
        existing = memo.get(id(node))
        if existing is None:
            existing = memo[id(node)] = copy_node(node)
        return existing

    top = copy(root)
    stack = [(root, top)] if root.is_dir else []
    while stack:
        original, duplicate = stack.pop()
        assert original.children is not None and duplicate.children is not None
        for name, child in original.children.items():
            child_copy = copy(child)
            duplicate.children[name] = child_copy
            if child.is_dir:
                stack.append((child, child_copy))
    return top


def lookup_literal(root: Node, path: str) -> Node | None:
    """The node at ``path`` below ``root``, following no symlinks (a literal walk)."""
    return resolve(root, path, child_node, hop_limit=LITERAL).node


# -- one layer's own entries -------------------------------------------------------


def _make_dirs(root: Node, path: str, entries: dict[int, Node]) -> Node | None:
    """The directory at ``path`` below ``root``, created (implied) where missing.

    Follows no symlinks: these views show paths as the tar spells them. A
    non-directory in the way that is one of the layer's own ``entries`` (ids)
    stays, and None is returned: an entry outranks a directory merely implied
    by a deeper path (umoci writes whiteouts below a symlink of the same
    layer, "srv/cache" and "srv/cache/.wh.item").
    """

    def make_directory(
        parent: Node, name: str, existing: Node | None, names: tuple[str, ...]
    ) -> Node | None:
        if existing is not None and id(existing) in entries:
            return None
        assert parent.children is not None
        directory = parent.children[name] = implied_directory(root.layer)
        return directory

    found = resolve(
        root, path, child_node, follow_last=True, make_directory=make_directory, hop_limit=LITERAL
    )
    return found.node


def layer_tree(layer: int, entries: Iterable[TarEntry], lower: Node | None) -> Node:
    """Exactly layer ``layer``'s entries, at their literal (cleaned) paths.

    Whiteout and opaque entries are kept as the files the tar holds. The
    last entry for a path wins (the others are in ``shadowed/N``); an entry
    below a non-directory entry of the same layer cannot be shown. A
    hardlink to a lower layer's file (``lower`` is the tree before this
    layer) shows that file's data, as a separate inode. Entries the merge
    refuses (paths leaving the root) are left out; the merge warned.
    """
    root = implied_directory(layer)
    lower_copies: dict[int, Node] = {}
    # The nodes made from this layer's entries, by id (holding them keeps the
    # ids from being reused by new nodes once an entry is replaced).
    made: dict[int, Node] = {}
    for entry in entries:
        path = clean_path(entry.path)
        if path is None:
            continue
        if path == "":
            if entry.type is EntryType.DIRECTORY:
                set_dir_attrs(root, entry, layer)
            continue
        parent_path, _, name = path.rpartition("/")
        parent = _make_dirs(root, parent_path, made)
        if parent is None:
            continue
        assert parent.children is not None
        existing = parent.children.get(name)
        if entry.type is EntryType.DIRECTORY and existing is not None and existing.is_dir:
            set_dir_attrs(existing, entry, layer)
            made[id(existing)] = existing
            continue
        if entry.type is EntryType.HARDLINK:
            target_path = clean_path(entry.linkname)
            if target_path is None:
                continue
            target = lookup_literal(root, target_path)
            if target is None and lower is not None:
                found = lookup_literal(lower, target_path)
                if found is not None and not found.is_dir:
                    target = lower_copies.get(id(found))
                    if target is None:
                        target = lower_copies[id(found)] = copy_node(found)
            if target is None or target.is_dir:
                continue
            parent.children[name] = target
        else:
            parent.children[name] = node_from_entry(entry, layer)
        made[id(parent.children[name])] = parent.children[name]
    return root


# -- what a layer removed ------------------------------------------------------------


def _backup_name(children: dict[str, Node], name: str) -> str:
    number = 2
    while f"{name}.~{number}~" in children:
        number += 1
    return f"{name}.~{number}~"


def removed_tree(layer: int, changes: Sequence[Change], before: Node | None) -> Node:
    """The nodes layer ``layer`` removed (``changes``), at their paths.

    ``before`` is the tree as it stood before the layer: directories on the
    way to a removed path copy their attributes from it, so owners and modes
    read as they were. Paths removed twice get backup names (module doc).
    """
    root = new_directory(SYNTHETIC_DIR_MODE, 0, 0, 0, layer)
    memo: dict[int, Node] = {}
    # Directories made here only to lead to a removed path; a removed
    # directory arriving later at the same path is merged into one.
    placeholders: set[int] = set()
    for change in changes:
        parent_path, _, name = change.path.rpartition("/")
        parent = root
        walked: list[str] = []
        for part in filter(None, parent_path.split("/")):
            walked.append(part)
            child = _directory_named(parent, part)
            if child is None:
                original = lookup_literal(before, "/".join(walked)) if before else None
                if original is not None and original.is_dir:
                    child = copy_node(original)
                else:
                    child = implied_directory(ROOT_LAYER)
                placeholders.add(id(child))
                assert parent.children is not None
                if part in parent.children:
                    # A removed non-directory holds the name (the layer put a
                    # directory where a file was, then removed inside it).
                    part = _backup_name(parent.children, part)
                parent.children[part] = child
            parent = child
        _place(parent, name, clone_tree(change.node, memo), placeholders)
    return root


def _directory_named(parent: Node, name: str) -> Node | None:
    """The directory ``name`` of ``parent``, or of its first backup name."""
    assert parent.children is not None
    candidate = parent.children.get(name)
    number = 2
    while candidate is not None:
        if candidate.is_dir:
            return candidate
        candidate = parent.children.get(f"{name}.~{number}~")
        number += 1
    return None


def _place(parent: Node, name: str, node: Node, placeholders: set[int]) -> None:
    assert parent.children is not None
    existing = parent.children.get(name)
    if existing is None:
        parent.children[name] = node
        return
    if node.is_dir and id(existing) in placeholders:
        # The removed directory itself arrives after one of its children was
        # removed separately (a/.wh.b before .wh.a): one directory, both
        # removals inside, with the directory's own attributes.
        assert existing.children is not None and node.children is not None
        for attribute in ("mode", "uid", "gid", "mtime_ns", "layer", "xattrs"):
            setattr(existing, attribute, getattr(node, attribute))
        placeholders.discard(id(existing))
        for child_name, child in node.children.items():
            _place(existing, child_name, child, placeholders)
        return
    parent.children[_backup_name(parent.children, name)] = node


# -- the whole --layers tree ------------------------------------------------------------


def _numbered(nodes: Sequence[Node]) -> Node:
    directory = new_directory(SYNTHETIC_DIR_MODE, 0, 0, 0, ROOT_LAYER)
    assert directory.children is not None
    for index, node in enumerate(nodes):
        directory.children[str(index)] = node
    return directory


def build_layer_views(layers: Sequence[Sequence[TarEntry]], warn: Warn) -> Node:
    """The ``--layers`` tree (module docstring) of an image's scanned layers."""
    removals: list[list[Change]] = [[] for _ in layers]

    def on_change(change: Change) -> None:
        if change.kind in REMOVALS:
            removals[change.layer].append(change)

    upto: list[Node] = []
    final = implied_directory(ROOT_LAYER)
    for root in merge_steps(layers, warn, on_change):
        # The merge goes on changing ``root`` in place: keep a copy of this step.
        upto.append(clone_tree(root))
        final = root
    layer_views = [
        layer_tree(index, entries, upto[index - 1] if index else None)
        for index, entries in enumerate(layers)
    ]
    deleted = []
    shadowed = []
    for index, changes in enumerate(removals):
        before = upto[index - 1] if index else None
        deleted.append(
            removed_tree(index, [c for c in changes if c.kind is not ChangeKind.REPLACE], before)
        )
        shadowed.append(
            removed_tree(index, [c for c in changes if c.kind is ChangeKind.REPLACE], before)
        )
    top = new_directory(SYNTHETIC_DIR_MODE, 0, 0, 0, ROOT_LAYER)
    top.children = {
        ROOTFS: final,
        LAYERS: _numbered(layer_views),
        UPTO: _numbered(upto),
        DELETED: _numbered(deleted),
        SHADOWED: _numbered(shadowed),
    }
    return top
