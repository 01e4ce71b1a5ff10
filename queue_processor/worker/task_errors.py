"""The one error a run raises instead of the exception group its task groups wrap it in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from queue_processor.errors import ConfigurationError


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
