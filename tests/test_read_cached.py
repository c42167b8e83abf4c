"""The non-blocking page-cache read path of plain layers (RWF_NOWAIT)."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from imagefs.digest import Digest
from imagefs.image import BlobRange, Descriptor, Layer
from imagefs.layers.entry import EntryType
from imagefs.layers.reader import open_layer_data
from imagefs.tree.content import ContentReader
from imagefs.tree.overlay import Node
from tests import builder
from tests.needs import require_tools

MEDIA = "application/vnd.oci.image.layer.v1.tar"


def plain_layer(tmp_path: Path, data: bytes) -> Layer:
    # The blob sits inside a larger file, as a docker save member does.
    path = tmp_path / "outer"
    path.write_bytes(b"junk" * 1000 + data + b"tail" * 1000)
    digest = Digest(builder.sha256_digest(data))
    return Layer(Descriptor(MEDIA, digest, len(data)), BlobRange(str(path), 4000, len(data)))


def test_cached_reads_equal_blocking_reads_or_decline(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    layer = plain_layer(tmp_path, data)
    reader = open_layer_data(layer, None)
    try:
        rng = random.Random(5)
        answered = 0
        for _ in range(300):
            offset = rng.randrange(len(data) + 10)
            size = rng.choice([1, 4096, 131072, 1 << 20])
            cached = reader.pread_cached(offset, size)  # type: ignore[attr-defined]
            if cached is not None:
                answered += 1
                assert cached == data[offset : offset + size]
        # The file was just written: its pages are in the page cache.
        assert answered > 0
    finally:
        reader.close()


def _resident_pages(path: str) -> int:
    """How many of the file's pages the page cache holds (util-linux fincore, mincore(2))."""
    out = subprocess.run(
        ["fincore", "--raw", "--noheadings", "--output", "PAGES", path],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return int(out.split()[0])


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _resident_pages(path) == 0, "the page cache kept the file: the test proves nothing"


def test_evicted_pages_are_declined_not_misread(tmp_path: Path) -> None:
    require_tools("fincore")
    data = os.urandom(1 << 20)
    layer = plain_layer(tmp_path, data)
    reader = open_layer_data(layer, None)
    try:
        _evict(layer.blob.path)
        # Not in the page cache: RWF_NOWAIT must decline (the loop must not
        # block on the disk), never answer with anything else.
        assert reader.pread_cached(0, 65536) is None  # type: ignore[attr-defined]
        assert reader.pread(0, 65536) == data[:65536]
        # The blocking read brought the pages in: now they are answered.
        assert reader.pread_cached(0, 65536) == data[:65536]  # type: ignore[attr-defined]
    finally:
        reader.close()


def test_content_reader_uses_the_cache_only_for_plain_contiguous_files(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    layer = plain_layer(tmp_path, data)
    reader = open_layer_data(layer, None)
    try:
        content = ContentReader([reader], [layer.descriptor.digest])
        plain = Node(EntryType.FILE, 0o644, 0, 0, 0, 0, size=5000, data_offset=1000)
        assert reader.pread(0, len(data)) == data  # the pages are resident now
        answered = content.read_cached(plain, 10, 100)
        assert answered is not None and bytes(answered) == data[1010:1110]
        assert content.read_cached(plain, 5000, 10) is None  # at the end: the normal path
        sparse = Node(EntryType.FILE, 0o644, 0, 0, 0, 0, size=5000, data_offset=0,
                      sparse=((0, 10),))  # fmt: skip
        assert content.read_cached(sparse, 0, 10) is None
    finally:
        reader.close()
