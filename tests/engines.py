"""The real engines as test peers: containerd, ctr-remote, dockerd, podman and buildah, skopeo.

Every test that runs one of these tools goes through this module, and every
run is hermetic: nothing of the host's ``/var/lib/{containers,docker,containerd}``,
``/etc/docker``, ``/opt/containerd``, ``/run/docker`` or ``/run/containers``
is written (``tests/conftest.py`` checks those paths at the end of the
session). Each daemon class owns one private instance under a temporary
directory and is a context manager (``with Containerd(tmp) as containerd:``);
:meth:`Daemon.stop` and :meth:`Daemon.start` stop and restart it on the same
store (a test reads a store offline, then with its engine running). The
session fixtures in ``tests/conftest.py`` start the slow ones once; a test
module that must stop its engine makes its own instance. Images come from
the test registry (:mod:`tests.registry`), fed with :class:`Skopeo`. Under
``CI=true`` a missing engine fails instead of skipping (:mod:`tests.needs`).

What works on this machine (root, no systemd as PID 1, a cgroup v1
hierarchy with cgroup2 beside it, ext4 root; several workers share it), and
why each choice was made:

* **A private host view for every engine process** (:class:`PrivateHost`).
  Each command and daemon runs under ``unshare --mount --propagation
  private`` in a namespace where ``/run`` is a fresh tmpfs and ``/etc``,
  ``/var/lib`` and ``/opt`` are overlays whose upper directories live in a
  temporary directory. Engines write outside the roots they are given:
  dockerd 20.10 creates ``/etc/docker/key.json`` and ``/run/docker/plugins``
  whatever its flags say; podman and skopeo, as root, keep a blob-info cache
  in ``/var/lib/containers/cache``; containerd's overlayfs snapshotter
  test-mounts below its root. In the namespace all of that lands in the
  temporary directory, and every mount an engine makes disappears with the
  namespace when its last process exits: nothing is ever left mounted on
  the host, whatever happens to the test. The stores themselves (``--root``,
  ``--data-root``, containerd's ``root``) are plain directories of the
  test's temporary directory, outside the overlays, so imagefs run from
  the test process reads exactly what the engine wrote. A one-shot command
  gets fresh upper directories, removed when it exits (two overlays must
  never share an upper directory, and podman runs beside its own service);
  a daemon keeps its own for its life.
* **containerd** gets a config file of its own: root, state, and the gRPC,
  ttrpc and debug sockets in the temporary directory; the CRI plugin
  disabled (it wants CNI and serves a TCP port), the ``opt`` plugin disabled
  (it creates ``/opt/containerd``), tracing, and the snapshotters this
  machine lacks (aufs, btrfs, devmapper, zfs). It is ready when ``ctr
  --address SOCK version`` answers. :meth:`Containerd.fetch` stores an
  image without unpacking it (containerd 1.6 cannot unpack a whiteout below
  a same-layer symlink, the catalog's ``basic``; its content store is what
  ``ctr images export``, ``ctr-remote`` and imagefs read anyway);
  :meth:`Containerd.pull` unpacks too, as a node's pull does.
* **dockerd** (20.10) uses a test-started containerd (``--containerd``):
  started alone it would run its own, whose config enables the ``opt``
  plugin. ``--bridge=none --iptables=false --ip-masq=false
  --ip6tables=false`` keep it off the host's network configuration,
  ``--config-file`` names an empty private file so ``/etc/docker/daemon.json``
  is not read, and the client is ``/usr/bin/docker -H unix://SOCK`` with a
  private ``--config`` directory (``/usr/local/bin/docker`` is another,
  newer client). overlay2 works on this ext4 root, so there is no vfs
  fallback. Images are pulled and saved, never run, so cgroups do not
  matter (dockerd only warns that blkio weights are missing).
* **podman** and **buildah** are no daemons: every command gets ``--root``
  and ``--runroot`` (at most 50 characters, podman insists: a short
  directory of its own under /tmp) and ``--storage-driver overlay`` (native
  overlay as root, no fuse-overlayfs); podman also ``--tmpdir`` (libpod's
  state, else ``/run/libpod``), ``--events-backend none`` and
  ``--cgroup-manager cgroupfs``; ``--tls-verify=false`` for the loopback
  registry. :meth:`Podman.service` runs ``podman system service`` on the
  store, for "read while the engine runs".
* **skopeo** runs with ``--insecure-policy`` (the images are ours; the
  host's ``policy.json`` is not consulted).

Stopping is the same for every daemon: SIGTERM to the pid the test started
(``unshare`` and ``sh`` exec the daemon, so it is the daemon's own pid),
SIGKILL if it outlives the grace period; its mounts die with its namespace.

Run as a user other than root (no engine runs so; only skopeo for the
builders), commands run as they are: such a process cannot write those
root-owned host paths anyway, and ``unshare --mount`` needs root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tests.needs import require_root, require_tools

NAMESPACE = "imagefs-test"  # the containerd namespace the tests use by default
READY_TRIES = 600  # x 25 ms: containerd starts in ~0.2 s, dockerd in a few seconds
STOP_GRACE = 20  # seconds a daemon may take to exit after SIGTERM
DOCKER = "/usr/bin/docker"  # the client of Debian's docker.io (/usr/local/bin's is another)
DOCKERD = "/usr/sbin/dockerd"
TocKind = Literal["estargz", "zstdchunked"]
# What no test may write on the host (tests/conftest.py checks them at session end).
PROTECTED_HOST_PATHS = (
    "/var/lib/containers",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/etc/docker",
    "/opt/containerd",
    "/run/docker",
    "/run/containers",
)


def run(
    command: Sequence[str | Path], *, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool (with ``env`` added to ours); on failure raise with its stderr in the message."""
    argv = [str(part) for part in command]
    environ = {**os.environ, **env} if env is not None else None
    result = subprocess.run(argv, capture_output=True, check=False, env=environ)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)}: exit {result.returncode}: "
            + result.stderr.decode(errors="replace").strip()
        )
    return result


# Run "$@" in the current (private) mount namespace; $1 holds the upper layers.
# FUSE mounts copied from the host go first: a copy keeps its file system
# alive, so the daemon of a mount another test just unmounted would wait for
# this namespace to end before it exits. Then /etc, /var/lib and /opt are
# overlaid and /run is a fresh tmpfs (see the module docstring).
_PRIVATE_HOST_SCRIPT = r"""
set -eu
host=$1; shift
sed -n 's/^[^ ]* [^ ]* [^ ]* [^ ]* \([^ ]*\) .* - fuse[^ ]* .*/\1/p' /proc/self/mountinfo |
    sort -r | while read -r point; do umount -l "$(printf '%b' "$point")" 2>/dev/null || :; done
for dir in etc var/lib opt; do
    [ -d "/$dir" ] || continue
    name=$(printf %s "$dir" | tr / -)
    mkdir -p "$host/$name.upper" "$host/$name.work"
    mount -t overlay overlay \
        -o "lowerdir=/$dir,upperdir=$host/$name.upper,workdir=$host/$name.work" "/$dir"
done
mount -t tmpfs -o mode=0755 tmpfs /run
exec "$@"
"""


class PrivateHost:
    """Commands wrapped to run in a private mount namespace with a private /etc, /var/lib,
    /opt and /run (see the module docstring).

    ``scratch`` is where one-shot commands get their upper directories (the
    system's temporary directory if None); a long-running process gets a
    directory of its own (:meth:`command`).
    """

    def __init__(self, scratch: Path | None = None) -> None:
        self.private = os.geteuid() == 0
        if self.private:
            require_tools("unshare", "mount")
        self.scratch = scratch
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)

    def command(self, argv: Sequence[str | Path], directory: Path) -> list[str]:
        """``argv`` wrapped; the upper directories go to ``directory``, which outlives it."""
        if not self.private:
            return [str(part) for part in argv]
        directory.mkdir(parents=True, exist_ok=True)
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _PRIVATE_HOST_SCRIPT,
            "private-host",
            str(directory),
            *map(str, argv),
        ]

    def run(self, argv: Sequence[str | Path]) -> subprocess.CompletedProcess[bytes]:
        """A one-shot command (raises with its stderr on failure); its upper layers go after."""
        directory = Path(tempfile.mkdtemp(prefix="private-host-", dir=self.scratch))
        try:
            return run(self.command(argv, directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def probe(self, argv: Sequence[str | Path]) -> bool:
        """True if the one-shot ``argv`` succeeds (a readiness check)."""
        try:
            self.run(argv)
        except RuntimeError:
            return False
        return True


class Daemon:
    """A long-running engine process started by a test, stopped by its pid; restartable."""

    name = "daemon"

    def __init__(self, directory: Path) -> None:
        require_root()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host = PrivateHost(directory / "commands")
        self.log_path = directory / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Self:
        assert not self.running, f"{self.name} is running already"
        command = self.host.command(self.argv(), self.directory / "host")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
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

    @contextmanager
    def started(self) -> Iterator[Self]:
        """Running for the block (started if it was stopped), stopped after."""
        if not self.running:
            self.start()
        try:
            yield self
        finally:
            self.stop()

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
        self.root = directory / "root"  # the store imagefs reads
        self.address = directory / "state" / "containerd.sock"
        self.config = directory / "config.toml"
        self.config.write_text(self._config_toml())

    def _config_toml(self) -> str:
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.internal.v1.opt",
            "io.containerd.internal.v1.tracing",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
        ]
        # TOML strings and arrays of strings are JSON's.
        return "\n".join(
            [
                "version = 2",
                f"root = {json.dumps(str(self.root))}",
                f"state = {json.dumps(str(self.directory / 'state'))}",
                f"disabled_plugins = {json.dumps(disabled)}",
                "[grpc]",
                f"  address = {json.dumps(str(self.address))}",
                "[ttrpc]",
                f"  address = {json.dumps(str(self.address) + '.ttrpc')}",
                "[debug]",
                f"  address = {json.dumps(str(self.directory / 'state' / 'debug.sock'))}",
                "[metrics]",
                '  address = ""',
                "",
            ]
        )

    def argv(self) -> list[str]:
        return ["containerd", "--config", str(self.config)]

    def ready(self) -> bool:
        return self.address.exists() and self.host.probe(
            ["ctr", "--address", self.address, "version"]
        )

    def ctr(
        self, *args: str | Path, namespace: str = NAMESPACE, tool: str = "ctr"
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr`` (or ``ctr-remote``) against this containerd, in ``namespace``."""
        return self.host.run([tool, "--address", self.address, "--namespace", namespace, *args])

    def output(self, *args: str | Path, namespace: str = NAMESPACE) -> str:
        """``ctr``'s standard output."""
        return self.ctr(*args, namespace=namespace).stdout.decode()

    def fetch(self, ref: str, *, namespace: str = NAMESPACE) -> None:
        """Store ``ref`` (from the plain-HTTP test registry) without unpacking it."""
        self.ctr("content", "fetch", "--plain-http", ref, namespace=namespace)

    def pull(self, ref: str, *, namespace: str = NAMESPACE) -> None:
        """``ctr images pull --plain-http``: fetch and unpack into the overlayfs snapshotter."""
        self.ctr("images", "pull", "--plain-http", ref, namespace=namespace)

    def push(self, ref: str, *, namespace: str = NAMESPACE) -> None:
        self.ctr("images", "push", "--plain-http", ref, namespace=namespace)

    def export(self, dest: Path, *refs: str, namespace: str = NAMESPACE) -> Path:
        """``ctr images export``: an OCI layout in a tar, with a Docker manifest.json."""
        self.ctr("images", "export", dest, *refs, namespace=namespace)
        return dest

    def images(self, namespace: str = NAMESPACE) -> dict[str, str]:
        """``ctr images ls``: name -> target digest."""
        lines = self.output("images", "ls", namespace=namespace).splitlines()[1:]
        return {line.split()[0]: line.split()[2] for line in lines if line.strip()}

    def namespaces(self) -> set[str]:
        return set(self.output("namespaces", "ls", "--quiet").split())

    def content(self, namespace: str = NAMESPACE) -> set[str]:
        """``ctr content ls --quiet``: the blob digests the namespace records."""
        return set(self.output("content", "ls", "--quiet", namespace=namespace).split())


class CtrRemote:
    """stargz-snapshotter's ``ctr-remote image convert`` against a test-started containerd."""

    def __init__(self, containerd: Containerd) -> None:
        require_tools("ctr-remote")
        self.containerd = containerd

    def convert(self, source: str, dest: str, kind: TocKind, *extra: str) -> str:
        """Convert ``source`` (already in the content store) to eStargz or zstd:chunked.

        ``extra`` goes to ``convert`` (``--estargz-chunk-size N``).
        """
        self.containerd.ctr(
            "image", "convert", f"--{kind}", "--oci", *extra, source, dest, tool="ctr-remote"
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
        self.data_root = directory / "root"  # the store imagefs reads
        self.socket = directory / "docker.sock"
        self.client_config = directory / "client"
        self.client_config.mkdir(exist_ok=True)
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
            str(self.data_root),
            "--exec-root",
            str(self.directory / "exec"),
            "--pidfile",
            str(self.directory / "docker.pid"),
            "--host",
            f"unix://{self.socket}",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip6tables=false",
            "--storage-driver",
            "overlay2",
            *(f"--insecure-registry={host}" for host in self.insecure),
        ]

    def ready(self) -> bool:
        return self.socket.exists() and self.host.probe(self._client("version"))

    def _client(self, *args: str | Path) -> list[str | Path]:
        return [DOCKER, "--config", self.client_config, "-H", f"unix://{self.socket}", *args]

    def docker(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return self.host.run(self._client(*args))

    def output(self, *args: str | Path) -> str:
        """The client's standard output."""
        return self.docker(*args).stdout.decode()

    def pull(self, ref: str) -> str:
        """Pull ``ref``; its image ID (``sha256:<hex>``)."""
        self.docker("pull", "--quiet", ref)
        return self.image_id(ref)

    def image_id(self, ref: str) -> str:
        """The image's ID (its config digest, ``sha256:<hex>``)."""
        return self.output("image", "inspect", "--format", "{{.Id}}", ref).strip()

    def save(self, dest: Path, *names: str) -> Path:
        self.docker("save", "--output", dest, *names)
        return dest


class PodmanService(Daemon):
    """``podman system service`` on a :class:`Podman` store: the engine running beside us."""

    name = "podman-service"

    def __init__(self, directory: Path, podman: Podman) -> None:
        super().__init__(directory)
        self.podman = podman
        self.socket = podman.runroot / "service.sock"  # sun_path holds 108 bytes

    def argv(self) -> list[str]:
        return [*self.podman.argv("podman"), "system", "service", "--time=0",
                f"unix://{self.socket}"]  # fmt: skip

    def ready(self) -> bool:
        return self.socket.exists()


class Podman:
    """podman and buildah on one private containers-storage (no daemon)."""

    def __init__(self, directory: Path) -> None:
        require_root()
        require_tools("podman", "buildah")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host = PrivateHost(directory / "commands")
        self.root = directory / "root"  # the store imagefs reads
        # podman refuses a runroot longer than 50 characters: a short one of its own.
        self.runroot = Path(tempfile.mkdtemp(prefix="imagefs-podman-run-", dir="/tmp"))

    def argv(self, tool: Literal["podman", "buildah"]) -> list[str]:
        """``tool`` with this store's options."""
        storage = ["--root", str(self.root), "--runroot", str(self.runroot)]
        storage += ["--storage-driver", "overlay"]
        if tool == "buildah":
            return ["buildah", *storage]
        libpod = ["--tmpdir", str(self.directory / "libpod"), "--events-backend", "none",
                  "--cgroup-manager", "cgroupfs"]  # fmt: skip
        return ["podman", *storage, *libpod]

    def podman(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return self.host.run([*self.argv("podman"), *args])

    def output(self, *args: str | Path) -> str:
        """podman's standard output."""
        return self.podman(*args).stdout.decode()

    def buildah(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return self.host.run([*self.argv("buildah"), *args])

    def pull(self, ref: str) -> str:
        """Pull from the loopback registry; the image's ID (hex)."""
        return self.output("pull", "--quiet", "--tls-verify=false", ref).strip()

    def image_id(self, ref: str) -> str:
        """The image's ID (hex, as podman shows it)."""
        return self.output("image", "inspect", "--format", "{{.Id}}", ref).strip()

    @contextmanager
    def service(self, directory: Path) -> Iterator[PodmanService]:
        """``podman system service`` on this store for the block, stopped by its pid after.

        Its files go to ``directory``; its socket to the (short) runroot.
        """
        with PodmanService(directory / "podman-service", self) as service:
            yield service

    def close(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class Skopeo:
    """skopeo in a private host view (its blob-info cache must not reach /var/lib/containers).

    ``scratch`` is where each command's private host directory goes (the
    system's temporary directory if None).
    """

    def __init__(self, scratch: Path | None = None) -> None:
        require_tools("skopeo")
        self.host = PrivateHost(scratch)

    def copy(self, source: str, dest: str, *extra: str) -> None:
        # --insecure-policy: the images are ours; the host's policy.json is not consulted.
        self.host.run(["skopeo", "--insecure-policy", "copy", "--quiet", *extra, source, dest])

    def push(self, source: str, dest: str, *extra: str) -> str:
        """Copy ``source`` to the plain-HTTP registry reference ``dest``; return ``dest``."""
        self.copy(source, f"docker://{dest}", "--dest-tls-verify=false", *extra)
        return dest

    def inspect(self, source: str, *extra: str) -> dict[str, Any]:
        """``skopeo inspect``'s JSON."""
        result = self.host.run(["skopeo", "--insecure-policy", "inspect", *extra, source])
        inspected: dict[str, Any] = json.loads(result.stdout)
        return inspected
