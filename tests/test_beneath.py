"""imagefs.layers.beneath: reading a hostile tree without following any symlink.

Each case runs twice: through openat2(2) and through the component-by-component
O_NOFOLLOW walk that replaces it on kernels without openat2.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.layers import beneath
from imagefs.layers.beneath import Beneath


@pytest.fixture(params=["openat2", "walk"])
def tree(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    if request.param == "walk":
        monkeypatch.setattr(beneath, "_openat2_works", False)
    else:
        monkeypatch.setattr(beneath, "_openat2_works", None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    root = tmp_path / "store"
    (root / "diff" / "etc").mkdir(parents=True)
    (root / "diff" / "etc" / "passwd").write_text("root:x:0:0\n")
    os.symlink(outside / "secret", root / "diff" / "etc" / "shadow")
    os.symlink(outside, root / "diff" / "linkdir")
    os.symlink("../..", root / "diff" / "up")
    os.mkfifo(root / "diff" / "fifo")
    yield root


def test_reads_regular_files(tree: Path) -> None:
    with Beneath(str(tree)) as store:
        assert store.read("diff/etc/passwd", 100) == b"root:x:0:0\n"
        assert store.read("./diff//etc/passwd", 100) == b"root:x:0:0\n"
        fd = store.open("diff/etc/passwd")
        try:
            assert os.read(fd, 4) == b"root"
        finally:
            os.close(fd)
        assert sorted(e.name for e in store.listdir("diff")) == ["etc", "fifo", "linkdir", "up"]
        assert store.exists("diff/etc") and not store.exists("diff/nothing")


@pytest.mark.parametrize(
    "path", ["diff/etc/shadow", "diff/linkdir/secret", "diff/up/outside/secret", "diff/linkdir"]
)
def test_never_follows_a_symlink(tree: Path, path: str) -> None:
    with Beneath(str(tree)) as store, pytest.raises(OSError) as caught:
        store.read(path, 100)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)


def test_stat_does_not_follow_the_last_component(tree: Path) -> None:
    with Beneath(str(tree)) as store:
        assert stat.S_ISLNK(store.stat("diff/etc/shadow").st_mode)
        with pytest.raises(OSError):
            store.stat("diff/linkdir/secret")


@pytest.mark.parametrize("path", ["/etc/passwd", "diff/../../outside/secret", ".."])
def test_refuses_paths_that_leave_the_root(tree: Path, path: str) -> None:
    with Beneath(str(tree)) as store, pytest.raises(ValueError, match="beneath a root"):
        store.open(path)


def test_only_regular_files_of_bounded_size_are_read(tree: Path) -> None:
    with Beneath(str(tree)) as store:
        with pytest.raises(OSError, match="not a regular file"):
            store.read("diff/fifo", 100)  # opened for reading, a FIFO would block forever
        with pytest.raises(OSError, match="larger than 4 bytes"):
            store.read("diff/etc/passwd", 4)


def test_a_fifo_never_blocks(tree: Path) -> None:
    with Beneath(str(tree)) as store:
        os.close(store.open("diff/fifo"))  # O_NONBLOCK: returns at once, no writer needed


def test_refuses_to_open_for_writing(tree: Path) -> None:
    with Beneath(str(tree)) as store:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_CREAT, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(ValueError, match="only opens for reading"):
                store.open("diff/etc/passwd", flags)


def test_does_not_change_access_times(tree: Path) -> None:
    target = tree / "diff" / "etc" / "passwd"
    os.utime(target, ns=(1_000_000_000, 2_000_000_000))
    with Beneath(str(tree)) as store:
        store.read("diff/etc/passwd", 100)
    assert target.stat().st_atime_ns == 1_000_000_000  # O_NOATIME (we own the file)


def test_openat2_is_used_where_the_kernel_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian 12's kernel has openat2 (5.6+): the fallback must not be what runs.
    monkeypatch.setattr(beneath, "_openat2_works", None)
    (tmp_path / "f").write_text("x")
    with Beneath(str(tmp_path)) as store:
        assert store.read("f", 10) == b"x"
    assert beneath._openat2_works is True
