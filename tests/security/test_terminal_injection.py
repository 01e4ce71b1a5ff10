"""Database text reaches the operator's terminal as text (issue 11 item 9).

Queue fields (``record_id``, ``error_message``, table and column names) and usage model names
were rendered as rich markup, so ``[link=...]`` became a hyperlink, and raw escape sequences
(``ESC]0;title BEL`` retitles the terminal, ``ESC[2J`` clears it) passed through. Now every
database value is plain text with controls shown as escapes; console log lines likewise.

The end-to-end case runs ``queue-processor status`` on a real pseudo-terminal (so rich emits
what it would to an operator: colours, and hyperlinks if markup made any) and reads the bytes.
The only escape sequences allowed in the output are rich's own colour codes (SGR).
"""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import subprocess
import time
import unicodedata
from collections.abc import Iterator

import pytest
import structlog
from rich.console import Console

from queue_processor.logconfig import configure_logging
from queue_processor.queue import StatusReport
from queue_processor.render import rows_table, status_renderable
from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import QUEUE_PROCESSOR, cli_env, execute

LINK = "[link=http://evil.example/]click me[/link]"
TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J\x1b[H"
HOSTILE_RECORD = f"{LINK}{TITLE}{CLEAR}"
HOSTILE_ERROR = (
    f"provider said {LINK} \x1b]8;;http://evil.example/\x1b\\here\x1b]8;;\x1b\\ {CLEAR}"
    " \x9b31m8-bit CSI \u202eevil reversed"
)
HOSTILE_TABLE = "[bold red]docs[/]\x1b[31m"
HOSTILE_COLUMN = f"embedding{TITLE}"
HOSTILE_MODEL = f"[link=http://evil.example/]m[/link]{CLEAR}"

SGR = re.compile(r"\x1b\[[0-9;]*m")
BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def is_control(char: str) -> bool:
    """C0, DEL, C1, and the bidirectional formatting characters."""
    return unicodedata.category(char) == "Cc" or char in BIDI


def escaped(text: str) -> str:
    """How a value should look on screen: controls as Python escapes, all else as is."""
    return "".join(repr(char)[1:-1] if is_control(char) else char for char in text)


def assert_inert(output: str) -> str:
    """Fail on any control character other than rich's SGR colour codes and line ends;
    return the text with the colour codes removed (what the operator reads)."""
    visible = SGR.sub("", output)
    controls = sorted({char for char in visible if is_control(char)} - {"\n", "\r"})
    assert controls == [], f"control characters reached the terminal: {controls!r}"
    return visible


def assert_shown_as_typed(visible: str, *values: str) -> None:
    """Each value appears literally, markup unparsed, controls as escapes."""
    for value in values:
        assert escaped(value) in visible, (escaped(value), visible)


# --- the status renderer ------------------------------------------------------------------


def render(renderable: object) -> str:
    buffer = io.StringIO()
    console = Console(
        file=buffer, force_terminal=True, color_system="truecolor", width=1000, soft_wrap=True
    )
    console.print(renderable)
    return buffer.getvalue()


def hostile_report() -> StatusReport:
    return StatusReport(
        counts=[
            {
                "table_name": HOSTILE_TABLE,
                "embedding_column": HOSTILE_COLUMN,
                "status": "failed",
                "count": 1,
            }
        ],
        summary={
            "oldest_pending_seconds": None,
            "pending_due": 0,
            "done_last_1m": 0,
            "done_last_5m": 0,
            "done_last_15m": 0,
        },
        usage=[
            {
                "model": HOSTILE_MODEL,
                "tokens_total": 10,
                "requests_total": 1,
                "tokens_last_1m": 0,
                "tokens_last_5m": 0,
                "tokens_last_15m": 0,
            }
        ],
        failures=[
            {
                "id": 1,
                "table_name": HOSTILE_TABLE,
                "embedding_column": HOSTILE_COLUMN,
                "record_id": HOSTILE_RECORD,
                "attempts": 3,
                "error_message": HOSTILE_ERROR,
            }
        ],
        inbox=[
            {
                "table_name": HOSTILE_TABLE,
                "embedding_column": HOSTILE_COLUMN,
                "rows": 5,
                "statements": 1,
            }
        ],
    )


def test_status_renders_database_values_as_plain_text() -> None:
    output = render(status_renderable(hostile_report(), None))
    assert "\x1b]" not in output  # no OSC at all: no hyperlink, no title
    visible = assert_inert(output)
    assert_shown_as_typed(
        visible, HOSTILE_RECORD, HOSTILE_ERROR, HOSTILE_TABLE, HOSTILE_COLUMN, HOSTILE_MODEL
    )


def test_rows_tables_render_database_values_as_plain_text() -> None:
    rows = [{"id": 1, "record_id": HOSTILE_RECORD, "error_message": HOSTILE_ERROR}]
    output = render(rows_table(f"nearest to {LINK!r}", rows, ["id", "record_id", "error_message"]))
    assert "\x1b]" not in output
    visible = assert_inert(output)
    assert_shown_as_typed(visible, HOSTILE_RECORD, HOSTILE_ERROR, LINK)


def test_escape_controls_keeps_text_and_escapes_every_control() -> None:
    from queue_processor.render import escape_controls

    assert escape_controls("plain [b]text[/b] ü ✓") == "plain [b]text[/b] ü ✓"
    assert escape_controls("a\x1b[2Jb\x07\n\t\x7f\x9b\u202e") == (
        "a\\x1b[2Jb\\x07\\n\\t\\x7f\\x9b\\u202e"
    )
    for char in [*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), *BIDI]:
        assert escape_controls(char) == escaped(char) != char, hex(ord(char))


# --- `queue-processor status` on a terminal -----------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=8) as srv:
        yield srv


def run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``queue-processor ARGS`` with stdout on a pseudo-terminal; (exit code, output)."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [QUEUE_PROCESSOR, *args], env=env, stdout=secondary, stderr=subprocess.PIPE
    )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 60  # liveness bound only
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        code = proc.wait(timeout=30)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        os.close(primary)
    assert code == 0, stderr
    return code, output.decode("utf-8", errors="replace")


def test_status_on_a_terminal_prints_hostile_queue_rows_as_text(
    dsn: str, fake: FakeOpenAIServer
) -> None:
    execute(
        dsn,
        "INSERT INTO embedding_queue"
        " (table_name, record_id, content, embedding_column, status, attempts, error_message)"
        " VALUES (%(t)s, %(r)s, 'x', %(c)s, 'failed', 3, %(e)s)",
        {"t": HOSTILE_TABLE, "r": HOSTILE_RECORD, "c": HOSTILE_COLUMN, "e": HOSTILE_ERROR},
    )
    env = cli_env(dsn, fake, COLUMNS="1000", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    _, output = run_on_a_terminal(["status"], env)

    assert "recent failures" in output
    assert "\x1b[" in output, "rich should colour on a terminal (else this test proves less)"
    assert "\x1b]" not in output  # no OSC: no hyperlink, no window title
    visible = assert_inert(output)
    assert_shown_as_typed(visible, HOSTILE_RECORD, HOSTILE_ERROR, HOSTILE_TABLE, HOSTILE_COLUMN)


# --- console log lines --------------------------------------------------------------------


@pytest.fixture
def console_logging() -> Iterator[None]:
    """configure_logging for the console, undone afterwards (it is process-global)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("console_logging")
def test_console_log_lines_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    log = structlog.get_logger("test")
    log.warning(f"event {TITLE}", record_id=HOSTILE_RECORD, error=HOSTILE_ERROR, n=1)
    try:
        raise ValueError(f"bad row {CLEAR}")
    except ValueError:
        log.exception("batch_failed", table=HOSTILE_TABLE)
    err = capsys.readouterr().err
    visible = assert_inert(err)
    # Values as Python reprs (quoted, controls escaped); the event and the traceback escaped.
    for value in (HOSTILE_RECORD, HOSTILE_ERROR, HOSTILE_TABLE):
        assert repr(value) in visible, (repr(value), visible)
    assert_shown_as_typed(visible, f"event {TITLE}", f"bad row {CLEAR}")
    assert "Traceback (most recent call last):\n" in visible  # tracebacks keep their lines
    assert len([line for line in visible.splitlines() if "record_id=" in line]) == 1


@pytest.mark.usefixtures("console_logging")
def test_json_log_lines_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger("test").warning("event", record_id=HOSTILE_RECORD, error=HOSTILE_ERROR)
    err = capsys.readouterr().err
    assert_inert(err)
