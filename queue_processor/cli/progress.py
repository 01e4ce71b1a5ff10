"""The terminal progress bar of ``run --drain``: a batch observer drawing on stderr."""

from __future__ import annotations

import contextlib

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.worker import BatchObserver, BatchReport


async def drain_progress(db: Database, stack: contextlib.AsyncExitStack) -> BatchObserver:
    """A rich progress bar on stderr, sized by the claimable work now and advanced by every
    finished batch; it stays on screen until ``stack`` closes."""
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
