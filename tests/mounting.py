"""Real FUSE mounts for tests: mount with the CLI, always unmount.

:func:`mounted` calls :func:`tests.needs.require_fuse` first, so without
/dev/fuse a test skips on a developer machine but fails under ``CI=true``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.needs import require_fuse

IMAGEFS = [sys.executable, "-m", "imagefs"]


def run_imagefs(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IMAGEFS, *map(str, args)], capture_output=True, text=True, check=check, timeout=600
    )


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def force_unmount(path: Path) -> None:
    """Unconditional cleanup: lazy unmount whatever is mounted at ``path``."""
    for _ in range(3):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
        time.sleep(0.05)


@contextmanager
def mounted(
    source: str | Path,
    mountpoint: Path,
    *options: str,
    log: Path | None = None,
    cache: Path | None = None,
) -> Iterator[Path]:
    """Mount ``source`` with ``imagefs mount`` (daemon mode) for the block.

    The cache defaults to a directory beside the mount point, so tests never
    share (or are helped by) the machine's cache; pass ``cache`` to share one.
    """
    require_fuse()
    mountpoint.mkdir(parents=True, exist_ok=True)
    cache = cache or mountpoint.with_name(mountpoint.name + ".cache")
    extra = [f"--log={log}"] if log else []
    if not any(option.startswith("--cache-dir") for option in options):
        extra.append(f"--cache-dir={cache}")
    result = run_imagefs("mount", "--quiet", *extra, *options, source, mountpoint)
    try:
        assert result.returncode == 0, f"imagefs mount failed: {result.stderr}"
        assert is_mounted(mountpoint), "imagefs mount returned 0 but nothing is mounted"
        yield mountpoint
    finally:
        if is_mounted(mountpoint):
            run_imagefs("umount", mountpoint)
        force_unmount(mountpoint)
