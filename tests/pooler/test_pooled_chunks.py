"""A chunked target behind a transaction pooler: registered, drained by a continuous worker,
edited and searched, every command and the worker through PgBouncer.

A record's chunk set is replaced inside the transaction that acknowledges it (one pinned
transaction through the pooler), and search raises hnsw.ef_search for its own transaction
only (set_config(..., true)), so nothing of it may leak onto pooled server connections.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import conninfo

from tests.pooler.pooled import (
    FakeOpenAIServer,
    assert_fresh_server_sessions,
    assert_no_prepared_statement_errors,
    pooled_cli_env,
    pooled_worker_env,
)
from tests.reliability.harness import Workers, counts, wait_for
from tests.support.helpers import chunked_register_args, create_table, execute, insert_rows, run_cli
from tests.support.pgbouncer import PgBouncer

pytestmark = pytest.mark.pooler

ROWS = 12


def text(i: int) -> str:
    return "\n\n".join(
        f"Record {i} part {p}: "
        + " ".join(f"sentence {s} on topic {i * 100 + p}." for s in range(6))
        for p in range(5)
    )


def chunk_sets(dsn: str) -> dict[int, list[str]]:
    rows = execute(
        dsn, "SELECT record_id, chunk_text FROM docs_body_chunks ORDER BY record_id, chunk_index"
    )
    found: dict[int, list[str]] = {}
    for row in rows:
        found.setdefault(int(row["record_id"]), []).append(str(row["chunk_text"]))
    return found


def test_a_chunked_target_through_the_pooler(
    dsn: str,
    pooled_dsn: str,
    pgbouncer: PgBouncer,
    fake: FakeOpenAIServer,
    workers: Workers,
) -> None:
    env = pooled_cli_env(pooled_dsn, fake)
    create_table(dsn)
    insert_rows(dsn, [(i, text(i)) for i in range(1, ROWS + 1)])
    registered = run_cli(chunked_register_args("--backfill"), env)
    assert registered.returncode == 0, registered.stderr
    assert f"queued for embedding: {ROWS} row(s)" in registered.stdout

    worker = workers.start("pooled-chunks", pooled_worker_env(pooled_dsn, fake))
    wait_for(
        lambda: counts(dsn) == {"done": ROWS},
        timeout_s=60,
        what="the chunked backlog to drain through the pooler",
        watch=[worker],
    )
    before = chunk_sets(dsn)
    assert sorted(before) == list(range(1, ROWS + 1))
    assert all(len(chunks) > 1 for chunks in before.values())

    # An edit and a delete while the worker runs: the new text's single chunk replaces the
    # old set, the deleted row's chunks go with it.
    execute(dsn, "UPDATE docs SET body = 'A short replacement.' WHERE id = 2")
    execute(dsn, "DELETE FROM docs WHERE id = 3")
    wait_for(
        lambda: chunk_sets(dsn).get(2) == ["A short replacement."],
        timeout_s=60,
        what="the edited record's chunk set to be replaced",
        watch=[worker],
    )
    assert worker.stop() == 0, worker.tail()
    assert_no_prepared_statement_errors(worker.output())
    after = chunk_sets(dsn)
    assert 3 not in after
    assert {k: v for k, v in after.items() if k != 2} == {
        k: v for k, v in before.items() if k not in (2, 3)
    }

    found = run_cli(["search", "docs", "topic 402", "-k", "3", "--json"], env)
    assert found.returncode == 0, found.stderr
    assert_no_prepared_statement_errors(found.stdout + found.stderr)
    status = run_cli(["status", "--json"], env)
    assert status.returncode == 0, status.stderr
    assert_fresh_server_sessions(pgbouncer, dsn, pooled_dsn)
    assert set(ef_search_on_server_connections(pgbouncer, dsn, pooled_dsn)) == {"40"}


def ef_search_on_server_connections(pgbouncer: PgBouncer, dsn: str, pooled_dsn: str) -> list[str]:
    """hnsw.ef_search as every server connection of the pooler would hand it to the next
    client (40: pgvector's default; search raised it for its own transaction only)."""
    name = str(conninfo.conninfo_to_dict(dsn)["dbname"])
    conns = [
        psycopg.connect(pooled_dsn, prepare_threshold=None)
        for _ in range(len(pgbouncer.servers(name)))
    ]
    try:
        found = []
        for conn in conns:  # each inside a transaction: each holds a server connection
            row = conn.execute("SELECT current_setting('hnsw.ef_search') AS v").fetchone()
            assert row is not None
            found.append(str(row[0]))
        return found
    finally:
        for conn in conns:
            conn.close()
