"""--readahead: the mount's readahead window, set once the kernel's INIT is done."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from imagefs.daemon.mounttab import mount_at
from tests import builder
from tests.builder import file
from tests.mounting import mounted
from tests.needs import require_root

KERNEL_DEFAULT_KB = 128  # what a FUSE mount starts with (VM_READAHEAD_PAGES)


def read_ahead_kb(mountpoint: Path, want: int | None = None) -> int:
    """The mount's read_ahead_kb; with ``want``, wait (up to 10 s) for that value."""
    entry = mount_at(os.path.realpath(mountpoint))
    assert entry is not None
    path = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    deadline = time.monotonic() + 10
    while True:
        value = int(path.read_text())
        if want is None or value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.02)  # set by the daemon after INIT, just after the mount returns


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(3).randbytes(6 << 20)
    tar = builder.make_layer_tar([file("big", data)])
    return builder.write_oci_layout(tmp_path / "l", [tar], compression="gzip", tag="t"), data


@pytest.mark.parametrize(
    ("options", "expected"),
    [([], 1024), (["--readahead=512"], 512), (["-o", "readahead=2048"], 2048)],
)
def test_readahead_is_set_and_reads_stay_right(
    tmp_path: Path, layout: tuple[Path, bytes], options: list[str], expected: int
) -> None:
    require_root()  # only root may write a mount's read_ahead_kb
    path, data = layout
    with mounted(f"oci:{path}:t", tmp_path / "mnt", *options) as mnt:
        assert read_ahead_kb(mnt, want=expected) == expected
        # Sequential reads now come as 1 MiB requests and must still be exact.
        assert hashlib.sha256((mnt / "big").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_readahead_zero_keeps_the_kernels(tmp_path: Path, layout: tuple[Path, bytes]) -> None:
    require_root()
    path, _ = layout
    with mounted(f"oci:{path}:t", tmp_path / "mnt", "--readahead=0") as mnt:
        time.sleep(0.3)  # time enough for the daemon to have set it, had it wanted to
        assert read_ahead_kb(mnt) == KERNEL_DEFAULT_KB
