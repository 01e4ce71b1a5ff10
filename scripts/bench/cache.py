"""8. cache: never pay twice. EMBEDDING_CACHE on: provider requests of a forced re-embed of
unchanged rows."""

from __future__ import annotations

import subprocess

from bench.cluster import check_drained
from bench.config import CLI, DIMS, REPO
from bench.context import Context
from bench.processes import FakeServer, drain_processes, worker_env
from bench.report import Line


def run(ctx: Context) -> None:
    """Drain with EMBEDDING_CACHE on, force a re-embed of every row (`enqueue --all`), drain
    again: provider requests of the second run are what the cache did not save."""
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = sizes.cache_rows
    template = cluster.loaded(ctx.corpus, rows)
    cache_env = {"EMBEDDING_CACHE": "true"}
    with FakeServer(DIMS) as server, cluster.fresh(template) as dsn:
        first = drain_processes(dsn, server.base_url, 1, (), cache_env)
        check_drained(dsn, rows, "cache: first run")
        subprocess.run(
            [*CLI, "enqueue", "docs", "--all"],
            env=worker_env(dsn, server.base_url, cache_env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=True,
            cwd=REPO,
        )
        second = drain_processes(dsn, server.base_url, 1, (), cache_env)
        check_drained(dsn, rows, "cache: re-embed run")
    saved = (first.requests or 0) - (second.requests or 0)
    detail = {
        "rows": rows,
        "first_run": {"requests": first.requests, "rows_per_s": first.rate},
        "re_embed_run": {
            "requests": second.requests,
            "cache_hits": second.cache_hits,
            "rows_per_s": second.rate,
        },
        "requests_saved": saved,
    }
    ctx.report.sections["cache"] = detail
    ctx.report.add(
        Line("cache", f"first drain of {rows:,} rows: provider requests", first.requests, "")
    )
    ctx.report.add(
        Line(
            "cache",
            "re-embed of unchanged rows (enqueue --all): provider requests",
            second.requests,
            "",
            note=f"{second.cache_hits:,} rows from the cache, {saved} requests saved, "
            f"{second.rate:,.0f} rows/s vs {first.rate:,.0f}",
        )
    )
