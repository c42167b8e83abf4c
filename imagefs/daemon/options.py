"""``-o`` mount options, as mount(8), fstab and systemd ``.mount`` units pass them.

``mount -t fuse.imagefs SOURCE MOUNTPOINT -o OPTIONS`` runs fuse3's
``mount.fuse3`` helper, which runs ``imagefs SOURCE MOUNTPOINT -o OPTIONS``
(found on the default ``PATH``: ``/usr/local/bin`` and friends). So the
command line accepts that form (:func:`implicit_mount`) and ``-o`` carries
every ``imagefs mount`` option, spelled ``key`` or ``key=value`` with
underscores for dashes (``--cache-dir DIR`` is ``cache_dir=DIR``).
The option names are taken from the ``mount`` sub-command's own parser, so an
option added there is at once a mount option too.

What mount(8) adds by itself must not weaken the mount. A bare ``mount -t
fuse.imagefs SRC MNT`` arrives as ``-o rw,dev,suid`` (mount(8)'s defaults,
which ``mount.fuse3`` spells out for root):

* ``rw`` mounts read-only with one warning, as the kernel does for a
  write-protected device;
* ``suid`` and ``dev`` are ignored: the image may be hostile, and a setuid
  binary or device node inside it must not act as one on this host. Only the
  imagefs options ``unsafe_suid`` and ``unsafe_dev`` lift ``nosuid`` and
  ``nodev``.

A value may be double-quoted to hold commas (``image="a,b"``), as libmount
allows. Anything unknown is a :class:`UsageError` naming the option.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs.errors import UsageError

# FUSE mount flags passed on to the kernel when asked for.
PASSED_FLAGS = frozenset({"noexec"})

# Already what imagefs always does, or meaningless for a read-only FUSE file
# system whose timestamps never change; accepted so fstab lines can say them.
NO_OP_FLAGS = frozenset(
    {
        "ro",
        "nosuid",
        "nodev",
        "exec",
        "default_permissions",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "diratime",
        "nodiratime",
        "lazytime",
        "nolazytime",
        "sync",
        "async",
        "dirsync",
    }
)

# For mount(8), fstab and systemd only (libmount strips most of them before it
# runs a helper, but fstab lines reach us verbatim when imagefs is run by hand).
MOUNT_COMMAND_FLAGS = frozenset(
    {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group"}
)

# mount(8) defaults that imagefs refuses without saying so (see module docstring).
SILENTLY_SAFE = {
    "suid": "nosuid stays: use unsafe_suid to honour setuid bits",
    "dev": "nodev stays: use unsafe_dev to honour device files",
}

RW_WARNING = "an image is read-only; mounting read-only"

# imagefs options that make no sense as -o: mount(8) would wait forever for a
# foreground daemon, and -o inside -o is nonsense. A mount started by
# mount(8), fstab or systemd has no one at its stdin to type a password, and
# a user name without one only fails later: credentials go in auth_file=.
NOT_MOUNT_OPTIONS = frozenset({"help", "foreground", "options", "password_stdin", "username"})
_CREDENTIAL_OPTIONS = frozenset({"password_stdin", "username"})

_TRUE = ("", "1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


def split_options(text: str) -> Iterator[str]:
    """Split ``a,b=c,d="e,f"`` at commas outside double quotes; drop the quotes."""
    item: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            if item:
                yield "".join(item)
            item = []
        else:
            item.append(char)
    if quoted:
        raise UsageError(f"unbalanced double quote in mount options {text!r}")
    if item:
        yield "".join(item)


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``-o`` names (``cache_dir``) of ``parser``'s long options (``--cache-dir``)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for string in action.option_strings:
            if string.startswith("--"):
                name = string[2:].replace("-", "_")
                if name not in NOT_MOUNT_OPTIONS:
                    actions[name] = action
    return actions


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


@dataclass
class MountOptions:
    """``-o`` text, sorted: FUSE flags, imagefs settings, warnings to print."""

    fuse_flags: set[str] = field(default_factory=set)
    settings: dict[str, Any] = field(default_factory=dict)  # argparse dest -> value
    warnings: list[str] = field(default_factory=list)


def parse_options(text: str | None, actions: dict[str, argparse.Action]) -> MountOptions:
    """Sort ``-o`` text; ``actions`` are the imagefs options, see :func:`option_actions`."""
    parsed = MountOptions()
    for item in split_options(text or ""):
        raw_key, equals, value = item.partition("=")
        has_value = bool(equals)
        if raw_key.startswith("x-") or raw_key == "comment":
            continue  # fstab/systemd annotations (x-systemd.automount): not for us
        key = raw_key.replace("-", "_")
        if key == "rw" and not has_value:
            if RW_WARNING not in parsed.warnings:
                parsed.warnings.append(RW_WARNING)
        elif key in SILENTLY_SAFE and not has_value:
            continue
        elif key in PASSED_FLAGS and not has_value:
            parsed.fuse_flags.add(key)
        elif key in NO_OP_FLAGS | MOUNT_COMMAND_FLAGS and not has_value:
            continue
        elif key in actions:
            action = actions[key]
            setting = _option_value(raw_key, action, has_value, value)
            if isinstance(action, argparse._AppendAction):
                # Repeatable (--insecure a --insecure b): insecure=a,insecure=b.
                parsed.settings.setdefault(action.dest, []).append(setting)
            else:
                parsed.settings[action.dest] = setting
        elif key in _CREDENTIAL_OPTIONS:
            raise UsageError(
                f"{raw_key!r} is not a mount option: give registry credentials with "
                "auth_file=FILE (Docker config.json format)"
            )
        elif key in NOT_MOUNT_OPTIONS:
            raise UsageError(f"{raw_key!r} is not a mount option")
        else:
            raise UsageError(f"unknown mount option {raw_key!r}")
    return parsed


def _option_value(key: str, action: argparse.Action, has_value: bool, value: str) -> Any:
    if not _takes_value(action):
        # A switch: "read_all"; "read_all=no" is allowed so a unit can spell it out.
        if not has_value or value.lower() in _TRUE:
            return action.const if action.const is not None else True
        if value.lower() in _FALSE:
            return action.default
        raise UsageError(f"mount option {key!r} takes no value (or yes/no), got {value!r}")
    if not has_value or not value:
        raise UsageError(f"mount option {key!r} needs a value: {key}=VALUE")
    convert: Callable[[str], Any] | None = action.type if callable(action.type) else None
    try:
        return convert(value) if convert else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"mount option {key}={value}: {exc}") from None


def apply_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> set[str]:
    """Merge ``args.options`` (-o) into ``args``; returns the FUSE flags to pass on.

    A setting given both ways must agree: ``--image a -o image=b`` is an error
    rather than a silent choice.
    """
    parsed = parse_options(args.options, option_actions(parser))
    for message in parsed.warnings:
        print(f"imagefs: warning: {message}", file=sys.stderr)
    for dest, value in parsed.settings.items():
        current = getattr(args, dest, None)
        if isinstance(value, list):
            setattr(args, dest, [*(current or []), *value])
            continue
        default = parser.get_default(dest)
        if current not in (None, default, value):
            raise UsageError(f"conflicting values for {dest}: {current!r} and -o {value!r}")
        setattr(args, dest, value)
    return parsed.fuse_flags


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name`` (``mount``) inside ``parser``."""
    return subcommands(parser)[name]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def implicit_mount(argv: Sequence[str], commands: Collection[str]) -> list[str]:
    """``SOURCE MOUNTPOINT -o OPTIONS`` (how ``mount.fuse3`` calls us) means ``mount``."""
    args = list(argv)
    if args and not args[0].startswith("-") and args[0] not in commands:
        return ["mount", *args]
    return args


FUSE_CONF = Path("/etc/fuse.conf")


def user_allow_other(conf: Path = FUSE_CONF) -> bool:
    """Whether fusermount3 lets users mount with ``allow_other`` (a line on its own)."""
    try:
        lines = conf.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in lines)


def check_privileges(
    *,
    allow_other: bool,
    read_all: bool,
    unsafe_suid: bool,
    unsafe_dev: bool,
    euid: int | None = None,
    fuse_conf: Path = FUSE_CONF,
) -> None:
    """Refuse, before forking, option sets that cannot work or would be unsafe."""
    if read_all and allow_other:
        # read_all drops the kernel's permission checks; with allow_other
        # every user of the machine could then read every file of the image.
        raise UsageError("read_all cannot be combined with allow_other")
    root = (os.geteuid() if euid is None else euid) == 0
    if root:
        return
    if allow_other and not user_allow_other(fuse_conf):
        raise UsageError(
            f"allow_other needs root, or a line 'user_allow_other' in {fuse_conf} "
            "(fusermount3 refuses it to other users)"
        )
    for name, wanted in (("unsafe_suid", unsafe_suid), ("unsafe_dev", unsafe_dev)):
        if wanted:
            raise UsageError(
                f"{name} needs root: fusermount3 mounts users' file systems nosuid,nodev"
            )
