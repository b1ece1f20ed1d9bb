"""The frames a :class:`~pgbridge_client.Bridge` reads, routed to the rooms and the feed.

Each message is split into its frames (:func:`~pgbridge_client.frames.split`); each frame is
handed to ``on_frame``, then acted on: the ``welcome`` sends every request again; an ``event``
goes to its room's queue when the room's ``subscribed`` came (in seq order: an older one is
dropped, a gap raises :class:`_Reconnect` to resume from the last seq held), else to the feed's;
``subscribed``, ``snapshot``, ``unsubscribed``, ``error`` and ``feed`` settle their request. A
frame that does not fit the protocol is dropped and logged (never raised).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .core import _Core, _shown
from .errors import (
    CursorExpired,
    Forbidden,
    NotFound,
    RefusedError,
    SubscriptionEnded,
    Unauthorized,
)
from .frames import (
    Event,
    FeedRooms,
    FrameError,
    RoomLeft,
    Snapshot,
    Subscribed,
    Welcome,
    split,
)
from .rules import RETRIED_ERRORS
from .streams import _Feed, _Room

log = logging.getLogger("pgbridge_client")

_ERRORS: dict[str, type[RefusedError]] = {
    "forbidden": Forbidden, "not_found": NotFound, "cursor_expired": CursorExpired,
    "unauthorized": Unauthorized}


class _Reconnect(Exception):  # control flow: raised here, caught by the connection loop
    """End the current connection and open a new one after a backoff delay."""


class _Routing(_Core):
    """The frames of the connection, acted on (module docstring)."""

    async def _on_message(self, message: str | bytes) -> None:
        frames, problems = split(message)
        for problem in problems:
            log.warning("dropped a frame from the bridge: %s", problem,
                        extra={"event": "bad_frame"})
        for frame in frames:
            if self._on_frame is not None:
                try:
                    self._on_frame(frame)
                except Exception:
                    log.exception("on_frame raised", extra={"event": "on_frame_failed"})
            try:
                await self._on_frame_parsed(frame)
            except FrameError as exc:
                log.warning("dropped a frame from the bridge: %s", exc,
                            extra={"event": "bad_frame"})

    async def _on_frame_parsed(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            if self._welcomed:
                return
            welcome = Welcome.from_frame(frame)
            self._welcomed, self._welcomed_at = True, time.monotonic()
            self._ack_factor = 1
            self.user, self.correlation_id = welcome.user, welcome.correlation_id
            log.info("connected as user %s, correlation id %s", _shown(welcome.user),
                     _shown(welcome.correlation_id), extra={"event": "connected"})
            self._connected.set()
            for state in list(self._rooms.values()):
                await self._send_subscribe(state)
            await self._send_feed()
        elif not self._welcomed:
            return  # nothing before the welcome is ours
        elif kind == "event":
            await self._on_event(frame)
        elif kind == "subscribed":
            self._on_subscribed(frame)
        elif kind == "snapshot":
            await self._on_snapshot(frame)
        elif kind == "unsubscribed":
            await self._on_unsubscribed(frame)
        elif kind == "error":
            await self._on_error(frame)
        elif kind == "feed":
            await self._on_feed(frame)
        elif kind == "pong":
            if self._pong is not None and frame.get("ref") == self._pong[0]:
                self._pong[1].set()
        elif kind not in ("presence", "typing"):
            log.debug("ignored a frame of unknown type %r", kind, extra={"event": "unknown"})

    def _confirmed(self, room: object) -> _Room | None:
        state = self._rooms.get(room) if isinstance(room, str) else None
        return state if state is not None and state.confirmed else None

    async def _on_event(self, frame: dict[str, Any]) -> None:
        room = frame.get("room")
        state = self._rooms.get(room) if isinstance(room, str) else None
        if state is not None and not state.confirmed:
            if self._feed is not None and room in self._feed.heads:
                state.feed_held.append(frame)  # the feed's, unless the subscribe is answered
            return
        if state is None:
            await self._on_feed_event(frame)  # the feed's, else not ours (yet)
            return
        if state.snapshot is not None:
            raise _Reconnect(f"an event of {state.room} before its snapshot")
        event = Event.from_frame(frame)  # FrameError: dropped, then seen as a gap
        assert state.since is not None
        if event.seq <= state.since:
            log.debug("ignored event %s of %s: held already", event.seq, state.room)
            return
        if event.seq != state.since + 1:
            log.error("event %s of %s after %s: a gap (a frame lost or malformed); resuming "
                      "from %s", event.seq, state.room, state.since, state.since,
                      extra={"event": "gap", "room": state.room})
            raise _Reconnect(f"a gap in {state.room}")
        state.since = event.seq
        await state.put(event)

    def _on_subscribed(self, frame: dict[str, Any]) -> None:
        state = self._refs.get(str(frame.get("ref")))
        if not isinstance(state, _Room) or self._rooms.get(state.room) is not state or (
                state.confirmed):
            return
        answer = Subscribed.from_frame(frame)
        if answer.room != state.room:
            raise FrameError(f"subscribed frame: room {answer.room!r} for {state.room}")
        del self._refs[str(frame.get("ref"))]
        state.confirmed = True
        state.feed_held.clear()  # its replay brings them
        state.backoff.reset()
        if state.since is None and state.snapshot is None:
            state.since = answer.from_seq
        log.info("subscribed to %s from %s (head %s)", state.room, answer.from_seq,
                 answer.head, extra={"event": "subscribed", "room": state.room})

    async def _on_snapshot(self, frame: dict[str, Any]) -> None:
        state = self._confirmed(frame.get("room"))
        if state is None or state.snapshot is None:
            return
        snapshot = Snapshot.from_frame(frame)
        state.since, state.snapshot = snapshot.seq, None
        await state.put(snapshot)

    async def _on_unsubscribed(self, frame: dict[str, Any]) -> None:
        reason = frame.get("reason")
        if reason == "client":
            return  # the answer to our unsubscribe
        state = self._confirmed(frame.get("room"))
        if state is None:
            await self._on_feed_left(frame)
            return
        shown = _shown(reason)
        kind = CursorExpired if reason == "cursor_expired" else SubscriptionEnded
        await self._end_room(state, kind(f"unsubscribed from room {state.room}: {shown}",
                                   code=shown, room=state.room))

    async def _on_error(self, frame: dict[str, Any]) -> None:
        code, message = _shown(frame.get("code")), _shown(frame.get("message"))
        ref = frame.get("ref")
        state = self._refs.pop(ref, None) if isinstance(ref, str) else None
        if state == "unsubscribe":
            return  # about a room we left
        if state == "refresh" or (state is None and code == "unauthorized"):
            if code == "unauthorized":
                raise _Reconnect("the refreshed token was refused")
            log.warning("refresh failed: %s: %s", code, message, extra={"event": "refresh"})
            return
        if isinstance(state, _Feed):
            self._on_feed_error(state, code, message)
            return
        if isinstance(state, _Room):
            if self._rooms.get(state.room) is not state or state.confirmed:
                return
            if code in RETRIED_ERRORS:
                self._retry_subscribe(state, code)
            else:
                kind = _ERRORS.get(code, RefusedError)
                await self._end_room(state, kind(f"refused: {code}: {message} (room {state.room})",
                                           code=code, room=state.room))
            return
        log.warning("error from the bridge: %s: %s%s", code, message,
                    f" (room {_shown(frame.get('room'))})" if "room" in frame else "",
                    extra={"event": "error_frame", "code": code})
        if code == "rate_limited" and ref is None and "room" not in frame:
            # a frame was dropped unanswered: slow acks down, ask again what is unanswered
            self._ack_factor = min(self._ack_factor * 2, 32)
            for waiting in self._rooms.values():
                if waiting.ref is not None and not waiting.confirmed:
                    self._retry_subscribe(waiting, code)
            if self._feed is not None and self._feed.ref is not None and (
                    not self._feed.confirmed):
                self._retry_feed(self._feed, code)

    async def _end_room(self, state: _Room, error: RefusedError) -> None:
        log.info("%s", error, extra={"event": "refused", "code": error.code,
                                     "room": state.room})
        state.end(error)
        if self._rooms.get(state.room) is state:
            del self._rooms[state.room]
        held, state.feed_held = state.feed_held, []
        for frame in held:  # refused before its `subscribed`: the feed's events again
            await self._on_feed_event(frame)

    # --- the feed -----------------------------------------------------------------------

    async def _on_feed(self, frame: dict[str, Any]) -> None:
        feed = self._feed
        ref = frame.get("ref")
        if feed is None or feed.confirmed or not isinstance(ref, str) or (
                self._refs.get(ref) is not feed):
            return
        answer = FeedRooms.from_frame(frame)
        del self._refs[ref]
        feed.confirmed = True
        feed.backoff.reset()
        feed.heads = {r.room: r.head for r in answer.rooms}
        for room in list(feed.to_ack):  # an ack not sent yet still holds, for its rooms
            if room not in feed.heads:
                del feed.to_ack[room]
        log.info("feed of %d rooms", len(answer.rooms), extra={"event": "feed"})
        await feed.put(answer)

    async def _on_feed_event(self, frame: dict[str, Any]) -> None:
        feed = self._feed
        if feed is None or not feed.confirmed or feed.error is not None:
            return
        event = Event.from_frame(frame)  # FrameError: dropped and logged
        if event.seq <= feed.heads.get(event.room, -1):
            return  # held already: a resend, or a subscription's replay
        if event.room not in feed.heads:
            log.info("feed: room %s joined", _shown(event.room), extra={"event": "feed_join"})
        feed.heads[event.room] = event.seq
        await feed.put(event)

    async def _on_feed_left(self, frame: dict[str, Any]) -> None:
        feed = self._feed
        room = frame.get("room")
        if feed is None or not feed.confirmed or not isinstance(room, str) or (
                room not in feed.heads):
            return
        del feed.heads[room]
        feed.to_ack.pop(room, None)
        await feed.put(RoomLeft(room=room, reason=_shown(frame.get("reason")), frame=frame))

    def _on_feed_error(self, feed: _Feed, code: str, message: str) -> None:
        if feed is not self._feed or feed.confirmed:
            return
        if code in RETRIED_ERRORS:
            self._retry_feed(feed, code)
            return
        kind = _ERRORS.get(code, RefusedError)
        error = kind(f"refused: {code}: {message} (feed)", code=code)
        log.info("%s", error, extra={"event": "refused", "code": code})
        feed.end(error)
        self._feed = None
