"""Every format the field's tools write, mounted for real and compared with ``umoci unpack``.

One test per tool and format (issue #12): podman's four save formats and
``-m``, an image buildah built, skopeo's ``dir:`` with gzip and zstd layers, ``ctr images export``,
ctr-remote's eStargz and zstd:chunked (exported and from the registry),
``docker save`` by tag, of several images and by ID, and the shapes no Debian
tool writes, crafted after their writers' code: go-containerregistry
tarballs and Docker 25's save by ID; plus ``umoci insert``'s layers. Each is
mounted through the kernel (``tests.mounting.mounted``) and its snapshot must
equal ``umoci unpack`` of the image the tool was given (``tests.oracle``):
the tools change how an image is stored, never what it holds.

Which image each tool gets is in ``tests.producers``. The engines run as
described in ``tests.engines``: private roots and sockets, private mount
namespaces, stopped by pid.

The eStargz and zstd:chunked conversions are compared with umoci unpack of
their source without the formats' bookkeeping files, which imagefs hides.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Literal

import pytest

from imagefs.sources import open_image
from tests import builder, oracle
from tests.engines import Containerd, CtrRemote, Dockerd, Podman, Skopeo, TocKind
from tests.images import BuiltImage, Catalog
from tests.mounting import force_unmount, mounted, run_imagefs
from tests.producers import (
    Docker25Release,
    GgcrNames,
    PodmanFormat,
    RegistryImages,
    buildah_commit,
    ctr_remote_export,
    ctr_remote_push,
    docker25_save_by_id,
    docker_save_by_id,
    first_layers,
    ggcr_tarball,
    podman_save,
    skopeo_dir,
    umoci_insert,
)
from tests.test_mount import mount_and_compare

TOC_KINDS: list[Any] = [
    pytest.param("estargz"),
    pytest.param("zstdchunked"),
]


@pytest.fixture(scope="module")
def portable(catalog: Catalog) -> BuiltImage:
    return catalog.image("portable")


@pytest.fixture(scope="module")
def portable_base(portable: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A second image: portable's first two layers (multi-image archives share layers)."""
    return first_layers(portable, 2, tmp_path_factory.mktemp("portable-base"))


@pytest.fixture(scope="module")
def portable_base_oracle(
    portable_base: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> oracle.Oracle:
    bundle = tmp_path_factory.mktemp("portable-base-umoci") / "bundle"
    return oracle.umoci_oracle(portable_base.layout, portable_base.tag, bundle)


def mount_refused(source: str | Path, tmp_path: Path) -> str:
    """``imagefs mount`` must refuse ``source`` with one line; that line.

    A mount that succeeds after all is unmounted before the test fails.
    """
    mountpoint, cache = tmp_path / "refused", tmp_path / "refused.cache"
    mountpoint.mkdir()
    try:
        result = run_imagefs("mount", "--quiet", f"--cache-dir={cache}", source, mountpoint)
    finally:
        force_unmount(mountpoint)
    assert result.returncode == 1, f"mounted, exit {result.returncode}: {result.stderr}"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def config_digest(source: str | Path, *options: str) -> str:
    """``imagefs inspect --json``'s config digest (reads and verifies every layer)."""
    result = run_imagefs("inspect", "--json", *options, source)
    assert result.returncode == 0, result.stderr
    digest: str = json.loads(result.stdout)["config_digest"]
    return digest


def oci_config_digest(image: BuiltImage) -> str:
    digest: str = builder.image_manifest(image.layout, image.tag)["config"]["digest"]
    return digest


# --------------------------------------------------------------------------- podman


@pytest.fixture(scope="module")
def podman_refs(
    podman: Podman,
    registry_images: RegistryImages,
    portable: BuiltImage,
    portable_base: BuiltImage,
) -> tuple[str, str]:
    refs = (registry_images.ref(portable), registry_images.ref(portable_base))
    for ref in refs:
        podman.pull(ref)
    return refs


PODMAN_FORMATS: list[tuple[PodmanFormat, bool, str]] = [
    ("docker-archive", False, ""),
    ("oci-archive", False, ""),
    ("oci-dir", False, ""),
    # Uncompressed layers labelled ...diff.tar.gzip: the bytes decide.
    ("docker-dir", False, "dir:"),
    ("docker-dir", True, ""),
]


@pytest.mark.parametrize(
    "case", PODMAN_FORMATS, ids=[f + ("-compress" if c else "") for f, c, _ in PODMAN_FORMATS]
)
def test_podman_save(
    case: tuple[PodmanFormat, bool, str],
    podman: Podman,
    podman_refs: tuple[str, str],
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    save_format, compress, prefix = case
    out = podman_save(
        podman, tmp_path / "saved", podman_refs[:1], save_format=save_format, compress=compress
    )
    mount_and_compare(f"{prefix}{out}", catalog.oracle("portable"), tmp_path)


def test_podman_save_multi_image(
    podman: Podman,
    podman_refs: tuple[str, str],
    catalog: Catalog,
    portable_base_oracle: oracle.Oracle,
    tmp_path: Path,
) -> None:
    out = podman_save(podman, tmp_path / "multi.tar", podman_refs)
    listed = mount_refused(out, tmp_path)  # lists the images
    assert all(ref in listed for ref in podman_refs), listed
    mount_and_compare(
        f"docker-archive:{out}:{podman_refs[0]}", catalog.oracle("portable"), tmp_path / "a"
    )
    with mounted(out, tmp_path / "b", "--image", podman_refs[1]) as mnt:
        problems = oracle.compare(portable_base_oracle.records, oracle.snapshot(mnt))
    assert problems == [], "\n".join(problems[:40])


def test_buildah_commit(
    podman: Podman, podman_refs: tuple[str, str], skopeo: Skopeo, tmp_path: Path
) -> None:
    """A layer buildah writes (on the image podman pulled: one store), pushed as oci-archive."""
    content = tmp_path / "content"
    (content / "sub").mkdir(parents=True)
    (content / "sub" / "file").write_text("copied by buildah\n")
    (content / "tool").write_bytes(b"#!/bin/sh\n")
    (content / "tool").chmod(0o4755)
    name = buildah_commit(podman, podman_refs[0], content, "localhost/imagefs-test/built:1")
    out = tmp_path / "built.tar"
    podman.buildah("push", name, f"oci-archive:{out}")
    # The oracle is umoci's unpack of the very file.
    skopeo.copy(f"oci-archive:{out}", f"oci:{tmp_path / 'layout'}:built")
    expected = oracle.umoci_oracle(tmp_path / "layout", "built", tmp_path / "bundle")
    assert expected.records["added/tool"].mode == 0o4755
    mount_and_compare(str(out), expected, tmp_path)


# --------------------------------------------------------------------------- skopeo dir:


SKOPEO_DIRS: list[tuple[str, Literal["gzip", "zstd"], Literal["oci", "v2s2"], str]] = [
    ("basic", "gzip", "v2s2", "dir:"),  # a Docker manifest, named with the prefix
    ("edge", "zstd", "oci", ""),  # an OCI manifest, detected by its version file
]


@pytest.mark.parametrize("case", SKOPEO_DIRS, ids=[f"{n}-{c}" for n, c, _, _ in SKOPEO_DIRS])
def test_skopeo_dir(
    case: tuple[str, Literal["gzip", "zstd"], Literal["oci", "v2s2"], str],
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    name, compression, manifest, prefix = case
    image = catalog.image(name)
    out = skopeo_dir(skopeo, image, tmp_path / "dir", compression=compression, manifest=manifest)
    assert set(dir_layer_compressions(out)) == {compression}
    mount_and_compare(f"{prefix}{out}", catalog.oracle(name), tmp_path)


def dir_layer_compressions(directory: Path) -> list[str]:
    """What each layer of a ``dir:`` image is, by its magic bytes."""
    manifest = json.loads((directory / "manifest.json").read_bytes())
    blobs = (directory / layer["digest"].partition(":")[2] for layer in manifest["layers"])
    return [builder.sniff(blob.read_bytes()[:4]) for blob in blobs]


def test_dir_inspect_which_diff(skopeo: Skopeo, catalog: Catalog, tmp_path: Path) -> None:
    """``inspect``, ``which`` and ``diff`` take a ``dir:`` image like any other source."""
    image = catalog.image("basic")
    out = skopeo_dir(skopeo, image, tmp_path / "dir", compression="zstd")
    layout = f"oci:{image.layout}:{image.tag}"
    assert config_digest(f"dir:{out}") == config_digest(layout) == oci_config_digest(image)
    report = json.loads(run_imagefs("inspect", "--json", out).stdout)
    assert report["transport"] == "dir"
    assert {la["compression"] for la in report["layers"]} == {"zstd"}
    which = run_imagefs("which", "--json", f"dir:{out}", "/etc/passwd")
    assert which.returncode == 0, which.stderr
    assert json.loads(which.stdout)["current"]["layer_index"] == 1
    diff = run_imagefs("diff", "--json", layout, f"dir:{out}")
    assert diff.returncode == 0, diff.stderr
    assert json.loads(diff.stdout)["changes"] == []


# --------------------------------------------------------------------------- containerd


@pytest.mark.parametrize("name", ["basic", "edge"])
def test_ctr_images_export(
    name: str,
    containerd: Containerd,
    registry_images: RegistryImages,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    ref = registry_images.ref(catalog.image(name))
    containerd.fetch(ref)
    out = containerd.export(tmp_path / "export.tar", ref)
    mount_and_compare(str(out), catalog.oracle(name), tmp_path)


def test_ctr_images_export_several(
    containerd: Containerd,
    registry_images: RegistryImages,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    refs = [registry_images.ref(catalog.image(name)) for name in ("basic", "portable")]
    for ref in refs:
        containerd.fetch(ref)
    out = containerd.export(tmp_path / "export.tar", *refs)
    listed = mount_refused(out, tmp_path)  # lists the images
    assert all(ref in listed for ref in refs), listed
    for name, ref in zip(("basic", "portable"), refs, strict=True):
        mount_and_compare(f"{out}:{ref}", catalog.oracle(name), tmp_path / name)


@pytest.fixture(scope="module")
def basic_in_containerd(
    containerd: Containerd, registry_images: RegistryImages, catalog: Catalog
) -> str:
    """basic in containerd's content store: ctr-remote 0.12 converts it (not edge, whose
    sparse file it fails on: 'error copying "sparse/disk.img": unexpected EOF')."""
    ref = registry_images.ref(catalog.image("basic"))
    containerd.fetch(ref)
    return ref


@pytest.mark.parametrize("kind", TOC_KINDS)
def test_ctr_remote_exported(
    kind: TocKind,
    ctr_remote: CtrRemote,
    basic_in_containerd: str,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    out = ctr_remote_export(ctr_remote, basic_in_containerd, kind, tmp_path / f"{kind}.tar")
    mount_and_compare(str(out), catalog.oracle("basic"), tmp_path)


@pytest.mark.parametrize("kind", TOC_KINDS)
def test_ctr_remote_from_registry(
    kind: TocKind,
    ctr_remote: CtrRemote,
    basic_in_containerd: str,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    pushed = ctr_remote_push(ctr_remote, basic_in_containerd, kind)
    mount_and_compare(f"docker://{pushed}", catalog.oracle("basic"), tmp_path)


# --------------------------------------------------------------------------- docker


@pytest.fixture(scope="module")
def docker_names(
    dockerd: Dockerd,
    registry_images: RegistryImages,
    portable: BuiltImage,
    portable_base: BuiltImage,
) -> tuple[str, str]:
    """Tags in Docker: portable as ``portable:v1`` (an official image's kind of name),
    its base as ``imagefs-test/base:2``."""
    names = ("portable:v1", "imagefs-test/base:2")
    for image, name in zip((portable, portable_base), names, strict=True):
        ref = registry_images.ref(image)
        dockerd.pull(ref)
        dockerd.docker("tag", ref, name)
    return names


def test_docker_save_by_tag(
    dockerd: Dockerd, docker_names: tuple[str, str], catalog: Catalog, tmp_path: Path
) -> None:
    out = dockerd.save(tmp_path / "saved.tar", docker_names[0])
    mount_and_compare(str(out), catalog.oracle("portable"), tmp_path)


def test_docker_save_several(
    dockerd: Dockerd,
    docker_names: tuple[str, str],
    *,
    catalog: Catalog,
    portable: BuiltImage,
    portable_base: BuiltImage,
    portable_base_oracle: oracle.Oracle,
    tmp_path: Path,
) -> None:
    out = dockerd.save(tmp_path / "several.tar", *docker_names)
    listed = mount_refused(out, tmp_path)  # lists the images
    assert all(name in listed for name in docker_names), listed
    mount_and_compare(f"{out}:{docker_names[0]}", catalog.oracle("portable"), tmp_path / "a")
    with mounted(out, tmp_path / "b", "--image", "docker.io/imagefs-test/base:2") as mnt:
        problems = oracle.compare(portable_base_oracle.records, oracle.snapshot(mnt))
    assert problems == [], "\n".join(problems[:40])
    # Every spelling docker itself would take for these images.
    portable_id, base_id = oci_config_digest(portable), oci_config_digest(portable_base)
    spellings = {
        "portable:v1": portable_id,
        "library/portable:v1": portable_id,
        "docker.io/library/portable:v1": portable_id,
        "index.docker.io/library/portable:v1": portable_id,
        "imagefs-test/base:2": base_id,
        "index.docker.io/imagefs-test/base:2": base_id,
        portable_id: portable_id,
        portable_id.removeprefix("sha256:")[:12]: portable_id,
    }
    # @N counts in manifest.json's order (a Go map's: it varies between saves).
    with tarfile.open(out) as tf:
        manifest = tf.extractfile("manifest.json")
        assert manifest is not None
        entries = json.load(manifest)
    for n, entry in enumerate(entries):
        spellings[f"@{n}"] = "sha256:" + entry["Config"].removesuffix(".json")
    # Selection is the source's job: open_image answers without reading the layers.
    for spelling, expected in spellings.items():
        assert open_image(str(out), image=spelling).config_digest == expected, spelling
    refused = run_imagefs("inspect", "--image", "portable", str(out))  # portable:latest
    assert refused.returncode == 1 and "no image named 'portable'" in refused.stderr


def test_docker_save_by_id(
    dockerd: Dockerd, docker_names: tuple[str, str], catalog: Catalog, tmp_path: Path
) -> None:
    out = docker_save_by_id(dockerd, docker_names[0], tmp_path / "by-id.tar")
    mount_and_compare(str(out), catalog.oracle("portable"), tmp_path)


# --------------------------------------------------------------------------- crafted shapes


@pytest.mark.parametrize(
    ("compression", "names"),
    [
        pytest.param("gzip", "legacy"),
        pytest.param("zstd", "legacy"),
        pytest.param("zstd", "v0.21.8"),
    ],
)
def test_ggcr_tarball(
    compression: Literal["gzip", "zstd"], names: GgcrNames, catalog: Catalog, tmp_path: Path
) -> None:
    image = catalog.image("basic")
    out = ggcr_tarball(
        image,
        tmp_path / "ggcr.tar",
        "index.docker.io/imagefs-test/basic:ggcr",
        compression=compression,
        names=names,
    )
    mount_and_compare(
        f"docker-archive:{out}:imagefs-test/basic:ggcr", catalog.oracle("basic"), tmp_path
    )


def test_ggcr_tarball_with_a_wrong_diff_id_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    """A layer swapped for another (renamed after its own blob): its diff_id no longer holds."""
    image = catalog.image("basic")
    tars = list(builder.layer_tars(image.layout, image.tag))
    swapped = [*tars[:-1], tars[0]]
    out = ggcr_tarball(image, tmp_path / "ggcr.tar", "x:1", compression="gzip", layers=swapped)
    error = mount_refused(out, tmp_path)
    expected, found = builder.sha256_digest(tars[-1]), builder.sha256_digest(tars[0])
    assert expected in error and found in error and "uncompressed" in error, error


@pytest.mark.parametrize(("release", "name"), [("25.0.2", "basic"), ("25.0.3", "edge")])
def test_docker25_save_by_id(
    release: Docker25Release, name: str, catalog: Catalog, tmp_path: Path
) -> None:
    image = catalog.image(name)
    out = docker25_save_by_id(image, tmp_path / "by-id.tar", release=release)
    mount_and_compare(str(out), catalog.oracle(name), tmp_path)
    short_id = oci_config_digest(image).removeprefix("sha256:")[:12]
    assert config_digest(out, "--image", short_id) == oci_config_digest(image)


def test_docker25_save_by_id_with_a_swapped_layer_is_refused(
    catalog: Catalog, tmp_path: Path
) -> None:
    """Nothing but the config's diff_ids vouches for the layers of a save whose index is empty."""
    image = catalog.image("basic")
    tars = list(builder.layer_tars(image.layout, image.tag))
    out = docker25_save_by_id(
        image, tmp_path / "by-id.tar", release="25.0.2", layers=[*tars[:-1], tars[0]]
    )
    assert builder.sha256_digest(tars[-1]) in mount_refused(out, tmp_path)


def test_umoci_insert(catalog: Catalog, tmp_path: Path) -> None:
    inserted = umoci_insert(catalog.image("basic"), tmp_path)
    expected = oracle.umoci_oracle(inserted.layout, inserted.tag, tmp_path / "bundle")
    assert "inserted/sub/file" in expected.records
    mount_and_compare(f"oci:{inserted.layout}:{inserted.tag}", expected, tmp_path)


def test_umoci_insert_with_data_cut_short_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    """The guard beside the padding fix: a member whose *data* is cut short stays an error."""
    inserted = umoci_insert(catalog.image("basic"), tmp_path)
    tars = list(builder.layer_tars(inserted.layout, inserted.tag))
    name, data_offset, size = last_member(tars[-1])
    assert size > 1
    cut = tars[-1][: data_offset + size // 2]
    layout = builder.write_oci_layout(tmp_path / "cut", [*tars[:-1], cut], tag="cut")
    error = mount_refused(f"oci:{layout}:cut", tmp_path)
    assert name in error and "truncated" in error, error


def last_member(tar: bytes) -> tuple[str, int, int]:
    """(name, data offset, size) of a tar stream's last member, read header by header.

    Python's tarfile refuses a stream cut inside the padding, as umoci's are.
    """
    offset, found = 0, ("", 0, 0)
    while offset + 512 <= len(tar) and tar[offset : offset + 512].strip(b"\0"):
        header = tar[offset : offset + 512]
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        found = (header[:100].rstrip(b"\0").decode(), offset + 512, size)
        offset += 512 + -(-size // 512) * 512
    return found
