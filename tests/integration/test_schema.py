"""The chat schema (spec 003, "Schema Documentation") as applied by daemon.schema / setup_db.py.

Against a real PostgreSQL (tests/support/fixtures.py): fresh apply, idempotence, in-place upgrade
of a database built from the bare spec DDL, ``--test`` isolation, concurrent applies, tampered
migrations, the constraints the spec asks for, ULID keys, ``updated_at``, and the CLI's
``--dry-run`` and ``--verify``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from ulid import ULID

from daemon.errors import SchemaError
from daemon.schema import (
    apply_schema,
    apply_schema_sync,
    check_schema,
    load_migrations,
    verify_schema,
)
from tests.support.fixtures import ROOT, conninfo_env

SPEC_TABLES = (
    "users", "channels", "messages", "channel_members", "reactions", "files", "user_settings",
    "user_status", "message_reads", "sync_state",
)
LOG_TABLES = ("change_sequences", "change_events", "change_notify_key", "schema_migrations",
              "schema_files", "schema_extensions", "presence_instances", "presence_sessions")

# Spec 003, "Schema Documentation", verbatim: the ten CREATE TABLE statements (foreign keys
# without ON DELETE, no CHECKs, no key defaults). A database built from this is what an
# existing ChatGenius installation looks like.
SPEC_DDL = """
CREATE TABLE users (
    id VARCHAR(26) PRIMARY KEY,
    auth0_id VARCHAR(128) UNIQUE NOT NULL,
    email VARCHAR(255) UNIQUE NOT NULL,
    username VARCHAR(255) NOT NULL,
    full_name VARCHAR(255),
    avatar_url TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    deleted_at TIMESTAMPTZ
);

CREATE TABLE channels (
    id VARCHAR(26) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    deleted_at TIMESTAMPTZ
);

CREATE TABLE messages (
    id VARCHAR(26) PRIMARY KEY,
    channel_id VARCHAR(26) NOT NULL REFERENCES channels(id),
    user_id VARCHAR(26) NOT NULL REFERENCES users(id),
    content TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    deleted_at TIMESTAMPTZ,
    metadata JSONB
);

CREATE TABLE channel_members (
    channel_id VARCHAR(26) NOT NULL REFERENCES channels(id),
    user_id VARCHAR(26) NOT NULL REFERENCES users(id),
    role VARCHAR(50) NOT NULL DEFAULT 'member',
    joined_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (channel_id, user_id)
);

CREATE TABLE reactions (
    id VARCHAR(26) PRIMARY KEY,
    message_id VARCHAR(26) NOT NULL REFERENCES messages(id),
    user_id VARCHAR(26) NOT NULL REFERENCES users(id),
    emoji VARCHAR(50) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE(message_id, user_id, emoji)
);

CREATE TABLE files (
    id VARCHAR(26) PRIMARY KEY,
    message_id VARCHAR(26) REFERENCES messages(id),
    name VARCHAR(255) NOT NULL,
    type VARCHAR(100) NOT NULL,
    size BIGINT NOT NULL,
    url TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE user_settings (
    user_id VARCHAR(26) PRIMARY KEY REFERENCES users(id),
    theme VARCHAR(50) DEFAULT 'light',
    notifications_enabled BOOLEAN DEFAULT true,
    preferences JSONB DEFAULT '{}'::jsonb
);

CREATE TABLE user_status (
    user_id VARCHAR(26) PRIMARY KEY REFERENCES users(id),
    status VARCHAR(50) NOT NULL DEFAULT 'offline',
    last_seen TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    custom_status TEXT
);

CREATE TABLE message_reads (
    message_id VARCHAR(26) NOT NULL REFERENCES messages(id),
    user_id VARCHAR(26) NOT NULL REFERENCES users(id),
    read_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (message_id, user_id)
);

CREATE TABLE sync_state (
    id VARCHAR(26) PRIMARY KEY,
    user_id VARCHAR(26) NOT NULL REFERENCES users(id),
    last_sync TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    sync_type VARCHAR(50) NOT NULL,
    metadata JSONB
);
"""

# The same tables as data, written from the spec: (column, type, NOT NULL) in column order.
SPEC_COLUMNS: dict[str, list[tuple[str, str, bool]]] = {
    "users": [
        ("id", "VARCHAR(26)", True), ("auth0_id", "VARCHAR(128)", True),
        ("email", "VARCHAR(255)", True), ("username", "VARCHAR(255)", True),
        ("full_name", "VARCHAR(255)", False), ("avatar_url", "TEXT", False),
        ("created_at", "TIMESTAMPTZ", True), ("updated_at", "TIMESTAMPTZ", True),
        ("deleted_at", "TIMESTAMPTZ", False),
    ],
    "channels": [
        ("id", "VARCHAR(26)", True), ("name", "VARCHAR(255)", True),
        ("description", "TEXT", False), ("created_at", "TIMESTAMPTZ", True),
        ("updated_at", "TIMESTAMPTZ", True), ("deleted_at", "TIMESTAMPTZ", False),
    ],
    "messages": [
        ("id", "VARCHAR(26)", True), ("channel_id", "VARCHAR(26)", True),
        ("user_id", "VARCHAR(26)", True), ("content", "TEXT", True),
        ("created_at", "TIMESTAMPTZ", True), ("updated_at", "TIMESTAMPTZ", True),
        ("deleted_at", "TIMESTAMPTZ", False), ("metadata", "JSONB", False),
    ],
    "channel_members": [
        ("channel_id", "VARCHAR(26)", True), ("user_id", "VARCHAR(26)", True),
        ("role", "VARCHAR(50)", True), ("joined_at", "TIMESTAMPTZ", True),
    ],
    "reactions": [
        ("id", "VARCHAR(26)", True), ("message_id", "VARCHAR(26)", True),
        ("user_id", "VARCHAR(26)", True), ("emoji", "VARCHAR(50)", True),
        ("created_at", "TIMESTAMPTZ", True),
    ],
    "files": [
        ("id", "VARCHAR(26)", True), ("message_id", "VARCHAR(26)", False),
        ("name", "VARCHAR(255)", True), ("type", "VARCHAR(100)", True),
        ("size", "BIGINT", True), ("url", "TEXT", True), ("created_at", "TIMESTAMPTZ", True),
    ],
    "user_settings": [
        ("user_id", "VARCHAR(26)", True), ("theme", "VARCHAR(50)", False),
        ("notifications_enabled", "BOOLEAN", False), ("preferences", "JSONB", False),
    ],
    "user_status": [
        ("user_id", "VARCHAR(26)", True), ("status", "VARCHAR(50)", True),
        ("last_seen", "TIMESTAMPTZ", True), ("custom_status", "TEXT", False),
    ],
    "message_reads": [
        ("message_id", "VARCHAR(26)", True), ("user_id", "VARCHAR(26)", True),
        ("read_at", "TIMESTAMPTZ", True),
    ],
    "sync_state": [
        ("id", "VARCHAR(26)", True), ("user_id", "VARCHAR(26)", True),
        ("last_sync", "TIMESTAMPTZ", True), ("sync_type", "VARCHAR(50)", True),
        ("metadata", "JSONB", False),
    ],
}
# What resume needs (docs/design.md, "sync_state"), added by migration 0002.
SYNC_STATE_EXTRA = [("room_id", "VARCHAR(26)", False), ("last_seq", "BIGINT", False)]

# ON DELETE rule of every foreign key in sql/schema.sql: (table, column) -> rule.
FK_RULES = {
    ("messages", "channel_id"): "CASCADE",
    ("messages", "user_id"): "RESTRICT",
    ("channel_members", "channel_id"): "CASCADE",
    ("channel_members", "user_id"): "CASCADE",
    ("user_settings", "user_id"): "CASCADE",
    ("user_status", "user_id"): "CASCADE",
    ("sync_state", "user_id"): "CASCADE",
    ("sync_state", "room_id"): "CASCADE",
    ("reactions", "message_id"): "CASCADE",
    ("reactions", "user_id"): "CASCADE",
    ("files", "message_id"): "CASCADE",
    ("message_reads", "message_id"): "CASCADE",
    ("message_reads", "user_id"): "CASCADE",
    ("presence_sessions", "instance_id"): "NO ACTION",
}
CROCKFORD = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
SETUP_DB = str(ROOT / "setup_db.py")


# --- helpers ---------------------------------------------------------------------------------

def connect(conninfo: str) -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo, autocommit=True)


def spec_type(data_type: str, length: int | None) -> str:
    """information_schema's type name, spelled as spec 003 spells it."""
    names = {"character varying": "VARCHAR", "timestamp with time zone": "TIMESTAMPTZ",
             "text": "TEXT", "jsonb": "JSONB", "bigint": "BIGINT", "boolean": "BOOLEAN"}
    name = names.get(data_type, data_type)
    return f"{name}({length})" if length is not None else name


def columns_of(conn: psycopg.Connection[Any], schema: str,
               table: str) -> list[tuple[str, str, bool]]:
    rows = conn.execute(
        "SELECT column_name, data_type, character_maximum_length, is_nullable "
        "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
        "ORDER BY ordinal_position", (schema, table)).fetchall()
    return [(name, spec_type(dtype, length), nullable == "NO")
            for name, dtype, length, nullable in rows]


def tables_of(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    rows = conn.execute("SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = %s", [schema]).fetchall()
    return {r[0] for r in rows}


def catalog_fingerprint(conn: psycopg.Connection[Any], schema: str = "public") -> dict[str, Any]:
    """Every definition the schema consists of, as text: relations, columns with defaults,
    constraints, indexes, functions and triggers."""
    q: dict[str, str] = {
        "relations": "SELECT c.relname, c.relkind FROM pg_class c "
                     "WHERE c.relnamespace = %(s)s::regnamespace ORDER BY 1",
        "columns": "SELECT table_name, ordinal_position, column_name, data_type, "
                   "character_maximum_length, is_nullable, column_default "
                   "FROM information_schema.columns WHERE table_schema = %(s)s ORDER BY 1, 2",
        "constraints": "SELECT r.relname, c.conname, pg_get_constraintdef(c.oid), "
                       "c.convalidated FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid "
                       "WHERE c.connamespace = %(s)s::regnamespace ORDER BY 1, 2",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %(s)s "
                   "ORDER BY 1",
        "functions": "SELECT p.proname, pg_get_function_identity_arguments(p.oid), "
                     "pg_get_functiondef(p.oid) FROM pg_proc p "
                     "WHERE p.pronamespace = %(s)s::regnamespace AND p.prokind = 'f' "
                     "ORDER BY 1, 2",
        "triggers": "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled "
                    "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "WHERE c.relnamespace = %(s)s::regnamespace AND NOT t.tgisinternal "
                    "ORDER BY 1, 2",
    }
    return {name: conn.execute(query, {"s": schema}).fetchall() for name, query in q.items()}


def data_snapshot(conn: psycopg.Connection[Any], schema: str = "public") -> dict[str, Any]:
    """Every row of every table of ``schema`` (as JSON, in a stable order)."""
    snapshot = {}
    for table in sorted(tables_of(conn, schema)):
        query = sql.SQL("SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY to_jsonb(t)::text), "
                        "'[]') FROM {}.{} t").format(sql.Identifier(schema), sql.Identifier(table))
        row = conn.execute(query).fetchone()
        snapshot[table] = row[0] if row else None
    return snapshot


def schema_objects(conn: psycopg.Connection[Any], schema: str) -> list[tuple[str, str]]:
    """Relations, functions and types in ``schema``."""
    return conn.execute(
        "SELECT 'relation', relname::text FROM pg_class WHERE relnamespace = %(s)s::regnamespace "
        "UNION ALL SELECT 'function', proname::text FROM pg_proc "
        "WHERE pronamespace = %(s)s::regnamespace "
        "UNION ALL SELECT 'type', typname::text FROM pg_type "
        "WHERE typnamespace = %(s)s::regnamespace ORDER BY 1, 2", {"s": schema}).fetchall()


def fk_rules(conn: psycopg.Connection[Any], schema: str) -> dict[tuple[str, str], str]:
    rows = conn.execute(
        "SELECT r.relname, a.attname, c.confdeltype FROM pg_constraint c "
        "JOIN pg_class r ON r.oid = c.conrelid "
        "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] "
        "WHERE c.contype = 'f' AND c.connamespace = %s::regnamespace", [schema]).fetchall()
    names = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL",
             "d": "SET DEFAULT"}
    return {(t, col): names[rule] for t, col, rule in rows}


def run_setup(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SETUP_DB, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def ulid() -> str:
    return str(ULID())


def seed_chat(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """One row in every spec table, ids given explicitly (the bare spec has no key defaults).
    Returns the ids."""
    ids = {k: ulid() for k in ("alice", "bob", "room", "msg", "reaction", "file", "sync")}
    for name, full_name in (("alice", "Alice A"), ("bob", None)):
        conn.execute("INSERT INTO users (id, auth0_id, email, username, full_name) "
                     "VALUES (%s, %s, %s, %s, %s)",
                     (ids[name], f"auth0|{ids[name]}", f"{ids[name]}@example.com", name,
                      full_name))
    conn.execute("INSERT INTO channels (id, name, description) VALUES (%(room)s, 'general', 'hi')",
                 ids)
    conn.execute("INSERT INTO channel_members (channel_id, user_id, role) VALUES "
                 "(%(room)s, %(alice)s, 'owner'), (%(room)s, %(bob)s, 'member')", ids)
    conn.execute("INSERT INTO messages (id, channel_id, user_id, content, metadata) VALUES "
                 "(%(msg)s, %(room)s, %(alice)s, 'hello', '{\"k\": [1, 2]}')", ids)
    conn.execute("INSERT INTO reactions (id, message_id, user_id, emoji) VALUES "
                 "(%(reaction)s, %(msg)s, %(bob)s, ':+1:')", ids)
    conn.execute("INSERT INTO files (id, message_id, name, type, size, url) VALUES "
                 "(%(file)s, %(msg)s, 'a.png', 'image/png', 123, 'https://x.invalid/a.png')", ids)
    conn.execute("INSERT INTO user_settings (user_id, theme) VALUES (%(alice)s, 'dark')", ids)
    conn.execute("INSERT INTO user_status (user_id, status) VALUES (%(alice)s, 'online')", ids)
    conn.execute("INSERT INTO message_reads (message_id, user_id) VALUES (%(msg)s, %(bob)s)", ids)
    conn.execute("INSERT INTO sync_state (id, user_id, sync_type, metadata) VALUES "
                 "(%(sync)s, %(bob)s, 'full', '{\"v\": 1}')", ids)
    return ids


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def applied_db(fresh_db: str) -> str:
    apply_schema_sync(fresh_db)
    return fresh_db


@pytest.fixture
def chat(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Autocommit connection to the shared database with the schema applied."""
    with connect(db_url) as conn:
        yield conn


# --- applying --------------------------------------------------------------------------------

def test_fresh_apply_creates_the_spec_tables_with_the_spec_columns(fresh_db: str) -> None:
    report = apply_schema_sync(fresh_db)
    assert report.applied == [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert report.warnings == []
    with connect(fresh_db) as conn:
        assert tables_of(conn, "public") == set(SPEC_TABLES) | set(LOG_TABLES)
        for table in SPEC_TABLES:
            expected = SPEC_COLUMNS[table] + (SYNC_STATE_EXTRA if table == "sync_state" else [])
            assert columns_of(conn, "public", table) == expected, table
        assert columns_of(conn, "public", "change_events") == [
            ("room_id", "VARCHAR(26)", True), ("seq", "BIGINT", True),
            ("table_name", "TEXT", True), ("op", "TEXT", True), ("row_id", "TEXT", True),
            ("payload", "JSONB", True), ("created_at", "TIMESTAMPTZ", True)]
        assert columns_of(conn, "public", "change_sequences") == [
            ("room_id", "VARCHAR(26)", True), ("last_seq", "BIGINT", True)]
        assert fk_rules(conn, "public") == FK_RULES
        versions = conn.execute("SELECT version, name, checksum FROM schema_migrations "
                                "ORDER BY version").fetchall()
        assert versions == [(m.version, m.name, m.checksum) for m in load_migrations()]


def test_spec_ddl_gives_the_spec_columns(fresh_db: str) -> None:
    """Cross-checks the two transcriptions of the spec used here (DDL and column table)."""
    with connect(fresh_db) as conn:
        conn.execute(SPEC_DDL)
        for table in SPEC_TABLES:
            assert columns_of(conn, "public", table) == SPEC_COLUMNS[table], table


def test_second_apply_changes_nothing_and_keeps_data(applied_db: str) -> None:
    with connect(applied_db) as conn:
        seed_chat(conn)
        conn.execute("UPDATE messages SET content = 'edited'")
        before = catalog_fingerprint(conn), data_snapshot(conn)
    assert sum(len(rows) for rows in before[1].values()) > 10
    report = apply_schema_sync(applied_db)
    assert (report.applied, report.warnings) == ([], [])
    with connect(applied_db) as conn:
        after = catalog_fingerprint(conn), data_snapshot(conn)
    assert after[0] == before[0]
    assert after[1] == before[1]


def test_bare_spec_database_is_upgraded_in_place(
        fresh_db: str, create_database: Callable[[], str]) -> None:
    with connect(fresh_db) as conn:
        conn.execute(SPEC_DDL)
        assert set(fk_rules(conn, "public").values()) == {"NO ACTION"}
        ids = seed_chat(conn)
        before = data_snapshot(conn)

    report = apply_schema_sync(fresh_db)
    assert report.applied == ["0001_spec_constraints", "0002_sync_state_resume"]

    reference = create_database()
    apply_schema_sync(reference)
    with connect(fresh_db) as conn, connect(reference) as ref:
        after = data_snapshot(conn)
        # Data kept: every old row is still there, sync_state with the new columns empty.
        for table in SPEC_TABLES:
            new_rows = after[table]
            if table == "sync_state":
                added = [(r.pop("room_id"), r.pop("last_seq")) for r in new_rows]
                assert added == [(None, None)]
            assert new_rows == before[table], table
        assert after["change_events"] == [] and after["change_sequences"] == []
        # The upgraded database is indistinguishable from a freshly created one.
        assert catalog_fingerprint(conn) == catalog_fingerprint(ref)
        assert fk_rules(conn, "public") == FK_RULES
        checks = {r[0] for r in conn.execute(
            "SELECT conname FROM pg_constraint WHERE contype = 'c' AND convalidated "
            "AND connamespace = 'public'::regnamespace")}
        assert {"channel_members_role_check", "user_settings_theme_check",
                "user_status_status_check", "sync_state_sync_type_check", "files_size_check",
                "sync_state_last_seq_check"} <= checks
        with pytest.raises(errors.CheckViolation):
            conn.execute("UPDATE channel_members SET role = 'root'")
        # sync_state: room and last seq, one row per user + room + sync_type.
        conn.execute("INSERT INTO sync_state (user_id, room_id, sync_type, last_seq) "
                     "VALUES (%s, %s, 'events', 7)", (ids["bob"], ids["room"]))
        with pytest.raises(errors.UniqueViolation):
            conn.execute("INSERT INTO sync_state (user_id, room_id, sync_type, last_seq) "
                         "VALUES (%s, %s, 'events', 8)", (ids["bob"], ids["room"]))
        recorded = conn.execute("SELECT version, checksum FROM schema_migrations "
                                "ORDER BY version").fetchall()
        assert recorded == [(m.version, m.checksum) for m in load_migrations()]
    assert asyncio.run(verify_schema(fresh_db)) == []


def test_bare_spec_rows_breaking_a_check_do_not_fail_the_upgrade(fresh_db: str) -> None:
    with connect(fresh_db) as conn:
        conn.execute(SPEC_DDL)
        ids = seed_chat(conn)
        conn.execute("UPDATE channel_members SET role = 'superuser' WHERE user_id = %s",
                     [ids["bob"]])
    report = apply_schema_sync(fresh_db)
    assert report.applied == ["0001_spec_constraints", "0002_sync_state_resume"]
    with connect(fresh_db) as conn:
        validated = conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'channel_members_role_check'"
        ).fetchone()
        assert validated == (False,)  # kept NOT VALID: the old row stays as it was
        assert conn.execute("SELECT role FROM channel_members WHERE user_id = %s",
                            [ids["bob"]]).fetchone() == ("superuser",)
        with pytest.raises(errors.CheckViolation):  # ... but new rows are checked
            conn.execute("UPDATE channel_members SET role = 'root' WHERE user_id = %s",
                         [ids["alice"]])


async def test_test_schema_leaves_public_untouched(fresh_db: str) -> None:
    with connect(fresh_db) as conn:
        public_before = schema_objects(conn, "public")
    report = await apply_schema(fresh_db, schema="test")
    assert report.schema == "test" and len(report.applied) == len(load_migrations())
    with connect(fresh_db) as conn:
        assert schema_objects(conn, "public") == public_before
        assert tables_of(conn, "public") == set()
        assert tables_of(conn, "test") == set(SPEC_TABLES) | set(LOG_TABLES)
    assert await verify_schema(fresh_db, schema="test") == []
    assert await verify_schema(fresh_db, schema="public") != []


@pytest.mark.slow
def test_setup_db_test_flag_leaves_public_untouched(fresh_db: str, tmp_path: Path) -> None:
    with connect(fresh_db) as conn:
        public_before = schema_objects(conn, "public")
    result = run_setup("--test", env=conninfo_env(fresh_db), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "schema test at" in result.stdout
    with connect(fresh_db) as conn:
        assert schema_objects(conn, "public") == public_before
        assert tables_of(conn, "public") == set()
        assert tables_of(conn, "test") == set(SPEC_TABLES) | set(LOG_TABLES)


async def test_concurrent_applies_on_a_fresh_database_both_succeed(fresh_db: str) -> None:
    reports = await asyncio.gather(*(apply_schema(fresh_db) for _ in range(4)))
    # Exactly one of them applied the migrations; the others waited and found nothing to do.
    assert sorted(len(r.applied) for r in reports) == [0, 0, 0, len(load_migrations())]
    assert all(r.warnings == [] for r in reports)
    assert await verify_schema(fresh_db) == []


@pytest.mark.slow
def test_concurrent_setup_db_processes_on_a_fresh_database_both_succeed(
        fresh_db: str, tmp_path: Path) -> None:
    env = conninfo_env(fresh_db)
    procs = [subprocess.Popen([sys.executable, SETUP_DB], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.returncode, out, err) for p in procs
                for out, err in [p.communicate(timeout=60)]]
    assert [rc for rc, _, _ in outcomes] == [0, 0], outcomes
    applied = sorted("nothing changed" in out for _, out, _ in outcomes)
    assert applied == [False, True], outcomes
    assert asyncio.run(verify_schema(fresh_db)) == []


@pytest.mark.slow
async def test_changed_checksum_of_an_applied_migration_is_reported(
        applied_db: str, tmp_path: Path) -> None:
    async with await psycopg.AsyncConnection.connect(applied_db, autocommit=True) as conn:
        await conn.execute("UPDATE schema_migrations SET checksum = repeat('0', 64) "
                           "WHERE version = 1")
    report = await apply_schema(applied_db)
    assert report.applied == []
    assert len(report.warnings) == 1 and "0001_spec_constraints" in report.warnings[0]
    assert "checksum" in report.warnings[0]
    problems = await verify_schema(applied_db)
    assert problems == ["migration 0001_spec_constraints changed after it was applied"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SETUP_DB, env=conninfo_env(applied_db), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await proc.communicate()
    assert proc.returncode == 0
    assert "warning: migration 0001_spec_constraints was changed" in stderr.decode()


# --- constraints -----------------------------------------------------------------------------

def new_user(conn: psycopg.Connection[Any], **columns: Any) -> str:
    uid = ulid()
    values = {"id": uid, "auth0_id": f"auth0|{uid}", "email": f"{uid}@example.com",
              "username": "u", **columns}
    names = sql.SQL(", ").join(map(sql.Identifier, values))
    marks = sql.SQL(", ").join(sql.Placeholder() * len(values))
    conn.execute(sql.SQL("INSERT INTO users ({}) VALUES ({})").format(names, marks),
                 list(values.values()))
    return uid


def new_room(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("INSERT INTO channels (name) VALUES ('room') RETURNING id").fetchone()
    assert row
    return str(row[0])


def new_message(conn: psycopg.Connection[Any], room: str, user: str) -> str:
    row = conn.execute("INSERT INTO messages (channel_id, user_id, content) VALUES (%s, %s, 'm') "
                       "RETURNING id", (room, user)).fetchone()
    assert row
    return str(row[0])


def count(conn: psycopg.Connection[Any], table: str, where: str, *params: Any) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE ").format(sql.Identifier(table))
                       + sql.SQL(where), params).fetchone()  # type: ignore[arg-type]
    assert row
    return int(row[0])


def test_foreign_keys_are_enforced(chat: psycopg.Connection[Any]) -> None:
    user = new_user(chat)
    with pytest.raises(errors.ForeignKeyViolation) as exc:
        chat.execute("INSERT INTO messages (channel_id, user_id, content) VALUES (%s, %s, 'x')",
                     (ulid(), user))
    assert exc.value.sqlstate == "23503"
    room = new_room(chat)
    with pytest.raises(errors.ForeignKeyViolation):
        chat.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                     (room, ulid()))
    with pytest.raises(errors.ForeignKeyViolation):
        chat.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, ':)')",
                     (ulid(), user))
    with pytest.raises(errors.ForeignKeyViolation):
        chat.execute("INSERT INTO sync_state (user_id, room_id, sync_type) "
                     "VALUES (%s, %s, 'events')", (user, ulid()))


@pytest.mark.parametrize(("table", "column", "good", "bad"), [
    ("channel_members", "role", ["owner", "admin", "member", "guest"], "superuser"),
    ("user_status", "status", ["online", "away", "busy", "offline"], "sleeping"),
    ("user_settings", "theme", ["light", "dark", "system"], "neon"),
    ("sync_state", "sync_type", ["full", "incremental", "events"], "partial"),
])
def test_check_constraints_on_enum_columns(chat: psycopg.Connection[Any], table: str, column: str,
                                           good: list[str], bad: str) -> None:
    room = new_room(chat)
    for value in [*good, bad]:
        user = new_user(chat)
        keys: dict[str, str] = {"user_id": user}
        if table == "channel_members":
            keys["channel_id"] = room
        if table == "sync_state":
            keys["room_id"] = room
        cols = {**keys, column: value}
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols)),
            sql.SQL(", ").join(sql.Placeholder() * len(cols)))
        if value == bad:
            with pytest.raises(errors.CheckViolation) as exc:
                chat.execute(stmt, list(cols.values()))
            assert exc.value.sqlstate == "23514"
            assert exc.value.diag.constraint_name == f"{table}_{column}_check"
        else:
            chat.execute(stmt, list(cols.values()))


def test_not_null_columns_refuse_null(chat: psycopg.Connection[Any]) -> None:
    with pytest.raises(errors.NotNullViolation) as exc:
        chat.execute("INSERT INTO users (auth0_id, username) VALUES (%s, 'x')", [ulid()])
    assert exc.value.sqlstate == "23502" and exc.value.diag.column_name == "email"
    room, user = new_room(chat), new_user(chat)
    with pytest.raises(errors.NotNullViolation):
        chat.execute("INSERT INTO messages (channel_id, user_id) VALUES (%s, %s)", (room, user))
    with pytest.raises(errors.NotNullViolation):
        chat.execute("INSERT INTO channels (name) VALUES (NULL)")
    with pytest.raises(errors.NotNullViolation):
        chat.execute("INSERT INTO sync_state (user_id) VALUES (%s)", [user])


def test_unique_email_and_reaction_triple(chat: psycopg.Connection[Any]) -> None:
    first = new_user(chat)
    with pytest.raises(errors.UniqueViolation) as exc:
        new_user(chat, email=f"{first}@example.com")
    assert exc.value.sqlstate == "23505" and exc.value.diag.constraint_name == "users_email_key"
    with pytest.raises(errors.UniqueViolation):
        new_user(chat, auth0_id=f"auth0|{first}")
    room = new_room(chat)
    message = new_message(chat, room, first)
    chat.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, ':+1:')",
                 (message, first))
    chat.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, ':-1:')",
                 (message, first))
    with pytest.raises(errors.UniqueViolation) as exc:
        chat.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, ':+1:')",
                     (message, first))
    assert exc.value.diag.constraint_name == "reactions_message_id_user_id_emoji_key"


def test_deleting_a_room_cascades_to_its_rows(chat: psycopg.Connection[Any]) -> None:
    user, other = new_user(chat), new_user(chat)
    room = new_room(chat)
    message = new_message(chat, room, user)
    chat.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)", (room, user))
    chat.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, 'x')",
                 (message, other))
    chat.execute("INSERT INTO files (message_id, name, type, size, url) "
                 "VALUES (%s, 'f', 't', 1, 'u')", [message])
    chat.execute("INSERT INTO message_reads (message_id, user_id) VALUES (%s, %s)",
                 (message, other))
    chat.execute("INSERT INTO sync_state (user_id, room_id, sync_type, last_seq) "
                 "VALUES (%s, %s, 'events', 1)", (other, room))
    chat.execute("DELETE FROM channels WHERE id = %s", [room])
    assert count(chat, "messages", "channel_id = %s", room) == 0
    assert count(chat, "channel_members", "channel_id = %s", room) == 0
    assert count(chat, "reactions", "message_id = %s", message) == 0
    assert count(chat, "files", "message_id = %s", message) == 0
    assert count(chat, "message_reads", "message_id = %s", message) == 0
    assert count(chat, "sync_state", "room_id = %s", room) == 0
    assert count(chat, "users", "id IN (%s, %s)", user, other) == 2


def test_deleting_a_user_with_messages_is_restricted(chat: psycopg.Connection[Any]) -> None:
    user = new_user(chat)
    room = new_room(chat)
    new_message(chat, room, user)
    with pytest.raises(psycopg.IntegrityError) as exc:
        chat.execute("DELETE FROM users WHERE id = %s", [user])
    # restrict_violation on recent servers (the embedded 18), foreign_key_violation on 15
    assert exc.value.sqlstate in ("23001", "23503")
    assert exc.value.diag.constraint_name == "messages_user_id_fkey"
    assert count(chat, "users", "id = %s", user) == 1


def test_deleting_a_user_without_messages_cascades_to_personal_rows(
        chat: psycopg.Connection[Any]) -> None:
    author, user = new_user(chat), new_user(chat)
    room = new_room(chat)
    message = new_message(chat, room, author)
    chat.execute("INSERT INTO user_settings (user_id) VALUES (%s)", [user])
    chat.execute("INSERT INTO user_status (user_id) VALUES (%s)", [user])
    chat.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)", (room, user))
    chat.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, 'x')",
                 (message, user))
    chat.execute("INSERT INTO message_reads (message_id, user_id) VALUES (%s, %s)",
                 (message, user))
    chat.execute("INSERT INTO sync_state (user_id, sync_type) VALUES (%s, 'full')", [user])
    chat.execute("DELETE FROM users WHERE id = %s", [user])
    for table in ("user_settings", "user_status", "channel_members", "reactions",
                  "message_reads", "sync_state"):
        assert count(chat, table, "user_id = %s", user) == 0, table
    assert count(chat, "messages", "id = %s", message) == 1


def test_deleting_a_message_cascades_to_reactions_files_and_reads(
        chat: psycopg.Connection[Any]) -> None:
    user = new_user(chat)
    room = new_room(chat)
    message, kept = new_message(chat, room, user), new_message(chat, room, user)
    for m in (message, kept):
        chat.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, 'x')",
                     (m, user))
        chat.execute("INSERT INTO files (message_id, name, type, size, url) "
                     "VALUES (%s, 'f', 't', 1, 'u')", [m])
        chat.execute("INSERT INTO message_reads (message_id, user_id) VALUES (%s, %s)", (m, user))
    chat.execute("DELETE FROM messages WHERE id = %s", [message])
    for table in ("reactions", "files", "message_reads"):
        assert count(chat, table, "message_id = %s", message) == 0, table
        assert count(chat, table, "message_id = %s", kept) == 1, table


def test_gen_ulid_defaults_are_crockford_ulids_sorted_by_time(
        chat: psycopg.Connection[Any]) -> None:
    # Five keys a few milliseconds apart (pg_sleep makes the clock move between rows).
    rows = chat.execute(
        "SELECT gen_ulid(), clock_timestamp() FROM generate_series(1, 5) g, "
        "LATERAL (SELECT pg_sleep(0.003) WHERE g > 0) s").fetchall()
    values = [r[0] for r in rows]
    assert sorted(values) == values and len(set(values)) == 5
    for value, at in rows:
        assert CROCKFORD.match(value), value
        parsed = ULID.from_str(value)
        assert str(parsed) == value
        assert timedelta(0) <= at - parsed.datetime < timedelta(milliseconds=20)
    # The 80 random bits: unique, and every character of them takes all 32 symbols.
    many = [r[0] for r in chat.execute("SELECT gen_ulid() FROM generate_series(1, 2000)")]
    assert len(set(many)) == 2000
    for position in range(10, 26):
        assert len({v[position] for v in many}) == 32, position
    # Defaults of the tables with a single-column key.
    row = chat.execute("INSERT INTO users (auth0_id, email, username) VALUES (%s, %s, 'd') "
                       "RETURNING id", (f"auth0|{ulid()}", f"{ulid()}@example.com")).fetchone()
    assert row
    user = str(row[0])
    room = new_room(chat)
    message = new_message(chat, room, user)
    later = new_message(chat, room, user)
    for value in (user, room, message, later):
        assert CROCKFORD.match(value) and str(ULID.from_str(value)) == value
    assert ULID.from_str(message).timestamp <= ULID.from_str(later).timestamp
    for table in ("users", "channels", "messages", "reactions", "files", "sync_state"):
        default = chat.execute(
            "SELECT column_default FROM information_schema.columns WHERE table_schema = "
            "current_schema() AND table_name = %s AND column_name = 'id'", [table]).fetchone()
        assert default == ("gen_ulid()",), table


@pytest.mark.parametrize("table", ["users", "channels", "messages"])
def test_updated_at_is_bumped_on_update(chat: psycopg.Connection[Any], table: str) -> None:
    user = new_user(chat)
    room = new_room(chat)
    target = {"users": user, "channels": room, "messages": new_message(chat, room, user)}[table]
    column = {"users": "username", "channels": "name", "messages": "content"}[table]
    ident, col = sql.Identifier(table), sql.Identifier(column)
    check = sql.SQL("SELECT updated_at = now(), created_at < updated_at FROM {} "
                    "WHERE id = %s").format(ident)
    with chat.transaction():  # a later transaction than the insert: now() has moved on
        chat.execute(sql.SQL("UPDATE {} SET {} = 'changed' WHERE id = %s").format(ident, col),
                     [target])
        assert chat.execute(check, [target]).fetchone() == (True, True)
    with chat.transaction():  # even an explicit value is overridden
        chat.execute(sql.SQL("UPDATE {} SET updated_at = '2001-01-01' WHERE id = %s").format(
            ident), [target])
        assert chat.execute(check, [target]).fetchone() == (True, True)


# --- setup_db.py --dry-run and --verify -------------------------------------------------------

@pytest.mark.slow
def test_dry_run_prints_sql_and_connects_to_nothing(tmp_path: Path) -> None:
    env = conninfo_env("")
    del env["DATABASE_URL"]
    env.update(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(closed_port()))
    result = run_setup("--dry-run", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith("BEGIN;") and out.rstrip().endswith("COMMIT;")
    for table in SPEC_TABLES + LOG_TABLES:
        assert f"CREATE TABLE IF NOT EXISTS {table} (" in out, table
    assert "CREATE OR REPLACE TRIGGER messages_capture" in out
    test_run = run_setup("--dry-run", "--test", env=env, cwd=tmp_path)
    assert test_run.returncode == 0
    assert 'SET LOCAL search_path TO "test", pg_temp;' in test_run.stdout


@pytest.mark.slow
def test_dry_run_sql_builds_a_schema_that_verifies(fresh_db: str, tmp_path: Path) -> None:
    result = run_setup("--dry-run", "--test", env=conninfo_env("unused"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with connect(fresh_db) as conn:
        conn.execute(result.stdout.encode())
        assert tables_of(conn, "public") == set()
    assert asyncio.run(verify_schema(fresh_db, schema="test")) == []


@pytest.mark.slow
def test_verify_on_an_applied_database_exits_0_and_leaves_no_trace(
        applied_db: str, tmp_path: Path) -> None:
    with connect(applied_db) as conn:
        seed_chat(conn)
        before = data_snapshot(conn)
    assert before["change_events"] and before["change_sequences"]
    result = run_setup("--verify", env=conninfo_env(applied_db), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    with connect(applied_db) as conn:
        assert data_snapshot(conn) == before


@pytest.mark.slow
def test_verify_on_an_empty_database_exits_1(fresh_db: str, tmp_path: Path) -> None:
    result = run_setup("--verify", env=conninfo_env(fresh_db), cwd=tmp_path)
    assert result.returncode == 1
    assert "table public.users is missing" in result.stderr
    assert "failed verification" in result.stderr and "Traceback" not in result.stderr
    with connect(fresh_db) as conn:
        assert tables_of(conn, "public") == set()


async def test_a_daemon_looking_in_the_wrong_schema_is_told_where_the_schema_is(
        fresh_db: str) -> None:
    """After setup_db.py --test, a daemon left on PGBRIDGE_SCHEMA=public is told to run
    setup_db.py or to point PGBRIDGE_SCHEMA at the schema that was applied."""
    await apply_schema(fresh_db, schema="test")
    with pytest.raises(SchemaError) as refused:
        await check_schema(fresh_db, schema="public")
    message = str(refused.value)
    assert "PGBRIDGE_SCHEMA" in message and "(test)" in message and "\n" not in message
    await check_schema(fresh_db, schema="test")
