"""Progress lines on a terminal while layers are indexed.

Quiet unless stderr is a TTY (logs and journald must not fill with carriage
returns) and the user did not ask for ``--quiet``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_MIN_INTERVAL = 0.1  # seconds between redraws: enough to look alive, cheap to draw


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


class Progress:
    """One redrawn status line per layer: entries and bytes indexed, rate."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self._label = ""
        self._started = 0.0
        self._last_draw = 0.0

    def start(self, label: str) -> None:
        self._label = label
        self._started = self._last_draw = time.monotonic()
        self._draw(0, 0, force=True)

    def update(self, entries: int, nbytes: int) -> None:
        if self.enabled and time.monotonic() - self._last_draw >= _MIN_INTERVAL:
            self._draw(entries, nbytes)

    def finish(self, entries: int, nbytes: int) -> None:
        if self.enabled:
            self._draw(entries, nbytes, force=True)
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, entries: int, nbytes: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._last_draw = now
        elapsed = max(now - self._started, 1e-6)
        rate = human_bytes(nbytes / elapsed)
        line = f"\r{self._label}: {entries} entries, {human_bytes(nbytes)} ({rate}/s)"
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
