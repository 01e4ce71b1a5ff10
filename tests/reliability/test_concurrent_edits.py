"""Concurrent edits: 1,000 updates to 200 rows land while three worker processes embed them,
so content changes arrive while earlier versions are claimed, at the provider, or being
written.

Whatever the interleaving, once the queue is drained every row must hold the embedding of its
final content (recomputed by asking the fake server itself), and the last write of every row
must be of that content: an older version never overwrites a newer one.
"""

from __future__ import annotations

import random
import time

import httpx
import numpy as np
import psycopg
import pytest

from queue_processor.testing import fake_vectors
from tests.reliability.harness import (
    ChaosServer,
    Workers,
    assert_embeddings_are_of,
    counts,
    install_write_audit,
    report,
    unfinished,
    wait_for,
    worker_env,
)
from tests.support.helpers import DIMS, MODEL, connect, execute, make_docs

ROWS = 200
UPDATES = 1_000
WORKERS = 3


def version(i: int, n: int) -> str:
    return f"row {i}, version {n}: edited while being embedded"


@pytest.mark.slow
def test_every_row_ends_with_the_embedding_of_its_final_content(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    final = make_docs(dsn, ROWS)
    install_write_audit(dsn)
    fake.latency_s = 0.02
    env = worker_env(dsn, fake, QUEUE_PROCESSOR_BATCH_SIZE=10, QUEUE_PROCESSOR_CONCURRENCY=2)
    running = [workers.start(f"edits-w{n}", env) for n in range(WORKERS)]
    wait_for(lambda: counts(dsn)["done"] > 0, timeout_s=30, what="workers to start", watch=running)

    rng = random.Random(1000)
    updates = statements = deadlocks = 0
    versions = dict.fromkeys(final, 0)
    with connect(dsn) as conn:
        while updates < UPDATES:
            # Mostly single-row edits, some multi-row statements and transactions.
            ids = rng.sample(sorted(final), k=min(rng.choice((1, 1, 1, 2, 5)), UPDATES - updates))
            new = {i: version(i, versions[i] + 1) for i in ids}
            try:
                with conn.transaction():
                    conn.execute(
                        "UPDATE docs SET body = u.body FROM unnest(%s::bigint[], %s::text[])"
                        " AS u(id, body) WHERE docs.id = u.id",
                        (list(new), list(new.values())),
                    )
            except psycopg.errors.DeadlockDetected:
                deadlocks += 1
                continue
            for i, text in new.items():
                versions[i] += 1
                final[i] = text
            updates += len(new)
            statements += 1
            time.sleep(rng.uniform(0, 0.006))
    edited_at_drain = unfinished(dsn)

    wait_for(
        lambda: unfinished(dsn) == 0,
        timeout_s=120,
        what="the queue to drain",
        every_s=0.1,
        watch=running,
    )
    assert [w.stop() for w in running] == [0] * WORKERS, [w.tail() for w in running]
    stats = fake.stats()

    assert counts(dsn) == {"done": ROWS}
    assert_embeddings_are_of(dsn, final)
    # Recompute at the fake server itself: what it answers now for each final content.
    ids = sorted(final)
    answer = httpx.post(
        f"{fake.base_url}/embeddings",
        json={"model": MODEL, "input": [final[i] for i in ids]},
        timeout=30,
    ).json()
    recomputed = np.array([item["embedding"] for item in answer["data"]], dtype=np.float32)
    assert np.array_equal(recomputed, fake_vectors([final[i] for i in ids], DIMS))
    stored = execute(dsn, "SELECT id, embedding::real[] AS v FROM docs ORDER BY id")
    assert np.array_equal(np.array([r["v"] for r in stored], dtype=np.float32), recomputed)
    # The last write of every row is of its final content (no older version landed later).
    last = execute(
        dsn,
        "SELECT DISTINCT ON (id) id, embedding FROM embedding_writes ORDER BY id, seq DESC",
    )
    last_vectors = np.array([r["embedding"] for r in last], dtype=np.float32)
    assert [r["id"] for r in last] == ids
    assert np.array_equal(last_vectors, recomputed)
    writes = execute(dsn, "SELECT count(*) AS n FROM embedding_writes")[0]["n"]
    superseded = sum(e.get("items", 0) for w in running for e in w.events("claims_superseded"))
    # Each final content reached the provider.
    sent = stats["input_counts"]
    assert all(sent.get(final[i], 0) >= 1 for i in ids)

    report(
        "concurrent_edits",
        rows=ROWS,
        updates=updates,
        update_statements=statements,
        workers=WORKERS,
        rows_pending_when_edits_stopped=edited_at_drain,
        vector_writes=writes,
        stale_claims_refused=superseded,
        texts_embedded=sum(sent.values()),
        deadlocks_retried=deadlocks,
        stale_final_vectors=0,
    )
