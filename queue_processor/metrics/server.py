"""GET /metrics and /healthz on a daemon thread, bounded whatever clients do."""

from __future__ import annotations

import contextlib
import io
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
)

from queue_processor.errors import ConfigurationError

if TYPE_CHECKING:
    from queue_processor.metrics.registry import Metrics

log = structlog.get_logger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
"""Returns ``(healthy, reason)``; the reason is shown by /healthz when unhealthy."""


def _always_healthy() -> tuple[bool, str]:
    return True, "ok"


class MetricsServer:
    """GET /metrics and GET /healthz on a daemon thread; ``start()`` then ``close()``.

    ``port=0`` binds a free port; ``.port`` is the bound one once started. A port that
    cannot be bound raises ``ConfigurationError`` (the operator has to pick another).

    Bounds, so that no client (a stuck scraper, a port scan, a flood of idle connections)
    can grow the worker: a connection must deliver its request within ``timeout_seconds`` of
    connecting and take the answer within ``timeout_seconds`` per write, or it is dropped;
    waiting for a request costs a file descriptor but no thread; at most ``max_threads``
    requests are answered at once and at most ``max_connections`` connections are open (a
    new one pushes out the one that has waited longest for its request, so /healthz still
    gets in). One request per connection (HTTP/1.0), as Prometheus and probes use it.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        port: int,
        host: str = "127.0.0.1",
        health: HealthCheck | None = None,
        timeout_seconds: float = 5.0,
        max_threads: int = 4,
        max_connections: int = 64,
    ) -> None:
        if timeout_seconds <= 0 or max_threads < 1 or max_connections < 1:
            raise ValueError("timeout_seconds, max_threads and max_connections must be positive")
        self.metrics = metrics
        self.host = host
        self.health = health or _always_healthy
        self.timeout_seconds = timeout_seconds
        self.max_threads = max_threads
        self.max_connections = max_connections
        self._requested_port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one until started)."""
        if self._httpd is None:
            return self._requested_port
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9187``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and start serving on a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("the metrics server is already started")
        try:
            httpd = _HTTPServer((self.host, self._requested_port), self)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self._requested_port}: {exc.strerror or exc}"
            ) from exc
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics_serving", url=self.url)

    def close(self) -> None:
        """Stop serving and close every socket; waits for running handlers (each bounded
        by ``timeout_seconds``). Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    @property
    def is_serving(self) -> bool:
        """True between ``start()`` and ``close()``."""
        return self._httpd is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_MAX_HEAD_BYTES: Final = 16 * 1024
"""A request line and headers longer than this are not a scrape: the connection is dropped."""


@dataclass
class _Waiting:
    """A connection whose request head is still arriving."""

    address: Any
    deadline: float
    head: bytearray = field(default_factory=bytearray)


class _HTTPServer(socketserver.TCPServer):
    """One selector thread (``serve_forever``) accepts connections and reads request heads
    without blocking; a complete head goes to a pool of ``max_threads`` handler threads,
    which answer and close. See ``MetricsServer`` for the bounds."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: MetricsServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.owner = owner
        self._waiting: dict[socket.socket, _Waiting] = {}  # oldest first; loop thread only
        self._answering = 0  # connections handed to handler threads, not yet closed
        self._lock = threading.Lock()
        self._handlers = ThreadPoolExecutor(
            max_workers=owner.max_threads, thread_name_prefix="metrics-http-handler"
        )
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._running = False
        super().__init__(address, _Handler)  # binds and listens; calls server_close on failure
        self.socket.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept, read request heads, hand complete ones over, drop overdue ones; until
        ``shutdown()``. ``poll_interval`` caps how long one wait for events lasts."""
        self._running = True
        try:
            while not self._stopping.is_set():
                timeout = min(poll_interval, self._drop_overdue())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is self._wake_read:
                        with contextlib.suppress(OSError):
                            self._wake_read.recv(64)
                    else:
                        assert isinstance(key.fileobj, socket.socket)
                        self._read_head(key.fileobj)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the loop (from another thread) and wait for it."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        if self._running:
            self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket and every connection; wait for running handlers."""
        self._stopping.set()
        super().server_close()
        for connection in list(self._waiting):
            self._drop(connection)
        self._handlers.shutdown(wait=True)
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def _accept(self) -> None:
        for _ in range(self.request_queue_size):  # a burst, then back to the other events
            try:
                connection, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, say: try again shortly, do not spin
                self._stopping.wait(0.1)
                return
            connection.setblocking(False)
            with self._lock:
                open_now = len(self._waiting) + self._answering
            if open_now >= self.owner.max_connections:
                if not self._waiting:  # every slot is being answered: refuse the newcomer
                    connection.close()
                    continue
                self._drop(next(iter(self._waiting)))  # the one that has waited longest
            deadline = time.monotonic() + self.owner.timeout_seconds
            self._waiting[connection] = _Waiting(address=address, deadline=deadline)
            self._selector.register(connection, selectors.EVENT_READ)

    def _read_head(self, connection: socket.socket) -> None:
        waiting = self._waiting[connection]
        try:
            data = connection.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # closed (or reset) before sending a whole request
            self._drop(connection)
            return
        waiting.head += data
        if b"\r\n\r\n" in waiting.head or b"\n\n" in waiting.head:
            self._selector.unregister(connection)
            del self._waiting[connection]
            with self._lock:
                self._answering += 1
            self._handlers.submit(self._answer, connection, waiting.address, bytes(waiting.head))
        elif len(waiting.head) > _MAX_HEAD_BYTES:
            self._drop(connection)

    def _drop_overdue(self) -> float:
        """Close connections past their deadline; seconds until the next deadline."""
        now = time.monotonic()
        for connection, waiting in list(self._waiting.items()):
            if waiting.deadline > now:
                return waiting.deadline - now  # oldest first: later ones are due later
            self._drop(connection)
        return self.owner.timeout_seconds

    def _drop(self, connection: socket.socket) -> None:
        del self._waiting[connection]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection)
        connection.close()

    def _answer(self, connection: socket.socket, address: Any, head: bytes) -> None:
        """On a handler thread: answer one request, then close the connection."""
        try:
            if not self._stopping.is_set():
                connection.settimeout(self.owner.timeout_seconds)
                _Handler((head, connection), address, self)
        except OSError:
            pass  # the client went away or stopped reading: nothing to answer
        except Exception:  # a bug in a handler must not go unseen, nor kill the pool
            log.exception("metrics_request_failed")
        finally:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
            with self._lock:
                self._answering -= 1


class _Handler(BaseHTTPRequestHandler):
    """Answers one request whose head ``_HTTPServer`` has already read."""

    server: _HTTPServer
    server_version = "queue-processor"

    def setup(self) -> None:
        head, connection = self.request
        assert isinstance(head, bytes)
        assert isinstance(connection, socket.socket)
        self.connection = connection
        self.rfile = io.BytesIO(head)
        self.wfile = connection.makefile("wb")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.server.owner.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            healthy, reason = self._health()
            if healthy:
                self._reply(200, b"ok\n")
            else:
                self._reply(503, (reason or "unhealthy").encode("utf-8", "replace") + b"\n")
        else:
            self._reply(404, b"not found: try /metrics or /healthz\n")

    def _health(self) -> tuple[bool, str]:
        try:
            return self.server.owner.health()
        except Exception as exc:  # a broken check must read as unhealthy, not kill the thread
            return False, f"health check raised {type(exc).__name__}: {exc}"

    def _reply(
        self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not worth a log line each."""
