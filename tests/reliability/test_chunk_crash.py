"""Chunked targets under kill -9 and concurrent edits: worker processes are killed mid-batch
while every record is being re-chunked after an edit, and records are edited again while
their chunks are claimed.

What could go wrong, and how it would show:
- a set replaced in two steps (old chunks deleted, then the new ones inserted, committed
  apart), or a killed worker's half-written set -> a snapshot of the chunks table holds a
  record whose chunk texts are neither all of one version's set nor all of another's;
- a stale claim writing after an edit -> a record ends with a set of an older version;
- a claim of a killed worker never coming back -> records not done.
Snapshots of the chunks table are taken throughout (each one statement: one MVCC snapshot).
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from queue_processor.providers.tokens import openai_tokenizer
from queue_processor.testing import fake_vector
from queue_processor.worker.splitter import split
from tests.reliability.harness import (
    ChaosServer,
    WorkerProcess,
    Workers,
    counts,
    held_by,
    report,
    unfinished,
    wait_for,
    worker_env,
)
from tests.support.helpers import DIMS, connect, create_table, execute, insert_rows

OPENAI_MODEL = "text-embedding-3-small"
ROWS = 300
WORKERS = 3
KILLS = 4
CHUNK_TOKENS = 32
OVERLAP = 4


def version(i: int, v: int) -> str:
    """Record i's text at version v; versions differ in length, so in chunk count."""
    sentences = 6 + (i + v) % 7
    return " ".join(
        f"Record {i} version {v} sentence {s} on topic {i * v + s}." for s in range(sentences)
    )


def chunks_of(text: str) -> tuple[str, ...]:
    tokenizer = openai_tokenizer(OPENAI_MODEL)
    return tuple(split(text, tokenizer, size=CHUNK_TOKENS, overlap=OVERLAP, max_chunks=100).texts)


@pytest.fixture
def chaos() -> Iterator[ChaosServer]:
    with ChaosServer(dims=DIMS, seed=14, max_input_tokens=CHUNK_TOKENS + 8) as srv:
        yield srv


def snapshot(dsn: str) -> dict[int, tuple[str, ...]]:
    rows = execute(
        dsn,
        "SELECT record_id, array_agg(chunk_text ORDER BY chunk_index) AS texts,"
        " array_agg(chunk_index ORDER BY chunk_index) AS idx FROM docs_body_chunks GROUP BY 1",
    )
    for r in rows:
        assert r["idx"] == list(range(len(r["idx"]))), f"record {r['record_id']}: gaps {r['idx']}"
    return {r["record_id"]: tuple(r["texts"]) for r in rows}


@pytest.mark.slow
def test_kill_9_and_edits_never_leave_a_partial_or_stale_chunk_set(
    dsn: str, chaos: ChaosServer, workers: Workers
) -> None:
    chaos.latency_s = 0.2  # batches are mid-flight most of the time
    create_table(dsn)
    execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
        " p_dimensions => %s, p_chunk_tokens => %s, p_chunk_overlap => %s)",
        (DIMS, CHUNK_TOKENS, OVERLAP),
    )
    current = {i: version(i, 0) for i in range(1, ROWS + 1)}
    # Every set a record may show: any version's (the test only ever moves forward).
    allowed: dict[int, set[tuple[str, ...]]] = {i: {chunks_of(t)} for i, t in current.items()}
    insert_rows(dsn, current.items())
    env = worker_env(
        dsn,
        chaos,
        EMBEDDING_MODEL=OPENAI_MODEL,
        QUEUE_PROCESSOR_LEASE_SECONDS=2,
        QUEUE_PROCESSOR_BATCH_SIZE=8,
        QUEUE_PROCESSOR_CONCURRENCY=1,
        QUEUE_PROCESSOR_MAX_ATTEMPTS=20,
        QUEUE_PROCESSOR_SHUTDOWN_GRACE_SECONDS=10,
    )
    running: dict[int, WorkerProcess] = {}
    starts = 0

    def start(slot: int) -> None:
        nonlocal starts
        starts += 1
        running[slot] = workers.start(f"chunks-w{slot}-{starts}", env)

    def check(snap: dict[int, tuple[str, ...]]) -> None:
        bad = {i: s for i, s in snap.items() if s not in allowed[i]}
        assert bad == {}, f"{len(bad)} record(s) hold a partial or unknown chunk set"

    for slot in range(WORKERS):
        start(slot)
    rng = random.Random(14)
    kills = edits = snapshots = 0
    with connect(dsn) as conn:
        for round_ in range(1, KILLS + 1):
            # Edit a third of the records (a new version each), the records a live worker
            # has claimed at this moment among them: its claim goes stale mid-batch.
            def live_claims() -> dict[int, list[int]]:
                return {s: held_by(dsn, w.name) for s, w in running.items()}

            wait_for(
                lambda: any(live_claims().values()),
                timeout_s=30,
                what="a worker to hold a claim",
                every_s=0.005,
                watch=running.values(),
            )
            held = live_claims()
            editor_slot = next(s for s, ids in held.items() if ids)
            claimed = [
                int(r["record_id"])
                for r in execute(
                    dsn,
                    "SELECT record_id FROM embedding_queue WHERE id = ANY(%s)",
                    (held[editor_slot],),
                )
            ]
            others = sorted(set(current) - set(claimed))
            ids = claimed + rng.sample(others, k=ROWS // 3 - len(claimed))
            for i in ids:
                current[i] = version(i, round_)
                allowed[i].add(chunks_of(current[i]))
            conn.execute(
                "UPDATE docs SET body = u.body FROM unnest(%s::bigint[], %s::text[]) AS u(id, body)"
                " WHERE docs.id = u.id",
                (ids, [current[i] for i in ids]),
            )
            edits += len(ids)
            # Strike mid-batch: another worker holding a claim (the editor's claim is left to
            # go stale), or the editor if it is the only one.
            wait_for(
                lambda: any(live_claims().values()),
                timeout_s=30,
                what="a worker to hold a claim",
                every_s=0.005,
                watch=running.values(),
            )
            held = live_claims()
            holders = [s for s, ids in held.items() if ids]
            slot = next((s for s in holders if s != editor_slot), holders[0])
            victim = running[slot]
            time.sleep(rng.uniform(0, 0.05))
            assert victim.kill9() == -signal.SIGKILL
            kills += 1
            for _ in range(5):
                check(snapshot(dsn))
                snapshots += 1
            start(slot)

    def drained() -> bool:
        check(snapshot(dsn))
        return unfinished(dsn) == 0

    wait_for(drained, timeout_s=180, what="the queue to drain", every_s=0.1, watch=running.values())
    assert [w.stop() for w in running.values()] == [0] * WORKERS, [
        w.tail() for w in running.values()
    ]
    assert counts(dsn) == {"done": ROWS}
    # Every record ends with its current version's complete set, each vector that chunk's.
    final = snapshot(dsn)
    assert final == {i: chunks_of(t) for i, t in current.items()}
    for r in execute(dsn, "SELECT chunk_text, embedding::real[] AS v FROM docs_body_chunks"):
        np.testing.assert_array_equal(
            np.array(r["v"], dtype=np.float32), fake_vector(r["chunk_text"], DIMS)
        )
    reclaimed = execute(dsn, "SELECT count(*) AS n FROM embedding_queue WHERE attempts > 1")[0]["n"]
    assert reclaimed >= 1
    superseded = sum(
        e.get("items", 0) for w in workers.started for e in w.events("claims_superseded")
    )
    report(
        "chunk_crash",
        rows=ROWS,
        kills=kills,
        edits=edits,
        snapshots_checked=snapshots,
        chunks=sum(len(s) for s in final.values()),
        rows_reclaimed=reclaimed,
        stale_claims_refused=superseded,
        partial_sets_seen=0,
    )
