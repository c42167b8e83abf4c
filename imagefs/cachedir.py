"""Where imagefs keeps derived data (indexes, trees, seekable re-encodings), and its locks."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagefs.errors import ImageFSError

SYSTEM_CACHE = Path("/var/cache/imagefs")


def default_cache_dir() -> Path:
    """``/var/cache/imagefs`` for root, else ``$XDG_CACHE_HOME/imagefs``."""
    if os.geteuid() == 0:
        return SYSTEM_CACHE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imagefs"


def ensure_cache_dir(path: Path) -> Path:
    # 0700: cached layer data may be private to the user who pulled it.
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        # A user mounting with someone else's cache_dir (or HOME) gets one line.
        raise ImageFSError(f"cache directory {path}: {exc.strerror or exc}") from exc
    return path


@contextmanager
def build_lock(path: Path, *, best_effort: bool = False) -> Iterator[None]:
    """Hold ``path``.lock while building the cache file ``path``.

    Concurrent mounts (a fleet starting at once) that need the same file
    build it once: the others wait here, then find it. ``flock`` is released
    when the descriptor closes, even if the holder crashes; a lock file that
    goes (``cache prune``) only costs a duplicate build, never a torn file
    (cache files are renamed into place whole). With ``best_effort``, a
    lock that cannot be made (a read-only cache) means building unlocked.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if not best_effort:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
