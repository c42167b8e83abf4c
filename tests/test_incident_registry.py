"""The incident-response commands and views on a registry image (a real local registry).

The incident image is pushed with skopeo to a CNCF distribution registry on
127.0.0.1; ``inspect``, ``which`` and ``diff`` pull it into a private cache,
and ``mount --layers`` / ``--upto`` serve it like a local image.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.incident import HIDDEN_SECRETS, INCIDENT_TAG, LAYER_CREATED_BY, build_incident
from tests.mounting import mounted, run_imagefs
from tests.needs import require_tools
from tests.registry import Registry


@pytest.fixture(scope="module")
def pushed_incident(image_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_tools("docker-registry", "skopeo")
    work = tmp_path_factory.mktemp("incident-registry")
    layout, _ = build_incident(work / "layout")
    registry = Registry(work / "registry")
    try:
        yield registry.push(f"oci:{layout}:{INCIDENT_TAG}", "shop/api:1.4")
    finally:
        registry.stop()


def test_inspect_which_diff_on_a_registry_image(pushed_incident: str, tmp_path: Path) -> None:
    cache = f"--cache-dir={tmp_path / 'cache'}"
    result = run_imagefs("inspect", "--json", cache, pushed_incident)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["digest"].startswith("sha256:")
    assert [layer["created_by"] for layer in report["layers"]] == LAYER_CREATED_BY
    assert [layer["whiteouts"] for layer in report["layers"]] == [0, 0, 3, 0]
    which = run_imagefs("which", "--json", cache, pushed_incident, "/tmp/build.env")
    assert which.returncode == 0, which.stderr
    events = [e["event"] for e in json.loads(which.stdout)["history"]]
    assert events == ["added", "deleted (whiteout)"]
    diff = run_imagefs("diff", "--json", cache, pushed_incident, "--layer", "2")
    assert diff.returncode == 0, diff.stderr
    assert json.loads(diff.stdout)["summary"]["removed"] == 7


def test_layers_and_upto_mounts_of_a_registry_image(pushed_incident: str, tmp_path: Path) -> None:
    with mounted(pushed_incident, tmp_path / "views", "--layers") as mnt:
        found = subprocess.run(
            ["grep", "-rhoE", "SECRET-[A-Z0-9-]+[A-Z0-9]", "deleted", "shadowed"],
            cwd=mnt,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert set(found) == HIDDEN_SECRETS
    with mounted(pushed_incident, tmp_path / "upto", "-o", "upto=1") as mnt:
        assert (mnt / "tmp" / "build.env").read_text() == "AWS_SECRET_ACCESS_KEY=SECRET-AWS-KEY\n"
