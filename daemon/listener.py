"""The listener: one dedicated autocommit connection that LISTENs, and hands what it hears to
whoever registered for it (docs/design.md, "Listener reconnect").

Tasks:

* the **reader** owns the LISTEN connection: connect, ``LISTEN``, tell its followers that what
  was sent meanwhile is lost (:meth:`Follower.missed`: the rooms catch up from the log and
  check every connected user, presence is read again), then sort every notification once
  (:func:`daemon.notes.classify`) and hand the note to the handler registered for its kind
  (:meth:`Listener.on`; :mod:`daemon.app` registers the rooms, :mod:`daemon.rooms`, and the
  presence feed, :mod:`daemon.presence_feed`). A handler that is a coroutine is awaited before
  the next notification is read: the rooms' queue holds the reader back when it is full. On any
  connection error the reader reconnects with jittered exponential backoff, and tells its
  followers that it is deaf meanwhile (:meth:`Follower.deaf`).
* the **probe** task sends a NOTIFY of its own through the pool every ``probe_interval``
  seconds; when it does not come back on the LISTEN connection in time, that connection is deaf
  and is replaced. When the last one came back (:attr:`Listener.probed_at`) is what the systemd
  watchdog is petted on (:mod:`daemon.watchdog`).
* the **key** task reads the schema's key every ``KEY_RECHECK`` seconds.

The channels are secret (sql/triggers/10_change_capture.sql, "Secret channels"): derived from
the schema's key, and LISTENed on by calling ``pgbridge_listen()``, which returns their names
(:func:`daemon.db.listen_query`), so no statement's text names them. When the key was rotated,
the channels changed with it, and the LISTEN connection is replaced (a reconnect: every
tracked room catches up from the log and every connected user is checked).

A role that can name a channel (the owner, the bridge role) may still NOTIFY on it, so only
payloads signed with the schema's key (:mod:`daemon.signing`) become notes worth a handler:
anything else is counted, logged (throttled) and dropped here. Past ``REJECT_LIMIT`` (50)
rejected payloads in ``REJECT_WINDOW`` (0.25 s; :class:`daemon.signing.RejectBudget`) the
reader stops checking: until the window ends it drops every payload unchecked (counted in
``pgbridge_shed_notifies_total``), then tells its followers that notifications were missed, as
after a reconnect: the log has whatever was dropped. Nothing moves a room's last seq past what
the log holds: a NOTIFY only ever makes the rooms read the log.

Metrics (docs/reference/metrics.md): ``pgbridge_listener_up``, the lag gauges (computed when
``/metrics`` is scraped, from :attr:`Listener.heard_at` and :attr:`Listener.probed_at`),
``pgbridge_listener_reconnects_total``, ``pgbridge_forged_notifies_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import psycopg

from .backoff import Backoff
from .db import describe, listen_query
from .errors import BridgeError
from .logs import Throttled
from .metrics import Metrics
from .notes import Forged, Keys, Note, ProbeEcho, Shed, classify
from .periodic import every
from .signing import NotifyKey, RejectBudget
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["Follower", "Listener"]

N = TypeVar("N", bound=Note)

# Longest wait between two attempts to reconnect the LISTEN connection, in seconds: events flow
# again at most this long after the server accepts connections, however long it was down. Two
# failed connection attempts a second (jittered) cost a down server nothing it would notice.
RECONNECT_CAP = 1.0
# Seconds between two reads of the signing key (one row): a rotated key changes the channels,
# which the listener follows this long after the rotation at the latest (what was rung on the
# new channels meanwhile is read from the log).
KEY_RECHECK = 5.0


class Follower(Protocol):
    """Whatever acts on what the LISTEN connection hears, and must know when it may have
    missed some (the rooms, the presence feed)."""

    def deaf(self) -> None:
        """The LISTEN connection is down (or not up yet): notifications are lost until
        :meth:`missed` is awaited."""

    async def missed(self, keys: Keys) -> None:
        """LISTEN is up on the channels of ``keys``, but notifications sent before were lost
        (after every (re)connect, and when a flood of forgeries was shed)."""


class Listener:
    """LISTEN on the schema's channels and hand each note to its handler (:meth:`on`).
    :meth:`run` first reads the signing key from the database and checks that the role may
    call ``pgbridge_listen()``; each connection learns the channels' names from that call
    (:attr:`channel`, :attr:`typing_channel`). ``followers`` are told when notifications may
    have been lost (:class:`Follower`).

    ``probe_interval`` and ``probe_timeout`` in seconds (``PGBRIDGE_PROBE_INTERVAL``);
    connecting and LISTEN together may take ``2 * probe_timeout`` before they are retried.

    ``heard_at`` and ``probed_at`` are ``time.monotonic()`` values: when the LISTEN connection
    last delivered anything, and when a probe last came back (``None`` before the first).
    """

    def __init__(self, conninfo: str, store: Store, metrics: Metrics, *,
                 followers: tuple[Follower, ...] = (), probe_interval: float = 10.0,
                 probe_timeout: float = 5.0) -> None:
        self.conninfo = conninfo
        self.channel = ""  # set by each LISTEN connection (pgbridge_listen)
        self.typing_channel = ""  # likewise
        self.keys: Keys | None = None  # likewise
        self.key: NotifyKey | None = None  # set by run()
        self.store = store
        self.metrics = metrics
        self.followers = followers
        self._handlers: dict[type[Any], Callable[[Any], Awaitable[None] | None]] = {}
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.connect_timeout = 2 * probe_timeout
        self.connected = False
        self.ready = asyncio.Event()  # set once LISTEN is proven to deliver (two probes back)
        # set once the key was read and pgbridge_listen() may be called: what LISTENs may start
        self.checked = asyncio.Event()
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._session: asyncio.Task[None] | None = None
        self._retry_now = asyncio.Event()
        self._rekeyed = False  # the LISTEN connection is being replaced for a new key
        self._forgeries = Throttled(log, interval=10.0)
        self._key_failures = Throttled(log, interval=60.0)
        self.rejects = RejectBudget()
        self._shed = 0  # payloads dropped unchecked in the current shedding window
        self._shed_timer: asyncio.TimerHandle | None = None  # ends the shedding window
        self._shed_put: asyncio.Task[None] | None = None  # the followers' catch-up after it
        self.heard_at = time.monotonic()
        self.probed_at: float | None = None
        started = self.heard_at
        metrics.listener_lag.set_function(lambda: time.monotonic() - self.heard_at)
        metrics.probe_age.set_function(
            lambda: time.monotonic() - (self.probed_at if self.probed_at is not None
                                        else started))
        metrics.listener_up.set_function(lambda: 1.0 if self.connected else 0.0)

    # --- public ---------------------------------------------------------------------------

    def on(self, kind: type[N], handler: Callable[[N], Awaitable[None] | None]) -> None:
        """Hand every note of ``kind`` (:mod:`daemon.notes`) to ``handler`` (replacing the
        one before); a coroutine it returns is awaited before the next notification is read.
        Notes of a kind without a handler are dropped."""
        self._handlers[kind] = handler

    def hand(self, note: Note) -> Awaitable[None] | None:
        """Hand ``note`` to the handler registered for its kind (:meth:`on`), as if heard on
        the LISTEN connection (the broker's followers, :mod:`daemon.broker`, hear their notes
        from NATS); the caller awaits what it returns."""
        handler = self._handlers.get(type(note))
        return handler(note) if handler is not None else None

    async def run(self) -> None:
        """:meth:`start`, then :meth:`listen` until cancelled. Raises what :meth:`start`
        raises."""
        await self.start()
        await self.listen()

    async def start(self) -> None:
        """Read the signing key and check that ``pgbridge_listen()`` may be called; sets
        :attr:`checked`. Raises :class:`DatabaseError` when the key cannot be read or the call
        is not granted (a bridge role without ``setup_db.py --grant-bridge``, or granted before
        the channels were secret)."""
        self.key = NotifyKey(await self.store.notify_key())
        await self.store.check_listen_grant()
        self.checked.set()

    async def listen(self) -> None:
        """Run reader, probe and key re-read until cancelled (after :meth:`start`; again after
        a cancel, as the broker's instances do, :mod:`daemon.broker`). Connection failures are
        retried forever; ``ready`` tells whether LISTEN was ever proven to deliver."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read_forever(), name="listener-reader")
                tasks.create_task(self._probe_forever(), name="listener-probe")
                tasks.create_task(every(KEY_RECHECK, self._reread_key, failed=self._key_failed),
                                  name="listener-key")
        finally:
            for task in (self._shed_put, self._shed_timer):
                if task is not None:
                    task.cancel()

    def reconnect(self) -> None:
        """Drop the LISTEN connection now; the reader reconnects and its followers catch up."""
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
                # pgbridge_listen() gone: the schema may have been rolled back (daemon.app)
                self.store.suspect(getattr(exc, "sqlstate", None))
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
                for follower in self.followers:
                    follower.deaf()

    async def _read_session(self, backoff: Backoff) -> None:
        # Until this session LISTENs, notifications are lost (followers catch up after LISTEN)
        for follower in self.followers:
            follower.deaf()
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
            self.keys = keys = Keys.of(self.channel, self.typing_channel, self.key)
            self.connected = True
            backoff.reset()
            # the channels' names are secret: the log names the key by its fingerprint only
            log.info("listening on the channels of key %s at %s", self.key.fingerprint,
                     describe(self.conninfo), extra={"event": "listener_connected"})
            await self._missed()
            handlers, rejects = self._handlers, self.rejects
            async for notify in conn.notifies():
                self.heard_at = now = time.monotonic()
                note = classify(notify.channel, notify.payload, keys,
                                shedding=rejects.shedding(now))
                handler = handlers.get(type(note))
                if handler is not None:
                    pending = handler(note)
                    if pending is not None:
                        await pending
                elif isinstance(note, ProbeEcho):  # ours, or another instance's
                    future = self._probes.get(note.payload)
                    if future is not None and not future.done():
                        future.set_result(None)
                elif isinstance(note, Shed):
                    self._shed += 1
                    self.metrics.shed_notifies.inc()
                elif isinstance(note, Forged):
                    self._forged(note, notify.pid, now)

    async def _missed(self) -> None:
        assert self.keys is not None
        for follower in self.followers:
            await follower.missed(self.keys)

    # --- signatures -----------------------------------------------------------------------

    def _forged(self, note: Forged, pid: int, now: float) -> None:
        """A payload without a valid signature, sent by a role that can name the channel (the
        owner, the bridge role), or signed with a key this daemon does not hold yet (rotated).
        Dropped; once :attr:`rejects` is spent, the rest of its window is shed."""
        self.metrics.forged_notifies.inc()
        self._forgeries.warning(
            "forged", "ignored a NOTIFY on the %s channel that failed its signature check (%d "
            "characters, sent by backend pid %d); only the capture triggers and the bridge "
            "hold the key", note.kind, note.size, pid, extra={"event": "notify_forged"})
        if self.rejects.rejected(now):
            self._shed = 0
            self._shed_timer = asyncio.get_running_loop().call_later(
                max(0.0, self.rejects.until - now), self._shed_over)

    def _shed_over(self) -> None:
        """The shedding window ended: what was dropped unchecked may have held real events,
        user and presence hints, so the followers read it all again (the rooms every tracked
        room's log and every connected user, the feed every watched room's presence). Typing
        signals dropped meanwhile are gone (they are never stored)."""
        self._forgeries.warning(
            "shed", "%d NOTIFY payloads failed their signature check within %g s; dropped %d "
            "more unchecked; reading every room's log and checking every connected user",
            self.rejects.limit, self.rejects.window, self._shed, extra={"event": "notify_shed"})
        self._shed_timer = None
        # at once, as before issue 26: nothing heard from now on is published before the
        # followers caught up (every connected user checked); and only while LISTEN is up (else
        # the reconnect's own missed() does it, and the polls must keep waiting)
        for follower in self.followers:
            follower.deaf()
        if self.connected:
            self._shed_put = asyncio.get_running_loop().create_task(self._missed())

    # --- key ------------------------------------------------------------------------------

    async def _reread_key(self) -> None:
        """Read the key again; follow a rotation. Raises :class:`BridgeError`."""
        key = NotifyKey(await self.store.notify_key())
        if self.key is not None and key.fingerprint == self.key.fingerprint:
            return
        log.warning("the NOTIFY signing key changed (%s -> %s), and with it the channels: "
                    "LISTENing on the new ones, catching up every room from the log and "
                    "checking every connected user",
                    self.key.fingerprint if self.key else "-", key.fingerprint,
                    extra={"event": "notify_key_changed"})
        self.key = key
        self.store.schema_suspect.set()  # a rollback and an apply change it too (daemon.app)
        # the new connection LISTENs on the new channels, then its followers catch up (hints
        # rung on the new channels meanwhile are lost)
        self._rekeyed = self._session is not None and not self._session.done()
        self.reconnect()

    def _key_failed(self, exc: BridgeError) -> None:
        # the database is away: once a minute is enough to say so
        self._key_failures.warning("key", "could not read the NOTIFY signing key again (%s)",
                                   exc, extra={"event": "notify_key_failed"})

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
            if ok and not self.ready.is_set():
                # Proven by a second round trip only: through a transaction-mode pooler, a
                # NOTIFY can reach the listener by chance while its LISTEN statement runs on a
                # server connection an earlier session left LISTENing; a listener that runs no
                # statement hears the second one only if LISTEN truly delivers to it.
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
