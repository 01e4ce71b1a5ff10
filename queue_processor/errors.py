"""One exception tree, split by what the caller does next; each class knows its exit code.

```
QueueProcessorError (exit 1)
├── ConfigurationError (exit 2)   stop the process: bad settings, 401/403, unknown model,
│   │                             outdated schema, no provider configured
│   └── UsageError (exit 2)       a command line that cannot be run as given
├── TransientError (exit 1)       retry later: the item goes back to pending with a backoff
│   ├── ProviderUnavailable       429 / 5xx / timeout / connection error after in-call retries
│   └── DatabaseUnavailable (3)   connection lost, deadlock, serialization failure
└── PermanentError (exit 1)       fail this item (or this input) with a message
    ├── StatementFailed (exit 2)  the database rejected a statement (keeps the SQLSTATE)
    └── InvalidRecordId           a queue row's record_id cannot be a key of its target
```

Errors are translated at the edge (queue_processor.db for psycopg, providers for httpx) and keep the
original exception as ``__cause__``. No message ever contains an API key. The command line
exits with ``exit_code`` of the error that ended a command (``EXIT_ABORTED`` on a signal).
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DB = 3
EXIT_ABORTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class QueueProcessorError(Exception):
    """Base of every error raised by queue_processor."""

    exit_code: ClassVar[int] = EXIT_FAILED


class ConfigurationError(QueueProcessorError):
    """The process cannot do useful work until an operator changes something: stop."""

    exit_code: ClassVar[int] = EXIT_CONFIG


class UsageError(ConfigurationError):
    """A command's arguments cannot be acted on (missing option, bad id range...)."""


class TransientError(QueueProcessorError):
    """A temporary failure: the work should be retried later.

    ``retry_after_seconds`` carries a server's hint (Retry-After) when there was one.
    """

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ProviderUnavailable(TransientError):
    """The embedding provider failed transiently (429, 5xx, timeout, connection error)."""


class DatabaseUnavailable(TransientError):
    """The database connection failed or a transaction must be retried."""

    exit_code: ClassVar[int] = EXIT_DB


class PermanentError(QueueProcessorError):
    """This item can never succeed as it is: mark it failed with the message."""


class StatementFailed(PermanentError):
    """The database rejected a statement (bad data, dropped column, permissions...).

    For a command this is an operator's problem to fix (exit 2); inside a batch it fails the
    items whose write was rejected."""

    exit_code: ClassVar[int] = EXIT_CONFIG

    def __init__(self, message: str, *, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class InvalidRecordId(PermanentError):
    """A queue row's record_id cannot be a key of its target's type."""


def first_line(exc: BaseException) -> str:
    """The first line of ``str(exc)`` for a one-line message (the class name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
