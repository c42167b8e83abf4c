"""The bbolt reader (imagefs.sources.bbolt) on hand-built files, and fuzzed.

Files come from tests.boltwriter, written from bbolt's format: meta pages
with FNV-1a checksums, leaf and branch pages, overflow pages, nested and
inline buckets, both byte orders. The reader must give back exactly the tree
written, choose the meta page as bbolt does, and answer every corruption
(truncation, flipped bytes, cycles, wrong page types, absurd counts) with one
CorruptStoreError, never another exception or a hang. containerd's own
meta.db is read in tests/test_containerd_store.py.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagefs.errors import CorruptStoreError
from imagefs.sources.bbolt import BoltFile, Bucket, fnv1a64, read_consistent, walk
from tests.boltwriter import BRANCH, LEAF, BoltWriter, Tree, write_bolt

EXAMPLES = int(os.environ.get("IMAGEFS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 150,
    derandomize=EXAMPLES == 0,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def sample_tree() -> Tree:
    """Every shape: many keys (branches), a big value (overflow), nested and inline buckets."""
    return {
        b"v1": {
            b"version": b"\x06",
            b"default": {
                b"images": {
                    f"img-{i:03d}".encode(): {
                        b"target": {b"digest": f"sha256:{i:064x}".encode(), b"size": b"\x02"},
                        b"createdat": b"t" * 15,
                    }
                    for i in range(40)
                },
                b"small": {b"a": b"1", b"b": b"2"},  # inline
                b"empty": {},
            },
        },
        b"big": {b"blob": bytes(range(256)) * 40},  # 10 KiB: two overflow pages
        b"keys": {f"k{i:04d}".encode(): f"value {i}".encode() for i in range(1000)},
    }


def read_tree(bucket: Bucket) -> Tree:
    """The bucket as a dict, via iteration (recursion is fine: test trees are shallow)."""
    out: Tree = {}
    for entry in bucket.entries():
        if entry.is_bucket:
            child = bucket.bucket(entry.key)
            assert child is not None
            out[entry.key] = read_tree(child)
        else:
            out[entry.key] = entry.value
    return out


def open_bytes(tmp_path: Path, data: bytes) -> BoltFile:
    path = tmp_path / "test.db"
    path.write_bytes(data)
    return BoltFile.open(str(path))


# -- reading what was written ----------------------------------------------------------------


def test_fnv1a64_known_answers() -> None:
    # FNV-1a 64 test vectors (Fowler, Noll, Vo: the reference test suite).
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_elements": 3},  # three levels of branch pages
        {"page_size": 1024, "max_elements": 2},
        {"page_size": 16384},
        {"order": ">"},  # a big-endian host's file
        {"inline": False},
    ],
    ids=["default", "branches", "small-pages", "big-pages", "big-endian", "no-inline"],
)
def test_reads_back_the_tree(tmp_path: Path, options: dict[str, Any]) -> None:
    tree = sample_tree()
    writer = write_bolt(tmp_path / "test.db", tree, **options)
    assert any(flags == BRANCH for _, flags, _ in writer.written)
    with BoltFile.open(str(tmp_path / "test.db")) as db:
        assert db.meta.page_size == writer.page_size
        assert read_tree(db.root()) == tree
        images = db.root().bucket(b"v1").bucket(b"default").bucket(b"images")  # type: ignore[union-attr]
        assert images is not None
        target = images.bucket(b"img-017").bucket(b"target")  # type: ignore[union-attr]
        assert target is not None and target.get(b"digest") == f"sha256:{17:064x}".encode()
        assert images.get(b"img-017") is None  # a bucket, not a value (bbolt's Get)
        assert images.bucket(b"img-999") is None
        keys = db.root().bucket(b"keys")
        assert keys is not None
        assert keys.get(b"k0123") == b"value 123"
        assert keys.get(b"k01235") is None
        assert keys.bucket(b"k0123") is None  # a value, not a bucket
        # A cursor's Seek: from the first key >= start, in order.
        assert [e.key for e in keys.entries(b"k0997")] == [b"k0997", b"k0998", b"k0999"]
        assert [e.key for e in keys.entries(b"k09995")] == []
        assert [e.key for e in keys.entries(b"k0100x")][:2] == [b"k0101", b"k0102"]
        paths = {path for path, _ in walk(db)}
        assert (b"v1", b"default", b"images", b"img-039", b"target") in paths


def test_inline_and_overflow_pages_are_used(tmp_path: Path) -> None:
    writer = write_bolt(tmp_path / "test.db", sample_tree())
    data = (tmp_path / "test.db").read_bytes()
    # The big value's leaf page spans three pages (overflow 2).
    big_leaf = next(pgid for pgid, flags, keys in writer.written if keys == [b"blob"])
    assert struct.unpack_from("<I", data, big_leaf * 4096 + 12)[0] == 2
    # The small bucket is inline: its page is inside the parent's value.
    assert not any(keys == [b"a", b"b"] for _, _, keys in writer.written)


def test_higher_valid_txid_wins_and_a_bad_checksum_falls_back(tmp_path: Path) -> None:
    old, new = {b"k": {b"state": b"old"}}, {b"k": {b"state": b"new"}}
    for txid in (8, 9):  # the newer meta on page 0, then on page 1
        data = bytearray(BoltWriter().build(new, previous=old, txid=txid))
        with open_bytes(tmp_path, bytes(data)) as db:
            assert db.meta.txid == txid and db.meta.page == txid % 2
            assert db.root().bucket(b"k").get(b"state") == b"new"  # type: ignore[union-attr]
        # A torn write of the newer meta: its checksum fails, the older tree is read.
        data[(txid % 2) * 4096 + 16 + 40] ^= 0xFF  # the txid field
        with open_bytes(tmp_path, bytes(data)) as db:
            assert db.meta.txid == txid - 1
            assert db.root().bucket(b"k").get(b"state") == b"old"  # type: ignore[union-attr]


def test_page_size_found_from_the_second_meta_page(tmp_path: Path) -> None:
    data = bytearray(BoltWriter(page_size=8192).build({b"a": {b"b": b"c"}}))
    data[16:20] = b"\0\0\0\0"  # page 0's magic gone: probe for page 1 at 1 KiB << n
    with open_bytes(tmp_path, bytes(data)) as db:
        assert db.meta.page == 1 and db.meta.page_size == 8192
        assert db.root().bucket(b"a").get(b"b") == b"c"  # type: ignore[union-attr]


def test_read_consistent_retries_while_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "test.db"
    first = BoltWriter().build({b"a": {b"n": b"1"}}, txid=4)
    second = BoltWriter().build({b"a": {b"n": b"2"}}, txid=5)
    path.write_bytes(first)
    calls = []

    def work(db: BoltFile) -> bytes | None:
        calls.append(db.meta.txid)
        value = db.root().bucket(b"a").get(b"n")  # type: ignore[union-attr]
        if len(calls) == 1:
            path.write_bytes(second)  # a commit in the middle of the first read
        return value

    def open_fd() -> int:
        return os.open(path, os.O_RDONLY)

    assert read_consistent(open_fd, str(path), work) == b"2"
    assert calls == [4, 5]


# -- corruption: one clear error ---------------------------------------------------------------


def expect_corrupt(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(CorruptStoreError, match=message), open_bytes(tmp_path, data) as db:
        list(walk(db))


def test_not_a_bolt_file(tmp_path: Path) -> None:
    expect_corrupt(tmp_path, b"x" * 100, "too short for two meta pages")
    expect_corrupt(tmp_path, os.urandom(65536), "meta page 0: bad magic .*meta page 1")


def test_both_checksums_bad(tmp_path: Path) -> None:
    data = bytearray(BoltWriter().build({b"a": {}}))
    data[16 + 60] ^= 1
    data[4096 + 16 + 60] ^= 1
    expect_corrupt(tmp_path, bytes(data), "meta page 0: checksum mismatch; meta page 1: ")


def test_truncated_file(tmp_path: Path) -> None:
    data = BoltWriter(max_elements=3).build(sample_tree())
    expect_corrupt(tmp_path, data[: len(data) // 2], "past the end of the file")


def find_page(writer: BoltWriter, flags: int) -> int:
    return next(pgid for pgid, page_flags, _ in writer.written if page_flags == flags)


def test_branch_cycle(tmp_path: Path) -> None:
    writer = BoltWriter(max_elements=2, inline=False)
    data = bytearray(writer.build({b"b": {bytes([i]): b"v" for i in range(20)}}))
    # Point a branch page's last child back at the branch itself.
    branch = max(pgid for pgid, flags, _ in writer.written if flags == BRANCH)
    count = struct.unpack_from("<H", data, branch * 4096 + 10)[0]
    struct.pack_into("<Q", data, branch * 4096 + 16 + 16 * (count - 1) + 8, branch)
    expect_corrupt(tmp_path, bytes(data), "referenced from two places")


def test_bucket_pointing_at_its_parent(tmp_path: Path) -> None:
    writer = BoltWriter(inline=False)
    data = bytearray(writer.build({b"a": {b"x": b"1"}}))
    root = struct.unpack_from("<Q", data, 16 + 16)[0]
    # The root page's only element is bucket "a": make its root the root page.
    pos = struct.unpack_from("<I", data, root * 4096 + 16 + 4)[0]
    value_at = root * 4096 + 16 + pos + 1  # after the key "a"
    struct.pack_into("<Q", data, value_at, root)
    expect_corrupt(tmp_path, bytes(data), "referenced from two places")


def test_wrong_page_type(tmp_path: Path) -> None:
    writer = BoltWriter(inline=False)
    data = bytearray(writer.build({b"a": {b"x": b"1"}}))
    leaf = max(pgid for pgid, flags, _ in writer.written if flags == LEAF)
    struct.pack_into("<H", data, leaf * 4096 + 8, 0x10)
    expect_corrupt(tmp_path, bytes(data), "expected a branch or leaf page, found a freelist page")


def test_absurd_element_count(tmp_path: Path) -> None:
    writer = BoltWriter(inline=False)
    data = bytearray(writer.build({b"a": {b"x": b"1"}}))
    leaf = max(pgid for pgid, flags, _ in writer.written if flags == LEAF)
    struct.pack_into("<H", data, leaf * 4096 + 10, 0xFFFF)
    expect_corrupt(tmp_path, bytes(data), "65535 elements do not fit")


def test_page_id_past_the_high_water_mark(tmp_path: Path) -> None:
    writer = BoltWriter(inline=False)
    data = bytearray(writer.build({b"a": {b"x": b"1"}}))
    branchless_root = struct.unpack_from("<Q", data, 16 + 16)[0]
    pos = struct.unpack_from("<I", data, branchless_root * 4096 + 16 + 4)[0]
    struct.pack_into("<Q", data, branchless_root * 4096 + 16 + pos + 1, 1 << 40)
    expect_corrupt(tmp_path, bytes(data), "outside the tree")


def test_absurd_overflow(tmp_path: Path) -> None:
    writer = BoltWriter(inline=False)
    data = bytearray(writer.build({b"a": {b"x": b"1"}}))
    leaf = max(pgid for pgid, flags, _ in writer.written if flags == LEAF)
    struct.pack_into("<I", data, leaf * 4096 + 12, 0xFFFFFFFF)
    expect_corrupt(tmp_path, bytes(data), "overflow count 4294967295 is impossible")


def test_keys_out_of_order(tmp_path: Path) -> None:
    writer = BoltWriter(inline=False)
    data = bytearray(writer.build({b"a": {b"x": b"1", b"y": b"2"}}))
    at = data.find(b"y2")
    data[at] = ord("a")
    expect_corrupt(tmp_path, bytes(data), "keys out of order")


# -- fuzzing -----------------------------------------------------------------------------------

SAMPLE = BoltWriter(page_size=1024, max_elements=4).build(sample_tree())


def exercise(tmp_path: Path, data: bytes) -> None:
    """Everything a reader can be asked; only CorruptStoreError may come out."""
    try:
        with open_bytes(tmp_path, data) as db:
            for _ in walk(db):
                pass
            v1 = db.root().bucket(b"v1")
            if v1 is not None:
                for _, bucket in v1.buckets():
                    bucket.get(b"images")
                    list(bucket.entries(b"m"))
    except CorruptStoreError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(
    flips=st.lists(
        st.tuples(st.integers(2048, len(SAMPLE) - 1), st.integers(1, 255)), min_size=1, max_size=8
    )
)
def test_fuzz_flipped_bytes_in_tree_pages(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(SAMPLE)
    for offset, mask in flips:
        data[offset] ^= mask
    exercise(tmp_path, bytes(data))


@FUZZ
@given(length=st.integers(0, len(SAMPLE)))
def test_fuzz_truncations(tmp_path: Path, length: int) -> None:
    exercise(tmp_path, SAMPLE[:length])


@FUZZ
@given(
    page=st.integers(0, 1),
    field=st.sampled_from([("I", 8), ("I", 12), ("Q", 16), ("Q", 32), ("Q", 40), ("Q", 48)]),
    value=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.just(2**64 - 1)),
)
def test_fuzz_resigned_meta_fields(
    tmp_path: Path, page: int, field: tuple[str, int], value: int
) -> None:
    """Meta fields changed *and* the checksum recomputed: page size, root, high-water mark."""
    kind, offset = field
    data = bytearray(SAMPLE)
    base = page * 1024 + 16
    struct.pack_into("<" + kind, data, base + offset, value % (2 ** (32 if kind == "I" else 64)))
    struct.pack_into("<Q", data, base + 56, fnv1a64(bytes(data[base : base + 56])))
    exercise(tmp_path, bytes(data))


@FUZZ
@given(targets=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 80)), min_size=1, max_size=4))
def test_fuzz_page_id_rewrites(tmp_path: Path, targets: list[tuple[int, int]]) -> None:
    """Branch children and bucket roots pointed at other pages: cycles, shared subtrees."""
    data = bytearray(SAMPLE)
    writer = BoltWriter(page_size=1024, max_elements=4)
    writer.build(sample_tree())
    branches = [pgid for pgid, flags, _ in writer.written if flags == BRANCH]
    for choice, new_id in targets:
        page = branches[choice % len(branches)]
        count = struct.unpack_from("<H", data, page * 1024 + 10)[0]
        element = choice % count
        struct.pack_into("<Q", data, page * 1024 + 16 + 16 * element + 8, new_id)
    exercise(tmp_path, bytes(data))
