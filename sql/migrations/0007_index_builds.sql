-- 0007_index_builds: the vector index each target wants, and where its build stands.
--
-- An HNSW index present while a backlog drains makes every vector write an index insert
-- (measured: 13.6x slower than the same drain without the index). So `register --index hnsw
-- --backfill` with a large backlog records the wanted index here as 'pending' instead of
-- creating it; a worker (or `build-index`, `register --wait`) builds it with CREATE INDEX
-- CONCURRENTLY once the target has nothing pending, processing or in the inbox.
--
--   pending   wanted, not built yet (built once the backlog is drained)
--   building  a builder holds the build: builder (its worker name), builder_pid (the backend
--             running CREATE INDEX CONCURRENTLY) and a lease it renews. A build whose lease
--             lapsed and whose backend is gone (kill -9, crash) is taken over: the INVALID
--             index it left behind is dropped and built again.
--   ready     built (and valid when it was recorded)
--   failed    the build raised an error (error_message), e.g. a worker role that does not own
--             the table; `build-index`, run by the owner, builds it again.
-- A small backlog still gets its index at once, recorded here as 'ready'.

CREATE TABLE embedding_index_builds (
    table_name       text        NOT NULL,
    embedding_column text        NOT NULL,
    -- In the target table's schema.
    index_name       text        NOT NULL,
    method           text        NOT NULL DEFAULT 'hnsw' CHECK (method = 'hnsw'),
    -- By the column's type: vector_cosine_ops or halfvec_cosine_ops.
    opclass          text        NOT NULL
        CHECK (opclass IN ('vector_cosine_ops', 'halfvec_cosine_ops')),
    -- pgvector's bounds (m 2..100, ef_construction 4..1000 and at least 2 * m).
    m                integer     NOT NULL DEFAULT 16 CHECK (m BETWEEN 2 AND 100),
    ef_construction  integer     NOT NULL DEFAULT 64
        CHECK (ef_construction BETWEEN 4 AND 1000 AND ef_construction >= 2 * m),
    state            text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'building', 'ready', 'failed')),
    error_message    text,
    builder          text,
    builder_pid      integer,
    lease_expires_at timestamptz,
    attempts         integer     NOT NULL DEFAULT 0,
    -- maintenance_work_mem of the last build, in MB.
    memory_mb        integer,
    requested_at     timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    PRIMARY KEY (table_name, embedding_column),
    -- Unregistering a target forgets its wanted index (the index itself stays).
    FOREIGN KEY (table_name, embedding_column)
        REFERENCES embedding_targets (table_name, embedding_column)
        ON DELETE CASCADE ON UPDATE CASCADE
);

-- Like every table of ours (0006): no policy = no row for roles that merely inherited
-- default privileges; grant-worker adds the worker's policy.
ALTER TABLE embedding_index_builds ENABLE ROW LEVEL SECURITY;
