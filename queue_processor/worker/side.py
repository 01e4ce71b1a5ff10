"""The worker's side tasks and its presence in ``embedding_workers``.

- ``announce`` / ``forget``: record the worker and its models at start (``status`` says which
  targets wait for a worker of their model) and remove it at the end;
- ``renew_forever``: every third of the lease, refresh that record and extend the leases of
  the batches in flight, so a slow batch is not taken over;
- ``listen_forever``: LISTEN for the queue's NOTIFY (a new row wakes the claim loop at once),
  reconnecting with backoff; ``say_polling``: the one line a worker behind a transaction
  pooler without a direct address logs instead (it polls).

Each runs in the worker's task group (loop.py), so a side task that dies stops the worker
loudly; database outages are logged and ridden out here. No SQL: ``queue`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import anyio
import structlog

from queue_processor import queue
from queue_processor.backoff import backoff_seconds
from queue_processor.db import Database
from queue_processor.errors import DatabaseUnavailable
from queue_processor.models import ClaimToken, QueueId
from queue_processor.worker.binding import Serving, log_serving, serving
from queue_processor.worker.config import WorkerConfig

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "embedding_queue"
# After losing the database, claiming and LISTEN try again after 1 s, 2 s, 4 s, ... 30 s.
RECONNECT_BASE_SECONDS = 1.0
RECONNECT_MAX_SECONDS = 30.0


def reconnect_wait(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive database failures."""
    return backoff_seconds(
        failures, base_seconds=RECONNECT_BASE_SECONDS, max_seconds=RECONNECT_MAX_SECONDS
    )


async def announce(db: Database, config: WorkerConfig, models: Sequence[str]) -> Serving | None:
    """Record this worker and its models (for ``status``) and log which targets it serves
    and which it leaves to workers of other models; None when the database is away (no
    reason not to start: the claim loop waits it out)."""
    try:
        await queue.worker_seen(db, config.owner, tuple(models), config.lease_seconds)
        found = serving(await queue.list_targets(db), models)
    except DatabaseUnavailable as exc:
        log.warning("worker_targets_unknown", error=str(exc))
        return None
    log_serving(found)
    return found


async def forget(db: Database, owner: str) -> None:
    """Remove this worker from the running workers (bounded, shielded: it runs while the run
    ends, maybe cancelled)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await queue.worker_gone(db, owner)
        except DatabaseUnavailable as exc:
            log.warning("worker_gone_failed", error=str(exc))


async def renew_forever(
    db: Database,
    config: WorkerConfig,
    models: Sequence[str],
    inflight: Mapping[ClaimToken, list[QueueId]],
) -> None:
    """Every third of the lease: refresh this worker's record and extend the leases of the
    batches ``inflight`` (the loop's live map), until cancelled."""
    interval = max(0.05, config.lease_seconds / 3)
    while True:
        await anyio.sleep(interval)
        try:
            await queue.worker_seen(db, config.owner, tuple(models), config.lease_seconds)
        except DatabaseUnavailable as exc:
            log.warning("worker_seen_failed", error=str(exc))
        for token, ids in list(inflight.items()):
            try:
                await queue.renew_leases(db, token, ids, config.lease_seconds)
            except DatabaseUnavailable as exc:
                log.warning("lease_renewal_failed", error=str(exc))


async def listen_forever(db: Database, wake: Callable[[], None]) -> None:
    """LISTEN on the queue's channel, calling ``wake`` per notification; reconnect with
    backoff when the connection drops, until cancelled."""
    failures = 0
    while True:
        try:
            await db.listen(NOTIFY_CHANNEL, wake)
        except DatabaseUnavailable as exc:
            failures += 1
            wait_s = reconnect_wait(failures)
            log.warning("listen_failed", error=str(exc), retry_in_s=wait_s)
            await anyio.sleep(wait_s)
        else:
            failures = 0


def say_polling(config: WorkerConfig) -> None:
    """Behind a transaction pooler without a direct address: say once that we poll."""
    poll_s = config.poll_interval_seconds
    log.info(
        "listen_unavailable",
        poll_interval_seconds=poll_s,
        note=f"no LISTEN through a transaction pooler: new work is found by polling every "
        f"{poll_s:g} s; QUEUE_PROCESSOR_DIRECT_URL (a direct address) wakes it at once",
    )
