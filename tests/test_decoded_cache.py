"""--decoded-cache: the memory bound on decoded layer data, and reads under the smallest one."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from imagefs.layers import gzip as gzip_layer
from imagefs.layers import zstd as zstd_layer
from imagefs.layers.reader import set_decoded_cache_limit
from tests import builder
from tests.builder import file
from tests.mounting import mounted, run_imagefs


def text(rng: random.Random, size: int) -> bytes:
    """Compressible but not trivial data, so every chunk and frame is real work."""
    words = [bytes(rng.choices(b"abcdefghij klmnopqrstuvwxyz\n", k=7)) for _ in range(512)]
    out = bytearray()
    while len(out) < size:
        out += b"".join(rng.choices(words, k=2048))
    return bytes(out[:size])


def test_limit_sets_both_bounds() -> None:
    try:
        set_decoded_cache_limit(1 << 20)
        assert gzip_layer._OPEN_READERS.limit == 1  # never zero readers
        assert zstd_layer._FRAME_CACHE.max_bytes == 1 << 20
        set_decoded_cache_limit(100 << 20)
        assert gzip_layer._OPEN_READERS.limit == 5
    finally:
        set_decoded_cache_limit(80 << 20)


@pytest.mark.parametrize("option", [["--decoded-cache=1"], ["-o", "decoded_cache=1"]])
def test_reads_across_many_layers_stay_right_with_the_smallest_cache(
    tmp_path: Path, option: list[str]
) -> None:
    # Six layers, gzip and single-frame zstd: with one open gzip reader, each
    # gzip read reopens its layer's reader; a 3 MiB zstd frame is over the
    # 1 MiB frame cache, so each zstd read decodes its frame again.
    rng = random.Random(5)
    contents = [text(rng, 3 << 20) for _ in range(6)]
    layers = [builder.make_layer_tar([file(f"l{i}/data", c)]) for i, c in enumerate(contents)]
    layout = builder.write_oci_layout(
        tmp_path / "l", layers, compression=["gzip", "zstd"] * 3, tag="t"
    )
    with mounted(f"oci:{layout}:t", tmp_path / "mnt", *option) as mnt:
        handles = [(mnt / f"l{i}" / "data").open("rb") for i in range(6)]
        try:
            for offset in range(0, 3 << 20, 700_001):
                for index, handle in enumerate(handles):
                    handle.seek(offset)
                    assert handle.read(5000) == contents[index][offset : offset + 5000]
        finally:
            for handle in handles:
                handle.close()
        for index, content in enumerate(contents):
            read = hashlib.sha256((mnt / f"l{index}" / "data").read_bytes()).hexdigest()
            assert read == hashlib.sha256(content).hexdigest()


def test_a_cache_of_zero_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", "--decoded-cache=0", tmp_path, tmp_path / "mnt")
    assert result.returncode == 2 and "at least 1" in result.stderr, result.stderr
