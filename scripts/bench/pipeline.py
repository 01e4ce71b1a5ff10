"""2. pipeline: the Worker draining the queue against an instant fake OpenAI server, compared
with the floor re-measured between its runs: in-process batch x concurrency grid, 1 vs 2
``queue-processor run --drain`` processes, and the CLI's default configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.cluster import check_drained
from bench.config import DEFAULTS, DIMS
from bench.context import Context
from bench.cpu import cpu_per_1000, cpu_probe, median_cpu
from bench.drain import drain_in_process, openai_factory
from bench.floor import floor_drain
from bench.processes import FakeServer, drain_processes, startup_seconds
from bench.report import Line, cpu_note, median, progress


@dataclass
class _Grid:
    """Rows/s and CPU per 1,000 rows of each in-process run, and of the adjacent floor."""

    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    floor_rates: list[float] = field(default_factory=list)
    floor_cpu: list[dict[str, float]] = field(default_factory=list)


def run(ctx: Context) -> None:
    sizes = ctx.sizes
    template = ctx.cluster.loaded(ctx.corpus, sizes.pipeline_rows)
    floor_batch, floor_conc = ctx.floor_config
    detail: dict[str, Any] = {
        "rows": sizes.pipeline_rows,
        "floor_section_rows_per_s": ctx.floor_rate,
        "floor_config": f"batch={floor_batch} concurrency={floor_conc}",
    }
    with FakeServer(DIMS) as server:
        grid = _measure_grid(ctx, template, server)
        floor, medians, best_key = _report_grid(ctx, grid, detail)
        best_batch, best_conc = (int(part.split("=")[1]) for part in best_key.split())
        cli_args = ["--batch-size", str(best_batch), "--concurrency", str(best_conc)]
        proc_medians = _processes(ctx, template, server, cli_args, floor, detail)
        default_rate = _default_cli(ctx, template, server, detail)
    _verdicts(ctx, detail, floor, medians, proc_medians, default_rate)


def _measure_grid(ctx: Context, template: str, server: FakeServer) -> _Grid:
    sizes, cluster = ctx.sizes, ctx.cluster
    floor_batch, floor_conc = ctx.floor_config
    factory = openai_factory(server.base_url)
    grid = _Grid()
    probe = cpu_probe(cluster, server)
    for rep in range(sizes.repeats):
        # The floor again, between pipeline runs: the ratios compare runs that saw the
        # same machine load (this machine is shared and noisy).
        with cluster.fresh(template) as dsn:
            drain = floor_drain(dsn, floor_batch, floor_conc, probe)
            check_drained(dsn, sizes.pipeline_rows, "floor (adjacent)")
        grid.floor_rates.append(drain.rate)
        grid.floor_cpu.append(cpu_per_1000(drain.cpu_s, sizes.pipeline_rows))
        progress(f"pipeline: floor (adjacent) rep {rep + 1}: {drain.rate:,.0f} rows/s")
        for batch in sizes.pipeline_batches:
            for conc in sizes.pipeline_concurrency:
                with cluster.fresh(template) as dsn:
                    drain = drain_in_process(dsn, factory, batch, conc, probe)
                    check_drained(dsn, sizes.pipeline_rows, f"pipeline b={batch} c={conc}")
                key = f"batch={batch} concurrency={conc}"
                grid.rates.setdefault(key, []).append(drain.rate)
                grid.cpu.setdefault(key, []).append(cpu_per_1000(drain.cpu_s, sizes.pipeline_rows))
                progress(
                    f"pipeline b={batch} c={conc} rep {rep + 1}: {drain.rate:,.0f} rows/s "
                    f"({drain.requests} requests)"
                )
    return grid


def _report_grid(
    ctx: Context, grid: _Grid, detail: dict[str, Any]
) -> tuple[float, dict[str, float], str]:
    """The floor line, one line per in-process configuration, the CPU-bound ratios; returns
    the floor, the median rows/s per configuration and the best configuration."""
    floor_batch, floor_conc = ctx.floor_config
    floor = median(grid.floor_rates + ([ctx.floor_rate] if ctx.floor_rate else []))
    floor_cpu = median_cpu(grid.floor_cpu)
    detail["floor_adjacent_rows_per_s"] = grid.floor_rates
    detail["floor_rows_per_s"] = floor
    detail["floor_cpu_ms_per_1000_rows"] = floor_cpu
    ctx.report.add(
        Line(
            "pipeline",
            f"floor batch={floor_batch} concurrency={floor_conc} (between pipeline runs)",
            floor,
            "rows/s",
            note="the ratios' denominator; " + cpu_note(floor_cpu),
        )
    )
    medians = {k: median(v) for k, v in grid.rates.items()}
    best_key = max(medians, key=lambda k: medians[k])
    cpu_medians = {k: median_cpu(v) for k, v in grid.cpu.items()}
    detail["in_process_rows_per_s"] = grid.rates
    detail["in_process_median_rows_per_s"] = medians
    detail["in_process_cpu_ms_per_1000_rows"] = cpu_medians
    for key, value in medians.items():
        ctx.report.add(
            Line(
                "pipeline",
                f"worker {key}",
                value,
                "rows/s",
                ratio=value / floor if floor else None,
                ratio_of="floor",
                note=("best in-process; " if key == best_key else "") + cpu_note(cpu_medians[key]),
            )
        )
    # On a machine where the cores are the limit, rows/s scale as 1 / (CPU per row of
    # every process involved): the ratio the wall clock would show with no other load.
    detail["cpu_bound_ratio"] = {}
    for key in dict.fromkeys([best_key, "batch=100 concurrency=1"]):
        if floor_cpu.get("total") and cpu_medians.get(key, {}).get("total"):
            cpu_ratio = floor_cpu["total"] / cpu_medians[key]["total"]
            detail["cpu_bound_ratio"][key] = cpu_ratio
            ctx.report.add(
                Line(
                    "pipeline",
                    f"CPU-bound ratio, worker {key}",
                    cpu_ratio,
                    "x",
                    note="floor CPU per row / pipeline CPU per row (all processes)",
                )
            )
    return floor, medians, best_key


def _processes(
    ctx: Context,
    template: str,
    server: FakeServer,
    cli_args: list[str],
    floor: float,
    detail: dict[str, Any],
) -> dict[str, float]:
    """Worker processes: the CLI as an operator runs it, 1 vs 2 at once; median rows/s."""
    sizes, cluster = ctx.sizes, ctx.cluster
    fixed = startup_seconds(cluster, server.base_url)
    detail["process_startup_s"] = fixed
    procs: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    for rep in range(sizes.repeats):
        for count in (1, 2):
            with cluster.fresh(template) as dsn:
                drain = drain_processes(dsn, server.base_url, count, cli_args)
                check_drained(dsn, sizes.pipeline_rows, f"{count} processes")
            if count > 1:
                drain.seconds = max(1e-3, drain.seconds - fixed)
            procs.setdefault(str(count), []).append(drain.rate)
            walls.setdefault(str(count), []).append(drain.wall_seconds or 0.0)
            progress(f"pipeline {count} process(es) rep {rep + 1}: {drain.rate:,.0f} rows/s")
    proc_medians = {k: median(v) for k, v in procs.items()}
    detail["processes"] = {
        "config": " ".join(cli_args),
        "rows_per_s": procs,
        "median_rows_per_s": proc_medians,
        "wall_s": walls,
        "note": "1 process: the worker's own drain time; 2: wall minus startup",
    }
    for processes, value in proc_medians.items():
        ctx.report.add(
            Line(
                "pipeline",
                f"{processes} process(es) {' '.join(cli_args)}",
                value,
                "rows/s",
                ratio=value / floor if floor else None,
                ratio_of="floor",
            )
        )
    return proc_medians


def _default_cli(ctx: Context, template: str, server: FakeServer, detail: dict[str, Any]) -> float:
    """The CLI defaults: no flags at all; median rows/s."""
    defaults: list[float] = []
    for rep in range(ctx.sizes.repeats):
        with ctx.cluster.fresh(template) as dsn:
            drain = drain_processes(dsn, server.base_url, 1)
            check_drained(dsn, ctx.sizes.pipeline_rows, "default config")
        defaults.append(drain.rate)
        progress(f"pipeline default CLI rep {rep + 1}: {drain.rate:,.0f} rows/s")
    detail["default_cli_rows_per_s"] = defaults
    return median(defaults)


def _verdicts(
    ctx: Context,
    detail: dict[str, Any],
    floor: float,
    medians: dict[str, float],
    proc_medians: dict[str, float],
    default_rate: float,
) -> None:
    """The two targets: the default CLI and the best configuration against the floor."""
    best_rate = max([*medians.values(), *proc_medians.values()])
    best_label = max(
        [(v, f"in-process {k}") for k, v in medians.items()]
        + [(v, f"{k} process(es)") for k, v in proc_medians.items()]
    )[1]
    detail["best"] = best_label
    detail["best_rows_per_s"] = best_rate
    detail["default_rows_per_s"] = default_rate
    ctx.report.sections["pipeline"] = detail
    best_ratio = best_rate / floor if floor else None
    default_ratio = default_rate / floor if floor else None
    ctx.report.add(
        Line(
            "pipeline",
            f"default CLI (batch {DEFAULTS.batch_size}, concurrency {DEFAULTS.concurrency})",
            default_rate,
            "rows/s",
            ratio=default_ratio,
            ratio_of="floor",
            target=">= 0.50",
            passed=ctx.report.target("default pipeline / floor", default_ratio, ">=", 0.50),
        )
    )
    ctx.report.add(
        Line(
            "pipeline",
            f"best: {best_label}",
            best_rate,
            "rows/s",
            ratio=best_ratio,
            ratio_of="floor",
            target=">= 0.70",
            passed=ctx.report.target("best pipeline / floor", best_ratio, ">=", 0.70),
        )
    )
