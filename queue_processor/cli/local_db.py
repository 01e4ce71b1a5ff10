"""The zero-configuration path: ``db-url``, ``demo`` and ``db-stop`` (the embedded
PostgreSQL that stands in when DATABASE_URL is unset)."""

from __future__ import annotations

import argparse

from queue_processor.cli.args import Subparsers, out
from queue_processor.cli.factories import build_provider, open_database, resolve_dsn, worker_config
from queue_processor.errors import EXIT_OK, UsageError
from queue_processor.logconfig import configure_logging
from queue_processor.migrations import migrate
from queue_processor.settings import Settings


async def cmd_db_url(args: argparse.Namespace, settings: Settings) -> int:
    """Print the DSN (starting the embedded PostgreSQL when DATABASE_URL is unset)."""
    out(resolve_dsn(settings))
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Install the schema and run the narrated demo; its exit code is the demo's."""
    from rich.console import Console

    from queue_processor.demo import DEMO_BATCH_SIZE, run_demo

    if settings.log_level.lower() == "info":
        # The demo narrates with its own output; per-batch info events would interleave.
        configure_logging("warning", settings.log_format)
    async with (
        open_database(settings, max_size=4) as db,
        build_provider(settings) as provider,
    ):
        await migrate(db)
        config = worker_config(settings, batch_size=DEMO_BATCH_SIZE, concurrency=1)
        return await run_demo(db, provider, console=Console(), config=config)


async def cmd_db_stop(args: argparse.Namespace, settings: Settings) -> int:
    """Stop the embedded PostgreSQL; a UsageError when DATABASE_URL names another."""
    if settings.database_url is not None:
        raise UsageError("DATABASE_URL is set: there is no embedded database to stop")
    from queue_processor.embedded import default_data_dir, stop_embedded

    where = (settings.data_dir or default_data_dir()) / "pgdata"
    out(
        f"stopped the embedded PostgreSQL in {where}"
        if stop_embedded(settings.data_dir)
        else "not running"
    )
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Add ``db-url``, ``demo`` and ``db-stop``."""
    p = sub.add_parser(
        "db-url",
        help="print the database DSN (starts the embedded PostgreSQL when DATABASE_URL is unset)",
    )
    p.set_defaults(func=cmd_db_url)

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a sample table (embedded PostgreSQL, local model)",
        description="Create demo_documents with 300 sample documents, embed them with a "
        "progress bar, run three semantic searches, then change one row and show it "
        "re-embedded. Re-runnable.",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("db-stop", help="stop the embedded PostgreSQL")
    p.set_defaults(func=cmd_db_stop)
