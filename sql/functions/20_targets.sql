-- functions/20_targets: the target registry's SQL API (register, unregister, backfill) and
-- the generator of the per-target enqueue triggers. See 10_queue.sql for how these files
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
        WHEN 'missing' THEN format('r.%I IS NULL', t.embedding_column)
        WHEN 'all' THEN 'true'
        -- The key type through regtype: only a real type name can reach the statement.
        WHEN 'ids' THEN format('r.%I = ANY($1::%s[])', t.id_column, t.id_type::regtype)
    END;
    IF filter IS NULL THEN
        RAISE EXCEPTION 'backfill mode must be missing, all or ids, not %', quote_literal(p_mode)
              USING ERRCODE = 'invalid_parameter_value';
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
    qs text := @qs@.embedding_queue_nsp();
    -- Generated functions run with search_path = pg_catalog: qualify our objects.
    queue text := format('%I.embedding_queue', qs);
    blank text := format('%I.embedding_queue_is_blank', qs);
    nsp text;
    rel text;
    relkind "char";
    label text;
    kind text;
    typmod int;
    dims int := p_dimensions;
    idcol text := p_id_column;
    idtype text;
    cols text[];
    c text;
    suffix text;
    fn text;
    part text;
    expr_n text;
    expr_o text;
    clear_sets text;
    stored_cols text;
    generated_content boolean;
    clear_update text;
    clear_allowed text;
    upsert text;
    notify text;
    previous @qs@.embedding_targets;
BEGIN
    SELECT n.nspname, cl.relname, cl.relkind INTO nsp, rel, relkind
      FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
     WHERE cl.oid = p_table;
    IF relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    label := CASE WHEN nsp = 'public' THEN rel ELSE nsp || '.' || rel END;

    -- The target column and its kind.
    SELECT CASE t.typname
               WHEN 'vector' THEN 'vector'
               WHEN 'halfvec' THEN 'halfvec'
               WHEN '_float4' THEN 'real[]'
               WHEN '_float8' THEN 'double precision[]'
               WHEN 'jsonb' THEN 'jsonb'
               WHEN 'bytea' THEN 'bytea'
           END,
           a.atttypmod
      INTO kind, typmod
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = p_table AND a.attname = p_embedding_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % has no column %', label, quote_ident(p_embedding_column)
              USING ERRCODE = 'undefined_column';
    END IF;
    IF kind IS NULL THEN
        RAISE EXCEPTION 'column %.% has type %; supported: vector, halfvec, real[], double precision[], jsonb, bytea',
            label, quote_ident(p_embedding_column),
            (SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = p_table AND attname = p_embedding_column)
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF kind IN ('vector', 'halfvec') AND typmod > 0 THEN
        IF dims IS NOT NULL AND dims <> typmod THEN
            RAISE EXCEPTION 'column %.% holds % dimensions but % were requested',
                label, quote_ident(p_embedding_column), typmod, dims
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        dims := typmod;
    END IF;

    -- The key: the single-column primary key unless named; it must be unique.
    IF idcol IS NULL THEN
        SELECT a.attname INTO idcol
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = p_table AND i.indisprimary AND i.indnkeyatts = 1;
        IF idcol IS NULL THEN
            RAISE EXCEPTION 'table % has no single-column primary key; pass p_id_column', label
                  USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = p_table AND i.indisunique AND i.indnkeyatts = 1
           AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = idcol) THEN
        RAISE EXCEPTION 'column %.% is not unique (no single-column unique index)', label, quote_ident(idcol)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT format_type(a.atttypid, NULL) INTO idtype
      FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = idcol;
    IF idtype NOT IN ('smallint', 'integer', 'bigint', 'uuid', 'text', 'character varying') THEN
        RAISE EXCEPTION 'key column %.% has type %; supported: smallint, integer, bigint, uuid, text, varchar',
            label, quote_ident(idcol), idtype USING ERRCODE = 'datatype_mismatch';
    END IF;

    -- Content: columns or a template, never both.
    IF (p_content_columns IS NULL) = (p_template IS NULL) THEN
        RAISE EXCEPTION 'pass exactly one of p_content_columns or p_template'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    cols := COALESCE(p_content_columns, @qs@.embedding_queue_template_columns(p_template));
    IF cardinality(cols) = 0 OR array_position(cols, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'content needs at least one column, and no NULL column names'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH c IN ARRAY cols || ARRAY[p_model_column, p_generated_at_column] LOOP
        IF c IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_attribute
             WHERE attrelid = p_table AND attname = c AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'table % has no column %', label, quote_ident(c)
                  USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;
    -- Content computed by PostgreSQL itself. A virtual column (PostgreSQL 18) reads as NULL
    -- in transition tables, so its content would never be seen: refuse it. A stored one is
    -- fine, but a BEFORE trigger cannot look at it (it is computed after them), so blank
    -- content is then cleared by an AFTER trigger instead (see clear_update).
    IF EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = p_table AND attname = ANY (cols) AND attgenerated = 'v') THEN
        RAISE EXCEPTION 'table % builds content from a virtual generated column; make it STORED',
            label USING ERRCODE = 'feature_not_supported';
    END IF;
    generated_content := EXISTS (
        SELECT 1 FROM pg_attribute
         WHERE attrelid = p_table AND attname = ANY (cols) AND attgenerated <> '');
    IF p_backfill IS NULL OR p_backfill NOT IN ('none', 'missing', 'all') THEN
        RAISE EXCEPTION 'p_backfill must be none, missing or all, not %', quote_literal(p_backfill)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Two tables may not share a label ('a.b' is both table b in schema a and table "a.b" in
    -- public): their queue rows would be indistinguishable, and they would share the
    -- generated functions, so registering the second would rewire the first's triggers.
    SELECT * INTO previous FROM @qs@.embedding_targets
     WHERE table_name = label AND embedding_column = p_embedding_column;
    IF FOUND AND (previous.schema_name, previous.relation_name) IS DISTINCT FROM (nsp, rel) THEN
        RAISE EXCEPTION 'target %.% is already registered for table %.%',
            label, quote_ident(p_embedding_column),
            quote_ident(previous.schema_name), quote_ident(previous.relation_name)
            USING ERRCODE = 'duplicate_object';
    END IF;

    suffix := substr(md5(label || '/' || p_embedding_column), 1, 12);
    fn := 'embedding_queue_t' || suffix;
    expr_n := @qs@.embedding_queue_content_sql(cols, p_template, 'n');
    expr_o := @qs@.embedding_queue_content_sql(cols, p_template, 'o');
    clear_sets := format('NEW.%I := NULL;', p_embedding_column)
        || CASE WHEN p_model_column IS NULL THEN ''
                ELSE format(' NEW.%I := NULL;', p_model_column) END
        || CASE WHEN p_generated_at_column IS NULL THEN ''
                ELSE format(' NEW.%I := NULL;', p_generated_at_column) END;
    -- The columns the blank trigger clears, for its WHEN clause: any of them still set.
    SELECT string_agg(format('NEW.%I IS NOT NULL', x), ' OR ')
      INTO stored_cols
      FROM unnest(ARRAY[p_embedding_column, p_model_column, p_generated_at_column]) AS x
     WHERE x IS NOT NULL;
    -- Clearing after the fact: stored values of an inserted row whose content is blank (and,
    -- when the content is a generated column, of an updated one: a BEFORE trigger cannot see
    -- it) are cleared by a second UPDATE from an AFTER ROW trigger whose WHEN clause picks
    -- those rows only. A row trigger, not a BEFORE INSERT one, since any BEFORE INSERT row
    -- trigger costs COPY its multi-row insert batching; and NOT SECURITY DEFINER: that UPDATE
    -- fires the table owner's own triggers, which must run as the role that wrote the row,
    -- never as the queue's owner. A role that may not update those columns wrote the stale
    -- values itself, in this very statement: they are left as written.
    SELECT string_agg(format('%I = NULL', x), ', '),
           string_agg(format('pg_catalog.has_column_privilege(TG_RELID, %L, %L)', x, 'UPDATE'),
                      ' AND ')
      INTO clear_update, clear_allowed
      FROM unnest(ARRAY[p_embedding_column, p_model_column, p_generated_at_column]) AS x
     WHERE x IS NOT NULL;
    -- Re-pending resets everything a claim or an earlier failure left behind; bumping
    -- generation and clearing claim_token is what makes an in-flight claim stale.
    -- A row whose key is NULL (a nullable unique p_id_column) cannot be addressed: skip it.
    -- The last %s is an ORDER BY or nothing (see the insert trigger).
    upsert := $q$
        INSERT INTO %s AS q (table_name, record_id, embedding_column, content)
        SELECT %L, ch.id::text, %L, ch.content FROM changed AS ch
         WHERE ch.id IS NOT NULL AND NOT %s(ch.content)%s
        ON CONFLICT (table_name, record_id, embedding_column) DO UPDATE
           SET content = EXCLUDED.content, status = 'pending', attempts = 0,
               error_message = NULL, detail = NULL, next_attempt_at = now(),
               claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
               generation = q.generation + 1, updated_at = now(), processed_at = NULL
        $q$;
    -- Wake waiting workers only when something was queued (see embedding_queue_notify in
    -- 0001: most UPDATEs of a source table queue nothing).
    notify := $n$
            GET DIAGNOSTICS queued = ROW_COUNT;
            IF queued > 0 THEN
                PERFORM pg_notify('embedding_queue', '');
            END IF;
    $n$;

    -- Statement-level triggers with transition tables: one queue statement per source
    -- statement, so a 100k-row bulk insert costs one set-based INSERT, not 100k calls.
    -- SECURITY DEFINER lets application roles write source tables without any grant on the
    -- queue. What keeps that safe: search_path = pg_catalog, pg_temp (temp last; our objects
    -- are all qualified), and no role but the owner may execute them (see below).
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
        $f$, qs, fn || '_ins', idcol, idcol, idcol, qs, label, p_embedding_column,
        idcol, expr_n, format(upsert, queue, label, p_embedding_column, blank, ''), notify);

    -- Only rows whose content expression changed are queued; a key change counts as a
    -- delete of the old key plus an insert of the new one. Content that became blank
    -- removes the queue row (its embedding is cleared by the BEFORE trigger below).
    -- Updated rows are queued in key order, the order backfills use: the source rows are
    -- locked by this statement already, but a concurrent backfill is not, and locking queue
    -- rows in one order keeps the two from deadlocking.
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
        queue, label, p_embedding_column, idcol, idcol, idcol, idcol, blank, expr_n,
        idcol, expr_n, idcol, idcol, idcol, expr_n, expr_o,
        format(upsert, queue, label, p_embedding_column, blank, E'\n         ORDER BY ch.id'),
        notify);

    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        BEGIN
            DELETE FROM %s AS q USING old_rows AS o
             WHERE q.table_name = %L AND q.embedding_column = %L AND q.record_id = o.%I::text;
            RETURN NULL;
        END;
        $body$
        $f$, qs, fn || '_del', queue, label, p_embedding_column, idcol);

    EXECUTE format(
        $f$
        CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        BEGIN
            DELETE FROM %s AS q WHERE q.table_name = %L AND q.embedding_column = %L;
            DELETE FROM %I.embedding_queue_inbox AS i
             WHERE i.table_name = %L AND i.embedding_column = %L;
            RETURN NULL;
        END;
        $body$
        $f$, qs, fn || '_trunc', queue, label, p_embedding_column, qs, label, p_embedding_column);

    -- Content made blank by an UPDATE clears the now-stale embedding in the row itself (no
    -- second UPDATE), unless the content is a generated column (see clear_update).
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

    -- The second UPDATE of the clearing AFTER ROW trigger (see clear_update), addressed
    -- through TG_TABLE_SCHEMA/TG_TABLE_NAME so that a renamed table is still found. No SET
    -- search_path: the table owner's triggers that this UPDATE fires see the writer's own
    -- session, as they would for the writer's own UPDATE; built-ins are named with pg_catalog.
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
               replace(clear_update, '%', '%%'), replace(quote_ident(idcol), '%', '%%')),
        idcol);

    -- The generated functions are for these triggers only: no role may call them or attach
    -- them to a table of its own (CREATE TRIGGER needs EXECUTE; firing a trigger does not).
    FOREACH part IN ARRAY ARRAY['_ins', '_upd', '_del', '_trunc', '_blank', '_clear'] LOOP
        PERFORM @qs@.embedding_queue_make_private(format('%I.%I()', qs, fn || part)::regprocedure);
    END LOOP;

    -- Replace the triggers (checking the catalog rather than DROP TRIGGER IF EXISTS, whose
    -- notices would clutter the output of users' migrations).
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
    -- The WHEN clause is evaluated without a function call, so rows with content (or with
    -- nothing stored) pay next to nothing.
    IF NOT generated_content THEN
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE UPDATE ON %s FOR EACH ROW '
            'WHEN ((%s) AND %s(%s)) EXECUTE FUNCTION %I.%I()',
            fn || '_blank', p_table, stored_cols, blank,
            @qs@.embedding_queue_content_sql(cols, p_template, 'new'), qs, fn || '_blank');
    END IF;
    EXECUTE format(
        'CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW '
        'WHEN ((%s) AND %s(%s)) EXECUTE FUNCTION %I.%I()',
        fn || '_clear', CASE WHEN generated_content THEN 'INSERT OR UPDATE' ELSE 'INSERT' END,
        p_table, stored_cols, blank,
        @qs@.embedding_queue_content_sql(cols, p_template, 'new'), qs, fn || '_clear');

    INSERT INTO @qs@.embedding_targets AS t (
        table_name, embedding_column, schema_name, relation_name, id_column, id_type,
        content_columns, content_template, column_type, dimensions, model, model_column,
        generated_at_column, trigger_suffix)
    VALUES (label, p_embedding_column, nsp, rel, idcol, idtype, cols, p_template, kind, dims,
            p_model, p_model_column, p_generated_at_column, suffix)
    ON CONFLICT (table_name, embedding_column) DO UPDATE
       SET schema_name = EXCLUDED.schema_name, relation_name = EXCLUDED.relation_name,
           id_column = EXCLUDED.id_column, id_type = EXCLUDED.id_type,
           content_columns = EXCLUDED.content_columns, content_template = EXCLUDED.content_template,
           column_type = EXCLUDED.column_type, dimensions = EXCLUDED.dimensions,
           model = EXCLUDED.model, model_column = EXCLUDED.model_column,
           generated_at_column = EXCLUDED.generated_at_column, updated_at = now();

    IF p_backfill <> 'none' THEN
        PERFORM @qs@.embedding_queue_backfill(label, p_embedding_column, p_backfill);
    END IF;
    RETURN label;
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
