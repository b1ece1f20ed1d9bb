"""The statements of a feed (:mod:`daemon.feed`; PROTOCOL.md, "One feed per user"), each one
statement and one MVCC snapshot, and the bounds they read within. Pure: text only."""

from __future__ import annotations

__all__ = ["FEED_ROOMS", "JOINS", "JOIN_LOOKBACK", "MEMBERSHIPS", "UNREAD_MAX"]

# messages one room's unread count reads at most (PROTOCOL.md): each costs a lookup of its row
# (about 4 µs, docs/benchmarks/feed.md), so at most 0.4 s for 1,000 rooms with 100+ unread each
UNREAD_MAX = 100
JOIN_LOOKBACK = 10000  # events of a room searched back from its head for a join event

# One statement, one MVCC snapshot: the user's liveness, the number of rooms, and (when within
# max_rooms) each room with its head, the user's acked seq and its unread count. The unread
# count walks the room's log after the acked seq by its primary key (room_id, seq) and each
# message by its own, and stops at UNREAD_MAX. Parameters: user, max_rooms, cap.
FEED_ROOMS = """
    WITH me AS (
        SELECT u.id FROM users u WHERE u.id = %(user)s AND u.deleted_at IS NULL
    ), mine AS (
        SELECT m.channel_id AS room, COALESCE(h.last_seq, 0) AS head,
               COALESCE(s.last_seq, 0) AS acked
        FROM me JOIN channel_members m ON m.user_id = me.id
        JOIN channels c ON c.id = m.channel_id AND c.deleted_at IS NULL
        LEFT JOIN change_sequences h ON h.room_id = m.channel_id
        LEFT JOIN sync_state s ON s.user_id = me.id AND s.room_id = m.channel_id
                              AND s.sync_type = 'events'
    ), n AS (SELECT count(*) AS rooms FROM mine)
    SELECT EXISTS (SELECT 1 FROM me), n.rooms, r.room, r.head, r.acked, r.unread
    FROM n LEFT JOIN LATERAL (
        SELECT mine.room, mine.head, mine.acked,
               (SELECT count(*) FROM (
                    SELECT 1 FROM change_events e JOIN messages msg ON msg.id = e.row_id
                    WHERE e.room_id = mine.room AND e.seq > mine.acked
                      AND e.table_name = 'messages' AND e.op = 'INSERT'
                      AND msg.channel_id = mine.room AND msg.user_id <> %(user)s
                      AND msg.deleted_at IS NULL
                    LIMIT %(cap)s) AS x) AS unread
        FROM mine WHERE n.rooms <= %(max_rooms)s
    ) AS r ON true
    ORDER BY r.room
"""

# The rooms of the given users (not deleted): what a recheck compares with what feeds cover.
MEMBERSHIPS = """
    SELECT m.user_id, m.channel_id FROM channel_members m
    JOIN channels c ON c.id = m.channel_id AND c.deleted_at IS NULL
    WHERE m.user_id = ANY(%s::varchar[])
"""

# For (user, room) pairs a feed will follow: the membership checked, the head, the last
# DELETE event of the membership (the user left, or the row was moved away) or soft delete of
# the room (a room restored since: what came before is not the user's to replay) and its join:
# the first event of the membership after that (its INSERT, or the UPDATE that moved the row
# there; never an earlier membership's, nor a later UPDATE of its role), in the room's last
# JOIN_LOOKBACK events, in one snapshot. Pairs whose membership (or user, or room) is gone are
# left out.
JOINS = f"""
    SELECT a.user_id, a.room_id, COALESCE(h.last_seq, 0), d.left_at,
           (SELECT min(k) FROM unnest(d.kept) AS k WHERE k > COALESCE(d.left_at, 0))
    FROM unnest(%s::varchar[], %s::varchar[]) AS a(user_id, room_id)
    JOIN channel_members m ON m.channel_id = a.room_id AND m.user_id = a.user_id
    JOIN channels c ON c.id = a.room_id AND c.deleted_at IS NULL
    JOIN users u ON u.id = a.user_id AND u.deleted_at IS NULL
    LEFT JOIN change_sequences h ON h.room_id = a.room_id
    CROSS JOIN LATERAL (  -- one pass over the window
        SELECT max(e.seq) FILTER (WHERE e.op = 'DELETE' OR e.table_name = 'channels')
                   AS left_at,
               array_agg(e.seq) FILTER (WHERE e.table_name = 'channel_members'
                                          AND e.op <> 'DELETE') AS kept
        FROM change_events e
        WHERE e.room_id = a.room_id
          AND e.seq > COALESCE(h.last_seq, 0) - {JOIN_LOOKBACK}
          AND (e.table_name = 'channel_members' AND e.row_id = a.room_id || ':' || a.user_id
               OR e.table_name = 'channels' AND e.payload->>'deleted_at' IS NOT NULL)) AS d
"""
