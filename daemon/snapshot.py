"""Snapshot then live (PROTOCOL.md, "Snapshot then live"): a ``subscribe`` with ``"snapshot":
N`` gets, after ``subscribed``, one ``snapshot`` frame holding the N most recent messages of the
room that are not soft-deleted, as of seq S, then every event after S.

**Why one statement is exact.** The capture trigger (sql/triggers/10_change_capture.sql) takes a
room's next seq by an UPDATE of its ``change_sequences`` row, in the writer's own transaction,
and holds that row lock until commit: the writers of one room commit in seq order, and the
transaction that wrote seq k was committed (and visible to any later snapshot) before the one
that writes k + 1 could take the lock. So in any one MVCC snapshot, ``last_seq = S`` means that
exactly the events up to S are visible, and with them exactly the message rows, edits and soft
deletes of the transactions that produced them. :data:`_SNAPSHOT` is ONE ``SELECT`` (one
snapshot, even in READ COMMITTED: its CTEs and subqueries all see it) that reads the room's
``last_seq`` (0 for a room with no counter yet: no event ever), the membership of the user and
the N most recent visible messages; the events after S are then replayed from the log as for
``since=S`` (:func:`daemon.replay.replay`) and live events at or below S are dropped by the
subscription's cursor (:class:`daemon.hub.Subscription`). A message is therefore in the snapshot
or arrives later as its event, never both and never neither. The membership is checked in the
same snapshot, so the subscription's ``checked_at`` is S: a revocation after S ends it as any
live one does.

"Most recent" is ``(created_at, id)`` descending (ULIDs are time-ordered too), the order of the
index ``messages_channel_created_idx``; the frame lists them oldest first. Each message is
``to_jsonb`` of its row, which is what the capture trigger puts in an event's ``data``.

**Size.** The frame holds at most ``PGBRIDGE_SNAPSHOT_MAX_BYTES`` bytes of rows (counted in
SQL, so a room of huge rows never reaches the daemon whole): the most recent messages that fit;
when older ones of the N were left out, ``"truncated": true``. It is one frame in the
connection's queue (``PGBRIDGE_QUEUE_SIZE`` counts frames, as for an event of any size), sent
only once nothing else waits in that queue (:meth:`daemon.outgoing.OutgoingQueue.room_for`):
a connection that subscribes to many rooms with snapshots holds at most one not yet written
to its socket, so its memory is bounded by about two frames, not by the queue's length.
"""

from __future__ import annotations

import sys

from .errors import DatabaseError
from .hub import Subscription
from .outgoing import OutgoingQueue
from .protocol import ProtocolError, Subscribe, snapshot
from .settings import DaemonSettings
from .store import RoomCursorInfo, Store

__all__ = ["check_subscribe", "read_snapshot", "send_recent"]

# One statement, one MVCC snapshot (see the module's docstring). Parameters: user, room, N,
# max_bytes. ``recent`` picks the N rows by their index and a lower bound of each one's JSON
# text (its content's bytes, read from the TOAST header without detoasting: JSON escaping only
# adds): a row whose running bound is past max_bytes cannot fit and is never read whole nor
# serialized, so the statement's work is bounded by max_bytes, not by N times the rows' size.
# Each kept row's JSON text is made once (``jsonb`` text: no raw newline) and joined as text
# (jsonb_agg would build the array as jsonb and write it out again: twice the time); the
# running total counts each row's text and the "," that separates it.
_SNAPSHOT = """
    WITH auth AS (
        SELECT c.id IS NOT NULL AS room_exists,
               c.deleted_at IS NULL AND u.deleted_at IS NULL AND m.user_id IS NOT NULL
                   AS allowed
        FROM (SELECT %(user)s::varchar AS user_id, %(room)s::varchar AS room_id) AS a
        LEFT JOIN channels c ON c.id = a.room_id
        LEFT JOIN users u ON u.id = a.user_id
        LEFT JOIN channel_members m ON m.channel_id = a.room_id AND m.user_id = a.user_id
    ), recent AS (
        SELECT r.id, r.created_at,
               sum(r.len + 1) OVER (ORDER BY r.created_at DESC, r.id DESC) AS floor
        FROM (SELECT m.id, m.created_at, octet_length(m.content) AS len
              FROM messages m
              WHERE m.channel_id = %(room)s AND m.deleted_at IS NULL
                AND (SELECT allowed FROM auth)
              ORDER BY m.created_at DESC, m.id DESC
              LIMIT %(n)s) AS r
    ), sized AS (
        SELECT j.data, j.created_at, j.id,
               sum(octet_length(j.data) + 1) OVER (ORDER BY j.created_at DESC, j.id DESC)
                   AS used
        FROM (SELECT to_jsonb(m)::text AS data, r.created_at, r.id
              FROM recent r JOIN messages m ON m.id = r.id
              WHERE r.floor <= %(max_bytes)s) AS j
    )
    SELECT a.room_exists, a.allowed,
           COALESCE((SELECT h.last_seq FROM change_sequences h
                     WHERE h.room_id = %(room)s), 0),
           (SELECT '[' || string_agg(s.data, ',' ORDER BY s.created_at, s.id) || ']'
            FROM sized s WHERE s.used <= %(max_bytes)s),
           (SELECT count(*) FROM recent)
               - (SELECT count(*) FROM sized s WHERE s.used <= %(max_bytes)s)
    FROM auth a
"""


async def check_subscribe(store: Store, user: str, request: Subscribe,
                          settings: DaemonSettings) -> tuple[RoomCursorInfo, str | None]:
    """What a ``subscribe`` needs before it registers: :meth:`daemon.store.Store.cursor_info`,
    or for a snapshot subscribe its :func:`read_snapshot`, whose ``acked`` is S so that
    :func:`daemon.cursor.resolve_from` starts the subscription there (``since`` is never given
    with ``snapshot``: daemon.protocol refuses it), and its ``snapshot`` frame (``None``
    without one). Raises as :func:`read_snapshot`."""
    if request.snapshot is None:
        return await store.cursor_info(user, request.room), None
    return await read_snapshot(store, user, request, settings)


async def send_recent(frame: str | None, sub: Subscription, outgoing: OutgoingQueue) -> None:
    """Send the ``snapshot`` frame (none: nothing) to ``sub`` once nothing waits in the
    connection's queue (so a connection holds at most one snapshot not yet written to its
    socket, however many rooms it subscribes to), unless the subscription ended or the
    connection closes meanwhile."""
    if frame is None:
        return
    await outgoing.room_for(sys.maxsize)  # waits until the queue is empty
    if not sub.ended and not outgoing.closing:
        sub.sink.send(frame)


async def read_snapshot(store: Store, user: str, request: Subscribe,
                        settings: DaemonSettings) -> tuple[RoomCursorInfo, str | None]:
    """Check ``user``'s membership of ``request.room`` and read its snapshot, in one statement:
    the subscription's :class:`~daemon.store.RoomCursorInfo` (``head`` and ``acked`` = S) and
    the ``snapshot`` frame (``None`` when not allowed).

    Raises :class:`ProtocolError` ``bad_request`` for ``request.snapshot`` over
    ``PGBRIDGE_SNAPSHOT_MAX`` (before the database is asked), and
    :class:`daemon.errors.DatabaseError` when the database fails (SQLSTATE 42501: the daemon's
    role was granted by a ``setup_db.py --grant-bridge`` older than snapshots)."""
    room, n = request.room, request.snapshot
    assert n is not None
    if n > settings.snapshot_max:
        raise ProtocolError("bad_request", f"field 'snapshot' must be at most "
                            f"{settings.snapshot_max}", ref=request.ref, room=room)
    try:
        rows = await store._all(  # the Store's pool; this module holds the query
            _SNAPSHOT, {"user": user, "room": room, "n": n,
                        "max_bytes": settings.snapshot_max_bytes},
            "reading a room's snapshot", purpose="snapshot")
    except DatabaseError as exc:
        if exc.sqlstate != "42501":
            raise
        raise store._needs_grant("read messages for snapshots") from exc
    exists, allowed, head, messages, left_out = rows[0]
    status = "ok" if allowed else ("forbidden" if exists else "not_found")
    info = RoomCursorInfo(status=status, head=int(head), retained_from=int(head) + 1,
                          acked=int(head))
    frame = snapshot(room, int(head), messages or "[]", truncated=bool(left_out),
                     ref=request.ref) if allowed else None
    return info, frame
