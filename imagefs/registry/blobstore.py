"""A content-addressed cache of registry blobs (manifests, configs, layers) and tags.

Layout under the cache directory (the same one :mod:`imagefs.layers.reader` keeps
its gzip indexes and zstd seek files in)::

    blobs/sha256/<hex>                 a blob, named by its digest, complete and verified
    blobs/sha256/.<hex>.<random>.part  a download in progress, flock()ed by its writer
    refs/<registry>/<repo>/_tags/<tag> the manifest digest the tag last resolved to

A cached layer is a plain file, so it is served as ``BlobRange(path, 0, size)``
and nothing downstream knows it came from a registry.

Concurrency: every writer has its own temporary file
(:class:`imagefs.cachedir.AtomicFile`) and renames it into place only once
size and digest are verified, so a reader sees a whole, correct blob or
none. Two mounts downloading the same blob both succeed; the second rename
replaces an identical file, and a reader holding the first keeps its inode.
``prune`` skips temporary files whose writer still holds the lock. ``_tags``
cannot clash with a repository path component: those start with ``[a-z0-9]``
(distribution reference grammar).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from imagefs.cachedir import FORMATS, AtomicFile, sweep_temporaries, write_atomically
from imagefs.digest import ALGORITHMS, Digest, InvalidDigestError
from imagefs.errors import BlobError, DigestMismatchError, ImageFSError
from imagefs.tree.packed import tree_layers

log = logging.getLogger(__name__)

_TAGS = "_tags"
# A layer's cache file (layers.plumbing.cache_path), or its build lock.
_LAYER_FILE_RE = re.compile(r"^(sha256|sha512)-([0-9a-f]+)\.(.+?)(\.lock)?$")


@dataclass(frozen=True, slots=True)
class TagEntry:
    repository: str  # registry/path, e.g. docker.io/library/alpine
    tag: str
    digest: Digest


@dataclass(frozen=True, slots=True)
class PruneResult:
    files: int
    bytes: int


class BlobStore:
    """The cache directory's registry part. Every method may block on disk I/O."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.refs = root / "refs"
        # Where downloads were written before they moved beside their blobs;
        # only pruned now.
        self._legacy_tmp = root / "tmp"

    # -- blobs -----------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.encoded

    def size_of(self, digest: Digest) -> int | None:
        """The cached blob's size, or None when it is not cached."""
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def has(self, digest: Digest, size: int | None = None) -> bool:
        cached = self.size_of(digest)
        return cached is not None and (size is None or cached == size)

    def read(self, digest: Digest) -> bytes | None:
        """A small cached blob (manifest, config), re-verified; None if absent or corrupt.

        A corrupt file (disk error, someone editing the cache) is removed, so
        the caller fetches the blob again instead of failing forever.
        """
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            digest.verify(data, where=f"cached blob {path}", over=f"the file ({len(data)} bytes)")
        except DigestMismatchError as exc:
            log.warning("%s; removing it", exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def put(self, digest: Digest, data: bytes) -> Path:
        """Store ``data`` under ``digest`` (DigestMismatchError if it is not its content)."""
        digest.verify(data, where=f"blob {digest}", over=f"the blob ({len(data)} bytes)")
        download = self.begin(digest, len(data))
        try:
            download.write(data)
            download.commit()
        finally:
            download.close()
        return self.blob_path(digest)

    def begin(self, digest: Digest, size: int) -> BlobDownload:
        """Start writing a blob; see :class:`BlobDownload`."""
        return BlobDownload(self, digest, size)

    # -- tags ------------------------------------------------------------------

    def _tag_path(self, repository: str, tag: str) -> Path:
        return self.refs / repository / _TAGS / tag

    def tag(self, repository: str, tag: str) -> Digest | None:
        """The digest ``repository:tag`` resolved to when last seen online."""
        try:
            text = self._tag_path(repository, tag).read_text(encoding="ascii").strip()
            return Digest(text)
        except (FileNotFoundError, UnicodeDecodeError, InvalidDigestError):
            return None

    def set_tag(self, repository: str, tag: str, digest: Digest) -> None:
        # Not durable: a tag file lost in a crash only means asking the
        # registry again; a torn one does not parse as a digest.
        write_atomically(self._tag_path(repository, tag), f"{digest}\n".encode("ascii"))

    def tags(self) -> list[TagEntry]:
        entries: list[TagEntry] = []
        if not self.refs.is_dir():
            return entries
        for tags_dir in sorted(self.refs.rglob(_TAGS)):
            repository = str(tags_dir.parent.relative_to(self.refs))
            for tag_file in sorted(tags_dir.iterdir()):
                if tag_file.name.startswith("."):
                    continue
                digest = self.tag(repository, tag_file.name)
                if digest is not None:
                    entries.append(TagEntry(repository, tag_file.name, digest))
        return entries

    def remove_tag(self, repository: str, tag: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._tag_path(repository, tag).unlink()

    # -- listing and pruning ---------------------------------------------------

    def blob_digests(self) -> dict[Digest, int]:
        """Every complete cached blob: digest -> size (files not named by a digest are skipped)."""
        found: dict[Digest, int] = {}
        for algorithm in ALGORITHMS:
            directory = self.blobs / algorithm
            if not directory.is_dir():
                continue
            for entry in os.scandir(directory):
                try:
                    digest = Digest(f"{algorithm}:{entry.name}")
                except InvalidDigestError:
                    continue  # a temporary file, or not ours
                if entry.is_file(follow_symlinks=False):
                    found[digest] = entry.stat().st_size
        return found

    def prune(self, keep: set[Digest]) -> PruneResult:
        """Remove blobs not in ``keep``, their layer cache files and merged
        trees, and dead downloads.

        A download in progress is kept (its writer holds the lock). A mount
        still serving a removed blob keeps reading its open inode.
        """
        files = size = 0
        for digest, blob_size in self.blob_digests().items():
            if digest in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
                files, size = files + 1, size + blob_size
        # Layer cache files ("<alg>-<hex>.<version tag>", layers.plumbing.cache_path)
        # of layers no longer kept, or of a version this imagefs never reads.
        current = {version.tag for version in FORMATS}
        if self.root.is_dir():
            for entry in os.scandir(self.root):
                m = _LAYER_FILE_RE.match(entry.name)
                if m is None or not entry.is_file(follow_symlinks=False):
                    continue
                owner = f"{m.group(1)}:{m.group(2)}"
                tag = m.group(3).rpartition(".")[2]  # after any key (plumbing.cache_path)
                if owner in keep and tag in current:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    entry_size = entry.stat().st_size
                    os.unlink(entry.path)
                    files, size = files + 1, size + entry_size
        # Temporary files no live writer holds, anywhere in the cache.
        for directory, _, _ in os.walk(self.root):
            swept, swept_size = sweep_temporaries(directory)
            files, size = files + swept, size + swept_size
        if self._legacy_tmp.is_dir():
            for entry in os.scandir(self._legacy_tmp):
                removed = _remove_if_unlocked(entry.path)
                if removed is not None:
                    files, size = files + 1, size + removed
        # A lazy layer's verified chunks (layers.toc.chunkstore): a directory per
        # layer, "<alg>-<hex>.<version tag>", gone with its layer.
        chunks = self.root / "chunks"
        if chunks.is_dir():
            for entry in os.scandir(chunks):
                m = _LAYER_FILE_RE.match(entry.name)
                if m is None or not entry.is_dir(follow_symlinks=False):
                    continue
                if f"{m.group(1)}:{m.group(2)}" in keep and m.group(3) in current:
                    continue
                removed, removed_size = _remove_tree(entry.path)
                files, size = files + removed, size + removed_size
        # Merged trees (tree.persisted.tree_path) of images with a layer no longer
        # kept, or that cannot be read: derived data, rebuilt on the next
        # mount. A mount serving one keeps its mapping of the removed file.
        # Lock files stay: a build may hold one.
        trees = self.root / "trees"
        if trees.is_dir():
            for entry in os.scandir(trees):
                if not entry.name.endswith(".tree") or not entry.is_file():
                    continue
                layers = tree_layers(Path(entry.path))
                if layers is not None and keep.issuperset(layers):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    entry_size = entry.stat().st_size
                    os.unlink(entry.path)
                    files, size = files + 1, size + entry_size
        return PruneResult(files, size)


def _remove_tree(path: str) -> tuple[int, int]:
    """Remove a directory of plain files (a chunk store); ``(files, bytes)`` removed."""
    files = size = 0
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    entry_size = entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                    files, size = files + 1, size + entry_size
    with contextlib.suppress(OSError):
        os.rmdir(path)
    return files, size


def _remove_if_unlocked(path: str) -> int | None:
    """Remove a temporary file no live writer holds; its size, or None if kept."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        size = os.fstat(fd).st_size
        os.unlink(path)
        return size
    except OSError:
        return None
    finally:
        os.close(fd)


class DownloadCancelledError(BlobError):
    """The download was stopped because nothing needs the blob any more."""


class BlobDownload:
    """A blob being written into the store; readable while it grows (a BlobFeed).

    The writer appends with :meth:`write` (hashing on the way), may be
    interrupted and resumed at :attr:`written`, and ends with :meth:`commit`
    (size and digest verified, then synced and renamed into place) or
    :meth:`fail`. Readers get descriptors from :meth:`open_fd` (the same
    inode before and after the rename) and call :meth:`wait_for` before
    reading: it blocks until the bytes exist and raises the download's error
    if it failed. The temporary file is sized up front so that size checks
    made before reading (``layers.plumbing.check_blob``) see the whole blob.

    Thread safety: ``write`` and ``commit`` run on the download's worker
    thread while ``fail``/``close`` may come from another (``Downloads.close``
    on Ctrl-C, or another layer failing). Every use of the descriptors holds
    ``_files``: closing a descriptor that another thread is about to
    ``pwrite`` into would let that write land in whatever file the process
    opens next under the same number (issue #15, the download race).
    """

    def __init__(self, store: BlobStore, digest: Digest, size: int) -> None:
        self.digest = digest
        self.size = size
        self.path = store.blob_path(digest)
        # Durable: a layer blob is served by its file identity without being
        # hashed again, so after a crash it must be whole or absent.
        self._out: AtomicFile | None = AtomicFile(self.path, durable=True)
        try:
            os.ftruncate(self._out.fd, size)
            self._read_fd: int | None = os.open(
                self._out.temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except BaseException:
            self._out.abort()
            raise
        self._hash = digest.hasher()
        self._files = threading.RLock()
        self._cond = threading.Condition()
        self._written = 0
        self._error: ImageFSError | None = None
        self.done = False

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (blocking). DigestMismatchError if it runs past ``size``."""
        with self._files:
            if self._out is None:
                raise BlobError(f"blob {self.digest}: write after the download ended")
            if self._written + len(data) > self.size:
                raise DigestMismatchError(
                    f"blob {self.digest}: the registry sent more than the {self.size} bytes "
                    "the manifest declares"
                )
            view = memoryview(data)
            pos = self._written
            while view:
                count = os.pwrite(self._out.fd, view, pos)
                view, pos = view[count:], pos + count
            self._hash.update(data)
        with self._cond:
            self._written = pos
            self._cond.notify_all()

    def commit(self) -> None:
        """Verify size and digest, then publish the blob (fsync, atomic rename)."""
        with self._files:
            if self._out is None:
                raise BlobError(f"blob {self.digest}: commit after the download ended")
            if self._written != self.size:
                raise DigestMismatchError(
                    f"blob {self.digest}: got {self._written} bytes, the manifest declares "
                    f"{self.size}"
                )
            try:
                self._hash.verify(where=f"blob {self.digest}",
                                  over=f"the download ({self.size} bytes)")  # fmt: skip
            except DigestMismatchError as error:
                self.fail(error)
                raise
            out, self._out = self._out, None
            out.commit()  # releases the writer's lock only once the name is in place
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def fail(self, error: ImageFSError) -> None:
        """End the download: waiting readers get ``error``; the partial file goes."""
        with self._cond:
            if self.done or self._error is not None:
                return
            self._error = error
            self._cond.notify_all()
        with self._files:  # waits for a write in progress on another thread
            if self._out is not None:
                self._out.abort()
                self._out = None

    def close(self) -> None:
        """Release the descriptors (a download not committed is cancelled)."""
        self.fail(DownloadCancelledError(f"blob {self.digest}: download cancelled"))
        with self._files:
            if self._read_fd is not None:
                os.close(self._read_fd)
                self._read_fd = None

    # -- BlobFeed ----------------------------------------------------------------

    def open_fd(self) -> int:
        with self._files:
            if self._read_fd is None:
                raise BlobError(f"blob {self.digest}: download closed")
            return os.dup(self._read_fd)

    def wait_verified(self) -> None:
        # commit() hashed every byte as it was written; a layer pass reading
        # the file need not hash them again.
        with self._cond:
            while not self.done and self._error is None:
                self._cond.wait()
            if not self.done:
                assert self._error is not None
                raise self._error

    def wait_for(self, end: int) -> None:
        with self._cond:
            # Bounded by the download: every write, commit and failure notifies.
            while self._written < end and self._error is None and not self.done:
                self._cond.wait()
            if self._written < end:
                if self._error is not None:
                    raise self._error
                raise BlobError(f"blob {self.digest}: read past its end ({end} > {self.size})")
