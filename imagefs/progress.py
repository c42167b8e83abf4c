"""Progress lines on a terminal while layers are indexed.

Quiet unless stderr is a TTY (logs and journald must not fill with carriage
returns) and the user did not ask for ``--quiet``. Layers may be indexed at
once from several threads: each finished layer gets a line of its own, and
one redrawn line sums up the layers still in progress.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

_MIN_INTERVAL = 0.1  # seconds between redraws: enough to look alive, cheap to draw


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


class ProgressTask:
    """One layer being indexed: entries and bytes so far."""

    def __init__(self, owner: Progress, label: str) -> None:
        self.owner = owner
        self.label = label
        self.started = time.monotonic()
        self.entries = 0
        self.nbytes = 0

    def update(self, entries: int, nbytes: int) -> None:
        self.entries, self.nbytes = entries, nbytes
        self.owner.redraw()

    def finish(self, entries: int, nbytes: int) -> None:
        self.entries, self.nbytes = entries, nbytes
        self.owner.finished(self)


class Progress:
    """Indexing progress: a line per finished layer, one for those under way."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self._lock = threading.Lock()
        self._active: list[ProgressTask] = []
        self._last_draw = 0.0

    def start(self, label: str) -> ProgressTask:
        task = ProgressTask(self, label)
        with self._lock:
            self._active.append(task)
            self._draw_active()
        return task

    def redraw(self) -> None:
        if self.enabled and time.monotonic() - self._last_draw >= _MIN_INTERVAL:
            with self._lock:
                self._draw_active()

    def finished(self, task: ProgressTask) -> None:
        with self._lock:
            if task in self._active:
                self._active.remove(task)
            if not self.enabled:
                return
            elapsed = max(time.monotonic() - task.started, 1e-6)
            self.stream.write(
                f"\r{task.label}: {task.entries} entries, {human_bytes(task.nbytes)} "
                f"({human_bytes(task.nbytes / elapsed)}/s)\x1b[K\n"
            )
            self._draw_active()

    def _draw_active(self) -> None:
        """Redraw the summary line (with the lock held)."""
        if not self.enabled:
            return
        self._last_draw = time.monotonic()
        if not self._active:
            self.stream.flush()
            return
        if len(self._active) == 1:
            head = self._active[0].label
        else:
            head = f"{len(self._active)} layers ({', '.join(t.label for t in self._active)})"
            if len(head) > 60:
                head = f"{len(self._active)} layers"
        entries = sum(task.entries for task in self._active)
        nbytes = sum(task.nbytes for task in self._active)
        elapsed = max(self._last_draw - min(task.started for task in self._active), 1e-6)
        self.stream.write(
            f"\r{head}: {entries} entries, {human_bytes(nbytes)} "
            f"({human_bytes(nbytes / elapsed)}/s)\x1b[K"
        )
        self.stream.flush()
