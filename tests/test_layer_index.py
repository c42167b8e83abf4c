"""Per-layer tar indexes: a layer is scanned once, whichever image shares it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

from imagefs.errors import DigestMismatchError
from imagefs.image import Image
from imagefs.layers import index as layer_index
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.progress import Progress
from imagefs.sources import open_image
from imagefs.tree.loader import scan_layer
from tests import builder, images
from tests.builder import directory, file
from tests.mounting import IMAGEFS, mounted, run_imagefs
from tests.needs import require_fuse
from tests.oracle import compare, snapshot

BASE = [directory("etc"), file("etc/os-release", "ID=test\n"), file("bin/sh", b"\x7fELF" * 500)]


def two_images_sharing_a_base(tmp_path: Path, compression: builder.Compression) -> list[str]:
    """Two layouts (so two blob files) whose first layer is the same blob."""
    base = builder.make_layer_tar(BASE)
    sources = []
    for name in ("one", "two"):
        top = builder.make_layer_tar([file(f"etc/{name}", name)])
        layout = builder.write_oci_layout(
            tmp_path / name, [base, top], compression=compression, tag="t"
        )
        sources.append(f"oci:{layout}:t")
    return sources


def assert_refused(source: str, cache: Path, mountpoint: Path) -> None:
    """The base layer's cached index is not served: load and mount fail on the digest."""
    with pytest.raises(DigestMismatchError):
        layer_index.load(str(cache), open_image(source).layers[0])
    mountpoint.mkdir()
    result = run_imagefs("mount", "--quiet", f"--cache-dir={cache}", source, mountpoint)
    assert result.returncode == 1 and "digest" in result.stderr, result.stderr


def scan(image: Image, index: int, cache: Path | None) -> list[TarEntry]:
    layer = image.layers[index]
    return scan_layer(layer, index, len(image.layers), warn=lambda _: None,
                      progress=Progress(False), cache_dir=cache)  # fmt: skip


def test_round_trip_keeps_every_field_of_real_scanner_output(tmp_path: Path) -> None:
    # The edge image has xattrs, PAX sparse files, devices, hardlinks, long
    # and non-UTF-8 names, sub-second mtimes: everything TarEntry can hold.
    layout, tag = images.build_edge(tmp_path)
    image = open_image(f"oci:{layout}:{tag}")
    cache = tmp_path / "cache"
    for index in range(len(image.layers)):
        scanned = scan(image, index, cache)
        assert os.path.exists(layer_index.index_path(str(cache), image.layers[index]))
        loaded = layer_index.load(str(cache), image.layers[index])
        assert loaded is not None
        assert loaded[0] == scanned
    kinds = {e.type for i in range(3) for e in scan(image, i, cache)}
    assert {EntryType.CHAR_DEVICE, EntryType.HARDLINK, EntryType.SYMLINK} <= kinds


def test_names_that_are_not_utf8_round_trip_separately(tmp_path: Path) -> None:
    # A name ending in half a UTF-8 sequence next to a link target starting
    # with its other half: decoded together they would merge into one char.
    entry = TarEntry("a\udcc3", EntryType.SYMLINK, 0o777, 0, 0, 0, 0, "\udca9b")
    layout = builder.write_oci_layout(
        tmp_path / "l", [builder.make_layer_tar([file("x")])], compression="none", tag="t"
    )
    layer = open_image(f"oci:{layout}:t").layers[0]
    layer_index.save(str(tmp_path), layer, [entry], [])
    assert layer_index.load(str(tmp_path), layer) == ([entry], [])


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_second_image_serves_the_shared_layer_from_its_index(
    tmp_path: Path, compression: builder.Compression
) -> None:
    one, two = two_images_sharing_a_base(tmp_path, compression)
    cache = tmp_path / "cache"
    with mounted(one, tmp_path / "m1", cache=cache):
        pass
    base = open_image(two).layers[0]
    entries, warnings = layer_index.load(str(cache), base) or ([], [])
    # Rewrite the cached index with one more entry: only a mount that reads
    # the index, instead of scanning the tar again, can show it.
    marker = TarEntry("etc/from-the-index", EntryType.FILE, 0o644, 0, 0, 0, 0)
    layer_index.save(str(cache), base, [*entries, marker], warnings)
    with mounted(two, tmp_path / "m2", cache=cache) as mnt:
        assert (mnt / "etc" / "from-the-index").exists()
        assert (mnt / "etc" / "two").read_text() == "two"
        assert (mnt / "bin" / "sh").read_bytes() == b"\x7fELF" * 500
    with mounted(two, tmp_path / "m3", cache=tmp_path / "fresh") as mnt:
        assert not (mnt / "etc" / "from-the-index").exists()


def test_reused_index_gives_the_tree_a_scan_gives(tmp_path: Path) -> None:
    one, two = two_images_sharing_a_base(tmp_path, "gzip")
    cache = tmp_path / "cache"
    with mounted(one, tmp_path / "m1", cache=cache):
        pass
    with mounted(two, tmp_path / "m2", cache=cache) as mnt:
        reused = snapshot(mnt)
    with mounted(two, tmp_path / "m3", cache=tmp_path / "fresh") as mnt:
        assert compare(snapshot(mnt), reused) == []


def test_a_blob_that_does_not_match_its_digest_is_refused_despite_the_index(
    tmp_path: Path,
) -> None:
    one, two = two_images_sharing_a_base(tmp_path, "none")
    cache = tmp_path / "cache"
    with mounted(one, tmp_path / "m1", cache=cache):
        pass
    blob = Path(open_image(two).layers[0].blob.path)
    data = bytearray(blob.read_bytes())
    data[data.index(b"ID=test")] = ord("X")  # same size, other content
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    assert_refused(two, cache, tmp_path / "m2")


def test_corrupt_index_is_rescanned_and_rewritten(tmp_path: Path) -> None:
    one, _ = two_images_sharing_a_base(tmp_path, "gzip")
    image = open_image(one)
    cache = tmp_path / "cache"
    scanned = scan(image, 0, cache)
    path = Path(layer_index.index_path(str(cache), image.layers[0]))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert layer_index.load(str(cache), image.layers[0]) is None
    assert scan(image, 0, cache) == scanned
    assert path.read_bytes() != bytes(data)
    assert layer_index.load(str(cache), image.layers[0]) == (scanned, [])


def test_index_of_another_schema_is_not_served(tmp_path: Path) -> None:
    one, _ = two_images_sharing_a_base(tmp_path, "none")
    image = open_image(one)
    cache = tmp_path / "cache"
    scan(image, 0, cache)
    path = Path(layer_index.index_path(str(cache), image.layers[0]))
    schema = f'"schema": {layer_index.INDEX_SCHEMA}'.encode()
    path.write_bytes(path.read_bytes().replace(schema, b'"schema": 99', 1))
    assert layer_index.load(str(cache), image.layers[0]) is None


def test_scan_warnings_are_repeated_when_the_index_is_reused(tmp_path: Path) -> None:
    tar = builder.make_layer_tar([file("a", "a")])
    body = tar.rstrip(b"\0")
    body += b"\0" * (-len(body) % 512)
    # One zero block, then junk: GNU tar stops there, and so does the scanner, with a warning.
    odd = body + b"\0" * 512 + b"junk".ljust(512, b"\0") + b"\0" * 1024
    layout = builder.write_oci_layout(tmp_path / "l", [odd], compression="gzip", tag="t")
    image = open_image(f"oci:{layout}:t")
    cache = tmp_path / "cache"
    first: list[str] = []
    second: list[str] = []
    for seen in (first, second):
        scan_layer(image.layers[0], 0, 1, warn=seen.append, progress=Progress(False),
                   cache_dir=cache)  # fmt: skip
    assert first and first == second
    assert any("zero block" in message for message in first)


def test_a_blob_rewritten_with_its_old_mtime_is_still_verified(tmp_path: Path) -> None:
    # Same inode, same size, mtime set back with utime: only the ctime shows
    # the change, and the index and the tree must not vouch for the new bytes.
    one, _ = two_images_sharing_a_base(tmp_path, "none")
    cache = tmp_path / "cache"
    with mounted(one, tmp_path / "m1", cache=cache):
        pass
    blob = Path(open_image(one).layers[0].blob.path)
    before = blob.stat()
    blob.chmod(0o644)
    with blob.open("r+b") as handle:
        data = handle.read()
        handle.seek(data.index(b"ID=test"))
        handle.write(b"ID=evil")
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    blob.chmod(before.st_mode & 0o7777)
    after = blob.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert_refused(one, cache, tmp_path / "m2")


def blocked_on(lock: Path) -> int:
    """How many flock requests wait on ``lock`` (the "->" lines of /proc/locks)."""
    inode = f":{lock.stat().st_ino} "
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and inode in line)


def test_concurrent_first_mounts_of_images_sharing_a_layer_scan_it_once(tmp_path: Path) -> None:
    require_fuse()
    base = builder.make_layer_tar([file(f"base/f{i}", f"file {i}\n") for i in range(500)])
    cache = tmp_path / "cache"
    sources, mounts, logs = [], [], []
    for name in ("one", "two", "three"):
        top = builder.make_layer_tar([file(f"etc/{name}", name)])
        layout = builder.write_oci_layout(tmp_path / name, [base, top], compression="gzip", tag="t")
        sources.append(f"oci:{layout}:t")
        mounts.append(tmp_path / f"m-{name}")
        logs.append(tmp_path / f"log-{name}")
        mounts[-1].mkdir()
    # Hold the base layer's lock, as a mount scanning it would, until all
    # three mounts wait on it: then they race for it for real.
    cache.mkdir(mode=0o700)
    lock = Path(layer_index.index_path(str(cache), open_image(sources[0]).layers[0]) + ".lock")
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX)
    release = contextlib.ExitStack()
    release.callback(os.close, held)
    processes = [
        subprocess.Popen(
            [*IMAGEFS, "mount", "--quiet", "--debug", f"--log={log}", f"--cache-dir={cache}",
             source, str(mnt)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for source, mnt, log in zip(sources, mounts, logs, strict=True)
    ]  # fmt: skip
    try:
        for _ in range(3000):
            if blocked_on(lock) == 3 or any(p.poll() is not None for p in processes):
                break
            time.sleep(0.02)
        assert blocked_on(lock) == 3, "the mounts do not wait for the layer's lock"
        release.close()
        assert [process.wait(timeout=300) for process in processes] == [0, 0, 0]
        for name, mnt in zip(("one", "two", "three"), mounts, strict=True):
            assert (mnt / "etc" / name).read_text() == name
            assert len(list((mnt / "base").iterdir())) == 500
    finally:
        release.close()
        for mnt in mounts:
            run_imagefs("umount", mnt)
    short = open_image(sources[0]).layers[0].descriptor.digest.split(":")[1][:12]
    text = "".join(log.read_text() for log in logs)
    # One mount scanned the base layer; the two others waited and read its index.
    assert text.count(f"layer sha256:{short}: scanning") == 1, text
    assert text.count(f"layer sha256:{short}: entries from its cached index") == 2, text
