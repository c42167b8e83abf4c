"""Build container images for tests, by hand or with umoci, in every source shape.

Two ways to make layers:

- :func:`make_layer_tar` writes a tar byte for byte from :class:`Member`
  descriptions, so a test can state exactly what a layer holds: whiteouts,
  opaque markers, duplicates, GNU long names, PAX xattrs, sparse files.
- :func:`umoci_build` changes a real directory tree step by step and lets
  ``umoci repack`` compute each layer (and its whiteouts), as a real image
  builder would.

:func:`write_oci_layout` (and its helpers) turns layer tars into an OCI image
layout; the ``to_*`` converters turn a layout into the other shapes imagefs
reads: oci-archive, the three ``docker save`` shapes, gzip-only layouts.

Everything here needs no network. umoci and skopeo come from Debian (see
DESIGN.md, "Test peers on this machine"); both run as root so owners and device
nodes survive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zstandard

from tests.engines import Skopeo, run

Kind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]
TarFormat = Literal["pax", "gnu", "ustar"]
Compression = Literal["none", "gzip", "zstd"]
Platform = tuple[str, str, str]  # (os, architecture, variant); variant may be ""

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_IMAGE_NAME = "io.containerd.image.name"

DEFAULT_PLATFORM: Platform = ("linux", "amd64", "")
# Fixed times keep crafted images byte-for-byte reproducible.
DEFAULT_MTIME_NS = 1_600_000_000 * 10**9  # 2020-09-13T12:26:40Z
CREATED = "2020-09-13T12:26:40Z"
NS = 10**9

_TAR_TYPES: dict[str, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES: dict[str, int] = {
    "file": 0o644,
    "dir": 0o755,
    "symlink": 0o777,
    "hardlink": 0o644,
    "char": 0o600,
    "block": 0o600,
    "fifo": 0o644,
}
_TAR_FORMATS: dict[str, Literal[0, 1, 2]] = {
    "pax": tarfile.PAX_FORMAT,
    "gnu": tarfile.GNU_FORMAT,
    "ustar": tarfile.USTAR_FORMAT,
}


# --------------------------------------------------------------------------- layer tars


@dataclass(frozen=True)
class Member:
    """One tar entry to write, exactly as described.

    ``mode`` defaults by kind (file 0644, dir 0755, symlink 0777, device 0600).
    ``mtime_ns`` is nanoseconds since the epoch; a sub-second part is written
    as a PAX ``mtime`` record (so it needs ``format="pax"``). ``xattrs`` become
    PAX ``SCHILY.xattr.*`` records; ``pax`` adds raw PAX records (they win over
    generated ones). ``linkname`` is a symlink's target or a hardlink's target
    member name. ``sparse=True`` stores ``data`` as a sparse file: every
    all-zero 4 KiB block becomes a hole, written by GNU tar (tarfile cannot
    write sparse members) in the layer's format (old GNU sparse for "gnu", PAX
    1.0 sparse for "pax"); GNU tar writes no uname/gname for it.
    """

    name: str
    kind: Kind = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime_ns: int = DEFAULT_MTIME_NS
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    pax: Mapping[str, str] = field(default_factory=dict)
    sparse: bool = False

    @property
    def perm(self) -> int:
        return _DEFAULT_MODES[self.kind] if self.mode is None else self.mode


def file(name: str, data: bytes | str = b"", **kw: Any) -> Member:
    """A regular file member (``str`` data is UTF-8 encoded)."""
    return Member(name, "file", data.encode() if isinstance(data, str) else data, **kw)


def directory(name: str, **kw: Any) -> Member:
    return Member(name, "dir", **kw)


def symlink(name: str, target: str, **kw: Any) -> Member:
    return Member(name, "symlink", linkname=target, **kw)


def hardlink(name: str, target: str, **kw: Any) -> Member:
    return Member(name, "hardlink", linkname=target, **kw)


def whiteout(path: str) -> Member:
    """The OCI whiteout entry that deletes ``path`` from lower layers."""
    parent, _, base = path.rstrip("/").rpartition("/")
    return Member(f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base)


def opaque(dirpath: str) -> Member:
    """The OCI marker that hides every lower-layer child of ``dirpath``."""
    dirpath = dirpath.strip("/")
    return Member(f"{dirpath}/{OPAQUE_MARKER}" if dirpath else OPAQUE_MARKER)


def make_layer_tar(members: Iterable[Member], format: TarFormat = "pax") -> bytes:
    """Serialise ``members`` in order into an uncompressed tar (no implied entries)."""
    out = bytearray()
    for member in members:
        out += _sparse_member(member, format) if member.sparse else _member(member, format)
    out += bytes(2 * tarfile.BLOCKSIZE)  # end-of-archive marker
    out += bytes(-len(out) % tarfile.RECORDSIZE)  # pad to a full record, as tar(1) does
    return bytes(out)


def _member(member: Member, format: TarFormat) -> bytes:
    info = tarfile.TarInfo(member.name)
    info.type = _TAR_TYPES[member.kind]
    info.mode = member.perm
    info.uid, info.gid = member.uid, member.gid
    info.uname, info.gname = member.uname, member.gname
    info.linkname = member.linkname
    info.devmajor, info.devminor = member.devmajor, member.devminor
    info.size = len(member.data) if member.kind == "file" else 0
    seconds, fraction = divmod(member.mtime_ns, NS)
    info.mtime = seconds
    pax = _pax_records(member, fraction)
    if pax and format != "pax":
        raise ValueError(f"{member.name}: xattrs/sub-second mtime/PAX records need format='pax'")
    info.pax_headers = pax
    header = info.tobuf(_TAR_FORMATS[format], "utf-8", "surrogateescape")
    data = member.data if member.kind == "file" else b""
    return header + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _pax_records(member: Member, fraction_ns: int) -> dict[str, str]:
    pax: dict[str, str] = {}
    if fraction_ns:
        # str(float) would lose nanoseconds; tarfile keeps an existing record.
        pax["mtime"] = f"{member.mtime_ns // NS}.{fraction_ns:09d}"
    for key, value in member.xattrs.items():
        # Binary values survive as surrogate escapes (tarfile then writes
        # hdrcharset=BINARY and the raw bytes).
        pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    pax.update(member.pax)
    return pax


def _sparse_member(member: Member, format: TarFormat) -> bytes:
    if member.kind != "file" or format == "ustar":
        raise ValueError(f"{member.name}: only files in gnu/pax layers can be sparse")
    with tempfile.TemporaryDirectory(prefix="sparse-") as tmp:
        path = Path(tmp, member.name.lstrip("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_with_holes(path, member.data)
        os.chown(path, member.uid, member.gid)
        os.chmod(path, member.perm)
        os.utime(path, ns=(member.mtime_ns, member.mtime_ns))
        command = ["tar", "--create", "--sparse", "--numeric-owner", "--file=-", "-C", tmp]
        if format == "pax":
            # Drop atime/ctime records so the layer is reproducible.
            command += ["--format=posix", "--pax-option=delete=atime,delete=ctime"]
        else:
            command += ["--format=gnu"]
        archive = run([*command, "--", member.name.lstrip("/")]).stdout
    return _without_end_marker(archive)


def _write_with_holes(path: Path, data: bytes, block: int = 4096) -> None:
    with open(path, "wb") as f:
        for start in range(0, len(data), block):
            chunk = data[start : start + block]
            if chunk.count(0) == len(chunk):
                f.seek(len(chunk), os.SEEK_CUR)
            else:
                f.write(chunk)
        f.truncate(len(data))


def _without_end_marker(archive: bytes) -> bytes:
    """The members of a tar archive without its end-of-archive blocks."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        tf.getmembers()
        end = tf.offset
    if archive[end:].count(0) != len(archive) - end:
        raise ValueError("unexpected data after the last tar member")
    return archive[:end]


# --------------------------------------------------------------------------- OCI layout


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


def decompress(blob: bytes) -> bytes:
    kind = sniff(blob[:4])
    if kind == "gzip":
        return gzip.decompress(blob)
    if kind == "zstd":
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as reader:
            return reader.read()
    return blob


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def write_blob(layout: Path, data: bytes, media_type: str) -> dict[str, Any]:
    """Store ``data`` in the layout's blob store; return its descriptor."""
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def write_json_blob(layout: Path, obj: Any, media_type: str) -> dict[str, Any]:
    return write_blob(layout, _json_bytes(obj), media_type)


def read_json_blob(layout: Path, descriptor: Mapping[str, Any]) -> Any:
    return json.loads(blob_path(layout, descriptor["digest"]).read_bytes())


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def init_layout(layout: Path) -> Path:
    """Create an empty OCI image layout (idempotent)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    if not (layout / "index.json").exists():
        _write_index(layout, [])
    return layout


def _read_index(layout: Path) -> dict[str, Any]:
    index: dict[str, Any] = json.loads((layout / "index.json").read_text())
    return index


def _write_index(layout: Path, manifests: list[dict[str, Any]]) -> None:
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    (layout / "index.json").write_bytes(_json_bytes(index))


def platform_object(platform: Platform) -> dict[str, str]:
    os_name, architecture, variant = platform
    obj = {"architecture": architecture, "os": os_name}
    if variant:
        obj["variant"] = variant
    return obj


def write_image(
    layout: Path,
    layers: Sequence[bytes],
    *,
    compression: Sequence[Compression] | Compression = "gzip",
    config: Mapping[str, Any] | None = None,
    platform: Platform = DEFAULT_PLATFORM,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write layer blobs, config and manifest; return the manifest's descriptor.

    ``layers`` are uncompressed tars, base first; ``compression`` is one value
    for all layers or one per layer. The config's ``rootfs.diff_ids`` are
    always computed here; anything else in ``config`` is kept.
    """
    methods = [compression] * len(layers) if isinstance(compression, str) else list(compression)
    if len(methods) != len(layers):
        raise ValueError("need one compression per layer")
    layer_descriptors = [
        write_blob(layout, compress(tar, method), OCI_LAYER[method])
        for tar, method in zip(layers, methods, strict=True)
    ]
    diff_ids = [sha256_digest(tar) for tar in layers]
    config_obj = _image_config(config, diff_ids, platform, history)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": write_json_blob(layout, config_obj, OCI_CONFIG),
        "layers": layer_descriptors,
    }
    descriptor = write_json_blob(layout, manifest, OCI_MANIFEST)
    descriptor["platform"] = platform_object(platform)
    return descriptor


def _image_config(
    config: Mapping[str, Any] | None,
    diff_ids: list[str],
    platform: Platform,
    history: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "created": CREATED,
        **platform_object(platform),
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    }
    obj.update(config or {})
    obj["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    if history is not None:
        obj["history"] = [dict(entry) for entry in history]
    elif "history" not in obj:
        obj["history"] = [
            {"created": CREATED, "created_by": f"tests.builder layer {i}"}
            for i in range(len(diff_ids))
        ]
    return obj


def write_image_index(layout: Path, manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Write an image index blob over ``manifests`` (descriptors with platforms)."""
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [dict(m) for m in manifests]}
    return write_json_blob(layout, index, OCI_INDEX)


def set_tag(layout: Path, descriptor: Mapping[str, Any], tag: str) -> None:
    """Point ``tag`` in index.json at ``descriptor`` (replacing an older entry)."""
    entry = {key: value for key, value in descriptor.items() if key != "platform"}
    entry["annotations"] = {**descriptor.get("annotations", {}), REF_NAME: tag}
    kept = [m for m in _read_index(layout)["manifests"] if _ref_name(m) != tag]
    _write_index(layout, [*kept, entry])


def tag_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    """The index.json entry for ``tag``."""
    for entry in _read_index(layout)["manifests"]:
        if _ref_name(entry) == tag:
            return dict(entry)
    raise KeyError(f"{layout}: no tag {tag!r}")


def _ref_name(entry: Mapping[str, Any]) -> str | None:
    name = entry.get("annotations", {}).get(REF_NAME)
    return str(name) if name is not None else None


def add_tag(layout: Path, tag: str, new_tag: str) -> None:
    """Give the image tagged ``tag`` another tag."""
    set_tag(layout, tag_descriptor(layout, tag), new_tag)


def write_oci_layout(
    dest: Path,
    layers: Sequence[bytes],
    *,
    compression: Sequence[Compression] | Compression = "gzip",
    tag: str = "latest",
    config: Mapping[str, Any] | None = None,
    platform: Platform = DEFAULT_PLATFORM,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write (or add to) an OCI image layout holding one image tagged ``tag``."""
    init_layout(dest)
    descriptor = write_image(
        dest, layers, compression=compression, config=config, platform=platform, history=history
    )
    set_tag(dest, descriptor, tag)
    return dest


def write_multiplatform_layout(
    dest: Path,
    images: Mapping[Platform, Sequence[bytes]],
    *,
    compression: Sequence[Compression] | Compression = "gzip",
    tag: str = "latest",
) -> Path:
    """Write one image per platform and tag an image index over them."""
    init_layout(dest)
    manifests = [
        write_image(dest, layers, compression=compression, platform=platform)
        for platform, layers in images.items()
    ]
    set_tag(dest, write_image_index(dest, manifests), tag)
    return dest


def manifest_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    """The image manifest's descriptor for ``tag`` (an index's first manifest)."""
    descriptor = tag_descriptor(layout, tag)
    if descriptor["mediaType"] == OCI_INDEX:
        descriptor = dict(read_json_blob(layout, descriptor)["manifests"][0])
    return descriptor


def image_manifest(layout: Path, tag: str) -> dict[str, Any]:
    """The image manifest for ``tag`` (an index's first manifest)."""
    manifest: dict[str, Any] = read_json_blob(layout, manifest_descriptor(layout, tag))
    return manifest


def layer_compressions(layout: Path, tag: str) -> list[str]:
    """Each layer's compression, from its leading bytes (media types can lie)."""
    result = []
    for layer in image_manifest(layout, tag)["layers"]:
        with open(blob_path(layout, layer["digest"]), "rb") as f:
            magic = f.read(4)
        result.append(sniff(magic))
    return result


def layer_tars(layout: Path, tag: str) -> Iterator[bytes]:
    """Each layer of ``layout:tag``, decompressed, base first."""
    for layer in image_manifest(layout, tag)["layers"]:
        yield decompress(blob_path(layout, layer["digest"]).read_bytes())


def sniff(magic: bytes) -> str:
    """A blob's compression from its first bytes (media types can lie)."""
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


# --------------------------------------------------------------------------- umoci


def umoci_build(
    dest_layout: Path,
    tag: str,
    steps: Sequence[Callable[[Path], None]],
) -> Path:
    """Build a ``len(steps)``-layer image with umoci, one repack per step.

    Each step gets the rootfs path and changes files in place; ``umoci
    repack`` turns the change into a layer, writing ``.wh.`` whiteouts for
    removals (never opaque markers). ``--refresh-bundle`` lets the next step
    work on the same bundle instead of unpacking again. repack rounds mtimes
    to whole seconds (Go archive/tar's default format), so sub-second times
    set by a step do not reach the image.
    """
    if not (dest_layout / "index.json").exists():
        run(["umoci", "init", "--layout", str(dest_layout)])
    image = f"{dest_layout}:{tag}"
    run(["umoci", "new", "--image", image])
    with tempfile.TemporaryDirectory(prefix="umoci-build-", dir=dest_layout.parent) as tmp:
        bundle = Path(tmp, "bundle")
        run(["umoci", "unpack", "--image", image, str(bundle)])
        for number, step in enumerate(steps, 1):
            step(bundle / "rootfs")
            created_by = f"step {number}: {getattr(step, '__name__', 'step')}"
            repack = ["umoci", "repack", "--refresh-bundle", "--history.created_by", created_by]
            run([*repack, "--image", image, str(bundle)])
    run(["umoci", "gc", "--layout", str(dest_layout)])
    _wait_past_rounded_mtimes()
    return dest_layout


def _wait_past_rounded_mtimes() -> None:
    """Sleep into the next whole second (plus a margin).

    umoci repack rounds mtimes to the *nearest* second, so a file changed at
    12.6 s is stored as 13 s. Once this returns, every mtime in the image lies
    before the clock, so an unpack started afterwards can tell its own
    timestamps (see tests.oracle) from the image's.
    """
    now = time.time()
    time.sleep(math.floor(now) + 1.05 - now)


# --------------------------------------------------------------------------- other shapes


def skopeo_copy(source: str, dest: str, *extra: str) -> None:
    """``skopeo copy``, hermetic (:class:`tests.engines.Skopeo`)."""
    Skopeo().copy(source, dest, *extra)


def to_gzip_layout(layout: Path, tag: str, dest: Path) -> Path:
    """Copy ``layout:tag`` to ``dest:tag`` with every layer gzip-compressed.

    umoci 0.4.7 unpacks only gzip layers, and skopeo will not write a
    docker-archive from zstd layers.
    """
    skopeo_copy(
        f"oci:{layout}:{tag}",
        f"oci:{dest}:{tag}",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
    )
    return dest


def to_oci_archive(layout: Path, tag: str, dest_tar: Path, *, verbatim: bool = False) -> Path:
    """An oci-archive: an OCI layout in a tar.

    skopeo writes one image and gzips uncompressed layers on the way (gzip
    and zstd blobs are kept). ``verbatim`` instead tars the layout directory
    as it is: every tag, every blob unchanged.
    """
    dest_tar.unlink(missing_ok=True)
    if verbatim:
        with tarfile.open(dest_tar, "w") as tf:
            for path in sorted(layout.rglob("*")):
                tf.add(path, arcname=path.relative_to(layout).as_posix(), recursive=False)
    else:
        skopeo_copy(f"oci:{layout}:{tag}", f"oci-archive:{dest_tar}:{tag}")
    return dest_tar


def to_docker_archive(layout: Path, tag: str, dest_tar: Path, name: str = "test/img:tag") -> Path:
    """A legacy ``docker save`` tarball, as skopeo writes it.

    ``manifest.json`` names ``<diffid>.tar`` layers; ``<id>/layer.tar`` are
    symlinks to them. Images with non-gzip layers go through a gzip copy first
    (skopeo will not write a docker-archive from zstd layers).
    """
    dest_tar.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="gzip-", dir=dest_tar.parent) as tmp:
        if set(layer_compressions(layout, tag)) - {"gzip"}:
            layout = to_gzip_layout(layout, tag, Path(tmp, "layout"))
        skopeo_copy(f"oci:{layout}:{tag}", f"docker-archive:{dest_tar}:{name}")
    return dest_tar


def to_docker25_archive(layout: Path, tag: str, dest_tar: Path, name: str = "test/img:tag") -> Path:
    """What Docker 25+ ``docker save`` writes: an OCI layout in a tar.

    Layer blobs are stored uncompressed (media type ``...layer.v1.tar``, digest
    = diff_id), next to ``index.json``, ``oci-layout``, a ``manifest.json``
    whose paths are ``blobs/sha256/<hex>``, and the legacy ``repositories``.
    Entries are in lexical order like moby's ``archive.Tar`` of its temp dir.
    """
    manifest = image_manifest(layout, tag)
    config_bytes = blob_path(layout, manifest["config"]["digest"]).read_bytes()
    files: dict[str, bytes] = {}
    layers = []
    for layer in manifest["layers"]:
        tar = decompress(blob_path(layout, layer["digest"]).read_bytes())
        layers.append(_add_blob(files, tar, OCI_LAYER["none"]))
    config = _add_blob(files, config_bytes, OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
    manifest_descriptor = _add_blob(files, _json_bytes(manifest), OCI_MANIFEST)
    manifest_descriptor["platform"] = _config_platform(json.loads(config_bytes))
    repository, _, reference = name.rpartition(":")
    manifest_descriptor["annotations"] = {
        CONTAINERD_IMAGE_NAME: _full_name(name),
        REF_NAME: reference,
    }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [manifest_descriptor]}
    files["index.json"] = _json_bytes(index)
    files["manifest.json"] = _docker_manifest_json(config, layers, [name], newline=True)
    files["oci-layout"] = _json_bytes({"imageLayoutVersion": OCI_LAYOUT_VERSION})
    top_layer = layers[-1]["digest"].partition(":")[2]
    files["repositories"] = _json_bytes({repository: {reference: top_layer}}) + b"\n"
    write_outer_tar(dest_tar, sorted(files.items()), blob_mode=0o644)
    return dest_tar


def to_ggcr_tarball(
    layout: Path,
    tag: str,
    dest_tar: Path,
    name: str = "test/img:tag",
    *,
    compression: Compression = "gzip",
    tamper: Callable[[int, bytes], bytes] | None = None,
) -> Path:
    """What go-containerregistry's ``tarball.Write`` writes (crane pull, kaniko, ko, jib).

    From ``pkg/v1/tarball/write.go``: the config as ``sha256:<hex>``, each
    layer *compressed* as ``<hex>.tar.gz`` named by the compressed blob's
    digest, and a ``manifest.json`` listing them; the config's
    ``rootfs.diff_ids`` name the uncompressed tars. ``tamper(i, tar)`` may
    replace layer ``i``'s uncompressed tar before it is compressed (its name
    then follows the new compressed bytes, as a writer would make it).
    """
    manifest = image_manifest(layout, tag)
    config_bytes = blob_path(layout, manifest["config"]["digest"]).read_bytes()
    files: list[tuple[str, bytes]] = []
    layer_names = []
    for i, layer in enumerate(manifest["layers"]):
        tar = decompress(blob_path(layout, layer["digest"]).read_bytes())
        if tamper is not None:
            tar = tamper(i, tar)
        blob = compress(tar, compression)
        suffix = ".tar.gz" if compression == "gzip" else ".tar.zst"
        layer_names.append(sha256_digest(blob).partition(":")[2] + suffix)
        files.append((layer_names[-1], blob))
    config_name = manifest["config"]["digest"]
    files.append((config_name, config_bytes))
    entry = {"Config": config_name, "RepoTags": [name], "Layers": layer_names}
    files.append(("manifest.json", _json_bytes([entry])))
    with tarfile.open(dest_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for member_name, data in files:
            info = tarfile.TarInfo(member_name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return dest_tar


def to_containerd_archive(
    layout: Path,
    tag: str,
    dest_tar: Path,
    name: str = "test/img:tag",
    extra_platform: bool = True,
) -> Path:
    """What containerd's image-store export writes (``docker save`` with containerd).

    Blobs keep their compression. ``index.json`` points at an image index;
    with ``extra_platform`` that index also lists a linux/arm64 manifest whose
    manifest, config and layers are *not* in the tar (only one platform was
    exported). Entries are sorted by name as containerd's ``writeTar`` does,
    so ``manifest.json`` comes after the blobs.
    """
    descriptor = manifest_descriptor(layout, tag)
    manifest = image_manifest(layout, tag)
    files: dict[str, bytes] = {}
    for blob in [descriptor, manifest["config"], *manifest["layers"]]:
        files[blob_member(blob)] = blob_path(layout, blob["digest"]).read_bytes()
    config = read_json_blob(layout, manifest["config"])
    platform = _config_platform(config)
    platform_manifests = [_with_platform(descriptor, platform)]
    if extra_platform:
        other = (
            ("linux", "arm64", "v8") if platform["architecture"] != "arm64" else DEFAULT_PLATFORM
        )
        platform_manifests.append(_absent_manifest_descriptor(other))
    index_descriptor = _add_blob(files, _json_bytes(_index(platform_manifests)), OCI_INDEX)
    index_descriptor["annotations"] = {
        CONTAINERD_IMAGE_NAME: _full_name(name),
        REF_NAME: name.rpartition(":")[2],
    }
    files["index.json"] = _json_bytes(_index([index_descriptor]))
    files["manifest.json"] = _docker_manifest_json(
        manifest["config"], manifest["layers"], [name], newline=False
    )
    files["oci-layout"] = _json_bytes({"imageLayoutVersion": OCI_LAYOUT_VERSION})
    write_outer_tar(dest_tar, sorted(files.items()), blob_mode=0o444)
    return dest_tar


def _index(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}


def _with_platform(descriptor: Mapping[str, Any], platform: dict[str, str]) -> dict[str, Any]:
    plain = {k: v for k, v in descriptor.items() if k not in ("annotations", "platform")}
    return {**plain, "platform": platform}


def _absent_manifest_descriptor(platform: Platform) -> dict[str, Any]:
    """A descriptor for another platform's manifest, whose blob we never write."""
    stand_in = _json_bytes({"schemaVersion": 2, "absent platform": list(platform)})
    return {
        "mediaType": OCI_MANIFEST,
        "digest": sha256_digest(stand_in),
        "size": len(stand_in),
        "platform": platform_object(platform),
    }


def _add_blob(files: dict[str, bytes], data: bytes, media_type: str) -> dict[str, Any]:
    descriptor = {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}
    files[blob_member(descriptor)] = data
    return descriptor


def blob_member(descriptor: Mapping[str, Any]) -> str:
    algorithm, _, hexdigest = descriptor["digest"].partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _docker_manifest_json(
    config: Mapping[str, Any],
    layers: Sequence[Mapping[str, Any]],
    repo_tags: list[str],
    *,
    newline: bool,
) -> bytes:
    entry = {
        "Config": blob_member(config),
        "RepoTags": repo_tags,
        "Layers": [blob_member(layer) for layer in layers],
    }
    # moby writes it with json.Encoder (trailing newline), containerd with json.Marshal.
    return _json_bytes([entry]) + (b"\n" if newline else b"")


def _full_name(name: str) -> str:
    """``test/img:tag`` -> ``docker.io/test/img:tag``, as Docker normalises names."""
    repository = name.rpartition(":")[0]
    first = repository.split("/", 1)[0]
    if "/" in repository and ("." in first or ":" in first or first == "localhost"):
        return name
    if "/" not in repository:
        return f"docker.io/library/{name}"
    return f"docker.io/{name}"


def write_outer_tar(dest_tar: Path, files: Iterable[tuple[str, bytes]], blob_mode: int) -> None:
    """Write ``blobs/``, ``blobs/sha256/`` then ``files`` in the order given.

    Like both moby and containerd: mtime 0, owner 0:0, directories 0755, blobs
    ``blob_mode`` (moby 0644, containerd 0444), other files 0644.
    """
    with tarfile.open(dest_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for dirname in ("blobs/", "blobs/sha256/"):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for member_name, data in files:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            info.mode = blob_mode if member_name.startswith("blobs/") else 0o644
            tf.addfile(info, io.BytesIO(data))


def _config_platform(config: Mapping[str, Any]) -> dict[str, str]:
    platform = (config.get("os", ""), config.get("architecture", ""), config.get("variant", ""))
    return platform_object(platform)
