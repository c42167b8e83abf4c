"""imagefs run by an unprivileged user: mount through fusermount3, permissions, cache, stale mounts.

The user is a real one (``imagefs-test``, created if absent) and every
command runs as it with ``setpriv``, in a private mount namespace
(tests.linuxenv) where this Python is reachable for it, /dev/fuse has its
usual mode 0666 and /etc/fuse.conf says what each test needs.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.linuxenv import (
    PrivateMounts,
    User,
    build_image,
    ensure_test_user,
    make_workspace,
    process_gone,
    python_paths,
    remove_workspace,
    wait_for,
)
from tests.needs import require_fuse, require_root, require_tools

NO_USER_ALLOW_OTHER = "# mount_max = 1000\n#user_allow_other\n"


@dataclass
class Rootless:
    ns: PrivateMounts
    user: User
    workspace: Path
    source: str
    home: Path

    def owned_dir(self, name: str) -> Path:
        path = self.workspace / name
        path.mkdir()
        os.chown(path, self.user.uid, self.user.gid)
        return path

    def imagefs(self, *args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
        result = self.ns.imagefs(*args, user=self.user, env={"HOME": str(self.home), **(env or {})})
        return result.returncode, result.stderr

    def sh(self, script: str, *args: str | Path) -> tuple[int, str, str]:
        result = self.ns.run(["sh", "-c", script, "sh", *map(str, args)], user=self.user)
        return result.returncode, result.stdout, result.stderr


@pytest.fixture
def rootless() -> Iterator[Rootless]:
    require_fuse()
    require_root()  # to create the user and the namespace; the tests then drop to the user
    require_tools("unshare", "nsenter", "setpriv", "useradd", "fusermount3", "mknod")
    user = ensure_test_user()
    workspace = make_workspace("imagefs-rootless-")
    try:
        ns = PrivateMounts(workspace)
        try:
            ns.expose(python_paths())
            ns.open_dev_fuse()
            ns.fuse_conf(NO_USER_ALLOW_OTHER)
            probe = ns.run([sys.executable, "-c", "import imagefs.cli, pyfuse3"], user=user)
            assert probe.returncode == 0, f"{user.name} cannot run imagefs: {probe.stderr}"
            source = f"oci:{build_image(workspace / 'layout')}:t"
            env = Rootless(ns, user, workspace, source, workspace / "home")
            env.home = env.owned_dir("home")
            yield env
        finally:
            ns.close()
    finally:
        remove_workspace(workspace)


def test_user_mounts_reads_and_unmounts_with_cache_in_xdg_dir(rootless: Rootless) -> None:
    env, ns = rootless, rootless.ns
    mnt = env.owned_dir("mnt")
    code, err = env.imagefs("mount", env.source, mnt)
    assert code == 0, err
    entry = ns.mount_at(mnt)
    assert entry is not None and entry.uid == env.user.uid  # mounted by fusermount3 for the user
    assert {"ro", "nosuid", "nodev"} <= entry.options
    assert env.sh('cat "$1"', mnt / "etc/os-release")[1] == "ID=imagefs-test\n"
    # No XDG_CACHE_HOME: the cache is ~/.cache/imagefs, private to the user.
    cache = env.home / ".cache/imagefs"
    assert cache.is_dir() and any(cache.iterdir())
    assert (cache.stat().st_uid, cache.stat().st_mode & 0o777) == (env.user.uid, 0o700)
    # The mount is the user's alone: without allow_other even root is refused.
    with pytest.raises(PermissionError):
        (ns.path(mnt) / "etc/os-release").read_text()
    [listed] = [m for m in ns.mounts(env.user) if m["mountpoint"] == str(mnt)]
    assert listed["state"] == "live" and listed["uid"] == env.user.uid
    pid = listed["pid"]
    assert Path(f"/proc/{pid}").stat().st_uid == env.user.uid  # the daemon runs as the user
    code, err = env.imagefs("umount", mnt)
    assert code == 0, err
    assert ns.mount_at(mnt) is None
    wait_for(lambda: process_gone(pid), "the user's daemon to exit")

    # XDG_CACHE_HOME, when set, is where the cache goes.
    xdg = env.owned_dir("xdg")
    code, err = env.imagefs("mount", env.source, mnt, env={"XDG_CACHE_HOME": str(xdg)})
    assert code == 0, err
    assert any((xdg / "imagefs").iterdir())
    assert env.imagefs("umount", mnt)[0] == 0


def test_default_permissions_hide_root_only_files_unless_read_all(rootless: Rootless) -> None:
    env, ns = rootless, rootless.ns
    mnt = env.owned_dir("mnt")
    stat_secret = 'stat -c "%u %a" "$1/secret"'
    assert env.imagefs("mount", env.source, mnt)[0] == 0
    # The kernel checks the image's owners and modes: root's 0600 file and
    # 0700 directory are closed to the user who mounted them.
    code, _, err = env.sh('cat "$1/secret"', mnt)
    assert code != 0 and "Permission denied" in err
    code, _, err = env.sh('ls "$1/private"', mnt)
    assert code != 0 and "Permission denied" in err
    assert env.sh(stat_secret, mnt)[1] == "0 600\n"
    assert env.imagefs("umount", mnt)[0] == 0

    code, err = env.imagefs("mount", "-o", "read_all", env.source, mnt)
    assert code == 0, err
    entry = ns.mount_at(mnt)
    assert entry is not None and "default_permissions" not in entry.super_options
    assert env.sh('cat "$1/secret"', mnt)[1] == "root only\n"
    assert env.sh('ls "$1/private"', mnt)[1] == "key\n"
    assert env.sh(stat_secret, mnt)[1] == "0 600\n"  # what the image says, unchanged
    assert env.imagefs("umount", mnt)[0] == 0


def test_allow_other_needs_user_allow_other(rootless: Rootless) -> None:
    env, ns = rootless, rootless.ns
    mnt = env.owned_dir("mnt")
    code, err = env.imagefs("mount", "-o", "allow_other", env.source, mnt)
    assert code == 2
    [line] = err.splitlines()
    assert "allow_other" in line and "user_allow_other" in line and "/etc/fuse.conf" in line
    assert ns.mount_at(mnt) is None

    ns.fuse_conf("user_allow_other\n")
    code, err = env.imagefs("mount", "-o", "allow_other", env.source, mnt)
    assert code == 0, err
    entry = ns.mount_at(mnt)
    assert entry is not None and "allow_other" in entry.super_options
    # Now others (root here) see it, still under the image's permissions.
    assert (ns.path(mnt) / "etc/os-release").read_text() == "ID=imagefs-test\n"
    assert env.imagefs("umount", mnt)[0] == 0

    # read_all with allow_other would open every file to everyone: refused.
    code, err = env.imagefs("mount", "-o", "allow_other,read_all", env.source, mnt)
    assert code == 2 and "read_all cannot be combined with allow_other" in err


@pytest.mark.parametrize("option", ["unsafe_suid", "unsafe_dev"])
def test_unsafe_options_need_root(rootless: Rootless, option: str) -> None:
    mnt = rootless.owned_dir("mnt")
    code, err = rootless.imagefs("mount", "-o", option, rootless.source, mnt)
    assert code == 2 and f"{option} needs root" in err
    assert rootless.ns.mount_at(mnt) is None


def test_user_cleans_stale_mount_after_sigkill(rootless: Rootless) -> None:
    env, ns = rootless, rootless.ns
    mnt = env.owned_dir("mnt")
    assert env.imagefs("mount", env.source, mnt)[0] == 0
    pid = ns.daemon_pid(mnt, env.user)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), "the daemon to die")
    code, _, err = env.sh('ls "$1"', mnt)
    # ENOTCONN once the kernel has torn the connection down; ECONNABORTED for
    # a request that met it being aborted (the daemon just died).
    dead = ("Transport endpoint is not connected", "Software caused connection abort")
    assert code != 0 and any(message in err for message in dead), err
    [listed] = [m for m in ns.mounts(env.user) if m["mountpoint"] == str(mnt)]
    assert listed["state"] == "stale"
    code, err = env.imagefs("umount", mnt)
    assert code == 0, err
    assert ns.mount_at(mnt) is None
    # The mount point is usable again.
    assert env.imagefs("mount", env.source, mnt)[0] == 0
    assert env.imagefs("umount", mnt)[0] == 0


def test_root_fstab_line_mounts_as_the_user_with_setuid(rootless: Rootless) -> None:
    """fstab's setuid=USER (handled by mount.fuse3) runs the daemon as that user."""
    env, ns = rootless, rootless.ns
    ns.install_imagefs()
    mnt, cache = env.owned_dir("mnt"), env.owned_dir("cache")
    fstab = env.workspace / "fstab"
    fstab.write_text(
        f"{env.source} {mnt} fuse.imagefs ro,setuid={env.user.name},cache_dir={cache} 0 0\n"
    )
    result = ns.run(["mount", "--fstab", fstab, mnt])  # run by root
    assert result.returncode == 0, result.stderr
    entry = ns.mount_at(mnt)
    assert entry is not None and entry.uid == env.user.uid
    pid = ns.daemon_pid(mnt)
    assert Path(f"/proc/{pid}").stat().st_uid == env.user.uid
    assert env.sh('cat "$1"', mnt / "etc/os-release")[1] == "ID=imagefs-test\n"
    # The user may unmount it with umount(8) too: it is their FUSE mount.
    result = ns.run(["umount", mnt], user=env.user)
    assert result.returncode == 0, result.stderr
    assert ns.mount_at(mnt) is None
    wait_for(lambda: process_gone(pid), "the daemon to exit")


def test_unwritable_cache_dir_is_a_one_line_error(rootless: Rootless) -> None:
    mnt = rootless.owned_dir("mnt")
    code, err = rootless.imagefs("mount", rootless.source, mnt, env={"HOME": "/nonexistent"})
    assert code == 1
    assert err.splitlines() == [
        "imagefs: cache directory /nonexistent/.cache/imagefs: Permission denied"
    ]
    assert rootless.ns.mount_at(mnt) is None
