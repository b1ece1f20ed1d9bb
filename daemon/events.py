"""The event model: what a NOTIFY payload or a ``change_events`` row means to the daemon.

Pure. An :class:`Event` carries its protocol frame already encoded (UTF-8 bytes of the JSON
text built by ``pgbridge_event_frame`` in SQL), so a fan-out to N clients encodes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .protocol import is_id, load_json

__all__ = ["Event", "MemberHint", "Pointer", "PresenceHint", "Probe", "UserHint", "capture_time",
           "parse_notify"]


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a room. ``frame`` is the ``event`` frame as UTF-8 JSON.

    ``revokes`` is the ``users.id`` whose membership this event ends (a ``channel_members``
    DELETE), ``ends_room`` is true for a room deleted or soft-deleted (``channels`` DELETE, or
    UPDATE with ``deleted_at`` set), ``joins`` the ``users.id`` whose membership it adds or
    changes (a ``channel_members`` INSERT or UPDATE: the room's presence watchers learn of them).
    ``table`` and ``op`` are the captured row's table and ``INSERT``, ``UPDATE`` or ``DELETE``
    (the frame's ``table`` and ``op``), for ``pgbridge_trigger_executions_total``.
    """

    room: str
    seq: int
    frame: bytes
    revokes: str | None = None
    ends_room: bool = False
    joins: str | None = None
    table: str = ""
    op: str = ""


@dataclass(frozen=True, slots=True)
class Pointer:
    """A NOTIFY for an event too large to carry: read ``room``/``seq`` from the log."""

    room: str
    seq: int


@dataclass(frozen=True, slots=True)
class Probe:
    """The daemon's own round-trip probe (``{"probe": token}``)."""

    token: str


@dataclass(frozen=True, slots=True)
class UserHint:
    """``users`` row ``user`` was deleted, soft-deleted or given another id
    (``{"access": "user", "user": ...}``, sql/triggers/20_access.sql). A hint only: whether the
    user really is gone is read from ``users``."""

    user: str


@dataclass(frozen=True, slots=True)
class MemberHint:
    """A ``channel_members`` row of ``user`` was inserted or moved (``{"access": "member",
    "user": ...}``, sql/triggers/20_access.sql): the user's feeds read the user's memberships
    again (daemon/feed.py). A hint only: it carries nothing to believe."""

    user: str


@dataclass(frozen=True, slots=True)
class PresenceHint:
    """``user_status`` row of ``user`` changed (``{"presence": "user", "user": ...}``,
    sql/triggers/40_presence.sql): read it again. Carries nothing to believe."""

    user: str


def _effects(table: str, op: str, data: Any) -> tuple[str | None, bool, str | None]:
    if not isinstance(data, dict):
        data = {}
    member = data.get("user_id") if table == "channel_members" else None
    member = member if is_id(member) else None
    ends_room = table == "channels" and (op == "DELETE" or data.get("deleted_at") is not None)
    return (member if op == "DELETE" else None), ends_room, (member if op != "DELETE" else None)


# A frame built by the capture trigger nests 3 levels plus whatever a JSONB column holds
# (messages.metadata); deeper payloads are ignored here and reach clients through the log.
MAX_NOTIFY_DEPTH = 256


def parse_notify(payload: str) -> (Event | Pointer | Probe | UserHint | MemberHint | PresenceHint
                                    | None):
    """Interpret a payload of the ``pgbridge`` channel; ``None`` for anything unrecognised
    (any role may NOTIFY, so this is untrusted text: invalid or deeply nested JSON included)."""
    try:
        obj = load_json(payload, max_depth=MAX_NOTIFY_DEPTH, max_brackets=None)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    if "probe" in obj:
        return Probe(str(obj["probe"]))
    if "access" in obj:
        user, kind = obj.get("user"), obj["access"]
        if not is_id(user):
            return None
        return UserHint(user) if kind == "user" else MemberHint(user) if kind == "member" else None
    if "presence" in obj:
        user = obj.get("user")
        return PresenceHint(user) if obj["presence"] == "user" and is_id(user) else None
    room, seq = obj.get("room"), obj.get("seq")
    if not isinstance(room, str) or not isinstance(seq, int):
        return None
    if obj.get("type") != "event":
        return Pointer(room, seq)
    table, op = str(obj.get("table")), str(obj.get("op"))
    revokes, ends_room, joins = _effects(table, op, obj.get("data"))
    return Event(room=room, seq=seq, frame=payload.encode(), revokes=revokes, ends_room=ends_room,
                 joins=joins, table=table, op=op)


# An event frame ends with its capture time: pgbridge_event_frame (sql/triggers/
# 10_change_capture.sql) builds it with json_build_object, whose text puts " : " between a key
# and its value, and 'ts' last, as to_char(..., 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"').
_TS_KEY = b'"ts" : "'
_TS_LEN = len("2025-01-31T12:00:00.123456+00:00")
_TS_TAIL = len(_TS_KEY) + _TS_LEN + 2  # the key, the value, '"}'


def capture_time(frame: bytes) -> float | None:
    """When the event in ``frame`` (an :class:`Event` frame, from a NOTIFY or the log) was
    captured: its ``ts`` (``clock_timestamp()`` in the writer's transaction, on the database
    server's clock), in seconds since the epoch. ``None`` when the frame does not end with a
    ``ts`` (not one built by ``pgbridge_event_frame``).

    Reads the fixed-width tail of the frame only, never the JSON: about 1 µs, whatever the
    event's size (measured: docs/reference/metrics.md)."""
    if frame[-_TS_TAIL:-_TS_LEN - 2] != _TS_KEY or frame[-2:] != b'"}':
        return None
    try:
        return datetime.fromisoformat(frame[-_TS_LEN - 2:-2].decode()).timestamp()
    except ValueError:
        return None
