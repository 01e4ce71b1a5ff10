"""Human and JSON renderings of command output (rich on a terminal, plain text otherwise).

Every value that comes from the database (table and column names, record ids, error
messages, model names, content) is shown as plain text: a rich ``Text``, never markup, with
control characters written as visible escapes (``plain``). A row cannot make a hyperlink,
retitle or clear the operator's terminal, or reorder what is shown around it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from queue_processor.models import STATUSES

if TYPE_CHECKING:
    from queue_processor.queue import StatusReport

# C0 controls (ESC, BEL, CR, LF, TAB...), DEL and C1 controls (0x9b is an 8-bit CSI), plus the
# bidirectional marks, embeddings, overrides and isolates ("Trojan Source" reordering).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """``text`` with each control character replaced by its Python escape (``\\x1b``,
    ``\\n``, ``\\u202e``), so it prints as what it is instead of acting on the terminal."""
    return _CONTROLS.sub(lambda match: repr(match.group())[1:-1], text)


def plain(value: object) -> Text:
    """A value from the database as inert text: no markup, controls escaped; None is ""."""
    return Text(escape_controls("" if value is None else str(value)))


# USD per 1M input tokens for OpenAI's embedding models (override with
# EMBEDDING_PRICE_PER_MILLION_TOKENS).
PRICES_PER_MILLION_TOKENS: dict[str, float] = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}


def price_per_million(model: str | None, override: float | None) -> float | None:
    """The price to use for ``model``: the override, the built-in table, or None."""
    if override is not None:
        return override
    if model is None:
        return None
    return PRICES_PER_MILLION_TOKENS.get(model.removeprefix("openai/"))


def to_jsonable(value: Any) -> Any:
    """Rows -> JSON-friendly values (datetimes as ISO text, Decimals as numbers)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value) if value != value.to_integral_value() else int(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def dumps(value: Any) -> str:
    """Stable, indented JSON of command output."""
    return json.dumps(to_jsonable(value), indent=2, sort_keys=True)


def status_json(report: StatusReport, price_override: float | None) -> dict[str, Any]:
    """The `status --json` document."""
    usage = []
    for row in report.usage:
        price = price_per_million(row["model"], price_override)
        tokens = int(row["tokens_total"] or 0)
        usage.append({**row, "estimated_cost_usd": None if price is None else tokens * price / 1e6})
    return {
        "counts": report.counts,
        "summary": report.summary,
        "usage": usage,
        "recent_failures": report.failures,
        "inbox": report.inbox,
        "indexes": report.indexes,
        "truncated": report.truncated,
        "targets": [dict(t, waiting=target_waiting(t)) for t in report.targets],
        "reembeds": report.reembeds,
        "chunks": report.chunks,
    }


def _reembed_line(r: Mapping[str, Any]) -> Text:
    """One re-embedding in progress for the human view."""
    where = f"{r['table_name']}.{r['embedding_column']}"
    if r["state"] == "switched":
        return plain(
            f"re-embedding {where}: switched to {r['new_model']}; old vectors kept in "
            f"{r['embedding_column']}__old (reembed --finish drops them, --rollback restores)"
        )
    if "done" not in r:
        return plain(f"re-embedding {where} with {r['new_model']} (progress needs the owner)")
    total = int(r["total"])
    percent = 100.0 * int(r["done"]) / total if total else 100.0
    return plain(
        f"re-embedding {where} with {r['new_model']}: {r['done']}/{total} rows "
        f"({percent:.1f}%), {r['queued']} queued, ~{r['remaining_tokens']} tokens left"
    )


def target_waiting(target: Mapping[str, Any]) -> str | None:
    """Why a target's pending items are not being embedded, or None: no running worker
    serves its model."""
    if target["model"] is None or target["served"] or not target["pending"]:
        return None
    return f"waiting for a worker with model {target['model']}"


def _target_line(target: Mapping[str, Any]) -> Text | None:
    """One target's binding for the human view, when there is something to act on: items
    waiting for a worker with its model, or rows holding another model's vector (the JSON
    lists every target)."""
    if not target_waiting(target) and not target.get("stale_model"):
        return None
    dims = "" if target["dimensions"] is None else f", {target['dimensions']} dims"
    model = f"model {target['model']}{dims}"
    parts = [f"{target['table_name']}.{target['embedding_column']}: {model}"]
    waiting = target_waiting(target)
    if waiting:
        parts.append(f"{target['pending']} pending, {waiting}")
    if target.get("stale_model"):
        parts.append(
            f"{target['stale_model']} row(s) hold another model's vector "
            "(enqueue --stale-model queues them)"
        )
    return plain(" · ".join(parts))


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def status_renderable(report: StatusReport, price_override: float | None) -> RenderableType:
    """The human `status` view."""
    table = Table(title="embedding_queue", title_justify="left")
    table.add_column("table")
    table.add_column("column")
    for status in STATUSES:
        table.add_column(status, justify="right")
    table.add_column("truncated", justify="right")  # of done: text cut to the model's limit
    per_target: dict[tuple[str, str], dict[str, int]] = {}
    for row in report.counts:
        key = (row["table_name"], row["embedding_column"])
        per_target.setdefault(key, {})[row["status"]] = int(row["count"])
    truncated = {(r["table_name"], r["embedding_column"]): r["truncated"] for r in report.truncated}
    for (table_name, column), counts in sorted(per_target.items()):
        table.add_row(
            plain(table_name),
            plain(column),
            *(str(counts.get(s, 0)) for s in STATUSES),
            str(truncated.get((table_name, column), 0)),
        )
    if not per_target:
        table.add_row("(empty)", "", *("0" for _ in STATUSES), "0")
    s = report.summary
    lines: list[RenderableType] = [
        table,
        Text(
            f"oldest pending: {_age(s['oldest_pending_seconds'])}   due now: {s['pending_due']}"
            f"   done in the last 1m/5m/15m: {s['done_last_1m']}/{s['done_last_5m']}/"
            f"{s['done_last_15m']}"
        ),
    ]
    lines += [line for line in map(_target_line, report.targets) if line is not None]
    lines += [_reembed_line(r) for r in report.reembeds]
    lines += [
        plain(
            f"chunked target {r['table_name']}.{r['embedding_column']}: {r['chunks']:,} "
            f"chunks of {r['records']:,} rows in {r['chunks_table']}"
        )
        for r in report.chunks
    ]
    for row in report.inbox:
        lines.append(
            plain(
                f"bulk inserts into {row['table_name']}.{row['embedding_column']}: "
                f"{row['rows']} rows from {row['statements']} statement(s) not yet queued "
                "(a running worker queues them before it claims)"
            )
        )
    lines.extend(plain(index_line(row)) for row in report.indexes)
    for row in report.usage:
        price = price_per_million(row["model"], price_override)
        tokens = int(row["tokens_total"] or 0)
        cost = "unknown price" if price is None else f"~${tokens * price / 1e6:.4f}"
        lines.append(
            plain(
                f"model {row['model'] or '?'}: {tokens} tokens in {row['requests_total']} "
                f"requests ({cost}); last 1m/5m/15m: {row['tokens_last_1m'] or 0}/"
                f"{row['tokens_last_5m'] or 0}/{row['tokens_last_15m'] or 0} tokens"
            )
        )
    if report.failures:
        failures = Table(title="recent failures", title_justify="left")
        for name in ("id", "table", "column", "record", "attempts", "error"):
            failures.add_column(name)
        for row in report.failures:
            failures.add_row(
                plain(row["id"]),
                plain(row["table_name"]),
                plain(row["embedding_column"]),
                plain(row["record_id"]),
                plain(row["attempts"]),
                plain((row["error_message"] or "")[:200]),
            )
        lines.append(failures)
    return Group(*lines)


def index_line(row: Mapping[str, Any]) -> str:
    """One wanted index (a row of queue.index_builds) in a sentence: its state, and what
    happens next."""
    head = (
        f"index {row['index_name']} on {row['table_name']}.{row['embedding_column']} "
        f"(hnsw m={row['m']} ef_construction={row['ef_construction']}): "
    )
    state = row["state"]
    if state == "ready":
        if row["valid"]:
            return head + "ready"
        return head + "ready but missing or invalid in the catalog: run build-index"
    if state == "pending":
        return head + "pending: built once the target's queued rows are embedded"
    if state == "building":
        return (
            head + f"building by {row['builder']} for {_age(row['building_seconds'])} "
            f"(maintenance_work_mem sized to the table; searches scan sequentially until ready)"
        )
    return head + f"failed: {row['error_message']} (run build-index as the table's owner)"


def rows_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Table:
    """A simple table of ``rows`` showing ``columns``; the title and every cell as plain text."""
    table = Table(title=plain(title), title_justify="left")
    for name in columns:
        table.add_column(plain(name))
    for row in rows:
        table.add_row(*(plain(row.get(c)) for c in columns))
    return table


def stdout_console() -> Console:
    """A console for command output (stdout; plain when not a terminal)."""
    return Console(soft_wrap=True)
