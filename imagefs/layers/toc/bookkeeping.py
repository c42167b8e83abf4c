"""What eStargz and zstd:chunked layers hold that is not image content (issue #12).

Read as ordinary tar layers, these formats show their own files:

* eStargz: ``stargz.index.json`` (the TOC is a tar member too) and one
  prefetch landmark, ``.prefetch.landmark`` (the end of the files to
  prefetch) or ``.no.prefetch.landmark`` (nothing to prefetch), a one-byte
  file the eStargz writer always adds at the root (``estargz/build.go``);
  ctr-remote's zstd:chunked layers are written by the same library and hold
  the landmark too.
* ctr-remote's zstd:chunked tar stream ends without the end-of-archive
  blocks (its TOC is a skippable frame, not a tar member closing the
  archive), which the tar scanner would report on every mount.

Decision: the three root names are marked ``bookkeeping`` (kept in the
layer's entries, so ``--layers`` shows them in ``layers/N``; left out of
every merged tree, as stargz-snapshotter hides them) only in layers the
eStargz library wrote, known by the eStargz footer or the ``toc.digest``
annotation. Anywhere else these are ordinary names: a plain layer, or a
containers/storage zstd:chunked one (which adds no landmark), may ship a
file called ``.prefetch.landmark``, and hiding it would hide image content.
Inside those layers the writer owns the names: it drops any
``stargz.index.json`` from its input and adds the landmark itself. The
missing end-of-archive is expected in any zstd:chunked layer and is logged
at debug level there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from imagefs.image import Layer
from imagefs.layers.entry import TarEntry
from imagefs.layers.toc.blob import has_estargz_toc, toc_format
from imagefs.layers.toc.estargz import TOC_TAR_NAME
from imagefs.layers.toc.model import TocFormat

__all__ = ["BOOKKEEPING_NAMES", "mark_bookkeeping", "tolerates_missing_end"]

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
BOOKKEEPING_NAMES = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
_BOOKKEEPING_ENDINGS = tuple(sorted(BOOKKEEPING_NAMES))


def _root_name(path: str) -> str:
    # The tar scanner keeps names verbatim; the merge cleans them. These are
    # written as plain names; "./" and "/" prefixes read the same.
    while path.startswith(("./", "/")):
        path = path[2:] if path.startswith("./") else path[1:]
    return path


def mark_bookkeeping(layer: Layer, entries: Iterable[TarEntry]) -> list[TarEntry]:
    """``entries`` with the eStargz bookkeeping ones marked, if ``layer`` is eStargz-written."""
    entries = list(entries)
    # Every bookkeeping path ends with its name: one C call for most entries.
    marked = [
        index
        for index, entry in enumerate(entries)
        if entry.path.endswith(_BOOKKEEPING_ENDINGS) and _root_name(entry.path) in BOOKKEEPING_NAMES
    ]
    if not marked or not has_estargz_toc(layer):
        return entries
    for index in marked:
        entries[index] = replace(entries[index], bookkeeping=True)
    return entries


def tolerates_missing_end(layer: Layer) -> bool:
    """Whether a tar stream without end-of-archive blocks is normal for this layer."""
    return toc_format(layer) is TocFormat.ZSTD_CHUNKED
