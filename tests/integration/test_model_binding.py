"""A target's model is law (issue 13): a worker claims only items of targets bound to its
model (or unbound), says at start what it serves and leaves, and `status` tells what waits
for a worker with which model. Real PostgreSQL, the fake OpenAI server over HTTP; the
server's per-model log and the targets' model columns are what the assertions read."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import ClientCursor
from rich.console import Console
from structlog.testing import capture_logs

from queue_processor import queue, render
from queue_processor.db import Database, statement
from queue_processor.models import MAX_CLAIM_BYTES, MAX_CONTENT_CHARS
from queue_processor.testing import FakeOpenAIServer
from queue_processor.worker import RunMode, RunSummary, Worker, WorkerConfig
from tests.support.helpers import (
    DIMS,
    body,
    connect,
    create_table,
    eventually,
    execute,
    insert_rows,
    make_provider,
    register,
    worker_config,
)

pytestmark = pytest.mark.anyio

MODEL_A = "model-a"
MODEL_B = "model-b"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def bound_table(dsn: str, table: str, model: str | None, n: int, first: int = 1) -> None:
    """A registered table ``table`` bound to ``model`` with rows first..first+n-1 queued."""
    create_table(dsn, table=table)
    register(dsn, table)
    if model is not None:
        execute(
            dsn,
            "SELECT embedding_bind_target(%s, 'embedding', %s, %s)",
            (table, model, DIMS),
        )
    insert_rows(dsn, ((i, body(i)) for i in range(first, first + n)), table=table)


async def run_worker(
    db: Database,
    server: FakeOpenAIServer,
    model: str,
    config: WorkerConfig | None = None,
    mode: RunMode = "drain",
) -> tuple[Worker, RunSummary]:
    async with make_provider(server, model=model) as provider:
        worker = Worker(db, provider, config or worker_config(owner=f"worker-{model}"))
        with anyio.fail_after(60):
            summary = await worker.run(mode)
    return worker, summary


def models_written(dsn: str, table: str) -> dict[str | None, int]:
    """{model column value: rows} of ``table`` (None: no vector written)."""
    rows = execute(
        dsn,
        f"SELECT model, count(*) AS n, count(embedding) AS vectors FROM {table} GROUP BY model",
    )
    for r in rows:  # a model name is recorded exactly when a vector is
        assert r["vectors"] == (0 if r["model"] is None else r["n"]), rows
    return {r["model"]: int(r["n"]) for r in rows}


def rendered(report: queue.StatusReport) -> str:
    """The human `status` view as plain text."""
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render.status_renderable(report, None))
    return console.export_text()


def queue_counts(dsn: str) -> dict[tuple[str, str], int]:
    rows = execute(
        dsn, "SELECT table_name, status, count(*) AS n FROM embedding_queue GROUP BY 1, 2"
    )
    return {(r["table_name"], r["status"]): int(r["n"]) for r in rows}


async def test_a_worker_for_model_b_never_writes_into_a_model_a_target(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    bound_table(dsn, "docs_a", MODEL_A, 30)
    bound_table(dsn, "docs_b", MODEL_B, 20, first=101)

    with capture_logs() as logs:
        worker, summary = await run_worker(db, server, MODEL_B)

    assert summary.processed == 20
    assert queue_counts(dsn) == {("docs_a", "pending"): 30, ("docs_b", "done"): 20}
    assert models_written(dsn, "docs_a") == {None: 30}
    assert models_written(dsn, "docs_b") == {MODEL_B: 20}
    # The provider was asked for model B only, and only for docs_b's texts.
    assert set(server.inputs_by_model) == {MODEL_B}
    assert set(server.inputs_by_model[MODEL_B]) == {body(i) for i in range(101, 121)}
    # Never claimed: the model-A rows were not even touched (no attempt counted).
    untouched = execute(
        dsn, "SELECT max(attempts) AS a FROM embedding_queue WHERE table_name = 'docs_a'"
    )
    assert untouched[0]["a"] == 0
    [event] = [e for e in logs if e["event"] == "worker_targets"]
    assert event["models"] == [MODEL_B]
    assert event["serves"] == ["docs_b.embedding (model-b)"]
    assert event["leaves"] == ["docs_a.embedding (model-a)"]
    assert worker.serving is not None
    assert not worker.serving.nothing_to_serve


async def test_two_workers_with_different_models_drain_a_mixed_queue_together(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    bound_table(dsn, "docs_a", MODEL_A, 120)
    bound_table(dsn, "docs_b", MODEL_B, 80, first=1001)
    # Interleave the two targets' rows in the claim order, so each worker's claims pass
    # the other's rows.
    execute(dsn, "UPDATE embedding_queue SET next_attempt_at = now() - (id % 7) * interval '1s'")
    summaries: dict[str, RunSummary] = {}

    async def one(model: str) -> None:
        async with Database(dsn, max_size=4) as own:
            _, summaries[model] = await run_worker(
                own, server, model, worker_config(owner=f"w-{model}", batch_size=7)
            )

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, MODEL_A)
            tg.start_soon(one, MODEL_B)

    assert queue_counts(dsn) == {("docs_a", "done"): 120, ("docs_b", "done"): 80}
    assert (summaries[MODEL_A].processed, summaries[MODEL_B].processed) == (120, 80)
    assert models_written(dsn, "docs_a") == {MODEL_A: 120}
    assert models_written(dsn, "docs_b") == {MODEL_B: 80}
    owners = execute(
        dsn,
        "SELECT table_name, array_agg(DISTINCT claimed_by) AS o FROM embedding_queue GROUP BY 1",
    )
    assert {r["table_name"]: r["o"] for r in owners} == {
        "docs_a": [f"w-{MODEL_A}"],
        "docs_b": [f"w-{MODEL_B}"],
    }
    assert set(server.inputs_by_model[MODEL_A]) == {body(i) for i in range(1, 121)}
    assert set(server.inputs_by_model[MODEL_B]) == {body(i) for i in range(1001, 1081)}


async def test_unbound_targets_are_served_by_any_worker(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    """A target registered without a model (before binding existed, or through the SQL API
    without p_model) is served as before by whichever worker runs."""
    bound_table(dsn, "docs", None, 10)
    _, summary = await run_worker(db, server, MODEL_B)
    assert summary.processed == 10
    assert models_written(dsn, "docs") == {MODEL_B: 10}


async def test_a_worker_with_no_matching_target_says_so_and_drains_nothing(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    bound_table(dsn, "docs_a", MODEL_A, 5)
    with capture_logs() as logs:
        worker, summary = await run_worker(db, server, MODEL_B)
    assert (summary.processed, summary.failed) == (0, 0)
    assert server.requests_total == 0
    assert queue_counts(dsn) == {("docs_a", "pending"): 5}
    assert worker.serving is not None
    assert worker.serving.nothing_to_serve
    message = worker.serving.message()
    assert "no registered target uses model model-b" in message
    assert "docs_a.embedding (model-a)" in message
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["no_target_for_model"]


async def test_a_continuous_worker_with_no_matching_target_waits_and_serves_once_bound(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    """It keeps waiting (rather than exiting) and picks the target up once the target is
    bound to its model; meanwhile `status` sees it running with its model."""
    bound_table(dsn, "docs_a", MODEL_A, 5)
    async with make_provider(server, model=MODEL_B) as provider:
        worker = Worker(db, provider, worker_config(owner="waiting-b"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, "continuous")
            await eventually(
                lambda: bool(
                    execute(dsn, "SELECT 1 FROM embedding_workers WHERE owner = 'waiting-b'")
                )
            )
            report = await queue.status(db)
            [target] = report.targets
            assert (target["model"], target["pending"], target["served"]) == (MODEL_A, 5, False)
            assert render.target_waiting(target) == "waiting for a worker with model model-a"
            assert "5 pending, waiting for a worker with model model-a" in rendered(report)
            await queue.bind_target(db, "docs_a", "embedding", MODEL_B)
            await eventually(lambda: queue_counts(dsn) == {("docs_a", "done"): 5}, timeout_s=30)
            report = await queue.status(db)
            assert report.targets[0]["served"] is True
            worker.stop()
    assert models_written(dsn, "docs_a") == {MODEL_B: 5}
    # Gone from the running workers once stopped.
    assert execute(dsn, "SELECT owner FROM embedding_workers") == []


def claim_params(models: list[str] | None, limit: int = 100) -> dict[str, Any]:
    return {
        "limit": limit,
        "owner": "explain",
        "token": uuid.uuid4(),
        "lease_seconds": 300.0,
        "max_attempts": 3,
        "max_content_chars": MAX_CONTENT_CHARS,
        "max_claim_bytes": MAX_CLAIM_BYTES,
        "models": models,
    }


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in walk(child))]


async def test_the_model_filter_reads_the_index_not_the_other_models_backlog(
    dsn: str, db: Database
) -> None:
    """20,000 pending rows of a model-A target ahead of 5 of a model-B target: a model-B claim
    takes the 5 through embedding_queue_pending_target_idx and reads a handful of index
    entries, not the A backlog (EXPLAIN ANALYZE's row counts, in a rolled-back transaction)."""
    for table, model in (("docs_a", MODEL_A), ("docs_b", MODEL_B)):
        create_table(dsn, table=table)
        register(dsn, table)
        execute(dsn, "SELECT embedding_bind_target(%s, 'embedding', %s)", (table, model))
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content,"
        " next_attempt_at) SELECT 'docs_a', g::text, 'embedding', 'a ' || g,"
        " now() - interval '1 hour' FROM generate_series(1, 20000) AS g",
    )
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content)"
        " SELECT 'docs_b', g::text, 'embedding', 'b ' || g FROM generate_series(1, 5) AS g",
    )
    execute(dsn, "ANALYZE embedding_queue")
    with connect(dsn) as conn:
        rendered = ClientCursor(conn).mogrify(
            statement("claim_batch", qs="public"), claim_params([MODEL_B])
        )
        conn.execute("BEGIN")  # EXPLAIN ANALYZE runs the claim: take it back
        row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + rendered).fetchone()
        conn.execute("ROLLBACK")
    assert row is not None
    plan = next(iter(row.values()))[0]["Plan"]
    scans = [n for n in walk(plan) if n.get("Relation Name") == "embedding_queue"]
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], scans
    assert "embedding_queue_pending_target_idx" in {n.get("Index Name") for n in scans}, scans
    rows_read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
    assert rows_read < 100, scans
    # And the claim itself takes exactly the model-B rows.
    result = await queue.claim_batch(
        db, owner="b", limit=100, lease_seconds=300, max_attempts=3, models=[MODEL_B]
    )
    assert sorted(i.content or "" for i in result.claim.items) == [f"b {g}" for g in range(1, 6)]
    assert {i.table_name for i in result.claim.items} == {"docs_b"}


async def test_expired_leases_of_another_models_target_are_not_reclaimed(
    dsn: str, db: Database
) -> None:
    bound_table(dsn, "docs_a", MODEL_A, 3)
    first = await queue.claim_batch(
        db, owner="a", limit=10, lease_seconds=300, max_attempts=3, models=[MODEL_A]
    )
    assert len(first.claim.items) == 3
    execute(dsn, "UPDATE embedding_queue SET lease_expires_at = now() - interval '1 second'")
    other = await queue.claim_batch(
        db, owner="b", limit=10, lease_seconds=300, max_attempts=3, models=[MODEL_B]
    )
    assert (other.claim.items, other.reclaimed) == ((), 0)
    same = await queue.claim_batch(
        db, owner="a2", limit=10, lease_seconds=300, max_attempts=3, models=[MODEL_A]
    )
    assert (len(same.claim.items), same.reclaimed) == (3, 3)


async def test_rows_of_unregistered_targets_are_still_claimed_and_failed(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    """A hand-inserted row naming no registered target is claimed by a bound worker too,
    so it ends failed ("unregistered target") instead of waiting forever."""
    bound_table(dsn, "docs_a", MODEL_A, 2)
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content)"
        " VALUES ('nope', '1', 'embedding', 'x')",
    )
    _, summary = await run_worker(db, server, MODEL_B)
    assert summary.failed == 1
    failed = execute(dsn, "SELECT error_message FROM embedding_queue WHERE table_name = 'nope'")
    assert failed[0]["error_message"].startswith("unregistered target")
    assert queue_counts(dsn)[("docs_a", "pending")] == 2


async def test_stale_model_rows_are_counted_and_queued(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    """After a model change, rows whose model column names the old model are found by
    `status` and queued by `enqueue --stale-model`; the rest are left alone."""
    bound_table(dsn, "docs", MODEL_A, 10)
    await run_worker(db, server, MODEL_A)
    assert models_written(dsn, "docs") == {MODEL_A: 10}
    await queue.bind_target(db, "docs", "embedding", MODEL_B)
    execute(dsn, "UPDATE docs SET body = body || ' (edited)' WHERE id <= 3")  # re-queued
    await run_worker(db, server, MODEL_B)
    assert models_written(dsn, "docs") == {MODEL_A: 7, MODEL_B: 3}

    report = await queue.status(db)
    assert [t["stale_model"] for t in report.targets] == [7]
    assert "7 row(s) hold another model's vector" in rendered(report)

    queued = await queue.backfill(db, "docs", "embedding", "stale_model")
    assert queued == 7
    await run_worker(db, server, MODEL_B)
    assert models_written(dsn, "docs") == {MODEL_B: 10}
    assert (await queue.status(db)).targets[0]["stale_model"] == 0


async def test_stale_model_needs_a_model_column(dsn: str, db: Database) -> None:
    create_table(dsn)
    register(dsn, companions=False)
    await queue.bind_target(db, "docs", "embedding", MODEL_A)
    with pytest.raises(Exception, match="has no model column"):
        await queue.backfill(db, "docs", "embedding", "stale_model")
    assert (await queue.status(db)).targets[0]["stale_model"] is None


async def test_bind_refuses_dimensions_the_column_cannot_hold(dsn: str, db: Database) -> None:
    create_table(dsn)
    register(dsn)
    with pytest.raises(Exception, match=f"holds {DIMS} dimensions but 1536"):
        await queue.bind_target(db, "docs", "embedding", MODEL_A, 1536)
    assert await queue.bind_target(db, "docs", "embedding", MODEL_A, DIMS) is None
    assert await queue.bind_target(db, "docs", "embedding", MODEL_B) == MODEL_A


async def test_an_unprivileged_role_cannot_bind_or_list_workers(dsn: str) -> None:
    """embedding_workers and embedding_bind_target are ours like every other object."""
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    execute(dsn, f"CREATE ROLE {role}")
    try:
        create_table(dsn)
        register(dsn)
        with connect(dsn) as conn:
            conn.execute(f"SET ROLE {role}")
            for query in (
                "SELECT * FROM embedding_workers",
                "SELECT embedding_bind_target('docs', 'embedding', 'x')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(query)
                conn.rollback()
                conn.execute(f"SET ROLE {role}")
    finally:
        execute(dsn, f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_one_worker_with_several_models_routes_each_target_to_its_provider(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    """Model A through one server, model B through another (with its own key), and an
    unbound target through the default provider (model A): one worker, one drain; every
    vector written with its model's name, usage recorded per model."""
    bound_table(dsn, "docs_a", MODEL_A, 30)
    bound_table(dsn, "docs_b", MODEL_B, 20, first=101)
    bound_table(dsn, "docs_any", None, 5, first=201)
    with FakeOpenAIServer(dims=DIMS, required_api_key="sk-b-only") as server_b:
        async with (
            make_provider(server, model=MODEL_A) as provider_a,
            make_provider(server_b, model=MODEL_B, api_key="sk-b-only") as provider_b,
        ):
            worker = Worker(
                db, provider_a, worker_config(batch_size=13), providers={MODEL_B: provider_b}
            )
            assert worker.models == (MODEL_A, MODEL_B)
            with anyio.fail_after(60):
                summary = await worker.run("drain")
        assert set(server_b.inputs_by_model) == {MODEL_B}
        assert set(server_b.inputs_by_model[MODEL_B]) == {body(i) for i in range(101, 121)}
    assert (summary.processed, summary.failed) == (55, 0)
    assert set(server.inputs_by_model) == {MODEL_A}
    assert set(server.inputs_by_model[MODEL_A]) == {
        body(i) for i in (*range(1, 31), *range(201, 206))
    }
    assert models_written(dsn, "docs_a") == {MODEL_A: 30}
    assert models_written(dsn, "docs_b") == {MODEL_B: 20}
    assert models_written(dsn, "docs_any") == {MODEL_A: 5}
    usage = execute(dsn, "SELECT model, sum(items) AS n FROM embedding_usage GROUP BY model")
    assert {r["model"]: int(r["n"]) for r in usage} == {MODEL_A: 35, MODEL_B: 20}
