"""The daemon never opens or follows a path named by the image, nor a symlink planted in a
host store (syscall level).

strace watches every path-taking system call of the daemon while a reader
walks the mount, reads symlinks that point at host files, and reads through
them. The kernel resolves a symlink for the *reader*, in the reader's own
namespace, as for any file system; the daemon must only ever touch its own
blobs, cache files and /dev/fuse.

For the host stores (containerd's, podman's and Docker's, written by the
session's engines, tests.engines), a copy of each gets a symlink planted in
place of a blob, a layer file or a parent directory, pointing out of the
store; ``strace -f`` follows ``imagefs mount`` and the daemon it forks, and
the trace (tests.strace) must show that everything opened inside the store
was opened with ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` or as one
``O_NOFOLLOW`` component of a walk, that nothing there was looked up by a
call that follows symlinks, written or locked, and that the symlink's target
was never named nor opened. The mount is refused; where ``--allow-modified``
serves such a layer anyway, the served mount is traced while a reader reads
everything, too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagefs.image import Image
from imagefs.layers.rebuilt import rebuilt_of
from imagefs.sources import open_image
from imagefs.sources.containerd import CONTENT_DIR, META_DB
from tests import builder
from tests.builder import directory, file, symlink
from tests.engines import NAMESPACE, Containerd, Dockerd, Podman
from tests.images import BuiltImage
from tests.linuxenv import WAIT_STEPS
from tests.mounting import IMAGEFS, force_unmount, is_mounted, mounted, run_imagefs
from tests.needs import require_fuse, require_tools
from tests.oracle import snapshot
from tests.producers import RegistryImages
from tests.strace import Call, Lookup, read_calls, within
from tests.test_mount import daemon_pid

HOST_TARGETS = ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/proc/self/environ")
# Path-taking calls (if the daemon resolved an image path, it would show here),
# plus pread64/preadv2 as the positive control: the daemon reading its blob.
SYSCALLS = ",".join(
    [
        "trace=open", "openat", "openat2", "stat", "lstat", "newfstatat", "statx",
        "readlink", "readlinkat", "access", "faccessat", "faccessat2", "execve", "chdir",
        "pread64", "preadv2",
    ]
)  # fmt: skip


def test_daemon_never_touches_paths_the_image_names(tmp_path: Path) -> None:
    require_tools("strace")
    layer = builder.make_layer_tar(
        [
            directory("etc"),
            symlink("etc/shadow-link", "/etc/shadow"),
            symlink("host-name", "/etc/hostname"),
            symlink("environ", "/proc/self/environ"),
            symlink("rel-escape", "../../../../etc/passwd"),
            file("etc/passwd", "root:x:0:0:image:/root:/bin/sh\n" * 200),
        ]
    )
    layout = builder.write_oci_layout(tmp_path / "layout", [layer], compression="none", tag="t")
    log = tmp_path / "strace.log"
    with mounted(f"oci:{layout}:t", tmp_path / "mnt") as mnt:
        pid = daemon_pid(mnt)
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", SYSCALLS, "-o", str(log), "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):  # until strace is attached (it logs nothing before)
                if Path(f"/proc/{pid}/status").read_text().find("TracerPid:\t0") < 0:
                    break
                time.sleep(0.05)
            for path in sorted(mnt.rglob("*")):
                os.lstat(path)
                if path.is_symlink():
                    os.readlink(path)
                    try:  # the *reader* follows it, in its own namespace
                        path.read_bytes() if path.is_file() else os.listdir(path)
                    except OSError:
                        pass
                elif path.is_file():
                    path.read_bytes()
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
    calls = log.read_text()
    touched = set(re.findall(r'"([^"]*)"', calls))
    for target in HOST_TARGETS:
        assert not any(target in path for path in touched), (target, sorted(touched))
    assert not any("shadow-link" in path or "host-name" in path for path in touched)
    # The trace did record the daemon at work: it read the image's blob.
    assert re.search(r"\bpread(64|v2)\(", calls), calls[:2000]


# --------------------------------------------------------------------------- host stores

STORE_KINDS = ("containerd", "podman", "docker")
# Everything that names a path, the descriptor calls that could follow or lock,
# and pread64/preadv2 as the positive control (the daemon reading the store).
STORE_SYSCALLS = "trace=%file,openat2,fchdir,flock,fcntl,pread64,preadv2"
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND", "O_TMPFILE")
LOCKS = ("F_SETLK", "F_SETLKW", "F_OFD_SETLK", "F_OFD_SETLKW")
HOST_SECRET = b"HOST SECRET\n"
# Where each store kind gets its planted symlink: in place of a blob the store
# keeps (containerd's layer blob; podman's and Docker's tar-split record), of a
# file in an extracted layer, or of a parent directory on the way.
PLANTED = [
    ("containerd", "blob"),
    ("containerd", "parent"),
    ("podman", "blob"),
    ("podman", "layer-file"),
    ("podman", "parent"),
    ("docker", "blob"),
    ("docker", "layer-file"),
    ("docker", "parent"),
]


@dataclass(frozen=True)
class HostStore:
    """An engine's store holding the catalog's ``store`` image."""

    kind: str
    root: Path
    source: str
    options: tuple[str, ...] = ()

    def copy(self, dest: Path) -> HostStore:
        """What imagefs reads of the store, copied (owners, modes, xattrs, links kept)."""
        if self.kind == "containerd":
            dest.mkdir()
            for part in (str(Path(META_DB).parent), CONTENT_DIR):
                subprocess.run(["cp", "-a", str(self.root / part), str(dest / part)], check=True)
        else:
            subprocess.run(["cp", "-a", str(self.root), str(dest)], check=True)
        return HostStore(self.kind, dest, self.source, self.options)

    def open(self) -> Image:
        return open_image(self.source, store_root=str(self.root), namespace=self.namespace)

    @property
    def namespace(self) -> str | None:
        return NAMESPACE if self.kind == "containerd" else None


@pytest.fixture(scope="module")
def host_stores(
    registry_images: RegistryImages,
    store_image: BuiltImage,
    containerd: Containerd,
    podman: Podman,
    dockerd: Dockerd,
) -> dict[str, HostStore]:
    """The session's containerd, podman and dockerd, each holding the store image."""
    require_tools("strace")
    ref = registry_images.ref(store_image)
    containerd.fetch(ref)
    podman.pull(ref)
    dockerd.pull(ref)
    return {
        "containerd": HostStore(
            "containerd", containerd.root, f"containerd:{ref}", (f"--namespace={NAMESPACE}",)
        ),
        "podman": HostStore("podman", podman.root, f"containers-storage:{ref}"),
        "docker": HostStore("docker", dockerd.data_root, f"docker-store:{ref}"),
    }


def plant(store: HostStore, planted: str, outside: Path) -> tuple[Path, Path]:
    """Replace a blob, a layer file or a parent directory of ``store`` with a symlink out.

    The symlink's target holds what the store held (a blob's own bytes: if it
    were followed, its digest would even match) or, for a layer file, a host
    secret. Returns (the symlink, its target).
    """
    image = store.open()
    outside.mkdir()
    if store.kind == "containerd":
        blob = Path(image.layers[0].blob.path)
        link = blob if planted == "blob" else blob.parent  # blobs/sha256/<hex>, blobs/sha256
        target = outside / link.name
    elif planted == "blob":
        rebuilt = rebuilt_of(image.layers[-1])
        assert rebuilt is not None
        link = Path(rebuilt.where_record)
        target = outside / link.name
    else:
        rebuilt = rebuilt_of(image.layers[0])
        assert rebuilt is not None
        etc = Path(rebuilt.where_diff) / "etc"
        if planted == "layer-file":
            link, target = etc / "shadow", outside / "shadow"
            target.write_bytes(HOST_SECRET)
        else:
            link, target = etc, outside / "etc"
            shutil.copytree(etc, target, symlinks=True)
            (target / "shadow").write_bytes(HOST_SECRET)
    if target.exists():  # made above: the original goes
        if link.is_dir():
            shutil.rmtree(link)
        else:
            link.unlink()
    else:  # the original itself moves out
        shutil.move(link, target)
    link.symlink_to(target)
    return link, target


def traced(log: Path, *argv: str | Path) -> list[str]:
    """``strace -f -ff -y`` of ``argv`` (every process it forks: a daemon too), one log per
    process (``LOG.<pid>``), strings long enough for any path."""
    return ["strace", "-f", "-ff", "-qq", "-y", "-s", "65536", "-e", STORE_SYSCALLS,
            "-o", str(log), *map(str, argv)]  # fmt: skip


def store_violations(calls: list[Call], root: str) -> list[str]:
    """The calls that looked up, opened, wrote or locked something inside ``root`` unsafely."""
    bad = []
    for call in calls:
        on_store = any(within(path, root) for path in call.descriptor_paths())
        locks = call.name == "flock" or (
            call.name == "fcntl" and any(x in call.rest for x in LOCKS)
        )
        unsafe = any(
            within(lookup.resolved, root) and not safe(call, lookup, root)
            for lookup in call.lookups
        )
        if unsafe or (on_store and (locks or call.name == "fchdir")):
            bad.append(call.line)
    return bad


def safe(call: Call, lookup: Lookup, root: str) -> bool:
    """A look-up inside the store that follows no symlink (the rules of layers/beneath.py)."""
    if any(flag in call.rest for flag in WRITE_FLAGS):
        return False
    if lookup.given == "":  # a call on the descriptor itself
        return "AT_EMPTY_PATH" in call.rest
    if lookup.given.startswith("/"):
        # Only the root itself, by its absolute path: the caller's choice (it may be a link).
        return lookup.resolved == root and call.name in ("openat", "newfstatat", "statx")
    inside = lookup.base is not None and within(lookup.base, root)
    one_step = "/" not in lookup.given and lookup.given != ".."
    if call.name == "openat2":
        return inside and "RESOLVE_BENEATH" in call.rest and "RESOLVE_NO_SYMLINKS" in call.rest
    if call.name == "openat":  # a walk: one component, O_NOFOLLOW ("." follows nothing)
        return inside and one_step and ("O_NOFOLLOW" in call.rest or lookup.given == ".")
    if call.name in ("newfstatat", "statx"):
        return inside and one_step and "AT_SYMLINK_NOFOLLOW" in call.rest
    if call.name == "readlinkat":  # reads the link itself
        return inside and one_step
    return False


def touching(calls: list[Call], target: str) -> list[str]:
    """The calls that named ``target`` (or below), or had a descriptor on it."""
    return [
        call.line
        for call in calls
        if any(within(lookup.resolved, target) for lookup in call.lookups)
        or any(within(path, target) for path in call.descriptor_paths())
    ]


def check_trace(log: Path, cwd: Path, store: HostStore, link: Path, target: Path) -> list[Call]:
    calls = read_calls(log, cwd)
    root = str(store.root)
    # The cwd stays ours (outside the store), so relative paths are read right.
    assert not [call.line for call in calls if call.name == "chdir"]
    elsewhere = {arg for call in calls for arg in call.args if arg.startswith("AT_FDCWD<")}
    assert elsewhere <= {f"AT_FDCWD<{cwd}>"}, elsewhere
    bad = store_violations(calls, root)
    assert bad == [], "\n".join(bad[:20])
    touched = touching(calls, str(target))
    assert touched == [], "\n".join(touched[:20])
    # Positive controls: the trace saw imagefs open the store beneath its root,
    # and look at the planted symlink itself (refused, never followed).
    beneath = [c for c in calls if c.name == "openat2" and not c.failed
               and any(within(lookup.resolved, root) for lookup in c.lookups)]  # fmt: skip
    assert beneath, f"no openat2 into {root} was traced"
    assert [c for c in calls if any(lookup.resolved == str(link) for lookup in c.lookups)], link
    return calls


@pytest.mark.parametrize(("kind", "planted"), PLANTED)
def test_store_opens_never_follow_a_planted_symlink(
    kind: str, planted: str, host_stores: dict[str, HostStore], tmp_path: Path
) -> None:
    """Under strace, a mount of the store opens nothing there but beneath its root, with
    no symlink followed; the planted symlink is refused and its target never touched."""
    require_fuse()
    store = host_stores[kind].copy(tmp_path / "store")
    link, target = plant(store, planted, tmp_path / "outside")
    mnt, cwd = tmp_path / "mnt", tmp_path / "cwd"
    mnt.mkdir()
    cwd.mkdir()
    args = ("mount", "--quiet", f"--store-root={store.root}", *store.options)

    log = tmp_path / "refused.trace"
    refused = subprocess.run(
        traced(log, *IMAGEFS, *args, f"--cache-dir={tmp_path / 'cache'}", store.source, mnt),
        cwd=cwd, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    force_unmount(mnt)
    assert refused.returncode == 1, refused.stderr
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "HOST SECRET" not in message, message
    assert link.name in message, message
    check_trace(log, cwd, store, link, target)

    if planted == "blob" or kind == "containerd":
        # Nothing serves a store whose record or blob cannot be opened, and
        # --allow-modified is for the extracted stores only.
        return
    log = tmp_path / "served.trace"
    output = tmp_path / "served.stderr"
    with output.open("w") as stderr:
        tracer = subprocess.Popen(
            traced(log, *IMAGEFS, *args, "--allow-modified",
                   f"--cache-dir={tmp_path / 'cache2'}", store.source, mnt),
            cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        for _ in range(WAIT_STEPS * 5):  # a hang guard: strace slows the start
            if is_mounted(mnt) or tracer.poll() is not None:
                break
            time.sleep(0.05)
        assert is_mounted(mnt), output.read_text()
        served = snapshot(mnt)  # lists, stats, reads every file, reads every link
        assert (mnt / "etc/shadow").read_bytes() != HOST_SECRET
        assert served["etc/passwd"].type == "file"
        assert run_imagefs("umount", mnt).returncode == 0
        tracer.wait(timeout=600)  # strace ends with the daemon
    finally:
        force_unmount(mnt)
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    calls = check_trace(log, cwd, store, link, target)
    # The daemon read the layer files' bytes through descriptors beneath the root.
    assert any(
        call.name in ("pread64", "preadv2") and within(path, str(store.root))
        for call in calls
        for path in call.descriptor_paths()
    ), "no pread of a store file was traced"


def test_the_store_trace_check_sees_a_followed_symlink(tmp_path: Path) -> None:
    """The controls of the check above, on real traces: plain ``open``/``stat`` through a
    planted symlink and an open for writing are flagged, and the symlink's target is seen
    touched; imagefs's own Beneath reading the same store is not flagged."""
    require_tools("strace")
    store, outside = tmp_path / "store", tmp_path / "outside"
    (store / "blobs").mkdir(parents=True)
    outside.write_bytes(HOST_SECRET)
    (store / "blobs" / "link").symlink_to(outside)
    (store / "blobs" / "file").write_text("in the store\n")
    naive = (
        f"import os; open({str(store / 'blobs/link')!r}).read(); "
        f"os.stat({str(store / 'blobs/file')!r}); open({str(store / 'blobs/file')!r}, 'a')"
    )
    subprocess.run(traced(tmp_path / "naive", sys.executable, "-c", naive), check=True)
    calls = read_calls(tmp_path / "naive")
    bad = store_violations(calls, str(store))
    assert [line for line in bad if '"' + str(store / "blobs/link") + '"' in line], bad
    assert [line for line in bad if line.startswith("newfstatat(") and "blobs/file" in line], bad
    assert [line for line in bad if "O_APPEND" in line], bad
    assert touching(calls, str(outside)), "the followed symlink's target is not in the trace"

    careful = (
        "from imagefs.layers.beneath import Beneath\n"
        f"tree = Beneath({str(store)!r})\n"
        "assert tree.read('blobs/file', 100) == b'in the store\\n'\n"
        "try:\n    tree.read('blobs/link', 100)\nexcept OSError:\n    pass\n"
        "else:\n    raise SystemExit('followed')\n"
        "assert [entry.name for entry in tree.listdir('blobs')]\n"
    )
    subprocess.run(traced(tmp_path / "careful", sys.executable, "-c", careful), check=True)
    calls = read_calls(tmp_path / "careful")
    assert store_violations(calls, str(store)) == []
    assert touching(calls, str(outside)) == []
    assert [c for c in calls if c.name == "openat2" and "RESOLVE_BENEATH" in c.rest]
