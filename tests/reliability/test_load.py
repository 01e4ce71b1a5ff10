"""Load: 200,000 rows inserted by one statement (their keys wait in the bulk-insert inbox;
half is expanded up front, the workers expand the rest as they claim) drained by four worker
processes (batches of 1,000, an instant fake provider, 8-dimensional vectors).

Asserted: the drain completes, every row holds the vector of its content, and afterwards, with
200,000 done rows in the table, the claim query still reads pending rows through the partial
index rather than scanning the table. Printed, not asserted (speed and memory are measured by
scripts/benchmark.py): each worker's peak RSS (VmHWM) and its RSS as the drain progresses,
which should stay flat.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from psycopg import ClientCursor

from queue_processor.db import statement
from queue_processor.models import MAX_CLAIM_BYTES, MAX_CONTENT_CHARS
from tests.reliability.harness import (
    ChaosServer,
    Workers,
    assert_embeddings_are_of,
    counts,
    inbox_rows,
    report,
    worker_env,
)
from tests.support.helpers import body, connect, execute, make_docs

ROWS = 200_000
WORKERS = 4
BATCH = 1_000


def claim_plan(dsn: str) -> dict[str, Any]:
    """EXPLAIN (FORMAT JSON) of the claim statement with realistic parameters."""
    params = {
        "limit": BATCH,
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
        row = conn.execute("EXPLAIN (FORMAT JSON) " + rendered).fetchone()  # type: ignore[arg-type]
    assert row is not None
    plan: dict[str, Any] = next(iter(row.values()))[0]["Plan"]
    return plan


def queue_scans(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan nodes that read embedding_queue or one of its indexes."""
    reads = node.get("Relation Name") == "embedding_queue" or str(
        node.get("Index Name", "")
    ).startswith("embedding_queue_")
    found = [node] if reads and node["Node Type"] != "ModifyTable" else []
    for child in node.get("Plans", []):
        found.extend(queue_scans(child))
    return found


def shape(scans: list[dict[str, Any]]) -> str:
    """A one-line summary of how the plan reads the queue."""
    return "+".join(
        f"{n['Node Type'].replace(' ', '')}({n.get('Index Name', 'heap')})" for n in scans
    )


@pytest.mark.slow
def test_two_hundred_thousand_rows_drain_with_flat_memory_and_indexed_claims(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    make_docs(dsn, 0)
    execute(
        dsn,
        "INSERT INTO docs (id, body) SELECT g,"
        " format('document %%s: the quick brown fox jumps over lazy dog number %%s', g, g)"
        " FROM generate_series(1, %s) AS g",
        (ROWS,),
    )
    # One statement: its keys wait in the inbox, nothing is queued yet.
    assert (counts(dsn), inbox_rows(dsn)) == ({}, ROWS)
    # Half is expanded here, the rest by the workers while they drain.
    execute(dsn, "SELECT embedding_queue_expand(%s)", (ROWS // 2,))
    assert (counts(dsn), inbox_rows(dsn)) == ({"pending": ROWS // 2}, ROWS // 2)
    # The claim plan with a fresh 100,000-row backlog (not analyzed yet, as after a backfill).
    plans = {"backlog": claim_plan(dsn)}
    env = worker_env(dsn, fake, QUEUE_PROCESSOR_BATCH_SIZE=BATCH)
    started = time.monotonic()
    running = [workers.start(f"load-w{n}", env, "--drain") for n in range(WORKERS)]
    # RSS by worker at each quarter of the drain.
    progress: dict[str, list[tuple[int, int]]] = {w.name: [] for w in running}
    next_mark = ROWS // 8  # then every quarter: 25k, 75k, 125k, 175k
    deadline = time.monotonic() + 240
    while any(w.alive for w in running):
        for worker in running:
            worker.sample_rss()
        done = counts(dsn)["done"]
        if done >= next_mark:
            for worker in running:
                if worker.alive and worker.rss_samples_kib:
                    progress[worker.name].append((done, worker.rss_samples_kib[-1]))
            next_mark = done + ROWS // 4
        assert time.monotonic() < deadline, "the load drain did not finish in time"
        time.sleep(0.25)
    seconds = time.monotonic() - started
    exit_codes = [w.wait(10) for w in running]

    assert exit_codes == [0] * WORKERS, [w.tail() for w in running]
    assert (counts(dsn), inbox_rows(dsn)) == ({"done": ROWS}, 0)
    assert_embeddings_are_of(dsn, {i: body(i) for i in range(1, ROWS + 1)})
    processed = [sum(e["done"] for e in w.events("batch_done")) for w in running]
    assert sum(processed) == ROWS

    # The claim query's plan, as the planner sees the table after the drain and after ANALYZE.
    plans["after_drain"] = claim_plan(dsn)
    execute(dsn, "ANALYZE embedding_queue")
    plans["after_analyze"] = claim_plan(dsn)
    shapes = {}
    for label, plan in plans.items():
        scans = queue_scans(plan)
        shapes[label] = shape(scans)
        assert scans, plan
        assert [n["Node Type"] for n in scans if n["Node Type"] == "Seq Scan"] == [], (label, scans)
        assert "embedding_queue_pending_target_idx" in {n.get("Index Name") for n in scans}, (
            label,
            scans,
        )

    report(
        "load",
        rows=ROWS,
        workers=WORKERS,
        batch=BATCH,
        seconds=round(seconds, 1),
        rows_per_worker="/".join(map(str, processed)),
        requests=fake.requests_total,
        items_lost=0,
    )
    for label, text in shapes.items():
        report(f"load_claim_plan_{label}", queue_reads=text)
    for worker in running:
        series = " ".join(
            f"{done // 1000}k:{rss // 1024}MiB" for done, rss in progress[worker.name]
        )
        report(
            f"load_rss_{worker.name}",
            peak_rss_mib=round(worker.peak_rss_kib / 1024, 1),
            rss_by_progress=series or "n/a",
        )
