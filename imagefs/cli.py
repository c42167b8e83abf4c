"""Command line: ``imagefs mount`` and ``imagefs umount``.

Errors are printed as one line (``imagefs: <what went wrong>``) with a
non-zero exit status; ``--debug`` adds the traceback and debug logging.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .cachedir import default_cache_dir
from .errors import ImageFSError, UsageError
from .mount import MountRequest, mount, umount
from .sources import parse_platform

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# -o options, as mount(8) and fstab pass them. Values are what the option
# does to the mount; imagefs is always read-only, nosuid and nodev.
_MOUNT_OPTION_FLAGS = {
    "ro": None,
    "nosuid": None,
    "nodev": None,
    "noexec": "noexec",
    "exec": None,
    "default_permissions": None,
    "allow_other": "allow_other",
    "auto": None,
    "noauto": None,
    "nofail": None,
    "user": None,
    "users": None,
    "_netdev": None,
    "defaults": None,
}
_IGNORED_WITH_WARNING = {
    "rw": "imagefs is read-only; mounting read-only",
    "suid": "setuid bits in the image stay inert (nosuid)",
    "dev": "device files in the image stay inert (nodev)",
}


def _warn(message: str) -> None:
    print(f"imagefs: warning: {message}", file=sys.stderr)


def parse_mount_options(text: str | None) -> tuple[set[str], dict[str, str]]:
    """Split ``-o a,b,key=value`` into FUSE flags and imagefs settings."""
    flags: set[str] = set()
    settings: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, has_value, value = item.partition("=")
        if key.startswith("x-"):
            continue  # fstab/systemd annotations (x-systemd.*) are not for us
        if has_value:
            if key not in ("image", "platform", "cache_dir", "log"):
                raise UsageError(f"unknown mount option {key!r}")
            settings[key] = value
        elif key in _IGNORED_WITH_WARNING:
            _warn(_IGNORED_WITH_WARNING[key])
        elif key in _MOUNT_OPTION_FLAGS:
            flag = _MOUNT_OPTION_FLAGS[key]
            if flag:
                flags.add(flag)
        else:
            raise UsageError(f"unknown mount option {key!r}")
    return flags, settings


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    parser = argparse.ArgumentParser(
        prog="imagefs",
        description="Mount container images read-only, without running or extracting them.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"imagefs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        parents=[common],
        help="mount an image's root file system",
        description="Mount SOURCE (an OCI layout, oci-archive or docker save tarball) "
        "read-only on MOUNTPOINT. Returns once the mount is live.",
    )
    mount.add_argument("source", metavar="SOURCE", help="[docker-archive:|oci:|oci-archive:]PATH")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    mount.add_argument("--image", metavar="NAME:TAG", help="image to use from a multi-image tar")
    mount.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pick from an index"
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay attached; log to stderr"
    )
    mount.add_argument(
        "-o", dest="options", metavar="OPTIONS", help="comma-separated mount options (see README)"
    )
    mount.add_argument(
        "--allow-other", action="store_true", help="let other users see the mount (allow_other)"
    )
    mount.add_argument(
        "--cache-dir", type=Path, help=f"cache directory (default: {default_cache_dir()})"
    )
    mount.add_argument("--log", type=Path, metavar="FILE", help="also log to FILE")

    umount = commands.add_parser(
        "umount",
        parents=[common],
        help="unmount an imagefs mount (also a stale one)",
        description="Unmount MOUNTPOINT; a mount whose daemon died is detached lazily.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    umount.add_argument("-z", "--lazy", action="store_true", help="lazy unmount")
    return parser


def _run_mount(args: argparse.Namespace) -> None:
    flags, settings = parse_mount_options(args.options)
    platform_text = args.platform or settings.get("platform")
    cache_dir = args.cache_dir or settings.get("cache_dir")
    log_file = args.log or settings.get("log")
    request = MountRequest(
        source=args.source,
        mountpoint=args.mountpoint,
        image=args.image or settings.get("image"),
        platform=parse_platform(platform_text) if platform_text else None,
        foreground=args.foreground,
        allow_other=args.allow_other or "allow_other" in flags,
        debug=args.debug,
        quiet=args.quiet,
        cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
        log_file=Path(log_file) if log_file else None,
        extra_fuse_options=frozenset(flags - {"allow_other"}),
    )
    mount(request)


def _run_umount(args: argparse.Namespace) -> None:
    umount(args.mountpoint, lazy=args.lazy)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            _run_mount(args)
        else:
            _run_umount(args)
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"imagefs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImageFSError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"imagefs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"imagefs: internal error: {exc!r} (run with --debug for details)", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
