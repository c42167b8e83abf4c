"""Registry options: command line plus the registries config file; mirror endpoints.

The config file is JSON, with Docker's ``daemon.json`` key names so a fleet
can reuse what it already writes::

    {
      "registry-mirrors": ["https://mirror.example.com"],
      "mirrors": {"ghcr.io": ["https://ghcr-cache.example.com"]},
      "insecure-registries": ["registry.lan:5000"]
    }

``registry-mirrors`` apply to Docker Hub images only, as in Docker;
``mirrors`` (as containerd's per-registry ``hosts.toml`` and podman's
``registries.conf`` allow) apply to the registry they are keyed by. Mirrors are
tried in order before the upstream, which is the fallback when they fail.
It is read from ``--registries-config FILE``, else ``$IMAGEFS_REGISTRIES_CONFIG``,
else ``/etc/imagefs/registries.json`` and (for a non-root user)
``$XDG_CONFIG_HOME/imagefs/registries.json``, each of which may be absent.
Command-line mirrors come before the file's.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from imagefs.errors import UsageError
from imagefs.reference import DOCKER_HUB, DOCKER_HUB_API, Reference
from imagefs.registry.auth import Credentials

if TYPE_CHECKING:  # the client pulls in requests: only load it to talk to a registry
    from imagefs.registry.client import Endpoint

CONFIG_ENV = "IMAGEFS_REGISTRIES_CONFIG"
SYSTEM_CONFIG = Path("/etc/imagefs/registries.json")


class LazyMode(enum.Enum):
    """``--lazy``: mount TOC layers lazily where possible (auto), or download all (never)."""

    AUTO = "auto"
    NEVER = "never"


class PrefetchMode(enum.Enum):
    """``--prefetch``: what a lazy mount fetches in the background once live."""

    LANDMARK = "landmark"  # the eStargz prioritised files
    ALL = "all"  # those, then every lazy blob whole (digest checked; fully local)
    NONE = "none"


@dataclass(frozen=True)
class RegistryOptions:
    """Everything a registry source needs besides the reference and platform."""

    registry_mirrors: tuple[str, ...] = ()  # Docker Hub mirrors (URLs)
    mirrors: tuple[tuple[str, tuple[str, ...]], ...] = ()  # registry -> mirror URLs
    insecure: frozenset[str] = frozenset()
    ca_bundle: Path | None = None
    auth_file: Path | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    credentials_host: str | None = None  # the registry explicit credentials are for
    offline: bool = False
    config_file: Path | None = None

    def mirrors_for(self, registry: str) -> tuple[str, ...]:
        found = self.registry_mirrors if registry == DOCKER_HUB else ()
        for key, urls in self.mirrors:
            if key == registry:
                found += urls
        return found


def _config_paths(explicit: Path | None) -> list[tuple[Path, bool]]:
    if explicit is not None:
        return [(explicit, True)]
    env = os.environ.get(CONFIG_ENV)
    if env:
        return [(Path(env), True)]
    paths = [(SYSTEM_CONFIG, False)]
    if os.geteuid() != 0:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        paths.append((Path(base) / "imagefs" / "registries.json", False))
    return paths


def _string_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: must be a list of strings")
    return tuple(value)


def check_mirror_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise UsageError(f"registry mirror {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    return url.rstrip("/")


def with_config_file(options: RegistryOptions) -> RegistryOptions:
    """``options`` merged with the registries config file(s)."""
    hub = list(options.registry_mirrors)
    per_registry = {key: list(urls) for key, urls in options.mirrors}
    insecure = set(options.insecure)
    for path, required in _config_paths(options.config_file):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if required:
                raise UsageError(f"registries config {path} does not exist") from None
            continue
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"registries config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"registries config {path}: not a JSON object")
        unknown = set(data) - {"registry-mirrors", "mirrors", "insecure-registries"}
        if unknown:
            raise UsageError(f"registries config {path}: unknown keys {sorted(unknown)}")
        hub += _string_list(data.get("registry-mirrors", []), f"{path}: registry-mirrors")
        mirrors = data.get("mirrors", {})
        if not isinstance(mirrors, dict):
            raise UsageError(f"{path}: mirrors must map a registry to a list of URLs")
        for key, urls in mirrors.items():
            per_registry.setdefault(key, []).extend(_string_list(urls, f"{path}: mirrors.{key}"))
        insecure.update(_string_list(data.get("insecure-registries", []), f"{path}: insecure"))
    return replace(
        options,
        registry_mirrors=tuple(check_mirror_url(u) for u in hub),
        mirrors=tuple(
            (key, tuple(check_mirror_url(u) for u in urls)) for key, urls in per_registry.items()
        ),
        insecure=frozenset(insecure),
    )


def endpoints(ref: Reference, options: RegistryOptions) -> list[Endpoint]:
    """Mirrors first (in order), the upstream registry last."""
    from imagefs.registry.client import Endpoint  # noqa: PLC0415 - see the TYPE_CHECKING import

    found = []
    for url in options.mirrors_for(ref.domain):
        parts = urlsplit(url)
        found.append(
            Endpoint(
                host=parts.netloc,
                registry=parts.netloc,
                scheme=parts.scheme,
                prefix=parts.path.rstrip("/"),
                mirror=True,
            )
        )
    host = DOCKER_HUB_API if ref.domain == DOCKER_HUB else ref.domain
    found.append(Endpoint(host=host, registry=ref.domain))
    return found


def http_mirror_hosts(options: RegistryOptions) -> frozenset[str]:
    """Hosts of mirrors the user gave as ``http://`` URLs: plain HTTP was asked for."""
    urls = list(options.registry_mirrors) + [u for _, urls in options.mirrors for u in urls]
    return frozenset(urlsplit(u).netloc for u in urls if u.startswith("http://"))
