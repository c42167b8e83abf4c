"""The merge's change reports and the views built from them, without FUSE.

Table-driven like tests/test_overlay.py: each case states layers and the
(layer, path, kind) changes the merge must report, in order.
"""

from __future__ import annotations

import pytest

from imagefs.forensics.views import (
    build_layer_views,
    clone_tree,
    layer_tree,
    lookup_literal,
    removed_tree,
)
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import Change, ChangeKind, merge_layers, merge_steps
from imagefs.tree.served import lookup_path

F, D, L, H = EntryType.FILE, EntryType.DIRECTORY, EntryType.SYMLINK, EntryType.HARDLINK
ADD, UPDATE, IMPLY = ChangeKind.ADD, ChangeKind.UPDATE, ChangeKind.IMPLY
WHITEOUT, OPAQUE, REPLACE = ChangeKind.WHITEOUT, ChangeKind.OPAQUE, ChangeKind.REPLACE


def e(path: str, kind: EntryType = F, *, link: str = "", offset: int = 0) -> TarEntry:
    mode = 0o755 if kind is D else 0o644
    return TarEntry(path, kind, mode, 0, 0, 0, 0, linkname=link, data_offset=offset)


def changes(*layers: list[TarEntry]) -> list[tuple[int, str, ChangeKind]]:
    seen: list[Change] = []
    merge_layers(layers, lambda message: None, seen.append)
    return [(c.layer, c.path, c.kind) for c in seen]


CASES = {
    "added with implied parent": (
        [[e("a/b")]],
        [(0, "a", IMPLY), (0, "a/b", ADD)],
    ),
    "whiteout of a lower file": (
        [[e("a/", D), e("a/x")], [e("a/.wh.x")]],
        [(0, "a", ADD), (0, "a/x", ADD), (1, "a/x", WHITEOUT)],
    ),
    "whiteout of nothing reports nothing": (
        [[e("a/", D)], [e("a/.wh.x"), e(".wh.nothere")]],
        [(0, "a", ADD)],
    ),
    "opaque reports each lower child, sorted": (
        [[e("d/", D), e("d/z"), e("d/a")], [e("d/.wh..wh..opq"), e("d/new")]],
        [
            (0, "d", ADD),
            (0, "d/z", ADD),
            (0, "d/a", ADD),
            (1, "d/a", OPAQUE),
            (1, "d/z", OPAQUE),
            (1, "d/new", ADD),
        ],
    ),
    "file over file is a replace, then an add": (
        [[e("x")], [e("x")]],
        [(0, "x", ADD), (1, "x", REPLACE), (1, "x", ADD)],
    ),
    "directory over directory is an update": (
        [[e("d/", D)], [e("d/", D)]],
        [(0, "d", ADD), (1, "d", UPDATE)],
    ),
    "root entry updates the root": (
        [[e("./", D)]],
        [(0, "", UPDATE)],
    ),
    "duplicate in one layer replaces the first": (
        [[e("x"), e("x")]],
        [(0, "x", ADD), (0, "x", REPLACE), (0, "x", ADD)],
    ),
    "deeper entry over a file replaces it with an implied directory": (
        [[e("a")], [e("a/b")]],
        [(0, "a", ADD), (1, "a", REPLACE), (1, "a", IMPLY), (1, "a/b", ADD)],
    ),
    "paths are reported resolved through symlinked parents": (
        [[e("usr/lib/", D), e("lib", L, link="usr/lib")], [e("lib/x"), e("lib/.wh.y")]],
        [(0, "usr", IMPLY), (0, "usr/lib", ADD), (0, "lib", ADD), (1, "usr/lib/x", ADD)],
    ),
    "absolute symlink resolves from the root": (
        [[e("real/", D), e("a/", D), e("a/l", L, link="/real")], [e("a/l/f")]],
        [(0, "real", ADD), (0, "a", ADD), (0, "a/l", ADD), (1, "real/f", ADD)],
    ),
    "hardlink is an add of the shared node": (
        [[e("t"), e("h", H, link="t")]],
        [(0, "t", ADD), (0, "h", ADD)],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_reported_changes(case: str) -> None:
    layers, expected = CASES[case]
    assert changes(*layers) == expected


def test_removed_nodes_are_detached_and_unchanged() -> None:
    seen: list[Change] = []
    merge_layers(
        [[e("d/", D), e("d/f", offset=512)], [e(".wh.d")], [e("d/", D), e("d/g")]],
        lambda message: None,
        seen.append,
    )
    removed = next(c for c in seen if c.kind is WHITEOUT)
    assert removed.path == "d" and removed.node.children is not None
    assert list(removed.node.children) == ["f"]  # the re-created d/ is another node


def test_merge_steps_yield_each_state() -> None:
    layers = [[e("a")], [e(".wh.a"), e("b")]]
    snapshots = [clone_tree(root) for root in merge_steps(layers, lambda message: None)]
    assert [sorted(s.children or {}) for s in snapshots] == [["a"], ["b"]]


def test_layer_tree_is_literal() -> None:
    entries = [e("lib", L, link="usr/lib"), e("lib/x"), e("d/.wh.gone"), e("d/.wh..wh..opq")]
    tree = layer_tree(3, entries, None)
    # An entry below a same-layer symlink cannot be shown; whiteouts are files.
    assert lookup_literal(tree, "lib") is not None
    assert lookup_literal(tree, "lib/x") is None
    gone = lookup_literal(tree, "d/.wh.gone")
    assert gone is not None and gone.type is F and gone.layer == 3
    assert lookup_literal(tree, "d/.wh..wh..opq") is not None


def test_layer_tree_hardlink_to_lower_layer_copies_the_node() -> None:
    lower = merge_layers([[e("t", offset=512)]], lambda message: None)
    tree = layer_tree(1, [e("h", H, link="t")], lower)
    h = lookup_literal(tree, "h")
    original = lookup_literal(lower, "t")
    assert h is not None and original is not None
    assert h is not original and h.data_offset == 512 and h.layer == 0


def test_removed_tree_merges_a_directory_removed_after_its_child() -> None:
    seen: list[Change] = []
    before = merge_layers(
        [[e("a/", D), e("a/b"), e("a/c")], [e("a/.wh.b"), e(".wh.a")]],
        lambda message: None,
        seen.append,
    )
    assert before.children == {}
    removals = [c for c in seen if c.kind is WHITEOUT]
    assert [c.path for c in removals] == ["a/b", "a"]
    tree = removed_tree(1, removals, None)
    a = lookup_literal(tree, "a")
    assert a is not None and a.children is not None
    assert sorted(a.children) == ["b", "c"] and a.layer == 0


def test_layer_views_tree_freezes_with_separate_inodes() -> None:
    layers = [[e("t", offset=512), e("h", H, link="t")], [e(".wh.t")]]
    tree = freeze(build_layer_views(layers, lambda message: None))
    final = lookup_path(tree, "rootfs/h")
    first = lookup_path(tree, "upto/0/h")
    deleted = lookup_path(tree, "deleted/1/t")
    assert final is not None and first is not None and deleted is not None
    assert final.nlink == 1 and first.nlink == 2 and deleted.nlink == 1
    assert len({final.ino, first.ino, deleted.ino}) == 3
    assert lookup_path(tree, "layers/1/.wh.t") is not None
    assert lookup_path(tree, "shadowed/1") is not None
