"""The processing loop: claim batches, run them in slots, keep their leases, stop on request.

One ``Worker`` runs in one process; many may share a queue (Postgres is the coordinator).
The claim loop claims a batch (committed at once) whenever one of ``concurrency`` slots is
free and hands it to ``BatchProcessor`` (batch.py), which validates, embeds, writes and
acknowledges it and returns a ``BatchReport``; the run's ``RunSummary`` adds them up. Each
slot pauses ``delay_ms`` after its batch finishes (the semantics of the seeds'
``run-embedding-processor.sh BATCH DELAY``). Without a delay, a batch gives its slot back
once embedded, so the next batch embeds while this one is written; at most ``concurrency``
batches write at once (the write slots).

Side tasks (side.py) run in the worker's task group so their death stops the worker loudly:
lease renewal (a slow batch is not stolen), LISTEN (a new row wakes the loop at once; polling
is the fallback, and the only way behind a transaction pooler without a direct address) and
index builds (worker/indexes.py: a wanted index whose backlog drained; a drain run builds
them once the queue is empty). Stopping is a request: ``stop()`` ends claiming, in-flight
batches get ``shutdown_grace_seconds`` to finish, then are cancelled and their claims
released. ``abort()`` cancels at once and leaves the claims to expire (leases make that
safe). A batch whose provider rejects our configuration closes claiming, gives its claims
back and stops the run with its ConfigurationError.

No SQL lives here: the repository (``queue``) owns every statement.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial

import anyio
import anyio.abc
import structlog

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.errors import ConfigurationError, DatabaseUnavailable
from queue_processor.models import Claim, ClaimToken, QueueId
from queue_processor.providers.base import EmbeddingProvider
from queue_processor.worker import side
from queue_processor.worker.batch import BatchProcessor
from queue_processor.worker.binding import Serving
from queue_processor.worker.config import RunMode, WorkerConfig
from queue_processor.worker.indexes import IndexBuilder
from queue_processor.worker.report import BatchObserver, BatchReport, RunSummary
from queue_processor.worker.slots import Slot
from queue_processor.worker.task_errors import unwrapped_errors

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = side.NOTIFY_CHANNEL
# How long a draining worker waits before claiming again while another worker expands a bulk
# insert (an expansion of a few batches' keys takes tens of milliseconds).
INBOX_WAIT_SECONDS = 0.05


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
        providers: Mapping[str, EmbeddingProvider] | None = None,
    ) -> None:
        self._db = db
        self._config = config
        # The models this worker embeds with: it claims only items of targets bound to one
        # of them (or to none, which ``provider`` embeds). ``providers`` are further models,
        # by name, each with its own provider (several models in one worker).
        extra = {m: p for m, p in (providers or {}).items() if m != provider.model}
        self.models: tuple[str, ...] = (provider.model, *extra)
        # What the last run found at its start (None: the registry could not be read).
        self.serving: Serving | None = None
        self._batches = BatchProcessor(db, provider, config, providers=extra)
        self._indexes = IndexBuilder(db, config)
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

    @property
    def _claims_stopped(self) -> bool:
        """No new claims: a stop was requested or a batch hit a configuration error."""
        return self._stop_requested or self._claims_closed

    def _close_claims(self) -> None:
        """A batch hit a configuration error: claim nothing more (a claim in progress gives
        its rows back, see ``_claim``) and wake the claim loop if it waits for a slot."""
        self._claims_closed = True
        if self._stop_event is not None:
            self._stop_event.set()

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
        self.serving = await side.announce(self._db, self._config, self.models)
        try:
            await self._run(mode)
        finally:
            await side.forget(self._db, self._config.owner)
        self.summary.finished_at = time.monotonic()
        return self.summary

    async def _run(self, mode: RunMode) -> None:
        with unwrapped_errors(), anyio.CancelScope() as run_scope:
            self._run_scope = run_scope
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(
                    side.renew_forever, self._db, self._config, self.models, self._inflight
                )
                if mode == "continuous":
                    if self._db.listens:
                        tasks.start_soon(side.listen_forever, self._db, self.wake)
                    else:
                        side.say_polling(self._config)
                    if self._indexes.enabled:
                        tasks.start_soon(self._indexes.run_periodically)
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
                if mode == "drain" and self._indexes.enabled and not self._claims_stopped:
                    # Drained: build the wanted indexes whose backlog this was (a stop
                    # cancels the build, which is given back).
                    await self._until_stopped(self._indexes.check)
                tasks.cancel_scope.cancel()

    async def _claim_loop(self, batches: anyio.abc.TaskGroup, mode: RunMode) -> None:
        # Only this loop takes slots; a batch gives its slot back (see _run_batch).
        slots = anyio.Semaphore(self._config.concurrency)
        failures = 0
        while not self._claims_stopped:
            if not await self._until_stopped(slots.acquire):
                break
            with Slot(slots) as slot:  # given back at the end of this turn unless handed over
                if self._claims_stopped:
                    break
                try:
                    result = await self._claim()
                except DatabaseUnavailable as exc:
                    failures += 1
                    wait_s = side.reconnect_wait(failures)
                    log.warning("claim_failed", error=str(exc), retry_in_s=wait_s)
                    await self._sleep(wait_s)
                    continue
                if result is None:
                    break
                failures = 0
                self._note_claim(result)
                claim = result.claim
                if claim.items:
                    self._inflight[claim.token] = [i.id for i in claim.items]
                    batches.start_soon(self._run_batch, claim, slot.hand_over())
                    if mode == "once":
                        break
                elif not await self._more_to_come(result, mode):
                    break

    async def _claim(self) -> queue.ClaimResult | None:
        """Claim a batch; None if claiming was stopped meanwhile (the claim was given back).

        Shielded: a claim commits in the database before its rows reach us, so a cancellation
        arriving meanwhile (a batch's ConfigurationError cancels the claim loop) would leave
        them processing under a claim nobody holds until the lease lapses. A claim that
        completes after claiming stopped is given back at once (its rows may be the very ones
        a failing batch just released)."""
        cfg = self._config
        with anyio.CancelScope(shield=True):
            result = await queue.claim_batch(
                self._db,
                owner=cfg.owner,
                limit=cfg.batch_size,
                lease_seconds=cfg.lease_seconds,
                max_attempts=cfg.max_attempts,
                max_content_chars=cfg.max_content_chars,
                max_claim_bytes=cfg.max_claim_bytes,
                models=self.models,
            )
            if self._claims_stopped and result.claim.items:
                await self._release(result.claim)
                return None
        return result

    def _note_claim(self, result: queue.ClaimResult) -> None:
        """Count a claim in: leases taken over, and rows the claim itself failed because
        their leases had lapsed ``max_attempts`` times."""
        self.last_progress_at = time.monotonic()
        self.summary.reclaimed += result.reclaimed
        if self._on_claim is not None and (result.reclaimed or result.exhausted):
            self._on_claim(result.reclaimed, len(result.exhausted))
        self.summary.failed += len(result.exhausted)
        for item in result.exhausted:
            log.error(
                "item_failed",
                queue_id=item.id,
                table=item.table_name,
                record_id=item.record_id,
                reason="lease_expired",
                error="lease expired too many times",
            )

    async def _more_to_come(self, result: queue.ClaimResult, mode: RunMode) -> bool:
        """After a claim that found nothing: wait as the mode says, then whether to claim
        again."""
        if mode == "continuous":
            await self._idle()
            return True
        if result.exhausted:
            # The claim only failed rows: look again (drain), or for the one batch (once).
            return True
        if mode == "once":
            return False
        if self._inflight:
            await self._wait_changed()
            return True
        if result.inbox_pending:
            # Another worker is turning a bulk insert into queue rows.
            await self._sleep(INBOX_WAIT_SECONDS)
            return True
        return False

    # --- one batch in its slot ---------------------------------------------------------

    async def _run_batch(self, claim: Claim, slot: Slot) -> None:
        """Run one batch holding ``slot``; then, with a delay, pause ``delay_ms`` (counted
        from the end of the batch) before the slot is given back and may claim again."""
        with slot:
            with self._in_flight(claim):
                report = await self._process(claim, slot)
                if report is not None:
                    self._record(report)
            if self._config.delay_ms:
                await self._sleep(self._config.delay_ms / 1000)

    async def _process(self, claim: Claim, slot: Slot) -> BatchReport | None:
        """The batch's report; None if a database outage outlasted its lease.

        Cancelled (stop after the grace, or a failing batch), it gives its claims back unless
        the run was aborted. On a ConfigurationError claiming closes and the claims are
        given back before the error stops the run."""
        try:
            return await self._batches.process(claim, partial(self._write_turn, slot))
        except DatabaseUnavailable as exc:
            # The claims are lost anyway (another worker reclaims them once the lease
            # lapses). Keep the worker alive.
            log.error("batch_abandoned", items=len(claim.items), error=str(exc))
            return None
        except anyio.get_cancelled_exc_class():
            if not self._abort_requested:
                await self._release(claim)
            raise
        except ConfigurationError:
            self._close_claims()
            await self._release(claim)
            raise

    @asynccontextmanager
    async def _write_turn(self, slot: Slot) -> AsyncIterator[None]:
        """Around a batch's database work. The write slot is taken first: at most
        ``concurrency`` batches write while as many embed, so finished vectors never pile up
        in memory. Without a delay the batch then gives its claim slot back: the next batch
        is claimed and embedded while this one is written (provider and Postgres overlap).
        With a delay the slot is held through the write and the pause, as the seeds' script
        paced its batches."""
        async with self._write_slots:
            if not self._config.delay_ms:
                slot.release()
            yield

    @contextmanager
    def _in_flight(self, claim: Claim) -> Iterator[None]:
        """Bind the claim to log lines; once the batch is over (however it ended), forget it
        and wake whoever waits for in-flight work to change."""
        structlog.contextvars.bind_contextvars(claim=str(claim.token)[:8])
        try:
            yield
        finally:
            self._inflight.pop(claim.token, None)
            self._changed.set()
            structlog.contextvars.unbind_contextvars("claim")

    def _record(self, report: BatchReport) -> None:
        self.summary.add(report)
        self.last_progress_at = time.monotonic()
        for observer in self._observers:
            observer(report)

    async def _release(self, claim: Claim) -> None:
        """Give the claim's rows back (bounded, shielded: it runs while being cancelled)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                ids = self._inflight.get(claim.token, [i.id for i in claim.items])
                released = await queue.release(self._db, claim.token, ids)
            except DatabaseUnavailable as exc:
                log.warning("release_failed", error=str(exc), note="leases will expire")
                return
            self.summary.released += released
            log.info("claims_released", items=released)

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
