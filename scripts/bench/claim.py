"""6. claim: median claim latency (claim 100, release them) with many done rows in the
queue vs none."""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import psycopg

from bench.cluster import queue_counts
from bench.context import Context
from bench.report import Line, median, progress
from queue_processor import queue
from queue_processor.db import Database

CLAIM_LIMIT = 100
ROUNDS = 4


async def _claim_samples(dsn: str, samples: int) -> list[float]:
    """Seconds of ``samples`` claims of 100 rows, each released right after."""
    latencies: list[float] = []
    async with Database(dsn, max_size=2) as db:
        for _ in range(samples):
            started = time.perf_counter()
            result = await queue.claim_batch(
                db, owner="claim-bench", limit=CLAIM_LIMIT, lease_seconds=300, max_attempts=1000
            )
            latencies.append(time.perf_counter() - started)
            claimed = [item.id for item in result.claim.items]
            if len(claimed) != CLAIM_LIMIT:
                raise RuntimeError(f"claim returned {len(claimed)} rows, expected 100")
            await queue.release(db, result.claim.token, claimed)
    return latencies


def _load_done_rows(dsn: str, bodies: list[str], n: int) -> str | None:
    """Insert ``n`` done rows (processed over the last n/100 seconds); the queue's size."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content, "
            "status, attempts, processed_at) "
            "SELECT 'docs', 'done-' || g, 'embedding', "
            "'document ' || g || ': ' || (%(bodies)s::text[])[1 + g %% 1000], "
            "'done', 1, now() - make_interval(secs => g / 100.0) "
            "FROM generate_series(1, %(n)s) AS g",
            {"bodies": bodies, "n": n},
        )
        conn.execute("VACUUM ANALYZE embedding_queue")
        size = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('embedding_queue'))"
        ).fetchone()
    return size[0] if size else None


def run(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    template = cluster.loaded(ctx.corpus, sizes.claim_pending)
    bodies = ctx.corpus.texts(1000)
    detail: dict[str, Any] = {
        "pending_rows": sizes.claim_pending,
        "done_rows": sizes.claim_done_rows,
        "claim_limit": CLAIM_LIMIT,
    }
    with cluster.fresh(template) as empty_dsn, cluster.fresh(template) as full_dsn:
        started = time.perf_counter()
        size = _load_done_rows(full_dsn, bodies, sizes.claim_done_rows)
        detail["load_seconds"] = time.perf_counter() - started
        detail["queue_size_with_done"] = size
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE embedding_queue")
        progress(
            f"claim: {sizes.claim_done_rows:,} done rows loaded in {detail['load_seconds']:.1f}s"
        )
        empty: list[float] = []
        full: list[float] = []
        per_round = max(5, sizes.claim_samples // ROUNDS)
        anyio.run(_claim_samples, empty_dsn, 10)  # warm-up both (connections, plans, caches)
        anyio.run(_claim_samples, full_dsn, 10)
        for _ in range(ROUNDS):
            empty += anyio.run(_claim_samples, empty_dsn, per_round)
            full += anyio.run(_claim_samples, full_dsn, per_round)
        counts = queue_counts(full_dsn)
    empty_ms = median(empty) * 1000
    full_ms = median(full) * 1000
    ratio = full_ms / empty_ms
    detail.update(
        samples=len(empty),
        empty_median_ms=empty_ms,
        full_median_ms=full_ms,
        empty_p90_ms=float(np.percentile(empty, 90) * 1000),
        full_p90_ms=float(np.percentile(full, 90) * 1000),
        ratio=ratio,
        queue_after=counts,
    )
    ctx.report.sections["claim"] = detail
    ctx.report.add(Line("claim", "claim 100, no done rows (median)", empty_ms, "ms"))
    ctx.report.add(
        Line(
            "claim",
            f"claim 100, {sizes.claim_done_rows:,} done rows (median)",
            full_ms,
            "ms",
            ratio=ratio,
            ratio_of="empty",
            target="<= 1.1",
            passed=ctx.report.target("claim latency with done rows / empty", ratio, "<=", 1.1),
        )
    )
