"""How the demo prints: check marks, the search hits and the rewritten row (rich)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from queue_processor.db import Row


def say_ok(console: Console, message: str) -> None:
    console.print(Text.assemble(("✓ ", "green"), message))


def before_after_table(document_id: int, before: Row, after: Row) -> Table:
    """The rewritten row's title, topic and embedded_at, before and after."""
    table = Table(box=box.SIMPLE_HEAVY, title_justify="left", title=f"Document {document_id}")
    table.add_column("")
    table.add_column("before")
    table.add_column("after")
    table.add_row("title", Text(str(before["title"])), Text(str(after["title"])))
    table.add_row("topic", Text(str(before["topic"])), Text(str(after["topic"])))
    table.add_row(
        "embedded_at", _timestamp(before["embedded_at"]), _timestamp(after["embedded_at"])
    )
    return table


def hits_table(title: str, hits: list[Row], expected_topic: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("distance", justify="right")
    table.add_column("topic")
    table.add_column("title")
    for rank, hit in enumerate(hits, start=1):
        topic = str(hit["topic"])
        table.add_row(
            str(rank),
            f"{float(hit['distance']):.3f}",
            Text(topic, style="green" if topic == expected_topic else "yellow"),
            Text(str(hit["title"])),
        )
    return table


def _timestamp(value: Any) -> Text:
    return Text(value.isoformat(sep=" ", timespec="milliseconds") if value else "—")
