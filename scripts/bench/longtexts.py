"""9. longtexts: the cost of the length policy. The Worker draining ~12,000-token texts
(each cut to text-embedding-3-small's 8,191 tokens, counted exactly with cl100k_base) next to
the same number of ~150-token texts, against the fake server enforcing OpenAI's limits
(8,192 tokens per input, 300,000 per request): records/s and tokens sent per second."""

from __future__ import annotations

from typing import Any

import psycopg

from bench.cluster import check_drained, copy_rows, create_docs, expand_inbox, register
from bench.config import DEFAULTS, DIMS
from bench.context import Context
from bench.drain import drain_in_process, openai_factory
from bench.processes import FakeServer
from bench.report import Line, median, progress

# Texts of the corpus joined into one long text: ~12,000 cl100k tokens.
_PARTS = 80


def run(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = max(100, sizes.pipeline_rows // 30)
    short = cluster.loaded(ctx.corpus, rows)
    long = _long_template(ctx, rows)
    detail: dict[str, Any] = {"rows": rows, "batch_size": DEFAULTS.batch_size}
    rates: dict[str, list[float]] = {"short": [], "long": []}
    tokens: dict[str, list[float]] = {"short": [], "long": []}
    with FakeServer(DIMS) as server:
        server.configure(max_input_tokens=8192, max_request_tokens=300_000)
        factory = openai_factory(server.base_url)
        for rep in range(sizes.repeats):
            for kind, template in (("short", short), ("long", long)):
                with cluster.fresh(template) as dsn:
                    drain = drain_in_process(
                        dsn, factory, DEFAULTS.batch_size, DEFAULTS.concurrency
                    )
                    check_drained(dsn, rows, f"longtexts {kind}")
                    sent = _tokens_recorded(dsn)
                    if kind == "long":
                        _check_truncated(dsn, rows)
                rates[kind].append(drain.rate)
                tokens[kind].append(sent / drain.seconds)
                progress(f"longtexts {kind} rep {rep + 1}: {drain.rate:,.0f} records/s")
    for kind in ("short", "long"):
        detail[kind] = {
            "records_per_s": median(rates[kind]),
            "tokens_per_s": median(tokens[kind]),
        }
    ctx.report.sections["longtexts"] = detail
    ctx.report.add(
        Line("longtexts", f"{rows:,} ~150-token texts: records/s", median(rates["short"]), "/s")
    )
    ratio = median(rates["long"]) / median(rates["short"])
    ctx.report.add(
        Line(
            "longtexts",
            f"{rows:,} ~12,000-token texts truncated to 8,191: records/s",
            median(rates["long"]),
            "/s",
            ratio=ratio,
            ratio_of="short",
            note=f"tokens/s sent (the server's count): {median(tokens['long']):,.0f} "
            f"vs {median(tokens['short']):,.0f}",
        )
    )


def _long_template(ctx: Context, rows: int) -> str:
    """A template with a registered ``docs`` table of ``rows`` long texts, queued."""
    name, dsn = ctx.cluster.create(ctx.cluster.base())
    texts = ctx.corpus.texts(_PARTS + rows)
    payload = "".join(
        f"{i + 1}\t" + " ".join(texts[i : i + _PARTS]) + "\n" for i in range(rows)
    ).encode()
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_docs(conn, "docs", DIMS)
        register(conn, "docs")
        copy_rows(conn, "docs", payload)
        expand_inbox(conn)
        conn.execute("VACUUM ANALYZE")
    return name


def _tokens_recorded(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(tokens), 0) FROM embedding_usage").fetchone()
    return int(row[0]) if row else 0


def _check_truncated(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM embedding_queue WHERE detail LIKE 'truncated to 8,191 of %'"
        ).fetchone()
    if row is None or int(row[0]) != rows:
        raise RuntimeError(f"longtexts: {row} items truncated, expected {rows}")
