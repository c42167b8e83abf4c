"""imagefs.cachedir: how a cache file is published, and the sweep of what dead writers left."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imagefs import cachedir
from imagefs.cachedir import AtomicFile, sweep_temporaries, write_atomically


@pytest.fixture(autouse=True)
def _fresh_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cachedir, "_swept", set())


def test_appears_only_when_committed(tmp_path: Path) -> None:
    target = tmp_path / "d" / "file"
    out = AtomicFile(target)
    out.file.write(b"half")
    assert not target.exists()
    assert Path(out.temporary).parent == target.parent  # beside it: the rename is atomic
    out.file.write(b" and whole")
    out.commit()
    assert target.read_bytes() == b"half and whole"
    assert not list(target.parent.glob("*.part"))


def test_abort_and_exceptions_leave_nothing(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), AtomicFile(target) as out:
        out.file.write(b"new")
        raise RuntimeError
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_mode_is_exact_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old = os.umask(0)
    try:
        write_atomically(tmp_path / "file", b"x", mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == mode


def test_a_planted_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "cache").mkdir()
    os.symlink(victim, tmp_path / "cache" / "file")
    write_atomically(tmp_path / "cache" / "file", b"cache data")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "cache" / "file").is_symlink()


def test_pwrite_through_the_descriptor_and_durable_commit(tmp_path: Path) -> None:
    with AtomicFile(tmp_path / "blob", durable=True) as out:
        os.ftruncate(out.fd, 6)
        os.pwrite(out.fd, b"world", 1)
        os.pwrite(out.fd, b"h", 0)
    assert (tmp_path / "blob").read_bytes() == b"hworld"


def test_a_writer_holds_its_lock_until_the_rename(tmp_path: Path) -> None:
    out = AtomicFile(tmp_path / "file")
    fd = os.open(out.temporary, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep_temporaries(tmp_path) == (0, 0)  # alive: kept
        out.commit()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the descriptor
    finally:
        os.close(fd)


def test_sweep_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    # A real process dies mid-write (SIGKILL: no cleanup runs).
    code = (
        "import os, sys, time\n"
        "from imagefs.cachedir import AtomicFile\n"
        "out = AtomicFile(sys.argv[1])\n"
        "out.file.write(b'x' * 4096); out.file.flush()\n"
        "print(out.temporary, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "file")], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    temporary = Path(child.stdout.readline().strip())
    assert temporary.exists()
    assert sweep_temporaries(tmp_path) == (0, 0)  # still alive
    child.kill()
    child.wait()
    child.stdout.close()
    assert sweep_temporaries(tmp_path) == (1, 4096)
    assert not temporary.exists()


def test_sweep_leaves_other_files_alone(tmp_path: Path) -> None:
    keep = ["file", "file.lock", ".hidden", "x.part", ".a.b.part", "sha256-" + "0" * 64 + ".gzidx1"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    os.symlink("/etc/passwd", tmp_path / f".link.{'0' * 16}.part")
    os.mkfifo(tmp_path / f".fifo.{'1' * 16}.part")
    assert sweep_temporaries(tmp_path) == (0, 0)
    assert all((tmp_path / name).exists() for name in keep)
    assert Path("/etc/passwd").exists()
