"""The listener: one dedicated autocommit connection that LISTENs, and the one task that moves
rooms forward in the hub.

Tasks (DESIGN.md, "Listener reconnect"):

* the **reader** owns the LISTEN connection: connect, ``LISTEN``, queue a catch-up, then queue
  every notification. On any connection error it reconnects with jittered exponential backoff.
* the **processor** takes the queue in order and is the only code that advances a room's last
  seq. What it publishes, and when it reads the log instead, is decided by the pure
  :mod:`daemon.sequencer` (a NOTIFY with seq = last + 1 carrying its frame is published as is;
  a gap, a payload too large for NOTIFY, a catch-up after reconnect read the log; a hole in the
  log ends the subscriptions that needed it); this module only does the reading. Subscribing
  goes through the same queue (:meth:`Listener.add`), so a new subscriber's starting point ``L``
  is consistent with what was and will be published.
* the **doorbell** task makes the ``pgbridge_doorbell()`` calls :class:`daemon.doorbell.Doorbell`
  asks for (README, "The adaptive doorbell"), and the **poll** task, while writers do not ring,
  queues a catch-up every ``PGBRIDGE_POLL_INTERVAL``: every tracked room in one query. When
  the writers that may not have rung are over (the barrier), the doorbell task queues one
  more, which starts after it knew: the last poll may have started before they committed.

User hints (a user deleted; sql/triggers/20_access.sql) take their place in the same queue, so
the user's connections are closed before anything committed after the change is published
(:meth:`daemon.access.Access.check_users`). Hints that arrive while one is waiting join it: a
flood of them costs one ``users`` query per turn of the processor. After every (re)connect
nothing is published until every connected user was checked, since hints sent while the
listener was away are lost.

Presence hints (sql/triggers/40_presence.sql) and the typing channel, which the same connection
LISTENs to, go to the presence feed (:mod:`daemon.presence_feed`), not through the queue:
presence is not ordered with the events, and typing must not wait behind a catch-up.

A probe task sends a NOTIFY of its own through the pool every ``probe_interval`` seconds; when
it does not come back on the LISTEN connection in time, that connection is deaf and is
replaced. When the last one came back (:attr:`Listener.probed_at`) is what the systemd watchdog
is petted on (:mod:`daemon.watchdog`).

Metrics (README, "Metrics and alerts"): every published event is observed once, whatever the
number of its subscribers, in ``pgbridge_commit_to_send_seconds{kind="live"}`` (from its
capture time, read from the frame's fixed-width tail: :func:`daemon.events.capture_time`);
every read of the log in ``pgbridge_log_read_seconds`` (``gap_fill``, ``catch_up``); the lag
gauges are computed when ``/metrics`` is scraped, from two timestamps kept here.

The channels are secret (sql/triggers/10_change_capture.sql, "Secret channels"): derived from
the schema's key, and LISTENed on by calling ``pgbridge_listen()``, which returns their names
(:func:`daemon.db.listen_query`), so no statement's text names them. The key is read again
every ``KEY_RECHECK`` seconds; when it was rotated, the channels changed with it, and the
LISTEN connection is replaced (a reconnect: every tracked room catches up from the log and
every connected user is checked).

A role that can name a channel (the owner, the bridge role) may still NOTIFY on it, so the
reader acts only on payloads signed with the schema's key (:mod:`daemon.signing`): anything
else is counted, logged (throttled) and dropped before it reaches the queue. Past
``REJECT_LIMIT`` (50) rejected payloads in ``REJECT_WINDOW`` (0.25 s;
:class:`daemon.signing.RejectBudget`) the reader stops checking: until the window ends it
drops every payload unchecked (counted in
``pgbridge_shed_notifies_total``), then reads every tracked room's log and checks every
connected user, as after a reconnect: the log has whatever was dropped. Nothing moves a room's
last seq past what the log holds: a NOTIFY only ever makes the processor read the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg

from .backoff import Backoff
from .db import describe, listen_query
from .doorbell import Doorbell, Mode
from .errors import BridgeError
from .events import Event, PresenceHint, Probe, UserHint, capture_time, parse_notify
from .hub import Hub, Subscription
from .logs import Throttled
from .metrics import Metrics
from .sequencer import Hole, Pass, Read, on_notify, page_size, take_page
from .signing import NotifyKey, RejectBudget
from .store import READ_PAGE, Store

if TYPE_CHECKING:
    from .access import Access
    from .presence_feed import PresenceFeed

log = logging.getLogger(__name__)

__all__ = ["Listener"]


@dataclass(slots=True)
class _Track:
    sub: Subscription
    future: asyncio.Future[int]


class _CatchUp:
    """Read every tracked room to the end of its log: after a (re)connect, a failed read or a
    rotated key, and as the poll while writers do not ring. ``done`` gets the number of events
    it published (0 when it failed)."""

    def __init__(self, done: asyncio.Future[int] | None = None) -> None:
        self.done = done


class _CheckUsers:
    """Check the users hinted since this item was queued (``Listener._hinted``)."""


# distinct users hinted before one check; past that, the check takes every connected user
MAX_HINTED = 1000
# Longest wait between two attempts to reconnect the LISTEN connection, in seconds: events flow
# again at most this long after the server accepts connections, however long it was down. Two
# failed connection attempts a second (jittered) cost a down server nothing it would notice.
RECONNECT_CAP = 1.0
# Seconds between two reads of the signing key (one row): a rotated key changes the channels,
# which the listener follows this long after the rotation at the latest (what was rung on the
# new channels meanwhile is read from the log).
KEY_RECHECK = 5.0


class Listener:
    """LISTEN on the schema's channels and feed ``hub``. :meth:`run` first reads the signing
    key from the database and checks that the role may call ``pgbridge_listen()``; each
    connection learns the channels' names from that call (:attr:`channel`,
    :attr:`typing_channel`).

    ``probe_interval`` and ``probe_timeout`` in seconds (``PGBRIDGE_PROBE_INTERVAL``);
    connecting and LISTEN together may take ``2 * probe_timeout`` before they are retried.

    ``heard_at`` and ``probed_at`` are ``time.monotonic()`` values: when the LISTEN connection
    last delivered anything, and when a probe last came back (``None`` before the first).
    """

    def __init__(self, conninfo: str, hub: Hub, store: Store, metrics: Metrics,
                 access: Access, feed: PresenceFeed, *, doorbell: Doorbell | None = None,
                 probe_interval: float = 10.0, probe_timeout: float = 5.0,
                 queue_size: int = 10000) -> None:
        self.conninfo = conninfo
        self.channel = ""  # set by each LISTEN connection (pgbridge_listen)
        self.typing_channel = ""  # likewise
        self.feed = feed
        self.key: NotifyKey | None = None  # set by run()
        self.hub = hub
        self.store = store
        self.metrics = metrics
        self.access = access
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.connect_timeout = 2 * probe_timeout
        self.connected = False
        self.ready = asyncio.Event()  # set once LISTEN is proven to deliver (first probe back)
        self._queue: asyncio.Queue[str | _Track | _CatchUp | _CheckUsers] = asyncio.Queue(
            queue_size)
        self._hinted: set[str] = set()  # non-empty exactly while a _CheckUsers is queued
        self._hinted_all = False  # more than MAX_HINTED: check every connected user
        self._users_checked = False  # every connected user checked since the last connect
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._session: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._retry_now = asyncio.Event()
        self.retry_delay = 1.0  # seconds before a failed log read is retried
        self._rekeyed = False  # the LISTEN connection is being replaced for a new key
        self._forgeries = Throttled(log, interval=10.0)
        self.rejects = RejectBudget()
        self._shed = 0  # payloads dropped unchecked in the current shedding window
        self._shed_timer: asyncio.TimerHandle | None = None  # ends the shedding window
        self._shed_put: asyncio.Task[None] | None = None  # the catch-up after it
        self.bell = doorbell if doorbell is not None else Doorbell(now=time.monotonic())
        self._bell_wake = asyncio.Event()  # a hint arrived, or the bell wants a call now
        self._polling = asyncio.Event()  # set while the bell says to read the log on a timer
        self._bell_failures = Throttled(log, interval=60.0)
        self.heard_at = time.monotonic()
        self.probed_at: float | None = None
        started = self.heard_at
        metrics.listener_lag.set_function(lambda: time.monotonic() - self.heard_at)
        metrics.probe_age.set_function(
            lambda: time.monotonic() - (self.probed_at if self.probed_at is not None
                                        else started))
        metrics.listener_up.set_function(lambda: 1.0 if self.connected else 0.0)
        metrics.doorbell_polling.set_function(lambda: 1.0 if self.bell.polling else 0.0)
        metrics.capture_rate.set_function(lambda: self.bell.rate)

    # --- public ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Run reader, processor and probe until cancelled. Connection failures are retried
        forever; ``ready`` tells whether LISTEN was ever proven to deliver. Raises
        :class:`DatabaseError` when the signing key cannot be read or ``pgbridge_listen()`` may
        not be called at the start (a bridge role without ``setup_db.py --grant-bridge``, or
        granted before the channels were secret)."""
        self.key = NotifyKey(await self.store.notify_key())
        await self.store.check_listen_grant()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read_forever(), name="listener-reader")
                tasks.create_task(self._process_forever(), name="listener-processor")
                tasks.create_task(self._probe_forever(), name="listener-probe")
                tasks.create_task(self._ring_forever(), name="listener-doorbell")
                tasks.create_task(self._poll_forever(), name="listener-poll")
                tasks.create_task(self._key_forever(), name="listener-key")
        finally:
            for task in (self._retry, self._shed_put, self._shed_timer):
                if task is not None:
                    task.cancel()

    async def add(self, sub: Subscription) -> int:
        """Register ``sub`` (tracking its room if new) and return ``L``: events after ``L`` will
        be delivered to it live; ``(from, L]`` is the caller's to replay."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Track(sub, future))
        return await future

    def reconnect(self) -> None:
        """Drop the LISTEN connection now; the reader reconnects and catches up."""
        if self._session is not None:
            self._session.cancel()

    def retry_now(self) -> None:
        """The path to the database is back (an SSH tunnel reopened): if the reader is waiting
        to reconnect, it tries now instead of at the end of its backoff delay."""
        self._retry_now.set()

    # --- reader ---------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        backoff = Backoff(base=0.05, cap=RECONNECT_CAP)
        while True:
            self._session = asyncio.create_task(self._read_session(backoff))
            try:
                await self._session
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                if self._rekeyed:
                    self._rekeyed = False
                    log.info("LISTENing again, on the channels of the new key",
                             extra={"event": "listener_rekeyed"})
                elif self.ready.is_set():  # before, the probe said why (listener_not_ready)
                    log.warning("listener connection dropped on purpose (deaf); reconnecting",
                                extra={"event": "listener_deaf"})
            except (psycopg.Error, OSError) as exc:  # OSError includes TimeoutError
                delay = backoff.next()
                log.warning("listener connection to %s lost (%s); reconnecting in %.2f s",
                            describe(self.conninfo), str(exc).strip().splitlines()[0] if str(exc)
                            else type(exc).__name__, delay, extra={"event": "listener_lost"})
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._retry_now.wait()
            finally:
                if self.connected:
                    self.metrics.listener_reconnects.inc()
                self.connected = False

    async def _read_session(self, backoff: Backoff) -> None:
        # Until this session LISTENs, hints are lost: a catch-up retried meanwhile must check
        # users first, and so must the first one after LISTEN (hints before it are lost too).
        self._users_checked = False
        self._retry_now.clear()  # a reopen from now on cuts the wait after this attempt short
        # A path that black-holes packets would hang these forever: bound them.
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(self.conninfo, autocommit=True),
            self.connect_timeout)
        async with conn:
            cur = await asyncio.wait_for(conn.execute(listen_query(self.store.schema)),
                                         self.connect_timeout)
            row = await cur.fetchone()
            assert row is not None and self.key is not None
            self.channel, self.typing_channel = str(row[0]), str(row[1])
            self.feed.configure(self.typing_channel, self.key)
            self.connected = True
            backoff.reset()
            # the channels' names are secret: the log names the key by its fingerprint only
            log.info("listening on the channels of key %s at %s", self.key.fingerprint,
                     describe(self.conninfo), extra={"event": "listener_connected"})
            self._users_checked = False
            await self._queue.put(_CatchUp())
            self.feed.hint_all()  # presence hints sent while away are lost too
            async for note in conn.notifies():
                self.heard_at = now = time.monotonic()
                payload = note.payload
                if note.channel == self.typing_channel:
                    if self.rejects.shedding(now):
                        self._dropped()
                    elif not self.feed.typing_heard(payload):
                        self._forged("typing", payload, note.pid, now)
                    continue
                if payload.startswith('{"probe"'):  # unsigned; ours or another instance's
                    future = self._probes.get(payload)
                    if future is not None and not future.done():
                        future.set_result(None)
                    continue
                if payload.startswith('{"doorbell"'):  # unsigned: it only makes us look
                    self.bell.hinted(now)
                    self._bell_wake.set()
                    continue
                if self.rejects.shedding(now):
                    self._dropped()
                    continue
                assert self.key is not None
                text = self.key.open(payload)
                if text is None:
                    self._forged("capture", payload, note.pid, now)
                elif text.startswith('{"access"'):
                    await self._user_hinted(text)
                elif text.startswith('{"presence"'):
                    hint = parse_notify(text)
                    if isinstance(hint, PresenceHint):
                        self.feed.hint(hint.user)
                else:
                    self.bell.rang(now)
                    if self.bell.due(now) == 0:
                        self._bell_wake.set()
                    await self._queue.put(text)

    async def _user_hinted(self, text: str) -> None:
        note = parse_notify(text)
        if isinstance(note, UserHint):
            await self._hint(note.user)

    async def _hint(self, user: str | None) -> None:
        """Queue a check of ``user`` (``None``: of every connected user)."""
        first = not self._hinted and not self._hinted_all
        if user is not None and len(self._hinted) < MAX_HINTED:
            self._hinted.add(user)
        else:
            self._hinted_all = True
        if first:  # added before the put: the processor may take the item while we wait
            await self._queue.put(_CheckUsers())

    # --- signatures -----------------------------------------------------------------------

    def _forged(self, kind: str, payload: str, pid: int, now: float) -> None:
        """A payload of the ``kind`` channel (``capture``, ``typing``; the log does not name
        the secret channels) without a valid signature, sent by a role that can name the
        channel (the owner, the bridge role), or signed with a key this daemon does not hold
        yet (rotated). Dropped; once :attr:`rejects` is spent, the rest of its window is shed."""
        self.metrics.forged_notifies.inc()
        self._forgeries.warning(
            "forged", "ignored a NOTIFY on the %s channel that failed its signature check (%d "
            "characters, sent by backend pid %d); only the capture triggers and the bridge "
            "hold the key", kind, len(payload), pid, extra={"event": "notify_forged"})
        if self.rejects.rejected(now):
            self._shed = 0
            self._shed_timer = asyncio.get_running_loop().call_later(
                max(0.0, self.rejects.until - now), self._shed_over)

    def _dropped(self) -> None:
        """A payload dropped unchecked while :attr:`rejects` is spent."""
        self._shed += 1
        self.metrics.shed_notifies.inc()

    def _shed_over(self) -> None:
        """The shedding window ended: what was dropped unchecked may have held real events,
        user and presence hints, so read every tracked room's log and check every connected
        user (as after a reconnect) and read every watched room's presence again. Typing
        signals dropped meanwhile are gone (they are never stored)."""
        self._forgeries.warning(
            "shed", "%d NOTIFY payloads failed their signature check within %g s; dropped %d "
            "more unchecked; reading every room's log and checking every connected user",
            self.rejects.limit, self.rejects.window, self._shed, extra={"event": "notify_shed"})
        self._shed_timer = None
        self._users_checked = False
        self.feed.hint_all()
        self._shed_put = asyncio.get_running_loop().create_task(self._queue.put(_CatchUp()))

    async def _key_forever(self) -> None:
        """Read the key every KEY_RECHECK seconds; follow a rotation."""
        while True:
            await asyncio.sleep(KEY_RECHECK)
            try:
                key = NotifyKey(await self.store.notify_key())
            except BridgeError as exc:  # the database is away: once a minute is enough to say so
                self._bell_failures.warning(
                    "key", "could not read the NOTIFY signing key again (%s)", exc,
                    extra={"event": "notify_key_failed"})
                continue
            if self.key is not None and key.fingerprint == self.key.fingerprint:
                continue
            log.warning("the NOTIFY signing key changed (%s -> %s), and with it the channels: "
                        "LISTENing on the new ones, catching up every room from the log and "
                        "checking every connected user",
                        self.key.fingerprint if self.key else "-", key.fingerprint,
                        extra={"event": "notify_key_changed"})
            self.key = key
            # the new connection LISTENs on the new channels, then catches every room up and
            # checks every connected user (hints rung on the new channels meanwhile are lost)
            self._rekeyed = self._session is not None and not self._session.done()
            self.reconnect()

    # --- probe ----------------------------------------------------------------------------

    async def _probe_once(self) -> bool | None:
        """True: the probe came back; False: it did not (deaf listener); None: it could not be
        sent (the database or the pool is down: not the listener's fault)."""
        # the reader recognises it by its exact text, without parsing (a flood of others costs
        # a dictionary lookup each)
        payload = json.dumps({"probe": secrets.token_hex(8)})
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[payload] = future
        try:
            try:
                await asyncio.wait_for(self.store.notify(self.channel, payload),
                                       self.probe_timeout)
            except (BridgeError, TimeoutError):
                return None
            await asyncio.wait_for(future, self.probe_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._probes.pop(payload, None)

    async def _probe_forever(self) -> None:
        while True:
            if not self.connected:
                await asyncio.sleep(0.05 if not self.ready.is_set() else self.probe_interval)
                continue
            ok = await self._probe_once()
            if ok:
                self.probed_at = time.monotonic()
                if not self.ready.is_set():
                    log.info("listener verified: a NOTIFY round trip arrived",
                             extra={"event": "listener_ready"})
                self.ready.set()
            elif ok is False and self.connected and not self.ready.is_set():
                # Never heard since start: most likely a path LISTEN does not work on (a
                # transaction-mode pooler), which the start-up wait reports in one line; try a
                # new connection meanwhile, without an alarm.
                log.info("no NOTIFY round trip yet after %.1f s; reconnecting the listener",
                         self.probe_timeout, extra={"event": "listener_not_ready"})
                self.reconnect()
                continue
            elif ok is False and self.connected:
                log.error("listener is connected but a NOTIFY round trip did not arrive within "
                          "%.1f s; replacing its connection", self.probe_timeout,
                          extra={"event": "listener_deaf"})
                self.reconnect()
                continue
            await asyncio.sleep(self.probe_interval)

    # --- doorbell -------------------------------------------------------------------------

    async def _ring_forever(self) -> None:
        """Make the calls of ``pgbridge_doorbell`` the bell asks for (:mod:`daemon.doorbell`),
        and start or stop the polls."""
        while True:
            delay = self.bell.due(time.monotonic())
            if delay > 0:
                self._bell_wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._bell_wake.wait()
                continue
            call = self.bell.call()
            try:
                reading = await self.store.doorbell(call)
            except BridgeError as exc:
                self.bell.failed(time.monotonic())
                self._bell_failures.warning(
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
                await self._queue.put(_CatchUp(asyncio.get_running_loop().create_future()))
            if self.bell.polling:
                self._polling.set()
            else:
                self._polling.clear()

    async def _poll_forever(self) -> None:
        """While the bell says so and LISTEN is up, read every tracked room's log, one read
        starting every ``poll_delay``. (While LISTEN is down, the catch-up after it reconnects
        reads them: until then user hints are lost, and nothing may be published.)"""
        loop = asyncio.get_running_loop()
        while True:
            await self._polling.wait()
            if not self.connected:
                await asyncio.sleep(self.bell.poll_interval)
                continue
            started = time.monotonic()
            done: asyncio.Future[int] = loop.create_future()
            await self._queue.put(_CatchUp(done))
            self.bell.polled(await done)
            # polls start every poll_delay, however long one took (a slow one spaces them out)
            now = time.monotonic()
            await asyncio.sleep(max(0.0, started + self.bell.poll_delay(now, now - started)
                                    - now))

    # --- processor ------------------------------------------------------------------------

    async def _process_forever(self) -> None:
        """Take the queue in order. Nothing that one item causes stops this task: the log is
        still there, so a catch-up a moment later fills whatever the item could not (as would
        the room's next NOTIFY or a reconnect)."""
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, str):
                    await self._on_notify(item)
                elif isinstance(item, _Track):
                    await self._on_track(item)
                elif isinstance(item, _CheckUsers):
                    await self._check_hinted()
                else:
                    published = await self._catch_up(poll=item.done is not None)
                    if item.done is not None and not item.done.done():
                        item.done.set_result(published)
            except BridgeError as exc:
                log.warning("could not read the log (%s); catching up again in %.1f s", exc,
                            self.retry_delay, extra={"event": "fill_failed"})
                self._failed(item, exc)
            except Exception:  # a bug: log it once, keep the listener running
                incident = secrets.token_hex(4)
                log.error("listener failed on a %s: incident %s; catching up again in %.1f s",
                          type(item).__name__.strip("_").lower(), incident, self.retry_delay,
                          exc_info=True, extra={"event": "listener_crashed",
                                                "incident": incident})
                self._failed(item, BridgeError(f"internal error (incident {incident})"))
            # not kept while the next item is awaited: a _Track holds its subscription, and
            # through it a connection that may end meanwhile
            del item

    def _failed(self, item: str | _Track | _CatchUp | _CheckUsers, exc: BridgeError) -> None:
        if isinstance(item, _Track):
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if isinstance(item, _CatchUp) and item.done is not None and not item.done.done():
            item.done.set_result(0)
        self._catch_up_soon()

    def _catch_up_soon(self) -> None:
        """One catch-up of every tracked room after ``retry_delay``; calls meanwhile coalesce
        into it, so whatever triggers them costs at most one pass over the log per delay."""
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._catch_up_later())

    async def _catch_up_later(self) -> None:
        await asyncio.sleep(self.retry_delay)
        await self._queue.put(_CatchUp())

    async def _check_hinted(self) -> None:
        users = None if self._hinted_all else self._hinted
        self._hinted, self._hinted_all = set(), False
        await self.access.check_users(users, fail_closed=True, why="hint")

    async def _on_notify(self, text: str) -> None:
        """``text``: a verified payload (signed by the capture triggers)."""
        note = parse_notify(text)
        if note is None:  # signed but unreadable here (too deeply nested): the log has it
            self._catch_up_soon()
            return
        if isinstance(note, Probe):
            return
        if isinstance(note, UserHint):  # one the reader did not recognise by its prefix
            await self.access.check_users([note.user], fail_closed=True, why="hint")
            return
        if isinstance(note, PresenceHint):  # likewise
            self.feed.hint(note.user)
            return
        if note.room not in self.hub:
            return
        if not self._users_checked:
            # Hints sent while the listener was away are lost: publish nothing before the
            # catch-up has checked every connected user. The log keeps what this announced.
            self._catch_up_soon()
            return
        action = on_notify(self.hub.last(note.room), note)
        if isinstance(action, Event):
            self._publish(action)
        elif isinstance(action, Read):
            await self._fill(action)

    async def _on_track(self, item: _Track) -> None:
        room = item.sub.room
        if room not in self.hub:
            head = await self.store.head(room)
            if item.future.done():  # the subscriber went away while we read
                return
            self.hub.track(room, head)
        if not item.future.done():
            item.future.set_result(self.hub.add(item.sub))

    async def _catch_up(self, *, poll: bool = False) -> int:
        """Read every tracked room to the end of its log, in as few queries as the sequencer's
        :class:`~daemon.sequencer.Pass` allows (one for up to 500 rooms); return how many events
        were published. ``pgbridge_listener_rooms_behind`` counts the rooms not read to the end
        yet: 0 once this returns (by construction: comparing with the rooms' heads afterwards
        would cost a query and only measure commits racing their NOTIFYs); after a failure, the
        rooms it did not reach, until the retry (:meth:`_catch_up_soon`) starts over."""
        work = Pass(self.hub.rooms())
        self.metrics.rooms_behind.set(len(work))
        if not self._users_checked:
            await self.access.check_users(None, fail_closed=False,
                                          why="check after the listener connected")
            self._users_checked = True
        timer = self.metrics.read_poll if poll else self.metrics.read_catch_up
        published = 0
        while rooms := work.batch():
            cursors = {room: self.hub.last(room) for room in rooms if room in self.hub}
            limit = page_size(len(cursors))
            with timer.time():
                found = await self.store.read_rooms(cursors, limit=limit)
            self.metrics.gap_fills.inc()
            for room, after in cursors.items():
                page = take_page(room, after, found.get(room, ()), limit=limit)
                published += self._apply(page.steps)
                if page.more and room in self.hub:
                    work.again(room)
                else:
                    self.metrics.rooms_behind.dec()
        return published

    async def _fill(self, read: Read) -> None:
        """Publish the room's events after its last seq, up to ``read.upto``, from the log."""
        room = read.room
        self.metrics.gap_fills.inc()
        while room in self.hub:
            last = self.hub.last(room)
            with self.metrics.read_gap_fill.time():
                events = await self.store.read_events(room, after=last, upto=read.upto)
            page = take_page(room, last, events, limit=READ_PAGE, upto=read.upto)
            self._apply(page.steps)
            if page.missing is not None and room in self.hub:
                log.error("events %s..%s of room %s were announced but are not in "
                          "change_events (deleted or pruned?)", page.missing.first,
                          page.missing.last, room, extra={"event": "log_hole"})
            if not page.more:
                return

    def _apply(self, steps: list[Event | Hole]) -> int:
        """Publish a page's events and report its holes, in order; return how many events."""
        published = 0
        for step in steps:
            if step.room not in self.hub:
                break
            if isinstance(step, Hole):
                ended = self.hub.hole(step.room, step.first, step.last)
                log.error("events %s..%s of room %s are missing from change_events (deleted "
                          "or pruned?); %d subscription(s) that needed them ended with "
                          "cursor_expired", step.first, step.last, step.room, ended,
                          extra={"event": "log_hole"})
                continue
            self._publish(step)
            published += 1
        return published

    def _publish(self, event: Event) -> None:
        self.metrics.events.inc()
        self.metrics.deliveries.inc(self.hub.publish(event))
        # once per event, not per subscriber: every live subscriber has it written or queued
        captured = capture_time(event.frame)
        if captured is not None:
            self.metrics.latency_live.observe(max(0.0, time.time() - captured))
        if event.joins is not None and self.hub.watchers(event.room):
            self.feed.hint(event.joins, event.room)
