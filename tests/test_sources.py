"""imagefs.sources: every local source shape, built for real, and every error path.

Images come from two places: umoci + skopeo (real tools writing real
layouts, oci-archives and docker-archives), and small hand-written OCI
layouts / outer tars (the Docker 25+ and containerd export shapes, which no
local tool writes, and the corrupt inputs). Every test checks that each
layer's BlobRange holds bytes hashing to the layer's descriptor digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from imagefs.errors import (
    BlobMissingError,
    DigestMismatchError,
    ManifestError,
    MediaTypeError,
    PlatformError,
    SourceError,
    SourceNotFoundError,
    UsageError,
)
from imagefs.image import BlobRange, Image, Platform
from imagefs.sources import host_platform, is_local_source, open_image, parse_platform
from imagefs.sources.names import normalize_name
from imagefs.sources.platform import match_rank
from imagefs.sources.spec import parse_source
from imagefs.sources.tarmembers import TarMembers
from tests.engines import Skopeo
from tests.needs import require_tools

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

HOST = host_platform()
AMD64 = Platform("linux", "amd64")
# A platform that is certainly not this machine's.
OTHER = Platform("linux", "s390x") if HOST.architecture != "s390x" else Platform("linux", "ppc64le")


# --------------------------------------------------------------------------- helpers


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hexof(digest: str) -> str:
    return digest.partition(":")[2]


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            return reader.read()
    return data


def read_range(rng: BlobRange) -> bytes:
    with open(rng.path, "rb") as f:
        f.seek(rng.offset)
        return f.read(rng.length)


def same(a: Image, b: Image) -> None:
    """The same image (``source`` differs when named differently)."""
    assert (a.transport, a.manifest_digest, a.config_digest) == (
        b.transport,
        b.manifest_digest,
        b.config_digest,
    )
    assert (a.layers, a.platform, a.config) == (b.layers, b.platform, b.config)


def check_layers(image: Image) -> None:
    """Each BlobRange holds the descriptor's bytes; uncompressed, they are the diff_id."""
    assert image.layers
    diff_ids = image.config["rootfs"]["diff_ids"]
    assert [layer.diff_id for layer in image.layers] == diff_ids
    for layer in image.layers:
        data = read_range(layer.blob)
        assert os.path.isabs(layer.blob.path)
        assert len(data) == layer.descriptor.size == layer.blob.length
        assert sha256(data) == layer.descriptor.digest
        assert sha256(decompress(data)) == layer.diff_id


def layer_contents(image: Image) -> list[set[str]]:
    out = []
    for layer in image.layers:
        with tarfile.open(fileobj=io.BytesIO(decompress(read_range(layer.blob)))) as tf:
            out.append({m.name.removeprefix("./") for m in tf.getmembers()} - {"."})
    return out


def to_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Layout:
    """A hand-written OCI image layout (image-spec image-layout.md)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_bytes(to_json({"imageLayoutVersion": "1.0.0"}))
        self.write_index([])

    def path(self, desc: dict[str, Any]) -> Path:
        alg, _, hexd = str(desc["digest"]).partition(":")
        return self.root / "blobs" / alg / hexd

    def blob(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / hexof(digest)).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def json_blob(self, obj: Any, media_type: str, **extra: Any) -> dict[str, Any]:
        return self.blob(to_json(obj), media_type, **extra)

    def read(self, desc: dict[str, Any]) -> Any:
        return json.loads(self.path(desc).read_bytes())

    def image(
        self,
        layers: list[bytes],
        compressions: list[str] | None = None,
        platform: Platform = AMD64,
        config_extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write config, layers and manifest; return the manifest descriptor."""
        compressions = compressions or ["gzip"] * len(layers)
        config: dict[str, Any] = {
            "architecture": platform.architecture,
            "os": platform.os,
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(la) for la in layers]},
            **(config_extra or {}),
        }
        if platform.variant:
            config["variant"] = platform.variant
        layer_descs = [
            self.blob(compress(la, c), LAYER_TYPES[c])
            for la, c in zip(layers, compressions, strict=True)
        ]
        return self.manifest(self.json_blob(config, OCI_CONFIG), layer_descs)

    def manifest(
        self, config: dict[str, Any], layers: list[dict[str, Any]], **fields: Any
    ) -> dict[str, Any]:
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
        return self.json_blob({**doc, **fields}, OCI_MANIFEST)

    def index(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.json_blob(doc, OCI_INDEX)

    def write_index(self, entries: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        (self.root / "index.json").write_bytes(to_json(doc))

    def files(self) -> list[tuple[str, bytes]]:
        """Every file of the layout, blobs first (for building outer tars)."""
        blobs = sorted((self.root / "blobs" / "sha256").iterdir())
        out = [(f"blobs/sha256/{p.name}", p.read_bytes()) for p in blobs]
        out += [(n, (self.root / n).read_bytes()) for n in ("oci-layout", "index.json")]
        return out


def tagged(desc: dict[str, Any], tag: str, full_name: str | None = None) -> dict[str, Any]:
    annotations = {REF_NAME: tag}
    if full_name:
        annotations[CONTAINERD_NAME] = full_name
    return {**desc, "annotations": annotations}


def with_platform(desc: dict[str, Any], p: Platform, **extra: Any) -> dict[str, Any]:
    obj = {"os": p.os, "architecture": p.architecture}
    if p.variant:
        obj["variant"] = p.variant
    return {**desc, "platform": obj, **extra}


@dataclass(frozen=True)
class Link:
    kind: str  # "symlink" or "hardlink"
    target: str


def write_tar(out: Path, members: list[tuple[str, bytes | Link]]) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, Link):
                info.type = tarfile.SYMTYPE if data.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = data.target
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out


def run(*cmd: str | Path) -> None:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, check=False)
    assert result.returncode == 0, f"{cmd}: {result.stderr.decode(errors='replace')}"


LAYER1 = layer_tar({"etc/hello": b"hello\n", "bin/sh": b"#!fake\n"})
LAYER2 = layer_tar({"etc/second": b"2\n"})
LAYER3 = layer_tar({"usr/third": b"3" * 3000})


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Layout, dict[str, Any]]:
    """A layout with one two-layer image tagged v1."""
    lay = Layout(tmp_path / "layout")
    mdesc = lay.image([LAYER1, LAYER2])
    lay.write_index([tagged(mdesc, "v1")])
    return lay, mdesc


# --------------------------------------------------------------------------- real tools


def _umoci(*args: str | Path) -> None:
    rootless = () if os.geteuid() == 0 else ("--rootless",)
    if args[0] in ("unpack", "repack"):
        run("umoci", args[0], *rootless, *args[1:])
    else:
        run("umoci", *args)


def _skopeo(src: str, dst: str) -> None:
    Skopeo().copy(src, dst)


@pytest.fixture(scope="session")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A umoci-built layout: ``t`` (two layers, the second with a whiteout) and ``t2``."""
    require_tools("umoci", "skopeo")
    base = tmp_path_factory.mktemp("umoci")
    lay = base / "layout"
    _umoci("init", "--layout", lay)
    _umoci("new", "--image", f"{lay}:t")
    _umoci("unpack", "--image", f"{lay}:t", base / "b1")
    rootfs = base / "b1" / "rootfs"
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "hello").write_text("hello\n")
    (rootfs / "etc" / "gone").write_text("soon deleted\n")
    _umoci("repack", "--refresh-bundle", "--image", f"{lay}:t", base / "b1")
    (rootfs / "etc" / "gone").unlink()
    (rootfs / "second").write_text("2\n")
    _umoci("repack", "--image", f"{lay}:t", base / "b1")
    _umoci("new", "--image", f"{lay}:t2")
    _umoci("unpack", "--image", f"{lay}:t2", base / "b2")
    (base / "b2" / "rootfs" / "other").write_text("other image\n")
    _umoci("repack", "--image", f"{lay}:t2", base / "b2")
    return lay


@pytest.mark.tools
def test_umoci_layout(umoci_layout: Path) -> None:
    image = open_image(f"{umoci_layout}:t")
    assert image.transport == "oci"
    assert image.source == f"{umoci_layout}:t"
    assert image.platform is not None
    assert (image.platform.os, image.platform.architecture) == (HOST.os, HOST.architecture)
    assert len(image.layers) == 2
    check_layers(image)
    assert image.layers[0].descriptor.media_type == LAYER_TYPES["gzip"]
    first, second = layer_contents(image)
    assert "etc/hello" in first
    assert {"second", "etc/.wh.gone"} <= second
    assert image.manifest_digest is not None
    manifest = json.loads(read_blob_file(umoci_layout, image.manifest_digest))
    assert manifest["config"]["digest"] == image.config_digest
    # Same through the explicit transport and the image= keyword.
    same(open_image(f"oci:{umoci_layout}", image="t"), image)


def read_blob_file(layout_dir: Path, digest: str) -> bytes:
    alg, _, hexd = digest.partition(":")
    return (layout_dir / "blobs" / alg / hexd).read_bytes()


@pytest.mark.tools
def test_umoci_layout_several_images_need_a_tag(umoci_layout: Path) -> None:
    with pytest.raises(SourceError, match=r"several images: t, t2") as exc:
        open_image(str(umoci_layout))
    assert str(umoci_layout) in str(exc.value)
    assert layer_contents(open_image(str(umoci_layout), image="t2")) == [{"other"}]
    with pytest.raises(SourceNotFoundError, match=r"no image named 'nope'; available: t, t2"):
        open_image(f"{umoci_layout}:nope")


@pytest.mark.tools
def test_skopeo_oci_archive(umoci_layout: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.tar"
    _skopeo(f"oci:{umoci_layout}:t", f"oci-archive:{out}:t")
    reference = open_image(f"{umoci_layout}:t")
    for source in (str(out), f"oci-archive:{out}", f"{out}:t", f"oci-archive:{out}:t"):
        image = open_image(source)
        assert image.transport == "oci-archive"
        assert image.layers[0].blob.path == str(out)
        assert image.layers[0].blob.offset > 0
        check_layers(image)
        assert image.manifest_digest == reference.manifest_digest
        assert image.config_digest == reference.config_digest
        assert [la.descriptor for la in image.layers] == [la.descriptor for la in reference.layers]


@pytest.mark.tools
def test_skopeo_docker_archive(umoci_layout: Path, tmp_path: Path) -> None:
    """skopeo's legacy shape: ``<diffid>.tar`` layers, ``<id>/layer.tar`` symlinks."""
    out = tmp_path / "d.tar"
    _skopeo(f"oci:{umoci_layout}:t", f"docker-archive:{out}:example/app:1.0")
    reference = open_image(f"{umoci_layout}:t")
    image = open_image(str(out))
    assert image.transport == "docker-archive"
    assert image.manifest_digest is None
    assert image.config_digest == reference.config_digest
    assert image.platform == reference.platform
    check_layers(image)
    for layer in image.layers:
        assert layer.descriptor.media_type == DOCKER_LAYER_TAR
        assert layer.descriptor.digest == layer.diff_id
    assert layer_contents(image) == layer_contents(reference)
    # RepoTags is "docker.io/example/app:1.0": short and full names both select it.
    for name in ("example/app:1.0", "docker.io/example/app:1.0", "index.docker.io/example/app:1.0"):
        same(open_image(str(out), image=name), image)
    same(open_image(f"docker-archive:{out}:example/app:1.0"), image)
    same(open_image(f"{out}:@0"), image)
    with pytest.raises(SourceNotFoundError, match=r"no image named 'example/app:2'"):
        open_image(str(out), image="example/app:2")

    # Point manifest.json at the "<id>/layer.tar" symlink members, as docker's
    # own legacy archives name layers: they resolve to the same bytes.
    with tarfile.open(out) as tf:
        symlinks = {m.name: m.linkname for m in tf.getmembers() if m.issym()}
        members: list[tuple[str, bytes | Link]] = []
        manifest: list[dict[str, Any]] = []
        for m in tf.getmembers():
            if m.name == "manifest.json":
                manifest = json.loads(tf.extractfile(m).read())  # type: ignore[union-attr]
            elif m.issym():
                members.append((m.name, Link("symlink", m.linkname)))
            elif m.isfile():
                members.append((m.name, tf.extractfile(m).read()))  # type: ignore[union-attr]
    by_target = {os.path.basename(t): n for n, t in symlinks.items()}
    manifest[0]["Layers"] = [by_target[p] for p in manifest[0]["Layers"]]
    assert all(p.endswith("/layer.tar") for p in manifest[0]["Layers"])
    linked = write_tar(tmp_path / "linked.tar", [*members, ("manifest.json", to_json(manifest))])
    relinked = open_image(str(linked))
    assert [la.blob.offset for la in relinked.layers] == [la.blob.offset for la in image.layers]
    check_layers(relinked)


# --------------------------------------------------------------------------- docker save shapes


def legacy_archive(
    out: Path, images: list[tuple[list[bytes], list[str]]], link: str | None = None
) -> Path:
    """Legacy ``docker save``: ``<id>/layer.tar``, ``<config-sha256>.json``, manifest.json.

    With ``link``, layers are stored as ``<diffid>.tar`` and ``<id>/layer.tar``
    is a symlink or hardlink member pointing at it.
    """
    members: list[tuple[str, bytes | Link]] = []
    manifest = []
    for layers, tags in images:
        config = to_json(
            {
                "architecture": "arm64",
                "variant": "v8",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [sha256(la) for la in layers]},
            }
        )
        paths = []
        for la in layers:
            layer_id = hashlib.sha256(b"id" + la).hexdigest()
            path = f"{layer_id}/layer.tar"
            if link is None:
                members.append((path, la))
            else:
                stored = f"{hexof(sha256(la))}.tar"
                members.append((stored, la))
                target = f"../{stored}" if link == "symlink" else stored
                members.append((path, Link(link, target)))
            paths.append(path)
        members.append((f"{hexof(sha256(config))}.json", config))
        manifest.append(
            {"Config": f"{hexof(sha256(config))}.json", "RepoTags": tags, "Layers": paths}
        )
    members.append(("manifest.json", to_json(manifest)))
    return write_tar(out, members)


@pytest.mark.parametrize("link", [None, "symlink", "hardlink"])
def test_legacy_docker_archive(tmp_path: Path, link: str | None) -> None:
    out = legacy_archive(tmp_path / "legacy.tar", [([LAYER1, LAYER2], ["alpine:3"])], link)
    image = open_image(str(out))
    assert image.transport == "docker-archive"
    assert image.platform == Platform("linux", "arm64", "v8")
    assert image.config_digest == sha256(read_range(image_config_range(out, image)))
    check_layers(image)
    assert [la.descriptor.size for la in image.layers] == [len(LAYER1), len(LAYER2)]
    # Docker normalisation: RepoTags "alpine:3" is docker.io/library/alpine:3.
    same(open_image(str(out), image="docker.io/library/alpine:3"), image)
    same(open_image(f"docker-archive:{out}:library/alpine:3"), image)


def image_config_range(tar: Path, image: Image) -> BlobRange:
    member = TarMembers.index(str(tar)).resolve(f"{hexof(image.config_digest)}.json")
    assert member is not None
    return BlobRange(str(tar), member.offset, member.size)


def test_legacy_multi_image_selection(tmp_path: Path) -> None:
    out = legacy_archive(
        tmp_path / "multi.tar",
        [
            ([LAYER1], ["a:1", "a:latest"]),
            ([LAYER1, LAYER3], ["registry.local:5000/b:2"]),
            ([LAYER2], []),
        ],
    )
    with pytest.raises(
        SourceError, match=r"several images: a:1, a:latest; registry.local:5000/b:2; untagged"
    ) as exc:
        open_image(str(out))
    assert str(out) in str(exc.value)
    assert len(open_image(str(out), image="a").layers) == 1  # "a" means a:latest
    b = open_image(f"{out}:registry.local:5000/b:2")  # colons inside the reference
    assert len(b.layers) == 2
    check_layers(b)
    assert open_image(str(out), image="@2").layers[0].diff_id == sha256(LAYER2)
    with pytest.raises(SourceNotFoundError, match=r"no image named 'b:2'"):
        open_image(str(out), image="b:2")  # docker.io/library/b:2 is another image
    with pytest.raises(SourceNotFoundError, match=r"no image @7"):
        open_image(str(out), image="@7")
    with pytest.raises(UsageError, match="--image"):
        open_image(f"{out}:a:1", image="a:latest")


def docker25_archive(
    tmp_path: Path, name: str = "example/app:1.0"
) -> tuple[Path, Layout, dict[str, Any]]:
    """Docker 25+ ``docker save``: an OCI layout with uncompressed blobs plus manifest.json."""
    lay = Layout(tmp_path / "d25")
    mdesc = lay.image([LAYER1, LAYER2], ["none", "none"])
    manifest = lay.read(mdesc)
    repo, _, tag = name.rpartition(":")
    lay.write_index([tagged(mdesc, tag, f"docker.io/{repo}:{tag}")])
    entry = {
        "Config": f"blobs/sha256/{hexof(manifest['config']['digest'])}",
        "RepoTags": [name],
        "Layers": [f"blobs/sha256/{hexof(la['digest'])}" for la in manifest["layers"]],
    }
    members: list[tuple[str, bytes | Link]] = [*lay.files(), ("manifest.json", to_json([entry]))]
    members.append(("repositories", to_json({repo: {tag: hexof(sha256(LAYER2))}})))
    return write_tar(tmp_path / "d25.tar", members), lay, mdesc


def test_docker25_archive(tmp_path: Path) -> None:
    out, _, mdesc = docker25_archive(tmp_path)
    image = open_image(str(out))
    assert image.transport == "docker-archive"
    # Resolved through the OCI manifest: its digest and media types are known.
    assert image.manifest_digest == mdesc["digest"]
    assert [la.descriptor.media_type for la in image.layers] == [LAYER_TYPES["none"]] * 2
    check_layers(image)
    same(open_image(str(out), image="docker.io/example/app:1.0"), image)
    # The same tar read as an OCI archive: tags from index.json annotations.
    as_oci = open_image(f"oci-archive:{out}")
    assert as_oci.transport == "oci-archive"
    assert as_oci.layers == image.layers
    assert open_image(f"oci-archive:{out}:1.0").layers == image.layers
    assert open_image(f"oci-archive:{out}:example/app:1.0").layers == image.layers


def test_docker25_archive_with_dot_slash_names(tmp_path: Path) -> None:
    """``tar -C dir -cf x.tar .`` prefixes every member with ``./``."""
    out, _, _ = docker25_archive(tmp_path)
    with tarfile.open(out) as tf:
        members: list[tuple[str, bytes | Link]] = [
            ("./" + m.name, tf.extractfile(m).read())  # type: ignore[union-attr]
            for m in tf.getmembers()
        ]
    image = open_image(str(write_tar(tmp_path / "dot.tar", members)))
    check_layers(image)


def containerd_archive(
    tmp_path: Path,
    *,
    drop_layer: bool = False,
    keep_other: bool = False,
    name: str = "docker.io/library/busy:1",
) -> tuple[Path, dict[str, Any]]:
    """containerd image-store export: compressed blobs, a multi-platform index
    whose other platform's blobs are absent, an attestation manifest, and
    manifest.json after the blobs. Returns the tar and the host manifest descriptor.
    """
    lay = Layout(tmp_path / "ctr")
    mine = lay.image([LAYER1, LAYER2, LAYER3], ["gzip", "zstd", "gzip"], platform=HOST)
    theirs = lay.image([LAYER3], ["gzip"], platform=OTHER)
    attestation_config = lay.json_blob({"architecture": "unknown", "os": "unknown"}, OCI_CONFIG)
    attestation = lay.manifest(
        attestation_config, [lay.blob(b"{}", "application/vnd.in-toto+json")]
    )
    index = lay.index(
        [
            with_platform(theirs, OTHER),
            with_platform(mine, HOST),
            with_platform(
                attestation,
                Platform("unknown", "unknown"),
                annotations={
                    "vnd.docker.reference.type": "attestation-manifest",
                    "vnd.docker.reference.digest": mine["digest"],
                },
            ),
        ]
    )
    lay.write_index([tagged(index, name.rpartition(":")[2], name)])
    # Only this platform was exported: the other one's manifest, config and layers are absent.
    theirs_manifest = lay.read(theirs)
    for desc in (theirs, theirs_manifest["config"], *theirs_manifest["layers"]):
        if not keep_other and desc["digest"] not in {
            la["digest"] for la in lay.read(mine)["layers"]
        }:
            lay.path(desc).unlink()
    manifest = lay.read(mine)
    if drop_layer:
        lay.path(manifest["layers"][1]).unlink()
    entry = {
        "Config": f"blobs/sha256/{hexof(manifest['config']['digest'])}",
        "RepoTags": [name],
        "Layers": [f"blobs/sha256/{hexof(la['digest'])}" for la in manifest["layers"]],
    }
    members: list[tuple[str, bytes | Link]] = [*lay.files(), ("manifest.json", to_json([entry]))]
    return write_tar(tmp_path / "ctr.tar", members), mine


def test_containerd_archive(tmp_path: Path) -> None:
    out, mine = containerd_archive(tmp_path)
    names = TarMembers.index(str(out)).names()
    assert names[-1] == "manifest.json"
    image = open_image(str(out))
    assert image.transport == "docker-archive"
    assert image.manifest_digest == mine["digest"]
    assert image.platform == HOST
    assert [la.descriptor.media_type for la in image.layers] == [
        LAYER_TYPES["gzip"],
        LAYER_TYPES["zstd"],
        LAYER_TYPES["gzip"],
    ]
    check_layers(image)
    # "busy:1" is docker.io/library/busy:1.
    same(open_image(str(out), image="busy:1"), image)
    # As an OCI archive: the index selects the host's platform, skipping the
    # attestation; the other platform's blobs are absent.
    as_oci = open_image(f"oci-archive:{out}")
    assert as_oci.layers == image.layers
    with pytest.raises(BlobMissingError, match=r"manifest blob sha256:[0-9a-f]{64} is missing"):
        open_image(f"oci-archive:{out}", platform=OTHER)
    with pytest.raises(PlatformError, match=rf"available: (?=.*{HOST})(?=.*{OTHER})") as exc:
        open_image(f"oci-archive:{out}", platform=Platform("linux", "mips64le"))
    assert "unknown" not in str(exc.value)
    # Through manifest.json, asking for the absent platform explicitly.
    with pytest.raises(BlobMissingError, match=r"manifest blob sha256:[0-9a-f]{64} is missing"):
        open_image(str(out), platform=OTHER)
    with pytest.raises(PlatformError, match=r"no manifest for platform linux/mips64le"):
        open_image(str(out), platform=Platform("linux", "mips64le"))
    same(open_image(str(out), platform=HOST), image)


def test_containerd_archive_other_platform(tmp_path: Path) -> None:
    """Both platforms exported: an explicit platform goes through the OCI index."""
    out, mine = containerd_archive(tmp_path, keep_other=True)
    image = open_image(str(out), platform=OTHER)
    assert image.transport == "docker-archive"
    assert image.platform == OTHER
    assert image.manifest_digest != mine["digest"]
    check_layers(image)
    assert open_image(str(out)).manifest_digest == mine["digest"]
    assert open_image(f"{out}:busy:1", platform=OTHER).manifest_digest == image.manifest_digest


def test_legacy_archive_ignores_platform(tmp_path: Path) -> None:
    """A legacy archive holds one config per image: an explicit platform cannot choose."""
    out = legacy_archive(tmp_path / "legacy.tar", [([LAYER1], ["a:1"])])
    image = open_image(str(out), platform=parse_platform("linux/riscv64"))
    assert image.platform == Platform("linux", "arm64", "v8")


def test_containerd_archive_missing_layer(tmp_path: Path) -> None:
    out, mine = containerd_archive(tmp_path, drop_layer=True)
    missing = json.loads(
        (tmp_path / "ctr" / "blobs" / "sha256" / hexof(mine["digest"])).read_bytes()
    )["layers"][1]["digest"]
    with pytest.raises(BlobMissingError, match=f"layer blob {missing} is missing"):
        open_image(str(out))
    with pytest.raises(BlobMissingError, match=f"layer blob {missing} is missing"):
        open_image(f"oci-archive:{out}")


# --------------------------------------------------------------------------- platforms


def test_platform_selection_in_layout(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "multi")
    platforms = [
        Platform("linux", "amd64"),
        Platform("linux", "arm64", "v8"),
        Platform("linux", "arm", "v6"),
        Platform("linux", "arm", "v7"),
        Platform("windows", "amd64"),
    ]
    if HOST not in platforms:
        platforms.append(HOST)
    entries = [with_platform(lay.image([LAYER1], platform=p), p) for p in platforms]
    unknown = Platform("unknown", "unknown")
    attestation = with_platform(lay.image([LAYER2], platform=unknown), unknown)
    index = lay.index([attestation, *entries])
    lay.write_index([tagged(index, "latest")])

    def pick(p: Platform | None) -> Platform | None:
        image = open_image(str(lay.root), platform=p)
        check_layers(image)
        return image.platform

    assert pick(None) == HOST
    assert pick(parse_platform("linux/amd64")) == Platform("linux", "amd64")
    assert pick(parse_platform("linux/x86_64")) == Platform("linux", "amd64")
    # arm64 and arm64/v8 are the same platform (containerd normalisation).
    assert pick(parse_platform("linux/arm64")) == Platform("linux", "arm64", "v8")
    assert pick(parse_platform("linux/arm/v7")) == Platform("linux", "arm", "v7")
    assert pick(parse_platform("linux/arm")) == Platform("linux", "arm", "v7")
    assert pick(parse_platform("windows/amd64")) == Platform("windows", "amd64")
    # arm/v8 runs arm/v7 (the newest compatible variant).
    assert pick(parse_platform("linux/arm/v8")) == Platform("linux", "arm", "v7")
    with pytest.raises(PlatformError) as exc:
        open_image(str(lay.root), platform=parse_platform("linux/riscv64"))
    message = str(exc.value)
    assert "no manifest for platform linux/riscv64" in message
    assert "available: " + ", ".join(sorted(str(p) for p in platforms)) in message
    assert "unknown/unknown" not in message
    assert str(index["digest"].partition(":")[2]) in message  # names the index blob


def test_platform_list_directly_in_index_json(tmp_path: Path) -> None:
    """Some tools list per-platform manifests (untagged) straight in index.json."""
    lay = Layout(tmp_path / "flat")
    a = lay.image([LAYER1], platform=HOST)
    b = lay.image([LAYER2], platform=OTHER)
    lay.write_index([with_platform(b, OTHER), with_platform(a, HOST)])
    assert open_image(str(lay.root)).manifest_digest == a["digest"]
    assert open_image(str(lay.root), platform=OTHER).manifest_digest == b["digest"]


def test_single_manifest_ignores_platform(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "one")
    mdesc = lay.image([LAYER1], platform=OTHER)
    lay.write_index([mdesc])
    image = open_image(str(lay.root), platform=HOST)
    assert image.platform == OTHER
    assert image.manifest_digest == mdesc["digest"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
        ("linux/arm64/8", Platform("linux", "arm64", "v8")),
        ("linux/arm/7", Platform("linux", "arm", "v7")),
        ("linux/arm", Platform("linux", "arm")),
        ("Linux/AMD64", Platform("linux", "amd64")),
        ("linux/386", Platform("linux", "386")),
    ],
)
def test_parse_platform(text: str, expected: Platform) -> None:
    assert parse_platform(text) == expected


@pytest.mark.parametrize(
    "text", ["", "linux", "linux/", "/amd64", "linux//v8", "linux/amd64/v1/x", "linux/am d64"]
)
def test_parse_platform_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="invalid platform"):
        parse_platform(text)


def test_host_platform() -> None:
    assert HOST.os == "linux"
    expected = {"x86_64": ("amd64", ""), "aarch64": ("arm64", "v8")}.get(os.uname().machine)
    if expected:
        assert (HOST.architecture, HOST.variant) == expected
    assert match_rank(HOST, HOST) is not None


def test_match_rank() -> None:
    p = parse_platform
    assert match_rank(p("linux/arm64"), p("linux/arm64/v8")) == match_rank(HOST, HOST)
    assert match_rank(p("linux/arm/v6"), p("linux/arm/v7")) is not None
    assert match_rank(p("linux/arm/v7"), p("linux/arm/v6")) is None
    assert match_rank(p("linux/amd64"), p("linux/arm64")) is None
    assert match_rank(p("windows/amd64"), p("linux/amd64")) is None
    assert match_rank(Platform("linux", "amd64", "v2"), p("linux/amd64")) is None


# --------------------------------------------------------------------------- names and specs


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3", "docker.io/library/alpine:3"),
        ("docker.io/library/alpine:3", "docker.io/library/alpine:3"),
        ("index.docker.io/alpine:3", "docker.io/library/alpine:3"),
        ("user/app:1", "docker.io/user/app:1"),
        ("localhost/app", "localhost/app:latest"),
        ("reg.io:5000/a/b:c", "reg.io:5000/a/b:c"),
        (f"a@sha256:{'0' * 64}", f"docker.io/library/a@sha256:{'0' * 64}"),
        ("Upper/x:1", "Upper/x:1"),
        ("UPPER:1", None),
        ("a:b:c", None),
        ("", None),
    ],
)
def test_normalize_name(name: str, expected: str | None) -> None:
    assert normalize_name(name) == expected


def test_parse_source(tmp_path: Path) -> None:
    odd = tmp_path / "my:layout"
    odd.mkdir()
    assert parse_source(f"{odd}").ref is None
    assert parse_source(f"{odd}:v1").ref == "v1"
    spec = parse_source(f"oci:{odd}:v1")
    assert (spec.transport, spec.path, spec.ref) == ("oci", str(odd), "v1")
    spec = parse_source(f"docker-archive:{odd}:reg:5000/x:1")
    assert (spec.path, spec.ref) == (str(odd), "reg:5000/x:1")
    assert parse_source(f"{tmp_path}/missing:tag").path == f"{tmp_path}/missing:tag"
    assert is_local_source(str(odd))
    assert is_local_source("oci-archive:/nonexistent")
    assert not is_local_source("alpine:3")
    with pytest.raises(UsageError):
        parse_source("")
    with pytest.raises(UsageError):
        parse_source("oci:")


def test_layout_path_with_colon(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "my:layout")
    mdesc = lay.image([LAYER1])
    lay.write_index([tagged(mdesc, "v1")])
    assert open_image(f"{lay.root}:v1").manifest_digest == mdesc["digest"]
    assert open_image(str(lay.root)).manifest_digest == mdesc["digest"]


def test_same_image_under_two_tags(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "twice")
    mdesc = lay.image([LAYER1])
    lay.write_index([tagged(mdesc, "1"), tagged(mdesc, "latest")])
    assert open_image(str(lay.root)).manifest_digest == mdesc["digest"]


# --------------------------------------------------------------------------- source errors


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=f"{tmp_path}/nope: no such file"):
        open_image(str(tmp_path / "nope"))


def test_directory_without_layout(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"{tmp_path}: not an OCI image layout"):
        open_image(str(tmp_path))


def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"hello world" * 100)
    with pytest.raises(SourceError, match=f"{bad}: not a tar archive"):
        open_image(str(bad))


def test_compressed_archive(tmp_path: Path, layout: tuple[Layout, dict[str, Any]]) -> None:
    lay, _ = layout
    tar = write_tar(tmp_path / "o.tar", list(lay.files()))
    gz = tmp_path / "o.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    with pytest.raises(SourceError, match=f"{gz}: gzip-compressed file"):
        open_image(str(gz))


def test_tar_without_image(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "x.tar", [("README", b"hi")])
    with pytest.raises(SourceError, match=f"{tar}: tar holds neither manifest.json"):
        open_image(str(tar))
    with pytest.raises(SourceError, match=r"no manifest\.json"):
        open_image(f"docker-archive:{tar}")
    with pytest.raises(SourceError, match="not an OCI archive"):
        open_image(f"oci-archive:{tar}")


def test_truncated_archive(tmp_path: Path, layout: tuple[Layout, dict[str, Any]]) -> None:
    lay, _ = layout
    tar = write_tar(tmp_path / "o.tar", list(lay.files()))
    data = tar.read_bytes()
    # Cut inside the data of the member whose data ends last.
    members = TarMembers.index(str(tar))
    last = max((members.resolve(n) for n in members.names()), key=lambda m: m.offset if m else 0)
    assert last is not None
    tar.write_bytes(data[: last.offset + last.size - 1])
    with pytest.raises(SourceError, match=f"{tar}: truncated tar archive"):
        open_image(str(tar))


def test_wrong_transport_for_kind(tmp_path: Path, layout: tuple[Layout, dict[str, Any]]) -> None:
    lay, _ = layout
    tar = write_tar(tmp_path / "o.tar", list(lay.files()))
    with pytest.raises(SourceError, match="oci: needs a layout directory"):
        open_image(f"oci:{tar}")
    with pytest.raises(SourceError, match="is a directory"):
        open_image(f"oci-archive:{lay.root}")


def test_oci_archive_via_tar_index(tmp_path: Path, layout: tuple[Layout, dict[str, Any]]) -> None:
    lay, mdesc = layout
    tar = write_tar(tmp_path / "o.tar", list(lay.files()))
    image = open_image(f"{tar}:v1")
    assert image.transport == "oci-archive"
    assert image.manifest_digest == mdesc["digest"]
    check_layers(image)


def test_symlink_loop_in_archive(tmp_path: Path) -> None:
    config = to_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(LAYER1)]},
        }
    )
    manifest = [{"Config": "c.json", "RepoTags": None, "Layers": ["a/layer.tar"]}]
    tar = write_tar(
        tmp_path / "loop.tar",
        [
            ("c.json", config),
            ("a/layer.tar", Link("symlink", "../b/layer.tar")),
            ("b/layer.tar", Link("symlink", "../a/layer.tar")),
            ("manifest.json", to_json(manifest)),
        ],
    )
    with pytest.raises(
        BlobMissingError, match=r"layer a/layer.tar \(sha256:[0-9a-f]{64}\) is missing"
    ):
        open_image(str(tar))


def test_symlink_cannot_leave_archive(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    manifest = [{"Config": "c.json", "Layers": []}]
    tar = write_tar(
        tmp_path / "escape.tar",
        [
            ("c.json", Link("symlink", "../../../../" + str(outside))),
            ("manifest.json", to_json(manifest)),
        ],
    )
    with pytest.raises(BlobMissingError, match=r"config c\.json is missing"):
        open_image(str(tar))


# --------------------------------------------------------------------------- layout errors

Mutator = Callable[[Layout, dict[str, Any]], object]


def _set_index(lay: Layout, raw: bytes) -> None:
    (lay.root / "index.json").write_bytes(raw)


def _entry(**changes: Any) -> Mutator:
    def mutate(lay: Layout, mdesc: dict[str, Any]) -> None:
        lay.write_index([{**tagged(mdesc, "v1"), **changes}])

    return mutate


def _rewrite_manifest(change: Callable[[dict[str, Any]], None]) -> Mutator:
    def mutate(lay: Layout, mdesc: dict[str, Any]) -> None:
        manifest = lay.read(mdesc)
        change(manifest)
        lay.write_index([tagged(lay.json_blob(manifest, OCI_MANIFEST), "v1")])

    return mutate


def _rewrite_config(change: Callable[[dict[str, Any]], None]) -> Mutator:
    def mutate(lay: Layout, mdesc: dict[str, Any]) -> None:
        manifest = lay.read(mdesc)
        config = lay.read(manifest["config"])
        change(config)
        manifest["config"] = lay.json_blob(config, manifest["config"]["mediaType"])
        lay.write_index([tagged(lay.json_blob(manifest, OCI_MANIFEST), "v1")])

    return mutate


def _raw_manifest(raw: bytes, media_type: str = OCI_MANIFEST) -> Mutator:
    def mutate(lay: Layout, mdesc: dict[str, Any]) -> None:
        lay.write_index([tagged(lay.blob(raw, media_type), "v1")])

    return mutate


def _corrupt_blob(which: str) -> Mutator:
    def mutate(lay: Layout, mdesc: dict[str, Any]) -> None:
        desc = mdesc if which == "manifest" else lay.read(mdesc)["config"]
        path = lay.path(desc)
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x01  # same size, different content
        path.write_bytes(bytes(data))

    return mutate


def _delete(which: str) -> Mutator:
    def mutate(lay: Layout, mdesc: dict[str, Any]) -> None:
        manifest = lay.read(mdesc)
        desc = {"manifest": mdesc, "config": manifest["config"], "layer": manifest["layers"][1]}
        lay.path(desc[which]).unlink()

    return mutate


def _nested(depth: int) -> Mutator:
    def mutate(lay: Layout, mdesc: dict[str, Any]) -> None:
        desc = with_platform(mdesc, HOST)
        for _ in range(depth):
            desc = with_platform(lay.index([desc]), HOST)
        lay.write_index([tagged(desc, "v1")])

    return mutate


def _huge_config(lay: Layout, mdesc: dict[str, Any]) -> None:
    manifest = lay.read(mdesc)
    config = lay.path(manifest["config"]).read_bytes()
    manifest["config"] = lay.blob(config + b" " * (8 * 1024 * 1024), OCI_CONFIG)
    lay.write_index([tagged(lay.json_blob(manifest, OCI_MANIFEST), "v1")])


def _set(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        for key in path[:-1]:
            doc = doc[key]
        if value is _DELETE:
            del doc[path[-1]]
        else:
            doc[path[-1]] = value

    return change


_DELETE = object()
BAD_DIGEST = "sha256:" + "0" * 64

LAYOUT_ERRORS: list[tuple[str, Mutator, type[Exception], str]] = [
    (
        "index-json",
        lambda lay, _: _set_index(lay, b"{nope"),
        ManifestError,
        r"index.json: invalid JSON",
    ),
    (
        "index-array",
        lambda lay, _: _set_index(lay, b"[]"),
        ManifestError,
        r"index.json: document must be a JSON object",
    ),
    (
        "index-manifests-type",
        lambda lay, _: _set_index(lay, b'{"schemaVersion":2,"manifests":{}}'),
        ManifestError,
        r"index.json: field 'manifests' must be an array",
    ),
    (
        "index-huge",
        lambda lay, _: _set_index(lay, b" " * (8 * 1024 * 1024 + 1)),
        ManifestError,
        r"index.json: 8388609 bytes, refusing",
    ),
    (
        "index-schema",
        lambda lay, _: _set_index(lay, b'{"schemaVersion":3,"manifests":[]}'),
        ManifestError,
        r"index.json: unsupported schemaVersion 3",
    ),
    (
        "size-type",
        _entry(size="12"),
        ManifestError,
        r"index.json: manifests\[0\]: field 'size' must be an integer",
    ),
    ("size-bool", _entry(size=True), ManifestError, r"field 'size' must be an integer"),
    ("size-negative", _entry(size=-1), ManifestError, r"negative size"),
    ("digest-missing", _entry(digest=None), ManifestError, r"digest must be a string"),
    ("digest-short", _entry(digest="sha256:abc"), ManifestError, r"malformed sha256 digest"),
    (
        "digest-traversal",
        _entry(digest="sha256:../../etc/passwd"),
        ManifestError,
        r"malformed digest",
    ),
    (
        "digest-algorithm",
        _entry(digest="md5:" + "0" * 32),
        ManifestError,
        r"unsupported digest algorithm",
    ),
    ("media-type-missing", _entry(mediaType=None), ManifestError, r"missing field 'mediaType'"),
    (
        "annotations-type",
        _entry(annotations={"a": 1}),
        ManifestError,
        r"annotation values must be strings",
    ),
    (
        "platform-type",
        _entry(platform={"os": "linux"}),
        ManifestError,
        r"platform: missing field 'architecture'",
    ),
    (
        "size-mismatch",
        lambda lay, m: _entry(size=m["size"] + 1)(lay, m),
        DigestMismatchError,
        r"descriptor says",
    ),
    (
        "manifest-corrupt",
        _corrupt_blob("manifest"),
        DigestMismatchError,
        r"digest mismatch: expected sha256:[0-9a-f]{64}, found sha256:[0-9a-f]{64}, "
        r"over the manifest \(\d+ bytes\)",
    ),
    (
        "config-corrupt",
        _corrupt_blob("config"),
        DigestMismatchError,
        r"digest mismatch: expected sha256:[0-9a-f]{64}, found sha256:.*over the config",
    ),
    (
        "manifest-missing",
        _delete("manifest"),
        BlobMissingError,
        r"manifest blob sha256:[0-9a-f]{64} is missing",
    ),
    (
        "config-missing",
        _delete("config"),
        BlobMissingError,
        r"config blob sha256:[0-9a-f]{64} is missing",
    ),
    (
        "layer-missing",
        _delete("layer"),
        BlobMissingError,
        r"layer blob sha256:[0-9a-f]{64} is missing",
    ),
    (
        "manifest-json",
        _raw_manifest(b"not json"),
        ManifestError,
        r"blobs/sha256/[0-9a-f]{64}: invalid JSON",
    ),
    ("manifest-not-utf8", _raw_manifest(b'{"a":"\xff"}'), ManifestError, r"not UTF-8"),
    ("manifest-deep-json", _raw_manifest(b"[" * 100000), ManifestError, r"invalid JSON"),
    (
        "schema1-version",
        _raw_manifest(b'{"schemaVersion":1,"fsLayers":[]}'),
        ManifestError,
        r"schema 1 manifests are unsupported",
    ),
    (
        "schema1-media-type",
        _raw_manifest(b"{}", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
        ManifestError,
        r"schema 1 manifests are unsupported",
    ),
    (
        "unknown-media-type",
        _raw_manifest(b"{}", "application/vnd.oci.artifact.manifest.v1+json"),
        MediaTypeError,
        r"unsupported manifest media type 'application/vnd.oci.artifact.manifest.v1\+json'",
    ),
    (
        "media-type-disagrees",
        _rewrite_manifest(_set(["mediaType"], OCI_INDEX)),
        ManifestError,
        r"does not match the descriptor",
    ),
    (
        "manifest-no-config",
        _rewrite_manifest(_set(["config"], _DELETE)),
        ManifestError,
        r"[0-9a-f]{64}: missing field 'config'",
    ),
    (
        "manifest-layers-type",
        _rewrite_manifest(_set(["layers"], "x")),
        ManifestError,
        r"field 'layers' must be an array",
    ),
    (
        "manifest-layer-size",
        _rewrite_manifest(lambda m: m["layers"][0].update(size=m["layers"][0]["size"] + 5)),
        DigestMismatchError,
        r"layer is \d+ bytes, descriptor says \d+",
    ),
    (
        "config-media-type",
        _rewrite_manifest(_set(["config", "mediaType"], "application/vnd.oci.empty.v1+json")),
        MediaTypeError,
        r"config media type 'application/vnd.oci.empty.v1\+json' is not a container image config",
    ),
    (
        "config-no-rootfs",
        _rewrite_config(_set(["rootfs"], _DELETE)),
        ManifestError,
        r"[0-9a-f]{64}: missing field 'rootfs'",
    ),
    ("config-no-os", _rewrite_config(_set(["os"], _DELETE)), ManifestError, r"missing field 'os'"),
    (
        "config-rootfs-type",
        _rewrite_config(_set(["rootfs", "type"], "zfs")),
        ManifestError,
        r"rootfs.type must be 'layers'",
    ),
    (
        "config-bad-diff-id",
        _rewrite_config(_set(["rootfs", "diff_ids"], ["x"])),
        ManifestError,
        r"rootfs.diff_ids\[0\]: malformed digest",
    ),
    (
        "config-diff-id-count",
        _rewrite_config(lambda c: c["rootfs"]["diff_ids"].append(BAD_DIGEST)),
        ManifestError,
        r"2 layers but the config lists 3 diff_ids",
    ),
    ("config-huge", _huge_config, ManifestError, r"refusing to parse a document over 8 MiB"),
    ("nested-ok-then-too-deep", _nested(9), ManifestError, r"nested deeper than 8 levels"),
    (
        "layout-version",
        lambda lay, _: (lay.root / "oci-layout").write_bytes(b'{"imageLayoutVersion":"2.0.0"}'),
        ManifestError,
        r"oci-layout: unsupported imageLayoutVersion '2.0.0'",
    ),
    (
        "layout-marker-json",
        lambda lay, _: (lay.root / "oci-layout").write_bytes(b"x"),
        ManifestError,
        r"oci-layout: invalid JSON",
    ),
    (
        "index-missing",
        lambda lay, _: (lay.root / "index.json").unlink(),
        ManifestError,
        r"index.json: missing",
    ),
    (
        "index-empty",
        lambda lay, _: lay.write_index([]),
        ManifestError,
        r"index.json: the index lists no images",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "error", "pattern"),
    [pytest.param(m, e, p, id=i) for i, m, e, p in LAYOUT_ERRORS],
)
def test_layout_errors(
    layout: tuple[Layout, dict[str, Any]],
    tmp_path: Path,
    mutate: Mutator,
    error: type[Exception],
    pattern: str,
) -> None:
    lay, mdesc = layout
    mutate(lay, mdesc)
    with pytest.raises(error, match=pattern) as exc:
        open_image(str(lay.root))
    message = str(exc.value)
    assert "\n" not in message
    assert str(lay.root) in message
    # The same layout inside a tar fails the same way, naming the archive.
    tar = write_tar(
        tmp_path / "same.tar", list(lay.files()) if (lay.root / "index.json").exists() else []
    )
    if (lay.root / "index.json").exists():
        with pytest.raises(error, match=pattern) as exc:
            open_image(f"oci-archive:{tar}")
        assert str(tar) in str(exc.value)


def test_nested_index_within_limit(layout: tuple[Layout, dict[str, Any]]) -> None:
    lay, mdesc = layout
    _nested(8)(lay, mdesc)
    assert open_image(str(lay.root)).manifest_digest == mdesc["digest"]


def test_docker_manifest_v2_media_types(tmp_path: Path) -> None:
    """Docker schema 2 manifest and manifest list media types work like OCI's."""
    lay = Layout(tmp_path / "docker")
    config = lay.json_blob(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(LAYER1)]},
        },
        "application/vnd.docker.container.image.v1+json",
    )
    layer = lay.blob(compress(LAYER1, "gzip"), "application/vnd.docker.image.rootfs.diff.tar.gzip")
    media = "application/vnd.docker.distribution.manifest.v2+json"
    manifest = lay.json_blob(
        {"schemaVersion": 2, "mediaType": media, "config": config, "layers": [layer]}, media
    )
    list_type = "application/vnd.docker.distribution.manifest.list.v2+json"
    index = lay.json_blob(
        {"schemaVersion": 2, "mediaType": list_type, "manifests": [with_platform(manifest, HOST)]},
        list_type,
    )
    lay.write_index([tagged(index, "x")])
    image = open_image(str(lay.root))
    assert image.manifest_digest == manifest["digest"]
    assert image.layers[0].descriptor.media_type.endswith("diff.tar.gzip")
    check_layers(image)


# --------------------------------------------------------------------------- docker-archive errors


def _legacy_with(tmp_path: Path, edit: Callable[[list[dict[str, Any]]], Any]) -> Path:
    out = legacy_archive(tmp_path / "base.tar", [([LAYER1, LAYER2], ["a:1"])])
    with tarfile.open(out) as tf:
        members: list[tuple[str, bytes | Link]] = []
        manifest: Any = None
        for m in tf.getmembers():
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "manifest.json":
                manifest = json.loads(data)
            else:
                members.append((m.name, data))
    result = edit(manifest)
    raw = result if isinstance(result, bytes) else to_json(manifest)
    return write_tar(tmp_path / "edited.tar", [*members, ("manifest.json", raw)])


def _corrupt_config_member(tmp_path: Path) -> Path:
    out = legacy_archive(tmp_path / "base.tar", [([LAYER1], ["a:1"])])
    with tarfile.open(out) as tf:
        members: list[tuple[str, bytes | Link]] = []
        for m in tf.getmembers():
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith(".json") and m.name != "manifest.json":
                data = data.replace(b"arm64", b"amd64")
            members.append((m.name, data))
    return write_tar(tmp_path / "edited.tar", members)


DOCKER_ERRORS: list[tuple[str, Callable[[list[dict[str, Any]]], Any], type[Exception], str]] = [
    (
        "dotdot-layer",
        lambda m: m[0]["Layers"].__setitem__(0, "../x/layer.tar"),
        ManifestError,
        r"Layers\[0\]: refusing path '../x/layer.tar'",
    ),
    (
        "absolute-config",
        lambda m: m[0].__setitem__("Config", "/etc/passwd"),
        ManifestError,
        r"Config: refusing path '/etc/passwd'",
    ),
    (
        "layer-absent",
        lambda m: m[0]["Layers"].__setitem__(1, "zzz/layer.tar"),
        BlobMissingError,
        r"layer zzz/layer.tar \(sha256:[0-9a-f]{64}\) is missing",
    ),
    (
        "config-absent",
        lambda m: m[0].__setitem__("Config", "zzz.json"),
        BlobMissingError,
        r"config zzz.json is missing",
    ),
    (
        "extra-layer",
        lambda m: m[0]["Layers"].append(m[0]["Layers"][0]),
        ManifestError,
        r"has 3 layers but its config lists 2 diff_ids",
    ),
    (
        "not-a-list",
        lambda m: b'{"Config": "x"}',
        ManifestError,
        r"manifest.json: must be a JSON array",
    ),
    ("empty-list", lambda m: b"[]", ManifestError, r"manifest.json: lists no images"),
    ("bad-json", lambda m: b"[{", ManifestError, r"manifest.json: invalid JSON"),
    (
        "layers-type",
        lambda m: m[0].__setitem__("Layers", "a"),
        ManifestError,
        r"field 'Layers' must be an array",
    ),
    (
        "tags-type",
        lambda m: m[0].__setitem__("RepoTags", [1]),
        ManifestError,
        r"RepoTags must be strings",
    ),
    (
        "config-is-not-json-object",
        lambda m: m[0].__setitem__("Config", m[0]["Layers"][0]),
        ManifestError,
        r"layer.tar: invalid JSON",
    ),
]


@pytest.mark.parametrize(
    ("edit", "error", "pattern"),
    [pytest.param(ed, e, p, id=i) for i, ed, e, p in DOCKER_ERRORS],
)
def test_docker_archive_errors(
    tmp_path: Path,
    edit: Callable[[list[dict[str, Any]]], Any],
    error: type[Exception],
    pattern: str,
) -> None:
    tar = _legacy_with(tmp_path, edit)
    with pytest.raises(error, match=pattern) as exc:
        open_image(str(tar))
    assert str(tar) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_docker_archive_config_digest_verified(tmp_path: Path) -> None:
    tar = _corrupt_config_member(tmp_path)
    with pytest.raises(
        DigestMismatchError, match=r"[0-9a-f]{64}\.json: digest mismatch: .* over the config"
    ):
        open_image(str(tar))


def test_docker25_manifest_json_disagrees_with_oci_manifest(tmp_path: Path) -> None:
    out, _, _ = docker25_archive(tmp_path)
    with tarfile.open(out) as tf:
        members: list[tuple[str, bytes | Link]] = []
        for m in tf.getmembers():
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "manifest.json":
                doc = json.loads(data)
                doc[0]["Layers"].reverse()
                data = to_json(doc)
            members.append((m.name, data))
    with pytest.raises(
        ManifestError, match=r"layers of example/app:1.0 disagree with OCI manifest"
    ):
        open_image(str(write_tar(tmp_path / "x.tar", members)))


# --------------------------------------------------------------------------- IDs, Docker 25 by ID


def docker25_by_id_archive(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Docker 25.0.0-25.0.2 ``docker save IMAGE_ID``: ``"manifests": null``, ``RepoTags`` null."""
    out, lay, mdesc = docker25_archive(tmp_path)
    with tarfile.open(out) as tf:
        members: list[tuple[str, bytes | Link]] = []
        for m in tf.getmembers():
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "index.json":
                data = b'{"schemaVersion":2,"mediaType":"%s","manifests":null}' % OCI_INDEX.encode()
            elif m.name == "manifest.json":
                doc = json.loads(data)
                doc[0]["RepoTags"] = None
                data = to_json(doc) + b"\n"
            if m.name != "repositories":
                members.append((m.name, data))
    return write_tar(tmp_path / "by-id.tar", members), lay.read(mdesc)


def test_docker25_save_by_id_null_index(tmp_path: Path) -> None:
    out, manifest = docker25_by_id_archive(tmp_path)
    image = open_image(str(out))
    assert image.config_digest == manifest["config"]["digest"]
    # The index points nowhere, so the image is manifest.json's alone.
    assert image.manifest_digest is None
    check_layers(image)
    config_id = hexof(manifest["config"]["digest"])
    for spelling in (config_id, config_id[:12], f"sha256:{config_id[:5]}", f"sha256:{config_id}"):
        assert open_image(str(out), image=spelling).config_digest == image.config_digest
    with pytest.raises(SourceError, match=r"the index lists no images"):
        open_image(f"oci-archive:{out}")


def test_image_id_selection_in_multi_image_archive(tmp_path: Path) -> None:
    """Two images whose IDs begin alike, one tagged, one not, in one legacy archive."""

    def config(layer: bytes, salt: int) -> bytes:
        rootfs = {"type": "layers", "diff_ids": [sha256(layer)]}
        return to_json({"architecture": "amd64", "os": "linux", "rootfs": rootfs, "salt": salt})

    first = config(LAYER1, 0)
    second = next(
        c
        for c in (config(LAYER2, n) for n in range(1000))
        if hexof(sha256(c))[0] == hexof(sha256(first))[0]
    )
    members: list[tuple[str, bytes | Link]] = []
    manifest = []
    for cfg, layer, tags in ((first, LAYER1, ["a:1"]), (second, LAYER2, None)):
        name = f"{hexof(sha256(cfg))}.json"
        members += [(name, cfg), (f"{hexof(sha256(layer))}/layer.tar", layer)]
        manifest.append(
            {"Config": name, "RepoTags": tags, "Layers": [f"{hexof(sha256(layer))}/layer.tar"]}
        )
    out = write_tar(tmp_path / "multi.tar", [*members, ("manifest.json", to_json(manifest))])
    untagged = hexof(sha256(second))
    for spelling in (untagged, untagged[:12], f"sha256:{untagged[:7]}"):
        assert open_image(str(out), image=spelling).config_digest == sha256(second)
    assert open_image(str(out), image="docker.io/library/a:1").config_digest == sha256(first)
    with pytest.raises(SourceNotFoundError, match=r"'[0-9a-f]' begins several image IDs: sha256:"):
        open_image(str(out), image=untagged[0])
    absent = "0" if untagged[0] != "0" else "1"  # no ID begins so
    with pytest.raises(SourceNotFoundError, match=f"no image named '{absent}'; available: a:1;"):
        open_image(str(out), image=absent)


# --------------------------------------------------------------------------- dir: transport

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DIR_VERSION = b"Directory Transport Version: 1.1\n"


class DirImage:
    """A ``dir:`` directory as containers/image writes it: version, manifest.json, ``<hex>``."""

    def __init__(self, root: Path, version: bytes | None = DIR_VERSION, suffix: str = "") -> None:
        self.root = root
        self.suffix = suffix
        root.mkdir()
        if version is not None:
            (root / "version").write_bytes(version)

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        (self.root / f"{hexof(sha256(data))}{self.suffix}").write_bytes(data)
        return {"mediaType": media_type, "size": len(data), "digest": sha256(data)}

    def manifest(self, layers: list[bytes], *, docker: bool, platform: Platform = AMD64) -> bytes:
        config = {
            "architecture": platform.architecture,
            "os": platform.os,
            "rootfs": {"type": "layers", "diff_ids": [sha256(la) for la in layers]},
        }
        config_type, layer_type = (
            (DOCKER_CONFIG, DOCKER_LAYER_GZIP)
            if docker
            else (
                OCI_CONFIG,
                LAYER_TYPES["gzip"],
            )
        )
        doc = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": self.blob(to_json(config), config_type),
            "layers": [self.blob(compress(la, "gzip"), layer_type) for la in layers],
        }
        return to_json(doc)

    def write_manifest(self, data: bytes, name: str = "manifest.json") -> None:
        (self.root / name).write_bytes(data)


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "v2s2"])
def test_dir_transport(tmp_path: Path, docker: bool) -> None:
    d = DirImage(tmp_path / "dir")
    manifest = d.manifest([LAYER1, LAYER2], docker=docker)
    d.write_manifest(manifest)
    image = open_image(f"dir:{d.root}")
    assert (image.transport, image.manifest_digest) == ("dir", sha256(manifest))
    assert [la.descriptor.media_type for la in image.layers] == [
        DOCKER_LAYER_GZIP if docker else LAYER_TYPES["gzip"]
    ] * 2
    check_layers(image)
    # Detected without the prefix, by its version file; an explicit platform
    # does not matter for a single manifest (as in a layout).
    assert open_image(str(d.root), platform=OTHER).layers == image.layers
    assert is_local_source(f"dir:{tmp_path}/not-there")


def test_dir_transport_version_1_0_and_none(tmp_path: Path) -> None:
    old = DirImage(tmp_path / "old", b"Directory Transport Version: 1.0\n", suffix=".tar")
    old.write_manifest(old.manifest([LAYER1], docker=True))
    check_layers(open_image(str(old.root)))
    # skopeo's own source reads no version file; only the prefix says dir: then.
    bare = DirImage(tmp_path / "bare", version=None)
    bare.write_manifest(bare.manifest([LAYER1], docker=False))
    check_layers(open_image(f"dir:{bare.root}"))
    with pytest.raises(SourceError, match=r"bare: not an OCI image layout .* nor a dir: image"):
        open_image(str(bare.root))


def test_dir_transport_manifest_list(tmp_path: Path) -> None:
    """``skopeo copy --all ... dir:``: a list in manifest.json, instances as <hex>.manifest.json."""
    d = DirImage(tmp_path / "dir")
    entries = []
    for platform, layer in ((AMD64, LAYER1), (OTHER, LAYER3)):
        data = d.manifest([layer], docker=True, platform=platform)
        d.write_manifest(data, f"{hexof(sha256(data))}.manifest.json")
        desc = {"mediaType": DOCKER_MANIFEST, "size": len(data), "digest": sha256(data)}
        entries.append(with_platform(desc, platform))
    d.write_manifest(to_json({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries}))
    other = open_image(str(d.root), platform=OTHER)
    assert other.manifest_digest == entries[1]["digest"]
    assert other.layers[0].diff_id == sha256(LAYER3)
    check_layers(other)
    with pytest.raises(PlatformError, match=r"manifest.json: no manifest for platform linux/mips"):
        open_image(str(d.root), platform=Platform("linux", "mips"))
    instance = d.root / f"{hexof(entries[1]['digest'])}.manifest.json"
    instance.write_bytes(instance.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    with pytest.raises(
        DigestMismatchError, match=r"\.manifest\.json: digest mismatch: .* over the manifest"
    ):
        open_image(str(d.root), platform=OTHER)
    instance.unlink()
    with pytest.raises(
        BlobMissingError, match=r"manifest.json: manifest blob sha256:\w+ is missing"
    ):
        open_image(str(d.root), platform=OTHER)


def _break_config(d: DirImage, manifest: dict[str, Any]) -> None:
    config = d.root / hexof(manifest["config"]["digest"])
    config.write_bytes(config.read_bytes().replace(b"amd64", b"arm64"))


def _break_layer_size(d: DirImage, manifest: dict[str, Any]) -> None:
    with (d.root / hexof(manifest["layers"][0]["digest"])).open("ab") as f:
        f.write(b"x")


def _drop_layer(d: DirImage, manifest: dict[str, Any]) -> None:
    (d.root / hexof(manifest["layers"][1]["digest"])).unlink()


def _bad_version(d: DirImage, manifest: dict[str, Any]) -> None:
    (d.root / "version").write_bytes(b"Directory Transport Version: 9.0\n")


def _schema1(d: DirImage, manifest: dict[str, Any]) -> None:
    d.write_manifest(to_json({"schemaVersion": 1, "name": "x", "fsLayers": []}))


def _not_json(d: DirImage, manifest: dict[str, Any]) -> None:
    d.write_manifest(b"{")


DIR_ERRORS: list[tuple[str, Callable[[DirImage, dict[str, Any]], None], type[Exception], str]] = [
    (
        "config",
        _break_config,
        DigestMismatchError,
        r"/dir/[0-9a-f]{64}: digest mismatch: .* over the config",
    ),
    ("size", _break_layer_size, DigestMismatchError, r"layer is \d+ bytes, descriptor says \d+"),
    ("missing", _drop_layer, BlobMissingError, r"manifest.json: layer blob sha256:\w+ is missing"),
    ("version", _bad_version, SourceError, r"unsupported dir: transport version '9.0'"),
    (
        "schema1",
        _schema1,
        ManifestError,
        r"manifest.json: Docker schema 1 manifests are unsupported",
    ),
    ("json", _not_json, ManifestError, r"manifest.json: invalid JSON"),
]


@pytest.mark.parametrize(
    ("edit", "error", "pattern"), [pytest.param(ed, e, p, id=i) for i, ed, e, p in DIR_ERRORS]
)
def test_dir_transport_errors(
    tmp_path: Path,
    edit: Callable[[DirImage, dict[str, Any]], None],
    error: type[Exception],
    pattern: str,
) -> None:
    d = DirImage(tmp_path / "dir")
    data = d.manifest([LAYER1, LAYER2], docker=False)
    d.write_manifest(data)
    edit(d, json.loads(data))
    with pytest.raises(error, match=pattern) as exc:
        open_image(f"dir:{d.root}")
    assert "\n" not in str(exc.value)


def test_dir_transport_usage(tmp_path: Path) -> None:
    d = DirImage(tmp_path / "dir")
    d.write_manifest(d.manifest([LAYER1], docker=False))
    with pytest.raises(UsageError, match=r"holds one image; it takes no name \('x'\)"):
        open_image(f"dir:{d.root}", image="x")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SourceError, match=r"file: dir: needs a directory"):
        open_image(f"dir:{tmp_path / 'file'}")


def test_ggcr_tarball_config_named_by_its_digest(tmp_path: Path) -> None:
    """go-containerregistry names the config member ``sha256:<hex>``: the name is checked."""
    config = to_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(LAYER1)]},
        }
    )
    layer = compress(LAYER1, "gzip")
    entry = {
        "Config": sha256(config),
        "RepoTags": ["index.docker.io/library/app:1"],
        "Layers": [f"{hexof(sha256(layer))}.tar.gz"],
    }
    members: list[tuple[str, bytes | Link]] = [
        (sha256(config), config),
        (f"{hexof(sha256(layer))}.tar.gz", layer),
        ("manifest.json", to_json([entry])),
    ]
    image = open_image(str(write_tar(tmp_path / "ggcr.tar", members)), image="app:1")
    assert image.config_digest == sha256(config)
    members[0] = (sha256(config), config.replace(b"amd64", b"arm64"))
    with pytest.raises(
        DigestMismatchError, match=r"ggcr.tar: sha256:\w+: digest mismatch: .* over the config"
    ):
        open_image(str(write_tar(tmp_path / "ggcr.tar", members)))
