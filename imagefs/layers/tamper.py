"""The tamper check: a store's layer directory against its tar-split record.

The digest of the rebuilt tar (:mod:`imagefs.layers.rebuilt`) covers every
file's bytes, but not what an extraction leaves on disk beyond them: an
empty file, a directory, a symlink, a device, a whiteout, or anything added
to the directory. This module compares the two trees entry by entry:

* each tar entry must be there, of its type (a symlink with its target, a
  device with its numbers; a file's bytes are the pass's CRC-64 check);
* a ``.wh.NAME`` whiteout is stored by overlayfs as a 0:0 character device
  ``NAME`` (Docker's overlay2 and containers-storage's overlay driver, as
  root), or kept as the ``.wh.NAME`` file itself (rootless storage without
  whiteout devices); ``.wh..wh..opq`` as the xattr ``trusted.overlay.opaque``
  (``user.overlay.opaque`` rootless) = ``y`` on its directory, or the marker
  file itself. Either form is the image's;
* everything else under the directory was added.

Not compared: owners, modes, times and xattrs on disk. What imagefs serves
comes from the record's headers, and extraction does not always reproduce
them (hardlinks share one inode's mode, for one), so they would be noise.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from imagefs.errors import BlobError
from imagefs.layers.beneath import open_beneath
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.rebuilt import Change, FileProblem, RebuiltTar, clean_member_name

__all__ = ["compare", "header_entries", "walk"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
MAX_WALK = 5_000_000  # entries under one layer directory (real layers: up to ~1 million)

_TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_ENTRY_TYPES = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.DIRECTORY: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR_DEVICE: stat.S_IFCHR,
    EntryType.BLOCK_DEVICE: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


def type_name(mode: int) -> str:
    return _TYPE_NAMES.get(stat.S_IFMT(mode), "unknown file type")


def walk(dir_fd: int, where: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below the directory ``dir_fd`` (not itself): path and ``lstat``.

    Directories are opened beneath ``dir_fd`` with no symlink followed, one
    listing at a time, children in name order (so a summary of the walk is
    stable). At most MAX_WALK entries (BlobError past that).
    """
    pending = [""]
    count = 0
    while pending:
        directory = pending.pop()
        try:
            fd = open_beneath(dir_fd, directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise BlobError(f"{where}/{directory}: cannot list: {exc.strerror or exc}") from exc
        try:
            with os.scandir(fd) as listing:
                children = sorted(
                    (entry.name, entry.stat(follow_symlinks=False)) for entry in listing
                )
        except OSError as exc:
            raise BlobError(f"{where}/{directory}: cannot list: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        subdirs = []
        for name, st in children:
            count += 1
            if count > MAX_WALK:
                raise BlobError(f"{where}: more than {MAX_WALK} entries")
            path = f"{directory}/{name}" if directory else name
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(path)
        pending.extend(reversed(subdirs))


class _HeaderStream:
    """The rebuilt tar with every file's data read as zeros: headers only, no file opened."""

    def __init__(self, pieces: Iterator[bytes | int]) -> None:
        self._pieces = pieces
        self._segment = memoryview(b"")
        self._zeros = 0
        self._pos = 0

    def _more(self) -> bool:
        while not self._segment and not self._zeros:
            piece = next(self._pieces, None)
            if piece is None:
                return False
            if isinstance(piece, int):
                self._zeros = piece
            else:
                self._segment = memoryview(piece)
        return True

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self._more():
            if self._segment:
                take = self._segment[: n - len(out)]
                self._segment = self._segment[len(take) :]
                out += take
            else:
                take_zeros = min(self._zeros, n - len(out))
                out += bytes(take_zeros)
                self._zeros -= take_zeros
        self._pos += len(out)
        return bytes(out)

    def skip(self, n: int) -> None:
        while n > 0 and self._more():
            if self._segment:
                got = min(n, len(self._segment))
                self._segment = self._segment[got:]
            else:
                got = min(n, self._zeros)
                self._zeros -= got
            self._pos += got
            n -= got

    def tell(self) -> int:
        return self._pos


def header_entries(pieces: Iterator[bytes | int]) -> list[TarEntry]:
    """The layer's tar entries, from its headers alone (see rebuilt._Shape)."""
    from imagefs.layers.tarscan import scan_tar  # noqa: PLC0415 - compiles patterns at import

    return list(scan_tar(_HeaderStream(pieces), lambda _message: None))


class _Disk(NamedTuple):
    """The part of an entry's ``lstat`` the comparison uses (named as os.stat_result's)."""

    st_mode: int
    st_size: int
    st_rdev: int


@dataclass
class _Expected:
    """What the disk should hold at one path."""

    entry: TarEntry | None  # None: a whiteout
    member: str  # the tar member that says so (for messages)


def compare(
    rebuilt: RebuiltTar,
    headers: Iterator[bytes | int],
    diff_fd: int,
    problems: list[FileProblem],
    scanned: Sequence[TarEntry] | None = None,
) -> list[Change]:
    """Every difference between the layer directory and the record, sorted by path.

    ``headers``: the tar without its file data (rebuilt._Shape.pieces);
    ``problems``: what the pass found in the files' bytes (their content is
    not read again here); ``scanned``: the entries a scan of the whole
    rebuilt tar found, the same the headers would give (then not scanned).
    """
    expected: dict[str, _Expected] = {}
    opaque: dict[str, str] = {}
    for entry in header_entries(headers) if scanned is None else scanned:
        path = clean_member_name(os.fsencode(entry.path))
        if path is None:
            continue  # cannot be beneath the directory; the engines refuse such layers
        parent, _, base = path.rpartition("/")
        if base == OPAQUE_MARKER:
            opaque[parent] = path
        elif base.startswith(AUFS_META_PREFIX):
            continue  # AUFS metadata: the engines skip it when extracting
        elif base.startswith(WHITEOUT_PREFIX):
            target = f"{parent}/{base[len(WHITEOUT_PREFIX) :]}" if parent else base[4:]
            expected[target] = _Expected(None, path)
        else:
            expected[path] = _Expected(entry, path)  # the last entry for a path wins
    # Only what the comparison needs, per entry (an lstat result is ~5x larger).
    disk = {
        path: _Disk(st.st_mode, st.st_size, st.st_rdev)
        for path, st in walk(diff_fd, rebuilt.where_diff)
    }
    accounted: set[str] = set()
    changes = [Change(problem.path, _kind(problem.detail), problem.detail) for problem in problems]
    seen_problems = {problem.path for problem in problems}
    for path, want in expected.items():
        accounted.add(path)
        if path in seen_problems:
            continue
        if want.entry is None:
            kept = disk.get(want.member)  # a rootless store keeps the ".wh.NAME" file itself
            if kept is not None and stat.S_ISREG(kept.st_mode):
                accounted.add(want.member)
                continue
            change = _whiteout_change(want.member, disk.get(path))
        else:
            change = _entry_change(path, want.entry, disk.get(path), diff_fd)
        if change is not None:
            changes.append(change)
    for directory, marker in opaque.items():
        if marker in disk:
            accounted.add(marker)
            continue
        if not _is_opaque(diff_fd, directory, disk.get(directory)):
            changes.append(Change(marker, "removed", "opaque marker lost"))
        accounted.add(directory)
    # Parents of what the record names are the image's too (implied directories).
    allowed = set(accounted)
    ancestors_added: set[str] = set()
    for path in accounted:
        while "/" in path:
            path = path.rpartition("/")[0]
            if path in ancestors_added:
                break  # and so were all of its own parents
            ancestors_added.add(path)
            allowed.add(path)
    for path, st in disk.items():
        if path not in allowed:
            changes.append(Change(path, "added", type_name(st.st_mode)))
    return sorted(changes, key=lambda change: change.path)


def _kind(detail: str) -> str:
    return "removed" if detail == "removed" else "changed"


def _whiteout_change(member: str, st: _Disk | None) -> Change | None:
    if st is None:
        return Change(member, "removed", "whiteout removed")
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return None
    return Change(member, "changed", f"whiteout -> {type_name(st.st_mode)}")


def _entry_change(path: str, entry: TarEntry, st: _Disk | None, diff_fd: int) -> Change | None:
    want = _ENTRY_TYPES[entry.type]
    if st is None:
        return Change(path, "removed", "removed")
    if stat.S_IFMT(st.st_mode) != want:
        return Change(path, "changed", f"{type_name(want)} -> {type_name(st.st_mode)}")
    if entry.type is EntryType.FILE and entry.size == 0 and st.st_size != 0:
        return Change(path, "changed", f"size 0 -> {st.st_size}")
    if entry.type is EntryType.SYMLINK:
        parent, _, base = path.rpartition("/")
        try:
            fd = open_beneath(diff_fd, parent, os.O_PATH | os.O_DIRECTORY)
            try:
                target = os.readlink(base, dir_fd=fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return Change(path, "changed", f"symlink unreadable ({exc.strerror or exc})")
        if target != entry.linkname:
            return Change(path, "changed", f"target {entry.linkname!r} -> {target!r}")
    if entry.type in (EntryType.CHAR_DEVICE, EntryType.BLOCK_DEVICE):
        found = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if found != (entry.devmajor, entry.devminor):
            was = f"{entry.devmajor}:{entry.devminor}"
            return Change(path, "changed", f"device {was} -> {found[0]}:{found[1]}")
    return None


def _is_opaque(diff_fd: int, directory: str, st: _Disk | None) -> bool:
    if st is None and directory:
        return False
    try:
        fd = open_beneath(diff_fd, directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        for name in OPAQUE_XATTRS:
            try:
                if os.getxattr(fd, name) == b"y":
                    return True
            except OSError:
                continue
    finally:
        os.close(fd)
    return False
