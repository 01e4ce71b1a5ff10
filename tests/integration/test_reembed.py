"""Changing a target's model with no downtime (issue 13): start a re-embedding into a shadow
column, fill it with a worker of the new model while the old model's worker and the
application keep writing, switch, roll back, switch again, finish. Searches run the whole
time and must never fail nor return a NULL or wrong-dimension vector."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import psycopg
import pytest

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.queue import reembed
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.worker import Worker
from tests.support.helpers import (
    DIMS,
    aexecute,
    body,
    create_table,
    eventually,
    execute,
    insert_rows,
    make_provider,
    register,
    worker_config,
)

pytestmark = pytest.mark.anyio

OLD, NEW = "model-old", "model-new"
NEW_DIMS = 12


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def setup_docs(dsn: str, n: int) -> None:
    create_table(dsn)
    register(dsn)
    execute(dsn, "SELECT embedding_bind_target('docs', 'embedding', %s)", (OLD,))
    execute(
        dsn, "CREATE INDEX docs_embedding_hnsw ON docs USING hnsw (embedding vector_cosine_ops)"
    )
    insert_rows(dsn, ((i, body(i)) for i in range(1, n + 1)))


async def drain(db: Database, server: FakeOpenAIServer, model: str, **kw: Any) -> None:
    dims = NEW_DIMS if model == NEW else None
    async with make_provider(server, model=model, dimensions=dims) as provider:
        worker = Worker(db, provider, worker_config(owner=f"w-{model}", **kw))
        with anyio.fail_after(120):
            await worker.run("drain")


def assert_column_holds(dsn: str, column: str, model: str, dims: int) -> int:
    """Every row with content holds ``model``'s vector of its current content."""
    rows = execute(
        dsn,
        f"SELECT id, body, {column}::real[] AS v, model FROM docs ORDER BY id"
        if column == "embedding"
        else f"SELECT id, body, {column}::real[] AS v FROM docs ORDER BY id",
    )
    for r in rows:
        assert r["v"] is not None, r
        expected = fake_vector(r["body"], dims)
        assert np.allclose(np.array(r["v"], dtype=np.float32), expected, atol=1e-6), r["id"]
        if "model" in r:
            assert r["model"] == model, r
    return len(rows)


class Searcher:
    """Nearest-neighbour queries on docs.embedding in a loop, on its own connection; every
    result row must have a vector of one of the allowed dimensions."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.queries = 0
        self.longest_s = 0.0
        self.dims_seen: set[int] = set()
        self.stop = anyio.Event()

    async def run(self) -> None:
        query = (
            "SELECT id, vector_dims(embedding) AS d, embedding IS NULL AS null_vector"
            " FROM docs WHERE embedding IS NOT NULL"
            " ORDER BY embedding <=> (SELECT embedding FROM docs WHERE embedding IS NOT NULL"
            " LIMIT 1) LIMIT 5"
        )
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                started = anyio.current_time()
                cur = await conn.execute(query)
                rows = await cur.fetchall()
                self.longest_s = max(self.longest_s, anyio.current_time() - started)
                self.queries += 1
                for _, dims, null_vector in rows:
                    assert not null_vector
                    self.dims_seen.add(int(dims))
                await anyio.sleep(0.002)


async def churn(dsn: str, first_new_id: int, rounds: int) -> None:
    """The application meanwhile: inserts, content updates and deletes."""
    rng = random.Random(7)
    for k in range(rounds):
        new_id = first_new_id + k
        await aexecute(dsn, "INSERT INTO docs (id, body) VALUES (%s, %s)", (new_id, body(new_id)))
        victim = rng.randint(1, first_new_id - 1)
        await aexecute(dsn, "UPDATE docs SET body = body || ' edited' WHERE id = %s", (victim,))
        if k % 5 == 0:
            await aexecute(
                dsn, "DELETE FROM docs WHERE id = %s", (rng.randint(1, first_new_id - 1),)
            )
        await anyio.sleep(0.005)


async def test_reembed_switch_rollback_finish_under_writes_and_searches(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    setup_docs(dsn, 300)
    await drain(db, server, OLD)
    assert_column_holds(dsn, "embedding", OLD, DIMS)

    shadow, queued = await reembed.start(db, "docs", "embedding", NEW, NEW_DIMS)
    assert (shadow, queued) == ("embedding__next", 300)
    # Resuming is a no-op start and queues only what is left.
    assert await reembed.start(db, "docs", "embedding", NEW, NEW_DIMS) == (shadow, 300)
    with pytest.raises(Exception, match="not complete"):
        await reembed.switch(db, "docs", "embedding")
    targets = {(t.embedding_column, t.model, t.dimensions) for t in await queue.list_targets(db)}
    assert targets == {("embedding", OLD, DIMS), ("embedding__next", NEW, NEW_DIMS)}

    searcher = Searcher(dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(searcher.run)
        # Backfill while the application writes and the old model's worker keeps up.
        async with anyio.create_task_group() as work:
            work.start_soon(churn, dsn, 10_000, 60)
            work.start_soon(drain, db, server, NEW)
        await drain(db, server, OLD)
        await drain(db, server, NEW)
        p = await reembed.progress(db, "docs", "embedding")
        assert p.complete, p
        assert searcher.dims_seen == {DIMS}

        swap = await reembed.switch(db, "docs", "embedding")
        assert swap.rows == p.total
        # A search issued after the commit sees the new vectors only.
        after = searcher.queries + 1
        await eventually(lambda: searcher.queries > after, timeout_s=60)
        assert NEW_DIMS in searcher.dims_seen
        # After the switch: every row holds the new model's vector of its current content.
        total = assert_column_holds(dsn, "embedding", NEW, NEW_DIMS)
        assert_column_holds(dsn, "embedding__old", OLD, DIMS)
        # Writes after the switch keep both current.
        await churn(dsn, 20_000, 10)
        await drain(db, server, NEW)
        await drain(db, server, OLD)
        assert_column_holds(dsn, "embedding", NEW, NEW_DIMS)
        assert_column_holds(dsn, "embedding__old", OLD, DIMS)

        rolled = await reembed.rollback(db, "docs", "embedding")
        assert_column_holds(dsn, "embedding", OLD, DIMS)
        assert_column_holds(dsn, "embedding__next", NEW, NEW_DIMS)
        await reembed.switch(db, "docs", "embedding")
        searcher.stop.set()
    assert_column_holds(dsn, "embedding", NEW, NEW_DIMS)

    assert await reembed.finish(db, "docs", "embedding") == "embedding__old"
    columns = {
        r["attname"]
        for r in execute(
            dsn,
            "SELECT attname FROM pg_attribute WHERE attrelid = 'docs'::regclass"
            " AND attnum > 0 AND NOT attisdropped",
        )
    }
    assert columns == {"id", "body", "embedding", "model", "embedded_at"}
    targets = {(t.embedding_column, t.model, t.dimensions) for t in await queue.list_targets(db)}
    assert targets == {("embedding", NEW, NEW_DIMS)}
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_reembeds")[0]["n"] == 0
    # The switched column keeps its index (the shadow's was built before the switch by the
    # CLI; here none was, so the old column's went with it).
    print(
        f"reembed: {total} rows, {searcher.queries} searches, longest search "
        f"{searcher.longest_s * 1000:.1f} ms, swaps {swap.swap_ms:.1f} / {rolled.swap_ms:.1f} ms"
    )
