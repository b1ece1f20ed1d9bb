"""The WebSocket server: :class:`Server` binds the port, accepts TCP connections (one
:class:`daemon.connection.Connection` each, websockets' sans-I/O protocol driven by callbacks)
and owns the connections (one :class:`daemon.client.Client` each once upgraded) and the
upgrades in progress (the handshake and the HTTP endpoints are :mod:`daemon.handshake`). The
composition root (:mod:`daemon.app`) builds the collaborators and hands them to
:class:`Server`; nothing here imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from .access import Access
from .acks import AckBuffer
from .auth import Claims
from .client import Client
from .closes import Close
from .collaborators import Collaborators, Rooms
from .connection import Connection
from .errors import ConfigError
from .feed import Feeds
from .handshake import Gate, Health, process_request
from .heartbeat import Heartbeat
from .hub import Hub
from .metrics import Metrics
from .outbox import Flusher
from .presence_feed import PresenceFeed
from .presence_writer import PresenceWriter
from .ratelimit import ClientLimits
from .settings import DaemonSettings
from .store import Store

log = logging.getLogger("daemon.connection")  # lines about one connection: its layer's name

__all__ = ["Server"]

OPEN_TIMEOUT = 10.0  # s from the TCP connection to the end of the opening handshake
CLOSE_TIMEOUT = 10.0  # s for the peer to end the TCP connection once a close frame passed
WRITE_LIMIT = 32 * 1024  # bytes: a connection's write buffer high-water mark (websockets')


class Server:
    """The WebSocket server on ``PGBRIDGE_HOST:PGBRIDGE_PORT`` and its connections, with the
    collaborators a connection works with. ``verify_token`` checks a client's JWT (raises
    :class:`daemon.auth.AuthError`); ``port`` is the bound port once :meth:`start` returned
    (``PGBRIDGE_PORT=0`` picks a free one). :attr:`heartbeat` pings every connection every
    ``PGBRIDGE_HEARTBEAT`` seconds once its :meth:`~daemon.heartbeat.Heartbeat.run` task
    runs (:mod:`daemon.app` supervises it). It is the :class:`daemon.connection.Endpoint` of
    its connections: it answers their requests (:mod:`daemon.handshake`), makes a
    :class:`~daemon.client.Client` of each one upgraded, and forgets it when it ends."""

    def __init__(self, *, settings: DaemonSettings, metrics: Metrics, hub: Hub,
                 rooms: Rooms, store: Store, acks: AckBuffer, access: Access,
                 limits: ClientLimits, presence: PresenceWriter, presence_feed: PresenceFeed,
                 feeds: Feeds, health: Health, verify_token: Callable[[str], Claims]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.hub = hub
        self.store = store
        self.acks = acks
        self.access = access
        self.limits = limits
        self.presence = presence
        self.presence_feed = presence_feed
        self.verify_token = verify_token
        self.flusher = Flusher()
        # what each connection's Client works with, the same for all
        self._client_parts = Collaborators(
            settings=settings, metrics=metrics, hub=hub, rooms=rooms, store=store, acks=acks,
            limits=limits, presence_feed=presence_feed, feeds=feeds, flusher=self.flusher,
            verify_token=verify_token)
        self.heartbeat = Heartbeat(settings.heartbeat)
        self.clients: set[Client] = set()
        self.connections: set[Connection] = set()  # every TCP connection, upgraded or not
        self._all_closed: asyncio.Event | None = None  # set when connections empties
        self.gate = Gate(settings=settings, metrics=metrics, limits=limits, health=health,
                         verify_token=verify_token, live_user=store.live_user,
                         connections=lambda: len(self.clients))
        self.port = 0
        self._server: asyncio.Server | None = None

    # Endpoint (daemon.connection): what a connection asks of its server
    open_timeout = OPEN_TIMEOUT
    close_timeout = CLOSE_TIMEOUT
    write_limit = WRITE_LIMIT
    server_header = "pgbridge"

    async def start(self) -> None:
        """Bind and start accepting. Raises :class:`ConfigError` when the address cannot be
        bound (taken, or not an address of this host)."""
        settings = self.settings
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self._accepted, settings.host, settings.port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: "
                              f"{exc.strerror or exc}; set PGBRIDGE_HOST/PGBRIDGE_PORT") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting; close every open connection with 1001 (an upgrade still waiting is
        answered 503); wait up to ``timeout`` seconds for the connections to end."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.shutdown(Close.GOING_AWAY)
        if self.connections:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.transport.abort()  # connection_lost() follows: closing(), closed()

    def _accepted(self) -> Connection:
        conn = Connection(self)
        self.connections.add(conn)
        return conn

    # --- Endpoint ---------------------------------------------------------------------------

    def new_protocol(self, state: State) -> ServerProtocol:
        # a message over 64 KiB (PROTOCOL.md) is closed with 1009
        return ServerProtocol(state=state, max_size=self.settings.max_frame_bytes)

    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def process_request(self, conn: Connection, request: Request) -> Awaitable[Response | None]:
        return process_request(self.gate, conn, request)

    def abandoned(self, conn: Connection, reason: str) -> None:
        self.gate.handshakes.pop(conn, None)
        self.metrics.handshake_refusals.labels(reason).inc()

    def opened(self, conn: Connection) -> None:
        upgrade = self.gate.handshakes.pop(conn, None)
        if upgrade is None:  # cannot happen: process_request accepted it
            conn.close(Close.INTERNAL, "internal error")
            return
        claims = upgrade.claims
        # process_request checked the limits before its awaits; concurrent upgrades may have
        # passed together, so check again where nothing can interleave.
        if self.limits.at_capacity():
            self.metrics.refusals.labels("overloaded").inc()
            conn.close(Close.OVERLOADED, "too many connections; retry later")
            return
        if self.limits.user_at_capacity(claims.sub):
            self.metrics.refusals.labels("too_many_connections").inc()
            conn.close(Close.POLICY, "too many connections for this user")
            return
        client = Client(self._client_parts, conn, claims, batch=upgrade.batch)
        conn.receiver = client
        self.clients.add(client)
        self.heartbeat.add(conn)
        self.access.opened(client)
        self.limits.opened(claims.sub)
        self.presence.opened(claims.sub)
        self.metrics.connections.inc()
        log.debug("connection %s of user %s open", conn.id, claims.sub,
                  extra={"event": "connection_open", "user": claims.sub,
                         "correlation_id": conn.correlation_id})
        client.start()

    def closing(self, conn: Connection) -> None:
        # at once, not when the peer is done reading: nothing shared calls into it any more
        client = conn.receiver
        if isinstance(client, Client) and client in self.clients:
            client.lost()
            self.clients.discard(client)
            self.heartbeat.remove(conn)
            self.access.closed(client)
            self.presence.closed(client.user)
            self.limits.closed(client.user)
            self.metrics.connections.dec()

    def closed(self, conn: Connection, code_sent: int | None) -> None:
        self.connections.discard(conn)
        if code_sent is not None:
            self.metrics.closes.labels(str(code_sent)).inc()
        if log.isEnabledFor(logging.DEBUG):
            client = conn.receiver
            log.debug("connection %s closed (%s)", conn.id,
                      f"this side sent {code_sent}" if code_sent is not None else
                      "no close frame sent first by this side",
                      extra={"event": "connection_closed", "code": code_sent,
                             "user": client.user if isinstance(client, Client) else None,
                             "correlation_id": conn.correlation_id})
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()
