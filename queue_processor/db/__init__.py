"""The only package that knows psycopg and psycopg_pool.

``Database`` (database.py) owns a connection pool (an async context manager with an explicit
lifecycle) bound to one queue schema and runs every statement through its helpers, under a
session policy (session.py): directly connected, each session's search_path is
``pg_catalog, pg_temp`` (statements name the queue schema, see ``Database.statement``);
behind a transaction-mode pooler (PgBouncer, Supabase's pooler), nothing rests on the
session: no server-side prepared statements, and each transaction pins that search_path (and
the worker's timeouts) for itself. It registers the binary dumpers used to ship vectors
(adapters.py: pgvector's ``vector[]``; ``real[]`` for the other column types) and translates
driver errors into queue_processor's exception tree (failures.py):

- connection loss, pool timeouts, deadlocks, serialization failures and statement timeouts
  -> DatabaseUnavailable
- any other error raised by a statement -> StatementFailed (keeps the SQLSTATE)
- a connection refused for a configuration reason (certificate, password, unknown database)
  -> ConfigurationError, at once

Statements come from queries.sql by name (``statement``). Identifiers reach SQL only here,
through ``psycopg.sql.Identifier`` (compose.py): callers fill a statement's ``{slots}`` with
plain names (``"docs"``), qualified names (``("app", "docs")``) or fragments built by this
package (another named block, a ``type_modifier``, a ``builtin_type``, a ``joined`` list),
never with SQL text.
"""

from __future__ import annotations

from queue_processor.db.adapters import Float4ArrayDumper, VectorBatch, float4_array
from queue_processor.db.compose import (
    BuiltinType,
    Query,
    Slot,
    builtin_type,
    joined,
    statement,
    type_modifier,
)
from queue_processor.db.database import SCHEMA_LOCK, Connection, Database, Row, ensure_database
from queue_processor.db.failures import connect_failure, translate_errors
from queue_processor.db.session import Params, SessionPolicy, looks_pooled

__all__ = [
    "SCHEMA_LOCK",
    "BuiltinType",
    "Connection",
    "Database",
    "Float4ArrayDumper",
    "Params",
    "Query",
    "Row",
    "SessionPolicy",
    "Slot",
    "VectorBatch",
    "builtin_type",
    "connect_failure",
    "ensure_database",
    "float4_array",
    "joined",
    "looks_pooled",
    "statement",
    "translate_errors",
    "type_modifier",
]
