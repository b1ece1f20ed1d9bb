"""Everything before the WebSocket upgrade: HTTP parsing answers, routing, the authenticated
handshake, health.

* :func:`process_request` answers a method other than GET with 405, then routes
  ``/healthz``, ``/metrics`` and ``/ws`` through a :class:`Gate`, which holds what the
  handshake needs (given explicitly by :mod:`daemon.server`); for ``/ws`` it checks the request
  target, the ``Origin`` (:mod:`daemon.origins`), the connection limits and the JWT, and
  answers every refusal with a 4xx (or 503 when the database cannot be asked), never a 500 for
  what the client sent (PROTOCOL.md, "HTTP answers before the upgrade"). A request that cannot
  be parsed is answered by :mod:`daemon.connection`.
* :class:`Health` answers ``/healthz`` within a bound whatever the database does.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from . import logs
from .auth import AuthError, Claims
from .errors import BridgeError
from .logs import Throttled
from .origins import origin_allowed
from .outbox import MAX_BATCH_MS
from .web import asset_for

if TYPE_CHECKING:
    from .connection import Connection
    from .listener import Listener
    from .metrics import Metrics
    from .ratelimit import ClientLimits
    from .settings import DaemonSettings
    from .store import Store

log = logging.getLogger(__name__)
_refusals = Throttled(log)  # a flood of refusals is counted in metrics, not logged line by line

__all__ = ["Gate", "Health", "Upgrade", "process_request"]

HANDSHAKES_PER_TURN = 4  # upgrades checked per turn of the event loop (Gate.turns)


def _response(status: HTTPStatus, body: bytes, content_type: str,
              extra: tuple[tuple[str, str], ...] = (), *, cache: str = "no-store") -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", cache), *extra])
    return Response(status.value, status.phrase, headers, body)


def _json(status: HTTPStatus, obj: dict[str, object],
          extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return _response(status, json.dumps(obj).encode(), "application/json", extra)


class _BadTarget(Exception):
    pass


def _target(request: Request) -> tuple[str, dict[str, list[str]]]:
    """Path and query of the request target. A target with a control character (websockets
    17 refuses a non-ASCII one itself, but passes those; RFC 3986 has none), one that is not
    a URL path, or a query that is not UTF-8 is refused."""
    if not (request.path.isascii() and request.path.isprintable()):
        raise _BadTarget("the request target must be printable ASCII (percent-encode other "
                         "bytes)")
    try:
        parts = urlsplit(request.path)
    except ValueError:  # a bracket that opens no IPv6 host ("//[", "http://[x]/")
        raise _BadTarget("the request target is not a valid URL path") from None
    try:
        query = parse_qs(parts.query, errors="strict", max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise _BadTarget("the query string must be UTF-8 with at most 32 fields") from None
    return parts.path, query


def _batch_of(query: dict[str, list[str]]) -> int | None:
    """The coalescing wait asked with ``?batch=MS`` (PROTOCOL.md, "Coalesced messages"): an
    integer of milliseconds, 0 to :data:`daemon.outbox.MAX_BATCH_MS`, given at most once."""
    values = query.get("batch", [])
    if not values:
        return None
    text = values[0]
    if len(values) > 1 or not (text.isascii() and text.isdigit()) or len(text) > 4 \
            or int(text) > MAX_BATCH_MS:
        raise _BadTarget(f"batch must be given once, as whole milliseconds from 0 to "
                         f"{MAX_BATCH_MS}")
    return int(text)


def _token_of(request: Request, query: dict[str, list[str]]) -> str | None:
    """The token of ``?token=`` (which wins) or of the ``Authorization: Bearer`` header; a
    token given twice the same way is refused (which one would be meant?)."""
    tokens = query.get("token", [])
    headers = request.headers.get_all("Authorization")
    if len(tokens) > 1 or len(headers) > 1:
        raise _BadTarget("give the token once: one ?token= or one Authorization header")
    if tokens:
        return tokens[0]
    scheme, _, value = (headers[0] if headers else "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Health:
    """``/healthz``: database and listener state, answered within ``timeout`` seconds.

    Concurrent probes share one database round trip, and a result is reused for ``ttl``
    seconds, so a flood of probes costs the pool at most one connection at a time. The round
    trip is awaited, never cancelled: psycopg waits for a cancelled query to end, which on a
    black-holed link is never, so the answer is bounded by not waiting longer than
    ``timeout``. A round trip still running after ``stale`` seconds is left to finish on its
    own and a new one is started.
    """

    def __init__(self, store: Store, listener: Listener, *, timeout: float = 0.8,
                 ttl: float = 0.5, stale: float = 5.0,
                 events: Callable[[], str | None] | None = None) -> None:
        self.store = store
        self.listener = listener
        self.events = events  # with a broker: why events may not flow (daemon.broker)
        self.timeout = timeout
        self.ttl = ttl
        self.stale = stale
        self._probe: asyncio.Task[str | None] | None = None
        self._probe_started = 0.0
        self._abandoned: set[asyncio.Task[str | None]] = set()
        self._result: tuple[float, str | None] | None = None
        self._last_reason: str | None = None

    def _current_probe(self, now: float) -> asyncio.Task[str | None]:
        probe = self._probe
        if probe is not None and not probe.done() and now - self._probe_started > self.stale:
            self._abandoned.add(probe)
            probe.add_done_callback(self._abandoned.discard)
            probe = None
        if probe is None or probe.done():
            # shared by the requests that come meanwhile: none of this one's context (its
            # connection's correlation id): its lines are daemon-wide
            probe = self._probe = asyncio.create_task(self.store.ping(self.stale),
                                                      name="health-probe",
                                                      context=contextvars.Context())
            self._probe_started = now
        return probe

    async def _database(self) -> str | None:
        now = time.monotonic()
        if self._result is not None and now - self._result[0] < self.ttl:
            return self._result[1]
        probe = self._current_probe(now)
        done, _ = await asyncio.wait({probe}, timeout=self.timeout)
        reason = probe.result() if done else f"no answer within {self.timeout:g} s"
        self._result = (time.monotonic(), reason)
        if reason != self._last_reason:
            # daemon-wide, whichever request noticed the change
            log.warning("health: database %s", reason or "answers again",
                        extra={"event": "health", "correlation_id": None})
            self._last_reason = reason
        return reason

    def _listener(self) -> str | None:
        if self.events is not None:
            return self.events()
        if not self.listener.connected:
            return "not connected"
        if not self.listener.ready.is_set():
            return "LISTEN not yet proven by a NOTIFY round trip"
        return None

    async def check(self) -> dict[str, str | None]:
        """Why each part is unavailable (``database``, ``listener``); ``None`` where healthy."""
        return {"database": await self._database(), "listener": self._listener()}


@dataclass(frozen=True, slots=True)
class Upgrade:
    """An upgrade :func:`process_request` accepted: the token's claims and the coalescing wait
    the client asked for (``?batch=`` ms; ``None``: one frame per message)."""

    claims: Claims
    batch: int | None = None


class Gate:
    """What the answers before the upgrade need, and the upgrades in progress.

    ``verify_token`` checks a JWT (raises :class:`daemon.auth.AuthError`), ``live_user`` asks
    the database whether a ``users.id`` is live (raises :class:`BridgeError`), ``connections``
    counts the open WebSocket connections (for ``/healthz``). ``handshakes`` holds the upgrades
    accepted by :func:`process_request` until their handler takes them.
    """

    def __init__(self, *, settings: DaemonSettings, metrics: Metrics, limits: ClientLimits,
                 health: Health, verify_token: Callable[[str], Claims],
                 live_user: Callable[[str], Awaitable[bool]],
                 connections: Callable[[], int]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limits = limits
        self.health = health
        self.verify_token = verify_token
        self.live_user = live_user
        self.connections = connections
        self.handshakes: weakref.WeakKeyDictionary[Connection, Upgrade] = (
            weakref.WeakKeyDictionary())
        self.turns = asyncio.Semaphore(HANDSHAKES_PER_TURN)


async def _healthz(gate: Gate) -> Response:
    problems = await gate.health.check()
    reasons = [f"{part}: {why}" for part, why in problems.items() if why is not None]
    return _json(HTTPStatus.SERVICE_UNAVAILABLE if reasons else HTTPStatus.OK, {
        "status": "unavailable" if reasons else "ok", "reasons": reasons,
        **{part: why is None for part, why in problems.items()},
        "connections": gate.connections()})


async def process_request(gate: Gate, connection: Connection,
                          request: Request) -> Response | None:
    """HTTP routing and the authenticated handshake; ``None`` lets the upgrade proceed.

    An unexpected exception is answered 500 with an incident id that is also logged (a bug of
    the bridge, never a consequence of what the client sent).
    """
    try:
        response = await _route(gate, connection, request)
    except Exception:
        gate.handshakes.pop(connection, None)
        incident = logs.incident(log, "handshake_crashed", "handshake from %s failed",
                                 connection.remote_address)
        return _json(HTTPStatus.INTERNAL_SERVER_ERROR,
                     {"error": "internal", "message": f"internal error (incident {incident})"})
    if response is not None:  # refused: give back the slot it may have held
        gate.handshakes.pop(connection, None)
    return response


async def _route(gate: Gate, connection: Connection,
                 request: Request) -> Response | None:
    if request.method != "GET":  # websockets parses any method since 17; we serve GET only
        return _json(HTTPStatus.METHOD_NOT_ALLOWED,
                     {"error": "method_not_allowed", "message": "only GET is served"},
                     (("Allow", "GET"),))
    try:
        path, query = _target(request)
    except _BadTarget as exc:
        return _json(HTTPStatus.BAD_REQUEST, {"error": "bad_request", "message": str(exc)})
    if path == "/healthz":
        return await _healthz(gate)
    if path == "/metrics":
        return _response(HTTPStatus.OK, gate.metrics.render(),
                         "text/plain; version=0.0.4; charset=utf-8")
    if path != "/ws":
        asset = asset_for(path, demo=gate.settings.demo is True)
        if asset is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": "not found; the WebSocket is at /ws"})
        # several lines of a list header are one comma-separated list (RFC 9110, 5.3)
        tags = ", ".join(request.headers.get_all("If-None-Match"))
        status = HTTPStatus.NOT_MODIFIED if asset.fresh(tags) else HTTPStatus.OK
        return _response(status, asset.body if status is HTTPStatus.OK else b"",
                         asset.content_type, asset.headers(), cache="no-cache")
    async with gate.turns:
        # A flood of upgrades becomes ready all at once; asyncio would run every one of them
        # before it looks at a socket again, the listener's included. Through the gate, a few
        # per turn of the loop do their CPU work (JWT, limits), and the loop polls in between.
        await asyncio.sleep(0)
        admitted = _admit(gate, connection, request, query)
    if isinstance(admitted, Response):
        return admitted
    try:
        if not await gate.live_user(admitted.claims.sub):
            return _unauthorized(gate, connection,
                                 AuthError("the token's user does not exist or is deleted"))
    except BridgeError as exc:
        _refusals.info("database", "could not check a token's user: %s", exc,
                       extra={"event": "handshake_error"})
        return _refuse(gate, HTTPStatus.SERVICE_UNAVAILABLE, "unavailable",
                       "the database cannot be reached to check the token's user; retry later",
                       retry_after=5)
    return None


def _admit(gate: Gate, connection: Connection, request: Request,
           query: dict[str, list[str]]) -> Response | Upgrade:
    """The checks of an upgrade that need no database: limits, the token and ``batch``.
    Returns the refusal, or the upgrade with a slot held for the user in ``gate.handshakes``."""
    origins, hosts = request.headers.get_all("Origin"), request.headers.get_all("Host")
    if len(origins) > 1 or len(hosts) > 1:
        return _json(HTTPStatus.BAD_REQUEST, {"error": "bad_request",
                                              "message": "Origin and Host may be given once"})
    origin = origins[0] if origins else None
    if not origin_allowed(origin, hosts[0] if hosts else None,
                          gate.settings.allowed_origins, public=gate.settings.public_origins):
        return _refuse(gate, HTTPStatus.FORBIDDEN, "forbidden_origin",
                       f"origin {(origin or '')[:100]!r} may not connect: it is not this "
                       "bridge's own origin (PGBRIDGE_PUBLIC_ORIGIN, or a loopback or IP "
                       "address) nor in PGBRIDGE_ALLOWED_ORIGINS")
    limits = gate.limits
    if limits.at_capacity(pending=len(gate.handshakes)):
        return _refuse(gate, HTTPStatus.SERVICE_UNAVAILABLE, "overloaded",
                       f"the bridge serves at most {limits.max_connections} connections; "
                       "retry later", retry_after=5)
    try:
        token = _token_of(request, query)
        batch = _batch_of(query)
    except _BadTarget as exc:
        return _json(HTTPStatus.BAD_REQUEST, {"error": "bad_request", "message": str(exc)})
    try:
        if token is None:
            raise AuthError("missing token (?token=... or Authorization: Bearer ...)")
        claims = gate.verify_token(token)
    except AuthError as exc:
        return _unauthorized(gate, connection, exc)
    pending = sum(1 for u in gate.handshakes.values() if u.claims.sub == claims.sub)
    if limits.user_at_capacity(claims.sub, pending=pending):
        return _refuse(gate, HTTPStatus.TOO_MANY_REQUESTS, "too_many_connections",
                       f"at most {limits.max_per_user} connections per user", retry_after=5)
    # Hold the slot while the database answers, so that concurrent upgrades of one user are
    # counted here and not only after the upgrade (where they cost a close).
    upgrade = gate.handshakes[connection] = Upgrade(claims, batch)
    return upgrade


def _unauthorized(gate: Gate, connection: Connection, exc: AuthError) -> Response:
    gate.metrics.handshake_refusals.labels("unauthorized").inc()
    _refusals.info("unauthorized", "handshake refused from %s: %s", connection.remote_address,
                   exc, extra={"event": "handshake_refused"})
    return _json(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized", "message": str(exc)})


def _refuse(gate: Gate, status: HTTPStatus, code: str, message: str, *,
            retry_after: int | None = None) -> Response:
    gate.metrics.handshake_refusals.labels(code).inc()
    _refusals.info(code, "handshake refused: %s", message,
                   extra={"event": "handshake_refused", "reason": code})
    return _json(status, {"error": code, "message": message},
                 (("Retry-After", str(retry_after)),) if retry_after is not None else ())
