"""The incident-response commands: ``inspect``, ``which``, ``diff``, ``images``, and the
loading behind ``mount --layers`` / ``mount --upto``.

None of them mounts anything: they read the layers' tar headers in place (and,
for ``diff``, file data where hashes are needed) and print a report, as text
or ``--json``. Every source kind works: local ones are opened in place,
registry references are pulled into the cache first (as ``imagefs pull``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path

from imagefs.cachedir import default_cache_dir, ensure_cache_dir
from imagefs.errors import LayerModifiedError, SourceNotFoundError, UsageError
from imagefs.forensics.diff import (
    NEW,
    OLD,
    Side,
    diff_json,
    diff_sides,
    difference_line,
    layer_keys,
    states_builder,
)
from imagefs.forensics.inspect import inspect_image, report_json, report_text
from imagefs.forensics.provenance import trace_json, trace_path, trace_text
from imagefs.forensics.verify import report_json as verify_json
from imagefs.forensics.verify import report_text as verify_text
from imagefs.forensics.verify import verify_image
from imagefs.forensics.views import build_layer_views, upto_image
from imagefs.image import Image, Platform
from imagefs.progress import Progress, human_bytes
from imagefs.registry import RegistryOptions, is_registry_source
from imagefs.registry.cliargs import add_registry_arguments, registry_options
from imagefs.sources import is_store_source, list_store_images, open_image, parse_platform
from imagefs.sources.containerd import DEFAULT_ROOT as CONTAINERD_ROOT
from imagefs.tree.loader import LoadedImage, load_image, scan_layer
from imagefs.tree.persisted import load_cached

COMMANDS = ("inspect", "which", "diff", "images", "verify")


def _warn(message: str) -> None:
    print(f"imagefs: warning: {message}", file=sys.stderr)


def open_any_image(
    source: str,
    *,
    image: str | None = None,
    platform: Platform | None = None,
    registry: RegistryOptions | None = None,
    cache_dir: Path | None = None,
    namespace: str | None = None,
    store_root: str | None = None,
    allow_modified: bool = False,
) -> Image:
    """Resolve SOURCE: a local image in place, a registry one pulled into the cache."""
    if is_registry_source(source):
        if image is not None:
            raise UsageError(f"{source}: --image selects within a tar, not a registry reference")
        from imagefs.registry.pull import pull  # noqa: PLC0415 - requests only for registries

        # pull() returns once every blob is complete in the cache, as plain
        # cache-file ranges.
        return pull(
            source,
            platform=platform,
            options=registry or RegistryOptions(),
            cache_dir=ensure_cache_dir(cache_dir or default_cache_dir()),
        )
    return open_image(
        source,
        image=image,
        platform=platform,
        namespace=namespace,
        store_root=store_root,
        allow_modified=allow_modified,
    )


def load_for_mount(
    source: str,
    *,
    image: str | None,
    platform: Platform | None,
    registry: RegistryOptions,
    cache_dir: Path | None,
    layers: bool,
    upto: int | None,
    warn: Callable[[str], None],
    progress: Progress,
    namespace: str | None = None,
    store_root: str | None = None,
    allow_modified: bool = False,
) -> LoadedImage:
    """The tree ``mount --layers`` and/or ``--upto N`` serves (blocking).

    ``--upto`` alone is an ordinary image with fewer layers, so its merged
    tree persists in the cache like any other. The ``--layers`` tree is built
    in this process each time and not persisted: it is for an investigation,
    not for a mount that lives for weeks.
    """
    resolved = open_any_image(
        source,
        image=image,
        platform=platform,
        registry=registry,
        cache_dir=cache_dir,
        namespace=namespace,
        store_root=store_root,
        allow_modified=allow_modified,
    )
    if upto is not None:
        resolved = upto_image(resolved, upto)
    if layers:
        return load_image(
            resolved, cache_dir=cache_dir, warn=warn, progress=progress, build=build_layer_views
        )
    if cache_dir is not None:
        return load_cached(resolved, cache_dir=cache_dir, warn=warn, progress=progress)
    return load_image(resolved, cache_dir=None, warn=warn, progress=progress)


# -- command line ------------------------------------------------------------------------------


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``inspect``, ``which`` and ``diff`` (see README, "Incident response")."""
    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="show an image's config, history and layers, without mounting",
        description="Show SOURCE's digest, platform, config and history, each layer with "
        "its digest, sizes, entry and whiteout counts.",
    )
    inspect.add_argument("source", metavar="SOURCE")
    which = commands.add_parser(
        "which",
        parents=[common],
        help="which layer put PATH there, and which layers touched it before",
        description="Tell which layer of SOURCE provides PATH (as the user.imagefs.* "
        "xattrs of a mount do), and every layer that added, replaced or deleted it.",
    )
    which.add_argument("source", metavar="SOURCE")
    which.add_argument("path", metavar="PATH", help="a path inside the image (/etc/passwd)")
    diff = commands.add_parser(
        "diff",
        parents=[common],
        help="list what changed between two images, or two layers of one",
        description="List added (A), removed (D) and changed (M) paths: type, mode, owner, "
        "size, sha256, symlink target, device numbers, xattrs (not times). "
        "'diff OLD NEW' compares two images; 'diff SOURCE --layer N' shows what layer N "
        "changed; 'diff SOURCE --layers N M' compares the file system after layer N with "
        "the one after layer M.",
    )
    diff.add_argument("sources", metavar="SOURCE", nargs="+", help="OLD NEW, or one SOURCE")
    points = diff.add_mutually_exclusive_group()
    points.add_argument(
        "--layer", type=int, metavar="N", help="what layer N changed (after N-1 vs after N)"
    )
    points.add_argument(
        "--layers", type=int, nargs=2, metavar=("N", "M"), help="after layer N vs after layer M"
    )
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="check that every layer is exactly the image's (host stores: the tamper check)",
        description="Rebuild each layer of SOURCE and check it against its digest. For a host "
        "store (containers-storage:, docker-store:) each layer is rebuilt from its tar-split "
        "record and its extracted directory, and every path changed, added or removed on the "
        "host is listed. Exits 0 when every layer matches, 1 otherwise.",
    )
    verify.add_argument("source", metavar="SOURCE")
    for parser in (inspect, which, diff, verify):
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument(
            "--image", metavar="NAME:TAG", help="image to use from a multi-image tar"
        )
        parser.add_argument(
            "--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pick from an index"
        )
        parser.add_argument(
            "--cache-dir", type=Path, help=f"cache directory (default: {default_cache_dir()})"
        )
        add_registry_arguments(parser)
        add_store_arguments(parser)
    images = commands.add_parser(
        "images",
        parents=[common],
        help="list the images in this host's engine stores (containerd, podman, Docker)",
        description="List the images found in the host stores present (or the one at "
        "--store-root): store, namespace, name, digest and size. Read offline: no daemon "
        "is asked, nothing in the store is written or locked.",
    )
    images.add_argument("--json", action="store_true", help="machine-readable output")
    images.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="platform whose size to sum for indexes"
    )
    add_store_arguments(images)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """``--namespace`` and ``--store-root``, for host store sources."""
    group = parser.add_argument_group(
        "host store sources (containerd:REF, containers-storage:REF, docker-store:REF)"
    )
    group.add_argument(
        "--namespace", metavar="NS", help="containerd namespace to search (default: every one)"
    )
    group.add_argument(
        "--store-root",
        metavar="DIR",
        help=f"the store's root directory (default: {CONTAINERD_ROOT} for containerd:, "
        "/var/lib/containers/storage for containers-storage: as root, else "
        "~/.local/share/containers/storage, /var/lib/docker for docker-store:)",
    )


def run(args: argparse.Namespace) -> None:
    commands = {
        "inspect": _run_inspect,
        "which": _run_which,
        "diff": _run_diff,
        "images": _run_images,
        "verify": _run_verify,
    }
    commands[args.command](args)


def _emit(lines: Iterable[str]) -> None:
    # Paths are bytes in the image: write undecodable ones back as they were.
    out = sys.stdout.buffer
    for line in lines:
        out.write(line.encode("utf-8", "surrogateescape") + b"\n")
    out.flush()


class _Resolver:
    """Opens SOURCE arguments with the shared options (one password prompt at most)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.platform = parse_platform(args.platform) if args.platform else None
        self._registry: RegistryOptions | None = None

    def open(self, source: str) -> Image:
        registry = None
        if is_registry_source(source):
            if self._registry is None:
                self._registry = registry_options(self.args, source)
            registry = self._registry
        # --namespace and --store-root are for the host-store SOURCEs among
        # several (diff containerd:app oci:./baseline).
        in_store = is_store_source(source)
        return open_any_image(
            source,
            image=self.args.image,
            platform=self.platform,
            registry=registry,
            cache_dir=self.args.cache_dir,
            namespace=self.args.namespace if in_store else None,
            store_root=self.args.store_root if in_store else None,
        )


def _run_verify(args: argparse.Namespace) -> None:
    image = _Resolver(args).open(args.source)
    reports = verify_image(image, progress=Progress(enabled=not args.quiet))
    _emit([verify_json(image, reports)] if args.json else verify_text(image, reports))
    bad = [report for report in reports if not report.ok]
    if bad:
        # After the report: the exit status says it too (1, as any error).
        raise LayerModifiedError(
            f"{args.source}: {len(bad)} of {len(reports)} layers differ from the image"
        )


def _run_inspect(args: argparse.Namespace) -> None:
    image = _Resolver(args).open(args.source)
    report = inspect_image(image, warn=_warn, progress=Progress(enabled=not args.quiet))
    _emit([report_json(report)] if args.json else report_text(report))


def _run_which(args: argparse.Namespace) -> None:
    image = _Resolver(args).open(args.source)
    progress = Progress(enabled=not args.quiet)
    count = len(image.layers)
    entries = [
        scan_layer(layer, index, count, warn=_warn, progress=progress)
        for index, layer in enumerate(image.layers)
    ]
    trace = trace_path(image, entries, args.path)
    if trace.node is None and not trace.events:
        raise SourceNotFoundError(f"/{trace.path}: no layer of {args.source} has this path")
    if args.json:
        _emit([json.dumps(trace_json(trace), indent=2)])
    else:
        _emit(trace_text(trace))


def _check_layer(image: Image, index: int, what: str) -> int:
    count = len(image.layers)
    if not 0 <= index < count:
        raise UsageError(f"{what} {index}: {image.source} has {count} layers (0 to {count - 1})")
    return index


def _run_diff(args: argparse.Namespace) -> None:
    resolver = _Resolver(args)
    progress = Progress(enabled=not args.quiet)
    cache_dir = ensure_cache_dir(args.cache_dir or default_cache_dir())
    single = args.layer is not None or args.layers is not None
    if single and len(args.sources) != 1:
        raise UsageError("--layer and --layers compare layers of one SOURCE; give only one")
    if not single and len(args.sources) != 2:
        raise UsageError("diff needs OLD and NEW images, or one SOURCE with --layer/--layers")
    if single:
        image = resolver.open(args.sources[0])
        if args.layer is not None:
            new = _check_layer(image, args.layer, "--layer")
            old = new - 1
        else:
            old = _check_layer(image, args.layers[0], "--layers")
            new = _check_layer(image, args.layers[1], "--layers")
        loaded = load_image(
            upto_image(image, max(old, new)),
            cache_dir=cache_dir,
            warn=_warn,
            progress=progress,
            build=states_builder(old, new),
        )
        with closing(loaded):
            keys = layer_keys(loaded.image)
            sides = (
                Side(_state_label(image, old), loaded.tree, loaded.content, keys, OLD),
                Side(_state_label(image, new), loaded.tree, loaded.content, keys, NEW),
            )
            _print_diff(args, *sides)
        return
    first = resolver.open(args.sources[0])
    second = resolver.open(args.sources[1])
    with closing(load_cached(first, cache_dir=cache_dir, warn=_warn, progress=progress)) as a:
        b = load_cached(second, cache_dir=cache_dir, warn=_warn, progress=progress)
        with closing(b):
            _print_diff(
                args,
                Side(args.sources[0], a.tree, a.content, layer_keys(a.image)),
                Side(args.sources[1], b.tree, b.content, layer_keys(b.image)),
            )


def _state_label(image: Image, index: int) -> str:
    if index < 0:
        return f"{image.source} before layer 0 (empty)"
    return f"{image.source} after layer {index} ({image.layers[index].descriptor.digest})"


def _print_diff(args: argparse.Namespace, old: Side, new: Side) -> None:
    differences = list(diff_sides(old, new))
    if args.json:
        _emit([diff_json(old.label, new.label, differences)])
        return
    _emit([f"--- {old.label}", f"+++ {new.label}", *map(difference_line, differences)])


def _run_images(args: argparse.Namespace) -> None:
    found = list_store_images(
        store_root=args.store_root,
        namespace=args.namespace,
        platform=parse_platform(args.platform) if args.platform else None,
    )
    if args.json:
        _emit([json.dumps([dataclasses.asdict(image) for image in found], indent=2)])
        return
    table = [("STORE", "NAMESPACE", "NAME", "DIGEST", "SIZE")]
    for image in found:
        size = "-" if image.size is None else human_bytes(image.size)
        table.append((image.store, image.namespace, image.name, image.digest, size))
    widths = [max(len(row[column]) for row in table) for column in range(4)]
    _emit(
        "  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True)).rstrip()
        for row in table
    )
