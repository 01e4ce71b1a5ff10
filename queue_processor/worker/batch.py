"""One claimed batch -> a ``BatchReport``: validate, embed, write and acknowledge.

Items are checked against the target registry (registered target, non-empty content, a key
of the target's id type); the valid ones go to the provider in one ``embed`` call (it packs
and parallelises requests); each vector that fits its column is written, and the whole batch
acknowledged, in one transaction whose statements check that the claim still stands. When
the provider is unavailable the batch goes back to pending with backoff instead.

The database work happens inside ``write_turn()``, a context the loop provides: that is
where the loop holds a batch's write slot and lets the next batch embed meanwhile. Database
outages are retried while the lease stands (``retry_database``); past that the
DatabaseUnavailable propagates and the claim is left to expire.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TypeVar

import anyio
import anyio.to_thread
import structlog

from queue_processor import queue
from queue_processor.backoff import retry_database
from queue_processor.db import Database
from queue_processor.errors import StatementFailed, TransientError
from queue_processor.models import Claim, ClaimToken, ItemFailure, QueueId, QueueItem, Target
from queue_processor.providers.base import EmbeddingProvider
from queue_processor.worker.chunks import Chunked, embed_chunked, merged
from queue_processor.worker.config import WorkerConfig
from queue_processor.worker.items import (
    TargetKey,
    Work,
    log_written,
    match_vectors,
    validate,
    write_rejected,
)
from queue_processor.worker.lengths import Embedded, Fitted, TooLong, embed_fitted, fit
from queue_processor.worker.report import BatchReport

log = structlog.get_logger(__name__)

T = TypeVar("T")
WriteTurn = Callable[[], AbstractAsyncContextManager[object]]
"""Entered around a batch's database work, once the provider is done with it."""


class TargetRegistry:
    """The registered targets, as of at most ``config.target_cache_seconds`` ago; a batch
    naming a target not seen yet (registered since) reloads them at once."""

    def __init__(self, db: Database, config: WorkerConfig) -> None:
        self._db = db
        self._config = config
        self._targets: dict[TargetKey, Target] = {}
        self._loaded_at = -float("inf")

    async def resolve(self, items: Sequence[QueueItem]) -> dict[TargetKey, Target]:
        """The registry, fresh enough for ``items`` (retrying through a database outage)."""
        keys = {(i.table_name, i.embedding_column) for i in items}
        stale = time.monotonic() - self._loaded_at > self._config.target_cache_seconds
        if stale or not keys <= self._targets.keys():
            loaded = await retry_database(
                partial(queue.list_targets, self._db),
                within_seconds=self._config.lease_seconds,
            )
            self._targets = {t.key: t for t in loaded}
            self._loaded_at = time.monotonic()
        return self._targets


class BatchProcessor:
    """Turns claimed batches into reports; one per worker, shared by its batches."""

    def __init__(
        self,
        db: Database,
        provider: EmbeddingProvider,
        config: WorkerConfig,
        *,
        providers: Mapping[str, EmbeddingProvider] | None = None,
    ) -> None:
        self._db = db
        self._provider = provider
        self._config = config
        self._targets = TargetRegistry(db, config)
        # Further models this worker embeds with, by model name: items of a target bound to
        # one of them go to its provider, every other item to ``provider``.
        self._providers = dict(providers or {})

    async def process(self, claim: Claim, write_turn: WriteTurn) -> BatchReport:
        """Validate, embed, then (inside ``write_turn()``) write and acknowledge ``claim``.

        Raises what the loop acts on: ConfigurationError (the provider refuses our settings),
        DatabaseUnavailable (an outage outlasted the lease), cancellation."""
        started = time.monotonic()
        targets = await self._targets.resolve(claim.items)
        work, failures = validate(claim.items, targets)
        # Items of chunked targets: split, embed each chunk, write the sets (worker/chunks.py).
        chunk_work = [w for w in work if w.target.chunked]
        work = [w for w in work if not w.target.chunked]
        try:
            chunked = await self._chunked(chunk_work)
        except TransientError as exc:
            async with write_turn():
                return await self._retry_later(claim, work + chunk_work, failures, exc, started)
        failures += chunked.failures
        if self._providers:
            return await self._process_routed(
                claim, work, failures, write_turn, started, chunked, chunk_work
            )
        try:
            work, fitted, too_long = await self._fit(work)
            failures += too_long
            embedded = await self._embed(work, fitted)
        except TransientError as exc:
            async with write_turn():
                return await self._retry_later(claim, work + chunk_work, failures, exc, started)
        writes, rejected = match_vectors(work, embedded.as_result(), embedded.details)
        failures += rejected
        usage = [queue.Usage(self._config.owner, len(work), embedded.tokens, embedded.requests)]
        if chunk_work:
            usage.append(
                queue.Usage(self._config.owner, len(chunk_work), chunked.tokens, chunked.requests)
            )
        async with write_turn():
            outcome = await self._complete(claim.token, writes, failures, usage, chunked.writes)
        report = BatchReport(
            items=len(claim.items),
            done=len(outcome.done) - len(outcome.missing),
            failed=len(outcome.failed),
            skipped=len(outcome.missing),
            retried=0,
            lost=len(outcome.lost),
            tokens=embedded.tokens + chunked.tokens,
            requests=embedded.requests + chunked.requests,
            seconds=time.monotonic() - started,
            cached=embedded.cached + chunked.cached,
        )
        log_written(report, failures, outcome)
        return report

    async def _chunked(self, work: list[Work]) -> Chunked:
        """Split and embed the items of chunked targets, each with its model's provider."""
        routes: dict[str, list[Work]] = {}
        for w in work:
            model = w.target.model if w.target.model in self._providers else None
            routes.setdefault(model or "", []).append(w)
        parts = []
        for model, part in routes.items():
            provider = self._providers[model] if model else self._provider
            named = provider.model if model else None
            parts.append(await embed_chunked(provider, part, model=named))
        return merged(parts)

    async def _fit(self, work: list[Work]) -> tuple[list[Work], list[Fitted], list[ItemFailure]]:
        """Apply each target's length policy (worker/lengths.py): the work that goes to the
        provider, its texts, and the items that fail for their length."""
        if not work:
            return [], [], []
        await self._provider.prepare()  # a local model's tokenizer and window, once loaded
        limit, tokenizer = self._provider.max_input_tokens, self._provider.tokenizer

        def fit_all() -> list[Fitted | TooLong]:
            return [
                fit(w.item.content or "", w.target.length_policy, limit, tokenizer) for w in work
            ]

        # Counting long texts takes a while: off the event loop (lease renewal, LISTEN).
        outcomes = await anyio.to_thread.run_sync(fit_all)
        kept: list[Work] = []
        fitted: list[Fitted] = []
        failures: list[ItemFailure] = []
        for w, outcome in zip(work, outcomes, strict=True):
            if isinstance(outcome, TooLong):
                failures.append(ItemFailure(w.item, "too_long", outcome.message))
            else:
                kept.append(w)
                fitted.append(outcome)
        truncated = sum(f.detail is not None for f in fitted)
        if truncated:
            log.info("inputs_truncated", inputs=truncated, max_input_tokens=limit)
        return kept, fitted, failures

    async def _embed(self, work: list[Work], fitted: list[Fitted]) -> Embedded:
        # A batch of invalid items only is acknowledged without a provider call.
        if not work:
            return Embedded([], {}, [], 0, 0, 0)
        return await embed_fitted(
            self._provider,
            [w.item.content or "" for w in work],
            [w.target.length_policy for w in work],
            fitted,
        )

    async def _process_routed(
        self,
        claim: Claim,
        work: list[Work],
        failures: list[ItemFailure],
        write_turn: WriteTurn,
        started: float,
        chunked: Chunked,
        chunk_work: list[Work],
    ) -> BatchReport:
        """``process`` for a worker of several models: each target's items go to the
        provider of the target's model (the default provider for unbound targets), each
        vector is written with its model's name, and usage is recorded per model. A
        transient failure of any provider sends the whole batch back."""
        routes: dict[str, list[Work]] = {}
        for w in work:
            model = w.target.model if w.target.model in self._providers else None
            routes.setdefault(model or "", []).append(w)
        writes: list[queue.Write] = []
        usages: list[queue.Usage] = []
        if chunk_work:
            usages.append(
                queue.Usage(self._config.owner, len(chunk_work), chunked.tokens, chunked.requests)
            )
        tokens, requests, cached = chunked.tokens, chunked.requests, chunked.cached
        for model, part in routes.items():
            provider = self._providers[model] if model else self._provider
            try:
                embedded = await provider.embed([w.item.content or "" for w in part])
            except TransientError as exc:
                async with write_turn():
                    return await self._retry_later(claim, work + chunk_work, failures, exc, started)
            matched, rejected = match_vectors(part, embedded)
            writes += [dataclasses.replace(w, model=provider.model) for w in matched]
            failures += rejected
            tokens, requests = tokens + embedded.tokens, requests + embedded.requests
            cached += embedded.cached
            usages.append(
                queue.Usage(
                    self._config.owner,
                    len(part),
                    embedded.tokens,
                    embedded.requests,
                    model=provider.model,
                )
            )
        async with write_turn():
            outcome = await self._complete(claim.token, writes, failures, usages, chunked.writes)
        report = BatchReport(
            items=len(claim.items),
            done=len(outcome.done) - len(outcome.missing),
            failed=len(outcome.failed),
            skipped=len(outcome.missing),
            retried=0,
            lost=len(outcome.lost),
            tokens=tokens,
            requests=requests,
            seconds=time.monotonic() - started,
            cached=cached,
        )
        log_written(report, failures, outcome)
        return report

    async def _retry_later(
        self,
        claim: Claim,
        work: list[Work],
        failures: list[ItemFailure],
        error: TransientError,
        started: float,
    ) -> BatchReport:
        """The provider is unavailable: items go back to pending with backoff (or fail once
        their attempts are used up); items already known to be bad fail now."""
        cfg = self._config
        items = [w.item for w in work]
        retried, failed = await self._persist(
            partial(
                queue.schedule_retry,
                self._db,
                claim.token,
                items,
                str(error),
                max_attempts=cfg.max_attempts,
                base_seconds=cfg.retry_base_seconds,
                max_seconds=cfg.retry_max_seconds,
                retry_after_seconds=error.retry_after_seconds,
            )
        )
        failed_now = await self._persist(partial(queue.fail, self._db, claim.token, failures))
        log.warning(
            "batch_retry",
            items=len(items),
            retried=len(retried),
            failed=len(failed),
            error=str(error),
        )
        return BatchReport(
            items=len(claim.items),
            done=0,
            failed=len(failed) + len(failed_now),
            skipped=0,
            retried=len(retried),
            lost=0,
            tokens=0,
            requests=0,
            seconds=time.monotonic() - started,
            sent_back=True,
        )

    async def _complete(
        self,
        token: ClaimToken,
        writes: list[queue.Write],
        failures: list[ItemFailure],
        usage: queue.Usage | list[queue.Usage],
        chunk_writes: Sequence[queue.ChunkWrite] = (),
    ) -> queue.CompleteResult:
        """Write and acknowledge the batch in one transaction. If Postgres rejects a write
        (a dropped column, a dimension check, permissions...), write each target on its own
        so the others still land, and fail the rejected target's items."""
        try:
            return await self._persist(
                partial(
                    queue.complete,
                    self._db,
                    token,
                    writes,
                    failures,
                    model=self._provider.model,
                    usage=usage,
                    chunk_writes=chunk_writes,
                )
            )
        except StatementFailed as exc:
            log.warning("batch_write_failed", error=str(exc), note="retrying per target")
        return await self._complete_per_target(token, writes, failures, chunk_writes)

    async def _complete_per_target(
        self,
        token: ClaimToken,
        writes: list[queue.Write],
        failures: list[ItemFailure],
        chunk_writes: Sequence[queue.ChunkWrite],
    ) -> queue.CompleteResult:
        groups: dict[TargetKey, list[queue.Write | queue.ChunkWrite]] = {}
        every: list[queue.Write | queue.ChunkWrite] = [*writes, *chunk_writes]
        for w in every:
            groups.setdefault(w.target.key, []).append(w)
        done: list[QueueId] = []
        missing: list[QueueId] = []
        lost: list[QueueId] = []
        rejected = list(failures)
        for group in groups.values():
            column = [w for w in group if isinstance(w, queue.Write)]
            chunks = [w for w in group if isinstance(w, queue.ChunkWrite)]
            try:
                part = await self._persist(
                    partial(
                        queue.complete,
                        self._db,
                        token,
                        column,
                        [],
                        model=self._provider.model,
                        chunk_writes=chunks,
                    )
                )
            except StatementFailed as exc:
                rejected += [write_rejected(w, exc) for w in group]
                continue
            done += part.done
            missing += part.missing
            lost += part.lost
        failed = await self._persist(partial(queue.fail, self._db, token, rejected))
        return queue.CompleteResult(tuple(done), tuple(missing), failed, tuple(lost))

    async def _persist(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a database operation, retrying through outages while our lease still stands
        (the renewal loop keeps it); after that the claim is lost anyway."""
        return await retry_database(op, within_seconds=self._config.lease_seconds)
