"""Parsing a local SOURCE argument: transport prefix, path, trailing reference.

Accepted forms (the prefixes are skopeo's transport names)::

    oci:PATH[:TAG]              OCI image layout directory
    oci-archive:PATH[:TAG]      OCI image layout in a tar
    docker-archive:PATH[:REF]   docker save tar; REF is NAME:TAG, an image ID or @N (N-th image)
    dir:PATH                    containers/image's dir: transport (skopeo, podman docker-dir)
    PATH[:REF]                  any of the above, detected from the contents
    containerd:REF              an image in a host's containerd store
    containers-storage:[[ROOT]]REF  podman/buildah/CRI-O store (skopeo's ``[driver@root+run]``
                                spelling works: only the graph root is used)
    docker-store:REF            Docker's data root (overlay2)

The host stores take their root from ``--store-root`` (or the bracketed
prefix); what follows the prefix is an image reference read by the engine's
rules, not a path (see :func:`split_store`).

A path may itself contain ``:``. skopeo splits at the first ``:``; here the
longest prefix that exists on disk is the path, so ``a:b.tar:x:1`` works when
``a:b.tar`` exists, and ``reg:5000/img:1`` style references keep their colons.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from imagefs.errors import UsageError

TRANSPORTS = ("oci", "oci-archive", "docker-archive", "dir")
# Host stores: what follows the prefix is an image reference inside the store.
STORE_TRANSPORTS = ("containerd", "containers-storage", "docker-store")


@dataclass(frozen=True, slots=True)
class SourceSpec:
    transport: str | None  # one of TRANSPORTS, or None to detect from the contents
    path: str
    ref: str | None  # tag / name / "@N", or None


def split_transport(source: str) -> tuple[str | None, str]:
    for transport in TRANSPORTS:
        if source.startswith(transport + ":"):
            return transport, source[len(transport) + 1 :]
    return None, source


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """An image in a host store: which store, where (``""``: not said), which image."""

    transport: str  # one of STORE_TRANSPORTS
    root: str  # from a ``[...]`` specifier, "" if none
    ref: str  # the image reference, read by the engine's rules ("" if none given)


def split_store(source: str) -> StoreSpec | None:
    """``containerd:nginx``, ``containers-storage:[overlay@/var/lib/x+/run/x]nginx``;
    None for a source that names no host store."""
    for transport in STORE_TRANSPORTS:
        if source.startswith(transport + ":"):
            rest = source[len(transport) + 1 :]
            root = ""
            if transport == "containers-storage" and rest.startswith("["):
                # containers/image's storage specifier: [driver@graphroot+runroot:options]
                specifier, sep, rest = rest[1:].partition("]")
                if not sep:
                    raise UsageError(f"{source}: unterminated '[' store specifier")
                root = specifier.partition("@")[2] if "@" in specifier else specifier
                root = root.partition("+")[0].partition(":")[0]
            return StoreSpec(transport, root, rest)
    return None


def parse_source(source: str) -> SourceSpec:
    """Split a file SOURCE; does not check that the path exists (a missing one keeps no ref)."""
    if not source:
        raise UsageError("empty image source")
    if split_store(source) is not None:
        raise UsageError(f"{source}: names a host store, not a file")
    transport, rest = split_transport(source)
    if not rest:
        raise UsageError(f"{source}: missing path after '{transport}:'")
    if os.path.lexists(rest):
        return SourceSpec(transport, rest, None)
    # Longest existing prefix before a ':' is the path, the rest the reference.
    pos = rest.rfind(":")
    while pos > 0:
        prefix = rest[:pos]
        if os.path.lexists(prefix):
            return SourceSpec(transport, prefix, rest[pos + 1 :] or None)
        pos = rest.rfind(":", 0, pos)
    return SourceSpec(transport, rest, None)


def is_local_source(source: str) -> bool:
    """True when SOURCE names a local image (explicit transport, or an existing path).

    Lets a caller tell ``./alpine.tar`` or ``layout:tag`` from a registry
    reference such as ``alpine:3``.
    """
    transport, _ = split_transport(source)
    if transport is not None or split_store(source) is not None:
        return True
    spec = parse_source(source) if source else None
    return spec is not None and os.path.lexists(spec.path)
