"""Presence and typing, the decisions (docs/design.md, "Presence and ephemeral signals").

Pure: no sockets, no database; times are seconds of a monotonic clock passed in by the caller.

* :class:`Roster` counts this instance's connections per user and applies the grace period
  (``PGBRIDGE_PRESENCE_GRACE``): it says when a user's first connection here must be written
  (a *join*) and when a user whose last connection closed has stayed away long enough to be
  written off (a *leave*). A reconnect within the grace writes nothing.
* :class:`Changes` is what waits to be written: at most one change per user, and a join and a
  leave of one user that meet before they were written cancel out.
* :class:`TypingGate` drops typing signals beyond about one per second per user and room.
* :class:`Presence` is one member's presence in one room, as a ``presence`` frame shows it.

:mod:`daemon.presence_writer` writes what these decide; :mod:`daemon.presence_feed` turns
``user_status`` into frames.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .protocol import presence
from .ratelimit import TokenBucket

__all__ = ["Changes", "Presence", "Roster", "TypingGate"]

_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class Presence:
    """A member's presence in a room (PROTOCOL.md, "Presence and typing"); ``last_seen`` is
    ISO 8601 in UTC, ``None`` for a user without a ``user_status`` row."""

    user: str
    room: str
    status: str
    online: bool
    last_seen: str | None
    custom_status: str | None

    def frame(self) -> str:
        return presence(self.room, self.user, status=self.status, online=self.online,
                        last_seen=self.last_seen, custom_status=self.custom_status)


class Roster:
    """Connections per user on this instance. ``grace`` in seconds (``PGBRIDGE_PRESENCE_GRACE``).

    A user is *held* from their first connection until ``grace`` seconds after their last one
    closed without a new one: :meth:`opened` returns true when a hold begins (write a join),
    :meth:`due` returns the holds that ended (write a leave).
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._open: dict[str, int] = {}  # user -> open connections
        self._closed: dict[str, float] = {}  # user -> when the last one closed (in grace)
        self._deadlines: list[tuple[float, str]] = []  # heap of (closed + grace, user)

    def __len__(self) -> int:
        return len(self._open) + len(self._closed)

    def opened(self, user: str) -> bool:
        """A connection of ``user`` opened; true when this starts a hold."""
        if user in self._open:
            self._open[user] += 1
            return False
        self._open[user] = 1
        return self._closed.pop(user, None) is None

    def closed(self, user: str, now: float) -> None:
        """A connection of ``user`` closed at ``now``; the last one starts the grace period."""
        count = self._open.get(user, 0) - 1
        if count > 0:
            self._open[user] = count
            return
        self._open.pop(user, None)
        self._closed[user] = now
        heapq.heappush(self._deadlines, (now + self.grace, user))

    def due(self, now: float) -> list[tuple[str, float]]:
        """Holds whose grace has passed by ``now``, as ``(user, when the last connection
        closed)``; they are released."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, user = heapq.heappop(self._deadlines)
            closed = self._closed.get(user)
            # stale entries: the user came back, or closed again later (a later deadline)
            if closed is not None and closed + self.grace <= now:
                del self._closed[user]
                out.append((user, closed))
        return out

    def next_due(self) -> float | None:
        """When the earliest grace period ends (a bound: it may be a stale entry's)."""
        return self._deadlines[0][0] if self._deadlines else None

    def held(self) -> list[str]:
        """Every user held here (connected, or in grace)."""
        return [*self._open, *self._closed]

    def in_grace(self, now: float) -> list[tuple[str, float]]:
        """Users in their grace period, with seconds since their last connection closed."""
        return [(user, now - closed) for user, closed in self._closed.items()]


class Changes:
    """Transitions waiting to be written, one per user: a join, or a leave with the time its
    last connection closed (the caller's monotonic clock)."""

    def __init__(self) -> None:
        self._pending: dict[str, float | None] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def join(self, user: str) -> None:
        if user in self._pending and self._pending[user] is not None:
            del self._pending[user]  # its leave was not written: the user never went away
        else:
            self._pending[user] = None

    def leave(self, user: str, closed_at: float) -> None:
        if user in self._pending and self._pending[user] is None:
            del self._pending[user]  # its join was not written: nobody saw the user arrive
        else:
            self._pending[user] = closed_at

    def take(self, now: float) -> list[tuple[str, float | None]]:
        """Everything pending, as ``(user, None)`` or ``(user, seconds since it closed)``;
        the caller gives it back with :meth:`restore` if the write fails."""
        pending, self._pending = self._pending, {}
        return [(user, None if at is None else max(0.0, now - at))
                for user, at in pending.items()]

    def restore(self, taken: list[tuple[str, float | None]], taken_at: float) -> None:
        """Put back what :meth:`take` returned at ``taken_at``. A user changed again since
        keeps only the newer change: written over the state before the failed write, it gives
        what is true now."""
        for user, ago in taken:
            if user not in self._pending:
                self._pending[user] = None if ago is None else taken_at - ago


class TypingGate:
    """Typing signals: ``rate`` per second with bursts of ``burst`` per user and room
    (PROTOCOL.md: about one per second), and ``user_rate``/``user_burst`` per user over all
    rooms, so that a user subscribed to a hundred rooms cannot make each instance relay a
    hundred signals a second. Buckets that have refilled are forgotten."""

    SWEEP_AT = 10000  # buckets kept before the full ones are swept

    def __init__(self, rate: float = 1.0, burst: int = 2, *, user_rate: float = 5.0,
                 user_burst: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rate, self.burst = rate, burst
        self.user_rate, self.user_burst = user_rate, user_burst
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._users: dict[str, TokenBucket] = {}

    def allow(self, user: str, room: str) -> bool:
        """True when a signal of ``user`` in ``room`` may be relayed now (and counts)."""
        room_bucket = self._bucket(self._buckets, (user, room), self.rate, self.burst)
        if not room_bucket.take():
            return False
        return self._bucket(self._users, user, self.user_rate, self.user_burst).take()

    def _bucket(self, buckets: dict[_K, TokenBucket], key: _K, rate: float,
                burst: int) -> TokenBucket:
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.SWEEP_AT:
                for stale in [k for k, b in buckets.items() if b.full()]:
                    del buckets[stale]
            bucket = buckets[key] = TokenBucket(rate, burst, clock=self.clock)
        return bucket
