"""The registry part of the command line: options shared by ``mount`` and ``pull``,
and the ``pull`` and ``cache`` commands.

Secrets are never taken from the command line (it shows in ``ps``): a
password comes from stdin (``--password-stdin``) or an auth file.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Callable
from pathlib import Path

from imagefs.cachedir import default_cache_dir, ensure_cache_dir
from imagefs.errors import UsageError
from imagefs.progress import human_bytes
from imagefs.reference import parse_reference
from imagefs.registry import is_registry_source
from imagefs.registry.auth import Credentials
from imagefs.registry.blobstore import BlobStore
from imagefs.registry.cache import list_cache, prune_cache
from imagefs.registry.config import LazyMode, PrefetchMode, RegistryOptions
from imagefs.sources import parse_platform


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry sources")
    group.add_argument(
        "--offline", action="store_true", help="use only the cache (a tag: its last digest)"
    )
    group.add_argument(
        "--registry-mirror",
        action="append",
        default=[],
        metavar="URL",
        help="Docker Hub mirror, tried before the upstream (repeatable)",
    )
    group.add_argument(
        "--insecure",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="allow plain HTTP and unverified TLS for this registry (repeatable)",
    )
    group.add_argument("--ca-bundle", type=Path, metavar="FILE", help="CA certificates (PEM)")
    group.add_argument(
        "--auth-file", type=Path, metavar="FILE", help="credentials in Docker config.json format"
    )
    group.add_argument("--username", metavar="USER", help="user name for the image's registry")
    group.add_argument(
        "--password-stdin", action="store_true", help="read the password (or token) from stdin"
    )
    group.add_argument(
        "--registries-config", type=Path, metavar="FILE", help="mirrors/insecure config (JSON)"
    )


def _choice(kind: type[enum.Enum]) -> Callable[[str], enum.Enum]:
    """An argparse type for one of ``kind``'s values (so ``-o lazy=...`` is checked too)."""
    names = ", ".join(str(member.value) for member in kind)

    def parse(text: str) -> enum.Enum:
        try:
            return kind(text.lower())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {names}") from None

    return parse


def add_lazy_arguments(parser: argparse.ArgumentParser) -> None:
    """``--lazy`` and ``--prefetch`` (``imagefs mount`` only: a pull fetches everything)."""
    group = parser.add_argument_group("lazy registry mounts (eStargz, zstd:chunked)")
    group.add_argument(
        "--lazy",
        type=_choice(LazyMode),
        default=LazyMode.AUTO,
        metavar="auto|never",
        help="auto: mount layers with a TOC from their TOCs, fetching file data as it is "
        "read (default); never: download every layer first",
    )
    group.add_argument(
        "--prefetch",
        type=_choice(PrefetchMode),
        default=PrefetchMode.LANDMARK,
        metavar="landmark|all|none",
        help="what a lazy mount fetches in the background once live: the eStargz "
        "prioritised files (default), those and then every lazy layer whole, or nothing",
    )


def registry_options(args: argparse.Namespace, source: str) -> RegistryOptions:
    """RegistryOptions from the parsed arguments (reads the password from stdin if asked).

    A registry reference is parsed here, before the mount forks, so a malformed
    one is a usage error (exit 2) like any other bad argument.
    """
    if is_registry_source(source):
        parse_reference(source)
    if args.password_stdin and not args.username:
        raise UsageError("--password-stdin needs --username")
    if args.username and not args.password_stdin:
        raise UsageError(
            "--username needs --password-stdin (passwords never go on the command line)"
        )
    credentials = None
    credentials_host = None
    if args.username:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("--password-stdin: no password on stdin")
        credentials = Credentials(args.username, password)
        credentials_host = parse_reference(source).domain

    return RegistryOptions(
        registry_mirrors=tuple(args.registry_mirror),
        insecure=frozenset(args.insecure),
        ca_bundle=args.ca_bundle,
        auth_file=args.auth_file,
        credentials=credentials,
        credentials_host=credentials_host,
        offline=args.offline,
        config_file=args.registries_config,
    )


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: argparse.ArgumentParser) -> None:  # fmt: skip
    pull_parser = commands.add_parser(
        "pull",
        parents=[common],
        help="download a registry image into the cache, without mounting",
        description="Fill the cache with REFERENCE's manifest, config and layers.",
    )
    pull_parser.add_argument("reference", metavar="REFERENCE", help="[docker://]NAME[:TAG|@DIGEST]")
    pull_parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    pull_parser.add_argument("--cache-dir", type=Path, help=f"default: {default_cache_dir()}")
    add_registry_arguments(pull_parser)

    cache = commands.add_parser("cache", parents=[common], help="list or prune the registry cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = cache_commands.add_parser("ls", parents=[common], help="list cached images")
    prune = cache_commands.add_parser(
        "prune", parents=[common], help="remove blobs no cached tag uses"
    )
    prune.add_argument("--all", action="store_true", help="empty the cache, tags included")
    for sub in (ls, prune):
        sub.add_argument("--cache-dir", type=Path, help=f"default: {default_cache_dir()}")


def run_pull(args: argparse.Namespace) -> None:
    from imagefs.registry.pull import DownloadProgress, pull  # noqa: PLC0415 - requests only when pulling

    options = registry_options(args, args.reference)
    cache_dir = ensure_cache_dir(args.cache_dir or default_cache_dir())
    image = pull(
        args.reference,
        platform=parse_platform(args.platform) if args.platform else None,
        options=options,
        cache_dir=cache_dir,
        progress=DownloadProgress(enabled=not args.quiet),
    )
    print(f"{parse_reference(args.reference)}: {image.manifest_digest}")


def run_cache(args: argparse.Namespace) -> None:
    store = BlobStore(args.cache_dir or default_cache_dir())
    if args.cache_command == "ls":
        images = list_cache(store)
        for image in images:
            entry = image.entry
            state = "" if image.complete else "  (incomplete)"
            print(
                f"{entry.repository}:{entry.tag}  {entry.digest}  {human_bytes(image.size)}{state}"
            )
        total = sum(store.blob_digests().values())
        print(f"{len(images)} tags, {human_bytes(total)} of blobs in {store.root}")
        return
    result = prune_cache(store, everything=args.all)
    print(f"removed {result.files} files, {human_bytes(result.bytes)}")
