"""`make bench` (host stores): mounting an image that is already in an engine's store.

The bench image of scripts/bench_registry.py (this machine's /usr, three gzip
layers) is pushed to a loopback registry and pulled by the real engines, each
with a private root (tests/engines.py: nothing of the host is touched):
podman (containers-storage), containerd (its content store) and dockerd
(overlay2, over that containerd). Then, in one run:

* ``imagefs mount containers-storage:REF`` / ``containerd:REF`` /
  ``docker-store:REF`` until ``ls`` works, with an empty imagefs cache and
  again with it kept;
* what the engines offer instead: ``podman image mount`` (the layers are
  already extracted: it only mounts an overlay), ``ctr images mount``
  (first unpacking the layers into snapshots, then, on a second call,
  mounting the unpacked ones), and ``podman save`` / ``ctr images export`` /
  ``docker save`` followed by an imagefs mount of the tarball (the way in
  without a store source).

The engines' mounts are made and torn down inside their private mount
namespaces, so each is timed as one command. Figures for people, no
pass/fail; BENCH_QUICK=1 uses /usr/share/doc only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_registry import build_layout  # noqa: E402
from tests.engines import NAMESPACE, Containerd, Dockerd, Podman, Skopeo  # noqa: E402
from tests.registry import Registry  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
QUICK = os.environ.get("BENCH_QUICK") == "1"
BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/var/tmp/imagefs-bench")) / (
    "stores-quick" if QUICK else "stores"
)
REPO = "bench/usr"


def imagefs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "imagefs", *map(str, args)], capture_output=True, text=True, check=False
    )


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def mount_to_ls(source: str, mnt: Path, cache: Path, *options: str) -> float:
    """``imagefs mount`` until ``ls`` answers, then unmount (not timed)."""
    start = time.perf_counter()
    result = imagefs("mount", "--quiet", f"--cache-dir={cache}", *options, source, mnt)
    if result.returncode != 0:
        raise RuntimeError(f"imagefs mount {source}: {result.stderr.strip()}")
    os.listdir(mnt)
    elapsed = time.perf_counter() - start
    imagefs("umount", mnt)
    return elapsed


def main() -> int:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    layout = build_layout()
    # Short: podman refuses a runroot path over 50 characters.
    work = Path(tempfile.mkdtemp(prefix="ifs-stores-", dir="/var/tmp"))
    mnt = work / "mnt"
    mnt.mkdir()
    registry = Registry(work / "registry")
    results: dict[str, float] = {}
    try:
        ref = Skopeo(work / "skopeo").push(f"oci:{layout}:b", f"{registry.host}/{REPO}:1")
        with Podman(work / "podman") as podman:
            podman.pull(ref)
            root = str(work / "podman" / "root")
            source = f"containers-storage:{ref}"
            results["podman store: imagefs cold mount"] = mount_to_ls(
                source, mnt, work / "c1", f"--store-root={root}"
            )
            results["podman store: imagefs warm mount"] = mount_to_ls(
                source, mnt, work / "c1", f"--store-root={root}"
            )
            # podman mounts an overlay of the extracted layers in its private
            # namespace and exits; the mount goes with the namespace.
            results["podman image mount (layers already extracted)"] = timed(
                lambda: podman.podman("image", "mount", ref)
            )
            tar = work / "podman-save.tar"
            saved = timed(
                lambda: podman.podman("save", "--format", "docker-archive", "-o", tar, ref)
            )
            results["podman save"] = saved
            results["podman save + imagefs cold mount of the tar"] = saved + mount_to_ls(
                str(tar), mnt, work / "c2"
            )
            tar.unlink()
        with Containerd(work / "containerd") as containerd:
            containerd.fetch(ref)
            root = str(work / "containerd" / "root")
            source = f"containerd:{ref}"
            options = (f"--store-root={root}", f"--namespace={NAMESPACE}")
            results["containerd store: imagefs cold mount"] = mount_to_ls(
                source, mnt, work / "c3", *options
            )
            results["containerd store: imagefs warm mount"] = mount_to_ls(
                source, mnt, work / "c3", *options
            )
            target = work / "ctr-mnt"
            target.mkdir()

            def ctr_mount() -> None:
                # ctr mounts in its own (private) namespace and exits.
                containerd.ctr("images", "mount", ref, target)
                containerd.ctr("images", "unmount", "--rm", target)

            results["ctr images mount, unpacking first"] = timed(ctr_mount)
            results["ctr images mount, layers unpacked"] = timed(ctr_mount)
            tar = work / "ctr-export.tar"
            exported = timed(lambda: containerd.export(tar, ref))
            results["ctr images export"] = exported
            results["ctr images export + imagefs cold mount of the tar"] = exported + mount_to_ls(
                str(tar), mnt, work / "c4"
            )
            tar.unlink()
            with Dockerd(work / "dockerd", containerd, insecure=[registry.host]) as dockerd:
                dockerd.pull(ref)
                tar = work / "docker-save.tar"
                saved = timed(lambda: dockerd.save(tar, ref))
                results["docker save"] = saved
                results["docker save + imagefs cold mount of the tar"] = saved + mount_to_ls(
                    str(tar), mnt, work / "c5"
                )
                tar.unlink()
                # Read while dockerd runs (its directory goes when it stops).
                root = str(work / "dockerd" / "root")
                source = f"docker-store:{ref}"
                results["docker store: imagefs cold mount"] = mount_to_ls(
                    source, mnt, work / "c6", f"--store-root={root}"
                )
                results["docker store: imagefs warm mount"] = mount_to_ls(
                    source, mnt, work / "c6", f"--store-root={root}"
                )
        print(f"\nhost stores: the bench image ({'quick' if QUICK else 'full'}), seconds")
        for name, seconds in results.items():
            print(f"{name:58} {seconds:8.3f} s")
        (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
