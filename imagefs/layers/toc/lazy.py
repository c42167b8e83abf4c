"""Lazy TOC layers (issue #14, the registry part): the TOC fetched by range, data on demand.

A registry layer with a TOC is mounted without downloading it: its footer
and its TOC are fetched (:func:`fetch_toc`), the TOC is checked against the
digest the layer's annotations give (``read_toc(..., require_digest=True)``:
the verified manifest is all that vouches for it), and the tree is built
from its entries. A read then fetches only the members (gzip members,
zstd frames) that hold the chunks it touches (:class:`LazyTocLayerData`),
decodes each chunk and checks it against its digest in the TOC *before* it
is served or kept: the bytes come from the network, and the chunk digests
are what makes them trustworthy. The blob digest is not checked then; it is
when (if) the whole blob is downloaded (the registry's ``--prefetch all``).

Where the bytes come from is a :class:`RangeSource` (the registry's Range
requests, :mod:`imagefs.registry.lazy`); this module does no network I/O.
What it keeps in the cache:

* the footer and compressed TOC as fetched (``TOC_FETCHED``), checked
  against the annotations again at every use, so a later mount, also
  ``--offline``, needs no traffic;
* the chunk table (:mod:`~.table`, shared with local TOC layers: both come
  from a TOC checked against the same digests);
* verified members (:mod:`~.chunkstore`).

Reads: the members a read needs that are in neither the decoded-chunk LRU
(:mod:`~.memcache`) nor the chunk store are fetched at once, adjacent ones
coalesced into one range (``COALESCE_GAP``, ``MAX_RANGE``); a member already
being fetched by another thread is waited for, not fetched twice. A chunk
that does not verify is EIO for that read (one line naming the layer and the
file) and is not kept; the members around it that did verify are.
"""

from __future__ import annotations

import bisect
import json
import logging
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from imagefs.cachedir import TOC_CHUNKS, TOC_FETCHED, write_atomically
from imagefs.digest import Digest
from imagefs.errors import CompressionError, ImageFSError, LayerError, NotCachedError, TocError
from imagefs.image import Layer
from imagefs.layers.plumbing import InUse, cache_path
from imagefs.layers.toc import zstdchunked
from imagefs.layers.toc.bookkeeping import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK
from imagefs.layers.toc.chunks import decode_chunk
from imagefs.layers.toc.chunkstore import ChunkStore
from imagefs.layers.toc.estargz import TOC_DIGEST_ANNOTATION
from imagefs.layers.toc.limits import NotServable
from imagefs.layers.toc.locate import TAIL_SIZE, TocLocation, locate
from imagefs.layers.toc.memcache import DECODED, new_owner
from imagefs.layers.toc.model import TOC_DATA_BASE, Toc, TocFormat
from imagefs.layers.toc.read import read_toc
from imagefs.layers.toc.table import ChunkTable, ChunkTableOnce

__all__ = [
    "COALESCE_GAP",
    "MAX_RANGE",
    "FetchedToc",
    "LazyTocLayerData",
    "RangeSource",
    "fetch_toc",
    "lazy_candidate",
    "parse_fetched",
    "toc_key",
]

log = logging.getLogger(__name__)

# Members closer than this are fetched in one request (the bytes between are
# tar headers and padding): a request costs a round trip, 16 KiB costs ~1 ms
# at 100 Mbit/s.
COALESCE_GAP = 16 << 10
# One request fetches at most this much (a 128 KiB FUSE read of a big file
# needs one 4 MiB eStargz chunk; prefetch batches are cut at this size).
MAX_RANGE = 8 << 20
# Compressed bytes fetched beyond a chunk's inner offset plus size: deflate
# and zstd expand incompressible data by a few bytes per block, so
# ``inner + size + slack`` holds the chunk; a member shorter than that is
# fetched whole. Should decoding need more, the rest of the member follows.
_SLACK = 4096
_NAMES_KEPT = 256  # file names remembered for messages about failed chunks
_LANDMARKS = (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)
_FETCHED_MAGIC = b"IMGFS-TF"
_U32 = struct.Struct("<I")
_MAX_HEADER = 1 << 16

_COMPRESSION = {TocFormat.ESTARGZ: "gzip", TocFormat.ZSTD_CHUNKED: "zstd"}


class RangeSource(Protocol):
    """Where a lazy layer's bytes come from, by offset in the blob (a registry)."""

    def fetch(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (blocking, thread-safe); ImageFSError if not."""
        ...


def _root_name(path: str) -> str:
    while path.startswith(("./", "/")):
        path = path[2:] if path.startswith("./") else path[1:]
    return path


def _short(layer: Layer) -> str:
    algorithm, _, hexdigest = layer.descriptor.digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}"


def lazy_candidate(layer: Layer) -> bool:
    """Whether the layer's annotations name a TOC digest, so it may be mounted lazily.

    Without one nothing vouches for a TOC fetched by range (the blob digest
    is not checked until the whole blob is here), so such a layer is
    downloaded instead.
    """
    annotations = dict(layer.descriptor.annotations)
    return (
        TOC_DIGEST_ANNOTATION in annotations
        or zstdchunked.annotation(annotations, zstdchunked.CHECKSUM) is not None
    )


def toc_key(location: TocLocation) -> str:
    """What names a TOC's derived files (as :mod:`~.local` names them): location and digests."""
    key = f"{location.format.value} {location.offset} {location.length} "
    key += f"{location.json_digest} {location.compressed_digest}"
    return Digest.of(key.encode()).encoded[:16]


# -- the TOC ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedToc:
    """A lazy layer's located TOC: where it is, and its compressed bytes if at hand.

    ``raw`` is None when the TOC was located from the cache and not read
    (a remount served from its persisted tree needs only the location).
    ``prefetch_end``: the TOC position of the eStargz ``.prefetch.landmark``
    (the entries before it are the prioritised files), 0 if none.
    """

    location: TocLocation
    tail: bytes = field(repr=False)
    raw: bytes | None = field(default=None, repr=False)
    prefetch_end: int = 0
    from_cache: bool = False

    @property
    def key(self) -> str:
        return toc_key(self.location)


def _fetched_path(cache_dir: str, layer: Layer) -> str:
    return cache_path(cache_dir, layer, TOC_FETCHED)


class _RawToc:
    """The compressed TOC as a :class:`~.read.BlobReader` (only its own range reads)."""

    def __init__(self, location: TocLocation, raw: bytes, where: str) -> None:
        self._location, self._raw, self._where = location, raw, where

    def read_at(self, offset: int, size: int) -> bytes:
        start = offset - self._location.offset
        if start < 0 or start + size > len(self._raw):
            raise TocError(f"{self._where}: {size} bytes at {offset} are outside the fetched TOC")
        return self._raw[start : start + size]


def _load_fetched(cache_dir: str, layer: Layer, *, with_raw: bool) -> FetchedToc | None:
    """The footer and TOC fetched by an earlier mount, located again; None if absent or bad."""
    path = _fetched_path(cache_dir, layer)
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_FETCHED_MAGIC) + _U32.size)
            if len(head) != len(_FETCHED_MAGIC) + _U32.size or not head.startswith(_FETCHED_MAGIC):
                raise ValueError("bad magic")
            (length,) = _U32.unpack_from(head, len(_FETCHED_MAGIC))
            if length > _MAX_HEADER:
                raise ValueError("header too long")
            header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
            if (header["version"], header["digest"], header["size"]) != (
                TOC_FETCHED.tag, layer.descriptor.digest, layer.descriptor.size,
            ):  # fmt: skip
                raise ValueError("a file of another layer or version")
            tail = bytes.fromhex(header["tail"])
            where = f"layer {layer.descriptor.digest}"
            location = locate(layer.descriptor.size, dict(layer.descriptor.annotations), tail,
                              where)  # fmt: skip
            if location is None or [location.offset, location.length] != header["toc"]:
                raise ValueError("its footer no longer locates its TOC")
            raw = handle.read(location.length + 1) if with_raw else None
            if raw is not None and len(raw) != location.length:
                raise ValueError("truncated")
            prefetch_end = int(header.get("prefetch_end", 0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, ImageFSError) as exc:
        log.warning("layer %s: fetched TOC %s is unusable (%s); fetching it again",
                    _short(layer), path, exc)  # fmt: skip
        return None
    return FetchedToc(location, tail, raw, prefetch_end, from_cache=True)


def _save_fetched(cache_dir: str, layer: Layer, fetched: FetchedToc) -> None:
    assert fetched.raw is not None
    header = json.dumps(
        {
            "version": TOC_FETCHED.tag,
            "digest": layer.descriptor.digest,
            "size": layer.descriptor.size,
            "tail": fetched.tail.hex(),
            "toc": [fetched.location.offset, fetched.location.length],
            "prefetch_end": fetched.prefetch_end,
        }
    ).encode()
    try:
        write_atomically(
            _fetched_path(cache_dir, layer),
            _FETCHED_MAGIC + _U32.pack(len(header)) + header + fetched.raw,
        )
    except OSError as exc:
        log.warning("layer %s: cannot keep its TOC in the cache: %s", _short(layer), exc)


def fetch_toc(
    layer: Layer,
    source: RangeSource | None,
    cache_dir: str | None,
    *,
    with_raw: bool = True,
) -> FetchedToc | None:
    """Locate the layer's TOC: from the cache, else with two Range requests (blocking).

    None if the layer has no TOC of the compression its media type says (it
    is then downloaded), or, with no ``source`` (``--offline``), if none was
    fetched before. ``with_raw=False`` skips reading a cached TOC's bytes
    (enough to name the layer's derived files). TocError for a footer that
    claims a TOC but cannot be right.
    """
    if cache_dir is not None:
        cached = _load_fetched(cache_dir, layer, with_raw=with_raw)
        if cached is not None:
            return cached
    if source is None:
        return None
    size = layer.descriptor.size
    where = f"layer {layer.descriptor.digest}"
    if size < 4:
        return None
    tail = source.fetch(size - min(size, TAIL_SIZE), min(size, TAIL_SIZE))
    location = locate(size, dict(layer.descriptor.annotations), tail, where)
    if location is None:
        return None
    media_type = layer.descriptor.media_type.lower()
    if not media_type.endswith(_COMPRESSION[location.format]):
        log.debug("layer %s: a %s TOC in a %s blob; downloading it", _short(layer),
                  location.format.value, media_type)  # fmt: skip
        return None
    raw = source.fetch(location.offset, location.length)
    return FetchedToc(location, tail, raw)


def parse_fetched(
    layer: Layer,
    fetched: FetchedToc,
    cache_dir: str | None,
    *,
    warn: Callable[[str], None],
) -> tuple[Toc, FetchedToc] | NotServable:
    """Verify and parse a fetched TOC; keep it (and its chunk table) in the cache.

    DigestMismatchError when it does not match the layer's annotated digest
    (which refuses the mount), TocError when no annotation gives one or the
    TOC is malformed. Returns the parsed TOC and ``fetched`` with its
    ``prefetch_end`` filled in.
    """
    assert fetched.raw is not None
    where = f"layer {layer.descriptor.digest}"
    toc = read_toc(_RawToc(fetched.location, fetched.raw, where), fetched.location, where=where,
                   warn=warn, require_digest=True)  # fmt: skip
    if isinstance(toc, NotServable):
        return toc
    prefetch_end = 0
    if TOC_DIGEST_ANNOTATION in dict(layer.descriptor.annotations):  # eStargz-written
        # The writer puts one landmark right after the prioritised files, or
        # .no.prefetch.landmark first when there are none (estargz.go): either
        # ends the search, which would otherwise test every entry's name.
        for position, entry in enumerate(toc.entries):
            if entry.path.endswith(_LANDMARKS):
                name = _root_name(entry.path)
                if name == PREFETCH_LANDMARK:
                    prefetch_end = position
                    break
                if name == NO_PREFETCH_LANDMARK:
                    break
    fetched = FetchedToc(fetched.location, fetched.tail, fetched.raw, prefetch_end,
                         fetched.from_cache)  # fmt: skip
    if cache_dir is not None:
        if not fetched.from_cache:
            _save_fetched(cache_dir, layer, fetched)
        table_path = cache_path(cache_dir, layer, TOC_CHUNKS, fetched.key)
        if ChunkTable.load(table_path, layer.descriptor.digest, fetched.key) is None:
            toc.chunks.save(table_path, layer.descriptor.digest, fetched.key)
    return toc, fetched


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Member:
    """One gzip member / zstd frame to fetch: its offset, the bytes wanted, its chunks."""

    offset: int
    want: int
    length: int
    chunks: tuple[int, ...]


class LazyTocLayerData:
    """Random access to a lazy layer's TOC data space (thread-safe; a LayerData).

    ``source`` is None offline: then only what the cache holds can be read.
    The chunk table is loaded on the first read (from the cache, else from
    the TOC, which is checked against the annotations again).
    """

    def __init__(
        self,
        layer: Layer,
        fetched: FetchedToc,
        source: RangeSource | None,
        cache_dir: str | None,
        *,
        reload_toc: Callable[[], FetchedToc | None] | None = None,
    ) -> None:
        self.layer = layer
        self.fetched = fetched
        self._source = source
        self._cache_dir = cache_dir
        self._reload_toc = reload_toc
        self._where = f"layer {layer.descriptor.digest}"
        self.store = ChunkStore(cache_dir, layer.descriptor.digest) if cache_dir else None
        self._lock = threading.Lock()
        self._in_use = InUse()
        self._owner = new_owner()
        key = fetched.key
        path = cache_path(cache_dir, layer, TOC_CHUNKS, key) if cache_dir is not None else None
        self._table = ChunkTableOnce(path, layer.descriptor.digest, key, self._parsed_toc)
        self._inflight: dict[int, threading.Event] = {}
        self._names: dict[int, str] = {}
        self.fetched_bytes = 0  # for tests and the bench: what this layer's reads fetched

    # -- the chunk table ---------------------------------------------------------------

    def chunk_table(self) -> ChunkTable:
        return self._table.get()

    def _parsed_toc(self) -> Toc:
        fetched = self.fetched if self.fetched.raw is not None else None
        if fetched is None and self._reload_toc is not None:
            fetched = self._reload_toc()
        if fetched is None or fetched.raw is None:
            raise NotCachedError(f"{self._where}: its TOC is not in the cache (--offline)")
        if fetched.key != self.fetched.key:
            raise TocError(f"{self._where}: its TOC moved since the mount began")
        parsed = parse_fetched(self.layer, fetched, self._cache_dir, warn=log.debug)
        if isinstance(parsed, NotServable):
            raise LayerError(f"{self._where}: its TOC cannot be served: {parsed.reason}")
        return parsed[0]

    def _file_name(self, table: ChunkTable, index: int) -> str:
        position = table.entry_index[index]
        name = self._names.get(position)
        if name is None:
            name = f"TOC entry {position}"
            try:
                toc = self._parsed_toc()
                name = repr(toc.entries[position].path)
            except (ImageFSError, IndexError):
                pass
            if len(self._names) < _NAMES_KEPT:
                self._names[position] = name
        return name

    # -- members -----------------------------------------------------------------------

    def _member(self, table: ChunkTable, index: int) -> _Member:
        """The member holding chunk ``index`` and every chunk of the table in it."""
        offset = table.offsets[index]
        first = last = index
        while first > 0 and table.offsets[first - 1] == offset:
            first -= 1
        while last + 1 < len(table) and table.offsets[last + 1] == offset:
            last += 1
        chunks = tuple(range(first, last + 1))
        length = max(table.lengths[i] for i in chunks)
        need = max(table.inner[i] + table.sizes[i] for i in chunks) + _SLACK
        return _Member(offset, min(length, need), length, chunks)

    def _decode_member(self, table: ChunkTable, member: _Member, data: bytes) -> dict[int, bytes]:
        """Every chunk of ``member`` from its bytes, each verified; raises on the first bad one."""
        decoded = {}
        for index in member.chunks:
            chunk = table.chunk(index)
            try:
                decoded[index] = decode_chunk(table.format, chunk, data, where=self._where)
            except ImageFSError as exc:
                raise type(exc)(f"{exc} (file {self._file_name(table, index)})") from exc
        return decoded

    def _from_store(self, table: ChunkTable, member: _Member) -> dict[int, bytes] | None:
        if self.store is None:
            return None
        data = self.store.get(member.offset, member.length)
        if data is None:
            return None
        try:
            return self._decode_member(table, member, data)
        except ImageFSError as exc:
            # Decoded and checked on every use: a cache file changed on disk
            # is fetched again, never served.
            log.warning("%s; the cached copy is dropped and fetched again", exc)
            return None

    def _fetch(
        self, groups: list[list[_Member]]
    ) -> tuple[dict[int, bytes], dict[int, ImageFSError]]:
        """Fetch each group of members with one request; decode, verify and keep them.

        Returns the decoded chunks by index, and the error of each member
        (by offset) that did not verify: those are neither served nor kept.
        """
        table = self.chunk_table()
        decoded: dict[int, bytes] = {}
        errors: dict[int, ImageFSError] = {}
        for group in groups:
            start = group[0].offset
            end = max(member.offset + member.want for member in group)
            if self._source is None:
                error = NotCachedError(
                    f"{self._where}: blob bytes {start}-{end} are not in the cache (--offline)"
                )
                errors.update((member.offset, error) for member in group)
                continue
            data = self._source.fetch(start, end - start)
            with self._lock:
                self.fetched_bytes += len(data)
            log.debug("layer %s: fetched %d bytes at blob offset %d (%d members)",
                      _short(self.layer), len(data), start, len(group))  # fmt: skip
            for member in group:
                piece = data[member.offset - start : member.offset - start + member.want]
                try:
                    try:
                        chunks = self._decode_member(table, member, piece)
                    except CompressionError:
                        if member.want >= member.length:
                            raise
                        # Expanded past the slack (incompressible data): the rest of it.
                        rest = self._source.fetch(
                            member.offset + len(piece), member.length - len(piece)
                        )
                        with self._lock:
                            self.fetched_bytes += len(rest)
                        piece += rest
                        chunks = self._decode_member(table, member, piece)
                except ImageFSError as exc:
                    errors[member.offset] = exc
                    continue
                if self.store is not None:
                    self.store.put(member.offset, piece)
                for index, chunk_data in chunks.items():
                    DECODED.put((self._owner, index), chunk_data)
                decoded.update(chunks)
        return decoded, errors

    def _known(self, table: ChunkTable, member: _Member) -> dict[int, bytes] | None:
        """The member's chunks from memory or disk, or None."""
        cached = {index: DECODED.get((self._owner, index)) for index in member.chunks}
        if all(data is not None for data in cached.values()):
            return {index: data for index, data in cached.items() if data is not None}
        stored = self._from_store(table, member)
        if stored is not None:
            for index, data in stored.items():
                DECODED.put((self._owner, index), data)
        return stored

    def _chunks(self, indices: Iterable[int]) -> dict[int, bytes]:
        """The decoded chunks ``indices`` (blocking): memory, then disk, then the network."""
        table = self.chunk_table()
        found: dict[int, bytes] = {}
        missing: dict[int, _Member] = {}
        for index in indices:
            data = DECODED.get((self._owner, index))
            if data is not None:
                found[index] = data
                continue
            member = self._member(table, index)
            if member.offset in missing or index in found:
                continue
            stored = self._from_store(table, member)
            if stored is not None:
                for chunk_index, chunk_data in stored.items():
                    DECODED.put((self._owner, chunk_index), chunk_data)
                found.update(stored)
                continue
            missing[member.offset] = member
        # Twice: a member another thread was fetching may not have arrived.
        for _ in range(2):
            if not missing:
                return found
            mine, theirs = self._claim(list(missing.values()))
            try:
                decoded, errors = self._fetch(_coalesce(mine)) if mine else ({}, {})
            finally:
                self._release(mine)
            if errors:
                raise next(iter(errors.values()))
            found.update(decoded)
            for member in mine:
                del missing[member.offset]
            for event in theirs.values():
                event.wait()
            still: dict[int, _Member] = {}
            for offset, member in missing.items():
                known = self._known(table, member)
                if known is None:
                    still[offset] = member
                else:
                    found.update(known)
            missing = still
        if missing:
            raise LayerError(
                f"{self._where}: the chunks at blob offsets {sorted(missing)[:4]} did not arrive"
            )
        return found

    def _claim(self, members: list[_Member]) -> tuple[list[_Member], dict[int, threading.Event]]:
        mine: list[_Member] = []
        theirs: dict[int, threading.Event] = {}
        with self._lock:
            for member in members:
                event = self._inflight.get(member.offset)
                if event is None:
                    self._inflight[member.offset] = threading.Event()
                    mine.append(member)
                else:
                    theirs[member.offset] = event
        return mine, theirs

    def _release(self, members: list[_Member]) -> None:
        with self._lock:
            for member in members:
                event = self._inflight.pop(member.offset, None)
                if event is not None:
                    event.set()

    # -- LayerData ---------------------------------------------------------------------

    def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer only at the end (blocking, may fetch)."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size ({offset}, {size})")
        if offset < TOC_DATA_BASE:
            raise LayerError(f"{self._where}: a lazy layer has no tar stream offsets ({offset})")
        with self._in_use:
            table = self.chunk_table()
            start = offset - TOC_DATA_BASE
            end = min(start + size, table.data_size)
            if start >= end:
                return b""
            first = bisect.bisect_right(table.starts, start) - 1
            last = bisect.bisect_right(table.starts, end - 1) - 1
            chunks = self._chunks(range(first, last + 1))
            parts: list[bytes | memoryview] = []
            pos = start
            for index in range(first, last + 1):
                chunk_start = table.starts[index]
                piece = memoryview(chunks[index])[pos - chunk_start : end - chunk_start]
                parts.append(piece)
                pos += len(piece)
            return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    # -- prefetch ----------------------------------------------------------------------

    def prefetch_indices(self, landmark_only: bool) -> list[int]:
        """The chunks to prefetch: the prioritised files' (eStargz landmark), or all."""
        table = self.chunk_table()
        if not landmark_only:
            return list(range(len(table)))
        end = self.fetched.prefetch_end
        return [index for index in range(len(table)) if table.entry_index[index] < end]

    def prefetch(self, indices: list[int], stop: threading.Event) -> int:
        """Fetch and keep the chunks ``indices`` not yet in the cache, in batches; bytes fetched.

        Errors are the caller's to log; ``stop`` ends it between batches.
        """
        table = self.chunk_table()
        before = self.fetched_bytes
        batch: list[int] = []
        batch_bytes = 0
        last_offset = -1
        for index in indices:
            if stop.is_set():
                break
            offset = table.offsets[index]
            if offset == last_offset:
                continue
            last_offset = offset
            if self.store is not None and self.store.has(offset):
                continue
            batch.append(index)
            batch_bytes += table.lengths[index]
            if batch_bytes >= MAX_RANGE:
                with self._in_use:
                    self._chunks(batch)
                batch, batch_bytes = [], 0
        if batch and not stop.is_set():
            with self._in_use:
                self._chunks(batch)
        return self.fetched_bytes - before

    def local_bytes(self) -> int:
        return self.store.local_bytes() if self.store is not None else 0

    def close(self) -> None:
        if not self._in_use.close():
            return
        DECODED.drop(self._owner)

    def __enter__(self) -> LazyTocLayerData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _coalesce(members: list[_Member]) -> list[list[_Member]]:
    """Members in blob order, grouped where each starts within COALESCE_GAP of the group's end."""
    groups: list[list[_Member]] = []
    end = 0
    for member in sorted(members, key=lambda m: m.offset):
        member_end = member.offset + member.want
        if (
            groups
            and member.offset - end <= COALESCE_GAP
            and (member_end - groups[-1][0].offset <= MAX_RANGE)
        ):
            groups[-1].append(member)
            end = max(end, member_end)
        else:
            groups.append([member])
            end = member_end
    return groups
