"""Local image sources: SOURCE argument -> :class:`imagefs.image.Image`.

Public surface::

    open_image(source, *, image=None, platform=None, store_root=None,
               allow_modified=False) -> Image
    parse_platform("linux/arm64/v8") -> Platform
    host_platform() -> Platform
    is_local_source(source) -> bool

Modules: ``spec`` (SOURCE parsing), ``tarmembers`` (outer tar index),
``store`` (directory / tar member access), ``manifest`` (JSON validation,
digests, platform selection), ``ocilayout`` (OCI layouts and oci-archives),
``dockerarchive`` (``docker save`` shapes), ``names`` (Docker name
normalisation), ``platform``; host stores: ``containers_storage``,
``docker_store`` (and ``hoststore``, what they share).
"""

from __future__ import annotations

import os
import stat

from imagefs.errors import SourceError, SourceNotFoundError, UsageError
from imagefs.image import Image, Platform
from imagefs.sources.containers_storage import open_containers_storage
from imagefs.sources.docker_store import open_docker_store
from imagefs.sources.dockerarchive import MANIFEST_JSON, open_docker_archive
from imagefs.sources.ocilayout import INDEX_FILE, LAYOUT_FILE, open_layout
from imagefs.sources.platform import host_platform, parse_platform
from imagefs.sources.spec import STORE_TRANSPORTS, is_local_source, parse_source
from imagefs.sources.store import DirStore, TarStore
from imagefs.sources.tarmembers import TarMembers

__all__ = ["host_platform", "is_local_source", "open_image", "parse_platform"]


def open_image(
    source: str,
    *,
    image: str | None = None,
    platform: Platform | None = None,
    store_root: str | None = None,
    allow_modified: bool = False,
) -> Image:
    """Resolve SOURCE (see :mod:`imagefs.sources.spec`) to an Image.

    ``image`` selects an image by name or tag, like a trailing ``:REF`` in
    SOURCE. ``platform`` chooses within image indexes; leave it None unless
    the user asked for one: None means the host's platform for indexes, and
    a docker save archive then yields the image its manifest.json describes.
    Blocks: reads the archive's headers and the manifests, never layer data.

    Host stores (``containers-storage:``, ``docker-store:``) are read at
    ``store_root`` (default: the engine's own); ``allow_modified`` serves
    their layers even where the host changed them (see layers.rebuilt).
    """
    spec = parse_source(source)
    ref = spec.ref
    if image is not None:
        if ref is not None and ref != image:
            raise UsageError(f"{source}: names image {ref!r} but --image says {image!r}")
        ref = image
    if spec.transport in STORE_TRANSPORTS:
        if spec.path and store_root is not None and spec.path != store_root:
            raise UsageError(
                f"{source}: names store {spec.path} but --store-root says {store_root}"
            )
        opener = (
            open_containers_storage if spec.transport == "containers-storage" else open_docker_store
        )
        root = store_root or spec.path or None
        return opener(ref, source=source, store_root=root, allow_modified=allow_modified)
    if store_root is not None or allow_modified:
        raise UsageError(f"{source}: --store-root and --allow-modified are for host stores only")
    wanted = platform if platform is not None else host_platform()
    path = os.path.abspath(spec.path)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"{spec.path}: no such file or directory") from exc
    except OSError as exc:
        raise SourceError(f"{spec.path}: {exc.strerror or exc}") from exc

    if stat.S_ISDIR(st.st_mode):
        if spec.transport not in (None, "oci"):
            raise SourceError(f"{spec.path}: is a directory, not a {spec.transport} tar file")
        store = DirStore(path)
        if store.locate(LAYOUT_FILE) is None:
            raise SourceError(f"{spec.path}: not an OCI image layout (no {LAYOUT_FILE} file)")
        return open_layout(store, source=source, transport="oci", ref=ref, platform=wanted)

    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{spec.path}: neither a directory nor a regular file")
    if spec.transport == "oci":
        raise SourceError(f"{spec.path}: oci: needs a layout directory; for a tar use oci-archive:")
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
