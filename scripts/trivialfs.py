"""A minimal pyfuse3 server exposing one file read with os.pread: the bench's ceiling.

Usage: trivialfs.py FILE MOUNTPOINT (foreground; unmount with fusermount3 -u).
Same kernel options as imagefs (keep_cache off for a fair cold read). With
TRIVIALFS_NO_CACHE=1 the kernel caches no entry or attribute, so every stat
is a request: the bench times pyfuse3's round trip with it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.InodeT(pyfuse3.ROOT_INODE + 1)
TIMEOUT = 0 if os.environ.get("TRIVIALFS_NO_CACHE") == "1" else 3600


class OneFile(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(inode)
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            attr.st_nlink = 2
        else:
            attr.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o644)
            attr.st_nlink = 1
            attr.st_size = self.size
        return attr

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != b"file":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode))

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)


def main() -> None:
    path, mountpoint = sys.argv[1], sys.argv[2]
    pyfuse3.init(OneFile(path), mountpoint, {"ro", "fsname=trivialfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
