"""Registry pieces without a real registry: references, credentials, challenges,
the blob store, and the client against a scripted loopback HTTP server for the
answers a distribution registry will not give on demand (429, 403, redirects
to another host, schema 1, 5xx)."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imagefs.digest import Digest
from imagefs.errors import (
    DigestMismatchError,
    InvalidReferenceError,
    ManifestError,
    RateLimitError,
    RegistryAuthError,
    RegistryDeniedError,
    RegistryUnavailableError,
    UsageError,
)
from imagefs.reference import Reference
from imagefs.registry import is_registry_source, parse_reference
from imagefs.registry.auth import Credentials, CredentialStore, parse_challenges
from imagefs.registry.blobstore import BlobStore
from imagefs.registry.client import Endpoint, RegistryClient, TransportOptions
from imagefs.registry.config import RegistryOptions, endpoints, with_config_file

DIGEST = Digest("sha256:" + "ab" * 32)

# -- references -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", Reference("docker.io", "library/alpine", "latest")),
        ("alpine:3", Reference("docker.io", "library/alpine", "3")),
        ("docker://alpine:3", Reference("docker.io", "library/alpine", "3")),
        ("user/repo:tag", Reference("docker.io", "user/repo", "tag")),
        ("index.docker.io/user/repo", Reference("docker.io", "user/repo", "latest")),
        ("ghcr.io/o/r@" + DIGEST, Reference("ghcr.io", "o/r", None, DIGEST)),
        ("host:5000/repo:tag", Reference("host:5000", "repo", "tag")),
        ("host:5000/a/b/c", Reference("host:5000", "a/b/c", "latest")),
        ("localhost/repo", Reference("localhost", "repo", "latest")),
        ("127.0.0.1:5000/x_y.z-w:v1.2", Reference("127.0.0.1:5000", "x_y.z-w", "v1.2")),
        ("alpine:3@" + DIGEST, Reference("docker.io", "library/alpine", "3", DIGEST)),
    ],
)
def test_parse_reference_like_docker(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert ref.reference == (expected.digest or expected.tag)  # the digest wins


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Alpine", "must be lowercase"),
        ("alpine@sha256:abc", "is not sha256:<64 hex>"),
        ("alpine:bad tag", "tag 'bad tag'"),
        ("host:5000/", "no repository name"),
        ("a//b", "components are lowercase"),
        ("-host.io/x", "registry '-host.io'"),
    ],
)
def test_invalid_references_say_why(text: str, why: str) -> None:
    with pytest.raises(InvalidReferenceError, match=why):
        parse_reference(text)


def test_registry_or_local_source(tmp_path: Path) -> None:
    (tmp_path / "img.tar").write_bytes(b"")
    assert is_registry_source("alpine:3")
    assert is_registry_source("docker://alpine")
    assert is_registry_source("Alpine")  # so the user hears what is wrong with it
    assert not is_registry_source(str(tmp_path / "img.tar"))
    assert not is_registry_source("missing.tar")
    assert not is_registry_source("./dir")
    assert not is_registry_source("oci:whatever")


# -- credentials and challenges ----------------------------------------------------


def test_parse_challenges() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull", Basic realm="x\\"y"'
    )
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
    }
    assert (basic.scheme, basic.params) == ("basic", {"realm": 'x"y'})


def test_docker_config_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = base64.b64encode(b"bob:pw:with:colons").decode()
    config = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": auth},
            "https://reg.example:5000/v2/": {"identitytoken": "idtok"},
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    store = CredentialStore()
    hub = store.lookup("docker.io")
    assert hub is not None and (hub.username, hub.password) == ("bob", "pw:with:colons")
    token = store.lookup("reg.example:5000")
    assert token is not None and token.identity_token == "idtok"
    assert store.lookup("other.example") is None
    assert "pw" not in repr(hub) and "idtok" not in repr(token)
    explicit = CredentialStore(explicit=Credentials("u", "p"), explicit_host="ghcr.io")
    assert explicit.lookup("ghcr.io") == Credentials("u", "p")
    assert explicit.lookup("other.example") is None  # not the explicit ones


def test_bad_auth_file_does_not_quote_secrets(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text('{"auths": {"h": {"auth": "c2VjcmV0LXdpdGhvdXQtY29sb24="}}}')
    with pytest.raises(UsageError) as info:
        CredentialStore(auth_file=path).lookup("h")
    assert "secret" not in str(info.value)
    with pytest.raises(UsageError, match="does not exist"):
        CredentialStore(auth_file=tmp_path / "nope.json").lookup("h")


def test_mirrors_from_config_file(tmp_path: Path) -> None:
    config = tmp_path / "registries.json"
    config.write_text(
        json.dumps(
            {
                "registry-mirrors": ["https://hub-mirror.example/"],
                "mirrors": {"ghcr.io": ["http://127.0.0.1:5001"]},
                "insecure-registries": ["reg.lan:5000"],
            }
        )
    )
    options = with_config_file(
        RegistryOptions(registry_mirrors=("https://first.example",), config_file=config)
    )
    hub = endpoints(parse_reference("alpine"), options)
    assert [str(e) for e in hub] == [
        "https://first.example",
        "https://hub-mirror.example",
        "registry-1.docker.io",
    ]
    ghcr = endpoints(parse_reference("ghcr.io/o/r"), options)
    assert [(e.scheme, e.host, e.mirror) for e in ghcr] == [
        ("http", "127.0.0.1:5001", True),
        (None, "ghcr.io", False),
    ]
    # Docker's registry-mirrors are for Docker Hub only.
    assert len(endpoints(parse_reference("quay.io/a/b"), options)) == 1
    assert options.insecure == {"reg.lan:5000"}
    config.write_text('{"mirrors": {"x": "not a list"}}')
    with pytest.raises(UsageError, match="list of strings"):
        with_config_file(RegistryOptions(config_file=config))


# -- blob store -----------------------------------------------------------------------


def test_blob_store_put_read_and_corruption(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"hello"
    digest = Digest.of(data)
    with pytest.raises(DigestMismatchError):
        store.put(digest, b"other")
    assert not store.has(digest)
    store.put(digest, data)
    assert store.read(digest) == data
    store.blob_path(digest).write_bytes(b"HELLO")
    assert store.read(digest) is None  # corrupt: removed, fetched again by the caller
    assert not store.has(digest)
    assert not list(store.root.rglob("*.part"))


def test_blob_download_streams_to_waiting_readers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = bytes(range(256)) * 64
    digest = Digest.of(data)
    download = store.begin(digest, len(data))
    seen: list[bytes] = []

    def reader() -> None:
        download.wait_for(len(data))  # blocks until the writer is done
        fd = download.open_fd()
        try:
            seen.append(os.pread(fd, len(data), 0))
        finally:
            os.close(fd)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(0, len(data), 1000):
        download.write(data[i : i + 1000])
    download.commit()
    thread.join()
    assert seen == [data]
    assert store.read(digest) == data
    download.close()


def test_failed_download_wakes_readers_and_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    download = store.begin(DIGEST, 10)
    download.write(b"12345")
    download.wait_for(5)  # already there: returns at once
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            download.wait_for(10)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    download.write(b"67890")
    with pytest.raises(DigestMismatchError):
        download.commit()  # ten bytes, but not the content DIGEST names
    thread.join()
    assert not errors  # the reader got its bytes before the check failed
    with pytest.raises(DigestMismatchError):
        download.wait_for(11)
    download.close()
    assert not store.has(DIGEST)
    assert not list(store.root.rglob("*.part"))


def test_prune_keeps_live_downloads(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    live = store.begin(DIGEST, 4)
    # Left by a download whose process died (nobody holds its lock), beside
    # the blobs and where older imagefs wrote them (tmp/).
    dead = store.blob_path(DIGEST).with_name(f".{DIGEST.encoded}.{'0' * 16}.part")
    dead.write_bytes(b"x")
    legacy = tmp_path / "tmp" / "0123456789abcdef.abc.part"
    legacy.parent.mkdir()
    legacy.write_bytes(b"y")
    result = store.prune(set())
    assert result.files == 2
    assert not dead.exists() and not legacy.exists()
    assert len(list(store.root.rglob("*.part"))) == 1  # the live one
    live.close()
    assert not list(store.root.rglob("*.part"))


# -- client against a scripted server -----------------------------------------------


Handler = Callable[[BaseHTTPRequestHandler], None]


class Scripted:
    """A loopback HTTP server answering each path with a scripted function."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        scripted = self

        class RequestHandler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                path = self.path.split("?")[0]
                scripted.seen.append((self.command, path, self.headers.get("Authorization")))
                route = scripted.routes.get(path)
                if route is None:
                    reply(self, 404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"nope"}]}')
                else:
                    route(self)

            do_GET = do_HEAD = _serve  # noqa: N815 (http.server's names)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.stop()


def client_for(**kw: Any) -> RegistryClient:
    return RegistryClient(
        CredentialStore(explicit=Credentials("user", "pw")),
        TransportOptions(**kw),
        sleep=lambda _: None,
    )


def test_status_codes_have_their_own_messages(scripted: Scripted) -> None:
    endpoint = Endpoint(scripted.host, scripted.host)
    client = client_for()
    scripted.routes["/v2/limited/manifests/1"] = lambda h: reply(
        h, 429, headers={"Retry-After": "42"}
    )
    scripted.routes["/v2/denied/manifests/1"] = lambda h: reply(h, 403)
    with pytest.raises(RateLimitError, match=r"rate limit reached \(HTTP 429\), retry after 42 s"):
        client.get_manifest(endpoint, "limited", "1")
    with pytest.raises(RegistryDeniedError, match="access denied"):
        client.get_manifest(endpoint, "denied", "1")
    with pytest.raises(Exception, match=r"not found \(HTTP 404\) \(NAME_UNKNOWN: nope\)"):
        client.get_manifest(endpoint, "absent", "1")


def test_schema1_is_refused(scripted: Scripted) -> None:
    body = b'{"schemaVersion": 1}'
    scripted.routes["/v2/old/manifests/1"] = lambda h: reply(
        h, 200, body, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
    )
    with pytest.raises(ManifestError, match="schema 1 manifest"):
        client_for().get_manifest(Endpoint(scripted.host, scripted.host), "old", "1")


def test_5xx_is_retried_then_reported(scripted: Scripted) -> None:
    calls: list[int] = []
    body = b'{"schemaVersion": 2}'

    def flaky(h: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        reply(h, 503) if len(calls) < 3 else reply(h, 200, body)

    scripted.routes["/v2/flaky/manifests/1"] = flaky
    scripted.routes["/v2/down/manifests/1"] = lambda h: reply(h, 502)
    endpoint = Endpoint(scripted.host, scripted.host)
    manifest = client_for().get_manifest(endpoint, "flaky", "1")
    assert manifest.data == body and len(calls) == 3
    with pytest.raises(RegistryUnavailableError, match="server error HTTP 502"):
        client_for(retries=2).get_manifest(endpoint, "down", "1")


def test_basic_challenge_and_redirect_without_authorization(scripted: Scripted) -> None:
    cdn = Scripted()
    try:
        blob = b"layer bytes"
        digest = Digest.of(blob)

        def registry_blob(h: BaseHTTPRequestHandler) -> None:
            if h.headers.get("Authorization") is None:
                reply(h, 401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            else:
                reply(h, 307, headers={"Location": f"http://{cdn.host}/signed/blob?sig=1"})

        scripted.routes[f"/v2/repo/blobs/{digest}"] = registry_blob
        cdn.routes["/signed/blob"] = lambda h: reply(h, 200, blob)
        client = client_for()
        data = client.get_blob_bytes(Endpoint(scripted.host, scripted.host), "repo", digest)
        assert data == blob
        auth = "Basic " + base64.b64encode(b"user:pw").decode()
        assert scripted.seen[-1][2] == auth  # the registry got the credentials
        assert cdn.seen == [("GET", "/signed/blob", None)]  # the CDN did not
    finally:
        cdn.stop()


def test_bearer_token_reused_and_refreshed(scripted: Scripted) -> None:
    now = [0.0]
    tokens: list[str] = []

    def token(h: BaseHTTPRequestHandler) -> None:
        tokens.append(f"t{len(tokens)}")
        reply(h, 200, json.dumps({"token": tokens[-1], "expires_in": 100}).encode())

    def manifest(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") != f"Bearer {tokens[-1] if tokens else ''}":
            challenge = f'Bearer realm="http://{scripted.host}/token",service="s"'
            reply(h, 401, headers={"WWW-Authenticate": challenge})
        else:
            reply(h, 200, b"{}")

    scripted.routes["/token"] = token
    scripted.routes["/v2/r/manifests/1"] = manifest
    client = RegistryClient(CredentialStore(), TransportOptions(), clock=lambda: now[0])
    endpoint = Endpoint(scripted.host, scripted.host)
    for _ in range(3):
        client.get_manifest(endpoint, "r", "1")
    assert tokens == ["t0"]  # fetched once, reused
    now[0] = 95.0  # past 90% of its lifetime: refreshed before it expires
    client.get_manifest(endpoint, "r", "1")
    assert tokens == ["t0", "t1"]
    assert client.token_requests == 2


def test_token_server_refusal_is_an_auth_error(scripted: Scripted) -> None:
    scripted.routes["/token"] = lambda h: reply(h, 401)
    scripted.routes["/v2/r/manifests/1"] = lambda h: reply(
        h, 401, headers={"WWW-Authenticate": f'Bearer realm="http://{scripted.host}/token"'}
    )
    with pytest.raises(RegistryAuthError, match="refused the credentials") as info:
        client_for().get_manifest(Endpoint(scripted.host, scripted.host), "r", "1")
    assert "pw" not in str(info.value)


def test_plain_http_refused_for_non_loopback_hosts() -> None:
    client = client_for()
    endpoint = Endpoint("registry.invalid", "registry.invalid", scheme="http")
    with pytest.raises(Exception, match=r"refusing plain HTTP to registry\.invalid"):
        client.get_manifest(endpoint, "r", "1")
