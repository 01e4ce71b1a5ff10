"""Which registered targets a worker serves: those bound to one of its models, and unbound
ones (model NULL, served by any worker as before binding existed). The claim statement
applies the same rule in SQL; this side only reports it (issue 13)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from queue_processor.models import Target

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Serving:
    """The targets a worker serves and those it leaves to workers of other models."""

    models: tuple[str, ...]
    served: tuple[Target, ...]
    left: tuple[Target, ...]

    @property
    def nothing_to_serve(self) -> bool:
        """Targets are registered but none is bound to one of our models (or unbound)."""
        return not self.served and bool(self.left)

    def message(self) -> str:
        """One line for people: what this worker leaves, and for which model."""
        waiting = ", ".join(f"{t.table_name}.{t.embedding_column} ({t.model})" for t in self.left)
        return (
            f"no registered target uses model {', '.join(self.models)}; "
            f"waiting for a worker with their model: {waiting}"
        )


def serving(targets: Sequence[Target], models: Sequence[str]) -> Serving:
    """Split ``targets`` into those served with ``models`` and those left to others."""
    served = tuple(t for t in targets if t.model is None or t.model in models)
    left = tuple(t for t in targets if t.model is not None and t.model not in models)
    return Serving(tuple(models), served, left)


def log_serving(s: Serving) -> None:
    """Say at start which targets this worker serves and which it leaves."""
    log.info(
        "worker_targets",
        models=list(s.models),
        serves=[_label(t) for t in s.served],
        leaves=[_label(t) for t in s.left],
    )
    if s.nothing_to_serve:
        log.warning("no_target_for_model", models=list(s.models), note=s.message())


def _label(t: Target) -> str:
    model = "any model" if t.model is None else t.model
    return f"{t.table_name}.{t.embedding_column} ({model})"
