"""Image references parsed as Docker parses them (distribution/reference).

``alpine`` is ``docker.io/library/alpine:latest``; ``user/repo:tag`` lives on
Docker Hub; ``ghcr.io/o/r@sha256:...``, ``host:5000/repo:tag`` and
``localhost/repo`` name other registries. The first path component is a
registry when it contains ``.`` or ``:``, is ``localhost``, or has upper-case
letters (``splitDockerDomain``). A tag and a digest together are allowed and
the digest wins (the tag is only informative, as in Docker). An optional
``docker://`` prefix (skopeo's transport name) is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imagefs.digest import Digest, InvalidDigestError
from imagefs.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's distribution API lives
_LEGACY_HUB = "index.docker.io"
_OFFICIAL = "library/"
PREFIX = "docker://"

# distribution/reference/regexp.go, piece by piece.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_NAME_MAX = 255  # distribution: NameTotalLengthMax


@dataclass(frozen=True, slots=True)
class Reference:
    """A fully qualified reference: registry domain, repository path, tag and/or digest."""

    domain: str  # docker.io, ghcr.io, localhost:5000 ...
    path: str  # library/alpine
    tag: str | None = None
    digest: Digest | None = None

    @property
    def repository(self) -> str:
        """``docker.io/library/alpine``: the cache key of the repository."""
        return f"{self.domain}/{self.path}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.domain, self.path, self.tag, digest)

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse like ``docker pull``; InvalidReferenceError says what is wrong."""
    original = text
    text = text.removeprefix(PREFIX)
    if not text:
        raise InvalidReferenceError(f"invalid reference {original!r}: empty")

    def invalid(why: str) -> InvalidReferenceError:
        return InvalidReferenceError(f"invalid reference {original!r}: {why}")

    name, at, digest_text = text.partition("@")
    digest = None
    if at:
        # Only digests imagefs can verify: the same rule as every descriptor's.
        try:
            digest = Digest(digest_text)
        except InvalidDigestError:
            raise invalid(
                f"digest {digest_text!r} is not sha256:<64 hex> or sha512:<128 hex>"
            ) from None
    tag: str | None = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise invalid(f"tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    first, sep, rest = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        domain, path = first, rest
        if not _DOMAIN_RE.match(domain):
            raise invalid(f"registry {domain!r} is not a host name with an optional port")
    else:
        domain, path = DOCKER_HUB, name
    if domain == _LEGACY_HUB:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = _OFFICIAL + path
    if not path:
        raise invalid("no repository name")
    if path != path.lower() and _PATH_RE.match(path.lower()):
        raise invalid("repository name must be lowercase")
    if not _PATH_RE.match(path):
        raise invalid(
            f"repository {path!r}: components are lowercase letters, digits and "
            "separators (. _ __ -), joined by /"
        )
    if len(f"{domain}/{path}") > _NAME_MAX:
        raise invalid(f"repository name longer than {_NAME_MAX} characters")
    if tag is None and not at:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def looks_like_reference(text: str) -> bool:
    """True when ``text`` parses as a reference (it may still name a local file)."""
    try:
        parse_reference(text)
    except InvalidReferenceError:
        return False
    return True
