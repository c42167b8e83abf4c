"""A layer tar rebuilt exactly from a store's tar-split record and extracted files.

Podman and Docker keep a pulled layer only extracted (``diff/``), plus its
tar-split record (:mod:`imagefs.layers.tarsplit`): the original headers and
padding, and each file's size and CRC-64. Concatenating the segments and
the files' bytes gives back the very tar the image shipped (tar-split's
``tar/asm/assemble.go``), so its sha256 is the config's diff_id and the
entries are the image's own: owners, modes, mtimes, xattrs, hardlinks and
``.wh.`` whiteouts as written, not as overlayfs stores them.

:class:`RebuiltTar` is such a blob (``BlobRange.assembly``). It is read as
an uncompressed tar in two shapes, like any layer:

* :meth:`RebuiltTar.open_pass`: the one sequential pass. It hashes every
  byte against the diff_id and computes each file's CRC-64 on the way
  (fastcrc: ~5x faster than the sha256 beside it), so when the digest does
  not match, the changed files are already known; then the layer directory
  is compared with the record (:mod:`imagefs.layers.tamper`) for what no
  digest sees (files added, empty files, directories and symlinks changed
  or removed). Any difference refuses the layer: LayerModifiedError names
  the changed paths.
* :meth:`RebuiltTar.open_data`: ``pread`` at tar offsets, mapped by bisection
  to a file extent (read from the file beneath ``diff/``) or a segment.

Every file is opened beneath the store's root and the layer directory with
no symlink followed (:mod:`imagefs.layers.beneath`), read-only; nothing is
written, locked or created in the store.

Memory: the layout keeps, per file with data, its offset, size, CRC and
name (about 100 bytes each); segment bytes are not kept (a header region is
re-read from the record on the rare ``pread`` that asks for one; file
contents are all a mount reads).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct
import threading
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from imagefs.digest import Digest, Hasher
from imagefs.errors import (
    BlobError,
    DigestMismatchError,
    LayerError,
    LayerModifiedError,
    TarSplitError,
)
from imagefs.image import Layer
from imagefs.layers.beneath import Beneath, open_beneath, open_regular
from imagefs.layers.entry import TarEntry
from imagefs.layers.plumbing import InUse
from imagefs.layers.tarsplit import FileRecord, Segment, crc64, crc64_bytes, read_records

__all__ = [
    "MAX_LISTED",
    "Change",
    "FileProblem",
    "Layout",
    "RebuiltCheck",
    "RebuiltData",
    "RebuiltPass",
    "RebuiltTar",
    "clean_member_name",
    "describe_changes",
]

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
MAX_LISTED = 5  # changed paths named in a one-line refusal; then "and N more"


def clean_member_name(name: bytes) -> str | None:
    """The path beneath the layer directory that a tar member name means, or None.

    ``./a//b`` and ``/a/b`` are ``a/b`` (as the engines' extraction and
    tar-split's ``filepath.Join(root, name)`` resolve them); "" is the root.
    A name with ``..`` or NUL cannot be beneath the directory: None.
    """
    if b"\0" in name:
        return None
    parts = [part for part in name.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        return None
    return os.fsdecode(b"/".join(parts))


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each file's data sits in the rebuilt tar (files with data only)."""

    size: int  # the whole rebuilt tar
    records: int  # tar-split entries, to catch a record changed between reads
    starts: array[int] = field(repr=False)  # offset of each file's data, ascending
    sizes: array[int] = field(repr=False)
    names: tuple[str, ...] = field(repr=False)  # paths beneath diff/ (clean_member_name)
    crcs: bytes = field(repr=False)  # 8 bytes per file, tar-split's CRC-64

    def crc(self, index: int) -> bytes:
        return self.crcs[8 * index : 8 * index + 8]


def scan_layout(records: Iterator[Segment | FileRecord], where: str) -> Layout:
    starts, sizes = array("q"), array("q")
    names: list[str] = []
    crcs = bytearray()
    offset = count = 0
    for record in records:
        count += 1
        if isinstance(record, Segment):
            offset += record.size
            continue
        if record.size == 0:
            continue
        name = clean_member_name(record.name)
        if not name:
            raise TarSplitError(
                f"{where}: entry {record.position}: {os.fsdecode(record.name)!r} has data but "
                "names no file beneath the layer directory"
            )
        assert record.crc is not None  # tarsplit.read_records checks it
        starts.append(offset)
        sizes.append(record.size)
        names.append(name)
        crcs += record.crc
        offset += record.size
    return Layout(offset, count, starts, sizes, tuple(names), bytes(crcs))


@dataclass(frozen=True, slots=True)
class FileProblem:
    """A file whose bytes under ``diff/`` are not those the record describes."""

    path: str
    detail: str  # "removed", "size 5 -> 7", "content changed", "not a regular file"...


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between a layer directory and its record (tamper check)."""

    path: str
    kind: str  # "changed", "added", "removed"
    detail: str  # how: "content changed (CRC-64)", "size 5 -> 7", "file -> symlink"; the
    # type of what was added ("file", "dir"...); "removed", or what was ("whiteout removed")

    def __str__(self) -> str:
        if self.kind == "added":
            return f"{self.path} (added {self.detail})"
        return f"{self.path} ({self.detail})"


def describe_changes(changes: list[Change] | tuple[Change, ...]) -> str:
    """``a (removed), b (added) and 3 more``: a handful, for one-line messages."""
    shown = ", ".join(str(change) for change in changes[:MAX_LISTED])
    extra = len(changes) - MAX_LISTED
    return f"{shown} and {extra} more" if extra > 0 else shown


class RebuiltTar:
    """A layer tar rebuilt from ``TARSPLIT`` and the directory ``DIFF`` of a store.

    Both paths are relative to ``store_root`` and opened beneath it. The
    record is parsed once here (for the size and the file layout); the pass
    parses it again as it streams, and fails if it changed meanwhile.
    ``allow_modified``: a modified layer is served anyway (its changes are
    kept in :attr:`changes` after the pass) instead of refused.
    """

    def __init__(
        self,
        store_root: str,
        tarsplit: str,
        diff: str,
        *,
        label: str,
        allow_modified: bool = False,
    ) -> None:
        self.store_root = store_root
        self.tarsplit = tarsplit
        self.diff = diff
        self.label = label  # the engine's name for the layer, for messages
        self.allow_modified = allow_modified
        self.changes: tuple[Change, ...] | None = None  # set by a pass (allow_modified)
        self._identity: list[int | str] | None = None
        with Beneath(store_root) as store:
            fd = self._open_record(store)
            try:
                records = read_records(fd, self.where_record, payloads=False)
                self.layout = scan_layout(records, self.where_record)
            finally:
                os.close(fd)

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def cacheable(self) -> bool:
        # Served --allow-modified, it may not be the digest's content: no
        # index of it may be cached under that digest.
        return not self.allow_modified

    @property
    def where_record(self) -> str:
        return os.path.join(self.store_root, self.tarsplit)

    @property
    def where_diff(self) -> str:
        return os.path.join(self.store_root, self.diff)

    def _open_record(self, store: Beneath) -> int:
        try:
            return store.open_file(self.tarsplit)
        except OSError as exc:
            raise BlobError(
                f"{self.label}: cannot open {self.where_record}: {exc.strerror or exc}"
            ) from exc

    def open_diff(self, store: Beneath) -> int:
        """An ``O_PATH`` descriptor on the layer directory (opened beneath the store)."""
        try:
            return store.open(self.diff, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            raise BlobError(
                f"{self.label}: cannot open {self.where_diff}: {exc.strerror or exc}"
            ) from exc

    def identity(self) -> list[int | str]:
        """The record file's identity and a digest of every entry's ``lstat`` under ``diff/``.

        Writing, adding, removing or renaming anything under the layer
        directory changes some entry's size, mtime or ctime (or its parent
        directory's), and nobody but the clock sets a ctime: a cached tree or
        index built from a verified pass is reused only while this stays the
        same. Costs one ``lstat`` per entry; computed once per object.
        """
        if self._identity is None:
            from imagefs.layers.tamper import walk  # noqa: PLC0415 - tamper imports this module

            with Beneath(self.store_root) as store:
                record = store.stat(self.tarsplit)
                diff_fd = self.open_diff(store)
                try:
                    summary = Hasher("sha256")
                    for path, st in walk(diff_fd, self.where_diff):
                        summary.update(
                            f"{path}\0{st.st_mode} {st.st_ino} {st.st_size} {st.st_mtime_ns} "
                            f"{st.st_ctime_ns} {st.st_uid} {st.st_gid}\n".encode(
                                "utf-8", "surrogateescape"
                            )
                        )
                finally:
                    os.close(diff_fd)
            self._identity = [
                0, self.layout.size, record.st_dev, record.st_ino, record.st_size,
                record.st_mtime_ns, record.st_ctime_ns, str(summary.result()),
            ]  # fmt: skip
            if self.allow_modified:
                # A tree built while changes were allowed is never reused by a
                # mount that refuses them (it would skip the check).
                self._identity.append("allow-modified")
        return self._identity

    def open_pass(self, layer: Layer) -> RebuiltPass:
        """The one sequential, digest-checked pass (close it, or ``verify()`` it)."""
        return RebuiltPass(self, layer)

    def open_data(self, layer: Layer) -> RebuiltData:
        """Random access at tar offsets (thread-safe; holds no descriptor between reads)."""
        return RebuiltData(self, layer)


def rebuilt_of(layer: Layer) -> RebuiltTar | None:
    """The layer's RebuiltTar if its blob is one."""
    assembly = layer.blob.assembly
    return assembly if isinstance(assembly, RebuiltTar) else None


class RebuiltPass:
    """``read``/``skip``/``tell`` over the rebuilt tar, hashing and CRC-checking every byte.

    It is the pass's stream and its digest check at once (``verify`` /
    ``cancel``, as layers.plumbing.DigestCheck): the bytes are hashed as the
    scanner consumes them, so the layer is read exactly once. A file that is
    missing, not a regular file or of another size reads as zeros (so the
    stream keeps the record's layout and the scan goes on), and is reported.
    """

    def __init__(self, rebuilt: RebuiltTar, layer: Layer) -> None:
        self._rebuilt = rebuilt
        self._layer = layer
        self._hasher: Hasher = Digest(layer.descriptor.digest).hasher()
        self._store = Beneath(rebuilt.store_root)
        self._record_fd = -1
        self._diff_fd = -1
        try:
            self._record_fd = rebuilt._open_record(self._store)
            self._diff_fd = rebuilt.open_diff(self._store)
        except BaseException:
            self.cancel()
            raise
        self._records = read_records(self._record_fd, rebuilt.where_record)
        self._count = 0
        self._pos = 0
        self._segment = memoryview(b"")  # what is left of the current segment
        self._file_fd = -1  # the current file, while it has bytes left
        self._file_left = 0
        self._file_crc: int | None = None
        self._file_name = ""
        self._file_expect: bytes = b""
        self._file_problem: str | None = None
        self._file_index = 0
        self._parent_name = ""
        self._parent_fd = -1
        self._shape = _Shape()
        self.problems: list[FileProblem] = []

    # -- the stream ------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self._next_piece():
            if self._segment:
                take = self._segment[: n - len(out)]
                self._segment = self._segment[len(take) :]
                out += take
            else:
                out += self._file_bytes(n - len(out))
        self._hasher.update(out)
        self._pos += len(out)
        return bytes(out)

    def skip(self, n: int) -> None:
        while n > 0 and self._next_piece():
            if self._segment:
                take = self._segment[:n]
                self._segment = self._segment[len(take) :]
                self._hasher.update(take)
                got = len(take)
            else:
                data = self._file_bytes(min(n, _READ_CHUNK))
                self._hasher.update(data)
                got = len(data)
            self._pos += got
            n -= got

    def tell(self) -> int:
        return self._pos

    def _next_piece(self) -> bool:
        """Make a segment or a file current; False at the end of the record."""
        if self._segment or self._file_left:
            return True
        for record in self._records:
            self._count += 1
            if isinstance(record, Segment):
                if record.payload:
                    self._shape.add_segment(record.payload)
                    self._segment = memoryview(record.payload)
                    return True
            elif record.size > 0:
                self._shape.add_file(record.size)
                self._start_file(record)
                return True
        return False

    def _start_file(self, record: FileRecord) -> None:
        layout = self._rebuilt.layout
        index = self._file_index
        self._file_index += 1
        if index >= len(layout.starts) or layout.starts[index] != self._pos:
            raise TarSplitError(
                f"{self._rebuilt.where_record}: changed while being read (entry {record.position})"
            )
        name = layout.names[index]
        self._file_name, self._file_left = name, record.size
        self._file_expect = record.crc or b""
        self._file_crc, self._file_problem = None, None
        parent, _, base = name.rpartition("/")
        try:
            fd = open_regular(self._parent(parent), base)
        except FileNotFoundError:
            self._file_problem = "removed"
            return
        except OSError as exc:
            self._file_problem = _open_problem(exc)
            return
        size = os.fstat(fd).st_size
        if size != record.size:
            self._file_problem = f"size {record.size} -> {size}"
        self._file_fd = fd

    def _parent(self, parent: str) -> int:
        """The directory ``parent`` beneath diff/ (O_PATH), kept while files follow in it.

        Tar order groups a directory's files, so this saves re-walking deep
        paths for every file (measured: ~20% of the pass on small files).
        """
        if parent != self._parent_name or self._parent_fd < 0:
            if self._parent_fd >= 0:
                os.close(self._parent_fd)
                self._parent_fd = -1
            self._parent_fd = open_beneath(self._diff_fd, parent, os.O_PATH | os.O_DIRECTORY)
            self._parent_name = parent
        return self._parent_fd

    def _file_bytes(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current file (zeros for what the disk lacks)."""
        n = min(n, self._file_left, _READ_CHUNK)
        data = b""
        if self._file_fd >= 0:
            try:
                data = os.read(self._file_fd, n)
            except OSError as exc:
                raise BlobError(
                    f"{self._rebuilt.label}: cannot read {self._rebuilt.where_diff}/"
                    f"{self._file_name}: {exc.strerror or exc}"
                ) from exc
        if len(data) < n:
            data += bytes(n - len(data))  # shorter on disk: "size" already says so
        self._file_crc = crc64(data, self._file_crc)
        self._file_left -= n
        if not self._file_left:
            self._end_file()
        return data

    def _end_file(self) -> None:
        if self._file_fd >= 0:
            os.close(self._file_fd)
            self._file_fd = -1
        problem = self._file_problem
        if problem is None and crc64_bytes(self._file_crc or 0) != self._file_expect:
            problem = "content changed (CRC-64)"
        if problem is not None:
            self.problems.append(FileProblem(self._file_name, problem))

    # -- the digest check ------------------------------------------------------------------

    def check(self, scanned: Sequence[TarEntry] | None = None) -> tuple[Digest, list[Change]]:
        """Read to the end: the rebuilt tar's digest and every change found (then closed).

        ``scanned``: the tar scanner's entries of this whole stream, if a
        scan read it; the comparison then uses them instead of scanning
        the headers again (a fifth of a cold store mount's time).
        """
        try:
            while self._next_piece():
                self.skip(_READ_CHUNK)
            if self._count != self._rebuilt.layout.records:
                raise TarSplitError(f"{self._rebuilt.where_record}: changed while being read")
            found = self._hasher.result()
            from imagefs.layers.tamper import compare  # noqa: PLC0415 - tamper imports this

            headers = self._shape.pieces()
            return found, compare(self._rebuilt, headers, self._diff_fd, self.problems, scanned)
        finally:
            self.cancel()

    def verify(self, scanned: Sequence[TarEntry] | None = None) -> None:
        """Read to the end; LayerModifiedError unless the layer is exactly the image's.

        ``scanned``: as for :meth:`check`.
        """
        found, changes = self.check(scanned)
        expected = Digest(self._layer.descriptor.digest)
        if found == expected and not changes:
            return
        rebuilt = self._rebuilt
        if not changes:
            # Every file matches its record, yet the bytes do not hash to the
            # diff_id: the record itself is not this layer's.
            raise DigestMismatchError(
                f"layer {expected} ({rebuilt.label}): digest mismatch: expected {expected}, "
                f"found {found}, over the tar rebuilt from {rebuilt.where_record}, though every "
                "file matches it (the tar-split record is not this layer's?)"
            )
        rebuilt.changes = tuple(changes)
        message = (
            f"layer {expected} ({rebuilt.label}): {len(changes)} path(s) modified on the host "
            f"under {rebuilt.where_diff}: {describe_changes(changes)}"
        )
        if not rebuilt.allow_modified:
            raise LayerModifiedError(message)
        log.warning("%s; serving the host's bytes (--allow-modified)", message)

    def cancel(self) -> None:
        for name in ("_file_fd", "_parent_fd", "_diff_fd", "_record_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._store.close()

    def close(self) -> None:
        self.cancel()


class _Shape:
    """The rebuilt tar with file data left out, kept compressed for the tamper check.

    The pass sees every header once; keeping them (zlib level 1: tar headers
    and padding shrink ~10x) lets the comparison scan the headers again
    without parsing the tar-split record a second time.
    """

    _SEGMENT, _FILE = b"S", b"F"

    def __init__(self) -> None:
        self._packer = zlib.compressobj(1)
        self._chunks: list[bytes] = []

    def add_segment(self, payload: bytes) -> None:
        self._chunks.append(self._packer.compress(self._SEGMENT + _LENGTH.pack(len(payload))))
        self._chunks.append(self._packer.compress(payload))

    def add_file(self, size: int) -> None:
        self._chunks.append(self._packer.compress(self._FILE + _LENGTH.pack(size)))

    def pieces(self) -> Iterator[bytes | int]:
        """Segment bytes, and the size of each file's data, in stream order."""
        data = zlib.decompress(b"".join(self._chunks) + self._packer.flush())
        self._chunks = []
        at, size = 0, _LENGTH.size
        while at < len(data):
            kind, (length,) = data[at : at + 1], _LENGTH.unpack_from(data, at + 1)
            at += 1 + size
            if kind == self._FILE:
                yield length
            else:
                yield data[at : at + length]
                at += length


_LENGTH = struct.Struct("<Q")


class RebuiltCheck:
    """A rebuilt layer's digest check on its own (layers.plumbing.digest_check): a whole pass."""

    def __init__(self, layer: Layer) -> None:
        rebuilt = rebuilt_of(layer)
        assert rebuilt is not None
        self._rebuilt = rebuilt
        self._layer = layer

    def verify(self) -> None:
        stream = self._rebuilt.open_pass(self._layer)
        stream.verify()

    def cancel(self) -> None:
        pass  # nothing runs until verify()


def _open_problem(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "replaced by a symlink"
    if exc.errno in (errno.EINVAL, errno.EISDIR):
        return "not a regular file"
    if exc.errno == errno.ENOTDIR:
        return "a parent is no longer a directory"
    return f"cannot be opened ({exc.strerror or exc})"


class RebuiltData:
    """Thread-safe ``pread`` at offsets of the rebuilt tar.

    A file's bytes come from the file beneath ``diff/`` (opened for each
    read beneath the layer directory, which is opened beneath the store root
    at the first read and kept; no symlink followed); a file whose
    size is no longer the recorded one fails the read (EIO in the mount),
    unless the layer is served ``allow_modified``, where the host's bytes
    are cut or zero-filled to the recorded size (the tree's size is the
    image's). Segments are re-read from the record (never on a mount's
    file reads).
    """

    def __init__(self, rebuilt: RebuiltTar, layer: Layer) -> None:
        self._rebuilt = rebuilt
        self._digest = layer.descriptor.digest
        self.size = rebuilt.size
        self._in_use = InUse()
        self._lock = threading.Lock()
        self._diff_fd = -1  # opened at the first read: nothing held across a fork before it
        self._segment_cache: tuple[int, bytes] | None = None  # (offset, bytes) of the last one

    def _diff(self) -> int:
        with self._lock:
            if self._diff_fd < 0:
                with Beneath(self._rebuilt.store_root) as store:
                    self._diff_fd = self._rebuilt.open_diff(store)
            return self._diff_fd

    def pread(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size ({offset}, {size})")
        size = min(size, self.size - offset)
        if size <= 0:
            return b""
        layout = self._rebuilt.layout
        out = bytearray()
        pos, end = offset, offset + size
        with self._in_use:
            while pos < end:
                index = bisect.bisect_right(layout.starts, pos) - 1
                if index >= 0 and pos < layout.starts[index] + layout.sizes[index]:
                    start = layout.starts[index]
                    take = min(end, start + layout.sizes[index]) - pos
                    out += self._file_range(self._diff(), index, pos - start, take)
                else:
                    following = index + 1
                    limit = layout.starts[following] if following < len(layout.starts) else end
                    take = min(end, limit) - pos
                    out += self._segment_range(pos, take)
                pos += take
        return bytes(out)

    def _file_range(self, diff_fd: int, index: int, offset: int, size: int) -> bytes:
        layout = self._rebuilt.layout
        name = layout.names[index]
        where = f"layer {self._digest}: {self._rebuilt.where_diff}/{name}"
        try:
            fd = open_regular(diff_fd, name)
        except OSError as exc:
            if self._rebuilt.allow_modified:
                return bytes(size)
            raise LayerError(f"{where}: {_open_problem(exc)}") from exc
        try:
            actual = os.fstat(fd).st_size
            if actual != layout.sizes[index] and not self._rebuilt.allow_modified:
                raise LayerError(f"{where}: size changed ({layout.sizes[index]} -> {actual})")
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        return data + bytes(size - len(data))

    def _segment_range(self, offset: int, size: int) -> bytes:
        """Bytes inside segments: walk the record to them (headers are not what mounts read)."""
        with self._lock:
            cached = self._segment_cache
            if cached is not None and cached[0] <= offset < cached[0] + len(cached[1]):
                at = offset - cached[0]
                if at + size <= len(cached[1]):
                    return cached[1][at : at + size]
            out = bytearray()
            with Beneath(self._rebuilt.store_root) as store:
                fd = self._rebuilt._open_record(store)
                try:
                    pos = 0
                    for record in read_records(fd, self._rebuilt.where_record):
                        if isinstance(record, FileRecord):
                            pos += record.size
                            continue
                        length = len(record.payload)
                        if pos + length > offset:
                            lo = max(offset, pos) - pos
                            hi = min(offset + size, pos + length) - pos
                            out += record.payload[lo:hi]
                            self._segment_cache = (pos, record.payload)
                        pos += length
                        if pos >= offset + size:
                            break
                finally:
                    os.close(fd)
            if len(out) != size:
                raise LayerError(f"layer {self._digest}: {self._rebuilt.where_record} changed")
            return bytes(out)

    def close(self) -> None:
        if self._in_use.close() and self._diff_fd >= 0:
            os.close(self._diff_fd)
            self._diff_fd = -1
