"""Every line the process logs is in the configured format: the standard library's records
(psycopg_pool's "error connecting" warnings, httpx's...) go through structlog's processors
too, with their logger's name, redacted like our own events."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from queue_processor.logconfig import configure_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging is process-global: undo it afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def test_library_log_records_are_json_events(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    pool_log = logging.getLogger("psycopg.pool")
    pool_log.warning("error connecting in %r: %s", "pool-1", "certificate verify failed")
    pool_log.info("connection added")  # below WARNING: libraries' chatter is dropped
    logging.getLogger("httpx").warning("sent Authorization: Bearer sk-abc123")
    structlog.get_logger("ours").warning("claim_failed", error="boom")
    lines = capsys.readouterr().err.splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert [e["event"] for e in events] == [
        "error connecting in 'pool-1': certificate verify failed",
        "sent Authorization: Bearer [redacted]",
        "claim_failed",
    ]
    first = events[0]
    assert (first["level"], first["logger"]) == ("warning", "psycopg.pool")
    assert "timestamp" in first
    assert "sk-abc123" not in "\n".join(lines)


def test_library_exceptions_keep_their_traceback_in_the_event(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    try:
        raise ValueError("the cause")
    except ValueError:
        logging.getLogger("psycopg").exception("worker failed")
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert event["event"] == "worker failed"
    assert "ValueError: the cause" in event["exception"]


def test_library_records_on_the_console_are_rendered_like_ours(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "console")
    logging.getLogger("psycopg.pool").warning("error connecting: \x1b[2J")
    err = capsys.readouterr().err
    assert "error connecting" in err
    assert "psycopg.pool" in err
    assert "\x1b[2J" not in err  # control characters escaped, as in our events
    assert not err.lstrip().startswith("WARNING:")  # not the stdlib's own format
