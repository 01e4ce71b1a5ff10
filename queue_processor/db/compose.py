"""Composing SQL: the named statements of queries.sql with their ``{slots}`` filled.

Identifiers reach SQL only here, through ``psycopg.sql.Identifier``: callers fill a
statement's ``{slots}`` with plain names (``"docs"``), qualified names (``("app", "docs")``)
or fragments built by this module (another named block, a ``type_modifier``, a
``builtin_type``, a ``joined`` list), never with SQL text.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Literal, get_args

from psycopg import sql

from queue_processor import queries

Query = sql.SQL | sql.Composed
"""A statement or a fragment of one, composed here: callers pass it on, never build one."""
Slot = str | tuple[str, ...] | Query
"""What fills a ``{slot}`` of a named statement: a name, a qualified name or a fragment."""
BuiltinType = Literal["smallint", "integer", "bigint", "uuid", "text", "varchar"]
"""The built-in type names a statement may be given (the target keys' types)."""

_BUILTIN_TYPES: frozenset[str] = frozenset(get_args(BuiltinType))


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (what quote_ident does, always quoting)."""
    return '"' + name.replace('"', '""') + '"'


def statement(name: str, /, *, source: str = "queries.sql", **slots: Slot) -> Query:
    """The named statement (or fragment) of ``source`` with its ``{slot}`` placeholders filled.

    A string becomes an identifier, a tuple a qualified identifier (``("app", "docs")`` ->
    ``"app"."docs"``); a ``Query`` (another named block, or a fragment made by the helpers
    below) is inserted as it is.
    """
    text = sql.SQL(queries.get(name, source))
    if not slots:
        return text
    return text.format(**{key: _composable(value) for key, value in slots.items()})


def _composable(value: Slot) -> sql.Composable:
    if isinstance(value, str):
        return sql.Identifier(value)
    if isinstance(value, tuple):
        return sql.Identifier(*value)
    return value


def type_modifier(value: int) -> Query:
    """A type modifier such as the 384 of ``vector(384)`` (it cannot be a bound parameter):
    an integer literal (the type itself checks its range)."""
    # operator.index: any integer type, never a float or a text (TypeError).
    return sql.SQL("{}").format(sql.Literal(operator.index(value)))


def builtin_type(name: BuiltinType) -> Query:
    """A built-in type's name, e.g. for a key parameter's cast (``%(ids)s::{id_type}[]``).
    These are SQL keywords or pg_catalog's types; anything else is refused."""
    if name not in _BUILTIN_TYPES:
        raise ValueError(f"not a built-in type this package uses: {name!r}")
    return sql.SQL(name)


def joined(parts: Iterable[Query], separator: Literal[", ", ""] = ", ") -> Query:
    """Fragments in a row: a comma-separated list, or (``separator=""``) one after another."""
    return sql.SQL(separator).join(parts)
