-- functions/20_targets: the target registry's SQL API (unregister, backfill, regenerate) and
-- the content expression the per-target enqueue triggers use; registering a target, which
-- generates those triggers, is in 25_register.sql. See 10_queue.sql for how these files
-- are applied and why every function pins search_path = pg_catalog, pg_temp.
--
-- Every identifier reaching dynamic SQL goes through format('%I') or comes from the catalog;
-- values go through format('%L'); type names go through regtype.

-- The SQL expression that builds a row's content, over a row alias:
--   one column      -> alias.col::text
--   several columns -> concat_ws(E'\n', ...), NULL parts skipped
--   a template      -> 'Title: {title}\nGenre: {genre}' becomes format('Title: %s\nGenre: %s',
--                      alias.title, alias.genre), NULL when every placeholder is blank.
-- Templates use {column}; '%' is literal. The columns were validated by the caller.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_content_sql(columns text[], template text, alias text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rest text := template;
    fmt text := '';
    args text := '';
    nulls text := '';
    open_at int;
    close_at int;
    col text;
BEGIN
    IF template IS NULL THEN
        IF cardinality(columns) = 1 THEN
            RETURN format('%I.%I::text', alias, columns[1]);
        END IF;
        SELECT 'concat_ws(E''\n'', ' || string_agg(format('%I.%I::text', alias, c), ', ') || ')'
          INTO fmt FROM unnest(columns) AS c;
        RETURN fmt;
    END IF;
    LOOP
        open_at := strpos(rest, '{');
        EXIT WHEN open_at = 0;
        fmt := fmt || replace(left(rest, open_at - 1), '%', '%%') || '%s';
        rest := substr(rest, open_at + 1);
        close_at := strpos(rest, '}');
        col := left(rest, close_at - 1);
        rest := substr(rest, close_at + 1);
        args := args || format(', %I.%I::text', alias, col);
        -- Inlined blank test, as in embedding_queue_is_blank (generated code runs with
        -- search_path = pg_catalog and this function does not know the queue's schema).
        nulls := nulls || CASE WHEN nulls = '' THEN '' ELSE ' AND ' END
                       || format('coalesce(ascii(%I.%I::text), 0) IN (0, 9, 10, 11, 12, 13, 32)'
                                 ' AND ltrim(coalesce(%I.%I::text, %L), %L) = %L',
                                 alias, col, alias, col, '', E' \t\n\r\f\v', '');
    END LOOP;
    fmt := fmt || replace(rest, '%', '%%');
    IF nulls = '' THEN
        RAISE EXCEPTION 'content template % names no {column}', quote_literal(template)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN format('CASE WHEN %s THEN NULL ELSE format(%L%s) END', nulls, fmt, args);
END;
$$;

-- The columns a template names, in order, so they can be validated.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_template_columns(template text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rest text := template;
    cols text[] := '{}';
    open_at int;
    close_at int;
BEGIN
    LOOP
        open_at := strpos(rest, '{');
        EXIT WHEN open_at = 0;
        rest := substr(rest, open_at + 1);
        close_at := strpos(rest, '}');
        IF close_at = 0 THEN
            RAISE EXCEPTION 'content template has an unclosed "{": %', quote_literal(template)
                  USING ERRCODE = 'invalid_parameter_value';
        END IF;
        cols := cols || left(rest, close_at - 1);
        rest := substr(rest, close_at + 1);
    END LOOP;
    IF cardinality(cols) = 0 THEN
        RAISE EXCEPTION 'content template % names no {column}', quote_literal(template)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN cols;
END;
$$;

-- The registry row of a target; raises undefined_object when it is not registered.
CREATE OR REPLACE FUNCTION @qs@.embedding_target(p_table_name text, p_embedding_column text)
RETURNS @qs@.embedding_targets
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
BEGIN
    SELECT * INTO t FROM @qs@.embedding_targets
     WHERE table_name = p_table_name AND embedding_column = p_embedding_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no registered target %.%', p_table_name, p_embedding_column
              USING ERRCODE = 'undefined_object';
    END IF;
    RETURN t;
END;
$$;

-- The rows of target t whose stored vector was not written by t's model (issue 13): a
-- vector is stored (the target column is not NULL) and the companion model column holds
-- another model's name, or none. A predicate over alias r for embedding_queue_backfill's
-- 'stale_model' mode and embedding_target_stale_model_count. Raises when t has no model
-- column (nothing records which model wrote a vector) or no model (unbound: nothing to
-- compare with).
CREATE OR REPLACE FUNCTION @qs@.embedding_target_stale_model_filter(t @qs@.embedding_targets)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF t.model_column IS NULL THEN
        RAISE EXCEPTION 'target %.% has no model column: which model wrote a vector is not recorded',
              t.table_name, quote_ident(t.embedding_column)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF t.model IS NULL THEN
        RAISE EXCEPTION 'target %.% is bound to no model (bind it first)',
              t.table_name, quote_ident(t.embedding_column)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN format('r.%I IS NOT NULL AND r.%I IS DISTINCT FROM %L',
                  t.embedding_column, t.model_column, t.model);
END;
$$;

-- How many rows of a target hold a vector of another model than the target's (see
-- embedding_target_stale_model_filter); NULL when that cannot be told (no model column, or
-- the target is unbound). For `status`: one scan of the source table per such target.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_stale_model_count(
    p_table_name text, p_embedding_column text
) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
    n bigint;
BEGIN
    t := @qs@.embedding_target(p_table_name, p_embedding_column);
    IF t.model_column IS NULL OR t.model IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT count(*) FROM %I.%I AS r WHERE %s', t.schema_name, t.relation_name,
                   @qs@.embedding_target_stale_model_filter(t))
       INTO n;
    RETURN n;
END;
$$;

-- Bind a target to a model (and, when given, its dimensions): from now on only workers
-- embedding with that model claim its items. Returns the model it was bound to before.
-- Vectors already stored are not touched: `enqueue --stale-model` re-embeds those written
-- by another model (when the target has a model column), `reembed` switches with no downtime.
CREATE OR REPLACE FUNCTION @qs@.embedding_bind_target(
    p_table_name text, p_embedding_column text, p_model text, p_dimensions integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
BEGIN
    t := @qs@.embedding_target(p_table_name, p_embedding_column);
    IF p_model IS NULL OR p_model = '' THEN
        RAISE EXCEPTION 'a target is bound to a model name, not %', quote_nullable(p_model)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_dimensions IS NOT NULL AND t.dimensions IS NOT NULL AND p_dimensions <> t.dimensions
       AND t.column_type IN ('vector', 'halfvec') THEN
        RAISE EXCEPTION 'column %.% holds % dimensions but % were requested',
              t.table_name, quote_ident(t.embedding_column), t.dimensions, p_dimensions
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE @qs@.embedding_targets AS r
       SET model = p_model, dimensions = coalesce(p_dimensions, r.dimensions), updated_at = now()
     WHERE r.table_name = t.table_name AND r.embedding_column = t.embedding_column;
    RETURN t.model;
END;
$$;

-- Queue rows of a registered target: 'missing' (target column NULL), 'all' (re-embed every
-- row, e.g. after a model change) or the given ids. Returns how many rows were queued.
-- Rows already queued go back to pending with their current content. Rows are queued in key
-- order, the order the enqueue triggers use, so a backfill running next to multi-row
-- application writes takes queue row locks in the same order and cannot deadlock with them.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_backfill(
    p_table_name text,
    p_embedding_column text,
    p_mode text DEFAULT 'missing',
    p_ids text[] DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
    queue regclass := '@qs@.embedding_queue'::regclass;
    filter text;
    n bigint;
BEGIN
    t := @qs@.embedding_target(p_table_name, p_embedding_column);
    filter := CASE p_mode
        WHEN 'missing' THEN @qs@.embedding_target_missing_filter(t)
        WHEN 'all' THEN 'true'
        -- The key type through regtype: only a real type name can reach the statement.
        WHEN 'ids' THEN format('r.%I = ANY($1::%s[])', t.id_column, t.id_type::regtype)
        WHEN 'stale_model' THEN @qs@.embedding_target_stale_model_filter(t)
    END;
    IF filter IS NULL THEN
        RAISE EXCEPTION 'backfill mode must be missing, all or ids (or stale_model), not %',
              quote_literal(p_mode) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format(
        $q$
        INSERT INTO %s AS q (table_name, record_id, embedding_column, content)
        SELECT %L, r.%I::text, %L, c.content
          FROM %I.%I AS r CROSS JOIN LATERAL (SELECT %s AS content) AS c
         WHERE %s AND r.%I IS NOT NULL AND NOT @qs@.embedding_queue_is_blank(c.content)
         ORDER BY r.%I
        ON CONFLICT (table_name, record_id, embedding_column) DO UPDATE
           SET content = EXCLUDED.content, status = 'pending', attempts = 0,
               error_message = NULL, detail = NULL, next_attempt_at = now(),
               claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
               generation = q.generation + 1, updated_at = now(), processed_at = NULL
        $q$,
        queue, t.table_name, t.id_column, t.embedding_column,
        t.schema_name, t.relation_name,
        @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'r'),
        filter, t.id_column, t.id_column)
    USING p_ids;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

-- Remove a target: its triggers, generated functions, registry row and queue rows.
-- Dropping each generated function with CASCADE drops the triggers that call it wherever
-- they are, even if the table was renamed or moved to another schema since registration.
CREATE OR REPLACE FUNCTION @qs@.embedding_unregister_target(p_table_name text, p_embedding_column text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- DROP ... CASCADE reports each trigger it drops as a NOTICE; keep users' migrations quiet.
SET client_min_messages = warning AS $$
DECLARE
    t @qs@.embedding_targets;
    fn text;
    part text;
    qs text := @qs@.embedding_queue_nsp();
BEGIN
    SELECT * INTO t FROM @qs@.embedding_targets
     WHERE table_name = p_table_name AND embedding_column = p_embedding_column;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    fn := 'embedding_queue_t' || t.trigger_suffix;
    FOREACH part IN ARRAY ARRAY['_ins', '_upd', '_del', '_trunc', '_blank', '_clear'] LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %I.%I() CASCADE', qs, fn || part);
    END LOOP;
    DELETE FROM @qs@.embedding_queue
     WHERE table_name = p_table_name AND embedding_column = p_embedding_column;
    DELETE FROM @qs@.embedding_queue_inbox
     WHERE table_name = p_table_name AND embedding_column = p_embedding_column;
    DELETE FROM @qs@.embedding_targets
     WHERE table_name = p_table_name AND embedding_column = p_embedding_column;
    -- A chunked target's companion table is ours: it goes with the target, its vectors with
    -- it (README: copy or rename it first to keep them; a renamed table is left alone).
    IF t.chunks_table IS NOT NULL THEN
        EXECUTE format('DROP TABLE IF EXISTS %I.%I', t.schema_name, t.chunks_table);
        RETURN true;
    END IF;
    -- What grant-worker gave worker roles on this target goes with it: UPDATE of its columns,
    -- and SELECT of the key unless another target of the same table still reads it.
    PERFORM @qs@.embedding_revoke_target_grants(t);
    RETURN true;
END;
$$;

-- The roles grant-worker has made workers: those named by a worker policy on the queue
-- (embedding_grant_worker creates one per role; 0006_lockdown gave one to each role the
-- previous version's grant-worker had granted).
CREATE OR REPLACE FUNCTION @qs@.embedding_worker_roles() RETURNS SETOF regrole
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT r.oid::regrole
      FROM pg_roles AS r
     WHERE r.oid IN (SELECT unnest(p.polroles) FROM pg_policy AS p
                      WHERE p.polrelid = '@qs@.embedding_queue'::regclass
                        AND p.polname LIKE 'embedding\_worker\_%')
     ORDER BY r.rolname;
END;

-- Take back from every worker role what grant-worker granted it on target t's table.
CREATE OR REPLACE FUNCTION @qs@.embedding_revoke_target_grants(t @qs@.embedding_targets) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r regrole;
    rel text := format('%I.%I', t.schema_name, t.relation_name);
BEGIN
    IF to_regclass(rel) IS NULL THEN
        RETURN;  -- the table is gone, and its privileges with it
    END IF;
    FOR r IN SELECT @qs@.embedding_worker_roles() LOOP
        EXECUTE format('REVOKE UPDATE (%s) ON %s FROM %s',
                       concat_ws(', ', quote_ident(t.embedding_column),
                                 quote_ident(t.model_column), quote_ident(t.generated_at_column)),
                       rel, r);
        IF NOT EXISTS (SELECT 1 FROM @qs@.embedding_targets AS o
                        WHERE (o.schema_name, o.relation_name) = (t.schema_name, t.relation_name)
                          AND o.id_column = t.id_column) THEN
            EXECUTE format('REVOKE SELECT (%I) ON %s FROM %s', t.id_column, rel, r);
        END IF;
    END LOOP;
END;
$$;

-- Regenerate every registered target's trigger functions and triggers from its registry row
-- (migrate calls this whenever these files change, so a database registered by an earlier
-- version runs the current trigger code). A target whose table has been dropped is skipped
-- with a warning. Returns how many targets were regenerated.
CREATE OR REPLACE FUNCTION @qs@.embedding_regenerate_targets() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
    rel regclass;
    n integer := 0;
BEGIN
    FOR t IN SELECT * FROM @qs@.embedding_targets ORDER BY table_name, embedding_column LOOP
        rel := to_regclass(format('%I.%I', t.schema_name, t.relation_name));
        IF rel IS NULL THEN
            RAISE WARNING 'registered target %.% has no table %.% any more; unregister it',
                t.table_name, quote_ident(t.embedding_column),
                quote_ident(t.schema_name), quote_ident(t.relation_name);
            CONTINUE;
        END IF;
        IF t.chunks_table IS NOT NULL THEN
            PERFORM @qs@.embedding_register_chunked_target(
                rel, t.embedding_column,
                p_content_columns => CASE WHEN t.content_template IS NULL THEN t.content_columns END,
                p_template => t.content_template, p_id_column => t.id_column, p_model => t.model,
                p_dimensions => t.dimensions, p_chunk_tokens => t.chunk_tokens,
                p_chunk_overlap => t.chunk_overlap, p_max_chunks => t.max_chunks);
            n := n + 1;
            CONTINUE;
        END IF;
        PERFORM @qs@.embedding_register_target(
            rel, t.embedding_column,
            p_content_columns => CASE WHEN t.content_template IS NULL THEN t.content_columns END,
            p_template => t.content_template, p_id_column => t.id_column, p_model => t.model,
            p_dimensions => t.dimensions, p_model_column => t.model_column,
            p_generated_at_column => t.generated_at_column);
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;
