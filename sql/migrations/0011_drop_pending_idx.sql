-- 0011_drop_pending_idx: the claim reads pending rows per target through
-- embedding_queue_pending_target_idx (0009: table_name, embedding_column, next_attempt_at, id;
-- partial on pending). 0001's embedding_queue_pending_idx (next_attempt_at, id; partial on
-- pending) serves no statement since, and every queued row paid an entry in it.
DROP INDEX IF EXISTS embedding_queue_pending_idx;
