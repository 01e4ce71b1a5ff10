"""What every command module shares: the command signature, argument types and ``out``.

Argument types raise ``argparse.ArgumentTypeError`` so that argparse reports a bad value as
a usage error (exit 2) before any configuration is read.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from queue_processor.settings import Settings

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]
"""A command: parsed arguments and settings in, exit code out (see ``errors.EXIT_*``)."""

# What ``add_subparsers`` returns; argparse names the class privately.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def out(text: str = "") -> None:
    """Print command output (data) to stdout, flushed so pipes see each line at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s' or plain seconds -> seconds."""
    match = _DURATION.match(text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration (e.g. 7d, 12h, 30m): {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def positive_int(text: str) -> int:
    """An integer of at least 1 (batch sizes, counts)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (delays)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {text}")
    return value
