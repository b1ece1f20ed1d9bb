"""The connection to a bridge, shared by the rooms it follows and the user's feed.

One task per :class:`Bridge` owns the WebSocket: it connects (a fresh token each attempt),
sends every room's ``subscribe`` on each ``welcome`` (``since`` = the last seq held), then the
``feed`` if there is one, reads the frames and routes each to its room's queue (an event of a
room no subscription of this connection holds is the feed's), refreshes the token before it
expires, sends the acks, and, when the connection ends, decides with
:mod:`pgbridge_client.rules` whether to reconnect after a backoff delay or to end the bridge
with a :class:`RefusedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .errors import (
    ClosedError,
    CursorExpired,
    Forbidden,
    NotFound,
    PgBridgeError,
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
from .rules import (
    JWT_SHAPE,
    RETRIED_ERRORS,
    TOKEN_EXPIRED,
    Backoff,
    close_refusal,
    is_token,
    retry_after,
    status_refusal,
    token_expiry,
)
from .streams import Feed, Subscription, _Feed, _Room, _Stream

log = logging.getLogger("pgbridge_client")

TokenSource = str | Callable[[], str | Awaitable[str]]

USER_AGENT = f"pgbridge-client websockets/{websockets.version.version}"
CLOSE_WAIT = 2.0  # seconds closing waits for the bridge to have read the last acks
STABLE = 5.0  # seconds welcomed: the next drop's backoff starts again from `base`
_ERRORS: dict[str, type[RefusedError]] = {
    "forbidden": Forbidden, "not_found": NotFound, "cursor_expired": CursorExpired,
    "unauthorized": Unauthorized}


class _Reconnect(Exception):  # control flow: never leaves this module
    """End the current connection and open a new one after a backoff delay."""


class Bridge:
    """A connection to a pgbridge daemon following rooms across reconnects; made by
    :func:`connect` (its arguments are documented there)."""

    def __init__(self, url: str, *, token: TokenSource, batch: int | None = 0,
                 backoff_base: float = 0.25, backoff_cap: float = 10.0,
                 refresh_before: float = 60.0, ack_interval: float = 1.0,
                 max_size: int = 2**24, max_queue: int = 1024, open_timeout: float = 10.0,
                 on_frame: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        if not isinstance(token, str) and not callable(token):
            raise TypeError("token must be a string or a callable returning one")
        if isinstance(token, str) and not is_token(token):  # not shown: it is a secret
            raise ValueError(f"token is not a JWT ({JWT_SHAPE}; a trailing newline?)")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)
                                  or not 0 <= batch <= 1000):
            raise ValueError(f"batch must be an integer from 0 to 1000 (ms) or None: {batch!r}")
        for name, seconds, low in (
                ("backoff_base", backoff_base, 0.0), ("backoff_cap", backoff_cap, 0.0),
                ("ack_interval", ack_interval, 0.0), ("open_timeout", open_timeout, 0.0),
                ("refresh_before", refresh_before, None)):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
                    (low is None or seconds > low) and 0 <= seconds < float("inf")):
                more = ">= 0" if low is None else "> 0"
                raise ValueError(f"{name} must be a finite number of seconds {more}: "
                                 f"{seconds!r}")
        for name, count in (("max_size", max_size), ("max_queue", max_queue)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an integer >= 1: {count!r}")
        self.url = _with_batch(url, batch)
        try:
            websockets.uri.parse_uri(self.url)  # now, not at each attempt
        except websockets.exceptions.InvalidURI as exc:
            raise ValueError(f"not a ws://, wss://, http:// or https:// URL: "
                             f"{_redact(url)!r}") from exc
        self._token_source = token
        self._backoff = Backoff(backoff_base, backoff_cap)
        self._backoff_base, self._backoff_cap = backoff_base, backoff_cap
        self._refresh_before = refresh_before
        self._ack_interval = ack_interval
        self._max_size = max_size
        self._max_queue = max_queue
        self._open_timeout = open_timeout
        self._on_frame = on_frame
        self._rooms: dict[str, _Room] = {}
        self._feed: _Feed | None = None
        self._pong: tuple[str, asyncio.Event] | None = None  # awaited by _answered()
        self._order = asyncio.Lock()  # requests of several frames leave in the order made
        self._fed = False  # feed() was called: one per bridge
        self._ws: ClientConnection | None = None
        self._welcomed = False
        # ref -> its request's stream (a room's subscribe, the feed), or "refresh", "unsubscribe"
        self._refs: dict[str, _Room | _Feed | str] = {}
        self._welcomed_at: float | None = None
        self._next_ref = 0
        self._token: str | None = None
        self._exp: float | None = None
        self._error: BaseException | None = None  # set once ended
        self._connected = asyncio.Event()  # the first welcome, or the end
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._ack_factor = 1
        self.user: str | None = None
        """The user of the last welcomed connection (its ``welcome``'s ``user``)."""
        self.correlation_id: str | None = None
        """The id of the last welcomed connection in the bridge's log (``welcome``'s
        ``correlation_id``): name it when reporting a problem; ``None`` if not sent."""

    @property
    def closed(self) -> bool:
        """True once the bridge ended: closed, or refused for good."""
        return self._error is not None

    # --- public API ---------------------------------------------------------------------

    @overload
    def subscribe(self, room: str, *, since: int | None = None, snapshot: None = None,
                  ack: bool = True) -> Subscription[Event]: ...

    @overload
    def subscribe(self, room: str, *, since: None = None, snapshot: int,
                  ack: bool = True) -> Subscription[Event | Snapshot]: ...

    @overload
    def subscribe(self, room: str, *, since: int | None = None, snapshot: int | None = None,
                  ack: bool = True) -> Subscription[Event | Snapshot]: ...

    def subscribe(self, room: str, *, since: int | None = None, snapshot: int | None = None,
                  ack: bool = True) -> Subscription[Event] | Subscription[Event | Snapshot]:
        """Follow ``room`` (a ``channels.id``) on this bridge's connection; sent at once.

        ``since``: the last seq you hold (events after it follow; ``None``: after the seq the
        user acknowledged, else live only). ``snapshot``: first the room's N most recent
        messages as a :class:`Snapshot` (PROTOCOL.md "Snapshot then live"), not with
        ``since``. ``ack``: acknowledge each event once the loop asks for the next one (or the
        subscription closes). A room of this bridge's :meth:`feed` is taken over from it
        (without ``since`` nor ``snapshot``: after the last event the feed delivered); its
        events come here only, until the subscription closes. Raises ValueError for a bad
        argument or a room this bridge already follows, :class:`ClosedError` once the bridge
        is closed."""
        if self._error is not None:
            raise ClosedError("the bridge is closed") from self._error
        if not isinstance(room, str) or not 1 <= len(room) <= 26 or not all(
                c.isascii() and (c.isalnum() or c in "_-") for c in room):
            raise ValueError(f"not a room id (1 to 26 of A-Z a-z 0-9 _ -): {room!r}")
        for name, value, low in (("since", since, 0), ("snapshot", snapshot, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not low <= value < 2**63):
                raise ValueError(f"{name} must be an integer >= {low}: {value!r}")
        if since is not None and snapshot is not None:
            raise ValueError("since and snapshot exclude each other")
        if room in self._rooms:
            raise ValueError(f"this bridge already follows {room}")
        held = self._feed.heads.get(room) if self._feed is not None else None
        if held is not None and since is None and snapshot is None:
            since = held  # a room of the feed: taken over after the last event it delivered
        state = _Room(room, since, snapshot, ack, self._max_queue,
                      Backoff(self._backoff_base, self._backoff_cap))
        self._rooms[room] = state
        self._spawn(self._send_subscribe(state))
        return Subscription(self, state)

    def feed(self, *, ack: bool = True) -> Feed:
        """Follow every room of the user, now and later, on this bridge's connection
        (PROTOCOL.md "One feed per user"); sent at once, and again after each reconnect. See
        :class:`Feed` for what it yields. ``ack``: acknowledge each event once the loop asks
        for the next one. One per bridge (ValueError for a second);
        :class:`ClosedError` once the bridge is closed."""
        if self._error is not None:
            raise ClosedError("the bridge is closed") from self._error
        if self._fed:
            raise ValueError("this bridge already has a feed (one per connection)")
        self._fed = True
        self._feed = _Feed(ack, self._max_queue, Backoff(self._backoff_base, self._backoff_cap))
        self._spawn(self._send_feed())
        return Feed(self, self._feed)

    async def close(self, *, failed: bool = False) -> None:
        """Send the pending acks (with the events the consumers hold, unless ``failed``: an
        exception is on its way out of the ``async with`` block) and the requests not sent yet
        (an ``unsubscribe``; waiting at most 2 s for them), close the connection
        (1000), end every subscription (:class:`ClosedError`). Idempotent."""
        if self._error is None:
            for stream in self._streams():
                if failed:
                    stream.forget_handed()
                stream.done_with_handed()
            # the requests made and not sent yet: a subscription dropped just before (its
            # ack, then `unsubscribe`), before the close stops them
            pending = list(self._tasks)
            if pending:
                await asyncio.wait(pending, timeout=CLOSE_WAIT)
            sent = await self._flush_acks() or bool(pending)
            ws = self._ws
            self._end(ClosedError("the bridge is closed"))  # a full queue holds the reader no more
            if sent:
                await self._answered()
            if ws is not None:  # the closing handshake: what was sent before it is read
                with contextlib.suppress(Exception):
                    await ws.close(1000, "client closed")
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            task.cancel()

    # --- the connection -----------------------------------------------------------------

    def _streams(self) -> list[_Stream[Any]]:
        """The rooms followed, then the feed if there is one."""
        return [*self._rooms.values(), *([self._feed] if self._feed is not None else [])]

    def _start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run_guarded())

    async def _run_guarded(self) -> None:
        """:meth:`_run`, whose unexpected failure (a bug) ends the bridge rather than leave
        its consumers waiting forever."""
        try:
            await self._run()
        except Exception as exc:
            log.exception("the connection task failed", extra={"event": "internal"})
            error = PgBridgeError(f"internal error of pgbridge_client: {_cause(exc)}")
            error.__cause__ = exc
            self._end(error)

    async def _wait_connected(self) -> None:
        await self._connected.wait()
        if self._error is not None and not isinstance(self._error, ClosedError):
            raise self._error

    async def _run(self) -> None:
        """Connect, serve, and on each end either reconnect after a delay (logged as one
        WARNING line naming the cause, the delay and where each room resumes) or end the
        bridge with the refusal."""
        auth_retried = False  # 401 with a callable token: once more at once, with a new one
        attempt = 0
        while self._error is None:
            delay: float | None = None
            welcomed_at: float | None = None
            now = False
            try:
                token = await self._get_token()
                self._token, self._exp = token, token_expiry(token)
                async with websockets.connect(
                        self.url, additional_headers={"Authorization": f"Bearer {token}"},
                        max_size=self._max_size, open_timeout=self._open_timeout,
                        user_agent_header=USER_AGENT, logger=_WEBSOCKETS_LOG,
                ) as ws:
                    try:
                        await self._serve(ws)
                    finally:
                        welcomed_at = self._welcomed_at
                        self._detach()
            except _Reconnect as exc:
                cause = str(exc)
            except InvalidStatus as exc:
                status = exc.response.status_code
                body = _escaped(" ".join((exc.response.body or b"").decode(
                    errors="replace").split())[:300])
                refusal = status_refusal(status, body)
                cause = f"refused: HTTP {status} {body}".rstrip()
                if status == 401 and callable(self._token_source) and not auth_retried:
                    auth_retried, delay = True, 0.0  # once, with a fresh token
                elif refusal is not None:
                    refusal.__cause__ = exc
                    self._end(refusal)
                    return
                else:
                    delay = max(retry_after(exc.response.headers.get("Retry-After")),
                                self._backoff.next())
            except ConnectionClosed as exc:
                code, reason = _close_of(exc)
                refusal = close_refusal(code, reason)
                if refusal is None and code == TOKEN_EXPIRED and not callable(self._token_source):
                    refusal = Unauthorized("the token expired (4001) and token is a fixed "
                                           "string", code="unauthorized", close_code=code)
                if refusal is not None:
                    refusal.__cause__ = exc
                    self._end(refusal)
                    return
                cause = f"connection closed with {code} ({_shown(reason or 'no reason given')})"
                now = code == TOKEN_EXPIRED  # with a new token, at once unless it happens again
            except (OSError, InvalidHandshake, TimeoutError, _TokenUnavailable) as exc:
                cause = f"cannot connect to {_shown_url(self.url)}: {_cause(exc)}"
            if self._error is not None:
                return  # closed meanwhile
            if welcomed_at is not None:
                auth_retried = False
                if time.monotonic() - welcomed_at >= STABLE:
                    self._backoff.reset()
                    attempt = 0
            if now and attempt == 0:
                delay = 0.0
            if delay is None:
                delay = self._backoff.next()
            attempt += 1
            log.warning("%s; reconnecting in %.1f s (attempt %d%s)", cause, delay, attempt,
                        self._held(), extra={"event": "reconnecting", "cause": cause,
                                             "delay": delay, "attempt": attempt})
            await asyncio.sleep(delay)

    async def _get_token(self) -> str:
        source = self._token_source
        try:
            value = source() if callable(source) else source
            if inspect.isawaitable(value):
                async with asyncio.timeout(self._open_timeout):
                    value = await value
        except TimeoutError as exc:
            raise _TokenUnavailable(f"the token callable did not answer within "
                                    f"{self._open_timeout} s") from exc
        except Exception as exc:
            raise _TokenUnavailable(f"the token callable raised {_cause(exc)}") from exc
        if not is_token(value):  # not shown: it is a secret
            raise _TokenUnavailable(f"the token callable returned {type(value).__name__} of "
                                    f"length {len(value) if isinstance(value, str) else '-'}, "
                                    f"not a token ({JWT_SHAPE})")
        assert isinstance(value, str)
        return value

    async def _serve(self, ws: ClientConnection) -> None:
        """Read the connection until it ends (raises what ended it)."""
        self._ws = ws
        self._welcomed_at = None
        async with asyncio.timeout(self._open_timeout):
            while not self._welcomed:
                await self._on_message(await ws.recv())
        side = [asyncio.create_task(self._ack_loop()), asyncio.create_task(self._refresh_loop())]
        try:
            while True:
                await self._on_message(await ws.recv())
        finally:
            for task in side:
                task.cancel()

    def _detach(self) -> None:
        """Forget the connection: its refs, and each room's standing on it."""
        self._ws = None
        self._welcomed = False
        self._welcomed_at = None
        self._refs.clear()
        for stream in self._streams():
            if stream.retry is not None:
                stream.retry.cancel()
            stream.ref, stream.confirmed, stream.retry = None, False, None
        for state in self._rooms.values():
            state.feed_held.clear()

    def _end(self, error: BaseException) -> None:
        """The bridge is over: every subscription raises ``error``."""
        if self._error is not None:
            return
        self._error = error
        if isinstance(error, RefusedError):  # raised to every consumer: INFO here
            log.info("%s", error, extra={"event": "refused", "code": error.code})
        for state in self._rooms.values():
            state.end(error)
        self._rooms.clear()
        if self._feed is not None:
            self._feed.end(error)
            self._feed = None
        self._connected.set()

    def _held(self) -> str:
        """``; room R since=S, ...``: where each room resumes (for the reconnect line)."""
        rooms = [f"room {s.room} since={s.since}" for s in self._rooms.values()]
        return f"; {', '.join(rooms)}" if rooms else ""

    # --- frames -------------------------------------------------------------------------

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

    # --- requests -----------------------------------------------------------------------

    def _ref(self, prefix: str, state: _Room | _Feed | str) -> str:
        self._next_ref += 1
        ref = f"{prefix}{self._next_ref}"
        self._refs[ref] = state
        return ref

    async def _send(self, frame: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or not self._welcomed:
            return False
        try:
            await ws.send(json.dumps(frame, separators=(",", ":")))
        except ConnectionClosed:
            return False  # the reader sees it end
        return True

    async def _send_subscribe(self, state: _Room) -> None:
        if not self._welcomed or self._rooms.get(state.room) is not state or state.confirmed:
            return
        if state.ref is not None:
            self._refs.pop(state.ref, None)
        state.ref = self._ref("s", state)
        frame: dict[str, Any] = {"type": "subscribe", "room": state.room, "ref": state.ref}
        if state.since is not None:
            frame["since"] = state.since
        elif state.snapshot is not None:
            frame["snapshot"] = state.snapshot  # until one arrives
        async with self._order:
            await self._send(frame)

    def _retry_subscribe(self, state: _Room, code: str) -> None:
        if state.retry is not None:
            return
        delay = state.backoff.next()
        log.warning("subscribe failed (%s); trying again in %.1f s (room %s, since=%s)", code,
                    delay, state.room, state.since, extra={"event": "subscribe_retry",
                                                           "room": state.room, "delay": delay})

        def again() -> None:
            state.retry = None
            self._spawn(self._send_subscribe(state))

        state.retry = asyncio.get_running_loop().call_later(delay, again)

    def _drop(self, state: _Room) -> bool:
        """Stop following ``state``'s room at once (a new subscribe of it may follow); true
        when the bridge must be told (a subscribe of it was sent on this connection)."""
        state.end(StopAsyncIteration())
        if self._rooms.get(state.room) is not state:
            return False
        del self._rooms[state.room]
        state.done_with_handed()
        return state.ref is not None

    async def _send_unsubscribe(self, state: _Room) -> None:
        """Its pending ack, then ``unsubscribe``: in this order, and before any frame of a
        request made later (:attr:`_order`), a new subscribe of the room included."""
        async with self._order:
            if state.confirmed and state.to_ack > state.acked:
                await self._send({"type": "ack", "room": state.room, "seq": state.to_ack})
            await self._send({"type": "unsubscribe", "room": state.room,
                              "ref": self._ref("u", "unsubscribe")})

    async def _unsubscribe(self, state: _Room) -> None:
        if self._drop(state):
            await self._send_unsubscribe(state)

    def _release(self, state: _Room) -> None:
        """A subscription no longer referenced (from its finalizer): unsubscribe, without
        acknowledging the event its consumer was handed (an exception out of the loop's body
        and a ``break`` look the same here: the event is delivered again rather than lost)."""
        state.forget_handed()
        with contextlib.suppress(RuntimeError):  # no loop running here: nothing to tell
            asyncio.get_running_loop()
            if self._drop(state):
                self._spawn(self._send_unsubscribe(state))

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the feed -----------------------------------------------------------------------

    async def _send_feed(self) -> None:
        feed = self._feed
        if not self._welcomed or feed is None or feed.error is not None or feed.confirmed:
            return
        if feed.ref is not None:
            self._refs.pop(feed.ref, None)
        feed.ref = self._ref("f", feed)
        await self._send({"type": "feed", "ref": feed.ref})

    def _retry_feed(self, feed: _Feed, code: str) -> None:
        if feed.retry is not None:
            return
        delay = feed.backoff.next()
        log.warning("feed failed (%s); trying again in %.1f s", code, delay,
                    extra={"event": "feed_retry", "delay": delay})

        def again() -> None:
            feed.retry = None
            self._spawn(self._send_feed())

        feed.retry = asyncio.get_running_loop().call_later(delay, again)

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

    # --- acks and token refresh ---------------------------------------------------------

    async def _flush_acks(self) -> bool:
        """Send the acks due (one per room); true if any was sent."""
        sent = False
        for state in list(self._rooms.values()):
            if state.confirmed and state.to_ack > state.acked:
                seq = state.to_ack
                if await self._send({"type": "ack", "room": state.room, "seq": seq}):
                    state.acked, sent = seq, True
        feed = self._feed
        if feed is not None and feed.confirmed:
            for room, seq in list(feed.to_ack.items()):
                if await self._send({"type": "ack", "room": room, "seq": seq}):
                    feed.acked[room], sent = seq, True
                    if feed.to_ack.get(room) == seq:
                        del feed.to_ack[room]
        return sent

    async def _answered(self) -> None:
        """Wait (at most :data:`CLOSE_WAIT`) for the answer to a ``ping`` sent now: the bridge
        answers frames in order, so it has then read the ones sent before (the acks sent
        before closing; a close frame right behind them could overtake their handling)."""
        ref = self._ref("c", "ping")
        self._pong = (ref, asyncio.Event())
        if await self._send({"type": "ping", "ref": ref}):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await self._pong[1].wait()

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ack_interval * self._ack_factor)
            await self._flush_acks()

    async def _refresh_loop(self) -> None:
        """Send ``refresh`` with a new token ``refresh_before`` seconds before ``exp``."""
        if not callable(self._token_source):
            return
        while self._exp is not None:
            await asyncio.sleep(max(self._exp - self._refresh_before - time.time(), 0.0))
            try:
                token = await self._get_token()
            except _TokenUnavailable as exc:
                log.warning("cannot refresh the token: %s", exc, extra={"event": "refresh"})
                token = None
            exp = token_expiry(token) if token is not None else None
            if token is None or exp is None or exp <= self._exp:
                left = self._exp - time.time()
                if left <= 0:
                    return  # expired: the bridge closes with 4001, and a new token connects
                await asyncio.sleep(min(max(left / 2, 1.0), 30.0))
                continue
            if await self._send({"type": "refresh", "token": token,
                                 "ref": self._ref("r", "refresh")}):
                self._token, self._exp = token, exp
                log.info("token refreshed (expires in %.0f s)", exp - time.time(),
                         extra={"event": "refreshed"})


class _TokenUnavailable(PgBridgeError):
    """The token callable raised or returned no string: retried with backoff."""


def _close_of(exc: ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    if exc.sent is not None and exc.sent.code == 1009:  # we refused a frame over max_size
        return 1009, exc.sent.reason
    return 1006, ""


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _shown(value: object) -> str:
    """A value the server sent, fit for a log line: a short printable string as it is, else
    JSON (escapes keep control characters out of a terminal), cut at 128 characters."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 128:
        return value
    return json.dumps(value)[:128]


def _escaped(text: str) -> str:
    """``text`` as it is when printable, else with JSON's escapes (no control character
    reaches a terminal)."""
    return text if text.isprintable() else json.dumps(text)[1:-1]


def _with_batch(url: str, batch: int | None) -> str:
    """``url`` asking for coalesced messages (``batch=`` replaced: a repeated one is HTTP
    400); http(s) URLs become ws(s)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if batch is None or k != "batch"]
    if batch is not None:
        query.append(("batch", str(batch)))
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


_CREDENTIALS = re.compile(r"(?i)(\bBearer\s+|[?&]token=)[^&#\s]+")


def _redact(text: str) -> str:
    """``text`` with the token of a ``Bearer`` header value or a ``?token=`` taken out."""
    return _CREDENTIALS.sub(r"\1[redacted]", text)


class _Redacting(logging.LoggerAdapter[logging.Logger]):
    """The logger handed to websockets: its DEBUG lines of the handshake (the request line
    and each header) without the token (:func:`_redact`)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            self.logger.log(level, msg, *(_redact(a) if isinstance(a, str) else a
                                          for a in args), **kwargs)


_WEBSOCKETS_LOG = _Redacting(logging.getLogger("websockets.client"))


def _shown_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


__all__ = ["Bridge", "Feed", "Subscription", "TokenSource"]
