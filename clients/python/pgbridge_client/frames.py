"""The frames of the protocol (docs/PROTOCOL.md) as typed values, and their parsing: pure
functions, no I/O.

A message from the bridge holds one frame or, coalesced (``?batch=``), several separated by
``\\n``: :func:`split` gives them back as dicts, skipping (and naming) what is not a JSON
object. The ``from_frame`` constructors check every field they read and raise
:class:`FrameError` for a frame that does not fit: the caller drops it, and a dropped event
shows as a gap in the room's seqs, which the client resumes over (never a silent skip).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_SEQ = 2**63 - 1
OPS = frozenset({"INSERT", "UPDATE", "DELETE"})


class FrameError(ValueError):
    """A frame from the bridge that is not what the protocol says (missing or ill-typed
    field, not JSON): dropped, and logged."""


def split(message: str | bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """The frames of one message, in order, and one problem line per part that is not a JSON
    object (invalid UTF-8 or JSON, too deeply nested, another JSON value)."""
    if isinstance(message, bytes):
        try:
            message = message.decode()
        except UnicodeDecodeError:
            return [], ["a binary message that is not UTF-8"]
    frames: list[dict[str, Any]] = []
    problems: list[str] = []
    for part in message.split("\n"):
        try:
            value = json.loads(part)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            problems.append(f"not JSON ({type(exc).__name__}): {part[:80]!r}")
            continue
        if isinstance(value, dict):
            frames.append(value)
        else:
            problems.append(f"not a JSON object: {part[:80]!r}")
    return frames, problems


def _str(frame: Mapping[str, Any], name: str) -> str:
    value = frame.get(name)
    if not isinstance(value, str):
        raise FrameError(f"{frame.get('type')} frame: {name} is not a string: {value!r:.80}")
    return value


def _seq(frame: Mapping[str, Any], name: str) -> int:
    value = frame.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise FrameError(f"{frame.get('type')} frame: {name} is not an integer from 0 to "
                         f"2^63-1: {value!r:.80}")
    return value


def optional_str(frame: Mapping[str, Any], name: str) -> str | None:
    """``frame[name]`` when it is a string, else ``None``."""
    value = frame.get(name)
    return value if isinstance(value, str) else None


def _seconds(value: object) -> float:
    """A duration the bridge sent, in seconds; 0.0 when it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        seconds = float(value)
    except OverflowError:  # an integer past 1.8e308
        return 0.0
    return seconds if 0.0 <= seconds < float("inf") else 0.0


@dataclass(frozen=True, slots=True)
class Welcome:
    """The first frame of a connection. ``heartbeat``: the bridge's ping interval, seconds;
    ``batch``: the ms it may hold frames (``None``: it does not coalesce);
    ``correlation_id``: the connection's id in the bridge's log (``None`` if not sent)."""

    user: str
    protocol: int
    heartbeat: float
    correlation_id: str | None
    batch: int | None

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> Welcome:
        heartbeat = frame.get("heartbeat")
        batch = frame.get("batch")
        protocol = frame.get("protocol")
        return cls(user=_str(frame, "user"),
                   protocol=protocol if isinstance(protocol, int) else 1,
                   heartbeat=_seconds(heartbeat),
                   correlation_id=optional_str(frame, "correlation_id"),
                   batch=batch if isinstance(batch, int) and not isinstance(batch, bool)
                   else None)


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a room (an ``event`` frame). ``seq``: its place in the room, 1, 2, 3, ...
    without gaps; ``table``: ``messages``, ``reactions``, ``channel_members``, ...; ``op``:
    ``INSERT``, ``UPDATE`` or ``DELETE``; ``id``: the row's id; ``data``: the row as JSON (the
    new row, the old one for a ``DELETE``); ``ts``: the commit time, ISO 8601. ``frame``: the
    whole frame as received (fields a newer bridge adds included)."""

    room: str
    seq: int
    table: str
    op: str
    id: str
    data: Mapping[str, Any]
    ts: str
    frame: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> Event:
        op = _str(frame, "op")
        if op not in OPS:
            raise FrameError(f"event frame: op is not INSERT, UPDATE or DELETE: {op!r:.80}")
        data = frame.get("data")
        if not isinstance(data, dict):
            raise FrameError(f"event frame: data is not an object: {data!r:.80}")
        return cls(room=_str(frame, "room"), seq=_seq(frame, "seq"), table=_str(frame, "table"),
                   op=op, id=_str(frame, "id"), data=data, ts=_str(frame, "ts"), frame=frame)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The room's most recent messages as of ``seq``, oldest first, each shaped as the
    ``data`` of a ``messages`` event (PROTOCOL.md, "Snapshot then live"); the events that
    follow it have seq > ``seq``. ``truncated``: the bridge held fewer than asked
    (``PGBRIDGE_SNAPSHOT_MAX_BYTES``). ``frame``: the whole frame as received."""

    room: str
    seq: int
    messages: Sequence[Mapping[str, Any]]
    truncated: bool
    frame: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> Snapshot:
        messages = frame.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise FrameError("snapshot frame: messages is not an array of objects")
        return cls(room=_str(frame, "room"), seq=_seq(frame, "seq"), messages=tuple(messages),
                   truncated=frame.get("truncated") is True, frame=frame)


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A subscribe answered: events with seq > ``from_seq`` follow; ``head``: the room's
    latest seq then."""

    room: str
    from_seq: int
    head: int

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> Subscribed:
        return cls(room=_str(frame, "room"), from_seq=_seq(frame, "from"),
                   head=_seq(frame, "head"))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and (
        0 <= value <= MAX_SEQ) else 0


@dataclass(frozen=True, slots=True)
class FeedRoom:
    """A room of the feed: ``head``, its latest seq (0: no event yet); ``acked``, the seq the
    user acknowledged (0: never); ``unread``, the messages of other users after ``acked``,
    counted up to 100 ("100 or more")."""

    room: str
    head: int
    acked: int
    unread: int


@dataclass(frozen=True, slots=True)
class FeedRooms:
    """The answer to ``feed``: every room of the user, ordered by room. ``frame``: the whole
    frame as received."""

    rooms: Sequence[FeedRoom]
    frame: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> FeedRooms:
        """Entries that are not an object with a string ``room`` are left out; a count that
        is not an integer reads as 0."""
        rooms = frame.get("rooms")
        if not isinstance(rooms, list):
            raise FrameError("feed frame: rooms is not an array")
        return cls(rooms=tuple(
            FeedRoom(room=r["room"], head=_count(r.get("head")), acked=_count(r.get("acked")),
                     unread=_count(r.get("unread")))
            for r in rooms if isinstance(r, dict) and isinstance(r.get("room"), str)),
            frame=frame)


@dataclass(frozen=True, slots=True)
class RoomLeft:
    """A room of the feed ended (an ``unsubscribed`` frame): ``reason`` is
    ``membership_revoked``, ``room_deleted`` or ``cursor_expired``. It is no longer followed."""

    room: str
    reason: str
    frame: Mapping[str, Any] = field(repr=False, compare=False)
