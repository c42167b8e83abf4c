"""imagefs in the Linux world: mount(8), fstab, systemd units, signals, stale mounts.

mount(8) runs ``mount.fuse3``, which runs ``imagefs`` from the default PATH
only (mount(8) scrubs the environment). So these tests work in a private
mount namespace (tests.linuxenv) in which ``/usr/local/bin/imagefs`` exists,
as the README's install step makes it; nothing they mount is visible to, or
left behind on, the host.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.daemon.mounttab import SYSTEM_RUNTIME_DIR
from tests.linuxenv import (
    PrivateMounts,
    User,
    build_image,
    ensure_test_user,
    make_workspace,
    process_gone,
    remove_workspace,
    wait_for,
)
from tests.mounting import is_mounted, mounted, run_imagefs
from tests.needs import require_fuse, require_root, require_tools
from tests.systemdunit import (
    SYSTEMD_DIR,
    environment,
    escape_path,
    exec_command,
    mount_command,
    parse_unit,
    value,
    values,
)
from tests.test_notify import Listener

TOOLS = ("unshare", "nsenter", "mount", "umount", "mount.fuse3", "fusermount3", "setpriv")


@pytest.fixture
def workspace() -> Iterator[Path]:
    path = make_workspace("imagefs-linux-")
    try:
        yield path
    finally:
        remove_workspace(path)


@pytest.fixture
def ns(workspace: Path) -> Iterator[PrivateMounts]:
    require_fuse()
    require_root()
    require_tools(*TOOLS)
    namespace = PrivateMounts(workspace)
    try:
        namespace.install_imagefs()
        yield namespace
    finally:
        namespace.close()


@pytest.fixture
def source(workspace: Path) -> str:
    return f"oci:{build_image(workspace / 'layout')}:t"


@pytest.fixture
def user() -> User:
    require_root()
    require_tools("useradd", "setpriv")
    return ensure_test_user()


def make_mountpoint(workspace: Path, name: str = "mnt") -> Path:
    mnt = workspace / name
    mnt.mkdir()
    return mnt


def umount_and_wait(ns: PrivateMounts, mnt: Path) -> None:
    """umount(8) the mount; its daemon must then exit and drop its record."""
    pid = ns.daemon_pid(mnt)
    result = ns.run(["umount", mnt])
    assert result.returncode == 0, result.stderr
    assert ns.mount_at(mnt) is None
    wait_for(lambda: process_gone(pid), "the daemon to exit after umount")
    assert all(m["mountpoint"] != str(mnt) for m in ns.mounts())


# mount(8)


def test_bare_mount8_is_read_only_nosuid_nodev_with_one_warning(
    ns: PrivateMounts, source: str, workspace: Path
) -> None:
    mnt = make_mountpoint(workspace)
    # mount(8) hands imagefs "-o rw,dev,suid" here.
    result = ns.run(["mount", "-t", "fuse.imagefs", source, mnt])
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "read-only" in lines[0], lines
    entry = ns.mount_at(mnt)
    assert entry is not None and entry.fstype == "fuse.imagefs" and entry.source == source
    assert {"ro", "nosuid", "nodev"} <= entry.options
    assert "default_permissions" in entry.super_options
    assert "allow_other" not in entry.super_options
    inside = ns.path(mnt)
    assert (inside / "etc/os-release").read_text() == "ID=imagefs-test\n"
    with pytest.raises(OSError) as info:
        (inside / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    # nodev, despite mount(8)'s "dev": the image's device node stays inert.
    with pytest.raises(PermissionError):
        (inside / "dev/null").read_bytes()
    umount_and_wait(ns, mnt)


def test_mount8_passes_every_kind_of_imagefs_option(ns: PrivateMounts, workspace: Path) -> None:
    layout = build_image(workspace / "layout")
    mnt = make_mountpoint(workspace)
    log, cache = workspace / "daemon.log", workspace / "cache"
    options = f"ro,allow_other,noexec,image=other,cache_dir={cache},log={log},quiet"
    result = ns.run(["mount", "-t", "fuse.imagefs", layout, mnt, "-o", options])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    entry = ns.mount_at(mnt)
    assert entry is not None
    assert "allow_other" in entry.super_options and "noexec" in entry.options
    assert (ns.path(mnt) / "which").read_text() == "other\n"  # image=other chose the tag
    assert cache.is_dir() and any(cache.iterdir())
    umount_and_wait(ns, mnt)
    assert f"mounted {layout} on {mnt}" in log.read_text()


def test_mount8_unknown_option_fails_naming_it(
    ns: PrivateMounts, source: str, workspace: Path
) -> None:
    mnt = make_mountpoint(workspace)
    result = ns.run(["mount", "-t", "fuse.imagefs", source, mnt, "-o", "ro,frobnicate=3"])
    assert result.returncode != 0
    assert "imagefs: unknown mount option 'frobnicate'" in result.stderr
    assert ns.mount_at(mnt) is None


def test_mount8_on_missing_or_busy_mountpoint_fails_clearly(
    ns: PrivateMounts, source: str, workspace: Path
) -> None:
    missing = workspace / "missing"
    result = ns.run(["mount", "-t", "fuse.imagefs", source, missing])
    assert result.returncode != 0 and "does not exist" in result.stderr
    mnt = make_mountpoint(workspace)
    assert ns.run(["mount", "-t", "fuse.imagefs", source, mnt, "-o", "ro"]).returncode == 0
    result = ns.run(["mount", "-t", "fuse.imagefs", source, mnt, "-o", "ro"])
    assert result.returncode != 0
    assert f"imagefs: mount point {mnt} is already a mount point (busy)" in result.stderr
    assert len([e for e in ns.mountinfo() if e.mountpoint == str(mnt)]) == 1
    umount_and_wait(ns, mnt)


def test_unsafe_suid_and_unsafe_dev_lift_nosuid_and_nodev(
    ns: PrivateMounts, source: str, workspace: Path, user: User
) -> None:
    """Only the explicit imagefs options make setuid bits and device nodes work."""
    cases = [("rw,suid,dev,allow_other", False), ("allow_other,unsafe_suid,unsafe_dev", True)]
    for options, honoured in cases:
        mnt = make_mountpoint(workspace, f"mnt-{honoured}")
        result = ns.run(["mount", "-t", "fuse.imagefs", source, mnt, "-o", options])
        assert result.returncode == 0, result.stderr
        entry = ns.mount_at(mnt)
        assert entry is not None
        assert ("nosuid" in entry.options, "nodev" in entry.options) == (not honoured,) * 2
        # bin/id is setuid root in the image: run by the test user it prints
        # uid 0 only where setuid bits are honoured.
        effective = ns.run([mnt / "bin/id", "-u"], user=user)
        assert effective.returncode == 0, effective.stderr
        assert effective.stdout.strip() == ("0" if honoured else str(user.uid))
        if honoured:
            assert (ns.path(mnt) / "dev/null").read_bytes() == b""  # the real /dev/null
        else:
            with pytest.raises(PermissionError):
                (ns.path(mnt) / "dev/null").read_bytes()
        umount_and_wait(ns, mnt)


# fstab


def test_fstab_line_mounts_with_mount_mountpoint_and_umount_stops_daemon(
    ns: PrivateMounts, workspace: Path
) -> None:
    # Spaces in fstab are written \040, as fstab(5) says.
    layout = build_image(workspace / "my images" / "layout")
    mnt = make_mountpoint(workspace, "mount point")
    log = workspace / "fstab.log"
    fstab = workspace / "fstab"
    escaped = {path: str(path).replace(" ", "\\040") for path in (layout, mnt)}
    fstab.write_text(
        "# imagefs test fstab\n"
        "tmpfs /nonexistent tmpfs noauto 0 0\n"
        f"oci:{escaped[layout]}:t {escaped[mnt]} fuse.imagefs "
        f"ro,allow_other,nofail,_netdev,x-systemd.automount,x-systemd.idle-timeout=5min,log={log}"
        " 0 0\n"
    )
    result = ns.run(["mount", "--fstab", fstab, mnt])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    entry = ns.mount_at(mnt)
    assert entry is not None and entry.fstype == "fuse.imagefs"
    assert "allow_other" in entry.super_options
    assert (ns.path(mnt) / "etc/os-release").read_text() == "ID=imagefs-test\n"
    [listed] = [m for m in ns.mounts() if m["mountpoint"] == str(mnt)]
    assert listed["source"] == f"oci:{layout}:t" and listed["state"] == "live"
    umount_and_wait(ns, mnt)
    assert "unmounted" in log.read_text()


# systemd units


def systemd_root(workspace: Path) -> Path:
    """A root for ``systemd-analyze verify --root``: systemd's own units, ours, an imagefs."""
    root = workspace / "sysroot"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in SYSTEMD_DIR.iterdir():
        if unit.suffix in (".mount", ".automount", ".service"):
            shutil.copy(unit, units)
    bindir = root / "usr/local/bin"
    bindir.mkdir(parents=True)
    (bindir / "imagefs").write_text(f'#!/bin/sh\nexec {sys.executable} -m imagefs "$@"\n')
    (bindir / "imagefs").chmod(0o755)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    paths = [f"/etc/systemd/system/{unit}" for unit in units]
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *paths],
        capture_output=True,
        text=True,
        check=False,
    )


UNITS = ("mnt-alpine.mount", "mnt-alpine.automount", "imagefs@mnt-alpine.service")


def test_systemd_units_pass_systemd_analyze_verify(workspace: Path) -> None:
    require_tools("systemd-analyze", "systemd-escape")
    root = systemd_root(workspace)
    result = verify(root, *UNITS)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The names follow from the paths, as systemd requires.
    assert escape_path(Path("/mnt/alpine")) == "mnt-alpine"
    mount = parse_unit(SYSTEMD_DIR / "mnt-alpine.mount")
    automount = parse_unit(SYSTEMD_DIR / "mnt-alpine.automount")
    assert value(mount, "Mount", "Where") == value(automount, "Automount", "Where") == "/mnt/alpine"
    assert value(mount, "Mount", "Type") == "fuse.imagefs"
    assert value(parse_unit(SYSTEMD_DIR / "imagefs@.service"), "Service", "Type") == "notify"
    # verify really looks: without the imagefs the service runs, it fails.
    (root / "usr/local/bin/imagefs").unlink()
    broken = verify(root, "imagefs@mnt-alpine.service")
    assert broken.returncode != 0 and "/usr/local/bin/imagefs" in broken.stderr


def test_mount_unit_command_mounts_a_local_image(
    ns: PrivateMounts, source: str, workspace: Path
) -> None:
    """What systemd runs for mnt-alpine.mount, with a local image in place of alpine:3."""
    unit = parse_unit(SYSTEMD_DIR / "mnt-alpine.mount")
    mnt = make_mountpoint(workspace)
    result = ns.run(mount_command(unit, what=source, where=mnt))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the unit says ro: no warning
    entry = ns.mount_at(mnt)
    assert entry is not None and "allow_other" in entry.super_options
    assert {"ro", "nosuid", "nodev"} <= entry.options
    umount_and_wait(ns, mnt)


class Service:
    """imagefs@.service for one instance, its command lines run as systemd would."""

    def __init__(self, ns: PrivateMounts, workspace: Path, source: str, mnt: Path) -> None:
        self.ns = ns
        self.unit = parse_unit(SYSTEMD_DIR / "imagefs@.service")
        self.instance = escape_path(mnt)
        # EnvironmentFile=/etc/imagefs/%i.env, read under a stand-in /etc.
        self.root = workspace / "sysroot"
        env_file = self.root / "etc/imagefs" / f"{self.instance}.env"
        env_file.parent.mkdir(parents=True)
        env_file.write_text(f"IMAGEFS_SOURCE={source}\nIMAGEFS_OPTIONS=allow_other\n")
        self.env = environment(self.unit, self.instance, self.root)

    def command(self, key: str) -> tuple[list[str], bool]:
        [line] = values(self.unit, "Service", key)
        return exec_command(line, self.instance, self.env)

    def start(self, notify_socket: str) -> subprocess.Popen[bytes]:
        argv, _ = self.command("ExecStart")
        env = {**os.environ, **self.env, "NOTIFY_SOCKET": notify_socket}
        return subprocess.Popen(self.ns.command(argv), env=env)

    def stop_post(self) -> subprocess.CompletedProcess[str]:
        argv, _ = self.command("ExecStopPost")
        return self.ns.run(argv)


def test_service_template_notifies_and_stops_cleanly(
    ns: PrivateMounts, source: str, workspace: Path
) -> None:
    mnt = make_mountpoint(workspace, "svc mnt")
    service = Service(ns, workspace, source, mnt)
    assert service.command("ExecStart")[0][-2:] == [source, str(mnt)]  # %f is the mount point
    listener = Listener(str(workspace / "notify"))
    try:
        # systemctl start: READY=1 arrives once the mount is there.
        process = service.start(str(workspace / "notify"))
        try:
            ready = listener.until("READY", process)
            assert ready.sender == process.pid
            entry = ns.mount_at(mnt)
            assert entry is not None and "allow_other" in entry.super_options
            # systemctl stop: SIGTERM (KillMode=mixed: to the main process only).
            assert value(service.unit, "Service", "KillMode") == "mixed"
            process.send_signal(signal.SIGTERM)
            listener.until("STOPPING", process)
            assert process.wait(timeout=600) == 0
            assert ns.mount_at(mnt) is None
            result = service.stop_post()  # nothing stale: nothing to do
            assert result.returncode == 0 and result.stderr == "", result.stderr

            # A SIGKILL (the stop timeout, the OOM killer) leaves a stale mount;
            # ExecStopPost= detaches it, and the service can start again.
            process = service.start(str(workspace / "notify"))
            listener.until("READY", process)
            process.kill()
            process.wait()
            assert ns.mount_at(mnt) is not None
            result = service.stop_post()
            assert result.returncode == 0, result.stderr
            assert ns.mount_at(mnt) is None
            process = service.start(str(workspace / "notify"))
            listener.until("READY", process)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=600) == 0
            assert ns.mount_at(mnt) is None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        listener.close()


# Lifecycle, in the host's namespace with the plain CLI.


def record_of(mnt: Path) -> Path | None:
    """The daemon's record (see imagefs.daemon.mounttab) for the mount at ``mnt``."""
    for path in SYSTEM_RUNTIME_DIR.glob("*.json"):
        try:
            if json.loads(path.read_text())["mountpoint"] == str(mnt):
                return path
        except (OSError, ValueError):
            continue  # another test's daemon removed it meanwhile
    return None


def daemon_of(mnt: Path) -> dict[str, object]:
    result = run_imagefs("mounts", "--json")
    assert result.returncode == 0, result.stderr
    [listed] = [m for m in json.loads(result.stdout) if m["mountpoint"] == str(mnt)]
    return dict(listed)


def test_mounts_lists_source_and_pid_and_stale_mounts(tmp_path: Path) -> None:
    source = f"oci:{build_image(tmp_path / 'layout')}:t"
    with mounted(source, tmp_path / "mnt") as mnt:
        listed = daemon_of(mnt)
        assert listed["source"] == source and listed["state"] == "live"
        assert listed["uid"] == os.geteuid()
        pid = listed["pid"]
        assert isinstance(pid, int)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"imagefs" in cmdline and os.fsencode(str(mnt)) in cmdline
        table = run_imagefs("mounts").stdout.splitlines()
        assert table[0].split() == ["MOUNTPOINT", "PID", "SOURCE"]
        assert any(line.split() == [str(mnt), str(pid), source] for line in table), table

        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_gone(pid), "the daemon to die")
        listed = daemon_of(mnt)
        assert listed["state"] == "stale" and listed["pid"] == pid
        hint = f"stale: the daemon is gone; run 'imagefs umount {mnt}'"
        assert hint in run_imagefs("mounts").stdout
        result = run_imagefs("umount", mnt)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        listing = json.loads(run_imagefs("mounts", "--json").stdout)
        assert all(m["mountpoint"] != str(mnt) for m in listing)
        assert record_of(mnt) is None  # the killed daemon's record went with the mount


def test_sigterm_and_sigint_to_the_daemon_unmount_cleanly(tmp_path: Path) -> None:
    source = f"oci:{build_image(tmp_path / 'layout')}:t"
    for stop in (signal.SIGTERM, signal.SIGINT):
        with mounted(source, tmp_path / f"mnt-{stop.name}") as mnt:
            pid = daemon_of(mnt)["pid"]
            assert isinstance(pid, int)
            record = record_of(mnt)
            assert record is not None
            os.kill(pid, stop)
            wait_for(lambda: process_gone(pid), f"the daemon to exit on {stop.name}")  # noqa: B023
            assert not is_mounted(mnt)  # unmounted by the daemon itself, not stale
            assert not record.exists()


def test_umount_of_a_busy_mount_fails_clearly_and_lazy_detaches(tmp_path: Path) -> None:
    source = f"oci:{build_image(tmp_path / 'layout')}:t"
    with mounted(source, tmp_path / "mnt") as mnt:
        pid = daemon_of(mnt)["pid"]
        assert isinstance(pid, int)
        with subprocess.Popen(["sleep", "infinity"], cwd=mnt / "etc") as user_of_mount:
            try:
                result = run_imagefs("umount", mnt)
                assert result.returncode == 1
                [line] = result.stderr.splitlines()
                assert line.startswith(f"imagefs: cannot unmount {mnt}: ") and "busy" in line
                assert "imagefs umount -z" in line
                assert (mnt / "etc/os-release").read_text() == "ID=imagefs-test\n"
                assert run_imagefs("umount", "-z", mnt).returncode == 0
                assert not is_mounted(mnt)
                assert not process_gone(pid)  # still serving the process inside
            finally:
                user_of_mount.kill()
        wait_for(lambda: process_gone(pid), "the daemon to exit once the mount is free")


def test_umount_if_stale_leaves_live_mounts_alone(tmp_path: Path) -> None:
    source = f"oci:{build_image(tmp_path / 'layout')}:t"
    assert run_imagefs("umount", "--if-stale", tmp_path).returncode == 0  # nothing mounted
    with mounted(source, tmp_path / "mnt") as mnt:
        assert run_imagefs("umount", "--if-stale", mnt).returncode == 0
        assert is_mounted(mnt) and os.listdir(mnt)
        pid = daemon_of(mnt)["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_gone(pid), "the daemon to die")
        result = run_imagefs("umount", "--if-stale", mnt)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
