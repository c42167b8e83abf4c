"""Mount lifecycle: prepare, mount, report readiness, serve, unmount.

``imagefs mount`` must return only once the mount is live, and must report
every error that happens before that (bad source, corrupt layer, busy mount
point) on its own stderr with a non-zero exit. So the process forks *first*,
before any thread exists (forking a process that runs decompression threads
is unsafe): the child does all the work and writes one status line into a
pipe, ``ok`` or ``error <message>``; the parent waits for that line and exits
accordingly. The child then detaches its stdio and serves until unmounted or
signalled. With ``--foreground`` there is no fork.

SIGTERM, SIGINT and SIGHUP end the FUSE main loop and unmount cleanly; an
unmount from outside (``imagefs umount``, ``fusermount3 -u``) ends it too.
Under systemd the lifecycle is reported with sd_notify (``imagefs.daemon.notify``:
status while loading, ``READY=1`` once mounted, ``STOPPING=1``), and each
mount leaves a record for ``imagefs mounts`` (``imagefs.daemon.mounttab``).
"""

from __future__ import annotations

import errno
import functools
import logging
import logging.handlers
import os
import signal
import stat
import subprocess
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from imagefs.cachedir import default_cache_dir, ensure_cache_dir
from imagefs.daemon.logsetup import stderr_handler
from imagefs.daemon.mounttab import forget, mount_at, remove_record, write_record
from imagefs.daemon.notify import Notifier, NotifyingProgress, StatusReporter, relay_status
from imagefs.daemon.operations import ImageOperations
from imagefs.errors import ImageFSError, MountError, UsageError
from imagefs.forensics.commands import load_for_mount
from imagefs.forensics.provenance import Provenance
from imagefs.forensics.verify import modified_paths, verify_image
from imagefs.image import Platform
from imagefs.layers.reader import set_decoded_cache_limit
from imagefs.progress import Progress
from imagefs.registry import RegistryOptions, is_registry_source
from imagefs.registry.config import LazyMode, PrefetchMode
from imagefs.sources import open_image
from imagefs.tree.loader import LoadedImage, load_image
from imagefs.tree.persisted import load_cached

log = logging.getLogger("imagefs")

# Read-only always; nosuid/nodev because the image may be hostile: a setuid
# binary or a device node inside it must not act as one on this host.
# Decoded layer data kept in memory by default: four open gzip readers
# (~20 MB each), or that many bytes of zstd frames.
DEFAULT_DECODED_CACHE_MB = 80

# FUSE mounts start with a 128 KiB readahead window, so a sequential read
# arrives as 128 KiB requests; with 1 MiB (the largest request libfuse 3
# negotiates, max_pages 256) imagefs served the bench's 1 GiB file at
# 2.7-3.0 GB/s instead of 1.3-1.5 GB/s: its cost is per request, not per byte.
DEFAULT_READAHEAD_KB = 1024

BASE_FUSE_OPTIONS = frozenset({"ro", "nosuid", "nodev", "default_permissions", "subtype=imagefs"})


@dataclass
class MountRequest:
    source: str
    mountpoint: Path
    image: str | None = None
    platform: Platform | None = None
    foreground: bool = False
    allow_other: bool = False
    debug: bool = False
    quiet: bool = False
    cache_dir: Path | None = None
    log_file: Path | None = None
    extra_fuse_options: frozenset[str] = field(default_factory=frozenset)
    # Mirrors, TLS, credentials (kept out of repr) for registry sources.
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    # Off by default, see README "Rootless use" and "Mount options":
    # read_all drops default_permissions (the mounting user reads everything),
    # unsafe_suid / unsafe_dev lift nosuid / nodev for a trusted image.
    read_all: bool = False
    unsafe_suid: bool = False
    unsafe_dev: bool = False
    # Investigation (imagefs.forensics.views): --layers serves every view of the image,
    # --upto N the file system as it stood after layer N.
    layers: bool = False
    upto: int | None = None
    # Bound on decoded gzip chunks / zstd frames kept in memory (--decoded-cache).
    decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_MB << 20
    # The mount's readahead window in KiB (--readahead); 0 keeps the kernel's.
    readahead_kb: int = DEFAULT_READAHEAD_KB
    # Host stores: containerd's namespace (--namespace), where the store is
    # (--store-root), and whether layers of an extracted store (containers-
    # storage:, docker-store:) changed on the host are served anyway
    # (--allow-modified; marked with user.imagefs.modified).
    namespace: str | None = None
    store_root: str | None = None
    allow_modified: bool = False
    # Registry images: layers with a TOC mounted lazily (--lazy auto|never),
    # and what is fetched in the background once live (--prefetch).
    lazy: LazyMode = LazyMode.AUTO
    prefetch: PrefetchMode = PrefetchMode.LANDMARK

    def fuse_options(self) -> set[str]:
        # fsname shows as the first column of /proc/mounts: keep the source
        # readable but free of the separators the kernel's option parser uses.
        fsname = "".join("_" if c in ", \t\n\\" else c for c in self.source)
        options = set(BASE_FUSE_OPTIONS) | {f"fsname={fsname}"} | set(self.extra_fuse_options)
        if self.allow_other:
            options.add("allow_other")
        if self.read_all:
            options.discard("default_permissions")
        if self.unsafe_suid:
            options.discard("nosuid")
            options.add("suid")  # libfuse mounts nosuid unless told "suid"
        if self.unsafe_dev:
            options.discard("nodev")
            options.add("dev")
        return options


def check_mountpoint(path: Path) -> None:
    """Refuse a missing, non-directory or already mounted mount point."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"mount point {path} is a stale FUSE mount; run 'imagefs umount {path}'"
            ) from None
        raise MountError(f"mount point {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"mount point {path} is already a mount point (busy)")


def _configure_logging(request: MountRequest) -> logging.Handler:
    """Log to stderr until detached; returns the stderr handler to swap later."""
    level = logging.DEBUG if request.debug else logging.INFO
    log.setLevel(level)
    log.propagate = False
    # A detaching mount command shows warnings and errors; --foreground (a
    # terminal, or journald under systemd) the whole log; see logsetup.
    handler = stderr_handler(foreground=request.foreground, debug=request.debug)
    log.addHandler(handler)
    if request.log_file is not None:
        file_handler = logging.FileHandler(request.log_file)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s imagefs[%(process)d] %(levelname)s: %(message)s")
        )
        log.addHandler(file_handler)
    return handler


def _detach_logging(stderr_handler: logging.Handler, request: MountRequest) -> None:
    """After detaching, log to syslog (when no log file was given)."""
    log.removeHandler(stderr_handler)
    if request.log_file is None and os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.setFormatter(logging.Formatter("imagefs[%(process)d]: %(levelname)s: %(message)s"))
        log.addHandler(syslog)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def _deferred_stop_signals() -> Iterator[list[int]]:
    """From the kernel mount until trio listens, remember stop signals.

    Dying of one in that window would leave a mount without a daemon (a stale
    mount); instead the serving loop sees it at once and unmounts.
    """
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _: received.append(signum)) for sig in STOP_SIGNALS
    }
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _serve_until_stopped(
    early_signals: list[int], after_init: Callable[[], None] | None = None
) -> bool:
    """Run the FUSE loop; True if a signal stopped it (so we must unmount).

    ``after_init`` runs in a thread once the kernel has the loop's answer to
    its INIT request (see _set_readahead).
    """
    stopped_by_signal = False

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal stopped_by_signal
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            task_status.started()
            if early_signals:
                log.info("received %s, unmounting", signal.Signals(early_signals[0]).name)
                stopped_by_signal = True
                pyfuse3.terminate()
                return
            async for signum in signals:
                log.info("received %s, unmounting", signal.Signals(signum).name)
                stopped_by_signal = True
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        if after_init is not None:
            nursery.start_soon(
                functools.partial(trio.to_thread.run_sync, after_init, abandon_on_cancel=True)
            )
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return stopped_by_signal


def _mark_modified(
    provenance: Provenance, loaded: LoadedImage, *, views: bool, progress: Progress
) -> None:
    """``--allow-modified``: find what the host changed, mark it ``user.imagefs.modified``.

    One more read of each rebuilt layer (the tamper check itself); a cached
    tree skipped the pass that found the changes, and nothing about them is
    cached, so they are looked for again on every such mount.
    """
    changes = modified_paths(verify_image(loaded.image, progress))
    if not changes:
        return
    prefixes = ("rootfs/", "layers/{layer}/") if views else ("",)
    marked = provenance.mark_modified(loaded.tree, changes, prefixes)
    count = sum(len(paths) for paths in changes.values())
    log.warning(
        "serving the host's bytes for %d path(s) changed on the host (--allow-modified); "
        "%d served file(s) carry user.imagefs.modified",
        count,
        marked,
    )


def serve(request: MountRequest, ready_fd: int | None) -> None:
    """Open, mount and serve the image; blocks until unmounted.

    ``ready_fd`` (daemon mode) receives ``ok`` once the mount is live; errors
    before that propagate to the caller, which reports them.
    """
    stderr_handler = _configure_logging(request)
    notifier = Notifier.from_environment()
    report_status = StatusReporter(notifier, ready_fd)
    with ExitStack() as stack:
        report_status(f"opening {request.source}")
        # Terminal progress lines, and a STATUS= line per step under systemd.
        progress = NotifyingProgress(report_status, enabled=not request.quiet)
        cache_dir = ensure_cache_dir(request.cache_dir) if request.cache_dir else None
        set_decoded_cache_limit(request.decoded_cache_bytes)
        if request.layers or request.upto is not None:
            loaded = load_for_mount(
                request.source,
                image=request.image,
                platform=request.platform,
                registry=request.registry,
                cache_dir=cache_dir,
                layers=request.layers,
                upto=request.upto,
                warn=log.warning,
                progress=progress,
                namespace=request.namespace,
                store_root=request.store_root,
                allow_modified=request.allow_modified,
            )
            image = loaded.image
        elif is_registry_source(request.source):
            # Network work happens here, in the daemon child, after the fork.
            from imagefs.registry.mounting import load_registry_image  # noqa: PLC0415 - requests

            image, loaded = load_registry_image(
                request.source,
                platform=request.platform,
                options=request.registry,
                cache_dir=cache_dir or ensure_cache_dir(default_cache_dir()),
                stack=stack,
                warn=log.warning,
                progress=progress,
                lazy=request.lazy,
                prefetch=request.prefetch,
            )
        else:
            image = open_image(
                request.source,
                image=request.image,
                platform=request.platform,
                namespace=request.namespace,
                store_root=request.store_root,
                allow_modified=request.allow_modified,
            )
            if cache_dir is not None:
                # The merged tree persists in the cache: built once, then mapped.
                loaded = load_cached(
                    image, cache_dir=cache_dir, warn=log.warning, progress=progress
                )
            else:
                loaded = load_image(image, cache_dir=None, warn=log.warning, progress=progress)
        stack.callback(loaded.close)
        provenance = Provenance(loaded.image, log.warning)
        if request.allow_modified:
            _mark_modified(provenance, loaded, views=request.layers, progress=progress)
        operations = ImageOperations(loaded.tree, loaded.content, provenance)
        check_mountpoint(request.mountpoint)
        # Resolved now: once mounted, resolving would stat our own root, which
        # this process cannot answer before its loop runs.
        target = os.path.realpath(request.mountpoint)
        early_signals = stack.enter_context(_deferred_stop_signals())
        try:
            pyfuse3.init(operations, str(request.mountpoint), request.fuse_options())
        except RuntimeError as exc:
            raise MountError(f"cannot mount on {request.mountpoint}: {exc}") from None
        unmount = True
        record: Path | None = None
        try:
            record = _record_mount(request.source, target, loaded, cache_dir)
            log.info(
                "mounted %s on %s (%d layers, %d inodes)",
                request.source,
                request.mountpoint,
                len(image.layers),
                loaded.tree.count,
            )
            if ready_fd is not None:
                # The parent relays readiness to systemd (it is the main pid).
                os.write(ready_fd, b"ok\n")
                os.close(ready_fd)
                _detach_logging(stderr_handler, request)
                _detach_stdio()
            else:
                notifier.ready(status=f"serving {request.source} on {target}")
            if loaded.on_live is not None:
                loaded.on_live()  # a lazy image's background prefetch
            readahead = (
                functools.partial(_set_readahead, target, request.readahead_kb)
                if request.readahead_kb
                else None
            )
            unmount = trio.run(_serve_until_stopped, early_signals, readahead)
        finally:
            notifier.stopping(status=f"unmounting {target}")
            pyfuse3.close(unmount=unmount)
            if record is not None:
                remove_record(record)
            log.info("unmounted %s", request.mountpoint)


def _set_readahead(target: str, kilobytes: int) -> None:
    """Set the mount's readahead window (its backing device's ``read_ahead_kb``).

    Runs in a thread of the serving daemon. The kernel lowers the window to
    what the INIT reply allows (libfuse answers with the 128 KiB it was
    offered), so this waits until INIT is done: a stat of the mount point
    returns only then, answered by our own loop. Only root may write the
    setting; a rootless mount keeps 128 KiB, which costs throughput, not
    correctness, so a failure is a debug line.
    """
    try:
        os.stat(target)
    except OSError:
        return  # unmounted already
    entry = mount_at(target)
    if entry is None:
        return
    path = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(path, "w") as handle:
            handle.write(f"{kilobytes}\n")
    except OSError as exc:
        log.debug("readahead left as the kernel set it (%s: %s)", path, exc.strerror)


def _record_mount(
    source: str, target: str, loaded: LoadedImage, cache_dir: Path | None
) -> Path | None:
    """Leave the record ``imagefs mounts`` reads; a failure only costs the pid column."""
    lazy: list[list[str | int]] = [[str(desc.digest), desc.size] for desc in loaded.lazy_layers]
    cache = str(cache_dir or default_cache_dir()) if lazy else ""
    try:
        return write_record(source, target, lazy_layers=lazy, cache_dir=cache)
    except (OSError, ValueError, IndexError) as exc:  # unwritable dir, odd mountinfo
        log.warning("cannot record this mount for 'imagefs mounts': %s", exc)
        return None


def _child(request: MountRequest, ready_fd: int) -> int:
    # A new session: the daemon must not die with the terminal that started it.
    os.setsid()
    try:
        serve(request, ready_fd)
    except ImageFSError as exc:
        if request.debug:
            traceback.print_exc()
        _report(ready_fd, str(exc))
        return 1
    except BaseException as exc:
        if request.debug:
            traceback.print_exc()
        _report(ready_fd, f"internal error: {exc!r} (run with --debug for details)")
        return 2
    return 0


def _report(ready_fd: int, message: str) -> None:
    try:
        os.write(ready_fd, f"error {message}\n".encode(errors="replace"))
    except OSError:
        pass  # the mount was already live and reported; the log has the rest


def mount(request: MountRequest) -> None:
    """Mount and return once the mount is live (or serve, with --foreground)."""
    check_mountpoint(request.mountpoint)
    if request.image and is_registry_source(request.source):
        raise UsageError("--image picks an image inside a tarball; a registry reference names one")
    if request.foreground:
        serve(request, None)
        return
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit status is checked by the parent
        os.close(read_fd)
        code = 1
        try:
            code = _child(request, write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    status = b""
    notifier = Notifier.from_environment()
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            status = relay_status(pipe, notifier)
    except KeyboardInterrupt:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        raise
    if status.startswith(b"ok"):
        # systemd listens to its main pid (us): hand the unit to the daemon.
        notifier.ready(main_pid=pid, status=f"serving {request.source} on {request.mountpoint}")
        return
    os.waitpid(pid, 0)
    message = status.decode(errors="replace").removeprefix("error ").strip()
    raise MountError(message or "the mount daemon exited before the mount was ready")


def _is_stale(path: Path) -> bool:
    """True if the FUSE daemon behind ``path`` is gone.

    A directory read always reaches the daemon, whereas ``stat`` may be
    answered from the kernel's attribute cache (our timeouts are long).
    """
    try:
        os.listdir(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def umount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount an imagefs mount, including a stale one whose daemon died."""
    entry = mount_at(os.path.realpath(mountpoint))
    if entry is None:
        raise MountError(f"{mountpoint} is not mounted")
    if not entry.fstype.startswith("fuse"):
        raise MountError(f"{mountpoint} is not a FUSE mount ({entry.fstype})")
    result = _fusermount(mountpoint, lazy)
    if result.returncode != 0 and not lazy and _is_stale(mountpoint):
        # A dead daemon leaves "Transport endpoint is not connected"; if the
        # normal unmount is refused, detach it lazily: nothing can be served.
        result = _fusermount(mountpoint, lazy=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        reason = lines[-1] if lines else "failed"
        if "busy" in reason:
            reason += " (a process uses it: close it, or detach with 'imagefs umount -z')"
        raise MountError(f"cannot unmount {mountpoint}: {reason}")
    forget(entry)  # the daemon removes its record itself, unless it was killed


def umount_if_stale(mountpoint: Path) -> bool:
    """Detach ``mountpoint`` only if it is an imagefs mount whose daemon is gone.

    For systemd's ``ExecStopPost=``: after a crash or a SIGKILL the mount must
    not stay behind, but a live mount (ours or another unit's) is left alone.
    Returns True if it unmounted something.
    """
    entry = mount_at(os.path.realpath(mountpoint))
    if entry is None or entry.fstype != "fuse.imagefs" or not _is_stale(mountpoint):
        return False
    umount(mountpoint, lazy=True)
    return True


def _fusermount(mountpoint: Path, lazy: bool) -> subprocess.CompletedProcess[str]:
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    return subprocess.run(command, capture_output=True, text=True, check=False)
