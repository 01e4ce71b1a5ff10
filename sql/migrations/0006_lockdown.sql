-- 0006_lockdown: the tables' side of "installing the tool widens no role's power" (SECURITY.md).
--
-- Functions are no longer defined by migrations: sql/functions/*.sql hold their current
-- definitions, re-applied by `migrate` whenever a file changes (recorded here), after which
-- every registered target's triggers are regenerated and every worker role re-granted.

CREATE TABLE queue_processor_functions (
    file       text PRIMARY KEY,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Row-level security on every table of ours, with no policy: the owner (who migrates, and
-- whose SECURITY DEFINER triggers write the queue) is exempt, worker roles get a policy from
-- grant-worker, and a role that merely inherited default privileges on new tables (Supabase's
-- anon and authenticated, for one) sees and changes no row, e.g. through a REST API.
ALTER TABLE embedding_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE embedding_targets ENABLE ROW LEVEL SECURITY;
ALTER TABLE embedding_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE embedding_cache ENABLE ROW LEVEL SECURITY;
ALTER TABLE embedding_queue_inbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE queue_processor_migrations ENABLE ROW LEVEL SECURITY;
ALTER TABLE queue_processor_functions ENABLE ROW LEVEL SECURITY;

-- A view reads its tables with its owner's rights, which would bypass the policies above.
-- security_invoker (PostgreSQL 15+) makes the caller's rights and policies apply. On 14 the
-- views keep their owner's rights, so they are at least taken away from PUBLIC.
DO $$
DECLARE
    v text;
BEGIN
    FOREACH v IN ARRAY ARRAY['embedding_queue_status', 'embedding_queue_summary',
                             'embedding_usage_summary', 'embedding_queue_failures',
                             'embedding_queue_inbox_status'] LOOP
        IF current_setting('server_version_num')::int >= 150000 THEN
            EXECUTE format('ALTER VIEW %I SET (security_invoker = true)', v);
        END IF;
        EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', v);
    END LOOP;
END;
$$;

-- The previous version's grant-worker gave a worker role SELECT and UPDATE on the whole
-- queue, and nothing else on it. Each such role gets its worker policy here, which is how
-- `migrate` then recognises it (embedding_worker_roles), narrows its grants and keeps it
-- working under row-level security. A role holding more than that on the queue (INSERT,
-- DELETE, TRUNCATE..., as default privileges give) is not one of our workers: it keeps no
-- privilege on our tables.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT pg_get_userbyid(a.grantee) AS name
          FROM pg_class AS c, aclexplode(c.relacl) AS a
         WHERE c.oid = 'embedding_queue'::regclass AND a.grantee NOT IN (0, c.relowner)
         GROUP BY a.grantee
        HAVING bool_or(a.privilege_type = 'UPDATE')
           AND NOT bool_or(a.privilege_type IN ('INSERT', 'DELETE', 'TRUNCATE', 'TRIGGER',
                                                'REFERENCES'))
    LOOP
        EXECUTE format('CREATE POLICY %I ON embedding_queue TO %I USING (true) WITH CHECK (true)',
                       'embedding_worker_' || left(md5(r.name), 16), r.name);
    END LOOP;
END;
$$;
