"""``containerd:REF`` against a real containerd 1.6 (tests.engines), offline and live.

One containerd of this module's own (the session's keeps running for other
modules), filled by ``ctr images pull`` from a loopback
registry (images built by umoci / tests.builder, pushed by skopeo), in the
namespaces ``default``, ``k8s.io`` and two of the tests' own. The first tests
read the store while containerd runs (and commits); then containerd is
stopped and the rest read it offline. Mounted trees are compared with
``umoci unpack`` of the same image; meta.db as imagefs reads it with ctr's
own listing. No file of the store may change (mode, mtime, ctime, content).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.errors import (
    BlobError,
    BlobMissingError,
    CorruptStoreError,
    SourceError,
    SourceNotFoundError,
)
from imagefs.sources import host_platform, open_image
from imagefs.sources.bbolt import BoltFile, walk
from imagefs.sources.containerd import CONTENT_DIR, META_DB, read_images
from tests import builder
from tests.boltwriter import Tree, write_bolt
from tests.builder import directory, file
from tests.engines import Containerd
from tests.images import BuiltImage
from tests.linuxenv import PrivateMounts, make_workspace, remove_workspace
from tests.mounting import mounted, run_imagefs
from tests.needs import require_fuse, require_root, require_tools
from tests.oracle import Oracle, compare, snapshot, tree_state
from tests.registry import Registry

NAMESPACES = ("default", "k8s.io")


class Filled:
    """The module's containerd and what was pulled into it."""

    def __init__(self, daemon: Containerd, registry: Registry) -> None:
        self.daemon = daemon
        self.registry = registry
        self.root = daemon.root
        self.basic = f"{registry.host}/test/basic:1"
        self.ambiguous = f"{registry.host}/test/ambiguous:1"
        self.discarded = f"{registry.host}/test/discarded:1"
        self.multi = f"{registry.host}/test/multi:1"
        self.digests: dict[str, str] = {}

    def stopped(self) -> Filled:
        self.daemon.stop()
        return self


def small_layout(dest: Path, marker: str) -> str:
    layers = [
        builder.make_layer_tar([directory("etc"), file("etc/marker", marker + "\n")]),
        builder.make_layer_tar([file("etc/second", marker + " 2\n")]),
    ]
    return f"oci:{builder.write_oci_layout(dest, layers, tag='t')}:t"


@pytest.fixture(scope="module")
def filled(basic_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    require_tools("docker-registry", "skopeo")
    work = tmp_path_factory.mktemp("containerd")
    registry = Registry(work / "registry")
    daemon = Containerd(work / "daemon").start()
    try:
        store = Filled(daemon, registry)
        registry.push(f"oci:{basic_image.layout}:{basic_image.tag}", "test/basic:1")
        for namespace in NAMESPACES:
            daemon.pull(store.basic, namespace=namespace)
        # Docker Hub style names resolve by normalisation: "basic" is this one.
        daemon.ctr(
            "images", "tag", store.basic, "docker.io/library/basic:latest", namespace="default"
        )
        # One name, different images in two namespaces.
        for namespace, marker in zip(NAMESPACES, ("first", "second"), strict=True):
            registry.push(small_layout(work / f"ambiguous-{marker}", marker), "test/ambiguous:1")
            daemon.pull(store.ambiguous, namespace=namespace)
        # Layers discarded after unpacking, as the CRI plugin's discard_unpacked_layers
        # does: containerd's own 'content prune references' drops the manifest's layer
        # labels, and its garbage collector deletes the (unshared) layer blobs.
        registry.push(small_layout(work / "discarded", "discarded"), "test/discarded:1")
        daemon.pull(store.discarded, namespace="discard")
        daemon.ctr("content", "prune", "references", namespace="discard")
        # A two-platform index of which ctr pulls only this machine's platform.
        here = host_platform()
        other = ("linux", "arm64", "v8") if here.architecture != "arm64" else ("linux", "amd64", "")
        per_platform = {
            (here.os, here.architecture, here.variant): [
                builder.make_layer_tar([file("which", "host\n")])
            ],
            other: [builder.make_layer_tar([file("which", "other\n")])],
        }
        layout = builder.write_multiplatform_layout(work / "multi", per_platform, tag="t")
        registry.push(f"oci:{layout}:t", "test/multi:1", "--all")
        daemon.pull(store.multi, namespace="multi")
        for namespace in daemon.namespaces():
            store.digests.update(
                {f"{namespace}/{k}": v for k, v in daemon.images(namespace).items()}
            )
        yield store
    finally:
        daemon.stop()
        registry.stop()


def mount_compare(source: str, oracle: Oracle, tmp_path: Path, *options: str) -> None:
    log = tmp_path / "imagefs.log"
    with mounted(source, tmp_path / "mnt", *options, log=log) as mnt:
        actual = snapshot(mnt)
    differences = compare(oracle.records, actual)
    assert differences == [], "\n".join(differences[:50])
    assert "ERROR" not in log.read_text()


def images_json(root: Path, *options: str) -> list[dict[str, object]]:
    result = run_imagefs("images", "--json", "--store-root", root, *options)
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed


# -- meta.db records, hand-built (no daemon) ---------------------------------------------------

UNIX_1600000000 = (1600000000 + 62135596800).to_bytes(8, "big")  # Go counts from year 1
GO_TIME = b"\x01" + UNIX_1600000000 + (250).to_bytes(4, "big") + b"\xff\xff"  # UTC
DIGEST = "sha256:" + "ab" * 32


def meta_db(tmp_path: Path, target: Tree, name: bytes = b"docker.io/library/x:1") -> Path:
    image = {b"target": target, b"createdat": GO_TIME, b"labels": {b"k": b"v"}}
    path = tmp_path / "meta.db"
    write_bolt(path, {b"v1": {b"version": b"\x06", b"ns1": {b"images": {name: image}}}})
    return path


def test_hand_built_image_record(tmp_path: Path) -> None:
    target: Tree = {
        b"digest": DIGEST.encode(),
        b"mediatype": b"application/vnd.oci.image.index.v1+json",
        b"size": b"\xd6\x08",  # Go binary.PutVarint(555): zigzag, so 1110 in LEB128
    }
    with BoltFile.open(str(meta_db(tmp_path, target))) as db:
        (image,) = read_images(db)
    assert (image.namespace, image.name) == ("ns1", "docker.io/library/x:1")
    assert image.target.digest == DIGEST and image.target.size == 555
    assert image.target.media_type == "application/vnd.oci.image.index.v1+json"
    assert image.created == "2020-09-13T12:26:40.000000250Z" and image.updated == ""
    assert image.labels == (("k", "v"),)


@pytest.mark.parametrize(
    ("target", "name", "message"),
    [
        ({b"digest": b"sha256:zz", b"mediatype": b"t", b"size": b"\x02"}, None, "malformed"),
        ({b"digest": DIGEST.encode(), b"mediatype": b"t"}, None, "lacks its digest"),
        ({b"digest": DIGEST.encode(), b"mediatype": b"t", b"size": b"\x80" * 11}, None, "varint"),
        ({b"digest": DIGEST.encode(), b"mediatype": b"t", b"size": b"\x01"}, None, "negative"),
        ({b"digest": DIGEST.encode(), b"mediatype": b"\xff", b"size": b"\x02"}, None, "UTF-8"),
        ({b"digest": DIGEST.encode(), b"mediatype": b"t", b"size": b"\x02"}, b"\xfe", "UTF-8"),
    ],
    ids=["bad-digest", "no-size", "long-varint", "negative-size", "bad-type", "bad-name"],
)
def test_corrupt_image_records(
    tmp_path: Path, target: Tree, name: bytes | None, message: str
) -> None:
    path = meta_db(tmp_path, target, name or b"docker.io/library/x:1")
    with BoltFile.open(str(path)) as db, pytest.raises(CorruptStoreError, match=message) as caught:
        read_images(db)
    assert str(path) in str(caught.value)


# -- while containerd runs -----------------------------------------------------------------


def test_meta_db_read_as_ctr_lists_it(filled: Filled) -> None:
    """Every namespace, image name, target digest and content blob, as ctr reports them."""
    assert filled.daemon.running
    with BoltFile.open(str(filled.root / META_DB)) as db:
        images = read_images(db)
        blobs: dict[str, set[str]] = {}
        for path, entry in walk(db):
            if len(path) == 4 and path[2:] == (b"content", b"blob"):
                blobs.setdefault(path[1].decode(), set()).add(entry.key.decode())
    assert {f"{i.namespace}/{i.name}": i.target.digest for i in images} == filled.digests
    for namespace in filled.daemon.namespaces():
        assert blobs.get(namespace, set()) == filled.daemon.content(namespace)
    assert {i.namespace for i in images} == filled.daemon.namespaces()


def test_reads_while_containerd_commits(
    filled: Filled, basic_oracle: Oracle, tmp_path: Path
) -> None:
    """Listing and mounting with containerd running, while it commits tag after tag."""
    assert filled.daemon.running
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds: list[int] = []

    def churn() -> None:
        try:
            for round_number in range(1000):
                if stop.is_set():
                    return
                name = f"churn/tag-{round_number}:1"
                filled.daemon.ctr("images", "tag", filled.basic, name, namespace="default")
                filled.daemon.ctr("images", "rm", name, namespace="default")
                rounds.append(round_number)
        except BaseException as exc:  # reported by the test, after the join
            errors.append(exc)

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(5):
            listed = images_json(filled.root, "--namespace", "default")
            assert filled.basic in {row["name"] for row in listed}
        mount_compare(
            f"containerd:{filled.basic}", basic_oracle, tmp_path, "--store-root", str(filled.root)
        )
    finally:
        stop.set()
        writer.join()
    assert not errors, errors
    assert rounds, "containerd committed nothing while imagefs read"


# -- offline -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline(filled: Filled) -> Filled:
    return filled.stopped()


def test_images_lists_every_namespace(offline: Filled) -> None:
    listed = images_json(offline.root)
    assert {f"{row['namespace']}/{row['name']}": row["digest"] for row in listed} == offline.digests
    row = next(r for r in listed if r["name"] == offline.basic and r["namespace"] == "default")
    assert row["store"] == "containerd" and row["root"] == str(offline.root)
    assert isinstance(row["size"], int) and row["size"] > 0
    text = run_imagefs("images", "--store-root", offline.root)
    assert text.returncode == 0 and offline.basic in text.stdout and "k8s.io" in text.stdout
    only = images_json(offline.root, "--namespace", "k8s.io")
    assert {row["namespace"] for row in only} == {"k8s.io"}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_mount_equals_umoci(
    offline: Filled, basic_oracle: Oracle, tmp_path: Path, namespace: str
) -> None:
    mount_compare(
        f"containerd:{offline.basic}",
        basic_oracle,
        tmp_path,
        f"--store-root={offline.root}",
        f"--namespace={namespace}",
    )


def test_references_resolve_as_the_engines_do(offline: Filled) -> None:
    digest = offline.digests[f"default/{offline.basic}"]
    hexdigest = digest.split(":", 1)[1]
    root = str(offline.root)
    for ref in (
        offline.basic,
        "basic",  # docker.io/library/basic:latest
        "docker.io/library/basic",
        f"{offline.registry.host}/test/basic@{digest}",  # repository plus digest
        f"@{digest}",
        f"sha256:{hexdigest[:12]}",  # an image ID prefix, as nerdctl shows it
        hexdigest[:12],
    ):
        image = open_image(f"containerd:{ref}", store_root=root, namespace="default")
        assert image.manifest_digest == digest, ref
        assert image.transport == "containerd"
    with pytest.raises(SourceNotFoundError, match="no image 'nope'"):
        open_image("containerd:nope", store_root=root)
    with pytest.raises(SourceNotFoundError, match="no image"):
        open_image(f"containerd:{offline.basic}", store_root=root, namespace="no-such-namespace")


def test_a_name_with_different_digests_in_two_namespaces_is_ambiguous(offline: Filled) -> None:
    root = str(offline.root)
    first, second = (offline.digests[f"{ns}/{offline.ambiguous}"] for ns in NAMESPACES)
    assert first != second
    with pytest.raises(SourceError, match="names different images") as caught:
        open_image(f"containerd:{offline.ambiguous}", store_root=root)
    assert f"default: {offline.ambiguous} = {first}" in str(caught.value)
    assert f"k8s.io: {offline.ambiguous} = {second}" in str(caught.value)
    chosen = open_image(f"containerd:{offline.ambiguous}", store_root=root, namespace="k8s.io")
    assert chosen.manifest_digest == second
    # The same name with the same digest in two namespaces is one image.
    assert open_image(f"containerd:{offline.basic}", store_root=root).layers


def test_discarded_layers_are_named(offline: Filled) -> None:
    content = offline.root / CONTENT_DIR / "blobs" / "sha256"
    image_digest = offline.digests[f"discard/{offline.discarded}"]
    assert (content / image_digest.split(":", 1)[1]).is_file()  # the manifest stayed
    result = run_imagefs("inspect", f"containerd:{offline.discarded}", "--store-root", offline.root)
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "discard_unpacked_layers" in message and "overlayfs snapshotter" in message
    assert message.count("\n") == 0 and "Traceback" not in message


def test_a_platform_that_was_not_pulled(offline: Filled) -> None:
    root = str(offline.root)
    image = open_image(f"containerd:{offline.multi}", store_root=root)
    assert (
        image.platform is not None and image.platform.architecture == host_platform().architecture
    )
    other = "linux/arm64/v8" if host_platform().architecture != "arm64" else "linux/amd64"
    result = run_imagefs(
        "inspect", f"containerd:{offline.multi}", "--store-root", root, "--platform", other
    )
    assert result.returncode == 1
    assert "fetched only some platforms" in result.stderr


def test_a_symlinked_blob_is_not_followed(offline: Filled, tmp_path: Path) -> None:
    """A copy of the store whose layer blob was swapped for a symlink to the real one."""
    copy = tmp_path / "copy"
    shutil.copytree(
        offline.root / "io.containerd.metadata.v1.bolt", copy / "io.containerd.metadata.v1.bolt"
    )
    shutil.copytree(offline.root / CONTENT_DIR, copy / CONTENT_DIR, symlinks=True)
    layer = open_image(f"containerd:{offline.basic}", store_root=str(copy)).layers[0]
    blob = Path(layer.blob.path)
    blob.unlink()
    blob.symlink_to(offline.root / CONTENT_DIR / "blobs" / "sha256" / blob.name)
    with pytest.raises(BlobError, match="a symlink, not followed"):
        open_image(f"containerd:{offline.basic}", store_root=str(copy))
    # A missing layer blob whose manifest still references it: removed behind containerd's back.
    blob.unlink()
    with pytest.raises(BlobMissingError, match="removed outside containerd"):
        open_image(f"containerd:{offline.basic}", store_root=str(copy))


def test_a_read_only_bind_mount_of_the_store(offline: Filled, basic_oracle: Oracle) -> None:
    require_root()
    require_fuse()
    require_tools("unshare", "nsenter")
    workspace = make_workspace("imagefs-ctd-ro-")
    namespace = PrivateMounts(workspace)
    try:
        readonly = workspace / "ro-store"
        readonly.mkdir()
        namespace.run(["mount", "--bind", "-o", "ro", offline.root, readonly], check=True)
        probe = namespace.run(["touch", readonly / "probe"])
        assert probe.returncode != 0 and "Read-only" in probe.stderr
        listed = namespace.imagefs("images", "--json", "--store-root", readonly)
        assert listed.returncode == 0, listed.stderr
        assert offline.basic in {row["name"] for row in json.loads(listed.stdout)}
        mnt = workspace / "mnt"
        mnt.mkdir()
        mounted_now = namespace.imagefs(
            "mount", "--quiet", f"--cache-dir={workspace / 'cache'}", f"--store-root={readonly}",
            "--namespace=k8s.io", f"containerd:{offline.basic}", mnt,
        )  # fmt: skip
        assert mounted_now.returncode == 0, mounted_now.stderr
        differences = compare(basic_oracle.records, snapshot(namespace.path(mnt)))
        assert differences == [], "\n".join(differences[:50])
        assert namespace.imagefs("umount", mnt).returncode == 0
    finally:
        namespace.close()
        remove_workspace(workspace)


def test_nothing_in_the_store_changes(offline: Filled, tmp_path: Path) -> None:
    """Mode, mtime, ctime and content of every file, before and after a mount and listings."""
    before = tree_state(offline.root)
    assert any(path.endswith("meta.db") for path in before)
    with mounted(
        f"containerd:{offline.basic}", tmp_path / "mnt", f"--store-root={offline.root}"
    ) as mnt:
        snapshot(mnt)  # read every file
    assert run_imagefs("images", "--store-root", offline.root).returncode == 0
    assert (
        run_imagefs(
            "inspect", f"containerd:{offline.discarded}", "--store-root", offline.root
        ).returncode
        == 1
    )
    assert tree_state(offline.root) == before
