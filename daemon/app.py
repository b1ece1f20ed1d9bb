"""Composition root: settings, logging, signals, and the supervised tasks of one bridge.

:func:`run` is ``python -m daemon`` / ``pgbridge run`` (:func:`daemon.cli.run_main` calls it).
Start-up order: settings → database (embedded, tunnel) → schema (applied on the embedded server,
checked otherwise) → pool → not a standby → listener proven by a NOTIFY round trip → WebSocket
server listening → ``READY=1`` to systemd. Any task that fails stops the bridge with a non-zero
exit (systemd restarts it); SIGTERM/SIGINT stop accepting, close clients with 1001, flush
acknowledgements and exit 0. Under a systemd watchdog (``WatchdogSec=``), a task sends
``WATCHDOG=1`` every half period while the listener's NOTIFY round trip is recent
(:mod:`daemon.watchdog`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from . import systemd
from .access import Access
from .acks import AckBuffer, AckWriter
from .auth import Claims, resolve_secret, verify_token
from .broker import Broker
from .broker_relay import tee
from .db import database, describe
from .demo import banner, ensure_demo
from .doorbell import Doorbell
from .errors import BridgeError, DatabaseError, SchemaError
from .feed import Feeds
from .handshake import Health
from .hub import Hub
from .listener import Listener
from .metrics import Metrics
from .notes import (
    Change,
    DoorbellHint,
    MemberHint,
    PresenceHint,
    Typing,
    Unreadable,
    UserHint,
)
from .periodic import every
from .presence_feed import PresenceFeed
from .presence_writer import PresenceWriter
from .ratelimit import ClientLimits
from .rooms import Rooms
from .server import Server
from .settings import DaemonSettings, DatabaseSettings, SSHSettings
from .store import Store
from .watchdog import probe_fresh, probe_max_age, watchdog_interval

log = logging.getLogger(__name__)

__all__ = ["Bridge", "run"]

READY_TIMEOUT = 15.0  # seconds for the first NOTIFY round trip
# Seconds the supervised tasks get to end once cancelled at shutdown (psycopg may take 10 s to
# give up on a query whose connection no longer answers); systemd's TimeoutStopSec is 30 s.
STOP_TIMEOUT = 12.0
# Seconds between two reads of pg_stat_user_indexes into pgbridge_index_scans_total's cache (the
# scrape reads the cache: it is rendered on the event loop and may not wait for the database),
# and the most one read may run. PostgreSQL publishes a session's counts when its transaction
# ends, or up to 10 s later (PostgreSQL 15+), so reading more often shows little sooner.
INDEX_STATS_INTERVAL = 5.0
INDEX_STATS_TIMEOUT = 2.0
# Seconds between two checks that pgbridge is still in the schema, at most (Bridge._schema_watch).
SCHEMA_RECHECK = 1.0


class Bridge:
    """One running bridge over ``conninfo``: builds the collaborators and hands each its
    dependencies. :meth:`serve` runs it; ``port`` is the bound port once ``started`` is set
    (``PGBRIDGE_PORT=0`` picks a free one).

    ``watchdog``: seconds between two ``WATCHDOG=1`` to systemd (half of ``WATCHDOG_USEC``:
    :func:`daemon.watchdog.watchdog_interval`), sent only while the listener's last NOTIFY
    round trip is recent; ``None``: no watchdog task.
    """

    def __init__(self, conninfo: str, settings: DaemonSettings, secret: str, *,
                 watchdog: float | None = None) -> None:
        self.conninfo = conninfo
        self.settings = settings
        self.secret = secret
        self.watchdog = watchdog
        self.hub = Hub()
        self.metrics = Metrics()
        self.store = Store(conninfo, schema=settings.schema, metrics=self.metrics,
                           max_size=settings.pool_size)
        self.metrics.watch_pool(self.store.pool_stats)
        self.access = Access(self.store, self.metrics, interval=settings.access_check_interval)
        self.presence_feed = PresenceFeed(self.store, self.hub, self.metrics)
        self.presence = PresenceWriter(self.store, self.metrics, grace=settings.presence_grace,
                                       lease=settings.presence_lease)
        doorbell = Doorbell(settings.doorbell, quiet_above=settings.doorbell_quiet_above,
                            poll_interval=settings.poll_interval, now=time.monotonic())
        self.rooms = Rooms(self.hub, self.store, self.metrics, self.access,
                           joined=self.presence_feed.joined, doorbell=doorbell)
        self.feeds = Feeds(self.store, self.rooms, self.hub, self.metrics, settings)
        self.listener = Listener(conninfo, self.store, self.metrics,
                                 followers=(self.rooms, self.presence_feed, self.feeds),
                                 probe_interval=settings.probe_interval,
                                 probe_timeout=max(2.0, min(settings.probe_interval, 10.0)))
        self.broker: Broker | None = None
        relay: Callable[[Any], None] = lambda note: None  # noqa: E731
        if settings.broker:
            self.broker = Broker(settings.broker, conninfo=conninfo, schema=settings.schema,
                                 store=self.store, hub=self.hub, rooms=self.rooms,
                                 listener=self.listener, presence_feed=self.presence_feed,
                                 followers=(self.rooms, self.presence_feed, self.feeds),
                                 metrics=self.metrics)
            # the leader tells its followers what its LISTEN missed
            self.listener.followers = (*self.listener.followers, self.broker)
            relay = self.broker.relay.note  # the leader relays what it hears on LISTEN
        listen = self.listener.on
        listen(Change, self.rooms.changed)
        listen(UserHint, tee(relay, self.rooms.user_hinted))
        listen(Unreadable, self.rooms.unreadable)
        listen(DoorbellHint, self.rooms.polls.hinted)
        listen(PresenceHint, tee(relay, self.presence_feed.hinted))
        listen(MemberHint, tee(relay, self.feeds.hinted))
        listen(Typing, tee(relay, self.presence_feed.typing))
        self.acks = AckBuffer()
        self.ack_writer = AckWriter(self.acks, self.store, self.metrics,
                                    interval=settings.ack_flush_interval)
        self.limits = ClientLimits(max_connections=settings.max_connections,
                                   max_per_user=settings.max_connections_per_user,
                                   user_rate=settings.user_subscribe_rate,
                                   user_burst=settings.user_subscribe_burst)
        self.health = Health(self.store, self.listener,
                             events=self.broker.health if self.broker else None)
        self.server = Server(settings=settings, metrics=self.metrics, hub=self.hub,
                             rooms=self.rooms, store=self.store, acks=self.acks,
                             access=self.access, limits=self.limits, presence=self.presence,
                             presence_feed=self.presence_feed, feeds=self.feeds,
                             health=self.health,
                             verify_token=self.verify_token)
        self.started = asyncio.Event()
        self._schema_lost = False  # rolled back (and maybe applied again) under the bridge

    @property
    def port(self) -> int:
        """The bound port (0 until started)."""
        return self.server.port

    def verify_token(self, token: str) -> Claims:
        """Check a client's token with this bridge's secret, audience and issuer. Raises
        :class:`daemon.auth.AuthError`."""
        return verify_token(self.secret, token, audience=self.settings.jwt_audience,
                            issuer=self.settings.jwt_issuer)

    async def _prune_forever(self) -> None:
        async def prune() -> None:
            deleted = await self.store.prune(self.settings.retention)
            self.metrics.pruned.inc(deleted)
            if deleted:
                log.info("pruned %d events older than %.0f s", deleted, self.settings.retention,
                         extra={"event": "pruned"})

        def failed(exc: BridgeError) -> None:
            log.warning("pruning failed (%s); retrying later", exc, extra={"event": "prune"})

        await every(self.settings.prune_interval, prune, failed=failed, first=True)

    async def _index_stats_forever(self) -> None:
        failing = False

        async def read() -> None:
            nonlocal failing
            if self.broker is not None and self.broker.state == "follower":
                return  # the database's figures: the leader reads them (one reader, not N)
            self.metrics.index_scans_read(await self.store.index_scans(
                timeout=INDEX_STATS_TIMEOUT))
            failing = False

        def failed(exc: BridgeError) -> None:
            nonlocal failing
            if not failing:  # once per run of failures: the database's absence is logged anyway
                log.warning("reading index statistics failed (%s); pgbridge_index_scans_total "
                            "keeps the last values read", exc, extra={"event": "index_stats"})
            failing = True

        await every(INDEX_STATS_INTERVAL, read, failed=failed, first=True)

    async def serve(self, stop: asyncio.Event, *,
                    on_ready: Callable[[Bridge], None] | None = None) -> None:
        """Run until ``stop`` is set (clean shutdown) or a task fails (its error is raised).

        Raises :class:`DatabaseError` when the database is a hot standby or LISTEN delivers
        nothing (a transaction-mode pooler), :class:`ConfigError` when the port is taken
        (:meth:`daemon.server.Server.start`).
        """
        await self.store.open()
        tasks: set[asyncio.Task[Any]] = set()
        started = False
        try:
            if await self.store.in_recovery():
                raise DatabaseError(f"{describe(self.conninfo)} is a hot standby (read-only): "
                                    "LISTEN/NOTIFY needs the primary; point pgbridge at it")
            if self.broker is not None:  # runs the listener while this instance reads the log
                tasks.add(asyncio.create_task(self.broker.run(), name="broker"))
            else:
                tasks.add(asyncio.create_task(self.listener.run(), name="listener"))
            tasks.add(asyncio.create_task(self._schema_watch(), name="schema-watch"))
            tasks.add(asyncio.create_task(self._rooms_once_checked(), name="rooms"))
            tasks.add(asyncio.create_task(self.presence_feed.run(), name="presence-feed"))
            await self._wait_ready(tasks)
            await self.store.check_presence_grants()
            await self.server.start()
            started = True
            tasks.add(asyncio.create_task(self.server.heartbeat.run(), name="heartbeat"))
            tasks.add(asyncio.create_task(self.ack_writer.run(), name="ack-writer"))
            tasks.add(asyncio.create_task(self._prune_forever(), name="pruner"))
            tasks.add(asyncio.create_task(self._index_stats_forever(), name="index-stats"))
            tasks.add(asyncio.create_task(self.access.run(), name="access-check"))
            tasks.add(asyncio.create_task(self.presence.run(), name="presence-writer"))
            self.started.set()
            # Start-up objects (modules, classes, settings) are never garbage: freezing them
            # (after a collection, so that no garbage is frozen with them) spares every full
            # collection from walking them again. Measured under a flood of refused upgrades
            # (bench/abuse.py, phase a), before connections cut their reference cycles: the
            # longest pause 102-129 -> 83 ms.
            gc.collect()
            gc.freeze()
            loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
            log.info("pgbridge listening on ws://%s:%d/ws (schema %s, event loop %s)",
                     self.settings.host, self.port, self.settings.schema, loop,
                     extra={"event": "ready"})
            if on_ready is not None:
                on_ready(self)
            if self.watchdog is not None:  # systemd arms it once READY=1 was sent
                tasks.add(asyncio.create_task(self._watchdog_forever(self.watchdog),
                                              name="watchdog"))
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in done - {stopper}:
                task.result()  # raises the failure
                raise RuntimeError(f"task {task.get_name()} ended unexpectedly")
            log.info("shutting down: closing %d clients with 1001", len(self.server.clients),
                     extra={"event": "shutdown"})
        finally:
            if started:
                await self.server.close()  # stop accepting; close every connection with 1001
            for task in tasks:
                task.cancel()
            if tasks:  # bounded: a task that does not end on cancel must not hold the exit
                _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
                for task in stuck:
                    log.error("task %s did not stop within %g s of being cancelled; exiting "
                              "without it", task.get_name(), STOP_TIMEOUT,
                              extra={"event": "task_stuck"})
            # a lost schema's acks and presence are of the install that is gone
            if started and not self._schema_lost:
                await self.presence.retire()
            try:
                if not self._schema_lost:
                    await self.ack_writer.flush()
            except BridgeError as exc:
                log.error("could not save the last acknowledgements: %s", exc,
                          extra={"event": "ack_flush_failed"})
            await self.store.close()

    async def _schema_watch(self) -> None:
        """Stop the bridge, with one line, once pgbridge is no longer in its schema.

        A statement that names a missing object (SQLSTATE of
        :data:`daemon.store_pool.SCHEMA_GONE`: the key re-read every few seconds does, on any
        bridge), or a new signing key, makes this task ask the catalog
        (:meth:`daemon.store.Store.install_id`). Gone (``setup_db.py --rollback``,
        docs/howto/rollback.md, or dropped by hand), or another install than the one at start
        (rolled back and applied again: the rooms' counters start again at 1, which the
        bridge's heads and cursors do not follow): raises :class:`SchemaError`, which stops the
        bridge with exit 1, rather than retrying for ever what can no longer work, or holding
        back every new event. Still there: the failure was another one (its own log line says
        which); asked at most once per ``SCHEMA_RECHECK`` seconds."""
        suspect, schema = self.store.schema_suspect, self.settings.schema
        try:
            started: int | None = await self.store.install_id()
        except BridgeError:  # asked again on the first suspicion
            started = None
        while True:
            await suspect.wait()
            suspect.clear()  # a suspicion raised while asking or sleeping is kept for the next
            try:
                now = await self.store.install_id()
            except BridgeError:  # the database cannot be asked now: its own lines say so
                suspect.set()  # ask again after the pause
                await asyncio.sleep(SCHEMA_RECHECK)
                continue
            self._schema_lost = now is None or started not in (None, now)
            if now is None:
                raise SchemaError(
                    f"schema {schema} at {describe(self.conninfo)}: pgbridge was removed from "
                    "it while the bridge ran (setup_db.py --rollback, or its objects dropped "
                    "by hand), so the bridge stops; to bridge again, apply it (python "
                    f"setup_db.py{'' if schema == 'public' else ' --schema ' + schema}) and "
                    "start the bridge")
            if started is not None and now != started:  # its seqs start again at 1
                raise SchemaError(
                    f"schema {schema} at {describe(self.conninfo)}: pgbridge was rolled back "
                    "and applied again while the bridge ran (a new log, the rooms' counters "
                    "started again), so the bridge stops; start it again")
            started = now
            log.debug("a statement found an object missing, or the key changed, but pgbridge is "
                      "still installed in schema %s: carrying on", schema,
                      extra={"event": "schema_present"})
            await asyncio.sleep(SCHEMA_RECHECK)

    async def _rooms_once_checked(self) -> None:
        """The rooms (and with them the doorbell) start once the listener read the key and may
        LISTEN: a bridge that cannot LISTEN never takes the doorbell's lease from the others."""
        await self.listener.checked.wait()
        await self.rooms.run(capture=self.broker is None)

    async def _watchdog_forever(self, interval: float) -> None:
        """Every ``interval`` seconds, ``WATCHDOG=1`` if the last NOTIFY round trip is recent
        (:func:`daemon.watchdog.probe_fresh`); otherwise nothing, and systemd restarts the
        daemon once ``WatchdogSec`` passed without one."""
        listener, broker = self.listener, self.broker
        max_age = probe_max_age(listener.probe_interval, listener.probe_timeout)
        withheld = False
        while True:
            # with a broker: the leader's last heartbeat while this instance follows it
            alive_at = broker.alive_at if broker is not None else listener.probed_at
            if probe_fresh(alive_at, time.monotonic(), max_age):
                systemd.notify("WATCHDOG=1")
                if withheld:
                    log.warning("NOTIFY round trips are back: petting the systemd watchdog "
                                "again", extra={"event": "watchdog_resumed"})
                withheld = False
            elif not withheld:
                age = time.monotonic() - alive_at if alive_at is not None else float("inf")
                log.error("no NOTIFY round trip for %.1f s (more than %.1f s): withholding "
                          "WATCHDOG=1, systemd restarts the daemon if this lasts WatchdogSec",
                          age, max_age, extra={"event": "watchdog_withheld"})
                withheld = True
            await asyncio.sleep(interval)

    async def _wait_ready(self, tasks: set[asyncio.Task[Any]]) -> None:
        ready = asyncio.create_task(self.listener.ready.wait())
        done, _ = await asyncio.wait(tasks | {ready}, timeout=READY_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        for task in done - {ready}:
            task.result()
        if ready not in done:
            raise DatabaseError(
                f"{describe(self.conninfo)}: LISTEN received nothing within {READY_TIMEOUT:g} s "
                "of its own NOTIFY; LISTEN needs a session connection to the primary (not a "
                "transaction-mode pooler such as PgBouncer)")


async def run(env: dict[str, str]) -> int:
    """Run the bridge configured by ``env`` (``load_environment()``) until SIGTERM or SIGINT;
    returns the exit code (0). Raises :class:`BridgeError` (the CLI reports it)."""
    from .schema import apply_schema, check_schema

    db = DatabaseSettings.from_env(env)
    ssh = SSHSettings.from_env(env)
    settings = DaemonSettings.from_env(env)
    if settings.demo is None:  # the demo page is on by default with the embedded database only
        settings = dataclasses.replace(settings, demo=db.embedded)
    secret = resolve_secret(settings, db)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bridge: Bridge | None = None

    def tunnel_reopened() -> None:
        if bridge is not None:
            bridge.listener.retry_now()

    async with database(db, ssh, supervised_tunnel=True,
                        on_tunnel_reopen=tunnel_reopened) as conninfo:
        demo: tuple[str, str] | None = None
        if db.embedded:
            await apply_schema(conninfo, schema=settings.schema)
            demo = await ensure_demo(conninfo, settings.schema)
        else:
            await check_schema(conninfo, schema=settings.schema)
        bridge = Bridge(conninfo, settings, secret,
                        watchdog=watchdog_interval(os.environ, os.getpid()))

        def ready(b: Bridge) -> None:
            systemd.notify(f"READY=1\nSTATUS=listening on {settings.host}:{b.port}")
            if demo is not None:  # stdout: a script takes the token from it; logs: stderr
                print(banner(settings, secret, port=b.port, conninfo=conninfo, user=demo[0],
                             room=demo[1]), flush=True)

        await bridge.serve(stop, on_ready=ready)
    systemd.notify("STOPPING=1")
    return 0
