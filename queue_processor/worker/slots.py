"""The claim loop's slots: ``concurrency`` batches in flight, each slot given back once."""

from __future__ import annotations

from types import TracebackType

import anyio


class Slot:
    """One of the claim loop's ``concurrency`` slots, given back exactly once: by
    ``release()`` or on leaving its ``with`` block, whichever comes first. ``hand_over()``
    passes the slot on (to a batch); the old handle then gives nothing back."""

    def __init__(self, semaphore: anyio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()

    def hand_over(self) -> Slot:
        self._held = False
        return Slot(self._semaphore)
