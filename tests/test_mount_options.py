"""``-o`` options as mount(8) passes them, against the real ``mount`` sub-command parser.

These run without a mount; tests/test_linux.py drives the same options
through mount(8), fstab and the kernel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from imagefs.cli import _build_parser, parse_mount_options
from imagefs.daemon.mount import MountRequest
from imagefs.daemon.options import (
    NOT_MOUNT_OPTIONS,
    RW_WARNING,
    apply_options,
    check_privileges,
    implicit_mount,
    option_actions,
    split_options,
    subcommand,
    subcommands,
    user_allow_other,
)
from imagefs.errors import UsageError


def mount_parser() -> argparse.ArgumentParser:
    return subcommand(_build_parser(), "mount")


def parse_mount(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    parser = _build_parser()
    args = parser.parse_args(implicit_mount(argv, subcommands(parser)))
    return args, apply_options(args, subcommand(parser, "mount"))


def test_split_options_keeps_quoted_commas() -> None:
    assert list(split_options('ro,image="a,b",,log=/x')) == ["ro", "image=a,b", "log=/x"]
    with pytest.raises(UsageError, match="quote"):
        list(split_options('image="a'))


def test_mount8_defaults_mount_read_only_nosuid_nodev_with_one_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # What a bare `mount -t fuse.imagefs SRC MNT` hands to imagefs.
    args, flags = parse_mount(["SRC", "/mnt", "-o", "rw,dev,suid"])
    assert args.command == "mount" and args.source == "SRC"
    assert flags == set()
    assert not (args.unsafe_suid or args.unsafe_dev or args.read_all or args.allow_other)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"imagefs: warning: {RW_WARNING}"]
    request = MountRequest(source="SRC", mountpoint=Path("/mnt"))
    assert {"ro", "nosuid", "nodev", "default_permissions"} <= request.fuse_options()


def test_mount_command_and_fstab_words_are_accepted_silently(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = (
        "defaults,ro,nosuid,nodev,noatime,auto,noauto,nofail,_netdev,user,users,"
        "x-systemd.automount,x-systemd.idle-timeout=1min,comment=systemd.x"
    )
    parsed = parse_mount_options(text)
    assert parsed.fuse_flags == set() and parsed.settings == {} and parsed.warnings == []
    assert capsys.readouterr().err == ""


def test_noexec_is_passed_to_the_kernel() -> None:
    assert parse_mount_options("noexec").fuse_flags == {"noexec"}


@pytest.mark.parametrize("text", ["frobnicate", "frob=1", "fsname=x", "foreground", "help"])
def test_unknown_option_error_names_it(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_mount_options(f"ro,{text},allow_other")
    assert repr(text.partition("=")[0]) in str(info.value)


@pytest.mark.parametrize("text", ["password_stdin", "username=bob"])
def test_credentials_are_not_mount_options(text: str) -> None:
    # mount(8), fstab and systemd leave nobody at stdin to type a password.
    with pytest.raises(UsageError, match="auth_file"):
        parse_mount_options(text)


def test_every_mount_option_can_be_given_with_dash_o() -> None:
    """Each ``--long-option`` of ``imagefs mount`` is a ``-o`` key (dashes as underscores)."""
    parser = mount_parser()
    actions = option_actions(parser)
    long_options = {
        string[2:].replace("-", "_")
        for action in parser._actions
        for string in action.option_strings
        if string.startswith("--")
    }
    assert long_options - set(actions) == NOT_MOUNT_OPTIONS & long_options
    for name, action in actions.items():
        text = name if action.nargs == 0 else f"{name}={sample_value(action)}"
        parsed = parse_mount_options(text)
        assert action.dest in parsed.settings, name


def sample_value(action: argparse.Action) -> str:
    """A value the option's own type accepts (options come and go with other features)."""
    if action.choices:
        return str(next(iter(action.choices)))
    for candidate in ("1", "/some/path", "value", "auto", "landmark"):
        try:
            if callable(action.type):
                action.type(candidate)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
        return candidate
    raise AssertionError(f"no sample value for {action.option_strings}")


def test_dash_o_fills_the_same_settings_as_the_command_line(tmp_path: Path) -> None:
    by_flags, _ = parse_mount(
        [
            "mount",
            "SRC",
            "/mnt",
            "--image=a:b",
            "--platform=linux/arm64",
            f"--cache-dir={tmp_path}",
            f"--log={tmp_path}/log",
            "--read-all",
            "--unsafe-suid",
            "--unsafe-dev",
            "--debug",
            "--quiet",
        ]
    )
    by_options, flags = parse_mount(
        [
            "SRC",
            "/mnt",
            "-o",
            f"ro,image=a:b,platform=linux/arm64,cache_dir={tmp_path},log={tmp_path}/log,"
            "read_all,unsafe_suid,unsafe-dev,debug,quiet",
        ]
    )
    assert flags == set()
    for name in ("image", "platform", "cache_dir", "log", "read_all", "unsafe_suid", "unsafe_dev"):
        assert getattr(by_options, name) == getattr(by_flags, name), name
    assert by_options.debug and by_options.quiet
    assert isinstance(by_options.cache_dir, Path)


def test_switch_values_and_errors() -> None:
    assert parse_mount_options("read_all=yes").settings == {"read_all": True}
    assert parse_mount_options("read_all=no").settings == {"read_all": False}
    with pytest.raises(UsageError, match="takes no value"):
        parse_mount_options("read_all=maybe")
    with pytest.raises(UsageError, match="needs a value"):
        parse_mount_options("image")


def test_conflicting_command_line_and_dash_o_is_an_error() -> None:
    with pytest.raises(UsageError, match="conflicting"):
        parse_mount(["mount", "SRC", "/mnt", "--image=a", "-o", "image=b"])
    args, _ = parse_mount(["mount", "SRC", "/mnt", "--image=a", "-o", "image=a"])
    assert args.image == "a"


def test_implicit_mount_form_only_for_non_commands() -> None:
    commands = ["mount", "umount", "mounts"]
    assert implicit_mount(["src", "mnt", "-o", "ro"], commands) == [
        "mount",
        "src",
        "mnt",
        "-o",
        "ro",
    ]
    assert implicit_mount(["umount", "mnt"], commands) == ["umount", "mnt"]
    assert implicit_mount(["--version"], commands) == ["--version"]


def test_fuse_options_for_read_all_and_unsafe_switches() -> None:
    request = MountRequest(
        source="s", mountpoint=Path("/m"), read_all=True, unsafe_suid=True, unsafe_dev=True
    )
    options = request.fuse_options()
    assert "default_permissions" not in options
    assert {"suid", "dev", "ro"} <= options and not {"nosuid", "nodev"} & options


def test_privilege_checks(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 10\n")
    assert not user_allow_other(conf)
    with pytest.raises(UsageError, match="user_allow_other"):
        check_privileges(
            allow_other=True,
            read_all=False,
            unsafe_suid=False,
            unsafe_dev=False,
            euid=1000,
            fuse_conf=conf,
        )
    conf.write_text("user_allow_other\n")
    assert user_allow_other(conf)
    check_privileges(
        allow_other=True,
        read_all=False,
        unsafe_suid=False,
        unsafe_dev=False,
        euid=1000,
        fuse_conf=conf,
    )
    with pytest.raises(UsageError, match="unsafe_suid needs root"):
        check_privileges(
            allow_other=False, read_all=False, unsafe_suid=True, unsafe_dev=False, euid=1000
        )
    with pytest.raises(UsageError, match="read_all cannot be combined with allow_other"):
        check_privileges(
            allow_other=True, read_all=True, unsafe_suid=False, unsafe_dev=False, euid=0
        )
    check_privileges(allow_other=True, read_all=False, unsafe_suid=True, unsafe_dev=True, euid=0)
