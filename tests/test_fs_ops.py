"""Operations handlers called directly (no kernel): attributes, errors, EIO."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio

from imagefs.daemon.operations import ImageOperations
from imagefs.errors import CompressionError
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.tree.content import ContentReader
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import merge_layers

LAYER = b"\0" * 512 + b"hello world" + b"\0" * 501 + b"ABCDEFGH"


class BytesLayer:
    """Test scaffolding: a layer's uncompressed bytes held in memory."""

    def __init__(self, data: bytes, fail: bool = False) -> None:
        self.data = data
        self.fail = fail

    def pread(self, offset: int, size: int) -> bytes:
        if self.fail:
            raise CompressionError("layer sha256:bad: gzip stream is corrupt")
        return self.data[offset : offset + size]

    def close(self) -> None:
        pass


def entry(path: str, kind: EntryType, **kw: Any) -> TarEntry:
    fields: dict[str, Any] = {"mode": 0o644, "uid": 0, "gid": 0, "size": 0, "mtime_ns": 5}
    fields.update(kw)
    return TarEntry(path=path, type=kind, **fields)


def make_ops(fail: bool = False) -> ImageOperations:
    entries = [
        entry("etc", EntryType.DIRECTORY, mode=0o755),
        entry(
            "etc/motd",
            EntryType.FILE,
            size=11,
            data_offset=512,
            mode=0o4755,
            uid=3,
            mtime_ns=1_500_000_001,
            xattrs=(("user.k", b"v\0x"),),
        ),
        entry("sparse", EntryType.FILE, size=20, data_offset=1024, sparse=((2, 4), (16, 4))),
        entry("link", EntryType.SYMLINK, linkname="/etc/motd"),
        entry("dev", EntryType.CHAR_DEVICE, devmajor=1, devminor=3),
    ]
    tree = freeze(merge_layers([entries], lambda m: None))
    return ImageOperations(tree, ContentReader([BytesLayer(LAYER, fail)], ["sha256:x"]))


CTX = pyfuse3.RequestContext()
T = TypeVar("T")


def run(coro_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(coro_fn, *args)


def test_lookup_getattr_and_attributes() -> None:
    ops = make_ops()
    etc = run(ops.lookup, pyfuse3.ROOT_INODE, b"etc", CTX)
    assert stat.S_ISDIR(etc.st_mode)
    motd = run(ops.lookup, etc.st_ino, b"motd", CTX)
    assert stat.S_IMODE(motd.st_mode) == 0o4755 and stat.S_ISREG(motd.st_mode)
    assert (motd.st_uid, motd.st_size, motd.st_mtime_ns) == (3, 11, 1_500_000_001)
    again = run(ops.getattr, motd.st_ino, CTX)
    assert again.st_ino == motd.st_ino
    dev = run(ops.lookup, pyfuse3.ROOT_INODE, b"dev", CTX)
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)


def test_missing_name_is_negative_entry() -> None:
    ops = make_ops()
    attr = run(ops.lookup, pyfuse3.ROOT_INODE, b"nope", CTX)
    assert attr.st_ino == 0 and attr.entry_timeout > 0


def test_read_file_and_sparse_holes() -> None:
    ops = make_ops()
    motd = run(ops.lookup, run(ops.lookup, pyfuse3.ROOT_INODE, b"etc", CTX).st_ino, b"motd", CTX)
    info = run(ops.open, motd.st_ino, 0, CTX)
    assert info.keep_cache
    assert run(ops.read, info.fh, 0, 4096) == b"hello world"
    assert run(ops.read, info.fh, 6, 3) == b"wor"
    assert run(ops.read, info.fh, 11, 10) == b""
    sparse = run(ops.lookup, pyfuse3.ROOT_INODE, b"sparse", CTX)
    data = run(ops.read, sparse.st_ino, 0, 100)
    assert data == b"\0\0ABCD" + b"\0" * 10 + b"EFGH"
    assert run(ops.read, sparse.st_ino, 3, 14) == data[3:17]


def test_readlink_and_xattrs() -> None:
    ops = make_ops()
    link = run(ops.lookup, pyfuse3.ROOT_INODE, b"link", CTX)
    assert run(ops.readlink, link.st_ino, CTX) == b"/etc/motd"
    motd = run(ops.lookup, run(ops.lookup, pyfuse3.ROOT_INODE, b"etc", CTX).st_ino, b"motd", CTX)
    assert run(ops.listxattr, motd.st_ino, CTX) == [b"user.k"]
    assert run(ops.getxattr, motd.st_ino, b"user.k", CTX) == b"v\0x"
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(ops.getxattr, motd.st_ino, b"user.none", CTX)
    assert info.value.errno == pyfuse3.ENOATTR


def test_open_for_write_is_refused() -> None:
    ops = make_ops()
    sparse = run(ops.lookup, pyfuse3.ROOT_INODE, b"sparse", CTX)
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(ops.open, sparse.st_ino, os.O_RDWR, CTX)
    assert info.value.errno == errno.EROFS


def test_bad_read_becomes_eio_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    ops = make_ops(fail=True)
    sparse = run(ops.lookup, pyfuse3.ROOT_INODE, b"sparse", CTX)
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(ops.read, sparse.st_ino, 0, 10)
    assert info.value.errno == errno.EIO
    assert "gzip stream is corrupt" in caplog.text
    # The operations object keeps serving metadata after the failure.
    assert run(ops.getattr, sparse.st_ino, CTX).st_size == 20


def test_unknown_inode_is_enoent() -> None:
    ops = make_ops()
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(ops.getattr, 9999, CTX)
    assert info.value.errno == errno.ENOENT


def test_statfs_counts_inodes() -> None:
    ops = make_ops()
    data = run(ops.statfs, CTX)
    assert data.f_files == ops.tree.count == 6 and data.f_namemax == 255
