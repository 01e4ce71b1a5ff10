"""Deployment settings (issue 17): pooled or direct, the LISTEN address, the worker's timeouts
and pool, and what a failed connection attempt means (configuration or unreachable)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from queue_processor.cli.factories import is_pooled, open_worker_database, worker_pool_size
from queue_processor.db import SessionPolicy, connect_failure, looks_pooled
from queue_processor.errors import ConfigurationError, DatabaseUnavailable
from queue_processor.settings import Settings
from tests.support.helpers import worker_config


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No .env file, no deployment variable of this machine."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "DATABASE_URL",
        "QUEUE_PROCESSOR_POOLED",
        "QUEUE_PROCESSOR_DIRECT_URL",
        "QUEUE_PROCESSOR_POOL_SIZE",
        "QUEUE_PROCESSOR_STATEMENT_TIMEOUT_SECONDS",
        "QUEUE_PROCESSOR_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS",
    ):
        monkeypatch.delenv(name, raising=False)


SUPABASE_POOLER = (
    "postgresql://postgres.abcdefghijklmnop:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres"
)


@pytest.mark.parametrize(
    ("dsn", "pooled"),
    [
        (SUPABASE_POOLER, True),
        ("postgresql://u@db.example.com:6543/app", True),
        ("host=pgbouncer-pooler.internal port=5432 dbname=app", True),
        ("postgresql://u@db.abcdefghijklmnop.supabase.co:5432/postgres", False),
        ("postgresql://u@127.0.0.1:5432/app", False),
        ("host=/var/run/postgresql dbname=app", False),
        ("postgresql://u@h1:5432,h2:6543/app", True),
        ("not a dsn = =", False),
    ],
)
def test_a_pooler_is_recognised_by_its_port_or_host_name(dsn: str, pooled: bool) -> None:
    assert looks_pooled(dsn) is pooled


@pytest.mark.parametrize(
    ("value", "dsn", "pooled"),
    [
        ("auto", SUPABASE_POOLER, True),
        ("auto", "postgresql://u@127.0.0.1:5432/app", False),
        ("true", "postgresql://u@127.0.0.1:5432/app", True),
        ("false", SUPABASE_POOLER, False),
    ],
)
def test_queue_processor_pooled_overrides_the_detection(
    monkeypatch: pytest.MonkeyPatch, value: str, dsn: str, pooled: bool
) -> None:
    monkeypatch.setenv("QUEUE_PROCESSOR_POOLED", value)
    assert is_pooled(Settings(), dsn) is pooled


def test_queue_processor_pooled_refuses_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUE_PROCESSOR_POOLED", "sometimes")
    with pytest.raises(ValueError, match="QUEUE_PROCESSOR_POOLED"):
        Settings()


def test_the_worker_database_takes_the_deployment_settings() -> None:
    settings = Settings(
        DATABASE_URL=SecretStr(SUPABASE_POOLER),
        QUEUE_PROCESSOR_DIRECT_URL=SecretStr("postgresql://u@db.example.com:5432/app"),
    )
    assert settings.statement_timeout_seconds == 300
    assert settings.idle_in_transaction_timeout_seconds == 60
    db = open_worker_database(settings, worker_config(concurrency=3))
    assert (db.pooled, db.listens) == (True, True)
    assert db.policy.statement_timeout_seconds == 300
    assert db.policy.idle_in_transaction_timeout_seconds == 60
    assert db.policy.connect_kwargs() == {"prepare_threshold": None}
    assert worker_pool_size(settings, 3) == 8
    assert worker_pool_size(settings.model_copy(update={"pool_max_size": 3}), 3) == 3


def test_a_pooled_worker_without_a_direct_url_does_not_listen() -> None:
    settings = Settings(DATABASE_URL=SecretStr(SUPABASE_POOLER))
    db = open_worker_database(settings, worker_config())
    assert (db.pooled, db.listens) == (True, False)
    direct = open_worker_database(settings.model_copy(update={"pooled": False}), worker_config())
    assert (direct.pooled, direct.listens) == (False, True)
    assert direct.policy.connect_kwargs() == {}  # psycopg's prepared statements stay on


def test_the_pin_carries_the_timeouts_in_milliseconds() -> None:
    policy = SessionPolicy(
        pooled=True, statement_timeout_seconds=0.25, idle_in_transaction_timeout_seconds=0
    )
    _, params = policy.pin()
    assert params == {
        "path": "pg_catalog, pg_temp",
        "statement_timeout": "250",
        "idle_timeout": None,  # 0: the server's setting stays
    }
    assert SessionPolicy(statement_timeout_seconds=0.0001).pin()[1]["statement_timeout"] == "1"


@pytest.mark.parametrize(
    ("message", "kind", "cause"),
    [
        (
            'connection failed: connection to server at "127.0.0.1", port 6432 failed: '
            "SSL error: certificate verify failed",
            ConfigurationError,
            "certificate verify failed",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
            'FATAL:  password authentication failed for user "app"',
            ConfigurationError,
            'password authentication failed for user "app"',
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
            'FATAL:  database "nosuch" does not exist',
            ConfigurationError,
            'database "nosuch" does not exist',
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
            "server does not support SSL, but SSL was required",
            ConfigurationError,
            "SSL was required",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
            "connections?",
            DatabaseUnavailable,
            "Connection refused",
        ),
        (
            "failed to resolve host 'db.nowhere.invalid': [Errno -2] Name or service not known",
            DatabaseUnavailable,
            "failed to resolve host",
        ),
        (
            # Several addresses (localhost: ::1 then 127.0.0.1): the configuration error wins.
            'connection failed: connection to server at "::1", port 6432 failed: Connection '
            "refused\nMultiple connection attempts failed. All failures were:\n"
            "- host: 'localhost', port: '6432', hostaddr: '::1': connection failed: "
            "Connection refused\n"
            "- host: 'localhost', port: '6432', hostaddr: '127.0.0.1': connection failed: "
            'connection to server at "127.0.0.1", port 6432 failed: SSL error: certificate '
            "verify failed",
            ConfigurationError,
            "certificate verify failed",
        ),
    ],
)
def test_a_failed_connection_names_its_cause_and_whether_retrying_helps(
    message: str, kind: type[Exception], cause: str
) -> None:
    failure = connect_failure(psycopg.OperationalError(message))
    assert type(failure) is kind
    text = str(failure)
    assert cause in text
    assert "\n" not in text
    assert "FATAL" not in text


def test_an_unparsable_url_is_a_configuration_error() -> None:
    with pytest.raises(psycopg.ProgrammingError) as info:
        psycopg.conninfo.conninfo_to_dict("host=h port")
    assert isinstance(connect_failure(info.value), ConfigurationError)
