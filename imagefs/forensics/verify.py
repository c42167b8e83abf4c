"""``imagefs verify SOURCE``: is every layer exactly the image's?

For a host store (``containers-storage:``, ``docker-store:``) each layer is
rebuilt from its tar-split record and the files under its directory
(:mod:`imagefs.layers.rebuilt`), hashed against the config's diff_id, and the
directory compared with the record (:mod:`imagefs.layers.tamper`): a layer
is ``ok``, or ``modified`` with every changed path and how it changed. For
any other source each layer blob is checked against its digest (one pass,
as a mount makes): ``ok`` or ``mismatch``. The command exits 0 when every
layer is ok, 1 otherwise, after printing the whole report.

:func:`verify_image` is the API; :func:`modified_paths` is what a mount
with ``--allow-modified`` needs for the ``user.imagefs.modified`` xattr.

Note for the daemon (not wired yet): with ``MountRequest.allow_modified``
the layer pass logs the changes and goes on, but it runs in the tree-build
child (tree.persisted) and a cached tree skips it altogether, so the daemon
does not have them. It can call ``modified_paths(verify_image(image))``
(one more full read of each layer, nothing cached) after ``open_image``,
then answer ``user.imagefs.modified`` (value: the change's detail, e.g.
``size 5 -> 12``) for a node whose providing layer index (the one
``user.imagefs.layer_index`` reports) has the node's path in that layer's
dict; hidden from listxattr like the other ``user.imagefs.*``. Added files
are not in the tree, so only changed and removed ones can be marked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from imagefs.errors import BlobError, DigestMismatchError, LayerError
from imagefs.image import Image
from imagefs.layers.reader import open_layer_stream
from imagefs.layers.rebuilt import Change, rebuilt_of
from imagefs.progress import Progress

__all__ = ["LayerReport", "modified_paths", "report_json", "report_text", "verify_image"]

OK, MODIFIED, MISMATCH, UNREADABLE = "ok", "modified", "mismatch", "unreadable"


@dataclass(frozen=True, slots=True)
class LayerReport:
    """One layer's state: ``ok``; ``modified`` (a store layer changed on the host, with
    its changes); ``mismatch`` (the bytes read do not hash to the digest); ``unreadable``
    (the layer could not be read to the end: ``error`` says why)."""

    index: int
    digest: str  # what it must hash to: the diff_id of a store layer, else the blob digest
    state: str
    found: str  # the digest of what was read ("" when the pass could not finish)
    label: str = ""  # the store's name for the layer
    directory: str = ""  # a store layer's extracted directory on the host
    changes: tuple[Change, ...] = ()
    error: str = ""  # a blob's mismatch message

    @property
    def ok(self) -> bool:
        return self.state == OK


def verify_image(image: Image, progress: Progress | None = None) -> list[LayerReport]:
    """Check every layer of ``image`` (blocking; reads each layer in full once)."""
    progress = progress or Progress(False)
    reports = []
    count = len(image.layers)
    for index, layer in enumerate(image.layers):
        task = progress.start(f"layer {index + 1}/{count} {layer.descriptor.digest.short()}")
        rebuilt = rebuilt_of(layer)
        digest = layer.descriptor.digest
        try:
            if rebuilt is not None:
                found, changes = rebuilt.open_pass(layer).check()
                # No changed path, yet another digest: the record is not this layer's.
                state = MODIFIED if changes else OK if found == digest else MISMATCH
                report = LayerReport(
                    index, digest, state, str(found), rebuilt.label, rebuilt.where_diff,
                    tuple(changes),
                )  # fmt: skip
            else:
                with open_layer_stream(layer) as stream:
                    stream.skip(layer.blob.length)
                report = LayerReport(index, digest, OK, digest)
        except DigestMismatchError as exc:
            report = LayerReport(index, digest, MISMATCH, "", error=str(exc))
        except (BlobError, LayerError) as exc:
            # A missing layer directory, a corrupt record: say so and go on.
            label, directory = (rebuilt.label, rebuilt.where_diff) if rebuilt else ("", "")
            report = LayerReport(index, digest, UNREADABLE, "", label, directory, error=str(exc))
        task.finish(len(report.changes), rebuilt.size if rebuilt else layer.blob.length)
        reports.append(report)
    return reports


def modified_paths(reports: list[LayerReport]) -> dict[int, dict[str, str]]:
    """Per layer index, each changed path (as the tar names it, cleaned) and how.

    What ``--allow-modified`` marks with the hidden ``user.imagefs.modified``
    xattr (value: the detail, e.g. ``size 5 -> 12``) on the merged tree's
    nodes that come from that layer's entry for the path.
    """
    return {
        report.index: {change.path: change.detail for change in report.changes}
        for report in reports
        if report.changes
    }


def report_text(image: Image, reports: list[LayerReport]) -> list[str]:
    bad = [report for report in reports if not report.ok]
    state = "ok" if not bad else f"MODIFIED ({len(bad)} of {len(reports)} layers)"
    lines = [f"{image.source}: {state}", f"image {image.config_digest}"]
    for report in reports:
        where = f"  {report.label}" if report.label else ""
        lines.append(f"layer {report.index} {report.digest}{where}: {report.state}")
        if report.directory and not report.ok:
            lines.append(f"  in {report.directory}")
        if report.state == MODIFIED and report.found != report.digest:
            lines.append(f"  rebuilt tar digest {report.found}")
        for change in report.changes:
            how = "" if change.detail == change.kind else f"  ({change.detail})"
            lines.append(f"  {change.kind:8} {change.path}{how}")
        if report.error:
            lines.append(f"  {report.error}")
    return lines


def report_json(image: Image, reports: list[LayerReport]) -> str:
    return json.dumps(
        {
            "source": image.source,
            "image": image.config_digest,
            "state": OK if all(report.ok for report in reports) else MODIFIED,
            "layers": [
                {
                    "index": report.index,
                    "digest": report.digest,
                    "state": report.state,
                    "found": report.found or None,
                    "label": report.label or None,
                    "directory": report.directory or None,
                    "changes": [
                        {"path": c.path, "kind": c.kind, "detail": c.detail} for c in report.changes
                    ],
                    "error": report.error or None,
                }
                for report in reports
            ],
        },
        indent=2,
    )
