"""Which layer put a path there: provenance xattrs and ``imagefs which``.

Every node remembers the index of the layer whose entry made it (for a
directory: the last layer with an entry for it; for an implied directory:
the layer whose deeper entry implied it). On a mount, three extended
attributes answer for any path::

    user.imagefs.layer        that layer's digest (sha256:...)
    user.imagefs.layer_index  its index, 0 for the base layer
    user.imagefs.created_by   its step in the image's history (when known)

They are *hidden*: ``getxattr`` answers them but ``listxattr`` never names
them, so ``cp -a``, ``tar --xattrs``, ``rsync -X`` and any comparison of the
mount with the image see exactly the image's own xattrs. The image always
wins: if it sets an xattr of one of these names itself, that value is what
``getxattr`` returns (and the mount logs a warning, because an image that does
this is trying to mislead). Linux answers ``user.*`` xattrs only for regular
files and directories (the VFS returns ENODATA for symlinks, devices and
FIFOs before FUSE is asked); ``imagefs which`` covers those.

``imagefs which SOURCE PATH`` scans the image without mounting and tells the
same, plus every earlier layer that touched the path: added it, replaced
it, deleted it (whiteout, opaque directory, or with a parent directory).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imagefs.digest import Digest
from imagefs.errors import UsageError
from imagefs.forensics.history import image_history
from imagefs.forensics.views import lookup_literal
from imagefs.image import Image
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.overlay import (
    REMOVALS,
    ROOT_LAYER,
    Change,
    ChangeKind,
    Node,
    child_node,
    clean_path,
    merge_layers,
)
from imagefs.tree.resolve import resolve
from imagefs.tree.served import Attributes, Tree, resolve_in_tree

XATTR_PREFIX = "user.imagefs."
LAYER_XATTR = "user.imagefs.layer"
LAYER_INDEX_XATTR = "user.imagefs.layer_index"
CREATED_BY_XATTR = "user.imagefs.created_by"
# On a file a host store changed, served anyway (mount --allow-modified): how
# it changed ("content changed (CRC-64)", "size 5 -> 12", ...).
MODIFIED_XATTR = "user.imagefs.modified"
PROVENANCE_XATTRS = (LAYER_XATTR, LAYER_INDEX_XATTR, CREATED_BY_XATTR, MODIFIED_XATTR)


@dataclass(frozen=True, slots=True)
class LayerInfo:
    index: int
    digest: Digest
    diff_id: Digest | None
    created_by: str | None


def layer_infos(image: Image) -> list[LayerInfo]:
    history = image_history(image)
    return [
        LayerInfo(index, layer.descriptor.digest, layer.diff_id, step.created_by if step else None)
        for index, (layer, step) in enumerate(zip(image.layers, history.by_layer, strict=True))
    ]


class Provenance:
    """Answers ``getxattr`` for the nodes of one image: its own xattrs, then provenance."""

    def __init__(self, image: Image, warn: Callable[[str], None]) -> None:
        self.layers = layer_infos(image)
        self._warn = warn
        self._warned: set[int] = set()
        self.modified: dict[int, bytes] = {}  # ino -> how the host changed it

    def mark_modified(
        self, tree: Tree, changes: dict[int, dict[str, str]], prefixes: Sequence[str] = ("",)
    ) -> int:
        """Mark the served files the host changed (:func:`imagefs.forensics.verify.modified_paths`).

        A path is marked where the merge placed it, and only if the file
        there comes from the changed layer (a later layer may have replaced
        it: then what is served is not the changed file). ``prefixes``: where
        the tree holds image paths (``rootfs/`` and ``layers/N/`` of a
        ``--layers`` mount). Returns how many inodes were marked.
        """
        for layer, paths in changes.items():
            for path, detail in paths.items():
                for prefix in prefixes:
                    node = resolve_in_tree(tree, prefix.format(layer=layer) + path).node
                    # layers/N/ shows layer N's own entries; anywhere else the
                    # file must still be the one layer N put there.
                    own_layer_view = "{layer}" in prefix
                    if node is not None and (own_layer_view or node.layer == layer):
                        self.modified[node.ino] = detail.encode("utf-8", "backslashreplace")
        return len(self.modified)

    def getxattr(self, ino: int, node: Attributes, name: str) -> bytes | None:
        """The image's own xattr ``name`` of ``node`` if it has one, else provenance."""
        if name == MODIFIED_XATTR and ino in self.modified:
            return self.modified[ino]  # the host's doing: it wins over the image's own
        value = node.xattrs.get(name)
        if value is None:
            return self.xattr(node, name)
        if name in PROVENANCE_XATTRS and ino not in self._warned:
            # Checked here, not by walking the tree at mount time: a mapped
            # tree (see imagefs.tree.persisted) must not be decoded whole for a warning.
            self._warned.add(ino)
            self._warn(
                f"inode {ino}: the image itself sets {name}; getfattr shows the image's "
                "value there, not imagefs's (use 'imagefs which')"
            )
        return value

    def xattr(self, node: Attributes, name: str) -> bytes | None:
        """The value of provenance xattr ``name`` for ``node``, or None."""
        if not name.startswith(XATTR_PREFIX) or not 0 <= node.layer < len(self.layers):
            return None
        info = self.layers[node.layer]
        if name == LAYER_XATTR:
            return info.digest.encode()
        if name == LAYER_INDEX_XATTR:
            return str(info.index).encode()
        if name == CREATED_BY_XATTR and info.created_by is not None:
            return info.created_by.encode("utf-8", "backslashreplace")
        return None


# -- imagefs which ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Something a layer did to the path (``what``: see :func:`trace_path`)."""

    layer: int
    what: str
    node: Node | None  # what the layer put there, or what it removed
    via: str = ""  # for a removal with a parent directory: that directory's path


@dataclass(frozen=True, slots=True)
class PathTrace:
    path: str  # as asked, cleaned
    resolved: str  # where the merge places an entry at ``path`` in the final tree
    node: Node | None  # in the final root file system
    events: tuple[Event, ...]
    layers: tuple[LayerInfo, ...]


_REMOVED_HOW = {
    ChangeKind.WHITEOUT: "deleted (whiteout)",
    ChangeKind.OPAQUE: "deleted (opaque directory)",
    ChangeKind.REPLACE: "replaced",
}
_REMOVED_WITH_PARENT = {
    ChangeKind.WHITEOUT: "deleted with parent (whiteout)",
    ChangeKind.OPAQUE: "deleted with parent (opaque directory)",
    ChangeKind.REPLACE: "removed with parent (replaced)",
}


def trace_path(image: Image, layer_entries: Sequence[Sequence[TarEntry]], path: str) -> PathTrace:
    """The history of ``path`` across the (scanned) layers of ``image``.

    Event kinds, oldest first: ``added``, ``replaced`` (a new entry took the
    path; ``node`` is the new one), ``updated`` (a directory entry over the
    directory: new attributes), ``implied`` (made as the parent of a deeper
    entry), ``deleted (whiteout)``, ``deleted (opaque directory)``, and
    ``deleted with parent (...)`` / ``removed with parent (replaced)`` when a
    directory above the path was removed (``via`` names it).
    """
    cleaned = clean_path(path)
    if cleaned is None:
        raise UsageError(f"{path}: not a path inside an image")
    changes: list[Change] = []
    final = merge_layers(layer_entries, lambda message: None, changes.append)
    # Resolved as the merge places an entry at ``path`` (imagefs.tree.resolve):
    # symlinked parents followed inside the image, the last component not.
    found = resolve(final, cleaned, child_node)
    resolved, node = found.path, found.node
    events: list[Event] = []
    pending_replace: Change | None = None
    for change in changes:
        if change.path == resolved:
            if change.kind is ChangeKind.REPLACE:
                pending_replace = change
                continue
            if change.kind in (ChangeKind.ADD, ChangeKind.IMPLY):
                replaced = pending_replace is not None and pending_replace.layer == change.layer
                what = "added" if change.kind is ChangeKind.ADD else "implied"
                events.append(Event(change.layer, "replaced" if replaced else what, change.node))
            elif change.kind is ChangeKind.UPDATE:
                events.append(Event(change.layer, "updated", change.node))
            else:
                events.append(Event(change.layer, _REMOVED_HOW[change.kind], change.node))
            pending_replace = None
        elif change.kind in REMOVALS and (change.path == "" or _is_below(resolved, change.path)):
            inside = lookup_literal(change.node, resolved[len(change.path) :])
            if inside is not None:
                how = _REMOVED_WITH_PARENT[change.kind]
                events.append(Event(change.layer, how, inside, change.path))
    return PathTrace(cleaned, resolved, node, tuple(events), tuple(layer_infos(image)))


def _is_below(path: str, ancestor: str) -> bool:
    return path.startswith(ancestor + "/")


# -- describing nodes ---------------------------------------------------------------------------

_KIND_NAMES = {
    EntryType.FILE: "file",
    EntryType.DIRECTORY: "dir",
    EntryType.SYMLINK: "symlink",
    EntryType.HARDLINK: "hardlink",
    EntryType.CHAR_DEVICE: "char",
    EntryType.BLOCK_DEVICE: "block",
    EntryType.FIFO: "fifo",
}


def kind_name(node: Attributes) -> str:
    return _KIND_NAMES[node.type]


def describe(node: Attributes) -> str:
    """``file 0644 0:0 1234 bytes``, ``symlink -> target``, ``char 1,3``..."""
    base = f"{kind_name(node)} {node.mode:04o} {node.uid}:{node.gid}"
    if node.type is EntryType.FILE:
        return f"{base} {node.size} bytes"
    if node.type is EntryType.SYMLINK:
        return f"{base} -> {node.target}"
    if node.type in (EntryType.CHAR_DEVICE, EntryType.BLOCK_DEVICE):
        return f"{base} {os.major(node.rdev)},{os.minor(node.rdev)}"
    return base


def node_json(node: Attributes) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": kind_name(node),
        "mode": f"{node.mode:04o}",
        "uid": node.uid,
        "gid": node.gid,
    }
    if node.type is EntryType.FILE:
        out["size"] = node.size
    elif node.type is EntryType.SYMLINK:
        out["target"] = node.target
    elif node.type in (EntryType.CHAR_DEVICE, EntryType.BLOCK_DEVICE):
        out["rdev"] = [os.major(node.rdev), os.minor(node.rdev)]
    return out


def trace_json(trace: PathTrace) -> dict[str, Any]:
    def layer(index: int) -> dict[str, Any]:
        info = trace.layers[index]
        return {
            "layer_index": index,
            "layer": info.digest,
            "diff_id": info.diff_id or None,
            "created_by": info.created_by,
        }

    current: dict[str, Any] | None = None
    if trace.node is not None:
        current = node_json(trace.node)
        current.update(layer(trace.node.layer) if trace.node.layer != ROOT_LAYER else {})
    return {
        "path": "/" + trace.path,
        "resolved": "/" + trace.resolved,
        "current": current,
        "history": [
            {
                **layer(event.layer),
                "event": event.what,
                **({"via": "/" + event.via} if event.via else {}),
                "entry": node_json(event.node) if event.node is not None else None,
            }
            for event in trace.events
        ],
    }


def trace_text(trace: PathTrace) -> list[str]:
    """Human-readable lines for ``imagefs which``."""
    shown = "/" + trace.path
    if trace.resolved != trace.path:
        shown += f" (resolves to /{trace.resolved})"
    lines = []
    node = trace.node
    if node is None:
        lines.append(f"{shown}: not in the image's root file system")
    else:
        lines.append(f"{shown}: {describe(node)}")
        if node.layer == ROOT_LAYER:
            lines.append("  layer:       none (the root, with no entry in any layer)")
        else:
            info = trace.layers[node.layer]
            lines.append(f"  layer:       {info.index} {info.digest}")
            lines.append(f"  created_by:  {info.created_by or '(unknown)'}")
    if trace.events:
        lines.append("history, oldest first:")
        for event in trace.events:
            info = trace.layers[event.layer]
            what = event.what
            if event.via:
                what = what.replace(" with parent", f" with /{event.via}")
            entry = describe(event.node) if event.node is not None else ""
            lines.append(f"  layer {info.index:<3} {what}: {entry}")
            lines.append(f"            {info.digest}  {info.created_by or '(unknown step)'}")
    return lines
