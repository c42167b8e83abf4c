"""An image's build history, aligned with its layers.

The image config's ``history`` array (OCI image-spec ``config.md``) has one
entry per build step; steps that made no layer (``ENV``, ``CMD``...) carry
``"empty_layer": true``. The entries without it correspond, in order, to the
layers (``rootfs.diff_ids``). When the counts disagree, the history cannot
be tied to layers (Docker then shows it unaligned too), and every layer's
history is unknown.

The config is untrusted input: a field of the wrong type is treated as
absent, never as an error, because history is informative only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagefs.image import Image


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One build step. ``layer`` is the index of the layer it made, if known."""

    created: str | None
    created_by: str | None
    author: str | None
    comment: str | None
    empty_layer: bool
    layer: int | None = None


@dataclass(frozen=True, slots=True)
class History:
    """All build steps, and for each layer index its step (None if unknown)."""

    entries: tuple[HistoryEntry, ...]
    by_layer: tuple[HistoryEntry | None, ...]

    @property
    def aligned(self) -> bool:
        return all(entry is not None for entry in self.by_layer)


def _str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def parse_history(config: dict[str, Any]) -> list[HistoryEntry]:
    """The config's history entries, in build order (malformed entries skipped)."""
    raw = config.get("history")
    if not isinstance(raw, list):
        return []
    entries = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        entries.append(
            HistoryEntry(
                created=_str(item, "created"),
                created_by=_str(item, "created_by"),
                author=_str(item, "author"),
                comment=_str(item, "comment"),
                empty_layer=item.get("empty_layer") is True,
            )
        )
    return entries


def align_history(entries: Sequence[HistoryEntry], layer_count: int) -> History:
    """Tie each non-empty step to its layer, if there are exactly as many as layers."""
    layered = [entry for entry in entries if not entry.empty_layer]
    if len(layered) != layer_count:
        return History(tuple(entries), (None,) * layer_count)
    out: list[HistoryEntry] = []
    by_layer: list[HistoryEntry | None] = []
    index = 0
    for entry in entries:
        if entry.empty_layer:
            out.append(entry)
            continue
        numbered = HistoryEntry(
            entry.created, entry.created_by, entry.author, entry.comment, False, index
        )
        out.append(numbered)
        by_layer.append(numbered)
        index += 1
    return History(tuple(out), tuple(by_layer))


def image_history(image: Image) -> History:
    """The history of ``image``, aligned with ``image.layers``.

    Aligned against the config's own layer count (``rootfs.diff_ids``), so
    an image cut short by ``--upto`` keeps its first layers' history.
    """
    rootfs = image.config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    count = len(diff_ids) if isinstance(diff_ids, list) else len(image.layers)
    history = align_history(parse_history(image.config), count)
    return History(history.entries, history.by_layer[: len(image.layers)])
