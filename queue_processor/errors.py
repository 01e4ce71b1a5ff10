"""One exception tree, split by what the caller does next.

```
QueueProcessorError
├── ConfigurationError        stop the process: bad settings, 401/403, unknown model,
│                             outdated schema, no provider configured
├── TransientError            retry later: the item goes back to pending with a backoff
│   ├── ProviderUnavailable   429 / 5xx / timeout / connection error after in-call retries
│   └── DatabaseUnavailable   connection lost, deadlock, serialization failure
└── PermanentError            fail this item (or this input) with a message
    ├── InputRejected         the provider refused one input (400: too long, invalid)
    ├── InvalidEmbedding      wrong dimension, NaN/inf, missing vector in a response
    └── UnregisteredTarget    a queue row names a (table, column) that is not registered
```

Errors are translated at the edge (db.py for psycopg, providers for httpx) and keep the
original exception as ``__cause__``. No message ever contains an API key.
"""

from __future__ import annotations


class QueueProcessorError(Exception):
    """Base of every error raised by queue_processor."""


class ConfigurationError(QueueProcessorError):
    """The process cannot do useful work until an operator changes something: stop."""


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


class PermanentError(QueueProcessorError):
    """This item can never succeed as it is: mark it failed with the message."""


class InputRejected(PermanentError):
    """The provider rejected one input (HTTP 400 and similar)."""


class InvalidEmbedding(PermanentError):
    """A vector failed validation: wrong dimension, non-finite values, or missing."""


class UnregisteredTarget(PermanentError):
    """A queue row names a table/column pair that is not in the target registry."""
