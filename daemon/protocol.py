"""The WebSocket protocol, version 1 (PROTOCOL.md): parsing client frames, building server frames.

Pure: no sockets, no database. :func:`parse_frame` turns one client frame into a request object
or raises :class:`ProtocolError` carrying the ``error`` frame's ``code``, ``message`` and, when
the frame had them, ``ref`` and ``room``. Unknown fields are ignored (clients may be newer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_REF_LENGTH = 128
MAX_ROOM_LENGTH = 64
MAX_TOKEN_LENGTH = 8192

__all__ = [
    "Ack", "Ping", "ProtocolError", "Refresh", "Request", "Subscribe", "Unsubscribe",
    "error", "parse_frame", "pong", "subscribed", "unsubscribed", "welcome",
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


Request = Subscribe | Unsubscribe | Ack | Ping | Refresh


def _field_str(obj: dict[str, Any], name: str, *, limit: int, ref: str | None,
               room: str | None = None, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        need = "a non-empty string"
        problem = "missing" if value is None else f"must be {need}"
        raise ProtocolError("bad_request", f"field {name!r} {problem}", ref=ref, room=room)
    if len(value) > limit:
        raise ProtocolError("bad_request", f"field {name!r} is longer than {limit} characters",
                            ref=ref, room=room)
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
    :class:`ProtocolError` (``bad_request`` or ``unknown_type``).
    """
    if isinstance(data, bytes):
        raise ProtocolError("bad_request", "binary frames are not supported; send JSON text")
    try:
        obj = json.loads(data)
    except ValueError:
        raise ProtocolError("bad_request", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object")
    raw_ref = obj.get("ref")
    ref = raw_ref if isinstance(raw_ref, str) and len(raw_ref) <= MAX_REF_LENGTH else None
    if raw_ref is not None and ref is None:
        raise ProtocolError("bad_request",
                            f"field 'ref' must be a string of at most {MAX_REF_LENGTH} characters")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "field 'type' missing or not a string", ref=ref)
    if kind == "ping":
        return Ping(ref=ref)
    if kind == "refresh":
        token = _field_str(obj, "token", limit=MAX_TOKEN_LENGTH, ref=ref)
        assert token is not None
        return Refresh(token=token, ref=ref)
    if kind not in ("subscribe", "unsubscribe", "ack"):
        raise ProtocolError("unknown_type", f"unknown type {kind[:40]!r}", ref=ref)
    room = _field_str(obj, "room", limit=MAX_ROOM_LENGTH, ref=ref)
    assert room is not None
    if kind == "subscribe":
        return Subscribe(room=room, since=_field_int(obj, "since", ref=ref, room=room,
                                                     required=False), ref=ref)
    if kind == "unsubscribe":
        return Unsubscribe(room=room, ref=ref)
    seq = _field_int(obj, "seq", ref=ref, room=room, required=True)
    assert seq is not None
    return Ack(room=room, seq=seq, ref=ref)


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in obj.items() if v is not None}, separators=(",", ":"))


def welcome(user: str, heartbeat: float) -> str:
    """First frame after the upgrade; ``heartbeat`` in seconds (server pings that often)."""
    return _dump({"type": "welcome", "user": user, "protocol": PROTOCOL_VERSION,
                  "heartbeat": heartbeat})


def subscribed(room: str, from_seq: int, head: int, ref: str | None) -> str:
    return _dump({"type": "subscribed", "room": room, "from": from_seq, "head": head, "ref": ref})


def unsubscribed(room: str, reason: str, ref: str | None = None) -> str:
    """``reason``: ``client``, ``membership_revoked`` or ``room_deleted``."""
    return _dump({"type": "unsubscribed", "room": room, "reason": reason, "ref": ref})


def pong(ref: str | None) -> str:
    return _dump({"type": "pong", "ref": ref})


def error(code: str, message: str, *, ref: str | None = None, room: str | None = None) -> str:
    return _dump({"type": "error", "code": code, "message": message, "ref": ref, "room": room})
