"""Apply, check and verify the pgbridge schema (``sql/``).

The SQL lives in ``.sql`` files, read with :mod:`importlib.resources` from the installed package
(``daemon/sql`` in a wheel) or from the checkout's top-level ``sql/``:

* ``schema.sql``: tables by dependency level, indexes, change log; idempotent;
* ``migrations/NNNN_name.sql``: applied once each, in order, recorded in ``schema_migrations``
  with the SHA-256 of the file; a changed file of an applied migration is reported;
* ``triggers/*.sql``: functions and triggers, ``CREATE OR REPLACE``, applied last, every time.

Everything runs in one transaction under an advisory lock, so two concurrent runs serialize
(the second waits, then finds nothing to do) and a failure leaves the database unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .db import listen_channel, translate
from .errors import SchemaError

log = logging.getLogger(__name__)

__all__ = [
    "ApplyReport",
    "Migration",
    "apply_schema",
    "apply_schema_sync",
    "check_schema",
    "dry_run_sql",
    "verify_schema",
]

# pg_advisory_xact_lock(classid, objid): one lock for every schema of the database, because
# CREATE EXTENSION and the like are database-wide.
_LOCK = (0x70676272, 1)  # "pgbr"

TABLES = (
    "users", "channels", "messages", "channel_members", "user_settings", "user_status",
    "sync_state", "reactions", "files", "message_reads", "change_sequences", "change_events",
    "schema_migrations",
)
PUBLISHED = ("channels", "messages", "channel_members", "reactions", "files", "message_reads")
FUNCTIONS = ("gen_ulid", "touch_updated_at", "pgbridge_event_frame", "pgbridge_capture",
             "pgbridge_user_gone")
# the triggers on users that tell the daemon a user lost access (sql/triggers/20_access.sql)
ACCESS_TRIGGERS = ("users_access_update", "users_access_delete")


def _sql_dir() -> Traversable:
    packaged = resources.files("daemon") / "sql"
    if packaged.is_dir():
        return packaged
    return resources.files("daemon").joinpath("..", "sql")  # a source checkout


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _read_dir(directory: Traversable) -> list[tuple[str, str]]:
    files = sorted((f.name, f) for f in directory.iterdir() if f.name.endswith(".sql"))
    return [(name, f.read_text(encoding="utf-8")) for name, f in files]


def load_migrations() -> list[Migration]:
    """The files of ``sql/migrations/`` in version order. Raises :class:`SchemaError` for a
    file not named ``NNNN_name.sql`` or a repeated version."""
    result: list[Migration] = []
    for name, text in _read_dir(_sql_dir() / "migrations"):
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", name)
        if not match:
            raise SchemaError(f"sql/migrations/{name}: migration files must be named NNNN_name.sql")
        result.append(Migration(int(match.group(1)), match.group(2), text))
    versions = [m.version for m in result]
    if len(set(versions)) != len(versions):
        raise SchemaError("sql/migrations/: two migration files share a version number")
    return result


def _schema_sql() -> str:
    return (_sql_dir() / "schema.sql").read_text(encoding="utf-8")


def _trigger_files() -> list[tuple[str, str]]:
    return _read_dir(_sql_dir() / "triggers")


@dataclass
class ApplyReport:
    """What :func:`apply_schema` did: migrations applied now, and problems it noticed."""

    schema: str
    applied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def dry_run_sql(schema: str = "public") -> str:
    """The SQL :func:`apply_schema` would run, as one script (nothing is connected to)."""
    parts = [
        "BEGIN;",
        f"SELECT pg_advisory_xact_lock({_LOCK[0]}, {_LOCK[1]});",
        f'CREATE SCHEMA IF NOT EXISTS "{schema}";',
        f'SET LOCAL search_path TO "{schema}";',
        "-- sql/schema.sql",
        _schema_sql(),
    ]
    for m in load_migrations():
        parts.append(f"-- sql/migrations/{m.version:04d}_{m.name}.sql "
                     f"(only if version {m.version} is not in schema_migrations)")
        parts.append(m.text)
        parts.append(f"INSERT INTO schema_migrations (version, name, checksum) VALUES "
                     f"({m.version}, '{m.name}', '{m.checksum}');")
    for name, text in _trigger_files():
        parts.append(f"-- sql/triggers/{name}")
        parts.append(text)
    parts.append("COMMIT;")
    return "\n".join(parts)


def _log_notice(diag: psycopg.errors.Diagnostic) -> None:
    if diag.message_primary and diag.message_primary.startswith("pgbridge:"):
        log.debug("%s", diag.message_primary, extra={"event": "schema_notice"})


async def _apply(conn: psycopg.AsyncConnection[TupleRow], schema: str) -> ApplyReport:
    report = ApplyReport(schema=schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _LOCK)
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await conn.execute("SELECT set_config('search_path', %s, true)",
                           [sql.Identifier(schema).as_string(conn)])
        await conn.execute(_schema_sql().encode())
        cur = await conn.execute("SELECT version, name, checksum FROM schema_migrations")
        done = {int(v): (str(n), str(c)) for v, n, c in await cur.fetchall()}
        for m in load_migrations():
            if m.version in done:
                if done[m.version][1] != m.checksum:
                    report.warnings.append(
                        f"migration {m.version:04d}_{m.name} was changed after it was applied "
                        "(checksum differs); its changes are not re-run: write a new migration"
                    )
                continue
            log.info("applying migration %04d_%s to schema %s", m.version, m.name, schema,
                     extra={"event": "schema_migration"})
            await conn.execute(m.text.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (m.version, m.name, m.checksum),
            )
            report.applied.append(f"{m.version:04d}_{m.name}")
        for _name, text in _trigger_files():
            await conn.execute(text.encode())
    for warning in report.warnings:
        log.warning("%s", warning, extra={"event": "schema_migration_changed"})
    return report


async def apply_schema(conninfo: str, *, schema: str = "public") -> ApplyReport:
    """Create or upgrade the pgbridge schema in ``schema`` (created if needed).

    One transaction under an advisory lock; safe to run any number of times, concurrently too.
    Raises :class:`DatabaseError` (SQLSTATE and advice in the message) on failure, in which case
    nothing was changed.
    """
    try:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            conn.add_notice_handler(_log_notice)
            return await _apply(conn, schema)
    except psycopg.Error as exc:
        raise translate(exc, conninfo, doing="applying the schema") from exc


def apply_schema_sync(conninfo: str, *, schema: str = "public") -> ApplyReport:
    """:func:`apply_schema` for callers without an event loop (tests, scripts)."""
    return asyncio.run(apply_schema(conninfo, schema=schema))


async def _problems(conn: psycopg.AsyncConnection[TupleRow], schema: str) -> list[str]:
    problems: list[str] = []
    cur = await conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')", [schema])
    tables = {str(r[0]) for r in await cur.fetchall()}
    problems += [f"table {schema}.{t} is missing" for t in TABLES if t not in tables]
    cur = await conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s", [schema])
    functions = {str(r[0]) for r in await cur.fetchall()}
    problems += [f"function {schema}.{f} is missing" for f in FUNCTIONS if f not in functions]
    cur = await conn.execute(
        "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT t.tgisinternal "
        "AND t.tgenabled <> 'D'", [schema])
    triggers = {str(r[0]) for r in await cur.fetchall()}
    problems += [f"trigger {t}_capture on {schema}.{t} is missing or disabled"
                 for t in PUBLISHED if f"{t}_capture" not in triggers]
    problems += [f"trigger {t} on {schema}.users is missing or disabled"
                 for t in ACCESS_TRIGGERS if t not in triggers]
    if "schema_migrations" in tables:
        cur = await conn.execute(
            sql.SQL("SELECT version, checksum FROM {}.schema_migrations").format(
                sql.Identifier(schema)))
        done = {int(v): str(c) for v, c in await cur.fetchall()}
        for m in load_migrations():
            if m.version not in done:
                problems.append(f"migration {m.version:04d}_{m.name} is not applied")
            elif done[m.version] != m.checksum:
                problems.append(f"migration {m.version:04d}_{m.name} changed after it was applied")
    return problems


async def check_schema(conninfo: str, *, schema: str = "public") -> None:
    """Raise :class:`SchemaError` when the schema is missing or outdated (what the daemon checks
    at start-up with a configured database), naming the first problems and the fix."""
    try:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            problems = await _problems(conn, schema)
    except psycopg.Error as exc:
        raise translate(exc, conninfo) from exc
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        flag = "" if schema == "public" else f" --schema {schema}"
        raise SchemaError(f"schema {schema} is missing or outdated: {'; '.join(problems[:2])}"
                          f"{more}: run python setup_db.py{flag}")


async def verify_schema(conninfo: str, *, schema: str = "public",
                        timeout: float = 10.0) -> list[str]:
    """Check every table, function, trigger and migration, then prove the capture path end to
    end: a committed message reaches ``change_events`` and a LISTEN connection. The probe rows
    (a user, a room, a message and their log entries) are removed afterwards.

    Returns the problems found (empty: all good). ``timeout`` is in seconds.
    """
    try:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            problems = await _problems(conn, schema)
            if problems:
                return problems
            return await _probe_capture(conn, conninfo, schema, timeout)
    except psycopg.Error as exc:
        raise translate(exc, conninfo, doing="verifying the schema") from exc


async def _probe_capture(conn: psycopg.AsyncConnection[TupleRow], conninfo: str, schema: str,
                         timeout: float) -> list[str]:
    from ulid import ULID

    user, room, message = str(ULID()), str(ULID()), str(ULID())
    channel = listen_channel(schema)
    problems: list[str] = []
    await conn.execute("SELECT set_config('search_path', %s, false)",
                       [sql.Identifier(schema).as_string(conn)])
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO users (id, auth0_id, email, username) VALUES (%s, %s, %s, %s)",
                    (user, f"pgbridge-verify|{user}", f"verify-{user}@pgbridge.invalid", "verify"))
                await conn.execute("INSERT INTO channels (id, name) VALUES (%s, 'verify')", [room])
                await conn.execute(
                    "INSERT INTO messages (id, channel_id, user_id, content) "
                    "VALUES (%s, %s, %s, 'verify')", (message, room, user))
            cur = await conn.execute(
                "SELECT count(*) FROM change_events WHERE room_id = %s AND table_name = 'messages'"
                " AND row_id = %s", (room, message))
            row = await cur.fetchone()
            if not row or row[0] != 1:
                problems.append("a committed message did not reach change_events")
            heard = False
            async for note in listener.notifies(timeout=timeout):
                if json.loads(note.payload).get("room") == room:
                    heard = True
                    break
            if not heard:
                problems.append(f"no NOTIFY on channel {channel} within {timeout:g} s")
        finally:
            async with conn.transaction():
                await conn.execute("DELETE FROM channels WHERE id = %s", [room])
                await conn.execute("DELETE FROM users WHERE id = %s", [user])
                await conn.execute("DELETE FROM change_events WHERE room_id = %s", [room])
                await conn.execute("DELETE FROM change_sequences WHERE room_id = %s", [room])
    return problems


def sql_dir_path() -> Path:
    """Filesystem path of the SQL directory (for messages and tests)."""
    return Path(str(_sql_dir()))
