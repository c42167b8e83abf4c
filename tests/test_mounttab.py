"""The mount table and daemon records behind ``imagefs mounts``, without a mount.

tests/test_linux.py and tests/test_rootless.py check the same against real
mounts and daemons.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from imagefs.daemon import mounttab
from imagefs.daemon.mounttab import (
    LiveMount,
    MountRecord,
    format_table,
    list_mounts,
    parse_mountinfo_line,
    process_start_time,
    runtime_dir,
)

LINE = (
    r"512 27 0:61 / /mnt/my\040images ro,nosuid,nodev,relatime shared:300 - "
    r"fuse.imagefs oci:/srv/a\040b:t ro,user_id=1000,group_id=1000,default_permissions,allow_other"
)


def test_parse_mountinfo_line_unescapes_and_splits_options() -> None:
    entry = parse_mountinfo_line(LINE)
    assert (entry.mount_id, entry.device) == (512, "0:61")
    assert entry.mountpoint == "/mnt/my images" and entry.source == "oci:/srv/a b:t"
    assert entry.fstype == "fuse.imagefs" and entry.uid == 1000
    assert entry.options == {"ro", "nosuid", "nodev", "relatime"}
    assert entry.super_options["allow_other"] == "" and entry.super_options["group_id"] == "1000"


def test_runtime_dir_follows_from_the_uid() -> None:
    assert runtime_dir(0) == Path("/run/imagefs")
    if not Path("/run/user/4242").exists():
        assert runtime_dir(4242) == Path("/tmp/imagefs-4242")


def test_records_decide_pid_and_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounttab, "runtime_dir", lambda uid: tmp_path)
    entry = parse_mountinfo_line(LINE)
    start = process_start_time(os.getpid())
    assert start is not None

    def write(pid: int, start_time: int, mount_id: int = 512) -> None:
        record = MountRecord(pid, start_time, "oci:/srv/a b:t", "/mnt/my images", mount_id, "0:61")
        (tmp_path / "512.json").write_text(json.dumps(asdict(record)))

    [listed] = list_mounts([entry])  # no record: the mount table alone
    assert (listed.pid, listed.state, listed.source) == (None, "unknown", "oci:/srv/a b:t")
    write(os.getpid(), start)
    [listed] = list_mounts([entry])
    assert (listed.pid, listed.state) == (os.getpid(), "live")
    assert "allow_other" in listed.options and "ro" in listed.options
    write(os.getpid(), start + 1)  # same pid, another process: the daemon is gone
    assert list_mounts([entry])[0].state == "stale"
    write(os.getpid(), start, mount_id=513)  # a record of an earlier mount
    assert list_mounts([entry])[0].state == "unknown"
    other = parse_mountinfo_line(LINE.replace("fuse.imagefs", "fuse.sshfs"))
    assert list_mounts([other]) == []


def test_table_marks_stale_mounts_with_what_to_do() -> None:
    mounts = [
        LiveMount("/mnt/a", "a.tar", 123, "live", 0, []),
        LiveMount("/mnt/longer", "b.tar", None, "stale", 0, []),
    ]
    lines = format_table(mounts).splitlines()
    assert lines[0].split() == ["MOUNTPOINT", "PID", "SOURCE"]
    assert lines[1].split() == ["/mnt/a", "123", "a.tar"]
    assert lines[2].startswith("/mnt/longer")
    assert lines[2].endswith("(stale: the daemon is gone; run 'imagefs umount /mnt/longer')")
