"""The connection to a bridge, shared by the rooms it follows and the user's feed: the
public :class:`Bridge` (its arguments checked here), made of its state and requests
(:mod:`.core`), the routing of the frames it reads (:mod:`.routing`) and the connection's
task (:mod:`.connection`).

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
from collections.abc import Callable, Mapping
from typing import Any, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets

from .connection import CLOSE_WAIT, _Connection, _redact
from .core import TokenSource
from .errors import ClosedError
from .frames import Event, Snapshot
from .rules import JWT_SHAPE, Backoff, is_token
from .streams import Feed, Subscription, _Feed, _Room


class Bridge(_Connection):
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
        super().__init__(_with_batch(url, batch), token, backoff_base=backoff_base,
                         backoff_cap=backoff_cap, refresh_before=refresh_before,
                         ack_interval=ack_interval, max_size=max_size, max_queue=max_queue,
                         open_timeout=open_timeout, on_frame=on_frame)
        try:
            websockets.uri.parse_uri(self.url)  # now, not at each attempt
        except websockets.exceptions.InvalidURI as exc:
            raise ValueError(f"not a ws://, wss://, http:// or https:// URL: "
                             f"{_redact(url)!r}") from exc

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

    async def close(self) -> None:
        """Send the pending acks (not of the event each consumer was handed last: closing
        cannot tell whether its handling succeeded; leave the subscription's own ``async with``
        first to have it acknowledged) and the requests not sent yet (an ``unsubscribe``;
        waiting at most 2 s for them), close the connection (1000), end every subscription
        (:class:`ClosedError`). Idempotent."""
        if self._error is None:
            for stream in self._streams():
                stream.forget_handed()
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


__all__ = ["Bridge", "Feed", "Subscription", "TokenSource"]
