"""Load: 16 parallel readers on one mount, for a bounded time.

Three layers (plain tar, gzip, zstd: every reader path) of files from empty
to 2 MiB. Each reader alternates a full-tree ``sha256`` walk with reads at
random offsets and sizes, every byte checked against the reference. The
daemon's RSS is read after a warm-up walk and again at the end.

``IMAGEFS_STRESS_SECONDS`` sets the duration (``make test``: 4 s; ``make
fuzz``: 60 s). The figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import builder
from tests.mounting import mounted
from tests.test_mount import daemon_pid

READERS = 16
SECONDS = float(os.environ.get("IMAGEFS_STRESS_SECONDS", "4"))


def _reference() -> tuple[list[bytes], dict[str, bytes]]:
    rng = random.Random(6)
    layers: list[bytes] = []
    files: dict[str, bytes] = {}
    for layer in range(3):
        members = []
        for index in range(60):
            size = rng.choice((0, 1, 511, 4096, 65537, rng.randrange(1 << 20), 2 << 20))
            # Compressible, and every offset distinct within a 4099-byte period.
            data = (rng.randbytes(4099) * (size // 4099 + 1))[:size]
            name = f"l{layer}/d{index % 7}/f{index}"
            members.append(builder.file(name, data))
            files[name] = data
        # The upper layers override one lower file each.
        if layer:
            members.append(builder.file("l0/d0/f0", f"layer {layer}"))
            files["l0/d0/f0"] = f"layer {layer}".encode()
        layers.append(builder.make_layer_tar(members))
    return layers, files


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Tally:
    reads: int = 0
    bytes: int = 0
    walks: int = 0
    errors: int = 0


def _walk(mnt: Path, hashes: dict[str, str], tally: Tally, lock: threading.Lock) -> None:
    for path, expected in hashes.items():
        digest = hashlib.sha256()
        count = 0
        with open(mnt / path, "rb") as handle:
            while chunk := handle.read(1 << 17):
                digest.update(chunk)
                count += 1
        with lock:
            tally.reads += count
            tally.bytes += (mnt / path).stat().st_size
            if digest.hexdigest() != expected:
                tally.errors += 1


@dataclass
class Shared:
    mnt: Path
    files: dict[str, bytes]
    hashes: dict[str, str]
    until: float
    tally: Tally
    lock: threading.Lock
    failures: list[BaseException]


def _reader(seed: int, shared: Shared) -> None:
    mnt, files, hashes, until = shared.mnt, shared.files, shared.hashes, shared.until
    tally, lock, failures = shared.tally, shared.lock, shared.failures
    rng = random.Random(seed)
    names = [name for name, data in files.items() if data]
    try:
        while time.monotonic() < until:
            if rng.random() < 0.02:
                _walk(mnt, hashes, tally, lock)
                with lock:
                    tally.walks += 1
                continue
            name = rng.choice(names)
            data = files[name]
            offset = rng.randrange(len(data))
            size = rng.choice((1, 512, 4096, 65536, 1 << 20))
            fd = os.open(mnt / name, os.O_RDONLY)
            try:
                got = os.pread(fd, size, offset)
            finally:
                os.close(fd)
            with lock:
                tally.reads += 1
                tally.bytes += len(got)
                if got != data[offset : offset + size]:
                    tally.errors += 1
    except BaseException as exc:  # counted, and re-raised by the test
        with lock:
            tally.errors += 1
        failures.append(exc)


@pytest.mark.fuse
def test_sixteen_parallel_readers(tmp_path: Path) -> None:
    layers, files = _reference()
    layout = builder.write_oci_layout(
        tmp_path / "layout", layers, compression=["none", "gzip", "zstd"]
    )
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    tally = Tally()
    lock = threading.Lock()
    failures: list[BaseException] = []
    with mounted(layout, tmp_path / "mnt") as mnt:
        pid = daemon_pid(mnt)
        _walk(mnt, hashes, tally, lock)  # warm-up: every reader and cache opened once
        rss_before = _rss_kib(pid)
        shared = Shared(mnt, files, hashes, time.monotonic() + SECONDS, tally, lock, failures)
        threads = [threading.Thread(target=_reader, args=(seed, shared)) for seed in range(READERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rss_after = _rss_kib(pid)
    print(
        f"\nstress: {READERS} readers, {SECONDS:g} s: {tally.reads} reads, "
        f"{tally.bytes / 1e6:.1f} MB, {tally.walks} full-tree walks, {tally.errors} errors, "
        f"daemon RSS {rss_before} KiB before, {rss_after} KiB after"
    )
    assert not failures, failures[:3]
    assert tally.errors == 0
    assert tally.walks >= 1 and tally.reads > READERS
    # Stable: the readers' caches are bounded (gzip: 4 open readers of ~20 MB;
    # zstd: a 32 MB frame cache), so after the warm-up RSS may grow by those
    # caches filling, not with the number of reads.
    assert rss_after <= rss_before + 96 * 1024, (rss_before, rss_after)
