"""Which imagefs mounts are live, what they serve, and which process serves them.

The kernel's mount table (``/proc/self/mountinfo``) is the truth about what is
mounted: every ``fuse.imagefs`` line is an imagefs mount, its source field is
the ``fsname`` imagefs set (the SOURCE argument) and its super options carry
the mounting user (``user_id=``). What the kernel does not say is which
process serves a FUSE mount: the daemon holds an open ``/dev/fuse`` but
nothing links that descriptor to the mount. So each daemon leaves a small
record once mounted and removes it after unmounting::

    /run/imagefs/<mount id>.json                    root
    /run/user/<uid>/imagefs/<mount id>.json         a user with a login session
    /tmp/imagefs-<uid>/<mount id>.json              other users (no /run/user/<uid>)

The directory follows from the mounting uid alone (not from the environment,
which mount(8) and systemd scrub), so root can find every user's records. A
record counts only if its mount id, device and mount point still match a
mount in the table and its pid still runs with the recorded start time: a
daemon killed with SIGKILL leaves a record whose process is gone, which is how
a stale mount is recognised, and a reused pid is not mistaken for the daemon.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imagefs.digest import Digest, InvalidDigestError
from imagefs.layers.toc.chunkstore import layer_local_bytes
from imagefs.progress import human_bytes

log = logging.getLogger("imagefs")

FSTYPE = "fuse.imagefs"
SYSTEM_RUNTIME_DIR = Path("/run/imagefs")
MOUNTINFO = Path("/proc/self/mountinfo")

# mountinfo writes space, tab, newline and backslash as octal escapes (\040).
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda match: chr(int(match[1], 8)), text)


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo (proc(5)); paths unescaped."""

    mount_id: int
    device: str  # "major:minor"; for FUSE the minor is the connection number
    mountpoint: str
    options: frozenset[str]  # per-mount: ro, nosuid, nodev, noexec, relatime...
    fstype: str
    source: str
    super_options: dict[str, str]  # per-superblock: user_id=, allow_other...

    @property
    def uid(self) -> int | None:
        value = self.super_options.get("user_id")
        return int(value) if value is not None and value.isdigit() else None


def parse_mountinfo_line(line: str) -> MountEntry:
    fields = line.split()
    separator = fields.index("-", 6)
    super_options: dict[str, str] = {}
    for item in fields[separator + 3].split(","):
        key, _, value = item.partition("=")
        super_options[key] = value
    return MountEntry(
        mount_id=int(fields[0]),
        device=fields[2],
        mountpoint=_unescape(fields[4]),
        options=frozenset(fields[5].split(",")),
        fstype=fields[separator + 1],
        source=_unescape(fields[separator + 2]),
        super_options=super_options,
    )


def read_mountinfo(path: Path = MOUNTINFO) -> list[MountEntry]:
    with path.open(encoding="utf-8", errors="surrogateescape") as mountinfo:
        return [parse_mountinfo_line(line) for line in mountinfo if line.strip()]


def mount_at(mountpoint: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount on top at ``mountpoint`` (an absolute, resolved path), if any."""
    found = None
    for entry in read_mountinfo() if entries is None else entries:
        if entry.mountpoint == mountpoint:
            found = entry  # later lines are mounted over earlier ones
    return found


def runtime_dir(uid: int) -> Path:
    """Where the records of ``uid``'s mounts live (see the module docstring)."""
    if uid == 0:
        return SYSTEM_RUNTIME_DIR
    user_run = Path(f"/run/user/{uid}")
    with contextlib.suppress(OSError):
        if user_run.is_dir() and user_run.stat().st_uid == uid:
            return user_run / "imagefs"
    # /tmp itself, not $TMPDIR: the place must not depend on anyone's environment.
    return Path("/tmp") / f"imagefs-{uid}"


def _private_dir(path: Path) -> Path:
    """Create ``path`` 0700 if needed; refuse one someone else owns (a /tmp trap)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(f"{path} is not a directory owned by uid {os.geteuid()}")
    return path


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (proc(5) stat field 22)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None  # a zombie has stopped serving
    return int(fields[19])


@dataclass(frozen=True)
class MountRecord:
    """What a daemon writes about its mount; see the module docstring."""

    pid: int
    start_time: int
    source: str
    mountpoint: str
    mount_id: int
    device: str
    # A lazy registry mount's layers served by Range requests ([digest, size]
    # each) and the cache holding what was fetched of them.
    lazy_layers: list[list[str | int]] = field(default_factory=list)
    cache_dir: str = ""

    def describes(self, entry: MountEntry) -> bool:
        return (self.mount_id, self.device, self.mountpoint) == (
            entry.mount_id,
            entry.device,
            entry.mountpoint,
        )

    def daemon_alive(self) -> bool:
        return process_start_time(self.pid) == self.start_time


def record_path(entry: MountEntry) -> Path | None:
    if entry.uid is None:
        return None
    return runtime_dir(entry.uid) / f"{entry.mount_id}.json"


def read_record(entry: MountEntry) -> MountRecord | None:
    path = record_path(entry)
    if path is None:
        return None
    try:
        record = MountRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent, unreadable (another user's) or not ours
    return record if record.describes(entry) else None


def write_record(
    source: str,
    mountpoint: str,
    *,
    lazy_layers: list[list[str | int]] | None = None,
    cache_dir: str = "",
) -> Path:
    """Record the calling process as the daemon of the imagefs mount at ``mountpoint``.

    ``mountpoint`` must be resolved *before* mounting: resolving it now would
    stat the mount's root, a request this daemon cannot answer yet.
    Reads only the mount table, never the mount itself.
    """
    entry = mount_at(mountpoint)
    if entry is None or entry.fstype != FSTYPE:
        raise OSError(f"no {FSTYPE} mount at {mountpoint} in {MOUNTINFO}")
    pid = os.getpid()
    start_time = process_start_time(pid)
    if start_time is None:
        raise OSError(f"cannot read /proc/{pid}/stat")
    record = MountRecord(pid, start_time, source, mountpoint, entry.mount_id, entry.device,
                         list(lazy_layers or []), cache_dir)  # fmt: skip
    directory = _private_dir(runtime_dir(os.geteuid()))
    path = directory / f"{entry.mount_id}.json"
    temporary = path.with_suffix(f".{pid}.tmp")
    temporary.write_text(json.dumps(asdict(record)) + "\n")
    temporary.replace(path)  # atomic: a reader sees the old record or the new one
    return path


def remove_record(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass(frozen=True)
class LiveMount:
    """An imagefs mount as ``imagefs mounts`` shows it."""

    mountpoint: str
    source: str
    pid: int | None  # None: no readable record (another user's mount, or an old daemon)
    state: str  # "live", "stale" (the daemon is gone) or "unknown"
    uid: int | None
    options: list[str]
    # Per lazy layer: digest, size and how many of its bytes are local now.
    lazy_layers: list[dict[str, str | int]] = field(default_factory=list)


def _lazy_state(record: MountRecord) -> list[dict[str, str | int]]:
    """What the cache holds of each lazy layer of a mount, measured now."""
    found: list[dict[str, str | int]] = []
    for item in record.lazy_layers:
        try:
            digest, size = Digest(str(item[0])), int(item[1])
        except (InvalidDigestError, IndexError, ValueError, TypeError):
            continue  # someone else's record format: nothing to say
        local = layer_local_bytes(record.cache_dir, digest, size) if record.cache_dir else 0
        found.append({"digest": str(digest), "size": size, "local_bytes": local})
    return found


def list_mounts(entries: list[MountEntry] | None = None) -> list[LiveMount]:
    """Every imagefs mount in this mount namespace, with its daemon's pid."""
    mounts = []
    for entry in read_mountinfo() if entries is None else entries:
        if entry.fstype != FSTYPE:
            continue
        record = read_record(entry)
        if record is None:
            pid, state, source = None, "unknown", entry.source
        elif record.daemon_alive():
            pid, state, source = record.pid, "live", record.source
        else:
            pid, state, source = record.pid, "stale", record.source
        options = sorted(entry.options | {k for k, v in entry.super_options.items() if not v})
        lazy = _lazy_state(record) if record is not None and state == "live" else []
        mounts.append(LiveMount(entry.mountpoint, source, pid, state, entry.uid, options, lazy))
    return mounts


def forget(entry: MountEntry) -> None:
    """Remove ``entry``'s record once it is unmounted (its daemon may be dead)."""
    path = record_path(entry)
    if path is not None:
        with contextlib.suppress(OSError):
            remove_record(path)


def format_table(mounts: list[LiveMount]) -> str:
    """Columns for a terminal: mount point, pid, source; stale mounts say what to do."""
    rows = [("MOUNTPOINT", "PID", "SOURCE")]
    notes = {}
    for mount in mounts:
        rows.append((mount.mountpoint, "-" if mount.pid is None else str(mount.pid), mount.source))
        if mount.state == "stale":
            hint = f"imagefs umount {mount.mountpoint}"
            notes[len(rows) - 1] = f"  (stale: the daemon is gone; run '{hint}')"
        if mount.lazy_layers:
            local = sum(int(layer["local_bytes"]) for layer in mount.lazy_layers)
            size = sum(int(layer["size"]) for layer in mount.lazy_layers)
            note = f"  (lazy: {len(mount.lazy_layers)} layers, {human_bytes(local)} of "
            notes[len(rows) - 1] = note + f"{human_bytes(size)} local)"
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    lines = []
    for number, (mountpoint, pid, source) in enumerate(rows):
        line = f"{mountpoint:<{widths[0]}}  {pid:>{widths[1]}}  {source}{notes.get(number, '')}"
        lines.append(line.rstrip())
    return "\n".join(lines)
