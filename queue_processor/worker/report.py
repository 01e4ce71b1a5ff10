"""What a batch did (``BatchReport``) and what a run did (``RunSummary``, the sum of them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchReport:
    """What one batch did (for the run's summary, progress bars and metrics).

    Counts are items: ``done`` written and acknowledged, ``failed`` for good, ``skipped`` (the
    source row was gone), ``retried`` (sent back to pending by a provider outage), ``lost``
    (the claim was superseded: nothing written), ``cached`` (served from the embedding
    cache). ``tokens`` and ``requests`` are what the provider spent; ``seconds`` is the
    batch's wall time. ``sent_back`` marks a batch that the provider's outage sent back
    for a later retry instead of writing it.
    """

    items: int
    done: int
    failed: int
    skipped: int
    retried: int
    lost: int
    tokens: int
    requests: int
    seconds: float
    cached: int = 0
    sent_back: bool = False


BatchObserver = Callable[[BatchReport], None]


@dataclass
class RunSummary:
    """Counters of one run, for the end-of-drain summary, logs and metrics: the batches'
    reports added up, plus what claims and releases did outside any batch."""

    processed: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    lost: int = 0
    reclaimed: int = 0
    released: int = 0
    batches: int = 0
    tokens: int = 0
    requests: int = 0
    cache_hits: int = 0
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    def add(self, report: BatchReport) -> None:
        """Count one batch in (``batches`` counts the batches that were written)."""
        self.processed += report.done
        self.failed += report.failed
        self.skipped += report.skipped
        self.retried += report.retried
        self.lost += report.lost
        self.tokens += report.tokens
        self.requests += report.requests
        self.cache_hits += report.cached
        if not report.sent_back:
            self.batches += 1

    @property
    def duration_seconds(self) -> float:
        """Wall time of the run so far."""
        return (self.finished_at or time.monotonic()) - self.started_at

    @property
    def rows_per_second(self) -> float:
        """Items finished (done or failed) per second of wall time."""
        elapsed = self.duration_seconds
        return (self.processed + self.failed + self.skipped) / elapsed if elapsed > 0 else 0.0
