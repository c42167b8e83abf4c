"""Local TOC layers (issue #14 item 4): indexed from the TOC, read chunk by chunk.

An eStargz or zstd:chunked layer in an OCI layout, oci-archive or
docker-archive is indexed from its table of contents (a footer read and the
TOC read with ``pread``) instead of being decompressed whole, and a file's
data is served by decoding only the chunks a read touches, each verified
against the TOC's digest before it is served or cached.

Trust chain, locally: the layer's descriptor digest covers the whole blob,
TOC included, so the blob is hashed once (sha256 at ~1.7 GB/s, far cheaper
than decompressing) before its TOC is trusted; the TOC is also checked
against the digests its annotations give, before it is parsed. Later mounts
reuse the layer index and skip the hash when the blob is the very file that
was verified (:mod:`imagefs.layers.index`), and a tree persisted from it is
only served for that same file (:mod:`imagefs.tree.persisted`). Each chunk
is verified against its TOC digest when read, so a blob corrupted after it
was verified gives EIO for the files whose chunks it hits, and only those.

For a registry the reasoning changes: a lazy mount must not download (or
hash) the whole blob, so the chain runs through the manifest instead. The
manifest is verified against its digest; its layer annotations (eStargz
``toc.digest``, zstd:chunked ``manifest-checksum``) are then trusted and the
TOC is verified against them (:func:`imagefs.layers.toc.read.read_toc` with
``require_digest=True``); the chunk digests in that TOC then vouch for every
chunk fetched by Range. The blob digest is never checked, and need not be:
what is served is exactly what the TOC describes. (That TOC may differ from
the tar stream it sits in; a lazy reader, like stargz-snapshotter, serves the
TOC's view.)

Layers still downloading are read the ordinary way (their pass streams
while they arrive), and so is a layer whose TOC is well formed but too big
to serve chunk by chunk (:class:`~.limits.NotServable`). Their entries keep
tar stream offsets, below ``TOC_DATA_BASE``; :class:`TocLayerData` hands
those to the layer's ordinary reader, so whichever way a layer was indexed,
its reads land in the right place.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from imagefs.cachedir import TOC_CHUNKS, TOC_INDEX
from imagefs.digest import Digest
from imagefs.errors import ImageFSError, LayerError
from imagefs.image import Layer
from imagefs.layers import index as layer_index
from imagefs.layers.entry import TarEntry
from imagefs.layers.plumbing import DigestCheck, InUse, cache_path, digest_check
from imagefs.layers.toc.blob import LayerBlob, find_toc
from imagefs.layers.toc.bookkeeping import mark_bookkeeping
from imagefs.layers.toc.chunks import decode_chunk_from
from imagefs.layers.toc.limits import NotServable
from imagefs.layers.toc.locate import TocLocation
from imagefs.layers.toc.memcache import CHUNK_CACHE_BYTES, DECODED, new_owner, set_chunk_cache_bytes
from imagefs.layers.toc.model import TOC_DATA_BASE, Chunk, Toc, TocFormat
from imagefs.layers.toc.read import read_toc
from imagefs.layers.toc.table import ChunkTable, ChunkTableOnce

__all__ = [
    "CHUNK_CACHE_BYTES",
    "TocLayerData",
    "open_toc_layer_data",
    "scan_toc_layer",
    "set_chunk_cache_bytes",
]

log = logging.getLogger(__name__)

_FIRST_READ_SLACK = 4096  # compressed bytes beyond the chunk's size read at once
_READ_PIECE = 1 << 20
_NAMES_KEPT = 256  # file names remembered for messages about failed chunks

_COMPRESSION = {TocFormat.ESTARGZ: "gzip", TocFormat.ZSTD_CHUNKED: "zstd"}


class RandomAccess(Protocol):
    """What :func:`imagefs.layers.reader.open_layer_data` returns (its LayerData)."""

    def pread(self, offset: int, size: int) -> bytes: ...

    def close(self) -> None: ...


def _short(layer: Layer) -> str:
    algorithm, _, hexdigest = layer.descriptor.digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}"


def _located(blob: LayerBlob, compression: str) -> TocLocation | None:
    location = find_toc(blob)
    if location is None or _COMPRESSION[location.format] != compression:
        return None
    return location


# -- indexing ---------------------------------------------------------------------------


def _toc_key(location: TocLocation) -> str:
    """What names a TOC's derived files: its location and the digests it was checked by.

    The TOC index and chunk table hold what a TOC checked against the digests
    the layer's annotations gave; a layer with other annotations (the same
    blob under another manifest) must check its TOC again, not reuse them.
    """
    key = f"{location.format.value} {location.offset} {location.length} "
    key += f"{location.json_digest} {location.compressed_digest}"
    return Digest.of(key.encode()).encoded[:16]


def _table_path(cache_dir: str, layer: Layer, location: TocLocation) -> str:
    return cache_path(cache_dir, layer, TOC_CHUNKS, _toc_key(location))


def scan_toc_layer(
    layer: Layer,
    compression: str,
    *,
    cache_dir: str | None,
    hasher: DigestCheck | None,
    warn: Callable[[str], None],
) -> list[TarEntry] | None:
    """The layer's entries from its TOC (blocking); None to read it the ordinary way.

    None for a layer still downloading, one without a TOC, or one whose TOC
    cannot be served chunk by chunk (logged at debug). ``compression`` is
    what the blob's first bytes say (``"gzip"``, ``"zstd"``). The blob's
    digest is verified before the entries are returned (DigestMismatchError);
    the TOC against its annotated digests before it is parsed (the same);
    TocError for a TOC that is malformed or inconsistent. Entries of an
    earlier scan come from the cache (verifying the blob unless it is the
    very file indexed then), with the warnings that scan gave.
    """
    if layer.blob.feed is not None or compression not in _COMPRESSION.values():
        return None
    with LayerBlob(layer) as blob:
        location = _located(blob, compression)
        if location is None:
            return None
        key = _toc_key(location)
        if cache_dir is not None:
            cached = layer_index.load(cache_dir, layer, hasher, version=TOC_INDEX, key=key)
            if cached is not None:
                entries, replayed = cached
                for message in replayed:
                    warn(message)
                log.debug("layer %s: entries from its cached TOC index", _short(layer))
                return entries
        # Hash the blob while the TOC is read and parsed: the entries are
        # trusted only once both are done.
        check = hasher or digest_check(layer)
        warnings: list[str] = []

        def warn_toc(message: str) -> None:
            warnings.append(message)
            warn(message)

        try:
            toc = read_toc(blob, location, where=blob.where, warn=warn_toc)
            if isinstance(toc, NotServable):
                log.debug(
                    "layer %s: %s, so it is read as an ordinary layer", _short(layer), toc.reason
                )
                check.cancel()
                return None
            check.verify()
        except BaseException:
            check.cancel()
            raise
    entries = mark_bookkeeping(layer, toc.entries)
    chunks = len(toc.chunks)
    log.debug(
        "layer %s: %d entries, %d chunks from its %s TOC (%d TOC bytes read, the blob "
        "hashed, no file data decompressed)",
        _short(layer), len(entries), chunks, toc.format.value, location.length,
    )  # fmt: skip
    if cache_dir is not None:
        layer_index.save(cache_dir, layer, entries, warnings, version=TOC_INDEX, key=key)
        # What the daemon's first read of this layer needs, so it need not parse again.
        toc.chunks.save(_table_path(cache_dir, layer, location), layer.descriptor.digest,
                   _toc_key(location))  # fmt: skip
    return entries


# -- reading ----------------------------------------------------------------------------


class TocLayerData:
    """Random access to a TOC layer (thread-safe; a LayerData).

    Offsets from ``TOC_DATA_BASE`` up are the TOC's data space: each read
    decodes the chunks it touches (or takes them from the shared cache), each
    verified. Offsets below are the tar stream's, for a layer that was
    indexed the ordinary way: they go to ``open_stream`` 's reader, opened on
    first use. The TOC itself is read and checked on the first read of the
    data space (a remount served from its persisted tree reads none), and
    kept as a compact chunk table.
    """

    def __init__(
        self,
        layer: Layer,
        location: TocLocation,
        open_stream: Callable[[], RandomAccess],
        cache_dir: str | None = None,
    ) -> None:
        self._layer = layer
        self._location = location
        self._cache_dir = cache_dir
        self._open_stream = open_stream
        self._blob = LayerBlob(layer)
        self._where = f"layer {layer.descriptor.digest}"
        self._lock = threading.Lock()
        self._in_use = InUse()
        self._owner = new_owner()
        path = _table_path(cache_dir, layer, location) if cache_dir is not None else None
        self._table = ChunkTableOnce(
            path, layer.descriptor.digest, _toc_key(location), self._parse_toc
        )
        self._stream: RandomAccess | None = None
        self._names: dict[int, str] = {}  # of files whose chunks failed

    # -- the tar stream's offsets -----------------------------------------------------

    def _stream_data(self) -> RandomAccess:
        with self._lock:
            if self._stream is None:
                self._stream = self._open_stream()
            return self._stream

    # -- the TOC's data space ------------------------------------------------------------

    def _parse_toc(self) -> Toc:
        toc = read_toc(self._blob, self._location, where=self._where, warn=log.debug)
        if isinstance(toc, NotServable):
            raise LayerError(f"{self._where}: its TOC cannot be served: {toc.reason}")
        return toc

    def _file_name(self, table: ChunkTable, index: int) -> str:
        """The name of the file chunk ``index`` belongs to, for messages.

        The chunk table keeps no names (the daemon keeps it for good): an
        error reads the TOC again, once per chunk that fails.
        """
        position = table.entry_index[index]
        name = self._names.get(position)
        if name is None:
            name = f"TOC entry {position}"
            try:
                toc = read_toc(self._blob, self._location, where=self._where, warn=log.debug)
                if not isinstance(toc, NotServable):
                    name = repr(toc.entries[position].path)
            except (ImageFSError, IndexError):
                pass
            if len(self._names) < _NAMES_KEPT:
                self._names[position] = name
        return name

    def _pieces(self, chunk: Chunk) -> Iterator[bytes]:
        # The first read takes what the chunk should need (its size is an
        # upper bound for all but incompressible data), the rest as asked.
        start, end = chunk.offset, chunk.offset + chunk.length
        want = min(end - start, chunk.inner_offset + chunk.size + _FIRST_READ_SLACK)
        while start < end:
            piece = self._blob.read_at(start, want)
            start += len(piece)
            yield piece
            want = min(end - start, _READ_PIECE)

    def _decoded(self, table: ChunkTable, index: int) -> bytes:
        key = (self._owner, index)
        data = DECODED.get(key)
        if data is not None:
            return data
        chunk = table.chunk(index)
        try:
            data = decode_chunk_from(table.format, chunk, self._pieces(chunk), where=self._where)
        except ImageFSError as exc:
            # One line that names the layer and the file (the daemon logs it
            # and answers EIO for this read only).
            name = self._file_name(table, index)
            raise type(exc)(f"{exc} (file {name})") from exc
        log.debug(
            "layer %s: decoded a chunk: %d bytes from %d compressed at blob offset %d",
            _short(self._layer), chunk.size, chunk.length, chunk.offset,
        )  # fmt: skip
        DECODED.put(key, data)
        return data

    def _read_toc_space(self, start: int, size: int) -> bytes:
        table = self._table.get()
        end = min(start + size, table.data_size)
        if start >= end:
            return b""
        index = bisect.bisect_right(table.starts, start) - 1
        parts: list[bytes | memoryview] = []
        pos = start
        while pos < end:
            data = self._decoded(table, index)
            chunk_start = table.starts[index]
            piece = memoryview(data)[pos - chunk_start : end - chunk_start]
            parts.append(piece)
            pos += len(piece)
            index += 1
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    # -- LayerData ------------------------------------------------------------------------

    def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer only at the end (blocking)."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size ({offset}, {size})")
        with self._in_use:
            if offset < TOC_DATA_BASE:
                return self._stream_data().pread(offset, size)
            return self._read_toc_space(offset - TOC_DATA_BASE, size)

    def close(self) -> None:
        if not self._in_use.close():
            return
        DECODED.drop(self._owner)
        if self._stream is not None:
            self._stream.close()
        self._blob.close()

    def __enter__(self) -> TocLayerData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_toc_layer_data(
    layer: Layer,
    compression: str,
    cache_dir: str | None,
    open_stream: Callable[[], RandomAccess],
) -> TocLayerData | None:
    """A reader for ``layer`` if it has a TOC (two small reads); None otherwise.

    ``open_stream`` opens the layer's ordinary reader, used only for offsets
    in the tar stream (a layer indexed the ordinary way). A layer still
    downloading is never read through its TOC, as it is never indexed so.
    ``cache_dir``: where the scan left the layer's chunk table.
    """
    if layer.blob.feed is not None or compression not in _COMPRESSION.values():
        return None
    with LayerBlob(layer) as blob:
        location = _located(blob, compression)
    if location is None:
        return None
    return TocLayerData(layer, location, open_stream, cache_dir)
