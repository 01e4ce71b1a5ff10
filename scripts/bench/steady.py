"""10. steady: continuous operation with an HNSW index present. A producer inserts rows in
statements of 100 (the per-row trigger path) as fast as it can while a Worker runs
continuously in this process; the rate is rows embedded per second from the first insert
until every row is done, with the worker's CPU per 1,000 rows. Compared with the floor
(claim_batch -> complete, precomputed vectors) on the same table with the same index: the
HNSW inserts are Postgres's work either way. Variations: batch size (concurrency 2, the
default) and a halfvec(768) column with halfvec_cosine_ops.

Target: the default configuration within 10% of the floor with the index (>= 0.9).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from bench.cluster import expand_inbox, register
from bench.config import DIMS
from bench.context import Context
from bench.cpu import CpuProbe, cpu_delta, cpu_per_1000, cpu_probe
from bench.drain import Drain, openai_factory
from bench.floor import floor_drain
from bench.processes import FakeServer
from bench.report import Line, cpu_note, progress
from queue_processor.cli.factories import worker_config
from queue_processor.db import Database
from queue_processor.models import QueueItem
from queue_processor.settings import Settings
from queue_processor.testing import fake_vectors
from queue_processor.worker import Worker

CHUNK = 100
INSERT = "INSERT INTO docs (id, body) SELECT * FROM unnest(%s::bigint[], %s::text[])"


def _indexed_docs(dsn: str, kind: str) -> None:
    """A registered ``docs`` table (``kind``(768)) with its cosine HNSW index, empty."""
    opclass = "vector_cosine_ops" if kind == "vector" else "halfvec_cosine_ops"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE docs (id bigint PRIMARY KEY, body text, embedding {}({}))"
            ).format(sql.SQL(kind), sql.Literal(DIMS))
        )
        register(conn, "docs")
        conn.execute(
            sql.SQL(
                "CREATE INDEX docs_embedding_hnsw_idx ON docs USING hnsw (embedding {})"
                " WITH (m = 16, ef_construction = 64)"
            ).format(sql.SQL(opclass))
        )


def _floor(ctx: Context, kind: str, probe: CpuProbe) -> Drain:
    """The floor on ``rows`` queued rows of an indexed table (best of batch 500 x 2 loops and
    1000 x 1)."""
    rows = ctx.sizes.steady_rows
    # The fake server's vectors of the same texts: the index does the same work as in the
    # pipeline (a pool of repeated vectors would make its inserts cheaper).
    vectors = fake_vectors(ctx.corpus.texts(rows), DIMS)

    def vector_of(item: QueueItem) -> npt.NDArray[np.float32]:
        return vectors[int(item.record_id) - 1]

    best: Drain | None = None
    for batch, conc in ((500, 2), (1000, 1)):
        with ctx.cluster.fresh(ctx.cluster.base()) as dsn:
            _indexed_docs(dsn, kind)
            with psycopg.connect(dsn, autocommit=True) as conn:
                texts = ctx.corpus.texts(rows)
                conn.execute("SET queue_processor.bulk_rows = '0'")
                for start in range(0, rows, CHUNK):
                    conn.execute(
                        INSERT,
                        (list(range(start + 1, start + CHUNK + 1)), texts[start : start + CHUNK]),
                    )
                expand_inbox(conn)
            drain = floor_drain(
                dsn, batch, conc, probe, vector_of=lambda i: vectors[int(i.record_id) - 1]
            )
        progress(f"steady floor {kind} b={batch} c={conc}: {drain.rate:,.0f} rows/s")
        if best is None or drain.rate > best.rate:
            best = drain
    assert best is not None
    return best


def _stream(ctx: Context, server: FakeServer, kind: str, batch: int, probe: CpuProbe) -> Drain:
    """Inserts in statements of 100 while a continuous Worker embeds them."""
    rows = ctx.sizes.steady_rows
    texts = ctx.corpus.texts(rows)
    config = dataclasses.replace(
        worker_config(Settings.model_construct(), batch_size=batch),
        owner="steady",
        poll_interval_seconds=0.2,
        min_rescan_seconds=0.0,
    )

    async def run(dsn: str) -> Drain:
        async with (
            Database(dsn, max_size=max(4, config.concurrency * 2 + 2)) as db,
            openai_factory(server.base_url)() as provider,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as writer,
        ):
            worker = Worker(db, provider, config)
            cpu_before = probe()
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run, "continuous")
                for start in range(0, rows, CHUNK):
                    await writer.execute(
                        INSERT,
                        (list(range(start + 1, start + CHUNK + 1)), texts[start : start + CHUNK]),
                    )
                while True:
                    cur = await writer.execute(
                        "SELECT count(*) FROM embedding_queue WHERE status = 'done'"
                    )
                    found = await cur.fetchone()
                    if found is not None and found[0] >= rows:
                        break
                    await anyio.sleep(0.05)
                seconds = time.perf_counter() - started
                worker.stop()
            cpu = cpu_delta(cpu_before, probe())
        return Drain(rows, seconds, cpu_s=cpu)

    with ctx.cluster.fresh(ctx.cluster.base()) as dsn:
        _indexed_docs(dsn, kind)
        drain = anyio.run(run, dsn)
    progress(f"steady {kind} batch={batch}: {drain.rate:,.0f} rows/s")
    return drain


def run(ctx: Context) -> None:
    sizes = ctx.sizes
    detail: dict[str, Any] = {"rows": sizes.steady_rows, "chunk": CHUNK}
    with FakeServer(DIMS) as server:
        probe = cpu_probe(ctx.cluster, server)
        for kind in ("vector", "halfvec"):
            floor = _floor(ctx, kind, probe)
            floor_cpu = cpu_per_1000(floor.cpu_s, floor.rows)
            detail[f"{kind}_floor_rows_per_s"] = floor.rate
            ctx.report.add(
                Line("steady", f"floor with HNSW, {kind}(768)", floor.rate, "rows/s",
                     note=cpu_note(floor_cpu))
            )  # fmt: skip
            batches = sizes.steady_batches if kind == "vector" else (DEFAULT_BATCH,)
            for batch in batches:
                drain = _stream(ctx, server, kind, batch, probe)
                cpu = cpu_per_1000(drain.cpu_s, drain.rows)
                ratio = drain.rate / floor.rate
                detail[f"{kind}_batch{batch}"] = {
                    "rows_per_s": drain.rate,
                    "ratio": ratio,
                    "cpu_ms_per_1000_rows": cpu,
                    "worker_cpu_ms_per_row": cpu.get("worker", 0.0) / 1000,
                }
                is_default = batch == DEFAULT_BATCH and kind == "vector"
                passed = (
                    ctx.report.target("steady with index / floor with index", ratio, ">=", 0.9)
                    if is_default
                    else None
                )
                ctx.report.add(
                    Line(
                        "steady",
                        f"inserts + worker, {kind}(768), batch {batch}"
                        + (" (default)" if batch == DEFAULT_BATCH else ""),
                        drain.rate,
                        "rows/s",
                        ratio=ratio,
                        ratio_of=f"floor with HNSW ({kind})",
                        target=">= 0.9" if is_default else "",
                        passed=passed,
                        note=f"worker {cpu.get('worker', 0.0) / 1000:.2f} ms CPU/row; "
                        + cpu_note(cpu),
                    )
                )
    ctx.report.sections["steady"] = detail


DEFAULT_BATCH = Settings.model_construct().batch_size
