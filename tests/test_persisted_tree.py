"""The persisted tree in use: built once, reused, rebuilt when stale or corrupt."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imagefs.errors import DigestMismatchError
from imagefs.sources import open_image
from imagefs.tree.persisted import load_cached, tree_path
from imagefs.tree.served import lookup_path
from tests import builder
from tests.builder import directory, file
from tests.mounting import IMAGEFS, mounted, run_imagefs
from tests.needs import require_fuse
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
    # No tree was written (the build lock file may remain: it holds no data).
    assert not list((tmp_path / "cache").glob("trees/*.tree"))


def test_loaded_tree_serves_content(tmp_path: Path) -> None:
    layout = small_image(tmp_path, compression="zstd")
    loaded = load_cached(open_image(f"oci:{layout}:t"), cache_dir=tmp_path / "cache")
    try:
        node = lookup_path(loaded.tree, "etc/c")
        assert node is not None
        assert loaded.content.read(node, 0, 100) == b"gamma\n"
        assert lookup_path(loaded.tree, "b") is None
        listing = loaded.tree.listing(1)
        assert listing is not None
        assert [os.fsdecode(name) for name, _ in listing] == ["etc"]
    finally:
        loaded.close()


def test_concurrent_first_mounts_build_the_tree_once(tmp_path: Path) -> None:
    require_fuse()
    layout = small_image(tmp_path, compression="gzip")
    cache = tmp_path / "cache"
    mounts = [tmp_path / f"m{i}" for i in range(3)]
    logs = [tmp_path / f"log{i}" for i in range(3)]
    for mnt in mounts:
        mnt.mkdir()
    processes = [
        subprocess.Popen(
            [*IMAGEFS, "mount", "--quiet", "--debug", f"--log={log}", f"--cache-dir={cache}",
             f"oci:{layout}:t", str(mnt)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for mnt, log in zip(mounts, logs, strict=True)
    ]  # fmt: skip
    try:
        assert [process.wait(timeout=300) for process in processes] == [0, 0, 0]
        assert all((mnt / "etc" / "c").read_text() == "gamma\n" for mnt in mounts)
    finally:
        for mnt in mounts:
            run_imagefs("umount", mnt)
    builds = sum(log.read_text().count("building the index") for log in logs)
    assert builds == 1
