"""The worker: claim a batch, embed it, write the vectors, acknowledge; until stopped.

- ``loop``    the ``Worker``: the claim loop, its slots, stop / abort / wake
- ``side``    its side tasks (lease renewal, LISTEN) and its record in embedding_workers
- ``batch``   one claimed batch -> a ``BatchReport`` (validation, the embed call, the write
              with its per-target fallback, retry scheduling)
- ``report``  ``BatchReport`` and ``RunSummary``, the sum of a run's reports
- ``config``  ``WorkerConfig`` and ``with_cache``, which puts the embedding cache in front
              of a provider
- ``slots``   a claim slot, given back exactly once
- ``task_errors``  ``unwrapped_errors``: a task group's one error, unwrapped for callers
"""

from __future__ import annotations

from queue_processor.worker.config import RunMode, WorkerConfig, default_owner, with_cache
from queue_processor.worker.loop import INBOX_WAIT_SECONDS, NOTIFY_CHANNEL, Worker
from queue_processor.worker.report import BatchObserver, BatchReport, RunSummary
from queue_processor.worker.task_errors import caller_error, unwrapped_errors

__all__ = [
    "INBOX_WAIT_SECONDS",
    "NOTIFY_CHANNEL",
    "BatchObserver",
    "BatchReport",
    "RunMode",
    "RunSummary",
    "Worker",
    "WorkerConfig",
    "caller_error",
    "default_owner",
    "unwrapped_errors",
    "with_cache",
]
