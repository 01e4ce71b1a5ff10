-- functions/50_reembed: changing a target's model with no downtime (issue 13).
--
--   start     embedding_reembed_start: add the shadow column <column>__next (and shadow
--             companions <companion>__next) of the new model's dimensions, register it as a
--             target of the new model (its triggers queue every later write, so both columns
--             stay current), record the re-embedding. Its rows are queued separately
--             (embedding_queue_backfill 'missing', resumable), so no lock is held meanwhile.
--   switch    embedding_reembed_switch: refused until the shadow is complete; then, in one
--             transaction, the columns swap names (<column> -> <column>__old, <column>__next ->
--             <column>, companions alike), the registry and the queue rows follow, and every
--             claim in flight on either target is voided. A query naming <column> sees the old
--             vectors before the commit and the new ones after it, never a mix or a NULL.
--   rollback  embedding_reembed_rollback: the same swap back (<column>__old returns).
--   finish    embedding_reembed_finish: unregister and drop <column>__old (and its companions).
--
-- The old column stays a registered target of the old model until finish, so a rollback
-- restores vectors that are current. Nothing here is SECURITY DEFINER: the owner (who
-- registers targets) runs these. Identifiers through %I, types through format_type/regtype.

-- The re-embedding of a target, or raise undefined_object.
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_get(p_table_name text, p_embedding_column text)
RETURNS @qs@.embedding_reembeds
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r @qs@.embedding_reembeds;
BEGIN
    SELECT * INTO r FROM @qs@.embedding_reembeds AS x
     WHERE x.table_name = p_table_name AND x.embedding_column = p_embedding_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no re-embedding of %.% in progress', p_table_name,
              quote_ident(p_embedding_column) USING ERRCODE = 'undefined_object';
    END IF;
    RETURN r;
END;
$$;

-- A column name with a suffix, within PostgreSQL's 63 bytes.
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_name(p_column text, p_suffix text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
RETURN left(p_column, 63 - octet_length(p_suffix)) || p_suffix;

-- Start re-embedding target (p_table_name, p_embedding_column) with p_model (p_dimensions:
-- the new vector size; default the column's). Returns the shadow column's name. Re-running
-- it for the same model is a no-op (resume: queue the rest with backfill 'missing').
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_start(
    p_table_name text, p_embedding_column text, p_model text, p_dimensions integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets := @qs@.embedding_target(p_table_name, p_embedding_column);
    r @qs@.embedding_reembeds;
    rel regclass := format('%I.%I', t.schema_name, t.relation_name)::regclass;
    shadow text := @qs@.embedding_reembed_name(t.embedding_column, '__next');
    col_type text;
    companion text;
BEGIN
    SELECT * INTO r FROM @qs@.embedding_reembeds AS x
     WHERE x.table_name = t.table_name AND x.embedding_column = t.embedding_column;
    IF FOUND THEN
        IF r.state = 'backfilling' AND r.new_model = p_model
           AND r.new_dimensions IS NOT DISTINCT FROM coalesce(p_dimensions, r.new_dimensions) THEN
            RETURN shadow;
        END IF;
        RAISE EXCEPTION 'a re-embedding of %.% (to %, %) is already in progress; finish or roll it back first',
              t.table_name, quote_ident(t.embedding_column), r.new_model, r.state
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_model IS NULL OR p_model = '' THEN
        RAISE EXCEPTION 'reembed needs a model' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A chunked target has no column to shadow (its vectors are in its chunks table).
    IF t.chunks_table IS NOT NULL THEN
        RAISE EXCEPTION 'target %.% is chunked: reembed switches columns; re-register it with the new model (unregister first for new dimensions) and enqueue --all',
              t.table_name, quote_ident(t.embedding_column) USING ERRCODE = 'feature_not_supported';
    END IF;
    -- An unbound target is served by every worker, the new model's included, which would
    -- write new vectors into the old column meanwhile: bind it to its current model first.
    IF t.model IS NULL THEN
        RAISE EXCEPTION 'target %.% is bound to no model: bind it to the model its vectors are from first (queue-processor bind)',
              t.table_name, quote_ident(t.embedding_column) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The shadow column's type: the column's own, with the new dimensions for vector types.
    SELECT CASE WHEN t.column_type IN ('vector', 'halfvec')
                THEN format('%s(%s)', format_type(a.atttypid, NULL),
                            coalesce(p_dimensions, nullif(a.atttypmod, -1), t.dimensions))
                ELSE format_type(a.atttypid, a.atttypmod) END
      INTO col_type
      FROM pg_attribute AS a WHERE a.attrelid = rel AND a.attname = t.embedding_column;
    IF t.column_type IN ('vector', 'halfvec') AND p_dimensions IS NULL
       AND col_type LIKE '%(%)' IS NOT TRUE THEN
        RAISE EXCEPTION 'column %.% has no fixed dimensions; pass the new model''s',
              t.table_name, quote_ident(t.embedding_column) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', rel, shadow, col_type);
    FOREACH companion IN ARRAY ARRAY[t.model_column, t.generated_at_column] LOOP
        CONTINUE WHEN companion IS NULL;
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', rel,
                       @qs@.embedding_reembed_name(companion, '__next'),
                       (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute AS a
                         WHERE a.attrelid = rel AND a.attname = companion));
    END LOOP;
    PERFORM @qs@.embedding_register_target(
        rel, shadow,
        p_content_columns => CASE WHEN t.content_template IS NULL THEN t.content_columns END,
        p_template => t.content_template, p_id_column => t.id_column, p_model => p_model,
        p_dimensions => p_dimensions,
        p_model_column => @qs@.embedding_reembed_name(t.model_column, '__next'),
        p_generated_at_column => @qs@.embedding_reembed_name(t.generated_at_column, '__next'));
    PERFORM @qs@.embedding_reembed_grant(t.table_name, shadow);
    INSERT INTO @qs@.embedding_reembeds (table_name, embedding_column, old_model, new_model,
                                         new_dimensions)
    VALUES (t.table_name, t.embedding_column, t.model, p_model,
            (SELECT dimensions FROM @qs@.embedding_targets AS x
              WHERE x.table_name = t.table_name AND x.embedding_column = shadow));
    RETURN shadow;
END;
$$;

-- Give every worker role what grant-worker gives it on a (new) target: the shadow column
-- and its companions.
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_grant(p_table_name text, p_embedding_column text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets := @qs@.embedding_target(p_table_name, p_embedding_column);
    r regrole;
BEGIN
    FOR r IN SELECT @qs@.embedding_worker_roles() LOOP
        EXECUTE format('GRANT UPDATE (%s) ON %I.%I TO %s',
                       concat_ws(', ', quote_ident(t.embedding_column),
                                 quote_ident(t.model_column), quote_ident(t.generated_at_column)),
                       t.schema_name, t.relation_name, r);
    END LOOP;
END;
$$;

-- Progress of a re-embedding: the shadow's rows with a vector (done) out of the rows with
-- content (total), and the estimated tokens of the rest. One scan of the source table.
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_progress(
    p_table_name text, p_embedding_column text,
    OUT state text, OUT new_model text, OUT shadow_column text,
    OUT done bigint, OUT total bigint, OUT remaining_tokens bigint, OUT queued bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r @qs@.embedding_reembeds := @qs@.embedding_reembed_get(p_table_name, p_embedding_column);
    incoming text;
    t @qs@.embedding_targets;
BEGIN
    state := r.state;
    new_model := r.new_model;
    -- While backfilling, the new vectors fill <column>__next; once switched, <column>.
    incoming := CASE r.state WHEN 'backfilling'
                     THEN @qs@.embedding_reembed_name(r.embedding_column, '__next')
                     ELSE r.embedding_column END;
    shadow_column := incoming;
    t := @qs@.embedding_target(r.table_name, incoming);
    EXECUTE format(
        $q$
        SELECT count(*) FILTER (WHERE r.%I IS NOT NULL), count(*),
               coalesce(sum(greatest(1, ceil(octet_length(c.content) / 4.0)))
                        FILTER (WHERE r.%I IS NULL), 0)
          FROM %I.%I AS r CROSS JOIN LATERAL (SELECT %s AS content) AS c
         WHERE NOT @qs@.embedding_queue_is_blank(c.content)
        $q$,
        t.embedding_column, t.embedding_column, t.schema_name, t.relation_name,
        @qs@.embedding_queue_content_sql(t.content_columns, t.content_template, 'r'))
    INTO done, total, remaining_tokens;
    SELECT count(*) INTO queued FROM @qs@.embedding_queue AS q
     WHERE q.table_name = t.table_name AND q.embedding_column = t.embedding_column
       AND q.status IN ('pending', 'processing');
    queued := queued + coalesce((SELECT sum(i.total) FROM @qs@.embedding_queue_inbox AS i
                                  WHERE i.table_name = t.table_name
                                    AND i.embedding_column = t.embedding_column), 0);
END;
$$;

-- Swap target (label, p_column)'s column with <p_column><p_in>, keeping the current one as
-- <p_column><p_out>: the columns and their companions are renamed (companions take the same
-- suffixes), the two registry rows and their queue rows follow the names, every claim in
-- flight on either is voided (its completion finds its token gone and writes nothing), and
-- both targets' triggers are regenerated. Runs inside the caller's transaction: dropping the
-- triggers takes the table's ACCESS EXCLUSIVE lock, held until commit; everything done
-- under it is catalog and registry work of a few rows.
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_swap(
    p_table_name text, p_column text, p_in text, p_out text
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning AS $$
DECLARE
    incoming text := @qs@.embedding_reembed_name(p_column, p_in);
    outgoing text := @qs@.embedding_reembed_name(p_column, p_out);
    cur @qs@.embedding_targets := @qs@.embedding_target(p_table_name, p_column);
    inc @qs@.embedding_targets := @qs@.embedding_target(p_table_name, incoming);
    rel regclass := format('%I.%I', cur.schema_name, cur.relation_name)::regclass;
    qs text := @qs@.embedding_queue_nsp();
    part text;
    col text;
BEGIN
    -- 1. Void claims in flight and move the queue rows with their columns (two steps, so
    --    the unique (table, record, column) never sees two rows at once).
    UPDATE @qs@.embedding_queue AS q
       SET status = 'pending', claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL,
           attempts = greatest(q.attempts - 1, 0), next_attempt_at = now(),
           generation = q.generation + 1, updated_at = now()
     WHERE q.table_name = cur.table_name AND q.embedding_column IN (p_column, incoming)
       AND q.status = 'processing';
    UPDATE @qs@.embedding_queue SET embedding_column = outgoing
     WHERE table_name = cur.table_name AND embedding_column = p_column;
    UPDATE @qs@.embedding_queue SET embedding_column = p_column
     WHERE table_name = cur.table_name AND embedding_column = incoming;
    UPDATE @qs@.embedding_queue_inbox SET embedding_column = outgoing
     WHERE table_name = cur.table_name AND embedding_column = p_column;
    UPDATE @qs@.embedding_queue_inbox SET embedding_column = p_column
     WHERE table_name = cur.table_name AND embedding_column = incoming;
    -- 2. Drop both targets' generated trigger functions (and with them their triggers).
    FOREACH part IN ARRAY ARRAY['_ins', '_upd', '_del', '_trunc', '_blank'] LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %I.%I() CASCADE',
                       qs, 'embedding_queue_t' || cur.trigger_suffix || part);
        EXECUTE format('DROP FUNCTION IF EXISTS %I.%I() CASCADE',
                       qs, 'embedding_queue_t' || inc.trigger_suffix || part);
    END LOOP;
    DELETE FROM @qs@.embedding_targets
     WHERE table_name = cur.table_name AND embedding_column IN (p_column, incoming);
    -- 3. Rename: current -> outgoing, incoming -> current; companions alike.
    FOREACH col IN ARRAY ARRAY[cur.embedding_column, cur.model_column, cur.generated_at_column]
    LOOP
        CONTINUE WHEN col IS NULL;
        EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', rel, col,
                       @qs@.embedding_reembed_name(col, p_out));
        EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', rel,
                       @qs@.embedding_reembed_name(col, p_in), col);
    END LOOP;
    -- 4. Register both under their new names: the current column with the incoming
    --    target's model and dimensions, the outgoing one with the old.
    PERFORM @qs@.embedding_register_target(
        rel, p_column,
        p_content_columns => CASE WHEN cur.content_template IS NULL THEN cur.content_columns END,
        p_template => cur.content_template, p_id_column => cur.id_column,
        p_model => inc.model, p_dimensions => inc.dimensions,
        p_model_column => cur.model_column, p_generated_at_column => cur.generated_at_column);
    PERFORM @qs@.embedding_register_target(
        rel, outgoing,
        p_content_columns => CASE WHEN cur.content_template IS NULL THEN cur.content_columns END,
        p_template => cur.content_template, p_id_column => cur.id_column,
        p_model => cur.model, p_dimensions => cur.dimensions,
        p_model_column => @qs@.embedding_reembed_name(cur.model_column, p_out),
        p_generated_at_column => @qs@.embedding_reembed_name(cur.generated_at_column, p_out));
END;
$$;

-- Switch to the new vectors: refused until the shadow is complete (no row with content
-- lacks its vector, nothing of it queued), then one swap. Returns the rows switched.
-- swap_ms: how long the swap itself took (from its first lock to its end: what queries of
-- the table may wait; the completeness check before it blocks nobody).
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_switch(
    p_table_name text, p_embedding_column text, OUT rows bigint, OUT swap_ms double precision)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r @qs@.embedding_reembeds := @qs@.embedding_reembed_get(p_table_name, p_embedding_column);
    p record;
    started timestamptz;
BEGIN
    IF r.state <> 'backfilling' THEN
        RAISE EXCEPTION '%.% is switched already (rollback or finish)', r.table_name,
              quote_ident(r.embedding_column) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO p FROM @qs@.embedding_reembed_progress(r.table_name, r.embedding_column);
    IF p.done < p.total OR p.queued > 0 THEN
        RAISE EXCEPTION 'the re-embedding of %.% is not complete: % of % rows, % queued',
              r.table_name, quote_ident(r.embedding_column), p.done, p.total, p.queued
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    started := clock_timestamp();
    PERFORM @qs@.embedding_reembed_swap(r.table_name, r.embedding_column, '__next', '__old');
    UPDATE @qs@.embedding_reembeds SET state = 'switched', switched_at = now()
     WHERE table_name = r.table_name AND embedding_column = r.embedding_column;
    rows := p.done;
    swap_ms := 1000 * extract(epoch FROM clock_timestamp() - started);
END;
$$;

-- Swap the old vectors back (they were kept current); the new ones return to the shadow
-- column, so a later switch needs no new backfill.
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_rollback(
    p_table_name text, p_embedding_column text, OUT swap_ms double precision)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r @qs@.embedding_reembeds := @qs@.embedding_reembed_get(p_table_name, p_embedding_column);
    started timestamptz := clock_timestamp();
BEGIN
    IF r.state <> 'switched' THEN
        RAISE EXCEPTION '%.% is not switched (nothing to roll back)', r.table_name,
              quote_ident(r.embedding_column) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM @qs@.embedding_reembed_swap(r.table_name, r.embedding_column, '__old', '__next');
    UPDATE @qs@.embedding_reembeds SET state = 'backfilling', switched_at = NULL
     WHERE table_name = r.table_name AND embedding_column = r.embedding_column;
    swap_ms := 1000 * extract(epoch FROM clock_timestamp() - started);
END;
$$;

-- Drop the column not in use and its companions, unregistering it: after a switch the old
-- one (the re-embedding is done), before it the shadow (the re-embedding is abandoned).
CREATE OR REPLACE FUNCTION @qs@.embedding_reembed_finish(p_table_name text, p_embedding_column text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning AS $$
DECLARE
    r @qs@.embedding_reembeds := @qs@.embedding_reembed_get(p_table_name, p_embedding_column);
    spare text := @qs@.embedding_reembed_name(
        r.embedding_column, CASE r.state WHEN 'switched' THEN '__old' ELSE '__next' END);
    t @qs@.embedding_targets := @qs@.embedding_target(r.table_name, spare);
    rel regclass := format('%I.%I', t.schema_name, t.relation_name)::regclass;
    col text;
BEGIN
    PERFORM @qs@.embedding_revoke_target_grants(t);
    PERFORM @qs@.embedding_unregister_target(r.table_name, spare);
    FOREACH col IN ARRAY ARRAY[t.embedding_column, t.model_column, t.generated_at_column] LOOP
        CONTINUE WHEN col IS NULL;
        EXECUTE format('ALTER TABLE %s DROP COLUMN %I', rel, col);
    END LOOP;
    DELETE FROM @qs@.embedding_reembeds
     WHERE table_name = r.table_name AND embedding_column = r.embedding_column;
    RETURN spare;
END;
$$;
