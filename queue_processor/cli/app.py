"""The command line's frame: parse arguments, read settings once, run one command, map its
outcome to an exit code.

Each command group adds its own subcommands (``add_parsers``); each command returns its exit
code, and an error that ends a command exits with the error class's ``exit_code`` (see
errors.py), or ``EXIT_ABORTED`` when interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import anyio
from pydantic import ValidationError

from queue_processor import __version__
from queue_processor.cli import local_db, privileges, queue_ops, reembed, run, schema
from queue_processor.cli.args import Command
from queue_processor.errors import EXIT_ABORTED, EXIT_CONFIG, QueueProcessorError
from queue_processor.logconfig import configure_logging
from queue_processor.settings import Settings, load_settings
from queue_processor.worker import unwrapped_errors


def build_parser() -> argparse.ArgumentParser:
    """The ``queue-processor`` parser; every subcommand sets ``func`` (a ``Command``)."""
    parser = argparse.ArgumentParser(
        prog="queue-processor",
        description="Keep vector embeddings of Postgres text up to date (outbox pattern).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (schema, run, queue_ops, privileges, local_db, reembed):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``queue-processor`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ValidationError as exc:
        sys.stderr.write(f"queue-processor: invalid configuration:\n{exc}\n")
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    func: Command = args.func
    handles_signals: bool = getattr(args, "handles_signals", False)
    try:
        result: int = anyio.run(_call, func, args, settings, handles_signals)
    except QueueProcessorError as exc:
        sys.stderr.write(f"queue-processor: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_ABORTED
    return result


async def _call(
    func: Command, args: argparse.Namespace, settings: Settings, handles_signals: bool
) -> int:
    """Run one command. Unless it ``handles_signals`` itself (``run`` stops gracefully),
    SIGTERM ends it as Ctrl-C does: the command is cancelled, so a statement in progress is
    cancelled in the server too, instead of the process dying while its backend finishes
    (and commits) it."""
    if handles_signals:
        return await func(args, settings)
    terminated = False
    result = EXIT_ABORTED
    with unwrapped_errors():
        async with anyio.create_task_group() as tg:

            async def on_sigterm() -> None:
                nonlocal terminated
                with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        terminated = True
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_sigterm)
            result = await func(args, settings)
            tg.cancel_scope.cancel()
    return EXIT_ABORTED if terminated else result
