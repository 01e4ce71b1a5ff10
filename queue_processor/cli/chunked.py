"""``register TABLE --column NAME --chunks``: a chunked target, whose records' texts are
split into chunks embedded one vector each, in the companion table NAME names
(``<table>_<name>_chunks``, created by the registration)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from queue_processor import queue, render
from queue_processor.cli.args import out
from queue_processor.cli.factories import model_name, open_database
from queue_processor.cli.index_build import index_target
from queue_processor.cli.lookup import find_target
from queue_processor.errors import EXIT_OK, UsageError
from queue_processor.migrations import check_schema
from queue_processor.models import Target
from queue_processor.settings import Settings

DEFAULT_CHUNK_TOKENS = 512
DEFAULT_CHUNK_OVERLAP = 64
DEFAULT_MAX_CHUNKS = 100

# Options of a column target that mean nothing for a chunked one.
_COLUMN_ONLY = {
    "create_column": "--create-column",
    "index": "--index (a chunks table always gets its HNSW index)",
    "length_policy": "--length-policy",
    "model_column": "--model-column",
    "generated_at_column": "--generated-at-column",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The chunking options of ``register``."""
    p.add_argument(
        "--chunks",
        action="store_true",
        help="a chunked target: each row's text is split into chunks, one vector each, in "
        "the table TABLE_COLUMN_chunks this creates (--column names the target; needs "
        "--dimensions or EMBEDDING_DIMENSIONS)",
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help=f"with --chunks: tokens per chunk, 16..8192 (default {DEFAULT_CHUNK_TOKENS}; "
        "at most the model's input limit)",
    )
    p.add_argument(
        "--chunk-overlap",
        type=int,
        default=DEFAULT_CHUNK_OVERLAP,
        help=f"with --chunks: tokens a chunk repeats of the previous one, below half the "
        f"chunk size (default {DEFAULT_CHUNK_OVERLAP})",
    )
    p.add_argument(
        "--max-chunks",
        type=int,
        default=DEFAULT_MAX_CHUNKS,
        help=f"with --chunks: chunks per row at most, 1..10000 (default {DEFAULT_MAX_CHUNKS}); "
        "the rest of a longer text is not embedded and the item's detail says so",
    )


async def register_chunked(
    args: argparse.Namespace, settings: Settings, template: str | None
) -> int:
    """Register the chunked target ``args`` describe and queue existing rows if asked."""
    for option, flag in _COLUMN_ONLY.items():
        if getattr(args, option, None):
            raise UsageError(f"{flag} is for column targets, not with --chunks")
    dimensions = args.dimensions or settings.embedding_dimensions
    if not dimensions:
        raise UsageError("--chunks needs --dimensions N (or EMBEDDING_DIMENSIONS)")
    model = args.model or model_name(settings)
    # Two connections: --wait builds on one while the other renews the build's lease.
    async with open_database(settings, max_size=2) as db:
        await check_schema(db)
        label = await queue.register_chunked_target(
            db,
            args.table,
            args.column,
            dimensions=dimensions,
            chunk_tokens=args.chunk_tokens,
            chunk_overlap=args.chunk_overlap,
            max_chunks=args.max_chunks,
            content_columns=args.content or None,
            template=template,
            id_column=args.id_column,
            model=model,
        )
        queued = 0
        if args.backfill:
            mode: Literal["missing", "all"] = "all" if args.backfill == "all" else "missing"
            queued = await queue.backfill(db, label, args.column, mode)
            out(f"queued for embedding: {queued} row(s) ({mode})")
        # The chunks table's HNSW index: now, or (a backlog of at least
        # QUEUE_PROCESSOR_INDEX_DEFER_ROWS rows) once the backlog is embedded, as a column
        # target's --index.
        target = await find_target(db, label, args.column)
        await index_target(db, target, queue.hnsw_spec(target), queued, args, settings)
    out(
        f"registered chunked target {label}.{args.column} (model {model}): chunks of "
        f"{args.chunk_tokens} tokens, overlap {args.chunk_overlap}, at most {args.max_chunks} "
        "per row"
    )
    return EXIT_OK


def print_chunk_results(
    args: argparse.Namespace,
    target: Target,
    rows: Sequence[Mapping[str, Any]],
    *,
    indexed: bool,
    index_state: str | None,
) -> int:
    """``search`` on a chunked target: each record's best chunk, nearest first; as a column
    target's, says when no valid index served it (``indexed``; ``index_state``: its build's
    state)."""
    if args.json:
        scan = "index" if indexed else "sequential"
        report = {"query": args.text, "results": list(rows), "scan": scan}
        out(render.dumps({**report, "index_state": index_state}))
        return EXIT_OK
    shown = [{**r, "chunk_text": str(r["chunk_text"])[:160]} for r in rows]
    render.stdout_console().print(
        render.rows_table(
            f"nearest to {args.text!r} in {target.table_name} (best chunk per row)",
            shown,
            ["id", "chunk_index", "distance", "chunk_text"],
        )
    )
    if not indexed:
        out(sequential_scan_note(target, index_state))
    return EXIT_OK


def sequential_scan_note(target: Target, index_state: str | None) -> str:
    """What ``search`` says when no valid vector index served the query."""
    why = f"its index is {index_state}" if index_state else "it has no vector index"
    return (
        f"note: {target.table_name}.{target.embedding_column} was searched by a "
        f"sequential scan (exact, slower on large tables): {why}"
    )
