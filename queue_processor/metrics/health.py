"""Health building blocks: worker-loop progress, the database check, and their conjunction."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import anyio
import structlog

from queue_processor.errors import QueueProcessorError

if TYPE_CHECKING:
    from queue_processor.metrics.registry import Metrics

from queue_processor.metrics.server import HealthCheck

log = structlog.get_logger(__name__)


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
