"""Who may do what: ``grant-worker`` (the home of further role and privilege commands)."""

from __future__ import annotations

import argparse

from queue_processor import queue
from queue_processor.cli.args import Subparsers, out
from queue_processor.cli.factories import open_database
from queue_processor.errors import EXIT_OK
from queue_processor.migrations import check_schema
from queue_processor.settings import Settings


async def cmd_grant_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Grant a role what a worker needs on the queue and every registered target."""
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        n = await queue.grant_worker(db, args.role)
    out(f"granted {args.role} the worker's privileges on the queue and {n} target(s)")
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Add ``grant-worker``."""
    p = sub.add_parser("grant-worker", help="grant a database role the worker's least privileges")
    p.add_argument("role")
    p.set_defaults(func=cmd_grant_worker)
