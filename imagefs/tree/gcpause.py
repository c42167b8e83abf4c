"""The cyclic garbage collector paused while a tree is built.

Building an image's tree makes hundreds of thousands of objects that all
stay alive until it is packed (entries, nodes, their dicts). Every few
hundred allocations CPython's collector runs, and each run of its older
generations walks every live object again: on a 70k-entry lazy image that
was 40 % of the merge (0.55 s, 0.32 s paused; ``scripts/bench_registry.py``).
Nothing a build drops is cyclic garbage (no node points back at its
parent), so reference counting frees it all the same.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside; the collector back as it was on exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
