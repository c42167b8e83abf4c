"""``docker save`` archives: ``manifest.json`` plus configs and layers, read in place.

Three shapes are seen in the wild, all starting from ``manifest.json``
(``[{"Config": ..., "RepoTags": [...], "Layers": [...]}]``, Docker's
``image/tarexport``):

* legacy (Docker < 25, skopeo): ``<hex>.json`` configs, uncompressed layers
  at ``<id>/layer.tar`` (skopeo: ``<diffid>.tar``, with ``<id>/layer.tar``
  symlink members pointing at them). No layer digest exists other than the
  diff_id, so the layer descriptor carries the diff_id.
* Docker 25+: the same manifest.json whose paths are ``blobs/sha256/<hex>``
  of an OCI layout stored alongside (``index.json``, ``oci-layout``);
  layers are uncompressed. Docker 25.0.0-25.0.2 save an image given by ID
  with ``"RepoTags": null`` and an index.json of ``"manifests": null``
  (moby#47210): the index has nothing to say, and manifest.json alone
  describes the image.
* containerd image store exports: like Docker 25+ but with the registry's
  compressed blobs, a possibly multi-platform index whose other platforms'
  blobs are absent, and manifest.json written after the blobs.

manifest.json selects the image (by ``RepoTags`` or image ID); when an OCI
manifest in the archive has the same config, its descriptors are used so
that layer media types and compressed digests are known. The index is used
only where it adds something: those descriptors, and other platforms.

go-containerregistry's tarballs (crane, kaniko, ko, jib, apko) are legacy
archives whose config member is named by its digest (``sha256:<hex>``) and
whose layers are the compressed blobs (``<hex>.tar.gz``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from imagefs.digest import Digest, Hasher
from imagefs.errors import (
    BlobMissingError,
    ManifestError,
    PlatformError,
    SourceError,
    SourceNotFoundError,
)
from imagefs.image import BlobRange, Descriptor, Image, Layer, Platform
from imagefs.layers.reader import Compression, sniff_compression
from imagefs.sources.manifest import (
    DOCKER_LAYER_TAR,
    blob_name,
    expect_object,
    get_list,
    load_json,
    parse_config,
)
from imagefs.sources.names import image_id_prefix, names_match
from imagefs.sources.ocilayout import (
    INDEX_FILE,
    build_image,
    entry_names,
    find_manifest_by_config,
    is_layout,
    read_layout_index,
    resolve_manifest,
)
from imagefs.sources.platform import match_rank
from imagefs.sources.store import Store, read_file, read_range

MANIFEST_JSON = "manifest.json"

# Paths that name their content's digest: legacy "<hex>.json" configs (the
# image ID is the config's sha256), OCI layout "blobs/<alg>/<hex>", and the
# layers of go-containerregistry tarballs (crane, kaniko, ko, jib):
# "<hex>.tar.gz" / "<hex>.tar.zst", named by the compressed blob's sha256
# (pkg/v1/tarball/write.go, whose config is "sha256:<hex>"), and skopeo's
# "<diffid>.tar".
_LEGACY_CONFIG_RE = re.compile(r"^(?:([0-9a-f]{64})\.json|sha256:([0-9a-f]{64}))$")
_BLOB_PATH_RE = re.compile(r"^blobs/([a-z0-9]+)/([0-9a-f]+)$")
_NAMED_LAYER_RE = re.compile(r"^(?:.*/)?([0-9a-f]{64})\.tar(?:\.gz|\.zst|\.zstd)?$")
_LAYER_MEDIA_TYPE = {
    Compression.NONE: DOCKER_LAYER_TAR,
    Compression.GZIP: DOCKER_LAYER_TAR + ".gzip",
    Compression.ZSTD: DOCKER_LAYER_TAR + ".zstd",
}


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One element of manifest.json."""

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]

    def label(self) -> str:
        return ", ".join(self.repo_tags) if self.repo_tags else f"untagged ({self.config})"


def _check_path(value: object, where: str) -> str:
    """A manifest.json path must stay inside the archive: relative, no ``..``."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: path must be a non-empty string")
    if value.startswith("/") or ".." in value.split("/") or "\\" in value:
        raise ManifestError(f"{where}: refusing path {value!r} (absolute or with '..')")
    return value


def read_manifest_json(store: Store) -> list[ArchiveEntry]:
    where = store.where(MANIFEST_JSON)
    missing = ManifestError(f"{where}: missing: not a docker save archive")
    doc = load_json(read_file(store, MANIFEST_JSON, missing), where)
    if not isinstance(doc, list):
        raise ManifestError(f"{where}: must be a JSON array of images")
    entries: list[ArchiveEntry] = []
    for i, raw in enumerate(doc):
        ewhere = f"{where}: [{i}]"
        obj = expect_object(raw, ewhere, "entry")
        config = _check_path(obj.get("Config"), f"{ewhere}: Config")
        tags = get_list(obj, "RepoTags", ewhere, required=False)
        if not all(isinstance(t, str) for t in tags):
            raise ManifestError(f"{ewhere}: RepoTags must be strings")
        layers = tuple(
            _check_path(p, f"{ewhere}: Layers[{j}]")
            for j, p in enumerate(get_list(obj, "Layers", ewhere))
        )
        entries.append(ArchiveEntry(config, tuple(tags), layers))
    if not entries:
        raise ManifestError(f"{where}: lists no images")
    return entries


def _select(
    entries: list[ArchiveEntry],
    ref: str | None,
    where: str,
    image_id: Callable[[ArchiveEntry], str],
) -> ArchiveEntry:
    """The image ``ref`` names, as ``docker`` would find it after ``docker load``.

    ``ref`` is a name matched against RepoTags (any spelling of it, see
    :mod:`imagefs.sources.names`), else an image ID or a prefix of one (the
    config's digest, which ``image_id`` gives), or ``@N`` (skopeo's source
    index). Names win over IDs, as in Docker's own lookup.
    """
    if ref is None:
        if len(entries) == 1:
            return entries[0]
        raise SourceError(
            f"{where}: holds several images: {'; '.join(e.label() for e in entries)}; "
            "choose one with --image NAME:TAG"
        )
    if ref.startswith("@") and ref[1:].isdigit():
        n = int(ref[1:])
        if n >= len(entries):
            raise SourceNotFoundError(f"{where}: no image {ref} (it holds {len(entries)})")
        return entries[n]
    for entry in entries:
        if any(names_match(ref, tag) for tag in entry.repo_tags):
            return entry
    prefix = image_id_prefix(ref)
    if prefix is not None:
        by_id: dict[str, ArchiveEntry] = {}
        for entry in entries:
            by_id.setdefault(image_id(entry), entry)  # one image under several entries
        hits = [d for d in by_id if d.startswith("sha256:" + prefix)]
        if len(hits) == 1:
            return by_id[hits[0]]
        if hits:
            raise SourceNotFoundError(
                f"{where}: {ref!r} begins several image IDs: {', '.join(sorted(hits))}"
            )
    raise SourceNotFoundError(
        f"{where}: no image named {ref!r}; available: {'; '.join(e.label() for e in entries)}"
    )


def _path_digest(path: str, where: str) -> Digest | None:
    """The digest a manifest.json path names, if it names one."""
    m = _LEGACY_CONFIG_RE.match(path) or _NAMED_LAYER_RE.match(path)
    if m:
        return Digest(f"sha256:{next(group for group in m.groups() if group)}")
    m = _BLOB_PATH_RE.match(path)
    if m:
        return Digest.parse(f"{m.group(1)}:{m.group(2)}", f"{where}: {path}")
    return None


def _archive_layer(path: str, blob: BlobRange, diff_id: Digest, where: str) -> Layer:
    """A layer listed by manifest.json, trusted by the config's diff_id.

    What manifest.json vouches for is the config (named by its digest), and
    the config's ``rootfs.diff_ids`` name the *uncompressed* tars. A legacy
    layer is such a tar, so its diff_id is its blob digest. A compressed one
    (go-containerregistry tarballs, containerd exports without their OCI
    manifest) is checked twice in its one pass: its diff_id over the
    decompressed stream, and the digest its name gives over the compressed
    bytes (the key of its cache files). A compressed layer whose name gives
    no digest (no known writer does that) has its blob hashed here, so its
    cache files are still keyed by the bytes they describe.
    """
    compression = sniff_compression(read_range(_head(blob), where))
    named = _path_digest(path, where)
    if compression is Compression.NONE:
        digest = named or diff_id
    elif named is not None and named != diff_id:
        digest = named
    else:
        digest = _hash_range(blob, where)
    descriptor = Descriptor(_LAYER_MEDIA_TYPE[compression], digest, blob.length)
    return Layer(descriptor, blob, diff_id, verify_diff_id=digest != diff_id)


def _head(blob: BlobRange) -> BlobRange:
    return dataclasses.replace(blob, length=min(blob.length, 4))


def _hash_range(blob: BlobRange, where: str) -> Digest:
    hasher = Hasher("sha256")
    try:
        fd = blob.open_fd()
    except OSError as exc:
        raise SourceError(f"{where}: cannot open: {exc.strerror or exc}") from exc
    try:
        position, end = blob.offset, blob.offset + blob.length
        while position < end:
            chunk = os.pread(fd, min(1 << 20, end - position), position)
            if not chunk:
                raise SourceError(f"{where}: the archive ends inside this layer")
            hasher.update(chunk)
            position += len(chunk)
    finally:
        os.close(fd)
    return hasher.result()


def _read_config(store: Store, entry: ArchiveEntry, where: str) -> bytes:
    missing = BlobMissingError(f"{where}: config {entry.config} is missing")
    return read_file(store, entry.config, missing)


def open_docker_archive(
    store: Store, *, source: str, ref: str | None, platform: Platform | None = None
) -> Image:
    """Resolve one image of a ``docker save`` archive.

    manifest.json lists one config (one platform) per image, and that is the
    image returned, whatever its platform. Only when ``platform`` is given
    explicitly, differs from that config's, and the archive also carries an
    OCI index (a containerd export of a multi-platform image) is the image
    resolved through the index for ``platform`` instead.
    """
    mwhere = store.where(MANIFEST_JSON)

    def image_id(entry: ArchiveEntry) -> str:
        named = _path_digest(entry.config, mwhere)
        return named or Digest.of(_read_config(store, entry, mwhere))

    entry = _select(read_manifest_json(store), ref, mwhere, image_id)

    cwhere = store.where(entry.config)
    config_bytes = _read_config(store, entry, mwhere)
    named = _path_digest(entry.config, mwhere)
    if named is not None:
        named.verify(config_bytes, where=cwhere, over=f"the config ({len(config_bytes)} bytes)")
    config_digest = named or Digest.of(config_bytes)
    config = parse_config(config_bytes, cwhere)
    if len(config.diff_ids) != len(entry.layers):
        raise ManifestError(
            f"{mwhere}: {entry.label()} has {len(entry.layers)} layers but its config "
            f"lists {len(config.diff_ids)} diff_ids"
        )

    if platform is not None and match_rank(config.platform, platform) is None and is_layout(store):
        return _open_other_platform(store, entry, ref, platform, source=source)

    uses_blobs = any(_BLOB_PATH_RE.match(p) for p in (entry.config, *entry.layers))
    if uses_blobs and is_layout(store):
        found = find_manifest_by_config(store, config_digest)
        if found is not None:
            manifest_desc, manifest = found
            if [blob_name(d.digest) for d in manifest.layers] != list(entry.layers):
                raise ManifestError(
                    f"{mwhere}: layers of {entry.label()} disagree with OCI manifest "
                    f"{manifest_desc.digest}"
                )
            return build_image(
                store, manifest_desc, manifest, source=source, transport="docker-archive"
            )

    layers: list[Layer] = []
    for path, diff_id in zip(entry.layers, config.diff_ids, strict=True):
        blob = store.locate(path)
        if blob is None:
            raise BlobMissingError(f"{mwhere}: layer {path} ({diff_id}) is missing")
        layers.append(_archive_layer(path, blob, diff_id, store.where(path)))
    return Image(
        source=source,
        transport="docker-archive",
        manifest_digest=None,
        config_digest=config_digest,
        config=config.raw,
        layers=tuple(layers),
        platform=config.platform,
    )


def _open_other_platform(
    store: Store, entry: ArchiveEntry, ref: str | None, platform: Platform, *, source: str
) -> Image:
    """The image of ``entry``'s name for ``platform``, through the OCI index.

    containerd exports keep the image's whole index (``io.containerd.image.name``
    / ``org.opencontainers.image.ref.name`` annotations name it); a platform
    whose blobs were not exported ends in BlobMissingError.
    """
    index = read_layout_index(store)
    iwhere = store.where(INDEX_FILE)
    wanted_names = [ref] if ref is not None and not ref.startswith("@") else list(entry.repo_tags)
    matches = [
        d
        for d in index.manifests
        if any(names_match(w, n) for w in wanted_names for n in entry_names(d))
    ]
    if not matches:
        raise PlatformError(
            f"{store.where(MANIFEST_JSON)}: {entry.label()} is only available for its "
            f"config's platform, not {platform}"
        )
    manifest_desc, manifest = resolve_manifest(store, matches[0], platform, iwhere)
    return build_image(store, manifest_desc, manifest, source=source, transport="docker-archive")
