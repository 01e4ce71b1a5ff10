-- functions/40_inbox: expanding bulk inserts' inbox rows into queue rows, and their estimate.
-- See 10_queue.sql for how these files are applied.

-- Expand (part of) the oldest inbox row nobody else is expanding: queue up to p_max_rows of
-- its keys and advance or delete it, in the caller's transaction. Returns how many keys were
-- taken (0: nothing to expand). Queued rows take the inbox row's created_at as their due
-- time, so a bulk load keeps its place in line. Keys whose row is gone or whose content is
-- blank queue nothing; a key already queued (its row changed again since the insert, and the
-- update trigger queued the newer content) is left alone. Key order, as in backfills, keeps
-- the row locks ordered against concurrent updates of the same rows.
-- SECURITY DEFINER: the worker's role needs no read access to the content columns, nor
-- INSERT on the queue (which would let it queue any text for any row), to expand. What keeps
-- that safe: every object of ours is qualified and search_path is pg_catalog, pg_temp (a
-- caller's temporary tables or planted overloads are never found), the key type reaches the
-- statement only through regtype, only roles given it by grant-worker may execute it, and
-- the source is read only while it is still a table that runs none of its owner's code when
-- read by us: not a view (its owner could have renamed the table and put one in its place),
-- and not under row-level security policies we are subject to. Otherwise its keys are not
-- queued, with a warning that says how to queue them (the rows keep a NULL embedding).
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_expand(p_max_rows integer DEFAULT 5000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e @qs@.embedding_queue_inbox;
    t @qs@.embedding_targets;
    keys text[];
BEGIN
    IF p_max_rows IS NULL OR p_max_rows < 1 THEN
        RAISE EXCEPTION 'p_max_rows must be at least 1, not %', p_max_rows
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO e FROM @qs@.embedding_queue_inbox ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    keys := e.record_ids[e.expanded + 1 : e.expanded + p_max_rows];
    SELECT * INTO t FROM @qs@.embedding_targets
     WHERE table_name = e.table_name AND embedding_column = e.embedding_column;
    IF FOUND AND NOT EXISTS (
        SELECT 1 FROM pg_class AS c, pg_roles AS me
         WHERE c.oid = to_regclass(format('%I.%I', t.schema_name, t.relation_name))
           AND c.relkind IN ('r', 'p') AND me.rolname = current_user
           AND (NOT c.relrowsecurity OR c.relowner = me.oid OR me.rolsuper OR me.rolbypassrls)) THEN
        RAISE WARNING '% bulk-inserted rows of %.% were not queued: %.% is no longer a table we '
                      'can read safely (a view, or row-level security of another owner); '
                      'queue them with `queue-processor enqueue % --missing`',
            e.total - e.expanded, t.table_name, quote_ident(t.embedding_column),
            quote_ident(t.schema_name), quote_ident(t.relation_name), t.table_name;
        t := NULL;
    END IF;
    IF t.table_name IS NOT NULL THEN
        EXECUTE format(
            $q$
            INSERT INTO @qs@.embedding_queue AS q
                   (table_name, record_id, embedding_column, content, next_attempt_at, created_at)
            SELECT %L, r.%I::text, %L, c.content, $2, $2
              FROM %I.%I AS r CROSS JOIN LATERAL (SELECT %s AS content) AS c
             WHERE r.%I = ANY($1::%s[]) AND NOT @qs@.embedding_queue_is_blank(c.content)
             ORDER BY r.%I
            ON CONFLICT (table_name, record_id, embedding_column) DO NOTHING
            $q$,
            t.table_name, t.id_column, t.embedding_column, t.schema_name, t.relation_name,
            @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'r'),
            t.id_column, t.id_type::regtype, t.id_column)
        USING keys, e.created_at;
    END IF;
    -- A row whose target was unregistered since is dropped (unregister deletes them too).
    IF t.table_name IS NULL OR e.expanded + cardinality(keys) >= e.total THEN
        DELETE FROM @qs@.embedding_queue_inbox WHERE id = e.id;
    ELSE
        UPDATE @qs@.embedding_queue_inbox SET expanded = expanded + cardinality(keys) WHERE id = e.id;
    END IF;
    RETURN cardinality(keys);
END;
$$;

-- Rows and estimated tokens (4 bytes per token, as elsewhere) of the keys still waiting in the
-- inbox, per target, read from the source rows: what `estimate` adds to the queued items.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_inbox_estimate(
    OUT target_table text, OUT target_column text, OUT items bigint, OUT tokens bigint)
RETURNS SETOF record
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
BEGIN
    FOR t IN SELECT g.* FROM @qs@.embedding_targets AS g
              WHERE EXISTS (SELECT 1 FROM @qs@.embedding_queue_inbox AS i
                             WHERE i.table_name = g.table_name
                               AND i.embedding_column = g.embedding_column)
              ORDER BY g.table_name, g.embedding_column LOOP
        target_table := t.table_name;
        target_column := t.embedding_column;
        EXECUTE format(
            $q$
            SELECT count(*), coalesce(sum(greatest(1, ceil(octet_length(c.content) / 4.0))), 0)
              FROM %I.%I AS r CROSS JOIN LATERAL (SELECT %s AS content) AS c
             WHERE r.%I = ANY(ARRAY(
                       SELECT k FROM @qs@.embedding_queue_inbox AS i,
                              unnest(i.record_ids[i.expanded + 1 :]) AS k
                        WHERE i.table_name = $1 AND i.embedding_column = $2)::%s[])
               AND NOT @qs@.embedding_queue_is_blank(c.content)
            $q$,
            t.schema_name, t.relation_name,
            @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'r'),
            t.id_column, t.id_type::regtype)
        INTO items, tokens
        USING t.table_name, t.embedding_column;
        RETURN NEXT;
    END LOOP;
END;
$$;
