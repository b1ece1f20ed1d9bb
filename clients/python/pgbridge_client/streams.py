"""What a :class:`~pgbridge_client.Bridge` hands its consumers: a room's subscription and the
user's feed, each an async iterator over a bounded queue that the connection's task fills.

The queue is the backpressure: while one is full the connection is not read (the bridge's send
timeout then closes it, 4008, and the client resumes), so a slow consumer loses nothing and
holds at most ``max_queue`` items. An item is acknowledged (``ack``) once the consumer asks
for the next one, or when the stream's own ``async with`` block is left without an exception,
or ``aclose()`` is called; not when the bridge closes, nor when a subscription is merely no
longer referenced (a ``break`` or an exception out of a bare ``async for``): neither can tell
whether the handling of the item in hand succeeded.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .frames import Event, FeedRooms, RoomLeft, Snapshot
from .rules import Backoff

if TYPE_CHECKING:
    from .bridge import Bridge

T = TypeVar("T")
Item = TypeVar("Item")


class _Stream(Generic[Item]):
    """A bounded queue of items with an end (an exception raised once the items are taken),
    and where its request stands on the current connection."""

    def __init__(self, max_queue: int, backoff: Backoff, ack: bool) -> None:
        self.max_queue = max_queue
        self.backoff = backoff
        self.ack = ack
        self.items: deque[Item] = deque()
        self.error: BaseException | None = None
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.ref: str | None = None  # of the request sent on the current connection
        self.confirmed = False  # its answer received
        self.retry: asyncio.TimerHandle | None = None
        self.waiting = False  # a consumer waits in get(): one at a time

    async def next_for_consumer(self) -> Item:
        """The next item for the one consumer: done with the item it was handed (acknowledged
        with ``ack``), then waits for the next. RuntimeError when another task waits already
        (its wait would acknowledge the item the other one handles)."""
        if self.waiting:
            raise RuntimeError("another task is already waiting for the next item of this "
                               "stream: one consumer per subscription or feed")
        self.done_with_handed()
        self.waiting = True
        try:
            return await self.get()
        finally:
            self.waiting = False

    async def put(self, item: Item) -> None:
        """Queue ``item``; waits while ``max_queue`` items wait (module docstring)."""
        while len(self.items) >= self.max_queue and self.error is None:
            self.writable.clear()
            await self.writable.wait()
        if self.error is None:
            self.items.append(item)
            self.readable.set()

    def end(self, error: BaseException) -> None:
        """No more items: ``error`` is raised (``StopAsyncIteration``: the end) once the
        queued ones are taken."""
        if self.error is None:
            self.error = error
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self.readable.set()
        self.writable.set()

    async def get(self) -> Item:
        while not self.items and self.error is None:
            self.readable.clear()
            await self.readable.wait()
        if self.items:
            self.writable.set()
            return self.items.popleft()
        assert self.error is not None
        raise self.error

    def done_with_handed(self) -> None:
        """The consumer is done with the item it was handed (acknowledged with ``ack``)."""

    def forget_handed(self) -> None:
        """The item being handled failed: not acknowledged."""


class _Room(_Stream[Event | Snapshot]):
    """One followed room."""

    def __init__(self, room: str, since: int | None, snapshot: int | None, ack: bool,
                 max_queue: int, backoff: Backoff) -> None:
        super().__init__(max_queue, backoff, ack)
        self.room = room
        self.since = since  # last seq held (queued or delivered); resumes start after it
        self.snapshot = snapshot  # asked for and not received yet
        self.acked = -1  # sent
        self.to_ack = -1  # to send
        self.handed: int | None = None  # seq of the event the consumer holds
        # events the feed sent of this room before its `subscribed`: the feed's again if the
        # subscribe is refused, else dropped (the subscription's replay brings them)
        self.feed_held: list[dict[str, Any]] = []

    def done_with_handed(self) -> None:
        if self.handed is not None and self.ack:
            self.to_ack = max(self.to_ack, self.handed)
        self.handed = None

    def forget_handed(self) -> None:
        self.handed = None


class _Feed(_Stream[FeedRooms | Event | RoomLeft]):
    """The user's feed: the rooms of its last answer with the last seq of each it holds."""

    def __init__(self, ack: bool, max_queue: int, backoff: Backoff) -> None:
        super().__init__(max_queue, backoff, ack)
        self.heads: dict[str, int] = {}  # room -> last seq held (or the answer's head)
        self.acked: dict[str, int] = {}  # room -> seq sent
        self.to_ack: dict[str, int] = {}  # room -> seq to send
        self.handed: tuple[str, int] | None = None  # the event the consumer holds

    def ack_up_to(self, room: str, seq: int) -> None:
        if seq > max(self.to_ack.get(room, -1), self.acked.get(room, -1)):
            self.to_ack[room] = seq

    def done_with_handed(self) -> None:
        if self.handed is not None and self.ack:
            self.ack_up_to(*self.handed)
        self.handed = None

    def forget_handed(self) -> None:
        self.handed = None


class Subscription(Generic[T]):
    """One room followed by a :class:`~pgbridge_client.Bridge` (made by ``subscribe``): an
    async iterator of its events, each once and in order (seq strictly increasing), across
    reconnects. With ``snapshot``, a :class:`Snapshot` comes first.

    Iterating raises a :class:`RefusedError` when the bridge refuses the room for good
    (``Forbidden``, ``NotFound``, ``CursorExpired``, ``SubscriptionEnded``) or ends the
    connection for good, after the events received before; :class:`ClosedError` once the
    bridge is closed; RuntimeError while another task waits for its next event (one
    consumer). The iteration ends (``StopAsyncIteration``) after :meth:`aclose`. The
    subscription is closed when its ``async with`` block ends, or when it is no longer
    referenced (a ``break`` out of ``async for bridge.subscribe(...)``; the event in hand is
    then not acknowledged, as an exception cannot be told from a ``break`` there)."""

    def __init__(self, bridge: Bridge, state: _Room) -> None:
        self._bridge = bridge
        self._state = state
        weakref.finalize(self, bridge._release, state)

    @property
    def room(self) -> str:
        """The room (``channels.id``)."""
        return self._state.room

    @property
    def last_seq(self) -> int | None:
        """The last seq received (queued or handed out), where a resume starts; ``None``
        before the first ``subscribed`` (or snapshot, when one was asked for)."""
        return self._state.since

    def ack(self, seq: int) -> None:
        """Acknowledge the room's events up to ``seq`` (recorded in ``sync_state`` by the
        bridge; sent batched, at most one ack per room per ``ack_interval``). Only needed with
        ``ack=False``. ValueError past the last seq received."""
        state = self._state
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or (
                state.since is None or seq > state.since):
            raise ValueError(f"cannot ack {seq!r} in {state.room} (held: {state.since})")
        state.to_ack = max(state.to_ack, seq)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        state = self._state
        item = await state.next_for_consumer()  # done with the last one, then the next
        if isinstance(item, Event):
            state.handed = item.seq
        return item  # type: ignore[return-value]  # T is Event unless a snapshot was asked

    async def aclose(self) -> None:
        """Stop following the room: the pending ack is sent, then ``unsubscribe``; the
        iteration ends. Idempotent."""
        await self._bridge._unsubscribe(self._state)

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is not None:
            self._state.forget_handed()
        await self.aclose()


class Feed:
    """Every room of the user (made by :meth:`~pgbridge_client.Bridge.feed`; PROTOCOL.md "One
    feed per user"): an async iterator of, first, :class:`FeedRooms` (each room with its
    ``head``, ``acked`` and ``unread``), then each :class:`Event` of any of the rooms (each
    room in order, each event once; a room the user joins from its ``channel_members`` event
    on), and a :class:`RoomLeft` for a room left or deleted. After a reconnect, a new
    :class:`FeedRooms`: the rooms as they are then (the events in between are not sent again:
    compare each ``head`` with the last seq you hold, and ``subscribe`` with ``since`` to
    replay a room). A room this bridge also subscribes to gets its events through that
    subscription.

    Iterating raises :class:`RefusedError` for a ``feed`` refused for good (a retry cannot fix
    it) or a connection ended for good; :class:`ClosedError` once the bridge is closed."""

    def __init__(self, bridge: Bridge, state: _Feed) -> None:
        self._bridge = bridge
        self._state = state

    def ack(self, room: str, seq: int) -> None:
        """Acknowledge ``room``'s events up to ``seq`` (batched, as a subscription's). Only
        needed with ``ack=False``. ValueError for a room not in the feed or past its last
        seq held."""
        held = self._state.heads.get(room)
        if held is None or isinstance(seq, bool) or not isinstance(seq, int) or (
                not 0 <= seq <= held):
            raise ValueError(f"cannot ack {seq!r} in {room} (feed holds: {held})")
        self._state.ack_up_to(room, seq)

    def __aiter__(self) -> Feed:
        return self

    async def __anext__(self) -> FeedRooms | Event | RoomLeft:
        state = self._state
        item = await state.next_for_consumer()
        if isinstance(item, Event):
            state.handed = (item.room, item.seq)
        return item

    async def aclose(self) -> None:
        """Stop iterating: the iteration ends (the protocol has no way to stop a feed: the
        bridge's frames of it are dropped until the connection ends). Idempotent."""
        self._state.done_with_handed()
        self._state.end(StopAsyncIteration())

    async def __aenter__(self) -> Feed:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is not None:
            self._state.forget_handed()
        await self.aclose()
