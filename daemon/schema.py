"""Apply, check and verify the pgbridge schema (``sql/``).

The SQL lives in ``.sql`` files, read with :mod:`importlib.resources` from the installed package
(``daemon/sql`` in a wheel) or from the checkout's top-level ``sql/`` (:mod:`daemon.schema_files`):

* ``schema.sql``: tables by dependency level, indexes, change log; idempotent;
* ``migrations/NNNN_name.sql``: applied once each, in order, recorded in ``schema_migrations``
  with the SHA-256 of the file; a changed file of an applied migration is reported;
* ``triggers/*.sql``: functions and triggers, ``CREATE OR REPLACE``.

Everything runs in one transaction under an advisory lock, so two concurrent runs serialize
(the second waits, then finds nothing to do) and a failure leaves the database unchanged.

Safe on a live database: ``schema.sql`` and each trigger file run only when their SHA-256 differs
from the one recorded in ``schema_files`` or the catalog shows something missing or changed
(:func:`daemon.schema_check.catalog_problems`), so a run over an unchanged, intact schema
takes no lock a writer waits for. What must run takes its locks under ``lock_timeout``: a run
that would queue writers behind a long transaction gives up after that long, rolls back, and
tries again later (up to ``max_wait`` seconds in all), so writers are never blocked much
longer than the lock timeout.

Nothing another role made is adopted: before anything is created or changed, the target schema
and every object in it with a name the files create must be owned by the role running the apply
or a role it is an explicit member of (:func:`daemon.schema_check.adoption_problems`), else the
run fails with SQLSTATE 42501 naming the object and its owner.

The files are applied with ``search_path`` set to ``"<schema>", pg_temp``: the trigger functions
pin it (``SET search_path FROM CURRENT``), with the temporary schema last.

This module applies; checking (:func:`check_schema`, :func:`verify_schema`, and what the catalog
must hold) is :mod:`daemon.schema_check`, reading the files :mod:`daemon.schema_files`; the
names others import from here are exported here still.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .db import translated
from .errors import DatabaseError, SchemaError
from .roles import Grants, apply_grants
from .schema_check import adoption_problems, catalog_problems, check_schema, verify_schema
from .schema_files import Migration, load_migrations, schema_sql, sql_dir_path, trigger_files

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "ApplyReport",
    "Migration",
    "apply_schema",
    "apply_schema_sync",
    "check_schema",
    "dry_run_sql",
    "load_migrations",
    "run_locked",
    "sql_dir_path",
    "verify_schema",
]

# pg_advisory_xact_lock(classid, objid): one lock for every schema of the database, because
# CREATE EXTENSION and the like are database-wide.
_LOCK = (0x70676272, 1)  # "pgbr"

# Bumped when the way the files are applied changes (the search_path they are applied with,
# say): every file's recorded checksum then differs and the next run applies them again.
APPLY_FORMAT = 2
# Seconds a statement of the apply waits for a lock before the run rolls back and retries
# (setup_db.py --lock-timeout), and seconds of retrying before it gives up (--max-wait).
LOCK_TIMEOUT = 1.0
MAX_WAIT = 60.0


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
        schema_sql(),
    ]
    for m in load_migrations():
        parts.append(f"-- sql/migrations/{m.version:04d}_{m.name}.sql "
                     f"(only if version {m.version} is not in schema_migrations)")
        parts.append(m.text)
        parts.append(f"INSERT INTO schema_migrations (version, name, checksum) VALUES "
                     f"({m.version}, '{m.name}', '{m.checksum}');")
    for name, text in trigger_files():
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


async def _lock_holder(conn: psycopg.AsyncConnection[TupleRow]) -> str:
    """Who holds the schema's advisory lock: ``session <pid> ('<application_name>')``, as far
    as pg_stat_activity shows it to this role."""
    cur = await conn.execute(
        "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
        "AND l.classid = %s::oid AND l.objid = %s::oid "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        _LOCK)
    row = await cur.fetchone()
    if row is None:
        return "another session"
    return f"session {row[0]}" + (f" ({str(row[1])!r})" if row[1] else "")


async def _apply(conn: psycopg.AsyncConnection[TupleRow], schema: str, grants: Grants,
                 lock_timeout: float) -> ApplyReport:
    report = ApplyReport(schema=schema)
    async with conn.transaction():
        # Concurrent runs wait for each other here, without a timeout: no writer waits on it.
        # A run that waits says for whom (a setup run's sessions are named after its id).
        got = await (await conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)",
                                        _LOCK)).fetchone()
        if not (got and got[0]):
            log.info("waiting for %s to finish applying the schema (it holds the advisory lock)",
                     await _lock_holder(conn), extra={"event": "schema_lock_wait"})
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _LOCK)
        await conn.execute("SELECT set_config('lock_timeout', %s, true)",
                           [f"{max(1, round(lock_timeout * 1000))}ms"])
        # Before anything is created or changed: adopt nothing another role made (a planted
        # schema, table or function would keep its owner; docs/topics/security.md).
        await _refuse_adoption(conn, schema)
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await conn.execute("SELECT set_config('search_path', %s, true)",
                           [f"{sql.Identifier(schema).as_string(conn)}, pg_temp"])
        recorded = await _recorded(conn, schema)
        # Something missing or altered in the catalog: run every file again, whatever the ledger
        # says (a dropped trigger, functions from before they ran as the owner).
        intact = not await catalog_problems(conn, schema, migrations=False)
        files = [("schema.sql", schema_sql()),
                 *((f"triggers/{name}", text) for name, text in trigger_files())]
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
        # And again before the commit: an object another role committed between the first
        # check and the statement that would have created it was skipped (IF NOT EXISTS);
        # from here on every name is this transaction's or was checked.
        await _refuse_adoption(conn, schema)
    return report


async def _refuse_adoption(conn: psycopg.AsyncConnection[TupleRow], schema: str) -> None:
    """Raise :class:`SchemaError` (SQLSTATE 42501, the first problem of
    :func:`daemon.schema_check.adoption_problems` and how many more) when the apply would adopt
    what another role owns; the caller's transaction then rolls back."""
    adopted = await adoption_problems(conn, schema)
    if adopted:
        more = f" (and {len(adopted) - 1} more)" if len(adopted) > 1 else ""
        raise SchemaError(f"SQLSTATE 42501: {adopted[0]}{more}; nothing was changed",
                          sqlstate="42501")


async def run_locked(conninfo: str,
                     work: Callable[[psycopg.AsyncConnection[TupleRow]], Awaitable[T]], *,
                     doing: str, what: str, lock_timeout: float, max_wait: float
                     ) -> tuple[T, int]:
    """Run ``work`` on a new connection until it gets through without a lock timeout (SQLSTATE
    55P03) or a deadlock (40P01), which roll its transaction back; retried with jittered
    backoff from ``lock_timeout`` seconds for up to ``max_wait`` seconds. What the apply and
    the rollback (:mod:`daemon.rollback`) share: ``work`` takes :data:`_LOCK` and sets
    ``lock_timeout`` itself, in its transaction. ``doing`` is for the error translation
    (``"applying the schema"``), ``what`` for the give-up line (``"apply schema public"``).

    Returns ``work``'s result and the attempts it took. Raises :class:`DatabaseError` (every
    psycopg error, translated; the give-up line with the SQLSTATE of the last lock failure).
    """
    deadline = time.monotonic() + max_wait
    delay = lock_timeout
    attempt = 1
    while True:
        with translated(conninfo, doing=doing):
            try:
                async with await psycopg.AsyncConnection.connect(conninfo) as conn:
                    conn.add_notice_handler(_log_notice)
                    return await work(conn), attempt
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                wait = random.uniform(0.5, 1.0) * delay
                if time.monotonic() + wait > deadline:
                    raise DatabaseError(
                        f"SQLSTATE {exc.sqlstate}: could not take the locks to {what} in "
                        f"{attempt} attempt(s) over {max_wait:g} s, waiting at most "
                        f"{lock_timeout:g} s each time ({exc.diag.message_primary}): a long "
                        "transaction holds them; find it in pg_stat_activity and retry, or "
                        "raise --max-wait", sqlstate=exc.sqlstate) from exc
                log.warning("%s: %s (SQLSTATE %s); nothing was changed, retrying in %.1f s",
                            what, exc.diag.message_primary, exc.sqlstate, wait,
                            extra={"event": "schema_lock_retry"})
                await asyncio.sleep(wait)
                delay = min(delay * 2, 10.0)
                attempt += 1


async def apply_schema(conninfo: str, *, schema: str = "public", grants: Grants | None = None,
                       lock_timeout: float = LOCK_TIMEOUT, max_wait: float = MAX_WAIT
                       ) -> ApplyReport:
    """Create or upgrade the pgbridge schema in ``schema`` (created if needed), and grant the
    application and bridge roles of ``grants`` exactly what they need (:mod:`daemon.roles`).

    One transaction under an advisory lock; safe to run any number of times, concurrently too,
    and on a live database: an unchanged schema is not touched. ``lock_timeout`` (seconds) bounds
    each lock wait; a run that hits it (SQLSTATE 55P03) or a deadlock (40P01) is rolled back and
    retried with jittered backoff for up to ``max_wait`` seconds. Raises :class:`DatabaseError`
    (SQLSTATE and advice in the message) on failure, in which case nothing was changed; a
    :class:`SchemaError` with SQLSTATE 42501 when the schema, or an object in it with a name the
    apply creates, is owned by a role the current role is not (nor an explicit member of),
    naming it, its owner and the fix (docs/topics/security.md, "Planted objects").
    """
    grants = grants or Grants()

    async def work(conn: psycopg.AsyncConnection[TupleRow]) -> ApplyReport:
        return await _apply(conn, schema, grants, lock_timeout)

    report, attempts = await run_locked(
        conninfo, work, doing="applying the schema", what=f"apply schema {schema}",
        lock_timeout=lock_timeout, max_wait=max_wait)
    report.attempts = attempts
    for warning in report.warnings:
        log.warning("%s", warning, extra={"event": "schema_warning"})
    return report


def apply_schema_sync(conninfo: str, *, schema: str = "public", grants: Grants | None = None,
                      lock_timeout: float = LOCK_TIMEOUT,
                      max_wait: float = MAX_WAIT) -> ApplyReport:
    """:func:`apply_schema` for callers without an event loop (tests, scripts)."""
    return asyncio.run(apply_schema(conninfo, schema=schema, grants=grants,
                                    lock_timeout=lock_timeout, max_wait=max_wait))


