-- Every runtime statement of queue_processor, addressed by name (see queries.py).
-- Parameters are named (%(name)s, or %(name)b for binary real[] vectors). {slots} are filled
-- by queue_processor.db only: with identifiers (psycopg.sql.Identifier; names taken from the target
-- registry or the catalog), or with fragments, which are blocks of this file too (those
-- described as "Fragment of ..."), a checked integer type modifier or a built-in type name.
-- {qs} is the queue schema.

-- name: advisory_xact_lock
-- Serialise changes to the queue schema (migrate, register) across processes, until the
-- transaction ends: a transaction-level lock, because behind a transaction pooler a session
-- lock's unlock may run on another server connection than its lock (db/database.py). The
-- key is hashed to the lock's bigint.
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(%(key)s, 0));

-- name: set_search_path
-- Set the session's search_path (db/session.py, direct connections: pg_catalog, pg_temp);
-- return the one it replaced.
SELECT current_setting('search_path') AS replaced,
       set_config('search_path', %(path)s::text, false) AS path;

-- name: set_session_timeouts
-- The worker's timeouts for the whole session (db/session.py, direct connections); NULL
-- keeps the server's value.
SELECT pg_catalog.set_config('statement_timeout',
           COALESCE(%(statement_timeout)s::pg_catalog.text,
                    pg_catalog.current_setting('statement_timeout')), false),
       pg_catalog.set_config('idle_in_transaction_session_timeout',
           COALESCE(%(idle_timeout)s::pg_catalog.text,
                    pg_catalog.current_setting('idle_in_transaction_session_timeout')), false);

-- name: pin_transaction
-- The first statement of every transaction behind a transaction-mode pooler (db/session.py):
-- the search_path and the worker's timeouts for this transaction only, since the server
-- connection is shared with other clients. Every name is qualified (and COALESCE is syntax,
-- not a function): until this statement the path in force may be another client's.
-- A NULL timeout keeps the value in force.
SELECT pg_catalog.set_config('search_path', %(path)s::pg_catalog.text, true),
       pg_catalog.set_config('statement_timeout',
           COALESCE(%(statement_timeout)s::pg_catalog.text,
                    pg_catalog.current_setting('statement_timeout')), true),
       pg_catalog.set_config('idle_in_transaction_session_timeout',
           COALESCE(%(idle_timeout)s::pg_catalog.text,
                    pg_catalog.current_setting('idle_in_transaction_session_timeout')), true);

-- name: default_search_path
-- The search_path the database and role give a new session: behind a pooler the current
-- value may be one another client SET on the shared server connection; reset_val is not.
SELECT reset_val AS path FROM pg_catalog.pg_settings WHERE name = 'search_path';

-- name: set_local_search_path
-- The search_path for the rest of this transaction only (migrations: see db/database.py).
SELECT pg_catalog.set_config('search_path', %(path)s::pg_catalog.text, true);

-- name: listen
-- Subscribe this (dedicated) connection to a notification channel.
LISTEN {channel};

-- name: database_exists
-- Whether a database of this name exists (embedded server setup).
SELECT 1 FROM pg_database WHERE datname = %(name)s;

-- name: create_database
-- Create a database (embedded server setup, when database_exists found none).
CREATE DATABASE {database};

-- name: create_extension
-- Install an extension in the current database (embedded server setup).
CREATE EXTENSION IF NOT EXISTS {extension};

-- name: schema_creators
-- The roles other than its owner that may create objects in the queue schema (migrate
-- refuses to install there): PUBLIC, or role names.
SELECT coalesce(string_agg(CASE a.grantee WHEN 0 THEN 'PUBLIC'
                                          ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                           ', ' ORDER BY a.grantee), '') AS roles
  FROM pg_namespace AS n, aclexplode(n.nspacl) AS a
 WHERE n.nspname = %(schema)s::text AND a.privilege_type = 'CREATE'
   AND a.grantee <> n.nspowner;

-- name: function_hashes
-- The function files as last applied (sql/functions; the table exists from 0006 on).
SELECT file, sha256 FROM {qs}.queue_processor_functions;

-- name: record_function_file
-- Remember the SHA-256 of an applied function file (same transaction as its DDL).
INSERT INTO {qs}.queue_processor_functions (file, sha256) VALUES (%(file)s::text, %(sha256)s::text)
ON CONFLICT (file) DO UPDATE SET sha256 = EXCLUDED.sha256, applied_at = now();

-- name: refresh_installed
-- After function files changed: regenerate every target's triggers, re-grant every worker.
SELECT targets, workers FROM {qs}.embedding_refresh_installed();

-- name: schema_exists
-- Whether the queue schema exists already.
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s) AS found;

-- name: create_schema
-- Create the queue schema (migrate, after schema_exists found none: CREATE SCHEMA IF NOT
-- EXISTS needs CREATE on the database even when the schema exists).
CREATE SCHEMA IF NOT EXISTS {qs};

-- name: applied_migrations
-- Versions already applied.
SELECT version FROM {qs}.queue_processor_migrations ORDER BY version;

-- name: record_migration
-- Mark one migration applied (same transaction as its DDL).
INSERT INTO {qs}.queue_processor_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: relation_installed
-- Whether a table of ours exists in the queue schema (queue_processor_migrations: the schema
-- is installed; queue_processor_functions: migration 0006 has run).
SELECT to_regclass(format('%%I.%%I', %(schema)s::text, %(relation)s::text)) IS NOT NULL
       AS installed;

-- name: schema_version
-- The newest applied migration.
SELECT max(version) AS version FROM {qs}.queue_processor_migrations;

-- name: register_target
-- Register a target and install its triggers (see sql/functions/25_register.sql).
SELECT {qs}.embedding_register_target(
    %(table_oid)s::oid::regclass, %(column)s::text,
    p_content_columns => %(content_columns)s::text[],
    p_template => %(template)s::text,
    p_id_column => %(id_column)s::text,
    p_model => %(model)s::text,
    p_dimensions => %(dimensions)s::integer,
    p_model_column => %(model_column)s::text,
    p_generated_at_column => %(generated_at_column)s::text
) AS table_name;

-- name: register_chunked_target
-- Register a chunked target, create its chunks table and install its triggers (see
-- sql/functions/28_chunks.sql). A new chunks table gets no index here: the caller creates
-- it after the backfill, or records it as wanted (built once the backlog drained).
SELECT {qs}.embedding_chunks_register(
    %(table_oid)s::oid::regclass, %(name)s::text,
    p_content_columns => %(content_columns)s::text[],
    p_template => %(template)s::text,
    p_id_column => %(id_column)s::text,
    p_model => %(model)s::text,
    p_dimensions => %(dimensions)s::integer,
    p_chunk_tokens => %(chunk_tokens)s::integer,
    p_chunk_overlap => %(chunk_overlap)s::integer,
    p_max_chunks => %(max_chunks)s::integer,
    p_backfill => 'none'::text,
    p_create_index => false
) AS table_name;

-- name: set_length_policy
-- A registered target's policy for texts over the model's input limit (truncate | fail).
SELECT {qs}.embedding_target_set_length_policy(%(table_name)s::text, %(column)s::text,
                                               %(policy)s::text) AS found;

-- name: unregister_target
-- Drop a target's triggers, registry row and queue rows.
SELECT {qs}.embedding_unregister_target(%(table_name)s::text, %(column)s::text) AS removed;

-- name: backfill
-- Queue rows of a registered target: mode missing | all | ids.
SELECT {qs}.embedding_queue_backfill(%(table_name)s::text, %(column)s::text, %(mode)s::text,
                                      %(ids)s::text[]) AS queued;

-- name: notify_queue
-- Wake waiting workers (the channel the queue's insert trigger uses).
SELECT pg_notify('embedding_queue', '');

-- name: list_targets
-- The whole target registry.
SELECT table_name, embedding_column, schema_name, relation_name, id_column, id_type,
       content_columns, content_template, column_type, dimensions, model, model_column,
       generated_at_column, length_policy, chunk_tokens, chunk_overlap, max_chunks,
       chunks_table
  FROM {qs}.embedding_targets
 ORDER BY table_name, embedding_column;

-- name: claim_batch
-- Claim up to %(limit)s claimable items for one worker and commit at once (no HTTP inside).
-- Two kinds of row are claimable: pending rows that are due (read in next_attempt_at order
-- through the partial index embedding_queue_pending_target_idx, so done rows cost nothing), and
-- processing rows whose lease expired because their worker died or stalled (through
-- embedding_queue_lease_idx). FOR UPDATE SKIP LOCKED lets many workers claim concurrently
-- without waiting on or double-claiming each other's rows. Each CTE locks at most %(limit)s
-- rows; extra rows locked by the second are released when this statement commits.
-- attempts counts claims, so a row whose worker keeps dying still runs out of attempts:
-- a reclaimed row that has used them all ends failed instead of being claimed again.
-- Sizes are bounded here, where the data enters the worker (anyone who can write a source
-- text decides its size): each content is cut to %(max_content_chars)s characters, and a
-- claim takes rows only while their (cut) sizes add up to %(max_claim_bytes)s bytes, the
-- first row always. octet_length reads a TOASTed value's stored length, not the value.
-- Only items of targets this worker serves are claimed: %(models)s lists the models it
-- embeds with (NULL: serve every target, for callers that bind nothing), and a target is
-- served when its registry model is one of them or it has none (unbound, or not registered
-- at all: the worker fails such items with "unregistered target"). The filter reads
-- embedding_queue_pending_target_idx (0009): `targets` lists the targets with pending rows by
-- a loose index scan (one descent per target, however many rows each has), `due` takes each
-- served target's oldest due rows through the same index. So the backlog of a target whose
-- model no running worker serves is never read, let alone locked, and stays pending.
WITH RECURSIVE targets AS (
    (SELECT table_name, embedding_column FROM {qs}.embedding_queue
      WHERE status = 'pending'
      ORDER BY table_name, embedding_column
      LIMIT 1)
    UNION ALL
    SELECT n.table_name, n.embedding_column
      FROM targets AS p
     CROSS JOIN LATERAL (
        SELECT q.table_name, q.embedding_column FROM {qs}.embedding_queue AS q
         WHERE q.status = 'pending'
           AND (q.table_name, q.embedding_column) > (p.table_name, p.embedding_column)
         ORDER BY q.table_name, q.embedding_column
         LIMIT 1) AS n
), served AS (
    SELECT g.table_name, g.embedding_column
      FROM targets AS g
      LEFT JOIN {qs}.embedding_targets AS t
        ON t.table_name = g.table_name AND t.embedding_column = g.embedding_column
     WHERE %(models)s::text[] IS NULL OR t.model IS NULL OR t.model = ANY(%(models)s::text[])
), due AS (
    -- Each served target's oldest due rows, then the oldest of those overall; rows locked
    -- here but not picked are released when this statement commits.
    SELECT d.id, false AS reclaimed, d.bytes
      FROM served AS s
     CROSS JOIN LATERAL (
        SELECT q.id, q.next_attempt_at, octet_length(q.content) AS bytes
          FROM {qs}.embedding_queue AS q
         WHERE q.status = 'pending' AND q.table_name = s.table_name
           AND q.embedding_column = s.embedding_column AND q.next_attempt_at <= now()
         ORDER BY q.next_attempt_at, q.id
         LIMIT %(limit)s
           FOR UPDATE SKIP LOCKED) AS d
     ORDER BY d.next_attempt_at, d.id
     LIMIT %(limit)s
), expired AS (
    SELECT q.id, true AS reclaimed, octet_length(q.content) AS bytes
      FROM {qs}.embedding_queue AS q
     WHERE q.status = 'processing' AND q.lease_expires_at < now()
       AND (%(models)s::text[] IS NULL OR NOT EXISTS (
            SELECT 1 FROM {qs}.embedding_targets AS t
             WHERE t.table_name = q.table_name AND t.embedding_column = q.embedding_column
               AND t.model <> ALL(%(models)s::text[])))
     ORDER BY q.lease_expires_at
     LIMIT %(limit)s
       FOR UPDATE OF q SKIP LOCKED
), candidates AS (
    SELECT c.id, c.reclaimed,
           sum(least(coalesce(c.bytes, 0), 4 * %(max_content_chars)s::bigint))
               OVER (ORDER BY c.reclaimed DESC, c.id ROWS UNBOUNDED PRECEDING) AS running_bytes,
           row_number() OVER (ORDER BY c.reclaimed DESC, c.id) AS n
      FROM (SELECT * FROM expired UNION ALL SELECT * FROM due) AS c
), picked AS (
    SELECT id, reclaimed FROM candidates
     WHERE n <= %(limit)s AND (n = 1 OR running_bytes <= %(max_claim_bytes)s::bigint)
)
UPDATE {qs}.embedding_queue AS q
   SET status = CASE WHEN p.reclaimed AND q.attempts >= %(max_attempts)s
                     THEN 'failed' ELSE 'processing' END,
       error_message = CASE WHEN p.reclaimed AND q.attempts >= %(max_attempts)s
                            THEN format('lease expired %%s times (worker crashed or stalled '
                                        'while processing this item)', q.attempts)
                            ELSE q.error_message END,
       attempts = q.attempts + CASE WHEN p.reclaimed AND q.attempts >= %(max_attempts)s
                                    THEN 0 ELSE 1 END,
       claimed_by = %(owner)s,
       claim_token = %(token)s,
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       updated_at = now()
  FROM picked AS p
 WHERE q.id = p.id
RETURNING q.id, q.table_name, q.record_id, q.embedding_column,
          left(q.content, %(max_content_chars)s::integer) AS content,
          octet_length(q.content) AS content_bytes,
          octet_length(q.content) > %(max_content_chars)s::integer
              AND char_length(q.content) > %(max_content_chars)s::integer AS content_capped,
          q.attempts, q.generation, q.status, p.reclaimed;

-- name: expand_inbox
-- Turn up to %(max_rows)s keys of a bulk insert's inbox row into queue rows (0005_inbox.sql);
-- run, and committed, just before a claim. Returns 0 when there is nothing to expand.
SELECT {qs}.embedding_queue_expand(%(max_rows)s::integer) AS taken;

-- name: inbox_pending
-- Whether bulk-insert keys remain to be expanded (asked when a claim found nothing: another
-- worker may be expanding them, so a draining worker should not stop yet).
-- Through the view: the worker's role is granted that, not the inbox table.
SELECT EXISTS (SELECT 1 FROM {qs}.embedding_queue_inbox_status) AS pending;

-- name: renew_leases
-- Extend the lease of items this claim still holds (a slow batch is not stolen).
UPDATE {qs}.embedding_queue
   SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
 WHERE id = ANY(%(ids)s::bigint[]) AND status = 'processing' AND claim_token = %(token)s;

-- name: mark_worker_write
-- Tell the targets' update triggers that this transaction only writes vectors (no content
-- changes), so they skip their work; and give it the search_path the database gives its
-- sessions (queue_processor.db: user_search_path), since the users' own triggers on their tables fire on
-- our writes and may rely on it. Both transaction-local. Every statement of the write names
-- its functions with pg_catalog, so nothing on that path can stand in for them.
SELECT pg_catalog.set_config('queue_processor.worker_write', 'on', true),
       pg_catalog.set_config('search_path', %(search_path)s::text, true);

-- name: lock_source_rows
-- Lock the source rows a batch will write, in key order, before touching the queue rows:
-- the same order as the enqueue triggers (source row, then queue row), so a concurrent
-- content change and our completion cannot deadlock. Matches through the key's own index
-- (the parameter is cast to the key type, the column is never cast).
SELECT 1 FROM {schema}.{table}
 WHERE {id_column} = ANY(%(ids)s::{id_type}[])
 ORDER BY {id_column}
   FOR NO KEY UPDATE;

-- name: lock_valid_claims
-- Lock the queue rows this claim still owns: still processing with our token. A row
-- requeued by an operator, re-pended by a content change or reclaimed after its lease
-- expired fails this test and gets nothing written.
SELECT id FROM {qs}.embedding_queue
 WHERE id = ANY(%(ids)s::bigint[]) AND status = 'processing' AND claim_token = %(token)s
 ORDER BY id
   FOR UPDATE;

-- name: write_vectors
-- Write a batch of vectors of one target (real[], double precision[] or jsonb) in one
-- statement. %(vectors)b is every vector of the batch concatenated into one binary real[];
-- row k takes its slice. real[] converts to the column type by assignment (pgvector's
-- vector/halfvec casts, real[] -> double precision[]); {value} is write_value_vec or
-- write_value_jsonb, {companions} the write_set_* fragments of the target's companion
-- columns. The EXISTS re-checks the claim (locked above).
UPDATE {schema}.{table} AS t
   SET {column} = {value}{companions}
  FROM (SELECT k.id, k.qid,
               (%(vectors)b::real[])[(k.ord - 1) * %(dims)s + 1 : k.ord * %(dims)s] AS vec
          FROM ROWS FROM (pg_catalog.unnest(%(ids)s::{id_type}[]),
                          pg_catalog.unnest(%(qids)s::bigint[])) WITH ORDINALITY AS k(id, qid, ord)
       ) AS v
 WHERE t.{id_column} = v.id
   AND EXISTS (SELECT 1 FROM {qs}.embedding_queue AS q
                WHERE q.id = v.qid AND q.status = 'processing' AND q.claim_token = %(token)s)
RETURNING v.qid;

-- name: write_pgvector
-- As write_vectors, for vector and halfvec targets: %(vectors)b is one binary vector[] (the
-- batch's vectors in pgvector's own format; halfvec columns take them by pgvector's cast).
UPDATE {schema}.{table} AS t
   SET {column} = v.vec{companions}
  FROM ROWS FROM (pg_catalog.unnest(%(ids)s::{id_type}[]), pg_catalog.unnest(%(qids)s::bigint[]),
                 pg_catalog.unnest(%(vectors)b)) AS v(id, qid, vec)
 WHERE t.{id_column} = v.id
   AND EXISTS (SELECT 1 FROM {qs}.embedding_queue AS q
                WHERE q.id = v.qid AND q.status = 'processing' AND q.claim_token = %(token)s)
RETURNING v.qid;

-- name: write_vectors_bytea
-- As write_vectors, for bytea targets: each vector arrives as little-endian float32 bytes.
UPDATE {schema}.{table} AS t
   SET {column} = v.blob{companions}
  FROM ROWS FROM (pg_catalog.unnest(%(ids)s::{id_type}[]), pg_catalog.unnest(%(qids)s::bigint[]),
                 pg_catalog.unnest(%(blobs)s::bytea[])) AS v(id, qid, blob)
 WHERE t.{id_column} = v.id
   AND EXISTS (SELECT 1 FROM {qs}.embedding_queue AS q
                WHERE q.id = v.qid AND q.status = 'processing' AND q.claim_token = %(token)s)
RETURNING v.qid;

-- name: write_value_vec
-- Fragment of write_vectors ({value}): the slice itself, for array columns.
v.vec

-- name: write_value_jsonb
-- Fragment of write_vectors ({value}): the slice as a JSON array, for jsonb columns.
pg_catalog.to_jsonb(v.vec)

-- name: write_set_model
-- Fragment of the write_* statements ({companions}), appended to their SET list: the
-- target's model column gets the model's name.
, {column} = %(model)s

-- name: write_set_generated_at
-- Fragment of the write_* statements ({companions}), appended to their SET list: the
-- target's generated-at column gets the write time.
, {column} = pg_catalog.now()

-- name: write_and_ack
-- Write one target's vectors ({write}: write_pgvector, write_vectors or write_vectors_bytea)
-- and mark those items done, in one statement. Items still claimed under our token whose
-- source row was not found are done too, with a detail saying nothing was written (retrying
-- could never succeed); items no longer claimed are left alone. `missing` reports the former.
-- A written item keeps the detail the worker sent with it (%(details)s, aligned with
-- %(qids)s: "truncated to 8,191 of 23,125 tokens", or NULL).
WITH written AS (
    {write}
)
UPDATE {qs}.embedding_queue AS q
   SET status = 'done', processed_at = pg_catalog.now(), updated_at = pg_catalog.now(),
       error_message = NULL,
       claim_token = NULL, lease_expires_at = NULL,
       detail = CASE WHEN q.id IN (SELECT w.qid FROM written AS w)
                     THEN (%(details)s::text[])[pg_catalog.array_position(%(qids)s::bigint[], q.id)]
                     ELSE 'source row not found; nothing written' END
 WHERE q.id = ANY(%(qids)s::bigint[]) AND q.status = 'processing' AND q.claim_token = %(token)s
RETURNING q.id, q.id NOT IN (SELECT w.qid FROM written AS w) AS missing;

-- name: fail_items
-- Permanent failures: each item ends failed with its own message.
UPDATE {qs}.embedding_queue AS q
   SET status = 'failed', error_message = f.message, processed_at = pg_catalog.now(),
       updated_at = pg_catalog.now(),
       claim_token = NULL, lease_expires_at = NULL
  FROM ROWS FROM (pg_catalog.unnest(%(ids)s::bigint[]),
                 pg_catalog.unnest(%(messages)s::text[])) AS f(id, message)
 WHERE q.id = f.id AND q.status = 'processing' AND q.claim_token = %(token)s
RETURNING q.id;

-- name: retry_items
-- Transient failure: back to pending with exponential backoff and jitter (never sooner than
-- the provider's Retry-After), or failed once the attempts are used up.
UPDATE {qs}.embedding_queue AS q
   SET status = CASE WHEN q.attempts >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
       error_message = %(message)s,
       next_attempt_at = now() + make_interval(secs => greatest(
           %(retry_after_seconds)s::float8,
           least(%(max_seconds)s::float8,
                 %(base_seconds)s::float8 * power(2, greatest(q.attempts - 1, 0)))
           * (0.5 + random() / 2))),
       processed_at = CASE WHEN q.attempts >= %(max_attempts)s THEN now() END,
       updated_at = now(), claim_token = NULL, lease_expires_at = NULL
 WHERE q.id = ANY(%(ids)s::bigint[]) AND q.status = 'processing' AND q.claim_token = %(token)s
RETURNING q.id, q.status;

-- name: release_items
-- Give back claimed items that were never worked on (shutdown): pending again, due now, and
-- the claim does not count as an attempt.
UPDATE {qs}.embedding_queue AS q
   SET status = 'pending', attempts = greatest(q.attempts - 1, 0), next_attempt_at = now(),
       updated_at = now(), claim_token = NULL, lease_expires_at = NULL
 WHERE q.id = ANY(%(ids)s::bigint[]) AND q.status = 'processing' AND q.claim_token = %(token)s
RETURNING q.id;

-- name: record_usage
-- Account one batch's provider usage (same transaction as its acknowledgement).
INSERT INTO {qs}.embedding_usage (owner, model, items, tokens, requests)
VALUES (%(owner)s, %(model)s, %(items)s, %(tokens)s, %(requests)s);

-- name: status_counts
-- Counts by table, column and status (the seed's status query, per column).
SELECT table_name, embedding_column, status, count
  FROM {qs}.embedding_queue_status
 ORDER BY table_name, embedding_column, status;

-- name: truncated_counts
-- Done items whose text was cut to the model's input limit, per target (the worker's detail
-- "truncated to N of M tokens"; a content change clears the detail with the re-pend).
SELECT table_name, embedding_column, count(*)::bigint AS truncated
  FROM {qs}.embedding_queue
 WHERE status = 'done' AND detail LIKE 'truncated to %%'
 GROUP BY table_name, embedding_column
 ORDER BY table_name, embedding_column;

-- name: inbox_status
-- Bulk inserts not yet expanded into queue rows, per target.
SELECT table_name, embedding_column, statements, rows
  FROM {qs}.embedding_queue_inbox_status
 ORDER BY table_name, embedding_column;

-- name: status_summary
-- Depth, oldest pending age and throughput (one row).
SELECT * FROM {qs}.embedding_queue_summary;

-- name: usage_summary
-- Tokens and requests per model.
SELECT * FROM {qs}.embedding_usage_summary ORDER BY model NULLS FIRST;

-- name: recent_failures
-- The newest failures with their error messages.
SELECT id, table_name, embedding_column, record_id, attempts, error_message, updated_at
  FROM {qs}.embedding_queue_failures
 LIMIT %(limit)s;

-- name: requeue_failed
-- failed -> pending for the rows matching every given filter (NULL filter = any); the
-- requeue trigger resets attempts, backoff and claim. dry_run returns the rows untouched.
WITH matched AS (
    SELECT id FROM {qs}.embedding_queue
     WHERE status = 'failed'
       AND (%(table_name)s::text IS NULL OR table_name = %(table_name)s)
       AND (%(column)s::text IS NULL OR embedding_column = %(column)s)
       AND (%(record_ids)s::text[] IS NULL OR record_id = ANY(%(record_ids)s::text[]))
       AND (%(error_like)s::text IS NULL OR error_message ILIKE %(error_like)s)
), moved AS (
    UPDATE {qs}.embedding_queue AS q
       SET status = 'pending', error_message = NULL
      FROM matched
     WHERE q.id = matched.id AND NOT %(dry_run)s
    RETURNING q.id
)
SELECT q.id, q.table_name, q.embedding_column, q.record_id, q.error_message
  FROM {qs}.embedding_queue AS q JOIN matched USING (id)
 ORDER BY q.id;

-- name: purge_done
-- Delete done rows older than the given age (uses embedding_queue_done_idx).
DELETE FROM {qs}.embedding_queue
 WHERE status = 'done' AND processed_at < now() - make_interval(secs => %(older_than_seconds)s);

-- name: purge_usage
-- Delete usage rows older than the given age.
DELETE FROM {qs}.embedding_usage WHERE at < now() - make_interval(secs => %(older_than_seconds)s);

-- name: estimate_pending
-- Pending work for the estimate: items and an estimated token count (4 bytes per token,
-- the same estimate the providers use) per target, bulk inserts not yet expanded included.
SELECT table_name, embedding_column, sum(items)::bigint AS items, sum(tokens)::bigint AS tokens
  FROM (SELECT table_name, embedding_column, count(*) AS items,
               coalesce(sum(greatest(1, ceil(octet_length(content) / 4.0))), 0) AS tokens
          FROM {qs}.embedding_queue
         WHERE status IN ('pending', 'processing') AND content IS NOT NULL
         GROUP BY table_name, embedding_column
        UNION ALL
        SELECT target_table, target_column, items, tokens
          FROM {qs}.embedding_queue_inbox_estimate()) AS w
 GROUP BY table_name, embedding_column
 ORDER BY table_name, embedding_column;

-- name: vector_type
-- The schema and name of a vector/halfvec target column's type (pgvector may live in any
-- schema, e.g. Supabase's extensions), for the search query's cast.
SELECT n.nspname AS type_schema, t.typname AS type_name
  FROM pg_attribute a
  JOIN pg_type t ON t.oid = a.atttypid
  JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE a.attrelid = (quote_ident(%(schema)s) || '.' || quote_ident(%(table)s))::regclass
   AND a.attname = %(column)s;

-- name: search_nearest
-- The k rows nearest to the query vector by cosine distance; ORDER BY the <=> operator on
-- the column itself so an HNSW (vector_cosine_ops) index serves it. {content_columns} is a
-- list of search_content_column fragments, {distance} cosine_distance_operator, {vtype}
-- the column's type (schema-qualified).
SELECT t.{id_column}::text AS id, pg_catalog.left(pg_catalog.concat_ws(' | ', {content_columns}), 160) AS content,
       t.{column} OPERATOR({distance}) %(query)b::real[]::{vtype} AS distance
  FROM {schema}.{table} AS t
 WHERE t.{column} IS NOT NULL
 ORDER BY t.{column} OPERATOR({distance}) %(query)b::real[]::{vtype}
 LIMIT %(k)s;

-- name: search_content_column
-- Fragment of search_nearest ({content_columns}): one content column as text.
t.{column}::text

-- name: cosine_distance_operator
-- Fragment (inside OPERATOR(...)): pgvector's cosine distance operator, named with the
-- schema pgvector lives in, since the session's search_path holds only pg_catalog.
{schema}.<=>

-- name: estimate_target
-- Rows and estimated tokens a backfill of one target would send (nothing is queued).
SELECT items, tokens
  FROM {qs}.embedding_queue_estimate(%(table_name)s::text, %(column)s::text, %(mode)s::text);

-- name: grant_worker
-- Grant a role the worker's least privileges (see 0003_operations.sql).
SELECT {qs}.embedding_grant_worker(%(role)s::name) AS targets;

-- name: vector_type_oids
-- pgvector's vector type and its array type in this database (no row without pgvector).
SELECT t.oid, t.typarray
  FROM pg_type t JOIN pg_extension e ON e.extnamespace = t.typnamespace
 WHERE e.extname = 'vector' AND t.typname = 'vector';

-- name: vector_extension_schema
-- Where pgvector is installed (NULL when it is not).
SELECT n.nspname AS schema FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname = 'vector';

-- name: create_vector_extension
-- Install pgvector (needs the privilege to create extensions).
CREATE EXTENSION IF NOT EXISTS vector SCHEMA {qs};

-- name: add_embedding_column
-- Add a vector/halfvec target column of fixed dimensions if it does not exist ({vtype}:
-- pgvector's type, schema-qualified; {dimensions}: its type modifier).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {vtype}({dimensions});

-- name: create_hnsw_index
-- Cosine HNSW index for search, created at once (a small backlog; {m}, {ef_construction}:
-- integer literals, by default the seeds' 16 and 64).
CREATE INDEX IF NOT EXISTS {index} ON {table} USING hnsw ({column} {opclass})
  WITH (m = {m}, ef_construction = {ef_construction});

-- name: resolve_table
-- A table given as text ('docs', 'app.docs', '"My Schema"."My Table"'), by parse_ident's
-- rules: a qualified name as written; a bare one in the queue schema, else in public (where
-- the seeds' tables live). Never a temporary table, whatever the session's search_path.
SELECT c.oid AS table_oid, n.nspname AS schema_name, c.relname AS relation_name
  FROM (SELECT parse_ident(%(table)s::text) AS p) AS i
  JOIN pg_namespace AS n
    ON CASE cardinality(i.p) WHEN 2 THEN n.nspname = i.p[1]
                             WHEN 1 THEN n.nspname IN (%(schema)s::text, 'public') END
  JOIN pg_class AS c ON c.relnamespace = n.oid AND c.relname = i.p[cardinality(i.p)]
 WHERE c.relkind IN ('r', 'p')
 ORDER BY n.nspname = %(schema)s::text DESC
 LIMIT 1;

-- name: cache_lookup
-- Cached vectors for these content hashes (primary key lookups).
SELECT content_hash, embedding FROM {qs}.embedding_cache
 WHERE model = %(model)s AND dimensions = %(dimensions)s
   AND content_hash = ANY(%(hashes)s::bytea[]);

-- name: cache_store
-- Remember freshly embedded vectors; a concurrent worker may have stored the same text.
INSERT INTO {qs}.embedding_cache (model, dimensions, content_hash, embedding)
SELECT %(model)s, %(dimensions)s, h, e
  FROM unnest(%(hashes)s::bytea[], %(embeddings)s::bytea[]) AS c(h, e)
ON CONFLICT DO NOTHING;


-- name: queue_depth
-- Rows by status, for the queue_depth gauge and the /healthz database check. A scan of the
-- hot table every few seconds: `purge` keeps done rows from piling up.
SELECT status, count(*)::bigint AS count
  FROM {qs}.embedding_queue
 GROUP BY status
UNION ALL
-- Keys of bulk inserts still in the inbox, under the pseudo-status 'inbox'.
SELECT 'inbox', coalesce(sum(rows), 0)::bigint FROM {qs}.embedding_queue_inbox_status;

-- --- index builds (0007: embedding_index_builds) ---------------------------------------

-- name: want_index
-- Record the index a target wants (re-registering replaces the wish): 'pending' to have it
-- built once the backlog drains, 'ready' when it was just created.
INSERT INTO {qs}.embedding_index_builds AS b
       (table_name, embedding_column, index_name, opclass, m, ef_construction, state,
        finished_at)
VALUES (%(table_name)s::text, %(column)s::text, %(index_name)s::text, %(opclass)s::text,
        %(m)s::integer, %(ef_construction)s::integer, %(state)s::text,
        CASE WHEN %(state)s::text = 'ready' THEN now() END)
ON CONFLICT (table_name, embedding_column) DO UPDATE
   SET index_name = EXCLUDED.index_name, opclass = EXCLUDED.opclass, m = EXCLUDED.m,
       ef_construction = EXCLUDED.ef_construction, state = EXCLUDED.state,
       error_message = NULL, builder = NULL, builder_pid = NULL, lease_expires_at = NULL,
       requested_at = now(), started_at = NULL, finished_at = EXCLUDED.finished_at;

-- name: index_build_wanted
-- Whether any wanted index waits for a build (pending, or building under a lease that may
-- have lapsed): a pooled worker asks this before it opens a direct connection to build.
SELECT EXISTS (SELECT 1 FROM {qs}.embedding_index_builds
                WHERE state IN ('pending', 'building')) AS wanted;

-- name: index_builds
-- Every wanted index with its build state, whether the catalog holds it as a valid index
-- (valid: NULL when it does not exist), and the target's queued work (status, build-index).
SELECT b.table_name, b.embedding_column, b.index_name, b.method, b.opclass, b.m,
       b.ef_construction, b.state, b.error_message, b.builder, b.attempts, b.memory_mb,
       b.requested_at, b.started_at, b.finished_at, t.schema_name, t.relation_name,
       -- The table and column the index goes on: a chunked target's chunks table (0010).
       coalesce(t.chunks_table, t.relation_name) AS index_table,
       CASE WHEN t.chunks_table IS NULL THEN t.embedding_column ELSE 'embedding' END
           AS index_column,
       (SELECT i.indisvalid
          FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
          JOIN pg_index AS i ON i.indexrelid = c.oid
         WHERE n.nspname = t.schema_name AND c.relname = b.index_name) AS valid,
       extract(epoch FROM now() - b.started_at)::float8 AS building_seconds
  FROM {qs}.embedding_index_builds AS b
  JOIN {qs}.embedding_targets AS t USING (table_name, embedding_column)
 WHERE %(table_name)s::text IS NULL
    OR (b.table_name = %(table_name)s::text AND b.embedding_column = %(column)s::text)
 ORDER BY b.table_name, b.embedding_column;

-- name: claim_index_build
-- Take one due build (or the given target's): wanted ('pending'), or 'building' by a builder
-- whose lease lapsed and whose backend is gone (pg_stat_activity lists every backend's pid
-- to every role). Due means the target has nothing pending, processing or in the inbox: the
-- backlog's vectors go into the table before the index is built. The registry is tiny and
-- the queue probes run only for wanted indexes (partial indexes on pending and processing
-- rows), so a worker may ask this every few seconds. SKIP LOCKED: two builders never take
-- the same row; builder_pid is the backend of the connection that will build. relation_name
-- and index_column: where the index goes, for a chunked target (0010) its chunks table's
-- embedding column.
WITH due AS (
    SELECT b.table_name, b.embedding_column, t.schema_name,
           coalesce(t.chunks_table, t.relation_name) AS relation_name,
           CASE WHEN t.chunks_table IS NULL THEN t.embedding_column ELSE 'embedding' END
               AS index_column,
           t.column_type, t.dimensions
      FROM {qs}.embedding_index_builds AS b
      JOIN {qs}.embedding_targets AS t USING (table_name, embedding_column)
     WHERE (b.state = 'pending'
            OR (b.state = 'building' AND b.lease_expires_at < now()
                AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a
                                 WHERE a.pid = b.builder_pid)))
       AND (%(table_name)s::text IS NULL
            OR (b.table_name = %(table_name)s::text AND b.embedding_column = %(column)s::text))
       AND NOT EXISTS (SELECT 1 FROM {qs}.embedding_queue AS q
                        WHERE q.status IN ('pending', 'processing')
                          AND q.table_name = b.table_name
                          AND q.embedding_column = b.embedding_column)
       AND NOT EXISTS (SELECT 1 FROM {qs}.embedding_queue_inbox AS i
                        WHERE i.table_name = b.table_name
                          AND i.embedding_column = b.embedding_column)
     ORDER BY b.requested_at
     LIMIT 1
       FOR UPDATE OF b SKIP LOCKED
)
UPDATE {qs}.embedding_index_builds AS b
   SET state = 'building', builder = %(owner)s::text, builder_pid = pg_backend_pid(),
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s::float8),
       attempts = b.attempts + 1, error_message = NULL, started_at = now(), finished_at = NULL
  FROM due
 WHERE b.table_name = due.table_name AND b.embedding_column = due.embedding_column
RETURNING b.table_name, b.embedding_column, b.index_name, b.opclass, b.m, b.ef_construction,
          due.schema_name, due.relation_name, due.index_column, due.column_type,
          due.dimensions;

-- name: renew_index_build
-- Extend the lease of a build this builder holds (false: it lost it).
UPDATE {qs}.embedding_index_builds
   SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s::float8)
 WHERE table_name = %(table_name)s::text AND embedding_column = %(column)s::text
   AND state = 'building' AND builder = %(owner)s::text
RETURNING true AS renewed;

-- name: finish_index_build
-- Record how a build this builder holds ended: 'ready', 'failed' (with the error) or back to
-- 'pending' (interrupted: the next builder drops what it left and starts over).
UPDATE {qs}.embedding_index_builds
   SET state = %(state)s::text, error_message = %(error)s::text, memory_mb = %(memory_mb)s,
       builder = NULL, builder_pid = NULL, lease_expires_at = NULL,
       finished_at = CASE WHEN %(state)s::text = 'pending' THEN NULL ELSE now() END
 WHERE table_name = %(table_name)s::text AND embedding_column = %(column)s::text
   AND state = 'building' AND builder = %(owner)s::text
RETURNING true AS finished;

-- name: retry_index_build
-- build-index: a failed build, or a 'ready' one whose index is missing or invalid, is
-- wanted again.
UPDATE {qs}.embedding_index_builds
   SET state = 'pending', error_message = NULL, requested_at = now()
 WHERE table_name = %(table_name)s::text AND embedding_column = %(column)s::text
   AND (state = 'failed' OR (state = 'ready' AND NOT %(valid)s::boolean));

-- name: index_validity
-- Whether the index exists (a row) and is valid (indisvalid false: a CREATE INDEX
-- CONCURRENTLY that did not finish; it slows writes and serves no query).
SELECT i.indisvalid AS valid
  FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
  JOIN pg_index AS i ON i.indexrelid = c.oid
 WHERE n.nspname = %(schema)s::text AND c.relname = %(index)s::text;

-- name: index_build_rows
-- The planner's row count of the table (pg_class.reltuples; -1 never analysed), to size the
-- build's memory without reading the table.
SELECT reltuples::float8 AS rows FROM pg_class
 WHERE oid = (quote_ident(%(schema)s::text) || '.' || quote_ident(%(table)s::text))::regclass;

-- name: count_table_rows
-- The table's rows, counted (only when index_build_rows has no estimate). count(*): a worker
-- role may read the key column only, and that is enough for it.
SELECT count(*)::bigint AS rows FROM {table};

-- name: may_create_index
-- Whether this role may create an index on the table (only its owner, or a member of the
-- owning role, may), and who owns it.
SELECT pg_has_role(c.relowner, 'USAGE') AS allowed, pg_get_userbyid(c.relowner) AS owner,
       current_user AS role
  FROM pg_class AS c
 WHERE c.oid = (quote_ident(%(schema)s::text) || '.' || quote_ident(%(table)s::text))::regclass;

-- name: session_settings
-- The current values of these settings (NULL: unknown to this server version).
SELECT s.name, current_setting(s.name, true) AS value
  FROM unnest(%(names)s::text[]) AS s(name);

-- name: set_session_settings
-- Set these settings for the rest of the session (an index build's connection).
SELECT set_config(s.name, s.value, false)
  FROM unnest(%(names)s::text[], %(values)s::text[]) AS s(name, value);

-- name: drop_index_concurrently
-- Drop an invalid index a killed build left behind, without blocking writes.
DROP INDEX CONCURRENTLY IF EXISTS {index};

-- name: build_hnsw_index
-- Build a wanted cosine HNSW index without blocking writes to the table ({m},
-- {ef_construction}: integer literals from the registry, whose CHECKs bound them).
CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} USING hnsw ({column} {opclass})
  WITH (m = {m}, ef_construction = {ef_construction});

-- name: column_index_usable
-- Whether a valid HNSW or IVFFlat index covers a target column (search says when none does:
-- the query is then an exact, sequential scan).
SELECT EXISTS (
    SELECT 1 FROM pg_index AS i
      JOIN pg_class AS c ON c.oid = i.indexrelid
      JOIN pg_am AS am ON am.oid = c.relam
      JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
     WHERE i.indrelid = (quote_ident(%(schema)s::text) || '.'
                         || quote_ident(%(table)s::text))::regclass
       AND a.attname = %(column)s::text AND i.indisvalid
       AND am.amname IN ('hnsw', 'ivfflat')) AS usable;

-- name: worker_seen
-- Record this worker as running with the models it serves, until %(ttl_seconds)s from now
-- (0009: embedding_workers; refreshed with its lease renewals, so `status` can tell which
-- models some running worker serves).
INSERT INTO {qs}.embedding_workers AS w (owner, models, expires_at)
VALUES (%(owner)s::text, %(models)s::text[],
        pg_catalog.now() + pg_catalog.make_interval(secs => %(ttl_seconds)s::float8))
ON CONFLICT (owner) DO UPDATE
   SET models = EXCLUDED.models, seen_at = pg_catalog.now(), expires_at = EXCLUDED.expires_at;

-- name: worker_gone
-- Remove this worker from the running workers (it stopped).
DELETE FROM {qs}.embedding_workers WHERE owner = %(owner)s::text;

-- name: target_models
-- Per target: its model and dimensions, its pending items (through
-- embedding_queue_pending_target_idx), and whether a running worker serves it (unbound
-- targets are served by any).
SELECT t.table_name, t.embedding_column, t.model, t.dimensions, t.model_column,
       (SELECT count(*) FROM {qs}.embedding_queue AS q
         WHERE q.status = 'pending' AND q.table_name = t.table_name
           AND q.embedding_column = t.embedding_column) AS pending,
       EXISTS (SELECT 1 FROM {qs}.embedding_workers AS w
                WHERE w.expires_at > pg_catalog.now()
                  AND (t.model IS NULL OR t.model = ANY(w.models))) AS served
  FROM {qs}.embedding_targets AS t
 ORDER BY t.table_name, t.embedding_column;

-- name: stale_model_count
-- Rows of a target holding another model's vector (one scan of the source table; NULL when
-- the target has no model column or no model). Needs SELECT on the model column: the owner.
SELECT {qs}.embedding_target_stale_model_count(%(table_name)s::text, %(column)s::text) AS stale;

-- name: bind_target
-- Bind a target to a model (sql/functions/20_targets.sql); returns the previous model.
SELECT {qs}.embedding_bind_target(%(table_name)s::text, %(column)s::text, %(model)s::text,
                                   %(dimensions)s::integer) AS previous;

-- name: reembed_start
-- Start re-embedding a target with another model: shadow column, its target, the record
-- (sql/functions/50_reembed.sql). Returns the shadow column's name.
SELECT {qs}.embedding_reembed_start(%(table_name)s::text, %(column)s::text, %(model)s::text,
                                     %(dimensions)s::integer) AS shadow;

-- name: reembed_progress
-- A re-embedding's state and progress: rows with a new vector out of rows with content,
-- estimated tokens of the rest, items queued for it (one scan of the source table).
SELECT state, new_model, shadow_column, done, total, remaining_tokens, queued
  FROM {qs}.embedding_reembed_progress(%(table_name)s::text, %(column)s::text);

-- name: reembeds
-- Every re-embedding in progress.
SELECT table_name, embedding_column, old_model, new_model, new_dimensions, state, started_at,
       switched_at
  FROM {qs}.embedding_reembeds
 ORDER BY table_name, embedding_column;

-- name: lock_timeout
-- Give up waiting for a lock after %(ms)s milliseconds, for the rest of this transaction
-- (the switch: while it waits for the table's lock, every query of the table queues behind
-- it, so it must not wait long; the caller retries).
SELECT pg_catalog.set_config('lock_timeout', %(ms)s::text, true);

-- name: reembed_switch
-- Swap the shadow column in (refused until it is complete): the rows switched and how long
-- the swap (the part under the table's lock) took.
SELECT rows, swap_ms FROM {qs}.embedding_reembed_switch(%(table_name)s::text, %(column)s::text);

-- name: reembed_rollback
-- Swap the old column back; how long the swap took.
SELECT 0::bigint AS rows, swap_ms
  FROM {qs}.embedding_reembed_rollback(%(table_name)s::text, %(column)s::text);

-- name: reembed_finish
-- Drop the column not in use; returns its name.
SELECT {qs}.embedding_reembed_finish(%(table_name)s::text, %(column)s::text) AS dropped;

-- name: hnsw_opclass
-- The operator class of an HNSW index on this column, if it has one (the shadow gets the same
-- kind of index before it is switched in).
SELECT opc.opcname AS opclass
  FROM pg_index AS i
  JOIN pg_class AS ic ON ic.oid = i.indexrelid
  JOIN pg_am AS am ON am.oid = ic.relam AND am.amname = 'hnsw'
  JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
  JOIN pg_opclass AS opc ON opc.oid = i.indclass[0]
 WHERE i.indrelid = (quote_ident(%(schema)s::text) || '.' || quote_ident(%(table)s::text))::regclass
   AND a.attname = %(column)s::text
 LIMIT 1;

-- name: create_hnsw_index_concurrently
-- As create_hnsw_index, without blocking writes (outside a transaction).
CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} USING hnsw ({column} {opclass})
  WITH (m = 16, ef_construction = 64);

-- name: write_chunks
-- Replace the chunk sets of one chunked target's records and acknowledge their queue rows,
-- for the rows still claimed under our token (sql/functions/28_chunks.sql:
-- embedding_chunks_write, SECURITY DEFINER: worker roles hold no privilege on the chunks
-- tables). %(vectors)b is every chunk's vector concatenated into one binary real[].
SELECT w.id FROM {qs}.embedding_chunks_write(
    %(table_name)s::text, %(column)s::text, %(token)s::uuid,
    %(qids)s::bigint[], %(details)s::text[],
    %(chunk_qids)s::bigint[], %(texts)s::text[], %(vectors)b::real[], %(model)s::text
) AS w(id);

-- name: search_chunks
-- The k records whose best chunk is nearest to the query vector, with that chunk. The inner
-- query walks the HNSW index (ORDER BY the <=> operator on the indexed column, LIMIT) for
-- the %(candidates)s nearest chunks (k times a few chunks per record, bounded by
-- hnsw.ef_search); DISTINCT ON then keeps each record's best, and the outer ORDER BY ranks
-- them. {vtype}: the column's type (schema-qualified), {distance}: cosine_distance_operator.
SELECT best.id, best.chunk_index, best.chunk_text, best.distance
  FROM (SELECT DISTINCT ON (n.record_id) n.record_id::text AS id, n.chunk_index,
               n.chunk_text, n.distance
          FROM (SELECT c.record_id, c.chunk_index, c.chunk_text,
                       c.embedding OPERATOR({distance}) %(query)b::real[]::{vtype} AS distance
                  FROM {schema}.{table} AS c
                 ORDER BY c.embedding OPERATOR({distance}) %(query)b::real[]::{vtype}
                 LIMIT %(candidates)s) AS n
         ORDER BY n.record_id, n.distance) AS best
 ORDER BY best.distance
 LIMIT %(k)s;

-- name: set_ef_search
-- An HNSW scan returns at most hnsw.ef_search rows (default 40): let it return as many as
-- search_chunks asks for (transaction-local).
SELECT pg_catalog.set_config('hnsw.ef_search', %(ef_search)s::text, true);

-- name: chunk_counts
-- Chunks and records with chunks of one chunked target, for status.
SELECT count(*) AS chunks, count(DISTINCT c.record_id) AS records FROM {schema}.{table} AS c;
