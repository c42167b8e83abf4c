"""containerd's image store, read offline: ``meta.db`` for names, the content store for blobs.

Under the store root (``/var/lib/containerd``; see containerd's
``core/metadata/buckets.go``, ``images.go`` and ``plugins/content/local/store.go``)::

    io.containerd.metadata.v1.bolt/meta.db      bbolt (imagefs.sources.bbolt), schema v1:
        v1/<namespace>/images/<name>/target/{digest, mediatype, size}
                                    /createdat, /updatedat, /labels/<key>
        v1/<namespace>/content/blob/<digest>/{size, labels/<key>}
    io.containerd.content.v1.content/blobs/<algorithm>/<hex>

Sizes are Go ``binary.PutVarint`` (zigzag) varints, times Go
``time.MarshalBinary``. The content store is shared by all namespaces; each
namespace records which blobs it holds and their labels, among them
``containerd.io/gc.ref.content.*`` (what a manifest keeps alive) and
``containerd.io/gc.ref.snapshot.<snapshotter>`` (the unpacked snapshot of an
image config).

A layer blob can be absent legitimately: with the CRI plugin's
``discard_unpacked_layers`` (or ``ctr content prune references``) containerd
drops the manifest's ``gc.ref.content.l.*`` labels once the image is
unpacked, and the garbage collector deletes the compressed layers; and a
pull for one platform fetches only that platform's manifest and blobs of a
multi-platform index. Both get their own error.

Nothing here writes, locks or follows a symlink inside the store: meta.db
and every blob are opened through :mod:`imagefs.layers.beneath`, meta.db is
read without bbolt's flock (see :func:`imagefs.sources.bbolt.read_consistent`),
so a live containerd and a read-only copy of its root both work.
"""

from __future__ import annotations

import datetime
import errno
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from imagefs.digest import Digest, InvalidDigestError
from imagefs.errors import (
    BlobError,
    BlobMissingError,
    CorruptStoreError,
    InvalidReferenceError,
    SourceError,
    SourceNotFoundError,
)
from imagefs.image import BlobRange, Descriptor, Image, Platform
from imagefs.layers.beneath import Beneath, BeneathFile
from imagefs.reference import parse_reference
from imagefs.sources.bbolt import BoltFile, Bucket, read_consistent
from imagefs.sources.hoststore import StoreImage
from imagefs.sources.manifest import (
    ImageManifest,
    blob_name,
)
from imagefs.sources.names import names_match, normalize_name
from imagefs.sources.ocilayout import build_image, resolve_manifest

__all__ = [
    "DEFAULT_ROOT",
    "TRANSPORT",
    "ContainerdImage",
    "ContentStore",
    "find_image",
    "is_containerd_root",
    "list_containerd_images",
    "open_containerd_image",
    "read_images",
]

TRANSPORT = "containerd"
DEFAULT_ROOT = "/var/lib/containerd"
META_DB = "io.containerd.metadata.v1.bolt/meta.db"
CONTENT_DIR = "io.containerd.content.v1.content"
SCHEMA = b"v1"
T = TypeVar("T")

GC_LAYER_LABEL = "containerd.io/gc.ref.content.l."
GC_SNAPSHOT_LABEL = "containerd.io/gc.ref.snapshot."

# Go's time.MarshalBinary counts seconds from January 1 of year 1.
_GO_UNIX_OFFSET = 62_135_596_800
# A digest or image-ID prefix: sha256:<hex>, @sha256:<hex>, or bare hex (at
# least 4 characters, and only when no image has that name).
_ID_PREFIX = re.compile(r"^@?(?:sha256:)?([0-9a-f]{4,64})$")
_MAX_NAME = 4096  # bytes: containerd refuses longer image names long before this


@dataclass(frozen=True, slots=True)
class ContainerdImage:
    """One record of ``v1/<namespace>/images``: an image name and its target descriptor."""

    namespace: str
    name: str
    target: Descriptor
    created: str  # ISO 8601, UTC; "" when unrecorded
    updated: str
    labels: tuple[tuple[str, str], ...] = ()


# -- meta.db -----------------------------------------------------------------------------------


def _text(raw: bytes, where: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptStoreError(f"{where}: {what} {raw[:64]!r} is not UTF-8") from None


def _varint(raw: bytes, where: str) -> int:
    """Go's binary.Varint: a zigzag-encoded signed LEB128 of at most 10 bytes."""
    value = shift = 0
    for index, byte in enumerate(raw[:10]):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if index + 1 != len(raw):
                break
            return (value >> 1) ^ -(value & 1)
        shift += 7
    raise CorruptStoreError(f"{where}: malformed varint {raw[:16].hex()}")


def _go_time(raw: bytes | None, where: str) -> str:
    """Go's time.MarshalBinary (version 1, or 2 with seconds in the zone offset) as ISO UTC."""
    if raw is None:
        return ""
    if len(raw) not in (15, 16) or raw[0] not in (1, 2):
        raise CorruptStoreError(f"{where}: malformed timestamp {raw[:16].hex()}")
    seconds = int.from_bytes(raw[1:9], "big", signed=True) - _GO_UNIX_OFFSET
    nanos = int.from_bytes(raw[9:13], "big")
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        raise CorruptStoreError(f"{where}: timestamp out of range") from None
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def _labels(bucket: Bucket | None, where: str) -> tuple[tuple[str, str], ...]:
    if bucket is None:
        return ()
    return tuple(
        (_text(key, where, "label"), _text(value, where, "label value"))
        for key, value in bucket.items()
    )


def _read_image(namespace: str, name: str, bucket: Bucket, where: str) -> ContainerdImage:
    where = f"{where}: image {name!r} in namespace {namespace!r}"
    target = bucket.bucket(b"target")
    if target is None:
        raise CorruptStoreError(f"{where}: no target bucket")
    raw_digest, raw_type, raw_size = (target.get(k) for k in (b"digest", b"mediatype", b"size"))
    if raw_digest is None or raw_type is None or raw_size is None:
        raise CorruptStoreError(f"{where}: target lacks its digest, mediatype or size")
    try:
        digest = Digest.parse(_text(raw_digest, where, "digest"), f"{where}: target")
    except InvalidDigestError as exc:
        raise CorruptStoreError(str(exc)) from None
    size = _varint(raw_size, f"{where}: target size")
    if size < 0:
        raise CorruptStoreError(f"{where}: negative target size {size}")
    return ContainerdImage(
        namespace=namespace,
        name=name,
        target=Descriptor(_text(raw_type, where, "media type"), digest, size),
        created=_go_time(bucket.get(b"createdat"), f"{where}: createdat"),
        updated=_go_time(bucket.get(b"updatedat"), f"{where}: updatedat"),
        labels=_labels(bucket.bucket(b"labels"), where),
    )


def _namespaces(db: BoltFile, namespace: str | None) -> Iterable[tuple[str, Bucket]]:
    v1 = db.root().bucket(SCHEMA)
    if v1 is None:
        return  # containerd creates v1 on its first start: a store never started is empty
    if namespace is not None:
        bucket = v1.bucket(namespace.encode())
        if bucket is not None:
            yield namespace, bucket
        return
    for key, bucket in v1.buckets():
        yield _text(key, db.where, "namespace"), bucket


def read_images(db: BoltFile, namespace: str | None = None) -> list[ContainerdImage]:
    """Every image record (of ``namespace``, or of all namespaces), by namespace and name."""
    found: list[ContainerdImage] = []
    for ns, bucket in _namespaces(db, namespace):
        images = bucket.bucket(b"images")
        if images is None:
            continue
        for key, image_bucket in images.buckets():
            if len(key) > _MAX_NAME:
                raise CorruptStoreError(f"{db.where}: an image name of {len(key)} bytes")
            found.append(
                _read_image(ns, _text(key, db.where, "image name"), image_bucket, db.where)
            )
    return found


def _content_labels(db: BoltFile, namespace: str, digest: str) -> dict[str, str] | None:
    """The labels of blob ``digest`` in ``namespace``; None if the namespace has no record."""
    for _, bucket in _namespaces(db, namespace):
        blob = bucket.bucket(b"content")
        blob = blob.bucket(b"blob") if blob is not None else None
        record = blob.bucket(digest.encode()) if blob is not None else None
        if record is None:
            return None
        return dict(_labels(record.bucket(b"labels"), f"{db.where}: content {digest}"))
    return None


# -- the store ---------------------------------------------------------------------------------


class ContentStore:
    """containerd's content store as a :class:`imagefs.sources.store.Store`.

    Names are the OCI layout's ``blobs/<alg>/<hex>`` (the same shape), located
    under ``io.containerd.content.v1.content`` without following symlinks;
    the BlobRanges reopen their file beneath the root each time.
    """

    def __init__(self, tree: Beneath) -> None:
        self.tree = tree

    def locate(self, name: str) -> BlobRange | None:
        relpath = f"{CONTENT_DIR}/{name}"
        try:
            info = self.tree.stat(relpath)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BlobError(
                    f"{self.where(name)}: a parent is a symlink, not followed"
                ) from None
            raise BlobError(f"{self.where(name)}: cannot stat: {exc.strerror or exc}") from exc
        if stat.S_ISLNK(info.st_mode):
            raise BlobError(f"{self.where(name)}: a symlink, not followed")
        if not stat.S_ISREG(info.st_mode):
            raise BlobError(f"{self.where(name)}: not a regular file")
        return BlobRange(
            self.tree.path(relpath), 0, info.st_size, opener=BeneathFile(self.tree.root, relpath)
        )

    def where(self, name: str) -> str:
        return self.tree.path(f"{CONTENT_DIR}/{name}")


def is_containerd_root(root: str) -> bool:
    """Whether ``root`` looks like a containerd root (it has meta.db)."""
    try:
        with Beneath(root) as tree:
            return stat.S_ISREG(tree.stat(META_DB).st_mode)
    except OSError:
        return False


def _open_root(root: str) -> Beneath:
    try:
        tree = Beneath(root)
    except FileNotFoundError:
        raise SourceNotFoundError(f"{root}: no such containerd root directory") from None
    except OSError as exc:
        raise SourceError(f"{root}: cannot open: {exc.strerror or exc}") from exc
    if not tree.exists(META_DB):
        tree.close()
        raise SourceNotFoundError(f"{root}: not a containerd root (no {META_DB})")
    return tree


def _read_meta(tree: Beneath, work: Callable[[BoltFile], T]) -> T:
    where = tree.path(META_DB)

    def open_fd() -> int:
        try:
            return tree.open_file(META_DB)
        except OSError as exc:
            raise CorruptStoreError(f"{where}: cannot open: {exc.strerror or exc}") from exc

    return read_consistent(open_fd, where, work)


# -- references --------------------------------------------------------------------------------


def find_image(images: list[ContainerdImage], ref: str, where: str) -> ContainerdImage:
    """The image ``ref`` names, resolved as ctr and Docker do.

    In order: a name verbatim; the normalised name (``nginx`` is
    ``docker.io/library/nginx:latest``); ``NAME@DIGEST`` as an image of that
    repository with that target digest; and a target-digest prefix
    (``sha256:abcd...``, ``@sha256:...`` or bare hex, as nerdctl's IMAGE ID).
    Several different digests for one reference (across namespaces) are an
    error listing them; one digest under several namespaces is one image.
    """
    matches = [image for image in images if image.name == ref]
    if not matches:
        matches = [image for image in images if names_match(ref, image.name)]
    if not matches and "@" in ref and not ref.startswith("@"):
        matches = _by_repository_digest(images, ref)
    if not matches:
        prefix = _ID_PREFIX.match(ref)
        if prefix is not None:
            matches = [i for i in images if i.target.digest.encoded.startswith(prefix.group(1))]
    if not matches:
        names = sorted({image.name for image in images})
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise SourceNotFoundError(f"{where}: no image {ref!r}; the store has: {shown or 'none'}")
    digests = {image.target.digest for image in matches}
    if len(digests) > 1:
        listed = "; ".join(
            f"{image.namespace}: {image.name} = {image.target.digest}"
            for image in sorted(matches, key=lambda i: (i.namespace, i.name))
        )
        raise SourceError(
            f"{where}: {ref!r} names different images: {listed}; choose one with --namespace "
            "or a digest"
        )
    return sorted(matches, key=lambda i: (i.namespace != "default", i.namespace, i.name))[0]


def _by_repository_digest(images: list[ContainerdImage], ref: str) -> list[ContainerdImage]:
    try:
        wanted = parse_reference(ref)
    except InvalidReferenceError:
        return []
    found = []
    for image in images:
        normal = normalize_name(image.name)
        if normal is None or image.target.digest != wanted.digest:
            continue
        if parse_reference(normal).repository == wanted.repository:
            found.append(image)
    return found


# -- images ------------------------------------------------------------------------------------


def _resolve_manifest(
    store: ContentStore, image: ContainerdImage, wanted: Platform, where: str
) -> tuple[Descriptor, ImageManifest]:
    """Follow the target through indexes to the manifest for ``wanted``; a platform
    manifest absent from the store (containerd fetched only some platforms) is named so."""

    def absent(desc: Descriptor, where: str) -> BlobMissingError:
        return BlobMissingError(
            f"{where}: the {desc.platform or 'selected'} manifest {desc.digest} is not in "
            "the content store: containerd fetched only some platforms of this index "
            "(pass --platform for one that was pulled)"
        )

    return resolve_manifest(store, image.target, wanted, where, absent)


def _check_layers(
    tree: Beneath,
    store: ContentStore,
    *,
    image: ContainerdImage,
    manifest_desc: Descriptor,
    manifest: ImageManifest,
    where: str,
) -> None:
    """BlobMissingError, saying why, when a layer blob is absent."""
    missing = [
        (index, layer)
        for index, layer in enumerate(manifest.layers)
        if store.locate(blob_name(layer.digest)) is None
    ]
    if not missing:
        return
    index, layer = missing[0]
    count = f"{len(missing)} of {len(manifest.layers)} layer blobs are" if len(missing) > 1 else ""

    def labels(db: BoltFile) -> tuple[dict[str, str] | None, dict[str, str] | None]:
        return (
            _content_labels(db, image.namespace, manifest_desc.digest),
            _content_labels(db, image.namespace, manifest.config.digest),
        )

    manifest_labels, config_labels = _read_meta(tree, labels)
    keeps_layers = manifest_labels is not None and any(
        key.startswith(GC_LAYER_LABEL) for key in manifest_labels
    )
    snapshots = sorted(
        key.removeprefix(GC_SNAPSHOT_LABEL)
        for key in (config_labels or {})
        if key.startswith(GC_SNAPSHOT_LABEL)
    )
    subject = count or f"layer {index} blob {layer.digest} is"
    if manifest_labels is not None and not keeps_layers:
        unpacked = f" into the {', '.join(snapshots)} snapshotter" if snapshots else ""
        raise BlobMissingError(
            f"{where}: {subject} not in the content store: containerd discarded the "
            f"compressed layers after unpacking the image{unpacked} "
            "(discard_unpacked_layers, or 'ctr content prune references'); the manifest "
            "no longer references its layers, and imagefs cannot read the extracted snapshots"
        )
    raise BlobMissingError(
        f"{where}: {subject} not in the content store ({store.where(blob_name(layer.digest))} "
        "is absent) although the manifest still references it: removed outside containerd?"
    )


def open_containerd_image(
    ref: str, *, namespace: str | None, store_root: str | None, platform: Platform
) -> Image:
    """The image ``ref`` of the containerd store at ``store_root`` (default /var/lib/containerd).

    ``namespace`` limits the search (default: every namespace). Blocks:
    reads meta.db, the manifests and config, never layer data.
    """
    root = store_root or DEFAULT_ROOT
    source = f"{TRANSPORT}:{ref}"
    with _open_root(root) as tree:
        images = _read_meta(tree, lambda db: read_images(db, namespace))
        scope = f"{root} namespace {namespace}" if namespace else root
        image = find_image(images, ref, f"{source} ({scope})")
        where = f"{source} ({image.namespace}: {image.name})"
        store = ContentStore(tree)
        if store.locate(blob_name(image.target.digest)) is None:
            raise BlobMissingError(
                f"{where}: target {image.target.digest} is not in the content store "
                f"({store.where(blob_name(image.target.digest))} is absent)"
            )
        manifest_desc, manifest = _resolve_manifest(store, image, platform, where)
        _check_layers(
            tree, store, image=image, manifest_desc=manifest_desc, manifest=manifest, where=where
        )
        return build_image(store, manifest_desc, manifest, source=source, transport=TRANSPORT)


# -- listing -----------------------------------------------------------------------------------


def _content_size(store: ContentStore, image: ContainerdImage, platform: Platform) -> int | None:
    """Bytes of the target and its children for ``platform``, as ``ctr images ls`` sums them.

    None when a manifest needed for the sum is absent or unreadable.
    """
    try:
        manifest_desc, manifest = _resolve_manifest(store, image, platform, image.name)
    except (SourceError, BlobError):
        return None
    total = image.target.size + manifest.config.size + sum(d.size for d in manifest.layers)
    if manifest_desc.digest != image.target.digest:
        total += manifest_desc.size
    return total


def list_containerd_images(
    root: str, *, namespace: str | None, platform: Platform
) -> list[StoreImage]:
    """Every image of the containerd store at ``root``, by namespace and name."""
    with _open_root(root) as tree:
        images = _read_meta(tree, lambda db: read_images(db, namespace))
        store = ContentStore(tree)
        return [
            StoreImage(
                store=TRANSPORT,
                root=root,
                namespace=image.namespace,
                name=image.name,
                digest=image.target.digest,
                media_type=image.target.media_type,
                size=_content_size(store, image, platform),
                created=image.created,
            )
            for image in images
        ]
