"""The persisted tree in use: built once, reused, rebuilt when stale or corrupt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagefs.errors import DigestMismatchError
from imagefs.indexer import load_cached, tree_path
from imagefs.sources import open_image
from tests import builder
from tests.builder import directory, file
from tests.mounting import mounted, run_imagefs
from tests.oracle import compare, snapshot


def small_image(tmp_path: Path, compression: builder.Compression = "gzip") -> Path:
    layers = [
        builder.make_layer_tar([directory("etc"), file("etc/a", "alpha\n"), file("b", "b" * 9000)]),
        builder.make_layer_tar([builder.whiteout("b"), file("etc/c", "gamma\n")]),
    ]
    return builder.write_oci_layout(tmp_path / "layout", layers, compression=compression, tag="t")


def test_second_mount_reuses_the_tree(tmp_path: Path) -> None:
    layout = small_image(tmp_path)
    cache = tmp_path / "cache"
    image = open_image(f"oci:{layout}:t")
    with mounted(f"oci:{layout}:t", tmp_path / "m1", cache=cache) as mnt:
        first = snapshot(mnt)
    tree_file = tree_path(cache, image)
    built = tree_file.stat()
    with mounted(f"oci:{layout}:t", tmp_path / "m2", cache=cache) as mnt:
        assert compare(first, snapshot(mnt)) == []
    reused = tree_file.stat()
    assert (reused.st_ino, reused.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)


def test_corrupt_tree_is_rebuilt_not_served(tmp_path: Path) -> None:
    layout = small_image(tmp_path)
    cache = tmp_path / "cache"
    with mounted(f"oci:{layout}:t", tmp_path / "m1", cache=cache) as mnt:
        first = snapshot(mnt)
    tree_file = tree_path(cache, open_image(f"oci:{layout}:t"))
    data = bytearray(tree_file.read_bytes())
    data[-3] ^= 0xFF
    tree_file.write_bytes(bytes(data))
    with mounted(f"oci:{layout}:t", tmp_path / "m2", cache=cache) as mnt:
        assert compare(first, snapshot(mnt)) == []
    assert tree_file.read_bytes() != bytes(data)


def test_blob_rewritten_after_indexing_is_verified_again(tmp_path: Path) -> None:
    layout = small_image(tmp_path, compression="none")
    cache = tmp_path / "cache"
    with mounted(f"oci:{layout}:t", tmp_path / "m1", cache=cache):
        pass
    manifest = builder.image_manifest(layout, "t")
    blob = builder.blob_path(layout, manifest["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[data.index(b"alpha")] = ord("A")  # same size, other content
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    (tmp_path / "m2").mkdir()
    result = run_imagefs(
        "mount", "--quiet", f"--cache-dir={cache}", f"oci:{layout}:t", tmp_path / "m2"
    )
    assert result.returncode == 1 and "digest" in result.stderr, result.stderr


def test_build_errors_cross_the_process_boundary_with_their_type(tmp_path: Path) -> None:
    layout = small_image(tmp_path, compression="none")
    manifest = builder.image_manifest(layout, "t")
    blob = builder.blob_path(layout, manifest["layers"][1]["digest"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        load_cached(open_image(f"oci:{layout}:t"), cache_dir=tmp_path / "cache")
    assert (
        not any((tmp_path / "cache" / "trees").glob("*"))
        if (tmp_path / "cache" / "trees").exists()
        else True
    )


def test_loaded_tree_serves_content(tmp_path: Path) -> None:
    layout = small_image(tmp_path, compression="zstd")
    loaded = load_cached(open_image(f"oci:{layout}:t"), cache_dir=tmp_path / "cache")
    try:
        node = loaded.tree.resolve("etc/c")
        assert node is not None
        assert loaded.content.read(node.node, 0, 100) == b"gamma\n"
        assert loaded.tree.resolve("b") is None
        root = loaded.tree.get(1)
        assert root is not None and root.listing is not None
        assert [os.fsdecode(name) for name, _ in root.listing] == ["etc"]
    finally:
        loaded.close()
