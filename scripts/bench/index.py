"""9. index: a backfill into a target that wants an HNSW index, three ways, each timed from
`register` to "every row embedded and the index valid":

present   `register --index hnsw --backfill` with the index created at once (the threshold
          raised above the backlog), then `run --drain`: every vector write is an HNSW insert.
          Measured on ``index_present_rows`` (it is slow) and projected to ``index_rows``.
deferred  `register --index hnsw --backfill` as the CLI does by default (the backlog is above
          QUEUE_PROCESSOR_INDEX_DEFER_ROWS: the index is recorded as pending), then
          `run --drain`, which drains and then builds it (CREATE INDEX CONCURRENTLY with
          maintenance_work_mem sized to the table).
by hand   `register --backfill` (no index), `run --drain`, then CREATE INDEX with the same
          maintenance_work_mem, as pgvector's documentation advises.

Target: deferred <= 1.2 x by hand (the tool's build costs no more than doing it by hand).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import psycopg

from bench.cluster import copy_rows, create_docs
from bench.config import CLI, DEFAULTS, DIMS, REPO
from bench.context import Context
from bench.processes import FakeServer, drain_processes, worker_env
from bench.report import Line, progress
from queue_processor import queue

_TEMPLATES: dict[int, str] = {}
INDEX_SQL = (
    "CREATE INDEX docs_embedding_hnsw_idx ON docs USING hnsw (embedding vector_cosine_ops)"
    " WITH (m = 16, ef_construction = 64)"
)


def unregistered(ctx: Context, rows: int) -> str:
    """A template with a ``docs`` table of ``rows`` rows (no vectors) and no target yet."""
    if rows not in _TEMPLATES:
        name, dsn = ctx.cluster.create(ctx.cluster.base())
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_docs(conn, "docs", DIMS)
            copy_rows(conn, "docs", ctx.corpus.copy_payload(rows))
            conn.execute("VACUUM ANALYZE docs")
        _TEMPLATES[rows] = name
    return _TEMPLATES[rows]


def _register(dsn: str, server: FakeServer, args: list[str], extra: dict[str, str]) -> float:
    """`queue-processor register docs ... ARGS`; its wall seconds."""
    started = time.perf_counter()
    subprocess.run(
        [*CLI, "register", "docs", "--column", "embedding", "--content", "body", *args],
        env=worker_env(dsn, server.base_url, extra),
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def _index_valid(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT indisvalid FROM pg_index"
            " WHERE indexrelid = to_regclass('docs_embedding_hnsw_idx')"
        ).fetchone()
    return bool(row and row[0])


def _check(dsn: str, rows: int, what: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(embedding) FROM docs").fetchone()
    if not row or row[0] != rows or not _index_valid(dsn):
        raise RuntimeError(f"{what}: {row} vectors, index valid {_index_valid(dsn)}")


def _way(ctx: Context, server: FakeServer, way: str, rows: int) -> dict[str, float]:
    """One backfill of ``rows`` rows the given way: seconds of each step and the total."""
    steps: dict[str, float] = {}
    memory_mb = queue.build_memory_mb(
        rows, DIMS, "vector", 16, cap_mb=DEFAULTS.index_build_memory_mb
    )
    with ctx.cluster.fresh(unregistered(ctx, rows)) as dsn:
        if way == "present":
            extra = {"QUEUE_PROCESSOR_INDEX_DEFER_ROWS": str(rows + 1)}
            steps["register"] = _register(dsn, server, ["--index", "hnsw", "--backfill"], extra)
        elif way == "deferred":
            # The default threshold (10,000) defers the full run's 100,000 rows; --quick's
            # few thousand need it lowered to take the same path.
            extra = {"QUEUE_PROCESSOR_INDEX_DEFER_ROWS": str(min(rows, DEFAULTS.index_defer_rows))}
            steps["register"] = _register(dsn, server, ["--index", "hnsw", "--backfill"], extra)
        else:
            steps["register"] = _register(dsn, server, ["--backfill"], {})
        drain = drain_processes(dsn, server.base_url, 1)
        assert drain.wall_seconds is not None
        steps["drain_and_build" if way == "deferred" else "drain"] = drain.wall_seconds
        if way == "by_hand":
            started = time.perf_counter()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"SET maintenance_work_mem = '{memory_mb}MB'")
                conn.execute(INDEX_SQL)
            steps["create_index"] = time.perf_counter() - started
        _check(dsn, rows, way)
    steps["total"] = sum(steps.values())
    steps["memory_mb"] = memory_mb
    return steps


def run(ctx: Context) -> None:
    sizes = ctx.sizes
    rows, present_rows = sizes.index_rows, sizes.index_present_rows
    detail: dict[str, Any] = {"rows": rows, "present_rows": present_rows}
    with FakeServer(DIMS) as server:
        by_hand = _way(ctx, server, "by_hand", rows)
        progress(f"index by hand: {by_hand}")
        deferred = _way(ctx, server, "deferred", rows)
        progress(f"index deferred: {deferred}")
        present = _way(ctx, server, "present", present_rows)
        progress(f"index present ({present_rows} rows): {present}")
    detail |= {"by_hand_s": by_hand, "deferred_s": deferred, "present_s": present}
    present_rate = present_rows / present["total"]
    projected = rows / present_rate
    detail["present_rows_per_s"] = present_rate
    detail["present_projected_s"] = projected
    ratio = deferred["total"] / by_hand["total"]
    detail["deferred_over_by_hand"] = ratio
    ctx.report.sections["index"] = detail
    ctx.report.add(
        Line(
            "index",
            f"by hand: drain then CREATE INDEX, {rows:,} rows",
            by_hand["total"],
            "s",
            note=f"drain {by_hand['drain']:.1f} s + CREATE INDEX {by_hand['create_index']:.1f} s"
            f" ({by_hand['memory_mb']:.0f} MB)",
        )
    )
    passed = ctx.report.target("index deferred / by hand", ratio, "<=", 1.2)
    ctx.report.add(
        Line(
            "index",
            f"deferred: register --index hnsw --backfill + run --drain, {rows:,} rows",
            deferred["total"],
            "s",
            ratio=ratio,
            ratio_of="by hand",
            target="<= 1.2",
            passed=passed,
        )
    )
    ctx.report.add(
        Line(
            "index",
            f"present during the drain, {present_rows:,} rows",
            present_rate,
            "rows/s",
            ratio=projected / by_hand["total"],
            ratio_of="by hand (projected)",
            note=f"{present['total']:.1f} s; {rows:,} rows would take ~{projected:.0f} s",
        )
    )
