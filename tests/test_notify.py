"""systemd readiness (``NOTIFY_SOCKET``) and the daemon's log, against real sockets and mounts.

The listener is what systemd is to a ``Type=notify`` service: a datagram
socket whose path is in ``NOTIFY_SOCKET``, with ``SO_PASSCRED`` so every
message carries the sender's pid (by default systemd accepts only its main pid's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagefs.daemon.logsetup import stderr_handler
from imagefs.daemon.notify import Notifier, relay_status
from tests import builder
from tests.linuxenv import process_gone, wait_for
from tests.mounting import IMAGEFS, force_unmount, is_mounted, run_imagefs
from tests.needs import require_fuse

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Message:
    fields: dict[str, str]
    sender: int


class Listener:
    """A service manager's notification socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.received: list[Message] = []

    def receive(self, process: subprocess.Popen[bytes] | None = None) -> Message | None:
        """The next message; None once ``process`` has exited and nothing is left."""
        for _ in range(6000):  # a hang guard: 10 minutes of 0.1 s polls
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                if process is not None and process.poll() is not None:
                    return None
                continue
            sender = 0
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    sender = _UCRED.unpack(payload[: _UCRED.size])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            message = Message(fields, sender)
            self.received.append(message)
            return message
        raise AssertionError("no notification arrived")

    def until(self, key: str, process: subprocess.Popen[bytes] | None = None) -> Message:
        while True:
            message = self.receive(process)
            assert message is not None, f"exited before sending {key}: {self.received}"
            if key in message.fields:
                return message

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def listening(tmp_path: Path, abstract: bool = False) -> Iterator[tuple[Listener, str]]:
    if abstract:
        name = f"imagefs-test-{os.getpid()}-{tmp_path.name}"
        listener, value = Listener(b"\0" + name.encode()), "@" + name
    else:
        path = tmp_path / "notify.sock"
        listener, value = Listener(str(path)), str(path)
    try:
        yield listener, value
    finally:
        listener.close()


def small_image(tmp_path: Path) -> str:
    layers = [
        builder.make_layer_tar([builder.file("etc/os-release", "ID=test\n")]),
        builder.make_layer_tar([builder.file("hello", "world\n")]),
    ]
    builder.write_oci_layout(tmp_path / "layout", layers, tag="t")
    return f"oci:{tmp_path / 'layout'}:t"


def test_notifier_datagrams_to_path_and_abstract_socket(tmp_path: Path) -> None:
    for abstract in (False, True):
        with listening(tmp_path, abstract) as (listener, address):
            notifier = Notifier(address)
            notifier.status("indexing\nlayer 1/2")
            notifier.ready(status="serving", main_pid=1234)
            notifier.stopping()
            messages = [listener.receive() for _ in range(3)]
        assert [m.fields for m in messages if m] == [
            {"STATUS": "indexing layer 1/2"},
            {"READY": "1", "MAINPID": "1234", "STATUS": "serving"},
            {"STOPPING": "1"},
        ]
        assert all(m and m.sender == os.getpid() for m in messages)


def test_notifier_without_socket_or_with_a_dead_one_never_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Notifier(None).ready()
    with caplog.at_level(logging.WARNING, logger="imagefs"):
        Notifier(str(tmp_path / "nobody-listens")).ready()
    assert "cannot notify" in caplog.text


def test_relay_forwards_status_lines_and_returns_the_verdict(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"status opening x\nstatus layer 1/1\nok\n")
    os.close(write_fd)
    with listening(tmp_path) as (listener, address), os.fdopen(read_fd, "rb") as pipe:
        assert relay_status(pipe, Notifier(address)) == b"ok\n"
        assert [listener.receive(), listener.receive()] == [
            Message({"STATUS": "opening x"}, os.getpid()),
            Message({"STATUS": "layer 1/1"}, os.getpid()),
        ]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_foreground_ready_only_when_live_and_stopping_on_signal(
    stop: signal.Signals, tmp_path: Path
) -> None:
    require_fuse()
    source = small_image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    stderr = tmp_path / "stderr"
    with listening(tmp_path) as (listener, address), stderr.open("wb") as err:
        env = {**os.environ, "NOTIFY_SOCKET": address}
        command = [
            *IMAGEFS,
            "mount",
            "--foreground",
            "--cache-dir",
            tmp_path / "cache",
            source,
            mnt,
        ]
        process = subprocess.Popen(list(map(str, command)), env=env, stderr=err)
        try:
            ready = listener.until("READY", process)
            # READY=1 means the mount answers now, not "soon".
            assert is_mounted(mnt) and sorted(os.listdir(mnt)) == ["etc", "hello"]
            # READY and STOPPING come from the main pid; per-layer STATUS lines
            # may come from the child that builds the index (NotifyAccess=all).
            assert ready.sender == process.pid
            statuses = [m.fields["STATUS"] for m in listener.received[:-1]]
            assert statuses[0] == f"opening {source}"
            assert any("layer 1/2" in status for status in statuses), statuses
            assert any("layer 2/2" in status for status in statuses), statuses
            assert ready.fields["STATUS"] == f"serving {source} on {mnt}"

            process.send_signal(stop)
            stopping = listener.until("STOPPING", process)
            assert stopping.sender == process.pid
            assert process.wait(timeout=600) == 0, stderr.read_text()
            assert not is_mounted(mnt)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            force_unmount(mnt)
    log = stderr.read_text()
    # Not a terminal: plain lines with levels, no escape codes.
    assert f"imagefs: INFO: mounted {source}" in log
    assert f"imagefs: INFO: received {stop.name}, unmounting" in log
    assert "\x1b" not in log


def test_daemon_mode_hands_readiness_to_the_daemon_pid(tmp_path: Path) -> None:
    require_fuse()
    source = small_image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with listening(tmp_path) as (listener, address):
        env = {**os.environ, "NOTIFY_SOCKET": address}
        command = [*IMAGEFS, "mount", "--cache-dir", tmp_path / "cache", source, mnt]
        process = subprocess.Popen(list(map(str, command)), env=env)
        daemon = 0
        try:
            ready = listener.until("READY", process)
            assert process.wait(timeout=600) == 0
            assert is_mounted(mnt) and (mnt / "hello").read_text() == "world\n"
            # Everything before READY comes from the process systemd started
            # (its main pid): the daemon's status lines are relayed by it.
            assert {m.sender for m in listener.received} == {process.pid}
            assert any("layer 2/2" in m.fields.get("STATUS", "") for m in listener.received)
            daemon = int(ready.fields["MAINPID"])
            assert daemon != process.pid and not process_gone(daemon)

            assert run_imagefs("umount", mnt).returncode == 0
            stopping = listener.until("STOPPING")
            assert stopping.sender == daemon  # the new main pid
            wait_for(lambda: process_gone(daemon), "the daemon to exit")
        finally:
            force_unmount(mnt)


def test_journald_stderr_gets_priority_prefixes(tmp_path: Path) -> None:
    require_fuse()
    source = small_image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        st = os.fstat(err.fileno())
        # What systemd sets when it connects stderr to journald.
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        command = [*IMAGEFS, "mount", "-f", "--cache-dir", tmp_path / "cache", source, mnt]
        process = subprocess.Popen(list(map(str, command)), env=env, stderr=err)
        try:
            wait_for(lambda: is_mounted(mnt) or process.poll() is not None, "the mount")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=600) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            force_unmount(mnt)
    lines = stderr.read_text().splitlines()
    assert any(line.startswith(f"<6>INFO: mounted {source} on {mnt}") for line in lines), lines
    assert "<6>INFO: unmounted" in "\n".join(lines)
    assert all(line.startswith("<") for line in lines), lines


def test_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    record = logging.LogRecord("imagefs", logging.WARNING, __file__, 1, "careful", None, None)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        handler = stderr_handler(foreground=True, debug=False, stream=terminal)
        assert handler.format(record) == "\x1b[33mimagefs: WARNING: careful\x1b[0m"
        monkeypatch.setenv("NO_COLOR", "1")
        handler = stderr_handler(foreground=True, debug=False, stream=terminal)
        assert handler.format(record) == "imagefs: WARNING: careful"
    os.close(leader)
