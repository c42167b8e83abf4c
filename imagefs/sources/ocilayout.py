"""OCI image layouts (image-spec ``image-layout.md``), in a directory or a tar.

A layout is an ``oci-layout`` marker, an ``index.json`` (an image index whose
entries are tagged with ``org.opencontainers.image.ref.name``) and
content-addressed ``blobs/<alg>/<hex>``. Resolving an image walks
index.json -> (nested indexes, choosing a platform) -> image manifest ->
config and layers; every manifest, index and config blob is verified against
its digest, layer blobs are only located (the layer reader verifies them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from imagefs.errors import (
    ImageFSError,
    ManifestError,
    SourceError,
    SourceNotFoundError,
)
from imagefs.image import Descriptor, Image, Layer, Platform
from imagefs.sources.manifest import (
    CONTAINERD_NAME,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_INDEX_DEPTH,
    REF_NAME,
    ImageIndex,
    ImageManifest,
    annotation,
    blob_name,
    check_manifest_media_type,
    expect_object,
    get_str,
    load_json,
    locate_blob,
    parse_config,
    parse_manifest_or_index,
    read_blob,
    select_platform,
)
from imagefs.sources.names import names_match
from imagefs.sources.store import Store, read_file

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"


def is_layout(store: Store) -> bool:
    return store.locate(LAYOUT_FILE) is not None and store.locate(INDEX_FILE) is not None


def read_layout_index(store: Store) -> ImageIndex:
    """Check ``oci-layout`` (imageLayoutVersion 1.x) and parse ``index.json``."""
    where = store.where(LAYOUT_FILE)
    data = read_file(store, LAYOUT_FILE, SourceError(f"{where}: missing: not an OCI image layout"))
    marker = expect_object(load_json(data, where), where)
    version = get_str(marker, "imageLayoutVersion", where)
    if version is None or not version.startswith("1."):
        raise ManifestError(f"{where}: unsupported imageLayoutVersion {version!r}")
    where = store.where(INDEX_FILE)
    data = read_file(store, INDEX_FILE, ManifestError(f"{where}: missing"))
    # index.json is an image index whose mediaType may be omitted.
    doc = parse_manifest_or_index(data, where)
    if not isinstance(doc, ImageIndex):
        raise ManifestError(f"{where}: is an image manifest, expected an image index")
    return doc


def entry_names(desc: Descriptor) -> list[str]:
    """The names an index.json entry answers to (tag, and containerd's full name)."""
    return [n for n in (annotation(desc, REF_NAME), annotation(desc, CONTAINERD_NAME)) if n]


def _select_top(index: ImageIndex, ref: str | None, where: str) -> list[Descriptor]:
    """index.json entries for ``ref`` (or all), one per distinct digest.

    Several entries with one digest are one image under several names
    (``docker save a:1 a:latest``). Several unnamed entries are treated as a
    platform list, which some tools write straight into index.json.
    """
    entries = list(index.manifests)
    if ref is not None:
        entries = [d for d in entries if any(names_match(ref, n) for n in entry_names(d))]
        if not entries:
            raise SourceNotFoundError(
                f"{where}: no image named {ref!r}; available: {_list_names(index.manifests)}"
            )
    distinct: dict[str, Descriptor] = {}
    for d in entries:
        distinct.setdefault(d.digest, d)
    if not distinct:
        raise ManifestError(f"{where}: the index lists no images")
    if len(distinct) > 1 and ref is None and any(entry_names(d) for d in distinct.values()):
        raise SourceError(
            f"{where}: holds several images: {_list_names(index.manifests)}; "
            "choose one with PATH:TAG or --image"
        )
    return list(distinct.values())


def _list_names(entries: tuple[Descriptor, ...]) -> str:
    names: list[str] = []
    for d in entries:
        ref_name = annotation(d, REF_NAME) or annotation(d, CONTAINERD_NAME) or d.digest
        if ref_name not in names:
            names.append(ref_name)
    return ", ".join(names) or "none"


def resolve_manifest(
    store: Store,
    desc: Descriptor,
    wanted: Platform,
    where: str,
    absent: Callable[[Descriptor, str], ImageFSError] | None = None,
) -> tuple[Descriptor, ImageManifest]:
    """Follow ``desc`` through nested indexes (choosing ``wanted``) to an image manifest.

    ``absent(desc, where)``: the error for a platform's manifest the store
    does not have (containerd keeps only the platforms it pulled); without
    it, the blob's absence is reported as for any blob.
    """
    for depth in range(MAX_INDEX_DEPTH + 1):
        check_manifest_media_type(desc.media_type, where)
        if absent is not None and depth > 0 and store.locate(blob_name(desc.digest)) is None:
            raise absent(desc, where)
        is_index = desc.media_type in INDEX_TYPES
        data = read_blob(store, desc, "index" if is_index else "manifest", where)
        blob_where = store.where(blob_name(desc.digest))
        doc = parse_manifest_or_index(data, blob_where, desc.media_type)
        if isinstance(doc, ImageManifest):
            return desc, doc
        desc = select_platform(doc.manifests, wanted, blob_where)
        where = blob_where
    raise ManifestError(f"{where}: image indexes nested deeper than {MAX_INDEX_DEPTH} levels")


def build_image(
    store: Store,
    manifest_desc: Descriptor,
    manifest: ImageManifest,
    *,
    source: str,
    transport: str,
) -> Image:
    """Read and verify the config, locate the layers, and assemble the Image."""
    where = store.where(blob_name(manifest_desc.digest))
    config_bytes = read_blob(store, manifest.config, "config", where)
    config = parse_config(config_bytes, store.where(blob_name(manifest.config.digest)))
    if len(config.diff_ids) != len(manifest.layers):
        raise ManifestError(
            f"{where}: {len(manifest.layers)} layers but the config lists "
            f"{len(config.diff_ids)} diff_ids"
        )
    layers = tuple(
        Layer(d, locate_blob(store, d, "layer", where), diff_id)
        for d, diff_id in zip(manifest.layers, config.diff_ids, strict=True)
    )
    return Image(
        source=source,
        transport=transport,
        manifest_digest=manifest_desc.digest,
        config_digest=manifest.config.digest,
        config=config.raw,
        layers=layers,
        platform=config.platform,
    )


def open_layout(
    store: Store, *, source: str, transport: str, ref: str | None, platform: Platform
) -> Image:
    """Resolve the image named ``ref`` (or the only one) for ``platform`` in a layout."""
    index = read_layout_index(store)
    where = store.where(INDEX_FILE)
    top = _select_top(index, ref, where)
    # A single image entry is used whatever its platform: the layout holds
    # exactly one choice. Only indexes (and platform lists) select by platform.
    desc = top[0] if len(top) == 1 else select_platform(top, platform, where)
    manifest_desc, manifest = resolve_manifest(store, desc, platform, where)
    return build_image(store, manifest_desc, manifest, source=source, transport=transport)


def find_manifest_by_config(
    store: Store, config_digest: str
) -> tuple[Descriptor, ImageManifest] | None:
    """The manifest in the layout whose config is ``config_digest``, if any.

    Used for ``docker save`` archives that also carry an OCI layout (Docker
    25+, containerd): manifest.json names the config, the OCI manifest gives
    the layers' media types and (compressed) digests. Manifests and indexes
    whose blobs are absent are skipped: containerd exports keep the whole
    multi-platform index but only the exported platform's blobs.
    """
    index = read_layout_index(store)
    queue: deque[tuple[Descriptor, int, str]] = deque(
        (d, 0, store.where(INDEX_FILE)) for d in index.manifests
    )
    seen: set[str] = set()
    while queue:
        desc, depth, where = queue.popleft()
        if desc.digest in seen or desc.media_type not in MANIFEST_TYPES | INDEX_TYPES:
            continue
        seen.add(desc.digest)
        if store.locate(blob_name(desc.digest)) is None:
            continue
        what = "index" if desc.media_type in INDEX_TYPES else "manifest"
        data = read_blob(store, desc, what, where)
        blob_where = store.where(blob_name(desc.digest))
        doc = parse_manifest_or_index(data, blob_where, desc.media_type)
        if isinstance(doc, ImageIndex):
            if depth >= MAX_INDEX_DEPTH:
                raise ManifestError(
                    f"{blob_where}: image indexes nested deeper than {MAX_INDEX_DEPTH} levels"
                )
            queue.extend((d, depth + 1, blob_where) for d in doc.manifests)
        elif doc.config.digest == config_digest:
            return desc, doc
    return None
