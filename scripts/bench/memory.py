"""7. memory: peak RSS (VmHWM) of a worker process draining many rows vs few."""

from __future__ import annotations

from typing import Any

from bench.cluster import check_drained
from bench.config import DEFAULTS, DIMS
from bench.context import Context
from bench.processes import FakeServer, drain_processes
from bench.report import Line, median, progress


def run(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    small, large = sizes.memory_rows
    detail: dict[str, Any] = {
        "config": f"CLI defaults (batch {DEFAULTS.batch_size}, concurrency {DEFAULTS.concurrency})",
        "method": "max VmHWM of /proc/<pid>/status polled every 20 ms",
    }
    rss: dict[int, list[int]] = {small: [], large: []}
    wait4: dict[int, list[int]] = {small: [], large: []}
    with FakeServer(DIMS) as server:
        for rep in range(sizes.memory_repeats):
            for rows in (small, large):
                template = cluster.loaded(ctx.corpus, rows)
                with cluster.fresh(template) as dsn:
                    drain = drain_processes(dsn, server.base_url, 1)
                    check_drained(dsn, rows, f"memory {rows}")
                rss[rows].append(drain.maxrss_kib or 0)
                wait4[rows].append(drain.wait4_maxrss_kib or 0)
                progress(
                    f"memory {rows} rows rep {rep + 1}: peak RSS "
                    f"{(drain.maxrss_kib or 0) / 1024:.1f} MiB ({drain.rate:,.0f} rows/s)"
                )
    small_mib = median(rss[small]) / 1024
    large_mib = median(rss[large]) / 1024
    ratio = large_mib / small_mib
    detail.update(
        peak_rss_kib=rss,
        wait4_maxrss_kib=wait4,
        small_rows=small,
        large_rows=large,
        ratio=ratio,
    )
    ctx.report.sections["memory"] = detail
    ctx.report.add(Line("memory", f"worker peak RSS, {small:,} rows", small_mib, "MiB"))
    ctx.report.add(
        Line(
            "memory",
            f"worker peak RSS, {large:,} rows",
            large_mib,
            "MiB",
            ratio=ratio,
            ratio_of=f"{small:,} rows",
            target="<= 1.2",
            passed=ctx.report.target("worker RSS large / small", ratio, "<=", 1.2),
        )
    )
