"""Operating the queue: ``status``, ``requeue``, ``enqueue``, ``estimate``, ``search``,
``purge``. Each command asks the repository (``queue``) and formats the answer, as a table
or, with ``--json``, as JSON on stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

import anyio

from queue_processor import queue, render
from queue_processor.cli.args import Subparsers, out, parse_duration, positive_int
from queue_processor.cli.chunked import print_chunk_results, sequential_scan_note
from queue_processor.cli.factories import build_provider, model_name, open_database
from queue_processor.cli.lookup import find_target, parse_id_spec
from queue_processor.db import Database
from queue_processor.errors import EXIT_OK, PermanentError, UsageError
from queue_processor.estimate import Estimate, Workload, estimate
from queue_processor.migrations import check_schema
from queue_processor.settings import Settings


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print the queue's status once (table or JSON), or --watch it until interrupted."""
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        report = await queue.status(db, failures_limit=args.failures)
        price = settings.embedding_price_per_million_tokens
        if args.json:
            out(render.dumps(render.status_json(report, price)))
        elif not args.watch:
            render.stdout_console().print(render.status_renderable(report, price))
        else:
            await _watch_status(db, args, price, first=report)
    return EXIT_OK


async def _watch_status(
    db: Database, args: argparse.Namespace, price: float | None, *, first: queue.StatusReport
) -> None:
    """Refresh the status every ``args.interval`` seconds, forever: in place on a terminal,
    one report after another off it (a pipe, a journal)."""
    console = render.stdout_console()
    if not console.is_terminal:
        report = first
        while True:
            console.print(render.status_renderable(report, price))
            sys.stdout.flush()
            await anyio.sleep(args.interval)
            report = await queue.status(db, failures_limit=args.failures)
    from rich.live import Live

    with Live(render.status_renderable(first, price), console=console, auto_refresh=False) as live:
        while True:
            await anyio.sleep(args.interval)
            report = await queue.status(db, failures_limit=args.failures)
            live.update(render.status_renderable(report, price), refresh=True)


async def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    """Move failed items back to pending (or, --dry-run, list those that would move)."""
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        record_ids: list[str] | None = None
        table_name = args.table
        if args.ids:
            if not args.table:
                raise UsageError("--ids needs --table")
            target = await find_target(db, args.table, args.column)
            table_name = target.table_name
            record_ids = parse_id_spec(args.ids, target)
        elif args.table:
            table_name = args.table.removeprefix("public.")
        rows = await queue.requeue_failed(
            db,
            table_name=table_name,
            column=args.column,
            record_ids=record_ids,
            error_contains=args.error,
            dry_run=args.dry_run,
        )
    if args.json:
        out(render.dumps({"dry_run": args.dry_run, "count": len(rows), "items": rows}))
        return EXIT_OK
    verb = "would requeue" if args.dry_run else "requeued"
    out(f"{verb} {len(rows)} failed item(s)")
    if args.dry_run and rows:
        render.stdout_console().print(
            render.rows_table(
                "failed items",
                rows[:50],
                ["id", "table_name", "embedding_column", "record_id", "error_message"],
            )
        )
    return EXIT_OK


async def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    """Queue rows of a registered table: those missing an embedding, all, or --ids."""
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        target = await find_target(db, args.table, args.column)
        ids = parse_id_spec(args.ids, target) if args.ids else None
        mode: Literal["missing", "all", "ids", "stale_model"] = (
            "ids"
            if ids
            else "all"
            if args.all
            else "stale_model"
            if args.stale_model
            else "missing"
        )
        with render.stdout_console().status(
            render.plain(f"queueing {target.table_name} ({mode})...")
        ):
            queued = await queue.backfill(db, target.table_name, target.embedding_column, mode, ids)
    if args.json:
        report = {
            "table": target.table_name,
            "column": target.embedding_column,
            "mode": mode,
            "queued": queued,
        }
        out(render.dumps(report))
    else:
        out(f"queued {queued} row(s) of {target.table_name}.{target.embedding_column} ({mode})")
    return EXIT_OK


async def cmd_estimate(args: argparse.Namespace, settings: Settings) -> int:
    """Tokens, requests, cost and time of the queued work (or of a backfill of TABLE).
    Nothing is sent to the provider; the arithmetic is queue_processor.estimate's."""
    model = model_name(settings)
    price = render.price_per_million(model, settings.embedding_price_per_million_tokens)
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        rows = await _estimate_rows(db, args)
    total = estimate(
        (Workload(items=int(r["items"]), tokens=int(r["tokens"])) for r in rows),
        max_inputs_per_request=settings.embedding_max_inputs_per_request,
        price_per_million_tokens_usd=price,
        requests_per_minute=settings.embedding_requests_per_minute,
        tokens_per_minute=settings.embedding_tokens_per_minute,
    )
    if args.json:
        result = {
            "model": model,
            "targets": rows,
            "items": total.items,
            "estimated_tokens": total.tokens,
            "estimated_requests": total.requests,
            "price_per_million_tokens_usd": price,
            "estimated_cost_usd": total.cost_usd,
            "minutes_at_rate_limits": total.minutes_at_rate_limits,
        }
        out(render.dumps(result))
    else:
        _print_estimate(rows, total, model=model, price=price)
    return EXIT_OK


def _print_estimate(
    rows: list[dict[str, Any]], total: Estimate, *, model: str, price: float | None
) -> None:
    """The estimate for people: a table per target, then the totals in a sentence."""
    render.stdout_console().print(
        render.rows_table(
            "estimate (nothing is sent)",
            rows,
            ["scope", "table_name", "embedding_column", "items", "tokens"],
        )
    )
    cost = (
        "unknown (set EMBEDDING_PRICE_PER_MILLION_TOKENS)"
        if total.cost_usd is None
        else f"${total.cost_usd:.4f} at ${price}/1M tokens"
    )
    out(
        f"{total.items} item(s), ~{total.tokens} tokens, ~{total.requests} request(s) "
        f"with model {model}: {cost}"
    )
    if total.minutes_at_rate_limits is not None:
        out(f"time at the configured rate limits: ~{total.minutes_at_rate_limits:.1f} min")
    else:
        out(
            "time: no rate limits configured "
            "(EMBEDDING_REQUESTS_PER_MINUTE / EMBEDDING_TOKENS_PER_MINUTE)"
        )


async def _estimate_rows(db: Database, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Items and estimated tokens per target: of a backfill of ``args.table``, or of the
    queued work; each row says its scope."""
    if not args.table:
        return [dict(r, scope="queued") for r in await queue.estimate_pending(db)]
    target = await find_target(db, args.table, args.column)
    mode: Literal["missing", "all"] = "all" if args.all else "missing"
    items, tokens = await queue.estimate_target(
        db, target.table_name, target.embedding_column, mode
    )
    return [
        {
            "table_name": target.table_name,
            "embedding_column": target.embedding_column,
            "items": items,
            "tokens": tokens,
            "scope": f"backfill ({mode})",
        }
    ]


async def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    """Embed the query text and print the target's nearest rows by cosine distance."""
    async with open_database(settings, max_size=1) as db, build_provider(settings) as provider:
        await check_schema(db)
        target = await find_target(db, args.table, args.column)
        if target.model is not None and target.model != provider.model:
            # A query vector of another model than the column's finds nonsense.
            raise UsageError(
                f"{target.table_name}.{target.embedding_column} holds vectors of model "
                f"{target.model}; search with EMBEDDING_MODEL={target.model}"
            )
        result = await provider.embed([args.text])
        vector = result.vectors[0]
        if vector is None:
            raise PermanentError(f"the provider could not embed the query: {result.errors.get(0)}")
        if target.chunked:
            rows = await queue.search_chunks(db, target, vector, args.k)
        else:
            rows = await queue.search(db, target, vector, args.k)
        indexed = await queue.index_usable(db, target)
        builds = await queue.index_builds(db, target.table_name, target.embedding_column)
    index_state = builds[0]["state"] if builds else None
    if target.chunked:
        return print_chunk_results(args, target, rows, indexed=indexed, index_state=index_state)
    if args.json:
        scan = "index" if indexed else "sequential"
        report = {"query": args.text, "results": rows, "scan": scan, "index_state": index_state}
        out(render.dumps(report))
        return EXIT_OK
    render.stdout_console().print(
        render.rows_table(
            f"nearest to {args.text!r} in {target.table_name}", rows, ["id", "distance", "content"]
        )
    )
    if not indexed:
        out(sequential_scan_note(target, index_state))
    return EXIT_OK


async def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Delete done items older than --older-than (seconds)."""
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        deleted = await queue.purge(db, args.older_than)
    if args.json:
        out(render.dumps({"deleted": deleted}))
    else:
        out(f"deleted {deleted} done item(s) older than {args.older_than:.0f}s")
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Add ``status``, ``requeue``, ``enqueue``, ``estimate``, ``search`` and ``purge``."""
    for add in (
        _add_status_parser,
        _add_requeue_parser,
        _add_enqueue_parser,
        _add_estimate_parser,
        _add_search_parser,
        _add_purge_parser,
    ):
        add(sub)


def _add_status_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "status", help="queue counts by table/column/status, age, throughput, cost, failures"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="--watch refresh seconds")
    p.add_argument("--failures", type=positive_int, default=10, help="recent failures to show")
    p.set_defaults(func=cmd_status)


def _add_requeue_parser(sub: Subparsers) -> None:
    p = sub.add_parser("requeue", help="move failed items back to pending")
    p.add_argument("--table", help="only this table")
    p.add_argument("--column", help="only this embedding column")
    p.add_argument("--ids", help="only these record ids: 1,5,10-20 (needs --table)")
    p.add_argument("--error", help="only items whose error message contains this text")
    p.add_argument("--dry-run", action="store_true", help="show what would move")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_requeue)


def _add_enqueue_parser(sub: Subparsers) -> None:
    p = sub.add_parser("enqueue", help="queue rows of a registered table")
    p.add_argument("table")
    p.add_argument("--column", help="embedding column (needed when the table has several)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--missing", action="store_true", help="rows whose embedding is NULL (default)"
    )
    which.add_argument("--all", "--force", action="store_true", help="every row (re-embed)")
    which.add_argument("--ids", help="these ids: 1,5,10-20,100-200")
    which.add_argument(
        "--stale-model",
        action="store_true",
        help="rows whose model column names another model than the target's",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_enqueue)


def _add_estimate_parser(sub: Subparsers) -> None:
    p = sub.add_parser("estimate", help="tokens, cost and time of queued work (sends nothing)")
    p.add_argument(
        "table", nargs="?", help="estimate a backfill of this table instead of the queue"
    )
    p.add_argument("--column")
    p.add_argument(
        "--all", "--force", action="store_true", help="with TABLE: every row, not only missing"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_estimate)


def _add_search_parser(sub: Subparsers) -> None:
    p = sub.add_parser("search", help="nearest rows to a text by cosine distance")
    p.add_argument("table")
    p.add_argument("text")
    p.add_argument("-k", type=positive_int, default=5, help="how many rows (default 5)")
    p.add_argument("--column")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_search)


def _add_purge_parser(sub: Subparsers) -> None:
    p = sub.add_parser("purge", help="delete done items older than an age")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        default=parse_duration("7d"),
        help="age, e.g. 7d (default), 12h",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_purge)
