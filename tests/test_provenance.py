"""Provenance on real mounts: the hidden ``user.imagefs.*`` xattrs, and ``imagefs which``.

The expected layer of every path comes from the layer blobs themselves (the
last layer whose tar has an entry for it), the digests from the manifest and
``created_by`` from the config's history.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import builder, oracle
from tests.builder import directory, file, symlink
from tests.images import BuiltImage, Catalog
from tests.incident import (
    INCIDENT_TAG,
    LAYER_CREATED_BY,
    SPOOFED,
    build_incident,
    clean,
    layer_blobs,
    tar_members,
)
from tests.mounting import mounted, run_imagefs

LAYER, INDEX, CREATED_BY = (
    "user.imagefs.layer",
    "user.imagefs.layer_index",
    "user.imagefs.created_by",
)


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    layout, tag = build_incident(tmp_path_factory.mktemp("incident") / "layout")
    return BuiltImage("incident", layout, tag)


@pytest.fixture(scope="module")
def incident_mount(
    incident: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("incident-plain")
    with mounted(
        f"oci:{incident.layout}:{INCIDENT_TAG}", work / "mnt", log=work / "imagefs.log"
    ) as mnt:
        yield mnt


def last_layer_of_each_path(image: BuiltImage) -> dict[str, int]:
    """Cleaned member path -> the last layer whose tar has an entry for it."""
    last: dict[str, int] = {}
    for index, (_, blob) in enumerate(layer_blobs(image.layout, image.tag)):
        for info, _ in tar_members(blob):
            last[clean(info.name)] = index
    return last


def created_by_of_layers(image: BuiltImage) -> list[str]:
    manifest = builder.image_manifest(image.layout, image.tag)
    config = builder.read_json_blob(image.layout, manifest["config"])
    return [h["created_by"] for h in config["history"] if not h.get("empty_layer")]


def check_provenance(image: BuiltImage, mnt: Path) -> int:
    """Every file and directory the layers name carries its layer's xattrs."""
    digests = [digest for digest, _ in layer_blobs(image.layout, image.tag)]
    created_by = created_by_of_layers(image)
    checked = 0
    for path, index in last_layer_of_each_path(image).items():
        full = mnt / path
        if (
            not path
            or not full.exists()
            or full.is_symlink()
            or path.rpartition("/")[2].startswith(".wh.")
        ):
            continue
        st = full.lstat()
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            continue  # the kernel answers user.* only for files and directories
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            continue  # a hardlink is the inode its target's entry made
        if LAYER in os.listxattr(full):
            continue  # the image's own xattr wins (test_image_xattr_wins_over_provenance)
        assert os.getxattr(full, INDEX) == str(index).encode(), path
        assert os.getxattr(full, LAYER) == digests[index].encode(), path
        assert os.getxattr(full, CREATED_BY) == created_by[index].encode(), path
        checked += 1
    return checked


def test_provenance_xattrs_incident(incident: BuiltImage, incident_mount: Path) -> None:
    assert check_provenance(incident, incident_mount) > 15
    # Spelled out for the paths an investigator would ask about.
    expected = {
        "app/config.yml": 2,  # overwritten by the cleanup layer
        "bin/tool": 1,  # the backdoor
        "bin/tool-link": 0,  # still the base layer's file
        "etc/passwd": 1,
        "secrets/README": 2,
        "usr/lib": 0,
        "etc/spoof": 3,
    }
    for path, index in expected.items():
        full = incident_mount / path
        assert os.getxattr(full, INDEX) == str(index).encode(), path
        assert os.getxattr(full, CREATED_BY) == LAYER_CREATED_BY[index].encode(), path
    result = subprocess.run(
        ["getfattr", "--only-values", "-n", LAYER, str(incident_mount / "bin" / "tool")],
        capture_output=True,
        check=True,
    )
    assert result.stdout == layer_blobs(incident.layout, INCIDENT_TAG)[1][0].encode()


@pytest.mark.parametrize("name", ["basic", "edge"])
def test_provenance_xattrs(name: str, catalog: Catalog, tmp_path: Path) -> None:
    image = catalog.image(name)
    with mounted(f"oci:{image.layout}:{image.tag}", tmp_path / "mnt") as mnt:
        assert check_provenance(image, mnt) > 20


def test_provenance_xattrs_are_never_listed(incident_mount: Path, tmp_path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(incident_mount):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            names = os.listxattr(full, follow_symlinks=False)
            assert not [n for n in names if n.startswith("user.imagefs.") and full.name != "spoof"]
    listing = subprocess.run(
        ["getfattr", "-R", "-d", "-m", "-", str(incident_mount)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "imagefs.layer_index" not in listing and "created_by" not in listing
    # cp -a copies exactly the image's own xattrs: compare the copy with umoci's view.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", f"{incident_mount}/.", str(copy)], check=True)
    mounted_records = oracle.snapshot(incident_mount)
    copied_records = oracle.snapshot(copy)
    problems = oracle.compare(mounted_records, copied_records, ignore={"dir.mtime_ns", "dir.nlink"})
    assert problems == [], "\n".join(problems)
    assert dict(copied_records["etc/spoof"].xattrs) == SPOOFED


def test_no_provenance_on_symlinks_and_devices(incident_mount: Path) -> None:
    # Linux refuses user.* xattrs on these before asking FUSE (ENODATA).
    for path in ("lib", "dev/null"):
        with pytest.raises(OSError) as info:
            os.getxattr(incident_mount / path, INDEX, follow_symlinks=False)
        assert info.value.errno == errno.ENODATA, path


def test_image_xattr_wins_over_provenance(incident: BuiltImage, incident_mount: Path) -> None:
    spoof = incident_mount / "etc" / "spoof"
    # The image says so itself: the image's value, never hidden by imagefs...
    assert os.getxattr(spoof, LAYER) == SPOOFED["user.imagefs.layer"]
    assert LAYER in os.listxattr(spoof)
    # ...the names it does not set still answer, and the log says what happened.
    assert os.getxattr(spoof, INDEX) == b"3"
    log = incident_mount.parent / "imagefs.log"
    assert "sets user.imagefs.layer" in log.read_text()
    # imagefs which tells the truth.
    result = run_imagefs("which", "--json", f"oci:{incident.layout}:{INCIDENT_TAG}", "/etc/spoof")
    assert json.loads(result.stdout)["current"]["layer_index"] == 3


# --------------------------------------------------------------------------- imagefs which


def which(image: BuiltImage, path: str) -> Any:
    result = run_imagefs("which", "--json", f"oci:{image.layout}:{image.tag}", path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_which_matches_the_layers_for_every_path(incident: BuiltImage) -> None:
    """For each path, the layers that put an entry there are the ones tar lists it in."""
    digests = [digest for digest, _ in layer_blobs(incident.layout, INCIDENT_TAG)]
    touched: dict[str, list[int]] = {}
    for index, (_, blob) in enumerate(layer_blobs(incident.layout, INCIDENT_TAG)):
        for info, _ in tar_members(blob):
            path = clean(info.name)
            if path and not path.rpartition("/")[2].startswith(".wh.") and path != "lib/evil.so":
                # One event per entry: a duplicate in one layer replaces the first.
                touched.setdefault(path, []).append(index)
    for path, layers in touched.items():
        report = which(incident, "/" + path)
        history = report["history"]
        assert isinstance(history, list)
        put = [e["layer_index"] for e in history if e["event"] in ("added", "replaced", "updated")]
        assert put == layers, path
        for event in history:
            assert event["layer"] == digests[event["layer_index"]]
            assert event["created_by"] == LAYER_CREATED_BY[event["layer_index"]]


def test_which_tells_deletions_and_symlinked_paths(incident: BuiltImage) -> None:
    config = which(incident, "/app/config.yml")
    current = config["current"]
    assert (current["type"], current["mode"], current["uid"], current["gid"]) == (
        "file",
        "0640",
        0,
        0,
    )
    assert current["size"] == len("db_password: ${DB_PASSWORD}\n")
    assert current["layer_index"] == 2
    assert current["layer"] == layer_blobs(incident.layout, INCIDENT_TAG)[2][0]
    assert current["created_by"] == LAYER_CREATED_BY[2]
    assert [(e["layer_index"], e["event"]) for e in config["history"]] == [
        (0, "added"),
        (1, "replaced"),
        (2, "replaced"),
    ]
    secret = which(incident, "/cache/a")
    assert secret["current"] is None
    assert [(e["layer_index"], e["event"], e.get("via")) for e in secret["history"]] == [
        (0, "added", None),
        (2, "deleted with parent (whiteout)", "/cache"),
    ]
    evil = which(incident, "lib/evil.so")  # written through the lib -> usr/lib symlink
    assert evil["resolved"] == "/usr/lib/evil.so"
    assert [(e["layer_index"], e["event"]) for e in evil["history"]] == [
        (1, "added"),
        (2, "deleted (whiteout)"),
    ]
    opaque = which(incident, "secrets/id_rsa")
    assert [e["event"] for e in opaque["history"]] == ["added", "deleted (opaque directory)"]
    link = which(incident, "/lib")  # symlinks and devices too, which getfattr cannot ask
    assert link["current"]["type"] == "symlink" and link["current"]["layer_index"] == 0


def test_which_text_and_errors(incident: BuiltImage) -> None:
    source = f"oci:{incident.layout}:{INCIDENT_TAG}"
    text = run_imagefs("which", source, "/tmp/build.env")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "/tmp/build.env: not in the image's root file system"
    assert any("deleted (whiteout)" in line for line in lines)
    assert any(LAYER_CREATED_BY[1] in line for line in lines)
    missing = run_imagefs("which", source, "/no/such/path")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"imagefs: /no/such/path: no layer of {source} has this path"
    ]
    escape = run_imagefs("which", source, "../../etc/passwd")
    assert escape.returncode == 2 and len(escape.stderr.strip().splitlines()) == 1


def test_which_on_every_source_shape(incident: BuiltImage, tmp_path: Path) -> None:
    # Without mounting, and for a docker save tarball too.
    tar = builder.to_docker_archive(incident.layout, INCIDENT_TAG, tmp_path / "i.tar")
    result = run_imagefs("which", "--json", tar, "/bin/tool")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["current"]["layer_index"] == 1
    assert report["current"]["created_by"] == LAYER_CREATED_BY[1]


def test_provenance_after_remount_from_cache(tmp_path: Path) -> None:
    # The second mount maps the persisted tree: layers must survive the trip.
    layers = [
        builder.make_layer_tar([directory("d"), file("d/a", "a"), symlink("d/l", "a")]),
        builder.make_layer_tar([file("d/b", "b")]),
    ]
    layout = builder.write_oci_layout(tmp_path / "layout", layers, tag="t")
    cache = tmp_path / "cache"
    for _ in range(2):
        with mounted(f"oci:{layout}:t", tmp_path / "mnt", cache=cache) as mnt:
            assert os.getxattr(mnt / "d" / "a", INDEX) == b"0"
            assert os.getxattr(mnt / "d" / "b", INDEX) == b"1"
            assert os.getxattr(mnt / "d", CREATED_BY) == b"tests.builder layer 0"
    shutil.rmtree(cache)
