"""The real engines as test peers: containerd, ctr-remote, dockerd, podman and buildah, skopeo.

Each class owns one private instance under a temporary directory and is a
context manager (``with Containerd(tmp) as containerd: ...``); the session
fixtures in ``tests/conftest.py`` start the slow ones once. Images come from
the test registry (:mod:`tests.registry`), fed with :class:`Skopeo`. Under
``CI=true`` a missing engine fails instead of skipping (:mod:`tests.needs`).

What works on this machine (root, no systemd as PID 1, a cgroup v1
hierarchy with cgroup2 beside it, ext4 root; several workers share it), and
why each choice was made:

* **A private host view for every engine process.** Each one runs under
  ``unshare --mount --propagation private`` in a namespace where ``/run`` is
  a fresh tmpfs and ``/etc`` and ``/var/lib`` are overlays whose upper
  directories live in the engine's temporary directory (:class:`PrivateHost`).
  Engines write outside the roots they are given: dockerd 20.10 creates
  ``/etc/docker/key.json`` and ``/run/docker/plugins`` whatever its flags
  say; podman and skopeo, as root, keep a blob-info cache in
  ``/var/lib/containers/cache``; containerd's overlayfs snapshotter
  test-mounts below its root. In the namespace all of that lands in the
  temporary directory, and every mount an engine makes disappears with the
  namespace when its last process exits: nothing is ever left mounted on
  the host, and the host's ``/var/lib/{docker,containerd,containers}``,
  ``/etc`` and ``/run`` are never written.
* **containerd** gets a config file of its own: root, state, and the gRPC
  and ttrpc sockets in the temporary directory; the CRI plugin disabled (it
  wants CNI and serves a TCP port), the ``opt`` plugin disabled (it creates
  ``/opt/containerd`` on the host), and the snapshotters this machine lacks
  (aufs, btrfs, devmapper, zfs) too. It is ready when ``ctr --address SOCK
  version`` answers. Images are fetched with ``ctr content fetch``, which
  stores them without unpacking: containerd 1.6 cannot unpack a whiteout
  below a same-layer symlink (the catalog's ``basic``), and its content
  store is what ``ctr images export`` and ``ctr-remote`` read anyway.
* **dockerd** (20.10) uses that containerd (``--containerd``): started
  alone it would run its own, whose config enables the ``opt`` plugin.
  ``--bridge=none --iptables=false --ip-masq=false`` keep it off the host's
  network configuration, ``--config-file`` names an empty private file so
  ``/etc/docker/daemon.json`` is not read, and the client is
  ``/usr/bin/docker -H unix://SOCK`` with a private ``DOCKER_CONFIG``.
  overlay2 works on this ext4 root, so there is no vfs fallback. Images are
  pulled and saved, never run, so cgroups do not matter (dockerd only warns
  that blkio weights are missing).
* **podman** and **buildah** are no daemons: every command gets ``--root``
  and ``--runroot`` in the temporary directory and ``--storage-driver
  overlay`` (native overlay as root, no fuse-overlayfs); podman also
  ``--tmpdir`` (libpod's state, else ``/run/libpod``), ``--events-backend
  none`` and ``--cgroup-manager cgroupfs``; ``--tls-verify=false`` for the
  loopback registry.

Stopping is the same for every daemon: SIGTERM to the pid the test started
(``unshare`` and ``sh`` exec the daemon, so it is the daemon's own pid),
SIGKILL if it outlives the grace period, then the temporary directory goes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from tests.builder import run
from tests.needs import require_root, require_tools

NAMESPACE = "imagefs-test"  # the containerd namespace the tests use
READY_TRIES = 600  # x 25 ms: containerd starts in ~0.2 s, dockerd in a few seconds
STOP_GRACE = 20  # seconds a daemon may take to exit after SIGTERM
DOCKER = "/usr/bin/docker"  # the client of Debian's docker.io (/usr/local/bin's is another)
DOCKERD = "/usr/sbin/dockerd"
TocKind = Literal["estargz", "zstdchunked"]

# Run "$@" in the current (private) mount namespace with /etc and /var/lib
# overlaid (upper layers in $1) and a fresh /run; see the module docstring.
_PRIVATE_HOST_SCRIPT = """
set -eu
host=$1; shift
for dir in etc var/lib; do
    name=$(printf %s "$dir" | tr / -)
    mkdir -p "$host/$name.upper" "$host/$name.work"
    mount -t overlay overlay \\
        -o "lowerdir=/$dir,upperdir=$host/$name.upper,workdir=$host/$name.work" "/$dir"
done
mount -t tmpfs -o mode=0755 tmpfs /run
exec "$@"
"""


class PrivateHost:
    """Commands wrapped to run in a private mount namespace over ``directory``."""

    def __init__(self, directory: Path) -> None:
        require_root()
        require_tools("unshare", "mount")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def command(self, argv: Sequence[str | Path]) -> list[str]:
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _PRIVATE_HOST_SCRIPT,
            "private-host",
            str(self.directory),
            *map(str, argv),
        ]


class Daemon:
    """A long-running engine process started by a test, stopped by its pid."""

    name = "daemon"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host = PrivateHost(directory / "host")
        self.log_path = directory / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> Self:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.host.command(self.argv()), stdout=log, stderr=subprocess.STDOUT
            )
        for _ in range(READY_TRIES):
            if self.process.poll() is not None:
                break
            if self.ready():
                return self
            time.sleep(0.025)
        self.stop()
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM our pid, SIGKILL it if it lingers; its mounts die with its namespace."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class Containerd(Daemon):
    """``containerd --config`` with a private root, state and sockets; ``ctr`` against it."""

    name = "containerd"

    def __init__(self, directory: Path) -> None:
        require_tools("containerd", "ctr")
        super().__init__(directory)
        self.address = directory / "state" / "containerd.sock"
        self.config = directory / "config.toml"
        self.config.write_text(self._config_toml())

    def _config_toml(self) -> str:
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.internal.v1.opt",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
        ]
        # TOML strings and arrays of strings are JSON's.
        return "\n".join(
            [
                "version = 2",
                f"root = {json.dumps(str(self.directory / 'root'))}",
                f"state = {json.dumps(str(self.directory / 'state'))}",
                f"disabled_plugins = {json.dumps(disabled)}",
                "[grpc]",
                f"  address = {json.dumps(str(self.address))}",
                "[ttrpc]",
                f"  address = {json.dumps(str(self.address) + '.ttrpc')}",
                "",
            ]
        )

    def argv(self) -> list[str]:
        return ["containerd", "--config", str(self.config)]

    def ready(self) -> bool:
        probe = subprocess.run(
            ["ctr", "--address", str(self.address), "version"], capture_output=True, check=False
        )
        return probe.returncode == 0

    def ctr(self, *args: str | Path, tool: str = "ctr") -> subprocess.CompletedProcess[bytes]:
        """``ctr`` (or ``ctr-remote``) against this containerd, in the tests' namespace."""
        return run(
            [tool, "--address", str(self.address), "--namespace", NAMESPACE, *map(str, args)]
        )

    def fetch(self, ref: str) -> None:
        """Store ``ref`` (from the plain-HTTP test registry) without unpacking it."""
        self.ctr("content", "fetch", "--plain-http", ref)

    def push(self, ref: str) -> None:
        self.ctr("images", "push", "--plain-http", ref)

    def export(self, dest: Path, *refs: str) -> Path:
        """``ctr images export``: an OCI layout in a tar, with a Docker manifest.json."""
        self.ctr("images", "export", dest, *refs)
        return dest


class CtrRemote:
    """stargz-snapshotter's ``ctr-remote image convert`` against a test-started containerd."""

    def __init__(self, containerd: Containerd) -> None:
        require_tools("ctr-remote")
        self.containerd = containerd

    def convert(self, source: str, dest: str, kind: TocKind) -> str:
        """Convert ``source`` (already in the content store) to eStargz or zstd:chunked."""
        self.containerd.ctr(
            "image", "convert", f"--{kind}", "--oci", source, dest, tool="ctr-remote"
        )
        return dest


class Dockerd(Daemon):
    """dockerd 20.10 on a private data root and socket, over a test-started containerd."""

    name = "dockerd"

    def __init__(self, directory: Path, containerd: Containerd, insecure: Sequence[str]) -> None:
        require_tools(DOCKERD, DOCKER)
        super().__init__(directory)
        self.containerd = containerd
        self.insecure = list(insecure)
        self.socket = directory / "docker.sock"
        self.client_config = directory / "client"
        self.client_config.mkdir()
        self.daemon_json = directory / "daemon.json"
        self.daemon_json.write_text("{}\n")

    def argv(self) -> list[str]:
        return [
            DOCKERD,
            "--config-file",
            str(self.daemon_json),
            "--containerd",
            str(self.containerd.address),
            "--data-root",
            str(self.directory / "root"),
            "--exec-root",
            str(self.directory / "exec"),
            "--pidfile",
            str(self.directory / "docker.pid"),
            "--host",
            f"unix://{self.socket}",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--storage-driver",
            "overlay2",
            *(f"--insecure-registry={host}" for host in self.insecure),
        ]

    def ready(self) -> bool:
        probe = subprocess.run(self._client("version"), capture_output=True, check=False)
        return probe.returncode == 0

    def _client(self, *args: str | Path) -> list[str]:
        return [
            DOCKER,
            "--config",
            str(self.client_config),
            "-H",
            f"unix://{self.socket}",
            *map(str, args),
        ]

    def docker(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return run(self._client(*args))

    def pull(self, ref: str) -> None:
        self.docker("pull", "--quiet", ref)

    def image_id(self, ref: str) -> str:
        """The image's ID (its config digest, ``sha256:<hex>``)."""
        return self.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.decode().strip()

    def save(self, dest: Path, *names: str) -> Path:
        self.docker("save", "--output", dest, *names)
        return dest


class Podman:
    """podman and buildah on one private containers-storage (no daemon)."""

    def __init__(self, directory: Path) -> None:
        require_tools("podman", "buildah")
        self.directory = directory
        self.host = PrivateHost(directory / "host")
        self.storage = [
            "--root",
            str(directory / "root"),
            "--runroot",
            str(directory / "runroot"),
            "--storage-driver",
            "overlay",
        ]

    def podman(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        libpod = [
            "--tmpdir",
            str(self.directory / "libpod"),
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
        ]
        return run(self.host.command(["podman", *self.storage, *libpod, *map(str, args)]))

    def buildah(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return run(self.host.command(["buildah", *self.storage, *map(str, args)]))

    def pull(self, ref: str) -> str:
        """Pull from the loopback registry; the image's ID."""
        return self.podman("pull", "--quiet", "--tls-verify=false", ref).stdout.decode().strip()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class Skopeo:
    """skopeo in a private host view (its blob-info cache must not reach /var/lib/containers)."""

    def __init__(self, directory: Path) -> None:
        require_tools("skopeo")
        self.host = PrivateHost(directory)

    def copy(self, source: str, dest: str, *extra: str) -> None:
        # --insecure-policy: the images are ours; the host's policy.json is not consulted.
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", *extra, source, dest]
        run(self.host.command(argv))

    def push(self, source: str, dest: str) -> str:
        """Copy ``source`` to the plain-HTTP registry reference ``dest``; return ``dest``."""
        self.copy(source, f"docker://{dest}", "--dest-tls-verify=false")
        return dest
