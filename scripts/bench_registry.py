"""`make bench` (registry part): mounting from a loopback registry, against parallel curl.

Builds an image of this machine's /usr (three gzip layers) once in $BENCH_DIR,
pushes it to a CNCF distribution registry started on 127.0.0.1, then measures
in one run:

* downloading every layer blob with parallel ``curl`` (the download floor);
* ``imagefs mount REF`` with an empty cache until ``ls`` works (target: at most
  1.3x the curl time: layers are indexed while they download);
* a remount with the cache kept (target: under 0.5 s).

Figures for people, no pass/fail. BENCH_QUICK=1 uses /usr/share/doc only.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import builder  # noqa: E402
from tests.registry import Registry  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
QUICK = os.environ.get("BENCH_QUICK") == "1"
BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/var/tmp/imagefs-bench")) / (
    "registry-quick" if QUICK else "registry"
)
LAYERS = (
    [["usr/share/doc"], ["usr/share/man"], ["usr/share/locale"]]
    if QUICK
    else [
        ["usr/share"],
        ["usr/lib/x86_64-linux-gnu", "usr/include"],
        ["usr/bin", "usr/lib/python3"],
    ]
)


def layer_tar(paths: list[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            if Path("/", path).exists():
                tar.add(Path("/", path), arcname=path)
    return out.getvalue()


def build_layout() -> Path:
    layout = BENCH_DIR / "layout"
    if (layout / "index.json").exists():
        return layout
    print("building the bench image (once)...", flush=True)
    tmp = BENCH_DIR / "layout.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    builder.write_oci_layout(tmp, [layer_tar(p) for p in LAYERS], compression="gzip", tag="b")
    tmp.rename(layout)
    return layout


def imagefs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "imagefs", *map(str, args)], capture_output=True, text=True, check=False
    )


def mount_to_ls(ref: str, cache: Path, mnt: Path) -> float:
    started = time.perf_counter()
    result = imagefs("mount", "--quiet", f"--cache-dir={cache}", ref, mnt)
    if result.returncode != 0:
        raise SystemExit(f"mount failed: {result.stderr}")
    os.listdir(mnt)
    seconds = time.perf_counter() - started
    imagefs("umount", mnt)
    return seconds


def main() -> int:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    layout = build_layout()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_DIR))
    registry = Registry(work / "registry")
    try:
        ref = registry.push(f"oci:{layout}:b", "bench/usr:1")
        manifest = builder.image_manifest(layout, "b")
        blobs = [layer["digest"] for layer in manifest["layers"]]
        total = sum(layer["size"] for layer in manifest["layers"])
        urls = [f"{registry.url}/v2/bench/usr/blobs/{d}" for d in blobs]
        # Warm the registry's page cache the same way for both contenders.
        for url in urls:
            subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True)
        started = time.perf_counter()
        procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", url]) for url in urls]
        for proc in procs:
            proc.wait()
        curl = time.perf_counter() - started
        mnt = work / "mnt"
        mnt.mkdir()
        cache = work / "cache"
        cold = mount_to_ls(ref, cache, mnt)
        warm = mount_to_ls(ref, cache, mnt)
        results = {
            "blob_bytes": total,
            "layers": len(blobs),
            "parallel_curl_s": curl,
            "cold_mount_to_ls_s": cold,
            "ratio": cold / curl,
            "warm_remount_s": warm,
        }
        print(f"\nregistry image: {len(blobs)} gzip layers, {total / 1e6:.1f} MB of blobs")
        print(f"{'parallel curl of all blobs':40} {curl:8.3f} s")
        print(f"{'imagefs cold mount to ls':40} {cold:8.3f} s   {cold / curl:.2f}x curl (<= 1.3x)")
        print(f"{'imagefs warm remount to ls':40} {warm:8.3f} s   (< 0.5 s)")
        (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
