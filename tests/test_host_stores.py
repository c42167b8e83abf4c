"""podman's and Docker's stores read offline: exact layers, the tamper check, no writes.

The stores are written by the real engines (tests.engines): podman with its
own ``--root``, dockerd 20.10 with its own ``--data-root``, both pulling the
catalog's ``store`` image (tests.images) from the test registry. This module
has its own podman store and dockerd (the session's keep running for other
modules): the engines are stopped before the offline reads, except in the
tests that read each store while its engine runs. Oracles: ``umoci unpack``
of the same image for the mounted trees, the original layer tars for the
rebuilt ones, and the test's own edits for the tamper check. The read-only
bind mount of a store is made in a private mount namespace (tests.linuxenv),
so nothing of it can outlive the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
from tests.engines import Containerd, Dockerd, Podman
from tests.images import BuiltImage
from tests.linuxenv import PrivateMounts, make_workspace, remove_workspace
from tests.mounting import is_mounted, mounted, run_imagefs
from tests.needs import require_fuse, require_tools
from tests.oracle import Oracle, Record, compare, snapshot, tree_state
from tests.producers import RegistryImages
from tests.registry import Registry

pytestmark = [pytest.mark.fuse, pytest.mark.tools]


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
def reference(registry_images: RegistryImages, store_image: BuiltImage) -> str:
    """The fixture image in the session's test registry."""
    return registry_images.ref(store_image)


@pytest.fixture(scope="module")
def podman_store(tmp_path_factory: pytest.TempPathFactory, reference: str) -> Iterator[Podman]:
    with Podman(tmp_path_factory.mktemp("podman")) as podman:
        podman.pull(reference)
        yield podman


@pytest.fixture(scope="module")
def module_dockerd(
    tmp_path_factory: pytest.TempPathFactory,
    containerd: Containerd,
    engine_registry: Registry,
    reference: str,
) -> Iterator[Dockerd]:
    """This module's dockerd, stopped once it has pulled: the offline reads come first."""
    directory = tmp_path_factory.mktemp("dockerd")
    with Dockerd(directory, containerd, insecure=[engine_registry.host]) as daemon:
        daemon.pull(reference)
        daemon.stop()
        yield daemon


@pytest.fixture(scope="module")
def podman_image(podman_store: Podman, reference: str) -> Store:
    image_id = podman_store.image_id(reference)
    return Store("containers-storage", podman_store.root, reference, image_id)


@pytest.fixture(scope="module")
def docker_image(module_dockerd: Dockerd, reference: str) -> Store:
    root = module_dockerd.data_root
    repositories = json.loads((root / "image/overlay2/repositories.json").read_text())
    image_id = repositories["Repositories"][reference.rpartition(":")[0]][reference]
    return Store("docker-store", root, reference, image_id.removeprefix("sha256:"))


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


def test_mounted_tree_equals_umoci(store: Store, store_oracle: Oracle, tmp_path: Path) -> None:
    actual = _mount_snapshot(store, tmp_path)
    differences = compare(store_oracle.records, actual)
    assert differences == [], "\n".join(differences[:50])
    assert len(actual) == len(store_oracle.records) > 40


def test_rebuilt_tars_are_the_original_layers(store: Store, store_image: BuiltImage) -> None:
    originals = list(builder.layer_tars(store_image.layout, store_image.tag))
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
    before = tree_state(store.root)
    for attempt in range(2):  # a first mount builds, a second reuses the cache
        with mounted(store.source, tmp_path / f"mnt{attempt}", f"--store-root={store.root}",
                     cache=tmp_path / "cache") as mnt:  # fmt: skip
            for path in mnt.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    path.read_bytes()
    assert run_imagefs("verify", "--store-root", store.root, store.source).returncode == 0
    assert tree_state(store.root) == before


def test_read_only_bind_mount_of_the_store(store: Store, store_oracle: Oracle) -> None:
    """The store bind-mounted read-only (in a private mount namespace: it goes with it)."""
    require_fuse()
    require_tools("unshare", "nsenter")
    workspace = make_workspace("imagefs-store-ro-")
    namespace = PrivateMounts(workspace)
    try:
        view = workspace / "ro-store"
        view.mkdir()
        namespace.run(["mount", "--bind", "-o", "ro", store.root, view], check=True)
        probe = namespace.run(["touch", view / "probe"])
        assert probe.returncode != 0 and "Read-only" in probe.stderr
        mnt, log = workspace / "mnt", workspace / "imagefs.log"
        mnt.mkdir()
        mounted_now = namespace.imagefs(
            "mount", "--quiet", f"--cache-dir={workspace / 'cache'}", f"--log={log}",
            f"--store-root={view}", store.source, mnt,
        )  # fmt: skip
        assert mounted_now.returncode == 0, mounted_now.stderr
        differences = compare(store_oracle.records, snapshot(namespace.path(mnt)))
        assert differences == [], "\n".join(differences[:50])
        assert namespace.imagefs("umount", mnt).returncode == 0
        assert "ERROR" not in log.read_text()
        result = namespace.imagefs("verify", "--store-root", view, store.source)
        assert result.returncode == 0, result.stderr
    finally:
        namespace.close()
        remove_workspace(workspace)


def test_podman_store_read_while_podman_runs(
    podman_store: Podman, podman_image: Store, store_oracle: Oracle, tmp_path: Path
) -> None:
    with podman_store.service(tmp_path):
        actual = _mount_snapshot(podman_image, tmp_path)
        assert compare(store_oracle.records, actual) == []
        # The engine still works beside us (no lock taken, nothing changed).
        assert podman_image.image_id in podman_store.output("images", "--no-trunc", "--quiet")


def test_docker_store_read_while_dockerd_runs(
    module_dockerd: Dockerd, reference: str, store_oracle: Oracle, tmp_path: Path
) -> None:
    with module_dockerd.started():
        image_id = module_dockerd.image_id(reference)
        store = Store(
            "docker-store", module_dockerd.data_root, reference, image_id.removeprefix("sha256:")
        )
        actual = _mount_snapshot(store, tmp_path)
        assert compare(store_oracle.records, actual) == []
        assert run_imagefs("verify", "--store-root", store.root, store.source).returncode == 0
        assert image_id in module_dockerd.output("images", "--no-trunc", "--quiet")


def test_docker_short_names_resolve(module_dockerd: Dockerd, reference: str) -> None:
    """``alpine:3`` means docker.io/library/alpine:3, as Docker stores and reads it."""
    with module_dockerd.started():
        module_dockerd.docker("tag", reference, "alpine:3")
        image_id = module_dockerd.image_id("alpine:3")
    for ref in ("alpine:3", "docker.io/library/alpine:3", "library/alpine:3"):
        image = open_image(f"docker-store:{ref}", store_root=str(module_dockerd.data_root))
        assert image.config_digest == image_id, ref


def test_podman_short_names_resolve(podman_store: Podman, reference: str) -> None:
    podman_store.podman("tag", reference, "docker.io/library/alpine:3", "localhost/mine:1")
    image_id = podman_store.image_id("mine:1")
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
