"""Runtime SQL, loaded by name from ``queries.sql``.

Each statement in ``queries.sql`` starts with ``-- name: NAME`` followed by a one-line
description comment; statements take named parameters (``%(param)s``). Statements that need
identifiers (target tables and columns) hold ``{placeholders}``, filled only by queue_processor.db
(``statement``): with quoted identifiers, or with fragments that are blocks of the same file.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _all(filename: str = "queries.sql") -> dict[str, str]:
    text = resources.files("queue_processor").joinpath(filename).read_text(encoding="utf-8")
    parts = _BLOCK.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{filename} defines {name!r} twice")
        # Full-line comments document the file; they are not sent (and so can never hold a
        # stray parameter placeholder).
        lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


def get(name: str, filename: str = "queries.sql") -> str:
    """The SQL text of the statement called ``name`` in ``filename`` (a package file in the
    same format, e.g. demo.sql); KeyError if there is none."""
    return _all(filename)[name]
