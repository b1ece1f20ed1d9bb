"""Limits on clients (PROTOCOL.md, "Limits"): token buckets, and the per-user and total
connection counts with each user's subscribe bucket.

Pure: no sockets, no database; ``clock`` returns seconds (monotonic) and is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ClientLimits", "TokenBucket"]


class TokenBucket:
    """``take()`` is true while the caller stays within ``rate`` per second on average with
    bursts up to ``burst``. ``clock`` returns seconds (monotonic)."""

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self) -> bool:
        """True once the bucket has refilled to its burst (forgetting it loses nothing)."""
        self._refill()
        return self.tokens >= self.burst


class ClientLimits:
    """Connections per user and in total, and one subscribe bucket per user shared by all of
    the user's connections.

    ``max_connections`` (``PGBRIDGE_MAX_CONNECTIONS``), ``max_per_user``
    (``PGBRIDGE_MAX_CONNECTIONS_PER_USER``), ``user_rate``/``user_burst`` subscribe attempts per
    second (``PGBRIDGE_USER_SUBSCRIBE_RATE``/``_BURST``). A user's bucket outlives its last
    connection until it has refilled, so reconnecting does not reset it.
    """

    SWEEP_INTERVAL = 10.0  # seconds between sweeps of idle users' buckets

    def __init__(self, *, max_connections: int, max_per_user: int, user_rate: float,
                 user_burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = max_connections
        self.max_per_user = max_per_user
        self.user_rate = user_rate
        self.user_burst = user_burst
        self.clock = clock
        self.total = 0
        self._counts: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._swept = clock()

    def connections(self, user: str) -> int:
        return self._counts.get(user, 0)

    def at_capacity(self, *, pending: int = 0) -> bool:
        """True when no connection may open: ``max_connections`` are open, counting
        ``pending`` upgrades accepted but not yet opened."""
        return self.total + pending >= self.max_connections

    def user_at_capacity(self, user: str, *, pending: int = 0) -> bool:
        """True when ``user`` has ``max_per_user`` connections open, counting ``pending``
        upgrades of the user accepted but not yet opened."""
        return self.connections(user) + pending >= self.max_per_user

    def opened(self, user: str) -> None:
        self.total += 1
        self._counts[user] = self._counts.get(user, 0) + 1

    def closed(self, user: str) -> None:
        self.total -= 1
        left = self._counts.get(user, 1) - 1
        if left > 0:
            self._counts[user] = left
        else:
            self._counts.pop(user, None)
        self._sweep()

    def subscribe_allowed(self, user: str) -> bool:
        """Take one subscribe attempt from ``user``'s bucket; false when it is empty."""
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(self.user_rate, self.user_burst,
                                                       clock=self.clock)
        return bucket.take()

    def _sweep(self) -> None:
        now = self.clock()
        if now - self._swept < self.SWEEP_INTERVAL:
            return
        self._swept = now
        for user in [u for u, b in self._buckets.items() if u not in self._counts and b.full()]:
            del self._buckets[user]

    def buckets(self) -> int:
        """How many users' subscribe buckets are kept (for tests and metrics)."""
        return len(self._buckets)
