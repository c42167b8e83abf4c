"""Where imagefs keeps derived data, how a cache file is published, and how it is versioned.

Everything under the cache directory can be rebuilt from the images: layer
tar indexes, gzip checkpoints, zstd seek files, merged trees, and the
registry's blobs and tags. Three rules hold for every one of those files.

Publishing (:class:`AtomicFile`): a file appears at its name only whole.
It is written as ``.<name>.<random>.part`` beside its target (same file
system, so the rename is atomic), created ``O_CREAT | O_EXCL | O_NOFOLLOW``
(never through a symlink someone planted) with an explicit mode (``fchmod``,
so a loose umask cannot widen it), ``flock``-ed by its writer for its whole
life, then renamed into place. Two writers of the same file each rename a
whole file of their own; a reader sees the old file or a new one.

Sweeping (:func:`sweep_temporaries`): a temporary file that no live process
holds a lock on was left by one that died (and may be GBs); it is removed
when a writer first uses a directory and by ``imagefs cache prune``.

Versions (:class:`FormatVersion`, :data:`FORMATS`): every kind of cache file
has a version for its own encoding and names the versions of what its
content is derived from (a tree from the tar indexes and the merge rules, a
tar index from the scanner). A file's version tag, its own version plus
every version it derives from, is part of its name: a reader only ever opens
the current name, so a file written by other code is never read, only
rebuilt beside it (and removed by ``cache prune``). Files with a header (tar
indexes, trees) repeat the tag there as a guard. Bump a number below when
the thing it names changes; nothing else needs to be remembered.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from imagefs.errors import ImageFSError

SYSTEM_CACHE = Path("/var/cache/imagefs")


def default_cache_dir() -> Path:
    """``/var/cache/imagefs`` for root, else ``$XDG_CACHE_HOME/imagefs``."""
    if os.geteuid() == 0:
        return SYSTEM_CACHE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imagefs"


def ensure_cache_dir(path: Path) -> Path:
    # 0700: cached layer data may be private to the user who pulled it.
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        # A user mounting with someone else's cache_dir (or HOME) gets one line.
        raise ImageFSError(f"cache directory {path}: {exc.strerror or exc}") from exc
    return path


@contextmanager
def build_lock(path: Path, *, best_effort: bool = False) -> Iterator[None]:
    """Hold ``path``.lock while building the cache file ``path``.

    Concurrent mounts (a fleet starting at once) that need the same file
    build it once: the others wait here, then find it. ``flock`` is released
    when the descriptor closes, even if the holder crashes; a lock file that
    goes (``cache prune``) only costs a duplicate build, never a torn file
    (cache files are renamed into place whole). With ``best_effort``, a
    lock that cannot be made (a read-only cache) means building unlocked.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if not best_effort:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- publishing ----------------------------------------------------------------

TEMP_SUFFIX = ".part"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.part$")
# Temporary files of imagefs before the one publishing rule, which held no
# lock: removed only once clearly abandoned (a live writer writes every few
# milliseconds).
_LEGACY_TEMP_RE = re.compile(r"^\.(layerio-tmp-.*\.part|tag-.*\.part|.+\.\d+\.tmp)$")
_LEGACY_STALE_SECONDS = 3600

_swept: set[str] = set()
_swept_lock = threading.Lock()


class AtomicFile:
    """A cache file that appears at ``path`` only when complete (see the module docstring).

    Write through :attr:`file` (buffered) or :attr:`fd` (``pwrite``), then
    :meth:`commit` or :meth:`abort`; as a context manager, leaving the block
    normally commits and an exception aborts.

    ``durable``: fsync the file before the rename and the directory after.
    Only for files that are trusted without a checksum when read back:
    registry layer blobs, which a later mount serves by their identity
    (inode, size, times) without hashing them again, so a file the kernel
    had not written out before a crash must never appear under its name.
    Every other cache file carries checksums that are checked on every use;
    a torn one is rebuilt, which is cheaper than syncing hundreds of MB on
    every first mount.
    """

    def __init__(self, path: str | Path, *, mode: int = 0o600, durable: bool = False) -> None:
        self.path = str(path)
        self.durable = durable
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        sweep_once(directory)
        name = os.path.basename(self.path)
        self.temporary = os.path.join(directory, f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.temporary, flags, mode)
        try:
            os.fchmod(self.fd, mode)  # the umask only ever narrows os.open's mode
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # alive: the sweep leaves it alone
        except BaseException:
            self._discard()
            raise
        self._file: BinaryIO | None = None
        self.done = False

    @property
    def file(self) -> BinaryIO:
        if self._file is None:
            self._file = os.fdopen(self.fd, "wb", closefd=False)
        return self._file

    def commit(self) -> None:
        """Flush, (fsync,) rename into place; the lock goes with the descriptor after."""
        if self._file is not None:
            self._file.flush()
        if self.durable:
            os.fsync(self.fd)
        os.replace(self.temporary, self.path)
        self.done = True
        if self.durable:
            directory = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)
        self._close()

    def abort(self) -> None:
        """Remove the temporary file (nothing appears at ``path``)."""
        if not self.done:
            self.done = True
            self._discard()

    def _discard(self) -> None:
        try:
            os.unlink(self.temporary)
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # flushing what was buffered failed (disk full): it goes anyway
            self._file = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def write_atomically(
    path: str | Path, data: bytes, *, mode: int = 0o600, durable: bool = False
) -> None:
    """Replace ``path`` by a file holding ``data`` (see :class:`AtomicFile`)."""
    with AtomicFile(path, mode=mode, durable=durable) as out:
        out.file.write(data)


def sweep_temporaries(directory: str | Path) -> tuple[int, int]:
    """Remove temporary files no live writer holds; ``(files, bytes)`` removed."""
    now = time.time()
    files = size = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0, 0
    for name in names:
        current = _TEMP_RE.match(name) is not None
        if not current and not _LEGACY_TEMP_RE.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone already, or not a file we may touch
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            if not current and now - info.st_mtime < _LEGACY_STALE_SECONDS:
                continue
            named = os.lstat(path)
            if (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino):
                os.unlink(path)
                files, size = files + 1, size + info.st_size
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.ENOENT):
                raise
        finally:
            os.close(fd)
    return files, size


def sweep_once(directory: str) -> None:
    """:func:`sweep_temporaries` the first time this process writes into ``directory``."""
    with _swept_lock:
        if directory in _swept:
            return
        _swept.add(directory)
    try:
        sweep_temporaries(directory)
    except OSError:
        pass  # only housekeeping


# -- versions ------------------------------------------------------------------


@dataclass(eq=False)
class FormatVersion:
    """The version of one kind of cache file's content (see the module docstring).

    ``number`` is this encoding's (or rule set's) own version;
    ``derives_from`` the versions of what the content is computed from.
    """

    name: str
    number: int
    derives_from: tuple[FormatVersion, ...] = field(default=())

    def _all(self) -> dict[str, int]:
        found = {self.name: self.number}
        for source in self.derives_from:
            found.update(source._all())
        return found

    @property
    def tag(self) -> str:
        """``tarindex2-scan2``: this version, then all it derives from, by name."""
        versions = self._all()
        own = versions.pop(self.name)
        return "-".join([f"{self.name}{own}", *(f"{n}{v}" for n, v in sorted(versions.items()))])


# What the tar scanner reports for the same tar bytes (imagefs.layers.tarscan).
# 2: symlinks report mode 0777, as lstat(2) does, not the header's.
SCANNER = FormatVersion("scan", 2)
# What an eStargz / zstd:chunked TOC is read as (imagefs.layers.toc.jsontoc).
TOC_PARSER = FormatVersion("tocparse", 1)
# The OCI overlay rules: which nodes a set of layers makes (imagefs.tree.overlay).
# 2: one secure-join resolver (imagefs.tree.resolve); past 40 symlink hops the
# first link of the path is replaced, not the last one reached.
# 3: eStargz bookkeeping entries (stargz.index.json, landmarks) left out.
MERGE = FormatVersion("merge", 3)
# A layer's cached entries (imagefs.layers.index): the scanner's output, encoded.
# 2: the bookkeeping flag of each entry.
TAR_INDEX = FormatVersion("tarindex", 2, (SCANNER,))
# The same, for a layer indexed from its TOC (data offsets in the TOC's space).
TOC_INDEX = FormatVersion("tocindex", 1, (TOC_PARSER,))
# A TOC layer's chunk table (imagefs.layers.toc.table).
TOC_CHUNKS = FormatVersion("tocchunks", 1, (TOC_PARSER,))
# A lazy registry layer's footer and compressed TOC, as fetched with Range
# requests (imagefs.layers.toc.lazy): checked against the layer's annotated
# digests again at every use, so a later mount (also --offline) needs no traffic.
TOC_FETCHED = FormatVersion("tocfetched", 1)
# A lazy registry layer's verified chunks, as compressed blob bytes, one file
# per gzip member or zstd frame (imagefs.layers.toc.chunkstore).
LAZY_CHUNKS = FormatVersion("lazychunks", 1)
# gzip checkpoints exported from rapidgzip (imagefs.layers.gzip).
GZIP_INDEX = FormatVersion("gzidx", 1)
# A zstd layer's seek table and re-encoded frames (imagefs.layers.zstd).
ZSTD_SEEK = FormatVersion("zseek", 1)
# The merged tree of an image (imagefs.tree.packed), made from its layers'
# entries (a tar scan or a TOC) by the merge rules.
TREE = FormatVersion("tree", 1, (TAR_INDEX, TOC_INDEX, MERGE))

# Every kind of cache file, for ``cache prune``: a file whose tag is not one
# of these was written by other code and is never read.
FORMATS = (TAR_INDEX, TOC_INDEX, TOC_CHUNKS, TOC_FETCHED, LAZY_CHUNKS, GZIP_INDEX, ZSTD_SEEK, TREE)
