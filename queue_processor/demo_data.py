"""The demo's data: the 300 sample documents shipped as package data
(``queue_processor/data/demo_documents.jsonl``), its three searches with the topic their
nearest neighbours should come from, and the row it rewrites."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from queue_processor.errors import ConfigurationError

DATA_FILE = "demo_documents.jsonl"

SEARCHES: tuple[tuple[str, str], ...] = (
    ("how do I bake bread at home", "cooking"),
    ("planets and telescopes", "astronomy"),
    ("saving money for retirement", "personal finance"),
)
"""The demo's queries, with the topic their nearest neighbours should come from."""

REWRITE_TITLE = "Sunday roast chicken"
REWRITE: dict[str, str] = {
    "title": "A night of shooting stars",
    "topic": "astronomy",
    "body": (
        "We drove away from the city lights to watch the Perseid meteor shower. After "
        "midnight we counted more than forty meteors, and Jupiter rose bright in the east."
    ),
}
"""The row the demo rewrites (a cooking note becomes an astronomy note) and its new content."""


@dataclass(frozen=True)
class DemoDocument:
    """One shipped sample document."""

    title: str
    body: str
    topic: str


def load_documents() -> list[DemoDocument]:
    """The sample documents shipped in ``queue_processor/data/demo_documents.jsonl``."""
    text = resources.files("queue_processor.data").joinpath(DATA_FILE).read_text("utf-8")
    documents: list[DemoDocument] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            documents.append(DemoDocument(item["title"], item["body"], item["topic"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"{DATA_FILE} line {number} is not a document") from exc
    return documents
