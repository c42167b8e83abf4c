"""How the mount daemon's log reaches stderr: a terminal, a pipe, or journald.

* Under systemd (``JOURNAL_STREAM`` names our stderr), each line starts with
  the ``<N>`` syslog priority prefix that journald turns into the entry's
  level (sd-daemon(3)), so ``journalctl -p warning`` works; journald adds the
  time, name and pid itself.
* Anywhere else: ``imagefs: LEVEL: message``. Colour only on a terminal that
  wants it (not ``NO_COLOR``, not ``TERM=dumb``); never escape codes in a pipe
  or a file.

``--foreground`` logs from INFO up (the daemon's log is what a foreground run
is for); a mount command that detaches prints only warnings and errors before
it returns; ``--debug`` shows everything.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

JOURNAL_STREAM = "JOURNAL_STREAM"

# syslog(3) priorities, as journald reads them from a "<N>" prefix.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_COLOUR = {
    logging.DEBUG: "\x1b[2m",  # dim
    logging.WARNING: "\x1b[33m",  # yellow
    logging.ERROR: "\x1b[31m",  # red
    logging.CRITICAL: "\x1b[1;31m",  # bold red
}
_RESET = "\x1b[0m"


def is_journal(stream: TextIO) -> bool:
    """True if ``stream`` is the journald stream systemd connected us to."""
    expected = os.environ.get(JOURNAL_STREAM, "")
    device, _, inode = expected.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def wants_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # closed
        return False


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        # Every line of a multi-line message (a traceback) keeps the level.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


class ConsoleFormatter(logging.Formatter):
    def __init__(self, colour: bool) -> None:
        super().__init__("imagefs: %(levelname)s: %(message)s")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        colour = _COLOUR.get(record.levelno) if self.colour else None
        return f"{colour}{text}{_RESET}" if colour else text


def stderr_handler(
    *, foreground: bool, debug: bool, stream: TextIO | None = None
) -> logging.Handler:
    """The handler for the daemon's stderr, formatted and filtered as described above."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if debug:
        handler.setLevel(logging.DEBUG)
    else:
        handler.setLevel(logging.INFO if foreground else logging.WARNING)
    if is_journal(stream):
        handler.setFormatter(JournalFormatter("%(levelname)s: %(message)s"))
    else:
        handler.setFormatter(ConsoleFormatter(colour=wants_colour(stream)))
    return handler
