"""``imagefs mount --layers`` and ``--upto N`` on real mounts, read through the kernel.

Every view is checked against an independent account of the layers:

* ``layers/N`` against GNU ``tar -tvf`` of the layer blob (type, mode,
  owner, size, mtime, link targets) and ``tarfile``'s data;
* ``upto/N`` and ``--upto N`` against ``umoci unpack`` of an image made of
  only the first N+1 layers;
* ``rootfs`` against ``umoci unpack`` of the whole image;
* ``deleted/N`` and ``shadowed/N`` against what the fixture's layers hide
  (spelled out in tests.incident), and, for every image, against the
  completeness rule: every file version any layer tar holds is readable in
  rootfs, deleted or shadowed, with the layer that provided it.
"""

from __future__ import annotations

import calendar
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import builder, oracle
from tests.builder import file, whiteout
from tests.images import BuiltImage, Catalog
from tests.incident import (
    EXPECTED_DELETED,
    EXPECTED_SHADOWED,
    HIDDEN_SECRETS,
    INCIDENT_TAG,
    TarLine,
    build_incident,
    clean,
    layer_blobs,
    sha256,
    tar_members,
    tar_tv,
)
from tests.mounting import mounted, run_imagefs

VIEWS = ("deleted", "layers", "rootfs", "shadowed", "upto")
LAYER_INDEX = "user.imagefs.layer_index"


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    layout, tag = build_incident(tmp_path_factory.mktemp("incident") / "layout")
    return BuiltImage("incident", layout, tag)


@pytest.fixture(scope="module")
def incident_views(
    incident: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The incident image mounted with --layers, for the whole module."""
    work = tmp_path_factory.mktemp("incident-views")
    source = f"oci:{incident.layout}:{INCIDENT_TAG}"
    with mounted(source, work / "mnt", "--layers", log=work / "imagefs.log") as mnt:
        yield mnt


def source_of(image: BuiltImage) -> str:
    return f"oci:{image.layout}:{image.tag}"


# --------------------------------------------------------------------------- kernel walks


def walk(root: Path) -> dict[str, os.stat_result]:
    """Every path below ``root`` (relative, root excluded) with its lstat."""
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            out[str(full.relative_to(root))] = full.lstat()
    return out


def files_with_layers(root: Path) -> set[tuple[int, str, str]]:
    """(layer_index xattr, base name, sha256) of every regular file below ``root``."""
    found = set()
    for path, st in walk(root).items():
        if stat.S_ISREG(st.st_mode):
            full = root / path
            index = int(os.getxattr(full, LAYER_INDEX))
            found.add((index, _base(path), sha256(full.read_bytes())))
    return found


def _base(path: str) -> str:
    name = path.rpartition("/")[2]
    # A victim overwritten twice in one layer carries a cp --backup=numbered suffix.
    if name.endswith("~") and ".~" in name:
        name = name[: name.rindex(".~")]
    return name


# --------------------------------------------------------------------------- the tree


def test_layers_tree_layout(incident: BuiltImage, incident_views: Path) -> None:
    mnt = incident_views
    assert sorted(os.listdir(mnt)) == list(VIEWS)
    count = len(layer_blobs(incident.layout, INCIDENT_TAG))
    for view in VIEWS:
        if view != "rootfs":
            assert sorted(os.listdir(mnt / view), key=int) == [str(i) for i in range(count)]
            st = (mnt / view).stat()
            assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_uid == 0
    for index in range(count):
        # A view's top answers which layer it is about.
        for view in ("layers", "deleted", "shadowed"):
            assert os.getxattr(mnt / view / str(index), LAYER_INDEX) == str(index).encode()
    # Nothing of this in a plain mount: its root is the image's root.
    with mounted(source_of(incident), mnt.parent / "plain") as plain:
        assert not set(VIEWS) & set(os.listdir(plain))
        assert oracle.snapshot(plain) == oracle.snapshot(mnt / "rootfs")


@pytest.mark.parametrize("name", ["basic", "edge"])
def test_rootfs_view_matches_umoci(name: str, catalog: Catalog, tmp_path: Path) -> None:
    image = catalog.image(name)
    expected = catalog.oracle(name)
    with mounted(source_of(image), tmp_path / "mnt", "--layers") as mnt:
        actual = oracle.snapshot(mnt / "rootfs")
    problems = oracle.compare(expected.records, actual)
    assert problems == [], "\n".join(problems[:40])


# --------------------------------------------------------------------------- layers/N


def check_layer_views(image: BuiltImage, mnt: Path) -> int:
    """Compare each ``layers/N`` with ``tar -tvf`` and tarfile of layer N's blob."""
    checked = 0
    for index, (_, blob) in enumerate(layer_blobs(image.layout, image.tag)):
        view = mnt / "layers" / str(index)
        listed = walk(view)
        lines = {clean(line.name): line for line in tar_tv(blob)}  # last entry wins
        lines.pop("", None)  # the layer's "./" entry is the view itself
        for path, line in lines.items():
            if _below_non_directory(path, lines):
                continue  # cannot be shown (imagefs.forensics.views.layer_tree); tar -tvf has it
            assert path in listed, f"layer {index}: {path} missing from {view}"
            st = listed[path]
            kind = line.mode[0]
            if kind != "h":  # a hardlink is its target's inode (content checked below)
                assert stat.filemode(st.st_mode) == line.mode, path
                assert st.st_mtime_ns // 10**9 == _tar_seconds(line.mtime), path
                assert (st.st_uid, st.st_gid) == (line.uid, line.gid), path
            if kind == "-":
                assert st.st_size == int(line.size), path
            elif kind == "l":
                assert os.readlink(view / path) == line.target, path
            elif kind in "cb":
                assert f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}" == line.size, path
            checked += 1
        # Nothing else, except the directories the entries imply.
        implied = {"/".join(p.split("/")[:i]) for p in lines for i in range(1, p.count("/") + 1)}
        assert set(listed) - set(lines) <= implied, f"layer {index}: unexpected entries"
        for path, data in layer_contents(blob).items():
            if not _below_non_directory(path, lines):
                assert (view / path).read_bytes() == data, path
    return checked


def _below_non_directory(path: str, lines: dict[str, TarLine]) -> bool:
    parts = path.split("/")
    for end in range(1, len(parts)):
        above = lines.get("/".join(parts[:end]))
        if above is not None and above.mode[0] != "d":
            return True
    return False


def _tar_seconds(text: str) -> int:
    return calendar.timegm(time.strptime(text.split(".", maxsplit=1)[0], "%Y-%m-%d %H:%M:%S"))


def layer_contents(blob: Path) -> dict[str, bytes]:
    """Path -> data of each regular file or hardlink in a layer, as tar extracts it.

    Later entries win; a hardlink has its target's data as of the link.
    """
    data: dict[str, bytes] = {}
    for info, content in tar_members(blob):
        path = clean(info.name)
        if content is not None:
            data[path] = content
        elif info.islnk() and clean(info.linkname) in data:
            data[path] = data[clean(info.linkname)]
        else:
            data.pop(path, None)
    return data


def test_layer_views_match_tar_listing_incident(incident: BuiltImage, incident_views: Path) -> None:
    assert check_layer_views(incident, incident_views) > 30
    # Whiteouts are shown as the tar holds them: empty files with OCI's names.
    layer2 = incident_views / "layers" / "2"
    assert (layer2 / "tmp" / ".wh.build.env").read_bytes() == b""
    assert (layer2 / "secrets" / ".wh..wh..opq").is_file()
    assert (layer2 / ".wh.cache").is_file()
    # Layer 1 wrote through the "lib" symlink; its own view keeps the literal path.
    assert (incident_views / "layers" / "1" / "lib" / "evil.so").is_file()


@pytest.mark.parametrize("name", ["basic", "edge"])
def test_layer_views_match_tar_listing(name: str, catalog: Catalog, tmp_path: Path) -> None:
    image = catalog.image(name)
    with mounted(source_of(image), tmp_path / "mnt", "--layers") as mnt:
        assert check_layer_views(image, mnt) > 20


# --------------------------------------------------------------------------- upto/N


def truncated_oracle(image: BuiltImage, upto: int, work: Path) -> oracle.Oracle:
    """umoci's unpack of an image made of only the first ``upto + 1`` layers."""
    tars = list(builder.layer_tars(image.layout, image.tag))[: upto + 1]
    layout = builder.write_oci_layout(work / "layout", tars, compression="gzip", tag="t")
    return oracle.umoci_oracle(layout, "t", work / "bundle")


@pytest.mark.parametrize("name", ["basic", "edge", "incident"])
def test_upto_views_match_umoci_of_truncated_image(
    name: str,
    catalog: Catalog,
    incident: BuiltImage,
    tmp_path: Path,
) -> None:
    image = incident if name == "incident" else catalog.image(name)
    count = len(layer_blobs(image.layout, image.tag))
    with mounted(source_of(image), tmp_path / "mnt", "--layers") as mnt:
        for upto in range(count):
            work = tmp_path / f"oracle{upto}"
            work.mkdir()
            expected = truncated_oracle(image, upto, work)
            problems = oracle.compare(expected.records, oracle.snapshot(mnt / "upto" / str(upto)))
            assert problems == [], f"upto/{upto}:\n" + "\n".join(problems[:40])
    # --upto N alone mounts just that file system (and -o upto=N says the same).
    (tmp_path / "oracle-plain").mkdir()
    expected = truncated_oracle(image, 1, tmp_path / "oracle-plain")
    for options in (["--upto", "1"], ["-o", "upto=1"]):
        with mounted(source_of(image), tmp_path / "plain", *options) as mnt:
            problems = oracle.compare(expected.records, oracle.snapshot(mnt))
        assert problems == [], "\n".join(problems[:40])


def test_upto_counts_from_the_end_and_refuses_other_layers(
    incident: BuiltImage, tmp_path: Path
) -> None:
    with mounted(source_of(incident), tmp_path / "last", "--upto", "-1") as mnt:
        last = oracle.snapshot(mnt)
    with mounted(source_of(incident), tmp_path / "plain") as mnt:
        assert last == oracle.snapshot(mnt)
    with mounted(source_of(incident), tmp_path / "before-last", "--upto=-2") as mnt:
        assert not (mnt / "etc" / "spoof").exists()
    (tmp_path / "bad").mkdir()
    result = run_imagefs("mount", "--quiet", "--upto", "4", source_of(incident), tmp_path / "bad")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "--upto 4" in lines[0] and "4 layers" in lines[0]


# --------------------------------------------------------------------------- deleted/N, shadowed/N


def test_deleted_and_shadowed_hold_what_later_layers_hid(incident_views: Path) -> None:
    mnt = incident_views
    for view, expected in (("deleted", EXPECTED_DELETED), ("shadowed", EXPECTED_SHADOWED)):
        for index in range(4):
            root = mnt / view / str(index)
            found = {
                path: (root / path).read_bytes()
                for path, st in walk(root).items()
                if stat.S_ISREG(st.st_mode)
            }
            assert found == expected.get(index, {}), f"{view}/{index}"
    # What an investigator runs: grep finds every hidden secret, and only there.
    hidden = subprocess.run(
        ["grep", "-rhoE", "SECRET-[A-Z0-9-]+[A-Z0-9]", "deleted", "shadowed"],
        cwd=mnt,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(hidden) == HIDDEN_SECRETS
    visible = subprocess.run(
        ["grep", "-rhoE", "SECRET-[A-Z0-9-]+[A-Z0-9]", "rootfs"],
        cwd=mnt,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert visible == ["SECRET-BACKDOOR"]


def test_removed_files_keep_owner_mode_and_parent_attributes(incident_views: Path) -> None:
    deleted = incident_views / "deleted" / "2"
    # The opaque directory's lost children sit in a copy of the directory as
    # it was before layer 2 (0700), with their own modes.
    assert stat.S_IMODE((deleted / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE((deleted / "secrets" / "id_rsa").stat().st_mode) == 0o600
    assert stat.S_IMODE((deleted / "tmp").stat().st_mode) == 0o1777
    # The shadowed backdoor's previous version, and the file a directory replaced.
    shadowed = incident_views / "shadowed"
    assert stat.S_IMODE((shadowed / "1" / "bin" / "tool").stat().st_mode) == 0o755
    assert (incident_views / "rootfs" / "bin" / "tool").stat().st_mode & stat.S_ISUID
    assert (shadowed / "2" / "var" / "log" / "app.log").is_file()
    assert (incident_views / "rootfs" / "var" / "log" / "app.log").is_dir()
    # Which layer provided each removed file, and which removed it.
    assert os.getxattr(deleted / "tmp" / "build.env", LAYER_INDEX) == b"1"
    assert os.getxattr(deleted / "secrets" / "id_rsa", LAYER_INDEX) == b"0"


def test_every_file_version_is_reachable_incident(
    incident: BuiltImage, incident_views: Path
) -> None:
    check_every_version_reachable(incident, incident_views)


@pytest.mark.parametrize("name", ["basic", "edge"])
def test_every_file_version_is_reachable(name: str, catalog: Catalog, tmp_path: Path) -> None:
    image = catalog.image(name)
    with mounted(source_of(image), tmp_path / "mnt", "--layers") as mnt:
        check_every_version_reachable(image, mnt)


def check_every_version_reachable(image: BuiltImage, mnt: Path) -> None:
    """Each layer tar's regular files are readable in rootfs/deleted/shadowed, and
    every file there is one some layer holds, with that layer's index."""
    in_layers: set[tuple[int, str, str]] = set()
    for index, (_, blob) in enumerate(layer_blobs(image.layout, image.tag)):
        current: dict[str, bytes] = {}  # a hardlink names the data its target has now
        for info, data in tar_members(blob):
            path = clean(info.name)
            if info.islnk():
                data = current.get(clean(info.linkname))
            if data is None:
                continue
            current[path] = data
            name = path.rpartition("/")[2]
            if not name.startswith(".wh."):
                in_layers.add((index, name, sha256(data)))
    reachable = files_with_layers(mnt / "rootfs")
    for view in ("deleted", "shadowed"):
        for number in os.listdir(mnt / view):
            reachable |= files_with_layers(mnt / view / number)
    assert in_layers - reachable == set(), "file versions not reachable"
    assert reachable - in_layers == set(), "files no layer holds"


def test_umoci_whiteouts_show_in_deleted(catalog: Catalog, tmp_path: Path) -> None:
    # basic's layer 1 (umoci wrote the whiteouts) deleted these; see tests.images.
    image = catalog.image("basic")
    with mounted(source_of(image), tmp_path / "mnt", "--layers") as mnt:
        deleted = mnt / "deleted" / "1"
        assert (deleted / "etc" / "obsolete").read_text() == "to be deleted\n"
        assert (deleted / "etc" / "obsolete-dir" / "conf").read_text().startswith("deleted with")
        assert (deleted / "opt" / "old" / "sub" / "deeper").read_text() == "old, deeper\n"
        shadowed = mnt / "shadowed"
        assert (shadowed / "1" / "etc" / "passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\n"
        assert (shadowed / "2" / "etc" / "motd").read_text() == "a file, a directory later\n"
        # umoci wrote srv/cache/.wh.item (a whiteout, applied first) and the
        # symlink srv/cache replacing the directory it emptied.
        assert (mnt / "deleted" / "2" / "srv" / "cache" / "item").read_text() == "cached\n"
        assert (shadowed / "2" / "srv" / "cache").is_dir()
        assert os.readlink(mnt / "rootfs" / "srv" / "cache") == "/var/cache"
        # Re-created after deletion: the old one in deleted/1, the new one in rootfs.
        assert (mnt / "rootfs" / "etc" / "obsolete").read_text() == "back again\n"


def test_overwritten_twice_in_one_layer_gets_backup_names(tmp_path: Path) -> None:
    layers = [
        builder.make_layer_tar([file("x", "v0"), file("gone", "g0")]),
        builder.make_layer_tar(
            [file("x", "v1a"), file("x", "v1b"), file("x", "v1c"), whiteout("gone")]
        ),
    ]
    layout = builder.write_oci_layout(tmp_path / "layout", layers, compression="none", tag="t")
    with mounted(f"oci:{layout}:t", tmp_path / "mnt", "-o", "layers") as mnt:
        assert (mnt / "rootfs" / "x").read_text() == "v1c"
        shadowed = mnt / "shadowed" / "1"
        assert sorted(os.listdir(shadowed)) == ["x", "x.~2~", "x.~3~"]
        assert [(shadowed / n).read_text() for n in ("x", "x.~2~", "x.~3~")] == ["v0", "v1a", "v1b"]
        assert (mnt / "deleted" / "1" / "gone").read_text() == "g0"


def test_each_view_has_its_own_inodes(incident_views: Path) -> None:
    mnt = incident_views
    # In the base layer bin/tool-link is a hardlink of bin/tool...
    for view in ("layers/0", "upto/0"):
        tool = (mnt / view / "bin" / "tool").stat()
        link = (mnt / view / "bin" / "tool-link").stat()
        assert tool.st_ino == link.st_ino and tool.st_nlink == 2, view
    # ...layer 1 replaced bin/tool, so in the final file system the link is alone,
    # and its inode is not shared with any other view.
    final = (mnt / "rootfs" / "bin" / "tool-link").stat()
    assert final.st_nlink == 1
    assert final.st_ino != (mnt / "upto" / "0" / "bin" / "tool-link").stat().st_ino
    assert (mnt / "rootfs" / "bin" / "tool-link").read_text() == "tool v1\n"
