"""From a wheel in a clean virtualenv: migrate, register a user's table, see writes queued.

Builds the project's wheel, installs it (and its dependencies, from pip's configured index
and cache) into a fresh venv, then runs the installed ``queue-processor`` console script
from an empty working directory, with no checkout on the path: ``migrate`` must find the SQL
files shipped inside the wheel, and ``register`` must install triggers that queue every
insert and content change of the user's table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]


def run(args: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point back at the checkout or its venv."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith(("QUEUE_PROCESSOR_", "DATABASE_URL"))
    }
    env.update(extra)
    return env


def test_wheel_in_a_clean_venv_migrates_registers_and_queues(
    tmp_path: Path, empty_dsn: str
) -> None:
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", dist, PROJECT],
        cwd=PROJECT,
        env=clean_env(),
    )
    (wheel,) = dist.glob("queue_processor-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = clean_env(DATABASE_URL=empty_dsn, QUEUE_PROCESSOR_LOG_FORMAT="json")
    run(
        [
            bin_dir / "python",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            wheel,
        ],
        cwd=workdir,
        env=env,
    )

    # The package and its SQL come from the venv, not from the checkout.
    located = run(
        [
            bin_dir / "python",
            "-c",
            "import importlib.resources as r, queue_processor as q;"
            "print(q.__file__);"
            "print(len([f for f in (r.files('queue_processor') / 'sql' / 'migrations').iterdir()"
            " if f.name.endswith('.sql')]))",
        ],
        cwd=workdir,
        env=env,
    ).split()
    assert Path(located[0]).is_relative_to(env_dir), located
    shipped = len(list((PROJECT / "sql" / "migrations").glob("*.sql")))
    assert int(located[1]) == shipped

    cli = bin_dir / "queue-processor"
    assert "applied" in run([cli, "migrate"], cwd=workdir, env=env)
    run([cli, "migrate"], cwd=workdir, env=env)  # idempotent

    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        versions = conn.execute(
            "SELECT count(*) AS n, count(DISTINCT version) AS d FROM queue_processor_migrations"
        ).fetchone()
        assert versions == {"n": shipped, "d": shipped}
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            """CREATE TABLE sessions (
                   id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                   user_id uuid,
                   title text,
                   title_embedding vector(1536)
               )"""
        )

    run(
        [cli, "register", "sessions", "--column", "title_embedding", "--content", "title"],
        cwd=workdir,
        env=env,
    )

    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        row = conn.execute(
            "INSERT INTO sessions (user_id, title) VALUES (gen_random_uuid(), 'Jazz night')"
            " RETURNING id"
        ).fetchone()
        assert row is not None
        session_id = str(row["id"])
        queued = conn.execute(
            "SELECT table_name, record_id, embedding_column, content, status FROM embedding_queue"
        ).fetchall()
        assert queued == [
            {
                "table_name": "sessions",
                "record_id": session_id,
                "embedding_column": "title_embedding",
                "content": "Jazz night",
                "status": "pending",
            }
        ]
        conn.execute("UPDATE embedding_queue SET status = 'done'")
        conn.execute("UPDATE sessions SET title = 'Jazz night, moved'")
        requeued = conn.execute("SELECT content, status FROM embedding_queue").fetchall()
        assert requeued == [{"content": "Jazz night, moved", "status": "pending"}]
