"""Table-driven tests of the OCI layer-merge rules (image-spec layer.md)."""

from __future__ import annotations

import os

import pytest

from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.merged import MergedTree, freeze
from imagefs.tree.overlay import clean_path, merge_layers
from imagefs.tree.served import lookup_path, walk

F, D, L, H = EntryType.FILE, EntryType.DIRECTORY, EntryType.SYMLINK, EntryType.HARDLINK


def e(
    path: str,
    kind: EntryType = F,
    *,
    link: str = "",
    mode: int | None = None,
    size: int = 0,
    offset: int = 0,
    uid: int = 0,
) -> TarEntry:
    if mode is None:
        mode = 0o755 if kind is D else 0o644
    return TarEntry(
        path=path,
        type=kind,
        mode=mode,
        uid=uid,
        gid=0,
        size=size,
        mtime_ns=0,
        linkname=link,
        data_offset=offset,
    )


def merged(*layers: list[TarEntry]) -> tuple[MergedTree, list[str]]:
    warnings: list[str] = []
    return freeze(merge_layers(layers, warnings.append)), warnings


def view(tree: MergedTree) -> dict[str, str]:
    """path -> short description ("f@L0", "d", "l->target"), root omitted."""
    out = {}
    for path, node in walk(tree):
        if not path:
            continue
        if node.type is D:
            out[path] = "d"
        elif node.type is L:
            out[path] = f"l->{node.target}"
        else:
            out[path] = f"{node.type.name[0].lower()}@L{node.layer}"
    return out


CASES = {
    "whiteout removes lower file": (
        [[e("a/", D), e("a/x"), e("a/y")], [e("a/.wh.x")]],
        {"a": "d", "a/y": "f@L0"},
    ),
    "whiteout removes lower directory subtree": (
        [[e("a/", D), e("a/b/", D), e("a/b/c")], [e("a/.wh.b")]],
        {"a": "d"},
    ),
    "whiteout does not hide same-layer entry (either order)": (
        [
            [e("x")],
            [e("x"), e(".wh.x")],
        ],
        {"x": "f@L1"},
    ),
    "whiteout after same-layer entry keeps it": (
        [[e("x")], [e(".wh.x"), e("x")]],
        {"x": "f@L1"},
    ),
    "whiteout of missing path is a no-op": (
        [[e("a")], [e(".wh.nothing")]],
        {"a": "f@L0"},
    ),
    "whiteout file never visible": (
        [[e(".wh.ghost"), e("d/.wh.ghost2")]],
        {},
    ),
    "opaque hides lower children, keeps same-layer ones": (
        [
            [e("a/", D), e("a/old"), e("a/sub/", D), e("a/sub/deep")],
            [e("a/", D), e("a/new"), e("a/.wh..wh..opq")],
        ],
        {"a": "d", "a/new": "f@L1"},
    ),
    "opaque marker before siblings (spec example)": (
        [
            [e("a/", D), e("a/b/", D), e("a/b/c/", D), e("a/b/c/bar")],
            [e("a/", D), e("a/.wh..wh..opq"), e("a/b/", D), e("a/b/c/", D), e("a/b/c/foo")],
        ],
        {"a": "d", "a/b": "d", "a/b/c": "d", "a/b/c/foo": "f@L1"},
    ),
    "opaque marker implies its directory": (
        [[e("z")], [e("q/.wh..wh..opq")]],
        {"z": "f@L0", "q": "d"},
    ),
    "file replaces directory subtree": (
        [[e("a/", D), e("a/b"), e("a/c/", D)], [e("a")]],
        {"a": "f@L1"},
    ),
    "directory replaces file": (
        [[e("a")], [e("a/", D), e("a/b")]],
        {"a": "d", "a/b": "f@L1"},
    ),
    "directory over directory merges children": (
        [[e("a/", D), e("a/x")], [e("a/", D, mode=0o700), e("a/y")]],
        {"a": "d", "a/x": "f@L0", "a/y": "f@L1"},
    ),
    "symlink replaces directory": (
        [[e("a/", D), e("a/x")], [e("a", L, link="/b")]],
        {"a": "l->/b"},
    ),
    "implied parents": (
        [[e("a/b/c/file")]],
        {"a": "d", "a/b": "d", "a/b/c": "d", "a/b/c/file": "f@L0"},
    ),
    "implied parent replaces lower file": (
        [[e("a")], [e("a/b")]],
        {"a": "d", "a/b": "f@L1"},
    ),
    "last entry wins in one layer": (
        [[e("x", size=1), e("x", L, link="t")]],
        {"x": "l->t"},
    ),
    "dotted and absolute names are cleaned": (
        [[e("./a/./b"), e("/c"), e("d//e")]],
        {"a": "d", "a/b": "f@L0", "c": "f@L0", "d": "d", "d/e": "f@L0"},
    ),
    "entries escaping the root are dropped": (
        [[e("../evil"), e("a/../../evil2"), e("ok")]],
        {"ok": "f@L0"},
    ),
    "parent symlink is followed inside the tree (usrmerge)": (
        [[e("usr/", D), e("usr/lib/", D), e("lib", L, link="usr/lib")], [e("lib/x.so")]],
        {"usr": "d", "usr/lib": "d", "usr/lib/x.so": "f@L1", "lib": "l->usr/lib"},
    ),
    "absolute parent symlink is followed inside the tree": (
        [[e("usr/lib/", D), e("lib", L, link="/usr/lib")], [e("lib/.wh.gone"), e("lib/y")]],
        {"usr": "d", "usr/lib": "d", "usr/lib/y": "f@L1", "lib": "l->/usr/lib"},
    ),
    "parent symlink escaping the root is clamped": (
        [[e("up", L, link="../../../"), e("etc/", D)], [e("up/etc/hosts")]],
        {"up": "l->../../../", "etc": "d", "etc/hosts": "f@L1"},
    ),
    "symlink loop as parent becomes an implied directory": (
        [[e("loop", L, link="loop")], [e("loop/x")]],
        {"loop": "d", "loop/x": "f@L1"},
    ),
    "aufs metadata is not content": (
        [[e(".wh..wh.plnk/", D), e(".wh..wh.plnk/123.456"), e("a")]],
        {"a": "f@L0"},
    ),
    "recreate a path deleted in a lower layer": (
        [[e("a/", D), e("a/x")], [e(".wh.a")], [e("a/", D), e("a/y")]],
        {"a": "d", "a/y": "f@L2"},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_merge_rules(name: str) -> None:
    layers, expected = CASES[name]
    tree, _ = merged(*layers)
    assert view(tree) == expected


def test_directory_attributes_replaced_by_upper() -> None:
    tree, _ = merged([e("a/", D, mode=0o755, uid=1), e("a/x")], [e("a/", D, mode=0o700, uid=2)])
    a = lookup_path(tree, "a")
    assert a is not None
    assert (a.mode, a.uid, a.layer) == (0o700, 2, 1)


def test_root_entry_sets_root_attributes() -> None:
    tree, _ = merged([e("./", D, mode=0o711, uid=7), e("x")])
    root = lookup_path(tree, "")
    assert root is not None and (root.mode, root.uid) == (0o711, 7)


def test_hardlinks_share_inode_and_count_links() -> None:
    tree, warnings = merged(
        [e("a", size=3, offset=512), e("b", H, link="a"), e("d/c", H, link="./a")]
    )
    a, b, c = (lookup_path(tree, p) for p in ("a", "b", "d/c"))
    assert a is not None and b is not None and c is not None and a.ino == b.ino == c.ino
    assert a.nlink == 3 and not warnings


def test_hardlink_survives_whiteout_of_target() -> None:
    tree, _ = merged([e("a", size=3, offset=512), e("b", H, link="a")], [e(".wh.a")])
    assert lookup_path(tree, "a") is None
    b = lookup_path(tree, "b")
    assert b is not None and b.nlink == 1 and b.data_offset == 512


def test_hardlink_to_lower_layer_file() -> None:
    tree, _ = merged([e("a", size=3)], [e("b", H, link="a")])
    a, b = lookup_path(tree, "a"), lookup_path(tree, "b")
    assert a is not None and b is not None and a.ino == b.ino and a.nlink == 2


def test_hardlink_keeps_original_data_when_target_overwritten_later() -> None:
    tree, _ = merged([e("a", size=1, offset=512), e("b", H, link="a"), e("a", size=2, offset=2048)])
    a, b = lookup_path(tree, "a"), lookup_path(tree, "b")
    assert a is not None and b is not None and a.ino != b.ino
    assert b.data_offset == 512 and a.data_offset == 2048
    assert a.nlink == 1 and b.nlink == 1


@pytest.mark.parametrize("link", ["missing", "later", "dir", "b"])
def test_bad_hardlinks_are_dropped_with_warning(link: str) -> None:
    tree, warnings = merged([e("dir/", D), e("b", H, link=link), e("later")])
    assert lookup_path(tree, "b") is None
    assert any("hardlink" in w for w in warnings)


def test_directory_link_counts() -> None:
    tree, _ = merged([e("a/", D), e("a/b/", D), e("a/c/", D), e("a/f")])
    a = lookup_path(tree, "a")
    root = lookup_path(tree, "")
    assert a is not None and root is not None
    assert a.nlink == 4 and root.nlink == 3


def test_inode_numbers_are_stable_and_dot_dot_works() -> None:
    layers = [[e("b/", D), e("b/z"), e("a")]]
    first, _ = merged(*layers)
    second, _ = merged(*layers)
    assert [(p, i.ino) for p, i in walk(first)] == [(p, i.ino) for p, i in walk(second)]
    b = lookup_path(first, "b")
    assert b is not None
    parent = first.lookup(b.ino, b"..")
    assert parent is not None and parent.ino == 1


def test_deep_nesting_has_no_recursion_limit() -> None:
    path = "/".join(["d"] * 5000) + "/leaf"
    tree, _ = merged([e(path)])
    assert lookup_path(tree, path) is not None


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("./a/b", "a/b"),
        ("a/./b/", "a/b"),
        ("/abs", "abs"),
        ("a//b", "a/b"),
        ("a/../b", "b"),
        (".", ""),
        ("./", ""),
        ("..", None),
        ("a/../../b", None),
        ("nul\x00", None),
        ("x" * 256, None),
        ("x" * 255, "x" * 255),
    ],
)
def test_clean_path(raw: str, clean: str | None) -> None:
    assert clean_path(raw) == clean


def test_non_utf8_names_round_trip() -> None:
    name = os.fsdecode(b"caf\xe9")
    tree, _ = merged([e(name)])
    listing = tree.listing(1)
    assert listing is not None and [name for name, _ in listing] == [b"caf\xe9"]
    assert tree.lookup(1, b"caf\xe9") is not None
