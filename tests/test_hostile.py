"""The hostile-image corpus (tests/hostile/corpus.py), in-process and mounted.

For each case: the loader either serves the documented interpretation or
raises one ImageFSError (never another exception); a real mount either
serves it or fails with one line and leaves nothing mounted; and nothing
outside the mount point and its cache changes.

``IMAGEFS_HOSTILE_SCALE=full`` (``make fuzz``) raises the scale cases to
a million entries; ``make test`` runs 100,000 (linear either way).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.errors import ImageFSError
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.sources import open_image
from imagefs.tree.loader import load_image
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import _Merger, merge_layers
from imagefs.tree.served import lookup_path
from tests.hostile.corpus import Case, Refused, Served, cases, deep_path
from tests.mounting import is_mounted, mounted, run_imagefs

FULL = os.environ.get("IMAGEFS_HOSTILE_SCALE") == "full"
CASES = {case.name: case for case in cases(many=1_000_000 if FULL else 100_000)}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Each case's OCI layout, written on first use and shared by both tiers."""
    root = tmp_path_factory.mktemp("hostile")
    built: dict[str, Path] = {}

    class Lazy(dict[str, Path]):
        def __missing__(self, name: str) -> Path:
            built[name] = CASES[name].write(root / name)
            return built[name]

    yield Lazy()


@pytest.fixture
def case_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Case:
    case = CASES[request.param]
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    return case


def _host_snapshot(*paths: Path) -> dict[str, tuple[int, int, str]]:
    """(mtime, size, sha256) of host files a hostile image names."""
    out = {}
    for path in paths:
        info = path.stat()
        out[str(path)] = (
            info.st_mtime_ns,
            info.st_size,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
    return out


def _dir_snapshot(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


# The scale cases load in the mount test; here only their merge is counted
# (test_deep_merge_is_linear): loading them twice costs seconds.
SCALE = ("many-empty-entries", "deep-nesting")


@pytest.mark.parametrize("case_env", [name for name in CASES if name not in SCALE], indirect=True)
def test_loader(case_env: Case, layouts: dict[str, Path], tmp_path: Path) -> None:
    """In-process: the documented tree, or exactly one ImageFSError."""
    case = case_env
    warnings: list[str] = []
    image = open_image(str(layouts[case.name]))
    if isinstance(case.expect, Refused):
        with pytest.raises(ImageFSError) as info:
            load_image(image, cache_dir=tmp_path / "cache", warn=warnings.append).close()
        assert case.expect.message.lower() in str(info.value).lower()
        assert "\n" not in str(info.value)
        return
    loaded = load_image(image, cache_dir=tmp_path / "cache", warn=warnings.append)
    try:
        for path, expected in case.expect.present.items():
            node = lookup_path(loaded.tree, path)
            assert node is not None, path
            if isinstance(expected, bytes):
                assert node.type is EntryType.FILE, path
                assert loaded.content.read(node, 0, node.size + 1) == expected
            elif expected == "dir":
                assert node.is_dir, path
            else:
                assert node.type is EntryType.SYMLINK and "-> " + node.target == expected
        for path in case.expect.absent:
            assert lookup_path(loaded.tree, path) is None, path
        for warning in case.expect.warns:
            assert any(warning in line for line in warnings), (warning, warnings)
        assert all("\n" not in repr(line) for line in warnings)
    finally:
        loaded.close()


@pytest.mark.fuse
@pytest.mark.parametrize("case_env", list(CASES), indirect=True)
def test_mount(case_env: Case, layouts: dict[str, Path], tmp_path: Path) -> None:
    """A real mount: served as documented, or one error line and nothing mounted."""
    case = case_env
    source = layouts[case.name]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("host\n")
    host = _host_snapshot(Path("/etc/passwd"), outside / "passwd")
    before = _dir_snapshot(tmp_path)
    mnt = tmp_path / "mnt"
    if isinstance(case.expect, Refused):
        mnt.mkdir()
        result = run_imagefs("mount", "--quiet", f"--cache-dir={tmp_path / 'cache'}", source, mnt)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("imagefs: "), result.stderr
        assert "Traceback" not in result.stderr
        assert case.expect.message.lower() in lines[0].lower()
        assert not is_mounted(mnt)
    else:
        with mounted(source, mnt):
            _check_served(mnt, case.expect)
    assert _host_snapshot(Path("/etc/passwd"), outside / "passwd") == host
    # Only the mount point and the cache appeared next to it.
    new = _dir_snapshot(tmp_path) - before
    assert {p for p in new if p.split("/")[0] not in ("mnt", "mnt.cache", "cache")} == set()


def _check_served(mnt: Path, expect: Served) -> None:
    for path, expected in expect.present.items():
        full = os.path.join(mnt, path)
        if len(full) >= 4096:
            _check_deep(mnt, path, expected)
            continue
        info = os.lstat(full)
        if isinstance(expected, bytes):
            assert stat.S_ISREG(info.st_mode), path
            with open(full, "rb") as handle:
                assert handle.read() == expected
        elif expected == "dir":
            assert stat.S_ISDIR(info.st_mode), path
        else:
            assert "-> " + os.readlink(full) == expected
    for path in expect.absent:
        assert not os.path.lexists(os.path.join(mnt, path)), path
    assert os.listdir(mnt) is not None


def _check_deep(mnt: Path, path: str, expected: object) -> None:
    """Walk a path longer than PATH_MAX one component at a time (openat)."""
    parts = path.split("/")
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            assert os.read(leaf, 1 << 16) == expected
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def test_symlink_loop_is_eloop_through_the_mount(tmp_path: Path, layouts: dict[str, Path]) -> None:
    """The kernel, not the daemon, follows the image's symlinks: a loop is ELOOP."""
    with mounted(layouts["symlink-loops"], tmp_path / "mnt") as mnt:
        with pytest.raises(OSError) as info:
            os.stat(mnt / "self")
        assert info.value.errno == errno.ELOOP


def test_deep_merge_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 nested directories: each parent is found from the last one, not the root.

    Counts the components walked (no wall clock): walking from the root for
    every entry would be about depth**2 / 2 = 50 million.
    """
    depth = 10_000
    walked = 0
    resolve = _Merger._resolve

    def counting(self: _Merger, path: str, create_layer: int | None) -> object:
        nonlocal walked
        walked += len(path.split("/")) if path else 0
        return resolve(self, path, create_layer)

    monkeypatch.setattr(_Merger, "_resolve", counting)

    def entries() -> Iterator[TarEntry]:
        for level in range(1, depth + 1):
            # As tar writes directories: "./d/d/.../d/".
            yield TarEntry(f"./{deep_path(level)}/", EntryType.DIRECTORY, 0o755, 0, 0, 0, 0)
        yield TarEntry(deep_path(depth) + "/f", EntryType.FILE, 0o644, 0, 0, 0, 0)

    tree = freeze(merge_layers([entries()], lambda _: None))
    assert walked < 4 * depth
    assert lookup_path(tree, deep_path(depth) + "/f") is not None


def test_corpus_size() -> None:
    """The note in SECURITY.md counts these."""
    assert len(CASES) >= 20
