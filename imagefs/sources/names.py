"""Image names as Docker normalises them, for matching names inside archives.

``docker save`` records ``RepoTags`` in whatever form the daemon stored them
(``alpine:3`` with the classic store, ``docker.io/library/alpine:3`` with
skopeo and containerd); containerd exports carry ``io.containerd.image.name``.
Matching compares the fully qualified forms, the way distribution/reference's
``ParseNormalizedNamed`` spells them.
"""

from __future__ import annotations

import re

DEFAULT_DOMAIN = "docker.io"
_LEGACY_DOMAIN = "index.docker.io"
_OFFICIAL_PREFIX = "library/"

# distribution/reference grammar, reduced to what matching needs.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def normalize_name(ref: str) -> str | None:
    """``alpine:3`` -> ``docker.io/library/alpine:3``; None if not a valid name.

    A missing tag means ``latest`` (unless a digest is given). The first path
    component is a registry host when it contains ``.`` or ``:``, is
    ``localhost``, or has upper-case letters (Docker's ``splitDockerDomain``).
    """
    name, digest = ref, ""
    if "@" in name:
        name, digest = name.split("@", 1)
        if not _DIGEST_RE.match(digest):
            return None
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            return None
    first, sep, rest = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == _LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    if not _PATH_RE.match(path):
        return None
    out = f"{domain}/{path}"
    if tag or not digest:
        out += f":{tag or 'latest'}"
    if digest:
        out += f"@{digest}"
    return out


def names_match(wanted: str, candidate: str) -> bool:
    """True when two image names denote the same reference (or are equal verbatim)."""
    if wanted == candidate:
        return True
    a, b = normalize_name(wanted), normalize_name(candidate)
    return a is not None and a == b
