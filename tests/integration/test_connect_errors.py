"""A connection that cannot be opened ends the command at once with one line naming the
cause: exit 2 when the settings are wrong (unknown database or role, a certificate the CA
file does not vouch for: tests/pooler/test_tls.py), exit 3 when the server cannot be reached
(tried again for the connect timeout first). Without this the pool retried a wrong setting
for 10 s and then said only "pool initialization incomplete"."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from psycopg import conninfo

from queue_processor.db import Database
from queue_processor.errors import ConfigurationError, DatabaseUnavailable
from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import DIMS, cli_env, run_cli
from tests.support.pgbouncer import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as server:
        yield server


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"dbname": "qp_no_such_database"}, 'database "qp_no_such_database" does not exist'),
        ({"user": "qp_no_such_role"}, 'role "qp_no_such_role" does not exist'),
    ],
    ids=["database", "role"],
)
@pytest.mark.parametrize("command", [["status"], ["run", "--drain"], ["migrate"]])
def test_a_wrong_setting_ends_the_command_at_once_naming_it(
    dsn: str, fake: FakeOpenAIServer, change: dict[str, str], cause: str, command: list[str]
) -> None:
    url = conninfo.make_conninfo(dsn, **change)
    started = time.monotonic()
    done = run_cli(command, cli_env(url, fake), timeout_s=60)
    elapsed_s = time.monotonic() - started
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("queue-processor: cannot connect to the database: "), last
    assert cause in last
    assert elapsed_s < 8, f"waited {elapsed_s:.1f}s: the pool's retry was not skipped"
    assert fake.requests_total == 0


async def test_an_unreachable_server_is_tried_for_the_connect_timeout_then_named() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=r"cannot reach the database: .*refused"):
        async with Database(url, connect_timeout_seconds=1.5):
            pass
    assert 1.0 <= time.monotonic() - started < 6


async def test_an_unparsable_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="invalid URL of the database"):
        async with Database("host=127.0.0.1 port"):
            pass
