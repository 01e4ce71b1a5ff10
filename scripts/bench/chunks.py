"""13. chunks: drain throughput of a chunked target next to a column target on the same data.

The same ~1,800-token texts (12 corpus texts joined, counted with cl100k_base) go once to a
column target (one vector per record) and once to a chunked target (chunks of 512 tokens
with 64 of overlap: ~4-5 vectors per record, in the companion table, each record's set
replaced in the acknowledging transaction), both drained by the in-process Worker against
the fake server enforcing OpenAI's limits. Reports records/s of both and chunks/s of the
chunked one; one run each (``--repeats`` repeats them)."""

from __future__ import annotations

from typing import Any

import psycopg

from bench.cluster import check_drained, copy_rows, create_docs, expand_inbox, register
from bench.config import DEFAULTS, DIMS
from bench.context import Context
from bench.drain import drain_in_process, openai_factory
from bench.processes import FakeServer
from bench.report import Line, median, progress

_PARTS = 12  # corpus texts per record: ~1,800 cl100k tokens
CHUNK_TOKENS = 512
CHUNK_OVERLAP = 64


def run(ctx: Context) -> None:
    sizes = ctx.sizes
    rows = max(200, sizes.pipeline_rows // 20)
    templates = {
        kind: _template(ctx, rows, chunked=kind == "chunked") for kind in ("column", "chunked")
    }
    rates: dict[str, list[float]] = {"column": [], "chunked": []}
    chunk_rates: list[float] = []
    chunks = 0
    with FakeServer(DIMS) as server:
        server.configure(max_input_tokens=8192, max_request_tokens=300_000)
        factory = openai_factory(server.base_url)
        for rep in range(sizes.repeats):
            for kind, template in templates.items():
                with ctx.cluster.fresh(template) as dsn:
                    drain = drain_in_process(
                        dsn, factory, DEFAULTS.batch_size, DEFAULTS.concurrency
                    )
                    if kind == "column":
                        check_drained(dsn, rows, "chunks column")
                    else:
                        chunks = _check_chunked(dsn, rows)
                        chunk_rates.append(chunks / drain.seconds)
                rates[kind].append(drain.rate)
                progress(f"chunks {kind} rep {rep + 1}: {drain.rate:,.0f} records/s")
    detail: dict[str, Any] = {
        "rows": rows,
        "chunks": chunks,
        "chunk_tokens": CHUNK_TOKENS,
        "chunk_overlap": CHUNK_OVERLAP,
        "batch_size": DEFAULTS.batch_size,
        "column_records_per_s": median(rates["column"]),
        "chunked_records_per_s": median(rates["chunked"]),
        "chunked_chunks_per_s": median(chunk_rates),
    }
    ctx.report.sections["chunks"] = detail
    ctx.report.add(
        Line(
            "chunks",
            f"{rows:,} ~1,800-token texts, column target: records/s",
            median(rates["column"]),
            "/s",
        )
    )
    ctx.report.add(
        Line(
            "chunks",
            f"same texts, chunked target ({chunks:,} chunks of {CHUNK_TOKENS}): records/s",
            median(rates["chunked"]),
            "/s",
            ratio=median(rates["chunked"]) / median(rates["column"]),
            ratio_of="column",
            note=f"chunks/s: {median(chunk_rates):,.0f}",
        )
    )


def _template(ctx: Context, rows: int, *, chunked: bool) -> str:
    """A template with ``docs`` of ``rows`` long texts queued for a column target, or for a
    chunked target ``body``."""
    name, dsn = ctx.cluster.create(ctx.cluster.base())
    texts = ctx.corpus.texts(_PARTS + rows)
    payload = "".join(
        f"{i + 1}\t" + " ".join(texts[i : i + _PARTS]) + "\n" for i in range(rows)
    ).encode()
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_docs(conn, "docs", DIMS)
        if chunked:
            conn.execute(
                "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
                " p_dimensions => %s, p_chunk_tokens => %s, p_chunk_overlap => %s)",
                (DIMS, CHUNK_TOKENS, CHUNK_OVERLAP),
            )
        else:
            register(conn, "docs")
        copy_rows(conn, "docs", payload)
        expand_inbox(conn)
        conn.execute("VACUUM ANALYZE")
    return name


def _check_chunked(dsn: str, rows: int) -> int:
    """Every record done with chunks; returns the number of chunks written."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = conn.execute("SELECT count(*) FROM embedding_queue WHERE status = 'done'").fetchone()
        found = conn.execute(
            "SELECT count(*), count(DISTINCT record_id) FROM docs_body_chunks"
        ).fetchone()
    if done is None or found is None or int(done[0]) != rows or int(found[1]) != rows:
        raise RuntimeError(f"chunks: {done} done, {found} (chunks, records), expected {rows}")
    return int(found[0])
