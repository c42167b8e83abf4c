"""Registry sources: pull images from any OCI / Docker distribution registry.

Public surface::

    parse_reference("alpine:3") -> Reference         (reference)
    RegistryOptions(...)                              (config: mirrors, TLS, credentials)
    open_registry_image(source, ...) -> (Image, Downloads, RegistrySource)   (pull)
    pull(source, ...) -> Image                        (fill the cache only)
    list_cache(store), prune_cache(store)             (cache)
    is_registry_source(source) -> bool

Modules: ``auth`` (credentials,
challenges), ``client`` (distribution API v2 on requests), ``config``
(options, mirrors, the registries config file), ``pull`` (resolution and
streaming layer downloads), ``cache`` (``imagefs cache``). Blobs land in
:mod:`imagefs.registry.blobstore`; references are parsed by :mod:`imagefs.reference`,
which the local sources share for matching names inside archives.
"""

from __future__ import annotations

from imagefs.reference import PREFIX, Reference, parse_reference
from imagefs.registry.auth import Credentials
from imagefs.registry.cache import list_cache, prune_cache
from imagefs.registry.config import RegistryOptions
from imagefs.sources import is_local_source

__all__ = [
    "Credentials",
    "DownloadProgress",
    "Reference",
    "RegistryOptions",
    "is_registry_source",
    "list_cache",
    "open_registry_image",
    "parse_reference",
    "prune_cache",
    "pull",
]

# Local paths are never references: a reference cannot start with these, and
# these endings are what image files are called (``missing.tar`` must say
# "no such file", not try Docker Hub).
_PATH_STARTS = ("/", "./", "../", "~")
_PATH_ENDS = (".tar", ".tar.gz", ".tgz", ".oci")


# The pulling side imports requests and urllib3 (about 0.1 s): load it on first
# use, so that mounting a local image or a cached one never pays for it.
_LAZY = {"DownloadProgress", "open_registry_image", "pull"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from imagefs.registry import pull as pull_module  # noqa: PLC0415 - deliberately lazy

        return getattr(pull_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_registry_source(source: str) -> bool:
    """True when SOURCE is meant for a registry: ``docker://...``, or anything that
    is neither a local file nor shaped like a path (``alpine:3``, ``Alpine``).

    A malformed reference is still a registry source, so that it gets
    :func:`parse_reference`'s explanation rather than "no such file".
    """
    if source.startswith(PREFIX):
        return True
    if not source or is_local_source(source) or source.startswith(_PATH_STARTS):
        return False
    return not source.split("@", maxsplit=1)[0].split(":", maxsplit=1)[0].endswith(_PATH_ENDS)
