"""The connection budget the README's "Deploying" section states, counted in the server.

A worker (``queue-processor run``) opens at most ``pool + 1`` connections: its pool
(QUEUE_PROCESSOR_POOL_SIZE, default ``max(4, 2 * concurrency + 2)``; the queue-depth poller
of ``--metrics-port`` shares it) and one LISTEN connection (none behind a pooler without
QUEUE_PROCESSOR_DIRECT_URL). Counted in pg_stat_activity while a busy worker drains a queue
(several batches embedding and writing at once, with the embedding cache's lookups and the
metrics poller), directly connected. Every line it logs is JSON, psycopg's own included.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from psycopg import conninfo

from queue_processor.testing import FakeOpenAIServer
from tests.reliability.harness import Workers, counts, report, wait_for, worker_env
from tests.support.helpers import DIMS, execute, make_docs

ROWS = 2_000


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as server:
        server.latency_s = 0.05  # batches overlap: embedding, writing, claiming at once
        yield server


class ConnectionSampler:
    """Counts the worker's connections to ``dsn``'s database (by application_name) every
    few milliseconds in a thread, keeping the peaks."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.dbname = str(conninfo.conninfo_to_dict(dsn)["dbname"])
        self.peak_total = 0
        self.peak_listen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            row = execute(
                self.dsn,
                "SELECT count(*) AS total,"
                " count(*) FILTER (WHERE application_name = 'queue_processor-listen') AS listen"
                " FROM pg_stat_activity"
                " WHERE datname = %s AND application_name LIKE 'queue\\_processor%%'",
                (self.dbname,),
            )[0]
            self.peak_total = max(self.peak_total, int(row["total"]))
            self.peak_listen = max(self.peak_listen, int(row["listen"]))
            self._stop.wait(0.005)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.mark.parametrize(
    ("concurrency", "pool_size", "budget"),
    [(3, None, max(4, 2 * 3 + 2) + 1), (3, 2, 2 + 1)],
    ids=["default-pool", "pool-size-2"],
)
def test_a_worker_opens_at_most_its_pool_and_one_listen_connection(
    dsn: str,
    fake: FakeOpenAIServer,
    workers: Workers,
    concurrency: int,
    pool_size: int | None,
    budget: int,
) -> None:
    make_docs(dsn, ROWS)
    settings: dict[str, object] = {
        "QUEUE_PROCESSOR_CONCURRENCY": concurrency,
        "QUEUE_PROCESSOR_BATCH_SIZE": 25,
        "EMBEDDING_CACHE": "true",
    }
    if pool_size is not None:
        settings["QUEUE_PROCESSOR_POOL_SIZE"] = pool_size
    with ConnectionSampler(dsn) as sampler:
        worker = workers.start("budget", worker_env(dsn, fake, **settings), "--metrics-port", "0")
        wait_for(
            lambda: counts(dsn)["done"] == ROWS,
            timeout_s=120,
            what="the queue to drain",
            every_s=0.1,
            watch=[worker],
        )
        assert worker.stop() == 0, worker.tail()
    report("connection budget", peak=sampler.peak_total, budget=budget, pool_size=pool_size)
    assert sampler.peak_listen == 1
    assert 3 <= sampler.peak_total <= budget, (sampler.peak_total, budget)
    lines = [line for line in worker.stderr().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
