"""The three database roles of a production set-up, and what each is granted.

* **owner**: runs ``setup_db.py``, owns the schema, the chat tables, the event log and the
  capture functions, which run as the owner (SECURITY DEFINER). Nothing is granted to it.
* **application** (``setup_db.py --grant-app ROLE``): reads and writes the chat tables
  (:data:`APP_TABLES`), but of ``sync_state`` only the spec's columns
  (:data:`APP_SYNC_STATE_COLUMNS`): the resume columns ``room_id`` and ``last_seq`` are the
  bridge's, and the rows that have them are guarded as a whole by the trigger of
  ``sql/triggers/50_resume_state.sql``. No privilege on the log (``change_events``,
  ``change_sequences``), the NOTIFY signing key or the ledgers: its writes reach the log only
  through the triggers, so it can neither forge nor rewrite events.
* **bridge** (``setup_db.py --grant-bridge ROLE``): what the daemon reads and writes
  (:data:`BRIDGE_PRIVILEGES`): the log and the signing key, the columns that decide access
  (ids and ``deleted_at`` of users and rooms, memberships; no personal data), ``sync_state``,
  and ``DELETE`` on ``change_events`` for retention; for presence, ``user_status`` and the
  presence tables to read and the presence functions to call (:data:`BRIDGE_FUNCTIONS`), which
  write them as the owner; the doorbell lease, through ``pgbridge_doorbell`` likewise; and
  ``pgbridge_listen``, which LISTENs on the schema's secret NOTIFY channels.

Each grant first revokes everything the role holds on the schema's tables, so a role that was
given more by hand ends with exactly this. The embedded database keeps one role (the owner).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .errors import SchemaError

__all__ = ["APP_FUNCTIONS", "APP_SYNC_STATE_COLUMNS", "APP_TABLES", "BRIDGE_FUNCTIONS",
           "BRIDGE_PRIVILEGES", "Grants", "apply_grants"]

APP_TABLES = ("users", "channels", "messages", "channel_members", "user_settings", "user_status",
              "sync_state", "reactions", "files", "message_reads")
# What the application may INSERT and UPDATE of sync_state: spec 003's columns. SELECT and
# DELETE are on the whole table; the resume rows (room_id or last_seq set) refuse the
# application's DELETE and UPDATE all the same (sql/triggers/50_resume_state.sql).
APP_SYNC_STATE_COLUMNS = ("id", "user_id", "last_sync", "sync_type", "metadata")
# table -> (privileges, columns or None for the whole table)
BRIDGE_PRIVILEGES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "users": ("SELECT", ("id", "deleted_at")),
    "channels": ("SELECT", ("id", "deleted_at")),
    "channel_members": ("SELECT", ("channel_id", "user_id")),
    # whole rows, for the snapshot of a subscribe (daemon/snapshot.py): what the log already
    # holds of every message since the retention, and the messages older than that
    "messages": ("SELECT", None),
    "change_events": ("SELECT, DELETE", None),
    "change_sequences": ("SELECT", None),
    "change_notify_key": ("SELECT", None),
    "schema_migrations": ("SELECT", None),
    "sync_state": ("SELECT, INSERT, UPDATE", None),
    "user_status": ("SELECT", None),
    "presence_instances": ("SELECT", None),
    "presence_sessions": ("SELECT", None),
}
# Functions of the schema the application may call besides those open to PUBLIC (gen_ulid, ...):
# name -> argument types. pgbridge_lock_rooms takes the room counters of a multi-room
# transaction in a fixed order (sql/triggers/30_room_lock_order.sql, docs/topics/deadlocks.md);
# pgbridge_receipt gives a transaction its own events and their seqs
# (sql/triggers/10_change_capture.sql, docs/howto/optimistic-send.md).
APP_FUNCTIONS: dict[str, str] = {"pgbridge_lock_rooms": "text[]", "pgbridge_receipt": ""}
# Functions the bridge calls: presence transitions, leases and their expiry
# (sql/triggers/40_presence.sql), the doorbell lease and the LISTEN on the schema's secret
# channels (sql/triggers/10_change_capture.sql).
BRIDGE_FUNCTIONS: dict[str, str] = {
    "pgbridge_doorbell": "integer, boolean, pg_snapshot",
    "pgbridge_listen": "",
    "pgbridge_presence_sync": "text, double precision, boolean, text[], double precision[]",
    "pgbridge_presence_reap": "",
    "pgbridge_presence_retire": "text, double precision, text[], double precision[]",
}


@dataclass(frozen=True)
class Grants:
    """Roles to grant to (``setup_db.py --grant-app``, ``--grant-bridge``); each must exist."""

    app: tuple[str, ...] = ()
    bridge: tuple[str, ...] = ()


async def _revoke_all(conn: psycopg.AsyncConnection[TupleRow], schema: sql.Identifier,
                      role: sql.Identifier) -> None:
    await conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(
        schema, role))
    await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, role))


async def _grant_functions(conn: psycopg.AsyncConnection[TupleRow], schema: str,
                           functions: dict[str, str], role: sql.Identifier) -> None:
    """EXECUTE on those of ``functions`` (name -> argument types) that exist."""
    for function, args in functions.items():
        exists = await conn.execute("SELECT to_regprocedure(%s) IS NOT NULL",
                                    [f"{sql.Identifier(schema, function).as_string(conn)}"
                                     f"({args})"])
        if (await exists.fetchone() or (False,))[0]:
            await conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}({}) TO {}").format(
                sql.Identifier(schema, function), sql.SQL(args), role))


async def apply_grants(conn: psycopg.AsyncConnection[TupleRow], schema: str,
                       grants: Grants) -> list[str]:
    """Grant ``grants`` in the caller's transaction (search_path is ``schema``); returns
    warnings (a superuser role, which no privilege limits; roles other than the owner that may
    CREATE in the schema). Raises :class:`SchemaError` for a role that does not exist."""
    warnings: list[str] = []
    s = sql.Identifier(schema)
    for name in (*grants.app, *grants.bridge):
        cur = await conn.execute(
            "SELECT r.rolsuper, r.rolname = current_user OR r.oid = n.nspowner "
            "FROM pg_roles r, pg_namespace n WHERE r.rolname = %s AND n.nspname = %s",
            [name, schema])
        row = await cur.fetchone()
        if row is None:
            raise SchemaError(f"role {name} does not exist: create it first (CREATE ROLE {name} "
                              "LOGIN PASSWORD '...'), then run setup_db.py again")
        if row[1]:
            raise SchemaError(f"role {name} owns schema {schema} or runs setup_db.py: the "
                              "application and the bridge need roles of their own")
        if row[0]:
            warnings.append(f"role {name} is a superuser: no privilege limits what it can do; "
                            "give the application and the bridge roles of their own")
    for name in grants.app:
        role = sql.Identifier(name)
        await _revoke_all(conn, s, role)
        await conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
            sql.SQL(", ").join(sql.Identifier(schema, t) for t in APP_TABLES
                               if t != "sync_state"), role))
        await conn.execute(sql.SQL("GRANT SELECT, DELETE ON {} TO {}").format(
            sql.Identifier(schema, "sync_state"), role))
        await conn.execute(sql.SQL("GRANT INSERT ({0}), UPDATE ({0}) ON {1} TO {2}").format(
            sql.SQL(", ").join(map(sql.Identifier, APP_SYNC_STATE_COLUMNS)),
            sql.Identifier(schema, "sync_state"), role))
        await _grant_functions(conn, schema, APP_FUNCTIONS, role)
    for name in grants.bridge:
        role = sql.Identifier(name)
        await _revoke_all(conn, s, role)
        for table, (privileges, columns) in BRIDGE_PRIVILEGES.items():
            target = sql.Identifier(schema, table)
            if columns is None:
                await conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(privileges), target, role))
            else:
                await conn.execute(sql.SQL("GRANT {} ({}) ON {} TO {}").format(
                    sql.SQL(privileges), sql.SQL(", ").join(map(sql.Identifier, columns)),
                    target, role))
        await _grant_functions(conn, schema, BRIDGE_FUNCTIONS, role)
    cur = await conn.execute(
        "SELECT coalesce(r.rolname, 'PUBLIC') FROM pg_namespace n, aclexplode(n.nspacl) a "
        "LEFT JOIN pg_roles r ON r.oid = a.grantee "
        "WHERE n.nspname = %s AND a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner "
        "AND NOT coalesce(r.rolsuper, false)", [schema])
    for (grantee,) in await cur.fetchall():
        warnings.append(
            f"{grantee} may CREATE in schema {schema}: it could create functions that the "
            "capture triggers, which run as the owner, would call; REVOKE CREATE ON SCHEMA "
            f"{schema} FROM {grantee}")
    return warnings
