"""The WebSocket side (websockets, asyncio): handshake and HTTP endpoints, and one
:class:`Client` per connection.

* ``GET /ws`` upgrades after the JWT is checked (``?token=`` or ``Authorization: Bearer``);
  anything wrong with it, or a ``sub`` that is no live user, is answered 401 with no upgrade.
* ``GET /healthz``: 200 when the listener is live and the database answers, else 503 (JSON).
* ``GET /metrics``: Prometheus text format.

The fan-out never waits for a client: a frame is written to the socket at once while the
client keeps up (its socket buffer below the high-water mark and nothing queued); otherwise it
joins the client's bounded queue (``PGBRIDGE_QUEUE_SIZE`` frames), which the client's writer task
drains at the pace of the socket. A client whose queue overflows is closed with 4008 and resumes
with ``since``. One slow client never delays the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .auth import AuthError, Claims, verify_token
from .cursor import resolve_from
from .errors import BridgeError
from .hub import Subscription
from .protocol import (
    Ack,
    Ping,
    ProtocolError,
    Refresh,
    Subscribe,
    Unsubscribe,
    parse_frame,
    pong,
    subscribed,
    welcome,
)
from .ratelimit import TokenBucket
from .store import READ_PAGE

if TYPE_CHECKING:
    from .app import Bridge

log = logging.getLogger(__name__)

__all__ = ["Client", "process_request"]

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOO_SLOW = 4008


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, body)


def _json(status: HTTPStatus, obj: dict[str, object]) -> Response:
    return _response(status, json.dumps(obj).encode(), "application/json")


def _token_of(request: Request) -> str | None:
    query = parse_qs(urlsplit(request.path).query)
    if query.get("token"):
        return query["token"][0]
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def process_request(bridge: Bridge, connection: ServerConnection,
                          request: Request) -> Response | None:
    """HTTP routing and the authenticated handshake; ``None`` lets the upgrade proceed."""
    path = urlsplit(request.path).path
    if path == "/healthz":
        database = await bridge.store.ping()
        listener = bridge.listener.connected and bridge.listener.ready.is_set()
        ok = database and listener
        return _json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, {
            "status": "ok" if ok else "unavailable", "database": database, "listener": listener,
            "connections": len(bridge.clients)})
    if path == "/metrics":
        return _response(HTTPStatus.OK, bridge.metrics.render(),
                         "text/plain; version=0.0.4; charset=utf-8")
    if path != "/ws":
        return _json(HTTPStatus.NOT_FOUND, {"error": "not found; the WebSocket is at /ws"})
    token = _token_of(request)
    try:
        if token is None:
            raise AuthError("missing token (?token=... or Authorization: Bearer ...)")
        claims = verify_token(bridge.secret, token)
        if not await bridge.store.live_user(claims.sub):
            raise AuthError("the token's user does not exist or is deleted")
    except AuthError as exc:
        bridge.metrics.handshake_refusals.inc()
        log.info("handshake refused from %s: %s", connection.remote_address, exc,
                 extra={"event": "handshake_refused"})
        return _json(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized", "message": str(exc)})
    except BridgeError as exc:
        log.error("handshake failed: %s", exc, extra={"event": "handshake_error"})
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "unavailable"})
    bridge.handshakes[connection] = claims
    return None


class Client:
    """One WebSocket connection: parses its frames, owns its subscriptions and its outgoing
    queue. Implements :class:`daemon.hub.Sink`."""

    def __init__(self, bridge: Bridge, ws: ServerConnection, claims: Claims) -> None:
        self.bridge = bridge
        self.ws = ws
        self.user = claims.sub
        self.subs: dict[str, Subscription] = {}
        self._queue: deque[bytes | str] = deque()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._closing = False
        self._writing = False  # the writer task is draining the queue
        self._limit = bridge.settings.queue_size
        self._bucket = TokenBucket(bridge.settings.rate_limit, bridge.settings.rate_burst)
        self._violations = 0
        self._writer: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._set_expiry(claims.exp)

    # --- Sink -------------------------------------------------------------------------------

    def send(self, frame: bytes | str) -> None:
        if self._closing:
            return
        if not self._queue and not self._writing and self._socket_has_room():
            # Fast path: nothing is waiting and the socket's buffer is below its high-water
            # mark, so write now (websockets' broadcast() writes without waiting for a drain).
            broadcast((self.ws,), frame, text=True)
            return
        if len(self._queue) >= self._limit:
            self.overflow()
            return
        self._queue.append(frame)
        self._wakeup.set()

    def _socket_has_room(self) -> bool:
        transport = self.ws.transport
        return transport.get_write_buffer_size() < transport.get_write_buffer_limits()[1]

    def overflow(self) -> None:
        if self._closing:
            return
        self.bridge.metrics.slow_closes.inc()
        log.warning("client %s of user %s fell %d frames behind; closing with 4008",
                    self.ws.id, self.user, len(self._queue), extra={"event": "slow_client"})
        self._close_soon(CLOSE_TOO_SLOW, "too slow: outgoing queue overflowed")

    def subscription_ended(self, sub: Subscription) -> None:
        if self.subs.get(sub.room) is sub:
            del self.subs[sub.room]
            self.bridge.metrics.subscriptions.dec()

    # --- life -------------------------------------------------------------------------------

    async def run(self) -> None:
        self._writer = asyncio.create_task(self._write_forever(), name=f"writer-{self.ws.id}")
        self.send(welcome(self.user, self.bridge.settings.heartbeat))
        try:
            async for message in self.ws:
                if self._closing:
                    break
                await self._handle(message)
        except ConnectionClosed:
            pass
        finally:
            self._closing = True
            for sub in self.subs.values():
                self.bridge.hub.remove(sub)
            self.bridge.metrics.subscriptions.dec(len(self.subs))
            self.subs.clear()
            if self._expiry is not None:
                self._expiry.cancel()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def _write_forever(self) -> None:
        ws = self.ws
        try:
            while True:
                if not self._queue:
                    self._writing = False
                    self._drained.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._writing = True
                self._drained.clear()
                frame = self._queue.popleft()
                await ws.send(frame, text=True)  # waits while the socket's buffer is full
        except ConnectionClosed:
            self._closing = True

    def _close_soon(self, code: int, reason: str) -> None:
        self._closing = True
        self._queue.clear()
        if self._writer is not None:
            self._writer.cancel()
        for sub in self.subs.values():
            self.bridge.hub.remove(sub)
        asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    def _set_expiry(self, exp: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, exp - time.time())
        self._expiry = loop.call_later(delay, self._close_soon, CLOSE_TOKEN_EXPIRED,
                                       "token expired")

    async def _room_for(self, frames: int) -> None:
        """Wait until ``frames`` more fit in the queue (replay paces itself, never overflows)."""
        while not self._closing and self._queue and len(self._queue) + frames > self._limit:
            self._drained.clear()
            await self._drained.wait()

    # --- requests ---------------------------------------------------------------------------

    async def _handle(self, message: str | bytes) -> None:
        if not self._bucket.take():
            self._violations += 1
            if self._violations > 10 * self.bridge.settings.rate_burst:
                self._close_soon(CLOSE_POLICY, "rate limit exceeded repeatedly")
                return
            self.send(ProtocolError("rate_limited", "too many frames; slow down").frame())
            return
        try:
            request = parse_frame(message)
            if isinstance(request, Subscribe):
                await self._subscribe(request)
            elif isinstance(request, Unsubscribe):
                self._unsubscribe(request)
            elif isinstance(request, Ack):
                self._ack(request)
            elif isinstance(request, Ping):
                self.send(pong(request.ref))
            elif isinstance(request, Refresh):
                self._refresh(request)
        except ProtocolError as exc:
            self.send(exc.frame())
        except BridgeError as exc:
            log.error("request of user %s failed: %s", self.user, exc,
                      extra={"event": "request_failed"})
            self.send(ProtocolError("internal", "temporary failure; retry").frame())

    async def _subscribe(self, request: Subscribe) -> None:
        room, ref = request.room, request.ref
        if room in self.subs:
            raise ProtocolError("bad_request", "already subscribed to this room", ref=ref,
                                room=room)
        if len(self.subs) >= self.bridge.settings.max_subscriptions:
            raise ProtocolError("rate_limited", f"at most {self.bridge.settings.max_subscriptions} "
                                "subscriptions per connection", ref=ref, room=room)
        sub = Subscription(self, room, pending_limit=self._limit)
        self.subs[room] = sub
        self.bridge.metrics.subscriptions.inc()
        try:
            live_from = await self.bridge.listener.add(sub)
            info = await self.bridge.store.cursor_info(self.user, room)
            if info.status == "not_found":
                raise ProtocolError("not_found", "no such room", ref=ref, room=room)
            if info.status != "ok":
                raise ProtocolError("forbidden", "not a member of this room, or the room or user "
                                    "is deleted", ref=ref, room=room)
            sub.from_seq = resolve_from(room=room, since=request.since, acked=info.acked,
                                        head=info.head, retained_from=info.retained_from, ref=ref)
        except BaseException:
            self._drop(sub)
            raise
        self.send(subscribed(room, sub.from_seq, max(info.head, live_from), ref))
        after = sub.from_seq
        while after < live_from and not sub.ended and not self._closing:
            await self._room_for(READ_PAGE)
            events = await self.bridge.store.read_events(room, after=after, upto=live_from)
            if not events:
                break
            for event in events:
                sub.replay(event)
            after = events[-1].seq
        if not self._closing:
            sub.go_live()

    def _drop(self, sub: Subscription) -> None:
        self.bridge.hub.remove(sub)
        self.subscription_ended(sub)

    def _unsubscribe(self, request: Unsubscribe) -> None:
        sub = self.subs.get(request.room)
        if sub is None:
            raise ProtocolError("not_found", "not subscribed to this room", ref=request.ref,
                                room=request.room)
        self._drop(sub)
        sub.end("client", request.ref)

    def _ack(self, request: Ack) -> None:
        sub = self.subs.get(request.room)
        if sub is None:
            raise ProtocolError("bad_request", "ack for a room you are not subscribed to",
                                ref=request.ref, room=request.room)
        if request.seq > sub.cursor:
            raise ProtocolError("bad_request", f"seq {request.seq} was not delivered yet "
                                f"(latest: {sub.cursor})", ref=request.ref, room=request.room)
        self.bridge.acks.record(self.user, request.room, request.seq)

    def _refresh(self, request: Refresh) -> None:
        try:
            claims = verify_token(self.bridge.secret, request.token)
        except AuthError as exc:
            raise ProtocolError("unauthorized", str(exc), ref=request.ref) from None
        if claims.sub != self.user:
            raise ProtocolError("unauthorized", "a refreshed token must be for the same user",
                                ref=request.ref)
        self._set_expiry(claims.exp)
