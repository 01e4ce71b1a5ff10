-- functions/30_operations: least-privilege grants for the worker's role, and estimates.
-- See 10_queue.sql for how these files are applied.

-- Grant a worker role exactly what the processor needs, and nothing it could abuse:
-- - the queue: SELECT, and UPDATE of the columns a claim, a completion, a retry or a requeue
--   moves (status, lease, attempts, error); never content, table_name, record_id,
--   embedding_column or generation, so the role cannot make the worker embed other text
--   into a row, nor aim a vector at another row or column;
-- - SELECT on the registry, the migration records, and the inbox's keys (never content);
--   SELECT, INSERT on usage accounting and the opt-in cache; the status views;
-- - EXECUTE on the functions the worker calls (embedding_queue_expand, the estimates);
-- - on each registered source table: SELECT of the key column and UPDATE of the target and
--   companion columns only (column privileges; FOR NO KEY UPDATE locks need UPDATE on any
--   column). Re-run after registering a target; unregistering revokes what it granted.
-- Every table of ours has row-level security on, so the role also gets a policy on each
-- (named embedding_worker_<hash of the role>): a role that merely inherited default
-- privileges has none and sees no row. An earlier version granted UPDATE on the whole queue:
-- that is taken back here.
CREATE OR REPLACE FUNCTION embedding_grant_worker(p_role name) RETURNS integer
LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    t embedding_targets;
    qs text := embedding_queue_nsp();
    role text := quote_ident(p_role);
    policy text := 'embedding_worker_' || left(md5(p_role), 16);
    tbl text;
    n integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role % does not exist', role USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', qs, role);
    EXECUTE format('REVOKE UPDATE ON %I.embedding_queue FROM %s', qs, role);
    EXECUTE format('GRANT SELECT ON %I.embedding_queue TO %s', qs, role);
    EXECUTE format('GRANT UPDATE (status, error_message, attempts, next_attempt_at, claimed_by, '
                   'claim_token, lease_expires_at, detail, updated_at, processed_at) '
                   'ON %I.embedding_queue TO %s', qs, role);
    EXECUTE format('GRANT SELECT ON %I.embedding_targets, %I.queue_processor_migrations, '
                   '%I.queue_processor_functions, %I.embedding_queue_inbox TO %s',
                   qs, qs, qs, qs, role);
    EXECUTE format('GRANT SELECT, INSERT ON %I.embedding_usage, %I.embedding_cache TO %s',
                   qs, qs, role);
    EXECUTE format('GRANT SELECT ON %I.embedding_queue_summary, %I.embedding_queue_status, '
                   '%I.embedding_usage_summary, %I.embedding_queue_failures, '
                   '%I.embedding_queue_inbox_status TO %s', qs, qs, qs, qs, qs, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.embedding_queue_expand(integer), '
                   '%I.embedding_queue_inbox_estimate(), '
                   '%I.embedding_queue_estimate(text, text, text) TO %s', qs, qs, qs, role);
    FOREACH tbl IN ARRAY ARRAY['embedding_queue', 'embedding_targets', 'embedding_usage',
                               'embedding_cache', 'embedding_queue_inbox',
                               'queue_processor_migrations', 'queue_processor_functions'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_policy
                        WHERE polrelid = format('%I.%I', qs, tbl)::regclass
                          AND polname = policy) THEN
            EXECUTE format('CREATE POLICY %I ON %I.%I TO %s USING (true) WITH CHECK (true)',
                           policy, qs, tbl, role);
        END IF;
    END LOOP;
    FOR t IN SELECT * FROM embedding_targets LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', t.schema_name, role);
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
CREATE OR REPLACE FUNCTION embedding_queue_estimate(
    p_table_name text, p_embedding_column text, p_mode text DEFAULT 'missing',
    OUT items bigint, OUT tokens bigint)
LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    t embedding_targets;
BEGIN
    t := embedding_target(p_table_name, p_embedding_column);
    IF p_mode NOT IN ('missing', 'all') THEN
        RAISE EXCEPTION 'estimate mode must be missing or all, not %', quote_literal(p_mode);
    END IF;
    EXECUTE format(
        $q$
        SELECT count(*), coalesce(sum(greatest(1, ceil(octet_length(c.content) / 4.0))), 0)
          FROM %I.%I AS r CROSS JOIN LATERAL (SELECT %s AS content) AS c
         WHERE %s AND NOT embedding_queue_is_blank(c.content)
        $q$,
        t.schema_name, t.relation_name,
        embedding_queue_content_sql(t.content_columns, t.content_template, 'r'),
        CASE p_mode WHEN 'missing' THEN format('r.%I IS NULL', t.embedding_column) ELSE 'true' END)
    INTO items, tokens;
END;
$$;

-- After `migrate` has (re)applied these files: regenerate every target's triggers with the
-- current generator, and re-grant every worker role under the current grant rules (an upgrade
-- from a version that granted UPDATE on the whole queue narrows it to the lease columns).
CREATE OR REPLACE FUNCTION embedding_refresh_installed(OUT targets integer, OUT workers integer)
LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    r regrole;
BEGIN
    targets := embedding_regenerate_targets();
    workers := 0;
    FOR r IN SELECT embedding_worker_roles() LOOP
        PERFORM embedding_grant_worker((SELECT rolname FROM pg_roles WHERE oid = r::oid));
        workers := workers + 1;
    END LOOP;
END;
$$;
