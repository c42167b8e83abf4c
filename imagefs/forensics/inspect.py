"""``imagefs inspect``: what an image is, and what each of its layers holds.

Reads the image without mounting it: the manifest and config, then one
verified pass over each layer's tar headers (the same pass a mount makes) to
count its entries and whiteouts and measure its uncompressed size. The
config's history is aligned with the layers (:mod:`imagefs.forensics.history`), so
each build step shows the layer it made.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from imagefs.errors import ImageFSError
from imagefs.forensics.history import HistoryEntry, image_history
from imagefs.image import Image, Layer
from imagefs.layers.reader import Compression, detect_compression, open_layer_stream
from imagefs.layers.toc.blob import toc_format
from imagefs.layers.toc.lazy import lazy_candidate
from imagefs.progress import Progress
from imagefs.tree.overlay import AUFS_META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX

_PROGRESS_EVERY = 512


@dataclass(frozen=True, slots=True)
class LayerStats:
    index: int
    digest: str
    diff_id: str | None
    media_type: str
    compression: str
    compressed_size: int
    uncompressed_size: int
    entries: int  # every tar member, whiteouts included (what tar -tf lists)
    whiteouts: int  # .wh.NAME members
    opaque_whiteouts: int  # .wh..wh..opq members
    # The layer's table of contents ("eStargz", "zstd:chunked") or None, and
    # whether a registry mount reads it lazily (its annotations name the
    # TOC's digest, imagefs.layers.toc.lazy.lazy_candidate).
    toc: str | None = None
    lazy: bool = False


def scan_layer_stats(
    layer: Layer, index: int, count: int, warn: Callable[[str], None], progress: Progress
) -> LayerStats:
    """Count one layer's entries in one verified pass (blocking)."""
    # The scanner compiles its header patterns at import (~30 ms); a mount
    # served from the persisted tree never scans, so load it on first use.
    from imagefs.layers.tarscan import scan_tar  # noqa: PLC0415

    name = layer.descriptor.digest.short()
    compression = detect_compression(layer)
    task = progress.start(f"layer {index + 1}/{count} {name}")
    entries = whiteouts = opaque = 0
    try:
        with open_layer_stream(layer) as stream:
            for entry in scan_tar(stream, lambda msg: warn(f"layer {name}: {msg}")):
                entries += 1
                base = entry.path.rstrip("/").rpartition("/")[2]
                if base == OPAQUE_MARKER:
                    opaque += 1
                elif base.startswith(WHITEOUT_PREFIX) and not base.startswith(AUFS_META_PREFIX):
                    whiteouts += 1
                if entries % _PROGRESS_EVERY == 0:
                    task.update(entries, stream.tell())
        # Leaving the block decoded the rest of a compressed stream, so its
        # position is the whole tar's size; a plain tar is the blob itself.
        size = layer.blob.length if compression is Compression.NONE else stream.tell()
    except ImageFSError as exc:
        task.finish(entries, 0)
        raise type(exc)(f"layer {index + 1}/{count} ({layer.descriptor.digest}): {exc}") from exc
    task.finish(entries, size)
    return LayerStats(
        index=index,
        digest=layer.descriptor.digest,
        diff_id=layer.diff_id or None,
        media_type=layer.descriptor.media_type,
        compression=compression.value,
        compressed_size=layer.descriptor.size,
        uncompressed_size=size,
        entries=entries,
        whiteouts=whiteouts,
        opaque_whiteouts=opaque,
        toc=toc.value if (toc := toc_format(layer)) is not None else None,
        lazy=toc is not None and lazy_candidate(layer),
    )


# -- the report ------------------------------------------------------------------------------


def _field(config: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = config.get(key)
    return value if isinstance(value, kind) else None


def _keys(value: object) -> list[str] | None:
    # ExposedPorts and Volumes are objects whose keys are the values.
    return sorted(value) if isinstance(value, dict) else None


def runtime_config(config: dict[str, Any]) -> dict[str, Any]:
    """The container settings of an image config (``config`` object), typed."""
    raw = config.get("config")
    settings = raw if isinstance(raw, dict) else {}
    labels = settings.get("Labels")
    return {
        "user": _field(settings, "User", str),
        "env": _field(settings, "Env", list),
        "entrypoint": _field(settings, "Entrypoint", list),
        "cmd": _field(settings, "Cmd", list),
        "workdir": _field(settings, "WorkingDir", str),
        "exposed_ports": _keys(settings.get("ExposedPorts")),
        "volumes": _keys(settings.get("Volumes")),
        "labels": dict(sorted(labels.items())) if isinstance(labels, dict) else None,
        "stop_signal": _field(settings, "StopSignal", str),
    }


def _history_json(entry: HistoryEntry, layers: list[LayerStats]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "created": entry.created,
        "created_by": entry.created_by,
        "author": entry.author,
        "comment": entry.comment,
        "empty_layer": entry.empty_layer,
    }
    out["layer"] = asdict(layers[entry.layer]) if entry.layer is not None else None
    return out


def inspect_image(
    image: Image, *, warn: Callable[[str], None], progress: Progress | None = None
) -> dict[str, Any]:
    """The ``imagefs inspect --json`` report of ``image`` (blocking: reads every layer)."""
    progress = progress or Progress(False)
    count = len(image.layers)
    layers = [
        scan_layer_stats(layer, index, count, warn, progress)
        for index, layer in enumerate(image.layers)
    ]
    history = image_history(image)
    config = image.config
    return {
        "source": image.source,
        "transport": image.transport,
        "digest": image.manifest_digest or None,
        "config_digest": image.config_digest,
        "platform": str(image.platform) if image.platform else None,
        "created": _field(config, "created", str),
        "author": _field(config, "author", str),
        "config": runtime_config(config),
        "history_aligned": history.aligned,
        "history": [_history_json(entry, layers) for entry in history.entries],
        "layers": [
            {**asdict(stats), "created_by": step.created_by if step else None}
            for stats, step in zip(layers, history.by_layer, strict=True)
        ],
    }


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def _show(value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _layer_line(layer: dict[str, Any]) -> str:
    return (
        f"layer {layer['index']} {layer['digest']}  {layer['compression']}, "
        f"{layer['compressed_size']} bytes ({layer['uncompressed_size']} uncompressed), "
        f"{layer['entries']} entries, {layer['whiteouts']} whiteouts, "
        f"{layer['opaque_whiteouts']} opaque"
        + (f", {layer['toc']} TOC" if layer.get("toc") else "")
        + (" (a registry mount reads it lazily)" if layer.get("lazy") else "")
    )


def report_text(report: dict[str, Any]) -> list[str]:
    """The human-readable ``imagefs inspect`` output."""
    settings = report["config"]
    lines = [
        f"source:       {report['source']}",
        f"digest:       {report['digest'] or '(none: the source has no manifest blob)'}",
        f"config:       {report['config_digest']}",
        f"platform:     {_show(report['platform'])}",
        f"created:      {_show(report['created'])}",
        f"user:         {_show(settings['user'])}",
        f"workdir:      {_show(settings['workdir'])}",
        f"entrypoint:   {_show(settings['entrypoint'])}",
        f"cmd:          {_show(settings['cmd'])}",
        f"ports:        {' '.join(settings['exposed_ports'] or []) or '(none)'}",
        f"volumes:      {' '.join(settings['volumes'] or []) or '(none)'}",
    ]
    if settings["stop_signal"]:
        lines.append(f"stop signal:  {settings['stop_signal']}")
    lines.append("env:" if settings["env"] else "env:          (none)")
    lines += [f"  {item}" for item in settings["env"] or []]
    lines.append("labels:" if settings["labels"] else "labels:       (none)")
    lines += [f"  {key}={value}" for key, value in (settings["labels"] or {}).items()]
    layers = report["layers"]
    steps = report["history"]
    lines.append(f"history ({len(steps)} steps, {len(layers)} layers, oldest first):")
    for number, step in enumerate(steps):
        created_by = step["created_by"] or "(no command recorded)"
        lines.append(f"  #{number:<3} {step['created'] or '-':<25} {created_by}")
        if step["comment"]:
            lines.append(f"        comment: {step['comment']}")
        if step["empty_layer"]:
            lines.append("        (no layer)")
        elif step["layer"] is not None:
            lines.append("        " + _layer_line(step["layer"]))
    if not report["history_aligned"]:
        lines.append("the history does not match the layers one to one; the layers:")
        lines += ["  " + _layer_line(layer) for layer in layers]
    return lines
