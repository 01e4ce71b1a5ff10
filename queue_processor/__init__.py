"""queue_processor: keep vector embeddings of Postgres text up to date (outbox pattern)."""

from __future__ import annotations

from importlib.metadata import version

from queue_processor.db import Database
from queue_processor.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidRecordId,
    PermanentError,
    ProviderUnavailable,
    QueueProcessorError,
    StatementFailed,
    TransientError,
    UsageError,
)
from queue_processor.migrations import check_schema, migrate
from queue_processor.settings import Settings

__version__ = version("queue_processor")

__all__ = [
    "ConfigurationError",
    "Database",
    "DatabaseUnavailable",
    "InvalidRecordId",
    "PermanentError",
    "ProviderUnavailable",
    "QueueProcessorError",
    "Settings",
    "StatementFailed",
    "TransientError",
    "UsageError",
    "__version__",
    "check_schema",
    "migrate",
]
