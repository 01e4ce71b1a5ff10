"""The worker's Prometheus metrics on a private registry (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from queue_processor.models import STATUSES

if TYPE_CHECKING:
    from queue_processor.worker import BatchReport

from queue_processor.metrics.server import HealthCheck, MetricsServer

log = structlog.get_logger(__name__)

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
