-- 0009_model_binding: a target's model is law (issue 13).
--
-- embedding_targets.model (0002) was informational; from here on a worker claims only items
-- of targets whose model it embeds with, or of targets bound to no model (model IS NULL).
-- Existing targets keep what they had: a target registered with a model is bound to it at
-- once; one registered without (the SQL API's default) stays unbound, served by any worker
-- as before, until `queue-processor bind` (or a re-registration with a model) binds it. No
-- model is guessed: which model wrote an unbound target's vectors is not recorded anywhere
-- reliable (usage rows are per worker, not per target).

-- The claim reads pending rows per target: (table_name, embedding_column) first, so it can
-- list the targets that have pending rows with one index descent each (a loose index scan)
-- and take each served target's due rows in next_attempt_at order, never reading the
-- backlog of a target whose model no running worker serves. Partial on pending, like
-- embedding_queue_pending_idx, so done rows cost nothing.
CREATE INDEX embedding_queue_pending_target_idx
    ON embedding_queue (table_name, embedding_column, next_attempt_at, id)
    WHERE status = 'pending';

-- Running workers and the models they serve, so `status` can say that a target's items wait
-- for a worker with its model. A worker inserts its row at start, refreshes expires_at with
-- its lease renewals and deletes it on exit; a killed worker's row lapses at expires_at.
CREATE TABLE embedding_workers (
    owner      text PRIMARY KEY,
    models     text[] NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
-- As every table of ours (0006): no policy, so only the owner and granted worker roles
-- (grant-worker adds their policy) see a row.
ALTER TABLE embedding_workers ENABLE ROW LEVEL SECURITY;

-- Re-embeddings in progress (`queue-processor reembed`): target (table_name, embedding_column)
-- is being re-embedded with new_model into its shadow column (<column>__next), which is a
-- registered target of its own while state = 'backfilling'. After the switch (state =
-- 'switched') the column holds the new vectors and <column>__old, still a registered target
-- of old_model, is the fallback `reembed --rollback` swaps back; `reembed --finish` drops it
-- and this row.
CREATE TABLE embedding_reembeds (
    table_name       text NOT NULL,
    embedding_column text NOT NULL,
    old_model        text,
    new_model        text NOT NULL,
    new_dimensions   integer,
    state            text NOT NULL DEFAULT 'backfilling'
        CHECK (state IN ('backfilling', 'switched')),
    started_at       timestamptz NOT NULL DEFAULT now(),
    switched_at      timestamptz,
    PRIMARY KEY (table_name, embedding_column)
);
ALTER TABLE embedding_reembeds ENABLE ROW LEVEL SECURITY;
