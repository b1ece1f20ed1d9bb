"""This instance's part of presence: its lease, and its users' transitions, written to the
database in batches (docs/design.md, "Presence and ephemeral signals";
sql/triggers/40_presence.sql).

One task, :meth:`PresenceWriter.run`. Connections report to :meth:`PresenceWriter.opened` and
:meth:`PresenceWriter.closed` (never awaiting); the :class:`daemon.presence.Roster` decides
what is a transition, and the task writes what accumulated, at most every ``FLUSH_DELAY``
seconds, in one call of ``pgbridge_presence_sync`` (which renews the instance's lease when it is
due, and otherwise writes nothing but the transitions). A
reconnect within the grace period writes nothing; ``user_status`` is written only when a user
comes online on the first instance or goes offline on the last.

Every ``lease / 3`` seconds the lease is renewed and the leases of other instances that ran out
are expired (their users go offline). An instance whose own lease was expired meanwhile (the
database unreachable for longer than the lease) writes every user it holds again. When the
database cannot be reached, what is pending is kept and retried; presence never blocks a
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from ulid import ULID

from .errors import BridgeError
from .logs import Throttled
from .metrics import Metrics
from .presence import Changes, Roster
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["PresenceWriter"]

FLUSH_DELAY = 0.05  # seconds: transitions that arrive together are written together
RETRY_DELAY = 1.0  # seconds before a failed write is retried
RETIRE_TIMEOUT = 5.0  # seconds a clean shutdown waits for its last presence write


class PresenceWriter:
    """``grace``: seconds a user stays online after their last connection here closed
    (``PGBRIDGE_PRESENCE_GRACE``); ``lease``: seconds this instance's lease lasts without a
    renewal (``PGBRIDGE_PRESENCE_LEASE``), renewed every third of it. ``instance``: a new ULID
    per process unless given."""

    def __init__(self, store: Store, metrics: Metrics, *, grace: float, lease: float,
                 instance: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.metrics = metrics
        self.grace = grace
        self.lease = lease
        self.instance = instance or str(ULID())
        self.clock = clock
        self.roster = Roster(grace)
        self.changes = Changes()
        self._wake = asyncio.Event()
        self._registered = False  # the lease row was written at least once
        self._resync = False  # the lease was lost: write every held user again
        self._failures = Throttled(log, interval=30.0, clock=clock)

    def opened(self, user: str) -> None:
        """A connection of ``user`` was accepted."""
        if self.roster.opened(user):
            self.changes.join(user)
            self._wake.set()
        self.metrics.presence_users.set(len(self.roster))

    def closed(self, user: str) -> None:
        """A connection of ``user`` ended."""
        self.roster.closed(user, self.clock())
        self._wake.set()

    async def run(self) -> None:
        """Write transitions and renew the lease until cancelled."""
        renew_every = self.lease / 3
        next_renew = self.clock()
        while True:
            self._wake.clear()  # what arrives from here on wakes the wait below
            now = self.clock()
            for user, closed_at in self.roster.due(now):
                self.changes.leave(user, closed_at)
            self.metrics.presence_users.set(len(self.roster))
            renew = now >= next_renew
            if self.changes or renew or self._resync:
                if await self._write(renew=renew):
                    if renew:
                        next_renew = self.clock() + renew_every
                        await self._reap()
                else:  # again in RETRY_DELAY s: a renewal that was due is due again then
                    retry = self.clock() + RETRY_DELAY
                    next_renew = retry if renew else min(next_renew, retry)
            deadline = min(next_renew, self.roster.next_due() or math.inf)
            if self.changes or self._resync:  # left by a failed write
                deadline = min(deadline, self.clock() + RETRY_DELAY)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - self.clock())):
                    await self._wake.wait()
                    await asyncio.sleep(FLUSH_DELAY)  # let the rest of a burst arrive

    async def _write(self, *, renew: bool) -> bool:
        """One batch (renewing the lease with ``renew``); false when the database failed (the
        batch is kept for the retry)."""
        now = self.clock()
        taken = self.changes.take(now)
        batch = list(taken)
        if self._resync:
            pending = {user for user, _ in taken}
            batch += [(user, None) for user in self.roster.held() if user not in pending]
        try:
            held, changed = await self.store.presence_sync(self.instance, self.lease, batch,
                                                           renew=renew)
        except BridgeError as exc:
            self.changes.restore(taken, now)
            self._failures.warning("write", "could not write presence (%s); %d transition(s) "
                                   "kept, retrying", exc, len(taken),
                                   extra={"event": "presence_write_failed"})
            return False
        self.metrics.presence_transitions.inc(changed)
        if self._resync:
            self._resync = False
        elif not held and self._registered:
            log.warning("the presence lease of this instance (%s) had run out and was expired "
                        "by another instance, which turned its users offline; writing its %d "
                        "user(s) again", self.instance, len(self.roster),
                        extra={"event": "presence_lease_lost"})
            self._resync = True
            self._wake.set()
        self._registered = True
        return True

    async def _reap(self) -> None:
        try:
            instances, offline = await self.store.presence_reap()
        except BridgeError as exc:
            self._failures.warning("reap", "could not expire presence leases (%s); retrying "
                                   "later", exc, extra={"event": "presence_reap_failed"})
            return
        if instances:
            self.metrics.presence_reaped.inc(instances)
            log.info("expired the presence leases of %d instance(s) that stopped renewing "
                     "them; %d user(s) went offline", instances, offline,
                     extra={"event": "presence_reaped"})

    async def retire(self) -> None:
        """At a clean shutdown, after every connection closed: write what is pending, then cut
        the lease to the grace period, so that users who reconnect to another instance meanwhile
        never go offline and the others do, with their true last_seen. Errors are logged."""
        try:
            async with asyncio.timeout(RETIRE_TIMEOUT):
                if self.changes:
                    await self._write(renew=False)
                now = self.clock()
                await self.store.presence_retire(self.instance, self.grace,
                                                 self.roster.in_grace(now))
        except (BridgeError, TimeoutError) as exc:
            log.warning("could not hand over presence at shutdown (%s): this instance's users "
                        "go offline when its lease runs out (%g s)", exc or "timed out",
                        self.lease, extra={"event": "presence_retire_failed"})
