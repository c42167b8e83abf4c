"""A distribution API v2 client on one ``requests.Session``: manifests, blobs, auth.

Follows the OCI distribution spec (``spec.md``: "Pulling manifests",
"Pulling blobs") and Docker's token authentication spec
(``docs/spec/auth/token.md``, ``oauth.md``):

* Requests go out anonymously first. A 401 carries a ``WWW-Authenticate``
  challenge: ``Basic`` is answered with the user's credentials, ``Bearer``
  with a token fetched from the challenge's realm for the scope
  ``repository:NAME:pull`` (with basic credentials, or the OAuth2
  refresh-token grant for an identity token). Tokens are kept per
  (realm, service, scope) and reused until shortly before ``expires_in``
  (60 s when absent, as the spec says); a 401 with a token fetches a new one
  once.
* TLS is verified (system CA store, or ``ca_bundle``). Plain HTTP is used only
  for loopback hosts and hosts the user listed as insecure, and only after
  HTTPS failed for a reason other than certificate verification (Docker's
  fallback for insecure registries); insecure hosts also skip verification.
* Redirects (blob storage behind a CDN) are followed by hand: an
  Authorization header never leaves the host it was meant for.
* Connection errors, timeouts and 5xx are retried with exponential backoff;
  an interrupted blob download resumes with ``Range: bytes=N-``.

Nothing here logs or raises with a header value: credentials and tokens stay
in headers and in :class:`Credentials`.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from imagefs import __version__
from imagefs.digest import Digest, InvalidDigestError, check
from imagefs.errors import (
    DigestMismatchError,
    ManifestError,
    RateLimitError,
    RegistryAuthError,
    RegistryDeniedError,
    RegistryError,
    RegistryNotFoundError,
    RegistryUnavailableError,
)
from imagefs.registry.auth import Challenge, Credentials, CredentialStore, parse_challenges
from imagefs.registry.blobstore import BlobDownload
from imagefs.sources.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    OCI_INDEX,
    OCI_MANIFEST,
)
from imagefs.sources.store import MAX_JSON_SIZE

log = logging.getLogger(__name__)

# Every manifest shape imagefs reads, best first; schema 1 deliberately absent
# (a registry that still answers with one gets a clear refusal).
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
USER_AGENT = f"imagefs/{__version__}"

_CHUNK = 1 << 20  # bytes per read of a blob body
_MAX_REDIRECTS = 5
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_TOKEN_LIFETIME = 60  # seconds; token.md: "if not specified, assume 60 seconds"
_TOKEN_MARGIN = 0.1  # refresh a token when 90% of its lifetime has passed
_POOL_SIZE = 16  # connections per host: parallel layer downloads share the session


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to send distribution API requests for one registry or mirror."""

    host: str  # netloc: host[:port]
    registry: str  # whose credentials apply (docker.io for registry-1.docker.io)
    scheme: str | None = None  # fixed by a mirror URL; None: https, or http where allowed
    prefix: str = ""  # a mirror URL's path, before /v2/
    mirror: bool = False

    def __str__(self) -> str:
        return f"{self.scheme or 'https'}://{self.host}{self.prefix}" if self.mirror else self.host


@dataclass(frozen=True)
class TransportOptions:
    ca_bundle: Path | None = None
    insecure: frozenset[str] = frozenset()  # hosts (host or host:port): HTTP and no TLS checks
    http_hosts: frozenset[str] = frozenset()  # hosts named by an http:// mirror URL
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    retries: int = 4  # extra attempts after connection errors and 5xx
    backoff: float = 0.25  # seconds before the first retry, doubled each time
    resumes: int = 8  # blob resumes after an interrupted transfer, per blob


@dataclass(frozen=True, slots=True)
class Manifest:
    data: bytes
    media_type: str  # the Content-Type the registry declared ("" if none)
    digest: Digest


def is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _error_detail(response: requests.Response) -> str:
    """The distribution error body's first code and message (spec: "Error Codes")."""
    try:
        body = json.loads(response.content[:65536])
        first = body["errors"][0]
        detail = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return f" ({detail[:200]})" if detail else ""


def _retry_after(response: requests.Response) -> str:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return "retry later (the registry did not say when)"
    if value.isdigit():
        return f"retry after {int(value)} seconds"
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    return f"retry after {parsed:%Y-%m-%d %H:%M:%S %Z}" if parsed else "retry later"


@dataclass
class _Token:
    value: str = field(repr=False)
    expires: float


class RegistryClient:
    """Thread-safe: parallel blob downloads share the session, tokens and schemes."""

    def __init__(
        self,
        credentials: CredentialStore,
        options: TransportOptions | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials
        self.options = options or TransportOptions()
        self._sleep = sleep
        self._clock = clock
        # One requests.Session per thread: a Session is not documented as
        # thread-safe, and parallel downloads and lazy reads (FUSE worker
        # threads) all send requests. Tokens, challenges and schemes below are
        # shared, under the lock.
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._challenges: dict[str, Challenge] = {}
        self._schemes: dict[str, str] = {}
        self.token_requests = 0  # for tests: tokens are reused, not fetched per request

    @property
    def session(self) -> requests.Session:
        """This thread's session (made on first use)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            adapter = HTTPAdapter(
                pool_connections=_POOL_SIZE, pool_maxsize=_POOL_SIZE, max_retries=0
            )
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # -- transport -------------------------------------------------------------

    def _insecure(self, host: str) -> bool:
        name = urlsplit(f"//{host}").hostname or host
        return host in self.options.insecure or name in self.options.insecure

    def _http_allowed(self, host: str) -> bool:
        return is_loopback(host) or self._insecure(host) or host in self.options.http_hosts

    def _verify(self, host: str) -> bool | str:
        if self._insecure(host):
            return False
        return str(self.options.ca_bundle) if self.options.ca_bundle else True

    def _scheme(self, endpoint: Endpoint) -> str:
        if endpoint.scheme:
            return endpoint.scheme
        with self._lock:
            return self._schemes.get(endpoint.host, "https")

    def _request_once(
        self, method: str, url: str, headers: dict[str, str], stream: bool, **kw: object
    ) -> requests.Response:
        """One request, redirects followed by hand (Authorization stays on its host)."""
        origin = urlsplit(url).netloc
        for _ in range(_MAX_REDIRECTS + 1):
            target = urlsplit(url)
            if target.scheme == "http" and not self._http_allowed(target.netloc):
                raise RegistryError(
                    f"refusing plain HTTP to {target.netloc} (use --insecure {target.netloc})"
                )
            with warnings.catch_warnings():
                # verify=False only for hosts the user declared insecure; urllib3's
                # warning would be an error under pytest and noise for the user.
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                response = self.session.request(
                    method,
                    url,
                    headers=headers,
                    stream=stream,
                    allow_redirects=False,
                    verify=self._verify(target.netloc),
                    timeout=(self.options.connect_timeout, self.options.read_timeout),
                    **kw,  # type: ignore[arg-type]
                )
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECT_STATUS or not location:
                return response
            response.close()
            url = urljoin(url, location)
            if urlsplit(url).netloc != origin and "Authorization" in headers:
                # Blob storage (S3, a CDN) gets a signed URL; our credentials
                # or token are for the registry only.
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            if response.status_code == 303:
                method = "GET"
            log.debug("redirected to %s", urlsplit(url).netloc)
        raise RegistryError(f"{origin}: more than {_MAX_REDIRECTS} redirects")

    def send(
        self,
        endpoint: Endpoint,
        repository: str,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """A distribution API request with auth, scheme fallback and retries.

        Returns the final response whatever its status (see :meth:`check`);
        raises RegistryUnavailableError when the registry cannot be reached.
        """
        attempt = 0
        auth_retried = False
        while True:
            url = f"{self._scheme(endpoint)}://{endpoint.host}{endpoint.prefix}{path}"
            request_headers = dict(headers or {})
            authorization = self._authorization(endpoint, repository)
            if authorization:
                request_headers["Authorization"] = authorization
            try:
                response = self._request_once(method, url, request_headers, stream)
            except requests.exceptions.SSLError as exc:
                if self._fall_back_to_http(endpoint, exc):
                    continue
                raise self._unavailable(endpoint, exc) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                if self._fall_back_to_http(endpoint, exc):
                    continue
                if attempt < self.options.retries:
                    attempt += 1
                    self._backoff(attempt, endpoint, type(exc).__name__)
                    continue
                raise self._unavailable(endpoint, exc) from None
            if response.status_code == 401 and not auth_retried:
                challenges = parse_challenges(response.headers.get("WWW-Authenticate", ""))
                usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
                if usable:
                    response.close()
                    auth_retried = True
                    with self._lock:
                        self._challenges[endpoint.host] = usable[0]
                    self._forget_token(endpoint, repository)
                    continue
            if response.status_code in _RETRY_STATUS and attempt < self.options.retries:
                response.close()
                attempt += 1
                self._backoff(attempt, endpoint, f"HTTP {response.status_code}")
                continue
            if endpoint.scheme is None:
                with self._lock:
                    self._schemes.setdefault(endpoint.host, urlsplit(url).scheme)
            return response

    def _fall_back_to_http(self, endpoint: Endpoint, exc: Exception) -> bool:
        """Switch a loopback or insecure registry to plain HTTP after HTTPS failed."""
        if endpoint.scheme is not None or not self._http_allowed(endpoint.host):
            return False
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) and not self._insecure(endpoint.host):
            return False  # it does speak TLS: a bad certificate is an error, not a hint
        with self._lock:
            if endpoint.host in self._schemes:
                return False  # the scheme was settled by an earlier answer
            self._schemes[endpoint.host] = "http"
        log.debug("%s: HTTPS failed (%s), using plain HTTP", endpoint.host, type(exc).__name__)
        return True

    def _backoff(self, attempt: int, endpoint: Endpoint, why: str) -> None:
        delay = self.options.backoff * (2 ** (attempt - 1))
        log.info("%s: %s, retry %d in %.2f s", endpoint, why, attempt, delay)
        self._sleep(delay)

    def _unavailable(self, endpoint: Endpoint, exc: Exception) -> RegistryUnavailableError:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return RegistryUnavailableError(
                f"registry {endpoint}: TLS certificate not trusted (give its CA with "
                "--ca-bundle FILE)"
            )
        if isinstance(exc, requests.Timeout):
            return RegistryUnavailableError(f"registry {endpoint}: timed out")
        if isinstance(exc, requests.exceptions.SSLError):
            return RegistryUnavailableError(f"registry {endpoint}: TLS handshake failed")
        return RegistryUnavailableError(
            f"registry {endpoint}: cannot connect (after {self.options.retries} retries)"
        )

    # -- authentication ----------------------------------------------------------

    def _scope(self, repository: str) -> str:
        return f"repository:{repository}:pull"

    def _forget_token(self, endpoint: Endpoint, repository: str) -> None:
        with self._lock:
            challenge = self._challenges.get(endpoint.host)
            if challenge is not None and challenge.scheme == "bearer":
                key = self._token_key(challenge, repository)
                self._tokens.pop(key, None)

    def _token_key(self, challenge: Challenge, repository: str) -> tuple[str, str, str]:
        return (
            challenge.params.get("realm", ""),
            challenge.params.get("service", ""),
            self._scope(repository),
        )

    def _authorization(self, endpoint: Endpoint, repository: str) -> str | None:
        with self._lock:
            challenge = self._challenges.get(endpoint.host)
        if challenge is None:
            return None  # no challenge yet: try anonymously, the 401 tells us how
        credentials = self.credentials.lookup(endpoint.registry)
        if challenge.scheme == "basic":
            if credentials is None or credentials.identity_token:
                return None  # the 401 comes back and says credentials are needed
            return credentials.basic()
        key = self._token_key(challenge, repository)
        with self._lock:
            token = self._tokens.get(key)
            if token is not None and token.expires > self._clock():
                return f"Bearer {token.value}"
        token = self._fetch_token(endpoint, challenge, repository, credentials)
        with self._lock:
            self._tokens[key] = token
        return f"Bearer {token.value}"

    def _fetch_token(
        self,
        endpoint: Endpoint,
        challenge: Challenge,
        repository: str,
        credentials: Credentials | None,
    ) -> _Token:
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise RegistryAuthError(f"registry {endpoint}: unusable token realm {realm!r}")
        service = challenge.params.get("service")
        scope = self._scope(repository)
        started = self._clock()
        try:
            if credentials is not None and credentials.identity_token:
                # oauth.md: an identity token is a refresh token for the OAuth2 grant.
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": credentials.identity_token,
                    "client_id": "imagefs",
                    "scope": scope,
                    **({"service": service} if service else {}),
                }
                response = self._request_once("POST", realm, {}, False, data=form)
            else:
                params = {"scope": scope, **({"service": service} if service else {})}
                headers = {}
                if credentials is not None:
                    params["account"] = credentials.username
                    headers["Authorization"] = credentials.basic()
                response = self._request_once("GET", realm, headers, False, params=params)
        except RegistryError:
            raise
        except requests.RequestException as exc:
            raise RegistryUnavailableError(
                f"token server {parts.netloc} for {endpoint}: {type(exc).__name__}"
            ) from None
        with self._lock:
            self.token_requests += 1
        if response.status_code in (401, 403):
            what = "refused the credentials" if credentials else "requires credentials"
            raise RegistryAuthError(
                f"registry {endpoint}: token server {parts.netloc} {what} for {repository} "
                f"(HTTP {response.status_code}; see --auth-file, --username)"
            )
        if response.status_code != 200:
            raise RegistryAuthError(
                f"registry {endpoint}: token server {parts.netloc} answered HTTP "
                f"{response.status_code}"
            )
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = body.get("expires_in") or _TOKEN_LIFETIME
        except (ValueError, AttributeError):
            value, lifetime = None, 0
        if not isinstance(value, str) or not value or not isinstance(lifetime, int | float):
            raise RegistryAuthError(f"registry {endpoint}: the token server sent no token")
        log.debug("token for %s on %s, valid %s s", scope, endpoint, lifetime)
        return _Token(value, started + lifetime * (1 - _TOKEN_MARGIN))

    # -- answers -----------------------------------------------------------------

    def check(self, response: requests.Response, endpoint: Endpoint, what: str) -> None:
        """Turn a non-2xx answer into the matching RegistryError."""
        status = response.status_code
        if 200 <= status < 300:
            return
        detail = _error_detail(response)
        response.close()
        where = f"registry {endpoint}: {what}"
        if status == 401:
            has = self.credentials.lookup(endpoint.registry) is not None
            raise RegistryAuthError(
                f"{where}: authentication "
                + ("failed: credentials refused" if has else "required (no credentials found")
                + ("" if has else "; see --auth-file, --username, ~/.docker/config.json)")
                + detail
            )
        if status == 403:
            raise RegistryDeniedError(f"{where}: access denied (HTTP 403){detail}")
        if status == 404:
            raise RegistryNotFoundError(f"{where}: not found (HTTP 404){detail}")
        if status == 429:
            raise RateLimitError(
                f"{where}: rate limit reached (HTTP 429), {_retry_after(response)}{detail}"
            )
        if status >= 500:
            raise RegistryUnavailableError(f"{where}: server error HTTP {status}{detail}")
        raise RegistryError(f"{where}: unexpected HTTP {status}{detail}")

    # -- manifests ---------------------------------------------------------------

    def head_manifest(self, endpoint: Endpoint, repository: str, reference: str) -> Digest | None:
        """The digest a tag points to (``Docker-Content-Digest``), or None if not given."""
        response = self.send(
            endpoint,
            repository,
            "HEAD",
            f"/v2/{repository}/manifests/{reference}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if response.status_code not in (200, 401, 403, 429):
            # A HEAD answer has no body, hence no error detail: let the GET report it.
            response.close()
            return None
        self.check(response, endpoint, f"manifest {repository}:{reference}")
        response.close()
        return _declared_digest(response)

    def get_manifest(self, endpoint: Endpoint, repository: str, reference: str) -> Manifest:
        """GET a manifest or index by tag or digest, verified (spec: "Pulling manifests")."""
        what = f"manifest {repository}{'@' if ':' in reference else ':'}{reference}"
        response = self.send(
            endpoint,
            repository,
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        self.check(response, endpoint, what)
        try:
            data = self._read_limited(response, f"registry {endpoint}: {what}")
        finally:
            response.close()
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type in DOCKER_SCHEMA1:
            raise ManifestError(
                f"registry {endpoint}: {what} is a Docker schema 1 manifest, which imagefs "
                "does not support (re-push the image with a current Docker or skopeo)"
            )
        over = f"the manifest ({len(data)} bytes)"
        if ":" in reference:  # by digest: the content must hash to it
            expected = Digest(reference)
            expected.verify(data, where=f"registry {endpoint}: {what}", over=over)
            return Manifest(data, media_type, expected)
        digest = Digest.of(data)
        declared = _declared_digest(response)
        if declared is not None:
            check(declared, digest, where=f"registry {endpoint}: {what} (Docker-Content-Digest)",
                  over=over)  # fmt: skip
        return Manifest(data, media_type, digest)

    def _read_limited(self, response: requests.Response, where: str) -> bytes:
        parts: list[bytes] = []
        total = 0
        try:
            for chunk in response.iter_content(65536):
                total += len(chunk)
                if total > MAX_JSON_SIZE:
                    raise ManifestError(f"{where}: larger than 8 MiB, refusing it")
                parts.append(chunk)
        except requests.RequestException as exc:
            raise RegistryUnavailableError(
                f"{where}: transfer failed: {type(exc).__name__}"
            ) from None
        return b"".join(parts)

    # -- blobs -------------------------------------------------------------------

    def get_blob_bytes(self, endpoint: Endpoint, repository: str, digest: Digest) -> bytes:
        """A small blob (a config), verified."""
        response = self.send(
            endpoint, repository, "GET", f"/v2/{repository}/blobs/{digest}", stream=True
        )
        self.check(response, endpoint, f"blob {digest}")
        try:
            data = self._read_limited(response, f"registry {endpoint}: blob {digest}")
        finally:
            response.close()
        digest.verify(data, where=f"registry {endpoint}: blob {digest}",
                      over=f"the blob ({len(data)} bytes)")  # fmt: skip
        return data

    def fetch_blob(
        self,
        endpoint: Endpoint,
        repository: str,
        download: BlobDownload,
        *,
        progress: Callable[[int], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        """Download into ``download`` from where it stands, resuming after cuts.

        Spec, "Pulling blobs": a registry SHOULD support ``Range``; one that
        answers 200 to it is read from the start, skipping what we have.
        The caller commits (which verifies the digest).
        """
        digest = download.digest
        what = f"blob {digest}"
        resumes = 0
        while download.written < download.size:
            start = download.written
            headers = {"Range": f"bytes={start}-"} if start else {}
            response = self.send(
                endpoint, repository, "GET", f"/v2/{repository}/blobs/{digest}",
                headers=headers, stream=True,
            )  # fmt: skip
            self.check(response, endpoint, what)
            skip = start
            if response.status_code == 206:
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {start}-"):
                    response.close()
                    raise RegistryError(
                        f"registry {endpoint}: {what}: asked for bytes {start}-, got "
                        f"{content_range or 'no Content-Range'}"
                    )
                skip = 0
            try:
                for chunk in response.iter_content(_CHUNK):
                    if cancelled is not None and cancelled.is_set():
                        return
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                    if chunk:
                        download.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
            except requests.RequestException as exc:
                if resumes >= self.options.resumes:
                    raise RegistryUnavailableError(
                        f"registry {endpoint}: {what}: transfer failed {resumes + 1} times "
                        f"({type(exc).__name__})"
                    ) from None
                resumes += 1
                log.info(
                    "%s: %s cut after %d of %d bytes (%s); resuming",
                    endpoint,
                    what,
                    download.written,
                    download.size,
                    type(exc).__name__,
                )
                self._sleep(self.options.backoff)
                continue
            finally:
                response.close()
            if download.written < download.size:
                if resumes >= self.options.resumes:
                    raise DigestMismatchError(
                        f"registry {endpoint}: {what}: ended after {download.written} of "
                        f"{download.size} bytes"
                    )
                resumes += 1

    def fetch_range(
        self, endpoint: Endpoint, repository: str, digest: Digest, start: int, length: int
    ) -> bytes:
        """Bytes ``start`` to ``start + length`` of a blob, with Range requests (blocking).

        Spec, "Pulling blobs": a registry SHOULD support ``Range``. The answer
        must be a 206 whose ``Content-Range`` starts where asked; a transfer
        cut midway resumes where it stopped, as :meth:`fetch_blob` does.
        Nothing here is verified: the caller checks what the bytes decode to.
        """
        what = f"blob {digest} bytes {start}-{start + length - 1}"
        got = bytearray()
        resumes = 0
        while len(got) < length:
            position = start + len(got)
            last = start + length - 1
            response = self.send(
                endpoint, repository, "GET", f"/v2/{repository}/blobs/{digest}",
                headers={"Range": f"bytes={position}-{last}"}, stream=True,
            )  # fmt: skip
            self.check(response, endpoint, what)
            content_range = response.headers.get("Content-Range", "")
            if response.status_code != 206 or not content_range.startswith(
                f"bytes {position}-{last}/"
            ):
                response.close()
                raise RegistryError(
                    f"registry {endpoint}: {what}: no answer to a Range request (HTTP "
                    f"{response.status_code}, {content_range or 'no Content-Range'}); "
                    "mount with --lazy never"
                )
            try:
                for chunk in response.iter_content(_CHUNK):
                    if len(got) + len(chunk) > length:
                        raise RegistryError(
                            f"registry {endpoint}: {what}: sent more than the range asked for"
                        )
                    got += chunk
            except requests.RequestException as exc:
                if resumes >= self.options.resumes:
                    raise RegistryUnavailableError(
                        f"registry {endpoint}: {what}: transfer failed {resumes + 1} times "
                        f"({type(exc).__name__})"
                    ) from None
                resumes += 1
                log.info("%s: %s cut after %d bytes (%s); resuming", endpoint, what, len(got),
                         type(exc).__name__)  # fmt: skip
                self._sleep(self.options.backoff)
                continue
            finally:
                response.close()
            if len(got) < length:
                if resumes >= self.options.resumes:
                    raise RegistryUnavailableError(
                        f"registry {endpoint}: {what}: ended after {len(got)} of {length} bytes"
                    )
                resumes += 1
        return bytes(got)


def _declared_digest(response: requests.Response) -> Digest | None:
    """The sha256 ``Docker-Content-Digest`` a registry declared, if it declared a valid one.

    distribution computes it with sha256; a missing or malformed header says
    nothing, and the content is hashed by us either way.
    """
    value = response.headers.get("Docker-Content-Digest", "")
    try:
        declared = Digest(value)
    except InvalidDigestError:
        return None
    return declared if declared.algorithm == "sha256" else None
