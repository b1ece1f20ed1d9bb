"""pgbridge_client: the Python client of pgbridge, the PostgreSQL to WebSocket bridge for chat
applications (docs/clients/python.md; the wire protocol: docs/PROTOCOL.md).

::

    async with pgbridge_client.connect("ws://127.0.0.1:8080/ws", token=get_token) as bridge:
        async for event in bridge.subscribe(room, since=last_seq):
            handle(event)  # each event once, in order, across reconnects

Depends only on ``websockets``. Logs to the ``pgbridge_client`` logger (reconnects and their
delays at WARNING, connections and subscriptions at INFO); configures no handler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from .bridge import Bridge, TokenSource
from .errors import (
    ClosedError,
    CursorExpired,
    Forbidden,
    NotFound,
    PgBridgeError,
    RefusedError,
    SubscriptionEnded,
    Unauthorized,
    UserDeleted,
)
from .frames import Event, FeedRoom, FeedRooms, RoomLeft, Snapshot, Welcome
from .rules import token_expiry
from .streams import Feed, Subscription

__all__ = [
    "Bridge", "ClosedError", "CursorExpired", "Event", "Feed", "FeedRoom", "FeedRooms",
    "Forbidden", "NotFound", "PgBridgeError", "RefusedError", "RoomLeft", "Snapshot",
    "Subscription", "SubscriptionEnded", "TokenSource", "Unauthorized", "UserDeleted",
    "Welcome", "connect", "token_expiry",
]


class _Connecting(AbstractAsyncContextManager[Bridge]):
    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    async def __aenter__(self) -> Bridge:
        self._bridge._start()
        try:
            await self._bridge._wait_connected()
        except BaseException:
            await self._bridge.close()
            raise
        return self._bridge

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._bridge.close()


def connect(url: str, *, token: TokenSource, batch: int | None = 0,
            backoff_base: float = 0.25, backoff_cap: float = 10.0,
            refresh_before: float = 60.0, ack_interval: float = 1.0, max_size: int = 2**24,
            max_queue: int = 1024, open_timeout: float = 10.0,
            on_frame: Callable[[Mapping[str, Any]], None] | None = None,
            ) -> AbstractAsyncContextManager[Bridge]:
    """Connect to the bridge at ``url`` (``ws://host:port/ws`` or ``wss://``; ``http(s)://``
    is taken as ``ws(s)://``); ``async with`` it: entering waits for the first ``welcome``
    (retrying with backoff meanwhile: a bridge not listening yet is waited for), leaving
    sends the pending acks and closes.

    ``token``: a JWT (``sub`` = ``users.id``), or a callable returning one, or an awaitable
    of one; a callable is called before each connection attempt and ``refresh_before``
    seconds (default 60) before the token's ``exp``, whose answer replaces the token on the
    open connection (``refresh``). ``batch``: the longest the bridge may hold a frame to send
    it with others, in ms from 0 to 1000 (``None``: one frame per message; PROTOCOL.md
    "Coalesced messages"). ``backoff_base``, ``backoff_cap``: seconds; the n-th consecutive
    failed attempt waits a random delay up to ``min(cap, base * 2**(n-1))`` (at least the
    ``Retry-After`` of an HTTP 429 or 503). ``ack_interval``: seconds between batched acks.
    ``max_size``: the largest message accepted, bytes (default 16 MiB; larger: the
    connection ends with :class:`RefusedError` ``message_too_big``). ``max_queue``: events
    each subscription holds that the consumer has not taken; when full, the connection is not
    read (the bridge eventually closes it, 4008, and the client resumes). ``open_timeout``:
    seconds for the opening handshake and the ``welcome``, and for an awaitable token's
    answer (then retried with backoff). ``on_frame``: called with every
    frame received (parsed, as a dict), before the client acts on it (for tools that show
    them).

    Raises, from ``async with``: :class:`Unauthorized` (HTTP 401), :class:`Forbidden` (HTTP
    403), :class:`RefusedError` (another refusal a retry cannot fix); ValueError or TypeError
    at once for a bad argument (an unusable URL, a duration that is not a finite number of
    seconds > 0 (``refresh_before``: >= 0), a ``max_size`` or ``max_queue`` < 1 included)."""
    return _Connecting(Bridge(url, token=token, batch=batch, backoff_base=backoff_base,
                              backoff_cap=backoff_cap, refresh_before=refresh_before,
                              ack_interval=ack_interval, max_size=max_size, max_queue=max_queue,
                              open_timeout=open_timeout, on_frame=on_frame))
