"""The database restarts behind the pooler while a worker drains through it.

PgBouncer stays up: the worker's client connections survive, but every server connection
behind them dies with the fast shutdown, and until the server is back PgBouncer answers
with errors of its own. The worker must ride it out (log, back off, go on) without exiting,
and finish with nothing lost or written twice. The server is the test's own.
"""

from __future__ import annotations

import time

import pytest

from tests.pooler.pooled import (
    FakeOpenAIServer,
    assert_no_prepared_statement_errors,
    pooled_cli_env,
    pooled_worker_env,
)
from tests.reliability.harness import (
    Workers,
    assert_embeddings_are_of,
    counts,
    install_write_audit,
    unfinished,
    wait_for,
    writes_per_row,
)
from tests.support.helpers import cli_env, make_docs, run_cli
from tests.support.pgbouncer import PgBouncer, PrivatePostgres

pytestmark = pytest.mark.pooler

ROWS = 3_000
LEASE_S = 5.0
# Longer than the lease (claims in flight are lost and come back through lease expiry) and
# than the 10 s connect timeout (the worker's statements fail, rather than wait, meanwhile).
OUTAGE_S = 12.0


@pytest.mark.slow
def test_pooled_worker_rides_out_a_database_restart(
    private_backend: tuple[PrivatePostgres, PgBouncer],
    fake: FakeOpenAIServer,
    workers: Workers,
) -> None:
    server, bouncer = private_backend
    direct = server.create_database("qp_restart")
    migrated = run_cli(["migrate"], cli_env(direct, fake))
    assert migrated.returncode == 0, migrated.stderr
    contents = make_docs(direct, ROWS)
    install_write_audit(direct)
    fake.latency_s = 0.05
    pooled = bouncer.url(direct)
    worker = workers.start(
        "pooled-restart",
        pooled_worker_env(
            pooled,
            fake,
            QUEUE_PROCESSOR_BATCH_SIZE=20,
            QUEUE_PROCESSOR_LEASE_SECONDS=LEASE_S,
        ),
    )
    wait_for(
        lambda: counts(direct)["done"] >= 300 and counts(direct)["processing"] > 0,
        timeout_s=60,
        what="the drain to be under way",
        every_s=0.01,
        watch=[worker],
    )
    server.stop()
    time.sleep(OUTAGE_S)
    assert worker.alive, f"the worker exited during the outage:\n{worker.tail()}"
    server.start()

    wait_for(
        lambda: unfinished(direct) == 0,
        timeout_s=120,
        what="the queue to drain after the restart",
        every_s=0.2,
        watch=[worker],
    )
    assert worker.stop() == 0, worker.tail()

    # Which of its own warnings the worker logs depends on where the outage caught it
    # (a claim, a batch waiting for a connection, a lease renewal): any one will do, but
    # one it must log. psycopg's own log lines (logger "psycopg...") do not count.
    warnings = [
        e for e in worker.events() if e.get("level") in ("warning", "error") and "logger" not in e
    ]
    assert warnings, f"the outage went unnoticed:\n{worker.tail()}"
    assert_no_prepared_statement_errors(worker.output())
    assert counts(direct) == {"done": ROWS}
    assert_embeddings_are_of(direct, contents)
    writes = writes_per_row(direct)
    assert set(writes) == set(contents)
    assert [k for k, n in writes.items() if n != 1] == []

    # Commands work through the pooler again too.
    status = run_cli(["status", "--json"], pooled_cli_env(pooled, fake))
    assert status.returncode == 0, status.stderr
