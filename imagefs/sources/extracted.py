"""What the extracted host stores (containers-storage, Docker's overlay2) share.

Reading a store's JSON beneath its root (bounded, never following a
symlink), resolving a user's reference the way the engines do, and turning
a config plus a rebuilt layer per diff_id into an :class:`Image`.

References resolve, in order (as ``podman`` / ``docker image inspect``):

1. a full image ID, with or without ``sha256:``;
2. a name: ``nginx`` is ``docker.io/library/nginx:latest`` (Docker's
   normalisation, :mod:`imagefs.reference`); podman also tags local builds
   ``localhost/NAME:TAG``, which an unqualified NAME finds; ``NAME@DIGEST``
   matches an image of that repository pulled by that manifest digest;
3. a manifest digest alone (``sha256:...`` that is no image ID);
4. a unique prefix (at least 4 hex digits) of an image ID.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagefs.digest import Digest
from imagefs.errors import ManifestError, SourceError, SourceNotFoundError
from imagefs.image import BlobRange, Descriptor, Image, Layer
from imagefs.layers.beneath import Beneath
from imagefs.layers.rebuilt import RebuiltTar
from imagefs.reference import DOCKER_HUB, parse_reference
from imagefs.sources.manifest import load_json, parse_config
from imagefs.sources.names import normalize_name

__all__ = [
    "MAX_CONFIG",
    "MAX_INDEX",
    "OCI_LAYER_TAR",
    "IndexedImage",
    "StoreLayer",
    "build_image",
    "is_hex_id",
    "load_store_json",
    "open_store",
    "resolve_image",
]

# images.json / repositories.json hold every image of the host: allow many.
MAX_INDEX = 64 << 20
MAX_CONFIG = 8 << 20  # an image config (kilobytes in practice)
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_HEX_ID = re.compile(r"[0-9a-f]{64}")
_MIN_PREFIX = 4


def is_hex_id(value: object) -> bool:
    """A 64-hex-digit ID: the only shape that may become a path in a store."""
    return isinstance(value, str) and _HEX_ID.fullmatch(value) is not None


def open_store(root: str, what: str) -> Beneath:
    """The store directory, opened for reading beneath it; SourceNotFoundError if absent."""
    try:
        return Beneath(root)
    except FileNotFoundError:
        raise SourceNotFoundError(f"{what} store {root}: no such directory") from None
    except OSError as exc:
        raise SourceError(f"{what} store {root}: cannot open: {exc.strerror or exc}") from exc


def read_store_file(
    store: Beneath, relpath: str, limit: int, *, missing: str = "no such file"
) -> bytes:
    """A file of the store, read beneath its root (no symlink followed), bounded.

    SourceNotFoundError (``missing`` says what its absence means) if it is
    not there; ManifestError if it cannot be read.
    """
    try:
        return store.read(relpath, limit)
    except FileNotFoundError:
        raise SourceNotFoundError(f"{store.path(relpath)}: {missing}") from None
    except OSError as exc:
        raise ManifestError(f"{store.path(relpath)}: cannot read: {exc.strerror or exc}") from exc


def load_store_json(store: Beneath, relpath: str, limit: int = MAX_INDEX) -> Any:
    """A JSON file of the store, read as :func:`read_store_file` does."""
    return load_json(read_store_file(store, relpath, limit), store.path(relpath), limit=limit)


@dataclass(frozen=True, slots=True)
class IndexedImage:
    """An image as an extracted store's own index lists it (images.json, repositories.json)."""

    id: str  # 64 hex: the config digest's hex
    names: tuple[str, ...]  # as the engine stored them ("nginx:latest", "docker.io/...")
    digests: tuple[str, ...] = ()  # manifest digests it was pulled by


@dataclass(frozen=True, slots=True)
class StoreLayer:
    """Where one layer of an image is in the store (paths relative to the store root)."""

    diff_id: str
    tarsplit: str
    diff: str
    label: str  # "podman layer 1234abcd5678" for messages


def _name_candidates(ref: str) -> set[str]:
    """Fully qualified forms ``ref`` may mean (podman: ``localhost/`` for local builds)."""
    out = set()
    normal = normalize_name(ref)
    if normal is not None:
        out.add(normal)
        parsed = parse_reference(ref)
        if parsed.domain == DOCKER_HUB and not ref.startswith(DOCKER_HUB):
            local = normalize_name(f"localhost/{ref}")
            if local is not None:
                out.add(local)
    return out


def resolve_image(ref: str | None, images: Sequence[IndexedImage], where: str) -> IndexedImage:
    """The image ``ref`` names among ``images`` (see the module docstring)."""
    if not ref:
        raise SourceNotFoundError(f"{where}: name an image (NAME[:TAG], NAME@DIGEST or an ID)")
    bare = ref.removeprefix("sha256:")
    if is_hex_id(bare):
        for image in images:
            if image.id == bare:
                return image
    wanted = _name_candidates(ref)
    by_name = [
        image
        for image in images
        if any(normalize_name(name) in wanted or name == ref for name in image.names)
    ]
    if not by_name and "@" in ref:
        repository, _, digest = ref.partition("@")
        repos = {
            parse_reference(candidate).repository for candidate in _name_candidates(repository)
        }
        by_name = [
            image
            for image in images
            if digest in image.digests
            and any(
                normalize_name(name) is not None and parse_reference(name).repository in repos
                for name in image.names
            )
        ]
    if by_name:
        return _one(by_name, ref, where)
    if ref.startswith("sha256:") and is_hex_id(bare):
        by_digest = [image for image in images if ref in image.digests]
        if by_digest:
            return _one(by_digest, ref, where)
    if len(bare) >= _MIN_PREFIX and re.fullmatch(r"[0-9a-f]+", bare):
        by_prefix = [image for image in images if image.id.startswith(bare)]
        if by_prefix:
            return _one(by_prefix, ref, where)
    known = sorted({name for image in images for name in image.names})
    listed = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
    raise SourceNotFoundError(f"{where}: no image {ref!r} (it has: {listed or 'no named images'})")


def _one(found: Sequence[IndexedImage], ref: str, where: str) -> IndexedImage:
    ids = sorted({image.id for image in found})
    if len(ids) > 1:
        short = ", ".join(image_id[:12] for image_id in ids)
        raise SourceNotFoundError(f"{where}: {ref!r} is ambiguous: images {short}")
    return found[0]


def build_image(
    store: Beneath,
    *,
    source: str,
    transport: str,
    image_id: str,
    config_data: bytes,
    config_where: str,
    layers: Sequence[StoreLayer],
    manifest_digest: str,
    allow_modified: bool,
) -> Image:
    """The Image: config verified against the image ID, a rebuilt tar per diff_id."""
    config_digest = Digest(f"sha256:{image_id}")
    config_digest.verify(
        config_data, where=config_where, over=f"{len(config_data)} bytes of config"
    )
    config = parse_config(config_data, config_where)
    if len(config.diff_ids) != len(layers):
        raise ManifestError(
            f"{config_where}: {len(config.diff_ids)} diff_ids, but the store has "
            f"{len(layers)} layers for image {image_id[:12]}"
        )
    built = []
    for index, (diff_id, place) in enumerate(zip(config.diff_ids, layers, strict=True)):
        if place.diff_id != diff_id:
            raise ManifestError(
                f"{config_where}: diff_ids[{index}] is {diff_id}, but the store's layer "
                f"{place.label} says {place.diff_id}"
            )
        rebuilt = RebuiltTar(
            store.root, place.tarsplit, place.diff, label=place.label,
            allow_modified=allow_modified,
        )  # fmt: skip
        descriptor = Descriptor(OCI_LAYER_TAR, diff_id, rebuilt.size)
        blob = BlobRange(rebuilt.where_record, 0, rebuilt.size, assembly=rebuilt)
        built.append(Layer(descriptor, blob, diff_id))
    return Image(
        source=source,
        transport=transport,
        manifest_digest=(
            Digest.parse(manifest_digest, f"{source}: the store's manifest digest")
            if manifest_digest
            else None
        ),
        config_digest=config_digest,
        config=config.raw,
        layers=tuple(built),
        platform=config.platform,
    )
