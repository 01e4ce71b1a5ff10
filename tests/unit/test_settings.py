"""Settings are read from the environment and from a .env file in the working directory, the
environment winning (issue 16: configuration as the seed systems kept it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from queue_processor.settings import load_settings


def test_a_dotenv_file_is_read_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("QUEUE_PROCESSOR_BATCH_SIZE", "QUEUE_PROCESSOR_DELAY_MS", "EMBEDDING_MODEL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "# the seeds' own settings sit next to ours and are ignored\n"
        "SUPABASE_URL=https://example.supabase.co\n"
        "QUEUE_PROCESSOR_BATCH_SIZE=7\n"
        "QUEUE_PROCESSOR_DELAY_MS=2000\n"
        "EMBEDDING_MODEL=from-the-file\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDDING_MODEL", "from-the-environment")
    settings = load_settings()
    assert settings.batch_size == 7
    assert settings.delay_ms == 2000
    assert settings.embedding_model == "from-the-environment"


def test_no_dotenv_file_means_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUEUE_PROCESSOR_BATCH_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_settings().batch_size == 500
