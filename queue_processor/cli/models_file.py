"""Several models in one worker: the models file (``EMBEDDING_MODELS_FILE``, TOML).

One table per further model the worker embeds with, besides the one ``EMBEDDING_MODEL`` and
the provider settings configure (which also embeds unbound targets)::

    [models."text-embedding-3-large"]
    base_url = "https://api.openai.com/v1"   # an OpenAI-compatible server
    api_key_env = "OPENAI_API_KEY_LARGE"     # the NAME of the variable holding its key
    dimensions = 1024                        # optional: requested dimensions

    [models."all-MiniLM-L6-v2"]
    provider = "local"                       # the [local] extra's sentence-transformers

A key never appears in the file (nor in the database): the file names the environment
variable that holds it, read by the composition root at start. Every other provider setting
(timeouts, packing limits, retries) is the environment's, shared by all models.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from queue_processor.errors import ConfigurationError

_KEYS = {"provider", "base_url", "api_key_env", "dimensions"}


@dataclass(frozen=True)
class ModelSpec:
    """One further model of a worker and how to reach it."""

    model: str
    provider: Literal["openai", "local"]
    base_url: str | None
    api_key_env: str | None
    dimensions: int | None


def load_models_file(path: Path) -> list[ModelSpec]:
    """The models of ``path``; ConfigurationError naming the problem (never a value that
    could be a key)."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"EMBEDDING_MODELS_FILE {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"EMBEDDING_MODELS_FILE {path} is not TOML: {exc}") from exc
    models = document.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigurationError(f'EMBEDDING_MODELS_FILE {path} has no [models."NAME"] table')
    return [_spec(path, name, table) for name, table in models.items()]


def _spec(path: Path, name: str, table: object) -> ModelSpec:
    where = f"EMBEDDING_MODELS_FILE {path}, model {name!r}"
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where}: expected a table of settings")
    if "api_key" in table:
        raise ConfigurationError(
            f"{where}: keys are not written in the file; name the environment variable "
            "that holds it with api_key_env"
        )
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigurationError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    provider = table.get("provider", "openai")
    if provider not in ("openai", "local"):
        raise ConfigurationError(f"{where}: provider must be openai or local")
    dimensions = table.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or dimensions <= 0):
        raise ConfigurationError(f"{where}: dimensions must be a positive integer")
    for key in ("base_url", "api_key_env"):
        if table.get(key) is not None and not isinstance(table[key], str):
            raise ConfigurationError(f"{where}: {key} must be a string")
    if provider == "openai" and not table.get("base_url"):
        raise ConfigurationError(f"{where}: base_url is required for an OpenAI-compatible model")
    return ModelSpec(
        model=name,
        provider=provider,
        base_url=table.get("base_url"),
        api_key_env=table.get("api_key_env"),
        dimensions=dimensions,
    )
