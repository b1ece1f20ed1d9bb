"""Database access of the daemon (everything but LISTEN): a psycopg_pool of autocommit
connections whose search_path is the bridge's schema (``PGBRIDGE_SCHEMA``).

Every psycopg error leaves this module as :class:`DatabaseError` (SQLSTATE kept).

This module holds the queries (:class:`Store`); the pool they run on, its timeouts and the
retry of a statement whose connection was lost are :class:`daemon.store_pool.Pooled`, the
base of :class:`Store`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from .batching import Batched
from .db import describe
from .doorbell import Call, Reading
from .errors import DatabaseError
from .events import Event
from .metrics import MAX_INDEX_SERIES, Metrics
from .presence import Presence
from .protocol import is_id
from .sequencer import READ_PAGE
from .store_pool import Pooled

log = logging.getLogger(__name__)

__all__ = ["READ_PAGE", "RoomCursorInfo", "Store"]

# What a presence frame shows of a member (PROTOCOL.md, "Presence and typing"): the member's
# user_status row, if any, and whether any instance holds a session of theirs. custom_status is
# the application's free text: a watcher gets at most its first CUSTOM_STATUS_MAX characters.
CUSTOM_STATUS_MAX = 1024
_PRESENCE = f"""
    SELECT m.user_id, m.channel_id, coalesce(s.status, 'offline'),
           EXISTS (SELECT 1 FROM presence_sessions p WHERE p.user_id = m.user_id),
           to_char(s.last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
           left(s.custom_status, {CUSTOM_STATUS_MAX})
    FROM channel_members m
    JOIN users u ON u.id = m.user_id AND u.deleted_at IS NULL
    LEFT JOIN user_status s ON s.user_id = m.user_id
"""

@dataclass(frozen=True, slots=True)
class RoomCursorInfo:
    """What subscribe needs in one round trip. ``status``: ``ok``, ``not_found`` (no such room),
    ``forbidden`` (not a member, room or user deleted)."""

    status: str
    head: int
    retained_from: int
    acked: int | None


# An event row as the protocol frame and what the listener needs to know of it. The effects
# (whose membership ends or begins, whether the room ends) are read in SQL, as parse_notify reads
# them from a NOTIFY: the row's JSON is never decoded here, so no payload, however large or deeply
# nested, can fail the listener.
_EVENT_COLUMNS = """
    e.room_id, e.seq, e.table_name, e.op,
    CASE WHEN e.table_name = 'channel_members' AND e.op = 'DELETE'
         THEN e.payload->>'user_id' END,
    CASE WHEN e.table_name = 'channel_members' AND e.op <> 'DELETE'
         THEN e.payload->>'user_id' END,
    e.table_name = 'channels' AND (e.op = 'DELETE' OR e.payload->>'deleted_at' IS NOT NULL),
    pgbridge_event_frame(e.room_id, e.seq, e.table_name, e.op, e.row_id, e.payload,
                         e.created_at)
"""


def _event(row: tuple[Any, ...]) -> Event:
    room, seq, table, op, revokes, joins, ends_room, frame = row
    return Event(room=str(room), seq=int(seq), frame=frame.encode(), revokes=revokes,
                 ends_room=bool(ends_room), joins=joins if is_id(joins) else None,
                 table=str(table), op=str(op))


class Store(Pooled):
    """Queries of the daemon. ``conninfo`` from :func:`daemon.db.database`; ``schema`` from
    ``PGBRIDGE_SCHEMA``; ``max_size`` connections at most (``PGBRIDGE_POOL_SIZE``); ``metrics``
    times every statement (:class:`~daemon.store_pool.Pooled`)."""

    def __init__(self, conninfo: str, *, schema: str, metrics: Metrics,
                 max_size: int = 10) -> None:
        super().__init__(conninfo, schema=schema, metrics=metrics, max_size=max_size)
        # every handshake and every subscribe asks one of these: concurrent ones share a query
        # (daemon.batching; docs/topics/fan-out-cost.md)
        self.live_user: Batched[str, bool] = Batched(self._live_users)
        self._cursor_info: Batched[tuple[str, str], RoomCursorInfo] = Batched(
            self._cursor_infos)

    async def in_recovery(self) -> bool:
        rows = await self._all("SELECT pg_is_in_recovery()", (), "checking for a standby",
                               purpose="startup_check")
        return bool(rows[0][0])

    def _needs_grant(self, what: str) -> DatabaseError:
        """The one-line refusal of a daemon role without ``setup_db.py --grant-bridge``."""
        role = conninfo_to_dict(self.conninfo).get("user") or "the daemon's role"
        return DatabaseError(
            f"{describe(self.conninfo)}: SQLSTATE 42501: {role} may not {what}: as the schema "
            f"owner, run python setup_db.py --grant-bridge {role}"
            f"{'' if self.schema == 'public' else ' --schema ' + self.schema}", sqlstate="42501")

    async def check_listen_grant(self) -> None:
        """Raise :class:`DatabaseError` (SQLSTATE 42501, naming ``--grant-bridge``) when the
        daemon's role may not call ``pgbridge_listen()``, the only way the daemon LISTENs (on
        the schema's secret channels: sql/triggers/10_change_capture.sql). A role granted before
        the channels were secret lacks it."""
        rows = await self._all(
            "SELECT has_function_privilege(to_regprocedure(format('%%I.%%I()', %s::text, "
            "'pgbridge_listen')), 'EXECUTE')", (self.schema,), "checking the bridge's privileges",
            purpose="startup_check")
        if not rows[0][0]:
            raise self._needs_grant(f"LISTEN on the schema's secret NOTIFY channels (call "
                                    f"{self.schema}.pgbridge_listen())")

    async def check_presence_grants(self) -> None:
        """Raise :class:`DatabaseError` (SQLSTATE 42501, naming ``--grant-bridge``) when the
        daemon's role may not call the bridge's functions (presence, the doorbell lease) or
        read ``user_status`` and ``presence_sessions`` (a bridge role granted before presence
        or the doorbell existed)."""
        from .roles import BRIDGE_FUNCTIONS

        functions = [f"{name}({args})" for name, args in BRIDGE_FUNCTIONS.items()]
        rows = await self._all(
            "SELECT bool_and(has_function_privilege(f, 'EXECUTE')) "
            "AND has_table_privilege('user_status', 'SELECT') "
            "AND has_table_privilege('presence_sessions', 'SELECT') FROM unnest(%s::text[]) f",
            (functions,), "checking the bridge's privileges", purpose="startup_check")
        if not rows[0][0]:
            raise self._needs_grant("keep presence and the doorbell lease (call the "
                                    "pgbridge_presence_* functions and pgbridge_doorbell, read "
                                    f"{self.schema}.user_status)")

    async def notify_key(self) -> bytes:
        """The key that signs the triggers' NOTIFY payloads (``change_notify_key.key``; the
        bridge role needs ``setup_db.py --grant-bridge``). Raises :class:`DatabaseError`."""
        try:
            rows = await self._all("SELECT key FROM change_notify_key", (),
                                   "reading the NOTIFY signing key", purpose="notify_key")
        except DatabaseError as exc:
            if exc.sqlstate != "42501":
                raise
            raise self._needs_grant(f"read {self.schema}.change_notify_key, the key that signs "
                                    "NOTIFY payloads") from exc
        if not rows:
            raise DatabaseError(f"{describe(self.conninfo)}: {self.schema}.change_notify_key is "
                                "empty: run python setup_db.py as the schema owner")
        return bytes(rows[0][0])

    async def notify(self, channel: str, payload: str, *, doing: str = "sending a probe") -> None:
        await self._all("SELECT pg_notify(%s, %s)", (channel, payload), doing, purpose="notify")

    async def _live_users(self, users: Sequence[str]) -> dict[str, bool]:
        """Whether each of ``users`` has a live ``users`` row (:attr:`live_user` asks for
        many at once)."""
        rows = await self._all("SELECT id FROM users WHERE id = ANY(%s::varchar[]) "
                               "AND deleted_at IS NULL", (list(users),), "checking a token's user",
                               purpose="user_check")
        live = {str(user) for (user,) in rows}
        return {user: user in live for user in users}

    async def gone_users(self, users: Sequence[str]) -> list[str]:
        """Those of ``users`` that have no live ``users`` row (deleted or soft-deleted)."""
        rows = await self._all(
            """
            SELECT a.id FROM unnest(%s::varchar[]) AS a(id)
            WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = a.id AND u.deleted_at IS NULL)
            """, (list(users),), "checking for deleted users", purpose="access")
        return [str(user) for (user,) in rows]

    async def lost_memberships(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Those of ``(user_id, room_id)`` where the user is no longer a member of a live room."""
        if not pairs:
            return []
        users, rooms = zip(*pairs, strict=True)
        rows = await self._all(
            """
            SELECT a.user_id, a.room_id FROM unnest(%s::varchar[], %s::varchar[])
                AS a(user_id, room_id)
            WHERE NOT EXISTS (
                SELECT 1 FROM channel_members m JOIN channels c ON c.id = m.channel_id
                WHERE m.channel_id = a.room_id AND m.user_id = a.user_id
                  AND c.deleted_at IS NULL)
            """, (list(users), list(rooms)), "checking memberships", purpose="access")
        return [(str(user), str(room)) for user, room in rows]

    async def head(self, room: str) -> int:
        rows = await self._all("SELECT last_seq FROM change_sequences WHERE room_id = %s",
                               (room,), "reading a room's head", purpose="room_head")
        return int(rows[0][0]) if rows else 0

    async def database_identity(self) -> str:
        """Which database this is, among copies that hold the same key: the cluster's system
        identifier (when the role may read ``pg_control_system()``) and the database's OID
        (the broker's subjects: :class:`daemon.broker_wire.Subjects`). Raises
        :class:`DatabaseError`."""
        oid = ("SELECT oid::text FROM pg_database WHERE datname = current_database()")
        try:
            rows = await self._all(f"SELECT (SELECT system_identifier::text FROM "
                                   f"pg_control_system()), ({oid})", (),
                                   "reading the database's identity", purpose="startup_check")
        except DatabaseError:  # pg_control_system() revoked, or not there: the OID alone
            rows = await self._all(f"SELECT '', ({oid})", (), "reading the database's identity",
                                   purpose="startup_check")
        return f"{rows[0][0]}:{rows[0][1]}"

    async def heads(self, rooms: Sequence[str]) -> dict[str, int]:
        """The last seq of each of ``rooms`` that has one (a room with no event is left out),
        in one statement."""
        rows = await self._all("SELECT room_id, last_seq FROM change_sequences "
                               "WHERE room_id = ANY(%s)", (list(rooms),),
                               "reading rooms' heads", purpose="room_head")
        return {str(room): int(seq) for room, seq in rows}

    async def cursor_info(self, user_id: str, room: str) -> RoomCursorInfo:
        """What subscribing ``user_id`` to ``room`` needs; concurrent subscribes share one
        query."""
        return await self._cursor_info((user_id, room))

    async def _cursor_infos(self, pairs: Sequence[tuple[str, str]]
                            ) -> dict[tuple[str, str], RoomCursorInfo]:
        users, rooms = zip(*pairs, strict=True)
        rows = await self._all(
            """
            SELECT a.user_id, a.room_id, c.id IS NOT NULL AS room_exists,
                   c.deleted_at IS NULL AND u.deleted_at IS NULL AND m.user_id IS NOT NULL,
                   COALESCE(h.last_seq, 0),
                   (SELECT min(e.seq) FROM change_events e WHERE e.room_id = a.room_id),
                   (SELECT s.last_seq FROM sync_state s WHERE s.user_id = a.user_id
                      AND s.room_id = a.room_id AND s.sync_type = 'events')
            FROM unnest(%s::varchar[], %s::varchar[]) AS a(user_id, room_id)
            LEFT JOIN channels c ON c.id = a.room_id
            LEFT JOIN users u ON u.id = a.user_id
            LEFT JOIN channel_members m ON m.channel_id = a.room_id AND m.user_id = a.user_id
            LEFT JOIN change_sequences h ON h.room_id = a.room_id
            """, (list(users), list(rooms)), "checking a subscription", purpose="cursor_info")
        infos = {}
        for user, room, exists, allowed, head, low, acked in rows:
            status = "ok" if allowed else ("forbidden" if exists else "not_found")
            if allowed and acked is not None and acked > head:
                # never written by a bridge (acks never pass what was delivered, nor the head):
                # by hand, or the room's log and counter were reset. Not trusted: the subscribe
                # gets cursor_expired (daemon.cursor), the next ack replaces it (save_acks).
                log.warning("sync_state of user %s in room %s says %s was acknowledged, past "
                            "the room's head %s: not resuming from it", user, room, acked, head,
                            extra={"event": "cursor_ahead", "user": str(user),
                                   "room": str(room), "acked": int(acked), "head": int(head)})
            infos[str(user), str(room)] = RoomCursorInfo(
                status=status, head=int(head),
                retained_from=int(low) if low is not None else int(head) + 1,
                acked=int(acked) if acked is not None else None)
        return infos

    async def read_events(self, room: str, *, after: int, upto: int,
                          limit: int = READ_PAGE) -> list[Event]:
        """Events of ``room`` with ``after < seq <= upto``, in seq order, at most ``limit``.

        A room's seqs are contiguous, so the page is first read from ``after < seq <=
        min(upto, after + limit)``: a statement that touches at most ``limit`` rows whatever
        plan the server picks. Only when that range has a hole is the whole range read (the
        page must then show what follows the hole). Without statistics (a new table, or a room
        that grew since the last ANALYZE), PostgreSQL planned a bitmap scan of every row after
        ``after`` and a sort, building each row's frame first: 85 ms a page of a 50,000-event
        room, and a replay from 0 took 6 s (bench/fanout.py ``--scenario catchup``)."""
        query = f"""
            SELECT {_EVENT_COLUMNS}
            FROM change_events e
            WHERE e.room_id = %s AND e.seq > %s AND e.seq <= %s
            ORDER BY e.seq LIMIT %s
            """
        end = min(upto, after + limit)
        rows = await self._all(query, (room, after, end, limit), "reading the log",
                               purpose="read_events")
        if len(rows) < end - after and end < upto:
            rows = await self._all(query, (room, after, upto, limit), "reading the log",
                                   purpose="read_events")
        return [_event(row) for row in rows]

    async def read_rooms(self, cursors: Mapping[str, int], *, limit: int
                         ) -> dict[str, list[Event]]:
        """Events after each room's cursor (``{room: after}``), at most ``limit`` per room, in
        seq order per room; rooms with none are left out. One statement, however many rooms
        (:class:`daemon.sequencer.Pass` bounds them)."""
        if not cursors:
            return {}
        rooms, afters = zip(*cursors.items(), strict=True)
        rows = await self._all(
            f"""
            SELECT {_EVENT_COLUMNS}
            FROM unnest(%s::varchar[], %s::bigint[]) AS c(room_id, after)
            CROSS JOIN LATERAL (
                SELECT * FROM change_events e
                WHERE e.room_id = c.room_id AND e.seq > c.after
                ORDER BY e.seq LIMIT %s
            ) AS e
            """, (list(rooms), list(afters), limit), "reading the log", purpose="read_rooms")
        found: dict[str, list[Event]] = {}
        for row in rows:
            event = _event(row)
            found.setdefault(event.room, []).append(event)
        return found

    async def doorbell(self, call: Call) -> Reading:
        """Call ``pgbridge_doorbell`` (sql/triggers/10_change_capture.sql): renew or read the
        doorbell lease, take or check a barrier. Raises :class:`DatabaseError`."""
        rows = await self._all(
            """
            SELECT extract(epoch FROM quiet_until)::float8, extract(epoch FROM now)::float8,
                   captured, barrier::text, settled
            FROM pgbridge_doorbell(%s, %s, %s::pg_snapshot)
            """, (call.quiet_ms, call.new_barrier, call.barrier), "ringing the doorbell",
            purpose="doorbell")
        quiet_until, now, captured, barrier, settled = rows[0]
        return Reading(quiet_until=quiet_until, now=now, captured=captured, barrier=barrier,
                       settled=settled)

    async def save_acks(self, acks: list[tuple[str, str, int]]) -> None:
        """Upsert ``(user_id, room_id, seq)`` into ``sync_state`` (sync_type ``events``); a seq
        never moves backwards, except from a stored seq past the room's head
        (``change_sequences``), which no bridge wrote and which the ack replaces. One statement
        for the whole batch. Raises :class:`DatabaseError`."""
        from ulid import ULID

        if not acks:
            return
        users, rooms, seqs = zip(*acks, strict=True)
        ids = [str(ULID()) for _ in acks]
        await self._all(
            """
            INSERT INTO sync_state (id, user_id, room_id, sync_type, last_seq, last_sync)
            SELECT id, user_id, room_id, 'events', seq, now()
            FROM unnest(%s::varchar[], %s::varchar[], %s::varchar[], %s::bigint[])
                 AS a(id, user_id, room_id, seq)
            WHERE EXISTS (SELECT 1 FROM channels c WHERE c.id = a.room_id)
            ON CONFLICT (user_id, room_id, sync_type) DO UPDATE
               SET last_seq = CASE
                       WHEN sync_state.last_seq > COALESCE((
                           SELECT h.last_seq FROM change_sequences h
                           WHERE h.room_id = EXCLUDED.room_id), 0)
                       THEN EXCLUDED.last_seq
                       ELSE GREATEST(sync_state.last_seq, EXCLUDED.last_seq) END,
                   last_sync = EXCLUDED.last_sync
            RETURNING 1
            """, (ids, list(users), list(rooms), list(seqs)), "saving acknowledgements",
            purpose="ack_flush")

    async def prune(self, older_than: float, *, batch: int = 10000) -> int:
        """Delete ``change_events`` older than ``older_than`` seconds, in batches; returns the
        number of rows deleted."""
        total = 0
        while True:
            rows = await self._all(
                """
                WITH doomed AS (
                    SELECT room_id, seq FROM change_events
                    WHERE created_at < now() - make_interval(secs => %s) LIMIT %s)
                DELETE FROM change_events e USING doomed d
                WHERE e.room_id = d.room_id AND e.seq = d.seq
                RETURNING 1
                """, (older_than, batch), "pruning the log", purpose="prune")
            total += len(rows)
            if len(rows) < batch:
                return total

    async def index_scans(self, *, timeout: float) -> list[tuple[str, str, int]]:
        """``(table, index, idx_scan)`` of every index of the bridge's schema
        (``pg_stat_user_indexes``; readable by any role), at most
        :data:`~daemon.metrics.MAX_INDEX_SERIES`, by table and index; the statement runs
        ``timeout`` seconds at most. Raises :class:`DatabaseError`."""
        rows = await self._all(
            "SELECT relname, indexrelname, idx_scan FROM pg_stat_user_indexes "
            "WHERE schemaname = %s ORDER BY relname, indexrelname LIMIT %s",
            (self.schema, MAX_INDEX_SERIES), "reading index statistics", purpose="index_stats",
            timeout=timeout)
        return [(str(table), str(index), int(scans or 0)) for table, index, scans in rows]

    # --- presence (sql/triggers/40_presence.sql) ----------------------------------------------

    async def presence_sync(self, instance: str, lease: float,
                            changes: Sequence[tuple[str, float | None]], *,
                            renew: bool) -> tuple[bool, int]:
        """Write ``instance``'s transitions: ``(user_id, None)`` a first connection,
        ``(user_id, s)`` a last one closed ``s`` seconds ago; with ``renew``, renew its lease
        for ``lease`` seconds. Returns ``(lease_held, transitions written)``; ``lease_held`` is
        false when the instance had no lease (its first call, or it was reaped), which this
        call then took for ``lease`` seconds."""
        users = [user for user, _ in changes]
        ago = [closed for _, closed in changes]
        rows = await self._all("SELECT * FROM pgbridge_presence_sync(%s, %s, %s, %s, %s)",
                               (instance, lease, renew, users, ago), "writing presence",
                               purpose="presence_write")
        return bool(rows[0][0]), int(rows[0][1])

    async def presence_reap(self) -> tuple[int, int]:
        """Expire the instances whose lease ran out; returns ``(instances, users now
        offline)``."""
        rows = await self._all("SELECT * FROM pgbridge_presence_reap()", (),
                               "expiring presence leases", purpose="presence_write")
        return int(rows[0][0]), int(rows[0][1])

    async def presence_retire(self, instance: str, grace: float,
                              closed: Sequence[tuple[str, float]]) -> None:
        """A clean shutdown: ``instance``'s lease ends in ``grace`` seconds; ``closed`` are
        ``(user_id, seconds since their last connection closed)``."""
        await self._all("SELECT 1 FROM pgbridge_presence_retire(%s, %s, %s, %s)",
                        (instance, grace, [u for u, _ in closed], [s for _, s in closed]),
                        "retiring the presence lease", purpose="presence_write")

    async def rooms_presence(self, rooms: Sequence[str]) -> list[Presence]:
        """Presence of every member of ``rooms`` who is not a deleted user, by room and
        ``user_id``."""
        rows = await self._all(
            _PRESENCE + " WHERE m.channel_id = ANY(%s) ORDER BY m.channel_id, m.user_id",
            (list(rooms),), "reading presence", purpose="presence_read")
        return [Presence(*row) for row in rows]

    async def members_presence(self, users: Sequence[str],
                               rooms: Sequence[str]) -> list[Presence]:
        """Presence of each of ``users`` in each of ``rooms`` they are a member of."""
        rows = await self._all(
            _PRESENCE + " WHERE m.user_id = ANY(%s) AND m.channel_id = ANY(%s)",
            (list(users), list(rooms)), "reading presence", purpose="presence_read")
        return [Presence(*row) for row in rows]
