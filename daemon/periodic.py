"""One loop for the work the daemon repeats on a clock and retries after a database failure.

A sweep, a flush, a prune or a re-read that fails with a :class:`~daemon.errors.BridgeError`
(the database is away, a statement timed out) is reported to the caller's ``failed`` and tried
again at the next turn: the loop never ends on its own. Anything else is a bug and propagates to
the supervisor of the task (``daemon.app``), which stops the daemon with the incident logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NoReturn

from .errors import BridgeError

__all__ = ["every"]


async def every(interval: float, work: Callable[[], Awaitable[object]], *,
                failed: Callable[[BridgeError], None], first: bool = False) -> NoReturn:
    """Await ``work()`` every ``interval`` seconds until cancelled, the first time at once when
    ``first`` is true, else after one interval. The interval counts from the end of one turn to
    the start of the next, so a slow turn never piles up turns behind it."""
    if not first:
        await asyncio.sleep(interval)
    while True:
        try:
            await work()
        except BridgeError as exc:
            failed(exc)
        await asyncio.sleep(interval)
