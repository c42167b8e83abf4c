"""The persisted tree: round trip, lookups, and refusal of stale or corrupt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.merged import MergedTree, freeze
from imagefs.tree.overlay import merge_layers
from imagefs.tree.packed import open_packed_tree, write_packed_root, write_packed_tree
from imagefs.tree.served import Tree, lookup_path, walk

SOURCES = {"layers": ["sha256:aa", "sha256:bb"], "schema": 1}


def entry(path: str, kind: EntryType = EntryType.FILE, **kw: object) -> TarEntry:
    fields: dict[str, object] = {"mode": 0o644, "uid": 1, "gid": 2, "size": 0, "mtime_ns": -5}
    fields.update(kw)
    return TarEntry(path=path, type=kind, **fields)  # type: ignore[arg-type]


def sample_tree() -> MergedTree:
    layers = [
        [
            entry("./", EntryType.DIRECTORY, mode=0o751),
            entry("etc/passwd", size=100, data_offset=512, mtime_ns=1_700_000_000_123_456_789),
            entry("etc/hard", EntryType.HARDLINK, linkname="etc/passwd"),
            entry("bin", EntryType.SYMLINK, linkname="/usr/bin", xattrs=(("trusted.x", b"\0\1"),)),
            entry("dev/null", EntryType.CHAR_DEVICE, devmajor=1, devminor=3),
            entry("fifo", EntryType.FIFO),
            entry("sparse", size=1 << 30, data_offset=4096, sparse=((0, 10), (1 << 29, 20))),
            entry(os.fsdecode(b"caf\xe9"), xattrs=(("user.a", b"1"), ("user.b", b""))),
            entry("/".join(["deep"] * 300) + "/leaf", uid=3_000_000),
        ],
        [entry("etc/.wh.passwd"), entry("empty-sparse", sparse=())],
    ]
    return freeze(merge_layers(layers, lambda message: None))


def describe(tree: Tree) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for path, inode in walk(tree):
        listing = tree.listing(inode.ino)
        rows.append((
            path, inode.ino, inode.nlink, inode.parent, inode.type, inode.mode, inode.uid,
            inode.gid, inode.size, inode.mtime_ns, inode.rdev, inode.layer, inode.data_offset,
            inode.target, dict(inode.xattrs), inode.sparse,
            list(listing) if listing is not None else None,
        ))  # fmt: skip
    return rows


def test_round_trip_preserves_everything(tmp_path: Path) -> None:
    tree = sample_tree()
    path = tmp_path / "tree"
    write_packed_tree(tree, path, SOURCES)
    packed = open_packed_tree(path, SOURCES)
    assert packed is not None
    try:
        assert describe(packed) == describe(tree)
        assert (packed.count, packed.total_size) == (tree.count, tree.total_size)
    finally:
        packed.close()


def test_lookup_every_name_and_dot_entries(tmp_path: Path) -> None:
    tree = sample_tree()
    write_packed_tree(tree, tmp_path / "tree", SOURCES)
    packed = open_packed_tree(tmp_path / "tree", SOURCES)
    assert packed is not None
    try:
        for _, inode in walk(tree):
            for name, ino in tree.listing(inode.ino) or ():
                found = packed.lookup(inode.ino, name)
                assert found is not None and found.ino == ino
                assert tree.lookup(inode.ino, name) == found
            assert packed.lookup(inode.ino, b"\xffmissing") is None
            assert tree.lookup(inode.ino, b"\xffmissing") is None
            if tree.listing(inode.ino) is not None:
                dot, dotdot = packed.lookup(inode.ino, b"."), packed.lookup(inode.ino, b"..")
                assert dot is not None and dot.ino == inode.ino
                assert dotdot is not None and dotdot.ino == inode.parent
            else:
                assert packed.lookup(inode.ino, b"x") is None
        assert packed.get(0) is None and packed.get(packed.count + 1) is None
    finally:
        packed.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "sources", "version"])
def test_damaged_or_stale_files_are_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "tree"
    write_packed_tree(sample_tree(), path, SOURCES)
    data = bytearray(path.read_bytes())
    sources = SOURCES
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "empty":
        data = bytearray()
    elif damage == "sources":
        sources = {**SOURCES, "layers": ["sha256:aa", "sha256:cc"]}
    elif damage == "version":
        data[8] += 1
    path.write_bytes(bytes(data))
    assert open_packed_tree(path, sources) is None


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert open_packed_tree(tmp_path / "absent", SOURCES) is None


def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tree"
    write_packed_tree(sample_tree(), path, SOURCES)
    write_packed_tree(sample_tree(), path, SOURCES)
    assert [p.name for p in path.parent.iterdir()] == ["tree"]


def test_direct_write_from_merged_root_equals_frozen_tree(tmp_path: Path) -> None:
    layers = [
        [
            entry("a/x", size=3, data_offset=512),
            entry("a/y", EntryType.HARDLINK, linkname="a/x"),
            entry("b/z", EntryType.HARDLINK, linkname="a/x"),
            entry("b/c/d/", EntryType.DIRECTORY),
            entry("s", EntryType.SYMLINK, linkname="a", xattrs=(("trusted.t", b"v"),)),
        ],
        [entry("b/.wh.z"), entry("e", size=9, data_offset=4096, sparse=((1, 2),))],
    ]
    root = merge_layers(layers, lambda message: None)
    write_packed_root(root, tmp_path / "direct", SOURCES)
    direct = open_packed_tree(tmp_path / "direct", SOURCES)
    assert direct is not None
    try:
        frozen = freeze(root)
        assert describe(direct) == describe(frozen)
        assert (direct.count, direct.total_size) == (frozen.count, frozen.total_size)
        hard = lookup_path(direct, "a/x")
        assert hard is not None and hard.nlink == 2
    finally:
        direct.close()


def test_stat_fast_path_matches_full_records(tmp_path: Path) -> None:
    tree = sample_tree()
    write_packed_tree(tree, tmp_path / "tree", SOURCES)
    packed = open_packed_tree(tmp_path / "tree", SOURCES)
    assert packed is not None
    try:
        for ino in range(1, tree.count + 1):
            assert packed.stat(ino) == tree.stat(ino)
        sparse = lookup_path(packed, "sparse")
        assert sparse is not None
        stat = packed.stat(sparse.ino)
        assert stat is not None and (stat.size, stat.stored) == (1 << 30, 30)
        assert packed.stat(0) is None and packed.stat(tree.count + 1) is None
    finally:
        packed.close()


def test_both_trees_serve_the_same_read_only_records(tmp_path: Path) -> None:
    """Issue #15, item 7: one interface, two implementations, no pretend subclass."""
    tree = sample_tree()
    write_packed_tree(tree, tmp_path / "tree", SOURCES)
    packed = open_packed_tree(tmp_path / "tree", SOURCES)
    assert packed is not None
    try:
        assert MergedTree not in type(packed).__mro__
        for ino in range(1, tree.count + 1):
            inode = tree.get(ino)
            assert inode is not None and packed.get(ino) == inode
            listing, served = tree.listing(ino), packed.listing(ino)
            assert (listing is None) is (served is None) is (not inode.is_dir)
            assert list(listing or ()) == list(served or ())
            with pytest.raises(AttributeError):
                inode.mode = 0o777  # type: ignore[misc]
            with pytest.raises(TypeError):
                inode.xattrs["user.new"] = b"x"  # type: ignore[index]
        assert tree.listing(0) is None and packed.listing(tree.count + 1) is None
    finally:
        packed.close()
