"""13. chunks: drain throughput of a chunked target next to a column target on the same data.

The same ~1,700-token texts (12 corpus texts joined, counted with cl100k_base) go once to a
column target (one vector per record) and once to a chunked target (chunks of 512 tokens
with 64 of overlap: ~4.7 vectors per record, in the companion table, each record's set
replaced in the acknowledging transaction), both drained by the in-process Worker against
the fake server enforcing OpenAI's limits; each with and without an HNSW index on its
vectors, and the chunked target once more the product's way for a backlog past
QUEUE_PROCESSOR_INDEX_DEFER_ROWS: the index deferred and built by the draining worker (its
build inside the drain's clock, and reported on its own). Reports records/s of all five and
chunks/s of the chunked ones; one run each (``--repeats`` repeats them)."""

from __future__ import annotations

from typing import Any, Literal

import psycopg

from bench.cluster import check_drained, copy_rows, create_docs, expand_inbox, register
from bench.config import DEFAULTS, DIMS
from bench.context import Context
from bench.drain import drain_in_process, openai_factory
from bench.processes import FakeServer
from bench.report import Line, median, progress

_PARTS = 12  # corpus texts per record: ~1,700 cl100k tokens
CHUNK_TOKENS = 512
CHUNK_OVERLAP = 64
# The vectors' HNSW index: there from the start, none, or deferred (built after the drain).
Index = Literal["at_once", "none", "deferred"]


def run(ctx: Context) -> None:
    sizes = ctx.sizes
    rows = max(200, sizes.pipeline_rows // 20)
    # Both kinds with and without an HNSW index (HNSW inserts are most of a chunked drain's
    # cost), and a chunked target whose index is deferred past its backlog (the product's
    # path for a backlog at or over QUEUE_PROCESSOR_INDEX_DEFER_ROWS).
    kinds: dict[str, tuple[bool, Index]] = {
        "column": (False, "none"),
        "column+hnsw": (False, "at_once"),
        "chunked": (True, "at_once"),
        "chunked-deferred": (True, "deferred"),
        "chunked-noindex": (True, "none"),
    }
    templates = {
        kind: _template(ctx, rows, chunked=chunked, index=index)
        for kind, (chunked, index) in kinds.items()
    }
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    chunk_rates: dict[str, list[float]] = {k: [] for k in kinds if k.startswith("chunked")}
    build_seconds: list[float] = []
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
                    if kind.startswith("column"):
                        check_drained(dsn, rows, f"chunks {kind}")
                    else:
                        chunks = _check_chunked(dsn, rows)
                        chunk_rates[kind].append(chunks / drain.seconds)
                    if kinds[kind][1] == "deferred":
                        build_seconds.append(_built_in_seconds(dsn))
                rates[kind].append(drain.rate)
                progress(f"chunks {kind} rep {rep + 1}: {drain.rate:,.0f} records/s")
    detail: dict[str, Any] = {
        "rows": rows,
        "chunks": chunks,
        "chunk_tokens": CHUNK_TOKENS,
        "chunk_overlap": CHUNK_OVERLAP,
        "batch_size": DEFAULTS.batch_size,
        "records_per_s": {kind: median(r) for kind, r in rates.items()},
        "chunks_per_s": {kind: median(r) for kind, r in chunk_rates.items()},
        "deferred_build_seconds": median(build_seconds),
    }
    ctx.report.sections["chunks"] = detail
    column = median(rates["column"])
    labels = {
        "column": f"{rows:,} ~1,700-token texts, column target: records/s",
        "column+hnsw": "same texts, column target with an HNSW index: records/s",
        "chunked": f"same texts, chunked target ({chunks:,} chunks of {CHUNK_TOKENS}, "
        "HNSW): records/s",
        "chunked-deferred": "same, its HNSW index deferred, built after the drain (timed): "
        "records/s",
        "chunked-noindex": "same, chunks table without its HNSW index: records/s",
    }
    for kind, label in labels.items():
        note = f"chunks/s: {median(chunk_rates[kind]):,.0f}" if kind in chunk_rates else ""
        if kind == "chunked-deferred":
            note += f"; build {median(build_seconds):.1f} s"
        ctx.report.add(
            Line(
                "chunks",
                label,
                median(rates[kind]),
                "/s",
                ratio=None if kind == "column" else median(rates[kind]) / column,
                ratio_of="column",
                note=note,
            )
        )


def _template(ctx: Context, rows: int, *, chunked: bool, index: Index) -> str:
    """A template with ``docs`` of ``rows`` long texts queued for a column target, or for a
    chunked target ``body``; with an HNSW index on the vectors from the start, none, or
    (``deferred``, chunked) the product's deferral: the rows exist first, the registration
    queues them (a backfill), and the chunks table's index is recorded as wanted, as
    ``register --chunks --backfill`` does past QUEUE_PROCESSOR_INDEX_DEFER_ROWS queued rows;
    the draining worker builds it once the backlog drained, inside the drain's clock."""
    name, dsn = ctx.cluster.create(ctx.cluster.base())
    texts = ctx.corpus.texts(_PARTS + rows)
    payload = "".join(
        f"{i + 1}\t" + " ".join(texts[i : i + _PARTS]) + "\n" for i in range(rows)
    ).encode()
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_docs(conn, "docs", DIMS)
        if chunked and index == "deferred":
            copy_rows(conn, "docs", payload)
            conn.execute(
                "SELECT embedding_chunks_register('docs', 'body', ARRAY['body'], NULL, NULL,"
                " NULL, %s, %s, %s, 100, 'missing', false)",
                (DIMS, CHUNK_TOKENS, CHUNK_OVERLAP),
            )
            conn.execute(
                "INSERT INTO embedding_index_builds"
                " (table_name, embedding_column, index_name, opclass, state)"
                " VALUES ('docs', 'body', 'docs_body_chunks_hnsw', 'vector_cosine_ops',"
                " 'pending')"
            )
        elif chunked:
            conn.execute(
                "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
                " p_dimensions => %s, p_chunk_tokens => %s, p_chunk_overlap => %s)",
                (DIMS, CHUNK_TOKENS, CHUNK_OVERLAP),
            )
            if index == "none":
                conn.execute("DROP INDEX docs_body_chunks_hnsw")
        else:
            register(conn, "docs")
            if index == "at_once":
                conn.execute("CREATE INDEX ON docs USING hnsw (embedding vector_cosine_ops)")
        if index != "deferred":
            copy_rows(conn, "docs", payload)
        expand_inbox(conn)
        conn.execute("VACUUM ANALYZE")
    return name


def _built_in_seconds(dsn: str) -> float:
    """How long the deferred build of the chunks index took; RuntimeError unless it was
    built (valid) during the drain."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT b.state, extract(epoch FROM b.finished_at - b.started_at)::float8,"
            " (SELECT indisvalid FROM pg_index"
            "   WHERE indexrelid = to_regclass('docs_body_chunks_hnsw'))"
            " FROM embedding_index_builds AS b"
        ).fetchone()
    if row is None or row[0] != "ready" or row[2] is not True:
        raise RuntimeError(f"chunks: the deferred index was not built during the drain: {row}")
    return float(row[1])


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
