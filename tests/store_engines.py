"""Real podman and dockerd stores for tests, each private to a temp directory.

* :class:`PodmanStore`: ``podman --root R --runroot RR --storage-driver overlay``
  (no daemon; :meth:`PodmanStore.service` runs ``podman system service`` on
  the store, for "read while the engine runs").
* :class:`Dockerd`: ``dockerd`` 20.10 with its own ``--data-root``,
  ``--exec-root``, pidfile and socket, ``--bridge=none --iptables=false
  --ip-masq=false --storage-driver overlay2``, stopped by its pid; the client
  is ``/usr/bin/docker -H unix://SOCKET`` (``/usr/local/bin/docker`` is
  another, newer client).

Neither ever touches the host's ``/var/lib/{containers,docker}``. Images are
pulled from the test registry (:mod:`tests.registry`) on 127.0.0.1.

:func:`build_store_image` makes the fixture image the engines can store:
whiteouts, an opaque directory, hardlinks, xattrs, setuid/setgid/sticky
modes, devices, a FIFO, symlinks, PAX and GNU long names, UTF-8 names,
sub-second mtimes, a multi-MiB file. It has no duplicate paths (tar-split
refuses them) and no sparse files (tar-split rebuilds their expanded bytes,
not the stored ones).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import builder
from tests.builder import NS, Member, directory, file, hardlink, opaque, symlink, whiteout
from tests.needs import require_root, require_tools

DOCKER = "/usr/bin/docker"  # dockerd 20.10's own client
STORE_TAG = "store"
BIG_SIZE = 3 << 20
READY_TRIES = 600  # 0.1 s apart: dockerd starts in 1-3 s here


def store_layers() -> list[bytes]:
    """Three layers (PAX, GNU, PAX) exercising what the stores must keep."""
    layer1 = [
        directory("etc"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        file("etc/shadow", "root:*:19000::::::\n", mode=0o640, gid=42),
        file("etc/obsolete", "deleted in layer 2\n"),
        directory("opq", mtime_ns=1_100_000_000 * NS),
        file("opq/lower", "hidden by layer 2's opaque marker"),
        directory("opq/lowerdir"),
        file("opq/lowerdir/x", "hidden too"),
        directory("gone"),
        file("gone/a", "whited out with its directory"),
        directory("bin"),
        file("bin/tool", "#!/bin/sh\necho tool\n", mode=0o755),
        hardlink("bin/tool-link", "bin/tool", mode=0o755),
        file("bin/suid", "setuid\n", mode=0o4755),
        file("bin/sgid", "setgid\n", mode=0o2755),
        directory("tmp", mode=0o1777),
        directory("home"),
        directory("home/user", uid=1000, gid=1000, mode=0o700),
        file("home/user/notes", "owned by 1000\n", uid=1000, gid=1000, mode=0o600),
        directory("xattr"),
        file(
            "xattr/file",
            "with xattrs",
            xattrs={"user.mime": b"text/plain", "trusted.flag": b"\x00\x01\xff"},
        ),
        directory("dev"),
        Member("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        Member("dev/loop7", "block", mode=0o660, gid=6, devmajor=7, devminor=7),
        Member("dev/fifo", "fifo", mode=0o622),
        directory("links"),
        symlink("links/relative", "../etc/passwd"),
        symlink("links/absolute", "/etc/shadow"),
        directory("times", mtime_ns=1_234_567_890_123_456_789),
        file("times/subsec", "sub-second mtime", mtime_ns=1_234_567_890_987_654_321),
        directory("names"),
        file("names/with space é ü 日本語", "UTF-8"),
        directory("paxlong"),
        directory("paxlong/" + "p" * 120),
        file("paxlong/" + "p" * 120 + "/" + "q" * 150, "a PAX path record"),
        file("empty", ""),
    ]
    layer2 = [
        whiteout("etc/obsolete"),
        whiteout("gone"),
        opaque("opq"),
        file("opq/after", "same layer as the opaque marker: stays"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        directory("gnu"),
        directory("gnu/" + "L" * 110),
        file("gnu/" + "L" * 110 + "/" + "N" * 120, "GNU long name"),
        symlink("gnu/longlink", "T" * 150),
        directory("big"),
        file("big/random.bin", random.Random(20261202).randbytes(BIG_SIZE), mode=0o600),
    ]
    layer3 = [
        directory("etc/obsolete"),
        file("etc/obsolete/back", "a directory where a file was whited out\n"),
        file("bin/new", "added in layer 3\n", mode=0o755),
    ]
    return [
        builder.make_layer_tar(layer1, format="pax"),
        builder.make_layer_tar(layer2, format="gnu"),
        builder.make_layer_tar(layer3, format="pax"),
    ]


def build_store_image(dest: Path) -> tuple[Path, str]:
    """The fixture image as a gzip OCI layout (what umoci unpacks and skopeo pushes)."""
    layout = dest / "store-image"
    builder.write_oci_layout(layout, store_layers(), compression="gzip", tag=STORE_TAG)
    return layout, STORE_TAG


def _run(command: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {result.returncode}: {result.stderr}")
    return result


class PodmanStore:
    """A private containers-storage store written by the real podman."""

    def __init__(self, directory: Path) -> None:
        require_root()
        require_tools("podman")
        self.root = directory / "root"
        self.root.mkdir(parents=True)
        # podman refuses a runroot path longer than 50 characters: a short one
        # of our own under /tmp, removed by close().
        self.runroot = Path(tempfile.mkdtemp(prefix="imagefs-podman-run-", dir="/tmp"))

    def close(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def podman(self, *args: str) -> str:
        command = ["podman", "--root", str(self.root), "--runroot", str(self.runroot)]
        command += ["--storage-driver", "overlay", "--events-backend", "none"]
        return _run([*command, *args]).stdout

    def pull(self, reference: str) -> str:
        """Pull from the test registry (plain HTTP); returns the image ID."""
        return self.podman("pull", "--quiet", "--tls-verify=false", reference).strip()

    @contextmanager
    def service(self, directory: Path) -> Iterator[None]:
        """``podman system service`` on this store for the block: the engine running."""
        socket = directory / "podman.sock"
        command = ["podman", "--root", str(self.root), "--runroot", str(self.runroot)]
        command += ["--storage-driver", "overlay", "--events-backend", "none"]
        process = subprocess.Popen(
            [*command, "system", "service", "--time=0", f"unix://{socket}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(READY_TRIES):
                if socket.exists() or process.poll() is not None:
                    break
                time.sleep(0.1)
            assert process.poll() is None, "podman system service exited"
            assert socket.exists(), "podman system service made no socket"
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


class Dockerd:
    """A private dockerd 20.10 (overlay2), started and stopped by the test."""

    def __init__(self, directory: Path, insecure_registry: str) -> None:
        require_root()
        require_tools("dockerd")
        if not os.access(DOCKER, os.X_OK):
            require_tools(DOCKER)
        self.directory = directory
        self.data_root = directory / "data"
        self.exec_root = directory / "exec"
        self.pidfile = directory / "dockerd.pid"
        self.socket = directory / "docker.sock"
        self.registry = insecure_registry
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        assert self.process is None
        log = (self.directory / "dockerd.log").open("ab")
        self.process = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={self.data_root}",
                f"--exec-root={self.exec_root}",
                f"--pidfile={self.pidfile}",
                f"--host=unix://{self.socket}",
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--ip6tables=false",
                f"--insecure-registry={self.registry}",
                "--storage-driver=overlay2",
                f"--config-file={self._config()}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        for _ in range(READY_TRIES):
            if self.process.poll() is not None:
                break
            ping = subprocess.run(
                [DOCKER, "-H", f"unix://{self.socket}", "version"], capture_output=True, check=False
            )
            if ping.returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        tail = (self.directory / "dockerd.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"dockerd did not start: {tail}")

    def _config(self) -> Path:
        # An empty daemon.json of our own: never the host's /etc/docker/daemon.json.
        config = self.directory / "daemon.json"
        config.write_text("{}\n")
        return config

    def docker(self, *args: str) -> str:
        return _run([DOCKER, "-H", f"unix://{self.socket}", *args]).stdout

    def pull(self, reference: str) -> str:
        self.docker("pull", "--quiet", reference)
        return self.docker("image", "inspect", "--format", "{{.Id}}", reference).strip()

    def stop(self) -> None:
        """SIGTERM by pid, then wait for it (dockerd unmounts and exits cleanly)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @contextmanager
    def running(self) -> Iterator[Dockerd]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def store_state(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under a store: (mode, size, mtime_ns, sha256 of a file's bytes or "")."""
    state = {}
    for parent, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
            state[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state
