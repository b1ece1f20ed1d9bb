"""``setup_db.py --rollback`` (spec 003, "Rollback Plan"; daemon/rollback.py) against a real
PostgreSQL: after a day of traffic through a real bridge every chat row is identical and no
pgbridge object is left (the catalog is enumerated against the chat schema's allowlist); apply
after rollback gives back the same catalog and capture; extensions go only with the flag and
only those the apply created; no-op, ``--test``, ``--dry-run``; and the refusals: an object of
the user's built on pgbridge's, a hand-changed table, a role that is not the owner, locks.

CLI cases run ``setup_db.py`` as a subprocess, where the exit code and the one line matter.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from daemon.metrics import Metrics
from daemon.roles import Grants
from daemon.rollback import CHAT_TABLES
from daemon.schema import apply_schema, apply_schema_sync
from daemon.schema_check import catalog_problems
from daemon.store import Store
from tests.support.fixtures import ROOT, conninfo_env, running_bridge
from tests.support.helpers import (
    connect,
    head,
    make_room,
    make_user,
    post,
    recv,
    send,
    subscribe,
)
from tests.support.procs import until
from tests.support.trust import Roles


async def installed(conninfo: str) -> bool:
    """What a running bridge asks after a statement found an object missing (daemon.app)."""
    store = Store(conninfo, schema="public", metrics=Metrics())
    await store.open()
    try:
        return await store.installed()
    finally:
        await store.close()

SETUP_DB = str(ROOT / "setup_db.py")
LOCK = (0x70676272, 1)  # daemon/schema.py's advisory lock

# The chat schema (the line of docs/howto/rollback.md): what may be left in a schema after a
# rollback, besides the members of extensions.
CHAT_COLUMNS = {
    "users": ["id", "auth0_id", "email", "username", "full_name", "avatar_url", "created_at",
              "updated_at", "deleted_at"],
    "channels": ["id", "name", "description", "created_at", "updated_at", "deleted_at"],
    "messages": ["id", "channel_id", "user_id", "content", "created_at", "updated_at",
                 "deleted_at", "metadata"],
    "channel_members": ["channel_id", "user_id", "role", "joined_at"],
    "user_settings": ["user_id", "theme", "notifications_enabled", "preferences"],
    "user_status": ["user_id", "status", "last_seen", "custom_status"],
    "sync_state": ["id", "user_id", "last_sync", "sync_type", "metadata"],
    "reactions": ["id", "message_id", "user_id", "emoji", "created_at"],
    "files": ["id", "message_id", "name", "type", "size", "url", "created_at"],
    "message_reads": ["message_id", "user_id", "read_at"],
}
CHAT_INDEXES = {
    "channel_members_pkey", "channel_members_user_idx", "channels_live_name_idx",
    "channels_pkey", "files_message_idx", "files_pkey", "message_reads_pkey",
    "message_reads_user_idx", "messages_channel_created_idx", "messages_pkey",
    "messages_user_idx", "reactions_message_id_user_id_emoji_key", "reactions_pkey",
    "reactions_user_idx", "sync_state_pkey", "sync_state_user_idx", "user_settings_pkey",
    "user_status_pkey", "users_auth0_id_key", "users_email_key", "users_live_username_idx",
    "users_pkey",
}
CHAT_CONSTRAINTS = {
    "channel_members_channel_id_fkey", "channel_members_pkey", "channel_members_role_check",
    "channel_members_user_id_fkey", "channels_pkey", "files_message_id_fkey", "files_pkey",
    "files_size_check", "message_reads_message_id_fkey", "message_reads_pkey",
    "message_reads_user_id_fkey", "messages_channel_id_fkey", "messages_pkey",
    "messages_user_id_fkey", "reactions_message_id_fkey", "reactions_message_id_user_id_emoji_key",
    "reactions_pkey", "reactions_user_id_fkey", "sync_state_pkey", "sync_state_sync_type_check",
    "sync_state_user_id_fkey", "user_settings_pkey", "user_settings_theme_check",
    "user_settings_user_id_fkey", "user_status_pkey", "user_status_status_check",
    "user_status_user_id_fkey", "users_auth0_id_key", "users_email_key", "users_pkey",
}
CHAT_FUNCTIONS = {"gen_ulid", "touch_updated_at"}
CHAT_TRIGGERS = {"users_touch_updated_at", "channels_touch_updated_at",
                 "messages_touch_updated_at"}
NOT_MEMBER = ("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{}'::regclass "
              "AND d.objid = {}.oid AND d.deptype = 'e')")


def run_setup(conninfo: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SETUP_DB, *args], env=conninfo_env(conninfo),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int = 1) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    # the progress lines, each after the setup run's correlation id ("run <16 hex>: ")
    lines = [line for line in result.stderr.strip().splitlines()
             if not re.sub(r"^run [0-9a-f]{16}: ", "", line).startswith(
                 ("running the down", "roll back schema"))]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("setup_db.py: error: "), lines[0]
    return lines[0]


def connect_sync(conninfo: str) -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo, autocommit=True)


def leftovers(conn: psycopg.Connection[Any], schema: str = "public") -> list[str]:
    """Every object of ``schema`` outside the chat schema's allowlist (extension members left
    out): relations, columns, constraints, functions, triggers, types."""
    s = {"s": schema}
    found = [f"relation {name} ({kind})" for name, kind in conn.execute(
        "SELECT relname, relkind FROM pg_class c WHERE relnamespace = %(s)s::regnamespace AND "
        + NOT_MEMBER.format("pg_class", "c"), s).fetchall()
        if name not in CHAT_COLUMNS and name not in CHAT_INDEXES]
    for table, columns in CHAT_COLUMNS.items():
        got = [r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum", [f'"{schema}".{table}']).fetchall()]
        found += [f"column {table}.{c}" for c in got if c not in columns]
    # (PostgreSQL 18 records each NOT NULL as a constraint too, contype 'n': the columns above)
    found += [f"constraint {name}" for (name,) in conn.execute(
        "SELECT conname FROM pg_constraint WHERE connamespace = %(s)s::regnamespace "
        "AND contype <> 'n'", s).fetchall() if name not in CHAT_CONSTRAINTS]
    found += [f"function {name}" for (name,) in conn.execute(
        "SELECT proname FROM pg_proc p WHERE pronamespace = %(s)s::regnamespace AND "
        + NOT_MEMBER.format("pg_proc", "p"), s).fetchall() if name not in CHAT_FUNCTIONS]
    found += [f"trigger {name}" for (name,) in conn.execute(
        "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE c.relnamespace = %(s)s::regnamespace AND NOT t.tgisinternal", s).fetchall()
        if name not in CHAT_TRIGGERS]
    found += [f"type {name}" for (name,) in conn.execute(
        "SELECT typname FROM pg_type t WHERE typnamespace = %(s)s::regnamespace AND "
        + NOT_MEMBER.format("pg_type", "t") + " AND NOT (t.typelem <> 0 AND EXISTS (SELECT 1 "
        "FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.typelem "
        "AND d.deptype = 'e'))", s).fetchall() if name.lstrip("_") not in CHAT_COLUMNS]
    return found


def catalog(conn: psycopg.Connection[Any], schema: str = "public") -> dict[str, Any]:
    """The schema's catalog as text: relations, columns (in order, with types, NOT NULL and
    defaults), constraints, indexes, triggers, functions (a hash of their source, settings),
    sequences and every ACL."""
    q = {
        "relations": "SELECT relname, relkind, relacl::text FROM pg_class "
                     "WHERE relnamespace = %(s)s::regnamespace ORDER BY 1",
        "columns": "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), "
                   "a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attacl::text "
                   "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                   "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                   "WHERE c.relnamespace = %(s)s::regnamespace AND a.attnum > 0 "
                   "AND NOT a.attisdropped ORDER BY c.relname, a.attnum",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), "
                       "convalidated FROM pg_constraint "
                       "WHERE connamespace = %(s)s::regnamespace ORDER BY 1, 2",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %(s)s "
                   "ORDER BY 1",
        "triggers": "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled "
                    "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "WHERE c.relnamespace = %(s)s::regnamespace AND NOT t.tgisinternal "
                    "ORDER BY 1, 2",
        "functions": "SELECT proname, pg_get_function_identity_arguments(oid), md5(prosrc), "
                     "prosecdef, proconfig, proacl::text FROM pg_proc "
                     "WHERE pronamespace = %(s)s::regnamespace ORDER BY 1, 2",
        "sequences": "SELECT c.relname, s.seqstart, s.seqmin, s.seqmax, s.seqcycle "
                     "FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid "
                     "WHERE c.relnamespace = %(s)s::regnamespace ORDER BY 1",
        "schema": "SELECT nspacl::text FROM pg_namespace WHERE nspname = %(s)s",
        "extensions": "SELECT extname FROM pg_extension ORDER BY 1",
    }
    return {name: conn.execute(query, {"s": schema}).fetchall() for name, query in q.items()}


def chat_rows(conn: psycopg.Connection[Any], schema: str = "public") -> dict[str, Any]:
    """Every row of every chat table, pgbridge's columns left out, in a stable order."""
    rows = {}
    for table in CHAT_TABLES:
        row = conn.execute(sql.SQL(
            "SELECT coalesce(jsonb_agg(r ORDER BY r::text), '[]') FROM "
            "(SELECT to_jsonb(t) - 'room_id' - 'last_seq' AS r FROM {} t) x").format(
                sql.Identifier(schema, table))).fetchone()
        rows[table] = row[0] if row else None
    return rows


def privileges_of(conn: psycopg.Connection[Any], role: str, schema: str = "public") -> list[str]:
    """Every privilege ``role`` holds on the schema or anything in it."""
    return [str(r[0]) for r in conn.execute(
        "SELECT 'schema ' || a.privilege_type FROM pg_namespace n, aclexplode(n.nspacl) a "
        "WHERE n.nspname = %(s)s AND a.grantee = %(r)s::regrole "
        "UNION ALL SELECT c.relname || ' ' || a.privilege_type FROM pg_class c, "
        "aclexplode(c.relacl) a WHERE c.relnamespace = %(s)s::regnamespace "
        "AND a.grantee = %(r)s::regrole "
        "UNION ALL SELECT c.relname || '.' || t.attname || ' ' || a.privilege_type "
        "FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid, aclexplode(t.attacl) a "
        "WHERE c.relnamespace = %(s)s::regnamespace AND a.grantee = %(r)s::regrole "
        "UNION ALL SELECT p.proname || ' ' || a.privilege_type FROM pg_proc p, "
        "aclexplode(p.proacl) a WHERE p.pronamespace = %(s)s::regnamespace "
        "AND a.grantee = %(r)s::regrole ORDER BY 1", {"s": schema, "r": role}).fetchall()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def granted_db(fresh_db: str, roles: Roles) -> Iterator[str]:
    """A new database with pgbridge applied and the application and bridge roles granted;
    their privileges are dropped afterwards (so that the roles can be)."""
    apply_schema_sync(fresh_db, grants=Grants(app=(roles.app,), bridge=(roles.bridge,)))
    yield fresh_db
    with connect_sync(fresh_db) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}, {}, {}").format(
            *map(sql.Identifier, (roles.app, roles.bridge, roles.nobody))))


def seed(conn: psycopg.Connection[Any]) -> None:
    """Rows in every chat table, as the application writes them, resume rows included."""
    conn.execute("INSERT INTO users (id, auth0_id, email, username) VALUES "
                 "('U1', 'a|1', 'u1@example.test', 'u1'), ('U2', 'a|2', 'u2@example.test', 'u2')")
    conn.execute("INSERT INTO channels (id, name) VALUES ('R1', 'general')")
    conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES ('R1', 'U1'), "
                 "('R1', 'U2')")
    conn.execute("INSERT INTO messages (id, channel_id, user_id, content) VALUES "
                 "('M1', 'R1', 'U1', 'hello')")
    conn.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES ('M1', 'U2', ':)')")
    conn.execute("INSERT INTO files (message_id, name, type, size, url) VALUES "
                 "('M1', 'a.png', 'image/png', 3, 'https://x.invalid/a.png')")
    conn.execute("INSERT INTO message_reads (message_id, user_id) VALUES ('M1', 'U2')")
    conn.execute("INSERT INTO user_settings (user_id, theme) VALUES ('U1', 'dark')")
    conn.execute("INSERT INTO user_status (user_id, status) VALUES ('U1', 'away')")
    conn.execute("INSERT INTO sync_state (user_id, sync_type, room_id, last_seq) VALUES "
                 "('U2', 'events', 'R1', 1), ('U1', 'full', NULL, NULL)")


# --- a day of traffic -------------------------------------------------------------------------

@pytest.mark.slow
async def test_rollback_after_a_day_of_traffic_keeps_every_chat_row_and_no_pgbridge_object(
        fresh_db: str) -> None:
    await apply_schema(fresh_db)
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as app:
        users = [await make_user(app, f"user{i}") for i in range(4)]
        rooms = [await make_room(app, *users[:3], name="general"),
                 await make_room(app, users[0], users[3], name="pair")]
        async with running_bridge(fresh_db) as bridge:
            sockets = []
            for user in users[:3]:  # online, watching presence, in the first room
                ws = await connect(bridge.port, user)
                await subscribe(ws, rooms[0], presence=True)
                sockets.append(ws)
            messages = [await post(app, rooms[0], users[i % 3], f"message {i}") for i in range(6)]
            await post(app, rooms[1], users[3], "in the pair room")
            await app.execute("UPDATE messages SET content = 'edited' WHERE id = %s",
                              [messages[0]])
            await app.execute("UPDATE messages SET deleted_at = now() WHERE id = %s",
                              [messages[1]])
            for i, message in enumerate(messages[2:5]):
                await app.execute("INSERT INTO reactions (message_id, user_id, emoji) "
                                  "VALUES (%s, %s, ':+1:')", (message, users[i]))
                await app.execute("INSERT INTO message_reads (message_id, user_id) "
                                  "VALUES (%s, %s)", (message, users[(i + 1) % 3]))
            await app.execute("INSERT INTO files (message_id, name, type, size, url) VALUES "
                              "(%s, 'a.png', 'image/png', 10, 'https://x.invalid/a')",
                              [messages[2]])
            await app.execute("INSERT INTO user_settings (user_id, theme) VALUES (%s, 'dark')",
                              [users[0]])
            await app.execute("INSERT INTO sync_state (user_id, sync_type, metadata) VALUES "
                              "(%s, 'full', '{\"device\": \"web\"}')", [users[1]])
            await app.execute("INSERT INTO channel_members (channel_id, user_id) "
                              "VALUES (%s, %s)", (rooms[1], users[1]))
            await app.execute("DELETE FROM channel_members WHERE channel_id = %s "
                              "AND user_id = %s", (rooms[1], users[1]))
            await send(sockets[0], type="typing", room=rooms[0])
            last = await head(app, rooms[0])
            for ws in sockets:  # every event reached every client, each acks the last
                seq = 0
                while seq < last:
                    frame = await recv(ws)
                    if frame["type"] == "event":
                        seq = int(frame["seq"])
                await send(ws, type="ack", room=rooms[0], seq=last)

            async def acked() -> bool:
                cur = await app.execute("SELECT count(*) FROM sync_state WHERE room_id = %s "
                                        "AND last_seq = %s", (rooms[0], last))
                return (await cur.fetchone() or (0,))[0] == 3

            async def online() -> bool:
                cur = await app.execute("SELECT count(*) FROM user_status "
                                        "WHERE status = 'online'")
                return (await cur.fetchone() or (0,))[0] == 3

            await until(acked, "the three acks in sync_state")
            await until(online, "the three users online in user_status")
            await app.execute("UPDATE user_status SET custom_status = 'lunch' WHERE user_id = %s",
                              [users[0]])
            for ws in sockets:
                await ws.close()
    with connect_sync(fresh_db) as conn:
        before = chat_rows(conn)
        total = sum(len(rows) for rows in before.values())
        assert len(before["messages"]) == 7 and len(before["sync_state"]) == 4
        started = time.monotonic()
        result = run_setup(fresh_db, "--rollback")
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert (f"verified 10 chat tables, {total} rows, identical before and after"
                in result.stdout), result.stdout
        print(f"\nrollback of {total} chat rows: {took:.2f} s (process included)\n"
              + result.stdout)
        assert chat_rows(conn) == before
        assert leftovers(conn) == []
        assert not conn.execute("SELECT to_regclass('public.change_events') IS NOT NULL "
                                "OR to_regclass('public.change_doorbell') IS NOT NULL"
                                ).fetchone()[0]  # type: ignore[index]


# --- apply, rollback, apply -------------------------------------------------------------------

@pytest.mark.slow
async def test_apply_after_rollback_gives_back_the_same_catalog_data_and_capture(
        granted_db: str, roles: Roles) -> None:
    grants = Grants(app=(roles.app,), bridge=(roles.bridge,))
    with connect_sync(granted_db) as conn:
        seed(conn)
        schema_before, rows_before = catalog(conn), chat_rows(conn)
        assert await installed(granted_db)
        result = run_setup(granted_db, "--rollback")
        assert result.returncode == 0, result.stderr
        assert f"revoked role {roles.bridge}'s bridge privileges" in result.stdout
        assert leftovers(conn) == []
        assert privileges_of(conn, roles.bridge) == []
        app_privileges = privileges_of(conn, roles.app)  # the application goes on
        for table in CHAT_TABLES:
            assert f"{table} SELECT" in app_privileges
        assert "messages INSERT" in app_privileges and "schema USAGE" in app_privileges
        assert not await installed(granted_db)
        await apply_schema(granted_db, grants=grants)
        assert catalog(conn) == schema_before
        assert chat_rows(conn) == rows_before
        verify = run_setup(granted_db, "--verify")
        assert verify.returncode == 0, verify.stderr
        conn.execute("INSERT INTO messages (id, channel_id, user_id, content) "
                     "VALUES ('M2', 'R1', 'U2', 'captured again')")
        assert conn.execute("SELECT count(*) FROM change_events WHERE row_id = 'M2'"
                            ).fetchone() == (1,)


# --- no-op ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_rollback_without_pgbridge_and_a_second_rollback_change_nothing(fresh_db: str) -> None:
    with connect_sync(fresh_db) as conn:
        empty = catalog(conn)
        result = run_setup(fresh_db, "--rollback", "--drop-extensions")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("no pgbridge objects, nothing to roll back")
        assert catalog(conn) == empty
        apply_schema_sync(fresh_db)
        seed(conn)
        assert run_setup(fresh_db, "--rollback").returncode == 0
        after_first, rows = catalog(conn), chat_rows(conn)
        again = run_setup(fresh_db, "--rollback")
        assert again.returncode == 0, again.stderr
        line = again.stdout.strip()
        assert line.startswith("schema public at ") and "\n" not in line
        assert line.endswith(f"/{conn.info.dbname}: no pgbridge objects, nothing to roll back")
        assert catalog(conn) == after_first and chat_rows(conn) == rows


def test_tables_of_another_tool_named_like_pgbridges_are_not_taken_for_it(fresh_db: str) -> None:
    """golang-migrate's and dbmate's ``schema_migrations`` and an audit table of the user's
    called ``change_events``, in a schema pgbridge was never applied to (or in public while it
    was applied to test): a rollback there finds nothing of pgbridge's and drops nothing."""
    with connect_sync(fresh_db) as conn:
        conn.execute("CREATE TABLE schema_migrations (version bigint PRIMARY KEY, "
                     "dirty boolean NOT NULL)")
        conn.execute("INSERT INTO schema_migrations VALUES (20240101120000, false), (2, false)")
        conn.execute("CREATE TABLE change_events (id serial PRIMARY KEY, what text)")
        conn.execute("INSERT INTO change_events (what) VALUES ('audit')")
        conn.execute("CREATE SCHEMA app")
        conn.execute("CREATE TABLE app.schema_files (file text PRIMARY KEY, body bytea)")
        before = catalog(conn), catalog(conn, "app")
        result = run_setup(fresh_db, "--rollback")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("no pgbridge objects, nothing to roll back")
        result = run_setup(fresh_db, "--rollback", "--schema", "app")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("no pgbridge objects, nothing to roll back")
        assert (catalog(conn), catalog(conn, "app")) == before
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (2,)


def test_a_table_of_the_owners_named_schema_extensions_elsewhere_is_no_ledger(
        fresh_db: str) -> None:
    """The owner's own ``schema_extensions`` in another schema, without pgbridge's columns:
    not a ledger, neither read (it has no ``name``) nor in the way of the rollback."""
    apply_schema_sync(fresh_db)
    with connect_sync(fresh_db) as conn:
        conn.execute("CREATE SCHEMA reports")
        conn.execute("CREATE TABLE reports.schema_extensions (ext text, enabled boolean)")
        result = run_setup(fresh_db, "--rollback", "--drop-extensions")
        assert result.returncode == 0, result.stderr
        assert leftovers(conn) == []
        assert conn.execute("SELECT to_regclass('reports.schema_extensions') IS NOT NULL"
                            ).fetchone() == (True,)


def test_a_chat_table_dropped_by_the_user_does_not_stop_the_rollback(fresh_db: str) -> None:
    """The user dropped sync_state (their choice): the down script of 0002 finds nothing to
    undo, and the rest of pgbridge goes."""
    apply_schema_sync(fresh_db)
    with connect_sync(fresh_db) as conn:
        seed(conn)
        conn.execute("DROP TABLE sync_state")
        result = run_setup(fresh_db, "--rollback")
        assert result.returncode == 0, result.stderr
        assert "verified 9 chat tables" in result.stdout
        assert conn.execute("SELECT to_regclass('change_events') IS NULL").fetchone() == (True,)


def test_a_partly_removed_install_is_rolled_back_for_what_remains(fresh_db: str) -> None:
    from daemon.rollback import rollback_schema

    apply_schema_sync(fresh_db)
    with connect_sync(fresh_db) as conn:
        seed(conn)
        rows = chat_rows(conn)
        conn.execute("DROP TABLE schema_migrations, presence_sessions")
        conn.execute("DROP TRIGGER messages_capture ON messages")
        report = asyncio.run(rollback_schema(fresh_db))
        assert report.downs == ["0002_sync_state_resume", "0001_spec_constraints"]
        assert leftovers(conn) == [] and chat_rows(conn) == rows


# --- extensions ----------------------------------------------------------------------------

def needs_contrib(conn: psycopg.Connection[Any]) -> None:
    available = conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name IN "
                             "('uuid-ossp', 'pgcrypto', 'citext')").fetchone()
    if available != (3,):
        pytest.skip("the server lacks the contrib extensions uuid-ossp, pgcrypto, citext")
    present = conn.execute("SELECT count(*) FROM pg_extension WHERE extname IN "
                           "('uuid-ossp', 'pgcrypto', 'citext')").fetchone()
    if present != (0,):
        pytest.skip("the server's template database already has the extensions")


def extensions(conn: psycopg.Connection[Any]) -> set[str]:
    return {r[0] for r in conn.execute("SELECT extname FROM pg_extension").fetchall()}


@pytest.mark.slow
def test_extensions_are_dropped_only_with_the_flag_and_only_those_the_apply_created(
        fresh_db: str) -> None:
    contrib = {"uuid-ossp", "pgcrypto", "citext"}
    with connect_sync(fresh_db) as conn:
        needs_contrib(conn)
        conn.execute("CREATE EXTENSION pgcrypto")  # the user's, before pgbridge came
        apply_schema_sync(fresh_db)
        assert {r[0] for r in conn.execute("SELECT name FROM schema_extensions")} == {
            "uuid-ossp", "citext"}
        kept = run_setup(fresh_db, "--rollback")
        assert kept.returncode == 0, kept.stderr
        assert extensions(conn) >= contrib
        assert "kept extension citext: created by pgbridge's apply; kept without " \
               "--drop-extensions" in kept.stdout
        # the ledger went with the rollback: the kept ones are the user's now
        apply_schema_sync(fresh_db)
        assert run_setup(fresh_db, "--rollback", "--drop-extensions").returncode == 0
        assert extensions(conn) >= contrib
        # a new ledger: the apply creates them again, and a user column comes to need citext
        conn.execute('DROP EXTENSION citext; DROP EXTENSION "uuid-ossp"')
        apply_schema_sync(fresh_db)
        conn.execute("CREATE TABLE handles (handle citext)")
        dropped = run_setup(fresh_db, "--rollback", "--drop-extensions")
        assert dropped.returncode == 0, dropped.stderr
        assert "dropped extensions uuid-ossp" in dropped.stdout
        assert ("kept extension citext: column handle of table handles depends on type citext"
                in dropped.stdout), dropped.stdout
        assert ("kept extension pgcrypto: not created by pgbridge's apply into this schema"
                in dropped.stdout)
        assert extensions(conn) & contrib == {"pgcrypto", "citext"}
        assert conn.execute("SELECT count(*) FROM handles").fetchone() == (0,)


@pytest.mark.slow
def test_an_extension_another_schemas_apply_recorded_is_kept(fresh_db: str) -> None:
    with connect_sync(fresh_db) as conn:
        needs_contrib(conn)
        apply_schema_sync(fresh_db)  # public records the three
        conn.execute("DROP EXTENSION citext")
        apply_schema_sync(fresh_db, schema="test")  # test records citext again
        result = run_setup(fresh_db, "--rollback", "--drop-extensions")
        assert result.returncode == 0, result.stderr
        assert "kept extension citext: pgbridge's apply into schema test recorded it too" \
            in result.stdout
        assert "citext" in extensions(conn) and "pgcrypto" not in extensions(conn)
        result = run_setup(fresh_db, "--rollback", "--test", "--drop-extensions")
        assert result.returncode == 0 and "dropped extensions citext" in result.stdout
        assert leftovers(conn, "test") == []


# --- --test and --dry-run ------------------------------------------------------------------

@pytest.mark.slow
def test_rolling_back_one_schema_leaves_the_other_installed(fresh_db: str) -> None:
    apply_schema_sync(fresh_db)
    apply_schema_sync(fresh_db, schema="test")

    async def problems(schema: str) -> list[str]:
        async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
            return await catalog_problems(conn, schema)

    with connect_sync(fresh_db) as conn:
        public = catalog(conn)
        assert run_setup(fresh_db, "--rollback", "--test").returncode == 0
        assert leftovers(conn, "test") == [] and catalog(conn) == public
        assert asyncio.run(problems("public")) == []
        apply_schema_sync(fresh_db, schema="test")
        test = catalog(conn, "test")
        assert run_setup(fresh_db, "--rollback").returncode == 0
        assert leftovers(conn) == [] and catalog(conn, "test") == test
        assert asyncio.run(problems("test")) == []


def test_rollback_dry_run_prints_the_sql_and_connects_to_nothing() -> None:
    result = run_setup(f"postgresql://postgres@127.0.0.1:{closed_port()}/none", "--rollback",
                       "--dry-run", "--test", "--drop-extensions")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("BEGIN;") and text.rstrip().endswith("COMMIT;")
    assert 'SET LOCAL search_path TO "test", pg_temp;' in text
    down_2 = text.index("sql/migrations/0002_sync_state_resume.down.sql")
    assert down_2 < text.index("sql/migrations/0001_spec_constraints.down.sql")
    assert "ALTER TABLE IF EXISTS sync_state DROP COLUMN IF EXISTS room_id RESTRICT;" in text
    for drop in ('DROP TABLE IF EXISTS "test"."change_events" RESTRICT;',
                 'DROP SEQUENCE IF EXISTS "test"."change_doorbell" RESTRICT;',
                 'DROP TRIGGER IF EXISTS "messages_capture" ON "test"."messages" RESTRICT;',
                 'DROP EXTENSION "citext" RESTRICT;'):
        assert drop in text
    statements = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    assert not [line for line in statements if "CASCADE" in line]


@pytest.mark.parametrize("args, message", [
    (["--drop-extensions"], "--drop-extensions: only with --rollback"),
    (["--rollback", "--verify"], "not allowed with argument"),
    (["--rollback", "--grant-app", "someone"], "are for the apply, not --rollback"),
])
def test_rollback_flags_misused_are_usage_errors(args: list[str], message: str) -> None:
    result = run_setup(f"postgresql://postgres@127.0.0.1:{closed_port()}/none", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# --- refusals: nothing changed -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("built, named", [
    ("CREATE VIEW audit AS SELECT room_id, seq FROM change_events",
     "view audit depends on table change_events"),
    ("CREATE TRIGGER mine AFTER DELETE ON users FOR EACH ROW "
     "EXECUTE FUNCTION pgbridge_user_gone()",
     "trigger mine on table users depends on function pgbridge_user_gone()"),
    ("CREATE VIEW resume AS SELECT user_id, room_id FROM sync_state",
     "view resume depends on column room_id of table sync_state"),
    # dropping a column takes its table's indexes and constraints with it, even RESTRICT
    ("CREATE INDEX mine ON sync_state (user_id, last_sync) WHERE room_id IS NULL",
     "index mine depends on column room_id of table sync_state"),
    ("ALTER TABLE sync_state ADD CONSTRAINT mine CHECK (last_seq < 1000000000)",
     "constraint mine on table sync_state depends on column last_seq of table sync_state"),
])
def test_an_object_of_the_users_built_on_pgbridges_stops_the_rollback_naming_it(
        fresh_db: str, built: str, named: str) -> None:
    apply_schema_sync(fresh_db)
    with connect_sync(fresh_db) as conn:
        seed(conn)
        conn.execute(built)
        schema, rows = catalog(conn), chat_rows(conn)
        line = one_line_error(run_setup(fresh_db, "--rollback"))
        assert "SQLSTATE 2BP01" in line and named in line and "nothing was changed" in line
        assert catalog(conn) == schema and chat_rows(conn) == rows


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    ("ALTER TABLE sync_state DROP COLUMN room_id",
     "public.sync_state.room_id is missing, not the character varying(26) migration 0002"),
    ("ALTER TABLE sync_state ALTER COLUMN last_seq TYPE numeric",
     "public.sync_state.last_seq is numeric, not the bigint migration 0002 added"),
])
def test_a_chat_table_changed_by_hand_stops_the_rollback_naming_the_column(
        fresh_db: str, change: str, named: str) -> None:
    apply_schema_sync(fresh_db)
    with connect_sync(fresh_db) as conn:
        seed(conn)
        conn.execute(change)
        schema, rows = catalog(conn), chat_rows(conn)
        line = one_line_error(run_setup(fresh_db, "--rollback"))
        assert named in line and "changed by hand" in line and "nothing was changed" in line
        assert catalog(conn) == schema and chat_rows(conn) == rows


@pytest.mark.parametrize("own", ["room_id varchar(26), last_seq bigint", "room_id varchar(26)",
                                 "last_seq bigint"])
def test_resume_columns_the_user_had_before_the_apply_are_never_dropped(
        fresh_db: str, own: str) -> None:
    """sync_state from the bare spec plus columns of the user's own named like 0002's: the
    apply finds them there (ADD COLUMN IF NOT EXISTS), so they are not pgbridge's to drop."""
    with connect_sync(fresh_db) as conn:
        conn.execute("CREATE TABLE users (id varchar(26) PRIMARY KEY, auth0_id varchar(128) "
                     "UNIQUE NOT NULL, email varchar(255) UNIQUE NOT NULL, username varchar(255) "
                     "NOT NULL, deleted_at timestamptz)")
        conn.execute(f"CREATE TABLE sync_state (id varchar(26) PRIMARY KEY, user_id varchar(26) "
                     f"NOT NULL REFERENCES users(id), last_sync timestamptz NOT NULL DEFAULT "
                     f"now(), sync_type varchar(50) NOT NULL, metadata jsonb, {own})")
        conn.execute("INSERT INTO users VALUES ('U1', 'a|1', 'u1@example.test', 'u1', NULL)")
        mine = [c.split()[0] for c in own.split(", ")]
        conn.execute(sql.SQL("INSERT INTO sync_state (id, user_id, sync_type, {}) VALUES "
                             "('S1', 'U1', 'full', {})").format(
            sql.SQL(", ").join(map(sql.Identifier, mine)),
            sql.SQL(", ").join(sql.Literal("7") for _ in mine)))
        apply_schema_sync(fresh_db)
        schema = catalog(conn)
        line = one_line_error(run_setup(fresh_db, "--rollback"))
        assert "sync_state" in line and "nothing was changed" in line
        assert catalog(conn) == schema
        assert conn.execute(sql.SQL("SELECT {} FROM sync_state").format(
            sql.SQL(", ").join(map(sql.Identifier, mine)))).fetchall() == [
                tuple("7" if c == "room_id" else 7 for c in mine)]


@pytest.mark.slow
@pytest.mark.parametrize("meddling, what", [
    ("UPDATE public.messages SET content = content || '!'", "messages changed during the "
     "rollback (row checksum)"),
    ("DELETE FROM public.reactions", "reactions changed during the rollback (rows 1 -> 0)"),
])
def test_a_chat_row_changed_during_the_rollback_rolls_everything_back(
        fresh_db: str, meddling: str, what: str) -> None:
    """The verification, proven: an event trigger of the user's writes a chat table when the
    rollback drops something."""
    apply_schema_sync(fresh_db)
    with connect_sync(fresh_db) as conn:
        seed(conn)
        conn.execute(f"CREATE FUNCTION meddle() RETURNS event_trigger LANGUAGE plpgsql AS "
                     f"$$ BEGIN {meddling}; END $$")
        conn.execute("CREATE EVENT TRIGGER meddle ON sql_drop EXECUTE FUNCTION meddle()")
        schema, rows = catalog(conn), chat_rows(conn)
        line = one_line_error(run_setup(fresh_db, "--rollback"))
        assert f"chat table {what}: rolled back, nothing was changed" in line
        assert catalog(conn) == schema and chat_rows(conn) == rows


@pytest.mark.slow
@pytest.mark.parametrize("who", ["app", "bridge", "nobody"])
def test_a_role_that_is_not_the_owner_gets_42501_and_who_to_run_it_as(
        granted_db: str, roles: Roles, who: str) -> None:
    with connect_sync(granted_db) as conn:
        schema = catalog(conn)
        owner = conn.info.user
        line = one_line_error(run_setup(make_conninfo(granted_db, user=getattr(roles, who)),
                                        "--rollback"))
        assert "SQLSTATE 42501" in line
        assert (f"run setup_db.py --rollback as the owner of schema public (role {owner})"
                in line)
        assert catalog(conn) == schema


def test_a_read_only_role_granted_every_table_keeps_its_chat_privileges(
        granted_db: str, roles: Roles) -> None:
    """``GRANT SELECT ON ALL TABLES IN SCHEMA`` to a reporting role gives it SELECT on
    change_events too: it is not a bridge role, and keeps SELECT on every chat table."""
    reader = roles.nobody
    with connect_sync(granted_db) as conn:
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {0}; "
                             "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {0}").format(
            sql.Identifier(reader)))
        chat = [p for p in privileges_of(conn, reader)
                if p.split()[0] in ("schema", *CHAT_TABLES)]
        result = run_setup(granted_db, "--rollback")
        assert result.returncode == 0, result.stderr
        assert f"revoked role {reader}'s" not in result.stdout
        assert privileges_of(conn, reader) == chat
        assert privileges_of(conn, roles.bridge) == []


@pytest.mark.slow
def test_a_ledger_planted_by_another_role_neither_breaks_nor_sways_the_rollback(
        granted_db: str, roles: Roles) -> None:
    """A role that may CREATE in the database plants a schema_extensions of its own (recording
    every extension, with a column the rollback cannot read): not pgbridge's, ignored."""
    with connect_sync(granted_db) as conn:
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(roles.nobody)))
        with connect_sync(make_conninfo(granted_db, user=roles.nobody)) as attacker:
            attacker.execute("CREATE SCHEMA evil")
            attacker.execute("CREATE TABLE evil.schema_extensions (x int)")
        result = run_setup(granted_db, "--rollback", "--drop-extensions")
        assert result.returncode == 0, result.stderr
        assert leftovers(conn) == []
        conn.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(roles.nobody)))


@pytest.mark.slow
def test_a_transaction_holding_a_chat_table_makes_the_rollback_retry_then_give_up(
        fresh_db: str) -> None:
    apply_schema_sync(fresh_db)
    with connect_sync(fresh_db) as conn, psycopg.connect(fresh_db) as writer:
        schema = catalog(conn)
        writer.execute("INSERT INTO users (id, auth0_id, email, username) "
                       "VALUES ('W', 'a|w', 'w@example.test', 'w')")  # open, holds its lock
        started = time.monotonic()
        line = one_line_error(run_setup(fresh_db, "--rollback", "--lock-timeout", "0.2",
                                        "--max-wait", "1.5"))
        assert time.monotonic() - started < 10
        assert "SQLSTATE 55P03: could not take the locks to roll back schema public" in line
        assert catalog(conn) == schema
        writer.rollback()
        assert run_setup(fresh_db, "--rollback").returncode == 0


@pytest.mark.slow
def test_the_rollback_waits_for_an_apply_holding_the_advisory_lock(fresh_db: str) -> None:
    apply_schema_sync(fresh_db)
    with psycopg.connect(fresh_db) as apply, connect_sync(fresh_db) as conn:
        apply.execute("SELECT pg_advisory_xact_lock(%s, %s)", LOCK)  # as a running apply
        process = subprocess.Popen([sys.executable, SETUP_DB, "--rollback"],
                                   env=conninfo_env(fresh_db), cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                           "AND NOT granted AND database = (SELECT oid FROM pg_database "
                           "WHERE datname = current_database())").fetchone() != (1,):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert conn.execute("SELECT to_regclass('change_events') IS NOT NULL").fetchone() == (
            True,)
        apply.commit()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "verified 10 chat tables, 0 rows, identical before and after" in out
        assert leftovers(conn) == []


def test_lines_of_a_rollback_name_counts_and_verification() -> None:
    from daemon.rollback import RollbackReport

    report = RollbackReport(schema="public", downs=["0002_x"], tables=10, rows=5,
                            dropped={"triggers": 2, "functions": 1, "tables": 0})
    lines = report.lines("db")
    assert lines[0] == ("schema public at db: rolled back: down migrations 0002_x; dropped "
                        "2 triggers, 1 function")
    assert lines[1] == "verified 10 chat tables, 5 rows, identical before and after"
    assert RollbackReport(schema="s", installed=False).lines("db") == [
        "schema s at db: no pgbridge objects, nothing to roll back"]

