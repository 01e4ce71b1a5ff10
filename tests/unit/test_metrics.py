"""Metrics: counters on a private registry, /metrics and /healthz over a real socket, and the
health building blocks (progress, database poller)."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from queue_processor.errors import ConfigurationError, DatabaseUnavailable
from queue_processor.metrics import (
    Metrics,
    MetricsServer,
    QueueDepthPoller,
    all_of,
    progress_check,
)
from queue_processor.worker import BatchReport

NAMES = (
    "queue_processor_items_total",
    "queue_processor_provider_requests_total",
    "queue_processor_tokens_total",
    "queue_processor_lease_reclaims_total",
    "queue_processor_batch_seconds_bucket",
    "queue_processor_batch_seconds_count",
    "queue_processor_queue_depth",
    "queue_processor_last_progress_timestamp_seconds",
)


def report(**counts: float) -> BatchReport:
    fields: dict[str, float] = {
        "items": 0,
        "done": 0,
        "failed": 0,
        "skipped": 0,
        "retried": 0,
        "lost": 0,
        "tokens": 0,
        "requests": 0,
        "seconds": 0.0,
    }
    fields.update(counts)
    return BatchReport(**fields)  # type: ignore[arg-type]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- counters ---------------------------------------------------------------------------


def test_observe_batch_moves_counters() -> None:
    metrics = Metrics(clock=Clock(1_700_000_000.0))
    assert value(metrics, "queue_processor_items_total", outcome="done") == 0
    assert value(metrics, "queue_processor_last_progress_timestamp_seconds") == 0

    metrics.observe_batch(
        report(items=10, done=6, failed=1, skipped=1, lost=2, tokens=120, requests=2, seconds=0.3)
    )
    metrics.observe_batch(report(items=4, retried=4, seconds=2.0))

    expected = {"done": 6, "failed": 1, "skipped": 1, "retried": 4, "lost": 2}
    for outcome, count in expected.items():
        assert value(metrics, "queue_processor_items_total", outcome=outcome) == count
    assert value(metrics, "queue_processor_tokens_total") == 120
    assert value(metrics, "queue_processor_batch_seconds_count") == 2
    assert value(metrics, "queue_processor_batch_seconds_sum") == pytest.approx(2.3)
    assert value(metrics, "queue_processor_batch_seconds_bucket", le="0.5") == 1
    assert value(metrics, "queue_processor_batch_seconds_bucket", le="2.5") == 2
    assert value(metrics, "queue_processor_last_progress_timestamp_seconds") == 1_700_000_000.0


def test_observe_request_and_claim() -> None:
    metrics = Metrics()
    for status in (200, 200, 429, "timeout"):
        metrics.observe_request(status)
    assert value(metrics, "queue_processor_provider_requests_total", status="200") == 2
    assert value(metrics, "queue_processor_provider_requests_total", status="429") == 1
    assert value(metrics, "queue_processor_provider_requests_total", status="timeout") == 1

    metrics.observe_claim(reclaimed=3, exhausted=1)
    metrics.observe_claim(reclaimed=0, exhausted=0)
    assert value(metrics, "queue_processor_lease_reclaims_total") == 3
    assert value(metrics, "queue_processor_items_total", outcome="failed") == 1


def test_set_queue_depth_zeroes_missing_statuses() -> None:
    metrics = Metrics()
    metrics.set_queue_depth({"pending": 5, "done": 7, "failed": 1, "processing": 2})
    metrics.set_queue_depth({"pending": 3})
    assert value(metrics, "queue_processor_queue_depth", status="pending") == 3
    for status in ("processing", "done", "failed"):
        assert value(metrics, "queue_processor_queue_depth", status=status) == 0


def test_track_progress_converts_monotonic_to_unix_time() -> None:
    wall, mono = Clock(1_700_000_100.0), Clock(500.0)
    metrics = Metrics(clock=wall, monotonic=mono)
    last_progress_at = 490.0  # 10 s ago on the monotonic clock
    metrics.track_progress(lambda: last_progress_at)
    assert value(metrics, "queue_processor_last_progress_timestamp_seconds") == 1_700_000_090.0
    last_progress_at = 500.0
    assert value(metrics, "queue_processor_last_progress_timestamp_seconds") == 1_700_000_100.0


def test_registries_are_private() -> None:
    first, second = Metrics(), Metrics()
    first.observe_request(200)
    assert value(second, "queue_processor_provider_requests_total", status="200") is None


# --- the HTTP server --------------------------------------------------------------------


class Health:
    def __init__(self) -> None:
        self.result = (True, "fine")
        self.calls = 0

    def __call__(self) -> tuple[bool, str]:
        self.calls += 1
        return self.result


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer, Health]]:
    metrics = Metrics()
    health = Health()
    with MetricsServer(metrics, port=0, health=health) as server:
        yield metrics, server, health


def test_metrics_endpoint_over_a_socket(served: tuple[Metrics, MetricsServer, Health]) -> None:
    metrics, server, _ = served
    assert server.port != 0
    metrics.observe_batch(report(items=3, done=3, tokens=42, seconds=0.1))
    metrics.observe_request(200)
    metrics.observe_claim(reclaimed=1, exhausted=0)
    metrics.set_queue_depth({"pending": 9})

    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    body = response.text
    for name in NAMES:
        assert name in body, name
    assert 'queue_processor_items_total{outcome="done"} 3.0' in body
    assert 'queue_processor_provider_requests_total{status="200"} 1.0' in body
    assert "queue_processor_tokens_total 42.0" in body
    assert "queue_processor_lease_reclaims_total 1.0" in body
    assert 'queue_processor_queue_depth{status="pending"} 9.0' in body
    assert "# TYPE queue_processor_batch_seconds histogram" in body


def test_healthz_follows_the_health_callable(
    served: tuple[Metrics, MetricsServer, Health],
) -> None:
    _, server, health = served
    ok = httpx.get(f"{server.url}/healthz")
    assert (ok.status_code, ok.text) == (200, "ok\n")

    health.result = (False, "worker loop made no progress for 700s (limit 600s)")
    bad = httpx.get(f"{server.url}/healthz")
    assert bad.status_code == 503
    assert bad.text == "worker loop made no progress for 700s (limit 600s)\n"

    health.result = (True, "recovered")
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert health.calls == 3


def test_healthz_is_503_when_the_check_raises() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with MetricsServer(Metrics(), port=0, health=broken) as server:
        response = httpx.get(f"{server.url}/healthz?verbose=1")
    assert response.status_code == 503
    assert "RuntimeError: boom" in response.text


def test_unknown_path_is_404(served: tuple[Metrics, MetricsServer, Health]) -> None:
    _, server, _ = served
    assert httpx.get(f"{server.url}/").status_code == 404


def test_busy_port_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(Metrics(), port=port)
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}"):
            server.start()
        assert not server.is_serving


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.anyio
async def test_serve_context_manager_closes_the_port() -> None:
    metrics = Metrics()
    async with metrics.serve(0) as server:
        port = server.port
        assert server.is_serving
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/healthz")
        assert response.status_code == 200
    assert not server.is_serving
    assert not _accepts(port)
    server.close()  # idempotent


# --- health building blocks -------------------------------------------------------------


def test_progress_check() -> None:
    mono = Clock(1000.0)
    last = 990.0
    check = progress_check(lambda: last, 60.0, monotonic=mono)
    ok, reason = check()
    assert ok
    assert "10.0s ago" in reason
    mono.now = 1100.0
    assert check() == (False, "worker loop made no progress for 110s (limit 60s)")
    last = 1099.0
    assert check()[0]


def test_all_of_reports_every_failure() -> None:
    def good() -> tuple[bool, str]:
        return True, "fine"

    def stuck() -> tuple[bool, str]:
        return False, "stuck"

    def no_db() -> tuple[bool, str]:
        return False, "no db"

    assert all_of(good, good)() == (True, "ok")
    assert all_of(good, stuck, no_db)() == (False, "stuck; no db")


class FakeQueueCounts:
    def __init__(self) -> None:
        self.counts: Mapping[str, int] = {"pending": 4, "done": 10}
        self.error: Exception | None = None
        self.hang = False
        self.calls = 0

    async def __call__(self) -> Mapping[str, int]:
        self.calls += 1
        if self.hang:
            await anyio.sleep_forever()
        if self.error is not None:
            raise self.error
        return self.counts


@pytest.mark.anyio
async def test_queue_depth_poller_is_the_database_check() -> None:
    metrics = Metrics()
    fetch = FakeQueueCounts()
    mono = Clock(100.0)
    poller = QueueDepthPoller(
        metrics, fetch, interval_seconds=10, timeout_seconds=0.05, monotonic=mono
    )
    assert poller.health() == (False, "no database check has completed yet")

    assert await poller.refresh()
    assert value(metrics, "queue_processor_queue_depth", status="pending") == 4
    assert poller.health()[0]

    fetch.error = DatabaseUnavailable("connection refused")
    with capture_logs() as logs:
        assert not await poller.refresh()
        assert not await poller.refresh()
        healthy, reason = poller.health()
        assert not healthy
        assert reason == "database check failed: connection refused"
        fetch.error = None
        assert await poller.refresh()
    assert [e["event"] for e in logs] == ["database_check_failed", "database_check_recovered"]
    assert poller.health()[0]

    # A hanging query counts as a failure, not as "still fine".
    fetch.hang = True
    with anyio.fail_after(2):
        assert not await poller.refresh()
    assert poller.health() == (False, "database check timed out after 0.05s")
    fetch.hang = False
    assert await poller.refresh()

    # A refresher that stopped running goes stale.
    mono.now += poller.stale_after_seconds + 1
    healthy, reason = poller.health()
    assert not healthy
    assert "last successful database check was" in reason


@pytest.mark.anyio
async def test_queue_depth_poller_run_refreshes_periodically() -> None:
    metrics = Metrics()
    fetch = FakeQueueCounts()
    poller = QueueDepthPoller(metrics, fetch, interval_seconds=0.02)
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert fetch.calls >= 3
    assert poller.health()[0]


@pytest.mark.anyio
async def test_queue_depth_poller_lets_bugs_through() -> None:
    fetch = FakeQueueCounts()
    fetch.error = KeyError("status")
    poller = QueueDepthPoller(Metrics(), fetch)
    with pytest.raises(KeyError):
        await poller.refresh()
