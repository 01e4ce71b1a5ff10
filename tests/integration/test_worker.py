"""The worker against real Postgres and the fake OpenAI server over a socket.

Covers draining, batching and de-duplication, the stale-write guard (content changes,
operator requeues and reclaimed leases while a batch is in flight), poison inputs and bad
vectors, hostile queue rows, provider errors (401, unknown model, 500, 429 + Retry-After),
and the loop: --once, delay, concurrency, NOTIFY wake-up, lease renewal, graceful and
immediate stop, and database connection loss.

Waits are liveness bounds (``eventually`` / ``anyio.fail_after``), never measurements.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pytest
from structlog.testing import capture_logs

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.errors import ConfigurationError
from queue_processor.models import Claim, ItemFailure
from queue_processor.testing import FakeOpenAIServer, fake_token_count, fake_vector
from queue_processor.worker import RunMode, RunSummary, Worker, WorkerConfig
from tests.support.helpers import (
    DIMS,
    MODEL,
    aexecute,
    create_table,
    eventually,
    execute,
    insert_rows,
    make_docs,
    make_provider,
    queue_rows,
    register,
    status_counts,
    vector_rows,
    worker_config,
)

pytestmark = pytest.mark.anyio

Starter = Callable[..., Awaitable["Running"]]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


async def run_worker(
    db: Database,
    server: FakeOpenAIServer,
    config: WorkerConfig | None = None,
    mode: RunMode = "drain",
    **provider_overrides: Any,
) -> RunSummary:
    """Run one worker to completion (bounded) with a fresh provider."""
    async with make_provider(server, **provider_overrides) as provider:
        worker = Worker(db, provider, config or worker_config())
        with anyio.fail_after(60):
            return await worker.run(mode)


class Running:
    """A worker running in a task group, for tests that act while it works."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.summary: RunSummary | None = None
        self.finished = anyio.Event()

    async def run(self, mode: RunMode) -> None:
        try:
            self.summary = await self.worker.run(mode)
        finally:
            self.finished.set()

    async def wait(self, timeout_s: float = 60) -> RunSummary:
        with anyio.fail_after(timeout_s):
            await self.finished.wait()
        assert self.summary is not None
        return self.summary


@pytest.fixture
async def start(db: Database, server: FakeOpenAIServer) -> AsyncIterator[Starter]:
    """``await start(config, mode)`` -> Running; the task group outlives the test body."""
    async with anyio.create_task_group() as tg, make_provider(server) as provider:
        runs: list[Running] = []

        async def starter(
            config: WorkerConfig | None = None,
            mode: RunMode = "drain",
            database: Database | None = None,
        ) -> Running:
            running = Running(Worker(database or db, provider, config or worker_config()))
            runs.append(running)
            tg.start_soon(running.run, mode)
            return running

        yield starter
        for running in runs:
            running.worker.abort()


def assert_vectors(dsn: str, contents: dict[int, str], ids: Any = None) -> None:
    """Each listed row holds exactly the fake server's vector of its content."""
    stored = vector_rows(dsn)
    for i in contents if ids is None else ids:
        got = stored[i]
        assert got is not None, f"row {i} has no embedding"
        np.testing.assert_array_equal(got, fake_vector(contents[i], DIMS))


async def in_flight(server: FakeOpenAIServer) -> None:
    """Wait until the server holds an embedding request (the batch is on the wire)."""
    await eventually(lambda: server.in_flight >= 1, timeout_s=20, every_s=0.01)


# --- draining -------------------------------------------------------------------------------


async def test_drain_writes_exact_vectors_in_batched_deduplicated_requests(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 150)
    for i in range(1, 11):  # ten rows share one text, all in the first batch
        contents[i] = "shared content"
    execute(dsn, "UPDATE docs SET body = 'shared content' WHERE id <= 10")

    with capture_logs() as logs:
        summary = await run_worker(db, server, worker_config(batch_size=50))

    assert status_counts(dsn) == {"done": 150}
    assert_vectors(dsn, contents)
    assert {r["model"] for r in execute(dsn, "SELECT model FROM docs")} == {MODEL}
    assert execute(dsn, "SELECT count(*) AS n FROM docs WHERE embedded_at IS NULL")[0]["n"] == 0
    # Batched: one request per batch of 50, not one per row; identical text sent once.
    assert server.requests_total == 3
    assert all(entry["n_inputs"] > 1 for entry in server.request_log)
    assert server.input_counts["shared content"] == 1
    assert set(server.input_counts.values()) == {1}
    assert sum(server.input_counts.values()) == 141
    assert summary.processed == 150
    assert (summary.failed, summary.skipped, summary.retried, summary.lost) == (0, 0, 0, 0)
    assert summary.batches == 3
    assert summary.requests == 3
    assert summary.tokens == sum(fake_token_count(t) for t in set(contents.values()))
    done = [e for e in logs if e["event"] == "batch_done"]
    assert len(done) == 3
    assert sum(e["done"] for e in done) == 150


# --- stale writes ---------------------------------------------------------------------------


async def test_rows_updated_mid_batch_end_with_their_latest_content(
    dsn: str, server: FakeOpenAIServer, start: Starter
) -> None:
    contents = make_docs(dsn, 20)
    server.latency_s = 1.0
    running = await start(worker_config(batch_size=20))
    await in_flight(server)
    edited = [3, 7, 11]
    await aexecute(dsn, "UPDATE docs SET body = body || ' (edited)' WHERE id = ANY(%s)", (edited,))
    server.latency_s = 0.0
    summary = await running.wait()

    latest = {i: contents[i] + (" (edited)" if i in edited else "") for i in contents}
    assert status_counts(dsn) == {"done": 20}
    assert_vectors(dsn, latest)
    for i in edited:
        # The old text was embedded once, but its vector never landed.
        assert server.input_counts[contents[i]] == 1
        assert server.input_counts[latest[i]] == 1
    assert summary.lost == 3
    assert summary.processed == 20
    rows = queue_rows(dsn)
    assert {rows[str(i)]["generation"] for i in edited} == {2}


async def test_operator_requeue_mid_flight_writes_nothing_for_that_row(
    dsn: str, server: FakeOpenAIServer, start: Starter
) -> None:
    contents = make_docs(dsn, 10)
    server.latency_s = 1.0
    with capture_logs() as logs:
        running = await start(worker_config(batch_size=10), "once")
        await in_flight(server)
        await aexecute(dsn, "UPDATE embedding_queue SET status = 'pending' WHERE record_id = '4'")
        summary = await running.wait()

    assert summary.lost == 1
    assert summary.processed == 9
    stored = vector_rows(dsn)
    assert stored[4] is None
    assert_vectors(dsn, contents, [i for i in contents if i != 4])
    assert queue_rows(dsn)["4"]["status"] == "pending"
    assert status_counts(dsn) == {"done": 9, "pending": 1}
    assert [e["items"] for e in logs if e["event"] == "claims_superseded"] == [1]


async def test_slow_worker_whose_lease_was_reclaimed_writes_nothing(dsn: str, db: Database) -> None:
    contents = make_docs(dsn, 3)
    a = await queue.claim_batch(db, owner="worker-a", limit=10, lease_seconds=60, max_attempts=3)
    execute(dsn, "UPDATE embedding_queue SET lease_expires_at = now() - interval '1 second'")
    b = await queue.claim_batch(db, owner="worker-b", limit=10, lease_seconds=60, max_attempts=3)
    assert b.reclaimed == 3
    targets = {t.key: t for t in await queue.list_targets(db)}

    def writes(claim: Claim, prefix: str) -> list[queue.Write]:
        return [
            queue.Write(
                item,
                targets[(item.table_name, item.embedding_column)],
                item.record_id,
                fake_vector(prefix + (item.content or ""), DIMS),
            )
            for item in claim.items
        ]

    stale = await queue.complete(db, a.claim.token, writes(a.claim, "stale "), [], model=MODEL)
    assert stale.done == ()
    assert sorted(stale.lost) == sorted(i.id for i in a.claim.items)
    assert all(v is None for v in vector_rows(dsn).values())
    # None of A's other acknowledgements touch B's rows either.
    first = a.claim.items[0]
    late = ItemFailure(first, "provider_rejected", "late failure")
    assert await queue.fail(db, a.claim.token, [late]) == ()
    assert await queue.release(db, a.claim.token, [first.id]) == 0
    retried = await queue.schedule_retry(
        db, a.claim.token, [first], "late", max_attempts=3, base_seconds=1, max_seconds=1
    )
    assert retried == ((), ())
    rows = queue_rows(dsn)
    assert {r["status"] for r in rows.values()} == {"processing"}
    assert {r["claim_token"] for r in rows.values()} == {b.claim.token}

    fresh = await queue.complete(db, b.claim.token, writes(b.claim, ""), [], model=MODEL)
    assert sorted(fresh.done) == sorted(i.id for i in b.claim.items)
    assert fresh.lost == ()
    assert status_counts(dsn) == {"done": 3}
    assert_vectors(dsn, contents)


# --- poison inputs and bad vectors ----------------------------------------------------------


async def test_one_rejected_input_fails_alone_and_the_rest_are_written(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 20)
    server.reject_inputs = {contents[7]}
    with capture_logs() as logs:
        summary = await run_worker(db, server, worker_config(batch_size=20))

    rows = queue_rows(dsn)
    assert rows["7"]["status"] == "failed"
    assert "HTTP 400" in rows["7"]["error_message"]
    assert "maximum context length" in rows["7"]["error_message"]
    assert status_counts(dsn) == {"done": 19, "failed": 1}
    assert vector_rows(dsn)[7] is None
    assert_vectors(dsn, contents, [i for i in contents if i != 7])
    assert (summary.processed, summary.failed) == (19, 1)
    failed = [e for e in logs if e["event"] == "item_failed"]
    assert [e["record_id"] for e in failed] == ["7"]


async def test_wrong_dims_nan_and_missing_vectors_fail_only_their_items(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 12)
    server.wrong_dims_for = {contents[3]}
    server.nan_for = {contents[5]}
    server.drop_vector_for = {contents[9]}
    summary = await run_worker(db, server, worker_config(batch_size=12))

    rows = queue_rows(dsn)
    assert rows["3"]["status"] == "failed"
    assert "9 dimensions" in rows["3"]["error_message"]
    assert rows["5"]["status"] == "failed"
    assert "non-finite" in rows["5"]["error_message"]
    assert rows["9"]["status"] == "failed"
    assert "no vector" in rows["9"]["error_message"]
    assert status_counts(dsn) == {"done": 9, "failed": 3}
    stored = vector_rows(dsn)
    assert [stored[3], stored[5], stored[9]] == [None, None, None]
    assert_vectors(dsn, contents, [i for i in contents if i not in (3, 5, 9)])
    assert (summary.processed, summary.failed) == (9, 3)


async def test_model_dimension_not_matching_the_column_fails_with_a_dimension_message(
    dsn: str, db: Database
) -> None:
    make_docs(dsn, 4)  # vector(8)
    with FakeOpenAIServer(dims=16) as wide:
        summary = await run_worker(db, wide, worker_config(batch_size=10))
    rows = queue_rows(dsn)
    assert {r["status"] for r in rows.values()} == {"failed"}
    for row in rows.values():
        assert "16 dimensions" in row["error_message"]
        assert "holds 8" in row["error_message"]
    assert all(v is None for v in vector_rows(dsn).values())
    assert summary.failed == 4


HOSTILE: list[tuple[str, str, str, str]] = [
    # (table_name, record_id, embedding_column, expected message)
    ("nope", "1", "embedding", "unregistered target"),
    ("pg_authid", "10", "rolpassword", "unregistered target"),
    ("public.docs", "1", "embedding", "unregistered target"),
    ('docs"; DROP TABLE docs; --', "1", "embedding", "unregistered target"),
    ("docs' OR '1'='1", "1", "embedding", "unregistered target"),
    ("docs", "2", "body", "unregistered target"),
    ("docs", "3", 'embedding" = NULL; DROP TABLE docs; --', "unregistered target"),
    ("docs", "1'; DROP TABLE docs; --", "embedding", "is not a valid bigint key"),
    ("docs", "1 OR 1=1", "embedding", "is not a valid bigint key"),
    ("docs", "abc", "embedding", "is not a valid bigint key"),
    ("docs", "99999999999999999999", "embedding", "out of range"),
]


async def test_hostile_queue_rows_fail_and_change_nothing_else(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 3)

    def snapshot() -> dict[str, Any]:
        return {
            "authid": execute(dsn, "SELECT rolname, rolpassword FROM pg_authid ORDER BY rolname"),
            "targets": execute(dsn, "SELECT * FROM embedding_targets"),
            "tables": execute(
                dsn,
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
            ),
            "docs": execute(dsn, "SELECT id, body FROM docs ORDER BY id"),
        }

    before = snapshot()
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content) "
        "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])",
        (
            [h[0] for h in HOSTILE],
            [h[1] for h in HOSTILE],
            [h[2] for h in HOSTILE],
            ["hostile content"] * len(HOSTILE),
        ),
    )
    summary = await run_worker(db, server, worker_config(batch_size=50))

    rows = execute(dsn, "SELECT * FROM embedding_queue ORDER BY id")
    by_key = {(r["table_name"], r["record_id"], r["embedding_column"]): r for r in rows}
    for table_name, record_id, column, message in HOSTILE:
        row = by_key[(table_name, record_id, column)]
        assert row["status"] == "failed", row
        assert message in row["error_message"], row
    assert summary.failed == len(HOSTILE)
    assert summary.processed == 3
    assert snapshot() == before
    assert_vectors(dsn, contents)
    assert "hostile content" not in server.input_counts


async def test_deleted_source_row_ends_done_with_a_detail(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 5)
    execute(dsn, "ALTER TABLE docs DISABLE TRIGGER USER")
    execute(dsn, "DELETE FROM docs WHERE id = 2")
    execute(dsn, "ALTER TABLE docs ENABLE TRIGGER USER")
    summary = await run_worker(db, server)

    rows = queue_rows(dsn)
    assert rows["2"]["status"] == "done"
    assert rows["2"]["detail"] == "source row not found; nothing written"
    assert {rows[k]["detail"] for k in ("1", "3", "4", "5")} == {None}
    assert status_counts(dsn) == {"done": 5}
    assert_vectors(dsn, contents, [1, 3, 4, 5])
    assert (summary.processed, summary.skipped, summary.failed) == (4, 1, 0)


async def test_blank_or_null_content_inserted_by_hand_fails_as_empty(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    create_table(dsn)
    register(dsn)
    execute(dsn, "ALTER TABLE docs DISABLE TRIGGER USER")
    insert_rows(dsn, [(1, "one"), (2, "two"), (3, "three")])
    execute(dsn, "ALTER TABLE docs ENABLE TRIGGER USER")
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content) VALUES "
        "('docs', '1', 'embedding', NULL), ('docs', '2', 'embedding', E' \\n\\t '), "
        "('docs', '3', 'embedding', 'three')",
    )
    summary = await run_worker(db, server)

    rows = queue_rows(dsn)
    for record_id in ("1", "2"):
        assert rows[record_id]["status"] == "failed"
        assert "empty" in rows[record_id]["error_message"]
    assert rows["3"]["status"] == "done"
    assert dict(server.input_counts) == {"three": 1}
    assert (summary.processed, summary.failed) == (1, 2)


# --- provider errors ------------------------------------------------------------------------


async def test_401_stops_the_worker_and_gives_the_claims_back(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 10)
    secret = "sk-wrong-SECRET-key-0123456789"
    server.required_api_key = "sk-the-right-key"
    with capture_logs() as logs, pytest.raises(ConfigurationError) as info:
        await run_worker(db, server, worker_config(batch_size=5), api_key=secret)

    assert "API key" in str(info.value)
    assert secret not in str(info.value)
    assert secret not in repr(logs)
    rows = queue_rows(dsn)
    assert {r["status"] for r in rows.values()} == {"pending"}
    assert {r["attempts"] for r in rows.values()} == {0}
    assert {r["claim_token"] for r in rows.values()} == {None}
    assert server.requests_by_status[401] >= 1
    assert not server.input_counts


async def test_unknown_model_stops_the_worker(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 3)
    server.known_models = {MODEL}
    with pytest.raises(ConfigurationError, match="no-such-model"):
        await run_worker(db, server, model="no-such-model")
    rows = queue_rows(dsn)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("pending", 0)}


async def test_persistent_500_sends_items_back_to_pending_with_backoff(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 5)
    server.configure(fault_rate=1.0, faults=["500"])
    with capture_logs() as logs:
        summary = await run_worker(
            db, server, worker_config(batch_size=5, retry_base_seconds=60), max_retries=2
        )

    rows = execute(
        dsn,
        "SELECT status, attempts, error_message, next_attempt_at > now() AS later "
        "FROM embedding_queue",
    )
    assert len(rows) == 5
    for row in rows:
        assert row["status"] == "pending"
        assert row["attempts"] == 1
        assert row["later"] is True
        assert "HTTP 500" in row["error_message"]
    assert server.requests_by_status[500] == 2  # the provider's in-call retries
    assert summary.retried == 5
    assert summary.failed == 0
    assert [e["retried"] for e in logs if e["event"] == "batch_retry"] == [5]


async def test_persistent_500_on_the_last_attempt_fails_with_the_last_error(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 5)
    server.configure(fault_rate=1.0, faults=["500"])
    summary = await run_worker(db, server, worker_config(batch_size=5, max_attempts=1))
    rows = queue_rows(dsn)
    assert {r["status"] for r in rows.values()} == {"failed"}
    for row in rows.values():
        assert "HTTP 500" in row["error_message"]
        assert "gave up after 2 attempts" in row["error_message"]
    assert summary.failed == 5


async def test_429_retry_after_is_honoured_when_in_call_retries_are_spent(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 3)
    server.fail_next(429, n=1, retry_after=120)
    summary = await run_worker(
        db, server, worker_config(batch_size=5, retry_base_seconds=1), max_retries=1
    )
    rows = execute(
        dsn,
        "SELECT status, attempts, error_message, "
        "next_attempt_at >= updated_at + interval '120 seconds' AS honoured "
        "FROM embedding_queue",
    )
    for row in rows:
        assert row["status"] == "pending"
        assert row["attempts"] == 1
        assert row["honoured"] is True
        assert "429" in row["error_message"]
    assert server.requests_by_status[429] == 1
    assert server.requests_total == 1
    assert summary.retried == 3


# --- the loop -------------------------------------------------------------------------------


async def test_once_processes_a_single_batch(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 30)
    summary = await run_worker(db, server, worker_config(batch_size=10), mode="once")
    assert status_counts(dsn) == {"done": 10, "pending": 20}
    assert_vectors(dsn, contents, range(1, 11))
    assert server.requests_total == 1
    assert (summary.batches, summary.processed) == (1, 10)


async def test_delay_pauses_between_batches_and_stop_interrupts_it(
    dsn: str, server: FakeOpenAIServer, start: Starter
) -> None:
    make_docs(dsn, 30)
    running = await start(worker_config(batch_size=10, delay_ms=60_000))
    await wait_for_status(dsn, "done", 10)
    await anyio.sleep(0.5)  # without the delay, the next batch would be claimed by now
    assert status_counts(dsn) == {"done": 10, "pending": 20}
    assert server.requests_total == 1
    running.worker.stop()
    summary = await running.wait(timeout_s=10)  # far less than the 60 s delay
    assert (summary.batches, summary.processed) == (1, 10)
    assert status_counts(dsn) == {"done": 10, "pending": 20}


async def test_concurrency_three_processes_everything_once(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 90)
    server.latency_s = 0.3
    summary = await run_worker(db, server, worker_config(batch_size=10, concurrency=3))
    assert status_counts(dsn) == {"done": 90}
    assert_vectors(dsn, contents)
    assert set(server.input_counts.values()) == {1}
    assert len(server.input_counts) == 90
    assert summary.batches == 9
    assert summary.processed == 90
    assert server.max_in_flight >= 2  # batches overlapped


async def test_claims_stay_bounded_when_writes_are_slower_than_embedding(
    dsn: str, server: FakeOpenAIServer, start: Starter
) -> None:
    """The next batch is claimed and embedded while one is written, but finished batches never
    pile up behind a slow write: at most concurrency batches embed and as many write."""
    contents = make_docs(dsn, 120)
    execute(
        dsn,
        "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.15); RETURN NULL; END $$",
    )
    execute(
        dsn,
        "CREATE TRIGGER slow_write AFTER UPDATE ON docs "
        "FOR EACH STATEMENT EXECUTE FUNCTION slow_write()",
    )
    running = await start(worker_config(batch_size=10, concurrency=1))
    most_claimed = 0
    while status_counts(dsn).get("done", 0) < 120:
        rows = await aexecute(
            dsn, "SELECT count(*) AS n FROM embedding_queue WHERE status = 'processing'"
        )
        most_claimed = max(most_claimed, int(rows[0]["n"]))
        await anyio.sleep(0.02)
    running.worker.stop()
    await running.wait(timeout_s=10)
    assert_vectors(dsn, contents)
    assert 10 < most_claimed <= 20  # overlapped, and bounded by 2 x batch x concurrency


async def test_continuous_mode_wakes_on_notify(dsn: str, start: Starter) -> None:
    make_docs(dsn, 0)
    running = await start(worker_config(poll_interval_seconds=30), "continuous")

    async def listening() -> bool:
        rows = await aexecute(
            dsn,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND query ILIKE 'LISTEN%%' AND state = 'idle'",
        )
        return bool(rows)

    await eventually(listening, timeout_s=10, every_s=0.05)
    await anyio.sleep(0.5)  # let the worker settle into its 30 s idle wait
    await aexecute(dsn, "INSERT INTO docs (id, body) VALUES (1, 'wake up')")
    # Liveness bound well under the 30 s poll interval: only NOTIFY can wake it this soon.
    await wait_for_status(dsn, "done", 1, timeout_s=10)
    np.testing.assert_array_equal(vector_rows(dsn)[1], fake_vector("wake up", DIMS))
    running.worker.stop()
    summary = await running.wait(timeout_s=10)
    assert summary.processed == 1


async def test_lease_renewal_keeps_a_slow_batch_from_being_reclaimed(
    dsn: str, db: Database, server: FakeOpenAIServer, start: Starter
) -> None:
    contents = make_docs(dsn, 5)
    server.latency_s = 2.5
    running = await start(worker_config(batch_size=5, lease_seconds=1, owner="slow"))
    await in_flight(server)
    await anyio.sleep(1.5)  # past the original 1 s lease
    renewed = await aexecute(
        dsn,
        "SELECT count(*) AS n FROM embedding_queue "
        "WHERE status = 'processing' AND claimed_by = 'slow' AND lease_expires_at > now()",
    )
    assert renewed[0]["n"] == 5
    other = await run_worker(db, server, worker_config(owner="thief"))
    assert (other.reclaimed, other.processed, other.batches) == (0, 0, 0)
    summary = await running.wait()

    assert status_counts(dsn) == {"done": 5}
    assert_vectors(dsn, contents)
    assert set(server.input_counts.values()) == {1}
    assert server.requests_total == 1
    assert (summary.processed, summary.lost, summary.reclaimed) == (5, 0, 0)


async def test_stop_lets_the_in_flight_batch_finish(
    dsn: str, server: FakeOpenAIServer, start: Starter
) -> None:
    contents = make_docs(dsn, 20)
    server.latency_s = 1.0
    with capture_logs() as logs:
        running = await start(worker_config(batch_size=10), "continuous")
        await in_flight(server)
        running.worker.stop()
        summary = await running.wait()

    assert status_counts(dsn) == {"done": 10, "pending": 10}
    assert_vectors(dsn, contents, range(1, 11))
    assert (summary.processed, summary.released) == (10, 0)
    assert any(e["event"] == "worker_stopping" for e in logs)


async def test_stop_with_no_grace_releases_the_claims(
    dsn: str, server: FakeOpenAIServer, start: Starter
) -> None:
    make_docs(dsn, 10)
    server.latency_s = 5.0
    with capture_logs() as logs:
        running = await start(worker_config(batch_size=10, shutdown_grace_seconds=0), "continuous")
        await in_flight(server)
        running.worker.stop()
        summary = await running.wait()

    rows = queue_rows(dsn)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("pending", 0)}
    assert {r["claim_token"] for r in rows.values()} == {None}
    assert all(v is None for v in vector_rows(dsn).values())
    assert (summary.released, summary.processed) == (10, 0)
    assert [e["items"] for e in logs if e["event"] == "claims_released"] == [10]


async def test_drain_survives_losing_its_database_connections(
    dsn: str, server: FakeOpenAIServer, start: Starter
) -> None:
    contents = make_docs(dsn, 120)
    # A slow statement trigger keeps each batch's write transaction open long enough to be
    # killed in the middle of it.
    execute(
        dsn,
        "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$; "
        "CREATE TRIGGER slow_write AFTER UPDATE ON docs "
        "FOR EACH STATEMENT EXECUTE FUNCTION slow_write()",
    )
    killed_writes = 0
    with capture_logs() as logs:
        async with Database(dsn, application_name="qp-victim", max_size=4) as victim_db:
            running = await start(worker_config(batch_size=20), "drain", database=victim_db)
            for _ in range(3):
                with anyio.fail_after(20):
                    while True:
                        rows = await aexecute(
                            dsn,
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n "
                            "FROM pg_stat_activity WHERE application_name = 'qp-victim' "
                            "AND state = 'active' AND query LIKE '%%UPDATE %%docs%%'",
                        )
                        if rows[0]["n"]:
                            break
                        await anyio.sleep(0.02)
                killed_writes += 1
                # Kill the idle pooled connections too: the pool must replace them.
                await aexecute(
                    dsn,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'qp-victim'",
                )
            summary = await running.wait()

    assert killed_writes == 3
    assert len([e for e in logs if e["event"] == "database_retry"]) >= 3
    assert status_counts(dsn) == {"done": 120}
    assert_vectors(dsn, contents)
    assert summary.failed == 0


async def wait_for_status(dsn: str, status: str, count: int, *, timeout_s: float = 20) -> None:
    """Wait until ``count`` queue rows have ``status`` (a liveness bound)."""
    with anyio.fail_after(timeout_s):
        while True:
            rows = await aexecute(
                dsn, "SELECT count(*) AS n FROM embedding_queue WHERE status = %s", (status,)
            )
            if rows[0]["n"] >= count:
                return
            await anyio.sleep(0.05)
