"""The worker's side of wanted vector indexes: build those whose backlog drained.

A continuous run looks every ``index_check_seconds`` (one cheap query of the registry, which
probes the queue only for targets that want an index); a drain run looks once the queue is
empty. Builds are claimed in the database (a lease, SKIP LOCKED), so among many workers
exactly one builds each index; the others keep embedding. A build that fails (e.g. the
worker's role does not own the table) is recorded as failed with its error, and the worker
goes on. No SQL here: ``queue.build_next_index`` runs the build.

CREATE INDEX CONCURRENTLY cannot go through a transaction pooler, so a pooled worker builds
on the database's direct address (``Database.direct``, QUEUE_PROCESSOR_DIRECT_URL), connecting
only when a build is wanted; without that address it says once that it builds none (the
operator runs ``build-index`` with a direct DATABASE_URL) and keeps embedding.
"""

from __future__ import annotations

import anyio
import structlog

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.errors import ConfigurationError, DatabaseUnavailable, StatementFailed
from queue_processor.models import IndexBuildResult
from queue_processor.worker.config import WorkerConfig

log = structlog.get_logger(__name__)


class IndexBuilder:
    """Builds the wanted indexes that are due, one at a time."""

    def __init__(self, db: Database, config: WorkerConfig) -> None:
        self._db = db
        self._config = config
        self._no_direct_address = False

    @property
    def enabled(self) -> bool:
        """False when this worker builds no indexes (index_check_seconds = 0, or it is
        pooled without a direct address)."""
        return self._config.index_check_seconds > 0 and not self._no_direct_address

    async def build_due(self) -> list[IndexBuildResult]:
        """Build every index that is due now, one after another; their results.
        ConfigurationError when pooled without a direct address and a build is wanted."""
        if self._db.pooled and not await queue.index_build_wanted(self._db):
            return []
        async with self._db.direct() as db:
            return await self._build_due_on(db)

    async def _build_due_on(self, db: Database) -> list[IndexBuildResult]:
        cfg = self._config
        results: list[IndexBuildResult] = []
        while True:
            result = await queue.build_next_index(
                db,
                owner=cfg.owner,
                lease_seconds=cfg.lease_seconds,
                memory_cap_mb=cfg.index_build_memory_mb,
            )
            if result is None:
                return results
            results.append(result)
            if result.state == "pending":  # interrupted
                return results

    async def run_periodically(self) -> None:
        """Look for due builds every ``index_check_seconds``, until cancelled (a side task
        of the worker: cancelling it cancels a build in progress, which is given back)."""
        while self.enabled:
            await anyio.sleep(self._config.index_check_seconds)
            await self.check()

    async def check(self) -> None:
        """``build_due``, logging instead of raising when the database is away or refuses the
        check itself (e.g. a role not granted on embedding_index_builds): embedding goes on."""
        try:
            await self.build_due()
        except (DatabaseUnavailable, StatementFailed) as exc:
            log.warning("index_check_failed", error=str(exc))
        except ConfigurationError as exc:
            self._no_direct_address = True
            log.warning(
                "index_builds_skipped",
                error=str(exc),
                note="wanted indexes stay pending: run `queue-processor build-index TABLE` "
                "with DATABASE_URL set to the direct address, or restart the worker with "
                "QUEUE_PROCESSOR_DIRECT_URL",
            )
