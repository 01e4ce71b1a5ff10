"""The claim statement: batch size, ownership, SKIP LOCKED, due time, lease expiry, index use."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import ClientCursor

from queue_processor import queue
from queue_processor.db import Database, statement
from queue_processor.models import MAX_CLAIM_BYTES, MAX_CONTENT_CHARS, QueueId
from tests.support.helpers import connect, execute, make_docs, queue_rows, status_counts

pytestmark = pytest.mark.anyio


async def claim(
    db: Database, owner: str = "worker-a", limit: int = 10, **kw: Any
) -> queue.ClaimResult:
    kw.setdefault("lease_seconds", 300.0)
    kw.setdefault("max_attempts", 3)
    return await queue.claim_batch(db, owner=owner, limit=limit, **kw)


def expire_leases(dsn: str, ids: list[QueueId] | None = None) -> None:
    """Make processing rows' leases lapse (as if their worker stalled or died)."""
    execute(
        dsn,
        "UPDATE embedding_queue SET lease_expires_at = now() - interval '1 second' "
        "WHERE status = 'processing' AND (%s::bigint[] IS NULL OR id = ANY(%s::bigint[]))",
        (ids, ids),
    )


async def test_claims_at_most_batch_size_and_marks_ownership(dsn: str, db: Database) -> None:
    make_docs(dsn, 10)
    result = await claim(db, limit=4, lease_seconds=300)

    items = result.claim.items
    assert len(items) == 4
    assert result.reclaimed == 0
    assert result.exhausted == ()
    assert [i.record_id for i in items] == ["1", "2", "3", "4"]  # oldest first
    assert result.claim.owner == "worker-a"
    rows = queue_rows(dsn)
    for item in items:
        row = rows[item.record_id]
        assert row["status"] == "processing"
        assert row["claimed_by"] == "worker-a"
        assert row["claim_token"] == result.claim.token
        assert row["attempts"] == 1
        assert item.content == row["content"]
    # The lease is computed by the database: now() + lease_seconds at claim time.
    leases = execute(
        dsn,
        "SELECT lease_expires_at - updated_at AS lease FROM embedding_queue "
        "WHERE status = 'processing'",
    )
    assert {r["lease"].total_seconds() for r in leases} == {300.0}
    assert status_counts(dsn) == {"processing": 4, "pending": 6}


async def test_claim_of_empty_queue_returns_nothing(dsn: str, db: Database) -> None:
    make_docs(dsn, 0)
    result = await claim(db)
    assert result.claim.items == ()
    assert result.reclaimed == 0


async def test_skip_locked_second_claim_skips_rows_locked_by_an_open_claim(
    dsn: str, db: Database
) -> None:
    """A claim still inside its transaction holds row locks; another claim takes other rows
    instead of waiting (without SKIP LOCKED it would block until the first commits)."""
    make_docs(dsn, 6)
    params = {
        "limit": 3,
        "owner": "slow",
        "token": uuid.uuid4(),
        "lease_seconds": 300.0,
        "max_attempts": 3,
        "max_content_chars": MAX_CONTENT_CHARS,
        "max_claim_bytes": MAX_CLAIM_BYTES,
        "models": None,
    }
    async with await psycopg.AsyncConnection.connect(dsn) as held:
        cur = await held.execute(statement("claim_batch", qs="public"), params)
        first = {int(r[0]) for r in await cur.fetchall()}
        with anyio.fail_after(10):
            second = await claim(db, owner="fast", limit=10)
        await held.commit()
    second_ids = {int(i.id) for i in second.claim.items}
    assert len(first) == 3
    assert len(second_ids) == 3
    assert first.isdisjoint(second_ids)
    owners = {r["id"]: r["claimed_by"] for r in queue_rows(dsn).values()}
    assert {owners[i] for i in first} == {"slow"}
    assert {owners[i] for i in second_ids} == {"fast"}


async def test_concurrent_claimers_never_share_a_row(dsn: str) -> None:
    make_docs(dsn, 400)
    claimed: dict[str, list[int]] = {}

    async def claimer(name: str) -> None:
        async with Database(dsn, min_size=1, max_size=1) as own:
            mine = claimed.setdefault(name, [])
            while True:
                result = await claim(own, owner=name, limit=7)
                if not result.claim.items:
                    return
                mine.extend(int(i.id) for i in result.claim.items)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(claimer, f"claimer-{n}")

    every = [i for ids in claimed.values() for i in ids]
    assert len(every) == 400
    assert len(set(every)) == 400
    rows = execute(dsn, "SELECT id, claimed_by, attempts FROM embedding_queue")
    by_id = {r["id"]: r for r in rows}
    for name, ids in claimed.items():
        assert all(by_id[i]["claimed_by"] == name for i in ids)
    assert {r["attempts"] for r in rows} == {1}
    assert status_counts(dsn) == {"processing": 400}


async def test_rows_not_yet_due_are_not_claimed(dsn: str, db: Database) -> None:
    make_docs(dsn, 4)
    execute(
        dsn,
        "UPDATE embedding_queue SET next_attempt_at = now() + interval '1 hour' "
        "WHERE record_id IN ('2', '4')",
    )
    result = await claim(db)
    assert sorted(i.record_id for i in result.claim.items) == ["1", "3"]
    assert (await claim(db)).claim.items == ()
    rows = queue_rows(dsn)
    for record_id in ("2", "4"):
        assert rows[record_id]["status"] == "pending"
        assert rows[record_id]["attempts"] == 0
        assert rows[record_id]["claim_token"] is None
    # Once due, they are claimable.
    execute(dsn, "UPDATE embedding_queue SET next_attempt_at = now() WHERE status = 'pending'")
    assert sorted(i.record_id for i in (await claim(db)).claim.items) == ["2", "4"]


async def test_live_leases_are_not_reclaimed(dsn: str, db: Database) -> None:
    make_docs(dsn, 3)
    first = await claim(db, owner="worker-a", lease_seconds=300)
    assert len(first.claim.items) == 3
    second = await claim(db, owner="worker-b")
    assert second.claim.items == ()
    assert second.reclaimed == 0
    assert {r["claimed_by"] for r in queue_rows(dsn).values()} == {"worker-a"}


async def test_expired_lease_is_reclaimed_and_counted(dsn: str, db: Database) -> None:
    make_docs(dsn, 5)
    first = await claim(db, owner="worker-a", limit=3)
    stalled = [i.id for i in first.claim.items]
    expire_leases(dsn, stalled)

    second = await claim(db, owner="worker-b", limit=10)
    assert second.reclaimed == 3
    assert sorted(i.id for i in second.claim.items) == sorted(
        [
            *stalled,
            *(QueueId(int(r["id"])) for r in queue_rows(dsn).values() if int(r["record_id"]) > 3),
        ]
    )
    rows = {int(r["id"]): r for r in queue_rows(dsn).values()}
    for queue_id in stalled:
        row = rows[queue_id]
        assert row["status"] == "processing"
        assert row["claimed_by"] == "worker-b"
        assert row["claim_token"] == second.claim.token
        assert row["attempts"] == 2  # attempts count claims, so a stalling item runs out
    # The reclaimed items carry their new attempt count.
    assert {i.attempts for i in second.claim.items if i.id in stalled} == {2}


async def test_claim_respects_limit_across_expired_and_due_rows(dsn: str, db: Database) -> None:
    make_docs(dsn, 8)
    first = await claim(db, owner="worker-a", limit=3)
    expire_leases(dsn, [i.id for i in first.claim.items])
    second = await claim(db, owner="worker-b", limit=4)
    assert len(second.claim.items) == 4
    assert second.reclaimed == 3  # expired leases are taken first
    assert status_counts(dsn) == {"processing": 4, "pending": 4}


async def test_reclaimed_row_out_of_attempts_ends_failed(dsn: str, db: Database) -> None:
    make_docs(dsn, 2)
    # Row 1 has been claimed (and stalled) max_attempts times already; row 2 once.
    await claim(db, owner="worker-a", limit=2)
    execute(dsn, "UPDATE embedding_queue SET attempts = 3 WHERE record_id = '1'")
    expire_leases(dsn)

    result = await claim(db, owner="worker-b", limit=10, max_attempts=3)
    assert result.reclaimed == 2
    assert [i.record_id for i in result.exhausted] == ["1"]
    assert [i.record_id for i in result.claim.items] == ["2"]
    rows = queue_rows(dsn)
    assert rows["1"]["status"] == "failed"
    assert "lease expired" in rows["1"]["error_message"]
    assert rows["1"]["attempts"] == 3  # not counted again
    assert rows["2"]["status"] == "processing"
    assert rows["2"]["attempts"] == 2
    # A failed row is never claimed again.
    expire_leases(dsn)
    assert all(i.record_id != "1" for i in (await claim(db, owner="worker-c")).claim.items)


async def test_claim_uses_the_pending_index_not_a_table_scan(dsn: str, db: Database) -> None:
    make_docs(dsn, 0)
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content, status,"
        " processed_at) SELECT 'docs', g::text, 'embedding', 'done ' || g, 'done', now()"
        " FROM generate_series(1, 20000) AS g",
    )
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content)"
        " SELECT 'docs', g::text, 'embedding', 'pending ' || g"
        " FROM generate_series(20001, 20005) AS g",
    )
    execute(dsn, "ANALYZE embedding_queue")
    params = {
        "limit": 100,
        "owner": "explain",
        "token": uuid.uuid4(),
        "lease_seconds": 300.0,
        "max_attempts": 3,
        "max_content_chars": MAX_CONTENT_CHARS,
        "max_claim_bytes": MAX_CLAIM_BYTES,
        "models": None,
    }
    with connect(dsn) as conn:
        rendered = ClientCursor(conn).mogrify(statement("claim_batch", qs="public"), params)
        row = conn.execute("EXPLAIN (FORMAT JSON) " + rendered).fetchone()
    assert row is not None
    plan = next(iter(row.values()))[0]["Plan"]
    scans = [n for n in walk(plan) if n.get("Relation Name") == "embedding_queue"]
    assert scans, plan
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], scans
    assert "embedding_queue_pending_target_idx" in {n.get("Index Name") for n in scans}, scans
    # The plan is not just possible but right: the claim takes exactly the pending rows.
    result = await claim(db, limit=100)
    assert sorted(int(i.record_id) for i in result.claim.items) == list(range(20001, 20006))


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan tree."""
    nodes = [node]
    for child in node.get("Plans", []):
        nodes.extend(walk(child))
    return nodes
