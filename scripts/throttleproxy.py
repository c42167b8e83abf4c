"""A loopback TCP proxy whose downstream bandwidth is limited, as a slow link's would be.

On raw loopback a download costs almost nothing, so comparing a mount with
``curl`` says nothing about overlapping decompression with the download.
Put this proxy in front of a registry and the *aggregate* server-to-client
bandwidth, over every connection at once, is capped at ``rate`` bytes per
second by one shared token bucket: four parallel layer downloads share the
link as they would share a real one. Client-to-server bytes (requests) pass
unthrottled. Pure stdlib, two threads per connection.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

CHUNK = 64 * 1024  # bytes per recv: 1.3 ms of a 400 Mbit/s link, so connections interleave
ACCEPT_POLL = 0.2  # s: how soon the accept loop notices stop()


class TokenBucket:
    """``rate`` bytes per second, shared; a taker sleeps until its bytes are paid for.

    Takers go into debt (tokens below zero) and then sleep it off, rather than
    waiting for enough tokens to accumulate: each reservation is served in
    the order it was made, so the aggregate never exceeds ``rate`` (beyond
    ``burst``) and no connection can starve another.
    """

    def __init__(self, rate: float, burst: float, stopped: threading.Event) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stopped = stopped

    def take(self, count: int) -> bool:
        """Wait until ``count`` bytes may go; False if the proxy stopped meanwhile."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= count
            delay = -self._tokens / self.rate
        if delay > 0:
            # An Event wait, not time.sleep, so stop() wakes every waiting pump.
            return not self._stopped.wait(delay)
        return not self._stopped.is_set()


class ThrottleProxy:
    """127.0.0.1:``port`` forwarding to ``target_host``:``target_port``; ``stop`` ends it.

    ``rate`` is in bytes per second, downstream only. Half-closes are passed
    on (an EOF in one direction becomes ``shutdown(SHUT_WR)`` on the other
    side), a reset tears both directions down. ``bytes_down`` counts what
    reached clients.
    """

    def __init__(
        self,
        target_port: int,
        rate: float,
        *,
        target_host: str = "127.0.0.1",
        burst: float = CHUNK,
    ) -> None:
        self.target = (target_host, target_port)
        self._stopped = threading.Event()
        self.bucket = TokenBucket(rate, burst, self._stopped)
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        # A burst of connects beyond the backlog would wait out a 1 s SYN retry.
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=socket.SOMAXCONN)
        self._listener.settimeout(ACCEPT_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="throttle-accept", daemon=True)
        self._acceptor.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ThrottleProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            client.settimeout(None)  # pumps block; stop() wakes them by shutdown
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()  # as a dead server would look: connection closed
                continue
            for sock in (client, upstream):
                # Forward each piece at once: Nagle + delayed ACK on the proxy's
                # two hops would add stalls a direct connection does not have.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._start(client, upstream)

    def _start(self, client: socket.socket, upstream: socket.socket) -> None:
        # Both pumps must finish before the sockets close: a half-closed
        # connection still carries the response.
        remaining = [2]

        def finished() -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
                self._sockets.difference_update((client, upstream))
            client.close()
            upstream.close()

        with self._lock:
            if self._stopped.is_set():
                client.close()
                upstream.close()
                return
            self._sockets.update((client, upstream))
            for source, dest, down in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(
                    target=self._pump, args=(source, dest, down, finished), daemon=True
                )
                self._threads.add(thread)
                thread.start()

    def _pump(
        self,
        source: socket.socket,
        dest: socket.socket,
        downstream: bool,
        finished: Callable[[], None],
    ) -> None:
        try:
            while data := source.recv(CHUNK):
                if downstream:
                    if not self.bucket.take(len(data)):
                        raise ConnectionAbortedError("proxy stopped")
                    dest.sendall(data)
                    with self._lock:
                        self.bytes_down += len(data)
                else:
                    dest.sendall(data)
            # Orderly EOF: pass the half-close on, keep the other direction.
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            # Reset, or stop(): the whole connection goes, both directions.
            for sock in (source, dest):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
            finished()

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new connections, cut the open ones and wait for their threads."""
        self._stopped.set()
        self._listener.close()
        self._acceptor.join(timeout)
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
