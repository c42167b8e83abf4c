"""``docker-store:REF``: an image in Docker's data root (overlay2 driver), offline.

Docker (``image/`` and ``layer/`` packages of moby) keeps, under the data
root (``/var/lib/docker``)::

    image/overlay2/repositories.json    {"Repositories": {repo: {"repo:tag": "sha256:<id>"}}}
    image/overlay2/imagedb/content/sha256/<id>   the image config (<id> is its sha256)
    image/overlay2/layerdb/sha256/<chain-id>/diff               the layer's diff_id
    image/overlay2/layerdb/sha256/<chain-id>/cache-id           its overlay2 directory name
    image/overlay2/layerdb/sha256/<chain-id>/tar-split.json.gz  its tar-split record
    overlay2/<cache-id>/diff                                    the layer, extracted

A layer is found by its *chain ID* (image-spec ``config.md``, "Layer
ChainID"): ``ChainID(L0) = DiffID(L0)``, ``ChainID(Ln) = sha256(ChainID(Ln-1) +
" " + DiffID(Ln))``. Nothing is locked or written; Docker replaces these files
by rename, so each read sees a whole version.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from imagefs.digest import Digest
from imagefs.errors import ImageFSError, ManifestError, SourceNotFoundError
from imagefs.image import Image
from imagefs.layers.beneath import Beneath
from imagefs.sources.extracted import (
    MAX_CONFIG,
    IndexedImage,
    StoreLayer,
    build_image,
    is_hex_id,
    load_store_json,
    open_store,
    read_store_file,
    resolve_image,
)
from imagefs.sources.hoststore import StoreImage
from imagefs.sources.manifest import expect_object, parse_config

__all__ = [
    "DEFAULT_ROOT",
    "TRANSPORT",
    "chain_ids",
    "is_docker_root",
    "list_docker_images",
    "open_docker_store",
]

TRANSPORT = "docker-store"
DEFAULT_ROOT = "/var/lib/docker"
_IMAGES = "image/overlay2"
_SMALL = 4096  # diff and cache-id files: one line


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of each layer (image-spec config.md)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append(str(Digest.of(f"{chain[-1]} {diff_id}".encode())))
    return chain


def _images(document: Any, where: str) -> list[IndexedImage]:
    obj = expect_object(document, where)
    repositories = expect_object(obj.get("Repositories") or {}, where, "Repositories")
    names: dict[str, list[str]] = {}
    digests: dict[str, list[str]] = {}
    for repo, refs in repositories.items():
        for ref, value in expect_object(refs, f"{where}: {repo}", "repository").items():
            if not isinstance(value, str) or not is_hex_id(value.removeprefix("sha256:")):
                raise ManifestError(f"{where}: {ref}: image ID {value!r} is not sha256:<64 hex>")
            image_id = value.removeprefix("sha256:")
            names.setdefault(image_id, [])
            if "@" in ref:
                digests.setdefault(image_id, []).append(ref.partition("@")[2])
            names[image_id].append(ref)
    return [
        IndexedImage(image_id, tuple(refs), tuple(sorted(set(digests.get(image_id, [])))))
        for image_id, refs in names.items()
    ]


def _all_ids(store: Beneath) -> list[str]:
    """Every image ID in imagedb (untagged images are found by ID too)."""
    content = f"{_IMAGES}/imagedb/content/sha256"
    try:
        return [entry.name for entry in store.listdir(content) if is_hex_id(entry.name)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ManifestError(f"{store.path(content)}: cannot list: {exc.strerror or exc}") from exc


def _small_text(store: Beneath, relpath: str) -> str:
    data = read_store_file(store, relpath, _SMALL, missing="missing")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{store.path(relpath)}: cannot read: {exc}") from exc


def _indexed_images(store: Beneath) -> list[IndexedImage]:
    """The tagged images of repositories.json, then every other image ID of imagedb."""
    repositories = f"{_IMAGES}/repositories.json"
    try:
        named = _images(load_store_json(store, repositories), store.path(repositories))
    except SourceNotFoundError:
        named = []  # no tag at all yet: IDs still resolve
    known = {image.id for image in named}
    return named + [IndexedImage(i, ()) for i in _all_ids(store) if i not in known]


def _verified_config(store: Beneath, image_id: str) -> tuple[bytes, str]:
    """The image's config bytes, checked against its ID, and where they were read."""
    config_at = f"{_IMAGES}/imagedb/content/sha256/{image_id}"
    data = read_store_file(store, config_at, MAX_CONFIG, missing="the image's config is missing")
    where = store.path(config_at)
    Digest(f"sha256:{image_id}").verify(data, where=where, over=f"{len(data)} bytes of config")
    return data, where


def _layer(store: Beneath, chain_id: str, diff_id: str) -> StoreLayer:
    hexid = chain_id.removeprefix("sha256:")
    base = f"{_IMAGES}/layerdb/sha256/{hexid}"
    recorded = _small_text(store, f"{base}/diff")
    if recorded != diff_id:
        raise ManifestError(f"{store.path(base)}/diff: says {recorded!r}, expected {diff_id}")
    cache_id = _small_text(store, f"{base}/cache-id")
    if not re.fullmatch(r"[0-9a-f]{64}", cache_id):
        raise ManifestError(f"{store.path(base)}/cache-id: {cache_id!r} is not 64 hex digits")
    return StoreLayer(
        diff_id=diff_id,
        tarsplit=f"{base}/tar-split.json.gz",
        diff=f"overlay2/{cache_id}/diff",
        label=f"docker layer {hexid[:12]}",
    )


def is_docker_root(root: str) -> bool:
    """Whether ``root`` looks like a Docker data root with the overlay2 driver."""
    try:
        with Beneath(root) as store:
            return store.exists(_IMAGES)
    except OSError:
        return False


def list_docker_images(root: str) -> list[StoreImage]:
    """Every image of the data root, as ``docker images`` lists them (one line per name).

    The digest is the image ID (its config's digest), as docker shows it;
    the size sums the layers' ``size`` files (uncompressed). Configs are
    read only for their creation time and diff_ids, and verified first.
    """
    root = os.path.abspath(root)
    found = []
    with open_store(root, TRANSPORT) as store:
        for image in _indexed_images(store):
            created, size = "", None
            try:
                config = parse_config(*_verified_config(store, image.id))
                raw = config.raw.get("created")
                created = raw if isinstance(raw, str) else ""
                size = 0
                for chain_id in chain_ids(config.diff_ids):
                    text = _small_text(store, f"{_IMAGES}/layerdb/sha256/{chain_id[7:]}/size")
                    size += int(text)
            except (OSError, ValueError, ImageFSError):
                pass  # listed anyway: mounting it reports what is wrong
            for name in [ref for ref in image.names if "@" not in ref] or ["<none>"]:
                found.append(
                    StoreImage(
                        store=TRANSPORT,
                        root=root,
                        namespace="",
                        name=name,
                        digest=f"sha256:{image.id}",
                        media_type="",
                        size=size,
                        created=created,
                    )
                )
    return found


def open_docker_store(
    ref: str | None,
    *,
    source: str,
    store_root: str | None = None,
    allow_modified: bool = False,
) -> Image:
    """The image ``ref`` in the Docker data root ``store_root`` (blocking)."""
    root = os.path.abspath(store_root or DEFAULT_ROOT)
    with open_store(root, TRANSPORT) as store:
        if not store.exists(_IMAGES):
            raise SourceNotFoundError(
                f"{TRANSPORT}:{root}: no {_IMAGES}: not a Docker data root with the overlay2 "
                "storage driver (others, and the containerd image store, are not supported)"
            )
        chosen = resolve_image(ref, _indexed_images(store), f"{TRANSPORT}:{root}")
        # The diff_ids are needed to find the layers, so the config's digest is
        # checked here, before anything is trusted from it (build_image checks it too).
        config_data, config_where = _verified_config(store, chosen.id)
        diff_ids = parse_config(config_data, config_where).diff_ids
        layers = [
            _layer(store, chain_id, diff_id)
            for chain_id, diff_id in zip(chain_ids(diff_ids), diff_ids, strict=True)
        ]
        manifest = chosen.digests[0] if len(chosen.digests) == 1 else ""
        return build_image(
            store,
            source=source,
            transport=TRANSPORT,
            image_id=chosen.id,
            config_data=config_data,
            config_where=config_where,
            layers=layers,
            manifest_digest=manifest,
            allow_modified=allow_modified,
        )
