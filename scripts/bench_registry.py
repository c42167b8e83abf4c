"""`make bench` (registry part): mounting from a loopback registry, against parallel curl.

Builds an image of this machine's /usr (three gzip layers) once in $BENCH_DIR,
pushes it to a CNCF distribution registry started on 127.0.0.1, then measures
in one run:

* downloading every layer blob with parallel ``curl`` (the download floor);
* ``imagefs mount REF`` with an empty cache until ``ls`` works (target: at most
  1.3x the curl time: layers are indexed while they download);
* a remount with the cache kept (target: under 0.5 s);
* ``rapidgzip -d -P 2`` of every layer blob, one after the other (the
  decompression floor: on loopback the download is almost free, so this, not
  curl, is what a cold mount can approach there).

Then the same image through a throttled TCP proxy (scripts/throttleproxy.py)
whose aggregate downstream bandwidth is BENCH_LINK_MBPS (Mbit/s, default 400),
as with a real registry, where the link is the bottleneck and the 1.3x target
means something:

* ``curl`` of the largest blob alone (checks that the proxy holds its rate);
* parallel ``curl`` of every blob;
* ``imagefs mount`` with an empty cache until ``ls`` works.

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

from scripts.throttleproxy import ThrottleProxy  # noqa: E402
from tests import builder  # noqa: E402
from tests.registry import Registry  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
RAPIDGZIP = str(ROOT / ".venv" / "bin" / "rapidgzip")
QUICK = os.environ.get("BENCH_QUICK") == "1"
BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/var/tmp/imagefs-bench")) / (
    "registry-quick" if QUICK else "registry"
)
REPO = "bench/usr"
LINK_MBPS = float(os.environ.get("BENCH_LINK_MBPS", "400"))
LINK_RATE = LINK_MBPS * 1e6 / 8  # bytes per second
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


def parallel_curl(urls: list[str]) -> float:
    started = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", url]) for url in urls]
    for url, proc in zip(urls, procs, strict=True):
        if proc.wait() != 0:
            raise SystemExit(f"curl failed: {url}")
    return time.perf_counter() - started


def decompress_floor(blobs: list[Path]) -> float:
    """Seconds to gunzip every blob with rapidgzip on 2 threads, one blob after another."""
    seconds = 0.0
    for blob in blobs:
        started = time.perf_counter()
        # Into /dev/null rapidgzip still decodes everything: same user time
        # as with -f or piped to cat, so this is not a shortcut.
        subprocess.run(
            [RAPIDGZIP, "-d", "-c", "-P", "2", str(blob)], stdout=subprocess.DEVNULL, check=True
        )
        seconds += time.perf_counter() - started
    return seconds


def main() -> int:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    layout = build_layout()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_DIR))
    registry = Registry(work / "registry")
    proxy: ThrottleProxy | None = None
    try:
        # Pushed to the registry itself: only the measured pulls cross the link.
        ref = registry.push(f"oci:{layout}:b", f"{REPO}:1")
        manifest = builder.image_manifest(layout, "b")
        blobs = [layer["digest"] for layer in manifest["layers"]]
        sizes = [layer["size"] for layer in manifest["layers"]]
        total = sum(sizes)
        paths = [f"/v2/{REPO}/blobs/{d}" for d in blobs]
        urls = [f"{registry.url}{path}" for path in paths]
        # Warm the registry's page cache the same way for every contender.
        for url in urls:
            subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True)
        curl = parallel_curl(urls)
        gunzip = decompress_floor([builder.blob_path(layout, d) for d in blobs])
        mnt = work / "mnt"
        mnt.mkdir()
        cache = work / "cache"
        cold = mount_to_ls(ref, cache, mnt)
        warm = mount_to_ls(ref, cache, mnt)

        # The same pulls over a link of LINK_RATE. The reference names the
        # proxy as its registry host: imagefs speaks plain HTTP to any
        # loopback registry, as with the direct one.
        proxy = ThrottleProxy(registry.port, LINK_RATE)
        link_urls = [f"http://{proxy.host}{path}" for path in paths]
        largest = max(range(len(blobs)), key=lambda i: sizes[i])
        one_blob = parallel_curl([link_urls[largest]])
        link_curl = parallel_curl(link_urls)
        link_ref = f"{proxy.host}/{REPO}:1"
        link_cold = mount_to_ls(link_ref, work / "cache-link", mnt)
        link_bytes = proxy.bytes_down
        proxy.stop()
        proxy = None

        link = f"@{LINK_MBPS:g} Mbit/s"
        results = {
            "blob_bytes": total,
            "layers": len(blobs),
            "parallel_curl_s": curl,
            "cold_mount_to_ls_s": cold,
            "ratio": cold / curl,
            "warm_remount_s": warm,
            "rapidgzip_all_blobs_s": gunzip,
            "cold_mount_to_rapidgzip_ratio": cold / gunzip,
            "link_mbit_s": LINK_MBPS,
            "link_one_blob_bytes": sizes[largest],
            "link_one_blob_curl_s": one_blob,
            "link_one_blob_mb_s": sizes[largest] / one_blob / 1e6,
            "link_parallel_curl_s": link_curl,
            "link_cold_mount_to_ls_s": link_cold,
            "link_ratio": link_cold / link_curl,
            "link_bytes_down": link_bytes,
        }
        print(f"\nregistry image: {len(blobs)} gzip layers, {total / 1e6:.1f} MB of blobs")
        print(f"{'parallel curl of all blobs':44} {curl:8.3f} s")
        print(f"{'rapidgzip -P 2 of all blobs, in turn':44} {gunzip:8.3f} s")
        print(
            f"{'imagefs cold mount to ls':44} {cold:8.3f} s   {cold / curl:.2f}x curl (<= 1.3x), "
            f"{cold / gunzip:.2f}x rapidgzip"
        )
        print(f"{'imagefs warm remount to ls':44} {warm:8.3f} s   (< 0.5 s)")
        print(
            f"{f'curl of the largest blob {link}':44} {one_blob:8.3f} s   "
            f"{sizes[largest] / one_blob / 1e6:.1f} MB/s (link {LINK_RATE / 1e6:.1f} MB/s)"
        )
        if abs(sizes[largest] / one_blob / LINK_RATE - 1) > 0.1:
            # A busy machine can starve the proxy's threads: the link figures
            # below are then not about a link of LINK_MBPS.
            print(f"warning: the proxy did not hold {LINK_MBPS:g} Mbit/s; link rows are suspect")
        print(f"{f'parallel curl of all blobs {link}':44} {link_curl:8.3f} s")
        print(
            f"{f'imagefs cold mount to ls {link}':44} {link_cold:8.3f} s   "
            f"{link_cold / link_curl:.2f}x curl (<= 1.3x)"
        )
        (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        if proxy is not None:
            proxy.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
