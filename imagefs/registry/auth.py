"""Registry credentials and authentication challenges.

Where credentials come from, first match wins:

1. explicit ones (``--username`` with ``--password-stdin``), for the image's registry;
2. ``--auth-file FILE`` (Docker's ``config.json`` format, like skopeo's ``--authfile``);
3. ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``: ``credHelpers``
   for the registry, else ``credsStore``, else ``auths`` (``auth`` =
   base64 ``user:password``, or ``identitytoken``). Helpers run as
   ``docker-credential-NAME get`` (docker-credential-helpers protocol: the
   server URL on stdin, JSON ``{"Username", "Secret"}`` on stdout; the user
   name ``<token>`` marks an identity token).

Challenges follow RFC 7235 (``WWW-Authenticate: Bearer realm="...",
service="...",scope="..."``) as the distribution token spec uses them.
Secrets never reach a log line, an exception message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs.errors import RegistryAuthError, UsageError
from imagefs.reference import DOCKER_HUB

log = logging.getLogger(__name__)

# Docker keys Docker Hub's credentials under its v1 index URL.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HELPER_TIMEOUT = 30.0  # seconds; a helper may prompt a keychain, but must not hang a mount


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password, or an identity (refresh) token. Never printed."""

    username: str = field(repr=False)
    password: str = field(repr=False, default="")
    identity_token: str = field(repr=False, default="")

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    def basic(self) -> str:
        """The ``Authorization: Basic`` value."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _host_of(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000`` (config.json keys come in all shapes)."""
    key = re.sub(r"^[a-z]+://", "", key.strip())
    host = key.split("/", 1)[0].lower()
    return "docker.io" if host in _HUB_ALIASES else host


def _server_url(host: str) -> str:
    """What a credential helper is asked for (Docker passes the v1 URL for Docker Hub)."""
    return DOCKER_HUB_AUTH_KEY if host == DOCKER_HUB else host


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _load_config(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"auth file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # The message must not quote the file: it holds secrets.
        raise UsageError(f"cannot read credentials from {path}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    return data


def _decode_auth(value: str, where: str) -> Credentials:
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise UsageError(f"{where}: 'auth' is not base64 of user:password") from None
    if not sep:
        raise UsageError(f"{where}: 'auth' is not base64 of user:password")
    return Credentials(user, password)


def run_helper(helper: str, host: str) -> Credentials | None:
    """``docker-credential-HELPER get``: None when it has nothing for ``host``."""
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run(
            [program, "get"],
            input=_server_url(host),
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise RegistryAuthError(f"credential helper {program} is not installed") from None
    except subprocess.TimeoutExpired:
        raise RegistryAuthError(f"credential helper {program} did not answer") from None
    if result.returncode != 0:
        # "credentials not found in native keychain": the helper has nothing for us.
        if "not found" in result.stdout + result.stderr:
            return None
        raise RegistryAuthError(f"credential helper {program} failed (exit {result.returncode})")
    try:
        answer = json.loads(result.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(f"credential helper {program} gave no usable answer") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise RegistryAuthError(f"credential helper {program} gave no usable answer")
    if user == "<token>":
        return Credentials("", identity_token=secret)
    return Credentials(user, secret)


def _from_config(config: dict[str, Any], host: str, where: str) -> Credentials | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _host_of(key) == host and isinstance(helper, str):
                return run_helper(helper, host)
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        found = run_helper(store, host)
        if found is not None:
            return found
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _host_of(key) != host or not isinstance(entry, dict):
            continue
        token = entry.get("identitytoken")
        if isinstance(token, str) and token:
            return Credentials(entry.get("username") or "", identity_token=token)
        auth = entry.get("auth")
        if isinstance(auth, str) and auth:
            return _decode_auth(auth, f"{where}: auths[{key!r}]")
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and isinstance(password, str):
            return Credentials(user, password)
    return None


class CredentialStore:
    """Finds credentials for a registry host (see the module docstring for the order)."""

    def __init__(
        self,
        *,
        explicit: Credentials | None = None,
        explicit_host: str | None = None,
        auth_file: Path | None = None,
    ) -> None:
        self._explicit = explicit
        self._explicit_host = _host_of(explicit_host) if explicit_host else None
        self._auth_file = auth_file
        self._found: dict[str, Credentials | None] = {}

    def lookup(self, host: str) -> Credentials | None:
        """Credentials for ``host`` (``docker.io``, ``ghcr.io``, ``127.0.0.1:5000``)."""
        host = _host_of(host)
        if host in self._found:
            return self._found[host]
        found: Credentials | None = None
        if self._explicit is not None and self._explicit_host in (None, host):
            found = self._explicit
        elif self._auth_file is not None:
            found = _from_config(_load_config(self._auth_file, True), host, str(self._auth_file))
        else:
            path = docker_config_path()
            found = _from_config(_load_config(path, False), host, str(path))
        log.debug("credentials for %s: %s", host, "found" if found else "none")
        self._found[host] = found
        return found


# -- challenges ---------------------------------------------------------------

_TOKEN68 = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    params: dict[str, str] = field(hash=False)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` (RFC 7235 section 4.1), possibly several challenges."""
    challenges: list[Challenge] = []
    rest = header.strip()
    while rest:
        m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
        if m is None:
            break
        scheme, rest = m.group(1).lower(), rest[m.end() :]
        params: dict[str, str] = {}
        while True:
            pm = _TOKEN68.match(rest)
            if pm is None:
                break
            key, value = pm.group(1).lower(), pm.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key] = value
            rest = rest[pm.end() :]
        challenges.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return challenges
