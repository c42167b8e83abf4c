"""A small bbolt file writer for tests, written from the format (bbolt's internal/common).

It builds what bbolt itself would leave after a commit: meta pages 0 and 1
(magic, version 2, page size, root bucket, freelist page, high-water mark,
txid, FNV-1a 64 checksum), an empty freelist page, and each bucket as a
B+tree of leaf pages (split every ``max_elements`` keys, so tests get branch
pages from few keys), branch levels above them, overflow pages for elements
that outgrow a page, and *inline* buckets (a leaf page inside the bucket's
value) for small buckets without sub-buckets, as bucket.go ``inlineable``
decides. Everything is independent of imagefs.sources.bbolt, which it tests.

A tree is a dict: ``bytes -> bytes`` is a key, ``bytes -> dict`` a nested bucket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Tree = dict[bytes, Any]

MAGIC = 0xED0CDAED
BRANCH, LEAF, META, FREELIST = 0x01, 0x02, 0x04, 0x10
HEADER = 16
ELEMENT = 16


def fnv1a_64(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value ^= byte
        value = (value * 0x100000001B3) % (1 << 64)
    return value


@dataclass
class BoltWriter:
    page_size: int = 4096
    order: str = "<"  # "<" little-endian (amd64, arm64), ">" big-endian (s390x)
    max_elements: int = 0  # keys per leaf/branch page; 0: as many as fit
    inline: bool = True
    pages: dict[int, bytes] = field(default_factory=dict)
    next_pgid: int = 3  # 0 and 1: meta, 2: freelist
    # Where each written page is, for tests that corrupt one: (pgid, flags, keys).
    written: list[tuple[int, int, list[bytes]]] = field(default_factory=list)

    def _page(self, pgid: int, flags: int, elements: list[tuple[int, bytes, Any]]) -> bytes:
        """Header, element array, then keys and values, as node.go write() lays them out."""
        array = bytearray()
        data = bytearray()
        base = HEADER + ELEMENT * len(elements)
        for index, (eflags, key, value) in enumerate(elements):
            element_at = HEADER + ELEMENT * index
            pos = base + len(data) - element_at
            if flags == LEAF:
                array += struct.pack(self.order + "IIII", eflags, pos, len(key), len(value))
                data += key + value
            else:
                array += struct.pack(self.order + "IIQ", pos, len(key), value)
                data += key
        body = bytes(array + data)
        span = max(1, -(-(HEADER + len(body)) // self.page_size))
        header = struct.pack(self.order + "QHHI", pgid, flags, len(elements), span - 1)
        page = header + body
        if pgid == 0:
            return page  # inline: no padding
        return page + b"\0" * (span * self.page_size - len(page))

    def _write(self, flags: int, elements: list[tuple[int, bytes, Any]]) -> int:
        pgid = self.next_pgid
        page = self._page(pgid, flags, elements)
        self.pages[pgid] = page
        self.next_pgid += len(page) // self.page_size
        self.written.append((pgid, flags, [key for _, key, _ in elements]))
        return pgid

    def _chunks(self, elements: list[tuple[int, bytes, Any]]) -> list[list[tuple[int, bytes, Any]]]:
        chunks: list[list[tuple[int, bytes, Any]]] = [[]]
        used = HEADER
        for element in elements:
            size = (
                ELEMENT
                + len(element[1])
                + (len(element[2]) if isinstance(element[2], bytes) else 0)
            )
            full = self.max_elements and len(chunks[-1]) >= self.max_elements
            if chunks[-1] and (full or used + size > self.page_size):
                chunks.append([])
                used = HEADER
            chunks[-1].append(element)
            used += size
        return chunks

    def _elements(self, tree: Tree) -> list[tuple[int, bytes, Any]]:
        out = []
        for key in sorted(tree):
            value = tree[key]
            if isinstance(value, dict):
                out.append((1, key, self.bucket_value(value)))
            else:
                out.append((0, key, value))
        return out

    def bucket_value(self, tree: Tree) -> bytes:
        """The value of a nested bucket: its header, plus its page when inline."""
        elements = self._elements(tree)
        if self.inline and not any(flag for flag, _, _ in elements):
            page = self._page(0, LEAF, elements)
            # bucket.go inlineable: the whole value stays under a quarter page.
            if 16 + len(page) <= self.page_size // 4:
                return struct.pack(self.order + "QQ", 0, 0) + page
        return struct.pack(self.order + "QQ", self.write_bucket(elements), 0)

    def write_bucket(self, elements: list[tuple[int, bytes, Any]]) -> int:
        """Leaf pages for the elements, then branch levels until one root; its pgid."""
        level = [
            (chunk[0][1] if chunk else b"", self._write(LEAF, chunk))
            for chunk in self._chunks(elements)
        ]
        while len(level) > 1:
            branch = [(0, key, pgid) for key, pgid in level]
            level = [(chunk[0][1], self._write(BRANCH, chunk)) for chunk in self._chunks(branch)]
        return level[0][1]

    def meta(self, txid: int, root: int) -> bytes:
        body = struct.pack(
            self.order + "IIIIQQQQQ", MAGIC, 2, self.page_size, 0, root, 0, 2, self.next_pgid, txid
        )
        meta = body + struct.pack(self.order + "Q", fnv1a_64(body))
        page = struct.pack(self.order + "QHHI", txid % 2, META, 0, 0) + meta
        return page + b"\0" * (self.page_size - len(page))

    def build(self, tree: Tree, *, previous: Tree | None = None, txid: int = 7) -> bytes:
        """The file: ``tree`` committed at ``txid``; the other meta page names ``previous``
        (committed at txid - 1), or the same tree as a fresh bbolt file has."""
        old_root = self.write_bucket(self._elements(previous)) if previous is not None else None
        root = self.write_bucket(self._elements(tree))
        metas = {
            txid % 2: self.meta(txid, root),
            (txid - 1) % 2: self.meta(txid - 1, old_root or root),
        }
        freelist = struct.pack(self.order + "QHHI", 2, FREELIST, 0, 0)
        out = bytearray(metas[0] + metas[1] + freelist + b"\0" * (self.page_size - HEADER))
        for pgid in range(3, self.next_pgid):
            if pgid in self.pages:
                out += self.pages[pgid]
            elif len(out) < (pgid + 1) * self.page_size:
                out += b"\0" * self.page_size  # never happens: overflow pages follow their page
        return bytes(out)


def write_bolt(path: Path, tree: Tree, **options: Any) -> BoltWriter:
    """Write ``tree`` as a bbolt file at ``path``; the writer says where its pages went."""
    previous = options.pop("previous", None)
    txid = options.pop("txid", 7)
    writer = BoltWriter(**options)
    path.write_bytes(writer.build(tree, previous=previous, txid=txid))
    return writer
