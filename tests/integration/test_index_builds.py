"""Wanted indexes and their builds, through the repository and an in-process worker: a
build waits for the target's backlog, exactly one builder takes it, an invalid index left by
an interrupted build is dropped and built again, a stopping worker gives its build back, and
the build's memory is sized to the data within the cap."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import psycopg
import pytest
from structlog.testing import capture_logs

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.models import IndexBuildResult
from queue_processor.testing import FakeOpenAIServer
from queue_processor.worker import Worker
from tests.support.helpers import (
    DIMS,
    eventually,
    execute,
    make_docs,
    make_provider,
    worker_config,
)

INDEX = "docs_embedding_hnsw_idx"

pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


async def want_pending(db: Database) -> None:
    [target] = await queue.list_targets(db)
    await queue.want_index(db, target, queue.hnsw_spec(target), "pending")


def fill_vectors(dsn: str) -> None:
    """Write every docs row's vector and mark its queue row done (a drained backlog)."""
    execute(
        dsn,
        "SET queue_processor.worker_write = 'on';"
        f" UPDATE docs SET embedding = array_fill(0.5::real, ARRAY[{DIMS}])::vector",
    )
    execute(dsn, "UPDATE embedding_queue SET status = 'done', processed_at = now()")


def build_state(dsn: str) -> dict[str, object]:
    [row] = execute(
        dsn,
        "SELECT b.state, b.attempts, b.error_message, b.builder,"
        " (SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)) AS valid"
        " FROM embedding_index_builds b",
        (INDEX,),
    )
    return row


async def build(db: Database, owner: str = "builder-a") -> IndexBuildResult | None:
    return await queue.build_next_index(db, owner=owner, lease_seconds=30, memory_cap_mb=64)


async def test_a_build_waits_for_the_backlog_and_one_builder_takes_it(
    dsn: str, db: Database
) -> None:
    make_docs(dsn, 30)
    await want_pending(db)
    # 30 rows pending: not due.
    assert await build(db) is None
    assert build_state(dsn)["state"] == "pending"
    fill_vectors(dsn)
    one_in_flight = (
        "UPDATE embedding_queue SET status = 'processing'"
        " WHERE id = (SELECT min(id) FROM embedding_queue)"
    )
    execute(dsn, one_in_flight)
    assert await build(db) is None  # one row still in flight
    execute(dsn, "UPDATE embedding_queue SET status = 'done'")

    results: list[IndexBuildResult | None] = []

    async def one(owner: str) -> None:
        results.append(await build(db, owner))

    async with Database(dsn, max_size=4) as other, anyio.create_task_group() as tg:
        tg.start_soon(one, "builder-a")
        tg.start_soon(lambda: _append(results, other))
    built = [r for r in results if r is not None]
    assert len(results) == 2, results
    assert len(built) == 1, results
    assert (built[0].state, built[0].dropped_invalid) == ("ready", False)
    assert build_state(dsn) == {
        "state": "ready",
        "attempts": 1,
        "error_message": None,
        "builder": None,
        "valid": True,
    }
    assert await build(db) is None  # ready: nothing due


async def _append(results: list[IndexBuildResult | None], db: Database) -> None:
    results.append(await build(db, "builder-b"))


async def test_an_invalid_index_left_by_an_interrupted_build_is_dropped_and_rebuilt(
    dsn: str, db: Database
) -> None:
    make_docs(dsn, 40)
    fill_vectors(dsn)
    await want_pending(db)
    # An interrupted CREATE INDEX CONCURRENTLY: it fails after committing the index entry
    # (waiting for a writer's transaction past lock_timeout), which leaves it INVALID.
    with psycopg.connect(dsn) as writer:
        writer.execute("INSERT INTO docs (id, body) VALUES (1000, 'in flight')")
        with psycopg.connect(dsn, autocommit=True) as builder:
            builder.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                builder.execute(
                    f"CREATE INDEX CONCURRENTLY {INDEX} ON docs"
                    " USING hnsw (embedding vector_cosine_ops)"
                )
        writer.rollback()
    assert build_state(dsn)["valid"] is False

    with capture_logs() as logs:
        result = await build(db)
    assert result is not None
    assert (result.state, result.dropped_invalid) == ("ready", True)
    assert [e["index"] for e in logs if e["event"] == "index_invalid_dropped"] == [INDEX]
    assert build_state(dsn)["valid"] is True
    # One index, not a second one next to the invalid leftover.
    indexes = execute(
        dsn,
        "SELECT indexrelid::regclass::text AS name FROM pg_index"
        " WHERE indrelid = 'docs'::regclass AND NOT indisprimary",
    )
    assert indexes == [{"name": INDEX}]


async def test_a_running_worker_builds_a_due_index_and_keeps_embedding(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 25)
    await want_pending(db)
    config = worker_config(index_check_seconds=0.05)
    async with make_provider(server) as provider:
        worker = Worker(db, provider, config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, "continuous")
            await eventually(lambda: build_state(dsn)["state"] == "ready", timeout_s=60)
            # Rows written after the build are embedded as before (and indexed).
            execute(dsn, "INSERT INTO docs (id, body) VALUES (500, 'after the index')")
            await eventually(
                lambda: (
                    execute(dsn, "SELECT embedding IS NOT NULL AS e FROM docs WHERE id = 500")
                    == [{"e": True}]
                ),
                timeout_s=60,
            )
            worker.stop()
    assert build_state(dsn)["valid"] is True
    assert execute(dsn, "SELECT count(embedding) AS n FROM docs") == [{"n": 26}]


async def test_a_stopping_worker_gives_its_build_back(dsn: str, db: Database) -> None:
    make_docs(dsn, 10)
    fill_vectors(dsn)
    await want_pending(db)
    # A writer's open transaction makes CREATE INDEX CONCURRENTLY wait: the build is in
    # progress when it is cancelled.
    with psycopg.connect(dsn) as writer:
        writer.execute("INSERT INTO docs (id, body) VALUES (1000, 'in flight')")
        with anyio.CancelScope() as scope:

            async def cancel_when_building() -> None:
                await eventually(lambda: build_state(dsn)["state"] == "building", timeout_s=30)
                await eventually(
                    lambda: (
                        execute(
                            dsn,
                            "SELECT count(*) AS n FROM pg_stat_progress_create_index"
                            " WHERE relid = 'docs'::regclass",
                        )
                        == [{"n": 1}]
                    ),
                    timeout_s=30,
                )
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_building)
                await build(db)
        writer.rollback()
    state = build_state(dsn)
    assert (state["state"], state["builder"]) == ("pending", None)
    # The next build drops what the cancelled one left and finishes.
    result = await build(db)
    assert result is not None
    assert result.state == "ready"
    assert build_state(dsn)["valid"] is True


@pytest.mark.parametrize(
    ("rows", "dims", "kind", "cap", "expected"),
    [
        (0, 768, "vector", 1024, 64),  # the floor
        (100_000, 768, "vector", 1024, 448),  # (3080 + 160 + 512) * 1.25 bytes per row
        (100_000, 768, "halfvec", 1024, 265),  # half the vector bytes
        (1_000_000, 1536, "vector", 1024, 1024),  # the cap
        (100_000, 768, "vector", 8, 8),  # a cap below the floor wins
    ],
)
def test_build_memory_is_sized_to_the_rows_within_the_cap(
    rows: int, dims: int, kind: str, cap: int, expected: int
) -> None:
    assert queue.build_memory_mb(rows, dims, kind, 16, cap_mb=cap) == expected
