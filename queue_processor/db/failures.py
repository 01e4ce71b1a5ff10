"""Driver errors translated into queue_processor's exception tree.

- connection loss (the session timeouts included, and a connection out of step with the
  server), pool timeouts, deadlocks, serialization failures and statements cancelled by
  ``statement_timeout`` -> DatabaseUnavailable (the worker backs off and tries again)
- any other error raised by a statement -> StatementFailed (keeps the SQLSTATE)
- a connection that cannot be opened -> ConfigurationError when the server (or the TLS
  handshake) says our settings are wrong: a certificate the CA file does not vouch for, a
  password, a role or database that does not exist; DatabaseUnavailable otherwise (refused,
  timed out, a name that does not resolve): see ``connect_failure``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import psycopg.errors
from psycopg_pool import PoolTimeout

from queue_processor.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    StatementFailed,
    first_line,
)

_RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "53300",  # too_many_connections
        # The server ended the session: it was idle in a transaction, or in one, or idle,
        # for longer than allowed (idle_in_transaction_session_timeout...).
        "25P03",  # idle_in_transaction_session_timeout
        "25P04",  # transaction_timeout
        "57P05",  # idle_session_timeout
    }
)

# What libpq, the server or a pooler say when a connection is refused because of how it was
# configured: trying again cannot help. Matched in lower case against each line of the error.
_CONFIGURATION_MARKERS = (
    "certificate",  # SSL error: certificate verify failed / root certificate file ...
    "ssl was required",
    "does not support ssl",
    "sslmode",
    "password authentication failed",
    "no password supplied",
    "password is required",
    "authentication failed",
    "does not exist",  # database "x" / role "x" does not exist
    "no pg_hba.conf entry",
    "no such database",  # PgBouncer
    "no such user",  # PgBouncer
    "permission denied",
    "invalid connection option",
    "invalid sslmode",
    "invalid dsn",
)


def out_of_step(exc: BaseException | None) -> bool:
    """Whether psycopg lost track of the protocol: it received more results than it sent
    statements. A transaction pooler does that to a client whose server connection died in
    the middle of a transaction: its error arrives ahead of the answer to the next statement
    ("received 2 results from command 'COMMIT'"). The connection cannot be trusted again."""
    return isinstance(exc, psycopg.InternalError) and exc.sqlstate is None


def _statement_timed_out(exc: psycopg.Error) -> bool:
    """A statement cancelled by ``statement_timeout`` (not by a cancel request of ours)."""
    return isinstance(exc, psycopg.errors.QueryCanceled) and "statement timeout" in str(exc)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise psycopg errors as queue_processor errors, keeping ``__cause__``."""
    try:
        yield
    except PoolTimeout as exc:
        raise DatabaseUnavailable(f"no database connection available: {exc}") from exc
    except psycopg.Error as exc:
        sqlstate = exc.sqlstate
        if (
            (
                isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
                and not isinstance(exc, psycopg.errors.QueryCanceled)
            )
            or sqlstate in _RETRYABLE_SQLSTATES
            or _statement_timed_out(exc)
            or out_of_step(exc)
        ):
            raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
        raise StatementFailed(first_line(exc), sqlstate=sqlstate) from exc


def connect_failure(
    exc: psycopg.Error, *, target: str = "the database"
) -> ConfigurationError | DatabaseUnavailable:
    """What a failed connection attempt means, as the error to raise (one line naming the
    cause): ConfigurationError when our settings are wrong (exit 2: retrying cannot help),
    DatabaseUnavailable when the server could not be reached (exit 3). ``target`` names
    what was connected to in the message.

    libpq reports one failure per address it tried ("Multiple connection attempts
    failed..."); the line that names a configuration problem wins over, say, a refused IPv6
    address tried first."""
    lines = [_cause(line) for line in str(exc).splitlines()]
    causes = [line for line in lines if line and not line.startswith("Is the server running")]
    if isinstance(exc, psycopg.ProgrammingError):  # a DSN libpq cannot parse
        return ConfigurationError(f"invalid URL of {target}: {causes[0] if causes else exc}")
    for cause in causes:
        if any(marker in cause.lower() for marker in _CONFIGURATION_MARKERS):
            return ConfigurationError(f"cannot connect to {target}: {cause}")
    return DatabaseUnavailable(
        f"cannot reach {target}: {causes[0] if causes else type(exc).__name__}"
    )


def _cause(line: str) -> str:
    """One line of a connection error without psycopg's list decoration."""
    line = line.strip().removeprefix("- ").strip()
    marker = "connection failed: "
    if marker in line:  # "host: 'h', port: '5432', hostaddr: '::1': connection failed: ..."
        line = line.split(marker, 1)[1]
    return line.replace("FATAL:  ", "")
