"""Layers scanned at once: same entries as one by one, the failing layer named, progress shown."""

from __future__ import annotations

import os
import pty
import select
import subprocess
from pathlib import Path

import pytest

from imagefs.errors import DigestMismatchError
from imagefs.layers import index as layer_index
from imagefs.progress import Progress
from imagefs.sources import open_image
from imagefs.tree.loader import scan_layers
from tests import builder, images
from tests.builder import file
from tests.mounting import IMAGEFS, force_unmount, is_mounted
from tests.needs import require_fuse


def test_concurrent_scan_gives_what_a_scan_in_turn_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, tag = images.build_edge(tmp_path)  # plain, gzip and zstd layers
    image = open_image(f"oci:{layout}:{tag}")
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("IMAGEFS_SCAN_THREADS", threads)
        results.append(
            scan_layers(image, warn=lambda _: None, progress=Progress(False), cache_dir=None)
        )
    assert results[0] == results[1]
    assert [len(entries) for entries in results[0]] == [
        len(entries) for entries in results[1]
    ] and all(results[0])


@pytest.mark.parametrize("bad", [0, 2])
def test_the_failing_layer_is_named_while_others_scan(tmp_path: Path, bad: int) -> None:
    tars = [
        builder.make_layer_tar([file(f"{n}/f{i}", os.urandom(2048)) for i in range(2000)])
        for n in range(3)
    ]
    layout = builder.write_oci_layout(
        tmp_path / "l", tars, compression=["none", "gzip", "none"], tag="t"
    )
    digest = builder.image_manifest(layout, "t")["layers"][bad]["digest"]
    blob = builder.blob_path(layout, digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, other content
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as caught:
        scan_layers(
            open_image(f"oci:{layout}:t"),
            warn=lambda _: None,
            progress=Progress(False),
            cache_dir=tmp_path / "cache",
        )
    assert f"layer {bad + 1}/3" in str(caught.value) and digest in str(caught.value)
    # No index is cached for the layer that failed its digest check.
    failed = open_image(f"oci:{layout}:t").layers[bad]
    assert not Path(layer_index.index_path(str(tmp_path / "cache"), failed)).exists()


def run_on_terminal(*args: str | Path) -> tuple[int, str]:
    """Run imagefs with a pseudo-terminal as stderr (and stdout); its exit code and output."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([*IMAGEFS, *map(str, args)], stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 60)
        if not ready:
            process.kill()
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    return process.wait(), output.decode(errors="replace")


def test_progress_is_drawn_on_a_terminal_and_not_with_quiet(tmp_path: Path) -> None:
    require_fuse()
    tars = [builder.make_layer_tar([file(f"d{n}/f{i}", "x") for i in range(600)]) for n in range(3)]
    layout = builder.write_oci_layout(tmp_path / "l", tars, compression="gzip", tag="t")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for quiet in (False, True):
        cache = tmp_path / f"cache-{quiet}"
        flags = ["--quiet"] if quiet else []
        try:
            code, output = run_on_terminal(
                "mount", *flags, f"--cache-dir={cache}", f"oci:{layout}:t", mnt
            )
            assert code == 0, output
            assert is_mounted(mnt)
        finally:
            force_unmount(mnt)
        # A redrawn line is "\r" + text; the terminal turns "\n" into "\r\n".
        lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in output.split("\n")]
        finished = [line for line in lines if line.startswith("layer ")]
        if quiet:
            assert finished == [], output
        else:
            # One line per layer once it is done, with its entry count.
            assert sorted(line.split(":")[0].split()[1] for line in finished) == [
                "1/3",
                "2/3",
                "3/3",
            ], output
            assert all("600 entries" in line for line in finished), output
