"""Faults: a daemon killed mid-read, corrupt caches, a full disk, a stalling registry.

Also the security defaults of a mount (nosuid, nodev, no allow_other) and of
the cache (nothing writable by others, whatever the umask).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.cachedir import GZIP_INDEX, ZSTD_SEEK
from imagefs.errors import RegistryUnavailableError
from imagefs.registry.auth import CredentialStore
from imagefs.registry.client import Endpoint, RegistryClient, TransportOptions
from tests import builder
from tests.mounting import is_mounted, mounted, run_imagefs
from tests.needs import require_root, require_tools
from tests.registry import Registry
from tests.test_mount import daemon_pid, wait_for

DATA = random.Random(4).randbytes(1 << 20) * 5  # 5 MiB (zstd: over IN_PLACE_MAX), compressible


def _layout(dest: Path, compression: builder.Compression) -> Path:
    layer = builder.make_layer_tar([builder.file("big", DATA), builder.file("small", "hi\n")])
    return builder.write_oci_layout(dest, [layer], compression=compression)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    require_root()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------- daemon death


def _errno_of(action: object) -> int:
    try:
        action()  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.fuse
def test_daemon_killed_mid_read_then_umount_and_remount(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "layout", "gzip")
    mnt = tmp_path / "mnt"
    errors: list[int] = []
    started = threading.Event()

    def keep_reading() -> None:
        try:
            while True:
                with open(mnt / "big", "rb", buffering=0) as handle:
                    while handle.read(4096):
                        started.set()
                # Drop the page cache's copy so every pass asks the daemon.
                os.posix_fadvise(os.open(mnt / "big", os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            errors.append(exc.errno or 0)

    with mounted(layout, mnt):
        reader = threading.Thread(target=keep_reading)
        reader.start()
        assert started.wait(30)
        os.kill(daemon_pid(mnt), signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive()
        # ENOTCONN once the connection is gone; ECONNABORTED for a request in flight.
        assert errors and errors[0] in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), errors
        wait_for(lambda: _errno_of(lambda: os.listdir(mnt)) == errno.ENOTCONN, "the stale mount")
        result = run_imagefs("umount", mnt)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
    with mounted(layout, mnt):
        assert _sha(mnt / "big") == hashlib.sha256(DATA).hexdigest()


# ------------------------------------------------------------- corrupt caches


@pytest.mark.fuse
@pytest.mark.parametrize(
    ("compression", "damage"), [("gzip", "garbage"), ("zstd", "truncated"), ("zstd", "empty")]
)
def test_corrupt_layer_cache_files_are_rebuilt(
    tmp_path: Path, compression: builder.Compression, damage: str
) -> None:
    layout = _layout(tmp_path / "layout", compression)
    cache = tmp_path / "cache"
    with mounted(layout, tmp_path / "mnt", cache=cache):
        pass
    kind = GZIP_INDEX if compression == "gzip" else ZSTD_SEEK
    files = list(cache.glob(f"*.{kind.tag}"))
    assert len(files) == 1
    good = files[0].read_bytes()
    size = len(good)
    if damage == "garbage":
        files[0].write_bytes(random.Random(1).randbytes(size))
    elif damage == "truncated":
        os.truncate(files[0], size // 2)
    else:
        os.truncate(files[0], 0)
    # The tree is cached too; remove it so the layer is opened as on a cold
    # mount (test_persisted_tree covers a corrupt tree).
    for tree in (cache / "trees").iterdir():
        tree.unlink()
    damaged = files[0].stat().st_ino
    with mounted(layout, tmp_path / "mnt", cache=cache) as mnt:
        assert _sha(mnt / "big") == hashlib.sha256(DATA).hexdigest()
        assert (mnt / "small").read_bytes() == b"hi\n"
    # Rebuilt, not just worked around: a new file (published by a rename,
    # so another inode) holding what the first mount wrote.
    assert files[0].stat().st_ino != damaged
    assert files[0].read_bytes() == good


# ------------------------------------------------------------------ disk full


@pytest.mark.fuse
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_disk_full_local_cache_is_skipped_without_partial_files(
    tmp_path: Path, compression: builder.Compression
) -> None:
    """A full cache only costs time: a warning, no partial file, correct content."""
    layout = _layout(tmp_path / "layout", compression)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _tmpfs(tmp_path / "cache", "64k") as cache:
        result = run_imagefs("mount", f"--cache-dir={cache}", layout, mnt)
        try:
            assert result.returncode == 0, result.stderr
            assert _sha(mnt / "big") == hashlib.sha256(DATA).hexdigest()
        finally:
            run_imagefs("umount", mnt)
        leftovers = [p.name for p in cache.rglob("*") if p.name.endswith(".part")]
        assert leftovers == []
        if compression == "zstd":  # the 5 MB seek file cannot fit
            assert "No space left on device" in result.stderr
            # Once per attempt, not per write: the index pass and the reader
            # each try to cache the seek file.
            assert result.stderr.count("No space left on device") <= 2, result.stderr
            assert not list(cache.glob("*.zseek"))
        assert "Traceback" not in result.stderr


@pytest.mark.fuse
@pytest.mark.tools
def test_disk_full_registry_pull_fails_clearly_and_leaves_no_partial_blob(
    tmp_path: Path,
) -> None:
    require_tools("docker-registry", "skopeo")
    layout = builder.write_oci_layout(
        tmp_path / "layout",
        [builder.make_layer_tar([builder.file("big", os.urandom(1 << 20))])],
        tag="t",
    )
    registry = Registry(tmp_path / "registry")
    try:
        registry.push(f"oci:{layout}:t", "test/full:1")
        with _tmpfs(tmp_path / "cache", "256k") as cache:
            result = run_imagefs(
                "pull", "--quiet", f"--cache-dir={cache}", f"{registry.host}/test/full:1"
            )
            assert result.returncode != 0
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
            assert "Traceback" not in result.stderr
            assert not list(cache.rglob("*.part"))
            blobs = cache / "blobs" / "sha256"
            for blob in blobs.iterdir() if blobs.exists() else ():
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    finally:
        registry.stop()


# ---------------------------------------------------------- registry stalls


@contextlib.contextmanager
def _silent_server(answer: bool) -> Iterator[tuple[str, list[int]]]:
    """Loopback TCP: accepts and stalls (``answer`` False) or drops each connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[int] = []
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(1)
            if answer:
                conn.recv(65536)
                conn.close()  # a dropped connection, no response
            else:
                held.append(conn)  # a stall: never answer

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join()
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("drop", [False, True], ids=["stall", "drop"])
def test_registry_that_stalls_or_drops_is_retried_then_reported(drop: bool) -> None:
    with _silent_server(answer=drop) as (host, accepted):
        client = RegistryClient(
            CredentialStore(),
            TransportOptions(connect_timeout=1, read_timeout=0.3, retries=2, backoff=0),
            sleep=lambda _: None,
        )
        with pytest.raises(RegistryUnavailableError) as info:
            client.get_manifest(Endpoint(host, host, scheme="http"), "repo", "tag")
    message = str(info.value)
    assert host in message and "\n" not in message
    assert ("timed out" in message.lower() or "timeout" in message.lower()) if not drop else True
    assert len(accepted) == 3  # the first attempt and two retries


# ----------------------------------------------------------- security defaults


@pytest.mark.fuse
def test_default_mount_is_ro_nosuid_nodev_without_allow_other(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "layout", "none")
    with mounted(layout, tmp_path / "mnt") as mnt:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(mnt):
                options = set(fields[5].split(","))
                super_options = set(line.split(" - ")[1].split()[2].split(","))
                break
        else:
            raise AssertionError("mount not found")
    assert {"ro", "nosuid", "nodev"} <= options
    assert "allow_other" not in super_options
    assert "default_permissions" in super_options


@pytest.mark.fuse
def test_cache_files_are_not_writable_by_others_whatever_the_umask(tmp_path: Path) -> None:
    layouts = [_layout(tmp_path / c, c) for c in ("gzip", "zstd")]
    cache = tmp_path / "cache"
    old = os.umask(0)
    try:
        for index, layout in enumerate(layouts):
            with mounted(layout, tmp_path / f"mnt{index}", cache=cache):
                pass
    finally:
        os.umask(old)
    paths = [cache, *cache.rglob("*")]
    assert len(paths) > 3
    writable = [
        f"{p} {stat.filemode(p.lstat().st_mode)}"
        for p in paths
        if p.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ]
    assert writable == []
