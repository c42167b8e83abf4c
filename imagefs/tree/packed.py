"""The merged tree persisted as one file, served through ``mmap``.

Merging is done once per image; the result is written here and every later
mount opens it instead of scanning the layers again. Reading costs no Python
object per entry: records are unpacked from the mapping on demand, so a
lookup costs the same for 2 layers or 100, and memory stays with the kernel's
page cache instead of the daemon's heap.

File layout (little endian), version ``imagefs.cachedir.TREE.number``::

    header   magic, version, counts, section offsets, CRC-32 of the body
    sources  JSON: what the tree was built from (layer digests and, for local
             blobs, each file's identity) -- a mismatch means stale
    inodes   fixed-size records, inode N at index N-1 (see _INODE)
    dirents  per directory a run of (name offset, name length, inode),
             sorted by name bytes so lookups bisect
    pool     names, symlink targets, xattrs and sparse maps

A truncated, corrupted (CRC mismatch), stale or older-version file is never
served: :func:`open_packed_tree` returns None and the caller rebuilds.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, overload

from imagefs.cachedir import TREE, AtomicFile
from imagefs.layers.entry import EntryType
from imagefs.tree.merged import NAME_ENCODING, NO_XATTRS, children_in_byte_order
from imagefs.tree.overlay import Node
from imagefs.tree.served import ROOT_INO, Attributes, Inode, Stat, Tree

MAGIC = b"IMGFSTRE"

# magic, version, inode count, dirent count, total file size, sources offset,
# sources length, inodes offset, dirents offset, pool offset, body CRC-32
_HEADER = struct.Struct("<8sIIQQQQQQQI")
# type, mode, uid, gid, nlink, parent, layer, size, mtime_ns, rdev,
# data_offset, first dirent, dirent count, extra offset, extra length
_INODE = struct.Struct("<BxxxIIIIIiQqQQIIQI4x")
_DIRENT = struct.Struct("<QII")
_U32 = struct.Struct("<I")
_U64PAIR = struct.Struct("<QQ")
# Where the fields patched after the fact sit inside an _INODE record.
_NLINK_AT = 16
_RUN = struct.Struct("<II")  # first dirent, dirent count
_RUN_AT = 60
_NO_SPARSE = 0xFFFFFFFF


class _Pool:
    """Append-only byte pool with offsets."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, blob: bytes) -> int:
        offset = len(self.data)
        self.data += blob
        return offset


def _encode_extra(node: Attributes) -> bytes:
    """Symlink target, xattrs and sparse map; b"" when the node has none."""
    if not node.target and not node.xattrs and node.sparse is None:
        return b""
    target = node.target.encode(*NAME_ENCODING)
    out = bytearray(_U32.pack(len(target)) + target)
    out += _U32.pack(len(node.xattrs))
    for name, value in node.xattrs.items():
        encoded = name.encode(*NAME_ENCODING)
        out += _U32.pack(len(encoded)) + encoded + _U32.pack(len(value)) + value
    if node.sparse is None:
        out += _U32.pack(_NO_SPARSE)
    else:
        out += _U32.pack(len(node.sparse))
        for offset, length in node.sparse:
            out += _U64PAIR.pack(offset, length)
    return bytes(out)


def _decode_extra(
    blob: bytes,
) -> tuple[str, Mapping[str, bytes], tuple[tuple[int, int], ...] | None]:
    (length,) = _U32.unpack_from(blob, 0)
    position = 4 + length
    target = os.fsdecode(blob[4:position])
    (count,) = _U32.unpack_from(blob, position)
    position += 4
    xattrs: dict[str, bytes] = {}
    for _ in range(count):
        (name_len,) = _U32.unpack_from(blob, position)
        name = os.fsdecode(blob[position + 4 : position + 4 + name_len])
        position += 4 + name_len
        (value_len,) = _U32.unpack_from(blob, position)
        xattrs[name] = blob[position + 4 : position + 4 + value_len]
        position += 4 + value_len
    (sparse_count,) = _U32.unpack_from(blob, position)
    position += 4
    sparse = None
    if sparse_count != _NO_SPARSE:
        sparse = tuple(_U64PAIR.unpack_from(blob, position + 16 * i) for i in range(sparse_count))
    return target, MappingProxyType(xattrs) if xattrs else NO_XATTRS, sparse


def write_packed_tree(tree: Tree, path: Path, sources: dict[str, Any]) -> None:
    """Persist a finished ``tree`` atomically (temporary file, then rename)."""
    pool = _Pool()
    inodes = bytearray()
    dirents = bytearray()
    dirent_count = 0
    for ino in range(1, tree.count + 1):
        inode = tree.get(ino)
        assert inode is not None
        listing = tree.listing(ino)
        first, count = dirent_count, 0
        if listing is not None:
            for name, child in listing:
                dirents += _DIRENT.pack(pool.add(name), len(name), child)
            count = len(listing)
            dirent_count += count
        inodes += _pack_inode(
            inode, pool, nlink=inode.nlink, parent=inode.parent, first=first, count=count
        )
    _write_file(
        path, sources, inodes=inodes, dirents=dirents, pool=pool,
        inode_count=tree.count, dirent_count=dirent_count, total_size=tree.total_size,
    )  # fmt: skip


def write_packed_root(root: Node, path: Path, sources: dict[str, Any]) -> None:
    """Persist the tree under a merged ``root`` directly, numbering as ``freeze`` does.

    One pass with no object per inode: a record is packed when its node is
    first met and patched later where only later is known (a directory's
    entries and link count, a hardlinked file's name count). Building a
    million-entry image this way skips ``freeze``'s million ``Inode`` objects.
    """
    pool = _Pool()
    inodes = bytearray()
    dirents = bytearray()
    ino_of: dict[int, int] = {}  # id(node) -> ino; nodes stay alive in the tree
    extra_names: dict[int, int] = {}  # ino -> names beyond the first (hardlinks)
    total_size = 0
    pack_dirent, directory_type = _DIRENT.pack, EntryType.DIRECTORY
    ino_of[id(root)] = ROOT_INO
    inodes.extend(_pack_inode(root, pool, nlink=2, parent=ROOT_INO))
    dirent_count = 0
    stack: list[tuple[Node, int]] = [(root, ROOT_INO)]
    while stack:
        directory, directory_ino = stack.pop()
        children = children_in_byte_order(directory)
        new_dirs: list[tuple[Node, int]] = []
        subdirectories = 0
        for name, child in children:
            key = id(child)
            child_ino = ino_of.get(key)
            is_dir = child.type is directory_type
            if child_ino is None:
                child_ino = len(ino_of) + 1
                ino_of[key] = child_ino
                nlink = 2 if is_dir else 1
                inodes.extend(_pack_inode(child, pool, nlink=nlink, parent=directory_ino))
                if is_dir:
                    new_dirs.append((child, child_ino))
                elif child.type is EntryType.FILE:
                    total_size += child.size
            else:
                extra_names[child_ino] = extra_names.get(child_ino, 0) + 1
            dirents.extend(pack_dirent(pool.add(name), len(name), child_ino))
            if is_dir:
                subdirectories += 1
        at = (directory_ino - 1) * _INODE.size
        _U32.pack_into(inodes, at + _NLINK_AT, 2 + subdirectories)
        _RUN.pack_into(inodes, at + _RUN_AT, dirent_count, len(children))
        dirent_count += len(children)
        # Depth first in name order, as freeze numbers them.
        stack.extend(reversed(new_dirs))
    for ino, extra in extra_names.items():
        _U32.pack_into(inodes, (ino - 1) * _INODE.size + _NLINK_AT, 1 + extra)
    _write_file(
        path, sources, inodes=inodes, dirents=dirents, pool=pool,
        inode_count=len(ino_of), dirent_count=dirent_count, total_size=total_size,
    )  # fmt: skip


def _pack_inode(
    node: Attributes, pool: _Pool, *, nlink: int, parent: int, first: int = 0, count: int = 0
) -> bytes:
    extra = _encode_extra(node)
    extra_offset = pool.add(extra) if extra else 0  # most nodes have none: b""
    return _INODE.pack(
        int(node.type), node.mode, node.uid, node.gid, nlink, parent,
        node.layer, node.size, node.mtime_ns, node.rdev, node.data_offset,
        first, count, extra_offset, len(extra),
    )  # fmt: skip


def _write_file(
    path: Path,
    sources: dict[str, Any],
    *,
    inodes: bytearray,
    dirents: bytearray,
    pool: _Pool,
    inode_count: int,
    dirent_count: int,
    total_size: int,
) -> None:
    """Header, body and an atomic rename: readers see the old file or the new."""
    sources_blob = json.dumps(sources, sort_keys=True).encode()
    sources_offset = _HEADER.size
    inodes_offset = sources_offset + len(sources_blob)
    dirents_offset = inodes_offset + len(inodes)
    pool_offset = dirents_offset + len(dirents)
    crc = zlib.crc32(pool.data, zlib.crc32(dirents, zlib.crc32(inodes, zlib.crc32(sources_blob))))
    header = _HEADER.pack(
        MAGIC, TREE.number, inode_count, dirent_count, total_size,
        sources_offset, len(sources_blob), inodes_offset, dirents_offset, pool_offset, crc,
    )  # fmt: skip
    # Not durable: the body's CRC is checked on every open, and a torn tree
    # is rebuilt. AtomicFile's explicit mode: a tree another local user could
    # replace would be served by the next mount (SECURITY.md).
    with AtomicFile(path, mode=0o644) as out:
        for part in (header, sources_blob, inodes, dirents, pool.data):
            out.file.write(part)


class PackedTree:
    """A merged tree read from a packed file (:class:`~imagefs.tree.served.Tree`).

    Nothing is held per inode: records are decoded from the mapping on demand.
    """

    def __init__(
        self, mapping: mmap.mmap, header: tuple[Any, ...], sources: dict[str, Any]
    ) -> None:
        self._map = mapping
        (_, _, self.count, self._dirent_count, self.total_size, _, _,
         self._inodes_offset, self._dirents_offset, self._pool_offset, _) = header  # fmt: skip
        self.sources = sources

    def close(self) -> None:
        self._map.close()

    def _record(self, ino: int) -> tuple[Any, ...]:
        return _INODE.unpack_from(self._map, self._inodes_offset + (ino - 1) * _INODE.size)

    def _pool(self, offset: int, length: int) -> bytes:
        start = self._pool_offset + offset
        return self._map[start : start + length]

    def _dirent(self, index: int) -> tuple[bytes, int]:
        name_offset, name_len, ino = _DIRENT.unpack_from(
            self._map, self._dirents_offset + index * _DIRENT.size
        )
        return self._pool(name_offset, name_len), ino

    def get(self, ino: int) -> Inode | None:
        if not 0 < ino <= self.count:
            return None
        (kind, mode, uid, gid, nlink, parent, layer, size, mtime_ns, rdev, data_offset,
         _, _, extra_offset, extra_len) = self._record(ino)  # fmt: skip
        target, xattrs, sparse = "", NO_XATTRS, None
        if extra_len:
            target, xattrs, sparse = _decode_extra(self._pool(extra_offset, extra_len))
        return Inode(ino, EntryType(kind), mode, uid, gid, mtime_ns, layer, size, target,
                     rdev, xattrs, data_offset, sparse, nlink, parent)  # fmt: skip

    def stat(self, ino: int) -> Stat | None:
        if not 0 < ino <= self.count:
            return None
        (kind, mode, uid, gid, nlink, _, _, size, mtime_ns, rdev, _, _, _,
         extra_offset, extra_len) = self._record(ino)  # fmt: skip
        stored = size
        if extra_len and kind == EntryType.FILE:
            sparse = _decode_extra(self._pool(extra_offset, extra_len))[2]
            if sparse is not None:
                stored = sum(length for _, length in sparse)
        return Stat(ino, EntryType(kind), mode, nlink, uid, gid, rdev, size, stored, mtime_ns)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        if not 0 < parent <= self.count:
            return None
        record = self._record(parent)
        if record[0] != EntryType.DIRECTORY:
            return None
        if name == b".":
            return self.get(parent)
        if name == b"..":
            return self.get(record[5])
        low, high = record[11], record[11] + record[12]
        while low < high:
            middle = (low + high) // 2
            candidate, ino = self._dirent(middle)
            if candidate == name:
                return self.get(ino)
            if candidate < name:
                low = middle + 1
            else:
                high = middle
        return None

    def listing(self, ino: int) -> Sequence[tuple[bytes, int]] | None:
        if not 0 < ino <= self.count:
            return None
        record = self._record(ino)
        if record[0] != EntryType.DIRECTORY:
            return None
        return _LazyListing(self, record[11], record[12])


class _LazyListing(Sequence[tuple[bytes, int]]):
    """A directory's sorted (name, ino) entries, read from the mapping on access."""

    def __init__(self, tree: PackedTree, first: int, count: int) -> None:
        self._tree = tree
        self._first = first
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> tuple[bytes, int]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[bytes, int]]: ...

    def __getitem__(self, index: int | slice) -> tuple[bytes, int] | list[tuple[bytes, int]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._tree._dirent(self._first + index)

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        for index in range(self._count):
            yield self._tree._dirent(self._first + index)


def _body_crc(path: Path) -> int:
    """CRC-32 of everything after the header, read with read(2), not the mapping.

    Checking through the mapping would make every page of the file resident
    in the daemon (RSS the size of the tree); plain reads leave them in the
    page cache, where the kernel may drop them until a lookup needs them.
    """
    crc = 0
    with path.open("rb", buffering=0) as handle:
        handle.seek(_HEADER.size)
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def tree_layers(path: Path) -> list[str] | None:
    """The layer digests a tree file was built from, or None if it cannot be read.

    For ``imagefs cache prune``: only the header and the sources are read.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return None
            magic, version, _, _, _, sources_offset, sources_len, *_ = _HEADER.unpack(head)
            if magic != MAGIC or version != TREE.number:
                return None
            handle.seek(sources_offset)
            stored = json.loads(handle.read(sources_len))
        layers = stored["layers"]
        if stored["version"] != TREE.tag:
            return None  # built by other merge rules, scanner or encoding: never read
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(layers, list) or not all(isinstance(d, str) for d in layers):
        return None
    return layers


def open_packed_tree(path: Path, sources: dict[str, Any]) -> PackedTree | None:
    """Open a packed tree if it is intact and was built from ``sources``."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < _HEADER.size:
                return None
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (FileNotFoundError, ValueError):
        return None
    header = _HEADER.unpack_from(mapping, 0)
    magic, version, _, _, _, sources_offset, sources_len, *_, crc = header
    valid = magic == MAGIC and version == TREE.number and _body_crc(path) == crc
    if valid:
        try:
            stored = json.loads(mapping[sources_offset : sources_offset + sources_len])
        except ValueError:
            stored = None
        valid = stored == json.loads(json.dumps(sources, sort_keys=True))
    if not valid:
        mapping.close()
        return None
    return PackedTree(mapping, header, sources)
