-- functions/10_queue: the queue table's own trigger functions and shared helpers.
--
-- Files in sql/functions are re-applied by `migrate` whenever their text changes (after the
-- migrations), so they always hold the current definition: CREATE OR REPLACE only, the same
-- signatures. `migrate` replaces @qs@ with the queue schema's quoted name: every object of
-- ours is named with its schema, and every function runs with
-- `SET search_path = pg_catalog, pg_temp`. So no name in these files can resolve to an object
-- another role planted: not a temporary table (pg_temp is searched last, and never for
-- functions), not a function in public or even in the queue schema (an exact-type overload
-- there would otherwise beat a polymorphic or variadic built-in such as format or
-- cardinality). Privileges are settled after every migrate (embedding_refresh_installed).

-- Operators' requeue (`UPDATE ... SET status = 'pending', error_message = NULL WHERE status =
-- 'failed'`, or the seed's ON CONFLICT ... SET status = 'pending') only names the status. A
-- row moved back to pending from done/failed must also get a fresh budget of attempts, be due
-- now and drop any stale claim. A requeued row is due now, so waiting workers are woken.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_on_requeue() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('embedding_queue', '');
    NEW.attempts := 0;
    NEW.next_attempt_at := now();
    NEW.claimed_by := NULL;
    NEW.claim_token := NULL;
    NEW.lease_expires_at := NULL;
    NEW.detail := NULL;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- A pending row inserted by hand (the seed's requeue INSERT, a backfill) wakes waiting workers.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_notify() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('embedding_queue', '');
    RETURN NULL;
END;
$$;

-- The schema holding embedding_queue (generated trigger functions are created there and
-- qualify every reference, since they run with search_path = pg_catalog, pg_temp).
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_nsp() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = '@qs@.embedding_queue'::regclass);

-- Blank means NULL, empty or whitespace only: such content is never embedded.
-- Written for speed, since every queued row pays for it (see 0002_targets.sql). No SET
-- clause: a function with one is never inlined, and this one only calls pg_catalog.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_is_blank(content text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN content IS NULL
    OR (pg_catalog.ascii(content) IN (0, 9, 10, 11, 12, 13, 32)
        AND pg_catalog.ltrim(content, E' \t\n\r\f\v') = '');

-- Take every privilege on a function away from PUBLIC and from every role but its owner:
-- for functions no role has any business calling directly (trigger functions, including
-- the SECURITY DEFINER ones generated per target). Default privileges (e.g. Supabase's
-- `GRANT ALL ON FUNCTIONS TO anon, authenticated`) may have granted it to named roles.
CREATE OR REPLACE FUNCTION @qs@.embedding_queue_make_private(p_function regprocedure) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee regrole;
BEGIN
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', p_function);
    FOR grantee IN
        SELECT DISTINCT a.grantee::regrole FROM pg_proc AS p, aclexplode(p.proacl) AS a
         WHERE p.oid = p_function AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', p_function, grantee);
    END LOOP;
END;
$$;
