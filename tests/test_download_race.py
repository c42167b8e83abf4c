"""Cancelling registry pulls mid-transfer never writes into, or closes, another file.

A layer download writes with ``os.pwrite`` on its worker thread while
``Downloads.close`` (Ctrl-C, another layer failing) ends it from another. If
the download's descriptor were closed while the worker was about to write,
the number could be reused by the next file the process opens, and the
layer's bytes would land in that file (issue #15, the download race).

Here pulls from a real registry, slowed by a throttling proxy, are cancelled
at random points many times over, while another thread keeps opening
sentinel files so that any descriptor number freed early is taken at once.
``os.pwrite`` sleeps 20 ms before writing, which widens the window the
race needs (the bytes then go to whatever the captured number names at that
moment, exactly as an unlucky schedule would have it). Afterwards every
sentinel must hold its own bytes and every descriptor the test opened must
still name its own file.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagefs.registry import RegistryOptions
from imagefs.registry.pull import open_registry_image
from scripts.throttleproxy import ThrottleProxy
from tests import builder
from tests.builder import file
from tests.registry import Registry

CYCLES = 40
SENTINEL = b"sentinel file: must never change\n" * 4


class _Sentinels:
    """Keeps opening files, so that a descriptor number freed too early is taken at once.

    Each sentinel is checked (still its own file, still its own bytes) before
    it is closed to make room, and all the rest at the end.
    """

    KEEP = 200  # open at once

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self.opened = 0
        self.damage: list[str] = []
        self._open: list[tuple[int, Path, int]] = []  # fd, path, inode
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sentinels:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        while self._open:
            self._check_and_close(self._open.pop())

    def _run(self) -> None:
        while not self._stop.is_set():
            path = self.directory / f"s{self.opened}"
            path.write_bytes(SENTINEL)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # writable, as a victim would be
            self._open.append((fd, path, os.fstat(fd).st_ino))
            self.opened += 1
            if len(self._open) > self.KEEP:
                # Make room by closing the highest number: that is the one
                # just opened, unless it took a number freed below it (the
                # race's victim), which then stays open to be checked.
                highest = max(range(len(self._open)), key=lambda i: self._open[i][0])
                self._check_and_close(self._open.pop(highest))

    def _check_and_close(self, sentinel: tuple[int, Path, int]) -> None:
        fd, path, inode = sentinel
        try:
            st = os.fstat(fd)
        except OSError as exc:
            self.damage.append(f"descriptor {fd} of {path.name} was closed under us: {exc}")
            return
        if st.st_ino != inode:
            self.damage.append(f"descriptor {fd} no longer names {path.name}")
        elif os.pread(fd, 1 << 20, 0) != SENTINEL:
            self.damage.append(f"{path.name} was written into")
        os.close(fd)
        path.unlink()


class _SlowPwrite:
    """``os.pwrite`` that waits a moment first, and notes if its descriptor changed meanwhile."""

    def __init__(self, real: Callable[[int, Any, int], int]) -> None:
        self.real = real
        self.changed: list[str] = []

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        before = os.fstat(fd)
        time.sleep(0.02)  # the worker holds the number, about to write
        try:
            after = os.fstat(fd)
        except OSError as exc:
            self.changed.append(f"descriptor {fd} was closed while a write was under way: {exc}")
        else:
            if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
                self.changed.append(f"descriptor {fd} named another file by the time it wrote")
        return self.real(fd, data, offset)


def test_cancelled_pulls_never_touch_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(15)
    layers = [
        builder.make_layer_tar([file(f"data/{i}.bin", rng.randbytes(3 << 20).hex())])
        for i in range(3)
    ]
    layout = builder.write_oci_layout(tmp_path / "layout", layers, compression="gzip", tag="t")
    registry = Registry(tmp_path / "registry")
    try:
        registry.push(f"oci:{layout}:t", "race/image:t")
        with ThrottleProxy(registry.port, rate=30e6) as proxy:
            slow = _SlowPwrite(os.pwrite)
            monkeypatch.setattr(os, "pwrite", slow)
            options = RegistryOptions()  # loopback: plain HTTP
            with _Sentinels(tmp_path / "sentinels") as sentinels:
                for cycle in range(CYCLES):
                    cache = tmp_path / f"cache{cycle}"
                    _, downloads, source = open_registry_image(
                        f"{proxy.host}/race/image:t",
                        platform=None, options=options, cache_dir=cache,
                    )  # fmt: skip
                    assert downloads.count == 3
                    time.sleep(rng.uniform(0.0, 0.15))  # mid-transfer, somewhere
                    downloads.close()
                    source.close()
    finally:
        registry.stop()
    assert sentinels.opened > CYCLES  # sentinels kept taking numbers throughout
    assert slow.changed == [], "\n".join(slow.changed[:20])
    assert sentinels.damage == [], "\n".join(sentinels.damage[:20])
    # Nothing of a cancelled download is left behind.
    assert not list(tmp_path.glob("cache*/**/*.part"))
