"""The one backoff policy of the worker and the repository, and the database retry built on it.

``backoff_seconds(attempt, base_seconds=..., max_seconds=...)`` is the wait before the next
attempt: ``base_seconds`` after the first failure, doubling with each further one, never more
than ``max_seconds``. Every loop that waits out a database outage uses it: the claim loop
(``claim_failed``), LISTEN (``listen_failed``) and ``retry_database`` (``database_retry``),
the retry of one database operation of a batch while its lease still stands.

A function rather than tenacity (which the HTTP provider uses for its own in-call retries):
two of the three loops are not "call f until it succeeds". Between attempts the claim loop
hands its slot back and wakes up early on a stop request, and LISTEN runs forever, starting
afresh after every healthy session; tenacity would fit only ``retry_database`` and leave two
policies. So the policy is this one function and each loop keeps its own shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog

from queue_processor.errors import DatabaseUnavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Database operations of a batch: 0.4 s after the first failure, then 0.8, 1.6, ... 15 s.
DATABASE_RETRY_BASE_SECONDS = 0.4
DATABASE_RETRY_MAX_SECONDS = 15.0
# Beyond this many doublings every wait is capped anyway (and 2**n stays a small number).
_MAX_DOUBLINGS = 32


def backoff_seconds(attempt: int, *, base_seconds: float, max_seconds: float) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure (1 for the first):
    ``base_seconds * 2 ** (attempt - 1)``, at most ``max_seconds``."""
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    return min(max_seconds, base_seconds * 2.0**doublings)


async def retry_database(op: Callable[[], Awaitable[T]], *, within_seconds: float) -> T:
    """Run ``op()``, retrying while it raises DatabaseUnavailable, with backoff, for up to
    ``within_seconds`` (a batch passes its lease: past that its claim is lost anyway); then
    the last DatabaseUnavailable is raised. Each retry logs ``database_retry``."""
    deadline = time.monotonic() + within_seconds
    attempt = 0
    while True:
        try:
            return await op()
        except DatabaseUnavailable as exc:
            attempt += 1
            if time.monotonic() > deadline:
                raise
            wait_s = backoff_seconds(
                attempt,
                base_seconds=DATABASE_RETRY_BASE_SECONDS,
                max_seconds=DATABASE_RETRY_MAX_SECONDS,
            )
            log.warning("database_retry", error=str(exc), attempt=attempt, retry_in_s=wait_s)
            await anyio.sleep(wait_s)
