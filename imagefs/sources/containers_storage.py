"""``containers-storage:REF``: an image in podman's, buildah's or CRI-O's store, offline.

containers/storage with the ``overlay`` driver keeps (paths under the graph
root, ``/var/lib/containers/storage`` for root, else
``$XDG_DATA_HOME/containers/storage``, i.e. ``~/.local/share/...``)::

    overlay-images/images.json          [{id, names, digest, layer, big-data-digests...}]
    overlay-images/<id>/=<base64(key)>  big data: the config under key "sha256:<id>"
    overlay-layers/layers.json          [{id, parent, diff-digest, diff-size...}]
    overlay-layers/<id>.tar-split.gz    the layer's tar-split record
    overlay/<id>/diff                   the layer, extracted

(containers/storage ``images.go``: a big-data key made only of ``[0-9a-z.]``
is its own file name, any other is ``=`` + its standard base64; ``layers.go``.)
An image's ``layer`` is its top layer; ``parent`` links lead down to the
base. Nothing is locked or written: the JSON is read as it is on disk (the
engines replace these files by rename, so a read sees a whole version).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from imagefs.errors import ManifestError, SourceNotFoundError
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
from imagefs.sources.manifest import expect_object, get_list, get_str

__all__ = [
    "TRANSPORT",
    "default_root",
    "is_containers_storage_root",
    "list_containers_storage_images",
    "open_containers_storage",
]

TRANSPORT = "containers-storage"
_DRIVER = "overlay"
_MAX_LAYERS = 4096  # chain length; containers-storage itself stops far below (overlay: 500)


def default_root() -> str:
    """Where podman keeps its store for this user (storage.conf ``graphroot`` defaults)."""
    if os.geteuid() == 0:
        return "/var/lib/containers/storage"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "containers", "storage")


def big_data_name(key: str) -> str:
    """containers/storage ``makeBigDataBaseName``: the file name of a big-data item."""
    if key and all(c == "." or c.isdigit() or "a" <= c <= "z" for c in key):
        return key
    return "=" + base64.standard_b64encode(key.encode()).decode()


def _images(document: Any, where: str) -> list[tuple[IndexedImage, dict[str, Any]]]:
    if not isinstance(document, list):
        raise ManifestError(f"{where}: must be a JSON array of images")
    images = []
    for index, value in enumerate(document):
        at = f"{where}: [{index}]"
        obj = expect_object(value, at, "image")
        image_id = get_str(obj, "id", at)
        if not is_hex_id(image_id):
            raise ManifestError(f"{at}: id {image_id!r} is not 64 hex digits")
        assert image_id is not None
        names = get_list(obj, "names", at, required=False)
        if not all(isinstance(name, str) for name in names):
            raise ManifestError(f"{at}: names must be strings")
        digests = [get_str(obj, "digest", at, required=False)]
        raw = obj.get("big-data-digests")
        if raw is not None:
            for key, value in expect_object(raw, at, "big-data-digests").items():
                if key.startswith("manifest") and isinstance(value, str):
                    digests.append(value)
        found = tuple(sorted({digest for digest in digests if digest}))
        images.append((IndexedImage(image_id, tuple(names), found), obj))
    return images


def _layers(document: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(document, list):
        raise ManifestError(f"{where}: must be a JSON array of layers")
    layers = {}
    for index, value in enumerate(document):
        at = f"{where}: [{index}]"
        obj = expect_object(value, at, "layer")
        layer_id = get_str(obj, "id", at)
        if not is_hex_id(layer_id):
            raise ManifestError(f"{at}: id {layer_id!r} is not 64 hex digits")
        assert layer_id is not None
        layers[layer_id] = obj
    return layers


def _chain(top: str | None, layers: dict[str, dict[str, Any]], where: str) -> list[StoreLayer]:
    """The image's layers, base first, following ``parent`` from the top one."""
    chain: list[StoreLayer] = []
    current = top
    while current:
        if len(chain) >= _MAX_LAYERS:
            raise ManifestError(f"{where}: more than {_MAX_LAYERS} layers (a parent cycle?)")
        obj = layers.get(current)
        if obj is None:
            raise SourceNotFoundError(f"{where}: layer {current} is missing")
        at = f"{where}: layer {current[:12]}"
        diff_id = get_str(obj, "diff-digest", at)
        assert diff_id is not None
        chain.append(
            StoreLayer(
                diff_id=diff_id,
                tarsplit=f"{_DRIVER}-layers/{current}.tar-split.gz",
                diff=f"{_DRIVER}/{current}/diff",
                label=f"podman layer {current[:12]}",
            )
        )
        parent = get_str(obj, "parent", at, required=False)
        if parent is not None and not is_hex_id(parent):
            raise ManifestError(f"{at}: parent {parent!r} is not 64 hex digits")
        current = parent
    chain.reverse()
    return chain


_IMAGES_JSON = f"{_DRIVER}-images/images.json"
_LAYERS_JSON = f"{_DRIVER}-layers/layers.json"


def is_containers_storage_root(root: str) -> bool:
    """Whether ``root`` looks like a containers-storage graph root (overlay driver)."""
    try:
        with Beneath(root) as store:
            return store.exists(_IMAGES_JSON)
    except OSError:
        return False


def list_containers_storage_images(root: str) -> list[StoreImage]:
    """Every image of the store, as ``podman images`` lists them (one line per name).

    The digest is the image ID (its config's digest), as podman shows it;
    the size sums the layers' uncompressed sizes (layers.json ``diff-size``).
    """
    root = os.path.abspath(root)
    with open_store(root, TRANSPORT) as store:
        images = _images(load_store_json(store, _IMAGES_JSON), store.path(_IMAGES_JSON))
        try:
            layers = _layers(load_store_json(store, _LAYERS_JSON), store.path(_LAYERS_JSON))
        except SourceNotFoundError:
            layers = {}
    found = []
    for image, obj in images:
        size: int | None = 0
        top = obj.get("layer")
        try:
            for place in _chain(top if isinstance(top, str) else None, layers, _LAYERS_JSON):
                raw = layers[place.diff.split("/")[1]].get("diff-size")
                size = size + raw if size is not None and isinstance(raw, int) else None
        except (ManifestError, SourceNotFoundError):
            size = None  # listed anyway: mounting it reports what is wrong
        created = obj.get("created")
        for name in image.names or ("<none>",):
            found.append(
                StoreImage(
                    store=TRANSPORT,
                    root=root,
                    namespace="",
                    name=name,
                    digest=f"sha256:{image.id}",
                    media_type="",
                    size=size,
                    created=created if isinstance(created, str) else "",
                )
            )
    return found


def open_containers_storage(
    ref: str | None,
    *,
    source: str,
    store_root: str | None = None,
    allow_modified: bool = False,
) -> Image:
    """The image ``ref`` in the containers-storage store at ``store_root`` (blocking)."""
    root = os.path.abspath(store_root or default_root())
    with open_store(root, TRANSPORT) as store:
        images_at = f"{_DRIVER}-images/images.json"
        if not store.exists(images_at):
            raise SourceNotFoundError(
                f"{TRANSPORT}:{root}: no {images_at}: not a containers-storage store with the "
                "overlay driver (vfs and btrfs stores are not supported)"
            )
        images = _images(load_store_json(store, images_at), store.path(images_at))
        chosen = resolve_image(ref, [image for image, _ in images], f"{TRANSPORT}:{root}")
        obj = next(raw for image, raw in images if image is chosen)
        where = store.path(images_at)
        top = get_str(obj, "layer", f"{where}: image {chosen.id[:12]}", required=False)
        if top is not None and not is_hex_id(top):
            raise ManifestError(f"{where}: image {chosen.id[:12]}: layer {top!r} is not an ID")
        layers_at = f"{_DRIVER}-layers/layers.json"
        layers = _layers(load_store_json(store, layers_at), store.path(layers_at))
        chain = _chain(top, layers, store.path(layers_at))
        config_at = f"{_DRIVER}-images/{chosen.id}/{big_data_name('sha256:' + chosen.id)}"
        config = read_store_file(
            store, config_at, MAX_CONFIG, missing="the image's config is missing"
        )
        manifest = chosen.digests[0] if len(chosen.digests) == 1 else ""
        digest = get_str(obj, "digest", where, required=False)
        return build_image(
            store,
            source=source,
            transport=TRANSPORT,
            image_id=chosen.id,
            config_data=config,
            config_where=store.path(config_at),
            layers=chain,
            manifest_digest=digest or manifest,
            allow_modified=allow_modified,
        )
