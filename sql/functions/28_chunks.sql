-- functions/28_chunks: chunked targets (migration 0010). One source row becomes N vectors,
-- one per chunk of its text, in a companion table this file's registration function creates
-- and owns. See 10_queue.sql for how these files are applied and why every function pins
-- search_path = pg_catalog, pg_temp. Identifiers reach dynamic SQL through format('%I'),
-- type names through regtype, values through %L or parameters.
--
-- What keeps a record's chunk set whole and current:
-- - the worker replaces a record's whole set in the transaction that acknowledges its queue
--   row, and only while the claim stands (embedding_chunks_write): a content change re-pends
--   the queue row first (the enqueue triggers), which makes the claim stale, so no chunk of
--   an old version is written after a newer version was queued;
-- - the source's delete and truncate triggers (generated in 25_register.sql, with the
--   statements below) remove a deleted record's chunks, and the update trigger those of a
--   record whose content became blank or whose key changed; each removes the queue rows
--   first, then the chunks: the order the worker locks them in (queue row, then chunks), so
--   the two cannot deadlock.

-- The companion table's name for relation p_relation and target name p_name:
-- <relation>_<name>_chunks. Raises name_too_long past PostgreSQL's 63 bytes (a truncated
-- name could collide with another target's table).
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_table_name(p_relation text, p_name text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text := p_relation || '_' || p_name || '_chunks';
BEGIN
    IF octet_length(name) > 63 THEN
        RAISE EXCEPTION 'the chunks table name % is longer than 63 bytes; use a shorter target name',
              quote_ident(name) USING ERRCODE = 'name_too_long';
    END IF;
    RETURN name;
END;
$$;

-- The statement that deletes the chunks of the records whose keys p_keys (an SQL expression
-- of an array of the key type) lists, for the generated trigger functions of chunked target
-- t; '' for a column target. = ANY(ARRAY(...)) probes the primary key once per key.
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_delete_sql(t @qs@.embedding_targets, p_keys text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF t.chunks_table IS NULL THEN
        RETURN '';
    END IF;
    RETURN format('DELETE FROM %I.%I AS c WHERE c.record_id = ANY(%s);',
                  t.schema_name, t.chunks_table, p_keys);
END;
$$;

-- As embedding_chunks_delete_sql, for the truncate trigger: every chunk of target t goes.
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_truncate_sql(t @qs@.embedding_targets)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF t.chunks_table IS NULL THEN
        RETURN '';
    END IF;
    RETURN format('TRUNCATE %I.%I;', t.schema_name, t.chunks_table);
END;
$$;

-- A backfill's (and an estimate's) filter for mode 'missing' over alias r: for a column
-- target, the target column is NULL; for a chunked target, the record has no chunk.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_missing_filter(t @qs@.embedding_targets)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF t.chunks_table IS NULL THEN
        RETURN format('r.%I IS NULL', t.embedding_column);
    END IF;
    RETURN format('NOT EXISTS (SELECT 1 FROM %I.%I AS c WHERE c.record_id = r.%I)',
                  t.schema_name, t.chunks_table, t.id_column);
END;
$$;

-- Create chunked target t's companion table in the source's schema, unless it exists (a
-- re-registration, checked by the caller): the key (the source key's type), the chunk's
-- position and text, its vector (vector(N), or halfvec(N) past HNSW's 2,000 dimensions for
-- vector), the model that made it and when; no index on the vectors yet (see
-- embedding_chunks_create_index). Row-level security is on with no policy (grant-worker
-- gives worker roles a SELECT policy), and every privilege default privileges handed out is
-- taken back.
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_create_table(t @qs@.embedding_targets, p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning AS $$
DECLARE
    key_type regtype;
    vector_schema text;
    rel text := format('%I.%I', t.schema_name, t.chunks_table);
    grantee text;
BEGIN
    SELECT a.atttypid::regtype INTO key_type
      FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = t.id_column;
    SELECT n.nspname INTO vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector';
    IF vector_schema IS NULL THEN
        RAISE EXCEPTION 'a chunked target needs the pgvector extension (CREATE EXTENSION vector)'
              USING ERRCODE = 'feature_not_supported';
    END IF;
    EXECUTE format(
        'CREATE TABLE %s ('
        ' record_id %s NOT NULL,'
        ' chunk_index integer NOT NULL CHECK (chunk_index >= 0),'
        ' chunk_text text NOT NULL,'
        ' embedding %I.%I(%s) NOT NULL,'
        ' model text,'
        ' generated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),'
        ' PRIMARY KEY (record_id, chunk_index))',
        rel, key_type, vector_schema, t.column_type, t.dimensions);
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', rel);
    FOR grantee IN
        SELECT DISTINCT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
          FROM pg_class AS c, aclexplode(c.relacl) AS a
         WHERE c.oid = rel::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE ALL ON TABLE %s FROM %s', rel, grantee);
    END LOOP;
END;
$$;

-- Create chunked target t's HNSW cosine index on its chunks table's vectors now, and record
-- it in embedding_index_builds as 'ready' (as `register --index` does for a column target).
-- Its name, <chunks table (58 bytes at most)>_hnsw, is the one every release gave it, so a
-- target registered earlier keeps its index; the opclass follows the column's type.
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_create_index(t @qs@.embedding_targets)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning AS $$
DECLARE
    vector_schema text;
    index_name text := left(t.chunks_table, 58) || '_hnsw';
BEGIN
    SELECT n.nspname INTO vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector';
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I.%I USING hnsw (embedding %I.%I)',
                   index_name, t.schema_name, t.chunks_table, vector_schema,
                   t.column_type || '_cosine_ops');
    INSERT INTO @qs@.embedding_index_builds AS b
           (table_name, embedding_column, index_name, opclass, state, finished_at)
    VALUES (t.table_name, t.embedding_column, index_name, t.column_type || '_cosine_ops',
            'ready', now())
    ON CONFLICT (table_name, embedding_column) DO UPDATE
       SET index_name = EXCLUDED.index_name, opclass = EXCLUDED.opclass, m = EXCLUDED.m,
           ef_construction = EXCLUDED.ef_construction, state = 'ready', error_message = NULL,
           builder = NULL, builder_pid = NULL, lease_expires_at = NULL, requested_at = now(),
           started_at = NULL, finished_at = now();
END;
$$;

-- Check the chunk settings of a registration and fill them into t.
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_check_settings(
    t @qs@.embedding_targets, p_dimensions integer, p_chunk_tokens integer,
    p_chunk_overlap integer, p_max_chunks integer
) RETURNS @qs@.embedding_targets
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_dimensions IS NULL OR p_dimensions NOT BETWEEN 1 AND 4000 THEN
        RAISE EXCEPTION 'a chunked target needs p_dimensions between 1 and 4000, not %',
              coalesce(p_dimensions::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_chunk_tokens IS NULL OR p_chunk_tokens NOT BETWEEN 16 AND 8192 THEN
        RAISE EXCEPTION 'chunk tokens must be between 16 and 8192, not %',
              coalesce(p_chunk_tokens::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_chunk_overlap IS NULL OR p_chunk_overlap < 0 OR p_chunk_overlap * 2 >= p_chunk_tokens THEN
        RAISE EXCEPTION 'chunk overlap must be at least 0 and below half the chunk size (%), not %',
              p_chunk_tokens, coalesce(p_chunk_overlap::text, 'NULL')
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_chunks IS NULL OR p_max_chunks NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'max chunks must be between 1 and 10000, not %',
              coalesce(p_max_chunks::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    t.dimensions := p_dimensions;
    -- HNSW indexes vector up to 2,000 dimensions and halfvec up to 4,000.
    t.column_type := CASE WHEN p_dimensions <= 2000 THEN 'vector' ELSE 'halfvec' END;
    t.length_policy := 'chunk';
    t.chunk_tokens := p_chunk_tokens;
    t.chunk_overlap := p_chunk_overlap;
    t.max_chunks := p_max_chunks;
    t.chunks_table := @qs@.embedding_chunks_table_name(t.relation_name, t.embedding_column);
    RETURN t;
END;
$$;

-- Register (or re-register) a chunked target named p_name on p_table: its chunks go to the
-- companion table <relation>_<name>_chunks in the table's schema (created here; see
-- embedding_chunks_create_table). Parameters as embedding_register_target's, plus
--   p_dimensions      required: the model's dimensions (the companion column's type)
--   p_chunk_tokens    chunk size in the model's tokens (16..8192; the model's input limit
--                     caps it at run time)
--   p_chunk_overlap   tokens each chunk repeats of the previous one (below half the size)
--   p_max_chunks      chunks per record at most (1..10000); the rest of a longer text is
--                     not embedded, and its queue row's detail says so
-- A re-registration may change the content, model and chunk settings (records are
-- re-chunked when next queued: backfill 'all'), not the dimensions: unregister first.
-- A new chunks table gets its HNSW index at once (embedding_chunks_create_index).
-- Returns the table_name label queue rows carry.
CREATE OR REPLACE FUNCTION @qs@.embedding_register_chunked_target(
    p_table regclass,
    p_name text,
    p_content_columns text[] DEFAULT NULL,
    p_template text DEFAULT NULL,
    p_id_column text DEFAULT NULL,
    p_model text DEFAULT NULL,
    p_dimensions integer DEFAULT NULL,
    p_chunk_tokens integer DEFAULT 512,
    p_chunk_overlap integer DEFAULT 64,
    p_max_chunks integer DEFAULT 100,
    p_backfill text DEFAULT 'none'
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN @qs@.embedding_chunks_register(p_table, p_name, p_content_columns, p_template,
                                          p_id_column, p_model, p_dimensions, p_chunk_tokens,
                                          p_chunk_overlap, p_max_chunks, p_backfill, true);
END;
$$;

-- embedding_register_chunked_target, with p_create_index: false leaves a new chunks table
-- without its HNSW index, for `register --chunks`, which creates it after the backfill or,
-- past QUEUE_PROCESSOR_INDEX_DEFER_ROWS queued rows, records it as wanted (a worker builds
-- it once the backlog drained: HNSW inserts during a backfill cost more than the build).
-- A function of its own name rather than a parameter added to the one above: its signature
-- stays as released, and no two signatures share a name.
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_register(
    p_table regclass,
    p_name text,
    p_content_columns text[],
    p_template text,
    p_id_column text,
    p_model text,
    p_dimensions integer,
    p_chunk_tokens integer,
    p_chunk_overlap integer,
    p_max_chunks integer,
    p_backfill text,
    p_create_index boolean
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
    previous @qs@.embedding_targets;
    created boolean := false;
BEGIN
    IF p_name IS NULL OR p_name = '' THEN
        RAISE EXCEPTION 'a chunked target needs a name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    t.embedding_column := p_name;
    t.content_template := p_template;
    t.model := p_model;
    t := @qs@.embedding_target_check_table(t, p_table);
    t := @qs@.embedding_target_check_key(t, p_table, p_id_column);
    t := @qs@.embedding_target_check_content(t, p_table, p_content_columns);
    t := @qs@.embedding_chunks_check_settings(t, p_dimensions, p_chunk_tokens, p_chunk_overlap,
                                               p_max_chunks);
    IF p_backfill IS NULL OR p_backfill NOT IN ('none', 'missing', 'all') THEN
        RAISE EXCEPTION 'p_backfill must be none, missing or all, not %', quote_literal(p_backfill)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM @qs@.embedding_target_check_label(t);
    SELECT * INTO previous FROM @qs@.embedding_targets AS r
     WHERE r.table_name = t.table_name AND r.embedding_column = t.embedding_column;
    IF FOUND AND previous.chunks_table IS NULL THEN
        RAISE EXCEPTION 'target %.% is registered as a column target; unregister it first',
              t.table_name, quote_ident(t.embedding_column) USING ERRCODE = 'duplicate_object';
    END IF;
    IF FOUND AND previous.dimensions <> t.dimensions THEN
        RAISE EXCEPTION 'chunked target %.% holds % dimensions, not %; unregister it first',
              t.table_name, quote_ident(t.embedding_column), previous.dimensions, t.dimensions
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT FOUND THEN
        IF to_regclass(format('%I.%I', t.schema_name, t.chunks_table)) IS NOT NULL THEN
            RAISE EXCEPTION 'table %.% already exists; the chunks table of a new target must not',
                  quote_ident(t.schema_name), quote_ident(t.chunks_table)
                  USING ERRCODE = 'duplicate_table';
        END IF;
        PERFORM @qs@.embedding_chunks_create_table(t, p_table);
        created := true;
    ELSIF to_regclass(format('%I.%I', t.schema_name, t.chunks_table)) IS NULL THEN
        PERFORM @qs@.embedding_chunks_create_table(t, p_table);
        created := true;
    END IF;
    t.trigger_suffix := substr(md5(t.table_name || '/' || t.embedding_column), 1, 12);
    PERFORM @qs@.embedding_target_create_functions(t);
    PERFORM @qs@.embedding_target_create_triggers(t, p_table);
    PERFORM @qs@.embedding_target_store(t);
    UPDATE @qs@.embedding_targets AS r
       SET length_policy = 'chunk', chunk_tokens = t.chunk_tokens,
           chunk_overlap = t.chunk_overlap, max_chunks = t.max_chunks,
           chunks_table = t.chunks_table
     WHERE r.table_name = t.table_name AND r.embedding_column = t.embedding_column;
    -- After the registry row exists: embedding_index_builds references it.
    IF created AND coalesce(p_create_index, true) THEN
        PERFORM @qs@.embedding_chunks_create_index(t);
    END IF;
    IF p_backfill <> 'none' THEN
        PERFORM @qs@.embedding_queue_backfill(t.table_name, t.embedding_column, p_backfill);
    END IF;
    RETURN t.table_name;
END;
$$;

-- Replace the chunk sets of a batch of records of chunked target (p_table_name,
-- p_embedding_column) and acknowledge their queue rows, for the queue rows p_qids that are
-- still claimed under p_token (status processing, same token, of this target); the others
-- get nothing written. The chunks arrive flat: chunk k belongs to queue row p_chunk_qids[k],
-- has text p_texts[k] and vector p_vectors[(k-1)*dims+1 : k*dims]; a record's chunks keep
-- their order (chunk_index 0, 1, ...). p_details (aligned with p_qids) is each queue row's
-- detail, e.g. that max_chunks cut it. Returns the acknowledged queue ids.
--
-- SECURITY DEFINER so that worker roles need no privilege on the companion tables: this is
-- the only way a worker writes chunks, and it writes only the chunks of records whose queue
-- row (whose record_id and target no worker may change) it holds a valid claim on. Run in
-- the transaction that locked those queue rows (queries.sql: lock_valid_claims): the
-- records' old chunks are deleted and the new ones inserted in that one transaction, so no
-- reader ever sees a partial set.
CREATE OR REPLACE FUNCTION @qs@.embedding_chunks_write(
    p_table_name text, p_embedding_column text, p_token uuid,
    p_qids bigint[], p_details text[],
    p_chunk_qids bigint[], p_texts text[], p_vectors real[], p_model text
) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t @qs@.embedding_targets;
    valid bigint[];
    chunks integer := coalesce(cardinality(p_chunk_qids), 0);
BEGIN
    SELECT * INTO t FROM @qs@.embedding_targets AS r
     WHERE r.table_name = p_table_name AND r.embedding_column = p_embedding_column
       AND r.chunks_table IS NOT NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no chunked target %.%', p_table_name, p_embedding_column
              USING ERRCODE = 'undefined_object';
    END IF;
    IF coalesce(cardinality(p_texts), 0) <> chunks
       OR coalesce(cardinality(p_vectors), 0) <> chunks * t.dimensions
       OR coalesce(cardinality(p_details), 0) <> coalesce(cardinality(p_qids), 0) THEN
        RAISE EXCEPTION 'chunk arrays do not line up (% chunks, % texts, % floats for % dimensions)',
              chunks, coalesce(cardinality(p_texts), 0), coalesce(cardinality(p_vectors), 0),
              t.dimensions USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The claims that still stand, locked in id order (the order lock_valid_claims and the
    -- enqueue triggers' key-ordered upserts take them in).
    SELECT coalesce(array_agg(s.id), '{}') INTO valid
      FROM (SELECT q.id FROM @qs@.embedding_queue AS q
             WHERE q.id = ANY(p_qids) AND q.status = 'processing' AND q.claim_token = p_token
               AND q.table_name = t.table_name AND q.embedding_column = t.embedding_column
             ORDER BY q.id FOR UPDATE) AS s;
    IF cardinality(valid) = 0 THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_chunk_qids) AS c(qid) WHERE c.qid = ANY(valid)
                GROUP BY c.qid HAVING count(*) > t.max_chunks) THEN
        RAISE EXCEPTION 'more than % chunks for one record', t.max_chunks
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format(
        'DELETE FROM %I.%I AS c WHERE c.record_id = ANY(ARRAY('
        ' SELECT q.record_id::%s FROM %I.embedding_queue AS q WHERE q.id = ANY($1)))',
        t.schema_name, t.chunks_table, t.id_type::regtype, @qs@.embedding_queue_nsp())
    USING valid;
    -- real[] slices become vector/halfvec by pgvector's assignment casts (which check the
    -- dimensions against the column's).
    EXECUTE format(
        'INSERT INTO %I.%I (record_id, chunk_index, chunk_text, embedding, model)'
        ' SELECT q.record_id::%s,'
        '        (pg_catalog.row_number() OVER (PARTITION BY x.qid ORDER BY x.ord) - 1)::integer,'
        '        x.txt, $3[(x.ord - 1) * %s + 1 : x.ord * %s], $4'
        '   FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]))'
        '        WITH ORDINALITY AS x(qid, txt, ord)'
        '   JOIN %I.embedding_queue AS q ON q.id = x.qid'
        '  WHERE x.qid = ANY($5)',
        t.schema_name, t.chunks_table, t.id_type::regtype, t.dimensions, t.dimensions,
        @qs@.embedding_queue_nsp())
    USING p_chunk_qids, p_texts, p_vectors, p_model, valid;
    RETURN QUERY
    UPDATE @qs@.embedding_queue AS q
       SET status = 'done', processed_at = now(), updated_at = now(), error_message = NULL,
           claim_token = NULL, lease_expires_at = NULL,
           detail = p_details[array_position(p_qids, q.id)]
     WHERE q.id = ANY(valid)
    RETURNING q.id;
END;
$$;
