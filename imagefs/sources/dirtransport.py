"""containers/image's ``dir:`` transport: ``skopeo copy ... dir:PATH``, ``podman save
--format docker-dir``.

A plain directory (containers/image ``directory/directory_transport.go``)::

    version                 "Directory Transport Version: 1.1\\n"
    manifest.json           the manifest as the source served it: Docker v2s2 or OCI;
                            after ``skopeo copy --all``, a manifest list or OCI index
    <hex>.manifest.json     each instance of such a list, named by its digest
    <hex>                   every blob (config and layers), named by its digest's
                            encoded part; version 1.0 (before 2018) named them <hex>.tar
    signature-N             signatures (not read)

Nothing names manifest.json's own digest, so it is the root of trust: its
digest is computed, and everything below it is checked against it as in an
OCI layout (instance manifests and the config by digest and size, layers by
size here and by digest in the layer pass). Layer media types are taken as
written and the layer reader trusts the bytes: ``podman save --format
docker-dir`` labels its uncompressed tars ``diff.tar.gzip``.
"""

from __future__ import annotations

import re

from imagefs.digest import Digest
from imagefs.errors import ManifestError, SourceError, UsageError
from imagefs.image import BlobRange, Descriptor, Image, Platform
from imagefs.sources.manifest import (
    MAX_INDEX_DEPTH,
    ImageManifest,
    blob_name,
    check_manifest_media_type,
    parse_manifest_or_index,
    read_blob,
    select_platform,
)
from imagefs.sources.ocilayout import build_image
from imagefs.sources.store import DirStore, read_file, read_range

MANIFEST_FILE = "manifest.json"
VERSION_FILE = "version"
# directory_dest.go writes the version; the source side never reads it, so a
# directory without one is still read (as 1.1) when ``dir:`` is given.
_VERSION_PREFIX = b"Directory Transport Version: "
_BLOB_SUFFIX = {b"1.0\n": ".tar", b"1.1\n": ""}
_MAX_VERSION_SIZE = 256  # the real file is 33 bytes
_BLOB_NAME_RE = re.compile(r"^blobs/[a-z0-9]+/([0-9a-f]+)$")


class DirTransportStore:
    """A ``dir:`` directory under layout names: ``blobs/<alg>/<hex>`` is the file ``<hex>``.

    That lets :func:`imagefs.sources.ocilayout.build_image` read it as it
    reads any layout. Manifests are not blobs here (``manifest.json``,
    ``<hex>.manifest.json``); :meth:`name_manifest` makes their digests
    name their files, so that messages about them do too.
    """

    def __init__(self, root: str, blob_suffix: str) -> None:
        self._dir = DirStore(root)
        self._suffix = blob_suffix
        self._manifests: dict[str, str] = {}

    def name_manifest(self, digest: Digest, name: str) -> None:
        self._manifests[digest.encoded] = name

    def _file(self, name: str) -> str:
        m = _BLOB_NAME_RE.match(name)
        if m is None:
            return name
        return self._manifests.get(m.group(1)) or m.group(1) + self._suffix

    def locate(self, name: str) -> BlobRange | None:
        return self._dir.locate(self._file(name))

    def where(self, name: str) -> str:
        return self._dir.where(self._file(name))


def read_version(store: DirStore) -> bytes | None:
    """The ``version`` file's version (``b"1.1\\n"``), or None if it is absent or not ours."""
    rng = store.locate(VERSION_FILE)
    if rng is None or rng.length > _MAX_VERSION_SIZE:
        return None
    data = read_range(rng, store.where(VERSION_FILE), limit=_MAX_VERSION_SIZE)
    return data.removeprefix(_VERSION_PREFIX) if data.startswith(_VERSION_PREFIX) else None


def is_dir_transport(store: DirStore) -> bool:
    """What tells a ``dir:`` image without the prefix: its version file and manifest.json."""
    return read_version(store) is not None and store.locate(MANIFEST_FILE) is not None


def open_dir_transport(root: str, *, source: str, ref: str | None, platform: Platform) -> Image:
    """The image of the ``dir:`` directory ``root`` (for ``platform`` if it holds a list)."""
    if ref is not None:
        raise UsageError(f"{source}: a dir: directory holds one image; it takes no name ({ref!r})")
    plain = DirStore(root)
    version = read_version(plain)
    if version is None and plain.locate(VERSION_FILE) is not None:
        raise SourceError(f"{plain.where(VERSION_FILE)}: not a dir: transport version file")
    suffix = _BLOB_SUFFIX.get(version or b"1.1\n")
    if suffix is None:
        shown = (version or b"").decode(errors="replace").strip()
        raise SourceError(
            f"{plain.where(VERSION_FILE)}: unsupported dir: transport version {shown!r} "
            "(1.0 and 1.1 are known)"
        )
    store = DirTransportStore(root, suffix)
    where = store.where(MANIFEST_FILE)
    data = read_file(store, MANIFEST_FILE, SourceError(f"{where}: missing: not a dir: image"))
    doc = parse_manifest_or_index(data, where)
    desc = Descriptor(doc.media_type, Digest.of(data), len(data))
    store.name_manifest(Digest(desc.digest), MANIFEST_FILE)
    for _ in range(MAX_INDEX_DEPTH + 1):
        if isinstance(doc, ImageManifest):
            return build_image(store, desc, doc, source=source, transport="dir")
        desc = select_platform(doc.manifests, platform, where)
        where, data = _read_instance(store, desc, where)
        doc = parse_manifest_or_index(data, where, desc.media_type)
    raise ManifestError(f"{where}: manifest lists nested deeper than {MAX_INDEX_DEPTH} levels")


def _read_instance(store: DirTransportStore, desc: Descriptor, where: str) -> tuple[str, bytes]:
    """An instance of a manifest list: ``<hex>.manifest.json``, checked against ``desc``."""
    check_manifest_media_type(desc.media_type, where)
    digest = Digest.parse(desc.digest, where)
    store.name_manifest(digest, f"{digest.encoded}.manifest.json")
    return store.where(blob_name(digest)), read_blob(store, desc, "manifest", where)
