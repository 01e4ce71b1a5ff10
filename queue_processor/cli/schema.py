"""Installing things in the database: ``migrate``, ``register``, ``build-index``,
``unregister``, ``bind``."""

from __future__ import annotations

import argparse
from typing import Literal

from queue_processor import queue
from queue_processor.cli.args import Subparsers, out
from queue_processor.cli.chunked import add_arguments as add_chunk_arguments
from queue_processor.cli.chunked import register_chunked
from queue_processor.cli.factories import model_name, open_database
from queue_processor.cli.index_build import index_target, wait_and_build
from queue_processor.cli.lookup import find_target
from queue_processor.errors import EXIT_FAILED, EXIT_OK, UsageError
from queue_processor.migrations import check_schema, migrate, plan
from queue_processor.models import (
    HNSW_DEFAULT_EF_CONSTRUCTION,
    HNSW_DEFAULT_M,
    LENGTH_POLICIES,
)
from queue_processor.settings import Settings


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Apply pending migrations and changed function files (or, --dry-run, list them)."""
    if args.dry_run:
        await _print_plan(settings)
        return EXIT_OK
    async with open_database(settings, max_size=1) as db:
        applied = await migrate(db, allow_unsafe_schema=args.allow_unsafe_schema)
    if applied:
        out(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}")
    else:
        out("schema is up to date")
    return EXIT_OK


async def _print_plan(settings: Settings) -> None:
    """What ``migrate`` would do (and whether it would refuse), changing nothing."""
    async with open_database(settings, max_size=1) as db:
        todo = await plan(db)
    if todo.schema_creators:
        out(
            f"would refuse: roles other than its owner may CREATE in schema "
            f"{settings.queue_schema!r} ({todo.schema_creators}); see --allow-unsafe-schema"
        )
    if todo.up_to_date:
        out("schema is up to date")
    for m in todo.migrations:
        out(f"would apply migration {m.version:04d}_{m.name}")
    if todo.function_files:
        out(
            f"would apply function files {', '.join(todo.function_files)}, then regenerate "
            "every registered target's triggers and re-grant every worker role"
        )


async def cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    """Register a target (optionally creating its column and index, queueing existing rows)."""
    # Operators type '\n' for a newline; decode backslash escapes but keep non-ASCII text.
    template = (
        args.template.encode("latin-1", "backslashreplace").decode("unicode_escape")
        if args.template
        else None
    )
    if args.chunks:
        return await register_chunked(args, settings, template)
    if args.create_column and not args.dimensions:
        raise UsageError("--create-column needs --dimensions N")
    if args.wait and not args.index:
        raise UsageError("--wait needs --index hnsw")
    # Two connections: --wait builds on one while the other renews the build's lease.
    async with open_database(settings, max_size=2) as db:
        await check_schema(db)
        if args.create_column:
            kind = await queue.add_embedding_column(db, args.table, args.column, args.dimensions)
            out(f"column {args.column} is {kind}({args.dimensions})")
        label = await queue.register_target(
            db,
            args.table,
            args.column,
            content_columns=args.content or None,
            template=template,
            id_column=args.id_column,
            # The target is bound to this model: only workers embedding with it claim its
            # items (default: the model this command is configured with, EMBEDDING_MODEL).
            model=args.model or model_name(settings),
            dimensions=args.dimensions,
            model_column=args.model_column,
            generated_at_column=args.generated_at_column,
        )
        if args.length_policy:
            await queue.set_length_policy(db, label, args.column, args.length_policy)
            out(f"texts over the model's input limit: {args.length_policy}")
        spec = None
        if args.index:
            target = await find_target(db, label, args.column)
            spec = queue.hnsw_spec(target, m=args.index_m, ef_construction=args.index_ef)
        queued = 0
        if args.backfill:
            mode: Literal["missing", "all"] = "all" if args.backfill == "all" else "missing"
            queued = await queue.backfill(db, label, args.column, mode)
            out(f"queued for embedding: {queued} row(s) ({mode})")
        if spec is not None:
            await index_target(db, target, spec, queued, args, settings)
    out(f"registered {label}.{args.column} (model {args.model or model_name(settings)})")
    return EXIT_OK


async def cmd_bind(args: argparse.Namespace, settings: Settings) -> int:
    """Bind a target to a model: only workers embedding with it claim its items."""
    model = args.model or model_name(settings)
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        target = await find_target(db, args.table, args.column)
        previous = await queue.bind_target(
            db, target.table_name, target.embedding_column, model, args.dimensions
        )
    was = "unbound" if previous is None else f"was {previous}"
    out(f"bound {target.table_name}.{target.embedding_column} to model {model} ({was})")
    if previous is not None and previous != model:
        out(
            "vectors already stored keep the old model's: re-embed them with "
            f"`queue-processor enqueue {target.table_name} --column "
            f"{target.embedding_column} --stale-model` (needs a model column) or --all"
        )
    return EXIT_OK


async def cmd_build_index(args: argparse.Namespace, settings: Settings) -> int:
    """Build a target's wanted index now: wait for its backlog to drain, then build it (a
    failed build, or a missing or invalid index, is built again)."""
    async with open_database(settings, max_size=2) as db:
        await check_schema(db)
        target = await find_target(db, args.table, args.column)
        builds = await queue.index_builds(db, target.table_name, target.embedding_column)
        if not builds and target.chunked:
            # A chunks table always wants its index (one registered before its build was
            # recorded, or whose index was dropped): want it now.
            await queue.want_index(db, target, queue.hnsw_spec(target), "pending")
            builds = await queue.index_builds(db, target.table_name, target.embedding_column)
        if not builds:
            raise UsageError(
                f"{target.table_name}.{target.embedding_column} wants no index "
                "(register it with --index hnsw)"
            )
        await queue.retry_index_build(
            db, target.table_name, target.embedding_column, valid=bool(builds[0]["valid"])
        )
        await wait_and_build(db, target, settings, poll_seconds=args.poll)
    return EXIT_OK


async def cmd_unregister(args: argparse.Namespace, settings: Settings) -> int:
    """Remove a target; EXIT_FAILED when there was none."""
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        removed = await queue.unregister_target(db, args.table, args.column)
    out(f"unregistered {args.table}.{args.column}" if removed else "no such target")
    return EXIT_OK if removed else EXIT_FAILED


def add_parsers(sub: Subparsers) -> None:
    """Add ``migrate``, ``register``, ``build-index``, ``unregister`` and ``bind``."""
    p = sub.add_parser("migrate", help="install or upgrade the queue schema")
    p.add_argument(
        "--allow-unsafe-schema",
        action="store_true",
        help="install even though roles other than its owner may CREATE in the queue schema "
        "(they could then run code as the owner; warns)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be applied; change nothing"
    )
    p.set_defaults(func=cmd_migrate)

    _add_register_parser(sub)

    p = sub.add_parser(
        "build-index",
        help="build a target's wanted index now (after its backlog is embedded)",
        description="Build the index `register --index` recorded for a target: wait until "
        "nothing of it is pending, then CREATE INDEX CONCURRENTLY. Builds a failed one again, "
        "and one whose index is missing or invalid. Run it as the table's owner when the "
        "workers' role may not create indexes on it.",
    )
    p.add_argument("table", help="the target's table label as shown by status")
    p.add_argument("--column", help="embedding column (needed when the table has several)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between checks")
    p.set_defaults(func=cmd_build_index)

    p = sub.add_parser("unregister", help="remove a target, its triggers and its queue rows")
    p.add_argument("table", help="the target's table label as shown by status")
    p.add_argument("--column", required=True)
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser(
        "bind",
        help="bind a target to a model: only workers embedding with it claim its items",
    )
    p.add_argument("table", help="the target's table label as shown by status")
    p.add_argument("--column", help="embedding column (needed when the table has several)")
    p.add_argument("--model", help="the model (default: EMBEDDING_MODEL's)")
    p.add_argument("--dimensions", type=int, help="the model's vector dimensions")
    p.set_defaults(func=cmd_bind)


def _add_register_parser(sub: Subparsers) -> None:
    """Add ``register``, the command with the most options."""
    p = sub.add_parser(
        "register",
        help="register TABLE's embedding column and install its triggers",
        description="Register a (table, embedding column) target: triggers queue every insert "
        "and content change. Content is one or more --content columns or a --template.",
    )
    p.add_argument("table", help="table name, optionally schema-qualified ('app.docs')")
    p.add_argument(
        "--column",
        required=True,
        help="the embedding column to fill (with --chunks: the chunked target's name)",
    )
    content = p.add_mutually_exclusive_group(required=True)
    content.add_argument(
        "--content", action="append", metavar="COL", help="content column (repeatable)"
    )
    content.add_argument(
        "--template", help=r"content template, e.g. 'Title: {title}\nGenre: {genre}'"
    )
    p.add_argument("--id-column", help="unique key column (default: the primary key)")
    p.add_argument(
        "--model",
        help="the model this target is bound to: only workers embedding with it claim its "
        "items (default: EMBEDDING_MODEL's)",
    )
    p.add_argument("--dimensions", type=int, help="expected vector dimensions")
    p.add_argument("--model-column", help="companion column filled with the model name")
    p.add_argument("--generated-at-column", help="companion column filled with the write time")
    p.add_argument(
        "--length-policy",
        choices=list(LENGTH_POLICIES),
        help="texts over the model's input limit: truncate them (the default; the item's "
        "detail says so) or fail them",
    )
    p.add_argument(
        "--create-column",
        action="store_true",
        help="add the column as vector(N) (halfvec above 2000 dims); needs --dimensions",
    )
    p.add_argument(
        "--index",
        choices=["hnsw"],
        help="a cosine HNSW index for search: created now, or, when --backfill queues at "
        "least QUEUE_PROCESSOR_INDEX_DEFER_ROWS rows, built once they are embedded",
    )
    p.add_argument("--index-m", type=int, default=HNSW_DEFAULT_M, help="HNSW m (default 16)")
    p.add_argument(
        "--index-ef-construction",
        dest="index_ef",
        type=int,
        default=HNSW_DEFAULT_EF_CONSTRUCTION,
        help="HNSW ef_construction (default 64)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="with a deferred index: wait until the backlog is embedded, then build it here",
    )
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--backfill",
        nargs="?",
        const="missing",
        choices=["missing", "all"],
        help="queue existing rows now (default: those whose embedding is NULL, or with "
        "--chunks, those without chunks)",
    )
    add_chunk_arguments(p)
    p.set_defaults(func=cmd_register)
