"""The worker through a real PgBouncer in transaction mode (issue 17).

In transaction mode each transaction may run on a different server connection, so what a
worker keeps per session breaks: psycopg's server-side prepared statements (it prepares a
statement after running it five times on a connection: ``prepared statement "_pg3_0" does
not exist`` / ``already exists``), session settings, and LISTEN (a NOTIFY never reaches a
LISTEN issued through the pooler). These tests run ``queue-processor run`` processes with
DATABASE_URL the pooler's URL and check the queue and the vectors in the database directly.
"""

from __future__ import annotations

import time

import pytest
from psycopg import conninfo

from tests.pooler.pooled import (
    FakeOpenAIServer,
    assert_fresh_server_sessions,
    assert_no_prepared_statement_errors,
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
from tests.support.helpers import body, execute, insert_rows, make_docs
from tests.support.pgbouncer import PgBouncer

pytestmark = pytest.mark.pooler

SINGLE_INSERTS = 20
BULK_ROWS = 5_000
LEASE_S = 3.0


def dbname(dsn: str) -> str:
    return str(conninfo.conninfo_to_dict(dsn)["dbname"])


@pytest.mark.slow
def test_continuous_worker_embeds_rows_inserted_while_it_runs(
    dsn: str, pooled_dsn: str, pgbouncer: PgBouncer, fake: FakeOpenAIServer, workers: Workers
) -> None:
    """The issue's run: twenty single inserts, then one insert of 5,000 rows, while a
    continuous worker (what the systemd unit runs) works through the pooler. Before the fix
    it died with ``prepared statement "_pg3_0" does not exist`` half-way."""
    contents = make_docs(dsn, 0)  # a registered, empty docs table
    worker = workers.start(
        "pooled-continuous", pooled_worker_env(pooled_dsn, fake, QUEUE_PROCESSOR_POLL_SECONDS=0.5)
    )
    wait_for(
        lambda: bool(worker.events("worker_started")),
        timeout_s=30,
        what="the worker to start",
        watch=[worker],
    )

    for i in range(1, SINGLE_INSERTS + 1):
        insert_rows(dsn, [(i, body(i))])
        contents[i] = body(i)
        time.sleep(0.05)
    wait_for(
        lambda: counts(dsn)["done"] == SINGLE_INSERTS,
        timeout_s=60,
        what="the single inserts to be embedded",
        every_s=0.1,
        watch=[worker],
    )
    bulk = {i: body(i) for i in range(SINGLE_INSERTS + 1, SINGLE_INSERTS + BULK_ROWS + 1)}
    insert_rows(dsn, bulk.items())
    contents.update(bulk)
    wait_for(
        lambda: unfinished(dsn) == 0,
        timeout_s=180,
        what="the bulk insert to be embedded",
        every_s=0.2,
        watch=[worker],
    )

    assert worker.alive, worker.tail()
    assert worker.stop() == 0, worker.tail()
    assert_no_prepared_statement_errors(worker.output())
    assert counts(dsn) == {"done": SINGLE_INSERTS + BULK_ROWS}
    assert_embeddings_are_of(dsn, contents)
    # It really went through the pooler.
    assert pgbouncer.transactions(dbname(dsn)) > SINGLE_INSERTS


@pytest.mark.slow
def test_kill_9_during_a_pooled_drain_then_a_new_worker_finishes(
    dsn: str, pooled_dsn: str, fake: FakeOpenAIServer, workers: Workers
) -> None:
    """A worker is killed (-9) mid-drain, with claims outstanding, through the pooler; rows
    are edited while its claims are orphaned; after the lease a new worker finishes: every row
    holds the vector of its current content, nothing is left processing, and no row that was
    not edited was written twice (the pooler rolled back the dead client's transaction)."""
    rows = 3_000
    contents = make_docs(dsn, rows)
    install_write_audit(dsn)
    fake.latency_s = 0.05  # batches are in flight most of the time
    env = pooled_worker_env(
        pooled_dsn,
        fake,
        QUEUE_PROCESSOR_LEASE_SECONDS=LEASE_S,
        QUEUE_PROCESSOR_BATCH_SIZE=50,
        QUEUE_PROCESSOR_MAX_ATTEMPTS=10,
    )
    first = workers.start("pooled-kill-w1", env, "--drain")

    def claimed() -> list[int]:
        found = execute(
            dsn,
            "SELECT record_id FROM embedding_queue WHERE status = 'processing' AND claimed_by = %s",
            (first.name,),
        )
        return [int(r["record_id"]) for r in found]

    wait_for(
        lambda: counts(dsn)["done"] >= 500 and bool(claimed()),
        timeout_s=60,
        what="the drain to be under way with claims outstanding",
        every_s=0.01,
        watch=[first],
    )
    assert first.kill9() == -9
    orphaned = claimed()
    assert orphaned, "the worker held no claim when it was killed"

    # Edits while the dead worker's claims are outstanding: an orphaned row, a done row and a
    # pending row. The new content must win.
    done_row = int(
        execute(
            dsn, "SELECT min(record_id::bigint) AS k FROM embedding_queue WHERE status = 'done'"
        )[0]["k"]
    )
    pending_row = int(
        execute(
            dsn, "SELECT max(record_id::bigint) AS k FROM embedding_queue WHERE status = 'pending'"
        )[0]["k"]
    )
    edited = sorted({orphaned[0], done_row, pending_row})
    execute(dsn, "UPDATE docs SET body = body || ' (edited)' WHERE id = ANY(%s)", (edited,))
    for key in edited:
        contents[key] += " (edited)"

    time.sleep(LEASE_S + 1.0)  # the dead worker's leases lapse
    second = workers.start("pooled-kill-w2", env, "--drain")
    assert second.wait(180) == 0, second.tail()

    assert_no_prepared_statement_errors(first.output() + second.output())
    assert counts(dsn) == {"done": rows}
    assert_embeddings_are_of(dsn, contents)
    writes = writes_per_row(dsn)
    assert set(writes) == set(contents)
    twice = sorted(k for k, n in writes.items() if n != 1 and k not in edited)
    assert twice == [], f"rows written more than once: {twice[:10]}"


def test_direct_url_wakes_a_pooled_worker_at_once(
    dsn: str, pooled_dsn: str, fake: FakeOpenAIServer, workers: Workers
) -> None:
    """Behind a pooler LISTEN needs a direct connection: with QUEUE_PROCESSOR_DIRECT_URL (the
    database's direct address) a single insert is embedded at once, not at the next poll
    (30 s here)."""
    poll_s = 30
    contents = make_docs(dsn, 0)
    worker = workers.start(
        "pooled-listen",
        pooled_worker_env(
            pooled_dsn,
            fake,
            QUEUE_PROCESSOR_POLL_SECONDS=poll_s,
            QUEUE_PROCESSOR_DIRECT_URL=dsn,
        ),
    )
    wait_for(
        lambda: bool(worker.events("worker_started")),
        timeout_s=30,
        what="the worker to start",
        watch=[worker],
    )
    for n, key in enumerate((1, 2), start=1):
        time.sleep(1.5)  # the worker is idle: its last poll found nothing
        insert_rows(dsn, [(key, body(key))])
        contents[key] = body(key)
        wait_for(
            lambda n=n: counts(dsn)["done"] == n,
            timeout_s=poll_s / 3,  # well within the poll interval: a NOTIFY woke it
            what=f"insert {n} to be embedded on its NOTIFY (poll interval {poll_s}s)",
            every_s=0.05,
            watch=[worker],
        )

    assert worker.stop() == 0, worker.tail()
    assert_embeddings_are_of(dsn, contents)
    assert worker.events("listen_unavailable") == []  # it has a way to listen


def test_pooled_worker_without_direct_url_says_once_that_it_polls(
    dsn: str, pooled_dsn: str, pgbouncer: PgBouncer, fake: FakeOpenAIServer, workers: Workers
) -> None:
    """Without a direct address for LISTEN, a pooled worker logs one line at start that new
    work is found by polling every N seconds (``listen_unavailable``, with
    ``poll_interval_seconds``), does not try to LISTEN through the pooler, and still finds new
    rows at the next poll."""
    poll_s = 2
    contents = make_docs(dsn, 0)
    worker = workers.start(
        "pooled-poll",
        pooled_worker_env(pooled_dsn, fake, QUEUE_PROCESSOR_POLL_SECONDS=poll_s),
    )
    wait_for(
        lambda: bool(worker.events("worker_started")),
        timeout_s=30,
        what="the worker to start",
        watch=[worker],
    )
    time.sleep(1.0)  # idle: its first poll found nothing
    insert_rows(dsn, [(1, body(1))])
    contents[1] = body(1)
    wait_for(
        lambda: counts(dsn)["done"] == 1,
        timeout_s=poll_s + 15,
        what="the insert to be found by the next poll",
        every_s=0.05,
        watch=[worker],
    )
    time.sleep(2 * poll_s)  # a few more polls: the line is said once, not per poll
    assert worker.stop() == 0, worker.tail()

    events = [e["event"] for e in worker.events()]
    said = worker.events("listen_unavailable")
    assert len(said) == 1, worker.tail()
    assert float(said[0]["poll_interval_seconds"]) == poll_s
    assert events.index("listen_unavailable") < events.index("batch_done")  # at start
    assert worker.events("listen_failed") == []
    assert_embeddings_are_of(dsn, contents)
    assert_fresh_server_sessions(pgbouncer, dsn, pooled_dsn)  # no LISTEN left behind
