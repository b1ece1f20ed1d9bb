"""Jittered exponential backoff ("full jitter"), for reconnect loops."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` returns a delay in seconds, uniform in ``[base, min(cap, base * 2**n)]`` for
    the n-th consecutive failure; ``reset()`` after a success."""

    def __init__(self, *, base: float = 0.1, cap: float = 10.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return random.uniform(self.base, max(self.base, ceiling))

    def reset(self) -> None:
        self.failures = 0
