"""Attacks on the database surface by roles that should gain nothing from it (issue 11).

Each test reproduces one hole with real roles (separate logins), real temporary tables
shadowing ours and real overloads in ``public``, and asserts the outcome in the database
(as the superuser), on PostgreSQL 18 (embedded) and 15 (the machine's service):

- hole 1: ``embedding_queue_expand()`` (SECURITY DEFINER) run by an application role whose
  temporary tables stand in for the inbox, registry and queue: it must not read a table the
  role cannot read, run SQL injected through the registry's ``id_type`` as its owner, or put
  another table's text into the real queue;
- hole 2: the generated per-target trigger functions attached to a role's own temporary
  table must not forge, re-pend or delete queue rows or clear another table's embeddings;
- application roles with only INSERT/UPDATE/DELETE on their table still get their writes
  queued (the positive control of the two above);
- hole 3: overloads planted in ``public`` (``embedding_grant_worker(text)``,
  ``embedding_queue_expand(smallint)``) must not run in place of ours from the CLI;
- hole 4: ``grant-worker`` grants UPDATE of the queue's bookkeeping columns only, and
  ``unregister`` takes back the target's column grants;
- a catalog check: no SECURITY DEFINER function of ours is executable by PUBLIC, and each
  pins a search_path that ends in ``pg_temp``;
- hole 11: roles given default privileges on new tables and functions (Supabase's ``anon``)
  see and change nothing of the queue, cannot TRUNCATE it or attach triggers to it, and call
  no SECURITY DEFINER function, while the worker role still works;
- found while writing these (not in the issue): exact-type overloads of polymorphic or
  variadic built-ins (``cardinality``, ``format``) planted in the queue schema run inside our
  functions; the owner of a registered table gets its own code run as the queue's owner,
  through the generated insert trigger's UPDATE of its table and through expand reading
  whatever relation now has the registered name.

The queue schema is ``public`` here (the default install); tables are ``real[]`` targets so
that the same tests run on the server without pgvector.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import psycopg
import pytest
from psycopg import errors, sql

from queue_processor.db import Database
from queue_processor.migrations import migrate
from queue_processor.testing import FakeOpenAIServer, fake_vector
from tests.support.helpers import DIMS, cli_env, execute, run_cli, summary_counts

if TYPE_CHECKING:
    from tests.security.conftest import Roles, Server

Row = dict[str, Any]
Conn = psycopg.Connection[Row]

SECRET = "TOP-SECRET the owner's eyes only"

# The temporary tables of the reproductions (/work/shared/security/0[12]-*.sql): the columns
# embedding_queue_expand() reads from the inbox and the registry, and writes to the queue.
SHADOW_INBOX = """
CREATE TEMP TABLE embedding_queue_inbox (id bigint, table_name text, embedding_column text,
    record_ids text[], total int, expanded int, created_at timestamptz)"""
SHADOW_TARGETS = """
CREATE TEMP TABLE embedding_targets (table_name text, embedding_column text, schema_name text,
    relation_name text, id_column text, id_type text, content_columns text[],
    content_template text, column_type text, dimensions int, model text, model_column text,
    generated_at_column text, trigger_suffix text, created_at timestamptz,
    updated_at timestamptz)"""
SHADOW_QUEUE = """
CREATE TEMP TABLE embedding_queue (table_name text, record_id text, embedding_column text,
    content text, next_attempt_at timestamptz, created_at timestamptz,
    UNIQUE (table_name, record_id, embedding_column))"""

# An id_type that closes `$1::%s[]` and calls set_config as the function's owner (script 02).
INJECTED_ID_TYPE = """int[]) AND pg_catalog.set_config('exfil.v', current_user || ' super=' ||
     (SELECT rolsuper::text FROM pg_catalog.pg_roles WHERE rolname = current_user) ||
     ' authid=' || (SELECT pg_catalog.count(*)::text FROM pg_catalog.pg_authid), false)
     IS NOT NULL AND 1 = ANY($1::int"""


# --- setup ------------------------------------------------------------------------------------


def make_tables(dsn: str) -> None:
    """As the superuser: ``secrets`` (unregistered, private) and ``docs`` registered
    (body -> embedding, real[] of DIMS, with model and embedded_at companions)."""
    execute(dsn, "CREATE TABLE secrets (id int PRIMARY KEY, secret text)")
    execute(dsn, "INSERT INTO secrets VALUES (1, %s)", (SECRET,))
    execute(
        dsn,
        "CREATE TABLE docs (id int PRIMARY KEY, body text, embedding real[], model text,"
        " embedded_at timestamptz)",
    )
    execute(
        dsn,
        "SELECT embedding_register_target('docs', 'embedding', p_content_columns => ARRAY['body'],"
        " p_dimensions => %s, p_model_column => 'model', p_generated_at_column => 'embedded_at')",
        (DIMS,),
    )


def app_role(server: Server, roles: Roles) -> str:
    """An application role: INSERT, UPDATE and DELETE on ``docs``, nothing else granted
    (PUBLIC's defaults, TEMP among them, still apply)."""
    role = roles.create("app")
    execute(server.dsn, sql.SQL("GRANT INSERT, UPDATE, DELETE ON docs TO {}").format(ident(role)))
    return role


def ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def queue_snapshot(dsn: str) -> list[Row]:
    """Every queue row's identity, content and state (as the superuser)."""
    return execute(
        dsn,
        "SELECT table_name, record_id, embedding_column, content, status, generation"
        " FROM embedding_queue ORDER BY table_name, record_id, embedding_column",
    )


def docs_snapshot(dsn: str) -> list[Row]:
    return execute(dsn, "SELECT id, body, embedding, model FROM docs ORDER BY id")


def inbox_rows(dsn: str) -> list[Row]:
    return execute(
        dsn,
        "SELECT table_name, embedding_column, total, expanded FROM embedding_queue_inbox"
        " ORDER BY id",
    )


def queue_rows_holding(dsn: str, text: str) -> list[Row]:
    """Real queue rows (and inbox rows) whose text contains ``text`` (as the superuser)."""
    return execute(
        dsn,
        "SELECT table_name, record_id, content FROM embedding_queue WHERE strpos(content, %s) > 0",
        (text,),
    )


def expand_as(conn: Conn, max_rows: int = 10) -> int | None:
    """Call ``embedding_queue_expand`` the way the reproductions do: the number of keys it
    took, or None when the role was refused (SQLSTATE 42501). Any other error fails."""
    try:
        row = conn.execute(
            sql.SQL("SELECT embedding_queue_expand({}) AS taken").format(sql.Literal(max_rows))
        ).fetchone()
    except errors.InsufficientPrivilege:
        return None
    assert row is not None
    return int(row["taken"])


def assert_cannot_read_secrets(conn: Conn) -> None:
    """The control every shadowing test starts from: the role may not read ``secrets``."""
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute("SELECT secret FROM secrets")


# --- hole 1: temporary tables shadowing the inbox, registry and queue ---------------------


def test_expand_does_not_read_the_callers_temp_tables(server: Server, roles: Roles) -> None:
    """Script 01: the app role shadows all three tables and points the registry at
    ``secrets``; the secret must not reach its temp queue (nor the real one)."""
    make_tables(server.dsn)
    role = app_role(server, roles)
    with roles.login(server.dsn, role) as conn:
        assert_cannot_read_secrets(conn)
        conn.execute(SHADOW_INBOX)
        conn.execute("INSERT INTO embedding_queue_inbox VALUES (1, 'x', 'y', '{1}', 1, 0, now())")
        conn.execute(SHADOW_TARGETS)
        conn.execute(
            "INSERT INTO embedding_targets (table_name, embedding_column, schema_name,"
            " relation_name, id_column, id_type, content_columns)"
            " VALUES ('x', 'y', 'public', 'secrets', 'id', 'int', '{secret}')"
        )
        conn.execute(SHADOW_QUEUE)
        taken = expand_as(conn)
        stolen = conn.execute("SELECT record_id, content FROM pg_temp.embedding_queue").fetchall()
    assert stolen == [], f"expand (took {taken}) copied a protected table into a temp table"
    assert queue_rows_holding(server.dsn, SECRET) == []


def test_expand_runs_no_sql_injected_through_id_type(server: Server, roles: Roles) -> None:
    """Script 02: an id_type that closes the cast and calls set_config must not run as the
    function's owner (the session setting stays unset; nothing of pg_authid leaks)."""
    make_tables(server.dsn)
    role = app_role(server, roles)
    with roles.login(server.dsn, role) as conn:
        conn.execute(SHADOW_INBOX)
        conn.execute("INSERT INTO embedding_queue_inbox VALUES (1, 'x', 'y', '{1}', 1, 0, now())")
        conn.execute(SHADOW_TARGETS)
        conn.execute(
            "INSERT INTO embedding_targets (table_name, embedding_column, schema_name,"
            " relation_name, id_column, id_type, content_columns)"
            " VALUES ('x', 'y', 'public', 'docs', 'id', %s, '{body}')",
            (INJECTED_ID_TYPE,),
        )
        conn.execute(SHADOW_QUEUE)
        conn.execute("INSERT INTO docs (id, body) VALUES (1, 'hello')")
        taken = expand_as(conn)
        leaked = conn.execute("SELECT current_setting('exfil.v', true) AS v").fetchone()
    assert leaked is not None
    assert not leaked["v"], f"injected SQL ran as the definer: {leaked['v']!r} (took {taken})"
    # The application's own insert was queued by its trigger, and nothing else.
    assert [(r["record_id"], r["content"]) for r in queue_snapshot(server.dsn)] == [("1", "hello")]


def test_expand_puts_no_protected_text_into_the_real_queue(server: Server, roles: Roles) -> None:
    """Shadowing only the inbox and the registry: the function's INSERT then lands in the
    real queue (which the worker sends to the provider); no secret may get there."""
    make_tables(server.dsn)
    role = app_role(server, roles)
    with roles.login(server.dsn, role) as conn:
        assert_cannot_read_secrets(conn)
        conn.execute(SHADOW_INBOX)
        conn.execute(
            "INSERT INTO embedding_queue_inbox VALUES (1, 'docs', 'embedding', '{1}', 1, 0, now())"
        )
        conn.execute(SHADOW_TARGETS)
        conn.execute(
            "INSERT INTO embedding_targets (table_name, embedding_column, schema_name,"
            " relation_name, id_column, id_type, content_columns)"
            " VALUES ('docs', 'embedding', 'public', 'secrets', 'id', 'int', '{secret}')"
        )
        taken = expand_as(conn)
    leaked = queue_rows_holding(server.dsn, SECRET)
    assert leaked == [], f"expand (took {taken}) queued a protected row: {leaked}"
    assert queue_snapshot(server.dsn) == []


# --- hole 2: the generated trigger functions attached to a role's own table ---------------

# How each generated function is attached to a temporary copy of docs, and what is then done
# to that copy to make the function (run as its owner) act on the real queue and docs.
ATTACH = {
    "ins": (
        "AFTER INSERT ON evil REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT",
        [
            # Forge content for docs 1; blank content with an embedding clears docs 2's.
            "INSERT INTO evil (id, body, embedding)"
            " VALUES (1, 'ATTACKER TEXT FOR DOC 1', NULL), (2, ' ', '{1}')",
        ],
    ),
    "upd": (
        "AFTER UPDATE ON evil REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
        " FOR EACH STATEMENT",
        [
            "INSERT INTO evil VALUES (1, 'a', NULL), (2, 'b', NULL)",
            "UPDATE evil SET body = 'ATTACKER TEXT FOR DOC ' || id",
        ],
    ),
    "del": (
        "AFTER DELETE ON evil REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT",
        ["INSERT INTO evil VALUES (1, 'a', NULL), (2, 'b', NULL)", "DELETE FROM evil"],
    ),
    "trunc": ("AFTER TRUNCATE ON evil FOR EACH STATEMENT", ["TRUNCATE evil"]),
}


def generated_function(dsn: str, part: str) -> str:
    """The qualified name of the function docs' ``*_PART`` trigger executes."""
    rows = execute(
        dsn,
        "SELECT format('%%I.%%I', n.nspname, p.proname) AS fn"
        "  FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid"
        "  JOIN pg_namespace AS n ON n.oid = p.pronamespace"
        " WHERE t.tgrelid = 'docs'::regclass AND NOT t.tgisinternal AND t.tgname LIKE %s",
        (f"%\\_{part}",),
    )
    assert len(rows) == 1, rows
    return str(rows[0]["fn"])


@pytest.mark.parametrize("part", list(ATTACH))
def test_generated_trigger_functions_cannot_be_attached(
    server: Server, roles: Roles, part: str
) -> None:
    """Script 03: a role with no grants at all attaches docs' generated trigger function to
    a temp table of its own; the real queue and docs must come out untouched."""
    make_tables(server.dsn)
    execute(server.dsn, "INSERT INTO docs (id, body) VALUES (1, 'one'), (2, 'two')")
    execute(server.dsn, "UPDATE docs SET embedding = '{1,2,3}', model = 'm'")
    execute(server.dsn, "UPDATE embedding_queue SET status = 'done', processed_at = now()")
    queue_before, docs_before = queue_snapshot(server.dsn), docs_snapshot(server.dsn)
    assert [r["status"] for r in queue_before] == ["done", "done"]
    function = generated_function(server.dsn, part)
    timing, statements = ATTACH[part]

    nobody = roles.create("nobody")
    with roles.login(server.dsn, nobody) as conn:
        # docs' columns, so that the generated function's SQL fits the copy.
        conn.execute(
            "CREATE TEMP TABLE evil (id int, body text, embedding real[], model text,"
            " embedded_at timestamptz)"
        )
        try:
            conn.execute(f"CREATE TRIGGER attach {timing} EXECUTE FUNCTION {function}()")
        except errors.InsufficientPrivilege:
            statements = []  # refused: the fixed outcome
        for statement in statements:
            conn.execute(statement)

    queue_after, docs_after = queue_snapshot(server.dsn), docs_snapshot(server.dsn)
    assert queue_after == queue_before, f"attached, the queue became {queue_after}"
    assert docs_after == docs_before, f"attached, docs became {docs_after}"
    assert inbox_rows(server.dsn) == []


# --- the positive control: application roles' writes are still queued --------------------


def test_application_role_writes_are_queued(server: Server, roles: Roles) -> None:
    """A role with only INSERT/UPDATE/DELETE on docs (nothing on the queue, the inbox or any
    function but PUBLIC's) gets every write queued: trigger functions are not checked for
    EXECUTE when they fire."""
    make_tables(server.dsn)
    role = app_role(server, roles)
    with roles.login(server.dsn, role) as conn:
        conn.execute("INSERT INTO docs (id, body) VALUES (1, 'one'), (2, 'two')")
    assert [(r["record_id"], r["content"], r["status"]) for r in queue_snapshot(server.dsn)] == [
        ("1", "one", "pending"),
        ("2", "two", "pending"),
    ]

    # The worker finished them; a content update by the application re-pends both.
    execute(server.dsn, "UPDATE docs SET embedding = '{1,2,3}', model = 'm'")
    execute(server.dsn, "UPDATE embedding_queue SET status = 'done', processed_at = now()")
    with roles.login(server.dsn, role) as conn:
        conn.execute("UPDATE docs SET body = 'rewritten'")
    assert [(r["record_id"], r["content"], r["status"]) for r in queue_snapshot(server.dsn)] == [
        ("1", "rewritten", "pending"),
        ("2", "rewritten", "pending"),
    ]

    # Blank content: dequeued, and the stale embedding cleared (the BEFORE trigger's WHEN).
    with roles.login(server.dsn, role) as conn:
        conn.execute("UPDATE docs SET body = ' '")
    assert queue_snapshot(server.dsn) == []
    assert [(r["embedding"], r["model"]) for r in docs_snapshot(server.dsn)] == [(None, None)] * 2

    # A bulk insert (queue_processor.bulk_rows, default 1000) goes through the inbox, and
    # expanding it queues every row's content.
    with roles.login(server.dsn, role) as conn:
        conn.execute(
            "INSERT INTO docs (id, body) SELECT g, 'bulk ' || g FROM generate_series(1001, 2000) g"
        )
    assert inbox_rows(server.dsn) == [
        {"table_name": "docs", "embedding_column": "embedding", "total": 1000, "expanded": 0}
    ]
    assert execute(server.dsn, "SELECT public.embedding_queue_expand(5000) AS n") == [{"n": 1000}]
    queued = queue_snapshot(server.dsn)
    assert len(queued) == 1000
    assert {r["content"] for r in queued} == {f"bulk {g}" for g in range(1001, 2001)}

    with roles.login(server.dsn, role) as conn:
        conn.execute("DELETE FROM docs")
    assert queue_snapshot(server.dsn) == []


# --- hole 3: overloads in public ------------------------------------------------------------


def attacker_with_create(server: Server, roles: Roles) -> str:
    """A role that may CREATE in public (the queue schema here), with a log table that any
    role may append to: the attacker's functions write who ran them there."""
    attacker = roles.create("attacker")
    execute(server.dsn, sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(ident(attacker)))
    with roles.login(server.dsn, attacker) as conn:
        conn.execute("CREATE TABLE public.hijack_log (who text, what text)")
        conn.execute("GRANT INSERT ON public.hijack_log TO PUBLIC")
    return attacker


def test_grant_worker_runs_no_overload_planted_in_public(
    server: Server, roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    """``public.embedding_grant_worker(text)`` beats the real ``(name)`` for an untyped
    parameter; the CLI must call the real one (and the grant must happen)."""
    make_tables(server.dsn)
    attacker = attacker_with_create(server, roles)
    worker = roles.create("worker")
    with roles.login(server.dsn, attacker) as conn:
        # Stealthy: logs as whom it ran, then does the real thing.
        conn.execute(
            """CREATE FUNCTION public.embedding_grant_worker(p_role text) RETURNS integer
               LANGUAGE plpgsql AS $$
               BEGIN
                   INSERT INTO public.hijack_log VALUES (current_user, 'grant_worker');
                   RETURN public.embedding_grant_worker(p_role::name);
               END $$"""
        )
    done = run_cli(["grant-worker", worker], cli_env(server.dsn, fake_api))
    assert done.returncode == 0, done.stderr
    ran = execute(server.dsn, "SELECT who, what FROM hijack_log")
    assert ran == [], f"the planted overload ran: {ran}"
    granted = execute(
        server.dsn,
        "SELECT has_table_privilege(%(r)s, 'embedding_queue', 'SELECT') AS queue,"
        " has_column_privilege(%(r)s, 'docs', 'embedding', 'UPDATE') AS target",
        {"r": worker},
    )
    assert granted == [{"queue": True, "target": True}]


def test_worker_runs_no_expand_overload_planted_in_public(
    server: Server, roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    """``public.embedding_queue_expand(smallint)`` (and ``bigint``) beat the real
    ``(integer)`` when psycopg sends the batch size as int2/int8: the worker, draining a bulk
    insert as its least-privileged role, must call the real one."""
    make_tables(server.dsn)
    attacker = attacker_with_create(server, roles)
    worker = roles.create("worker")
    with roles.login(server.dsn, attacker) as conn:
        for arg in ("smallint", "bigint"):
            conn.execute(
                f"""CREATE FUNCTION public.embedding_queue_expand(p_max_rows {arg})
                    RETURNS integer LANGUAGE plpgsql AS $$
                    BEGIN
                        INSERT INTO public.hijack_log VALUES (current_user, 'expand({arg})');
                        RETURN public.embedding_queue_expand(p_max_rows::integer);
                    END $$"""
            )
    granted = run_cli(["grant-worker", worker], cli_env(server.dsn, fake_api))
    assert granted.returncode == 0, granted.stderr
    execute(
        server.dsn,
        "INSERT INTO docs (id, body) SELECT g, 'bulk ' || g FROM generate_series(1, 1000) g",
    )
    assert [r["total"] for r in inbox_rows(server.dsn)] == [1000]

    drained = run_cli(["run", "--drain"], cli_env(roles.dsn(server.dsn, worker), fake_api))
    assert drained.returncode == 0, drained.stderr
    assert summary_counts(drained.stdout)["processed"] == 1000
    ran = execute(server.dsn, "SELECT who, what FROM hijack_log")
    assert ran == [], f"the planted overload ran: {ran}"
    rows = execute(server.dsn, "SELECT id, body, embedding FROM docs WHERE id IN (1, 1000)")
    for row in rows:
        np.testing.assert_array_equal(
            np.array(row["embedding"], dtype=np.float32), fake_vector(row["body"], DIMS)
        )


# --- hole 4: what grant-worker grants, and what unregister takes back ----------------------

# Columns the worker writes (claim, lease, completion, failure) and columns it must not.
WORKER_COLUMNS = {
    "status": "'processing'",
    "attempts": "attempts + 1",
    "claimed_by": "'w'",
    "lease_expires_at": "now() + interval '1 minute'",
    "error_message": "'boom'",
}
PROTECTED_COLUMNS = {
    "content": "'forged content'",
    "table_name": "'forged_table'",
    "record_id": "'999'",
    "embedding_column": "'forged_column'",
}


def test_grant_worker_grants_no_update_of_queue_identity_or_content(
    server: Server, roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    make_tables(server.dsn)
    execute(server.dsn, "INSERT INTO docs (id, body) VALUES (1, 'the real text')")
    worker = roles.create("worker")
    done = run_cli(["grant-worker", worker], cli_env(server.dsn, fake_api))
    assert done.returncode == 0, done.stderr

    allowed: list[str] = []
    with roles.login(server.dsn, worker) as conn:
        for column, value in PROTECTED_COLUMNS.items():
            try:
                conn.execute(f"UPDATE embedding_queue SET {column} = {value}")
            except errors.InsufficientPrivilege:
                continue
            allowed.append(column)
        # The positive control: the bookkeeping columns remain writable.
        for column, value in WORKER_COLUMNS.items():
            conn.execute(f"UPDATE embedding_queue SET {column} = {value} WHERE record_id = '1'")
    assert allowed == [], f"the worker role may rewrite {allowed}"
    assert [(r["record_id"], r["content"]) for r in queue_snapshot(server.dsn)] == [
        ("1", "the real text")
    ]


def test_unregister_takes_back_the_targets_grants(
    server: Server, roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    make_tables(server.dsn)
    worker = roles.create("worker")
    env = cli_env(server.dsn, fake_api)
    assert run_cli(["grant-worker", worker], env).returncode == 0
    check = (
        "SELECT c AS column, has_column_privilege(%s, 'docs', c, 'UPDATE') AS may_update"
        " FROM unnest(ARRAY['embedding', 'model', 'embedded_at']) AS c ORDER BY c"
    )
    assert {r["may_update"] for r in execute(server.dsn, check, (worker,))} == {True}

    done = run_cli(["unregister", "docs", "--column", "embedding"], env)
    assert done.returncode == 0, done.stderr
    assert execute(server.dsn, "SELECT count(*) AS n FROM embedding_targets") == [{"n": 0}]
    kept = [r["column"] for r in execute(server.dsn, check, (worker,)) if r["may_update"]]
    assert kept == [], f"after unregister the worker role may still update docs.{kept}"


# --- the catalog check ----------------------------------------------------------------------

CATALOG_CHECK = """
SELECT p.oid::regprocedure::text AS function,
       EXISTS (SELECT 1
                 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
                WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS public_may_execute,
       (SELECT substr(c, length('search_path=') + 1)
          FROM unnest(p.proconfig) AS c WHERE c LIKE 'search\\_path=%%') AS search_path
  FROM pg_proc AS p
 WHERE p.prosecdef
   AND p.pronamespace = ANY(%(schemas)s::regnamespace[])
   AND NOT EXISTS (SELECT 1 FROM pg_depend AS d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                      AND d.deptype = 'e')
 ORDER BY 1
"""


def ends_in_pg_temp(search_path: str | None) -> bool:
    if search_path is None:
        return False
    parts = [p.strip().strip('"') for p in search_path.split(",")]
    return parts[-1] == "pg_temp" and parts.count("pg_temp") == 1


def test_no_security_definer_function_is_public_or_has_an_open_search_path(
    server: Server,
) -> None:
    """Every SECURITY DEFINER function in the queue schema (the generated per-target ones
    included: a target is registered first) is not executable by PUBLIC and pins a
    search_path ending in pg_temp."""
    make_tables(server.dsn)
    found = execute(server.dsn, CATALOG_CHECK, {"schemas": ["public"]})
    names = [r["function"] for r in found]
    assert "embedding_queue_expand(integer)" in names
    assert sum(1 for n in names if n.startswith("embedding_queue_t")) >= 4, names
    bad = [
        f"{r['function']}: PUBLIC may execute={r['public_may_execute']},"
        f" search_path={r['search_path']!r}"
        for r in found
        if r["public_may_execute"] or not ends_in_pg_temp(r["search_path"])
    ]
    assert bad == [], "\n".join(bad)


# --- hole 11: default privileges and row-level security -----------------------------------


def migrate_database(dsn: str) -> None:
    async def run() -> None:
        async with Database(dsn, min_size=1, max_size=1) as db:
            await migrate(db)

    anyio.run(run)


def supabase_like(empty_db: str, roles: Roles) -> str:
    """Supabase's setup in a fresh database: ``anon`` gets ALL on every new table, sequence
    and function in public, then the tool is installed there and ``docs`` registered, with
    one queued private row. Returns the anon role."""
    anon = roles.create("anon")
    for kind in ("TABLES", "SEQUENCES", "FUNCTIONS"):
        execute(
            empty_db,
            sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON {} TO {}").format(
                sql.SQL(kind), ident(anon)
            ),
        )
    migrate_database(empty_db)
    make_tables(empty_db)
    execute(empty_db, "INSERT INTO docs (id, body) VALUES (1, %s)", (SECRET,))
    return anon


def our_tables(dsn: str) -> list[str]:
    """The tables migrate created in the queue schema (public here)."""
    rows = execute(
        dsn,
        "SELECT c.relname AS name FROM pg_class AS c"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
        "   AND c.relname NOT IN ('docs', 'secrets') ORDER BY 1",
    )
    names = [str(r["name"]) for r in rows]
    assert "embedding_queue" in names
    return names


def test_default_privileges_show_and_change_no_queue_row(
    server: Server, roles: Roles, empty_db: str
) -> None:
    """anon, holding ALL on our tables by default privileges, sees no row of any of them
    (row-level security, no policy for it) and changes none; a role made a worker by
    grant-worker still reads the queue."""
    anon = supabase_like(empty_db, roles)
    worker = roles.create("worker")
    with roles.login(empty_db, anon) as conn:
        seen: dict[str, int] = {}
        for table in our_tables(empty_db):
            try:
                row = conn.execute(
                    sql.SQL("SELECT count(*) AS n FROM {}").format(ident(table))
                ).fetchone()
            except errors.InsufficientPrivilege:
                continue
            assert row is not None
            if row["n"]:
                seen[table] = int(row["n"])
        # Refused (42501: no privilege, or the row-level security check) or without effect.
        with contextlib.suppress(errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content)"
                " VALUES ('docs', '999', 'embedding', 'forged by anon')"
            )
        with contextlib.suppress(errors.InsufficientPrivilege):
            conn.execute("UPDATE embedding_queue SET content = 'forged by anon'")
        with contextlib.suppress(errors.InsufficientPrivilege):
            conn.execute("DELETE FROM embedding_queue")
    assert seen == {}, f"anon reads rows of {seen}"
    assert [(r["record_id"], r["content"]) for r in queue_snapshot(empty_db)] == [("1", SECRET)]

    execute(empty_db, "SELECT public.embedding_grant_worker(%s::name)", (worker,))
    with roles.login(empty_db, worker) as conn:
        pending = conn.execute(
            "SELECT record_id, status FROM embedding_queue WHERE status = 'pending'"
        ).fetchall()
    assert pending == [{"record_id": "1", "status": "pending"}]


def test_default_privileges_give_no_truncate_or_trigger_on_our_tables(
    server: Server, roles: Roles, empty_db: str
) -> None:
    """Row-level security does not cover TRUNCATE, and TRIGGER lets a role attach its own
    function to the queue, which the generated SECURITY DEFINER triggers then fire as the
    queue's owner whenever any role writes a registered table."""
    anon = supabase_like(empty_db, roles)
    with roles.login(empty_db, anon) as conn:
        conn.execute(
            "CREATE FUNCTION pg_temp.spy() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN PERFORM set_config('spy.ran_as', current_user::text, false); RETURN NULL;"
            " END $$"
        )
        with contextlib.suppress(errors.InsufficientPrivilege):
            conn.execute(
                "CREATE TRIGGER spy AFTER INSERT ON embedding_queue"
                " FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.spy()"
            )
        # anon may write docs (default privileges, too): its insert is queued by the owner.
        conn.execute("INSERT INTO docs (id, body) VALUES (2, 'two')")
        ran_as = conn.execute("SELECT current_setting('spy.ran_as', true) AS v").fetchone()
        with contextlib.suppress(errors.InsufficientPrivilege):
            conn.execute("TRUNCATE embedding_queue")
    assert ran_as is not None
    assert ran_as["v"] in (None, "", anon), f"anon's trigger function ran as {ran_as['v']}"
    assert [r["record_id"] for r in queue_snapshot(empty_db)] == ["1", "2"]
    held = execute(
        empty_db,
        "SELECT t AS table, p AS privilege FROM unnest(%s::text[]) AS t,"
        " unnest(ARRAY['TRUNCATE', 'TRIGGER', 'REFERENCES']) AS p"
        " WHERE has_table_privilege(%s, t, p) ORDER BY 1, 2",
        (our_tables(empty_db), anon),
    )
    assert held == []


def test_default_privileges_give_no_security_definer_function(
    server: Server, roles: Roles, empty_db: str
) -> None:
    """Functions in an exposed schema are callable as RPC: anon, given EXECUTE on every new
    function by default privileges, may call none of our SECURITY DEFINER functions."""
    anon = supabase_like(empty_db, roles)
    with roles.login(empty_db, anon) as conn:
        assert expand_as(conn) is None, "anon may call embedding_queue_expand()"
    callable_by_anon = execute(
        empty_db,
        "SELECT p.oid::regprocedure::text AS function FROM pg_proc AS p"
        " WHERE p.prosecdef AND p.pronamespace = 'public'::regnamespace"
        "   AND has_function_privilege(%s, p.oid, 'EXECUTE') ORDER BY 1",
        (anon,),
    )
    assert callable_by_anon == []


# --- holes not in the list ------------------------------------------------------------


def test_no_overload_in_the_queue_schema_runs_inside_our_functions(
    server: Server, roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    """A role that may CREATE in the queue schema plants exact-type overloads of polymorphic
    or variadic built-ins (``cardinality(anyarray)``, ``format(text, VARIADIC "any")``, ...):
    an exact match beats pg_catalog's even with pg_catalog first on the search_path. None may
    run during the whole life cycle: register, grant-worker, a bulk insert drained by the
    worker role, unregister."""
    attacker = attacker_with_create(server, roles)
    worker = roles.create("worker")
    overloads = {
        "cardinality": ("a text[]", "integer", "pg_catalog.cardinality(a)"),
        "array_length": ("a text[], d integer", "integer", "pg_catalog.array_length(a, d)"),
        "format": ("f text, a text", "text", "pg_catalog.format(f, a)"),
        "concat_ws": ("s text, a text, b text", "text", "pg_catalog.concat_ws(s, a, b)"),
    }
    with roles.login(server.dsn, attacker) as conn:
        for name, (args, returns, real) in overloads.items():
            conn.execute(
                f"""CREATE FUNCTION public.{name}({args}) RETURNS {returns}
                    LANGUAGE plpgsql AS $$
                    BEGIN
                        INSERT INTO public.hijack_log VALUES (current_user, '{name}');
                        RETURN {real};
                    END $$"""
            )
    make_tables(server.dsn)
    env = cli_env(server.dsn, fake_api)
    assert run_cli(["grant-worker", worker], env).returncode == 0
    execute(
        server.dsn,
        "INSERT INTO docs (id, body) SELECT g, 'bulk ' || g FROM generate_series(1, 1000) g",
    )
    drained = run_cli(["run", "--drain"], cli_env(roles.dsn(server.dsn, worker), fake_api))
    assert drained.returncode == 0, drained.stderr
    assert summary_counts(drained.stdout)["processed"] == 1000
    assert run_cli(["unregister", "docs", "--column", "embedding"], env).returncode == 0
    ran = execute(server.dsn, "SELECT who, what, count(*) AS n FROM hijack_log GROUP BY 1, 2")
    assert ran == [], f"planted overloads ran: {ran}"


@pytest.fixture
def tenant(server: Server, roles: Roles) -> str:
    """A role that owns its schema ``tenant`` and a registered table ``tenant.docs`` in it
    (registered by the superuser), as an application that runs its own migrations does."""
    role = roles.create("tenant")
    execute(server.dsn, sql.SQL("CREATE SCHEMA tenant AUTHORIZATION {}").format(ident(role)))
    with roles.login(server.dsn, role) as conn:
        conn.execute("CREATE TABLE tenant.docs (id int PRIMARY KEY, body text, embedding real[])")
        conn.execute("CREATE TABLE tenant.log (who text)")
        conn.execute("GRANT INSERT ON tenant.log TO PUBLIC")
    execute(
        server.dsn,
        "SELECT embedding_register_target('tenant.docs', 'embedding',"
        " p_content_columns => ARRAY['body'], p_dimensions => %s)",
        (DIMS,),
    )
    return role


def test_table_owners_triggers_never_run_as_the_queue_owner(
    server: Server, roles: Roles, tenant: str
) -> None:
    """The owner of a registered table adds a trigger of its own to it. The generated
    SECURITY DEFINER insert trigger clears a stale embedding (blank content inserted with a
    vector) by UPDATE-ing the table as the queue's owner, which fires the tenant's trigger
    as that owner (here a superuser)."""
    with roles.login(server.dsn, tenant) as conn:
        conn.execute(
            "CREATE FUNCTION tenant.spy() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO tenant.log VALUES (current_user); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER spy BEFORE UPDATE ON tenant.docs"
            " FOR EACH ROW EXECUTE FUNCTION tenant.spy()"
        )
        conn.execute("INSERT INTO tenant.docs VALUES (1, ' ', '{1,2,3}'), (2, 'two', NULL)")
        conn.execute("UPDATE tenant.docs SET body = 'two, edited' WHERE id = 2")
    who = {r["who"] for r in execute(server.dsn, "SELECT who FROM tenant.log")}
    assert who <= {tenant}, f"the tenant's trigger ran as {who - {tenant}}"
    queued = execute(server.dsn, "SELECT record_id, content FROM embedding_queue")
    assert queued == [{"record_id": "2", "content": "two, edited"}]


def test_expand_runs_no_code_of_the_table_owner_as_the_queue_owner(
    server: Server, roles: Roles, tenant: str, fake_api: FakeOpenAIServer
) -> None:
    """After a bulk insert, the owner of a registered table renames it and puts a view in
    its place whose column calls the tenant's function. embedding_queue_expand (SECURITY
    DEFINER), run by the worker role, must not evaluate it as the queue's owner. The function
    reports as whom it ran in a NOTICE, which reaches the client even if the call fails."""
    worker = roles.create("worker")
    assert run_cli(["grant-worker", worker], cli_env(server.dsn, fake_api)).returncode == 0
    with roles.login(server.dsn, tenant) as conn:
        conn.execute(
            "INSERT INTO tenant.docs (id, body) SELECT g, 'bulk ' || g"
            " FROM generate_series(1, 1000) g"
        )
        conn.execute(
            "CREATE FUNCTION tenant.spy(t text) RETURNS text LANGUAGE plpgsql AS $$"
            " BEGIN RAISE NOTICE 'spy ran as %', current_user; RETURN t; END $$"
        )
        conn.execute("ALTER TABLE tenant.docs RENAME TO docs_real")
        conn.execute(
            "CREATE VIEW tenant.docs AS SELECT id, tenant.spy(body) AS body, embedding"
            " FROM tenant.docs_real"
        )
    notices: list[str] = []
    with roles.login(server.dsn, worker) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT public.embedding_queue_expand(5000)")
    who = {n.removeprefix("spy ran as ") for n in notices if n.startswith("spy ran as ")}
    assert who <= {tenant, worker}, f"the tenant's function ran as {who - {tenant, worker}}"
