"""Sizes are bounded where data enters the worker (issue 11, holes 5 and 6).

Anyone who can write a registered source text decides how large it is, and any role may
NOTIFY the queue's channel. The claim statement cuts each content to
``max_content_chars`` and stops taking rows at ``max_claim_bytes``; an idle worker scans the
empty queue at most once per ``min_rescan_seconds`` however many NOTIFYs arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import psycopg
import pytest
from structlog.testing import capture_logs

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.worker import Worker
from tests.support.helpers import (
    DIMS,
    eventually,
    execute,
    insert_rows,
    make_docs,
    make_provider,
    status_counts,
    vector_rows,
    worker_config,
)

pytestmark = pytest.mark.anyio

BIG_CHARS = 5_000_000


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def big_text(i: int) -> str:
    """A 5 MB text whose start differs per row."""
    return (f"document {i}: " + "x" * BIG_CHARS)[:BIG_CHARS]


async def claim(db: Database, **kw: Any) -> queue.ClaimResult:
    return await queue.claim_batch(
        db, owner="bounded", limit=50, lease_seconds=60, max_attempts=3, **kw
    )


async def test_claim_cuts_each_content_and_stops_at_the_byte_budget(dsn: str, db: Database) -> None:
    make_docs(dsn, 0)
    bigs = {i: big_text(i) for i in range(1, 5)}
    smalls = {i: f"small document {i}" for i in range(5, 11)}
    insert_rows(dsn, [*bigs.items(), *smalls.items()])

    # Each big row counts 4 x 1,000 bytes (its cut size, at most 4 bytes a character): a
    # 10,000-byte budget takes two of them, and a third would exceed it.
    with capture_logs() as logs:
        first = await claim(db, max_content_chars=1_000, max_claim_bytes=10_000)
    got = {int(i.record_id): i.content for i in first.claim.items}
    assert sorted(got) == [1, 2]
    for i, content in got.items():
        assert content == bigs[i][:1_000]
    capped = [e for e in logs if e["event"] == "content_capped"]
    assert sorted(int(e["record_id"]) for e in capped) == [1, 2]
    assert all(e["content_bytes"] == BIG_CHARS for e in capped)

    second = await claim(db, max_content_chars=1_000, max_claim_bytes=10_000)
    got = {int(i.record_id): i.content for i in second.claim.items}
    assert sorted(got) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert got[5] == smalls[5]

    # The whole text stays in the queue: only what the worker loads is cut.
    rows = execute(
        dsn, "SELECT octet_length(content) AS n FROM embedding_queue WHERE record_id = '1'"
    )
    assert rows[0]["n"] == BIG_CHARS


async def test_a_row_larger_than_the_budget_is_still_claimed_alone(dsn: str, db: Database) -> None:
    make_docs(dsn, 0)
    insert_rows(dsn, [(1, big_text(1)), (2, "small")])
    first = await claim(db, max_content_chars=BIG_CHARS, max_claim_bytes=1_000)
    assert [i.record_id for i in first.claim.items] == ["1"]
    assert first.claim.items[0].content == big_text(1)
    second = await claim(db, max_content_chars=BIG_CHARS, max_claim_bytes=1_000)
    assert [i.record_id for i in second.claim.items] == ["2"]


async def test_worker_embeds_the_cut_text_of_an_oversized_row(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 0)
    insert_rows(dsn, [(1, big_text(1)), (2, big_text(2)), (3, "short")])
    async with make_provider(server) as provider:
        worker = Worker(db, provider, worker_config(max_content_chars=2_000))
        with anyio.fail_after(60):
            summary = await worker.run("drain")
    assert summary.processed == 3
    assert status_counts(dsn) == {"done": 3}
    stored = vector_rows(dsn)
    np.testing.assert_array_equal(stored[1], fake_vector(big_text(1)[:2_000], DIMS))
    np.testing.assert_array_equal(stored[3], fake_vector("short", DIMS))
    # What went over the wire: the cut texts, never a 5 MB one.
    assert max(len(t) for t in server.input_counts) <= 2_000
    # The cut is on record in the items' detail, not only in a log line.
    details = {r["record_id"]: r["detail"] for r in execute(dsn, "SELECT * FROM embedding_queue")}
    cut = (
        f"content cut to its first 2,000 characters at claim "
        f"(QUEUE_PROCESSOR_MAX_CONTENT_CHARS: {BIG_CHARS:,} bytes stored)"
    )
    assert details == {"1": cut, "2": cut, "3": None}


async def test_a_notify_flood_costs_at_most_one_scan_per_floor(
    dsn: str, db: Database, server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_docs(dsn, 0)
    scans: list[float] = []
    real_claim = queue.claim_batch

    async def counting_claim(*args: Any, **kwargs: Any) -> queue.ClaimResult:
        scans.append(time.monotonic())
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(queue, "claim_batch", counting_claim)
    floor_s = 0.5
    config = worker_config(poll_interval_seconds=30, min_rescan_seconds=floor_s)
    async with make_provider(server) as provider, anyio.create_task_group() as tg:
        worker = Worker(db, provider, config)
        tg.start_soon(worker.run, "continuous")
        await eventually(lambda: len(scans) >= 1, timeout_s=10)
        await eventually(lambda: _listening(dsn), timeout_s=10, every_s=0.05)

        # Any role may NOTIFY: 3,000 of them, in many transactions, as fast as they go.
        started = time.monotonic()
        before = len(scans)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for _ in range(3_000):
                await conn.execute("NOTIFY embedding_queue")
        await anyio.sleep(floor_s)
        elapsed = time.monotonic() - started
        flood_scans = len(scans) - before
        # The bound follows from the floor and the time the flood lasted, however fast or
        # slow the machine was: one scan per floor period, plus the one in progress.
        assert flood_scans <= elapsed / floor_s + 2, (flood_scans, elapsed)

        # Real work is still found at once after the flood.
        execute(dsn, "INSERT INTO docs (id, body) VALUES (1, 'after the flood')")
        await eventually(lambda: status_counts(dsn) == {"done": 1}, timeout_s=20)
        worker.stop()
    np.testing.assert_array_equal(vector_rows(dsn)[1], fake_vector("after the flood", DIMS))


def _listening(dsn: str) -> bool:
    rows = execute(
        dsn,
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
        "AND query ILIKE 'LISTEN%%' AND state = 'idle'",
    )
    return bool(rows)
