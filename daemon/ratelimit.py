"""Token bucket for client frames (``PGBRIDGE_RATE_LIMIT`` per second, ``PGBRIDGE_RATE_BURST``)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``take()`` is true while the caller stays within ``rate`` per second on average with
    bursts up to ``burst``. ``clock`` returns seconds (monotonic)."""

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
