"""Prometheus metrics for ``run --metrics-port``, and the ``/healthz`` the service is judged by.

Everything lives on a private ``CollectorRegistry`` owned by one ``Metrics`` object the CLI
creates (no module-level metrics: tests and several workers in one process stay apart).
Exposed names (``queue_processor_`` prefix):

- ``items_total{outcome}``  items finished by outcome: done, failed, skipped (source row
  gone), retried (back to pending after a provider outage), lost (claim superseded)
- ``provider_requests_total{status}``  HTTP requests to the embedding API by status code
  (or ``timeout`` / ``error`` when no response arrived)
- ``tokens_total``  tokens the provider reported (estimated where it reported none)
- ``lease_reclaims_total``  expired leases of dead or stalled workers taken over by ours
- ``batch_seconds``  histogram of one batch from claim to acknowledgement
- ``queue_depth{status}``  queue rows by status (``inbox``: bulk-inserted keys not yet
  queued), refreshed by ``QueueDepthPoller``
- ``last_progress_timestamp_seconds``  Unix time of the worker loop's last claim or batch

``MetricsServer`` serves ``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (200
``ok``, or 503 with the reason) on a daemon thread; it is started and closed explicitly
(``Metrics.serve`` wraps that in an async context manager). Its cost is bounded whatever
clients do: idle or slow connections hold no thread and are dropped after a timeout, handler
threads and open connections are capped (see ``MetricsServer``). Health is whatever callable
the CLI passes in; ``progress_check``, ``QueueDepthPoller.health`` and ``all_of`` are the
building blocks it combines.
"""

from __future__ import annotations

import contextlib
import io
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import anyio
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from queue_processor.errors import ConfigurationError, QueueProcessorError
from queue_processor.models import STATUSES

if TYPE_CHECKING:
    from queue_processor.worker import BatchReport

log = structlog.get_logger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
"""Returns ``(healthy, reason)``; the reason is shown by /healthz when unhealthy."""

NAMESPACE: Final = "queue_processor"
OUTCOMES: Final = ("done", "failed", "skipped", "retried", "lost")
BATCH_SECONDS_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The worker's metrics on a private registry. Methods are cheap and thread-safe.

    ``clock`` (Unix seconds) and ``monotonic`` are injectable for tests.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self.registry = CollectorRegistry(auto_describe=True)
        common: dict[str, Any] = {"namespace": NAMESPACE, "registry": self.registry}
        self.items = Counter("items", "Queue items finished, by outcome.", ["outcome"], **common)
        self.provider_requests = Counter(
            "provider_requests",
            "HTTP requests to the embedding provider, by status code (or timeout/error).",
            ["status"],
            **common,
        )
        self.tokens = Counter("tokens", "Tokens embedded, as reported by the provider.", **common)
        self.lease_reclaims = Counter(
            "lease_reclaims",
            "Expired leases of other (dead or stalled) claims taken over by this worker.",
            **common,
        )
        self.batch_seconds = Histogram(
            "batch_seconds",
            "Seconds from claiming a batch to acknowledging it.",
            buckets=BATCH_SECONDS_BUCKETS,
            **common,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Rows in the embedding queue, by status.", ["status"], **common
        )
        self.last_progress = Gauge(
            "last_progress_timestamp_seconds",
            "Unix time of the worker loop's last claim or finished batch.",
            **common,
        )
        # Known label values start at 0, so rates and alerts work before the first event.
        for outcome in OUTCOMES:
            self.items.labels(outcome=outcome)
        for status in STATUSES:
            self.queue_depth.labels(status=status)

    def observe_batch(self, report: BatchReport) -> None:
        """Count one finished batch; pass as a Worker observer (``observers=[m.observe_batch]``)."""
        counts = {
            "done": report.done,
            "failed": report.failed,
            "skipped": report.skipped,
            "retried": report.retried,
            "lost": report.lost,
        }
        for outcome, count in counts.items():
            if count > 0:
                self.items.labels(outcome=outcome).inc(count)
        if report.tokens > 0:
            self.tokens.inc(report.tokens)
        self.batch_seconds.observe(max(0.0, report.seconds))
        self.last_progress.set(self._clock())

    def observe_claim(self, reclaimed: int, exhausted: int) -> None:
        """Count a claim's expired leases taken over, and the items it failed outright because
        their leases had expired too often (they never reach a batch report)."""
        if reclaimed > 0:
            self.lease_reclaims.inc(reclaimed)
        if exhausted > 0:
            self.items.labels(outcome="failed").inc(exhausted)

    def observe_request(self, status: int | str) -> None:
        """Count one provider HTTP request by status code (or ``timeout``/``error``)."""
        self.provider_requests.labels(status=str(status)).inc()

    def set_queue_depth(self, counts: Mapping[str, int]) -> None:
        """Set queue depth by status; statuses missing from ``counts`` have no rows (0)."""
        for status in STATUSES:
            self.queue_depth.labels(status=status).set(counts.get(status, 0))
        for other, count in counts.items():
            if other not in STATUSES:
                self.queue_depth.labels(status=other).set(count)

    def track_progress(self, last_progress_at: Callable[[], float]) -> None:
        """Report the worker's ``last_progress_at`` (a ``time.monotonic()`` value) as a Unix
        timestamp, read at scrape time, so idle claims count as progress too."""

        def unix_time() -> float:
            return self._clock() - (self._monotonic() - last_progress_at())

        self.last_progress.set_function(unix_time)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    @asynccontextmanager
    async def serve(
        self, port: int, *, host: str = "127.0.0.1", health: HealthCheck | None = None
    ) -> AsyncIterator[MetricsServer]:
        """Serve /metrics and /healthz on ``host:port`` (0 picks a free port) until exit."""
        server = MetricsServer(self, port=port, host=host, health=health)
        server.start()
        try:
            yield server
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.close)


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


# --- health building blocks --------------------------------------------------------------


def progress_check(
    last_progress_at: Callable[[], float],
    stall_seconds: float,
    *,
    monotonic: Callable[[], float] = time.monotonic,
) -> HealthCheck:
    """Healthy while the worker loop progressed (a claim, even an empty one, or a finished
    batch) within ``stall_seconds``. ``last_progress_at`` returns a ``time.monotonic()``
    value, e.g. ``lambda: worker.last_progress_at``."""

    def check() -> tuple[bool, str]:
        idle_s = monotonic() - last_progress_at()
        if idle_s > stall_seconds:
            return False, (
                f"worker loop made no progress for {idle_s:.0f}s (limit {stall_seconds:.0f}s)"
            )
        return True, f"worker loop progressed {idle_s:.1f}s ago"

    return check


def all_of(*checks: HealthCheck) -> HealthCheck:
    """Healthy when every check is; otherwise the reasons of the failing ones."""

    def check() -> tuple[bool, str]:
        failures = [reason for ok, reason in (c() for c in checks) if not ok]
        return (False, "; ".join(failures)) if failures else (True, "ok")

    return check


class QueueDepthPoller:
    """Refreshes ``queue_depth`` every ``interval_seconds`` with ``fetch()`` (a query of row
    counts by status); each refresh doubles as the database health check.

    ``health()`` is unhealthy before the first successful refresh, after a failed one, and
    when the last success is older than ``stale_after_seconds`` (default: three intervals),
    which also catches a refresher that hangs. Database errors (``QueueProcessorError``) are
    caught and logged on change; anything else is a bug and propagates.
    """

    def __init__(
        self,
        metrics: Metrics,
        fetch: Callable[[], Awaitable[Mapping[str, int]]],
        *,
        interval_seconds: float = 15.0,
        timeout_seconds: float | None = None,
        stale_after_seconds: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        self._metrics = metrics
        self._fetch = fetch
        self.interval_seconds = interval_seconds
        self.timeout_seconds = timeout_seconds or max(interval_seconds, 10.0)
        self.stale_after_seconds = (
            stale_after_seconds or 3 * interval_seconds + self.timeout_seconds
        )
        self._monotonic = monotonic
        self._last_ok_at: float | None = None
        self._error: str | None = "no database check has completed yet"
        self._failing = False

    async def refresh(self) -> bool:
        """Query once and update the gauge; True on success."""
        error: str | None = None
        counts: Mapping[str, int] | None = None
        with anyio.move_on_after(self.timeout_seconds):
            try:
                counts = await self._fetch()
            except QueueProcessorError as exc:
                error = f"database check failed: {exc}"
        if counts is None and error is None:
            error = f"database check timed out after {self.timeout_seconds:g}s"
        if error is not None:
            if not self._failing:
                log.warning("database_check_failed", error=error)
            self._error = error
            self._failing = True
            return False
        assert counts is not None
        self._metrics.set_queue_depth(counts)
        if self._failing:
            log.info("database_check_recovered")
        self._error = None
        self._failing = False
        self._last_ok_at = self._monotonic()
        return True

    async def run(self) -> None:
        """Refresh now and then every interval, until cancelled."""
        while True:
            await self.refresh()
            await anyio.sleep(self.interval_seconds)

    def health(self) -> tuple[bool, str]:
        """``(True, ...)`` when the last database check succeeded recently."""
        if self._error is not None:
            return False, self._error
        assert self._last_ok_at is not None
        age_s = self._monotonic() - self._last_ok_at
        if age_s > self.stale_after_seconds:
            return False, f"last successful database check was {age_s:.0f}s ago"
        return True, f"database checked {age_s:.1f}s ago"
