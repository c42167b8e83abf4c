"""One path resolution for the merge, ``imagefs which`` and the served trees (issue #15, item 4).

The resolver's rules (imagefs.tree.resolve) first, table-driven over small
trees; then the agreement. Each case there is a lower layer (built as a real
tar) and a probe: a file entry at a path P in the layer above. The merge
places the probe at a resolved path R (its ADD change); ``imagefs which P``
must answer the same R, both on the image without the probe (where nothing
is at R yet: "where would P land") and on the image with it (P is the probe
file), and so must the in-memory and the mapped tree. Where umoci's secure
join agrees with the documented rules, umoci's unpack of the same image is
the independent oracle for R.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagefs.forensics.provenance import trace_path
from imagefs.image import Image
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.progress import Progress
from imagefs.sources import open_image
from imagefs.tree.loader import scan_layer
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import (
    Change,
    ChangeKind,
    Node,
    child_node,
    implied_directory,
    merge_layers,
)
from imagefs.tree.packed import open_packed_tree, write_packed_root
from imagefs.tree.resolve import LITERAL, MAX_SYMLINK_HOPS, Resolved, resolve
from imagefs.tree.served import resolve_in_tree
from tests import builder
from tests.builder import Member, directory, file, symlink
from tests.mounting import run_imagefs
from tests.needs import require_root, require_tools
from tests.oracle import umoci_unpack

PROBE = "probe contents\n"

# ----------------------------------------------------------------- the rules

F, D, L = EntryType.FILE, EntryType.DIRECTORY, EntryType.SYMLINK


def tree_of(*entries: tuple[str, EntryType, str]) -> Node:
    """A merged tree of one layer: (path, type, symlink target) per entry."""
    layer = [TarEntry(path, kind, 0o755, 0, 0, 0, 0, linkname=link) for path, kind, link in entries]
    return merge_layers([layer], pytest.fail)


def looked_up(root: Node, path: str, **switches: object) -> tuple[str | None, str]:
    """(type of what is there or None, resolved path) of a look-up, no creation."""
    found: Resolved[Node] = resolve(root, path, child_node, **switches)  # type: ignore[arg-type]
    return (None if found.node is None else found.node.type.name), found.path


USR = (("usr/lib/", D, ""), ("lib", L, "usr/lib"), ("usr/lib/libc.so", F, ""))
LOOKUPS: dict[
    str,
    tuple[tuple[tuple[str, EntryType, str], ...], str, dict[str, object], tuple[str | None, str]],
] = {
    "symlinked parent is followed": (USR, "lib/libc.so", {}, ("FILE", "usr/lib/libc.so")),
    "last component is the link itself": (USR, "lib", {}, ("SYMLINK", "lib")),
    "follow_last resolves the link": (USR, "lib", {"follow_last": True}, ("DIRECTORY", "usr/lib")),
    "missing: the rest kept literally": (USR, "lib/a/b", {}, (None, "usr/lib/a/b")),
    "file in the middle: nothing below": (USR, "lib/libc.so/x", {}, (None, "usr/lib/libc.so/x")),
    "dot-dot is the physical parent": (USR, "lib/../lib", {}, ("DIRECTORY", "usr/lib")),
    "dot-dot stays at the root": (USR, "../../usr/lib", {}, ("DIRECTORY", "usr/lib")),
    "dot and empty components skipped": (USR, "./usr//./lib/", {}, ("DIRECTORY", "usr/lib")),
    "literal: no link followed": (
        USR,
        "lib/libc.so",
        {"hop_limit": LITERAL},
        (None, "lib/libc.so"),
    ),
    "dangling link leads nowhere": ((("l", L, "nowhere"),), "l/x", {}, (None, "l/x")),
    "link to a file leads nowhere": ((("f", F, ""), ("l", L, "f")), "l/x", {}, (None, "l/x")),
    "loop leads nowhere": ((("a", L, "b"), ("b", L, "a")), "a/x", {}, (None, "a/x")),
    "the budget is per resolution": (
        (("s", L, "."),),
        "/".join(["s"] * (MAX_SYMLINK_HOPS + 1)) + "/x",
        {},
        (None, "s/x"),
    ),
    "within the budget": (
        (("s", L, "."),),
        "/".join(["s"] * MAX_SYMLINK_HOPS),
        {},
        ("SYMLINK", "s"),
    ),
    "a lower budget": ((("s", L, "."),), "s/s/s", {"hop_limit": 1}, (None, "s/s")),
    "empty target reads as its own directory": (
        (("d/", D, ""), ("d/e", L, "")),
        "d/e/x",
        {},
        (None, "d/x"),
    ),
}


@pytest.mark.parametrize("case", LOOKUPS)
def test_lookup_rules(case: str) -> None:
    entries, path, switches, expected = LOOKUPS[case]
    assert looked_up(tree_of(*entries), path, **switches) == expected


def test_creating_replaces_the_link_the_path_names_not_one_inside_its_target() -> None:
    root = tree_of(("d/", D, ""), ("l0", L, "l1"), ("l1", L, "nowhere"))
    made: list[tuple[str, str | None]] = []

    def make_directory(
        parent: Node, name: str, existing: Node | None, names: tuple[str, ...]
    ) -> Node:
        made.append(("/".join((*names, name)), None if existing is None else existing.target))
        assert parent.children is not None
        directory = parent.children[name] = implied_directory(1)
        return directory

    found = resolve(root, "l0/x/y", child_node, follow_last=True, make_directory=make_directory)
    assert found.path == "l0/x/y" and found.node is not None and found.node.is_dir
    assert made == [("l0", "l1"), ("l0/x", None), ("l0/x/y", None)]
    assert root.children is not None and root.children["l1"].type is L  # left alone


def test_refusing_to_create_stops_the_walk() -> None:
    root = tree_of(("f", F, ""))
    found = resolve(root, "f/x", child_node, follow_last=True, make_directory=lambda *args: None)
    assert (found.node, found.path) == (None, "f/x")


def test_looking_up_changes_nothing() -> None:
    root = tree_of(("l", L, "nowhere"), ("loop", L, "loop"))
    before = {name: (node.type, node.target) for name, node in (root.children or {}).items()}
    for path in ("l/x", "loop/x", "missing/x"):
        resolve(root, path, child_node, follow_last=True)
    assert {name: (n.type, n.target) for name, n in (root.children or {}).items()} == before


# ------------------------------------------------------------- the agreement


def chain(count: int, end: str) -> list[Member]:
    """``l0 -> l1 -> ... -> l{count-1} -> end``: ``count`` symlinks, one hop each."""
    return [symlink(f"l{i}", f"l{i + 1}" if i + 1 < count else end) for i in range(count)]


# name -> (lower layer, probe path P, where the merge puts it: R)
CASES: dict[str, tuple[list[Member], str, str]] = {
    "symlinked parent (usrmerge)": (
        [directory("usr"), directory("usr/lib"), symlink("lib", "usr/lib")],
        "lib/x",
        "usr/lib/x",
    ),
    "absolute symlinked parent": (
        [directory("usr"), directory("usr/lib"), symlink("lib", "/usr/lib")],
        "lib/x",
        "usr/lib/x",
    ),
    "symlinks inside a symlink's target": (
        [directory("d"), directory("d/c"), symlink("b", "d"), symlink("a", "b/c")],
        "a/x",
        "d/c/x",
    ),
    "dot-dot escaping the root is clamped": (
        [directory("etc"), symlink("up", "../../../..")],
        "up/etc/x",
        "etc/x",
    ),
    "dot-dot from inside a directory": (
        [directory("d"), directory("e"), symlink("d/up", "../e")],
        "d/up/x",
        "e/x",
    ),
    "absolute symlink climbing with dot-dot": (
        [directory("e"), symlink("a", "/../../e")],
        "a/x",
        "e/x",
    ),
    "symlink as the last component is replaced, not followed": (
        [directory("d"), symlink("l", "d")],
        "l",
        "l",
    ),
    "forty hops are followed": (
        [directory("d"), *chain(40, "d")],
        "l0/x",
        "d/x",
    ),
    "hop overflow: a chain of forty-one links": (
        [directory("d"), *chain(41, "d")],
        "l0/x",
        "l0/x",
    ),
    "hop overflow: forty-one links along the path": (
        [symlink(f"s{i}", ".") for i in range(41)],
        "/".join(f"s{i}" for i in range(41)) + "/x",
        "s40/x",
    ),
    "forty links along the path are followed": (
        [symlink(f"s{i}", ".") for i in range(40)],
        "/".join(f"s{i}" for i in range(40)) + "/x",
        "x",
    ),
    "symlink loop": (
        [symlink("loop", "loop")],
        "loop/x",
        "loop/x",
    ),
    "symlink loop of two": (
        [symlink("a", "b"), symlink("b", "a")],
        "b/x",
        "b/x",
    ),
    "absolute symlink loop": (
        [directory("d"), symlink("d/self", "/d/self")],
        "d/self/x",
        "d/self/x",
    ),
    "dangling symlinked parent": (
        [symlink("l", "nowhere")],
        "l/x",
        "l/x",
    ),
    "symlink to a file as parent": (
        [file("f", "data"), symlink("l", "f")],
        "l/x",
        "l/x",
    ),
    "file in the middle": (
        [file("f", "data")],
        "f/x",
        "f/x",
    ),
    "missing parents": (
        [directory("a")],
        "a/b/c/x",
        "a/b/c/x",
    ),
}

# Where umoci 0.4.7 (filepath-securejoin) lands on the same R. It differs by
# design elsewhere: it fails on loops and overflow (ELOOP), follows up to 255
# hops, follows dangling links and links to files, and refuses a file parent
# (see the module docstring of imagefs.tree.resolve).
UMOCI_AGREES = (
    "symlinked parent (usrmerge)",
    "absolute symlinked parent",
    "symlinks inside a symlink's target",
    "dot-dot escaping the root is clamped",
    "dot-dot from inside a directory",
    "absolute symlink climbing with dot-dot",
    "symlink as the last component is replaced, not followed",
    "forty hops are followed",
    "forty links along the path are followed",
    "missing parents",
)


def build(case: str, dest: Path) -> Path:
    """An OCI layout with tags ``lower`` (the lower layer) and ``full`` (plus the probe)."""
    lower, probe, _ = CASES[case]
    layers = [builder.make_layer_tar(lower), builder.make_layer_tar([file(probe, PROBE)])]
    builder.write_oci_layout(dest, layers[:1], tag="lower")
    return builder.write_oci_layout(dest, layers, tag="full")


def scanned(layout: Path, tag: str) -> tuple[Image, list[list[TarEntry]]]:
    image = open_image(f"oci:{layout}:{tag}")
    count = len(image.layers)
    entries = [
        scan_layer(layer, index, count, warn=pytest.fail, progress=Progress(False))
        for index, layer in enumerate(image.layers)
    ]
    return image, entries


def merge_places_probe(entries: list[list[TarEntry]]) -> str:
    """Where the merge put the probe: the path of the top layer's file ADD."""
    changes: list[Change] = []
    merge_layers(entries, lambda message: None, changes.append)
    (added,) = (
        c.path
        for c in changes
        if c.layer == 1 and c.kind is ChangeKind.ADD and c.node.type is EntryType.FILE
    )
    return added


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resolve")
    return {case: build(case, root / f"case{number}") for number, case in enumerate(CASES)}


@pytest.mark.parametrize("case", CASES)
def test_which_resolves_as_the_merge_places(
    case: str, layouts: dict[str, Path], tmp_path: Path
) -> None:
    _, probe, expected = CASES[case]
    image, entries = scanned(layouts[case], "full")
    assert merge_places_probe(entries) == expected
    # Before the probe layer: where P would land; nothing (or what is replaced) there.
    lower_image, lower_entries = scanned(layouts[case], "lower")
    before = trace_path(lower_image, lower_entries, probe)
    assert before.resolved == expected
    assert before.node is None or before.node.type is not EntryType.FILE
    # With it: P is the probe file, added by layer 1; the served trees agree.
    after = trace_path(image, entries, probe)
    root = merge_layers(entries, lambda message: None)
    frozen = freeze(root)
    in_memory = resolve_in_tree(frozen, probe)
    write_packed_root(root, tmp_path / "tree", {})
    packed = open_packed_tree(tmp_path / "tree", {})
    assert packed is not None
    try:
        mapped = resolve_in_tree(packed, probe)
    finally:
        packed.close()
    for served in (in_memory, mapped):
        assert served.path == expected and served.node is not None
        assert served.node.type is EntryType.FILE and served.node.layer == 1
    assert after.resolved == expected
    assert after.node is not None and after.node.type is EntryType.FILE
    assert after.node.layer == 1
    assert {(1, "added"), (1, "replaced")} & {(e.layer, e.what) for e in after.events}


@pytest.mark.parametrize("case", CASES)
def test_which_command_reports_the_merge_path(case: str, layouts: dict[str, Path]) -> None:
    _, probe, expected = CASES[case]
    result = run_imagefs("which", "--json", f"oci:{layouts[case]}:full", probe)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resolved"] == "/" + expected
    assert report["current"]["type"] == "file" and report["current"]["layer_index"] == 1


@pytest.mark.tools
@pytest.mark.parametrize("case", UMOCI_AGREES)
def test_umoci_places_the_probe_where_the_merge_does(
    case: str, layouts: dict[str, Path], tmp_path: Path
) -> None:
    require_tools("umoci")
    require_root()
    rootfs = umoci_unpack(layouts[case], "full", tmp_path / "bundle")
    placed = rootfs / CASES[case][2]
    assert placed.is_file() and not placed.is_symlink()
    assert placed.read_text() == PROBE
