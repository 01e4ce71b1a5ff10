-- Every runtime statement of queue_processor, addressed by name (see queries.py).
-- Parameters are named (%(name)s, or %(name)b for binary real[] vectors); {identifier} slots
-- are filled only with psycopg.sql.Identifier values taken from the target registry.

-- name: advisory_lock
-- Serialise migrations across processes: the key is hashed to the lock's bigint.
SELECT pg_advisory_lock(hashtextextended(%(key)s, 0));

-- name: advisory_unlock
-- Release the migration lock.
SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0));

-- name: applied_migrations
-- Versions already applied.
SELECT version FROM queue_processor_migrations ORDER BY version;

-- name: record_migration
-- Mark one migration applied (same transaction as its DDL).
INSERT INTO queue_processor_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: schema_installed
-- Whether the migrations table exists in the queue schema (search_path).
SELECT to_regclass('queue_processor_migrations') IS NOT NULL AS installed;

-- name: schema_version
-- The newest applied migration.
SELECT max(version) AS version FROM queue_processor_migrations;

-- name: register_target
-- Register a target and install its triggers (see sql/migrations/0002_targets.sql).
SELECT embedding_register_target(
    %(table)s::regclass, %(column)s,
    p_content_columns => %(content_columns)s::text[],
    p_template => %(template)s,
    p_id_column => %(id_column)s,
    p_model => %(model)s,
    p_dimensions => %(dimensions)s,
    p_model_column => %(model_column)s,
    p_generated_at_column => %(generated_at_column)s,
    p_backfill => %(backfill)s
) AS table_name;

-- name: unregister_target
-- Drop a target's triggers, registry row and queue rows.
SELECT embedding_unregister_target(%(table_name)s, %(column)s) AS removed;

-- name: backfill
-- Queue rows of a registered target: mode missing | all | ids.
SELECT embedding_queue_backfill(%(table_name)s, %(column)s, %(mode)s, %(ids)s::text[]) AS queued;

-- name: notify_queue
-- Wake waiting workers (the channel the queue's insert trigger uses).
SELECT pg_notify('embedding_queue', '');

-- name: list_targets
-- The whole target registry.
SELECT table_name, embedding_column, schema_name, relation_name, id_column, id_type,
       content_columns, content_template, column_type, dimensions, model, model_column,
       generated_at_column
  FROM embedding_targets
 ORDER BY table_name, embedding_column;
