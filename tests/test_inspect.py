"""``imagefs inspect``: checked against the image's own files, in every source shape.

Per layer, the entry and whiteout counts come from GNU ``tar -tvf`` of the
blob, sizes and digests from the blob bytes (found by hash inside the source
tarball, whatever shape it is), and history and config from what the fixture
wrote.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests import builder
from tests.builder import file
from tests.images import SHAPES, BuiltImage, ImageShapes
from tests.incident import CONFIG, HISTORY, INCIDENT_TAG, build_incident, layer_blobs, tar_tv
from tests.mounting import run_imagefs


@pytest.fixture(scope="module")
def incident_shapes(tmp_path_factory: pytest.TempPathFactory) -> ImageShapes:
    work = tmp_path_factory.mktemp("incident")
    layout, tag = build_incident(work / "layout")
    return ImageShapes(BuiltImage("incident", layout, tag), work / "shapes")


def inspect_json(source: str) -> Any:
    result = run_imagefs("inspect", "--json", source)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def blobs_in(source: str) -> dict[str, int]:
    """sha256 digest -> size of every file the source holds (layout dir or tarball)."""
    path = Path(source.split(":")[1])
    found = {}
    if path.is_dir():
        for blob in (path / "blobs" / "sha256").iterdir():
            found["sha256:" + blob.name] = blob.stat().st_size
        return found
    with tarfile.open(path) as tf:
        for member in tf:
            extracted = tf.extractfile(member) if member.isreg() else None
            if extracted is not None:
                data = extracted.read()
                found["sha256:" + hashlib.sha256(data).hexdigest()] = len(data)
    return found


@pytest.mark.parametrize("shape", SHAPES)
def test_inspect_every_shape(
    shape: str, incident_shapes: ImageShapes, image_tools: None, tmp_path: Path
) -> None:
    source = incident_shapes[shape]
    image = incident_shapes.image
    report = inspect_json(source)
    # The image.
    manifest = builder.manifest_descriptor(image.layout, INCIDENT_TAG)
    if shape == "oci":
        assert report["digest"] == manifest["digest"]
    elif shape == "docker-archive":
        assert report["digest"] is None  # a legacy docker save has no manifest blob
    assert report["platform"] == "linux/amd64"
    assert report["author"] == CONFIG["author"]
    settings = CONFIG["config"]
    assert report["config"] == {
        "user": "app",
        "env": settings["Env"],
        "entrypoint": ["/bin/tool"],
        "cmd": ["--serve", "0.0.0.0:8080"],
        "workdir": "/app",
        "exposed_ports": ["53/udp", "8080/tcp"],
        "volumes": ["/data"],
        "labels": {"maintainer": "ops", "org.opencontainers.image.title": "incident"},
        "stop_signal": "SIGTERM",
    }
    # History, aligned with the layers: the empty_layer steps have none.
    assert report["history_aligned"] is True
    history = report["history"]
    assert [h["created_by"] for h in history] == [h["created_by"] for h in HISTORY]
    assert [h["empty_layer"] for h in history] == [bool(h.get("empty_layer")) for h in HISTORY]
    assert [h["layer"]["index"] if h["layer"] else None for h in history] == [
        0,
        None,
        1,
        None,
        2,
        3,
        None,
    ]
    assert history[2]["comment"] == "build"
    # Each layer against the blobs.
    raw = [
        builder.decompress(blob.read_bytes()) for _, blob in layer_blobs(image.layout, image.tag)
    ]
    held = blobs_in(source)
    layers = report["layers"]
    assert len(layers) == 4
    for index, layer in enumerate(layers):
        listing = tar_tv(layer_blobs(image.layout, image.tag)[index][1])
        names = [line.name.rstrip("/").rpartition("/")[2] for line in listing]
        assert layer["index"] == index
        assert layer["entries"] == len(listing)
        assert layer["whiteouts"] == sum(
            1 for n in names if n.startswith(".wh.") and not n.startswith(".wh..wh.")
        )
        assert layer["opaque_whiteouts"] == names.count(".wh..wh..opq")
        assert layer["uncompressed_size"] == len(raw[index])
        assert layer["diff_id"] == builder.sha256_digest(raw[index])
        assert held.get(layer["digest"]) == layer["compressed_size"], layer
        assert history[[0, 2, 4, 5][index]]["layer"] == {
            k: v for k, v in layer.items() if k != "created_by"
        }
    assert [layer["whiteouts"] for layer in layers] == [0, 0, 3, 0]
    assert [layer["opaque_whiteouts"] for layer in layers] == [0, 0, 1, 0]


def test_inspect_text(incident_shapes: ImageShapes) -> None:
    result = run_imagefs("inspect", incident_shapes["oci"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for expected in (
        "platform:     linux/amd64",
        "user:         app",
        "workdir:      /app",
        'entrypoint:   ["/bin/tool"]',
        "ports:        53/udp 8080/tcp",
        "volumes:      /data",
        "  APP_MODE=production",
        "  maintainer=ops",
        "RUN rm -rf /tmp/build.env /secrets/*",
        "3 whiteouts, 1 opaque",
        "(no layer)",
    ):
        assert expected in text, expected


def test_inspect_unaligned_history(tmp_path: Path) -> None:
    layers = [builder.make_layer_tar([file("a", "1")]), builder.make_layer_tar([file("b", "2")])]
    history = [{"created_by": "only one step"}]
    layout = builder.write_oci_layout(tmp_path / "l", layers, tag="t", history=history)
    report = inspect_json(f"oci:{layout}:t")
    assert report["history_aligned"] is False
    assert [layer["created_by"] for layer in report["layers"]] == [None, None]
    assert report["history"][0]["layer"] is None
    text = run_imagefs("inspect", f"oci:{layout}:t").stdout
    assert "the history does not match the layers one to one" in text


def test_inspect_corrupt_layer_is_one_line_error(tmp_path: Path) -> None:
    layout = builder.write_oci_layout(
        tmp_path / "l",
        [builder.make_layer_tar([file("a", "x" * 4000)])],
        compression="none",
        tag="t",
    )
    blob = layer_blobs(layout, "t")[0][1]
    data = bytearray(blob.read_bytes())
    data[700] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    result = run_imagefs("inspect", f"oci:{layout}:t")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "digest" in lines[0], result.stderr
