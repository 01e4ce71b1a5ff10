"""1. floor: claim_batch -> complete (the worker's own statements) with precomputed vectors,
no HTTP, no provider: the ceiling of this design on this machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from bench.cluster import check_drained
from bench.config import DIMS, MODEL, VECTOR_POOL
from bench.context import Context
from bench.cpu import CpuProbe, cpu_delta, cpu_per_1000, cpu_probe, median_cpu
from bench.drain import Drain
from bench.report import Line, cpu_note, median, progress
from queue_processor import queue
from queue_processor.db import Database
from queue_processor.models import QueueItem
from queue_processor.targets import parse_record_id


def floor_drain(
    dsn: str,
    batch_size: int,
    concurrency: int,
    probe: CpuProbe | None = None,
    vector_of: Callable[[QueueItem], npt.NDArray[np.float32]] | None = None,
) -> Drain:
    """claim_batch + complete with precomputed vectors: the worker's statements, no HTTP.
    ``vector_of`` picks each item's vector (default: a pool of 1,024 random vectors, cycled;
    with an HNSW index the vectors must be the pipeline's own, since repeated vectors make
    the index's inserts cheaper)."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((VECTOR_POOL, DIMS)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)

    def pooled(item: QueueItem) -> npt.NDArray[np.float32]:
        return pool[item.id % VECTOR_POOL]

    pick = vector_of or pooled

    async def run() -> Drain:
        done = 0
        async with Database(dsn, max_size=concurrency * 2 + 2) as db:
            targets = {t.key: t for t in await queue.list_targets(db)}

            async def loop() -> None:
                nonlocal done
                while True:
                    result = await queue.claim_batch(
                        db, owner="floor", limit=batch_size, lease_seconds=300, max_attempts=3
                    )
                    items = result.claim.items
                    if not items:
                        return
                    writes = []
                    for item in items:
                        target = targets[(item.table_name, item.embedding_column)]
                        key = parse_record_id(target, item.record_id)
                        writes.append(queue.Write(item, target, key, pick(item)))
                    outcome = await queue.complete(
                        db,
                        result.claim.token,
                        writes,
                        [],
                        model=MODEL,
                        usage=queue.Usage("floor", len(items), 0, 0),
                    )
                    done += len(outcome.done)

            cpu_before = probe() if probe else {}
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(loop)
            seconds = time.perf_counter() - started
            cpu = cpu_delta(cpu_before, probe()) if probe else {}
        return Drain(done, seconds, cpu_s=cpu)

    return anyio.run(run)


def run(ctx: Context) -> None:
    """The best batch size and concurrency of the floor; sets ``ctx.floor_rate/config``."""
    sizes, cluster = ctx.sizes, ctx.cluster
    template = cluster.loaded(ctx.corpus, sizes.floor_rows)
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[dict[str, float]]] = {}
    probe = cpu_probe(cluster)
    for rep in range(sizes.repeats):
        for batch in sizes.floor_batches:
            for conc in sizes.floor_concurrency:
                with cluster.fresh(template) as dsn:
                    drain = floor_drain(dsn, batch, conc, probe)
                    check_drained(dsn, sizes.floor_rows, f"floor b={batch} c={conc}")
                key = f"batch={batch} concurrency={conc}"
                runs.setdefault(key, []).append(drain.rate)
                cpu.setdefault(key, []).append(cpu_per_1000(drain.cpu_s, sizes.floor_rows))
                progress(f"floor b={batch} c={conc} rep {rep + 1}: {drain.rate:,.0f} rows/s")
    medians = {k: median(v) for k, v in runs.items()}
    best = max(medians, key=lambda k: medians[k])
    ctx.floor_rate = medians[best]
    batch_size, concurrency = (int(part.split("=")[1]) for part in best.split())
    ctx.floor_config = (batch_size, concurrency)
    detail: dict[str, Any] = {
        "rows": sizes.floor_rows,
        "runs_rows_per_s": runs,
        "median_rows_per_s": medians,
        "best": best,
        "best_rows_per_s": medians[best],
        "cpu_ms_per_1000_rows": {k: median_cpu(v) for k, v in cpu.items()},
    }
    ctx.report.sections["floor"] = detail
    for key, value in medians.items():
        ctx.report.add(
            Line(
                "floor",
                key,
                value,
                "rows/s",
                note=("best; " if key == best else "") + cpu_note(median_cpu(cpu[key])),
            )
        )
