"""Take pgbridge off a schema again, keeping the chat (``setup_db.py --rollback``; spec 003,
"Rollback Plan": down migrations in reverse order, data verified, extensions removed).

**The line.** The chat schema is the user's and stays: the ten spec tables (:data:`CHAT_TABLES`)
with their spec columns, indexes, constraints and defaults (``sql/schema.sql`` and migration
0001), ``gen_ulid()`` (their key defaults call it), ``touch_updated_at()`` and its triggers,
and the extensions unless ``--drop-extensions``. Everything else the apply made is pgbridge's
and goes: the triggers named in :mod:`daemon.schema_check` whose function is a ``pgbridge_*``
one, every ``pgbridge_*`` function of the schema, the tables of :data:`PGBRIDGE_TABLES`, the
``change_doorbell`` sequence, and ``sync_state``'s resume columns (the down script of migration
0002). docs/howto/rollback.md has the table.

**One transaction**, under the apply's advisory lock and ``lock_timeout``, retried like the
apply (:func:`daemon.schema.run_locked`): the chat tables are locked against writers (SHARE ROW
EXCLUSIVE, readers go on) so that nothing but the rollback changes them meanwhile; each one's
row count, an order-independent checksum (the sums of two 64-bit pieces of the MD5 of each row's
text, pgbridge's columns left out: memory stays bounded) and its column list are taken; the
down scripts run in reverse version order (those recorded in ``schema_migrations``; every one
when the ledger itself is gone, since they find nothing to do once their objects are gone);
pgbridge's objects are dropped, never with CASCADE; the bridge roles (roles granted EXECUTE
on ``pgbridge_listen()``, as ``--grant-bridge`` alone does) lose what it gave them on the chat
tables, and USAGE on the schema when nothing else of it is granted to them; the checks are
taken again, and any difference rolls everything back. Acks the bridge wrote into
``sync_state`` are chat rows: they stay, without their resume columns. The application role
keeps its privileges on the chat tables: the application goes on without the bridge.

**Extensions** (``--drop-extensions``): only those an apply into this schema created, as
recorded in its ``schema_extensions``, and recorded in no other schema's ledger of the same owner
(extensions are database-wide: the other schema's pgbridge, or its user, may rely on it); each
``DROP EXTENSION ... RESTRICT`` in a savepoint, so one the user's objects now depend on is kept
with a line naming them. A rollback without the flag forgets the ledger with its table: the
extensions are the user's from then on.

**Errors** (one line each; the transaction rolled back, nothing changed): an object of the
user's built on pgbridge's (a view on ``change_events``, a trigger calling a ``pgbridge_*``
function) is SQLSTATE 2BP01 naming it; a chat table changed by hand where a down script does not
expect it (``sync_state.room_id`` dropped or retyped) names the column; a role that does not own
the schema's pgbridge objects is 42501 naming the owner. All are :class:`SchemaError`; the rest
is translated by :func:`daemon.db.translated` as for the apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from . import schema_check as check
from .errors import SchemaError
from .roles import APP_TABLES, BRIDGE_PRIVILEGES
from .schema import _LOCK, LOCK_TIMEOUT, MAX_WAIT, run_locked
from .schema_files import load_migrations

log = logging.getLogger(__name__)

__all__ = ["CHAT_TABLES", "PGBRIDGE_TABLES", "RollbackReport", "rollback_schema",
           "rollback_sql"]

CHAT_TABLES = APP_TABLES  # spec 003's ten tables
# pgbridge's columns in a chat table (migration 0002), left out of the verification
PGBRIDGE_COLUMNS: dict[str, tuple[str, ...]] = {"sync_state": ("room_id", "last_seq")}
# in drop order (presence_sessions references presence_instances), with the columns that make
# a table of that name pgbridge's: another tool's (golang-migrate's schema_migrations, an audit
# table called change_events) lacks them, and is neither dropped nor taken for an install
PGBRIDGE_TABLES = {
    "presence_sessions": "instance_id user_id closed_at",
    "presence_instances": "instance_id started_at heartbeat_at expires_at",
    "change_events": "room_id seq table_name op row_id payload created_at",
    "change_sequences": "room_id last_seq", "change_notify_key": "id key ipad opad created_at",
    "schema_files": "file checksum applied_at", "schema_migrations": "version name checksum "
    "applied_at", "schema_extensions": "name created_at"}
PGBRIDGE_SEQUENCES = ("change_doorbell",)
# (table, trigger) of sql/triggers/, dropped when their function is a pgbridge_* one
PGBRIDGE_TRIGGERS = (*((t, f"{t}_capture") for t in check.PUBLISHED), *check.TABLE_TRIGGERS)
EXTENSIONS = ("uuid-ossp", "pgcrypto", "citext")  # sql/schema.sql's


@dataclass
class RollbackReport:
    """What :func:`rollback_schema` did. ``installed`` false: the schema held no pgbridge
    object and nothing was touched. ``dropped``: kind -> count; ``downs``: migrations undone
    (``0002_sync_state_resume``), newest first; ``tables``/``rows``: the chat tables verified
    identical before and after; ``extensions_kept``: name -> why."""

    schema: str
    installed: bool = True
    downs: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    revoked: list[str] = field(default_factory=list)
    tables: int = 0
    rows: int = 0
    extensions_dropped: list[str] = field(default_factory=list)
    extensions_kept: dict[str, str] = field(default_factory=dict)
    attempts: int = 1

    def lines(self, where: str) -> list[str]:
        """What ``setup_db.py --rollback`` prints, ``where`` naming the database."""
        head = f"schema {self.schema} at {where}"
        if not self.installed:
            return [f"{head}: no pgbridge objects, nothing to roll back"]
        kinds = ", ".join(f"{n} {kind if n > 1 else kind[:-1]}"
                          for kind, n in self.dropped.items() if n)
        downs = ", ".join(self.downs) or "none"
        out = [f"{head}: rolled back: down migrations {downs}; dropped {kinds or 'nothing'}",
               f"verified {self.tables} chat tables, {self.rows} rows, identical before and "
               "after"]
        out += [f"revoked role {r}'s bridge privileges on schema {self.schema}"
                for r in self.revoked]
        if self.extensions_dropped:
            out.append(f"dropped extensions {', '.join(self.extensions_dropped)}")
        out += [f"kept extension {name}: {why}" for name, why in self.extensions_kept.items()]
        return out


def _fingerprint_query(schema: str, table: str, columns: list[str] | None) -> sql.Composed:
    """Row count and two sums of 64-bit pieces of the MD5 of each row's text, ``columns`` only
    (order-independent, bounded memory; a row built of the columns rather than ``to_jsonb``,
    which takes three times as long); ``None``: a placeholder, for the dry run."""
    row = (sql.SQL("<its columns but {}>").format(sql.SQL(", ").join(map(
        sql.Identifier, PGBRIDGE_COLUMNS.get(table, ("none",))))) if columns is None else
           sql.SQL(", ").join(sql.Identifier("t", c) for c in columns))
    return sql.SQL(
        "SELECT count(*), coalesce(sum(('x' || left(h, 16))::bit(64)::bigint), 0), "
        "coalesce(sum(('x' || right(h, 16))::bit(64)::bigint), 0) "
        "FROM (SELECT md5(ROW({})::text) AS h FROM {} t) r").format(
            row, sql.Identifier(schema, table))


async def _fingerprint(conn: psycopg.AsyncConnection[TupleRow], schema: str,
                       tables: list[str]) -> dict[str, tuple[object, ...]]:
    """table -> (columns with their types, row count, checksum)."""
    result: dict[str, tuple[object, ...]] = {}
    for table in tables:
        cur = await conn.execute(
            "SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}'), "
            "coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum), '{}') "
            "FROM pg_attribute a "
            "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped "
            "AND a.attname <> ALL(%s)",
            [sql.Identifier(schema, table).as_string(conn),
             list(PGBRIDGE_COLUMNS.get(table, ()))])
        names, types = await cur.fetchone() or ([], [])
        cur = await conn.execute(_fingerprint_query(schema, table, list(names)))
        count, low, high = await cur.fetchone() or (0, Decimal(0), Decimal(0))
        result[table] = (tuple(zip(names, types, strict=True)), int(count), low, high)
    return result


async def _rows(conn: psycopg.AsyncConnection[TupleRow], query: str,
                params: list[object]) -> list[tuple[str, ...]]:
    cur = await conn.execute(query.encode(), params)
    return [tuple(str(v) for v in row) for row in await cur.fetchall()]


async def _objects(conn: psycopg.AsyncConnection[TupleRow], schema: str
                   ) -> dict[str, list[tuple[str, ...]]]:
    """pgbridge's objects present in ``schema``, by kind (extension members left out)."""
    nsp = "(SELECT oid FROM pg_namespace WHERE nspname = %s)"
    return {
        "triggers": await _rows(conn, (
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_proc p ON p.oid = t.tgfoid "
            f"WHERE c.relnamespace = {nsp} AND NOT t.tgisinternal "
            "AND (c.relname, t.tgname) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
            "AND p.proname LIKE 'pgbridge\\_%%' ORDER BY 1, 2"),
            [schema, [t for t, _ in PGBRIDGE_TRIGGERS], [g for _, g in PGBRIDGE_TRIGGERS]]),
        "functions": await _rows(conn, (
            "SELECT p.proname, pg_get_function_identity_arguments(p.oid) FROM pg_proc p "
            f"WHERE p.pronamespace = {nsp} AND p.proname LIKE 'pgbridge\\_%%' "
            "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass "
            "AND d.objid = p.oid AND d.deptype = 'e') ORDER BY 1, 2"), [schema]),
        "tables": await _rows(conn, (
            f"SELECT relname FROM pg_class c, unnest(%s::text[], %s::text[]) e(name, cols) "
            f"WHERE relnamespace = {nsp} AND relkind IN ('r', 'p') AND relname = e.name AND "
            "(SELECT array_agg(attname::text) FROM pg_attribute WHERE attrelid = c.oid AND "
            "attnum > 0 AND NOT attisdropped) @> string_to_array(e.cols, ' ') "
            "ORDER BY array_position(%s, relname::text)"),
            [list(PGBRIDGE_TABLES), list(PGBRIDGE_TABLES.values()), schema,
             list(PGBRIDGE_TABLES)]),
        "sequences": await _rows(conn, (
            f"SELECT relname FROM pg_class WHERE relnamespace = {nsp} AND relkind = 'S' "
            "AND relname = ANY(%s) ORDER BY 1"), [schema, list(PGBRIDGE_SEQUENCES)]),
    }


async def _owner(conn: psycopg.AsyncConnection[TupleRow], schema: str) -> tuple[str, bool]:
    """The role owning pgbridge's ledger (else its log, else the schema), and whether the
    current role may act as it."""
    cur = await conn.execute(
        "SELECT o.rolname, pg_has_role(current_user, o.oid, 'USAGE') FROM pg_namespace n "
        "JOIN pg_roles o ON o.oid = coalesce((SELECT relowner FROM pg_class "
        "WHERE oid = to_regclass(%s)), (SELECT relowner FROM pg_class "
        "WHERE oid = to_regclass(%s)), n.nspowner) WHERE n.nspname = %s",
        [sql.Identifier(schema, "schema_migrations").as_string(conn),
         sql.Identifier(schema, "change_events").as_string(conn), schema])
    row = await cur.fetchone()
    return (str(row[0]), bool(row[1])) if row else ("?", False)


async def _exists(conn: psycopg.AsyncConnection[TupleRow], schema: str, table: str) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                             [sql.Identifier(schema, table).as_string(conn)])
    return bool((await cur.fetchone() or (False,))[0])


async def _recorded_extensions(conn: psycopg.AsyncConnection[TupleRow], schema: str,
                               owner: str) -> dict[str, list[str]]:
    """Extension -> the schemas whose ``schema_extensions`` record it (``schema`` first): the
    ledgers ``owner`` owns, as pgbridge's apply made them (another role's table of that name,
    made to break or sway the rollback, is not pgbridge's)."""
    cur = await conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'schema_extensions' AND c.relkind = 'r' AND EXISTS (SELECT 1 FROM "
        "pg_attribute WHERE attrelid = c.oid AND attname = 'name' AND NOT attisdropped) "
        "AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = %s) "
        "ORDER BY n.nspname <> %s, n.nspname", [owner, schema])
    result: dict[str, list[str]] = {}
    for (ledger,) in await cur.fetchall():
        rows = await conn.execute(sql.SQL("SELECT name FROM {}").format(
            sql.Identifier(str(ledger), "schema_extensions")))
        for (name,) in await rows.fetchall():
            result.setdefault(str(name), []).append(str(ledger))
    return result


def _drop_statements(schema: str, objects: dict[str, list[tuple[str, ...]]]) -> list[sql.Composed]:
    s = sql.Identifier(schema)
    out = [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}.{} RESTRICT").format(
        sql.Identifier(g), s, sql.Identifier(table)) for table, g in objects["triggers"]]
    out += [sql.SQL("DROP FUNCTION IF EXISTS {}.{}({}) RESTRICT").format(
        s, sql.Identifier(name), sql.SQL(args)) for name, args in objects["functions"]]
    out += [sql.SQL("DROP TABLE IF EXISTS {}.{} RESTRICT").format(s, sql.Identifier(name))
            for (name,) in objects["tables"]]
    out += [sql.SQL("DROP SEQUENCE IF EXISTS {}.{} RESTRICT").format(s, sql.Identifier(name))
            for (name,) in objects["sequences"]]
    return out


def _revoke_statements(schema: str, role: str, tables: list[str]) -> list[sql.Composed]:
    """What ``--grant-bridge`` gave ``role`` on the chat tables of ``tables``."""
    out = []
    for table, (privileges, columns) in BRIDGE_PRIVILEGES.items():
        if table not in tables:
            continue
        cols = (sql.SQL("") if columns is None else
                sql.SQL(" ({})").format(sql.SQL(", ").join(map(sql.Identifier, columns))))
        out.append(sql.SQL("REVOKE {}{} ON {} FROM {}").format(
            sql.SQL(privileges), cols, sql.Identifier(schema, table), sql.Identifier(role)))
    return out


def _refusal(exc: psycopg.Error, schema: str, owner: str) -> SchemaError | None:
    """The one line for a statement the database refused, or ``None`` to let it pass."""
    primary = exc.diag.message_primary or str(exc)
    if isinstance(exc, psycopg.errors.DependentObjectsStillExist):
        detail = (exc.diag.message_detail or "").splitlines()
        return SchemaError(
            f"SQLSTATE 2BP01: schema {schema}: {primary}: {detail[0] if detail else ''}: an "
            "object of yours is built on pgbridge's; drop or change it first, then run "
            "setup_db.py --rollback again (nothing was changed)", sqlstate="2BP01")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return SchemaError(
            f"SQLSTATE 42501: {primary}: run setup_db.py --rollback as the owner of schema "
            f"{schema} (role {owner}); nothing was changed", sqlstate="42501")
    if primary.startswith("pgbridge:"):  # a down script refusing a hand-changed table
        hint = f": {exc.diag.message_hint}" if exc.diag.message_hint else ""
        return SchemaError(f"SQLSTATE {exc.sqlstate}: {primary.removeprefix('pgbridge: ')}"
                           f"{hint} (nothing was changed)", sqlstate=exc.sqlstate)
    return None


async def _rollback(conn: psycopg.AsyncConnection[TupleRow], schema: str, lock_timeout: float,
                    drop_extensions: bool) -> RollbackReport:
    report = RollbackReport(schema=schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _LOCK)
        await conn.execute("SELECT set_config('lock_timeout', %s, true)",
                           [f"{max(1, round(lock_timeout * 1000))}ms"])
        await conn.execute("SELECT set_config('search_path', %s, true)",
                           [f"{sql.Identifier(schema).as_string(conn)}, pg_temp"])
        objects = await _objects(conn, schema)
        if not any(objects.values()):
            report.installed = False
            return report
        owner, may = await _owner(conn, schema)
        if not may:
            raise SchemaError(
                f"SQLSTATE 42501: schema {schema}: role {conn.info.user} does not own "
                f"pgbridge's objects: run setup_db.py --rollback as the owner of schema "
                f"{schema} (role {owner}); nothing was changed", sqlstate="42501")
        try:
            await _run(conn, schema, owner, objects, drop_extensions, report)
        except psycopg.Error as exc:
            refusal = _refusal(exc, schema, owner)
            if refusal is None:
                raise
            raise refusal from exc
    return report


async def _run(conn: psycopg.AsyncConnection[TupleRow], schema: str, owner: str,
               objects: dict[str, list[tuple[str, ...]]], drop_extensions: bool,
               report: RollbackReport) -> None:
    tables = [t for t in CHAT_TABLES if await _exists(conn, schema, t)]
    if tables:  # writers wait from here to the commit; readers go on
        await conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
            sql.SQL(", ").join(sql.Identifier(schema, t) for t in tables)))
    before = await _fingerprint(conn, schema, tables)
    # (not "any privilege on change_events": GRANT SELECT ON ALL TABLES to a reporting role)
    bridges = [r for (r,) in await _rows(conn, (
        "SELECT DISTINCT r.rolname FROM pg_proc p, aclexplode(p.proacl) a "
        "JOIN pg_roles r ON r.oid = a.grantee WHERE p.oid = to_regprocedure(%s) "
        "AND a.grantee <> p.proowner AND a.privilege_type = 'EXECUTE' ORDER BY 1"),
        [sql.Identifier(schema, "pgbridge_listen").as_string(conn) + "()"])]
    recorded = await _recorded_extensions(conn, schema, owner)
    migrations = load_migrations()
    done = {m.version for m in migrations}
    if ("schema_migrations",) in objects["tables"]:
        done = {int(v) for (v,) in await _rows(conn, "SELECT version FROM schema_migrations", [])}
    for m in reversed(migrations):
        if m.version in done:
            log.info("running the down script of migration %04d_%s in schema %s", m.version,
                     m.name, schema, extra={"event": "schema_down"})
            await conn.execute(m.down.encode())
            report.downs.append(f"{m.version:04d}_{m.name}")
    for statement in _drop_statements(schema, objects):
        await conn.execute(statement)
    report.dropped = {kind: len(found) for kind, found in objects.items()}
    for role in bridges:
        for statement in _revoke_statements(schema, role, tables):
            await conn.execute(statement)
        cur = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a "
            "WHERE c.relnamespace = n.oid AND a.grantee = r.oid) OR EXISTS (SELECT 1 "
            "FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid, aclexplode(t.attacl) a "
            "WHERE c.relnamespace = n.oid AND a.grantee = r.oid) OR EXISTS (SELECT 1 "
            "FROM pg_proc p, aclexplode(p.proacl) a WHERE p.pronamespace = n.oid "
            "AND a.grantee = r.oid) FROM pg_namespace n, pg_roles r "
            "WHERE n.nspname = %s AND r.rolname = %s", [schema, role])
        if not (await cur.fetchone() or (True,))[0]:
            await conn.execute(sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(
                sql.Identifier(schema), sql.Identifier(role)))
        report.revoked.append(role)
    await _extensions(conn, schema, recorded, drop_extensions, report)
    after = await _fingerprint(conn, schema, tables)
    for table in tables:
        if before[table] != after[table]:
            was, now = before[table], after[table]
            what = ("columns" if was[0] != now[0] else
                    f"rows {was[1]} -> {now[1]}" if was[1] != now[1] else "row checksum")
            raise SchemaError(
                f"schema {schema}: chat table {table} changed during the rollback ({what}): "
                "rolled back, nothing was changed; look for an event trigger or rule of yours "
                "that writes it, else report a bug of pgbridge")
    report.tables = len(tables)
    report.rows = sum(int(str(fp[1])) for fp in after.values())


async def _extensions(conn: psycopg.AsyncConnection[TupleRow], schema: str,
                      recorded: dict[str, list[str]], drop: bool,
                      report: RollbackReport) -> None:
    for (name,) in await _rows(conn, "SELECT extname FROM pg_extension WHERE extname = ANY(%s) "
                               "ORDER BY 1", [list(EXTENSIONS)]):
        ledgers = recorded.get(name, [])
        if not drop:
            if ledgers[:1] == [schema]:
                report.extensions_kept[name] = ("created by pgbridge's apply; kept without "
                                                "--drop-extensions, and yours from now on")
            continue
        if ledgers[:1] != [schema]:
            report.extensions_kept[name] = "not created by pgbridge's apply into this schema"
        elif len(ledgers) > 1:
            report.extensions_kept[name] = (f"pgbridge's apply into schema {ledgers[1]} "
                                            "recorded it too")
        else:
            try:
                async with conn.transaction():  # a savepoint
                    await conn.execute(sql.SQL("DROP EXTENSION {} RESTRICT").format(
                        sql.Identifier(name)))
                report.extensions_dropped.append(name)
            except psycopg.errors.DependentObjectsStillExist as exc:
                detail = (exc.diag.message_detail or "").splitlines()
                report.extensions_kept[name] = (f"{detail[0] if detail else 'in use'}; drop "
                                                "that first to drop it")


async def rollback_schema(conninfo: str, *, schema: str = "public",
                          drop_extensions: bool = False, lock_timeout: float = LOCK_TIMEOUT,
                          max_wait: float = MAX_WAIT) -> RollbackReport:
    """Remove pgbridge from ``schema``, keeping the chat tables and every row in them (see the
    module's docstring). A schema without pgbridge objects is left alone (``installed`` false
    in the report). ``lock_timeout`` and ``max_wait`` (seconds) as for
    :func:`daemon.schema.apply_schema`. Raises :class:`SchemaError` (2BP01, 42501, a
    hand-changed table, a verification difference) or :class:`DatabaseError`; on any error
    nothing was changed."""
    async def work(conn: psycopg.AsyncConnection[TupleRow]) -> RollbackReport:
        return await _rollback(conn, schema, lock_timeout, drop_extensions)

    report, attempts = await run_locked(
        conninfo, work, doing="rolling the schema back", what=f"roll back schema {schema}",
        lock_timeout=lock_timeout, max_wait=max_wait)
    report.attempts = attempts
    return report


def rollback_sql(schema: str = "public", *, drop_extensions: bool = False) -> str:
    """The SQL :func:`rollback_schema` runs, as one script (nothing is connected to; the
    objects, roles and extensions it acts on are found in the catalog at run time)."""
    s = sql.Identifier(schema).as_string(None)
    tables = ", ".join(sql.Identifier(t).as_string(None) for t in CHAT_TABLES)
    parts = [
        "BEGIN;",
        f"SELECT pg_advisory_xact_lock({_LOCK[0]}, {_LOCK[1]});",
        f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT:g}s';",
        f"SET LOCAL search_path TO {s}, pg_temp;",
        "-- nothing below runs when the schema holds no pgbridge object",
        f"LOCK TABLE {tables} IN SHARE ROW EXCLUSIVE MODE;",
        "-- verification, for each chat table (taken again at the end; any difference: ROLLBACK)",
        *(_fingerprint_query(schema, t, None).as_string(None) + ";" for t in CHAT_TABLES),
    ]
    for m in reversed(load_migrations()):
        parts += [f"-- sql/migrations/{m.version:04d}_{m.name}.down.sql (if version "
                  f"{m.version} is in schema_migrations)", m.down]
    objects: dict[str, list[tuple[str, ...]]] = {
        "triggers": list(PGBRIDGE_TRIGGERS),
        "functions": [(f, "...") for f in check.FUNCTIONS if f.startswith("pgbridge_")],
        "tables": [(t,) for t in PGBRIDGE_TABLES],
        "sequences": [(q,) for q in PGBRIDGE_SEQUENCES]}
    parts.append("-- each that exists; functions: every pgbridge_* of the schema, by signature")
    parts += [d.as_string(None).replace("(...)", "(<arguments>)") + ";"
              for d in _drop_statements(schema, objects)]
    parts.append("-- for each bridge role (a role granted EXECUTE on pgbridge_listen()):")
    parts += [r.as_string(None) + ";" for r in _revoke_statements(schema, "<bridge role>",
                                                                  list(CHAT_TABLES))]
    parts.append(f'REVOKE USAGE ON SCHEMA {s} FROM "<bridge role>";  -- unless it holds '
                 "other privileges in the schema")
    if drop_extensions:
        parts.append("-- for each extension this schema's apply recorded in schema_extensions "
                     "and no other schema's did (kept on SQLSTATE 2BP01):")
        parts += [f"SAVEPOINT ext; DROP EXTENSION {sql.Identifier(e).as_string(None)} "
                  "RESTRICT; RELEASE SAVEPOINT ext;" for e in EXTENSIONS]
    parts += ["-- the verification again", "COMMIT;"]
    return "\n".join(parts)
