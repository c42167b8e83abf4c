"""A real containerd 1.6 for tests, with everything private to a temporary directory.

``containerd --config CONFIG`` with its root, state, gRPC/ttrpc/debug sockets
under the directory; the plugins that would reach outside it are disabled:
CRI (it wants CNI and /var/lib), ``opt`` (it writes /opt/containerd) and
tracing. It never touches /var/lib/containerd. ``ctr --address`` talks to it;
:meth:`Containerd.stop` ends it by pid (SIGTERM, then SIGKILL). Self-contained
for now; the shared engine fixtures (tests/engines.py) will take it over.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

from tests.linuxenv import wait_for
from tests.needs import require_root, require_tools

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]
[grpc]
  address = "{directory}/containerd.sock"
[ttrpc]
  address = "{directory}/containerd.sock.ttrpc"
[debug]
  address = "{directory}/debug.sock"
"""


class Containerd:
    """One containerd daemon; ``root`` is its store (what imagefs reads)."""

    def __init__(self, directory: Path) -> None:
        require_root()
        require_tools("containerd", "ctr")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.root = directory / "root"
        self.address = str(directory / "containerd.sock")
        config = directory / "config.toml"
        config.write_text(
            CONFIG.format(root=self.root, state=directory / "state", directory=directory)
        )
        self._log = (directory / "containerd.log").open("wb")
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for(self._ready, "containerd to serve its socket")

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            log = (self.directory / "containerd.log").read_text(errors="replace")
            raise RuntimeError(f"containerd exited: {log[-2000:]}")
        result = subprocess.run(
            ["ctr", "--address", self.address, "version"], capture_output=True, check=False
        )
        return result.returncode == 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ctr(self, *args: str, namespace: str = "default") -> str:
        """Run ``ctr``; its stdout. Fails the test with ctr's stderr."""
        result = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", namespace, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if result.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def pull(self, ref: str, *, namespace: str = "default") -> None:
        """``ctr images pull --plain-http`` from a loopback test registry (unpacks too)."""
        self.ctr("images", "pull", "--plain-http", ref, namespace=namespace)

    def images(self, namespace: str) -> dict[str, str]:
        """``ctr images ls``: name -> target digest."""
        lines = self.ctr("images", "ls", namespace=namespace).splitlines()[1:]
        return {line.split()[0]: line.split()[2] for line in lines if line.strip()}

    def namespaces(self) -> set[str]:
        return set(self.ctr("namespaces", "ls", "--quiet").split())

    def content(self, namespace: str) -> set[str]:
        """``ctr content ls --quiet``: the blob digests the namespace records."""
        return set(self.ctr("content", "ls", "--quiet", namespace=namespace).split())

    def stop(self) -> None:
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
        self._log.close()


def tree_state(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under ``root``: mode, mtime, ctime and (for files) a content hash.

    Symlinks are read, never followed; what imagefs reads must leave all of this alone.
    """
    state: dict[str, tuple[int, int, int, str]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            digest = ""
            if path.is_symlink():
                digest = os.readlink(path)
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = (
                info.st_mode,
                info.st_mtime_ns,
                info.st_ctime_ns,
                digest,
            )
    return state
