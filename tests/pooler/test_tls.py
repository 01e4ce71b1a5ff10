"""TLS as managed PostgreSQL requires it: ``sslmode=verify-full`` with a CA file.

The test makes a CA and a server certificate for localhost/127.0.0.1 (tests/support/tls.py)
and serves it from a PgBouncer that terminates TLS in front of the session's server (the
embedded PostgreSQL is built without OpenSSL; see tls.py) in session mode, so only TLS is
under test here. The endpoint refuses clients that do not use TLS, so a command that works
proves its connection was encrypted and the certificate verified against the CA file.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pooler.pooled import (
    FakeOpenAIServer,
    assert_no_prepared_statement_errors,
    start_pgbouncer,
)
from tests.reliability.harness import assert_embeddings_are_of
from tests.support.helpers import (
    body,
    cli_env,
    create_table,
    execute,
    insert_rows,
    run_cli,
    status_counts,
    summary_counts,
)
from tests.support.pgbouncer import PgBouncer
from tests.support.tls import TlsFiles, make_tls_files

pytestmark = pytest.mark.pooler  # the TLS endpoint is a PgBouncer


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, TlsFiles]:
    """(the server's CA and certificate, an unrelated CA's)."""
    root = tmp_path_factory.mktemp("tls")
    return make_tls_files(root / "server"), make_tls_files(root / "other", ca_name="other CA")


@pytest.fixture(scope="module")
def tls_endpoint(pg_admin_dsn: str, certificates: tuple[TlsFiles, TlsFiles]) -> Iterator[PgBouncer]:
    """The session's server behind TLS (session mode: every client gets its own session)."""
    bouncer = start_pgbouncer(pg_admin_dsn, pool_mode="session", client_tls=certificates[0])
    try:
        yield bouncer
    finally:
        bouncer.stop()


def tls_url(endpoint: PgBouncer, dsn: str, ca: Path, *, host: str = "localhost") -> str:
    """``dsn``'s database at the TLS endpoint, verify-full against ``ca``, by host name."""
    url = endpoint.url(dsn, sslmode="verify-full", sslrootcert=str(ca))
    return url.replace("@127.0.0.1:", f"@{host}:", 1)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def test_verify_full_with_the_ca_file_migrates_registers_and_drains(
    empty_dsn: str,
    tls_endpoint: PgBouncer,
    certificates: tuple[TlsFiles, TlsFiles],
    fake: FakeOpenAIServer,
) -> None:
    execute(empty_dsn, "CREATE EXTENSION vector")
    url = tls_url(tls_endpoint, empty_dsn, certificates[0].ca_cert)
    env = cli_env(url, fake)

    assert "applied" in ok(run_cli(["migrate"], env)).stdout
    create_table(empty_dsn)
    contents = {i: body(i) for i in range(1, 31)}
    insert_rows(empty_dsn, contents.items())
    ok(
        run_cli(
            ["register", "docs", "--column", "embedding", "--content", "body", "--backfill"],
            env,
        )
    )
    assert status_counts(empty_dsn) == {"pending": 30}
    drained = ok(run_cli(["run", "--drain", "--batch-size", "8"], env))
    assert summary_counts(drained.stdout)["processed"] == 30
    assert_no_prepared_statement_errors(drained.stderr)
    assert status_counts(empty_dsn) == {"done": 30}
    assert_embeddings_are_of(empty_dsn, contents)

    # Every login of this database at the endpoint was TLS (it refuses the others anyway).
    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    logins = [line for line in tls_endpoint.log().splitlines() if f"db={name} " in line]
    assert logins
    assert all("tls=TLSv1." in line for line in logins), logins


def test_verify_full_by_ip_address_checks_the_certificates_ip_san(
    dsn: str,
    tls_endpoint: PgBouncer,
    certificates: tuple[TlsFiles, TlsFiles],
    fake: FakeOpenAIServer,
) -> None:
    """verify-full checks an IP address against the certificate's IP SAN."""
    url = tls_url(tls_endpoint, dsn, certificates[0].ca_cert, host="127.0.0.1")
    done = ok(run_cli(["status", "--json"], cli_env(url, fake)))
    assert done.stdout.startswith("{")


@pytest.mark.parametrize("command", [["migrate"], ["run", "--drain"], ["status"]])
def test_a_wrong_ca_fails_with_a_clear_error(
    dsn: str,
    tls_endpoint: PgBouncer,
    certificates: tuple[TlsFiles, TlsFiles],
    fake: FakeOpenAIServer,
    command: list[str],
) -> None:
    """A server whose certificate the CA file does not vouch for is refused: the command's
    error line says it is about the certificate, exit 3 (database unavailable) or 2
    (configuration), no traceback, nothing done."""
    url = tls_url(tls_endpoint, dsn, certificates[1].ca_cert)
    done = run_cli(command, cli_env(url, fake), timeout_s=60)
    assert done.returncode in (2, 3), f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    # The command's own last word, not only psycopg's warnings on the way, names the cause.
    said = [line for line in done.stderr.splitlines() if line.startswith("queue-processor: ")]
    assert said, done.stderr
    assert "certificate" in said[-1].lower(), done.stderr
    assert fake.requests_total == 0
