"""systemd readiness protocol (``sd_notify``), without libsystemd.

Under a ``Type=notify`` service systemd sets ``NOTIFY_SOCKET`` to a datagram
socket (a path, or ``@name`` for the abstract namespace) and waits for
``READY=1`` before it considers the unit started; units ordered after it (and
``systemctl start``) wait for that. imagefs sends:

* ``STATUS=...`` while it opens, pulls and indexes the image (``systemctl
  status`` shows the latest line);
* ``READY=1`` only once the mount is live: after the kernel mount, so that a
  unit ordered after ours finds the files there;
* ``STOPPING=1`` when it starts to unmount.

In daemon mode (``imagefs mount`` without ``--foreground``) the process
systemd started is the parent, which exits once the mount is ready. systemd
(``NotifyAccess=main``, the default) only listens to that main process, so the
serving child relays its status lines through the readiness pipe and the
parent sends ``READY=1`` together with ``MAINPID=<child>``, handing the unit
over to the process that keeps serving.

Without ``NOTIFY_SOCKET`` every call is a no-op. A failure to send is logged
and never stops the mount: readiness is a courtesy to the service manager,
the mount itself is what the user asked for.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import BinaryIO

from imagefs.progress import Progress, ProgressTask

log = logging.getLogger("imagefs")

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def _address(value: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: a leading NUL byte, no file.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def _one_line(text: str) -> str:
    # A newline would end the STATUS= field and start a bogus assignment.
    return " ".join(text.split())


class Notifier:
    """Sends ``KEY=VALUE`` lines to the service manager, if there is one."""

    def __init__(self, socket_path: str | None) -> None:
        self.socket_path = socket_path or None

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get(NOTIFY_SOCKET))

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def send(self, *fields: str) -> None:
        """Send one datagram of ``KEY=VALUE`` lines (blocking, but a datagram is instant)."""
        if self.socket_path is None:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(_address(self.socket_path))
                sock.sendall(message)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.socket_path, exc)

    def status(self, text: str) -> None:
        self.send(f"STATUS={_one_line(text)}")

    def ready(self, status: str | None = None, main_pid: int | None = None) -> None:
        fields = ["READY=1"]
        if main_pid is not None:
            fields.append(f"MAINPID={main_pid}")
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        self.send(*fields)

    def stopping(self, status: str | None = None) -> None:
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        self.send(*fields)


class StatusReporter:
    """Where the serving process reports what it is doing before the mount is live.

    In the foreground the serving process is systemd's main process and talks
    to it directly. In daemon mode it writes ``status <text>`` lines into the
    readiness pipe; the parent (the main process) relays them.
    """

    def __init__(self, notifier: Notifier, ready_fd: int | None) -> None:
        self.notifier = notifier
        self.ready_fd = ready_fd

    def __call__(self, text: str) -> None:
        if not self.notifier.enabled:
            return
        if self.ready_fd is None:
            self.notifier.status(text)
            return
        try:
            os.write(self.ready_fd, f"status {_one_line(text)}\n".encode(errors="replace"))
        except OSError:
            pass  # the parent is gone (interrupted); the mount goes on or fails on its own


def relay_status(pipe: BinaryIO, notifier: Notifier) -> bytes:
    """Parent side of the readiness pipe: forward ``status`` lines, return the verdict.

    The verdict is the first other line (``ok`` or ``error ...``), or ``b""``
    if the child exited without one.
    """
    for line in pipe:
        if line.startswith(b"status "):
            notifier.status(line[len(b"status ") :].decode(errors="replace").strip())
            continue
        return line
    return b""


class NotifyingProgress(Progress):
    """Progress lines on a terminal, and one ``STATUS=`` line per step for systemd."""

    def __init__(self, report: StatusReporter, enabled: bool) -> None:
        super().__init__(enabled)
        self._report = report

    def start(self, label: str) -> ProgressTask:
        self._report(label)
        return super().start(label)
