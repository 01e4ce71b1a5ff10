"""A claimed batch's items before and after the provider: which are valid work (and which
fail without a provider call), which vector goes with which item, and the batch's log lines.
Pure functions over model values; ``worker/batch.py`` composes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from queue_processor import queue
from queue_processor.errors import PermanentError, StatementFailed
from queue_processor.models import ItemFailure, QueueItem, Target
from queue_processor.providers.base import EmbedResult
from queue_processor.targets import parse_record_id
from queue_processor.worker.report import BatchReport

log = structlog.get_logger("queue_processor.worker.batch")

TargetKey = tuple[str, str]

_BLANK = " \t\n\r\f\v"


@dataclass(frozen=True)
class Work:
    """A valid item: where its vector goes, under which key."""

    item: QueueItem
    target: Target
    key: str


def validate(
    items: Sequence[QueueItem], targets: dict[TargetKey, Target]
) -> tuple[list[Work], list[ItemFailure]]:
    """Split claimed items into work for the provider and items that fail without it."""
    work: list[Work] = []
    failures: list[ItemFailure] = []
    for item in items:
        target = targets.get((item.table_name, item.embedding_column))
        if target is None:
            failures.append(ItemFailure(item, "unregistered_target", _unregistered(item)))
            continue
        if item.content is None or not item.content.strip(_BLANK):
            message = "content is empty (NULL or whitespace only); not embedded"
            failures.append(ItemFailure(item, "empty_content", message))
            continue
        try:
            key = parse_record_id(target, item.record_id)
        except PermanentError as exc:
            failures.append(ItemFailure(item, "invalid_record_id", str(exc)))
            continue
        work.append(Work(item, target, key))
    return work, failures


def match_vectors(
    work: Sequence[Work], embedded: EmbedResult, details: Sequence[str | None] | None = None
) -> tuple[list[queue.Write], list[ItemFailure]]:
    """Pair each item with its vector (aligned with ``work``) and its detail (``details``,
    aligned too: e.g. "truncated to 8,191 of 23,125 tokens"); items without a vector, or
    with one that does not fit their column, fail."""
    writes: list[queue.Write] = []
    failures: list[ItemFailure] = []
    for index, w in enumerate(work):
        vector = embedded.vectors[index]
        if vector is None:
            message = embedded.errors.get(index, "provider returned no vector")
            failures.append(ItemFailure(w.item, "provider_rejected", message))
        elif w.target.dimensions is not None and vector.shape[0] != w.target.dimensions:
            message = _dims_mismatch(w.target, int(vector.shape[0]))
            failures.append(ItemFailure(w.item, "dimension_mismatch", message))
        else:
            detail = details[index] if details is not None else None
            writes.append(queue.Write(w.item, w.target, w.key, vector, detail))
    return writes, failures


def log_written(
    report: BatchReport, failures: Sequence[ItemFailure], outcome: queue.CompleteResult
) -> None:
    for failure in failures:
        if failure.item.id in outcome.failed:
            item = failure.item
            log.warning(
                "item_failed",
                queue_id=item.id,
                table=item.table_name,
                column=item.embedding_column,
                record_id=item.record_id,
                reason=failure.reason,
                error=failure.message,
            )
    if outcome.lost:
        log.info("claims_superseded", items=len(outcome.lost), note="nothing written")
    log.info(
        "batch_done",
        items=report.items,
        done=report.done,
        skipped=report.skipped,
        failed=report.failed,
        lost=report.lost,
        tokens=report.tokens,
        requests=report.requests,
        ms=round(report.seconds * 1000, 1),
    )


def _unregistered(item: QueueItem) -> str:
    return (
        f"unregistered target: {item.table_name[:100]!r}.{item.embedding_column[:100]!r} is not "
        "in embedding_targets; nothing was executed"
    )


def _dims_mismatch(target: Target, got: int) -> str:
    return (
        f"model returned {got} dimensions but {target.table_name}.{target.embedding_column} "
        f"holds {target.dimensions}"
    )


def write_rejected(write: queue.Write | queue.ChunkWrite, error: StatementFailed) -> ItemFailure:
    target = write.target
    message = f"writing {target.table_name}.{target.embedding_column} failed: {error}"
    return ItemFailure(write.item, "write_rejected", message)
