"""The adaptive doorbell: when this bridge wants writers to NOTIFY, and when it reads the log
on an interval instead (docs/topics/doorbell.md; sql/triggers/10_change_capture.sql).

Pure: :class:`Doorbell` takes what the listener heard and what ``pgbridge_doorbell()`` returned
(:class:`Reading`), and answers with the next call to make (:class:`Call`) and whether to poll.
:mod:`daemon.polls` does the I/O.

Every transaction that NOTIFYs takes one lock of the whole server at commit and holds it through
its WAL flush, so capturing writers commit one at a time under load. At light load the doorbell
costs nothing that matters and delivers at once; above ``quiet_above`` events per second this
bridge asks writers to stop ringing (a lease, shared by every bridge of the schema, renewed
while it still wants it) and reads the log every ``poll_interval`` seconds. Its modes:

* ``RINGING``: writers NOTIFY; the lease is read every ``check_every`` seconds (and at once on a
  ``{"doorbell"}`` hint): another bridge may have asked for quiet.
* ``QUIET``: the lease runs (whoever asked); this bridge polls. It renews the lease while its
  rate over the last ``window`` seconds is at least half of ``quiet_above`` (or for as long as
  it runs, policy ``off``).
* ``SETTLING``: the lease ended. Writers that read it while it ran may still commit without
  ringing: they are the barrier (``pgbridge_doorbell``), and this bridge keeps polling until
  none of them is in progress, every ``poll_interval`` for ``settle_patience`` seconds, then
  every ``check_every`` (a transaction left open for hours costs one read a second, and its
  event still arrives within that second).

The rate is what this bridge can see: signed capture NOTIFYs heard while writers ring (over
half a second: :data:`RING_WINDOW`); while
they are quiet, the growth of ``change_events`` inserts in the statistics system (``captured``;
``track_counts``), or the events the polls found (only the rooms with subscribers here: without
the statistics, a bridge with few may ask for the doorbell back and take it again a few seconds
later, which costs a few seconds of ringing, nothing else), whichever is higher.

Times are ``time.monotonic()`` seconds, except :class:`Reading`'s, which are the database
server's clock (epoch seconds): only differences of those are used.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

__all__ = ["HINT_GAP", "POLICIES", "POLL_DUTY", "RING_WINDOW", "Call", "Doorbell", "Mode",
           "Reading"]

POLICIES = ("adaptive", "on", "off")
# Seconds over which rings are counted: a burst must last this long to stop the doorbell.
RING_WINDOW = 0.5
# A poll starts at most this many times the last poll's duration after it (see poll_delay).
POLL_DUTY = 5.0
# Seconds between two reads of the lease prompted by hints: anyone may send one, so a flood of
# them costs the database at most this many reads a second.
HINT_GAP = 0.1


class Mode(enum.Enum):
    RINGING = "ringing"
    QUIET = "quiet"
    SETTLING = "settling"


@dataclass(frozen=True, slots=True)
class Reading:
    """What ``pgbridge_doorbell()`` returned. ``quiet_until``/``now``: the server's clock, epoch
    seconds (``quiet_until`` ``None``: writers ring); ``captured``: ``change_events`` inserts
    counted by the statistics system (``None``: ``track_counts`` is off); ``barrier``: a
    ``pg_snapshot`` text when asked for and the lease is over; ``settled``: whether the barrier
    passed in has passed (``None``: none passed in)."""

    quiet_until: float | None
    now: float
    captured: int | None = None
    barrier: str | None = None
    settled: bool | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """Arguments of the next ``pgbridge_doorbell(quiet_ms, new_barrier, barrier)`` call."""

    quiet_ms: int
    new_barrier: bool
    barrier: str | None


class Doorbell:
    """Decisions of one bridge. ``policy``: ``adaptive``, ``on`` (never asks for quiet, still
    polls while another bridge holds the lease) or ``off`` (holds the lease while it runs)
    (``PGBRIDGE_DOORBELL``). ``quiet_above``: events per second
    (``PGBRIDGE_DOORBELL_QUIET_ABOVE``); ``poll_interval``: seconds (``PGBRIDGE_POLL_INTERVAL``);
    ``lease``, ``renew_every``, ``check_every``, ``window``, ``settle_patience``: seconds."""

    def __init__(self, policy: str = "adaptive", *, quiet_above: float = 500.0,
                 poll_interval: float = 0.01, lease: float = 2.0, renew_every: float = 0.5,
                 check_every: float = 1.0, window: float = 2.0, settle_patience: float = 10.0,
                 now: float = 0.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"doorbell policy must be one of {', '.join(POLICIES)}")
        self.policy = policy
        self.quiet_above = quiet_above
        self.poll_interval = poll_interval
        self.lease = lease
        self.renew_every = renew_every
        self.check_every = check_every
        self.window = window
        self.settle_patience = settle_patience
        self.mode = Mode.RINGING
        self.rate = 0.0  # events per second, the last estimate
        self._window_start = now
        self._rings = 0  # signed capture NOTIFYs heard since _window_start
        self._polled = 0  # events found by polls, in all
        # while writers are quiet: (monotonic, server clock, captured, _polled) of the readings
        # of the last `window` seconds, and the one before them
        self._samples: deque[tuple[float, float, int | None, int]] = deque()
        self._settling_since = 0.0
        self._barrier: str | None = None
        self._next_call = now  # read the lease at start
        self._last_call = now - HINT_GAP  # when the last answer (or failure) came
        self._want = policy == "off"

    # --- what the listener heard ----------------------------------------------------------

    @property
    def polling(self) -> bool:
        """Read the log every :meth:`poll_delay` seconds (writers may not ring)."""
        return self.mode is not Mode.RINGING

    def rang(self, now: float) -> None:
        """A signed capture NOTIFY arrived."""
        self._rings += 1
        if self.mode is Mode.RINGING and now - self._window_start >= RING_WINDOW:
            self.rate = self._rings / (now - self._window_start)
            self._rings, self._window_start = 0, now
            if self._wants_quiet() and not self._want:
                self._want = True
                self._next_call = now  # ask at once

    def polled(self, events: int) -> None:
        """A poll found ``events`` events (in rooms with subscribers here)."""
        self._polled += events

    def hinted(self, now: float) -> None:
        """A ``{"doorbell"}`` hint (unsigned, anyone may send it): read the lease soon, but
        not sooner than ``HINT_GAP`` seconds after the last read."""
        self._next_call = min(self._next_call, max(now, self._last_call + HINT_GAP))

    # --- the calls ------------------------------------------------------------------------

    def due(self, now: float) -> float:
        """Seconds until the next call is due (0: now)."""
        return max(0.0, self._next_call - now)

    def call(self) -> Call:
        """The arguments of the call that is due."""
        return Call(quiet_ms=round(self.lease * 1000) if self._want else 0,
                    new_barrier=self.mode is Mode.QUIET,
                    barrier=self._barrier if self.mode is Mode.SETTLING else None)

    def failed(self, now: float) -> None:
        """The call failed (the database is away): try again in a while, change nothing."""
        self._last_call = now
        self._next_call = now + min(self.renew_every, self.check_every)

    def observed(self, reading: Reading, now: float) -> Mode | None:
        """Take the answer to :meth:`call`; return the new mode if it changed."""
        before = self.mode
        self._last_call = now
        if reading.quiet_until is not None:  # writers are quiet, whoever asked
            self.mode, self._barrier = Mode.QUIET, None
        elif self.mode is Mode.QUIET:  # the lease ended since the last reading
            self.mode, self._barrier = Mode.SETTLING, reading.barrier
            self._settling_since = now
        elif self.mode is Mode.SETTLING and (reading.settled or self._barrier is None):
            self.mode, self._barrier = Mode.RINGING, None
        if self.mode is Mode.RINGING:
            if before is not Mode.RINGING:  # rings measure the rate again, from now
                self._samples.clear()
                self._rings, self._window_start = 0, now
                self._want = self.policy == "off"
            self._next_call = now + (0.0 if self._want else self.check_every)
        else:
            self._estimate(reading, now)
            self._next_call = now + (
                self.renew_every if self.mode is Mode.QUIET
                else max(self.poll_delay(now), 10 * self.poll_interval))
        return self.mode if self.mode is not before else None

    def poll_delay(self, now: float, took: float = 0.0) -> float:
        """Seconds from the start of one poll to the start of the next: ``poll_interval``, or
        ``POLL_DUTY`` times what the last poll ``took`` (seconds) when that is longer, so that
        polling many rooms never keeps the database busy more than a fifth of the time."""
        if self.mode is Mode.SETTLING and now - self._settling_since > self.settle_patience:
            return max(self.check_every, POLL_DUTY * took)
        return max(self.poll_interval, POLL_DUTY * took)

    # --- inside ---------------------------------------------------------------------------

    def _wants_quiet(self) -> bool:
        """Ringing, the rate must reach ``quiet_above``; quiet, stay above half of it."""
        if self.policy != "adaptive":
            return self.policy == "off"
        if self.mode is Mode.RINGING:
            return self.rate >= self.quiet_above
        return self.rate >= self.quiet_above / 2

    def _estimate(self, reading: Reading, now: float) -> None:
        """While writers are quiet, the rate over the last ``window`` seconds (at least one):
        from the statistics' count of ``change_events`` inserts, or the events the polls found,
        whichever is higher. Busy writers flush their statistics about once a second each, so
        the count grows in steps: over a tenth of a second it reads 0 or ten times the rate."""
        samples = self._samples
        samples.append((now, reading.now, reading.captured, self._polled))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()
        then, server_then, captured_then, polled_then = samples[0]
        if now - then < 1.0:
            if len(samples) == 1:  # just quiet: keep what the rings measured
                self._want = self._wants_quiet()
            return
        rate = (self._polled - polled_then) / (now - then)
        if reading.captured is not None and captured_then is not None \
                and reading.captured >= captured_then and reading.now > server_then:
            rate = max(rate, (reading.captured - captured_then) / (reading.now - server_then))
        self.rate = rate
        self._want = self._wants_quiet()
