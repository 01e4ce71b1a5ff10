"""All configuration, read from the environment once, at the edge (cli/factories.py).

Environment variable names are the field names in upper case (``DATABASE_URL``,
``OPENAI_API_KEY``, ``EMBEDDING_MODEL``...); queue_processor's own knobs carry the
``QUEUE_PROCESSOR_`` prefix. Never instantiated at import time: the CLI calls
``load_settings()``, which also takes the API key from systemd's credentials.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from queue_processor.models import MAX_CLAIM_BYTES, MAX_CONTENT_CHARS

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class Settings(BaseSettings):
    """Every setting with its default; units are in the names."""

    # A .env file in the working directory is read too (the seed systems kept their settings
    # there); variables set in the environment win over it. Unrelated keys are ignored.
    model_config = SettingsConfigDict(
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
        env_file=".env",
        env_file_encoding="utf-8",
    )

    # Database. Unset DATABASE_URL means the embedded PostgreSQL in data_dir.
    database_url: SecretStr | None = Field(default=None, alias="DATABASE_URL")
    queue_schema: str = Field(default="public", alias="QUEUE_PROCESSOR_SCHEMA")
    data_dir: Path | None = Field(default=None, alias="QUEUE_PROCESSOR_DATA_DIR")
    # The worker's connection pool; unset means max(4, 2 * concurrency + 2) (cli/factories.py:
    # worker_pool_size). Operator commands use one connection.
    pool_max_size: int | None = Field(default=None, ge=1, alias="QUEUE_PROCESSOR_POOL_SIZE")
    # DATABASE_URL is a transaction-mode pooler (PgBouncer, Supabase's pooler on port 6543):
    # no prepared statements, no session state, no LISTEN through it. auto: true when the
    # port is 6543 or the host name contains "pooler".
    pooled: bool | Literal["auto"] = Field(default="auto", alias="QUEUE_PROCESSOR_POOLED")
    # The database's direct address behind a pooler: LISTEN and index builds (CREATE INDEX
    # CONCURRENTLY) use it; without it a pooled worker polls every QUEUE_PROCESSOR_POLL_SECONDS
    # and builds no index.
    direct_url: SecretStr | None = Field(default=None, alias="QUEUE_PROCESSOR_DIRECT_URL")
    # The worker's sessions (or, pooled, transactions) run with these, so a stuck statement
    # or an abandoned transaction never holds row locks for long; 0 keeps the server's
    # setting. 300 s: far above a claim or the write of a large batch (milliseconds to
    # seconds, HNSW index updates included) and no longer than the default lease.
    statement_timeout_seconds: float = Field(
        default=300.0, ge=0, alias="QUEUE_PROCESSOR_STATEMENT_TIMEOUT_SECONDS"
    )
    # The worker never waits inside a transaction (statements are pipelined, no transaction
    # spans a provider call), so 60 s only ever ends a session that hung mid-transaction.
    idle_in_transaction_timeout_seconds: float = Field(
        default=60.0, ge=0, alias="QUEUE_PROCESSOR_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS"
    )

    # Provider.
    embedding_provider: Literal["openai", "local"] | None = Field(
        default=None, alias="EMBEDDING_PROVIDER"
    )
    # Unset means OpenAI's API (or the local model, when no key is set either).
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")
    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    # Unset means text-embedding-3-small (openai) or all-MiniLM-L6-v2 (local).
    embedding_model: str | None = Field(default=None, alias="EMBEDDING_MODEL")
    embedding_dimensions: int | None = Field(default=None, gt=0, alias="EMBEDDING_DIMENSIONS")
    embedding_requests_per_minute: int | None = Field(
        default=None, gt=0, alias="EMBEDDING_REQUESTS_PER_MINUTE"
    )
    embedding_tokens_per_minute: int | None = Field(
        default=None, gt=0, alias="EMBEDDING_TOKENS_PER_MINUTE"
    )
    embedding_max_inputs_per_request: int = Field(
        default=512, gt=0, alias="EMBEDDING_MAX_INPUTS_PER_REQUEST"
    )
    embedding_max_tokens_per_request: int = Field(
        default=250_000, gt=0, alias="EMBEDDING_MAX_TOKENS_PER_REQUEST"
    )
    # The model's input limit in tokens, for servers whose model queue_processor does not know
    # (OpenAI's models: their table; the local model: its own window). Unset and unknown:
    # no limit is applied until a server answers "maximum context length is N tokens".
    embedding_max_input_tokens: int | None = Field(
        default=None, gt=0, alias="EMBEDDING_MAX_INPUT_TOKENS"
    )
    embedding_max_concurrent_requests: int = Field(
        default=4, gt=0, alias="EMBEDDING_MAX_CONCURRENT_REQUESTS"
    )
    embedding_price_per_million_tokens: float | None = Field(
        default=None, ge=0, alias="EMBEDDING_PRICE_PER_MILLION_TOKENS"
    )
    request_timeout_seconds: float = Field(default=60.0, gt=0, alias="EMBEDDING_TIMEOUT_SECONDS")
    connect_timeout_seconds: float = Field(
        default=10.0, gt=0, alias="EMBEDDING_CONNECT_TIMEOUT_SECONDS"
    )
    provider_max_retries: int = Field(default=5, ge=1, alias="EMBEDDING_MAX_RETRIES")
    # Ceiling on one success body from the provider, in bytes; each request's own limit is
    # derived from its inputs and dimensions (OpenAIProvider.response_limit_bytes).
    embedding_max_response_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, alias="EMBEDDING_MAX_RESPONSE_BYTES"
    )
    # Further models one worker embeds with, each with its own provider (a TOML file; see
    # cli/models_file.py). Keys are named there by environment variable, never written.
    embedding_models_file: Path | None = Field(default=None, alias="EMBEDDING_MODELS_FILE")
    # Plain http to a host that is not loopback sends the key in clear: refused unless true.
    openai_allow_insecure_http: bool = Field(default=False, alias="OPENAI_ALLOW_INSECURE_HTTP")

    # Worker.
    # 500: large enough to amortise a batch's fixed cost (a claim, a provider call, one write
    # transaction) — batch 100 ran at 0.42x of the Postgres floor, 500 at ~0.7x
    # (scripts/benchmark.py) — and within every provider's inputs-per-request limit.
    batch_size: int = Field(default=500, gt=0, alias="QUEUE_PROCESSOR_BATCH_SIZE")
    delay_ms: int = Field(default=0, ge=0, alias="QUEUE_PROCESSOR_DELAY_MS")
    # 2: while one batch is written, the next one's provider call is already under way and a
    # third can be claimed, so neither the provider nor Postgres waits on the other (CLI
    # defaults drained at 0.47x of the Postgres floor with 1, 0.56x with 2; benchmark.py).
    # run-embedding-processor.sh keeps 1: the seeds' one-batch-then-pause pacing.
    concurrency: int = Field(default=2, gt=0, alias="QUEUE_PROCESSOR_CONCURRENCY")
    lease_seconds: float = Field(default=300.0, gt=0, alias="QUEUE_PROCESSOR_LEASE_SECONDS")
    max_attempts: int = Field(default=3, ge=1, alias="QUEUE_PROCESSOR_MAX_ATTEMPTS")
    retry_base_seconds: float = Field(
        default=10.0, gt=0, alias="QUEUE_PROCESSOR_RETRY_BASE_SECONDS"
    )
    retry_max_seconds: float = Field(
        default=3600.0, gt=0, alias="QUEUE_PROCESSOR_RETRY_MAX_SECONDS"
    )
    poll_interval_seconds: float = Field(default=5.0, gt=0, alias="QUEUE_PROCESSOR_POLL_SECONDS")
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, alias="QUEUE_PROCESSOR_SHUTDOWN_GRACE_SECONDS"
    )
    max_content_chars: int = Field(
        default=MAX_CONTENT_CHARS, gt=0, alias="QUEUE_PROCESSOR_MAX_CONTENT_CHARS"
    )
    max_claim_bytes: int = Field(
        default=MAX_CLAIM_BYTES, gt=0, alias="QUEUE_PROCESSOR_MAX_CLAIM_BYTES"
    )
    # How long a worker trusts its copy of the target registry before a batch reloads it (a
    # batch naming a target it has not seen reloads at once).
    target_cache_seconds: float = Field(
        default=30.0, gt=0, alias="QUEUE_PROCESSOR_TARGET_CACHE_SECONDS"
    )
    # However many NOTIFYs arrive (any role may send one), an empty queue is scanned again at
    # most this often.
    min_rescan_seconds: float = Field(
        default=0.25, ge=0, alias="QUEUE_PROCESSOR_MIN_RESCAN_SECONDS"
    )
    # Vector indexes (register --index hnsw). A backfill of at least this many rows gets its
    # index after the backlog drained (an index present during a backfill made it 13.6x
    # slower); below it the index is created at once. 0: always after the backlog.
    index_defer_rows: int = Field(default=10_000, ge=0, alias="QUEUE_PROCESSOR_INDEX_DEFER_ROWS")
    # Ceiling on an index build's maintenance_work_mem, in MB (the build asks for what the
    # graph of the table's rows needs, at least 64 MB; pgvector falls back to much slower
    # on-disk inserts when the graph does not fit).
    index_build_memory_mb: int = Field(
        default=1024, ge=1, le=2_000_000, alias="QUEUE_PROCESSOR_INDEX_BUILD_MEMORY_MB"
    )
    # How often a running worker looks for a wanted index whose backlog drained (one cheap
    # query of the registry); 0: this worker builds no indexes (build-index does).
    index_check_seconds: float = Field(
        default=10.0, ge=0, alias="QUEUE_PROCESSOR_INDEX_CHECK_SECONDS"
    )
    embedding_cache: bool = Field(default=False, alias="EMBEDDING_CACHE")
    # claimed_by of the worker's claims; unset means host:pid.
    worker_name: str | None = Field(default=None, alias="QUEUE_PROCESSOR_WORKER_NAME")

    # Logging.
    log_level: str = Field(default="info", alias="QUEUE_PROCESSOR_LOG_LEVEL")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", alias="QUEUE_PROCESSOR_LOG_FORMAT"
    )

    @field_validator("queue_schema")
    @classmethod
    def _schema_is_identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError(f"QUEUE_PROCESSOR_SCHEMA must be a plain identifier, got {value!r}")
        return value


API_KEY_CREDENTIAL = "openai_api_key"
"""The credential name the unit's ``LoadCredential=`` uses for the API key."""


def load_settings() -> Settings:
    """The configuration, read once at the edge: the environment (``Settings()``), then, if it
    sets no ``OPENAI_API_KEY``, the key in ``$CREDENTIALS_DIRECTORY/openai_api_key``.

    That is where systemd's ``LoadCredential=openai_api_key:<file>`` puts it: readable by the
    service alone and, unlike ``EnvironmentFile=``, absent from the environment that child
    processes (an embedded PostgreSQL) inherit. Surrounding whitespace (a trailing newline) is
    dropped. Raises ``ValidationError``, like ``Settings()``, for invalid values and for a
    credential file that exists but cannot be read or is empty; a missing file is no error.
    """
    settings = Settings()
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if settings.openai_api_key is not None or not directory:
        return settings
    path = Path(directory) / API_KEY_CREDENTIAL
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return settings
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise _credential_error(path, f"cannot be read: {reason}") from exc
    if not key:
        raise _credential_error(path, "is empty")
    return settings.model_copy(update={"openai_api_key": SecretStr(key)})


def _credential_error(path: Path, problem: str) -> ValidationError:
    """A ValidationError for OPENAI_API_KEY that names the file, never its content."""
    error = PydanticCustomError(
        "credential",
        "the systemd credential {path} {problem}",
        {"path": str(path), "problem": problem},
    )
    return ValidationError.from_exception_data(
        "Settings",
        [{"type": error, "loc": ("OPENAI_API_KEY",), "input": str(path)}],
        hide_input=True,
    )


OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_DEFAULT_MODEL = "text-embedding-3-small"
