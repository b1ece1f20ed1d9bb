"""The WebSocket server: :class:`Server` binds the port and owns the handler, the connections
(one :class:`daemon.client.Client` each) and the upgrades in progress (the handshake and the HTTP
endpoints are :mod:`daemon.handshake`). The composition root (:mod:`daemon.app`) builds the
collaborators and hands them to :class:`Server`; nothing here imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import websockets
from websockets.asyncio.server import ServerConnection

from .access import Access
from .acks import AckBuffer
from .auth import Claims
from .client import CLOSE_INTERNAL, CLOSE_OVERLOADED, CLOSE_POLICY, Client
from .errors import ConfigError
from .handshake import BridgeConnection, Gate, Health, connection_class, process_request
from .heartbeat import Heartbeat
from .hub import Hub
from .listener import Listener
from .metrics import Metrics
from .outbox import Flusher
from .presence_feed import PresenceFeed
from .presence_writer import PresenceWriter
from .ratelimit import ClientLimits
from .settings import DaemonSettings
from .store import Store

__all__ = ["Server"]


class Server:
    """The WebSocket server on ``PGBRIDGE_HOST:PGBRIDGE_PORT`` and its connections, with the
    collaborators a connection works with. ``verify_token`` checks a client's JWT (raises
    :class:`daemon.auth.AuthError`); ``port`` is the bound port once :meth:`start` returned
    (``PGBRIDGE_PORT=0`` picks a free one). :attr:`heartbeat` pings every connection every
    ``PGBRIDGE_HEARTBEAT`` seconds once its :meth:`~daemon.heartbeat.Heartbeat.run` task
    runs (:mod:`daemon.app` supervises it)."""

    def __init__(self, *, settings: DaemonSettings, metrics: Metrics, hub: Hub,
                 listener: Listener, store: Store, acks: AckBuffer, access: Access,
                 limits: ClientLimits, presence: PresenceWriter, presence_feed: PresenceFeed,
                 health: Health, verify_token: Callable[[str], Claims]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.hub = hub
        self.listener = listener
        self.store = store
        self.acks = acks
        self.access = access
        self.limits = limits
        self.presence = presence
        self.presence_feed = presence_feed
        self.verify_token = verify_token
        self.flusher = Flusher()
        self.heartbeat = Heartbeat(settings.heartbeat)
        self.clients: set[Client] = set()
        self.gate = Gate(settings=settings, metrics=metrics, limits=limits, health=health,
                         verify_token=verify_token, live_user=store.live_user,
                         connections=lambda: len(self.clients))
        self.port = 0
        self._server: websockets.Server | None = None

    async def start(self) -> None:
        """Bind and start accepting. Raises :class:`ConfigError` when the address cannot be
        bound (taken, or not an address of this host)."""
        settings = self.settings
        try:
            self._server = await websockets.serve(
                self._handler, settings.host, settings.port,
                process_request=lambda conn, req: process_request(self.gate, conn, req),
                max_size=settings.max_frame_bytes, compression=None,
                # one task pings every connection (self.heartbeat), not one task each
                ping_interval=None, ping_timeout=None,
                server_header="pgbridge", create_connection=connection_class(
                    self.metrics.handshake_refusals.labels("client_gone").inc,
                    lambda code: self.metrics.closes.labels(str(code)).inc()),
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: "
                              f"{exc.strerror or exc}; set PGBRIDGE_HOST/PGBRIDGE_PORT") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting and close every connection with 1001; wait up to ``timeout``
        seconds for them to be closed."""
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), timeout)

    async def _handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, BridgeConnection)  # serve(create_connection=BridgeConnection)
        upgrade = self.gate.handshakes.pop(ws, None)
        if upgrade is None:  # cannot happen: process_request accepted it
            await ws.close(CLOSE_INTERNAL, "internal error")
            return
        claims = upgrade.claims
        # process_request checked the limits before its awaits; concurrent upgrades may have
        # passed together, so check again where nothing can interleave.
        if self.limits.at_capacity():
            self.metrics.refusals.labels("overloaded").inc()
            await ws.close(CLOSE_OVERLOADED, "too many connections; retry later")
            return
        if self.limits.user_at_capacity(claims.sub):
            self.metrics.refusals.labels("too_many_connections").inc()
            await ws.close(CLOSE_POLICY, "too many connections for this user")
            return
        client = Client(self, ws, claims, batch=upgrade.batch)
        self.clients.add(client)
        self.heartbeat.add(ws)
        self.access.opened(client)
        self.limits.opened(claims.sub)
        self.presence.opened(claims.sub)
        self.metrics.connections.inc()
        try:
            await client.run()
        finally:
            self.clients.discard(client)
            self.heartbeat.remove(ws)
            self.access.closed(client)
            self.presence.closed(claims.sub)
            self.limits.closed(claims.sub)
            self.metrics.connections.dec()
