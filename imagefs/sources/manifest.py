"""Parsing and validating manifests, indexes, configs and descriptors.

Everything read here is untrusted: each document is size-limited, parsed,
type-checked field by field, and (when it is a blob) verified against its
digest before use. Field names and rules follow the OCI image-spec
(``descriptor.md``, ``manifest.md``, ``image-index.md``, ``config.md``) and
Docker's Image Manifest V2 Schema 2, which has the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from imagefs.digest import Digest
from imagefs.errors import (
    BlobMissingError,
    DigestMismatchError,
    ManifestError,
    MediaTypeError,
    PlatformError,
)
from imagefs.image import BlobRange, Descriptor, Platform
from imagefs.sources.platform import match_rank
from imagefs.sources.store import MAX_JSON_SIZE, Store, read_range

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
# The media type of a layer in a legacy ``docker save`` archive (uncompressed tar).
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Annotations (OCI image-spec annotations.md; containerd; BuildKit).
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
# BuildKit marks attestation manifests in an index with this annotation
# (value "attestation-manifest") and the platform unknown/unknown.
DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"

# Image indexes may nest; real images nest at most once or twice. The limit
# stops a hostile layout from recursing (blob cycles need a hash collision,
# but deep chains do not).
MAX_INDEX_DEPTH = 8

_UNKNOWN_PLATFORM = Platform("unknown", "unknown")


# -- digests ------------------------------------------------------------------


def blob_name(digest: Digest) -> str:
    """OCI image-layout: the blob for ``alg:hex`` is ``blobs/<alg>/<hex>``."""
    return f"blobs/{digest.algorithm}/{digest.encoded}"


# -- JSON and typed fields ----------------------------------------------------


def _typename(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def load_json(data: bytes, where: str, *, limit: int = MAX_JSON_SIZE) -> Any:
    """Parse a JSON document, turning every failure into a ManifestError."""
    if len(data) > limit:
        raise ManifestError(
            f"{where}: {len(data)} bytes, refusing a document over {limit // (1 << 20)} MiB"
        )
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: invalid JSON: {exc.msg} at line {exc.lineno}") from exc
    except (ValueError, RecursionError) as exc:
        # Numbers over Python's digit limit, or nesting deeper than the parser allows.
        raise ManifestError(f"{where}: invalid JSON: {exc}") from exc


def expect_object(value: object, where: str, what: str = "document") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: {what} must be a JSON object, not {_typename(value)}")
    return value


def get_str(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ManifestError(f"{where}: missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise ManifestError(f"{where}: field {key!r} must be a string, not {_typename(value)}")
    return value


def require_str(obj: dict[str, Any], key: str, where: str) -> str:
    value = get_str(obj, key, where)
    assert value is not None
    return value


def get_object(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        raise ManifestError(f"{where}: missing field {key!r}")
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: field {key!r} must be an object, not {_typename(value)}")
    return value


def get_list(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> list[Any]:
    value = obj.get(key)
    if value is None:
        if required:
            raise ManifestError(f"{where}: missing field {key!r}")
        return []
    if not isinstance(value, list):
        raise ManifestError(f"{where}: field {key!r} must be an array, not {_typename(value)}")
    return value


def _get_int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if value is None:
        raise ManifestError(f"{where}: missing field {key!r}")
    # bool is an int in Python, not in JSON.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{where}: field {key!r} must be an integer, not {_typename(value)}")
    return value


# -- descriptors --------------------------------------------------------------


def parse_platform_object(value: object, where: str) -> Platform:
    obj = expect_object(value, where, "platform")
    os_name = require_str(obj, "os", f"{where}: platform")
    arch = require_str(obj, "architecture", f"{where}: platform")
    variant = get_str(obj, "variant", f"{where}: platform", required=False) or ""
    return Platform(os_name, arch, variant)


def parse_descriptor(value: object, where: str) -> Descriptor:
    """An OCI content descriptor: mediaType, digest and size are REQUIRED."""
    obj = expect_object(value, where, "descriptor")
    media_type = require_str(obj, "mediaType", where)
    digest = Digest.parse(obj.get("digest"), where)
    size = _get_int(obj, "size", where)
    if size < 0:
        raise ManifestError(f"{where}: negative size {size}")
    annotations: tuple[tuple[str, str], ...] = ()
    raw_ann = obj.get("annotations")
    if raw_ann is not None:
        ann = expect_object(raw_ann, where, "annotations")
        if not all(isinstance(v, str) for v in ann.values()):
            raise ManifestError(f"{where}: annotation values must be strings")
        annotations = tuple(ann.items())
    platform = None
    if obj.get("platform") is not None:
        platform = parse_platform_object(obj["platform"], where)
    return Descriptor(media_type, digest, size, annotations, platform)


def annotation(desc: Descriptor, key: str) -> str | None:
    for k, v in desc.annotations:
        if k == key:
            return v
    return None


# -- manifests and indexes ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageManifest:
    """An OCI image manifest or Docker schema 2 manifest."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class ImageIndex:
    """An OCI image index or Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def check_manifest_media_type(media_type: str, where: str) -> None:
    """Refuse schema 1 (ManifestError) and anything not a manifest or index (MediaTypeError)."""
    if media_type in DOCKER_SCHEMA1:
        raise ManifestError(f"{where}: Docker schema 1 manifests are unsupported")
    if media_type not in MANIFEST_TYPES | INDEX_TYPES:
        raise MediaTypeError(f"{where}: unsupported manifest media type {media_type!r}")


def parse_manifest_or_index(
    data: bytes, where: str, expected_type: str | None = None
) -> ImageManifest | ImageIndex:
    """Parse a manifest or index; ``expected_type`` is the referring descriptor's mediaType.

    OCI image-spec: ``mediaType`` in the document is optional but, when
    present, must agree with the descriptor; ``schemaVersion`` must be 2
    (Docker schema 1 documents have 1 and are refused).
    """
    obj = expect_object(load_json(data, where), where)
    schema = obj.get("schemaVersion")
    declared = get_str(obj, "mediaType", where, required=False)
    if schema == 1 or declared in DOCKER_SCHEMA1 or expected_type in DOCKER_SCHEMA1:
        raise ManifestError(f"{where}: Docker schema 1 manifests are unsupported")
    if declared is not None and expected_type is not None and declared != expected_type:
        raise ManifestError(
            f"{where}: mediaType {declared!r} does not match the descriptor's {expected_type!r}"
        )
    media_type = declared or expected_type
    if media_type is None:
        # No type anywhere (allowed for an OCI index.json): go by shape.
        media_type = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    check_manifest_media_type(media_type, where)
    if _get_int(obj, "schemaVersion", where) != 2:
        raise ManifestError(f"{where}: unsupported schemaVersion {schema}")
    if media_type in INDEX_TYPES:
        # Go's encoding/json writes a nil slice as null: Docker 25.0.0-25.0.2
        # save an image given by ID with "manifests": null in index.json
        # (moby#47210). The key is there and says "no manifests"; read it so.
        present_but_null = obj.get("manifests", ()) is None
        entries = [] if present_but_null else get_list(obj, "manifests", where)
        return ImageIndex(
            media_type,
            tuple(parse_descriptor(e, f"{where}: manifests[{i}]") for i, e in enumerate(entries)),
        )
    config = parse_descriptor(get_object(obj, "config", where), f"{where}: config")
    if config.media_type not in CONFIG_TYPES:
        raise MediaTypeError(
            f"{where}: config media type {config.media_type!r} is not a container image config"
        )
    layers = get_list(obj, "layers", where)
    return ImageManifest(
        media_type,
        config,
        tuple(parse_descriptor(e, f"{where}: layers[{i}]") for i, e in enumerate(layers)),
    )


# -- configs ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config (OCI config.md) imagefs relies on."""

    raw: dict[str, Any]
    platform: Platform
    diff_ids: tuple[Digest, ...]


def parse_config(data: bytes, where: str) -> ImageConfig:
    obj = expect_object(load_json(data, where), where)
    os_name = require_str(obj, "os", where)
    arch = require_str(obj, "architecture", where)
    variant = get_str(obj, "variant", where, required=False) or ""
    rootfs = get_object(obj, "rootfs", where)
    rootfs_type = require_str(rootfs, "type", f"{where}: rootfs")
    if rootfs_type != "layers":
        raise ManifestError(f"{where}: rootfs.type must be 'layers', not {rootfs_type!r}")
    diff_ids = tuple(
        Digest.parse(d, f"{where}: rootfs.diff_ids[{i}]")
        for i, d in enumerate(get_list(rootfs, "diff_ids", f"{where}: rootfs"))
    )
    if obj.get("config") is not None:
        expect_object(obj["config"], f"{where}: config", "config")
    return ImageConfig(obj, Platform(os_name, arch, variant), diff_ids)


# -- reading blobs ------------------------------------------------------------


def locate_blob(store: Store, desc: Descriptor, what: str, where: str) -> BlobRange:
    """Where the blob ``desc`` names is; its size must match the descriptor's.

    ``what`` says what the blob is (layer, config...); ``where`` names the
    document that referenced it, for messages.
    """
    name = blob_name(desc.digest)
    rng = store.locate(name)
    if rng is None:
        raise BlobMissingError(f"{where}: {what} blob {desc.digest} is missing")
    if rng.length != desc.size:
        raise DigestMismatchError(
            f"{store.where(name)}: {what} is {rng.length} bytes, descriptor says {desc.size}"
        )
    return rng


def read_blob(store: Store, desc: Descriptor, what: str, where: str) -> bytes:
    """Read a small blob (manifest, index, config) and verify size and digest."""
    rng = locate_blob(store, desc, what, where)
    name = blob_name(desc.digest)
    data = read_range(rng, store.where(name))
    desc.digest.verify(data, where=store.where(name), over=f"the {what} ({len(data)} bytes)")
    return data


# -- platform selection -------------------------------------------------------


def is_attestation(desc: Descriptor) -> bool:
    return annotation(desc, DOCKER_REFERENCE_TYPE) is not None or desc.platform == _UNKNOWN_PLATFORM


def select_platform(
    entries: tuple[Descriptor, ...] | list[Descriptor], wanted: Platform, where: str
) -> Descriptor:
    """Pick the manifest for ``wanted`` among an index's entries.

    Attestation manifests (BuildKit: ``vnd.docker.reference.type``,
    platform ``unknown/unknown``) and entries that are not manifests or
    indexes (artifacts) are never chosen. A lone entry without a platform is
    taken as is; otherwise the best match wins, ties going to the first
    (image-spec: "the first matching entry SHOULD be used").
    """
    candidates = [
        d
        for d in entries
        if not is_attestation(d) and (d.media_type in MANIFEST_TYPES | INDEX_TYPES)
    ]
    if not candidates:
        kinds = sorted({d.media_type for d in entries}) or ["nothing"]
        for d in entries:
            check_manifest_media_type(d.media_type, where)
        raise ManifestError(f"{where}: no image manifest in index (it holds {', '.join(kinds)})")
    if len(candidates) == 1 and candidates[0].platform is None:
        return candidates[0]
    best: Descriptor | None = None
    best_rank = -1
    for d in candidates:
        if d.platform is None:
            continue
        rank = match_rank(d.platform, wanted)
        if rank is not None and rank > best_rank:
            best, best_rank = d, rank
    if best is None:
        available = sorted({str(d.platform) for d in candidates if d.platform is not None})
        raise PlatformError(
            f"{where}: no manifest for platform {wanted}; available: "
            + (", ".join(available) or "none (entries carry no platform)")
        )
    return best
