"""Image names as Docker normalises them, for matching names inside archives.

``docker save`` records ``RepoTags`` in whatever form the daemon stored them
(``alpine:3`` with the classic store, ``docker.io/library/alpine:3`` with
skopeo and containerd); containerd exports carry ``io.containerd.image.name``.
Matching compares the fully qualified forms, as
:func:`imagefs.reference.parse_reference` (Docker's grammar) spells them, so
``alpine:3``, ``library/alpine:3``, ``docker.io/library/alpine:3`` and
``index.docker.io/library/alpine:3`` (go-containerregistry's spelling) are one
name, and a missing tag means ``latest``. Docker also names an image by its
ID, the digest of its config: whole, with or without ``sha256:``, or any
prefix of the hex (moby ``image/store.go`` ``Search``);
:func:`image_id_prefix` reads that spelling.
"""

from __future__ import annotations

import re

from imagefs.errors import InvalidReferenceError
from imagefs.reference import parse_reference


def normalize_name(ref: str) -> str | None:
    """``alpine:3`` -> ``docker.io/library/alpine:3``; None if not a valid name.

    A missing tag means ``latest`` unless a digest is given.
    """
    try:
        parsed = parse_reference(ref)
    except InvalidReferenceError:
        return None
    if parsed.tag is None and parsed.digest is None:
        return f"{parsed}:latest"
    return str(parsed)


def names_match(wanted: str, candidate: str) -> bool:
    """True when two image names denote the same reference (or are equal verbatim)."""
    if wanted == candidate:
        return True
    a, b = normalize_name(wanted), normalize_name(candidate)
    return a is not None and a == b


_IMAGE_ID_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{1,64})$")


def image_id_prefix(ref: str) -> str | None:
    """The hex an image-ID spelling gives (``sha256:0408c9``, ``0408c9fa5437``), or None."""
    m = _IMAGE_ID_RE.match(ref)
    return m.group(1) if m else None
