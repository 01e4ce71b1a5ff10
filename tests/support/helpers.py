"""Shared helpers for processor tests: source tables, registration, queue and vector reads.

Setup and final checks use short-lived synchronous psycopg connections (nothing else is
running then). Statements issued while a worker runs in the same event loop go through
``aexecute`` (an async connection), so a statement that waits on a lock the worker holds
never blocks the loop the worker needs to release it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import SecretStr

from queue_processor.cli import factories
from queue_processor.providers.openai import OpenAIProvider
from queue_processor.settings import Settings
from queue_processor.testing import FakeOpenAIServer
from queue_processor.worker import WorkerConfig

DIMS = 8
MODEL = "text-embedding-test"

Row = dict[str, Any]


def body(i: int) -> str:
    """Distinct content for source row ``i``."""
    return f"document {i}: the quick brown fox jumps over lazy dog number {i}"


def connect(dsn: str) -> psycopg.Connection[Row]:
    """An autocommit connection returning dict rows."""
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)


def execute(dsn: str, query: str | sql.Composable, params: Any = None) -> list[Row]:
    """Run one statement on a fresh autocommit connection; return its rows (if any)."""
    with connect(dsn) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


async def aexecute(dsn: str, query: str | sql.Composable, params: Any = None) -> list[Row]:
    """``execute`` over an async connection (safe while a worker runs in this loop)."""
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchall() if cur.description else []


def create_table(
    dsn: str,
    *,
    table: str = "docs",
    key_type: str = "bigint",
    embedding_type: str = f"vector({DIMS})",
    schema: str | None = None,
    body_column: str = "body",
    embedding_column: str = "embedding",
) -> None:
    """Create a source table: key, content, one embedding column and two companions."""
    name = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    with connect(dsn) as conn:
        if schema:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id {} PRIMARY KEY, {} text, {} {}, "
                "model text, embedded_at timestamptz)"
            ).format(
                name,
                sql.SQL(key_type),
                sql.Identifier(body_column),
                sql.Identifier(embedding_column),
                sql.SQL(embedding_type),
            )
        )


def register(
    dsn: str,
    table: str = "docs",
    column: str = "embedding",
    *,
    content_columns: Sequence[str] = ("body",),
    companions: bool = True,
) -> str:
    """Register ``table.column`` (``table`` as regclass text); return the queue label."""
    rows = execute(
        dsn,
        "SELECT embedding_register_target(%s::regclass, %s, %s::text[], "
        "p_model_column => %s, p_generated_at_column => %s) AS label",
        (
            table,
            column,
            list(content_columns),
            "model" if companions else None,
            "embedded_at" if companions else None,
        ),
    )
    return str(rows[0]["label"])


def insert_rows(
    dsn: str,
    rows: Iterable[tuple[Any, str | None]],
    *,
    table: str = "docs",
    key_type: str = "bigint",
) -> None:
    """Insert (key, body) rows in one statement (the enqueue trigger queues them)."""
    keys, bodies = zip(*rows, strict=True)
    execute(
        dsn,
        sql.SQL("INSERT INTO {} (id, body) SELECT * FROM unnest(%s::{}[], %s::text[])").format(
            sql.Identifier(table), sql.SQL(key_type)
        ),
        (list(keys), list(bodies)),
    )


def make_docs(dsn: str, n: int, *, embedding_type: str = f"vector({DIMS})") -> dict[int, str]:
    """A registered ``docs`` table with rows 1..n queued; returns {id: content}."""
    create_table(dsn, embedding_type=embedding_type)
    register(dsn)
    contents = {i: body(i) for i in range(1, n + 1)}
    if contents:
        insert_rows(dsn, contents.items())
    return contents


def queue_rows(dsn: str) -> dict[str, Row]:
    """Every queue row, by record_id."""
    return {r["record_id"]: r for r in execute(dsn, "SELECT * FROM embedding_queue ORDER BY id")}


def status_counts(dsn: str) -> dict[str, int]:
    """{status: count} over the whole queue."""
    rows = execute(dsn, "SELECT status, count(*) AS n FROM embedding_queue GROUP BY status")
    return {r["status"]: int(r["n"]) for r in rows}


def vector_rows(dsn: str, table: str = "docs") -> dict[Any, npt.NDArray[np.float32] | None]:
    """{id: embedding as float32} for a ``vector`` column named ``embedding``."""
    rows = execute(
        dsn,
        sql.SQL("SELECT id, embedding::real[] AS v FROM {} ORDER BY id").format(
            sql.Identifier(table)
        ),
    )
    return {r["id"]: None if r["v"] is None else np.array(r["v"], dtype=np.float32) for r in rows}


def as_float32(value: Any, column_type: str) -> npt.NDArray[np.float32]:
    """Decode a stored embedding of ``column_type`` (as fetched) into float32."""
    if column_type == "bytea":
        return np.frombuffer(bytes(value), dtype="<f4").astype(np.float32)
    if column_type == "jsonb":
        data = json.loads(value) if isinstance(value, str) else value
        return np.array(data, dtype=np.float32)
    return np.array(value, dtype=np.float32)


def make_provider(server: FakeOpenAIServer, **overrides: Any) -> OpenAIProvider:
    """An OpenAIProvider for the fake server with fast, bounded retries."""
    settings: dict[str, Any] = {
        "base_url": server.base_url,
        "api_key": None,
        "model": MODEL,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.05,
        "max_retries": 2,
    }
    settings.update(overrides)
    if isinstance(settings["api_key"], str):
        settings["api_key"] = SecretStr(settings["api_key"])
    return OpenAIProvider(**settings)


def worker_config(**overrides: Any) -> WorkerConfig:
    """The CLI's WorkerConfig for default settings (``Settings.model_construct()`` reads no
    environment), with test-friendly values (small batches, one slot, short polls, a lease
    that never lapses) and then ``overrides``."""
    config = factories.worker_config(Settings.model_construct())
    values: dict[str, Any] = {
        "batch_size": 50,
        "concurrency": 1,
        "lease_seconds": 60.0,
        "poll_interval_seconds": 0.2,
        "shutdown_grace_seconds": 30.0,
        "owner": "test-worker",
    }
    values.update(overrides)
    return dataclasses.replace(config, **values)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 10.0, every_s: float = 0.02
) -> None:
    """Wait until ``check()`` is true; a liveness bound (fails after ``timeout_s``)."""
    with anyio.fail_after(timeout_s):
        while True:
            outcome = check()
            if not isinstance(outcome, bool):
                outcome = await outcome
            if outcome:
                return
            await anyio.sleep(every_s)


# --- the command line, for end-to-end tests ---------------------------------------------------

QUEUE_PROCESSOR = str(Path(sys.executable).with_name("queue-processor"))
"""The console script installed next to this interpreter (the project's .venv)."""

API_KEY = "sk-test-e2e-SECRET-5f3c9a7e1d"
"""The key end-to-end tests configure; it must never appear in any output."""


def cli_env(dsn: str, server: FakeOpenAIServer, **extra: str) -> dict[str, str]:
    """Environment for a ``queue-processor`` subprocess against ``dsn`` and ``server``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "EMBEDDING_", "QUEUE_PROCESSOR_", "DATABASE_"))
    }
    env.update(
        DATABASE_URL=dsn,
        OPENAI_BASE_URL=server.base_url,
        OPENAI_API_KEY=API_KEY,
        EMBEDDING_MODEL=MODEL,
        QUEUE_PROCESSOR_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def json_events(stderr: str) -> list[dict[str, Any]]:
    """The structlog JSON events in a process's stderr (other lines are skipped)."""
    events: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def summary_counts(stdout: str) -> dict[str, int]:
    """The numbers of the ``=== PROCESSING SUMMARY ===`` block printed by ``run``."""
    labels = {
        "Total records processed": "processed",
        "Total errors": "failed",
        "Skipped (source row gone)": "skipped",
        "Retried later": "retried",
    }
    counts: dict[str, int] = {}
    for line in stdout.splitlines():
        label, _, value = line.partition(": ")
        if label in labels:
            counts[labels[label]] = int(value)
    return counts


# --- operator commands, for end-to-end tests ---------------------------------------------------

SEED_STATUS_SQL = """
SELECT
    table_name,
    status,
    COUNT(*) as count
FROM embedding_queue
GROUP BY table_name, status
ORDER BY table_name, status;
"""
"""The seeds' status query (seed 003), verbatim: what operators ran before `status`."""


def chunked_register_args(*extra: str) -> list[str]:
    """`register` of the chunked target docs.body (the ``docs`` table of ``create_table``):
    chunks of 40 tokens with 8 of overlap, ``DIMS`` dimensions; ``extra`` appended."""
    return [
        "register",
        "docs",
        "--column",
        "body",
        "--content",
        "body",
        "--chunks",
        "--dimensions",
        str(DIMS),
        "--chunk-tokens",
        "40",
        "--chunk-overlap",
        "8",
        *extra,
    ]


def run_cli(
    args: Sequence[str], env: dict[str, str], *, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``queue-processor ARGS`` to completion; the API key must not appear in its output."""
    done = subprocess.run(
        [QUEUE_PROCESSOR, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert API_KEY not in done.stdout
    assert API_KEY not in done.stderr
    return done


def seed_status_counts(dsn: str) -> dict[tuple[str, str], int]:
    """{(table_name, status): count} from the seeds' own status SQL."""
    return {(r["table_name"], r["status"]): int(r["count"]) for r in execute(dsn, SEED_STATUS_SQL)}
