"""Local image sources: SOURCE argument -> :class:`imagefs.image.Image`.

Public surface::

    open_image(source, *, image=None, platform=None, namespace=None, store_root=None,
               allow_modified=False) -> Image
    parse_platform("linux/arm64/v8") -> Platform
    host_platform() -> Platform
    is_local_source(source) -> bool
    is_store_source(source) -> bool
    list_store_images(*, store_root=None, namespace=None, platform=None) -> list[StoreImage]

Modules: ``spec`` (SOURCE parsing), ``tarmembers`` (outer tar index),
``store`` (directory / tar member access), ``manifest`` (JSON validation,
digests, platform selection), ``ocilayout`` (OCI layouts and oci-archives),
``dockerarchive`` (``docker save`` shapes), ``dirtransport`` (skopeo's
``dir:``), ``names`` (Docker name normalisation), ``platform``; host stores:
``containerd`` (its metadata, read by ``bbolt``, and content store),
``containers_storage`` and ``docker_store`` (extracted layers rebuilt from
tar-split; ``extracted`` is what they share), ``hoststore`` (what ``imagefs
images`` lists).
"""

from __future__ import annotations

import os
import stat

from imagefs.errors import SourceError, SourceNotFoundError, UsageError
from imagefs.image import Image, Platform
from imagefs.sources import containerd, containers_storage, docker_store
from imagefs.sources.containerd import open_containerd_image
from imagefs.sources.containers_storage import open_containers_storage
from imagefs.sources.dirtransport import is_dir_transport, open_dir_transport
from imagefs.sources.docker_store import open_docker_store
from imagefs.sources.dockerarchive import MANIFEST_JSON, open_docker_archive
from imagefs.sources.hoststore import StoreImage
from imagefs.sources.ocilayout import INDEX_FILE, LAYOUT_FILE, open_layout
from imagefs.sources.platform import host_platform, parse_platform
from imagefs.sources.spec import StoreSpec, is_local_source, parse_source, split_store
from imagefs.sources.store import DirStore, TarStore
from imagefs.sources.tarmembers import TarMembers

__all__ = [
    "StoreImage",
    "host_platform",
    "is_local_source",
    "is_store_source",
    "list_store_images",
    "open_image",
    "parse_platform",
]


def is_store_source(source: str) -> bool:
    """True for an image in a host store (``containerd:REF``)."""
    return split_store(source) is not None


def open_image(
    source: str,
    *,
    image: str | None = None,
    platform: Platform | None = None,
    namespace: str | None = None,
    store_root: str | None = None,
    allow_modified: bool = False,
) -> Image:
    """Resolve SOURCE (see :mod:`imagefs.sources.spec`) to an Image.

    ``image`` selects an image by name or tag, like a trailing ``:REF`` in
    SOURCE. ``platform`` chooses within image indexes; leave it None unless
    the user asked for one: None means the host's platform for indexes, and
    a docker save archive then yields the image its manifest.json describes.
    Host stores (``containerd:``, ``containers-storage:``, ``docker-store:``)
    are read at ``store_root`` (default: the engine's own); ``namespace``
    narrows containerd's search; ``allow_modified`` serves an extracted
    store's layers even where the host changed them (see layers.rebuilt).
    """
    in_store = split_store(source)
    if in_store is not None:
        return _open_store_image(in_store, source, image=image, platform=platform,
                                 namespace=namespace, store_root=store_root,
                                 allow_modified=allow_modified)  # fmt: skip
    if namespace is not None or store_root is not None or allow_modified:
        raise UsageError(
            f"{source}: --namespace, --store-root and --allow-modified are for host stores "
            "(containerd:, containers-storage:, docker-store:)"
        )
    spec = parse_source(source)
    ref = spec.ref
    if image is not None:
        if ref is not None and ref != image:
            raise UsageError(f"{source}: names image {ref!r} but --image says {image!r}")
        ref = image
    wanted = platform if platform is not None else host_platform()
    path = os.path.abspath(spec.path)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"{spec.path}: no such file or directory") from exc
    except OSError as exc:
        raise SourceError(f"{spec.path}: {exc.strerror or exc}") from exc

    if stat.S_ISDIR(st.st_mode):
        if spec.transport not in (None, "oci", "dir"):
            raise SourceError(f"{spec.path}: is a directory, not a {spec.transport} tar file")
        store = DirStore(path)
        has_layout = store.locate(LAYOUT_FILE) is not None
        if spec.transport == "dir" or (
            spec.transport is None and not has_layout and is_dir_transport(store)
        ):
            return open_dir_transport(path, source=source, ref=ref, platform=wanted)
        if not has_layout:
            raise SourceError(
                f"{spec.path}: not an OCI image layout (no {LAYOUT_FILE} file) "
                "nor a dir: image (no version and manifest.json files)"
            )
        return open_layout(store, source=source, transport="oci", ref=ref, platform=wanted)

    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{spec.path}: neither a directory nor a regular file")
    if spec.transport == "oci":
        raise SourceError(f"{spec.path}: oci: needs a layout directory; for a tar use oci-archive:")
    if spec.transport == "dir":
        raise SourceError(
            f"{spec.path}: dir: needs a directory (containers/image's dir: transport)"
        )
    tar = TarStore(TarMembers.index(path))
    has_manifest_json = tar.locate(MANIFEST_JSON) is not None
    has_layout = tar.locate(LAYOUT_FILE) is not None and tar.locate(INDEX_FILE) is not None
    transport = spec.transport
    if transport is None:
        if has_manifest_json:
            # Docker 25+ and containerd exports carry both; manifest.json's
            # RepoTags select the image, the OCI manifest describes its layers.
            transport = "docker-archive"
        elif has_layout:
            transport = "oci-archive"
        else:
            raise SourceError(
                f"{spec.path}: tar holds neither manifest.json (docker save) "
                "nor index.json and oci-layout (OCI archive)"
            )
    if transport == "docker-archive":
        if not has_manifest_json:
            raise SourceError(f"{spec.path}: no manifest.json: not a docker save archive")
        return open_docker_archive(tar, source=source, ref=ref, platform=platform)
    if not has_layout:
        raise SourceError(f"{spec.path}: no index.json and oci-layout: not an OCI archive")
    return open_layout(tar, source=source, transport="oci-archive", ref=ref, platform=wanted)


def _open_store_image(
    spec: StoreSpec,
    source: str,
    *,
    image: str | None,
    platform: Platform | None,
    namespace: str | None,
    store_root: str | None,
    allow_modified: bool,
) -> Image:
    transport = spec.transport
    if image is not None and spec.ref and spec.ref != image:
        raise UsageError(f"{source}: names image {spec.ref!r} but --image says {image!r}")
    ref = spec.ref or image or ""
    if not ref:
        raise UsageError(f"{source}: needs an image reference after '{transport}:'")
    if spec.root and store_root is not None and spec.root != store_root:
        raise UsageError(f"{source}: names store {spec.root} but --store-root says {store_root}")
    root = store_root or spec.root or None
    if transport == "containerd":
        if allow_modified:
            raise UsageError(
                f"{source}: --allow-modified is for extracted stores (containers-storage:, "
                "docker-store:); containerd keeps the blobs themselves"
            )
        wanted = platform if platform is not None else host_platform()
        return open_containerd_image(ref, namespace=namespace, store_root=root, platform=wanted)
    if namespace is not None:
        raise UsageError(f"{source}: --namespace is for containerd: stores only")
    opener = open_containers_storage if transport == "containers-storage" else open_docker_store
    return opener(ref, source=source, store_root=root, allow_modified=allow_modified)


def list_store_images(
    *, store_root: str | None = None, namespace: str | None = None, platform: Platform | None = None
) -> list[StoreImage]:
    """The images of the host stores present (or of the one store at ``store_root``).

    Without ``store_root`` each engine's default root is listed when it exists.
    """
    wanted = platform if platform is not None else host_platform()

    def listed(root: str, *, explicit: bool) -> list[StoreImage] | None:
        if containerd.is_containerd_root(root):
            return containerd.list_containerd_images(root, namespace=namespace, platform=wanted)
        if namespace is not None and explicit:
            raise UsageError(f"{root}: --namespace is for containerd stores only")
        if containers_storage.is_containers_storage_root(root):
            return containers_storage.list_containers_storage_images(root)
        if docker_store.is_docker_root(root):
            return docker_store.list_docker_images(root)
        return None

    if store_root is not None:
        found = listed(store_root, explicit=True)
        if found is None:
            raise SourceNotFoundError(
                f"{store_root}: not a host image store root (no containerd meta.db, no "
                "containers-storage overlay-images/images.json, no Docker image/overlay2)"
            )
        return found
    found = []
    defaults = [containerd.DEFAULT_ROOT, containers_storage.default_root(),
                docker_store.DEFAULT_ROOT]  # fmt: skip
    if namespace is not None:
        defaults = defaults[:1]
    for root in defaults:
        found += listed(root, explicit=False) or []
    return found
