"""podman's and Docker's stores read offline: exact layers, the tamper check, no writes.

The stores are written by the real engines (tests.store_engines): podman with
its own ``--root``, dockerd 20.10 with its own ``--data-root``, both pulling
the fixture image from the test registry. The engines are stopped before the
offline reads, except in the test that reads each store while its engine
runs. Oracles: ``umoci unpack`` of the same image for the mounted trees, the
original layer tars for the rebuilt ones, and the test's own edits for the
tamper check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagefs.digest import Digest
from imagefs.errors import (
    BlobError,
    CompressionError,
    DigestMismatchError,
    ManifestError,
    SourceNotFoundError,
)
from imagefs.layers.reader import open_layer_data
from imagefs.layers.rebuilt import rebuilt_of
from imagefs.sources import open_image
from imagefs.sources.containers_storage import big_data_name
from tests import builder
from tests.mounting import is_mounted, mounted, run_imagefs
from tests.needs import require_tools
from tests.oracle import Oracle, Record, compare, snapshot, umoci_oracle
from tests.registry import Registry
from tests.store_engines import Dockerd, PodmanStore, build_store_image, store_state

pytestmark = [pytest.mark.fuse, pytest.mark.tools]

REPO = "test/store"


@dataclass(frozen=True)
class Store:
    """One engine's store holding the fixture image."""

    transport: str  # "containers-storage" or "docker-store"
    root: Path
    reference: str  # the name the engine stored it under
    image_id: str  # hex

    @property
    def source(self) -> str:
        return f"{self.transport}:{self.reference}"

    def layer_dirs(self) -> list[Path]:
        """The extracted directory of each layer, base first (via imagefs's own reading)."""
        image = open_image(self.source, store_root=str(self.root))
        dirs = []
        for layer in image.layers:
            rebuilt = rebuilt_of(layer)
            assert rebuilt is not None
            dirs.append(Path(rebuilt.where_diff))
        return dirs

    def copy(self, dest: Path) -> Store:
        """A copy of the store (owners, modes, xattrs, devices, hardlinks kept)."""
        subprocess.run(["cp", "-a", str(self.root), str(dest)], check=True)
        return Store(self.transport, dest, self.reference, self.image_id)


@pytest.fixture(scope="module")
def image_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    require_tools("umoci", "skopeo")
    return build_store_image(tmp_path_factory.mktemp("store-image"))


@pytest.fixture(scope="module")
def oracle(image_layout: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    layout, tag = image_layout
    return umoci_oracle(layout, tag, tmp_path_factory.mktemp("store-umoci") / "bundle")


@pytest.fixture(scope="module")
def registry(
    image_layout: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Registry, str]]:
    layout, tag = image_layout
    served = Registry(tmp_path_factory.mktemp("store-registry"))
    try:
        yield served, served.push(f"oci:{layout}:{tag}", f"{REPO}:{tag}")
    finally:
        served.stop()


@pytest.fixture(scope="module")
def podman_store(
    registry: tuple[Registry, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodmanStore]:
    store = PodmanStore(tmp_path_factory.mktemp("podman"))
    try:
        store.pull(registry[1])
        yield store
    finally:
        store.close()


@pytest.fixture(scope="module")
def dockerd(registry: tuple[Registry, str], tmp_path_factory: pytest.TempPathFactory) -> Dockerd:
    daemon = Dockerd(tmp_path_factory.mktemp("dockerd"), registry[0].host)
    with daemon.running():
        daemon.pull(registry[1])
    return daemon  # stopped: the offline reads come after


@pytest.fixture(scope="module")
def podman_image(podman_store: PodmanStore, registry: tuple[Registry, str]) -> Store:
    reference = registry[1]
    image_id = podman_store.podman("image", "inspect", "--format", "{{.Id}}", reference).strip()
    return Store("containers-storage", podman_store.root, reference, image_id)


@pytest.fixture(scope="module")
def docker_image(dockerd: Dockerd, registry: tuple[Registry, str]) -> Store:
    reference = registry[1]
    repositories = json.loads((dockerd.data_root / "image/overlay2/repositories.json").read_text())
    image_id = repositories["Repositories"][reference.rpartition(":")[0]][reference]
    return Store("docker-store", dockerd.data_root, reference, image_id.removeprefix("sha256:"))


@pytest.fixture(scope="module", params=["podman_image", "docker_image"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each engine's store in turn."""
    found: Store = request.getfixturevalue(request.param)
    return found


def _refused_mount(store: Store, tmp_path: Path, cache: Path) -> str:
    """Mount that must fail: its one-line message."""
    mountpoint = tmp_path / "refused"
    mountpoint.mkdir(exist_ok=True)
    result = run_imagefs("mount", "--quiet", "--store-root", store.root, "--cache-dir", cache,
                         store.source, mountpoint)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert not is_mounted(mountpoint)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    return message


def _mount_snapshot(store: Store, tmp_path: Path, *options: str) -> dict[str, Record]:
    log = tmp_path / "imagefs.log"
    with mounted(store.source, tmp_path / "mnt", f"--store-root={store.root}", *options,
                 log=log) as mnt:  # fmt: skip
        actual = snapshot(mnt)
    assert "ERROR" not in log.read_text()
    return actual


def test_mounted_tree_equals_umoci(store: Store, oracle: Oracle, tmp_path: Path) -> None:
    actual = _mount_snapshot(store, tmp_path)
    differences = compare(oracle.records, actual)
    assert differences == [], "\n".join(differences[:50])
    assert len(actual) == len(oracle.records) > 40


def test_rebuilt_tars_are_the_original_layers(store: Store, image_layout: tuple[Path, str]) -> None:
    originals = list(builder.layer_tars(*image_layout))
    image = open_image(store.source, store_root=str(store.root))
    assert image.config_digest == f"sha256:{store.image_id}"
    assert len(image.layers) == len(originals) == 3
    for layer, original in zip(image.layers, originals, strict=True):
        assert layer.descriptor.digest == layer.diff_id == Digest.of(original)
        data = open_layer_data(layer)
        try:
            # Small reads across header, data and padding boundaries, then all of it.
            pieces = [data.pread(at, 1000) for at in range(0, len(original), 1000)]
            assert b"".join(pieces) == original
            assert data.pread(0, len(original) + 10) == original
        finally:
            data.close()


def test_references_resolve_as_the_engines_do(store: Store) -> None:
    full = f"sha256:{store.image_id}"
    for ref in (store.reference, store.image_id, full, store.image_id[:12]):
        image = open_image(f"{store.transport}:{ref}", store_root=str(store.root))
        assert image.config_digest == full, ref
    result = run_imagefs("verify", "--store-root", store.root, f"{store.transport}:nosuch:1")
    assert result.returncode == 1
    assert "no image 'nosuch:1'" in result.stderr and store.reference in result.stderr


def test_verify_clean_store(store: Store) -> None:
    result = run_imagefs("verify", "--json", "--store-root", store.root, store.source)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["state"] == "ok"
    assert [layer["state"] for layer in report["layers"]] == ["ok"] * 3
    assert all(layer["found"] == layer["digest"] for layer in report["layers"])


def test_tamper_refused_and_reported(store: Store, tmp_path: Path) -> None:
    """Change one file, add one, remove one (in different layers): exactly those are named."""
    copy = store.copy(tmp_path / "store")
    base, middle, top = copy.layer_dirs()
    (base / "etc/shadow").write_text("root:HACKED:19000::::::\n")  # same layer, new content
    (middle / "planted").write_bytes(b"added on the host\n")
    (top / "bin/new").unlink()
    expected = {
        (0, "etc/shadow", "changed"),
        (1, "planted", "added"),
        (2, "bin/new", "removed"),
    }

    message = _refused_mount(copy, tmp_path, tmp_path / "cache")
    assert "modified on the host" in message and "etc/shadow (" in message, message

    result = run_imagefs("verify", "--json", "--store-root", copy.root, copy.source)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["state"] == "modified"
    found = {
        (layer["index"], change["path"], change["kind"])
        for layer in report["layers"]
        for change in layer["changes"]
    }
    assert found == expected
    assert [layer["state"] for layer in report["layers"]] == ["modified"] * 3
    text = run_imagefs("verify", "--store-root", copy.root, copy.source)
    assert text.returncode == 1
    for _, path, kind in expected:
        assert any(kind in line and path in line for line in text.stdout.splitlines()), text.stdout


def test_tamper_after_a_clean_mount_is_refused_at_the_next(store: Store, tmp_path: Path) -> None:
    """The cached tree and layer indexes must not let a later change through."""
    copy = store.copy(tmp_path / "store")
    cache = tmp_path / "cache"
    with mounted(copy.source, tmp_path / "mnt", f"--store-root={copy.root}", cache=cache):
        pass
    target = copy.layer_dirs()[1] / "etc/passwd"
    data = target.read_bytes()
    target.write_bytes(data.replace(b"user", b"evil"))  # same size: only the CRC tells
    message = _refused_mount(copy, tmp_path, cache)
    assert "etc/passwd (content changed (CRC-64))" in message, message


def test_allow_modified_mounts_the_host_bytes(store: Store, tmp_path: Path) -> None:
    copy = store.copy(tmp_path / "store")
    target = copy.layer_dirs()[0] / "bin/tool"
    target.write_bytes(target.read_bytes().replace(b"tool", b"evil"))
    cache = tmp_path / "cache"
    with mounted(copy.source, tmp_path / "mnt", f"--store-root={copy.root}", "--allow-modified",
                 cache=cache) as mnt:  # fmt: skip
        assert (mnt / "bin/tool").read_bytes() == b"#!/bin/sh\necho evil\n"
        # Marked, with how it changed; hidden from listxattr like the other
        # user.imagefs.* (cp -a keeps the image's own xattrs only).
        detail = os.getxattr(mnt / "bin/tool", "user.imagefs.modified")
        assert b"content changed" in detail
        assert "user.imagefs.modified" not in os.listxattr(mnt / "bin/tool")
        with pytest.raises(OSError):  # an unchanged file carries no mark
            os.getxattr(mnt / "etc/passwd", "user.imagefs.modified")
    with mounted(copy.source, tmp_path / "mnt", f"--store-root={copy.root}", "--allow-modified",
                 "--layers", cache=cache) as mnt:  # fmt: skip
        for where in ("rootfs/bin/tool", "layers/0/bin/tool"):
            assert b"content changed" in os.getxattr(mnt / where, "user.imagefs.modified")
    # A refusing mount does not reuse what the allowing one cached.
    assert "bin/tool (content changed" in _refused_mount(copy, tmp_path, cache)


@pytest.mark.parametrize("planted", ["file", "parent"])
def test_planted_symlink_is_refused_not_followed(
    planted: str, store: Store, tmp_path: Path
) -> None:
    """``diff/etc/shadow`` (or ``diff/etc``) replaced by a symlink to the host's."""
    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "shadow").write_text("HOST SECRET\n")
    copy = store.copy(tmp_path / "store")
    etc = copy.layer_dirs()[0] / "etc"
    if planted == "file":
        (etc / "shadow").unlink()
        (etc / "shadow").symlink_to(host / "shadow")
        expected = ["etc/shadow (replaced by a symlink)"]
    else:
        shutil.rmtree(etc)
        etc.symlink_to(host)
        expected = ["etc/shadow (", "etc (dir -> symlink)"]
    message = _refused_mount(copy, tmp_path, tmp_path / "cache")
    assert all(part in message for part in expected), message
    assert "HOST SECRET" not in message
    report = run_imagefs("verify", "--store-root", copy.root, copy.source)
    assert report.returncode == 1 and "HOST SECRET" not in report.stdout
    with mounted(copy.source, tmp_path / "mnt", f"--store-root={copy.root}", "--allow-modified",
                 cache=tmp_path / "cache2") as mnt:  # fmt: skip
        served = (mnt / "etc/shadow").read_bytes()
    assert b"HOST SECRET" not in served


def test_store_files_never_change(store: Store, tmp_path: Path) -> None:
    before = store_state(store.root)
    for attempt in range(2):  # a first mount builds, a second reuses the cache
        with mounted(store.source, tmp_path / f"mnt{attempt}", f"--store-root={store.root}",
                     cache=tmp_path / "cache") as mnt:  # fmt: skip
            for path in mnt.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    path.read_bytes()
    assert run_imagefs("verify", "--store-root", store.root, store.source).returncode == 0
    assert store_state(store.root) == before


def test_read_only_bind_mount_of_the_store(store: Store, oracle: Oracle, tmp_path: Path) -> None:
    view = tmp_path / "ro-store"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(store.root), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        readonly = Store(store.transport, view, store.reference, store.image_id)
        actual = _mount_snapshot(readonly, tmp_path)
        assert compare(oracle.records, actual) == []
        result = run_imagefs("verify", "--store-root", view, store.source)
        assert result.returncode == 0, result.stderr
    finally:
        _unmount_bind(view)


def _unmount_bind(view: Path) -> None:
    """The daemons of the mounts above may still be exiting: retry, then detach lazily."""
    for _ in range(50):
        if subprocess.run(["umount", str(view)], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "--lazy", str(view)], check=True)


def test_podman_store_read_while_podman_runs(
    podman_store: PodmanStore, podman_image: Store, oracle: Oracle, tmp_path: Path
) -> None:
    with podman_store.service(tmp_path):
        actual = _mount_snapshot(podman_image, tmp_path)
        assert compare(oracle.records, actual) == []
        # The engine still works beside us (no lock taken, nothing changed).
        assert podman_image.image_id in podman_store.podman("images", "--no-trunc", "--quiet")


def test_docker_store_read_while_dockerd_runs(
    dockerd: Dockerd, registry: tuple[Registry, str], oracle: Oracle, tmp_path: Path
) -> None:
    reference = registry[1]
    with dockerd.running():
        image_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", reference).strip()
        store = Store(
            "docker-store", dockerd.data_root, reference, image_id.removeprefix("sha256:")
        )
        actual = _mount_snapshot(store, tmp_path)
        assert compare(oracle.records, actual) == []
        assert run_imagefs("verify", "--store-root", store.root, store.source).returncode == 0
        assert image_id in dockerd.docker("images", "--no-trunc", "--quiet")


def test_docker_short_names_resolve(dockerd: Dockerd, registry: tuple[Registry, str]) -> None:
    """``alpine:3`` means docker.io/library/alpine:3, as Docker stores and reads it."""
    with dockerd.running():
        dockerd.docker("tag", registry[1], "alpine:3")
        image_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", "alpine:3").strip()
    for ref in ("alpine:3", "docker.io/library/alpine:3", "library/alpine:3"):
        image = open_image(f"docker-store:{ref}", store_root=str(dockerd.data_root))
        assert image.config_digest == image_id, ref


def test_podman_short_names_resolve(
    podman_store: PodmanStore, registry: tuple[Registry, str]
) -> None:
    podman_store.podman("tag", registry[1], "docker.io/library/alpine:3", "localhost/mine:1")
    image_id = podman_store.podman("image", "inspect", "--format", "{{.Id}}", "mine:1").strip()
    for ref in ("alpine:3", "docker.io/library/alpine:3", "mine:1", "localhost/mine:1"):
        image = open_image(f"containers-storage:{ref}", store_root=str(podman_store.root))
        assert image.config_digest == f"sha256:{image_id}", ref
    spelled = f"containers-storage:[overlay@{podman_store.root}+/run/x]alpine:3"
    assert open_image(spelled).config_digest == f"sha256:{image_id}"


def _edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _podman_image(document: Any, image_id: str) -> dict[str, Any]:
    return next(image for image in document if image["id"] == image_id)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("layer-path", ManifestError, "is not an ID"),
        ("parent-cycle", ManifestError, "a parent cycle"),
        ("config-byte", DigestMismatchError, "digest mismatch"),
        ("not-json", ManifestError, "invalid JSON"),
        ("record-garbage", CompressionError, "corrupt gzip"),
        ("record-symlink", BlobError, "cannot open"),
        ("names-type", ManifestError, "names must be strings"),
    ],
)
def test_hostile_podman_store(
    name: str, error: type[Exception], message: str, podman_image: Store, tmp_path: Path
) -> None:
    """Each edit of a real podman store fails with one clear line, before any layer is read."""
    copy = podman_image.copy(tmp_path / "store")
    images = copy.root / "overlay-images/images.json"
    layers = copy.root / "overlay-layers/layers.json"
    top = _podman_image(json.loads(images.read_text()), copy.image_id)["layer"]
    if name == "layer-path":
        _edit_json(images, lambda d: _podman_image(d, copy.image_id).update(layer="../../../etc"))
    elif name == "parent-cycle":
        _edit_json(layers, lambda d: next(x for x in d if x["id"] == top).update(parent=top))
    elif name == "config-byte":
        key = big_data_name(f"sha256:{copy.image_id}")
        config = copy.root / "overlay-images" / copy.image_id / key
        config.write_bytes(config.read_bytes().replace(b"amd64", b"arm64"))
    elif name == "not-json":
        images.write_text("[{")
    elif name == "record-garbage":
        (copy.root / f"overlay-layers/{top}.tar-split.gz").write_bytes(b"\x1f\x8bgarbage")
    elif name == "record-symlink":
        record = copy.root / f"overlay-layers/{top}.tar-split.gz"
        record.unlink()
        record.symlink_to(tmp_path / "elsewhere.tar-split.gz")
    else:
        _edit_json(images, lambda d: _podman_image(d, copy.image_id).update(names=[1]))
    with pytest.raises(error) as info:
        open_image(copy.source, store_root=str(copy.root))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cache-id", "is not 64 hex digits"),
        ("diff", "says"),
        ("repositories", "is not sha256:<64 hex>"),
    ],
)
def test_hostile_docker_store(name: str, message: str, docker_image: Store, tmp_path: Path) -> None:
    """Each edit of a real Docker data root fails with one clear line."""
    copy = docker_image.copy(tmp_path / "store")
    layerdb = copy.root / "image/overlay2/layerdb/sha256"
    base_diff_id = open_image(copy.source, store_root=str(copy.root)).layers[0].diff_id
    assert base_diff_id is not None
    base = layerdb / base_diff_id.encoded
    if name == "cache-id":
        (base / "cache-id").write_text("../../../../etc")
    elif name == "diff":
        (base / "diff").write_text("sha256:" + "0" * 64)
    else:
        repositories = copy.root / "image/overlay2/repositories.json"
        _edit_json(repositories, lambda d: d["Repositories"].update({"x": {"x:1": "../etc"}}))
    with pytest.raises(ManifestError) as info:
        open_image(copy.source, store_root=str(copy.root))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_layer_directory_is_reported(store: Store, tmp_path: Path) -> None:
    copy = store.copy(tmp_path / "store")
    shutil.rmtree(copy.layer_dirs()[1])
    result = run_imagefs("verify", "--json", "--store-root", copy.root, copy.source)
    assert result.returncode == 1
    states = [layer["state"] for layer in json.loads(result.stdout)["layers"]]
    assert states == ["ok", "unreadable", "ok"]
    message = _refused_mount(copy, tmp_path, tmp_path / "cache")
    assert "cannot open" in message and str(copy.root) in message


def test_not_a_store(tmp_path: Path) -> None:
    for transport, wanted in (
        ("containers-storage", "overlay driver"),
        ("docker-store", "overlay2"),
    ):
        with pytest.raises(SourceNotFoundError, match=wanted):
            open_image(f"{transport}:x:1", store_root=str(tmp_path))
    with pytest.raises(SourceNotFoundError, match="no such directory"):
        open_image("docker-store:x:1", store_root=str(tmp_path / "absent"))


def test_images_lists_the_store_as_its_engine_does(store: Store) -> None:
    """``imagefs images`` on a podman or Docker store: the name and image ID the engine gave."""
    result = run_imagefs("images", "--json", "--store-root", store.root)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    [entry] = [image for image in listed if image["name"] == store.reference]
    assert entry["store"] == store.transport and entry["root"] == str(store.root)
    assert entry["digest"] == f"sha256:{store.image_id}"
    assert entry["size"] > 0 and entry["namespace"] == ""
    text = run_imagefs("images", "--store-root", store.root)
    assert text.returncode == 0 and store.reference in text.stdout
    # --namespace means containerd: refused for the other stores.
    refused = run_imagefs("images", "--namespace", "x", "--store-root", store.root)
    assert refused.returncode != 0 and "containerd" in refused.stderr
