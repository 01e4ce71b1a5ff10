"""The command line: arguments -> settings, logging, anyio.run; signals -> worker.stop().

Only this module reads the environment (through ``Settings``). Exit codes:
0 success, 1 the command ran but work failed (e.g. failed items), 2 usage or configuration
error, 3 database unavailable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio
import structlog
from pydantic import ValidationError

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    PermanentError,
    QueueProcessorError,
)
from queue_processor.logconfig import configure_logging
from queue_processor.migrations import check_schema, migrate
from queue_processor.settings import Settings

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DB = 3

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]


def resolve_dsn(settings: Settings) -> str:
    """DATABASE_URL, or the embedded PostgreSQL when it is unset."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from queue_processor.embedded import start_embedded

    return start_embedded(settings.data_dir)


def open_database(settings: Settings, *, max_size: int | None = None) -> Database:
    """A (not yet opened) Database for the configured DSN and schema."""
    return Database(
        resolve_dsn(settings),
        schema=settings.queue_schema,
        max_size=max_size or settings.pool_max_size,
    )


def out(text: str = "") -> None:
    """Print command output (data) to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- commands ---------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db:
        applied = await migrate(db)
    if applied:
        out(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}")
    else:
        out("schema is up to date")
    return EXIT_OK


async def cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    template = args.template.encode().decode("unicode_escape") if args.template else None
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        label = await queue.register_target(
            db,
            args.table,
            args.column,
            content_columns=args.content or None,
            template=template,
            id_column=args.id_column,
            model=args.model,
            dimensions=args.dimensions,
            model_column=args.model_column,
            generated_at_column=args.generated_at_column,
            backfill="all" if args.backfill == "all" else "missing" if args.backfill else "none",
        )
    out(f"registered {label}.{args.column}")
    return EXIT_OK


async def cmd_unregister(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        removed = await queue.unregister_target(db, args.table, args.column)
    out(f"unregistered {args.table}.{args.column}" if removed else "no such target")
    return EXIT_OK if removed else EXIT_FAILED


async def cmd_db_url(args: argparse.Namespace, settings: Settings) -> int:
    out(resolve_dsn(settings))
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queue-processor",
        description="Keep vector embeddings of Postgres text up to date (outbox pattern).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="install or upgrade the queue schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "register",
        help="register TABLE's embedding column and install its triggers",
        description="Register a (table, embedding column) target: triggers queue every insert "
        "and content change. Content is one or more --content columns or a --template.",
    )
    p.add_argument("table", help="table name, optionally schema-qualified ('app.docs')")
    p.add_argument("--column", required=True, help="the embedding column to fill")
    content = p.add_mutually_exclusive_group(required=True)
    content.add_argument(
        "--content", action="append", metavar="COL", help="content column (repeatable)"
    )
    content.add_argument(
        "--template", help=r"content template, e.g. 'Title: {title}\nGenre: {genre}'"
    )
    p.add_argument("--id-column", help="unique key column (default: the primary key)")
    p.add_argument("--model", help="model for this target (informational)")
    p.add_argument("--dimensions", type=int, help="expected vector dimensions")
    p.add_argument("--model-column", help="companion column filled with the model name")
    p.add_argument("--generated-at-column", help="companion column filled with the write time")
    p.add_argument(
        "--backfill",
        nargs="?",
        const="missing",
        choices=["missing", "all"],
        help="queue existing rows now (default: those whose embedding is NULL)",
    )
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("unregister", help="remove a target, its triggers and its queue rows")
    p.add_argument("table", help="the target's table label as shown by status")
    p.add_argument("--column", required=True)
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser("db-url", help="print the database DSN (starts the embedded one)")
    p.set_defaults(func=cmd_db_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``queue-processor`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.stderr.write(f"queue-processor: invalid configuration:\n{exc}\n")
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    func: Command = args.func
    try:
        result: int = anyio.run(_call, func, args, settings)
    except ConfigurationError as exc:
        sys.stderr.write(f"queue-processor: {exc}\n")
        return EXIT_CONFIG
    except DatabaseUnavailable as exc:
        sys.stderr.write(f"queue-processor: {exc}\n")
        return EXIT_DB
    except PermanentError as exc:
        sys.stderr.write(f"queue-processor: {exc}\n")
        return EXIT_FAILED
    except QueueProcessorError as exc:
        sys.stderr.write(f"queue-processor: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return result


async def _call(func: Command, args: argparse.Namespace, settings: Settings) -> int:
    return await func(args, settings)
