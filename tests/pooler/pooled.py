"""What the pooler tests share: the environment of a command run through the pooler, and the
checks that a transaction-mode pooler makes necessary.

Every command runs as a real ``queue-processor`` subprocess (``python -m queue_processor``
for workers, the console script for the others) configured only through the environment,
with ``DATABASE_URL`` the pooler's URL. Setup and checks talk to the server directly.

``QUEUE_PROCESSOR_POOLED=true`` is set for every pooled command: issue 17 asks for a setting
or detection; with detection the variable is simply ignored (the settings ignore unknown
keys), so these tests hold either way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from tests.reliability.harness import worker_env
from tests.support.helpers import API_KEY, cli_env
from tests.support.pgbouncer import PgBouncer, PgBouncerMissing

try:  # the fake server's home since the refactor; tests/support before it
    from queue_processor.testing import FakeOpenAIServer
except ImportError:  # pragma: no cover - the tree before queue_processor/testing
    from tests.support.fake_openai import (  # type: ignore[import-not-found,no-redef]
        FakeOpenAIServer,
    )

__all__ = [
    "API_KEY",
    "POOLED",
    "FakeOpenAIServer",
    "assert_fresh_server_sessions",
    "assert_no_prepared_statement_errors",
    "other_clients",
    "pooled_cli_env",
    "pooled_worker_env",
    "probe_server_sessions",
    "start_pgbouncer",
]

POOLED = {"QUEUE_PROCESSOR_POOLED": "true"}
"""The setting that tells queue_processor its DATABASE_URL is a transaction-mode pooler."""

PREPARED_STATEMENT_ERRORS = ("prepared statement", "_pg3_")
"""What psycopg's server-side prepared statements look like when a pooler breaks them:
``prepared statement "_pg3_0" does not exist`` / ``... already exists``."""


def start_pgbouncer(backend_dsn: str, **options: Any) -> PgBouncer:
    """A started PgBouncer (see tests/support/pgbouncer.py), or a test failure that says how
    to install one: the pooler tests never skip."""
    try:
        return PgBouncer(backend_dsn, **options).start()
    except PgBouncerMissing as exc:
        missing = str(exc)
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback


def pooled_worker_env(url: str, server: FakeOpenAIServer, **settings: object) -> dict[str, str]:
    """The environment of a worker process whose DATABASE_URL is ``url`` (the pooler's)."""
    return worker_env(url, server, **POOLED, **settings)


def pooled_cli_env(url: str, server: FakeOpenAIServer, **extra: str) -> dict[str, str]:
    """The environment of an operator command whose DATABASE_URL is ``url``."""
    return cli_env(url, server, COLUMNS="200", **POOLED, **extra)


def assert_no_prepared_statement_errors(output: str) -> None:
    """No line of ``output`` shows a server-side prepared statement broken by the pooler."""
    bad = [
        line for line in output.splitlines() if any(p in line for p in PREPARED_STATEMENT_ERRORS)
    ]
    assert not bad, "prepared statements broke through the pooler:\n" + "\n".join(bad[:5])


@contextlib.contextmanager
def other_clients(url: str, clients: int = 2) -> Iterator[None]:
    """Other applications' traffic through the pooler while the block runs: ``clients``
    threads, each running short transactions on its own connection through ``url``, so
    server connections change hands between one command's transactions, as they do in
    production (alone, a client tends to get the same server connection back every time)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
                while not stop.is_set():
                    conn.execute("SELECT pg_sleep(0.005)")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not errors, f"the other clients failed: {errors[0]!r}"


def probe_server_sessions(url: str, sessions: int) -> list[dict[str, Any]]:
    """What ``sessions`` server connections behind the pooler carry: opens that many clients
    through ``url``, each inside a transaction (so each holds its own server connection,
    idle ones first), and reads its backend pid, search_path, prepared statements, LISTEN
    channels, advisory locks and the timeouts it runs with."""
    probe = sql.SQL(
        "SELECT pg_backend_pid() AS pid,"
        " current_setting('search_path') AS search_path,"
        " (SELECT count(*) FROM pg_prepared_statements) AS prepared,"
        " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
        " (SELECT count(*) FROM pg_locks"
        "   WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory_locks"
    )
    found: list[dict[str, Any]] = []
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(sessions):
            # A well-behaved pooled client: never prepares (the pooler would break it).
            conn = psycopg.connect(url, prepare_threshold=None)
            conns.append(conn)
            cur = conn.execute(probe)
            assert cur.description is not None
            names = [c.name for c in cur.description]
            row = cur.fetchone()
            assert row is not None
            found.append(dict(zip(names, row, strict=True)))
    finally:
        for conn in conns:
            conn.rollback()
            conn.close()
    return found


def assert_fresh_server_sessions(pgbouncer: PgBouncer, dsn: str, pooled_dsn: str) -> None:
    """Every server connection the pooler holds for ``dsn``'s database looks like a new
    session to the next client: default search_path, no prepared statement, no LISTEN, no
    advisory lock."""
    name = str(conninfo.conninfo_to_dict(dsn)["dbname"])
    servers = pgbouncer.servers(name)
    assert servers, "the commands did not go through the pooler"
    with psycopg.connect(dsn) as fresh:
        default_path = fresh.execute("SHOW search_path").fetchone()
    assert default_path is not None
    sessions = probe_server_sessions(pooled_dsn, len(servers))
    assert {s["pid"] for s in sessions} >= {s["remote_pid"] for s in servers}
    leftovers = [
        s
        for s in sessions
        if (s["search_path"], s["prepared"], s["listening"], s["advisory_locks"])
        != (default_path[0], 0, 0, 0)
    ]
    assert leftovers == [], f"session state left on pooled server connections: {leftovers}"
