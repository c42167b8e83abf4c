"""Real mounts, read through the kernel, compared with ``umoci unpack``.

Each catalog image is mounted in every source shape (OCI layout, oci-archive,
legacy docker save, Docker 25+ save, containerd export) and its snapshot
(type, mode, owner, size, content hash, symlink target, xattrs, mtime, device
numbers, hardlink grouping and link counts) must equal umoci's unpack.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import builder
from tests.builder import directory, file
from tests.images import SHAPES, BuiltImage, ShapesFor
from tests.mounting import IMAGEFS, is_mounted, mounted, run_imagefs
from tests.needs import require_fuse
from tests.oracle import Oracle, compare, snapshot


def mount_and_compare(source: str, oracle: Oracle, tmp_path: Path) -> int:
    with mounted(source, tmp_path / "mnt", log=tmp_path / "imagefs.log") as mnt:
        actual = snapshot(mnt)
    differences = compare(oracle.records, actual)
    report = os.environ.get("IMAGEFS_COMPARE_LOG")
    if report:  # for issue notes: which test compared how many paths, with what result
        with open(report, "a") as out:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            out.write(json.dumps({"test": test, "paths": len(actual),
                                  "differences": len(differences)}) + "\n")  # fmt: skip
    assert differences == [], "\n".join(differences[:50])
    log = (tmp_path / "imagefs.log").read_text()
    assert "ERROR" not in log, log
    return len(actual)


@pytest.mark.parametrize("shape", SHAPES)
def test_basic_image_matches_umoci(
    shape: str,
    basic_image: BuiltImage,
    basic_oracle: Oracle,
    image_shapes: ShapesFor,
    tmp_path: Path,
) -> None:
    compared = mount_and_compare(image_shapes(basic_image)[shape], basic_oracle, tmp_path)
    assert compared == len(basic_oracle.records) > 20


@pytest.mark.parametrize("shape", SHAPES)
def test_edge_image_matches_umoci(
    shape: str,
    edge_image: BuiltImage,
    edge_oracle: Oracle,
    image_shapes: ShapesFor,
    tmp_path: Path,
) -> None:
    compared = mount_and_compare(image_shapes(edge_image)[shape], edge_oracle, tmp_path)
    assert compared == len(edge_oracle.records) > 20


def test_mount_is_read_only_nosuid_nodev(edge_image: BuiltImage, tmp_path: Path) -> None:
    source = f"oci:{edge_image.layout}:{edge_image.tag}"
    with mounted(source, tmp_path / "mnt") as mnt:
        with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
            line = next(row for row in mountinfo if row.split()[4] == str(mnt))
        options = set(line.split()[5].split(","))
        fstype = line.split(" - ")[1].split()[0]
        assert {"ro", "nosuid", "nodev"} <= options
        assert fstype == "fuse.imagefs"
        assert "allow_other" not in line
        with pytest.raises(OSError) as info:
            (mnt / "new-file").write_text("x")
        assert info.value.errno == 30  # EROFS


def test_readdir_lists_dot_entries_and_stable_order(edge_image: BuiltImage, tmp_path: Path) -> None:
    source = f"oci:{edge_image.layout}:{edge_image.tag}"
    with mounted(source, tmp_path / "mnt") as mnt:
        listing = subprocess.run(
            ["ls", "-a", "-U", str(mnt)], capture_output=True, text=True, check=True
        ).stdout.split()
        again = subprocess.run(
            ["ls", "-a", "-U", str(mnt)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert listing[:2] == [".", ".."] and listing == again
        assert os.stat(mnt / ".").st_ino == os.stat(mnt).st_ino


def plain_layer_image(tmp_path: Path) -> Path:
    layer = builder.make_layer_tar(
        [directory("etc"), file("etc/a", "alpha\n"), file("big", os.urandom(1 << 20))]
    )
    return builder.write_oci_layout(tmp_path / "layout", [layer], compression="none", tag="t")


def layer_blob(layout: Path) -> Path:
    manifest = builder.image_manifest(layout, "t")
    return builder.blob_path(layout, manifest["layers"][0]["digest"])


def test_bad_read_in_live_mount_is_eio_and_daemon_survives(tmp_path: Path) -> None:
    layout = plain_layer_image(tmp_path)
    blob = layer_blob(layout)
    log = tmp_path / "imagefs.log"
    with mounted(f"oci:{layout}:t", tmp_path / "mnt", log=log) as mnt:
        # The blob loses its tail after the mount was made (disk trouble, a
        # concurrent prune): reading the file in that tail must fail with EIO...
        os.truncate(blob, blob.stat().st_size // 2)
        with pytest.raises(OSError) as info:
            (mnt / "big").read_bytes()
        assert info.value.errno == 5  # EIO
        # ...and the daemon keeps serving everything else.
        assert (mnt / "etc" / "a").read_text() == "alpha\n"
        assert sorted(os.listdir(mnt)) == ["big", "etc"]
    assert "big" in log.read_text() or "ends early" in log.read_text()


def test_digest_mismatch_refuses_mount(tmp_path: Path) -> None:
    require_fuse()
    layout = plain_layer_image(tmp_path)
    blob = layer_blob(layout)
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF  # inside etc/a's data: the tar still parses
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_imagefs("mount", "--quiet", f"oci:{layout}:t", mnt)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "digest" in lines[0], result.stderr
    assert not is_mounted(mnt)


def test_corrupt_gzip_layer_refuses_mount(tmp_path: Path) -> None:
    require_fuse()
    layer = builder.make_layer_tar([file("x", os.urandom(300_000))])
    layout = builder.write_oci_layout(tmp_path / "layout", [layer], compression="gzip", tag="t")
    blob = layer_blob(layout)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_imagefs("mount", "--quiet", f"oci:{layout}:t", mnt)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not is_mounted(mnt)


def test_mount_on_busy_mountpoint_fails_clearly(edge_image: BuiltImage, tmp_path: Path) -> None:
    source = f"oci:{edge_image.layout}:{edge_image.tag}"
    with mounted(source, tmp_path / "mnt") as mnt:
        result = run_imagefs("mount", "--quiet", source, mnt)
        assert result.returncode == 1
        assert "already a mount point" in result.stderr


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(600):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_foreground_mount_unmounts_on_sigterm(edge_image: BuiltImage, tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    source = f"oci:{edge_image.layout}:{edge_image.tag}"
    log = tmp_path / "stderr.log"
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [*IMAGEFS, "mount", "--foreground", "--quiet", source, str(mnt)], stderr=stderr
        ) as process,
    ):
        try:
            wait_for(lambda: is_mounted(mnt) or process.poll() is not None, "the mount")
            assert is_mounted(mnt), log.read_text()
            assert os.listdir(mnt)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, log.read_text()
            assert not is_mounted(mnt)
        finally:
            if process.poll() is None:
                process.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


def daemon_pid(mnt: Path) -> int:
    """The imagefs daemon serving ``mnt``, found by its command line."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"imagefs" in cmdline and os.fsencode(str(mnt)) in cmdline and int(pid) != os.getpid():
            return int(pid)
    raise AssertionError(f"no daemon found for {mnt}")


def test_umount_cleans_stale_mount_after_sigkill(edge_image: BuiltImage, tmp_path: Path) -> None:
    source = f"oci:{edge_image.layout}:{edge_image.tag}"
    with mounted(source, tmp_path / "mnt") as mnt:
        os.kill(daemon_pid(mnt), signal.SIGKILL)
        # readdir always reaches the daemon (stat may come from the kernel cache).
        wait_for(lambda: _listdir_errno(mnt) == 107, "the stale mount")  # ENOTCONN
        result = run_imagefs("umount", mnt)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)


def _listdir_errno(path: Path) -> int:
    try:
        os.listdir(path)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_umount_makes_daemon_exit(edge_image: BuiltImage, tmp_path: Path) -> None:
    source = f"oci:{edge_image.layout}:{edge_image.tag}"
    with mounted(source, tmp_path / "mnt") as mnt:
        pid = daemon_pid(mnt)
        assert run_imagefs("umount", mnt).returncode == 0
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), "the daemon to exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
