-- functions/90_privileges: applied last, after every function of ours exists.
--
-- 1. search_path. The files were applied with the queue schema first on the search_path (so
--    that their CREATEs land there); every function that sets a search_path gets it pinned to
--    pg_catalog, <queue schema>, pg_temp: built-ins first, then our schema, and temporary
--    tables last, where they cannot stand in for our tables. (Generated trigger functions
--    pin pg_catalog, pg_temp and qualify everything of ours.)
-- 2. EXECUTE. PostgreSQL grants it on every new function to PUBLIC; none of ours is meant for
--    every role. The owner keeps them all; grant-worker grants the worker's role the few it
--    calls; registering a table from another role needs EXECUTE on embedding_register_target
--    (and the helpers it calls) granted by the owner. embedding_queue_is_blank stays public:
--    the blank-content trigger's WHEN clause calls it as whichever role updates a registered
--    table, and it is a pure function of its argument.
DO $$
DECLARE
    qs text := embedding_queue_nsp();
    f regprocedure;
    pinned boolean;
BEGIN
    FOR f, pinned IN
        SELECT p.oid::regprocedure,
               EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search\_path=%')
          FROM pg_proc AS p
         WHERE p.pronamespace = qs::regnamespace
           AND (p.proname LIKE 'embedding\_%' OR p.proname LIKE 'queue\_processor\_%')
    LOOP
        IF pinned AND f::text NOT LIKE 'embedding\_queue\_t%' THEN
            EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, qs);
        END IF;
        IF f <> 'embedding_queue_is_blank(text)'::regprocedure THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        END IF;
    END LOOP;
END;
$$;
