"""Real registries for tests: the CNCF distribution registry on 127.0.0.1, a token
issuer it trusts, and TCP proxies that misbehave on purpose.

``docker-registry serve CONFIG`` (Debian package ``docker-registry``, distribution
2.8) reads YAML, of which JSON is a subset, so configs are written as JSON.
Each registry listens on a free loopback port with storage in a temporary
directory and is stopped by :meth:`Registry.stop`. Only loopback traffic.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.engines import Skopeo
from tests.needs import require_tools

READY_TRIES = 400  # x 25 ms: a registry starts in well under a second


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_cert(directory: Path, name: str, hosts: tuple[str, ...] = ()) -> tuple[Path, Path, Any]:
    """A self-signed RSA certificate (PEM) and key; returns (cert, key, private key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, key


def libtrust_kid(public_key: Any) -> str:
    """docker/libtrust key ID: base32 of SHA-256(DER SPKI)[:30], in 4-char groups."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i : i + 4] for i in range(0, len(text), 4))


@dataclass
class TokenIssuer:
    """A token server (distribution token.md) signing RS256 JWTs the registry trusts.

    Policy: repositories under ``public/`` may be pulled anonymously; anything
    else needs one of ``users`` (basic auth on GET, or an identity token on
    the OAuth2 POST). Users may also push.
    """

    directory: Path
    users: dict[str, str]
    identity_tokens: dict[str, str] = field(default_factory=dict)  # token -> user
    service: str = "imagefs-test"
    issuer: str = "imagefs-test-issuer"
    expires_in: int = 300
    requests_seen: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cert, _, self._key = make_cert(self.directory, "token-issuer")
        self._kid = libtrust_kid(self._key.public_key())
        self.port = free_port()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                user = issuer._basic_user(self.headers.get("Authorization"))
                issuer._answer(self, user, query.get("scope", []), "GET")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                user = issuer.identity_tokens.get(form.get("refresh_token", [""])[0], "")
                issuer._answer(self, user or None, form.get("scope", []), "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _basic_user(self, header: str | None) -> str | None:
        if not header or not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        if self.users.get(user) != password:
            return ""  # wrong credentials: refused
        return user

    def _answer(
        self, handler: BaseHTTPRequestHandler, user: str | None, scopes: list[str], method: str
    ) -> None:
        self.requests_seen.append({"method": method, "user": user, "scopes": scopes})
        if user == "":
            handler.send_response(401)
            handler.end_headers()
            return
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = ["pull", "push"] if user else (["pull"] if name.startswith("public/") else [])
            granted = [a for a in actions.split(",") if a in allowed]
            access.append({"type": kind, "name": name, "actions": granted})
        body = json.dumps({"token": self.sign(user or "", access), "expires_in": self.expires_in})
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(body.encode())

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self._kid}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Registry:
    """One ``docker-registry serve`` process on 127.0.0.1."""

    def __init__(
        self,
        directory: Path,
        *,
        htpasswd: dict[str, str] | None = None,
        token: TokenIssuer | None = None,
        tls: bool = False,
        proxy_remote: str | None = None,
    ) -> None:
        require_tools("docker-registry")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.storage = directory / "storage"
        self.port = free_port()
        self.ca: Path | None = None
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "imagefs-test"},
        }
        if htpasswd is not None:
            lines = [
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}"
                for user, pw in htpasswd.items()
            ]
            (directory / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "imagefs", "path": str(directory / "htpasswd")}}
        if token is not None:
            config["auth"] = {
                "token": {
                    "realm": token.realm,
                    "service": token.service,
                    "issuer": token.issuer,
                    "rootcertbundle": str(token.cert),
                }
            }
        if tls:
            cert, key, _ = make_cert(directory, "registry", ("127.0.0.1", "localhost"))
            config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
            self.ca = cert
        if proxy_remote is not None:
            config["proxy"] = {"remoteurl": proxy_remote}
        (directory / "config.yml").write_text(json.dumps(config, indent=1))
        self._log = (directory / "registry.log").open("wb")
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(directory / "config.yml")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.scheme = "https" if tls else "http"
        self._wait_ready()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def _wait_ready(self) -> None:
        for _ in range(READY_TRIES):
            if self.process.poll() is not None:
                break
            try:
                requests.get(f"{self.url}/v2/", timeout=1, verify=str(self.ca) if self.ca else True)
                return
            except requests.RequestException:
                time.sleep(0.025)
        self.stop()
        log = (self.directory / "registry.log").read_text(errors="replace")
        raise RuntimeError(f"docker-registry did not start: {log[-2000:]}")

    def push(self, source: str, repo: str, *extra: str, creds: str | None = None) -> str:
        """``skopeo copy SOURCE docker://HOST/REPO`` (hermetic); returns the pushed reference."""
        credentials = [f"--dest-creds={creds}"] if creds else []
        return Skopeo().push(source, f"{self.host}/{repo}", *extra, *credentials)

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob (distribution's storage layout)."""
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class CuttingProxy:
    """A TCP proxy that cuts the first response carrying more than ``cut_after``
    bytes, once, mid-transfer; every other connection passes through untouched."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, dest: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if downstream:
                    with self._lock:
                        cut = self.cuts == 0 and sent + len(data) > self.cut_after
                        if cut:
                            self.cuts += 1
                    if cut:
                        dest.sendall(data[: max(self.cut_after - sent, 0)])
                        break
                dest.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (source, dest):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()


def iter_token_scopes(issuer: TokenIssuer) -> Iterator[str]:
    for seen in issuer.requests_seen:
        yield from seen["scopes"]
