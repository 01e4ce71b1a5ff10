"""12. pooler: the Worker draining the same queue directly and through a real PgBouncer in
transaction mode (QUEUE_PROCESSOR_POOLED: no prepared statements, every transaction pins its
search_path and timeouts), against the instant fake OpenAI server; rows/s and the ratio.

PgBouncer is Debian's ``pgbouncer`` (``.ci/run`` installs it; ``apt-get install pgbouncer``),
started by the launcher the product ships for tests (``queue_processor.testing.pgbouncer``) in
front of the benchmark's server; the section says so and is skipped when the binary is
missing."""

from __future__ import annotations

from bench.cluster import check_drained
from bench.config import DEFAULTS, DIMS
from bench.context import Context
from bench.drain import drain_in_process, openai_factory
from bench.processes import FakeServer
from bench.report import Line, median, progress
from queue_processor.testing.pgbouncer import PgBouncer, PgBouncerMissing


def run(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = sizes.pipeline_rows
    template = cluster.loaded(ctx.corpus, rows)
    rates: dict[str, list[float]] = {"direct": [], "pooled": []}
    try:
        bouncer = PgBouncer(cluster.admin_dsn).start()
    except PgBouncerMissing as exc:
        progress(f"pooler: skipped ({exc})")
        return
    try:
        with FakeServer(DIMS) as server:
            factory = openai_factory(server.base_url)
            for rep in range(sizes.repeats):
                for kind in ("direct", "pooled"):
                    with cluster.fresh(template) as dsn:
                        url = bouncer.url(dsn) if kind == "pooled" else dsn
                        drain = drain_in_process(
                            url,
                            factory,
                            DEFAULTS.batch_size,
                            DEFAULTS.concurrency,
                            pooled=kind == "pooled",
                        )
                        check_drained(dsn, rows, f"pooler {kind}")
                    rates[kind].append(drain.rate)
                    progress(f"pooler {kind} rep {rep + 1}: {drain.rate:,.0f} rows/s")
    finally:
        bouncer.stop()
    direct, pooled = median(rates["direct"]), median(rates["pooled"])
    ctx.report.sections["pooler"] = {"rows": rows, "direct": direct, "pooled": pooled}
    label = f"{rows:,} rows, batch {DEFAULTS.batch_size} x {DEFAULTS.concurrency}"
    ctx.report.add(Line("pooler", f"{label}, direct: rows/s", direct, "/s"))
    ctx.report.add(
        Line(
            "pooler",
            f"{label}, through PgBouncer (transaction mode): rows/s",
            pooled,
            "/s",
            ratio=pooled / direct,
            ratio_of="direct",
        )
    )
