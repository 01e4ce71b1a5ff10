-- functions/25_register: registering a target (embedding_register_target and its steps)
-- and the generator of the per-target enqueue triggers. See 10_queue.sql for how these files
-- are applied and why every function pins search_path = pg_catalog, pg_temp; the content
-- expression and embedding_queue_backfill it uses are in 20_targets.sql.
--
-- Every identifier reaching dynamic SQL goes through format('%I') or comes from the catalog;
-- values go through format('%L'); type names go through regtype.

-- Registering a target ------------------------------------------------------------------
--
-- embedding_register_target (at the end of this section) reads as the steps it takes; each
-- step is a function below, all of them working on the registry row being built (t, of type
-- embedding_targets): the check_* functions validate one part of the request and fill in
-- that part of the row, in the order the errors are reported; the create_* functions
-- generate the trigger functions and (re)create the triggers from the complete row;
-- embedding_target_store records it. None of them is SECURITY DEFINER (only the generated
-- enqueue trigger functions are), and every one is made private by migrate
-- (embedding_refresh_installed) like every other function of ours.

-- Check step 1, the table: fills t.schema_name, t.relation_name and t.table_name, the label
-- queue rows carry (the bare name in schema public, schema.name elsewhere). Raises
-- wrong_object_type for anything but a table or a partitioned table.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_check_table(t @qs@.embedding_targets, p_table regclass)
RETURNS @qs@.embedding_targets
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    relkind "char";
BEGIN
    SELECT n.nspname, cl.relname, cl.relkind INTO t.schema_name, t.relation_name, relkind
      FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
     WHERE cl.oid = p_table;
    IF relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    t.table_name := CASE WHEN t.schema_name = 'public' THEN t.relation_name
                         ELSE t.schema_name || '.' || t.relation_name END;
    RETURN t;
END;
$$;

-- Check step 2, the target column t.embedding_column: fills t.column_type (vector, halfvec,
-- real[], double precision[], jsonb or bytea) and t.dimensions (p_dimensions, or a vector
-- column's own typmod, which p_dimensions may not contradict).
CREATE OR REPLACE FUNCTION @qs@.embedding_target_check_column(
    t @qs@.embedding_targets, p_table regclass, p_dimensions integer
) RETURNS @qs@.embedding_targets
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    typmod int;
BEGIN
    SELECT CASE ty.typname
               WHEN 'vector' THEN 'vector'
               WHEN 'halfvec' THEN 'halfvec'
               WHEN '_float4' THEN 'real[]'
               WHEN '_float8' THEN 'double precision[]'
               WHEN 'jsonb' THEN 'jsonb'
               WHEN 'bytea' THEN 'bytea'
           END,
           a.atttypmod
      INTO t.column_type, typmod
      FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
     WHERE a.attrelid = p_table AND a.attname = t.embedding_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % has no column %', t.table_name, quote_ident(t.embedding_column)
              USING ERRCODE = 'undefined_column';
    END IF;
    IF t.column_type IS NULL THEN
        RAISE EXCEPTION 'column %.% has type %; supported: vector, halfvec, real[], double precision[], jsonb, bytea',
            t.table_name, quote_ident(t.embedding_column),
            (SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = p_table AND attname = t.embedding_column)
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    t.dimensions := p_dimensions;
    IF t.column_type IN ('vector', 'halfvec') AND typmod > 0 THEN
        IF p_dimensions IS NOT NULL AND p_dimensions <> typmod THEN
            RAISE EXCEPTION 'column %.% holds % dimensions but % were requested',
                t.table_name, quote_ident(t.embedding_column), typmod, p_dimensions
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        t.dimensions := typmod;
    END IF;
    RETURN t;
END;
$$;

-- Check step 3, the key: fills t.id_column (p_id_column, which needs a single-column unique
-- index without predicate or expression, or else the single-column primary key) and
-- t.id_type (one of the types the worker can parse).
CREATE OR REPLACE FUNCTION @qs@.embedding_target_check_key(
    t @qs@.embedding_targets, p_table regclass, p_id_column text
) RETURNS @qs@.embedding_targets
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    t.id_column := p_id_column;
    IF t.id_column IS NULL THEN
        SELECT a.attname INTO t.id_column
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = p_table AND i.indisprimary AND i.indnkeyatts = 1;
        IF t.id_column IS NULL THEN
            RAISE EXCEPTION 'table % has no single-column primary key; pass p_id_column', t.table_name
                  USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = p_table AND i.indisunique AND i.indnkeyatts = 1
           AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = t.id_column) THEN
        RAISE EXCEPTION 'column %.% is not unique (no single-column unique index)',
              t.table_name, quote_ident(t.id_column)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT format_type(a.atttypid, NULL) INTO t.id_type
      FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = t.id_column;
    IF t.id_type NOT IN ('smallint', 'integer', 'bigint', 'uuid', 'text', 'character varying') THEN
        RAISE EXCEPTION 'key column %.% has type %; supported: smallint, integer, bigint, uuid, text, varchar',
            t.table_name, quote_ident(t.id_column), t.id_type USING ERRCODE = 'datatype_mismatch';
    END IF;
    RETURN t;
END;
$$;

-- Check step 4, the content: fills t.content_columns from p_content_columns or from the
-- columns t.content_template names (exactly one of the two is given), and checks that they
-- and the companion columns t.model_column and t.generated_at_column exist. Content from a
-- virtual generated column (PostgreSQL 18) is refused: it reads as NULL in transition
-- tables, so it would never be seen. (A stored one is fine; see
-- embedding_target_create_clear_functions.)
CREATE OR REPLACE FUNCTION @qs@.embedding_target_check_content(
    t @qs@.embedding_targets, p_table regclass, p_content_columns text[]
) RETURNS @qs@.embedding_targets
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c text;
BEGIN
    IF (p_content_columns IS NULL) = (t.content_template IS NULL) THEN
        RAISE EXCEPTION 'pass exactly one of p_content_columns or p_template'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    t.content_columns := COALESCE(p_content_columns,
                                  @qs@.embedding_queue_template_columns(t.content_template));
    IF cardinality(t.content_columns) = 0 OR array_position(t.content_columns, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'content needs at least one column, and no NULL column names'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH c IN ARRAY t.content_columns || ARRAY[t.model_column, t.generated_at_column] LOOP
        IF c IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_attribute
             WHERE attrelid = p_table AND attname = c AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'table % has no column %', t.table_name, quote_ident(c)
                  USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = p_table AND attname = ANY (t.content_columns)
                  AND attgenerated = 'v') THEN
        RAISE EXCEPTION 'table % builds content from a virtual generated column; make it STORED',
            t.table_name USING ERRCODE = 'feature_not_supported';
    END IF;
    RETURN t;
END;
$$;

-- Check step 5, the label: two tables may not share one ('a.b' is both table b in schema a
-- and table "a.b" in public): their queue rows would be indistinguishable, and they would
-- share the generated functions, so registering the second would rewire the first's
-- triggers. Re-registering the same table is fine.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_check_label(t @qs@.embedding_targets)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    previous @qs@.embedding_targets;
BEGIN
    SELECT * INTO previous FROM @qs@.embedding_targets AS r
     WHERE r.table_name = t.table_name AND r.embedding_column = t.embedding_column;
    IF FOUND AND (previous.schema_name, previous.relation_name)
                 IS DISTINCT FROM (t.schema_name, t.relation_name) THEN
        RAISE EXCEPTION 'target %.% is already registered for table %.%',
            t.table_name, quote_ident(t.embedding_column),
            quote_ident(previous.schema_name), quote_ident(previous.relation_name)
            USING ERRCODE = 'duplicate_object';
    END IF;
END;
$$;

-- The statement of the generated insert and update functions that queues the rows of their
-- CTE `changed` (id, content) for target t, ordered by p_order_by (an ORDER BY or nothing).
-- Re-pending resets everything a claim or an earlier failure left behind; bumping
-- generation and clearing claim_token is what makes an in-flight claim stale.
-- A row whose key is NULL (a nullable unique p_id_column) cannot be addressed: skip it.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_upsert_sql(t @qs@.embedding_targets, p_order_by text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qs text := @qs@.embedding_queue_nsp();
BEGIN
    -- Generated functions run with search_path = pg_catalog: qualify our objects.
    RETURN format($q$
        INSERT INTO %s AS q (table_name, record_id, embedding_column, content)
        SELECT %L, ch.id::text, %L, ch.content FROM changed AS ch
         WHERE ch.id IS NOT NULL AND NOT %s(ch.content)%s
        ON CONFLICT (table_name, record_id, embedding_column) DO UPDATE
           SET content = EXCLUDED.content, status = 'pending', attempts = 0,
               error_message = NULL, detail = NULL, next_attempt_at = now(),
               claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
               generation = q.generation + 1, updated_at = now(), processed_at = NULL
        $q$,
        format('%I.embedding_queue', qs), t.table_name, t.embedding_column,
        format('%I.embedding_queue_is_blank', qs), p_order_by);
END;
$$;

-- The statements that follow the queueing statement in the generated insert and update
-- functions: wake waiting workers only when something was queued (see
-- embedding_queue_notify in 0001: most UPDATEs of a source table queue nothing).
CREATE OR REPLACE FUNCTION @qs@.embedding_target_notify_sql() RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN $n$
            GET DIAGNOSTICS queued = ROW_COUNT;
            IF queued > 0 THEN
                PERFORM pg_notify('embedding_queue', '');
            END IF;
    $n$;
END;
$$;

-- Generate target t's AFTER INSERT trigger function, embedding_queue_t<suffix>_ins.
-- Statement-level triggers with transition tables: one queue statement per source
-- statement, so a 100k-row bulk insert costs one set-based INSERT, not 100k calls.
-- SECURITY DEFINER lets application roles write source tables without any grant on the
-- queue. What keeps that safe: search_path = pg_catalog, pg_temp (temp last; our objects
-- are all qualified), and no role but the owner may execute them
-- (embedding_target_create_functions).
-- Inserted rows are not sorted: a new source row is invisible to every other transaction
-- until commit, so nothing else can hold (or wait for) its queue row, and sorting a
-- bulk insert's rows, content included, spills to disk.
-- A bulk insert (at least queue_processor.bulk_rows rows, default 1000; 0 turns this
-- off) records only its keys, as one embedding_queue_inbox row, instead of one indexed
-- queue row per source row: that keeps a 100k-row load within ~1.1x of the same load
-- without triggers, where per-row queue rows cost ~3x. Workers turn inbox rows into
-- queue rows before they claim (embedding_queue_expand, 0005), reading the content then.
-- Inserted keys are new, so no claim can be in flight for them: deferring their queue
-- rows cannot let a stale write through. The LIMIT stops counting at the threshold.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_create_insert_function(t @qs@.embedding_targets)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qs text := @qs@.embedding_queue_nsp();
    fn text := 'embedding_queue_t' || t.trigger_suffix;
    idcol text := t.id_column;
BEGIN
    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        DECLARE
            queued bigint;
            setting text := current_setting('queue_processor.bulk_rows', true);
            bulk_rows bigint := CASE WHEN setting ~ '^[0-9]{1,9}$' THEN setting::bigint
                                     ELSE 1000 END;
        BEGIN
            IF bulk_rows > 0 AND (SELECT count(*) FROM (SELECT FROM new_rows LIMIT bulk_rows) AS s)
                                 >= bulk_rows THEN
                -- One pass over the (large, likely spilled) transition table: the keys.
                WITH agg AS (
                    SELECT array_agg(n.%I::text) FILTER (WHERE n.%I IS NOT NULL) AS ids,
                           count(n.%I) AS total
                      FROM new_rows AS n
                ), ins AS (
                    INSERT INTO %I.embedding_queue_inbox
                           (table_name, embedding_column, record_ids, total)
                    SELECT %L, %L, ids, total FROM agg WHERE total > 0
                )
                SELECT total INTO queued FROM agg;
                IF queued > 0 THEN
                    PERFORM pg_notify('embedding_queue', '');
                END IF;
            ELSE
                WITH changed AS (SELECT n.%I AS id, %s AS content FROM new_rows AS n)
                %s;
                %s
            END IF;
            RETURN NULL;
        END;
        $body$
        $f$, qs, fn || '_ins', idcol, idcol, idcol, qs, t.table_name, t.embedding_column,
        idcol, @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'n'::text),
        @qs@.embedding_target_upsert_sql(t, ''::text), @qs@.embedding_target_notify_sql());
END;
$$;

-- Generate target t's AFTER UPDATE trigger function, embedding_queue_t<suffix>_upd
-- (SECURITY DEFINER, as the insert function).
-- Only rows whose content expression changed are queued; a key change counts as a
-- delete of the old key plus an insert of the new one. Content that became blank
-- removes the queue row (its embedding is cleared by the BEFORE trigger _blank).
-- Updated rows are queued in key order, the order backfills use: the source rows are
-- locked by this statement already, but a concurrent backfill is not, and locking queue
-- rows in one order keeps the two from deadlocking.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_create_update_function(t @qs@.embedding_targets)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qs text := @qs@.embedding_queue_nsp();
    fn text := 'embedding_queue_t' || t.trigger_suffix;
    idcol text := t.id_column;
    expr_n text := @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'n'::text);
    expr_o text := @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'o'::text);
BEGIN
    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        DECLARE
            queued bigint;
        BEGIN
            -- The processor's own vector writes change no content: nothing to queue.
            IF current_setting('queue_processor.worker_write', true) = 'on' THEN
                RETURN NULL;
            END IF;
            -- = ANY(ARRAY(...)) probes the unique index once per key whatever the planner
            -- believes about the queue's size (a join could scan every queue row).
            DELETE FROM %s AS q
             WHERE q.table_name = %L AND q.embedding_column = %L
               AND q.record_id = ANY(ARRAY(
                   SELECT o.%I::text FROM old_rows AS o
                    WHERE NOT EXISTS (SELECT 1 FROM new_rows AS n WHERE n.%I = o.%I)
                   UNION ALL
                   SELECT n.%I::text FROM new_rows AS n
                    WHERE %s(%s)));
            %s
            WITH changed AS (
                SELECT n.%I AS id, %s AS content
                  FROM new_rows AS n LEFT JOIN old_rows AS o ON o.%I = n.%I
                 WHERE o.%I IS NULL OR (%s) IS DISTINCT FROM (%s))
            %s;
            %s
            RETURN NULL;
        END;
        $body$
        $f$, qs, fn || '_upd',
        format('%I.embedding_queue', qs), t.table_name, t.embedding_column,
        idcol, idcol, idcol, idcol, format('%I.embedding_queue_is_blank', qs), expr_n,
        -- A chunked target's chunks of the same records go too (after the queue rows: the
        -- worker's lock order, see 28_chunks.sql).
        @qs@.embedding_chunks_delete_sql(t, format(
            'ARRAY(SELECT o.%I FROM old_rows AS o'
            ' WHERE NOT EXISTS (SELECT 1 FROM new_rows AS n WHERE n.%I = o.%I)'
            ' UNION ALL SELECT n.%I FROM new_rows AS n WHERE %s(%s))',
            idcol, idcol, idcol, idcol, format('%I.embedding_queue_is_blank', qs), expr_n)),
        idcol, expr_n, idcol, idcol, idcol, expr_n, expr_o,
        @qs@.embedding_target_upsert_sql(t, E'\n         ORDER BY ch.id'::text),
        @qs@.embedding_target_notify_sql());
END;
$$;

-- Generate target t's AFTER DELETE and AFTER TRUNCATE trigger functions,
-- embedding_queue_t<suffix>_del and _trunc (SECURITY DEFINER, as the insert function):
-- deleted rows take their queue rows with them; a truncate takes the target's queue rows
-- and its bulk inserts waiting in the inbox.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_create_delete_functions(t @qs@.embedding_targets)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qs text := @qs@.embedding_queue_nsp();
    fn text := 'embedding_queue_t' || t.trigger_suffix;
    queue text := format('%I.embedding_queue', qs);
BEGIN
    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        BEGIN
            DELETE FROM %s AS q USING old_rows AS o
             WHERE q.table_name = %L AND q.embedding_column = %L AND q.record_id = o.%I::text;
            %s
            RETURN NULL;
        END;
        $body$
        $f$, qs, fn || '_del', queue, t.table_name, t.embedding_column, t.id_column,
        @qs@.embedding_chunks_delete_sql(t, format('ARRAY(SELECT o.%I FROM old_rows AS o)',
                                                   t.id_column)));

    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        BEGIN
            DELETE FROM %s AS q WHERE q.table_name = %L AND q.embedding_column = %L;
            DELETE FROM %I.embedding_queue_inbox AS i
             WHERE i.table_name = %L AND i.embedding_column = %L;
            %s
            RETURN NULL;
        END;
        $body$
        $f$, qs, fn || '_trunc', queue, t.table_name, t.embedding_column,
        qs, t.table_name, t.embedding_column, @qs@.embedding_chunks_truncate_sql(t));
END;
$$;

-- Generate target t's functions that clear a stale embedding (and the companion columns)
-- of a row whose content is blank, embedding_queue_t<suffix>_blank and _clear. Neither is
-- SECURITY DEFINER: both write the source row, and what they fire must run as the writer.
--   _blank, a BEFORE UPDATE row trigger: content made blank by an UPDATE clears the columns
--     in the row itself (no second UPDATE), unless the content is a generated column.
--   _clear, an AFTER ROW trigger: stored values of an inserted row whose content is blank
--     (and, when the content is a stored generated column, of an updated one: a BEFORE
--     trigger cannot see it, it is computed after them) are cleared by a second UPDATE,
--     whose WHEN clause (embedding_target_create_triggers) picks those rows only. A row
--     trigger, not a BEFORE INSERT one, since any BEFORE INSERT row trigger costs COPY its
--     multi-row insert batching; and NOT SECURITY DEFINER: that UPDATE fires the table
--     owner's own triggers, which must run as the role that wrote the row, never as the
--     queue's owner. A role that may not update those columns wrote the stale values
--     itself, in this very statement: they are left as written.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_create_clear_functions(t @qs@.embedding_targets)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qs text := @qs@.embedding_queue_nsp();
    fn text := 'embedding_queue_t' || t.trigger_suffix;
    clear_sets text;
    clear_update text;
    clear_allowed text;
BEGIN
    clear_sets := format('NEW.%I := NULL;', t.embedding_column)
        || CASE WHEN t.model_column IS NULL THEN ''
                ELSE format(' NEW.%I := NULL;', t.model_column) END
        || CASE WHEN t.generated_at_column IS NULL THEN ''
                ELSE format(' NEW.%I := NULL;', t.generated_at_column) END;
    SELECT string_agg(format('%I = NULL', x), ', '),
           string_agg(format('pg_catalog.has_column_privilege(TG_RELID, %L, %L)', x, 'UPDATE'),
                      ' AND ')
      INTO clear_update, clear_allowed
      FROM unnest(ARRAY[t.embedding_column, t.model_column, t.generated_at_column]) AS x
     WHERE x IS NOT NULL;

    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            %s
            RETURN NEW;
        END;
        $body$
        $f$, qs, fn || '_blank', clear_sets);

    -- The second UPDATE, addressed through TG_TABLE_SCHEMA/TG_TABLE_NAME so that a renamed
    -- table is still found. No SET search_path: the table owner's triggers that this UPDATE
    -- fires see the writer's own session, as they would for the writer's own UPDATE;
    -- built-ins are named with pg_catalog.
    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            IF %s THEN
                EXECUTE pg_catalog.format(%L, TG_TABLE_SCHEMA, TG_TABLE_NAME) USING NEW.%I;
            END IF;
            RETURN NULL;
        END;
        $body$
        $f$, qs, fn || '_clear', clear_allowed,
        format('UPDATE %%I.%%I SET %s WHERE %s = $1',
               replace(clear_update, '%', '%%'), replace(quote_ident(t.id_column), '%', '%%')),
        t.id_column);
END;
$$;

-- Generate every trigger function of target t (CREATE OR REPLACE: re-registering replaces
-- them in place) and make them private: they are for t's triggers only, so no role may call
-- them or attach them to a table of its own (CREATE TRIGGER needs EXECUTE; firing a trigger
-- does not).
CREATE OR REPLACE FUNCTION @qs@.embedding_target_create_functions(t @qs@.embedding_targets)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qs text := @qs@.embedding_queue_nsp();
    fn text := 'embedding_queue_t' || t.trigger_suffix;
    part text;
BEGIN
    PERFORM @qs@.embedding_target_create_insert_function(t);
    PERFORM @qs@.embedding_target_create_update_function(t);
    PERFORM @qs@.embedding_target_create_delete_functions(t);
    -- A chunked target stores nothing in the source row: nothing there to clear (its chunks
    -- go with blank content through the update function).
    IF t.chunks_table IS NULL THEN
        PERFORM @qs@.embedding_target_create_clear_functions(t);
    ELSE
        EXECUTE format('DROP FUNCTION IF EXISTS %I.%I(), %I.%I()',
                       qs, fn || '_blank', qs, fn || '_clear');
    END IF;
    FOREACH part IN ARRAY ARRAY['_ins', '_upd', '_del', '_trunc', '_blank', '_clear'] LOOP
        CONTINUE WHEN to_regprocedure(format('%I.%I()', qs, fn || part)) IS NULL;
        PERFORM @qs@.embedding_queue_make_private(format('%I.%I()', qs, fn || part)::regprocedure);
    END LOOP;
END;
$$;

-- (Re)create target t's six triggers on p_table (checking the catalog rather than DROP
-- TRIGGER IF EXISTS, whose notices would clutter the output of users' migrations). The
-- blank-content triggers fire only for rows whose content is blank while the target or a
-- companion column is still set; their WHEN clauses are evaluated without a function call,
-- so rows with content (or with nothing stored) pay next to nothing. Content from a stored
-- generated column is computed after BEFORE triggers, so then _clear also covers updates
-- and _blank is not created.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_create_triggers(
    t @qs@.embedding_targets, p_table regclass
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qs text := @qs@.embedding_queue_nsp();
    fn text := 'embedding_queue_t' || t.trigger_suffix;
    blank text := format('%I.embedding_queue_is_blank', qs);
    expr_new text := @qs@.embedding_queue_content_sql(t.content_columns, t.content_template,
                                                      'new'::text);
    part text;
    stored_cols text;
    generated_content boolean;
BEGIN
    generated_content := EXISTS (
        SELECT 1 FROM pg_attribute
         WHERE attrelid = p_table AND attname = ANY (t.content_columns) AND attgenerated <> '');
    -- The columns the blank triggers clear, for their WHEN clause: any of them still set.
    SELECT string_agg(format('NEW.%I IS NOT NULL', x), ' OR ')
      INTO stored_cols
      FROM unnest(ARRAY[t.embedding_column, t.model_column, t.generated_at_column]) AS x
     WHERE x IS NOT NULL;

    FOREACH part IN ARRAY ARRAY['_ins', '_upd', '_del', '_trunc', '_blank', '_clear'] LOOP
        IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = fn || part) THEN
            EXECUTE format('DROP TRIGGER %I ON %s', fn || part, p_table);
        END IF;
    END LOOP;
    EXECUTE format(
        'CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
        'FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', fn || '_ins', p_table, qs, fn || '_ins');
    EXECUTE format(
        'CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
        'FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', fn || '_upd', p_table, qs, fn || '_upd');
    EXECUTE format(
        'CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
        'FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', fn || '_del', p_table, qs, fn || '_del');
    EXECUTE format(
        'CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()',
        fn || '_trunc', p_table, qs, fn || '_trunc');
    IF t.chunks_table IS NOT NULL THEN
        RETURN;  -- no blank-content triggers (see embedding_target_create_functions)
    END IF;
    IF NOT generated_content THEN
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE UPDATE ON %s FOR EACH ROW '
            'WHEN ((%s) AND %s(%s)) EXECUTE FUNCTION %I.%I()',
            fn || '_blank', p_table, stored_cols, blank, expr_new, qs, fn || '_blank');
    END IF;
    EXECUTE format(
        'CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW '
        'WHEN ((%s) AND %s(%s)) EXECUTE FUNCTION %I.%I()',
        fn || '_clear', CASE WHEN generated_content THEN 'INSERT OR UPDATE' ELSE 'INSERT' END,
        p_table, stored_cols, blank, expr_new, qs, fn || '_clear');
END;
$$;

-- Record target t in the registry (a re-registration updates its row).
CREATE OR REPLACE FUNCTION @qs@.embedding_target_store(t @qs@.embedding_targets) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO @qs@.embedding_targets (
        table_name, embedding_column, schema_name, relation_name, id_column, id_type,
        content_columns, content_template, column_type, dimensions, model, model_column,
        generated_at_column, trigger_suffix)
    VALUES (t.table_name, t.embedding_column, t.schema_name, t.relation_name, t.id_column,
            t.id_type, t.content_columns, t.content_template, t.column_type, t.dimensions,
            t.model, t.model_column, t.generated_at_column, t.trigger_suffix)
    ON CONFLICT (table_name, embedding_column) DO UPDATE
       SET schema_name = EXCLUDED.schema_name, relation_name = EXCLUDED.relation_name,
           id_column = EXCLUDED.id_column, id_type = EXCLUDED.id_type,
           content_columns = EXCLUDED.content_columns, content_template = EXCLUDED.content_template,
           column_type = EXCLUDED.column_type, dimensions = EXCLUDED.dimensions,
           model = EXCLUDED.model, model_column = EXCLUDED.model_column,
           generated_at_column = EXCLUDED.generated_at_column, updated_at = now();
END;
$$;

-- Register (or re-register) a target and install its triggers on the source table.
--   p_table            the source table, e.g. 'sessions' or '"My Schema"."My Table"'
--   p_embedding_column the target column: vector, halfvec, real[], double precision[], jsonb
--                      or bytea (little-endian float32)
--   p_content_columns  one or more text columns whose values form the content, or
--   p_template         'Title: {title}\nGenre: {genre}' (exactly one of the two)
--   p_id_column        defaults to the single-column primary key; must be unique
--   p_model, p_dimensions optional; dimensions default to the vector column's typmod
--   p_model_column, p_generated_at_column optional companion columns the processor fills
--   p_backfill         'none', 'missing' or 'all': queue existing rows now
-- Returns the table_name label queue rows will carry. Re-registering replaces the triggers in
-- the same transaction, so no write goes unqueued in between.
CREATE OR REPLACE FUNCTION @qs@.embedding_register_target(
    p_table regclass,
    p_embedding_column text,
    p_content_columns text[] DEFAULT NULL,
    p_template text DEFAULT NULL,
    p_id_column text DEFAULT NULL,
    p_model text DEFAULT NULL,
    p_dimensions integer DEFAULT NULL,
    p_model_column text DEFAULT NULL,
    p_generated_at_column text DEFAULT NULL,
    p_backfill text DEFAULT 'none'
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- The registry row this registration will store, filled in step by step.
    t @qs@.embedding_targets;
BEGIN
    t.embedding_column := p_embedding_column;
    t.content_template := p_template;
    t.model := p_model;
    t.model_column := p_model_column;
    t.generated_at_column := p_generated_at_column;
    -- Check the request (the first problem found is the one reported).
    t := @qs@.embedding_target_check_table(t, p_table);
    t := @qs@.embedding_target_check_column(t, p_table, p_dimensions);
    t := @qs@.embedding_target_check_key(t, p_table, p_id_column);
    t := @qs@.embedding_target_check_content(t, p_table, p_content_columns);
    IF p_backfill IS NULL OR p_backfill NOT IN ('none', 'missing', 'all') THEN
        RAISE EXCEPTION 'p_backfill must be none, missing or all, not %', quote_literal(p_backfill)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM @qs@.embedding_target_check_label(t);
    IF EXISTS (SELECT 1 FROM @qs@.embedding_targets AS r
                WHERE r.table_name = t.table_name AND r.embedding_column = t.embedding_column
                  AND r.chunks_table IS NOT NULL) THEN
        RAISE EXCEPTION 'target %.% is registered as a chunked target; unregister it first',
              t.table_name, quote_ident(t.embedding_column) USING ERRCODE = 'duplicate_object';
    END IF;
    -- Names the generated functions and triggers: embedding_queue_t<suffix>_<part>.
    t.trigger_suffix := substr(md5(t.table_name || '/' || t.embedding_column), 1, 12);

    PERFORM @qs@.embedding_target_create_functions(t);
    PERFORM @qs@.embedding_target_create_triggers(t, p_table);
    PERFORM @qs@.embedding_target_store(t);
    IF p_backfill <> 'none' THEN
        PERFORM @qs@.embedding_queue_backfill(t.table_name, t.embedding_column, p_backfill);
    END IF;
    RETURN t.table_name;
END;
$$;
