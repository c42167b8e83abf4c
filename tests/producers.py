"""Every image format the field's tools write, produced from a catalog image.

The real tools where Debian 12 has them (:mod:`tests.engines` runs them):

* ``podman save`` in its four formats (docker-archive, oci-archive, oci-dir,
  docker-dir with and without ``--compress``) and ``-m`` multi-image archives;
  an image ``buildah`` built (``from``, ``copy``, ``commit``) and pushed;
* ``skopeo copy ... dir:`` with gzip and zstd layers, OCI or Docker v2s2 manifests;
  ``skopeo copy --dest-compress-format zstd:chunked``;
* ``ctr images export`` (:meth:`tests.engines.Containerd.export`);
  ``ctr-remote image convert --estargz`` and ``--zstdchunked``, exported or
  pushed back to the registry;
* ``docker save`` (20.10) by tag and of several images
  (:meth:`tests.engines.Dockerd.save`), and by image ID;
* ``umoci insert`` (0.4.7), whose layers end inside the last member's padding.

Crafted where no Debian tool writes the shape, following the writer's code:

* go-containerregistry's tarball (``crane pull``, kaniko ``--tar-path``, ko,
  apko, jib; ``pkg/v1/tarball/write.go``): a legacy docker-archive of the
  *compressed* blobs;
* Docker 25's save by image ID (moby ``image/tarexport/save.go`` at v25.0.2
  and v25.0.3).

Which catalog image each tool can take: containerd and skopeo take any;
dockerd 20.10 and podman 4.3 refuse ``basic`` and ``edge`` (see
:mod:`tests.images`), so they get ``portable``; ctr-remote 0.12 cannot
convert ``edge`` (``error copying "sparse/disk.img": unexpected EOF``).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tests import builder
from tests.engines import Containerd, CtrRemote, Dockerd, Podman, Skopeo, TocKind, run
from tests.images import BuiltImage
from tests.registry import Registry

PodmanFormat = Literal["docker-archive", "oci-archive", "oci-dir", "docker-dir"]
# ggcr names layers <hex>.tar.gz whatever their compression before v0.21.8
# (go-containerregistry#2382), <hex>.tar.zst / .tar after.
GgcrNames = Literal["legacy", "v0.21.8"]
Docker25Release = Literal["25.0.2", "25.0.3"]
REPOSITORY = "imagefs-test"


class RegistryImages:
    """Catalog images pushed to the test registry, each once, as ``HOST/imagefs-test/NAME:TAG``."""

    def __init__(self, registry: Registry, skopeo: Skopeo) -> None:
        self.registry = registry
        self.skopeo = skopeo
        self._refs: dict[Path, str] = {}

    def ref(self, image: BuiltImage) -> str:
        if image.layout not in self._refs:
            dest = f"{self.registry.host}/{REPOSITORY}/{image.name}:{image.tag}"
            self._refs[image.layout] = self.skopeo.push(f"oci:{image.layout}:{image.tag}", dest)
        return self._refs[image.layout]


def first_layers(image: BuiltImage, count: int, dest: Path) -> BuiltImage:
    """Another image: the first ``count`` layers of ``image`` (gzip), sharing their diff_ids.

    Multi-image archives need a second image; this one shares layers with
    the first, as images built on one base do.
    """
    tars = list(builder.layer_tars(image.layout, image.tag))[:count]
    tag = f"first{count}"
    layout = builder.write_oci_layout(dest / f"{image.name}-{tag}", tars, tag=tag)
    return BuiltImage(f"{image.name}-{tag}", layout, tag)


# --------------------------------------------------------------------------- real tools


def podman_save(
    podman: Podman,
    dest: Path,
    refs: Sequence[str],
    *,
    save_format: PodmanFormat = "docker-archive",
    compress: bool = False,
) -> Path:
    """``podman save``; several ``refs`` make a ``-m`` multi-image docker-archive."""
    args: list[str | Path] = ["save", "--quiet", "--format", save_format, "--output", dest]
    if compress:
        args.append("--compress")  # only for the directory formats
    if len(refs) > 1:
        args.append("--multi-image-archive")
    podman.podman(*args, *refs)
    return dest


def buildah_commit(podman: Podman, base: str, content: Path, name: str) -> str:
    """A new image NAME: ``buildah from BASE``, ``buildah copy CONTENT /added``, ``commit``.

    BASE must be in podman's store already (``--pull=never``): buildah shares it.
    """
    container = podman.buildah("from", "--pull=never", base).stdout.decode().strip()
    podman.buildah("copy", container, content, "/added")
    podman.buildah("commit", "--quiet", "--rm", container, name)
    return name


def skopeo_dir(
    skopeo: Skopeo,
    image: BuiltImage,
    dest: Path,
    *,
    compression: Literal["gzip", "zstd"],
    manifest: Literal["oci", "v2s2"] = "oci",
) -> Path:
    """``skopeo copy oci:LAYOUT:TAG dir:DEST`` with every layer in ``compression``."""
    skopeo.copy(
        f"oci:{image.layout}:{image.tag}",
        f"dir:{dest}",
        "--format",
        manifest,
        "--dest-compress",
        "--dest-compress-format",
        compression,
    )
    return dest


def ctr_remote_export(ctr_remote: CtrRemote, ref: str, kind: TocKind, dest: Path) -> Path:
    """``ref`` converted to eStargz or zstd:chunked, then ``ctr images export``-ed."""
    converted = ctr_remote.convert(ref, f"{ref}-{kind}", kind)
    return ctr_remote.containerd.export(dest, converted)


def ctr_remote_push(
    ctr_remote: CtrRemote, ref: str, kind: TocKind, *extra: str, dest: str | None = None
) -> str:
    """``ref`` converted to eStargz or zstd:chunked and pushed to the registry; the new ref.

    ``dest`` names the conversion (default ``REF-KIND``); ``extra`` goes to
    ``convert`` (``--estargz-chunk-size N``).
    """
    converted = ctr_remote.convert(ref, dest or f"{ref}-{kind}", kind, *extra)
    ctr_remote.containerd.push(converted)
    return converted


def ctr_remote_convert(
    containerd: Containerd, source_ref: str, kind: TocKind, dest_tag: str, *extra: str
) -> str:
    """``source_ref`` (in the test registry) fetched, converted by ctr-remote to ``kind`` as
    ``REPO:DEST_TAG``, and pushed back; the new reference."""
    containerd.fetch(source_ref)
    dest = f"{source_ref.rsplit(':', 1)[0]}:{dest_tag}"
    return ctr_remote_push(CtrRemote(containerd), source_ref, kind, *extra, dest=dest)


def registry_to_layout(skopeo: Skopeo, reference: str, layout: Path, tag: str) -> str:
    """``docker://REF`` (plain HTTP) copied to ``oci:LAYOUT:TAG``, its manifest kept as is."""
    skopeo.copy(f"docker://{reference}", f"oci:{layout}:{tag}", "--src-tls-verify=false")
    return f"oci:{layout}:{tag}"


def skopeo_zstd_chunked(skopeo: Skopeo, layout: Path, tag: str, dest: Path) -> str:
    """``layout:tag`` copied to ``dest:tag`` with zstd:chunked layers (containers/storage's
    writer, ``skopeo copy --dest-compress-format zstd:chunked``); the new SOURCE."""
    skopeo.copy(
        f"oci:{layout}:{tag}",
        f"oci:{dest}:{tag}",
        "--dest-compress",
        "--dest-compress-format",
        "zstd:chunked",
    )
    return f"oci:{dest}:{tag}"


def docker_save_by_id(dockerd: Dockerd, ref: str, dest: Path) -> Path:
    """``docker save IMAGE_ID``: no RepoTags (Docker 20.10 writes ``"RepoTags": null``)."""
    return dockerd.save(dest, dockerd.image_id(ref))


def umoci_insert(image: BuiltImage, dest: Path) -> BuiltImage:
    """A copy of ``image`` with one more layer, written by ``umoci insert`` (0.4.7).

    umoci 0.4.7 ends such a layer inside the last member's padding, with no
    end-of-archive blocks: the tar stream is cut, the data is whole.
    """
    layout = dest / f"{image.name}-inserted"
    shutil.copytree(image.layout, layout)
    content = dest / "inserted-content"
    (content / "sub").mkdir(parents=True)
    (content / "sub" / "file").write_text("inserted by umoci insert\n")
    (content / "odd-length").write_bytes(b"x" * 1001)  # data ending mid-block
    (content / "link").symlink_to("sub/file")
    tag = "inserted"
    run(["umoci", "insert", "--image", f"{layout}:{image.tag}", "--tag", tag,
                 str(content), "/inserted"])  # fmt: skip
    return BuiltImage(f"{image.name}-inserted", layout, tag)


# --------------------------------------------------------------------------- crafted


def ggcr_tarball(
    image: BuiltImage,
    dest: Path,
    repo_tag: str,
    *,
    compression: Literal["gzip", "zstd"],
    names: GgcrNames = "legacy",
    layers: Sequence[bytes] | None = None,
) -> Path:
    """A go-containerregistry tarball (``tarball.Write``) of ``image``.

    As ``pkg/v1/tarball/write.go`` writes it: the config member named by its
    digest (``sha256:<hex>``), each layer's *compressed* blob as
    ``<hex>.tar.gz`` (``<hex>`` the blob's digest; ``.tar.zst`` for zstd
    since v0.21.8), then ``manifest.json`` (json.Marshal: one line, no
    newline; no ``LayerSources`` for ordinary layers), every member a 0644
    regular file with mtime 0 and no directories. The config is the
    image's own, so its ``rootfs.diff_ids`` are digests of the
    *uncompressed* tars. ``layers`` (uncompressed tars) replaces the image's
    layers under the same config: a tampered archive.
    """
    manifest = builder.image_manifest(image.layout, image.tag)
    config = builder.blob_path(image.layout, manifest["config"]["digest"]).read_bytes()
    members: list[tuple[str, bytes]] = [(builder.sha256_digest(config), config)]
    layer_files = []
    for tar in builder.layer_tars(image.layout, image.tag) if layers is None else layers:
        blob = builder.compress(tar, compression)
        suffix = ".tar.zst" if compression == "zstd" and names == "v0.21.8" else ".tar.gz"
        layer_files.append(builder.sha256_digest(blob).partition(":")[2] + suffix)
        members.append((layer_files[-1], blob))
    entry = {"Config": members[0][0], "RepoTags": [repo_tag], "Layers": layer_files}
    members.append(("manifest.json", _go_json([entry])))
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            _add(tf, name, data, mode=0o644)
    return dest


def docker25_save_by_id(
    image: BuiltImage,
    dest: Path,
    *,
    release: Docker25Release,
    layers: Sequence[bytes] | None = None,
) -> Path:
    """``docker save IMAGE_ID`` as Docker 25.0.2 (``"manifests": null``) or 25.0.3 writes it.

    moby ``image/tarexport/save.go``: an OCI layout in a temporary directory,
    tarred in lexical order (``archive.Tar``). Blobs: each layer's
    uncompressed tar (named by its diff_id), a legacy v1 config per layer
    (as in the ``<id>/json`` files of older saves), the image config, and
    an OCI manifest listing the layers. ``manifest.json`` (json.Encoder: a
    trailing newline) has ``"RepoTags": null`` and ``LayerSources`` for every
    layer; there is no ``repositories`` file. ``index.json`` lists nothing
    in 25.0.0-25.0.2, because only tagged references were added to it
    (moby#47210); 25.0.3 adds the untagged manifest without annotations
    (moby#47294). ``layers`` (uncompressed tars) replaces the image's layers
    under the same config: a tampered archive, each blob named by its own digest.
    """
    manifest = builder.image_manifest(image.layout, image.tag)
    config = builder.blob_path(image.layout, manifest["config"]["digest"]).read_bytes()
    config_obj = json.loads(config)
    files: dict[str, bytes] = {}
    tars = list(builder.layer_tars(image.layout, image.tag)) if layers is None else layers
    descriptors: list[dict[str, Any]] = []
    parent = ""
    for i, tar in enumerate(tars):
        descriptors.append(_blob(files, tar, builder.OCI_LAYER["none"]))
        v1 = _v1_config(descriptors[-1]["digest"], parent, config_obj, last=i == len(tars) - 1)
        _blob(files, v1, "")
        parent = builder.sha256_digest(v1).partition(":")[2]
    platform = builder.platform_object(
        (config_obj["os"], config_obj["architecture"], config_obj.get("variant", ""))
    )
    config_desc = {**_blob(files, config, builder.OCI_CONFIG), "platform": platform}
    oci_manifest = {
        "schemaVersion": 2,
        "mediaType": builder.OCI_MANIFEST,
        "config": config_desc,
        "layers": descriptors,
    }
    manifest_desc = {
        **_blob(files, _go_json(oci_manifest), builder.OCI_MANIFEST),
        "platform": platform,
    }
    # A Go map: json.Marshal writes its keys sorted.
    sources = {
        d["digest"]: {"mediaType": d["mediaType"], "size": d["size"], "digest": d["digest"]}
        for d in sorted(descriptors, key=lambda d: str(d["digest"]))
    }
    entry = {
        "Config": builder.blob_member(config_desc),
        "RepoTags": None,
        "Layers": [builder.blob_member(d) for d in descriptors],
        "LayerSources": sources,
    }
    files["manifest.json"] = _go_json([entry]) + b"\n"
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    listed = None if release == "25.0.2" else [manifest_desc]
    index = {"schemaVersion": 2, "mediaType": builder.OCI_INDEX, "manifests": listed}
    files["index.json"] = _go_json(index)
    builder.write_outer_tar(dest, sorted(files.items()), blob_mode=0o644)
    return dest


def _v1_config(diff_id: str, parent: str, config: Mapping[str, Any], *, last: bool) -> bytes:
    """A stand-in for the legacy per-layer ``V1Image`` JSON moby still writes as a blob.

    Only the last layer's carries the image's settings; the others are
    placeholders created at the epoch. The IDs here are stand-ins (moby's
    ``v1.CreateID`` hashes Go's serialisation of the whole V1 config with the
    chain ID): nothing references these blobs, and imagefs never reads them;
    they are here so that the archive holds unreferenced blobs, as Docker's does.
    """
    obj: dict[str, Any] = {"id": builder.sha256_digest(diff_id.encode() + parent.encode())[7:]}
    if parent:
        obj["parent"] = parent
    obj["created"] = config.get("created", builder.CREATED) if last else "1970-01-01T00:00:00Z"
    obj["container_config"] = {"Cmd": None, "Env": None, "Image": "", "Labels": None}
    if last:
        obj["config"] = config.get("config", {})
    obj["os"] = config.get("os", "linux")
    return _go_json(obj)


def _blob(files: dict[str, bytes], data: bytes, media_type: str) -> dict[str, Any]:
    descriptor = {"mediaType": media_type, "digest": builder.sha256_digest(data), "size": len(data)}
    files[builder.blob_member(descriptor)] = data
    return descriptor


def _go_json(obj: Any) -> bytes:
    """``json.Marshal``: compact, fields in struct order (our dicts' insertion order)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _add(tf: tarfile.TarFile, name: str, data: bytes, *, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tf.addfile(info, io.BytesIO(data))
