"""Apply, check and verify the pgbridge schema (``sql/``).

The SQL lives in ``.sql`` files, read with :mod:`importlib.resources` from the installed package
(``daemon/sql`` in a wheel) or from the checkout's top-level ``sql/``:

* ``schema.sql``: tables by dependency level, indexes, change log; idempotent;
* ``migrations/NNNN_name.sql``: applied once each, in order, recorded in ``schema_migrations``
  with the SHA-256 of the file; a changed file of an applied migration is reported;
* ``triggers/*.sql``: functions and triggers, ``CREATE OR REPLACE``.

Everything runs in one transaction under an advisory lock, so two concurrent runs serialize
(the second waits, then finds nothing to do) and a failure leaves the database unchanged.

Safe on a live database: ``schema.sql`` and each trigger file run only when their SHA-256 differs
from the one recorded in ``schema_files`` or the catalog shows something missing or changed
(:func:`_problems`), so a run over an unchanged, intact schema takes no lock a writer waits for.
What must run takes its locks under ``lock_timeout``: a run that would queue writers behind a
long transaction gives up after that long, rolls back, and tries again later (up to ``max_wait``
seconds in all), so writers are never blocked much longer than the lock timeout.

The files are applied with ``search_path`` set to ``"<schema>", pg_temp``: the trigger functions
pin it (``SET search_path FROM CURRENT``), with the temporary schema last.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .db import listen_query, translated
from .errors import DatabaseError, SchemaError
from .roles import Grants, apply_grants
from .signing import SIGNATURE_HEX, NotifyKey

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
    "change_notify_key", "schema_migrations", "schema_files", "presence_instances",
    "presence_sessions",
)
PUBLISHED = ("channels", "messages", "channel_members", "reactions", "files", "message_reads")
FUNCTIONS = ("gen_ulid", "touch_updated_at", "pgbridge_channel", "pgbridge_channels",
             "pgbridge_listen", "pgbridge_hmac",
             "pgbridge_event_frame", "pgbridge_capture", "pgbridge_user_gone",
             "pgbridge_lock_rooms", "pgbridge_lock_user_rooms",
             "pgbridge_presence_set", "pgbridge_presence_sync", "pgbridge_presence_reap",
             "pgbridge_presence_retire", "pgbridge_status_truth", "pgbridge_presence_hint",
             "pgbridge_doorbell", "pgbridge_status_guard", "pgbridge_resume_guard")
# Functions that run as the owner: SECURITY DEFINER, search_path pinned with pg_temp last, and
# no EXECUTE for PUBLIC (sql/triggers/10_change_capture.sql, "Trust").
DEFINER_FUNCTIONS = ("pgbridge_capture", "pgbridge_user_gone", "pgbridge_lock_rooms",
                     "pgbridge_lock_user_rooms", "pgbridge_presence_set", "pgbridge_presence_sync",
                     "pgbridge_presence_reap", "pgbridge_presence_retire", "pgbridge_status_truth",
                     "pgbridge_presence_hint", "pgbridge_doorbell", "pgbridge_listen")
# Functions that name the secret NOTIFY channels (sql/triggers/10_change_capture.sql, "Secret
# channels"): no EXECUTE for PUBLIC (the bridge role is granted pgbridge_listen only).
CHANNEL_FUNCTIONS = ("pgbridge_channel", "pgbridge_channels", "pgbridge_listen")
# Bumped when the way the files are applied changes (the search_path they are applied with,
# say): every file's recorded checksum then differs and the next run applies them again.
APPLY_FORMAT = 2
# Seconds a statement of the apply waits for a lock before the run rolls back and retries
# (setup_db.py --lock-timeout), and seconds of retrying before it gives up (--max-wait).
LOCK_TIMEOUT = 1.0
MAX_WAIT = 60.0
# the triggers on users: that tell the daemon a user lost access (sql/triggers/20_access.sql),
# and that take a deleted user's rooms in a fixed order (sql/triggers/30_room_lock_order.sql)
USERS_TRIGGERS = ("users_access_update", "users_access_delete", "users_lock_rooms")
# the triggers on user_status that keep 'online'/'offline' true and tell the daemon to read a
# user's presence again (sql/triggers/40_presence.sql)
USER_STATUS_TRIGGERS = ("user_status_guard", "user_status_truth", "user_status_hint",
                        "user_status_hint_update")
# the trigger that keeps sync_state's resume rows the bridge's (sql/triggers/50_resume_state.sql)
SYNC_STATE_TRIGGERS = ("sync_state_resume_guard",)


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
    """What :func:`apply_schema` did: migrations applied now (``applied``), files run because
    they changed or objects were missing (``files``, names relative to ``sql/``; empty: the
    schema was up to date and nothing was touched), attempts it took (lock timeouts), and
    problems it noticed."""

    schema: str
    applied: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    attempts: int = 1
    warnings: list[str] = field(default_factory=list)


def dry_run_sql(schema: str = "public") -> str:
    """The SQL :func:`apply_schema` would run, as one script (nothing is connected to)."""
    parts = [
        "BEGIN;",
        f"SELECT pg_advisory_xact_lock({_LOCK[0]}, {_LOCK[1]});",
        f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT:g}s';",
        f'CREATE SCHEMA IF NOT EXISTS "{schema}";',
        f'SET LOCAL search_path TO "{schema}", pg_temp;',
        "-- sql/schema.sql (only if its checksum differs from schema_files, or objects are "
        "missing)",
        _schema_sql(),
    ]
    for m in load_migrations():
        parts.append(f"-- sql/migrations/{m.version:04d}_{m.name}.sql "
                     f"(only if version {m.version} is not in schema_migrations)")
        parts.append(m.text)
        parts.append(f"INSERT INTO schema_migrations (version, name, checksum) VALUES "
                     f"({m.version}, '{m.name}', '{m.checksum}');")
    for name, text in _trigger_files():
        parts.append(f"-- sql/triggers/{name} (only if changed, as schema.sql)")
        parts.append(text)
    parts.append("-- then the checksum of each file run is recorded in schema_files")
    parts.append("COMMIT;")
    return "\n".join(parts)


def _log_notice(diag: psycopg.errors.Diagnostic) -> None:
    if diag.message_primary and diag.message_primary.startswith("pgbridge:"):
        log.debug("%s", diag.message_primary, extra={"event": "schema_notice"})


def _file_checksum(text: str) -> str:
    return hashlib.sha256(f"pgbridge apply format {APPLY_FORMAT}\n{text}".encode()).hexdigest()


async def _recorded(conn: psycopg.AsyncConnection[TupleRow], schema: str) -> dict[str, str]:
    """``schema_files``: file name -> checksum last applied (empty before the first run)."""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                             [sql.Identifier(schema, "schema_files").as_string(conn)])
    row = await cur.fetchone()
    if not row or not row[0]:
        return {}
    cur = await conn.execute("SELECT file, checksum FROM schema_files")
    return {str(f): str(c) for f, c in await cur.fetchall()}


async def _apply(conn: psycopg.AsyncConnection[TupleRow], schema: str, grants: Grants,
                 lock_timeout: float) -> ApplyReport:
    report = ApplyReport(schema=schema)
    async with conn.transaction():
        # Concurrent runs wait for each other here, without a timeout: no writer waits on it.
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _LOCK)
        await conn.execute("SELECT set_config('lock_timeout', %s, true)",
                           [f"{max(1, round(lock_timeout * 1000))}ms"])
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await conn.execute("SELECT set_config('search_path', %s, true)",
                           [f"{sql.Identifier(schema).as_string(conn)}, pg_temp"])
        recorded = await _recorded(conn, schema)
        # Something missing or altered in the catalog: run every file again, whatever the ledger
        # says (a dropped trigger, functions from before they ran as the owner).
        intact = not await _problems(conn, schema, migrations=False)
        files = [("schema.sql", _schema_sql()),
                 *((f"triggers/{name}", text) for name, text in _trigger_files())]
        ran: list[tuple[str, str]] = []

        async def run(name: str, text: str) -> None:
            checksum = _file_checksum(text)
            if intact and recorded.get(name) == checksum:
                return
            log.info("applying sql/%s to schema %s", name, schema,
                     extra={"event": "schema_file"})
            await conn.execute(text.encode())
            ran.append((name, checksum))

        await run(*files[0])
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
        for name, text in files[1:]:
            await run(name, text)
        if ran:
            names, checksums = zip(*ran, strict=True)
            await conn.execute(
                "INSERT INTO schema_files (file, checksum) SELECT * FROM unnest(%s::text[], "
                "%s::text[]) ON CONFLICT (file) DO UPDATE SET checksum = EXCLUDED.checksum, "
                "applied_at = now()", (list(names), list(checksums)))
        report.files = [name for name, _ in ran]
        report.warnings += await apply_grants(conn, schema, grants)
    return report


async def apply_schema(conninfo: str, *, schema: str = "public", grants: Grants | None = None,
                       lock_timeout: float = LOCK_TIMEOUT, max_wait: float = MAX_WAIT
                       ) -> ApplyReport:
    """Create or upgrade the pgbridge schema in ``schema`` (created if needed), and grant the
    application and bridge roles of ``grants`` exactly what they need (:mod:`daemon.roles`).

    One transaction under an advisory lock; safe to run any number of times, concurrently too,
    and on a live database: an unchanged schema is not touched. ``lock_timeout`` (seconds) bounds
    each lock wait; a run that hits it (SQLSTATE 55P03) or a deadlock (40P01) is rolled back and
    retried with jittered backoff for up to ``max_wait`` seconds. Raises :class:`DatabaseError`
    (SQLSTATE and advice in the message) on failure, in which case nothing was changed.
    """
    grants = grants or Grants()
    deadline = time.monotonic() + max_wait
    delay = lock_timeout
    attempt = 1
    while True:
        with translated(conninfo, doing="applying the schema"):
            try:
                async with await psycopg.AsyncConnection.connect(conninfo) as conn:
                    conn.add_notice_handler(_log_notice)
                    report = await _apply(conn, schema, grants, lock_timeout)
                    report.attempts = attempt
                    break
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                wait = random.uniform(0.5, 1.0) * delay
                if time.monotonic() + wait > deadline:
                    raise DatabaseError(
                        f"SQLSTATE {exc.sqlstate}: could not take the locks to apply schema "
                        f"{schema} in {attempt} attempt(s) over {max_wait:g} s, waiting at most "
                        f"{lock_timeout:g} s each time ({exc.diag.message_primary}): a long "
                        "transaction holds them; find it in pg_stat_activity and retry, or "
                        "raise --max-wait", sqlstate=exc.sqlstate) from exc
                log.warning("applying schema %s: %s (SQLSTATE %s); nothing was changed, "
                            "retrying in %.1f s", schema, exc.diag.message_primary, exc.sqlstate,
                            wait, extra={"event": "schema_lock_retry"})
                await asyncio.sleep(wait)
                delay = min(delay * 2, 10.0)
                attempt += 1
    for warning in report.warnings:
        log.warning("%s", warning, extra={"event": "schema_warning"})
    return report


def apply_schema_sync(conninfo: str, *, schema: str = "public", grants: Grants | None = None,
                      lock_timeout: float = LOCK_TIMEOUT,
                      max_wait: float = MAX_WAIT) -> ApplyReport:
    """:func:`apply_schema` for callers without an event loop (tests, scripts)."""
    return asyncio.run(apply_schema(conninfo, schema=schema, grants=grants,
                                    lock_timeout=lock_timeout, max_wait=max_wait))


async def _problems(conn: psycopg.AsyncConnection[TupleRow], schema: str, *,
                    migrations: bool = True) -> list[str]:
    """What is missing or wrong in ``schema``'s catalog (and, with ``migrations``, its ledger),
    as short phrases; empty when all is in place."""
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
                 for t in USERS_TRIGGERS if t not in triggers]
    problems += [f"trigger {t} on {schema}.user_status is missing or disabled"
                 for t in USER_STATUS_TRIGGERS if t not in triggers]
    problems += [f"trigger {t} on {schema}.sync_state is missing or disabled"
                 for t in SYNC_STATE_TRIGGERS if t not in triggers]
    if "change_notify_key" in tables:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(schema, "change_notify_key")))
        if (await cur.fetchone() or (0,))[0] != 1:
            problems.append(f"table {schema}.change_notify_key holds no key")
    cur = await conn.execute(
        "SELECT p.proname, p.prosecdef, p.proconfig, "
        "       has_function_privilege('public', p.oid, 'EXECUTE') "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND p.proname = ANY(%s)", [schema, list(DEFINER_FUNCTIONS)])
    for name, definer, config, public in await cur.fetchall():
        if not definer or public or not _pinned(config, schema):
            problems.append(f"function {schema}.{name} must run as the owner (SECURITY DEFINER, "
                            "search_path pinned with pg_temp last, no EXECUTE for PUBLIC)")
    cur = await conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND p.proname = ANY(%s) "
        "AND has_function_privilege('public', p.oid, 'EXECUTE')",
        [schema, list(CHANNEL_FUNCTIONS)])
    for (name,) in await cur.fetchall():
        problems.append(f"function {schema}.{name} names the secret NOTIFY channels: PUBLIC "
                        "must not EXECUTE it")
    if migrations and "schema_migrations" in tables:
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


def _pinned(config: list[str] | None, schema: str) -> bool:
    """Whether a function's ``proconfig`` pins ``search_path`` to ``schema`` with ``pg_temp``
    last (how sql/triggers/ are applied)."""
    for item in config or ():
        if item.startswith("search_path="):
            path = [part.strip().strip('"') for part in item.removeprefix("search_path=")
                    .split(",")]
            return len(path) == 2 and path[0] == schema and path[1] == "pg_temp"
    return False


async def check_schema(conninfo: str, *, schema: str = "public") -> None:
    """Raise :class:`SchemaError` when the schema is missing or outdated (what the daemon checks
    at start-up with a configured database), naming the first problems and the fix."""
    with translated(conninfo):
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            problems = await _problems(conn, schema)
            others = [] if not problems else await _applied_schemas(conn, besides=schema)
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        flag = "" if schema == "public" else f" --schema {schema}"
        elsewhere = (f", or set PGBRIDGE_SCHEMA to the schema it was applied to "
                     f"({', '.join(others)})" if others else "")
        raise SchemaError(f"schema {schema} (PGBRIDGE_SCHEMA) is missing or outdated: "
                          f"{'; '.join(problems[:2])}{more}: run python setup_db.py{flag}"
                          f"{elsewhere}")


async def _applied_schemas(conn: psycopg.AsyncConnection[TupleRow], *, besides: str
                           ) -> list[str]:
    """Other schemas of the database that setup_db.py applied (they hold its ledger)."""
    cur = await conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'schema_files' AND c.relkind = 'r' AND n.nspname <> %s "
        "ORDER BY 1", [besides])
    return [str(name) for (name,) in await cur.fetchall()]


async def verify_schema(conninfo: str, *, schema: str = "public",
                        timeout: float = 10.0) -> list[str]:
    """Check every table, function, trigger and migration, then prove the capture path end to
    end: a committed message reaches ``change_events`` and a LISTEN connection. The probe rows
    (a user, a room, a message and their log entries) are removed afterwards.

    Returns the problems found (empty: all good). ``timeout`` is in seconds.
    """
    with translated(conninfo, doing="verifying the schema"):
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            problems = await _problems(conn, schema)
            if problems:
                return problems
            return await _probe_capture(conn, conninfo, schema, timeout)


async def _probe_capture(conn: psycopg.AsyncConnection[TupleRow], conninfo: str, schema: str,
                         timeout: float) -> list[str]:
    from ulid import ULID

    user, room, message = str(ULID()), str(ULID()), str(ULID())
    problems: list[str] = []
    await conn.execute("SELECT set_config('search_path', %s, false)",
                       [sql.Identifier(schema).as_string(conn)])
    cur = await conn.execute("SELECT key FROM change_notify_key")
    key = NotifyKey(bytes((await cur.fetchone() or (b"",))[0]))
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listener:
        await listener.execute(listen_query(schema))  # as the daemon does
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
            heard = signed = False
            async for note in listener.notifies(timeout=timeout):
                text = key.open(note.payload)
                body = text if text is not None else note.payload[SIGNATURE_HEX:]
                with contextlib.suppress(ValueError):
                    if json.loads(body).get("room") == room:
                        heard, signed = True, text is not None
                        break
            if not heard:
                problems.append(f"no NOTIFY on the schema's capture channel within "
                                f"{timeout:g} s")
            elif not signed:
                problems.append("the NOTIFY on the schema's capture channel is not signed "
                                "with the key in change_notify_key")
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
