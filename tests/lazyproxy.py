"""An HTTP proxy in front of a test registry that counts, corrupts, stalls or goes away.

Lazy registry mounts are proved by what crosses the wire: every request is
recorded (method, path, ``Range``, status, body bytes), so a test can say
"mounting fetched only the manifest, the config, the footers and the TOCs".
On demand it flips one byte of a blob at a given offset in every answer that
carries it (a corrupt chunk), holds blob answers until released (a stalled
registry), or drops every connection unanswered (a registry gone). Loopback
only; one upstream connection per request.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STALL_LIMIT = 300.0  # s a stalled answer waits at most for release (so teardown never hangs)
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int

    @property
    def blob(self) -> str | None:
        """The digest of the blob asked for, if this was a blob request."""
        head, _, digest = self.path.partition("/blobs/")
        return digest if head and digest else None


class LazyProxy:
    """127.0.0.1:``port`` forwarding HTTP to the registry on ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.seen: list[Seen] = []
        self.corrupt: tuple[str, int] | None = None  # (blob digest, blob offset) to flip
        self.down = False
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self.stalled = 0  # answers held back so far
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self, "GET")

            def do_HEAD(self) -> None:
                proxy._forward(self, "HEAD")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- behaviour -----------------------------------------------------------------

    def stall(self) -> None:
        """Hold every blob answer from now on, until :meth:`release`."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def reset(self) -> list[Seen]:
        """The requests seen so far; forget them."""
        with self._lock:
            seen, self.seen = self.seen, []
        return seen

    def blob_requests(self) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.blob is not None]

    # -- forwarding ----------------------------------------------------------------

    def _forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        if self.down:
            handler.close_connection = True  # no answer at all: as a registry that is gone
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
        upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=60)
        try:
            upstream.request(method, handler.path, headers=headers)
            response = upstream.getresponse()
            body = response.read()
            status, reply_headers = response.status, response.getheaders()
        finally:
            upstream.close()
        blob = handler.path.partition("/blobs/")[2]
        if blob and method == "GET":
            if not self._flowing.is_set():
                with self._lock:
                    self.stalled += 1
                self._flowing.wait(STALL_LIMIT)
            body = self._corrupted(blob, status, dict(reply_headers), body)
        with self._lock:
            self.seen.append(Seen(method, handler.path, handler.headers.get("Range"), status,
                                  len(body) if method == "GET" else 0))  # fmt: skip
        handler.send_response(status)
        for key, value in reply_headers:
            if key.lower() not in _HOP_HEADERS:
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method == "GET":
            handler.wfile.write(body)

    def _corrupted(self, blob: str, status: int, headers: dict[str, str], body: bytes) -> bytes:
        target = self.corrupt
        if target is None or target[0] != blob:
            return body
        start = 0
        if status == 206:
            content_range = headers.get("Content-Range", "")
            start = int(content_range.split()[1].split("-")[0])
        at = target[1] - start
        if 0 <= at < len(body):
            body = body[:at] + bytes([body[at] ^ 0x55]) + body[at + 1 :]
        return body

    def stop(self) -> None:
        self._flowing.set()
        self._server.shutdown()
        self._server.server_close()
