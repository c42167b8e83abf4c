"""Command line: ``imagefs mount``, ``umount``, ``mounts``, ``pull``, ``cache``,
``inspect``, ``which``, ``diff`` and ``images``.

Errors are printed as one line (``imagefs: <what went wrong>``) with a
non-zero exit status; ``--debug`` adds the traceback and debug logging.

``imagefs SOURCE MOUNTPOINT -o OPTIONS``, the form mount(8) uses through
``mount.fuse3``, means ``imagefs mount`` (see imagefs.daemon.options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from imagefs import __version__
from imagefs.cachedir import default_cache_dir
from imagefs.daemon.mount import (
    DEFAULT_DECODED_CACHE_MB,
    DEFAULT_READAHEAD_KB,
    MountRequest,
    mount,
    umount,
    umount_if_stale,
)
from imagefs.daemon.mounttab import format_table, list_mounts
from imagefs.daemon.options import (
    MountOptions,
    apply_options,
    check_privileges,
    implicit_mount,
    option_actions,
    parse_options,
    subcommand,
    subcommands,
)
from imagefs.errors import ImageFSError, UsageError
from imagefs.forensics import commands as forensics
from imagefs.registry import cliargs as registry_cli
from imagefs.sources import parse_platform

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_mount_options(text: str | None) -> MountOptions:
    """Sort ``-o`` text against the ``mount`` command's options (see imagefs.daemon.options)."""
    return parse_options(text, option_actions(subcommand(_build_parser(), "mount")))


def _whole_number(unit: str, minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of ``unit``, at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} {unit}: {text!r}")
        return value

    return parse


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
        description="Mount SOURCE (an OCI layout, oci-archive, docker save tarball or dir: "
        "directory) read-only on MOUNTPOINT. Returns once the mount is live.",
    )
    mount.add_argument(
        "source",
        metavar="SOURCE",
        help="[docker-archive:|oci:|oci-archive:|dir:]PATH, a registry image "
        "[docker://]NAME[:TAG], or an image of a host store: containerd:REF, "
        "containers-storage:REF, docker-store:REF",
    )
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
    mount.add_argument(
        "--read-all",
        action="store_true",
        help="the mounting user may read every file, whatever its owner and mode "
        "(drops default_permissions; not with --allow-other)",
    )
    mount.add_argument(
        "--unsafe-suid", action="store_true", help="honour setuid/setgid bits (trusted images only)"
    )
    mount.add_argument(
        "--unsafe-dev", action="store_true", help="honour device files (trusted images only)"
    )
    mount.add_argument(
        "--decoded-cache",
        type=_whole_number("MB", 1),
        default=DEFAULT_DECODED_CACHE_MB,
        metavar="MB",
        help="memory for decoded gzip/zstd data, per kind of layer "
        f"(default {DEFAULT_DECODED_CACHE_MB})",
    )
    mount.add_argument(
        "--readahead",
        type=_whole_number("KB", 0),
        default=DEFAULT_READAHEAD_KB,
        metavar="KB",
        help="the mount's readahead window, as root "
        f"(default {DEFAULT_READAHEAD_KB}; 0 keeps the kernel's)",
    )
    mount.add_argument(
        "--layers",
        action="store_true",
        help="serve investigation views: rootfs/, layers/N/, upto/N/, deleted/N/, shadowed/N/",
    )
    mount.add_argument(
        "--upto",
        type=int,
        metavar="N",
        help="the file system as it stood after layer N (0 = base; -1 = last)",
    )
    forensics.add_store_arguments(mount)
    mount.add_argument(
        "--allow-modified",
        action="store_true",
        help="mount a host store's image even where its layer directories were changed "
        "(each changed file is marked with the hidden xattr user.imagefs.modified)",
    )
    registry_cli.add_registry_arguments(mount)
    registry_cli.add_lazy_arguments(mount)

    umount = commands.add_parser(
        "umount",
        parents=[common],
        help="unmount an imagefs mount (also a stale one)",
        description="Unmount MOUNTPOINT; a mount whose daemon died is detached lazily.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    umount.add_argument("-z", "--lazy", action="store_true", help="lazy unmount")
    umount.add_argument(
        "--if-stale",
        action="store_true",
        help="only if its daemon is gone (for ExecStopPost=); nothing to do is success",
    )

    mounts = commands.add_parser(
        "mounts",
        parents=[common],
        help="list live imagefs mounts with their source and daemon pid",
        description="List the imagefs mounts of this mount namespace: mount point, the pid "
        "of the daemon serving it (- if unknown) and the source; stale ones say so.",
    )
    mounts.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    registry_cli.add_commands(commands, common)
    forensics.add_commands(commands, common)
    return parser


def _run_mount(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    # -o key=value fills the matching --key option (mount(8) passes only -o).
    flags = apply_options(args, subcommand(parser, "mount"))
    check_privileges(
        allow_other=args.allow_other,
        read_all=args.read_all,
        unsafe_suid=args.unsafe_suid,
        unsafe_dev=args.unsafe_dev,
    )
    request = MountRequest(
        source=args.source,
        mountpoint=args.mountpoint,
        image=args.image,
        platform=parse_platform(args.platform) if args.platform else None,
        foreground=args.foreground,
        allow_other=args.allow_other,
        debug=args.debug,
        quiet=args.quiet,
        cache_dir=args.cache_dir or default_cache_dir(),
        log_file=args.log,
        extra_fuse_options=frozenset(flags),
        read_all=args.read_all,
        unsafe_suid=args.unsafe_suid,
        unsafe_dev=args.unsafe_dev,
        registry=registry_cli.registry_options(args, args.source),
        layers=args.layers,
        upto=args.upto,
        decoded_cache_bytes=args.decoded_cache << 20,
        readahead_kb=args.readahead,
        namespace=args.namespace,
        store_root=args.store_root,
        allow_modified=args.allow_modified,
        lazy=args.lazy,
        prefetch=args.prefetch,
    )
    mount(request)


def _run_umount(args: argparse.Namespace) -> None:
    if args.if_stale:
        umount_if_stale(args.mountpoint)
    else:
        umount(args.mountpoint, lazy=args.lazy)


def _run_mounts(args: argparse.Namespace) -> None:
    mounts = list_mounts()
    if args.json:
        print(json.dumps([dataclasses.asdict(mount) for mount in mounts], indent=2))
    elif mounts:
        print(format_table(mounts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    # mount(8) (through mount.fuse3) runs "imagefs SOURCE MOUNTPOINT -o OPTIONS".
    argv = implicit_mount(sys.argv[1:] if argv is None else argv, subcommands(parser))
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            _run_mount(args, parser)
        elif args.command == "mounts":
            _run_mounts(args)
        elif args.command == "pull":
            registry_cli.run_pull(args)
        elif args.command == "cache":
            registry_cli.run_cache(args)
        elif args.command in forensics.COMMANDS:
            forensics.run(args)
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
