"""``imagefs diff``: what changed between two images, or two points of one image.

Both sides are merged trees built from the layers' tar headers, as for a
mount; nothing is extracted. Per path the comparison covers type, mode
(permissions with setuid/setgid/sticky), owner, size, content (sha256),
symlink target, device numbers and xattrs. Times are left out on purpose: a
rebuild changes every mtime and says nothing about content.

Content is hashed from the layer data (:class:`~imagefs.tree.content.ContentReader`)
only where it must be: two files whose data is the same byte range of the
same uncompressed layer (same diff_id, same offset) are equal without
reading, which is what makes comparing two builds on a shared base cheap.
The hashes of added, removed and changed files are reported, so a suspicious
binary can be looked up at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from imagefs.digest import Hasher
from imagefs.forensics.provenance import node_json
from imagefs.forensics.views import SYNTHETIC_DIR_MODE, clone_tree
from imagefs.image import Image
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.content import ContentReader
from imagefs.tree.overlay import (
    ROOT_LAYER,
    Node,
    Warn,
    implied_directory,
    merge_steps,
    new_directory,
)
from imagefs.tree.served import Inode, Tree, lookup_path, walk

_CHUNK = 1 << 20
OLD, NEW = "old", "new"


@dataclass(frozen=True)
class Side:
    """One side of a comparison: the subtree ``top`` of ``tree`` (``""``: all of it)."""

    label: str
    tree: Tree
    content: ContentReader
    layer_keys: Sequence[str]  # per layer index: what names its uncompressed bytes
    top: str = ""


def layer_keys(image: Image) -> list[str]:
    # The diff_id names the uncompressed tar, which is what data offsets
    # point into; the blob digest does too when there is no diff_id.
    return [layer.diff_id or layer.descriptor.digest for layer in image.layers]


def _entries(side: Side) -> dict[str, Inode]:
    """Path ("" for the top) -> inode of every entry below the side's top."""
    top = None
    if side.top:
        top = lookup_path(side.tree, side.top)
        assert top is not None, side.top  # made by states_builder
    return dict(walk(side.tree, top))


class _Hasher:
    """sha256 of file contents, read from the layers once per distinct byte range."""

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], str] = {}

    @staticmethod
    def key(side: Side, node: Inode) -> tuple[object, ...]:
        return (side.layer_keys[node.layer], node.data_offset, node.size, node.sparse)

    def sha256(self, side: Side, node: Inode) -> str:
        key = self.key(side, node)
        cached = self._cache.get(key)
        if cached is None:
            hasher = Hasher("sha256")
            for offset in range(0, node.size, _CHUNK):
                hasher.update(side.content.read(node, offset, _CHUNK))
            cached = self._cache[key] = hasher.result()
        return cached


@dataclass(frozen=True)
class Difference:
    path: str  # absolute, "/" for the root
    status: str  # "added", "removed" or "changed"
    fields: tuple[str, ...]  # for "changed": what differs
    old: dict[str, Any] | None
    new: dict[str, Any] | None


def _xattrs(node: Inode) -> dict[str, str]:
    # Values are bytes (security.capability is binary): hex, to be exact.
    return {name: value.hex() for name, value in sorted(node.xattrs.items())}


def _info(side: Side, node: Inode, hasher: _Hasher) -> dict[str, Any]:
    # What `imagefs which --json` says of a node, plus what a diff compares.
    info = node_json(node)
    if node.type is EntryType.FILE:
        info["sha256"] = hasher.sha256(side, node)
    if node.xattrs:
        info["xattrs"] = _xattrs(node)
    if node.layer != ROOT_LAYER:
        info["layer_index"] = node.layer
    return info


def _changed_fields(old: Side, a: Inode, new: Side, b: Inode, hasher: _Hasher) -> list[str]:
    fields = [
        name
        for name, x, y in (
            ("type", a.type, b.type),
            ("mode", a.mode, b.mode),
            ("uid", a.uid, b.uid),
            ("gid", a.gid, b.gid),
        )
        if x != y
    ]
    if a.type is EntryType.FILE and b.type is EntryType.FILE:
        if a.size != b.size:
            fields += ["size", "sha256"]
        elif hasher.key(old, a) != hasher.key(new, b) and (
            hasher.sha256(old, a) != hasher.sha256(new, b)
        ):
            fields.append("sha256")
    elif a.type is EntryType.SYMLINK and b.type is EntryType.SYMLINK:
        if a.target != b.target:
            fields.append("target")
    elif a.type is b.type and a.rdev != b.rdev:
        fields.append("rdev")
    if a.xattrs != b.xattrs:
        fields.append("xattrs")
    return fields


def diff_sides(old: Side, new: Side) -> Iterator[Difference]:
    """Every difference, in path order (byte order of the names, as ``sort`` in C)."""
    hasher = _Hasher()
    before = _entries(old)
    after = _entries(new)
    for path in sorted(before.keys() | after.keys(), key=os.fsencode):
        shown = "/" + path
        a = before.get(path)
        b = after.get(path)
        if b is None:
            assert a is not None
            yield Difference(shown, "removed", (), _info(old, a, hasher), None)
        elif a is None:
            yield Difference(shown, "added", (), None, _info(new, b, hasher))
        else:
            fields = _changed_fields(old, a, new, b, hasher)
            if fields:
                yield Difference(
                    shown,
                    "changed",
                    tuple(fields),
                    _info(old, a, hasher),
                    _info(new, b, hasher),
                )


# -- two points of one image -----------------------------------------------------------


def states_builder(old: int, new: int) -> Callable[[Sequence[Sequence[TarEntry]], Warn], Node]:
    """A tree builder (for ``load_image``): the merged trees after layers ``old``
    and ``new`` side by side, as ``/old`` and ``/new``; -1 is the empty tree
    before the first layer."""

    def build(layers: Sequence[Sequence[TarEntry]], warn: Warn) -> Node:
        states = {-1: implied_directory(ROOT_LAYER)}
        for index, root in enumerate(merge_steps(layers, warn)):
            if index in (old, new):
                states[index] = clone_tree(root)
        top = new_directory(SYNTHETIC_DIR_MODE, 0, 0, 0, ROOT_LAYER)
        top.children = {OLD: states[old], NEW: states[new]}
        return top

    return build


# -- output -----------------------------------------------------------------------------------

_STATUS_LETTER = {"added": "A", "removed": "D", "changed": "M"}


def _summary(info: dict[str, Any]) -> str:
    parts = [info["type"], info["mode"], f"{info['uid']}:{info['gid']}"]
    if "size" in info:
        parts += [f"{info['size']} bytes", info["sha256"]]
    if "target" in info:
        parts.append(f"-> {info['target']}")
    if "rdev" in info:
        parts.append("{},{}".format(*info["rdev"]))
    return " ".join(parts)


def _field_change(name: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    if name == "xattrs":
        a, b = old.get("xattrs", {}), new.get("xattrs", {})
        names = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        return "xattrs " + ",".join(names)

    def show(info: dict[str, Any]) -> str:
        value = info.get(name)
        if name == "sha256" and isinstance(value, str):
            return value.removeprefix("sha256:")
        return "-" if value is None else str(value)

    return f"{name} {show(old)} -> {show(new)}"


def difference_line(diff: Difference) -> str:
    letter = _STATUS_LETTER[diff.status]
    if diff.status == "added":
        assert diff.new is not None
        return f"{letter} {diff.path}  {_summary(diff.new)}"
    if diff.status == "removed":
        assert diff.old is not None
        return f"{letter} {diff.path}  {_summary(diff.old)}"
    assert diff.old is not None and diff.new is not None
    changes = ", ".join(_field_change(name, diff.old, diff.new) for name in diff.fields)
    return f"{letter} {diff.path}  {changes}"


def diff_json(old_label: str, new_label: str, differences: Sequence[Difference]) -> str:
    counts = {status: 0 for status in _STATUS_LETTER}
    for diff in differences:
        counts[diff.status] += 1
    report = {
        "old": old_label,
        "new": new_label,
        "summary": counts,
        "changes": [
            {
                "path": diff.path,
                "status": diff.status,
                "fields": list(diff.fields),
                "old": diff.old,
                "new": diff.new,
            }
            for diff in differences
        ],
    }
    return json.dumps(report, indent=2)
