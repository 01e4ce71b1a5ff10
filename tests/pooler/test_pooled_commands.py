"""Operator commands through a transaction-mode PgBouncer, and what they leave behind.

- ``status``, ``requeue``, ``enqueue`` and ``run --drain`` work through the pooler.
- ``migrate`` and ``register`` work through it too (issue 17 allows either that or a refusal
  naming the direct address; these tests hold the product to the first): two ``migrate``
  processes at once must still apply each migration once, which a session advisory lock
  cannot promise when its lock and unlock may run on different server connections. Hence
  ``pg_advisory_xact_lock`` (a lock that lives and dies with one transaction).
- Nothing a command sets per session may outlive its transaction on a pooled server
  connection, where the next client (the application) would inherit it: no search_path, no
  prepared statement, no LISTEN, no advisory lock.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.pooler.pooled import (
    API_KEY,
    FakeOpenAIServer,
    assert_fresh_server_sessions,
    assert_no_prepared_statement_errors,
    other_clients,
    pooled_cli_env,
)
from tests.support.helpers import (
    QUEUE_PROCESSOR,
    create_table,
    execute,
    insert_rows,
    make_docs,
    run_cli,
    status_counts,
    summary_counts,
)
from tests.support.pgbouncer import PgBouncer

pytestmark = pytest.mark.pooler

REPO = Path(__file__).resolve().parents[2]
MIGRATE_TIMEOUT_S = 60  # a migrate of an empty database takes about a second


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """A clean exit: 0, no traceback, nothing about prepared statements."""
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert_no_prepared_statement_errors(done.stdout + done.stderr)
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(done).stdout)


def finish(proc: subprocess.Popen[str], *, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc`` (a liveness bound); kill it and fail if it hangs."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} hung for {timeout_s}s (waiting on a lock?)\n"
            f"{out}\n{err}"
        ) from None
    assert API_KEY not in out + err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def advisory_locks(dsn: str) -> int:
    """Advisory locks held in ``dsn``'s database by any session (pooled server connections
    stay open, so a lock a command left behind shows here)."""
    rows = execute(
        dsn,
        "SELECT count(*) AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE l.locktype = 'advisory' AND d.datname = current_database()",
    )
    return int(rows[0]["n"])


def test_status_requeue_and_enqueue_through_the_pooler(
    dsn: str, pooled_dsn: str, fake: FakeOpenAIServer
) -> None:
    env = pooled_cli_env(pooled_dsn, fake)
    make_docs(dsn, 10)
    with other_clients(pooled_dsn):
        status_requeue_enqueue(dsn, env)


def status_requeue_enqueue(dsn: str, env: dict[str, str]) -> None:
    drained = ok(run_cli(["run", "--drain", "--batch-size", "4"], env))
    assert summary_counts(drained.stdout)["processed"] == 10

    execute(
        dsn,
        "UPDATE embedding_queue SET status = 'failed', attempts = 3, error_message = 'boom'"
        " WHERE record_id IN ('3', '7')",
    )
    report = as_json(run_cli(["status", "--json"], env))
    assert {k: report["summary"][k] for k in ("pending", "processing", "done", "failed")} == {
        "pending": 0,
        "processing": 0,
        "done": 8,
        "failed": 2,
    }
    human = ok(run_cli(["status"], env)).stdout
    assert "docs" in human

    requeued = as_json(run_cli(["requeue", "--json"], env))
    assert requeued["count"] == 2
    assert {i["record_id"] for i in requeued["items"]} == {"3", "7"}
    assert status_counts(dsn) == {"pending": 2, "done": 8}

    enqueued = as_json(run_cli(["enqueue", "docs", "--all", "--json"], env))
    assert (enqueued["mode"], enqueued["queued"]) == ("all", 10)
    assert status_counts(dsn) == {"pending": 10}
    again = ok(run_cli(["run", "--drain", "--batch-size", "4"], env))
    assert summary_counts(again.stdout)["processed"] == 10
    assert status_counts(dsn) == {"done": 10}


def test_migrate_and_register_work_through_the_pooler(
    empty_dsn: str, pgbouncer: PgBouncer, fake: FakeOpenAIServer
) -> None:
    execute(empty_dsn, "CREATE EXTENSION vector")
    pooled = pgbouncer.url(empty_dsn)
    env = pooled_cli_env(pooled, fake)

    # Two at once, among other clients: the lock must hold through the pooler (each
    # migration applied once) and must not outlive the command.
    with other_clients(pooled):
        racing = [
            subprocess.Popen(
                [QUEUE_PROCESSOR, "migrate"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            finished = [finish(proc, timeout_s=MIGRATE_TIMEOUT_S) for proc in racing]
        finally:
            for proc in racing:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
    for done in finished:
        ok(done)
    assert advisory_locks(empty_dsn) == 0
    versions = execute(
        empty_dsn, "SELECT version, count(*) AS n FROM queue_processor_migrations GROUP BY 1"
    )
    migrations = sorted((REPO / "sql" / "migrations").glob("*.sql"))
    assert {r["version"]: r["n"] for r in versions} == {int(f.name[:4]): 1 for f in migrations}
    ok(run_cli(["migrate"], env))  # up to date: a no-op, also through the pooler

    create_table(empty_dsn)
    insert_rows(empty_dsn, [(1, "one"), (2, "two")])
    registered = ok(
        run_cli(
            ["register", "docs", "--column", "embedding", "--content", "body", "--backfill"],
            env,
        )
    )
    assert "queued for embedding: 2 " in registered.stdout, registered.stdout
    insert_rows(empty_dsn, [(3, "three")])  # the trigger register installed queues it
    assert status_counts(empty_dsn) == {"pending": 3}
    drained = ok(run_cli(["run", "--drain"], env))
    assert summary_counts(drained.stdout)["processed"] == 3
    assert advisory_locks(empty_dsn) == 0


def test_commands_leave_no_session_state_on_pooled_server_connections(
    dsn: str, pooled_dsn: str, pgbouncer: PgBouncer, fake: FakeOpenAIServer
) -> None:
    """What a command sets for its session would be inherited by the next client of the same
    server connection: the application's unqualified ``INSERT INTO docs`` must never meet
    the worker's search_path. Checked after short commands (a batch, ``status``), then after
    a drain of many batches, two in flight (every statement runs many times on one client
    connection: where psycopg would prepare it)."""
    env = pooled_cli_env(pooled_dsn, fake)
    make_docs(dsn, 400)
    ok(run_cli(["run", "--once", "--batch-size", "10"], env))
    ok(run_cli(["status"], env))
    assert_fresh_server_sessions(pgbouncer, dsn, pooled_dsn)

    ok(run_cli(["run", "--drain", "--batch-size", "10", "--concurrency", "2"], env))
    assert status_counts(dsn) == {"done": 400}
    assert_fresh_server_sessions(pgbouncer, dsn, pooled_dsn)
