"""Where imagefs keeps derived data (seekable re-encodings, later indexes)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ImageFSError

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
