"""The processing loop: claim a batch, embed it, write the vectors, acknowledge.

One ``Worker`` runs in one process; many may share a queue (Postgres is the coordinator).
Per batch: claim (committed at once) -> validate items against the target registry -> one
``provider.embed`` call for the batch (the provider packs and parallelises requests) ->
one transaction that writes every vector whose claim is still valid and acknowledges it.
``concurrency`` batches may be in flight; each slot pauses ``delay_ms`` after its batch
finishes (the semantics of the seeds' ``run-embedding-processor.sh BATCH DELAY``).

Side tasks run in the worker's task group so their death stops the worker loudly: lease
renewal (a slow batch is not stolen) and LISTEN (a new row wakes the loop at once; polling
is the fallback). Stopping is a request: ``stop()`` ends claiming, in-flight batches get
``shutdown_grace_seconds`` to finish, then are cancelled and their claims released.
``abort()`` cancels at once and leaves the claims to expire (leases make that safe).

No SQL lives here: the repository (queue.py) owns every statement.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
import anyio.abc
import structlog

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    PermanentError,
    StatementFailed,
    TransientError,
)
from queue_processor.models import (
    MAX_CLAIM_BYTES,
    MAX_CONTENT_CHARS,
    Claim,
    ClaimToken,
    QueueId,
    QueueItem,
    Target,
)
from queue_processor.providers.base import EmbeddingProvider, Vector
from queue_processor.targets import parse_record_id

log = structlog.get_logger(__name__)

RunMode = Literal["continuous", "drain", "once"]
T = TypeVar("T")
NOTIFY_CHANNEL = "embedding_queue"
# How long a draining worker waits before claiming again while another worker expands a bulk
# insert (an expansion of a few batches' keys takes tens of milliseconds).
INBOX_WAIT_SECONDS = 0.05
_BLANK = " \t\n\r\f\v"


def default_owner() -> str:
    """A worker identity for claimed_by: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker claims and paces work. Units are in the names."""

    batch_size: int = 100
    delay_ms: int = 0
    concurrency: int = 1
    lease_seconds: float = 300.0
    max_attempts: int = 3
    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 3600.0
    poll_interval_seconds: float = 5.0
    shutdown_grace_seconds: float = 30.0
    owner: str = field(default_factory=default_owner)
    target_cache_seconds: float = 30.0
    # Opt-in: serve already-embedded texts from embedding_cache instead of the provider.
    cache: bool = False
    # The dimensions requested from the provider (None = the model's default): part of the
    # cache key, since the same model gives different vectors at different dimensions.
    requested_dimensions: int | None = None
    # What one claim may load (see queries.sql, claim_batch).
    max_content_chars: int = MAX_CONTENT_CHARS
    max_claim_bytes: int = MAX_CLAIM_BYTES
    # However many NOTIFYs arrive (any role may send one), an empty queue is scanned again at
    # most this often; new work still wakes the loop at once after a quiet period.
    min_rescan_seconds: float = 0.25


@dataclass
class RunSummary:
    """Counters of one run, for the end-of-drain summary, logs and metrics."""

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

    @property
    def duration_seconds(self) -> float:
        """Wall time of the run so far."""
        return (self.finished_at or time.monotonic()) - self.started_at

    @property
    def rows_per_second(self) -> float:
        """Items finished (done or failed) per second of wall time."""
        elapsed = self.duration_seconds
        return (self.processed + self.failed + self.skipped) / elapsed if elapsed > 0 else 0.0


BatchObserver = Callable[["BatchReport"], None]


@dataclass(frozen=True)
class BatchReport:
    """What one batch did (for progress bars and metrics)."""

    items: int
    done: int
    failed: int
    skipped: int
    retried: int
    lost: int
    tokens: int
    requests: int
    seconds: float


class Worker:
    """Claims, embeds, writes and acknowledges batches until stopped or drained."""

    def __init__(
        self,
        db: Database,
        provider: EmbeddingProvider,
        config: WorkerConfig,
        *,
        observers: Sequence[BatchObserver] = (),
        on_claim: Callable[[int, int], None] | None = None,
    ) -> None:
        self._db = db
        self._provider = provider
        self._config = config
        self._observers = list(observers)
        self._on_claim = on_claim
        self._stop_requested = False
        # Set when a batch hit a configuration error: the loop claims nothing more.
        self._claims_closed = False
        self._abort_requested = False
        self._stop_event: anyio.Event | None = None
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._inflight: dict[ClaimToken, list[QueueId]] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        self._targets_loaded_at = -math.inf
        # At most ``concurrency`` batches write at once (and as many more embed meanwhile).
        self._write_slots = anyio.Semaphore(config.concurrency)
        self._run_scope: anyio.CancelScope | None = None
        self.summary = RunSummary()
        self.last_progress_at = time.monotonic()

    # --- control ---------------------------------------------------------------------

    def stop(self) -> None:
        """Request a graceful stop: no new claims; in-flight work finishes within the grace."""
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()

    def abort(self) -> None:
        """Stop at once: cancel in-flight batches without releasing their claims."""
        self._abort_requested = True
        self.stop()
        if self._run_scope is not None:
            self._run_scope.cancel()

    @property
    def aborted(self) -> bool:
        """True if the run was aborted (second signal)."""
        return self._abort_requested

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop_requested

    def wake(self) -> None:
        """Wake an idle loop (called on NOTIFY)."""
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------

    async def run(self, mode: RunMode = "continuous") -> RunSummary:
        """Process batches until stopped (continuous), until nothing is claimable (drain) or
        after one batch (once). Raises ConfigurationError when the provider rejects our
        configuration (the claims of the batch are released first)."""
        self._stop_event = anyio.Event()
        if self._stop_requested:
            self._stop_event.set()
        self._claims_closed = False
        self.summary = RunSummary()
        with unwrapped_errors(), anyio.CancelScope() as run_scope:
            self._run_scope = run_scope
            async with anyio.create_task_group() as side:
                side.start_soon(self._renew_loop)
                if mode == "continuous":
                    side.start_soon(self._listen_loop)
                async with anyio.create_task_group() as batches:
                    await self._claim_loop(batches, mode)
                    if self._stop_requested and self._inflight:
                        log.info(
                            "worker_stopping",
                            in_flight=sum(map(len, self._inflight.values())),
                            grace_s=self._config.shutdown_grace_seconds,
                        )
                        with anyio.move_on_after(self._config.shutdown_grace_seconds):
                            while self._inflight:
                                await self._wait_changed()
                        batches.cancel_scope.cancel()
                side.cancel_scope.cancel()
        self.summary.finished_at = time.monotonic()
        return self.summary

    async def _claim_loop(self, batches: anyio.abc.TaskGroup, mode: RunMode) -> None:
        cfg = self._config
        slots = anyio.Semaphore(cfg.concurrency)
        db_failures = 0
        while not (self._stop_requested or self._claims_closed):
            if not await self._until_stopped(slots.acquire):
                break
            if self._stop_requested or self._claims_closed:
                slots.release()
                break
            try:
                # Shielded: a claim commits in the database before its rows reach us, so a
                # cancellation arriving meanwhile (a batch's ConfigurationError cancels this
                # loop) would leave them processing under a claim nobody holds until the lease
                # lapses. A claim that completes after a stop was requested is given back at
                # once (its rows may be the very ones a failing batch just released).
                with anyio.CancelScope(shield=True):
                    result = await queue.claim_batch(
                        self._db,
                        owner=cfg.owner,
                        limit=cfg.batch_size,
                        lease_seconds=cfg.lease_seconds,
                        max_attempts=cfg.max_attempts,
                        max_content_chars=cfg.max_content_chars,
                        max_claim_bytes=cfg.max_claim_bytes,
                    )
                    if (self._stop_requested or self._claims_closed) and result.claim.items:
                        await self._release(result.claim)
                        slots.release()
                        break
            except DatabaseUnavailable as exc:
                slots.release()
                db_failures += 1
                wait_s = min(30.0, 0.5 * 2 ** min(db_failures, 6))
                log.warning("claim_failed", error=str(exc), retry_in_s=wait_s)
                await self._sleep(wait_s)
                continue
            db_failures = 0
            self.last_progress_at = time.monotonic()
            self.summary.reclaimed += result.reclaimed
            if self._on_claim is not None and (result.reclaimed or result.exhausted):
                self._on_claim(result.reclaimed, len(result.exhausted))
            if result.exhausted:
                self.summary.failed += len(result.exhausted)
                for item in result.exhausted:
                    log.error(
                        "item_failed",
                        queue_id=item.id,
                        table=item.table_name,
                        record_id=item.record_id,
                        error="lease expired too many times",
                    )
            claim = result.claim
            if not claim.items:
                slots.release()
                if mode == "once" and not result.exhausted:
                    break
                if mode == "drain" or mode == "once":
                    if result.exhausted:
                        continue
                    if self._inflight:
                        await self._wait_changed()
                        continue
                    if result.inbox_pending:
                        # Another worker is turning a bulk insert into queue rows.
                        await self._sleep(INBOX_WAIT_SECONDS)
                        continue
                    break
                await self._idle()
                continue
            self._inflight[claim.token] = [i.id for i in claim.items]
            batches.start_soon(self._run_batch, claim, slots)
            if mode == "once":
                break

    async def _run_batch(self, claim: Claim, slots: anyio.Semaphore) -> None:
        structlog.contextvars.bind_contextvars(claim=str(claim.token)[:8])
        slot = _Slot(slots)
        # Without a delay, a batch gives its slot back once embedded: the next batch is
        # claimed and embedded while this one is written (provider and Postgres overlap).
        # With a delay the slot is held through the write and the pause, as the seeds' script
        # paced its batches.
        overlap = not self._config.delay_ms
        try:
            await self._process(claim, on_embedded=slot.release if overlap else _nothing)
        except DatabaseUnavailable as exc:
            # The database stayed away longer than our lease: the claims are lost anyway
            # (another worker reclaims them once the lease lapses). Keep the worker alive.
            log.error("batch_abandoned", items=len(claim.items), error=str(exc))
        except anyio.get_cancelled_exc_class():
            if not self._abort_requested:
                await self._release(claim)
            slot.release()
            raise
        except ConfigurationError:
            # No new claim from here on: a claim in progress gives its rows back (see
            # _claim_loop), then this batch's rows are given back.
            self._claims_closed = True
            if self._stop_event is not None:
                self._stop_event.set()
            await self._release(claim)
            slot.release()
            raise
        except BaseException:
            slot.release()
            raise
        finally:
            self._inflight.pop(claim.token, None)
            self._changed.set()
            structlog.contextvars.unbind_contextvars("claim")
        # The pause between batches (run-embedding-processor.sh's DELAY): this slot claims
        # again only after delay_ms, counted from the end of the batch.
        try:
            if self._config.delay_ms:
                await self._sleep(self._config.delay_ms / 1000)
        finally:
            slot.release()

    async def _release(self, claim: Claim) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                ids = self._inflight.get(claim.token, [i.id for i in claim.items])
                released = await queue.release(self._db, claim.token, ids)
            except DatabaseUnavailable as exc:
                log.warning("release_failed", error=str(exc), note="leases will expire")
                return
            self.summary.released += released
            log.info("claims_released", items=released)

    # --- one batch ---------------------------------------------------------------------

    async def _process(self, claim: Claim, *, on_embedded: Callable[[], None]) -> None:
        """One batch: validate, embed, then write and acknowledge. ``on_embedded`` is called
        once the provider is done, before the database work."""
        started = time.monotonic()
        targets = await self._resolve_targets(claim.items)
        failures: list[tuple[QueueItem, str]] = []
        work: list[tuple[QueueItem, Target, str]] = []
        for item in claim.items:
            target = targets.get((item.table_name, item.embedding_column))
            if target is None:
                failures.append((item, _unregistered(item)))
                continue
            if item.content is None or not item.content.strip(_BLANK):
                failures.append((item, "content is empty (NULL or whitespace only); not embedded"))
                continue
            try:
                key = parse_record_id(target, item.record_id)
            except PermanentError as exc:
                failures.append((item, str(exc)))
                continue
            work.append((item, target, key))

        texts = [item.content or "" for item, _, _ in work]
        tokens = requests = 0
        writes: list[queue.Write] = []
        try:
            vectors, errors, tokens, requests = await self._embed(texts)
            for index, (item, target, key) in enumerate(work):
                vector = vectors[index]
                if vector is None:
                    failures.append((item, errors.get(index, "provider returned no vector")))
                elif target.dimensions is not None and vector.shape[0] != target.dimensions:
                    failures.append((item, _dims_mismatch(target, int(vector.shape[0]))))
                else:
                    writes.append(queue.Write(item, target, key, vector))
        except TransientError as exc:
            async with self._write_slots:
                on_embedded()
                await self._retry_later(
                    claim, [item for item, _, _ in work], failures, exc, started
                )
            return

        usage = queue.Usage(self._config.owner, len(work), tokens, requests)
        # Take a write slot before giving the claim slot back: at most `concurrency` batches
        # write while as many embed, so finished vectors never pile up in memory.
        async with self._write_slots:
            on_embedded()
            outcome = await self._complete(claim, writes, failures, usage)
        self.summary.processed += len(outcome.done) - len(outcome.missing)
        self.summary.skipped += len(outcome.missing)
        self.summary.failed += len(outcome.failed)
        self.summary.lost += len(outcome.lost)
        self.summary.tokens += tokens
        self.summary.requests += requests
        self.summary.batches += 1
        self.last_progress_at = time.monotonic()
        for item, message in failures:
            if item.id in outcome.failed:
                log.warning(
                    "item_failed",
                    queue_id=item.id,
                    table=item.table_name,
                    column=item.embedding_column,
                    record_id=item.record_id,
                    error=message,
                )
        if outcome.lost:
            log.info("claims_superseded", items=len(outcome.lost), note="nothing written")
        log.info(
            "batch_done",
            items=len(claim.items),
            done=len(outcome.done) - len(outcome.missing),
            skipped=len(outcome.missing),
            failed=len(outcome.failed),
            lost=len(outcome.lost),
            tokens=tokens,
            requests=requests,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        self._report(
            claim,
            len(outcome.done) - len(outcome.missing),
            len(outcome.failed),
            len(outcome.missing),
            0,
            len(outcome.lost),
            tokens,
            requests,
            started,
        )

    async def _embed(
        self, texts: list[str]
    ) -> tuple[list[Vector | None], dict[int, str], int, int]:
        """Vectors for ``texts`` (aligned), per-index errors, tokens and requests spent.

        With the cache on, texts embedded before are served from embedding_cache and only the
        rest are sent; fresh vectors are stored for next time."""
        if not texts:
            return [], {}, 0, 0
        if not self._config.cache:
            result = await self._provider.embed(texts)
            return list(result.vectors), dict(result.errors), result.tokens, result.requests
        model_key = f"{self._provider.name}/{self._provider.model}"
        dims = self._config.requested_dimensions
        hashes = [queue.content_hash(t) for t in texts]
        hits = await self._persist(lambda: queue.cache_lookup(self._db, model_key, dims, hashes))
        vectors: list[Vector | None] = [hits.get(h) for h in hashes]
        missing = [i for i, v in enumerate(vectors) if v is None]
        self.summary.cache_hits += len(texts) - len(missing)
        if not missing:
            return vectors, {}, 0, 0
        result = await self._provider.embed([texts[i] for i in missing])
        errors: dict[int, str] = {}
        fresh: list[tuple[bytes, Vector]] = []
        for position, index in enumerate(missing):
            vector = result.vectors[position]
            vectors[index] = vector
            if vector is None:
                errors[index] = result.errors.get(position, "provider returned no vector")
            else:
                fresh.append((hashes[index], vector))
        await self._persist(lambda: queue.cache_store(self._db, model_key, dims, fresh))
        return vectors, errors, result.tokens, result.requests

    async def _retry_later(
        self,
        claim: Claim,
        items: list[QueueItem],
        failures: list[tuple[QueueItem, str]],
        error: TransientError,
        started: float,
    ) -> None:
        """The provider is unavailable: items go back to pending with backoff (or fail once
        their attempts are used up); items already known to be bad fail now."""
        cfg = self._config
        retried, failed = await self._persist(
            lambda: queue.schedule_retry(
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
        failed_now = await self._persist(lambda: queue.fail(self._db, claim.token, failures))
        self.summary.retried += len(retried)
        self.summary.failed += len(failed) + len(failed_now)
        log.warning(
            "batch_retry",
            items=len(items),
            retried=len(retried),
            failed=len(failed),
            error=str(error),
        )
        self._report(claim, 0, len(failed) + len(failed_now), 0, len(retried), 0, 0, 0, started)

    async def _complete(
        self,
        claim: Claim,
        writes: list[queue.Write],
        failures: list[tuple[QueueItem, str]],
        usage: queue.Usage,
    ) -> queue.CompleteResult:
        model = self._provider.model
        try:
            return await self._persist(
                lambda: queue.complete(
                    self._db, claim.token, writes, failures, model=model, usage=usage
                )
            )
        except StatementFailed as exc:
            log.warning("batch_write_failed", error=str(exc), note="retrying per target")
        # One target's write was rejected (dropped column, dimension check, permissions...):
        # write each target on its own so the others still land; fail the rejected one.
        done: list[QueueId] = []
        missing: list[QueueId] = []
        failed: list[QueueId] = []
        lost: list[QueueId] = []
        groups: dict[tuple[str, str], list[queue.Write]] = {}
        for w in writes:
            groups.setdefault(w.target.key, []).append(w)
        pending_failures = list(failures)
        for group in groups.values():
            try:
                part = await self._persist(
                    lambda group=group: queue.complete(  # type: ignore[misc]
                        self._db, claim.token, group, [], model=model
                    )
                )
            except StatementFailed as exc:
                target = group[0].target
                message = f"writing {target.table_name}.{target.embedding_column} failed: {exc}"
                pending_failures.extend((w.item, message) for w in group)
                continue
            done += part.done
            missing += part.missing
            lost += part.lost
        failed += await self._persist(lambda: queue.fail(self._db, claim.token, pending_failures))
        return queue.CompleteResult(tuple(done), tuple(missing), tuple(failed), tuple(lost))

    async def _persist(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a database operation, retrying through outages with backoff while our lease
        still stands (the renewal loop keeps it); after that the claim is lost anyway."""
        deadline = time.monotonic() + self._config.lease_seconds
        attempt = 0
        while True:
            try:
                return await op()
            except DatabaseUnavailable as exc:
                attempt += 1
                if time.monotonic() > deadline:
                    raise
                wait_s = min(15.0, 0.2 * 2**attempt)
                log.warning("database_retry", error=str(exc), attempt=attempt, retry_in_s=wait_s)
                await anyio.sleep(wait_s)

    def _report(
        self,
        claim: Claim,
        done: int,
        failed: int,
        skipped: int,
        retried: int,
        lost: int,
        tokens: int,
        requests: int,
        started: float,
    ) -> None:
        report = BatchReport(
            items=len(claim.items),
            done=done,
            failed=failed,
            skipped=skipped,
            retried=retried,
            lost=lost,
            tokens=tokens,
            requests=requests,
            seconds=time.monotonic() - started,
        )
        for observer in self._observers:
            observer(report)

    async def _resolve_targets(self, items: Sequence[QueueItem]) -> dict[tuple[str, str], Target]:
        keys = {(i.table_name, i.embedding_column) for i in items}
        stale = time.monotonic() - self._targets_loaded_at > self._config.target_cache_seconds
        if stale or not keys <= self._targets.keys():
            loaded = await self._persist(lambda: queue.list_targets(self._db))
            self._targets = {t.key: t for t in loaded}
            self._targets_loaded_at = time.monotonic()
        return self._targets

    # --- side tasks --------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        interval = max(0.05, self._config.lease_seconds / 3)
        while True:
            await anyio.sleep(interval)
            for token, ids in list(self._inflight.items()):
                try:
                    await queue.renew_leases(self._db, token, ids, self._config.lease_seconds)
                except DatabaseUnavailable as exc:
                    log.warning("lease_renewal_failed", error=str(exc))

    async def _listen_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self._db.listen(NOTIFY_CHANNEL, self.wake)
            except DatabaseUnavailable as exc:
                failures += 1
                wait_s = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("listen_failed", error=str(exc), retry_in_s=wait_s)
                await anyio.sleep(wait_s)
            else:
                failures = 0

    # --- waiting helpers ---------------------------------------------------------------

    async def _until_stopped(self, wait: Callable[[], Awaitable[object]]) -> bool:
        """Await ``wait()`` unless a stop comes first; True if it completed."""
        assert self._stop_event is not None
        stop_event = self._stop_event
        completed = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await stop_event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await wait()
            completed = True
            tg.cancel_scope.cancel()
        return completed

    async def _sleep(self, seconds: float) -> None:
        await self._until_stopped(lambda: anyio.sleep(seconds))

    async def _idle(self) -> None:
        """Wait for a NOTIFY, the poll interval, or a stop; then, if the last (empty) scan
        was less than ``min_rescan_seconds`` ago, for the rest of that time: a flood of
        NOTIFYs costs at most one scan per ``min_rescan_seconds``."""
        scanned_at = time.monotonic()
        with anyio.move_on_after(self._config.poll_interval_seconds):
            await self._until_stopped(self._wake.wait)
        rest_s = self._config.min_rescan_seconds - (time.monotonic() - scanned_at)
        if rest_s > 0:
            await self._sleep(rest_s)
        self._wake = anyio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()
        self._changed = anyio.Event()


@contextmanager
def unwrapped_errors() -> Iterator[None]:
    """Re-raise the one error an anyio task group wrapped in a BaseExceptionGroup (see
    ``caller_error``), so callers act on our error types; several unrelated errors stay
    grouped."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = caller_error(group)
        if error is None:
            raise
        raise error from error.__cause__


def caller_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error to raise from ``run()`` instead of a task group's exception group: a
    ConfigurationError if any batch raised one, else the only error; None if there are
    several unrelated errors (the group is re-raised as it is)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    for leaf in leaves:
        if isinstance(leaf, ConfigurationError):
            return leaf
    return leaves[0] if len(leaves) == 1 else None


class _Slot:
    """One concurrency slot, released at most once."""

    def __init__(self, semaphore: anyio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


def _nothing() -> None:
    return None


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
