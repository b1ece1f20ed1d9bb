"""Subscription routing: which subscriber gets which event, in which order, and when a
subscription ends.

Pure: the hub never awaits. The listener (:mod:`daemon.listener`) is the only caller of
:meth:`Hub.track` and :meth:`Hub.publish`, so a room's ``last`` seq moves in one place; clients
talk to the hub through the :class:`Sink` they own.

A subscription's life (PROTOCOL.md, "Ordering and delivery guarantees"):

1. :meth:`Hub.add` registers it and returns ``L``, the room's last published seq at that
   instant. From then on every published event (seq > L) is buffered in the subscription.
2. The caller replays ``(from, L]`` from the log with :meth:`Subscription.replay`. Replayed
   events after ``checked_at`` (the room's head when the caller checked the membership) were
   committed after that check, so they end the subscription as live ones would.
3. :meth:`Subscription.go_live` flushes the buffer and delivers directly from then on.

Presence (opt-in, ``presence``): the presence feed (:mod:`daemon.presence_feed`) makes a
subscription a *watcher* of its room (:meth:`Hub.watch`) when it reads the room's snapshot;
presence frames offered from then on wait in the subscription until the snapshot is sent
(:meth:`Subscription.presence_live`), so a watcher never sees a state older than the snapshot.

Events at or below ``from`` or already sent are dropped, so the switch from replay to live has
no gap and no duplicate. Events committed after the membership check can end the subscription:
a membership DELETE of the subscriber (``membership_revoked``) or the room's deletion
(``room_deleted``); older ones in the log were already accounted for by the check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .events import Event
from .protocol import unsubscribed

__all__ = ["Hub", "Sink", "Subscription"]


class Sink(Protocol):
    """The client side of a subscription (a WebSocket connection); ``correlation_id`` is its
    connection's (:mod:`daemon.logs`), for the lines about it."""

    user: str

    @property
    def correlation_id(self) -> str: ...

    def send(self, frame: bytes | str) -> None:
        """Queue a frame (bytes: an encoded text frame); never blocks."""

    def overflow(self, why: str) -> None:
        """The client cannot keep up; it must be disconnected (close 4008). ``why`` names the
        buffer that overflowed, for the log."""

    def subscription_ended(self, sub: Subscription) -> None:
        """The hub ended ``sub`` (revocation, room deleted); forget it."""


class Subscription:
    """One client's subscription to one room."""

    __slots__ = ("checked_at", "end_reason", "ended", "feed", "from_seq", "last_sent", "live",
                 "pending", "pending_limit", "presence", "presence_pending", "presence_ready",
                 "room", "sink", "watching")

    def __init__(self, sink: Sink, room: str, *, pending_limit: int,
                 checked_at: int | None = None, presence: bool = False,
                 feed: bool = False) -> None:
        self.sink = sink
        self.room = room
        self.feed = feed  # one of the connection's feed (daemon.feed), not a subscribe's
        self.checked_at = checked_at  # None: no check to account for (every replay is history)
        self.from_seq = 0
        self.last_sent = 0
        self.live = False
        self.ended = False
        self.end_reason: str | None = None  # the unsubscribed frame's reason, once ended
        self.pending: list[Event] = []
        self.pending_limit = pending_limit
        self.presence = presence  # asked for the members' presence and typing
        self.watching = False  # registered by Hub.watch: presence frames are offered
        self.presence_ready = False  # the snapshot was sent: offered frames go out at once
        self.presence_pending: list[str] = []

    @property
    def cursor(self) -> int:
        """Highest seq the client holds or was never meant to get (``max(from, last sent)``)."""
        return max(self.from_seq, self.last_sent)

    def replay(self, event: Event) -> bool:
        """Send an event (seq ≤ L) read from the log. Returns true if it ended the
        subscription (only an event after ``checked_at`` can)."""
        if self.checked_at is not None and event.seq > self.checked_at:
            return self._emit(event)
        if not self.ended and event.seq > self.cursor:
            self.sink.send(event.frame)
            self.last_sent = event.seq
        return False

    def deliver(self, event: Event) -> bool:
        """Offer a live event. Returns true if it ended the subscription."""
        if self.ended:
            return False
        if not self.live:
            self.pending.append(event)
            if len(self.pending) > self.pending_limit:
                self.pending.clear()
                self.sink.overflow(f"more than {self.pending_limit} live events of room "
                                   f"{self.room} arrived while its replay was running")
            return False
        return self._emit(event)

    def go_live(self) -> bool:
        """Flush events buffered during replay; deliver directly from now on. Returns true if
        a buffered event ended the subscription."""
        self.live = True
        pending, self.pending = self.pending, []
        return any(self._emit(event) for event in pending)

    def offer_presence(self, frame: str) -> None:
        """A presence frame of this room (read after the snapshot, when watching)."""
        if self.ended or not self.watching:
            return
        if self.presence_ready:
            self.sink.send(frame)
            return
        self.presence_pending.append(frame)
        if len(self.presence_pending) > self.pending_limit:
            self.presence_pending.clear()
            self.sink.overflow(f"more than {self.pending_limit} presence changes of room "
                               f"{self.room} arrived while its snapshot was being sent")

    def presence_live(self) -> None:
        """The snapshot was sent: send what waited, and every later frame at once."""
        self.presence_ready = True
        pending, self.presence_pending = self.presence_pending, []
        for frame in pending:
            if not self.ended:
                self.sink.send(frame)

    def offer_typing(self, frame: str) -> bool:
        """A typing frame; dropped (false) before the snapshot was sent (typing is ephemeral)."""
        if self.ended or not self.presence_ready:
            return False
        self.sink.send(frame)
        return True

    def release(self) -> None:
        """End without a frame (``end_reason`` stays ``None``): another subscription of the
        same connection takes the room over from here (a ``subscribe`` of a feed's room)."""
        self.ended = True
        self.pending.clear()
        self.presence_pending.clear()

    def end(self, reason: str, ref: str | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.end_reason = reason
            self.pending.clear()
            self.presence_pending.clear()
            self.sink.send(unsubscribed(self.room, reason, ref))

    def _emit(self, event: Event) -> bool:
        if self.ended or event.seq <= self.cursor:
            return False
        if event.revokes is not None and event.revokes == self.sink.user:
            self.end("membership_revoked")
            self.sink.subscription_ended(self)
            return True
        self.sink.send(event.frame)
        self.last_sent = event.seq
        if event.ends_room:
            self.end("room_deleted")
            self.sink.subscription_ended(self)
            return True
        return False


class _Room:
    __slots__ = ("last", "pinned", "subs", "watchers")

    def __init__(self, last: int) -> None:
        self.last = last
        self.subs: set[Subscription] = set()
        self.watchers: set[Subscription] = set()
        self.pinned = False  # kept for the broker's followers (daemon.broker), subscribed or not


class Hub:
    """Rooms with subscribers (or pinned), and the last seq published in each.

    ``observer`` (the broker, :mod:`daemon.broker`): called with ``(room, True)`` when a room
    starts being tracked and ``(room, False)`` when it stops; it must not call back into the
    hub."""

    def __init__(self) -> None:
        self._rooms: dict[str, _Room] = {}
        self.observer: Callable[[str, bool], None] | None = None

    def __contains__(self, room: str) -> bool:
        return room in self._rooms

    def rooms(self) -> list[str]:
        return list(self._rooms)

    def last(self, room: str) -> int:
        """Last seq published in a tracked room (KeyError if not tracked)."""
        return self._rooms[room].last

    def subscribers(self, room: str) -> int:
        state = self._rooms.get(room)
        return len(state.subs) if state else 0

    def sent(self, room: str, seq: int) -> list[Subscription]:
        """The subscriptions of ``room`` that were last sent event ``seq`` (just after its
        :meth:`publish`: those it was sent to and that are still subscribed). For the log only:
        it walks the room's subscribers."""
        state = self._rooms.get(room)
        return [sub for sub in state.subs if sub.last_sent == seq] if state else []

    def track(self, room: str, head: int) -> None:
        """Start tracking ``room`` whose log currently ends at ``head``."""
        if room not in self._rooms:
            self._rooms[room] = _Room(head)
            if self.observer is not None:
                self.observer(room, True)

    def pin(self, room: str) -> int:
        """Keep the tracked ``room`` tracked without subscribers (the broker's leader publishes
        it for the followers); return its last seq now."""
        state = self._rooms[room]
        state.pinned = True
        return state.last

    def unpin(self, room: str) -> None:
        """Undo :meth:`pin`: a room left without subscribers is no longer tracked."""
        state = self._rooms.get(room)
        if state is not None:
            state.pinned = False
            self._drop_if_idle(room, state)

    def pinned(self) -> list[str]:
        """The pinned rooms."""
        return [room for room, state in self._rooms.items() if state.pinned]

    def add(self, sub: Subscription) -> int:
        """Register ``sub`` in its (tracked) room; return ``L``, the room's last seq now."""
        state = self._rooms[sub.room]
        state.subs.add(sub)
        return state.last

    def watch(self, sub: Subscription) -> bool:
        """Offer ``sub`` its room's presence frames from now on; false if it is not registered
        (it ended meanwhile)."""
        state = self._rooms.get(sub.room)
        if state is None or sub not in state.subs or sub.ended:
            return False
        state.watchers.add(sub)
        sub.watching = True
        return True

    def watchers(self, room: str) -> tuple[Subscription, ...]:
        """The subscriptions of ``room`` that watch its presence."""
        state = self._rooms.get(room)
        return tuple(state.watchers) if state else ()

    def watched(self) -> list[str]:
        """Rooms with at least one presence watcher."""
        return [room for room, state in self._rooms.items() if state.watchers]

    def remove(self, sub: Subscription) -> None:
        """Forget ``sub``; a room left without subscribers is no longer tracked."""
        state = self._rooms.get(sub.room)
        if state is None:
            return
        state.subs.discard(sub)
        state.watchers.discard(sub)
        self._drop_if_idle(sub.room, state)

    def _drop_if_idle(self, room: str, state: _Room) -> None:
        if not state.subs and not state.pinned:
            del self._rooms[room]
            if self.observer is not None:
                self.observer(room, False)

    def hole(self, room: str, first: int, last: int) -> int:
        """Seqs ``first``..``last`` of ``room`` are gone from the log for good: end with
        ``cursor_expired`` every subscription that has not got them all (PROTOCOL.md,
        "Ordering and delivery guarantees"), and move the room's last seq to ``last``. Returns
        how many subscriptions ended."""
        state = self._rooms.get(room)
        if state is None:
            return 0
        state.last = max(state.last, last)
        ended = [sub for sub in tuple(state.subs) if not sub.ended and sub.cursor < last]
        for sub in ended:
            sub.end("cursor_expired")
            sub.sink.subscription_ended(sub)
            self.remove(sub)
        return len(ended)

    def publish(self, event: Event) -> int:
        """Deliver the room's next event (caller guarantees ``event.seq == last + 1``) to every
        subscriber. Returns how many subscribers it was offered to."""
        state = self._rooms.get(event.room)
        if state is None:
            return 0
        state.last = event.seq
        ended = [sub for sub in tuple(state.subs) if sub.deliver(event)]
        for sub in ended:
            self.remove(sub)
        return len(state.subs) + len(ended)
