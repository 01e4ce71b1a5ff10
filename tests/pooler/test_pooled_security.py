"""SECURITY.md's pinned search_path holds behind a transaction-mode pooler too.

Through a pooler our transactions run on server connections that other clients of the same
pooler user used before, and whatever those clients left on the session stays there: a
``SET search_path`` that puts ``public`` before ``pg_catalog``, temporary tables. Under such a
path an unqualified ``now()`` finds an exact-match overload planted in ``public`` before
pg_catalog's, and a temporary table comes before any schema. Directly connected, a session of
ours sets its path once; pooled, each transaction pins it with its first statement (fully
qualified, since the path in force until then is the other client's).

Here a client plants that state on every server connection of the test database's pool, and
overloads of ``now()`` and ``set_config()`` in ``public`` that record who called them. A
drain and the operator commands through the pooler must run none of them and still do their
work; afterwards the planted path is still there (our settings were transaction-local) and a
naive client of the same pooler does get captured (the attack is live).

Which server connection a transaction lands on is the pooler's choice, and PgBouncer may
replace one meanwhile (it closes a server connection a client left inside a transaction, for
one), so the test follows backend pids: a trigger records the pid of every transaction that
writes a queue row. Our writes must have run on planted connections (at least one), and every
planted connection still open afterwards must still carry the plant; any other must be fresh.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.pooler.pooled import (
    FakeOpenAIServer,
    assert_no_prepared_statement_errors,
    pooled_cli_env,
    probe_server_sessions,
)
from tests.reliability.harness import assert_embeddings_are_of
from tests.support.helpers import execute, make_docs, run_cli, status_counts, summary_counts
from tests.support.pgbouncer import PgBouncer

pytestmark = pytest.mark.pooler

PLANTED_PATH = "public, pg_catalog"
"""A path another client left: public first, pg_catalog explicitly after it, pg_temp unnamed
(so searched first for relations)."""

OVERLOADS = [
    """CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
       BEGIN
           INSERT INTO public.hijack_log VALUES (current_user, 'now');
           RETURN pg_catalog.transaction_timestamp();
       END $$""",
    """CREATE FUNCTION public.set_config(text, text, boolean) RETURNS text
       LANGUAGE plpgsql AS $$
       BEGIN
           INSERT INTO public.hijack_log VALUES (current_user, 'set_config');
           RETURN pg_catalog.set_config($1, $2, $3);
       END $$""",
]

WRITER_PIDS = [
    "CREATE TABLE public.writer_pids (pid int)",
    """CREATE FUNCTION public.record_writer_pid() RETURNS trigger LANGUAGE plpgsql
       SET search_path = pg_catalog, pg_temp AS $$
       BEGIN
           INSERT INTO public.writer_pids VALUES (pg_backend_pid());
           RETURN NULL;
       END $$""",
    """CREATE TRIGGER record_writer_pid AFTER UPDATE ON public.embedding_queue
       FOR EACH STATEMENT EXECUTE FUNCTION public.record_writer_pid()""",
]
"""Records the backend pid of every statement that updates queue rows (claims, acks)."""

SESSION_PLANTS = [
    f"SET search_path = {PLANTED_PATH}",
    # Shadows of our tables (searched first for unqualified relation names under that path).
    "CREATE TEMP TABLE embedding_queue (LIKE public.embedding_queue)",
    "CREATE TEMP TABLE embedding_targets (LIKE public.embedding_targets)",
]


def plant_on_every_server_connection(url: str, sessions: int) -> None:
    """``sessions`` clients of the pooler at once, each inside a transaction (so each holds a
    server connection of its own), leave SESSION_PLANTS on their server connection."""
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(sessions):
            conn = psycopg.connect(url, prepare_threshold=None)
            conns.append(conn)
            for plant in SESSION_PLANTS:
                conn.execute(plant)  # type: ignore[arg-type]
        for conn in conns:
            conn.commit()
    finally:
        for conn in conns:
            conn.close()


def fresh_search_path(dsn: str) -> str:
    """The search_path a new session of ``dsn``'s database starts with."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW search_path").fetchone()
    assert row is not None
    return str(row[0])


def hijacked(dsn: str) -> list[dict[str, Any]]:
    return execute(dsn, "SELECT who, what FROM public.hijack_log")


def test_state_planted_on_pooled_server_connections_captures_nothing_of_ours(
    dsn: str, pooled_dsn: str, pgbouncer: PgBouncer, fake: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 120)
    execute(dsn, "CREATE TABLE public.hijack_log (who text, what text)")
    for overload in OVERLOADS:
        execute(dsn, overload)
    for statement in WRITER_PIDS:
        execute(dsn, statement)
    sessions = pgbouncer.default_pool_size
    plant_on_every_server_connection(pooled_dsn, sessions)
    planted = probe_server_sessions(pooled_dsn, sessions)
    assert {s["search_path"] for s in planted} == {PLANTED_PATH}
    planted_pids = {s["pid"] for s in planted}
    assert len(planted_pids) == sessions

    env = pooled_cli_env(pooled_dsn, fake)
    drained = run_cli(["run", "--drain", "--batch-size", "25", "--concurrency", "2"], env)
    assert drained.returncode == 0, drained.stderr
    assert_no_prepared_statement_errors(drained.stderr)
    assert summary_counts(drained.stdout)["processed"] == 120
    execute(dsn, "UPDATE embedding_queue SET status = 'failed' WHERE record_id = '7'")
    for args in (["status", "--json"], ["requeue"], ["enqueue", "docs", "--ids", "1-3"]):
        done = run_cli(args, env)
        assert done.returncode == 0, f"{args}: {done.stderr}"
    assert status_counts(dsn) == {"done": 116, "pending": 4}

    assert hijacked(dsn) == [], "a planted overload ran inside our statements"
    assert_embeddings_are_of(dsn, contents)
    # Our writes ran on polluted server connections...
    writers = {row["pid"] for row in execute(dsn, "SELECT DISTINCT pid FROM public.writer_pids")}
    assert writers & planted_pids, (writers, planted_pids)
    # ...and our settings were transaction-local: every planted server connection still open
    # carries what was planted; one PgBouncer opened since (replacing a closed one) is fresh.
    after = probe_server_sessions(pooled_dsn, sessions)
    fresh = fresh_search_path(dsn)
    for session in after:
        expected = PLANTED_PATH if session["pid"] in planted_pids else fresh
        assert session["search_path"] == expected, (session, planted_pids)
    # ...and a client that does not pin its path is captured (the attack is live).
    with psycopg.connect(pooled_dsn, autocommit=True, prepare_threshold=None) as naive:
        naive.execute("SELECT now()")
    assert hijacked(dsn) == [{"who": pgbouncer.user, "what": "now"}]
