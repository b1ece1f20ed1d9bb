"""The broker mode (``PGBRIDGE_BROKER``): bridges that share NATS instead of each reading the
log (docs/topics/broker.md).

One instance per database is the **leader** (:mod:`daemon.leadership`): it LISTENs and reads
the log as a bridge without a broker does, pins every room any instance holds, and relays each
event it publishes to the room's subject in seq order, and the hints and typing it hears
(:mod:`daemon.broker_relay`). The **followers** neither LISTEN nor poll: they subscribe to the
subjects of their sockets' rooms and hand what they hear to the listener's handlers
(:meth:`daemon.listener.Listener.hand`): a repeat is dropped by seq, a gap read from the log.

Without a heartbeat of its leader for :data:`~daemon.broker_wire.LEADER_TIMEOUT` seconds, or
with the broker down, an instance **falls back**: it LISTENs and reads the log itself, as
without a broker. Every instance starts there (its LISTEN proven as without a broker); when a
leader is heard, it asks it to publish its rooms (:mod:`daemon.broker_rooms`), stops its LISTEN
and reads every room's log once more: events after the leader's answer arrive on the subjects.

Metrics and logs: docs/reference/metrics.md ("The broker"), docs/reference/logs.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from .broker_relay import Relay
from .broker_rooms import Interest
from .broker_wire import (
    HEARTBEAT_INTERVAL,
    LEADER_TIMEOUT,
    heartbeat,
    read_heartbeat,
    takes,
)
from .errors import BridgeError
from .leadership import Leadership
from .listener import Follower, Listener
from .logs import incident
from .metrics import Metrics
from .notes import Keys

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from .hub import Hub
    from .presence_feed import PresenceFeed
    from .rooms import Rooms
    from .store import Store

log = logging.getLogger(__name__)

__all__ = ["STATES", "Broker"]

STATES = ("leader", "follower", "fallback")
RECONNECT_WAIT = 0.25  # seconds between two attempts to reach the broker
STOP_WAIT = 12.0  # seconds a stopping capture may take (psycopg may wait 10 s on a cancel)
MISSED_EVERY = 5.0  # seconds between two catch-ups while a flood is shed (Broker._on_shed)
PING_INTERVAL, PINGS = 0.5, 3  # a ping every 0.5 s; the connection is lost after 3 unanswered


class Broker:
    """Run this instance's part of the broker mode over ``servers`` (``PGBRIDGE_BROKER``).
    ``followers``: what the listener tells when notifications may have been lost (the rooms,
    the presence feed, the feeds); the broker tells them the same of its own feed.

    :attr:`state`: one of :data:`STATES`; :attr:`epoch`: the leader's that this instance
    follows, or its own while it leads."""

    def __init__(self, servers: tuple[str, ...], *, conninfo: str, schema: str, store: Store,
                 hub: Hub, rooms: Rooms, listener: Listener, presence_feed: PresenceFeed,
                 followers: tuple[Follower, ...], metrics: Metrics) -> None:
        self.servers = servers
        self.store, self.hub, self.rooms, self.listener = store, hub, rooms, listener
        self.followers, self.metrics = followers, metrics
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.state = "fallback"
        self.epoch = 0
        self.heard_at: float | None = None  # time.monotonic() of its last heartbeat
        self.failure: BaseException | None = None  # what stopped the capture (run raises it)
        self.relay = Relay(rooms=rooms, listener=listener, presence_feed=presence_feed,
                           metrics=metrics, overflow=self._overflow)
        self.leadership = Leadership(conninfo, schema, ready=listener.ready,
                                     elected=self._elected, lost=self._lost)
        self._newest = (0, 0)  # (epoch, beat) of the newest heartbeat taken
        self._newest_at = 0.0  # when its epoch last beat
        self._database = ""  # the database's identity (its subjects)
        self.relay.on_missed = self._missed  # the leader's missed(), taken by followers only
        self.relay.on_shed = self._on_shed
        self._beats = 0
        self.interest = Interest(hub, rooms, self.relay)
        self._control: list[Any] = []  # the leader, signal and typing subscriptions
        self._capture: asyncio.Task[None] | None = None
        self._old_capture: asyncio.Task[None] | None = None  # the last one stopped
        self._changes = asyncio.Lock()  # one change of state at a time
        self._following: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None  # the catch-up after a shed or a drop
        self._missed_due = False
        self._stopping = False
        self._retry_at = 0.0  # no attempt to follow before (after a failed track request)
        metrics.export_broker(states=STATES, state=lambda: self.state,
                              up=lambda: self.relay.connected, lag=self._lag)

    # --- public ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled: start in fallback, connect, follow or lead. Raises what the
        listener raises (:class:`daemon.errors.DatabaseError`: the key cannot be read, LISTEN
        is not granted), as a bridge without a broker does."""
        await self.listener.start()
        assert self.listener.key is not None
        self._database = await self.store.database_identity()
        self.relay.rekey(self.listener.key, self._database)
        self._start_capture()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._connect(), name="broker-connect")
                tasks.create_task(self.leadership.run(), name="broker-leadership")
                tasks.create_task(self._watch_forever(), name="broker-watch")
                tasks.create_task(self.relay.publish_forever(), name="broker-publish")
                tasks.create_task(self.interest.rooms_forever(self, self._changes))
                tasks.create_task(self.interest.refresh_forever(self), name="broker-refresh")
                tasks.create_task(self._key_forever(), name="broker-key")
        finally:
            self._stopping = True  # closing the connection is no loss of the broker
            if self._capture is not None:
                self._capture.cancel()
            if self.relay.nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.relay.nc.close(), 2.0)

    @property
    def alive_at(self) -> float | None:
        """When this instance last knew that events flow (``time.monotonic()``): the leader's
        last heartbeat while it follows, else its listener's last NOTIFY round trip (for the
        systemd watchdog)."""
        if self.state == "follower":
            return self.heard_at
        # just fallen back: the leader's last heartbeat until LISTEN is proven again
        return max((at for at in (self.heard_at, self.listener.probed_at) if at is not None),
                   default=None)

    def health(self) -> str | None:
        """Why events may not flow now (``/healthz``'s ``listener``), ``None`` when they do."""
        if self.state == "follower":
            return None if self._lag() < 2 * LEADER_TIMEOUT else "no heartbeat from the leader"
        listener = self.listener
        return ("not connected" if not listener.connected else None if listener.ready.is_set()
                else "LISTEN not yet proven by a NOTIFY round trip")

    # --- what the leader's LISTEN missed (daemon.listener.Follower) ------------------------

    def deaf(self) -> None:
        """The leader's LISTEN is down: the catch-up when it is back publishes what it missed
        to the followers in order; hints are lost until :meth:`missed`."""

    async def missed(self, keys: Keys) -> None:
        """Leader: LISTEN is up again (or shed a flood), and hints sent before were lost for
        every instance: tell the followers to check their users and read their rooms' logs."""
        del keys
        self.relay.missed()  # nothing unless leading

    def _on_shed(self) -> None:
        """A flood of forged messages was shed, or the broker dropped messages for us (a slow
        consumer): what they hid is in the log, and a hint may be lost. Coalesced: one catch-up
        and check of every user once they stop for a second, or every ``MISSED_EVERY`` seconds
        while they go on. Meanwhile nothing is published before that check (a hint may have
        been dropped): :meth:`daemon.rooms.Rooms.deaf`, as while a LISTEN is down."""
        if self.state == "follower":
            self.rooms.deaf()
        self._missed_due = True
        if self._sweep is None or self._sweep.done():
            self._sweep = asyncio.create_task(self._missed_while_due())

    async def _missed_while_due(self) -> None:
        started = time.monotonic()
        while self._missed_due:
            self._missed_due = False
            await asyncio.sleep(1.0)
            if self._missed_due and time.monotonic() - started < MISSED_EVERY:
                continue  # still flooding
            self._missed_due = False
            if self.state == "follower":
                await self._missed()
            started = time.monotonic()

    # --- states ---------------------------------------------------------------------------

    def _start_capture(self) -> None:
        """Read the log ourselves: the listener (LISTEN, its catch-up) and the polls."""
        if self._capture is None or self._capture.done():
            self._capture = asyncio.create_task(self._capture_run(), name="broker-capture")
            self._capture.add_done_callback(self._capture_ended)

    async def _capture_run(self) -> None:
        old = self._old_capture  # one listener at a time: a capture still stopping ends first
        if old is not None and not old.done():
            await asyncio.wait({old}, timeout=STOP_WAIT)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.listener.listen(), name="listener")
            tasks.create_task(self.rooms.capture(), name="listener-capture")

    def _capture_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()  # the watch raises it: the bridge stops

    async def _stop_capture(self, task: asyncio.Task[None] | None) -> None:
        """Stop reading the log ourselves: cancel ``task`` (the listener tells its followers it
        is deaf), and wait ``STOP_WAIT`` seconds at most for it to end."""
        if task is not None:
            self._old_capture = task
            task.cancel()
            _, pending = await asyncio.wait({task}, timeout=STOP_WAIT)
            if pending:
                log.error("the listener did not stop within %g s of being cancelled; going on "
                          "without it", STOP_WAIT, extra={"event": "broker_stuck"})

    async def _missed(self) -> None:
        """Tell the followers that what the broker carried may be lost: read every room's log,
        check every connected user, read the feeds and presence again."""
        assert self.relay.key is not None
        # typing takes the broker while it is up; else the channel the listener last named
        keys = Keys.of("", self.listener.typing_channel, self.relay.key)
        for follower in self.followers:
            await follower.missed(keys)

    async def fall_back(self, reason: str, *, epoch: int | None = None) -> None:
        """Read the log ourselves (a follower, or a leader stepping down). With ``epoch``: only
        if this instance still follows the leader of that epoch (:class:`Following`)."""
        async with self._changes:
            if self.state == "fallback" or (epoch is not None and (
                    self.state != "follower" or self.epoch != epoch)):
                return
            if self.state == "leader":
                await self._unlead(reason)
            self.state = "fallback"
            self.relay.stop()
            self.metrics.broker_fallbacks.inc()
            log.warning("reading the log itself: %s", reason,
                        extra={"event": "broker_fallback", "reason": reason})
            self._start_capture()

    async def _elected(self, epoch: int) -> None:
        """Leadership: this instance holds the lock, with fencing token ``epoch``."""
        async with self._changes:
            self.epoch, self._newest, self.state = epoch, (epoch, 0), "leader"
            self._start_capture()
            self.relay.start(epoch, leading=True)
            self.rooms.relay = self.relay.event
            try:
                await self.interest.serve(epoch)
            except Exception as exc:  # nats: the connection closed meanwhile; let another lead
                log.warning("could not answer track requests (%s); stepping down", exc,
                            extra={"event": "broker_track_failed"})
                self.leadership.resign("it could not answer the followers' track requests")
            log.info("this instance is the capture reader (epoch %d): it reads the log and "
                     "publishes every room's events to the broker", epoch,
                     extra={"event": "broker_leader", "epoch": epoch})

    async def _lost(self, why: str) -> None:
        log.warning("no longer the capture reader: %s", why,
                    extra={"event": "broker_stepped_down"})
        await self.fall_back(f"this instance stopped leading ({why})")

    async def _unlead(self, why: str) -> None:
        self.relay.stop()
        self.rooms.relay = None
        await self.interest.unserve()
        self.leadership.resign(why)

    def _overflow(self) -> None:
        if self.state == "leader":  # the broker takes nothing: let another instance lead
            self.leadership.resign("the broker takes no more messages from it")

    async def _follow(self, epoch: int) -> None:
        """The leader of ``epoch`` is heard: have it publish our rooms, then follow it (stop
        our LISTEN, read every room's log once: events after its answer come from it). The
        request is made outside the lock of our state, which may change meanwhile: then this
        gives way."""
        async with self._changes:
            if self.state == "leader" or (self.state == "follower" and self.epoch == epoch):
                return
            was = self.epoch if self.state == "follower" else None  # the epoch followed so far
            await self.interest.subscribe()
            rooms = self.hub.rooms()
        try:
            await self.interest.track(epoch, rooms)
        except BridgeError as exc:
            self._retry_at = time.monotonic() + 1.0
            failed = f"the capture reader of epoch {epoch} did not take our rooms ({exc})"
            if was is not None:  # still following the old one, which is gone: stop
                await self.fall_back(failed, epoch=was)
            else:
                log.warning("%s; reading the log ourselves meanwhile", failed,
                            extra={"event": "broker_track_failed"})
            return
        async with self._changes:
            if self.state == "leader" or (self.state == "follower" and self.epoch != was):
                return  # elected meanwhile, or following another leader already
            self.epoch, self.state = epoch, "follower"
            self.relay.start(epoch, leading=False)
            self.heard_at = time.monotonic()
            capture, self._capture = self._capture, None
        # not under the lock: a fallback or an election must never wait for the capture to
        # stop, nor for the rooms' queue
        await self._stop_capture(capture)  # the listener tells its followers: deaf
        await self._missed()
        if self.state == "follower" and self.epoch == epoch:
            log.info("following the capture reader of epoch %d: no LISTEN, no log reads but "
                     "gaps", epoch, extra={"event": "broker_following", "epoch": epoch})
        # rooms tracked while we asked were not part of the request
        if later := sorted(set(self.hub.rooms()) - set(rooms)):
            why = await self.interest.take_heads(epoch, later)
            if why is not None:
                await self.fall_back(why, epoch=epoch)

    # --- the broker connection ------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect; nats-py then reconnects for ever (``max_reconnect_attempts=-1``: the first
        connection too), telling each failure to :meth:`Relay.on_error`. It pings every
        ``PING_INTERVAL`` seconds and gives up after ``PINGS`` unanswered: a leader cut off from
        the broker steps down within about 2 s."""
        import nats  # only with a broker configured

        self.relay.nc = await nats.connect(
            servers=list(self.servers), name=f"pgbridge {self.name}", no_echo=True,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=RECONNECT_WAIT,
            connect_timeout=2, ping_interval=PING_INTERVAL, max_outstanding_pings=PINGS,
            error_cb=self.relay.on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected)
        await self._on_connected()

    async def _on_connected(self) -> None:
        nc = self.relay.nc
        assert nc is not None
        log.info("connected to the broker at %s", nc.connected_url.netloc.rpartition("@")[2]
                 if nc.connected_url else "?", extra={"event": "broker_connected"})
        await self._subscribe_control()
        self.leadership.allowed.set()

    async def _subscribe_control(self) -> None:
        """Subscribe to the leader, signal and typing subjects of the current key (again: a
        rotated key's), connected or not (nats-py sends them once it reconnects)."""
        nc, subjects = self.relay.nc, self.relay.subjects
        assert nc is not None and subjects is not None
        for sub in self._control:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._control = [await nc.subscribe(subjects.leader, cb=self._on_heartbeat),
                         await nc.subscribe(subjects.signal, cb=self.relay.on_signal),
                         await nc.subscribe(subjects.typing, cb=self.relay.on_typing)]
        self.interest.dirty.set()

    async def _on_disconnected(self) -> None:
        # nats-py awaits this in its reconnect task: whatever fails here must not end it
        if self._stopping:
            return
        self.leadership.allowed.clear()
        log.warning("lost the broker; reconnecting", extra={"event": "broker_lost"})
        self.leadership.resign("the broker connection was lost")
        try:
            await self.fall_back("the broker connection was lost")
        except Exception:
            incident(log, "broker_crashed", "falling back after the broker was lost failed")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to the broker", extra={"event": "broker_connected"})
        self.interest.dirty.set()
        self.leadership.allowed.set()

    # --- heartbeats -----------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        keys = self.relay.keys
        if not self.relay.checking("leader", msg):
            return None
        beat = read_heartbeat(keys.control, msg.data) if keys is not None else None
        if beat is None:
            return self.relay.forged("leader")
        now = time.monotonic()
        if not takes(beat, self._newest, now - self._newest_at):
            return None  # replayed, or an older epoch's while the newest one beats
        self._newest, self._newest_at = (beat.epoch, beat.beat), now
        if beat.epoch == self.epoch:
            self.heard_at = time.monotonic()
        if self.state == "leader":
            if beat.epoch > self.epoch:  # a newer leader: the lock passed on, we were deposed
                await self.fall_back(f"a newer capture reader (epoch {beat.epoch}) is heard")
            return None
        if ((self.state == "fallback" or beat.epoch != self.epoch)
                and self.listener.ready.is_set()  # LISTEN proven once: the start waits for it
                and time.monotonic() >= self._retry_at
                and (self._following is None or self._following.done())):
            self._following = asyncio.create_task(self._follow(beat.epoch))
            self._following.add_done_callback(self._followed)
        return None

    def _followed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            incident(log, "broker_crashed", "following a capture reader failed", exc_info=exc)

    def _lag(self) -> float:
        if self.state == "leader":
            return 0.0
        return time.monotonic() - self.heard_at if self.heard_at is not None else float("inf")

    async def _watch_forever(self) -> None:
        """Leader: beat (and unpin what nobody asks for). Follower: fall back when the leader
        is silent. Raises what stopped the capture."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL if self.state == "leader" else 0.1)
            if self.failure is not None:
                raise self.failure
            keys, subjects = self.relay.keys, self.relay.subjects
            if self.state == "leader" and keys is not None and subjects is not None:
                self._beats += 1
                self.relay.put(subjects.leader,
                               heartbeat(keys.control, self.epoch, self._beats, self.name))
                if self._beats % 20 == 0:  # every 5 s: it walks every pin
                    self.interest.expire()
            elif self.state == "follower" and self._lag() > LEADER_TIMEOUT:
                await self.fall_back(f"no heartbeat from the capture reader for "
                                      f"{LEADER_TIMEOUT:g} s", epoch=self.epoch)

    # --- key ------------------------------------------------------------------------------

    async def _key_forever(self) -> None:
        """Follow a rotated key to its subjects. The listener re-reads the key while it runs
        (:data:`daemon.listener.KEY_RECHECK`); a follower reads nothing: once its leader moved
        to the new key's subjects, no heartbeat comes, it falls back, and its listener reads
        the new key."""
        while True:
            await asyncio.sleep(1.0)
            key = self.listener.key
            if key is None or self.relay.key is None or (
                    key.fingerprint == self.relay.key.fingerprint):
                continue
            await self.fall_back("the signing key changed: moving to its subjects")
            async with self._changes:
                self.relay.rekey(key, self._database)
                await self.interest.forget()
                if self.relay.nc is not None:
                    try:
                        await self._subscribe_control()
                    except Exception:  # nats: the connection closed (never, but at the stop)
                        incident(log, "broker_crashed", "subscribing to the new key's subjects "
                                 "failed")
