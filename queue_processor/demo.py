"""``queue-processor demo``: the whole pipeline on a sample table, in one command.

``run_demo`` installs the queue schema, creates ``public.demo_documents`` (300 short
documents on ten topics, shipped as package data) with a vector column sized for the
provider, registers it as a target with an HNSW index, lets the triggers queue every row,
drains the queue with a progress bar, prints the queue status, runs three semantic searches,
then rewrites one row and drains again to show that exactly that row was re-embedded.

It is re-runnable: an existing demo table is kept and reset to the shipped documents (or
dropped and recreated when its vector dimension does not match the provider). Its SQL lives
in ``demo.sql``; queue_processor.db fills its slots with pgvector's names, values are bound.
Its documents, searches and rewrite are in ``demo_data``, its tables in ``demo_view``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from queue_processor import queue
from queue_processor.db import Database, Query, Row, Slot, float4_array, statement, type_modifier
from queue_processor.demo_data import REWRITE, REWRITE_TITLE, SEARCHES, load_documents
from queue_processor.demo_view import before_after_table, hits_table, say_ok
from queue_processor.errors import ConfigurationError, PermanentError, StatementFailed
from queue_processor.migrations import migrate
from queue_processor.providers.base import EmbeddingProvider
from queue_processor.providers.packing import Vector
from queue_processor.worker import BatchReport, RunSummary, Worker, WorkerConfig

TABLE = "public.demo_documents"
DEMO_BATCH_SIZE = 32
"""The demo's claim size: small enough that the progress bar moves batch by batch."""
TABLE_LABEL = "demo_documents"
"""The label queue rows carry (tables in schema public are labelled by their bare name)."""
COLUMN = "embedding"
TEMPLATE = "Title: {title}\nTopic: {topic}\n{body}"


def _statement(name: str, **slots: Slot) -> Query:
    """The named statement from demo.sql with its ``{slots}`` filled (see db.statement)."""
    return statement(name, source="demo.sql", **slots)


@dataclass(frozen=True)
class _Vector:
    """pgvector's objects, qualified by the schema the extension lives in."""

    type: tuple[str, str]
    opclass: tuple[str, str]
    distance: Query


async def run_demo(
    db: Database,
    provider: EmbeddingProvider,
    *,
    console: Console,
    config: WorkerConfig,
) -> int:
    """Run the demo on ``db`` with ``provider``, printing to ``console``; return 0 on success
    and 1 when a check fails (rows left without a vector, a re-embed that touched other rows).

    Side effects: migrates the queue schema, (re)creates and fills ``public.demo_documents``
    and registers it as a target. ``config`` is the worker's (``DEMO_BATCH_SIZE`` per claim).
    """
    started = time.monotonic()
    console.print(Text("queue-processor demo", style="bold"))
    console.print(f"provider: {provider.name} · model: {provider.model}", highlight=False)
    applied = await migrate(db)
    say_ok(console, f"queue schema {'installed' if applied else 'up to date'}")

    with console.status(f"Loading the embedding model {provider.model}…"):
        load_started = time.monotonic()
        dims = await _dimensions(provider)
    say_ok(console, f"model ready: {dims} dimensions ({time.monotonic() - load_started:.1f} s)")

    vector = await _vector_objects(db)
    label = await _install_documents(db, console, vector, provider.model, dims)

    summary = await _drain(db, provider, console, label, config, "Embedding")
    say_ok(
        console,
        f"embedded {summary.processed} documents in {summary.duration_seconds:.1f} s "
        f"({summary.rows_per_second:.0f} rows/s, {summary.batches} batches, "
        f"{summary.requests} model calls)",
    )
    await _print_status(db, console)

    if not await _all_embedded(db, console, summary):
        return 1

    for query, expected in SEARCHES:
        hits = await _search(db, provider, vector, query, k=5)
        console.print(hits_table(f'Search: "{query}"', hits, expected))

    ok = await _rewrite_one(db, provider, vector, console, label, config)
    if not ok:
        return 1
    console.print(f"\nDone in {time.monotonic() - started:.1f} s. Look around with psql:")
    console.print(
        f"  psql \"$(queue-processor db-url)\" -c 'SELECT id, topic, title FROM {TABLE_LABEL}'",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    return 0


# --- steps ------------------------------------------------------------------------------


async def _install_documents(
    db: Database, console: Console, vector: _Vector, model: str, dims: int
) -> str:
    """(Re)create and fill the demo table, register it as a target; return its label."""
    documents = load_documents()
    recreated = await _prepare_table(db, vector, dims)
    label = await queue.register_target(
        db,
        TABLE,
        COLUMN,
        template=TEMPLATE,
        model=model,
        dimensions=dims,
        model_column="model",
        generated_at_column="embedded_at",
    )
    async with db.connection() as conn:
        await db.execute(conn, _statement("reset_documents"))
        await db.execute(
            conn,
            _statement("insert_documents"),
            {
                "titles": [d.title for d in documents],
                "bodies": [d.body for d in documents],
                "topics": [d.topic for d in documents],
            },
        )
    say_ok(
        console,
        f"table {TABLE} {'created' if recreated else 'reset'} with {len(documents)} documents",
    )
    say_ok(
        console,
        f"registered {label}.{COLUMN} with an HNSW cosine index; the insert trigger queued "
        f"{await _pending(db, label)} rows",
    )
    return label


async def _all_embedded(db: Database, console: Console, summary: RunSummary) -> bool:
    """True when every demo row has its vector; otherwise say how many have none."""
    async with db.connection() as conn:
        coverage = await db.fetch_one(conn, _statement("coverage"))
    assert coverage is not None
    if coverage["embedded"] == coverage["total"] and not summary.failed:
        return True
    console.print(
        f"[red]✗ {coverage['total'] - coverage['embedded']} of {coverage['total']} rows "
        f"have no embedding ({summary.failed} failed, {summary.retried} retried later)[/red]"
    )
    return False


async def _dimensions(provider: EmbeddingProvider) -> int:
    """The provider's output dimension; embeds one probe text when it is not known yet
    (for the local provider this loads the model)."""
    if provider.dimensions is not None:
        return provider.dimensions
    result = await provider.embed(["dimension probe"])
    vector = result.vectors[0]
    if vector is None:
        raise ConfigurationError(
            f"the provider could not embed a probe text: {result.errors.get(0, 'no vector')}"
        )
    return int(vector.shape[0])


async def _vector_objects(db: Database) -> _Vector:
    """Find (installing it if needed) pgvector and name its type, opclass and operator."""
    try:
        async with db.connection() as conn:
            row = await db.fetch_one(conn, _statement("vector_schema"))
            if row is None:
                await db.execute(conn, _statement("create_vector_extension"))
                row = await db.fetch_one(conn, _statement("vector_schema"))
    except StatementFailed as exc:
        raise ConfigurationError(
            f"the demo needs the pgvector extension and could not install it: {exc}"
        ) from exc
    if row is None:
        raise ConfigurationError("the demo needs the pgvector extension (CREATE EXTENSION vector)")
    schema = str(row["schema"])
    return _Vector(
        type=(schema, "vector"),
        opclass=(schema, "vector_cosine_ops"),
        distance=statement("cosine_distance_operator", schema=schema),
    )


async def _prepare_table(db: Database, vector: _Vector, dims: int) -> bool:
    """Create the demo table and its index; recreate it when its vector dimension differs.
    Returns True when the table was (re)created."""
    if dims <= 0:
        raise ConfigurationError(f"the provider reported {dims} dimensions")
    async with db.connection() as conn:
        shape = await db.fetch_one(conn, _statement("table_shape"))
    assert shape is not None
    present = bool(shape["present"])
    if present and shape["dims"] != dims:
        # Another model (another dimension) ran the demo before: start over.
        await queue.unregister_target(db, TABLE_LABEL, COLUMN)
        async with db.connection() as conn:
            await db.execute(conn, _statement("drop_table"))
        present = False
    async with db.connection() as conn:
        await db.execute(
            conn, _statement("create_table", vector=vector.type, dims=type_modifier(dims))
        )
        await db.execute(conn, _statement("create_index", opclass=vector.opclass))
    return not present


async def _pending(db: Database, label: str) -> int:
    """Queued (pending or in-flight) items of the demo target."""
    rows = await queue.estimate_pending(db)
    return sum(
        int(r["items"])
        for r in rows
        if r["table_name"] == label and r["embedding_column"] == COLUMN
    )


async def _drain(
    db: Database,
    provider: EmbeddingProvider,
    console: Console,
    label: str,
    config: WorkerConfig,
    description: str,
) -> RunSummary:
    """Run a worker until nothing is claimable, advancing a progress bar per batch."""
    total = await _pending(db, label)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(report: BatchReport) -> None:
            progress.advance(task, report.done + report.failed + report.skipped)

        worker = Worker(db, provider, config, observers=[advance])
        return await worker.run("drain")


async def _print_status(db: Database, console: Console) -> None:
    report = await queue.status(db)
    table = Table(title="Queue status", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("table")
    table.add_column("column")
    table.add_column("status")
    table.add_column("count", justify="right")
    for row in report.counts:
        table.add_row(
            Text(str(row["table_name"])),
            Text(str(row["embedding_column"])),
            Text(str(row["status"])),
            str(row["count"]),
        )
    console.print(table)


async def _embed_one(provider: EmbeddingProvider, text: str) -> Vector:
    result = await provider.embed([text])
    vector = result.vectors[0]
    if vector is None:
        raise PermanentError(f"could not embed {text!r}: {result.errors.get(0, 'no vector')}")
    return vector


async def _search(
    db: Database, provider: EmbeddingProvider, vector: _Vector, query: str, *, k: int
) -> list[Row]:
    query_vector = await _embed_one(provider, query)
    async with db.connection() as conn:
        return await db.fetch_all(
            conn,
            _statement("search", distance=vector.distance, vector=vector.type),
            {"query": float4_array(query_vector), "k": k},
        )


async def _neighbours(db: Database, vector: _Vector, document_id: int, k: int) -> list[Row]:
    async with db.connection() as conn:
        return await db.fetch_all(
            conn, _statement("neighbours", distance=vector.distance), {"id": document_id, "k": k}
        )


async def _rewrite_one(
    db: Database,
    provider: EmbeddingProvider,
    vector: _Vector,
    console: Console,
    label: str,
    config: WorkerConfig,
) -> bool:
    """Rewrite one row, drain again and check that exactly that row was re-embedded."""
    async with db.connection() as conn:
        before = await db.fetch_one(conn, _statement("find_document"), {"title": REWRITE_TITLE})
        coverage = await db.fetch_one(conn, _statement("coverage"))
    if before is None or coverage is None:
        raise PermanentError(f"the demo row {REWRITE_TITLE!r} is missing")
    document_id = int(before["id"])
    watermark: datetime = coverage["last_embedded_at"]
    neighbours_before = await _neighbours(db, vector, document_id, 3)

    console.print()
    console.print(
        Text.assemble(
            ("Change one row: ", "bold"),
            f'document {document_id} "{before["title"]}" ({before["topic"]}) becomes '
            f'"{REWRITE["title"]}" ({REWRITE["topic"]}).',
        )
    )
    async with db.connection() as conn:
        await db.execute(conn, _statement("update_document"), {"id": document_id, **REWRITE})
    queued = await _pending(db, label)
    console.print(
        f"The update trigger queued {queued} row{'' if queued == 1 else 's'}; draining again:"
    )
    summary = await _drain(db, provider, console, label, config, "Re-embedding")

    async with db.connection() as conn:
        after = await db.fetch_one(conn, _statement("get_document"), {"id": document_id})
        changed = await db.fetch_all(conn, _statement("embedded_since"), {"since": watermark})
    assert after is not None
    neighbours_after = await _neighbours(db, vector, document_id, 3)

    console.print(before_after_table(document_id, before, after))
    for when, rows in (("before", neighbours_before), ("after", neighbours_after)):
        console.print(
            hits_table(f"Nearest rows to document {document_id}, {when}", rows, str(after["topic"]))
        )

    changed_ids = [int(r["id"]) for r in changed]
    if (
        changed_ids == [document_id]
        and summary.processed == 1
        and after["embedded_at"] > before["embedded_at"]
    ):
        say_ok(
            console,
            f"exactly one row was re-embedded (id {document_id}); the other "
            f"{int(coverage['total']) - 1} kept their vectors",
        )
        return True
    console.print(
        f"[red]✗ expected only row {document_id} to be re-embedded; rows re-embedded: "
        f"{changed_ids}, worker processed {summary.processed}[/red]"
    )
    return False
