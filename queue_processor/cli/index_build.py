"""A target's HNSW index at registration and on request: create it now, or record it as
wanted and build it once the target's backlog drained (``register``, ``register --chunks``,
``build-index``)."""

from __future__ import annotations

import argparse

import anyio

from queue_processor import queue
from queue_processor.cli.args import out
from queue_processor.db import Database
from queue_processor.errors import PermanentError
from queue_processor.models import IndexSpec, Target
from queue_processor.settings import Settings
from queue_processor.worker.config import default_owner


async def index_target(
    db: Database,
    target: Target,
    spec: IndexSpec,
    queued: int,
    args: argparse.Namespace,
    settings: Settings,
) -> None:
    """Create the target's index now (a backlog below QUEUE_PROCESSOR_INDEX_DEFER_ROWS, or
    the index exists already), or record it as wanted: a worker builds it once the backlog
    drained (or, --wait, this command does)."""
    params = f"hnsw, cosine, m={spec.m}, ef_construction={spec.ef_construction}"
    # An index already there (a re-registration) is kept and is ready: deferring it would
    # only have a worker role that may not build it record a failure.
    if queued < settings.index_defer_rows or await queue.hnsw_index_valid(db, target, spec):
        index = await queue.create_hnsw_index(db, target, spec)
        await queue.want_index(db, target, spec, "ready")
        out(f"index {index} ({params})")
        return
    await queue.want_index(db, target, spec, "pending")
    out(
        f"index {spec.index_name} ({params}) is pending: it is built once the {queued} "
        "queued row(s) are embedded (by a worker, or by this command with --wait)"
    )
    if args.wait:
        await wait_and_build(db, target, settings, poll_seconds=args.poll)


async def wait_and_build(
    db: Database, target: Target, settings: Settings, *, poll_seconds: float
) -> None:
    """Wait until the target's backlog is drained, then build its wanted index here (or
    wait for the worker that builds it); PermanentError if the build failed."""
    owner = f"build-index:{default_owner()}"
    announced = False
    # Behind a transaction pooler the build (CREATE INDEX CONCURRENTLY) goes to the direct
    # address, or this says which setting is missing before it waits for anything.
    async with db.direct() as direct:
        while not await _build_or_report(direct, db, target, settings, owner, announced):
            announced = True
            await anyio.sleep(poll_seconds)


async def _build_or_report(
    direct: Database,
    db: Database,
    target: Target,
    settings: Settings,
    owner: str,
    announced: bool,
) -> bool:
    """One round of ``wait_and_build``: True once the index is ready (built here or by a
    worker), False while its backlog is still being embedded."""
    result = await queue.build_next_index(
        direct,
        owner=owner,
        lease_seconds=settings.lease_seconds,
        memory_cap_mb=settings.index_build_memory_mb,
        table_name=target.table_name,
        column=target.embedding_column,
    )
    if result is not None and result.state != "pending":
        if result.state == "failed":
            raise PermanentError(f"index {result.build.index_name}: {result.error}")
        out(
            f"index {result.build.index_name} is ready (built in {result.seconds:.1f} s "
            f"with maintenance_work_mem {result.memory_mb} MB)"
        )
        return True
    [build] = await queue.index_builds(db, target.table_name, target.embedding_column)
    if build["state"] == "ready":
        out(f"index {build['index_name']} is ready")
        return True
    if build["state"] == "failed":
        raise PermanentError(f"index {build['index_name']}: {build['error_message']}")
    if not announced:
        out(
            f"waiting for the backlog of {target.table_name}.{target.embedding_column} to "
            "be embedded (a worker must be running), then building its index..."
        )
    return False
