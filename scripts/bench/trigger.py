"""5. trigger: bulk insert (INSERT ... SELECT generate_series, and COPY) into a registered
table vs the same table without triggers, and the expansion a worker does afterwards."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql

from bench.cluster import copy_rows, create_docs, expand_inbox, register
from bench.config import DIMS, EXPAND_SLICE
from bench.context import Context
from bench.report import Line, median, progress

MAX_RATIO = 1.3
_METHODS = (("insert_select", "INSERT ... SELECT"), ("copy", "COPY"))

Times = dict[str, dict[str, list[float]]]


def run(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = sizes.trigger_rows
    detail: dict[str, Any] = {"rows": rows}
    with cluster.fresh(cluster.base()) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        create_docs(conn, "docs_plain", DIMS)
        create_docs(conn, "docs", DIMS)
        register(conn, "docs")
        times = _measure(ctx, conn)
        check = conn.execute(
            "SELECT count(*) FROM embedding_queue WHERE table_name = 'docs'"
        ).fetchone()
    detail["seconds"] = times
    worst = _add_lines(ctx, times, detail)
    detail["last_queue_rows"] = check[0] if check else None
    ctx.report.target("trigger cost (worst of INSERT/COPY)", worst, "<=", MAX_RATIO)
    ctx.report.sections["trigger"] = detail


def _measure(ctx: Context, conn: psycopg.Connection[Any]) -> Times:
    """Seconds of each load, plain and registered alternating, and of each expansion."""
    rows = ctx.sizes.trigger_rows
    payload = ctx.corpus.copy_payload(rows)
    bodies = ctx.corpus.texts(1000)
    times: Times = {
        "insert_select": {"plain": [], "registered": [], "expand": []},
        "copy": {"plain": [], "registered": [], "expand": []},
    }
    for method in times:
        # warm-up: first touch of the relations and catalog caches
        _load(conn, method, "docs", payload, bodies, rows)
        for rep in range(ctx.sizes.repeats):
            order = ("plain", "registered") if rep % 2 == 0 else ("registered", "plain")
            for kind in order:
                table = "docs" if kind == "registered" else "docs_plain"
                times[method][kind].append(_load(conn, method, table, payload, bodies, rows))
                if kind == "registered":
                    # The work the bulk insert deferred: what a worker then spends
                    # turning the statement's inbox row into queue rows.
                    times[method]["expand"].append(expand_inbox(conn))
                    queued = conn.execute("SELECT count(*) FROM embedding_queue").fetchone()
                    if queued is None or queued[0] != rows:
                        raise RuntimeError(f"trigger: {queued} queue rows after a {rows}-row load")
            progress(
                f"trigger {method} rep {rep + 1}: plain {times[method]['plain'][-1]:.2f}s, "
                f"registered {times[method]['registered'][-1]:.2f}s, "
                f"then expanded by a worker in {times[method]['expand'][-1]:.2f}s"
            )
    return times


def _load(
    conn: psycopg.Connection[Any],
    method: str,
    table: str,
    payload: bytes,
    bodies: list[str],
    rows: int,
) -> float:
    """Seconds of one bulk insert of ``rows`` rows into an emptied ``table``."""
    conn.execute("TRUNCATE embedding_queue")
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
    conn.execute("CHECKPOINT")
    started = time.perf_counter()
    with conn.transaction():
        if method == "copy":
            copy_rows(conn, table, payload)
        else:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, body) "
                    "SELECT g, 'document ' || g || ': ' "
                    "|| (%(bodies)s::text[])[1 + g %% 1000]"
                    " FROM generate_series(1, %(n)s) AS g"
                ).format(sql.Identifier(table)),
                {"bodies": bodies, "n": rows},
            )
    return time.perf_counter() - started


def _add_lines(ctx: Context, times: Times, detail: dict[str, Any]) -> float | None:
    """Three lines per method; returns the worst registered / plain ratio."""
    rows = ctx.sizes.trigger_rows
    worst: float | None = None
    for method, label in _METHODS:
        plain = median(times[method]["plain"])
        registered = median(times[method]["registered"])
        expand = median(times[method]["expand"])
        ratio = registered / plain
        worst = ratio if worst is None else max(worst, ratio)
        detail[method] = {
            "plain_s": plain,
            "registered_s": registered,
            "ratio": ratio,
            "worker_expand_s": expand,
        }
        ctx.report.add(Line("trigger", f"{label} {rows:,} rows, no triggers", plain, "s"))
        ctx.report.add(
            Line(
                "trigger",
                f"{label} {rows:,} rows, registered",
                registered,
                "s",
                ratio=ratio,
                ratio_of="untriggered",
                target="<= 1.3",
                passed=ratio <= MAX_RATIO,
            )
        )
        ctx.report.add(
            Line(
                "trigger",
                f"  then: a worker expands the bulk insert into {rows:,} queue rows",
                expand,
                "s",
                note=f"deferred work, off the inserting transaction ({EXPAND_SLICE:,} keys "
                "per expansion, each before a claim)",
            )
        )
    return worst
