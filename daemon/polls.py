"""The doorbell's I/O: the ``pgbridge_doorbell()`` calls the pure
:class:`daemon.doorbell.Doorbell` asks for, and the polls of the log while writers do not ring
(docs/topics/doorbell.md).

Two tasks. The **doorbell** task makes the calls when the bell says (and at once after a
``{"doorbell"}`` hint or a burst of rings), and logs each change of mode. The **poll** task,
while the bell says so and LISTEN is up, queues a catch-up of every tracked room (one query)
every ``PGBRIDGE_POLL_INTERVAL`` and waits for it: the rooms' processor
(:mod:`daemon.rooms`) does the reading. When the writers that may not have rung are over (the
barrier), the doorbell task queues one more, which starts after it knew: the last poll may
have started before they committed.

Metrics: ``pgbridge_doorbell_polling`` and ``pgbridge_capture_rate`` are read from the bell
when ``/metrics`` is scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from .doorbell import Doorbell, Mode
from .errors import BridgeError
from .logs import Throttled
from .metrics import Metrics
from .notes import DoorbellHint
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["Polls"]


class Polls:
    """Drive ``bell`` (:class:`daemon.doorbell.Doorbell`). ``catch_up(done)`` queues a read of
    every tracked room, whose count of published events it sets in ``done`` (the poll waits
    for it); ``None`` when nobody waits. :attr:`listening`: whether LISTEN is up (set by the
    rooms; while it is down, the catch-up after it reconnects reads the log instead)."""

    def __init__(self, bell: Doorbell, store: Store, metrics: Metrics,
                 catch_up: Callable[[asyncio.Future[int] | None], Awaitable[None]]) -> None:
        self.bell = bell
        self.store = store
        self.catch_up = catch_up
        self.listening = False
        self._wake = asyncio.Event()  # a hint arrived, or the bell wants a call now
        self._polling = asyncio.Event()  # set while the bell says to read the log on a timer
        self._failures = Throttled(log, interval=60.0)
        metrics.doorbell_polling.set_function(lambda: 1.0 if self.bell.polling else 0.0)
        metrics.capture_rate.set_function(lambda: self.bell.rate)

    def rang(self) -> None:
        """A writer rang (a signed capture NOTIFY was heard)."""
        now = time.monotonic()
        self.bell.rang(now)
        if self.bell.due(now) == 0:
            self._wake.set()

    def hinted(self, note: DoorbellHint) -> None:
        """A ``{"doorbell"}`` hint (unsigned): it only makes us read the lease."""
        del note
        self.bell.hinted(time.monotonic())
        self._wake.set()

    async def ring_forever(self) -> None:
        """Make the calls of ``pgbridge_doorbell`` the bell asks for, and start or stop the
        polls. A failed call (:class:`BridgeError`) is logged (throttled) and retried when the
        bell says."""
        while True:
            delay = self.bell.due(time.monotonic())
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            call = self.bell.call()
            try:
                reading = await self.store.doorbell(call)
            except BridgeError as exc:
                self.bell.failed(time.monotonic())
                self._failures.warning(
                    "doorbell", "could not read the doorbell lease (%s); retrying", exc,
                    extra={"event": "doorbell_failed"})
                continue
            changed = self.bell.observed(reading, time.monotonic())
            if changed is Mode.QUIET:
                log.info("writers do not NOTIFY (%s, %.0f events/s); reading the log every "
                         "%g s", "asked by this bridge" if call.quiet_ms else
                         "asked by another bridge", self.bell.rate, self.bell.poll_interval,
                         extra={"event": "doorbell_quiet"})
            elif changed is Mode.SETTLING:
                log.info("writers ring again (%.0f events/s); reading the log until the "
                         "transactions that may not have rung are over", self.bell.rate,
                         extra={"event": "doorbell_settling"})
            elif changed is Mode.RINGING:
                log.info("back to the doorbell: NOTIFY only", extra={"event": "doorbell_ringing"})
                # The barrier's writers were over when this reading was taken, but the last poll
                # may have started before they committed: one more read, started after it.
                await self.catch_up(asyncio.get_running_loop().create_future())
            if self.bell.polling:
                self._polling.set()
            else:
                self._polling.clear()

    async def poll_forever(self) -> None:
        """While the bell says so and LISTEN is up, read every tracked room's log, one read
        starting every ``poll_delay``. (While LISTEN is down, the catch-up after it reconnects
        reads them: until then user hints are lost, and nothing may be published.)"""
        loop = asyncio.get_running_loop()
        while True:
            await self._polling.wait()
            if not self.listening:
                await asyncio.sleep(self.bell.poll_interval)
                continue
            started = time.monotonic()
            done: asyncio.Future[int] = loop.create_future()
            await self.catch_up(done)
            self.bell.polled(await done)
            # polls start every poll_delay, however long one took (a slow one spaces them out)
            now = time.monotonic()
            await asyncio.sleep(max(0.0, started + self.bell.poll_delay(now, now - started)
                                    - now))
