"""Whether a database holds the pgbridge schema: every table, function and trigger it must
have, the owner-only functions as they must be, every migration applied and unchanged
(:func:`catalog_problems`); what the apply would adopt from another role
(:func:`adoption_problems`); :func:`check_schema` (the daemon's start-up check) and
:func:`verify_schema` (``setup_db.py --verify``, which also reports objects owned by a role the
one running it is not, and proves the capture path end to end).

Why a module of its own: what the catalog must hold is one list, read by the checks and by
:mod:`daemon.schema`'s apply (which runs every file again when :func:`catalog_problems` finds
something missing or altered, whatever the ledger says); applying the files is another job.
"""

from __future__ import annotations

import contextlib
import json

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .db import listen_query, translated
from .errors import SchemaError
from .schema_files import created_names, load_migrations
from .signing import SIGNATURE_HEX, NotifyKey

__all__ = ["adoption_problems", "catalog_problems", "check_schema", "verify_schema"]

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
             "pgbridge_doorbell", "pgbridge_status_guard", "pgbridge_resume_guard",
             "pgbridge_receipt", "pgbridge_member_joined")
# Functions that run as the owner: SECURITY DEFINER, search_path pinned with pg_temp last, and
# no EXECUTE for PUBLIC (sql/triggers/10_change_capture.sql, "Trust").
DEFINER_FUNCTIONS = ("pgbridge_capture", "pgbridge_user_gone", "pgbridge_lock_rooms",
                     "pgbridge_lock_user_rooms", "pgbridge_presence_set", "pgbridge_presence_sync",
                     "pgbridge_presence_reap", "pgbridge_presence_retire", "pgbridge_status_truth",
                     "pgbridge_presence_hint", "pgbridge_doorbell", "pgbridge_listen",
                     "pgbridge_member_joined")
# Functions that name the secret NOTIFY channels (sql/triggers/10_change_capture.sql, "Secret
# channels"): no EXECUTE for PUBLIC (the bridge role is granted pgbridge_listen only).
CHANNEL_FUNCTIONS = ("pgbridge_channel", "pgbridge_channels", "pgbridge_listen")
# the triggers on users: that tell the daemon a user lost access (sql/triggers/20_access.sql),
# and that take a deleted user's rooms in a fixed order (sql/triggers/30_room_lock_order.sql)
USERS_TRIGGERS = ("users_access_update", "users_access_delete", "users_lock_rooms")
# the triggers on channel_members and channels that tell the daemon's feeds a user joined a room
# or a room of the user was restored (sql/triggers/20_access.sql)
MEMBERS_TRIGGERS = ("channel_members_joined", "channel_members_moved")
CHANNELS_TRIGGERS = ("channels_restored",)
# the triggers on user_status that keep 'online'/'offline' true and tell the daemon to read a
# user's presence again (sql/triggers/40_presence.sql)
USER_STATUS_TRIGGERS = ("user_status_guard", "user_status_truth", "user_status_hint",
                        "user_status_hint_update")
# the trigger that keeps sync_state's resume rows the bridge's (sql/triggers/50_resume_state.sql)
SYNC_STATE_TRIGGERS = ("sync_state_resume_guard",)
# (table, trigger) of the ones above
TABLE_TRIGGERS = (*(("users", t) for t in USERS_TRIGGERS),
                  *(("channel_members", t) for t in MEMBERS_TRIGGERS),
                  *(("channels", t) for t in CHANNELS_TRIGGERS),
                  *(("user_status", t) for t in USER_STATUS_TRIGGERS),
                  *(("sync_state", t) for t in SYNC_STATE_TRIGGERS))


async def catalog_problems(conn: psycopg.AsyncConnection[TupleRow], schema: str, *,
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
    problems += [f"trigger {t} on {schema}.{table} is missing or disabled"
                 for table, t in TABLE_TRIGGERS if t not in triggers and table in (
                     "channel_members", "channels")]
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


# The roles the current role may act as: itself, and every role it is a member of through
# explicit grants, transitively (pg_auth_members; from PostgreSQL 16 a grant with neither
# INHERIT nor SET, such as CREATEROLE's implicit ADMIN grant, does not count). Not pg_has_role,
# which is true for a superuser on every role.
_MINE = (
    "WITH RECURSIVE mine(oid) AS (SELECT oid FROM pg_roles WHERE rolname = current_user "
    "UNION SELECT m.roleid FROM pg_auth_members m JOIN mine ON m.member = mine.oid "
    "WHERE coalesce((to_jsonb(m) ->> 'inherit_option')::bool "
    "OR (to_jsonb(m) ->> 'set_option')::bool, true)) ")


async def adoption_problems(conn: psycopg.AsyncConnection[TupleRow], schema: str) -> list[str]:
    """What the apply would adopt although a role the current role may not act as owns it,
    one phrase each with the fix; empty when all is the current role's (and before a first
    apply, when nothing is there).

    Looked at: the schema, if it exists, and every object in it with a name the SQL files
    create (:func:`daemon.schema_files.created_names`: tables, sequences, indexes, functions,
    types). Trusted owners of an object: the current role and the roles it is a member of by
    explicit grants (:data:`_MINE`), nothing else; a superuser running the apply refuses a
    table a plain role planted too. The schema's owner may besides be a superuser (the bootstrap
    role owned ``public`` before PostgreSQL 15; a superuser can do anything anyway), or
    ``pg_database_owner`` (``public`` from PostgreSQL 15) when the database's owner is trusted
    as above or a superuser: the database owner is who owns ``public`` then, and a schema's
    owner can drop and replace any object in it, so it must be a role the set-up trusts.

    Why: ``CREATE TABLE IF NOT EXISTS`` and ``CREATE OR REPLACE FUNCTION`` keep what is there
    with its owner, who could then read the personal data written to it, add triggers, swap a
    function the capture triggers (which run as the owner) call, or, owning the schema, drop and
    replace the log (docs/topics/security.md, "Planted objects")."""
    nsp = "(SELECT oid FROM pg_namespace WHERE nspname = %s)"
    names = created_names()
    cur = await conn.execute((
        _MINE + "SELECT * FROM (SELECT quote_ident(current_user) AS me, 'SCHEMA' AS kind, "
        "quote_ident(n.nspname) AS name, o.rolname "
        "FROM pg_namespace n JOIN pg_roles o ON o.oid = n.nspowner WHERE n.nspname = %s "
        "AND o.oid NOT IN (SELECT oid FROM mine) AND NOT o.rolsuper "
        "AND NOT (o.rolname = 'pg_database_owner' AND EXISTS (SELECT 1 FROM pg_database d "
        "JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = current_database() "
        "AND (r.rolsuper OR r.oid IN (SELECT oid FROM mine)))) "
        "UNION ALL SELECT quote_ident(current_user), CASE c.relkind WHEN 'S' THEN 'SEQUENCE' "
        "WHEN 'i' THEN 'INDEX' WHEN 'I' THEN 'INDEX' WHEN 'v' THEN 'VIEW' "
        "WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'c' THEN 'TYPE' "
        "ELSE 'TABLE' END, "
        "format('%%I.%%I', %s::text, c.relname), o.rolname "
        f"FROM pg_class c JOIN pg_roles o ON o.oid = c.relowner WHERE c.relnamespace = {nsp} "
        "AND c.relname = ANY(%s) AND o.oid NOT IN (SELECT oid FROM mine) "
        # an index of a table of those names is reported with its table
        "AND NOT EXISTS (SELECT 1 FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid "
        "WHERE x.indexrelid = c.oid AND t.relname = ANY(%s)) "
        "UNION ALL SELECT quote_ident(current_user), CASE p.prokind WHEN 'p' THEN 'PROCEDURE' "
        "WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END, format('%%I.%%I(%%s)', %s::text, "
        "p.proname, pg_get_function_identity_arguments(p.oid)), o.rolname "
        f"FROM pg_proc p JOIN pg_roles o ON o.oid = p.proowner WHERE p.pronamespace = {nsp} "
        "AND p.proname = ANY(%s) AND o.oid NOT IN (SELECT oid FROM mine) "
        "UNION ALL SELECT quote_ident(current_user), CASE t.typtype WHEN 'd' THEN 'DOMAIN' "
        "ELSE 'TYPE' END, format('%%I.%%I', %s::text, t.typname), o.rolname "
        f"FROM pg_type t JOIN pg_roles o ON o.oid = t.typowner WHERE t.typnamespace = {nsp} "
        "AND t.typname = ANY(%s) AND t.typrelid = 0 AND o.oid NOT IN (SELECT oid FROM mine) "
        ") found, (SELECT quote_ident(d.datname), r.rolname FROM pg_database d JOIN pg_roles r "
        "ON r.oid = d.datdba WHERE d.datname = current_database()) db "
        "ORDER BY kind <> 'SCHEMA', name").encode(),
        [schema, schema, schema, sorted(names.relations), sorted(names.relations), schema, schema,
         sorted(names.functions), schema, schema, sorted(names.types)])
    problems = []
    for me, kind, name, owner, database, datowner in await cur.fetchall():
        if kind == "INDEX":  # an index is its table's owner's: only dropping it helps
            fix = f"DROP INDEX {name} if it is not yours"
        elif owner == "pg_database_owner":  # public, from PostgreSQL 15
            fix = (f"it is the database owner's (role {datowner}): ALTER DATABASE {database} "
                   f"OWNER TO {me} if {me} is to own the database, else choose another schema")
            problems.append(f"schema {name} is owned by role pg_database_owner, not by role "
                            f"{me} (running this) or a role it is a member of: {fix}, or run "
                            f"this as role {datowner}")
            continue
        else:
            fix = (f"ALTER {kind} {name} OWNER TO {me} if role {owner} is legitimately the "
                   f"application's, else drop it" + (" or choose another schema"
                                                     if kind == "SCHEMA" else ""))
        problems.append(f"{kind.lower()} {name} is owned by role {owner}, not by role {me} "
                        f"(running this) or a role it is a member of: {fix}, or run this as "
                        f"role {owner}")
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
            problems = await catalog_problems(conn, schema)
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
    """Check every table, function, trigger and migration, and that the current role (the
    owner, who runs ``setup_db.py --verify``) or a role it is a member of owns the schema and
    pgbridge's objects (:func:`adoption_problems`), then prove the capture path end to
    end: a committed message reaches ``change_events`` and a LISTEN connection. The probe rows
    (a user, a room, a message and their log entries) are removed afterwards.

    Returns the problems found (empty: all good). ``timeout`` is in seconds.
    """
    with translated(conninfo, doing="verifying the schema"):
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            problems = [*await adoption_problems(conn, schema),
                        *await catalog_problems(conn, schema)]
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
