"""``reembed``: change a target's model (or dimensions) with no downtime.

    reembed TABLE --column C --model NEW [--dimensions D]   start, or resume, the backfill
    reembed TABLE --column C                                show its progress
    reembed TABLE --column C --switch                       swap the new vectors in
    reembed TABLE --column C --rollback                     swap the old ones back
    reembed TABLE --column C --finish                       drop the column not in use

The steps and what a search sees at each are in the README ("Changing the model").
"""

from __future__ import annotations

import argparse

from queue_processor import render
from queue_processor.cli.args import Subparsers, out, positive_int
from queue_processor.cli.factories import open_database
from queue_processor.cli.lookup import find_target
from queue_processor.errors import EXIT_OK, UsageError
from queue_processor.estimate import Workload, estimate
from queue_processor.migrations import check_schema
from queue_processor.queue import reembed
from queue_processor.settings import Settings


async def cmd_reembed(args: argparse.Namespace, settings: Settings) -> int:
    """Start, resume, report, switch, roll back or finish a re-embedding."""
    actions = [a for a in ("switch", "rollback", "finish") if getattr(args, a)]
    if actions and args.model:
        raise UsageError(f"--{actions[0]} takes no --model")
    async with open_database(settings, max_size=2) as db:
        await check_schema(db)
        target = await find_target(db, args.table, args.column)
        label, column = target.table_name, target.embedding_column
        if args.model:
            shadow, queued = await reembed.start(db, label, column, args.model, args.dimensions)
            out(
                f"re-embedding {label}.{column} with {args.model} into {shadow}: "
                f"queued {queued} row(s); run a worker with model {args.model}, then --switch"
            )
        elif args.switch:
            done = await reembed.progress(db, label, column)
            if done.state == "backfilling" and done.complete:
                incoming = await find_target(db, label, done.shadow_column)
                index = await reembed.build_shadow_index(db, target, incoming)
                if index:
                    out(f"index {index} built on {done.shadow_column}")
            swap = await reembed.switch(db, label, column)
            out(
                f"switched {label}.{column} to {done.new_model}: {swap.rows} row(s) in one "
                f"transaction ({swap.transaction_ms:.1f} ms; the swap under the table's lock "
                f"{swap.swap_ms:.1f} ms); the old vectors are in {column}__old until --finish "
                "(--rollback swaps them back)"
            )
            return EXIT_OK
        elif args.rollback:
            swap = await reembed.rollback(db, label, column)
            out(f"rolled {label}.{column} back (the swap took {swap.swap_ms:.1f} ms)")
            return EXIT_OK
        elif args.finish:
            dropped = await reembed.finish(db, label, column)
            out(f"dropped {dropped}; the re-embedding of {label}.{column} is over")
            return EXIT_OK
        report = await reembed.progress(db, label, column)
    out(progress_line(label, column, report, settings))
    return EXIT_OK


def progress_line(label: str, column: str, p: reembed.Progress, settings: Settings) -> str:
    """One line: state, rows done, what is left in tokens, dollars and minutes."""
    if p.state == "switched":
        return (
            f"{label}.{column} holds {p.new_model}'s vectors ({p.done}/{p.total} rows); "
            f"--finish drops {column}__old, --rollback swaps it back"
        )
    left = estimate(
        [Workload(items=max(0, p.total - p.done), tokens=p.remaining_tokens)],
        max_inputs_per_request=settings.embedding_max_inputs_per_request,
        price_per_million_tokens_usd=render.price_per_million(
            p.new_model, settings.embedding_price_per_million_tokens
        ),
        requests_per_minute=settings.embedding_requests_per_minute,
        tokens_per_minute=settings.embedding_tokens_per_minute,
    )
    percent = 100.0 * p.done / p.total if p.total else 100.0
    cost = "" if left.cost_usd is None else f", ~${left.cost_usd:.4f}"
    minutes = (
        ""
        if left.minutes_at_rate_limits is None
        else f", ~{left.minutes_at_rate_limits:.1f} min at the rate limits"
    )
    ready = "complete: --switch swaps it in" if p.complete else f"{p.queued} queued"
    return (
        f"re-embedding {label}.{column} with {p.new_model} into {p.shadow_column}: "
        f"{p.done}/{p.total} rows ({percent:.1f}%), left ~{left.tokens} tokens in "
        f"~{left.requests} request(s){cost}{minutes}; {ready}"
    )


def add_parsers(sub: Subparsers) -> None:
    """Add ``reembed``."""
    p = sub.add_parser(
        "reembed",
        help="re-embed a target with another model, then switch with no downtime",
        description="Start (--model), follow, --switch, --rollback or --finish the "
        "re-embedding of a target into a shadow column.",
    )
    p.add_argument("table")
    p.add_argument("--column", required=True, help="the target's embedding column")
    p.add_argument("--model", help="start (or resume) re-embedding with this model")
    p.add_argument("--dimensions", type=positive_int, help="the new model's dimensions")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--switch", action="store_true", help="swap the new vectors in")
    action.add_argument("--rollback", action="store_true", help="swap the old vectors back")
    action.add_argument("--finish", action="store_true", help="drop the column not in use")
    p.set_defaults(func=cmd_reembed)
