"""3. latency: the fake server answers every request after 50 ms; one worker process; rows/s
and the wall time for 100,000 rows (projected from a smaller N in --quick)."""

from __future__ import annotations

from typing import Any

from bench.cluster import check_drained
from bench.config import DEFAULTS, DIMS
from bench.context import Context
from bench.drain import Drain
from bench.processes import FakeServer, drain_processes, startup_seconds
from bench.report import Line, median, progress

GOAL_ROWS = 100_000
LATENCY_MS = 50

LATENCY_CONFIGS: list[tuple[str, list[str], dict[str, str]]] = [
    (
        "batch 1000, concurrency 4, 250 inputs/request, 4 requests in flight",
        ["--batch-size", "1000", "--concurrency", "4"],
        {"EMBEDDING_MAX_INPUTS_PER_REQUEST": "250"},
    ),
    (
        "batch 1000, concurrency 4, 250 inputs/request, 16 requests in flight",
        ["--batch-size", "1000", "--concurrency", "4"],
        {"EMBEDDING_MAX_INPUTS_PER_REQUEST": "250", "EMBEDDING_MAX_CONCURRENT_REQUESTS": "16"},
    ),
    (
        "batch 2000, concurrency 4, 250 inputs/request, 16 requests in flight",
        ["--batch-size", "2000", "--concurrency", "4"],
        {"EMBEDDING_MAX_INPUTS_PER_REQUEST": "250", "EMBEDDING_MAX_CONCURRENT_REQUESTS": "16"},
    ),
]


def run(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = sizes.latency_rows
    template = cluster.loaded(ctx.corpus, rows)
    detail: dict[str, Any] = {"rows": rows, "latency_ms": LATENCY_MS, "configs": {}}
    with FakeServer(DIMS, latency_ms=LATENCY_MS) as server:
        fixed = startup_seconds(cluster, server.base_url)
        detail["process_startup_s"] = fixed
        results, best = _drain_configs(ctx, template, server)
        # The CLI defaults, on fewer rows (one batch at a time).
        default_template = cluster.loaded(ctx.corpus, sizes.latency_default_rows)
        with cluster.fresh(default_template) as dsn:
            default = drain_processes(dsn, server.base_url, 1)
            check_drained(dsn, sizes.latency_default_rows, "latency default")
    for label, drains in results.items():
        detail["configs"][label] = _config_detail(label, drains, rows, fixed)
    default_projected = fixed + GOAL_ROWS / default.rate
    detail["default"] = {
        "rows": sizes.latency_default_rows,
        "rows_per_s": default.rate,
        "requests": default.requests,
        "wall_100k_s_projected": default_projected,
    }
    detail["best"] = best
    ctx.report.sections["latency"] = detail
    _add_lines(ctx, detail, best, default, default_projected)


def _drain_configs(
    ctx: Context, template: str, server: FakeServer
) -> tuple[dict[str, list[Drain]], str]:
    """One drain per configuration (only the first in --quick), then the best one again
    until it has ``repeats`` drains; returns the drains by label and the best label."""
    sizes, cluster, rows = ctx.sizes, ctx.cluster, ctx.sizes.latency_rows
    results: dict[str, list[Drain]] = {}
    configs = LATENCY_CONFIGS if sizes.repeats > 1 else LATENCY_CONFIGS[:1]
    for label, args, env in configs:
        with cluster.fresh(template) as dsn:
            drain = drain_processes(dsn, server.base_url, 1, args, env)
            check_drained(dsn, rows, label)
        results[label] = [drain]
        progress(f"latency {label}: {drain.rate:,.0f} rows/s, wall {drain.wall_seconds:.1f}s")
    best = max(results, key=lambda k: results[k][0].rate)
    best_args, best_env = next((a, e) for lbl, a, e in LATENCY_CONFIGS if lbl == best)
    for _ in range(sizes.repeats - 1):
        with cluster.fresh(template) as dsn:
            drain = drain_processes(dsn, server.base_url, 1, best_args, best_env)
            check_drained(dsn, rows, best)
        results[best].append(drain)
        progress(f"latency {best}: {drain.rate:,.0f} rows/s, wall {drain.wall_seconds:.1f}s")
    return results, best


def _config_detail(label: str, drains: list[Drain], rows: int, fixed: float) -> dict[str, Any]:
    """One configuration's figures; the 100k wall time is measured when ``rows`` is 100k,
    else projected from the rate plus the process's fixed start/stop cost."""
    rate = median([d.rate for d in drains])
    walls = [d.wall_seconds or 0.0 for d in drains]
    measured_wall = median(walls) if rows == GOAL_ROWS else None
    projected = fixed + GOAL_ROWS / rate
    return {
        "cli_args": " ".join(next(a for lbl, a, _ in LATENCY_CONFIGS if lbl == label)),
        "env": next(e for lbl, _, e in LATENCY_CONFIGS if lbl == label),
        "rows_per_s": [d.rate for d in drains],
        "median_rows_per_s": rate,
        "wall_s": walls,
        "requests": [d.requests for d in drains],
        "wall_100k_s": measured_wall if measured_wall is not None else projected,
        "wall_100k_measured": measured_wall is not None,
    }


def _add_lines(
    ctx: Context, detail: dict[str, Any], best: str, default: Drain, default_projected: float
) -> None:
    for label, item in detail["configs"].items():
        is_best = label == best
        wall = item["wall_100k_s"]
        how = "measured" if item["wall_100k_measured"] else "projected"
        ctx.report.add(Line("latency", f"{label}: rate", item["median_rows_per_s"], "rows/s"))
        ctx.report.add(
            Line(
                "latency",
                f"{label}: wall for 100k rows",
                wall,
                "s",
                target="<= 30" if is_best else "",
                passed=(
                    ctx.report.target("latency-bound 100k rows wall", wall, "<=", 30.0, how)
                    if is_best
                    else None
                ),
                note=how + (", best" if is_best else ""),
            )
        )
    ctx.report.add(
        Line(
            "latency",
            f"default CLI (batch {DEFAULTS.batch_size}, concurrency {DEFAULTS.concurrency}): "
            "wall for 100k",
            default_projected,
            "s",
            note=f"projected from {ctx.sizes.latency_default_rows} rows "
            f"at {default.rate:,.0f} rows/s",
        )
    )
