"""``imagefs diff``, checked against a comparison of real mounts.

The expected differences are computed here from two kernel snapshots
(tests.oracle) of the states being compared: ``upto/N`` views of a
``--layers`` mount, or plain mounts of two images. ``imagefs diff`` itself
reads only the layers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests import oracle
from tests.images import BuiltImage, Catalog, ImageShapes
from tests.incident import build_incident, layer_blobs
from tests.mounting import mounted, run_imagefs

Change = tuple[str, str, tuple[str, ...]]  # (path, status, fields)


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    layout, tag = build_incident(tmp_path_factory.mktemp("incident") / "layout")
    return BuiltImage("incident", layout, tag)


def source_of(image: BuiltImage) -> str:
    return f"oci:{image.layout}:{image.tag}"


def expected_changes(old: dict[str, oracle.Record], new: dict[str, oracle.Record]) -> set[Change]:
    """What differs between two snapshots, in imagefs diff's terms (times left out)."""
    changes: set[Change] = set()
    for path in old.keys() | new.keys():
        shown = "/" + path
        a, b = old.get(path), new.get(path)
        if b is None:
            changes.add((shown, "removed", ()))
        elif a is None:
            changes.add((shown, "added", ()))
        else:
            fields = [n for n in ("type", "mode", "uid", "gid") if getattr(a, n) != getattr(b, n)]
            if a.type == b.type == "file":
                fields += [n for n in ("size", "sha256") if getattr(a, n) != getattr(b, n)]
            elif a.type == b.type == "symlink" and a.target != b.target:
                fields.append("target")
            elif a.type == b.type and a.rdev != b.rdev:
                fields.append("rdev")
            if a.xattrs != b.xattrs:
                fields.append("xattrs")
            if fields:
                changes.add((shown, "changed", tuple(fields)))
    return changes


def diff_json(*args: str) -> Any:
    result = run_imagefs("diff", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def reported(report: Any) -> set[Change]:
    return {(c["path"], c["status"], tuple(c["fields"])) for c in report["changes"]}


@pytest.mark.parametrize("name", ["basic", "edge", "incident"])
def test_diff_between_layers_matches_mounts(
    name: str, catalog: Catalog, incident: BuiltImage, tmp_path: Path
) -> None:
    image = incident if name == "incident" else catalog.image(name)
    count = len(layer_blobs(image.layout, image.tag))
    with mounted(source_of(image), tmp_path / "mnt", "--layers") as mnt:
        states = [oracle.snapshot(mnt / "upto" / str(n)) for n in range(count)]
    for new in range(1, count):
        # What layer N changed...
        report = diff_json(source_of(image), "--layer", str(new))
        assert reported(report) == expected_changes(states[new - 1], states[new]), new
        assert report["summary"]["added"] == sum(
            1 for c in report["changes"] if c["status"] == "added"
        )
    # ...and any two points, either way round.
    report = diff_json(source_of(image), "--layers", str(count - 1), "0")
    assert reported(report) == expected_changes(states[count - 1], states[0])
    # Layer 0 adds everything but the root.
    first = diff_json(source_of(image), "--layer", "0")
    added = {c["path"] for c in first["changes"] if c["status"] == "added"}
    assert added == {"/" + p for p in states[0] if p}


def test_diff_reports_hashes_from_the_layers(incident: BuiltImage) -> None:
    report = diff_json(source_of(incident), "--layer", "2")
    changes = {c["path"]: c for c in report["changes"]}
    leaked = b"AWS_SECRET_ACCESS_KEY=SECRET-AWS-KEY\n"
    assert changes["/tmp/build.env"]["status"] == "removed"
    assert changes["/tmp/build.env"]["old"] == {
        "type": "file",
        "mode": "0600",
        "uid": 0,
        "gid": 0,
        "size": len(leaked),
        "sha256": "sha256:" + hashlib.sha256(leaked).hexdigest(),
        "layer_index": 1,
    }
    config = changes["/app/config.yml"]
    assert config["status"] == "changed" and config["fields"] == ["size", "sha256"]
    assert config["old"]["sha256"] == (
        "sha256:" + hashlib.sha256(b"db_password: SECRET-DB-PASSWORD\n").hexdigest()
    )
    assert changes["/var/log/app.log"]["fields"][0] == "type"
    assert {p for p, c in changes.items() if c["status"] == "removed"} == {
        "/tmp/build.env",
        "/secrets/id_rsa",
        "/secrets/api.token",
        "/cache",
        "/cache/a",
        "/cache/b",
        "/usr/lib/evil.so",
    }
    text = run_imagefs("diff", source_of(incident), "--layer", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("--- ") and "after layer 1" in lines[0]
    assert lines[1].startswith("+++ ") and "after layer 2" in lines[1]
    sha = hashlib.sha256(leaked).hexdigest()
    assert f"D /tmp/build.env  file 0600 0:0 {len(leaked)} bytes sha256:{sha}" in lines
    assert (
        "A /secrets/README  file 0644 0:0 13 bytes sha256:"
        + hashlib.sha256(b"keys rotated\n").hexdigest()
        in lines
    )
    assert any(line.startswith("M /app/config.yml  size 32 -> 28, sha256 ") for line in lines)


def test_diff_two_images_matches_mounts(incident: BuiltImage, tmp_path: Path) -> None:
    before_layout, tag = build_incident(tmp_path / "before", layers=2)
    before = f"oci:{before_layout}:{tag}"
    with mounted(before, tmp_path / "a") as mnt:
        old = oracle.snapshot(mnt)
    with mounted(source_of(incident), tmp_path / "b") as mnt:
        new = oracle.snapshot(mnt)
    report = diff_json(before, source_of(incident))
    assert report["old"] == before and report["new"] == source_of(incident)
    assert reported(report) == expected_changes(old, new)
    assert reported(report)  # the fixture does change things
    # The same comparison between two layers of the full image.
    same = diff_json(source_of(incident), "--layers", "1", "3")
    assert reported(same) == reported(report)


def test_diff_same_image_in_other_shapes_is_empty(
    incident: BuiltImage, image_tools: None, tmp_path: Path
) -> None:
    # Other compression, other layer digests, same files: content is hashed.
    shapes = ImageShapes(incident, tmp_path / "shapes")
    report = diff_json(shapes["oci"], shapes["docker-archive"])
    assert report["changes"] == []
    assert report["summary"] == {"added": 0, "removed": 0, "changed": 0}


def test_diff_usage_errors(incident: BuiltImage) -> None:
    for args in (
        [source_of(incident)],
        [source_of(incident), source_of(incident), "--layer", "1"],
        [source_of(incident), "--layer", "4"],
        [source_of(incident), "--layers", "0", "-5"],
    ):
        result = run_imagefs("diff", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("imagefs: ")
