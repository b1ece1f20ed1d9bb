"""The WebSocket protocol, version 1 (PROTOCOL.md): parsing client frames, building server frames.

Pure: no sockets, no database. :func:`parse_frame` turns one client frame into a request object
or raises :class:`ProtocolError` carrying the ``error`` frame's ``code``, ``message`` and, when
the frame had them, ``ref`` and ``room``. Unknown fields are ignored (clients may be newer).

This is the edge: every client-supplied string is checked here against what it may be
(PROTOCOL.md, "What each field may be") before any other module sees it, so a room id that
reaches the hub, the listener or a query is 1 to 26 characters of ``[0-9A-Za-z_-]``, a ref is
printable, and a token is ASCII of a JWT's alphabet. :func:`load_json` is the one JSON reader
for untrusted text (client frames, NOTIFY payloads): depth-limited, never a ``RecursionError``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

PROTOCOL_VERSION = 1
MAX_REF_LENGTH = 128
MAX_ID_LENGTH = 26  # channels.id and users.id are VARCHAR(26) (spec 003): ULIDs
MAX_TOKEN_LENGTH = 4096  # fits a request line of websockets' 8,192 bytes, so 401 is reachable
MAX_DEPTH = 32  # client frames are flat; unknown fields may nest a little
MAX_BRACKETS = 256  # "[" and "{" in a client frame (strings included); v1 frames have one

_ID = re.compile(rf"[0-9A-Za-z_-]{{1,{MAX_ID_LENGTH}}}")
_TOKEN = re.compile(rf"[0-9A-Za-z_.=-]{{1,{MAX_TOKEN_LENGTH}}}")

__all__ = [
    "MAX_TOKEN_LENGTH", "Ack", "Feed", "FeedRoom", "Ping", "ProtocolError", "Refresh", "Request",
    "Subscribe", "Typing", "Unsubscribe", "error", "feed_frame", "is_id", "is_token", "load_json",
    "parse_frame", "pong", "presence", "snapshot", "subscribed", "typing", "unsubscribed",
    "welcome",
]


class ProtocolError(Exception):
    """A client frame was refused; becomes an ``error`` frame (PROTOCOL.md error codes)."""

    def __init__(self, code: str, message: str, *, ref: str | None = None,
                 room: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.room = room

    def frame(self) -> str:
        return error(self.code, self.message, ref=self.ref, room=self.room)


@dataclass(frozen=True, slots=True)
class Subscribe:
    room: str
    since: int | None = None
    ref: str | None = None
    presence: bool = False  # also the members' presence and typing ("Presence and typing")
    snapshot: int | None = None  # the N most recent messages first ("Snapshot then live")


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    room: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    room: str
    seq: int
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Typing:
    """The user is typing in ``room`` (relayed to the room's presence subscribers)."""

    room: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Feed:
    """Follow every room of the user on this connection ("One feed per user")."""

    ref: str | None = None


Request = Subscribe | Unsubscribe | Ack | Ping | Refresh | Typing | Feed


@dataclass(frozen=True, slots=True)
class FeedRoom:
    """One room of a ``feed`` frame: its latest seq, the user's acknowledged seq (0: never) and
    the messages of other users after it (at most the count the feed reads)."""

    room: str
    head: int
    acked: int
    unread: int


def is_id(value: object) -> TypeGuard[str]:
    """True for a string that can be a ``channels.id`` or ``users.id``: 1 to 26 characters of
    ``A-Z a-z 0-9 _ -`` (no NUL, no surrogate, nothing a query or a log line could trip on)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_token(value: object) -> TypeGuard[str]:
    """True for a string shaped like a JWT: 1 to 4,096 characters of ``A-Z a-z 0-9 - _ . =``."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def _deeper_than(obj: Any, limit: int) -> bool:
    """True when a decoded JSON value nests more than ``limit`` levels (a flat object is 1).
    Iterative, and it stops at the first container past the limit: its cost is bounded by
    the containers within ``limit`` levels, however deep the value goes."""
    containers = (dict, list)
    stack = [(obj, 1)] if isinstance(obj, containers) else []
    while stack:
        value, level = stack.pop()
        if level > limit:
            return True
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, containers):
                stack.append((child, level + 1))
    return False


def load_json(text: str, *, max_depth: int = MAX_DEPTH,
              max_brackets: int | None = MAX_BRACKETS) -> Any:
    """Decode untrusted JSON text nested at most ``max_depth`` levels, with at most
    ``max_brackets`` ``[`` and ``{`` characters (``None``: no such limit).

    Raises :class:`ValueError` with a message safe to show the sender (it quotes nothing of
    ``text``): invalid JSON, a number too large to convert, too many brackets, or nesting too
    deep. The bracket count is taken before decoding and bounds what follows: the C decoder
    stops by itself near the interpreter's recursion limit (that ``RecursionError`` becomes
    the same ``ValueError``), and the depth is walked only when there are more brackets than
    ``max_depth``, stopping at the limit.
    """
    too_deep = f"JSON nests deeper than {max_depth} levels"
    brackets = text.count("[") + text.count("{")
    if max_brackets is not None and brackets > max_brackets:
        raise ValueError(f"more than {max_brackets} '[' and '{{' in one frame")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError(too_deep) from None
    except ValueError:
        raise ValueError("not valid JSON") from None
    if brackets > max_depth and _deeper_than(obj, max_depth):
        raise ValueError(too_deep)
    return obj


def _room(obj: dict[str, Any], ref: str | None) -> str:
    value = obj.get("room")
    if value is None:
        raise ProtocolError("bad_request", "field 'room' missing", ref=ref)
    if not is_id(value):
        raise ProtocolError("bad_request", "field 'room' must be a channels.id: 1 to "
                            f"{MAX_ID_LENGTH} characters of A-Z a-z 0-9 _ -", ref=ref)
    return value


def _ref(obj: dict[str, Any]) -> str | None:
    value = obj.get("ref")
    if value is None:
        return None
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_REF_LENGTH
            or not value.isprintable()):
        raise ProtocolError("bad_request", f"field 'ref' must be a string of 1 to "
                            f"{MAX_REF_LENGTH} printable characters")
    return value


def _field_int(obj: dict[str, Any], name: str, *, ref: str | None, room: str | None,
               required: bool) -> int | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        problem = "missing" if value is None else "must be an integer"
        raise ProtocolError("bad_request", f"field {name!r} {problem}", ref=ref, room=room)
    if value < 0 or value > 2**63 - 1:
        raise ProtocolError("bad_request", f"field {name!r} must be between 0 and 2^63-1",
                            ref=ref, room=room)
    return value


def parse_frame(data: str | bytes) -> Request:
    """Parse one client frame (PROTOCOL.md, "Client → server").

    ``bytes`` means a binary frame, which the protocol does not use. Raises
    :class:`ProtocolError`: ``bad_request`` or ``unknown_type``, ``unauthorized`` for a
    ``refresh`` whose token is not shaped like a JWT.
    """
    if isinstance(data, bytes):
        raise ProtocolError("bad_request", "binary frames are not supported; send JSON text")
    try:
        obj = load_json(data)
    except ValueError as exc:
        raise ProtocolError("bad_request", f"frame refused: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object")
    ref = _ref(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "field 'type' missing or not a string", ref=ref)
    if kind == "ping":
        return Ping(ref=ref)
    if kind == "feed":
        return Feed(ref=ref)
    if kind == "refresh":
        token = obj.get("token")
        if not isinstance(token, str):
            problem = "missing" if token is None else "must be a string"
            raise ProtocolError("bad_request", f"field 'token' {problem}", ref=ref)
        if not is_token(token):
            raise ProtocolError("unauthorized", "field 'token' must be a JWT of at most "
                                f"{MAX_TOKEN_LENGTH} characters", ref=ref)
        return Refresh(token=token, ref=ref)
    if kind not in ("subscribe", "unsubscribe", "ack", "typing"):
        shown = kind[:40] if kind.isprintable() else "(not printable)"
        raise ProtocolError("unknown_type", f"unknown type {shown!r}", ref=ref)
    room = _room(obj, ref)
    if kind == "subscribe":
        wants = obj.get("presence", False)
        if not isinstance(wants, bool):
            raise ProtocolError("bad_request", "field 'presence' must be true or false", ref=ref,
                                room=room)
        since = _field_int(obj, "since", ref=ref, room=room, required=False)
        recent = _field_int(obj, "snapshot", ref=ref, room=room, required=False)
        if recent is not None and (recent < 1 or since is not None):
            raise ProtocolError("bad_request", "field 'snapshot' must be at least 1" if recent < 1
                                else "'snapshot' and 'since' exclude each other", ref=ref,
                                room=room)
        return Subscribe(room=room, since=since, ref=ref, presence=wants, snapshot=recent)
    if kind == "typing":
        return Typing(room=room, ref=ref)
    if kind == "unsubscribe":
        return Unsubscribe(room=room, ref=ref)
    seq = _field_int(obj, "seq", ref=ref, room=room, required=True)
    assert seq is not None
    return Ack(room=room, seq=seq, ref=ref)


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in obj.items() if v is not None}, separators=(",", ":"))


def welcome(user: str, heartbeat: float, *, batch: int | None = None,
            correlation_id: str | None = None) -> str:
    """First frame after the upgrade; ``heartbeat`` in seconds (server pings that often);
    ``batch``, the coalescing wait in ms the client asked for (``?batch=``; PROTOCOL.md,
    "Coalesced messages"), only when it did; ``correlation_id``, the connection's id in the
    server's log (16 hex digits, daemon/logs.py), for a user's report to name."""
    return _dump({"type": "welcome", "user": user, "protocol": PROTOCOL_VERSION,
                  "heartbeat": heartbeat, "batch": batch, "correlation_id": correlation_id})


def subscribed(room: str, from_seq: int, head: int, ref: str | None) -> str:
    return _dump({"type": "subscribed", "room": room, "from": from_seq, "head": head, "ref": ref})


def snapshot(room: str, seq: int, messages: str, *, truncated: bool, ref: str | None) -> str:
    """The ``snapshot`` frame ("Snapshot then live"): ``messages``, a JSON array as text (the
    rows, oldest first, each as PostgreSQL writes a ``jsonb``: no raw newline), as of ``seq``;
    ``truncated``: older messages were left out to keep it within PGBRIDGE_SNAPSHOT_MAX_BYTES."""
    head = _dump({"type": "snapshot", "room": room, "seq": seq, "truncated": truncated,
                  "ref": ref})
    return f'{head[:-1]},"messages":{messages}}}'


def feed_frame(rooms: list[FeedRoom], ref: str | None) -> str:
    """The answer to ``feed`` ("One feed per user"): ``rooms`` in the order given."""
    listed = [{"room": r.room, "head": r.head, "acked": r.acked, "unread": r.unread}
              for r in rooms]
    return _dump({"type": "feed", "ref": ref, "rooms": listed})


def unsubscribed(room: str, reason: str, ref: str | None = None) -> str:
    """``reason``: ``client``, ``membership_revoked``, ``room_deleted`` or ``cursor_expired``."""
    return _dump({"type": "unsubscribed", "room": room, "reason": reason, "ref": ref})


def pong(ref: str | None) -> str:
    return _dump({"type": "pong", "ref": ref})


def presence(room: str, user: str, *, status: str, online: bool, last_seen: str | None,
             custom_status: str | None) -> str:
    """A member's presence ("Presence and typing"); ``last_seen`` ISO 8601 in UTC or ``None``
    (sent as ``null``, as is a ``custom_status`` of ``None``)."""
    return json.dumps({"type": "presence", "room": room, "user": user, "status": status,
                       "online": online, "last_seen": last_seen,
                       "custom_status": custom_status}, separators=(",", ":"))


def typing(room: str, user: str) -> str:
    return _dump({"type": "typing", "room": room, "user": user})


def error(code: str, message: str, *, ref: str | None = None, room: str | None = None) -> str:
    return _dump({"type": "error", "code": code, "message": message, "ref": ref, "room": room})
