"""A read-only reader of bbolt files (go.etcd.io/bbolt), the format of containerd's meta.db.

The format, as bbolt's ``internal/common`` defines it (page.go, meta.go,
bucket.go; native byte order, so a file from a big-endian host is big-endian)::

    page header   id u64, flags u16, count u16, overflow u32        (16 bytes)
    meta          magic u32 0xED0CDAED, version u32 (2), page_size u32,
                  flags u32, root bucket {root u64, sequence u64},
                  freelist u64, pgid u64 (high-water mark), txid u64,
                  checksum u64 = FNV-1a 64 of the 56 bytes before it
    branch elem   pos u32, ksize u32, pgid u64; key at elem + pos
    leaf elem     flags u32 (1: the value is a bucket), pos u32, ksize u32,
                  vsize u32; key at elem + pos, value right after the key
    bucket value  {root u64, sequence u64}; root 0 means *inline*: a leaf
                  page follows in the value itself

Pages 0 and 1 are the two meta pages; a commit writes the new tree's pages
copy-on-write and then the meta page ``txid % 2``, so the meta page with the
higher txid *that validates* (magic, version, checksum) names a consistent
tree, as ``DB.meta()`` chooses. A page whose data outgrows it spans
``overflow`` more pages.

Reading never takes bbolt's flock (containerd holds it exclusively while it
runs) and never maps the file: it is read with ``pread``, because a live
writer may grow or truncate it and a mapping would then fault (SIGBUS). A
live writer may also commit while we walk and, once no in-process reader
holds the old tree, reuse its pages; :func:`read_consistent` therefore
checks that the meta pages did not change across the whole read and reads
again if they did.

Everything in the file is untrusted. Every page id is checked against the
high-water mark and the file size, every element against its page's bytes,
keys must ascend, a page may be referenced from one place only (which
catches cycles and shared subtrees that would multiply the work), trees may
be at most :data:`MAX_DEPTH` levels deep, and walks use explicit stacks, not
recursion. Any violation is one :class:`~imagefs.errors.CorruptStoreError`
naming the file, the bucket and the page.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from imagefs.errors import CorruptStoreError

__all__ = [
    "MAX_DEPTH",
    "BoltFile",
    "Bucket",
    "Entry",
    "Meta",
    "fnv1a64",
    "read_consistent",
    "walk",
]

MAGIC = 0xED0CDAED
VERSION = 2
BRANCH_PAGE, LEAF_PAGE, META_PAGE, FREELIST_PAGE = 0x01, 0x02, 0x04, 0x10
BUCKET_LEAF_FLAG = 0x01  # leaf element flag: the value is a nested bucket

PAGE_HEADER_SIZE = 16
ELEMENT_SIZE = 16  # branch and leaf elements are both 16 bytes
BUCKET_HEADER_SIZE = 16
META_SIZE = 64
_CHECKSUMMED = 56  # the meta's bytes before its checksum

# bbolt probes for the second meta page at 1 KiB << 0..14 (db.go
# getPageSizeFromSecondMeta), so it never opens a file outside this range.
MIN_PAGE_SIZE = 1024
MAX_PAGE_SIZE = 16 << 20
# A B+tree of at most 2**64 pages with two or more keys per page is at most
# 64 levels deep; more means a cycle or a corrupt tree.
MAX_DEPTH = 64
# One page with its overflow: containerd's biggest values are container specs
# (kilobytes); a span this large is a corrupt count, not a record.
MAX_SPAN = 64 << 20
# Parsed pages kept per open file (bytes of page data): walks revisit the
# upper levels of a tree for every lookup.
CACHE_BYTES = 32 << 20
# How often read_consistent tries before giving up on a file that changes
# under every read.
READ_ATTEMPTS = 8

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1

T = TypeVar("T")
_Origin = tuple[int, ...]  # where a page is referenced from: (page id, element index, ...)


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits (Go's hash/fnv New64a): the meta page checksum."""
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & _MASK64
    return value


@dataclass(frozen=True, slots=True)
class Meta:
    """A validated meta page."""

    page: int  # 0 or 1
    page_size: int
    flags: int
    root: int  # page id of the root bucket's root page
    freelist: int
    high_water: int  # pgid: the first page id past the tree
    txid: int
    byte_order: str  # "<" or ">", as struct spells it


@dataclass(frozen=True, slots=True)
class Entry:
    """One key of a bucket: a plain value, or (``is_bucket``) a nested bucket's header."""

    key: bytes
    value: bytes
    is_bucket: bool


@dataclass(frozen=True, slots=True)
class _Page:
    pgid: int  # 0 for an inline page
    leaf: bool
    keys: tuple[bytes, ...]
    values: tuple[bytes, ...]  # leaf only
    flags: tuple[int, ...]  # leaf only
    children: tuple[int, ...]  # branch only
    size: int


def _describe(path: tuple[bytes, ...]) -> str:
    if not path:
        return "root bucket"
    return "bucket " + "/".join(part.decode("utf-8", "backslashreplace") for part in path)


class BoltFile:
    """An open bbolt file, read through ``fd`` (which this object owns and closes).

    ``where`` names the file in messages. The meta page is chosen once, at
    open; :meth:`changed` tells whether a writer has committed since.
    """

    def __init__(self, fd: int, where: str) -> None:
        self.where = where
        self._fd = fd
        try:
            self._size = os.fstat(fd).st_size
            self.meta, self._meta_bytes = self._choose_meta()
        except BaseException:
            self.close()
            raise
        self._order = self.meta.byte_order
        self._header = struct.Struct(self._order + "QHHI")
        self._branch = struct.Struct(self._order + "IIQ")
        self._leaf = struct.Struct(self._order + "IIII")
        self._bucket = struct.Struct(self._order + "QQ")
        self._cache: OrderedDict[int, _Page] = OrderedDict()
        self._cached_bytes = 0
        self._claims: dict[int, _Origin] = {}

    @classmethod
    def open(cls, path: str) -> BoltFile:
        """Open ``path`` read-only (no lock). Store code opens through Beneath instead."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise CorruptStoreError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        return cls(fd, path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BoltFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta pages ------------------------------------------------------------------

    def _pread(self, length: int, offset: int) -> bytes:
        chunks: list[bytes] = []
        done = 0
        try:
            while done < length:
                chunk = os.pread(self._fd, length - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        except OSError as exc:
            raise CorruptStoreError(f"{self.where}: cannot read: {exc.strerror or exc}") from exc
        return b"".join(chunks)

    def _choose_meta(self) -> tuple[Meta, tuple[bytes, bytes]]:
        if self._size < 2 * MIN_PAGE_SIZE:
            raise CorruptStoreError(
                f"{self.where}: not a bbolt file: {self._size} bytes, too short for two meta pages"
            )
        first = self._pread(PAGE_HEADER_SIZE + META_SIZE, 0)
        meta0, problem0 = _parse_meta(first, 0)
        offsets: list[int]
        if meta0 is not None:
            offsets = [meta0.page_size]
        else:
            # db.go getPageSizeFromSecondMeta: page 0 is unreadable, so try every page size.
            offsets = [MIN_PAGE_SIZE << i for i in range(15) if MIN_PAGE_SIZE << i < self._size]
        meta1: Meta | None = None
        second = b""
        problem1 = "not found at any page size"
        for offset in offsets:
            data = self._pread(PAGE_HEADER_SIZE + META_SIZE, offset)
            found, problem1 = _parse_meta(data, 1)
            if found is not None and found.page_size != offset:
                problem1 = f"page size {found.page_size} but found at offset {offset}"
            elif found is not None:
                meta1, second = found, data
                break
            if meta0 is not None:
                second = data
        valid = [m for m in (meta0, meta1) if m is not None]
        if not valid:
            raise CorruptStoreError(
                f"{self.where}: not a valid bbolt file: meta page 0: {problem0}; "
                f"meta page 1: {problem1}"
            )
        # DB.meta(): the higher txid wins when it validates, else the other one.
        meta = max(valid, key=lambda m: (m.txid, -m.page))
        if meta.root < 2 or meta.root >= meta.high_water:
            raise CorruptStoreError(
                f"{self.where}: meta page {meta.page}: root page {meta.root} is outside the "
                f"tree (pages 2 to {meta.high_water - 1})"
            )
        return meta, (first, second)

    def changed(self) -> bool:
        """True when the meta pages differ from those read at open (a commit since)."""
        first = self._pread(PAGE_HEADER_SIZE + META_SIZE, 0)
        second = self._pread(PAGE_HEADER_SIZE + META_SIZE, self.meta.page_size)
        return (first, second) != self._meta_bytes

    # -- pages -----------------------------------------------------------------------

    def root(self) -> Bucket:
        """The root bucket (its keys are the top-level buckets)."""
        return Bucket(self, (), self.meta.root, None, (-1,))

    def _page(self, pgid: int, origin: _Origin, path: tuple[bytes, ...]) -> _Page:
        """Page ``pgid``, referenced from ``origin`` (checked: one referrer per page)."""
        where = f"{self.where}: {_describe(path)}: page {pgid}"
        if pgid < 2 or pgid >= self.meta.high_water:
            raise CorruptStoreError(
                f"{where}: outside the tree (pages 2 to {self.meta.high_water - 1})"
            )
        claimed = self._claims.get(pgid)
        if claimed is not None and claimed != origin:
            raise CorruptStoreError(
                f"{where}: referenced from two places (a cycle or a corrupt tree)"
            )
        page = self._cache.get(pgid)
        if page is not None:
            self._cache.move_to_end(pgid)
            return page
        page = self._load(pgid, where)
        span_pages = (page.size + self.meta.page_size - 1) // self.meta.page_size
        for covered in range(pgid, pgid + span_pages):
            other = self._claims.get(covered)
            if other is not None and other != origin:
                raise CorruptStoreError(
                    f"{where}: overlaps page {covered}, which is referenced elsewhere"
                )
            self._claims[covered] = origin
        self._cache[pgid] = page
        self._cached_bytes += page.size
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.size
        return page

    def _load(self, pgid: int, where: str) -> _Page:
        page_size = self.meta.page_size
        offset = pgid * page_size
        head = self._pread(PAGE_HEADER_SIZE, offset)
        if len(head) < PAGE_HEADER_SIZE:
            raise CorruptStoreError(f"{where}: past the end of the file ({self._size} bytes)")
        header_id, flags, count, overflow = self._header.unpack(head)
        if header_id != pgid:
            raise CorruptStoreError(f"{where}: its header says it is page {header_id}")
        span = (overflow + 1) * page_size
        if span > MAX_SPAN or pgid + overflow >= self.meta.high_water:
            raise CorruptStoreError(f"{where}: overflow count {overflow} is impossible")
        data = self._pread(span, offset)
        if len(data) < span:
            raise CorruptStoreError(
                f"{where}: {overflow + 1} pages from offset {offset} run past the end of the "
                f"file ({self._size} bytes)"
            )
        return self._parse(data, pgid, flags, count, where)

    def _parse(self, data: bytes, pgid: int, flags: int, count: int, where: str) -> _Page:
        """The elements of a page whose bytes (header included) are ``data``."""
        if flags not in (BRANCH_PAGE, LEAF_PAGE):
            kind = {META_PAGE: "a meta page", FREELIST_PAGE: "a freelist page"}
            raise CorruptStoreError(
                f"{where}: expected a branch or leaf page, found "
                f"{kind.get(flags, f'page type 0x{flags:02x}')}"
            )
        leaf = flags == LEAF_PAGE
        if PAGE_HEADER_SIZE + count * ELEMENT_SIZE > len(data):
            raise CorruptStoreError(
                f"{where}: {count} elements do not fit in its {len(data)} bytes"
            )
        if not leaf and count == 0:
            raise CorruptStoreError(f"{where}: a branch page without elements")
        keys: list[bytes] = []
        values: list[bytes] = []
        element_flags: list[int] = []
        children: list[int] = []
        for i in range(count):
            at = PAGE_HEADER_SIZE + i * ELEMENT_SIZE
            if leaf:
                eflags, pos, ksize, vsize = self._leaf.unpack_from(data, at)
            else:
                pos, ksize, child = self._branch.unpack_from(data, at)
                vsize = 0
            start = at + pos
            end = start + ksize + vsize
            if end > len(data):
                raise CorruptStoreError(
                    f"{where}: element {i} ({ksize}+{vsize} bytes at {start}) runs past the page"
                )
            key = data[start : start + ksize]
            if keys and key <= keys[-1]:
                raise CorruptStoreError(f"{where}: keys out of order at element {i}")
            keys.append(key)
            if leaf:
                values.append(data[start + ksize : end])
                element_flags.append(eflags)
            else:
                children.append(child)
        return _Page(
            pgid,
            leaf,
            tuple(keys),
            tuple(values),
            tuple(element_flags),
            tuple(children),
            len(data),
        )

    def _inline(self, value: bytes, path: tuple[bytes, ...]) -> _Page:
        where = f"{self.where}: {_describe(path)} (inline)"
        data = value[BUCKET_HEADER_SIZE:]
        if len(data) < PAGE_HEADER_SIZE:
            raise CorruptStoreError(f"{where}: {len(value)} bytes, too short for its page")
        _, flags, count, _ = self._header.unpack_from(data)
        if flags != LEAF_PAGE:
            # bbolt inlines only leaf pages (bucket.go inlineable); a branch
            # here would point at page ids from inside a value.
            raise CorruptStoreError(f"{where}: an inline page must be a leaf, not 0x{flags:02x}")
        return self._parse(data, 0, flags, count, where)

    def _open_bucket(self, parent: Bucket, key: bytes, value: bytes, origin: _Origin) -> Bucket:
        path = (*parent.path, key)
        if len(value) < BUCKET_HEADER_SIZE:
            raise CorruptStoreError(
                f"{self.where}: {_describe(path)}: bucket header is {len(value)} bytes, "
                f"expected {BUCKET_HEADER_SIZE}"
            )
        root, _ = self._bucket.unpack_from(value)
        if root == 0:
            return Bucket(self, path, 0, self._inline(value, path), origin)
        return Bucket(self, path, root, None, origin)


class Bucket:
    """A bucket: sorted keys, each a plain value or a nested bucket."""

    def __init__(
        self,
        db: BoltFile,
        path: tuple[bytes, ...],
        root: int,
        inline: _Page | None,
        origin: _Origin,
    ) -> None:
        self.db = db
        self.path = path  # bucket names from the root, for messages
        self._root = root
        self._inline = inline
        self._origin = origin

    def _root_page(self) -> _Page:
        if self._inline is not None:
            return self._inline
        return self.db._page(self._root, self._origin, self.path)

    def _element_origin(self, page: _Page, index: int) -> _Origin:
        # An inline page has no id: its elements are located through the bucket.
        return (*self._origin, index) if page.pgid == 0 else (page.pgid, index)

    def _descend(self, key: bytes) -> list[tuple[_Page, int]]:
        """The path from the root to the leaf where ``key`` is or would be."""
        stack: list[tuple[_Page, int]] = []
        page = self._root_page()
        while not page.leaf:
            if len(stack) >= MAX_DEPTH:
                raise CorruptStoreError(
                    f"{self.db.where}: {_describe(self.path)}: tree deeper than {MAX_DEPTH} levels"
                )
            # cursor.go searchPage: the last child whose first key is <= key.
            index = max(bisect.bisect_right(page.keys, key) - 1, 0)
            stack.append((page, index))
            page = self.db._page(page.children[index], (page.pgid, index), self.path)
        stack.append((page, bisect.bisect_left(page.keys, key)))
        return stack

    def _find(self, key: bytes) -> tuple[_Page, int] | None:
        page, index = self._descend(key)[-1]
        if index < len(page.keys) and page.keys[index] == key:
            return page, index
        return None

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``; None when absent or when it is a bucket (bbolt's Get)."""
        found = self._find(key)
        if found is None:
            return None
        page, index = found
        if page.flags[index] & BUCKET_LEAF_FLAG:
            return None
        return page.values[index]

    def bucket(self, key: bytes) -> Bucket | None:
        """The nested bucket ``key``; None when absent or a plain value."""
        found = self._find(key)
        if found is None:
            return None
        page, index = found
        if not page.flags[index] & BUCKET_LEAF_FLAG:
            return None
        return self.db._open_bucket(
            self, key, page.values[index], self._element_origin(page, index)
        )

    def entries(self, start: bytes = b"") -> Iterator[Entry]:
        """Every key from ``start`` on, in order (a cursor's Seek, then Next)."""
        for page, index in self._cursor(start):
            flags = page.flags[index]
            yield Entry(page.keys[index], page.values[index], bool(flags & BUCKET_LEAF_FLAG))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """The plain (non-bucket) keys and values."""
        for entry in self.entries():
            if not entry.is_bucket:
                yield entry.key, entry.value

    def buckets(self) -> Iterator[tuple[bytes, Bucket]]:
        """The nested buckets, by name."""
        for page, index in self._cursor(b""):
            if page.flags[index] & BUCKET_LEAF_FLAG:
                key = page.keys[index]
                origin = self._element_origin(page, index)
                yield key, self.db._open_bucket(self, key, page.values[index], origin)

    def _cursor(self, start: bytes) -> Iterator[tuple[_Page, int]]:
        stack = self._descend(start)
        previous: bytes | None = None
        while stack:
            page, index = stack[-1]
            if page.leaf:
                if index < len(page.keys):
                    key = page.keys[index]
                    if previous is not None and key <= previous:
                        raise CorruptStoreError(
                            f"{self.db.where}: {_describe(self.path)}: page {page.pgid}: "
                            "keys out of order across pages"
                        )
                    previous = key
                    yield page, index
                    stack[-1] = (page, index + 1)
                    continue
                stack.pop()
                continue
            # A branch: move to its next child, if any.
            stack.pop()
            index += 1
            if index >= len(page.children):
                continue
            stack.append((page, index))
            child = self.db._page(page.children[index], (page.pgid, index), self.path)
            while True:
                if len(stack) >= MAX_DEPTH:
                    raise CorruptStoreError(
                        f"{self.db.where}: {_describe(self.path)}: tree deeper than "
                        f"{MAX_DEPTH} levels"
                    )
                if child.leaf:
                    stack.append((child, 0))
                    break
                stack.append((child, 0))
                child = self.db._page(child.children[0], (child.pgid, 0), self.path)


def walk(db: BoltFile, *, max_depth: int = MAX_DEPTH) -> Iterator[tuple[tuple[bytes, ...], Entry]]:
    """Every entry of the file, depth first, with the path of its bucket.

    Nested buckets are followed with an explicit stack, at most ``max_depth`` deep.
    """
    pending: list[Iterator[tuple[tuple[bytes, ...], Entry]]] = []

    def entries_of(bucket: Bucket) -> Iterator[tuple[tuple[bytes, ...], Entry]]:
        for entry in bucket.entries():
            yield bucket.path, entry

    pending.append(entries_of(db.root()))
    buckets: list[Bucket] = [db.root()]
    while pending:
        try:
            path, entry = next(pending[-1])
        except StopIteration:
            pending.pop()
            buckets.pop()
            continue
        yield path, entry
        if entry.is_bucket:
            if len(pending) >= max_depth:
                raise CorruptStoreError(
                    f"{db.where}: {_describe((*path, entry.key))}: buckets nested deeper than "
                    f"{max_depth} levels"
                )
            child = buckets[-1].bucket(entry.key)
            if child is None:
                raise CorruptStoreError(
                    f"{db.where}: {_describe((*path, entry.key))}: listed but cannot be opened"
                )
            buckets.append(child)
            pending.append(entries_of(child))


def read_consistent(open_fd: Callable[[], int], where: str, work: Callable[[BoltFile], T]) -> T:
    """``work(db)`` on a fresh open of the file, repeated until no commit happened meanwhile.

    A live writer (containerd) may commit and reuse the pages we are reading;
    then the result, or the corruption we saw, may be an artefact of the
    race, so the whole read is done again. A file that stays the same and is
    corrupt raises at once.
    """
    for _ in range(READ_ATTEMPTS):
        db = BoltFile(open_fd(), where)
        try:
            try:
                result = work(db)
            except CorruptStoreError:
                if db.changed():
                    continue
                raise
            if not db.changed():
                return result
        finally:
            db.close()
    raise CorruptStoreError(
        f"{where}: changed during each of {READ_ATTEMPTS} reads (a writer commits without pause)"
    )


def _parse_meta(data: bytes, page: int) -> tuple[Meta | None, str]:
    """A valid meta page from its first bytes, or None and why not."""
    if len(data) < PAGE_HEADER_SIZE + META_SIZE:
        return None, "truncated"
    for order in ("<", ">"):
        (magic,) = struct.unpack_from(order + "I", data, PAGE_HEADER_SIZE)
        if magic == MAGIC:
            break
    else:
        (magic,) = struct.unpack_from("<I", data, PAGE_HEADER_SIZE)
        return None, f"bad magic 0x{magic:08x}"
    body = data[PAGE_HEADER_SIZE : PAGE_HEADER_SIZE + META_SIZE]
    (_magic, version, page_size, flags, root, _sequence, freelist, high_water, txid,
     checksum) = struct.unpack(order + "IIIIQQQQQQ", body)  # fmt: skip
    if version != VERSION:
        return None, f"unsupported version {version}"
    if checksum != fnv1a64(body[:_CHECKSUMMED]):
        return None, "checksum mismatch"
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        return None, f"page size {page_size} out of range"
    return Meta(page, page_size, flags, root, freelist, high_water, txid, order), ""
