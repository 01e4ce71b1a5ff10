"""``run``: process the queue until stopped (a service), until drained, or for one batch.

Shutdown is a request: the first SIGTERM/SIGINT asks the worker to stop claiming and to
finish or release what it holds; a second one aborts at once (the leases cover it). The
command handles its signals itself (``handles_signals``), unlike the others (see app.py).
"""

from __future__ import annotations

import argparse
import signal
import sys

import anyio
import structlog

from queue_processor.cli.args import Subparsers, non_negative_int, out, port, positive_int
from queue_processor.cli.factories import WiredRun, wired_run, worker_config
from queue_processor.errors import EXIT_ABORTED, EXIT_FAILED, EXIT_OK
from queue_processor.settings import Settings
from queue_processor.systemd import SystemdNotifier
from queue_processor.worker import RunMode, RunSummary, Worker, unwrapped_errors

log = structlog.get_logger(__name__)


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the worker; print a summary unless it ran as a service and stopped as asked."""
    mode: RunMode = "drain" if args.drain else "once" if args.once else "continuous"
    config = worker_config(
        settings, batch_size=args.batch_size, delay_ms=args.delay_ms, concurrency=args.concurrency
    )
    async with wired_run(
        settings,
        config,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        progress_bar=mode == "drain" and sys.stderr.isatty(),
    ) as wired:
        log.info(
            "worker_started",
            mode=mode,
            owner=config.owner,
            batch_size=config.batch_size,
            delay_ms=config.delay_ms,
            concurrency=config.concurrency,
            provider=wired.provider.name,
            model=wired.provider.model,
            models=list(wired.worker.models),
        )
        with unwrapped_errors():
            summary = await _run_worker(wired, mode, owner=config.owner)
    worker = wired.worker
    if mode != "continuous" or worker.aborted:
        print_summary(summary)
    if mode != "continuous" and worker.serving is not None and worker.serving.nothing_to_serve:
        out(worker.serving.message())
    return _exit_code(mode, worker, summary)


def _exit_code(mode: RunMode, worker: Worker, summary: RunSummary) -> int:
    """Aborted by a second signal: EXIT_ABORTED. A service stopped by SIGTERM stopped as
    asked (failed items are in the queue): EXIT_OK. Otherwise EXIT_FAILED if items failed."""
    if worker.aborted:
        return EXIT_ABORTED
    if mode == "continuous":
        return EXIT_OK
    return EXIT_FAILED if summary.failed else EXIT_OK


async def _run_worker(wired: WiredRun, mode: RunMode, *, owner: str) -> RunSummary:
    """Run the worker next to its side tasks: signals, the systemd watchdog and the
    queue-depth poller; READY=1 before the first claim, STOPPING=1 when it ends."""
    worker, notifier = wired.worker, wired.notifier
    async with anyio.create_task_group() as tg:
        tg.start_soon(_handle_signals, worker, notifier)
        # The watchdog follows the worker loop only: /healthz reports a database outage,
        # but a restart would not fix that.
        tg.start_soon(notifier.watchdog_loop, lambda: wired.progress()[0])
        if wired.poller is not None:
            tg.start_soon(wired.poller.run)
        notifier.notify(f"READY=1\nSTATUS=processing the queue ({mode}) as {owner}")
        try:
            summary = await worker.run(mode)
        finally:
            if not worker.stopping:  # drained or failed; after a signal STOPPING=1 went already
                notifier.stopping()
        tg.cancel_scope.cancel()
    return summary


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


def print_summary(summary: RunSummary) -> None:
    """The end-of-run report on stdout (its wording is relied on by scripts)."""
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


def add_parsers(sub: Subparsers) -> None:
    """Add the ``run`` command."""
    p = sub.add_parser(
        "run",
        help="process the queue (continuously, --drain or --once)",
        description="Claim batches, embed them, write the vectors and mark items done.",
    )
    p.add_argument("--batch-size", type=positive_int, help="items per batch (default 500)")
    p.add_argument(
        "--delay-ms", type=non_negative_int, help="pause between batches in ms (default 0)"
    )
    p.add_argument("--concurrency", type=positive_int, help="batches in flight (default 2)")
    once = p.add_mutually_exclusive_group()
    once.add_argument(
        "--drain", action="store_true", help="exit when nothing is claimable, with a summary"
    )
    once.add_argument("--once", action="store_true", help="process one batch and exit")
    p.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on this port (0: any free port)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 for remote scrapes)",
    )
    p.set_defaults(func=cmd_run, handles_signals=True)
