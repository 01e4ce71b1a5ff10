"""Binding from the command line (issue 13): `register` binds a target to the configured
model, `run --drain` of another model leaves it and says so (exit 0), `status` shows what
waits for which model, `bind` rebinds, `enqueue --stale-model` re-queues old vectors."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import (
    DIMS,
    MODEL,
    body,
    cli_env,
    create_table,
    execute,
    insert_rows,
    run_cli,
    summary_counts,
)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def status_targets(env: dict[str, str]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = json.loads(ok(run_cli(["status", "--json"], env)).stdout)[
        "targets"
    ]
    return targets


def test_register_binds_run_of_another_model_leaves_and_bind_hands_over(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(dsn, server, COLUMNS="200")
    other = {**env, "EMBEDDING_MODEL": "other-model"}
    create_table(dsn)
    insert_rows(dsn, ((i, body(i)) for i in range(1, 6)))
    done = ok(
        run_cli(
            [
                "register",
                "docs",
                "--column",
                "embedding",
                "--content",
                "body",
                "--model-column",
                "model",
                "--backfill",
            ],
            env,
        )
    )
    assert f"(model {MODEL})" in done.stdout
    assert execute(dsn, "SELECT model FROM embedding_targets") == [{"model": MODEL}]

    # A worker of another model: nothing to serve, says so, exits 0, sends nothing.
    done = ok(run_cli(["run", "--drain"], other))
    assert summary_counts(done.stdout)["processed"] == 0
    assert f"waiting for a worker with their model: docs.embedding ({MODEL})" in done.stdout
    assert server.requests_total == 0
    [target] = status_targets(env)
    assert (target["model"], target["pending"], target["waiting"]) == (
        MODEL,
        5,
        f"waiting for a worker with model {MODEL}",
    )
    human = ok(run_cli(["status"], env)).stdout
    assert f"5 pending, waiting for a worker with model {MODEL}" in human

    # The configured worker drains it.
    done = ok(run_cli(["run", "--drain"], env))
    assert summary_counts(done.stdout)["processed"] == 5
    assert set(server.inputs_by_model) == {MODEL}

    # Rebind to the other model: the five vectors are now stale, found and re-queued.
    done = ok(run_cli(["bind", "docs", "--model", "other-model"], env))
    assert f"bound docs.embedding to model other-model (was {MODEL})" in done.stdout
    # A search must embed its query with the column's model.
    refused = run_cli(["search", "docs", "anything"], env)
    assert refused.returncode == 2
    assert "search with EMBEDDING_MODEL=other-model" in refused.stderr
    assert status_targets(env)[0]["stale_model"] == 5
    done = ok(run_cli(["enqueue", "docs", "--stale-model"], env))
    assert "queued 5 row(s) of docs.embedding (stale_model)" in done.stdout
    done = ok(run_cli(["run", "--drain"], other))
    assert summary_counts(done.stdout)["processed"] == 5
    assert execute(dsn, "SELECT DISTINCT model FROM docs") == [{"model": "other-model"}]
    assert status_targets(env)[0]["stale_model"] == 0


def test_one_worker_serves_the_models_of_its_models_file(
    dsn: str, server: FakeOpenAIServer, tmp_path: Any
) -> None:
    """EMBEDDING_MODELS_FILE adds a model with its own server and key (named by variable);
    the key never reaches the output, the file or the database."""
    secret = "sk-second-SECRET-7d1e"
    models_file = tmp_path / "models.toml"
    with FakeOpenAIServer(dims=DIMS, required_api_key=secret) as second:
        models_file.write_text(
            f'[models."second-model"]\nbase_url = "{second.base_url}"\n'
            'api_key_env = "SECOND_KEY"\n',
            encoding="utf-8",
        )
        env = cli_env(dsn, server, EMBEDDING_MODELS_FILE=str(models_file), SECOND_KEY=secret)
        for table, model in (("docs", MODEL), ("notes", "second-model")):
            create_table(dsn, table=table)
            insert_rows(dsn, ((i, body(i)) for i in range(1, 4)), table=table)
            ok(
                run_cli(
                    [
                        "register",
                        table,
                        "--column",
                        "embedding",
                        "--content",
                        "body",
                        "--model",
                        model,
                        "--model-column",
                        "model",
                        "--backfill",
                    ],
                    env,
                )
            )
        done = ok(run_cli(["run", "--drain"], env))
        assert secret not in done.stdout + done.stderr
        assert summary_counts(done.stdout)["processed"] == 6
        assert set(second.inputs_by_model) == {"second-model"}
    assert set(server.inputs_by_model) == {MODEL}
    assert execute(dsn, "SELECT DISTINCT model FROM notes") == [{"model": "second-model"}]
    assert execute(dsn, "SELECT DISTINCT model FROM docs") == [{"model": MODEL}]
    dump = execute(dsn, "SELECT string_agg(t::text, ' ') AS s FROM embedding_targets AS t")
    assert secret not in dump[0]["s"]


def test_a_models_file_with_a_key_in_it_is_refused(
    dsn: str, server: FakeOpenAIServer, tmp_path: Any
) -> None:
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        '[models."m"]\nbase_url = "http://127.0.0.1:1/v1"\napi_key = "sk-in-file"\n',
        encoding="utf-8",
    )
    env = cli_env(dsn, server, EMBEDDING_MODELS_FILE=str(models_file))
    done = run_cli(["run", "--drain"], env)
    assert done.returncode == 2, done.stderr
    assert "name the environment variable" in done.stderr
    assert "sk-in-file" not in done.stdout + done.stderr
