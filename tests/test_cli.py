"""Command-line behaviour: one-line errors, exit codes, option parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefs.cli import parse_mount_options
from imagefs.errors import UsageError
from tests.mounting import run_imagefs


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    assert "Traceback" not in stderr
    assert lines[0].startswith("imagefs: ")
    return lines[0]


def test_missing_source_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", tmp_path / "nope.tar", tmp_path / "mnt")
    assert result.returncode != 0
    assert "nope.tar" in one_line_error(result.stderr)


def test_missing_mountpoint_is_one_line_error(tmp_path: Path) -> None:
    result = run_imagefs("mount", tmp_path, tmp_path / "missing")
    assert result.returncode != 0
    assert "does not exist" in one_line_error(result.stderr)


def test_mountpoint_not_a_directory(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = run_imagefs("mount", tmp_path, target)
    assert result.returncode != 0
    assert "not a directory" in one_line_error(result.stderr)


def test_not_an_image_is_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 100)
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", junk, tmp_path / "mnt")
    assert result.returncode != 0
    assert "junk.tar" in one_line_error(result.stderr)


def test_debug_shows_traceback(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", "--debug", tmp_path / "nope.tar", tmp_path / "mnt")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_umount_of_unmounted_directory(tmp_path: Path) -> None:
    result = run_imagefs("umount", tmp_path)
    assert result.returncode != 0
    assert "not mounted" in one_line_error(result.stderr)


def test_unknown_mount_option(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", "-o", "ro,frobnicate", tmp_path, tmp_path / "mnt")
    assert result.returncode == 2
    assert "frobnicate" in one_line_error(result.stderr)


def test_parse_mount_options() -> None:
    parsed = parse_mount_options("ro,nosuid,allow_other,image=a:b,x-systemd.after=x")
    assert parsed.fuse_flags == set()
    assert parsed.settings == {"allow_other": True, "image": "a:b"}
    with pytest.raises(UsageError, match="bogus"):
        parse_mount_options("bogus=1")


def test_rw_suid_dev_stay_safe_with_one_warning() -> None:
    # mount(8) passes rw,dev,suid by default: one warning (rw), still nosuid,nodev.
    parsed = parse_mount_options("rw,suid,dev")
    assert parsed.fuse_flags == set() and parsed.settings == {}
    assert len(parsed.warnings) == 1 and "read-only" in parsed.warnings[0]


def test_image_option_with_registry_reference_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", "--image", "a:b", "registry.invalid/x:1", tmp_path / "mnt")
    assert result.returncode == 2
    assert "registry reference" in one_line_error(result.stderr)
