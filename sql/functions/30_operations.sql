-- functions/30_operations: least-privilege grants for the worker's role, and estimates.
-- See 10_queue.sql for how these files are applied.

-- Grant a worker role exactly what the processor needs, and nothing it could abuse:
-- - the queue: SELECT, and UPDATE of the columns a claim, a completion, a retry or a requeue
--   moves (status, lease, attempts, error); never content, table_name, record_id,
--   embedding_column or generation, so the role cannot make the worker embed other text
--   into a row, nor aim a vector at another row or column;
-- - SELECT on the registry, the migration records, and the inbox's keys (never content);
-- - SELECT on the wanted indexes and UPDATE of their build state (claim, lease, outcome);
--   SELECT, INSERT on usage accounting and the opt-in cache; the status views;
-- - EXECUTE on the functions the worker calls (embedding_queue_expand, the estimates);
-- - on each registered source table: SELECT of the key column and UPDATE of the target and
--   companion columns only (column privileges; FOR NO KEY UPDATE locks need UPDATE on any
--   column). Re-run after registering a target; unregistering revokes what it granted.
-- Every table of ours has row-level security on, so the role also gets a policy on each
-- (named embedding_worker_<hash of the role>): a role that merely inherited default
-- privileges has none and sees no row. An earlier version granted UPDATE on the whole queue:
-- that is taken back here.
CREATE OR REPLACE FUNCTION @qs@.embedding_grant_worker(p_role name) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
    qs text := @qs@.embedding_queue_nsp();
    role text := quote_ident(p_role);
    policy text := 'embedding_worker_' || left(md5(p_role), 16);
    tbl text;
    n integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role % does not exist', role USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', qs, role);
    -- From scratch: whatever the role held on the queue (e.g. UPDATE of every column, as an
    -- earlier version granted) is replaced by exactly what follows.
    EXECUTE format('REVOKE ALL ON %I.embedding_queue FROM %s', qs, role);
    EXECUTE format('GRANT SELECT ON %I.embedding_queue TO %s', qs, role);
    EXECUTE format('GRANT UPDATE (status, error_message, attempts, next_attempt_at, claimed_by, '
                   'claim_token, lease_expires_at, detail, updated_at, processed_at) '
                   'ON %I.embedding_queue TO %s', qs, role);
    EXECUTE format('GRANT SELECT ON %I.embedding_targets, %I.queue_processor_migrations, '
                   '%I.queue_processor_functions, %I.embedding_queue_inbox TO %s',
                   qs, qs, qs, qs, role);
    EXECUTE format('GRANT SELECT, INSERT ON %I.embedding_usage, %I.embedding_cache TO %s',
                   qs, qs, role);
    -- Index builds (0007): a worker claims a due build, renews its lease and records how it
    -- ended; never which index, on which column, with which parameters.
    EXECUTE format('GRANT SELECT ON %I.embedding_index_builds TO %s', qs, role);
    EXECUTE format('GRANT UPDATE (state, error_message, builder, builder_pid, lease_expires_at, '
                   'attempts, memory_mb, started_at, finished_at) '
                   'ON %I.embedding_index_builds TO %s', qs, role);
    -- The worker's own row in the list of running workers (0009): inserted at start,
    -- refreshed with its leases, deleted on exit. Not security-relevant: it only feeds
    -- `status` ("waiting for a worker with model X").
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.embedding_workers TO %s', qs, role);
    -- Re-embeddings in progress, for `status` run as the worker role.
    EXECUTE format('GRANT SELECT ON %I.embedding_reembeds TO %s', qs, role);
    EXECUTE format('GRANT SELECT ON %I.embedding_queue_summary, %I.embedding_queue_status, '
                   '%I.embedding_usage_summary, %I.embedding_queue_failures, '
                   '%I.embedding_queue_inbox_status TO %s', qs, qs, qs, qs, qs, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.embedding_queue_expand(integer), '
                   '%I.embedding_queue_inbox_estimate(), '
                   '%I.embedding_queue_estimate(text, text, text), '
                   '%I.embedding_chunks_write(text, text, uuid, bigint[], text[], bigint[], '
                   'text[], real[], text) TO %s', qs, qs, qs, qs, role);
    FOREACH tbl IN ARRAY ARRAY['embedding_queue', 'embedding_targets', 'embedding_usage',
                               'embedding_cache', 'embedding_queue_inbox', 'embedding_workers',
                               'embedding_reembeds', 'embedding_index_builds',
                               'queue_processor_migrations', 'queue_processor_functions'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_policy
                        WHERE polrelid = format('%I.%I', qs, tbl)::regclass
                          AND polname = policy) THEN
            EXECUTE format('CREATE POLICY %I ON %I.%I TO %s USING (true) WITH CHECK (true)',
                           policy, qs, tbl, role);
        END IF;
    END LOOP;
    FOR t IN SELECT * FROM @qs@.embedding_targets LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', t.schema_name, role);
        -- A chunked target: the worker writes its chunks only through embedding_chunks_write
        -- (SECURITY DEFINER, under a valid claim); it may read them (search, status) and
        -- nothing of the source table.
        IF t.chunks_table IS NOT NULL THEN
            EXECUTE format('GRANT SELECT ON %I.%I TO %s', t.schema_name, t.chunks_table, role);
            IF NOT EXISTS (SELECT 1 FROM pg_policy
                            WHERE polrelid = format('%I.%I', t.schema_name, t.chunks_table)::regclass
                              AND polname = policy) THEN
                EXECUTE format('CREATE POLICY %I ON %I.%I FOR SELECT TO %s USING (true)',
                               policy, t.schema_name, t.chunks_table, role);
            END IF;
            n := n + 1;
            CONTINUE;
        END IF;
        EXECUTE format('GRANT SELECT (%I) ON %I.%I TO %s',
                       t.id_column, t.schema_name, t.relation_name, role);
        EXECUTE format('GRANT UPDATE (%s) ON %I.%I TO %s',
                       concat_ws(', ', quote_ident(t.embedding_column),
                                 quote_ident(t.model_column), quote_ident(t.generated_at_column)),
                       t.schema_name, t.relation_name, role);
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;

-- What a backfill of a target would send: rows and estimated tokens (4 bytes per token, as
-- the providers estimate), without queueing anything. p_mode: 'missing' or 'all'.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_estimate(
    p_table_name text, p_embedding_column text, p_mode text DEFAULT 'missing',
    OUT items bigint, OUT tokens bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
BEGIN
    t := @qs@.embedding_target(p_table_name, p_embedding_column);
    IF p_mode NOT IN ('missing', 'all') THEN
        RAISE EXCEPTION 'estimate mode must be missing or all, not %', quote_literal(p_mode);
    END IF;
    EXECUTE format(
        $q$
        SELECT count(*), coalesce(sum(greatest(1, ceil(octet_length(c.content) / 4.0))), 0)
          FROM %I.%I AS r CROSS JOIN LATERAL (SELECT %s AS content) AS c
         WHERE %s AND NOT @qs@.embedding_queue_is_blank(c.content)
        $q$,
        t.schema_name, t.relation_name,
        @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'r'),
        CASE p_mode WHEN 'missing' THEN @qs@.embedding_target_missing_filter(t) ELSE 'true' END)
    INTO items, tokens;
END;
$$;

-- After `migrate` has applied migrations or (re)applied these files:
-- 1. regenerate every target's triggers with the current generator;
-- 2. take every privilege on our tables, views and functions from every role but the owner
--    and the worker roles. Default privileges (e.g. Supabase's `GRANT ALL ON TABLES/FUNCTIONS
--    TO anon, authenticated`) give new tables' TRUNCATE, TRIGGER and REFERENCES to roles that
--    row-level security does not stop, and EXECUTE on new functions to them (RPC); and
--    PostgreSQL gives EXECUTE on every new function to PUBLIC (embedding_queue_make_private
--    takes both). embedding_queue_is_blank keeps its grants: the blank-content triggers'
--    WHEN clauses call it as whichever role writes a registered table, and it is a pure
--    function of its argument. Registering a
--    table from another role than the owner needs EXECUTE granted by the owner;
-- 3. re-grant every worker role under the current rules (an upgrade from a version that
--    granted UPDATE on the whole queue narrows it to the lease columns).
CREATE OR REPLACE FUNCTION @qs@.embedding_refresh_installed(OUT targets integer, OUT workers integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ns oid := (SELECT relnamespace FROM pg_class WHERE oid = '@qs@.embedding_queue'::regclass);
    r regrole;
    object text;
    grantee text;
BEGIN
    targets := @qs@.embedding_regenerate_targets();
    FOR object, grantee IN
        SELECT DISTINCT c.oid::regclass::text,
                        CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
          FROM pg_class AS c, aclexplode(c.relacl) AS a
         WHERE c.relnamespace = ns AND c.relkind IN ('r', 'p', 'v')
           AND (c.relname LIKE 'embedding\_%' OR c.relname LIKE 'queue\_processor\_%')
           AND a.grantee <> c.relowner
           AND a.grantee NOT IN (SELECT @qs@.embedding_worker_roles())
    LOOP
        EXECUTE format('REVOKE ALL ON TABLE %s FROM %s', object, grantee);
    END LOOP;
    PERFORM @qs@.embedding_queue_make_private(p.oid::regprocedure)
       FROM pg_proc AS p
      WHERE p.pronamespace = ns
        AND (p.proname LIKE 'embedding\_%' OR p.proname LIKE 'queue\_processor\_%')
        AND p.oid <> '@qs@.embedding_queue_is_blank(text)'::regprocedure;
    workers := 0;
    FOR r IN SELECT @qs@.embedding_worker_roles() LOOP
        PERFORM @qs@.embedding_grant_worker((SELECT rolname FROM pg_roles WHERE oid = r::oid));
        workers := workers + 1;
    END LOOP;
END;
$$;
