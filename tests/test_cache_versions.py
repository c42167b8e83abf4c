"""One versioning rule for every cache file: bump a version, and exactly its dependents rebuild.

Each case loads an image through the persisted-tree path (scan, index, merge,
write; the build runs in a forked child, which sees the bumped version), bumps
one version, loads again, and checks which cache files were written anew
(another inode: every cache file is published by a rename) and which were
reused, and that the tree served is the same. A stale file is never read: the
new one sits beside it under another name until ``cache prune`` removes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagefs import cachedir
from imagefs.cachedir import FORMATS, FormatVersion
from imagefs.image import Image
from imagefs.layers import index as layer_index
from imagefs.layers.plumbing import cache_path
from imagefs.registry.blobstore import BlobStore
from imagefs.sources import open_image
from imagefs.tree.persisted import load_cached, tree_path
from imagefs.tree.served import walk
from tests import builder
from tests.builder import directory, file


def _image(tmp_path: Path) -> Image:
    layers = [
        builder.make_layer_tar([directory("etc"), file("etc/a", "alpha\n"), file("b", "b" * 9000)]),
        builder.make_layer_tar([builder.whiteout("b"), file("etc/c", "gamma\n")]),
    ]
    gzip = builder.write_oci_layout(tmp_path / "gz", layers[:1], compression="gzip", tag="t")
    zstd = builder.write_oci_layout(tmp_path / "zs", layers, compression="zstd", tag="t")
    # A two-layer image whose base is gzip and top is zstd, so that the gzip
    # checkpoints and the zstd seek file are both in play.
    base, top = open_image(f"oci:{gzip}:t"), open_image(f"oci:{zstd}:t")
    return Image(top.source, top.transport, top.manifest_digest, top.config_digest,
                 top.config, (base.layers[0], top.layers[1]), top.platform)  # fmt: skip


def _files(cache: Path, image: Image) -> dict[str, Path]:
    base, top = image.layers
    return {
        "tarindex": Path(layer_index.index_path(str(cache), base)),
        "gzidx": Path(cache_path(str(cache), base, cachedir.GZIP_INDEX)),
        "zseek": Path(cache_path(str(cache), top, cachedir.ZSTD_SEEK)),
        "tree": tree_path(cache, image),
    }


def _identities(cache: Path, image: Image) -> dict[str, tuple[int, int] | None]:
    found: dict[str, tuple[int, int] | None] = {}
    for kind, path in _files(cache, image).items():
        try:
            st = path.stat()
        except FileNotFoundError:
            found[kind] = None
        else:
            found[kind] = (st.st_ino, st.st_mtime_ns)
    return found


def _listing(image: Image, cache: Path) -> list[tuple[str, int]]:
    loaded = load_cached(image, cache_dir=cache)
    try:
        return sorted((path, inode.size) for path, inode in walk(loaded.tree))
    finally:
        loaded.close()


@pytest.mark.parametrize(
    ("version", "rebuilt"),
    [
        (cachedir.SCANNER, {"tarindex", "tree"}),
        (cachedir.TAR_INDEX, {"tarindex", "tree"}),
        (cachedir.MERGE, {"tree"}),
        (cachedir.TREE, {"tree"}),
        (cachedir.ZSTD_SEEK, {"zseek"}),
        # The tree and tar index stand; opening the layer for reads makes the
        # one pass that writes the new gzip checkpoints.
        (cachedir.GZIP_INDEX, {"gzidx"}),
    ],
    ids=lambda v: v.name if isinstance(v, FormatVersion) else None,
)
def test_bumping_a_version_rebuilds_exactly_its_dependents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: FormatVersion, rebuilt: set[str]
) -> None:
    image = _image(tmp_path)
    cache = tmp_path / "cache"
    served = _listing(image, cache)
    before = _identities(cache, image)
    assert None not in before.values(), before
    old_names = {kind: path.name for kind, path in _files(cache, image).items()}

    monkeypatch.setattr(version, "number", version.number + 1)
    assert _listing(image, cache) == served
    after = _identities(cache, image)
    changed = {kind for kind in before if after[kind] != before[kind]}
    assert changed == rebuilt
    # Rebuilt beside, never over: the stale file keeps its own (old) name.
    stale = {kind: _files(cache, image)[kind].with_name(old_names[kind]) for kind in rebuilt}
    assert all(path.exists() and path not in _files(cache, image).values()
               for path in stale.values())  # fmt: skip

    # cache prune removes every stale version and keeps the current files.
    BlobStore(cache).prune({layer.descriptor.digest for layer in image.layers})
    assert all(path.exists() for path in _files(cache, image).values())
    assert not any(path.exists() for path in stale.values())


def test_every_cache_format_has_a_distinct_tag() -> None:
    tags = [version.tag for version in FORMATS]
    assert len(set(tags)) == len(tags)
    assert cachedir.TREE.tag == "tree1-merge3-scan2-tarindex2-tocindex1-tocparse1"
    assert all(os.sep not in tag and "." not in tag for tag in tags)
