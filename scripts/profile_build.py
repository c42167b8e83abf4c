"""Where a first mount's time goes: each layer's scan, the merge, the tree write.

Usage: .venv/bin/python scripts/profile_build.py SOURCE [--cprofile]

Runs the steps of a first mount in this process, one after another, with an
empty cache: each layer scanned in turn (digest check included), then the
overlay merge, then writing the packed tree. Prints seconds per step; with
--cprofile, also the functions that took the most time in the merge and the
write. The figures in the performance notes of README.md come from this and
from `make bench`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagefs.progress import Progress
from imagefs.sources import open_image
from imagefs.tree.loader import scan_layer
from imagefs.tree.overlay import merge_layers
from imagefs.tree.packed import write_packed_root
from imagefs.tree.persisted import tree_sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="an imagefs SOURCE (oci:DIR:TAG, a docker save tar...)")
    parser.add_argument("--cprofile", action="store_true", help="profile the merge and write")
    args = parser.parse_args()
    image = open_image(args.source)
    with tempfile.TemporaryDirectory(prefix="imagefs-profile-") as scratch:
        cache = Path(scratch)
        entries = []
        for index, layer in enumerate(image.layers):
            started = time.perf_counter()
            scanned = scan_layer(layer, index, len(image.layers), warn=print,
                                 progress=Progress(False), cache_dir=cache)  # fmt: skip
            seconds = time.perf_counter() - started
            print(f"scan layer {index}: {len(scanned)} entries, "
                  f"{layer.blob.length / 1e6:.0f} MB blob, {seconds:.2f} s")  # fmt: skip
            entries.append(scanned)
        profile = cProfile.Profile() if args.cprofile else None
        if profile is not None:
            profile.enable()
        started = time.perf_counter()
        root = merge_layers(entries, print)
        merged = time.perf_counter()
        write_packed_root(root, cache / "image.tree", tree_sources(image))
        written = time.perf_counter()
        if profile is not None:
            profile.disable()
        print(f"merge: {merged - started:.2f} s; write: {written - merged:.2f} s")
        if profile is not None:
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
