"""Real Linux surroundings for tests: a private mount namespace, a non-root user.

:class:`PrivateMounts` is a mount namespace of the tests' own (``unshare``),
kept open by a ``sleep`` process; commands run inside with ``nsenter``. There
a test may change what the host must not see: put an ``imagefs`` command on
the default ``PATH`` (mount(8) scrubs the environment, so ``mount.fuse3``
finds ``imagefs`` only in ``/usr/local/bin`` and the like), swap
``/etc/fuse.conf``, make this Python reachable for another user. Whatever is
mounted inside vanishes with the namespace: teardown unmounts every FUSE
mount there (so daemons exit normally) and kills what is left.

:func:`ensure_test_user` creates the unprivileged user ``imagefs-test``
(idempotently: concurrent test sessions may race to create it).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagefs
from imagefs.daemon.mounttab import MountEntry, read_mountinfo
from tests import builder

TEST_USER = "imagefs-test"
WAIT_STEPS = 1200  # polls of 50 ms before a wait gives up: a hang guard, not a time limit


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(WAIT_STEPS):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: it serves nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def ensure_test_user() -> User:
    """The unprivileged test user, created on first use (needs root)."""
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        # Exit status 9: another test session created it meanwhile.
        try:
            entry = pwd.getpwnam(TEST_USER)
        except KeyError:
            raise AssertionError(f"useradd {TEST_USER} failed: {result.stderr}") from None
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _namespace_id(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class PrivateMounts:
    """A private mount namespace; see the module docstring."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self._stage = workspace / ".stage"
        self._stage.mkdir(mode=0o700)
        # unshare prints nothing; "ready" tells us the namespace exists before
        # we nsenter it (entering earlier would enter the host's namespace).
        self.holder = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                "echo ready; exec sleep infinity",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.kill()
            raise AssertionError("unshare --mount did not start")
        self.pid = self.holder.pid
        self.namespace = _namespace_id(self.pid)
        assert self.namespace not in (None, _namespace_id("self"))
        # The namespace starts as a copy of the host's mounts, including FUSE
        # mounts of other tests running now. A copy keeps its file system
        # alive: once its owner unmounted on the host, that daemon would wait
        # for this namespace to end before exiting. Let go of them at once.
        for entry in reversed(self.mountinfo()):
            if entry.fstype.startswith("fuse"):
                self.run(["umount", "-l", entry.mountpoint])

    # Running things inside.

    def command(self, argv: Sequence[str | Path], user: User | None = None) -> list[str]:
        prefix = ["nsenter", f"--target={self.pid}", "--mount", "--"]
        if user is not None:
            prefix += [
                "setpriv",
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--init-groups",
                "--reset-env",
                "--",
            ]
        return [*prefix, *map(str, argv)]

    def run(
        self,
        argv: Sequence[str | Path],
        user: User | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace (as ``user``, with only ``env`` added to a clean one)."""
        if env:
            argv = ["env", *(f"{key}={value}" for key, value in env.items()), *argv]
        result = subprocess.run(
            self.command(argv, user), capture_output=True, text=True, check=False, timeout=600
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{list(argv)} failed ({result.returncode}): {result.stderr}")
        return result

    def imagefs(
        self, *args: str | Path, user: User | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "imagefs", *args], user=user, env=env)

    def mountinfo(self) -> list[MountEntry]:
        return read_mountinfo(Path(f"/proc/{self.pid}/mountinfo"))

    def mount_at(self, path: Path) -> MountEntry | None:
        found = None
        for entry in self.mountinfo():
            if entry.mountpoint == str(path):
                found = entry
        return found

    def mounts(self, user: User | None = None) -> list[dict[str, Any]]:
        """``imagefs mounts --json``, run inside."""
        result = self.imagefs("mounts", "--json", user=user)
        assert result.returncode == 0, result.stderr
        listed: list[dict[str, Any]] = json.loads(result.stdout)
        return listed

    def daemon_pid(self, mountpoint: Path, user: User | None = None) -> int:
        for mount in self.mounts(user):
            if mount["mountpoint"] == str(mountpoint) and mount["pid"] is not None:
                return int(mount["pid"])
        raise AssertionError(f"no daemon listed for {mountpoint}: {self.mounts(user)}")

    def path(self, path: Path) -> Path:
        """``path`` as seen from inside, for reading from the test process."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    # Changing the namespace.

    def bind(self, source: Path, target: Path) -> None:
        self.run(["mount", "--bind", source, target], check=True)

    def install_imagefs(self) -> None:
        """Put an ``imagefs`` command in /usr/local/bin, as the README's install does."""
        bindir = self.workspace / "usr-local-bin"
        bindir.mkdir(mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            for entry in Path("/usr/local/bin").iterdir():  # keep what is there
                (bindir / entry.name).symlink_to(entry)
        wrapper = bindir / "imagefs"
        if wrapper.is_symlink():
            wrapper.unlink()
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m imagefs "$@"\n')
        wrapper.chmod(0o755)
        self.bind(bindir, Path("/usr/local/bin"))

    def fuse_conf(self, text: str) -> None:
        """Replace /etc/fuse.conf (fusermount3 reads it) inside the namespace only."""
        conf = self.workspace / f"fuse.conf.{len(list(self.workspace.glob('fuse.conf.*')))}"
        conf.write_text(text)
        conf.chmod(0o644)
        self.bind(conf, Path("/etc/fuse.conf"))

    def open_dev_fuse(self) -> None:
        """Give /dev/fuse its usual mode 0666 inside, if this machine has it stricter.

        udev makes it 0666 on a normal system; a container without udev may
        leave the kernel's 0600, and then libfuse fails for users before it
        ever runs fusermount3. A fresh node on a namespace-only tmpfs, bound
        over /dev/fuse, restores the usual mode without touching the host.
        """
        st = os.stat("/dev/fuse")
        if st.st_mode & 0o006 == 0o006:
            return
        devdir = self.workspace / ".dev"
        devdir.mkdir(mode=0o755)
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", devdir], check=True)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self.run(["mknod", "-m", "0666", devdir / "fuse", "c", str(major), str(minor)], check=True)
        self.bind(devdir / "fuse", Path("/dev/fuse"))

    def expose(self, paths: Iterable[Path]) -> None:
        """Make ``paths`` reachable by any user inside the namespace.

        A directory others cannot enter (``/root`` at 0700, where pyenv keeps
        this Python) is covered with an empty tmpfs into which only the needed
        children are bound back; nothing else of it becomes visible.
        """
        for _ in range(16):  # each round opens one more level
            blocked: dict[Path, set[str]] = {}
            for path in paths:
                found = _first_closed_ancestor(self.path(Path(os.path.realpath(path))))
                if found is not None:
                    directory, child = found
                    blocked.setdefault(directory, set()).add(child)
            if not blocked:
                return
            for directory, children in blocked.items():
                self._open_up(Path("/") / directory.relative_to(self.path(Path("/"))), children)
        raise AssertionError(f"cannot expose {list(paths)}")

    def _open_up(self, directory: Path, children: set[str]) -> None:
        stage = self._stage / str(len(list(self._stage.iterdir())))
        stage.mkdir()
        self.bind(directory, stage)
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", directory], check=True)
        for child in sorted(children):
            original = stage / child
            # A bind mount needs a mount point of the same kind in the tmpfs.
            make = "mkdir" if self.path(original).is_dir() else "touch"
            self.run([make, directory / child], check=True)
            self.bind(original, directory / child)

    # Teardown.

    def close(self) -> None:
        """Unmount every FUSE mount inside, then kill whatever still runs inside."""
        try:
            for entry in reversed(self.mountinfo()):
                if entry.fstype.startswith("fuse"):
                    self.run(["umount", "-l", entry.mountpoint])
            for _ in range(100):  # let daemons notice the unmount and exit
                if not self._members():
                    break
                time.sleep(0.05)
        finally:
            for pid in self._members():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.holder.kill()
            self.holder.wait()
            if self.holder.stdout is not None:
                self.holder.stdout.close()

    def _members(self) -> list[int]:
        members = []
        for name in os.listdir("/proc"):
            if (
                name.isdigit()
                and int(name) != self.pid
                and _namespace_id(name) == self.namespace
                and not process_gone(int(name))
            ):
                members.append(int(name))
        return members


def _first_closed_ancestor(path: Path) -> tuple[Path, str] | None:
    """The first directory above ``path`` that others may not enter, and the child inside."""
    parts = path.parts
    for depth in range(1, len(parts)):
        directory = Path(*parts[:depth])
        try:
            mode = directory.stat().st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return directory, parts[depth]
    return None


def python_paths() -> list[Path]:
    """What another user needs to run ``python -m imagefs`` as this test run does."""
    return [
        Path(sys.executable),
        Path(os.path.realpath(sys.executable)),
        Path(sys.base_prefix),
        Path(sys.prefix),
        Path(imagefs.__file__).parent,
    ]


def build_image(layout: Path) -> Path:
    """An OCI layout with what these tests look at, tagged ``t`` (and ``other``).

    ``secret`` and ``private/`` are root's alone (0600, 0700), ``bin/id`` is a
    setuid-root copy of id(1) (it prints the effective uid), ``dev/null`` is
    the character device 1:3: all inert unless a mount option says otherwise.
    """
    members = [
        builder.file("etc/os-release", "ID=imagefs-test\n"),
        builder.file("secret", "root only\n", mode=0o600),
        builder.directory("private", mode=0o700),
        builder.file("private/key", "k\n"),
        builder.file("bin/id", Path("/usr/bin/id").read_bytes(), mode=0o4755),
        builder.Member("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
    ]
    builder.write_oci_layout(layout, [builder.make_layer_tar(members)], tag="t")
    other = [builder.file("which", "other\n")]
    builder.write_oci_layout(layout, [builder.make_layer_tar(other)], tag="other")
    return layout


def make_workspace(prefix: str) -> Path:
    """A directory under /tmp every user may enter (pytest's tmp_path is 0700)."""
    workspace = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    workspace.chmod(0o755)
    return workspace


def remove_workspace(workspace: Path) -> None:
    shutil.rmtree(workspace, ignore_errors=True)
