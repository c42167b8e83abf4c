"""Open files inside a directory tree that others control, never following a symlink.

A host's image store (containerd's content store, podman's and Docker's
extracted layers) is evidence, and possibly hostile: whoever owns the host can
plant ``diff/etc/shadow -> /etc/shadow`` or a symlinked parent directory.
Every file imagefs reads from such a tree is opened *beneath* the tree's root
with no symlink followed on the way, in any component:

* ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS`` (Linux 5.6+), where the kernel does the walk;
* else a walk of ``openat(2)`` calls, one component at a time, each with
  ``O_NOFOLLOW`` (directories with ``O_DIRECTORY`` too), which refuses a
  symlink anywhere with ``ELOOP``/``ENOTDIR``, as containerd's continuity
  and umoci's secure join do in user space.

Files are opened read-only, with ``O_NOATIME`` where the kernel allows it (the
owner, or root): reading evidence should not change its access times.
Nothing here ever writes, creates or locks anything.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Beneath", "BeneathFile", "open_beneath", "open_regular"]

_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works: bool | None = None  # None: not tried yet


def _components(relpath: str) -> list[str]:
    """The path's components; ValueError for absolute paths and ``..``."""
    if relpath.startswith("/"):
        raise ValueError(f"{relpath!r}: an absolute path cannot be opened beneath a root")
    parts = [part for part in relpath.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{relpath!r}: '..' cannot be opened beneath a root")
    return parts


def _openat2(dir_fd: int, relpath: str, flags: int) -> int | None:
    """The descriptor, or None when the kernel has no openat2 (ENOSYS, seccomp EPERM)."""
    global _openat2_works  # noqa: PLW0603 - a process-wide capability probe
    if _openat2_works is False:
        return None
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS
                   | _RESOLVE_NO_MAGICLINKS)  # fmt: skip
    fd = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(relpath or ".")),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        _openat2_works = True
        return int(fd)
    code = ctypes.get_errno()
    if code == errno.ENOSYS or (code == errno.EPERM and _openat2_works is None):
        _openat2_works = False
        return None
    raise OSError(code, os.strerror(code), relpath)


def _walk_open(dir_fd: int, parts: list[str], flags: int) -> int:
    """Component by component, ``O_NOFOLLOW`` each time (the no-openat2 fallback)."""
    current = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for part in parts[:-1]:
            following = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
            os.close(current)
            current = following
        if not parts:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=current)
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
    finally:
        os.close(current)


def open_beneath(dir_fd: int, relpath: str, flags: int = os.O_RDONLY) -> int:
    """Open ``relpath`` beneath the directory ``dir_fd``, following no symlink.

    A symlink in any component fails with ``ELOOP`` (or ``ENOTDIR`` for a
    parent); the caller closes the descriptor. ``flags`` may not ask to
    write or create: this module only reads. ``O_NONBLOCK`` is always added,
    so a FIFO planted where a file should be cannot hang the caller (it has
    no effect on regular files and directories).
    """
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
        raise ValueError("open_beneath only opens for reading")
    parts = _components(relpath)
    # O_PATH takes no other flags (openat2 refuses them with EINVAL).
    if not flags & os.O_PATH:
        flags |= os.O_NONBLOCK
    for extra in (0,) if flags & os.O_PATH else (os.O_NOATIME, 0):
        try:
            fd = _openat2(dir_fd, "/".join(parts), flags | extra)
            if fd is None:
                fd = _walk_open(dir_fd, parts, flags | extra)
            return fd
        except PermissionError:
            if not extra:
                raise
            # O_NOATIME is only for the file's owner (or CAP_FOWNER): retry without.
    raise AssertionError("unreachable")


def open_regular(dir_fd: int, relpath: str) -> int:
    """A read-only descriptor on the *regular file* ``relpath`` beneath ``dir_fd``.

    The type is checked before opening (opening a device node can have side
    effects: a tape rewinds) and again on the descriptor, so a file swapped
    in between is caught too.
    """
    parts = _components(relpath)
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "not a regular file", relpath)
    parent = open_beneath(dir_fd, "/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY)
    try:
        before = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(before.st_mode):
            raise OSError(errno.ELOOP, "a symlink, not followed", relpath)
        if not stat.S_ISREG(before.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", relpath)
        fd = open_beneath(parent, parts[-1])
    finally:
        os.close(parent)
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(
        after.st_mode
    ):
        os.close(fd)
        raise OSError(errno.EAGAIN, "replaced while being opened", relpath)
    return fd


class Beneath:
    """A directory tree read without following symlinks: ``open``, ``read``, ``stat``, list.

    The root itself is the caller's choice (a ``--store-root`` argument may
    well be a symlink the user made); everything below it is the store's.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, relpath: str) -> str:
        """For messages: where ``relpath`` is on the host."""
        return os.path.join(self.root, relpath)

    def open(self, relpath: str, flags: int = os.O_RDONLY) -> int:
        """Any kind of file (a directory, with ``O_DIRECTORY``); see :func:`open_beneath`."""
        return open_beneath(self._fd, relpath, flags)

    def open_file(self, relpath: str) -> int:
        """A regular file only; see :func:`open_regular`."""
        return open_regular(self._fd, relpath)

    def read(self, relpath: str, limit: int) -> bytes:
        """The whole file, which must be a regular file of at most ``limit`` bytes."""
        fd = self.open_file(relpath)
        try:
            info = os.fstat(fd)
            if info.st_size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", self.path(relpath))
            chunks = []
            remaining = limit + 1  # one more than allowed: a file that grew is caught
            while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 20))):
                chunks.append(chunk)
                remaining -= len(chunk)
            data = b"".join(chunks)
            if len(data) > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", self.path(relpath))
            return data
        finally:
            os.close(fd)

    def stat(self, relpath: str) -> os.stat_result:
        """``lstat`` of ``relpath``: its parents are opened beneath the root, it is not followed."""
        parts = _components(relpath)
        if not parts:
            return os.stat(self._fd)
        parent = self.open("/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY)
        try:
            return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    def exists(self, relpath: str) -> bool:
        try:
            self.stat(relpath)
        except FileNotFoundError:
            return False
        return True

    def listdir(self, relpath: str = "") -> Iterator[os.DirEntry[str]]:
        """The entries of the directory ``relpath`` (DirEntry never follows here)."""
        fd = self.open(relpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as entries:
                yield from entries
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class BeneathFile:
    """A regular file of a tree, reopened beneath its root each time (an image.BlobOpener).

    Layer readers reopen blobs long after the source was resolved (in the
    mount daemon, after a fork); each open walks the store again without
    following a symlink, so a blob swapped for a symlink since is refused.
    """

    root: str
    relpath: str

    def open_fd(self) -> int:
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return open_regular(root_fd, self.relpath)
        finally:
            os.close(root_fd)
