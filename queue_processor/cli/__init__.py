"""The command line (``queue-processor``): the only reader of the environment.

One module per command group (``schema``, ``run``, ``queue_ops``, ``privileges``,
``local_db``), each adding its subcommands with ``add_parsers``; ``factories`` is the one
composition root (databases, providers, the worker and the wiring of ``run``); ``app``
parses, runs a command and maps its outcome to an exit code (``errors.EXIT_*``).
``build_provider`` is re-exported for callers that build the configured provider from
``Settings`` (tests of the provider's configuration).
"""

from __future__ import annotations

from queue_processor.cli.app import build_parser, main
from queue_processor.cli.factories import build_provider

__all__ = ["build_parser", "build_provider", "main"]
