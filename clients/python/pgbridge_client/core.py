"""The state a :class:`~pgbridge_client.Bridge` keeps across its connections, and the
requests it sends on the current one.

The rooms followed (:class:`~pgbridge_client.streams._Room`) and the feed, each request's
``ref``, the current connection and whether it was welcomed; ``subscribe``, ``unsubscribe``
(after its room's pending ack) and ``feed`` sent at once when welcomed (else on the next
``welcome``), and sent again after a backoff delay when refused with a reason that passes. The
connection's task (:mod:`.connection`) fills this state; the frames it reads are routed by
:mod:`.routing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .errors import RefusedError
from .rules import Backoff
from .streams import _Feed, _Room, _Stream

log = logging.getLogger("pgbridge_client")

TokenSource = str | Callable[[], str | Awaitable[str]]


class _Core:
    """The bridge's state and its requests (module docstring)."""

    def __init__(self, url: str, token: TokenSource, *, backoff_base: float,
                 backoff_cap: float, refresh_before: float, ack_interval: float, max_size: int,
                 max_queue: int, open_timeout: float,
                 on_frame: Callable[[Mapping[str, Any]], None] | None) -> None:
        self.url = url
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

    def _streams(self) -> list[_Stream[Any]]:
        """The rooms followed, then the feed if there is one."""
        return [*self._rooms.values(), *([self._feed] if self._feed is not None else [])]

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
