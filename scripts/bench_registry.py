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

Then lazy mounts (issue #14): the same image converted by ``ctr-remote image
convert --estargz`` and ``--zstdchunked`` (a containerd started for it, with
a private root; the conversions are kept in $BENCH_DIR), side by side, on
loopback and behind the throttle proxy at BENCH_LAZY_MBPS (default 100): time
to live (median of three mounts; the full mount's on loopback too) and bytes
fetched to live, ``cat``
of one file and ``sha256sum`` of 100 files (time and bytes), against the
full (``--lazy never``) mount of the same image over the same link. Goals:
live in at most 0.25x the full mount on loopback and 0.05x at 100 Mbit/s; at
most 5% of the blob bytes fetched to go live; one small file at most its
chunks plus 64 KiB. BENCH_LAZY=0 skips it.

Figures for people, no pass/fail. BENCH_QUICK=1 uses /usr/share/doc only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.throttleproxy import ThrottleProxy  # noqa: E402
from tests import builder  # noqa: E402
from tests.engines import Containerd, Skopeo, TocKind  # noqa: E402
from tests.oracle import toc_json  # noqa: E402
from tests.producers import ctr_remote_convert, registry_to_layout  # noqa: E402
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
LAZY = os.environ.get("BENCH_LAZY", "1") != "0"
LAZY_MBPS = float(os.environ.get("BENCH_LAZY_MBPS", "100"))
LIVE_RUNS = 3  # lazy mounts per image and link: time to live is their median (it is noisy)
UNLIMITED = 1e12  # bytes per second: the throttle proxy as a mere byte counter
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


def mount_to_ls(ref: str, cache: Path, mnt: Path, *options: str, keep: bool = False) -> float:
    """Seconds from ``imagefs mount`` to a listed root; unmounted after unless ``keep``."""
    # An earlier run's cache writes (a full mount writes a gigabyte, and its
    # cache's removal frees it) must not land in this one's time: unsynced,
    # the first lazy mount after a full one was 0.1-0.5 s slower than the next.
    os.sync()
    started = time.perf_counter()
    result = imagefs("mount", "--quiet", f"--cache-dir={cache}", *options, ref, mnt)
    if result.returncode != 0:
        raise SystemExit(f"mount failed: {result.stderr}")
    os.listdir(mnt)
    seconds = time.perf_counter() - started
    if not keep:
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


def _member_bytes(blob: bytes, name: str) -> int:
    """Compressed bytes of the members holding ``name``'s chunks, from the TOC."""
    entries = toc_json(blob)["entries"]
    offsets = sorted({e["offset"] for e in entries if e.get("offset")})
    total = 0
    for entry in entries:
        if entry["name"] == name and entry["type"] in ("reg", "chunk") and entry.get("size", 1):
            later = [o for o in offsets if o > entry["offset"]]
            total += (later[0] if later else len(blob)) - entry["offset"]
    return total


def _pick_files(mnt: Path) -> tuple[str, list[str]]:
    """One small file (16-256 KiB) and 100 files spread over the tree (a walk fetches nothing)."""
    regular: list[tuple[str, int]] = []
    for directory, _, files in os.walk(mnt):
        for name in sorted(files):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if st.st_mode & 0o170000 == 0o100000 and st.st_size > 0:
                regular.append((os.path.relpath(path, mnt), st.st_size))
    regular.sort()
    small = next(
        path for path, size in regular[len(regular) // 3 :] if 16 << 10 <= size <= 256 << 10
    )
    step = max(1, len(regular) // 100)
    return small, [path for path, _ in regular[::step][:100]]


def lazy_run(ref: str, proxy: ThrottleProxy, work: Path, blobs: dict[str, bytes]) -> dict[str, Any]:
    """Lazy mounts through ``proxy``: live (median of LIVE_RUNS, each with an empty
    cache), then in the last one a cat and 100 sha256sums (seconds and bytes)."""
    mnt = work / "mnt"
    lives: list[float] = []
    for run in range(LIVE_RUNS):
        cache = Path(tempfile.mkdtemp(prefix="cache-lazy-", dir=work))
        before = proxy.bytes_down
        lives.append(mount_to_ls(ref, cache, mnt, "--prefetch=none", keep=run + 1 == LIVE_RUNS))
        live_bytes = proxy.bytes_down - before
    live = statistics.median(lives)
    try:
        small, hundred = _pick_files(mnt)
        before = proxy.bytes_down
        started = time.perf_counter()
        subprocess.run(["cat", str(mnt / small)], stdout=subprocess.DEVNULL, check=True)
        cat = time.perf_counter() - started
        cat_bytes = proxy.bytes_down - before
        before = proxy.bytes_down
        started = time.perf_counter()
        subprocess.run(["sha256sum", *[str(mnt / p) for p in hundred]], stdout=subprocess.DEVNULL,
                       check=True)  # fmt: skip
        hashed = time.perf_counter() - started
        hashed_bytes = proxy.bytes_down - before
    finally:
        imagefs("umount", mnt)
    chunks = sum(_member_bytes(blob, small) for blob in blobs.values())
    return {
        "live_s": live, "live_samples_s": lives, "live_bytes": live_bytes,
        "cat_s": cat, "cat_bytes": cat_bytes,
        "cat_file_chunk_bytes": chunks, "sha256_100_s": hashed, "sha256_100_bytes": hashed_bytes,
    }  # fmt: skip


CONVERSIONS: dict[str, tuple[TocKind, str]] = {
    "eStargz": ("estargz", "esgz"),
    "zstd:chunked": ("zstdchunked", "zstdc"),
}


def converted_images(registry: Registry, plain_ref: str, work: Path) -> dict[str, str]:
    """The bench image converted by ``ctr-remote`` to each lazy format, in ``registry``.

    Converting 717 MB takes ctr-remote about nine minutes, so each
    conversion is kept in BENCH_DIR as an OCI layout (copied by skopeo,
    manifest and annotations as ctr-remote wrote them), named by the plain
    image's index, and pushed again on later runs.
    """
    # The plain layout's index names its manifest: a rebuilt layout, new conversions.
    key = hashlib.sha256((BENCH_DIR / "layout" / "index.json").read_bytes()).hexdigest()[:12]
    layouts = {kind: BENCH_DIR / f"converted-{tag}-{key}" for kind, (_, tag) in CONVERSIONS.items()}
    missing = [kind for kind, layout in layouts.items() if not (layout / "index.json").exists()]
    refs: dict[str, str] = {}
    if missing:
        containerd = Containerd(work / "containerd").start()
        try:
            started = time.perf_counter()
            for kind in missing:
                converter, tag = CONVERSIONS[kind]
                refs[kind] = ctr_remote_convert(containerd, plain_ref, converter, tag)
            print(f"converted with ctr-remote in {time.perf_counter() - started:.1f} s", flush=True)
        finally:
            containerd.stop()
        for kind in missing:
            tmp = layouts[kind].with_name(layouts[kind].name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            registry_to_layout(Skopeo(), refs[kind], tmp, "b")
            tmp.rename(layouts[kind])
    for kind, layout in layouts.items():
        if kind not in refs:
            refs[kind] = registry.push(f"oci:{layout}:b", f"{REPO}:{CONVERSIONS[kind][1]}")
    return refs


def lazy_bench(registry: Registry, plain_ref: str, work: Path) -> dict[str, dict[str, Any]]:
    """Convert, then measure lazy and full mounts of each format on both links."""
    refs = converted_images(registry, plain_ref, work)
    found: dict[str, dict[str, Any]] = {}
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    for kind, ref in refs.items():
        repo_tag = ref.split("/", 1)[1]
        repo, tag = repo_tag.rsplit(":", 1)
        manifest = json.loads(subprocess.run(
            ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
             f"{registry.url}/v2/{repo}/manifests/{tag}"], capture_output=True, check=True,
        ).stdout)  # fmt: skip
        blobs = {
            layer["digest"]: registry.blob_file(layer["digest"]).read_bytes()
            for layer in manifest["layers"]
        }
        total = sum(layer["size"] for layer in manifest["layers"])
        for link, rate in (("loopback", UNLIMITED), (f"{LAZY_MBPS:g} Mbit/s", LAZY_MBPS * 1e6 / 8)):
            proxy = ThrottleProxy(registry.port, rate)
            try:
                via = f"{proxy.host}/{repo_tag}"
                row = lazy_run(via, proxy, work, blobs)
                # The baseline is as noisy: the median of as many full mounts
                # on loopback; one behind the slow link (a minute each).
                fulls = []
                for _ in range(LIVE_RUNS if rate == UNLIMITED else 1):
                    before = proxy.bytes_down
                    cache = Path(tempfile.mkdtemp(prefix="cache-full-", dir=work))
                    fulls.append(mount_to_ls(via, cache, mnt, "--lazy=never"))
                    row["full_bytes"] = proxy.bytes_down - before
                    shutil.rmtree(cache)  # a copy of every blob
                full = row["full_s"] = statistics.median(fulls)
                row["full_samples_s"] = fulls
            finally:
                proxy.stop()
            row["blob_bytes"] = total
            found[f"{kind} {link}"] = row
            live_runs, full_runs = (", ".join(f"{t:.2f}" for t in row[key]) for key in
                                    ("live_samples_s", "full_samples_s"))  # fmt: skip
            print(f"  {kind} {link}: live {row['live_s']:.2f} s ({live_runs}), "
                  f"full {full:.2f} s ({full_runs})", flush=True)  # fmt: skip
    return found


def print_lazy(results: dict[str, dict[str, Any]]) -> None:
    print("\nlazy registry mounts (--prefetch=none), each against the full mount of the same image")
    header = (
        f"{'image, link':30} {'live':>8} {'full':>8} {'ratio':>6} {'to live':>10} {'% blob':>7}"
    )
    header += f" {'cat 1 file':>17} {'its chunks':>10} {'sha256 100':>17}"
    print(header)
    for name, row in results.items():
        ratio = row["live_s"] / row["full_s"]
        share = 100 * row["live_bytes"] / row["blob_bytes"]
        line = f"{name:30} {row['live_s']:7.2f}s {row['full_s']:7.2f}s {ratio:6.3f}"
        line += f" {human(row['live_bytes']):>10} {share:6.2f}%"
        line += f" {row['cat_s'] * 1000:7.1f}ms {human(row['cat_bytes']):>8}"
        line += f" {human(row['cat_file_chunk_bytes']):>10}"
        line += f" {row['sha256_100_s']:7.2f}s {human(row['sha256_100_bytes']):>8}"
        print(line)
    print("goals: ratio <= 0.25 on loopback, <= 0.05 at 100 Mbit/s; to live <= 5% of the blob "
          "bytes; cat <= its chunks + 64 KiB")  # fmt: skip


def human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


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
        results: dict[str, object] = {
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
        if LAZY:
            lazy_results = lazy_bench(registry, ref, work)
            print_lazy(lazy_results)
            results["lazy"] = lazy_results
        (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        if proxy is not None:
            proxy.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
