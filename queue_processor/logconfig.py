"""structlog setup: JSON lines off a terminal, a readable console on one.

Every line of the process is an event in that format: the standard library's log records
(psycopg's, httpx's...) are rendered by the same processors, with the logger's name.

Events are key-value pairs; per-item context (queue id, table, record) is bound with
structlog.contextvars by the worker. A processor drops any value that looks like an API key.
On a console, control characters in string values (a record id or provider error text with
ESC sequences) are written as visible escapes; JSON lines escape them by themselves.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

from queue_processor.render import escape_controls

_SECRET_KEYS = re.compile(r"(api[_-]?key|authorization|password|secret|token)$", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+")


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key) and key != "claim_token":
            event_dict[key] = "[redacted]"
        elif isinstance(value, str) and "Bearer" in value:
            event_dict[key] = _BEARER.sub(r"\1[redacted]", value)
    return event_dict


class _WithControls:
    """A string value holding control characters. The console renderer prints a plain
    string as is but any other value with ``repr()``; this one's repr is the string's, which
    writes every control character as an escape (``'a\\x1b[2J'``)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


def _escape_controls(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Console only: string values print as text, never as terminal control sequences.
    A formatted traceback keeps its line breaks; every other value stays on its line."""
    for key, value in list(event_dict.items()):
        if not isinstance(value, str) or escape_controls(value) == value:
            continue  # other values are shown with repr(), which escapes controls
        if key == "exception":
            event_dict[key] = "\n".join(escape_controls(line) for line in value.split("\n"))
        elif key == "event":  # always printed as is
            event_dict[key] = escape_controls(value)
        else:
            event_dict[key] = _WithControls(value)
    return event_dict


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    """Configure structlog, and the standard library's logging through it, once, from the
    CLI: the libraries' own records (psycopg_pool's "error connecting" warnings, for one)
    come out as events in the same format, with their ``logger`` name, and are redacted like
    ours. The libraries' records below WARNING are dropped."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    # JSONRenderer needs no escaping step: json.dumps writes controls (and, ASCII-only, the
    # C1 and bidi ones) as \u escapes.
    renderer: list[structlog.typing.Processor] = (
        [_escape_controls, structlog.dev.ConsoleRenderer()]
        if use_console
        else [structlog.processors.JSONRenderer()]
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            _redact,
            structlog.processors.format_exc_info,
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redact,
                structlog.processors.format_exc_info,
                *renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
