"""The FUSE file system: a thin pyfuse3 adapter over a :class:`~imagefs.tree.served.Tree`.

Every handler answers from the in-memory tree (point look-ups run on the
event loop) or, for file data, from :class:`ContentReader` in a worker thread
(decompression blocks). Only :class:`pyfuse3.FUSEError` leaves a handler: the
``_errors`` decorator turns anything unexpected into ``EIO`` with a log line,
so one bad read never takes the mount down.

Nothing in an image ever changes, so the kernel may cache everything for as
long as it likes: entries and attributes get long timeouts and open files
``keep_cache``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from imagefs.errors import ImageFSError
from imagefs.forensics.provenance import Provenance
from imagefs.layers.entry import EntryType
from imagefs.tree.content import ContentReader
from imagefs.tree.served import Inode, Stat, Tree, stat_of

log = logging.getLogger(__name__)

# The content never changes while mounted: let the kernel keep what it learns.
CACHE_TIMEOUT = 365 * 24 * 3600.0
BLOCK_SIZE = 4096
# Decompression threads at once; more only queue behind the GIL and the CPUs.
READ_THREADS = 4

_TYPE_BITS = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.DIRECTORY: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR_DEVICE: stat.S_IFCHR,
    EntryType.BLOCK_DEVICE: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}

P = ParamSpec("P")
R = TypeVar("R")


def _errors(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Let FUSEError through; log anything else and answer EIO."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ImageFSError as exc:
            log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except Exception:
            log.exception("%s failed unexpectedly", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class ImageOperations(pyfuse3.Operations):
    """Read-only pyfuse3 operations serving one merged image tree."""

    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, tree: Tree, content: ContentReader, provenance: Provenance | None = None
    ) -> None:
        super().__init__()
        self.tree = tree
        self.content = content
        # Answers the hidden user.imagefs.* xattrs (never listed: listxattr
        # shows only the image's own, so cp -a and tar copy exactly those).
        self.provenance = provenance
        self._read_limiter = trio.CapacityLimiter(READ_THREADS)

    # -- helpers -------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.tree.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    def attributes(self, inode: Inode | Stat) -> pyfuse3.EntryAttributes:
        stat = inode if isinstance(inode, Stat) else stat_of(inode)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(stat.ino)
        attr.generation = 0
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = CACHE_TIMEOUT
        attr.st_mode = pyfuse3.ModeT(_TYPE_BITS[stat.type] | stat.mode)
        attr.st_nlink = stat.nlink
        attr.st_uid = stat.uid
        attr.st_gid = stat.gid
        attr.st_rdev = stat.rdev
        attr.st_size = stat.size
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = (stat.stored + 511) // 512
        attr.st_atime_ns = stat.mtime_ns
        attr.st_mtime_ns = stat.mtime_ns
        attr.st_ctime_ns = stat.mtime_ns
        return attr

    # -- metadata -------------------------------------------------------------

    @_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self.tree.lookup(parent_inode, name)
        if inode is None:
            # A negative entry with a timeout lets the kernel cache "absent"
            # too (PATH searches, shared-library probing).
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = pyfuse3.InodeT(0)
            attr.entry_timeout = CACHE_TIMEOUT
            return attr
        return self.attributes(inode)

    @_errors
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self._inode(inode))

    @_errors
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        if node.type is not EntryType.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Every inode lives as long as the mount: nothing to release.
        return None

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_blocks = (self.tree.total_size + BLOCK_SIZE - 1) // BLOCK_SIZE
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = self.tree.count
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- directories ----------------------------------------------------------

    @_errors
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if not self._inode(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @_errors
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        # Offsets are positions in a fixed list (".", "..", then children in
        # name order), so they stay valid across calls and for telldir().
        directory = self._inode(fh)
        listing = self.tree.listing(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        position = start_id
        while position < len(listing) + 2:
            if position == 0:
                name, ino = b".", directory.ino
            elif position == 1:
                name, ino = b"..", directory.parent
            else:
                name, ino = listing[position - 2]
            # Attributes straight from the tree: no per-entry node objects.
            target = self.tree.stat(ino)
            if target is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if not pyfuse3.readdir_reply(
                token, pyfuse3.FileNameT(name), self.attributes(target), position + 1
            ):
                break
            position += 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    # -- files ----------------------------------------------------------------

    @_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.type is not EntryType.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=True)

    @_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        node = self._inode(fh)
        # Hot data straight from the page cache, on the loop; anything that
        # could block (disk, decompression) in a worker thread.
        cached = self.content.read_cached(node, off, size)
        if cached is not None:
            # A view of a buffer the next cached read reuses: pyfuse3 takes any
            # buffer and copies it to the kernel as this handler returns,
            # before the loop runs another one.
            return cast(bytes, cached)
        return await trio.to_thread.run_sync(
            self.content.read, node, off, size, limiter=self._read_limiter
        )

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    # -- extended attributes -------------------------------------------------

    @_errors
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        node = self._inode(inode)
        if self.provenance is not None:
            value = self.provenance.getxattr(inode, node, os.fsdecode(name))
        else:
            value = node.xattrs.get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_errors
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(os.fsencode(n)) for n in self._inode(inode).xattrs]
