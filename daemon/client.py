"""One WebSocket connection after the upgrade: :class:`Client` parses its frames, owns its
subscriptions and its outgoing queue. What it works with comes from its :class:`Services` (the
:class:`daemon.server.Server` that accepted it), named there explicitly.

The fan-out never waits for a client: a frame is written to the socket at once while the
client keeps up (its socket buffer below the high-water mark and nothing queued); otherwise it
joins the client's bounded queue (``PGBRIDGE_QUEUE_SIZE`` frames), which the client's writer task
drains at the pace of the socket. A client is closed with 4008 (it resumes with ``since``) when
its queue overflows, or when its socket accepts nothing for ``PGBRIDGE_SEND_TIMEOUT`` seconds
while frames wait; its kernel send buffer is ``PGBRIDGE_SEND_BUFFER`` bytes, so a client that
stops reading is noticed after that much, not after the megabytes an auto-tuned buffer holds.
One slow client never delays the others. A client that asked for coalesced messages
(``?batch=MS``, PROTOCOL.md) has its frames wait in the queue up to MS ms and leave together,
one message per write (:mod:`daemon.outbox`); its writer task, like the queue itself, exists
only while frames wait.

Frames arrive from :class:`daemon.connection.Connection`, one read at a time
(:meth:`Client.received`): the first is answered at once when it needs no database, the rest
one per turn of the event loop by a task that exists only while frames wait, so that a flood
on one connection never holds the others. Each frame is handled inside a fault boundary:
whatever it causes ends at most that request (an ``error`` frame with its ``ref`` and
``room``; an unexpected exception is logged once with an incident id, never with the client's
bytes). Limits (PROTOCOL.md, "Limits") are applied before any work: frames and WebSocket
pings share one token bucket per connection; subscribe and refresh attempts take from the
connection's and the user's bucket before the database is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from . import logs
from .acks import AckBuffer
from .auth import AuthError, Claims
from .closes import Close
from .connection import Connection, contained
from .cursor import resolve_from
from .errors import BridgeError
from .events import capture_time
from .hub import Hub, Subscription
from .listener import Listener
from .metrics import Metrics
from .outbox import Flusher, take_frames, wire_message
from .presence_feed import PresenceFeed
from .protocol import (
    Ack,
    Ping,
    ProtocolError,
    Refresh,
    Request,
    Subscribe,
    Typing,
    Unsubscribe,
    error,
    parse_frame,
    pong,
    subscribed,
    welcome,
)
from .ratelimit import ClientLimits, TokenBucket
from .sequencer import Hole, take_page
from .settings import DaemonSettings
from .store import READ_PAGE, Store

log = logging.getLogger(__name__)

__all__ = ["Client", "Services"]


INBOX_HIGH = 16  # frames waiting for a request's answer before the connection stops reading
INBOX_LOW = 4  # ... and after which it reads again (websockets' max_queue, 16 and 4)


class Services(Protocol):
    """What a connection works with (:class:`daemon.server.Server` provides them)."""

    settings: DaemonSettings
    metrics: Metrics
    hub: Hub
    listener: Listener
    store: Store
    acks: AckBuffer
    limits: ClientLimits
    presence_feed: PresenceFeed
    flusher: Flusher
    verify_token: Callable[[str], Claims]


_NO_FRAMES: deque[bytes | str] = deque(maxlen=0)  # the queue of every client with none waiting


class Client:
    """One WebSocket connection: parses its frames, owns its subscriptions and its outgoing
    queue. Implements :class:`daemon.hub.Sink` and :class:`daemon.access.Session`."""

    __slots__ = ("__weakref__", "_batch", "_batch_ms", "_bucket", "_closing", "_drained",
                 "_expiry", "_high_water", "_inbox", "_limit", "_marked", "_page", "_queue",
                 "_requests", "_send_timeout", "_strikes", "_subscribe_bucket", "_writer",
                 "_writing", "server", "subs", "user", "ws")

    def __init__(self, server: Services, ws: Connection, claims: Claims, *,
                 batch: int | None = None) -> None:
        self.server = server
        self.ws = ws
        self.user = claims.sub
        self.subs: dict[str, Subscription] = {}
        # An idle connection holds no queue of its own (an empty deque is 760 bytes) and no
        # event: both are made when frames first wait (README, "Fan-out cost").
        self._queue: deque[bytes | str] = _NO_FRAMES
        self._drained: asyncio.Event | None = None  # set when the queue was emptied
        self._closing = False
        self._writing = False  # a writer task is draining the queue
        # ?batch=MS (PROTOCOL.md, "Coalesced messages"): frames wait up to MS ms in the queue
        # and leave together; None: one frame per message
        self._batch_ms = batch
        self._batch = None if batch is None else batch / 1000
        self._marked = False  # waiting for the flusher
        self._limit = server.settings.queue_size
        # replay and snapshots go out in pages that leave half the queue to live frames: a page
        # larger than the queue would close a client that is only catching up with 4008
        self._page = max(1, min(READ_PAGE, self._limit // 2))
        settings = server.settings
        self._send_timeout = settings.send_timeout
        # what the connection's drain() waits below (its write_limit); fixed for its life
        self._high_water = ws.transport.get_write_buffer_limits()[1]
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:  # a fixed size also turns the kernel's auto-tuning off
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer)
        self._bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
        self._subscribe_bucket = TokenBucket(settings.subscribe_rate, settings.subscribe_burst)
        # refused frames tolerated: a burst of rate_burst, then one a second; past that, 1008
        self._strikes = TokenBucket(1.0, settings.rate_burst)
        self._writer: asyncio.Task[None] | None = None
        # the frames received while a request waits for the database, and the task that
        # answers them in order; both exist only then
        self._inbox: deque[str | bytes] | None = None
        self._requests: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._set_expiry(claims.exp)

    # --- Sink -------------------------------------------------------------------------------
    # What the hub, the listener, presence, the flusher and access checks (code shared by all
    # connections) call here goes through the connection's fault boundary (contained): a bug
    # met in one client ends that client with 1011, never the caller.

    @contained("sending a frame")
    def send(self, frame: bytes | str) -> None:
        if self._closing:
            return
        if not self._batch and not self._queue and not self._writing and not self._marked \
                and self._socket_has_room():
            # Fast path: nothing is waiting and the socket's buffer is below its high-water
            # mark, so write now, bytes encoded once for every subscriber of the room. With
            # ?batch=0, the frames that follow in this turn of the loop (the rest of a burst)
            # wait for its end, to leave together.
            self._write_now(wire_message((frame,)))
            if self._batch is not None:
                self._marked = True
                self.server.flusher.mark(self, 0)
            return
        if len(self._queue) >= self._limit:
            self.overflow(f"its outgoing queue is full ({len(self._queue)} frames)")
            return
        if self._queue is _NO_FRAMES:
            self._queue = deque()
        self._queue.append(frame)
        if self._writing:
            return  # the writer task sends it after what is before it
        if self._batch is None:
            self._start_writer()
        elif len(self._queue) >= self._page:
            # half the queue waits: send now rather than close a client that reads, only
            # because its wait (?batch=) holds more frames than PGBRIDGE_QUEUE_SIZE
            self.flush()
        elif not self._marked:
            self._marked = True
            self.server.flusher.mark(self, self._batch)

    @contained("flushing coalesced frames")
    def flush(self) -> None:
        """Coalescing (``?batch=``): send what is queued as one message now that the wait is
        over, if the socket has room; the writer task sends the rest."""
        self._marked = False
        if self._closing or self._writing or not self._queue:
            return
        if self._socket_has_room():
            self._write_now(wire_message(take_frames(self._queue)))
        if self._queue:
            self._start_writer()
        else:
            self._emptied()

    def _write_now(self, wire: bytes) -> None:
        """Write an encoded frame (:mod:`daemon.outbox`) to the socket without waiting; skipped
        once the closing handshake started."""
        self.ws.write(wire)

    def _socket_has_room(self) -> bool:
        return self.ws.transport.get_write_buffer_size() < self._high_water

    @contained("closing a slow client")
    def overflow(self, why: str) -> None:
        if self._closing:
            return
        self.server.metrics.slow_closes.inc()
        log.warning("client %s of user %s is too slow: %s; closing with 4008", self.ws.id,
                    self.user, why, extra={"event": "slow_client"})
        self._close_soon(Close.TOO_SLOW, "too slow: outgoing queue overflowed")

    @contained("ending a subscription")
    def subscription_ended(self, sub: Subscription) -> None:
        if self.subs.get(sub.room) is sub:
            del self.subs[sub.room]
            self.server.metrics.subscriptions.dec()

    # --- Session ----------------------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        return list(self.subs.values())

    @contained("closing for a deleted user")
    def user_gone(self) -> None:
        if not self._closing:
            self._close_soon(Close.USER_GONE, "user deleted")

    @contained("revoking a subscription")
    def revoke(self, sub: Subscription, reason: str) -> None:
        if self.subs.get(sub.room) is sub and not sub.ended:
            sub.end(reason)
            self._drop(sub)

    @contained("closing for a failed access check")
    def retry_later(self) -> None:
        if not self._closing:
            self._close_soon(Close.OVERLOADED, "access could not be checked; retry later")

    def crashed(self, doing: str) -> None:
        """A bug met while ``doing``: the connection ends with 1011 and an incident id."""
        self.ws.crashed(doing)

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """The connection is open: greet the client. Its frames then arrive in
        :meth:`received`, and :meth:`lost` ends it."""
        # the first frame, to an empty socket: it leaves at once, even when coalescing
        self._write_now(wire_message((welcome(self.user, self.server.settings.heartbeat,
                                              batch=self._batch_ms),)))

    def received(self, messages: list[str | bytes]) -> None:
        """The frames of one read from the client. The first is answered at once when nothing
        waits and it needs no database (ack, ping, unsubscribe, typing, a refusal); the others,
        and a subscribe or refresh, are answered by a task, one per turn of the event loop (a
        read of hostile frames holds thousands), in order. Past :data:`INBOX_HIGH` frames
        waiting, the connection stops reading (TCP pushes back on the client) until
        :data:`INBOX_LOW` are left."""
        if self._closing:
            return
        inbox = self._inbox
        if inbox is not None:
            inbox.extend(messages)
        else:
            first = self._parse(messages[0])
            if first is not None and not isinstance(first, Subscribe | Refresh):
                with self._fault_boundary(first):
                    self._answer_now(first)
                first = None
            if (first is None and len(messages) == 1) or self._closing:
                return
            inbox = self._inbox = deque(messages[1:])
            self._requests = asyncio.create_task(self._answer_in_order(first),
                                                 name=f"requests-{self.ws.id}")
        if len(inbox) >= INBOX_HIGH:
            self.ws.pause_reading()

    def pinged(self) -> None:
        """A WebSocket ping (answered already) counts in the client's rate limit."""
        if self._over_rate():
            self.server.metrics.refusals.labels("rate_limited").inc()

    def lost(self) -> None:
        """The connection ended: leave the rooms, stop the timers and the writer."""
        self._closing = True
        for sub in self.subs.values():
            self.server.hub.remove(sub)
        self.server.metrics.subscriptions.dec(len(self.subs))
        self.subs.clear()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._writer is not None:
            self._writer.cancel()
        # a request waiting for the database finds the client closing when it resumes, and
        # ends there (a cancelled query would wait for PostgreSQL anyway)

    def _start_writer(self) -> None:
        """Drain the queue at the pace of the socket, in a task that lives while frames wait:
        an idle connection holds no task of its own."""
        self._writing = True
        self._writer = asyncio.create_task(self._write_queued(), name=f"writer-{self.ws.id}")

    async def _write_queued(self) -> None:
        ws, queue = self.ws, self._queue
        try:
            while queue and ws.open:
                frames = [queue.popleft()] if self._batch is None else take_frames(queue)
                ws.write(wire_message(frames))
                try:
                    # waits while the socket's buffer is full; the frame is written already
                    # when the wait is cut short, so the stream stays whole for the close
                    async with asyncio.timeout(self._send_timeout):
                        await ws.drain()
                except TimeoutError:
                    self.overflow(f"its socket accepted nothing for {self._send_timeout:g} s "
                                  f"({len(queue)} more frames queued)")
                    return
            if not ws.open:
                self._closing = True
        finally:
            self._writing = False
            self._writer = None
            self._emptied()

    def _emptied(self) -> None:
        """The queue was sent (or dropped): let go of it, and wake a replay waiting for room."""
        if not self._queue:
            self._queue = _NO_FRAMES
        if self._drained is not None:
            self._drained.set()

    def _close_soon(self, code: Close, reason: str, *, fail: bool = False) -> None:
        """Stop sending and close with ``code``; ``fail``: without waiting for the client's
        close frame, and without reading what it sent meanwhile (an abuser's frames)."""
        self._closing = True
        self._queue.clear()
        if self._writer is not None:
            self._writer.cancel()
        self._emptied()  # a replay waiting for room stops at _closing
        for sub in self.subs.values():
            self.server.hub.remove(sub)
        if fail:
            self.ws.fail(code, reason)
        else:
            self.ws.close(code, reason)

    def _set_expiry(self, exp: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, exp - time.time())
        self._expiry = loop.call_later(delay, self._close_soon, Close.TOKEN_EXPIRED,
                                       "token expired")

    async def _room_for(self, frames: int) -> None:
        """Wait until ``frames`` more fit in the queue (replay paces itself, never overflows)."""
        while not self._closing and self._queue and len(self._queue) + frames > self._limit:
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()

    # --- requests ---------------------------------------------------------------------------

    def _over_rate(self) -> bool:
        """Take one frame (or WebSocket ping) from the bucket; true when refused. A client that
        keeps sending into a refusing bucket (``rate_burst`` refusals beyond one a second) is
        closed with 1008: answering its every frame would cost more than serving it, and so
        would reading the frames it still sent, so the connection is failed, not closed (RFC
        6455, 7.1.7: nothing more is read from it)."""
        if self._bucket.take():
            return False
        if not self._strikes.take() and not self._closing:
            self.server.metrics.refusals.labels("abuse").inc()
            self._close_soon(Close.POLICY, "rate limit exceeded repeatedly", fail=True)
        return True

    def _parse(self, message: str | bytes) -> Request | None:
        """The request of a frame, after the rate limit; ``None`` when it was answered with an
        ``error`` frame instead."""
        if self._over_rate():
            if not self._closing:
                self.server.metrics.refusals.labels("rate_limited").inc()
                self.send(error("rate_limited", "too many frames; slow down"))
            return None
        with self._fault_boundary(None):
            return parse_frame(message)
        return None

    async def _answer_in_order(self, first: Request | None) -> None:
        """Answer ``first`` (when given), then the inbox in order, one frame per turn of the
        event loop; the inbox goes when it is empty."""
        inbox = self._inbox
        assert inbox is not None
        try:
            request = first
            while True:
                if request is not None:
                    with self._fault_boundary(request):
                        if isinstance(request, Subscribe):
                            await self._subscribe(request)
                        elif isinstance(request, Refresh):
                            await self._refresh(request)
                        else:
                            self._answer_now(request)
                if not inbox or self._closing:
                    return
                # let the fan-out and other clients run between two frames of this one
                await asyncio.sleep(0)
                if self._closing:
                    return
                request = self._parse(inbox.popleft())
                if len(inbox) <= INBOX_LOW:
                    self.ws.resume_reading()
        finally:
            self._inbox = None
            self._requests = None
            self.ws.resume_reading()  # the peer's close frame, at least, must be read

    def _answer_now(self, request: Request) -> None:
        if isinstance(request, Unsubscribe):
            self._unsubscribe(request)
        elif isinstance(request, Ack):
            self._ack(request)
        elif isinstance(request, Ping):
            self.send(pong(request.ref))
        elif isinstance(request, Typing):
            self._typing(request)

    @contextlib.contextmanager
    def _fault_boundary(self, request: Request | None) -> Iterator[None]:
        """Whatever answering ``request`` (or parsing a frame, ``None``) raises ends there:
        a refusal is an ``error`` frame; a database failure an ``internal`` error the client
        may retry; a bug is logged once with an incident id, never with the client's bytes."""
        try:
            yield
        except ProtocolError as exc:
            self.server.metrics.refusals.labels(exc.code).inc()
            self.send(exc.frame())
        except BridgeError as exc:  # the database failed: the client may retry
            log.error("%s of user %s failed: %s", _kind(request), self.user, exc,
                      extra={"event": "request_failed"})
            self.send(error("internal", "temporary failure; retry", ref=_ref(request),
                            room=_room(request)))
        except Exception:  # a bug: it ends this request, not the connection or the bridge
            incident = logs.incident(log, "request_crashed", "%s of user %s crashed",
                                     _kind(request), self.user)
            self.send(error("internal", f"internal error (incident {incident}); retry",
                            ref=_ref(request), room=_room(request)))

    async def _subscribe(self, request: Subscribe) -> None:
        room, ref = request.room, request.ref
        settings = self.server.settings
        if not self._may_ask_database():
            raise ProtocolError("rate_limited", "too many subscribe attempts; slow down",
                                ref=ref, room=room)
        if room in self.subs:
            raise ProtocolError("bad_request", "already subscribed to this room", ref=ref,
                                room=room)
        if len(self.subs) >= settings.max_subscriptions:
            raise ProtocolError("rate_limited", f"at most {settings.max_subscriptions} "
                                "subscriptions per connection", ref=ref, room=room)
        # Membership first: a room the user may not read never reaches the listener.
        info = await self.server.store.cursor_info(self.user, room)
        if info.status == "not_found":
            raise ProtocolError("not_found", "no such room", ref=ref, room=room)
        if info.status != "ok":
            raise ProtocolError("forbidden", "not a member of this room, or the room or user "
                                "is deleted", ref=ref, room=room)
        from_seq = resolve_from(room=room, since=request.since, acked=info.acked,
                                head=info.head, retained_from=info.retained_from, ref=ref)
        if self._closing:  # closed while the database answered
            return
        # Events after info.head were committed after the membership check: replayed ones
        # revoke or end the subscription exactly as live ones do.
        sub = Subscription(self, room, pending_limit=self._limit, checked_at=info.head,
                           presence=request.presence)
        sub.from_seq = from_seq
        self.subs[room] = sub
        self.server.metrics.subscriptions.inc()
        try:
            live_from = await self.server.listener.add(sub)
            # Events up to live_from were committed before now; if some came after the check,
            # the user must still be live now for them to be the user's (a deletion's hint may
            # still be on its way to the listener). Membership is accounted for by checked_at.
            if live_from > info.head and not await self.server.store.live_user(self.user):
                self.user_gone()
            if self._closing:
                self._drop(sub)
                return
            self.send(subscribed(room, from_seq, max(info.head, live_from), ref))
            if sub.presence:
                await self._send_snapshot(sub)
            after = from_seq
            metrics = self.server.metrics
            while after < live_from and not sub.ended and not self._closing:
                await self._room_for(self._page)
                with metrics.read_replay.time():
                    events = await self.server.store.read_events(room, after=after,
                                                                 upto=live_from,
                                                                 limit=self._page)
                page = take_page(room, after, events, limit=self._page, upto=live_from)
                now, sent = time.time(), 0
                for step in page.steps:
                    if isinstance(step, Hole):
                        break
                    sub.replay(step)
                    if sub.last_sent == step.seq:  # sent: not skipped, not a revocation
                        sent += 1
                        captured = capture_time(step.frame)
                        if captured is not None:
                            metrics.latency_replay.observe(max(0.0, now - captured))
                metrics.replayed.inc(sent)
                hole = next((s for s in page.steps if isinstance(s, Hole)), page.missing)
                if hole is not None and not sub.ended:
                    # events the subscription needs are gone from the log: never a silent gap
                    log.warning("events %s..%s of room %s are missing from change_events; "
                                "the subscription of user %s replaying them ended with "
                                "cursor_expired", hole.first, hole.last, room, self.user,
                                extra={"event": "log_hole"})
                    sub.end("cursor_expired")
                if not page.more:
                    break
                after = page.cursor
        except BaseException:
            self._drop(sub)
            raise
        if sub.ended:
            self._drop(sub)
        elif not self._closing:
            sub.go_live()

    async def _send_snapshot(self, sub: Subscription) -> None:
        """The room's presence snapshot, paced like a replay; then the changes since."""
        states = await self.server.presence_feed.snapshot(sub)
        for i in range(0, len(states), self._page):
            await self._room_for(self._page)
            if sub.ended or self._closing:
                return
            for state in states[i:i + self._page]:
                self.send(state.frame())
        self.server.metrics.presence_frames.inc(len(states))
        sub.presence_live()

    def _typing(self, request: Typing) -> None:
        sub = self.subs.get(request.room)
        if sub is None or sub.ended:
            raise ProtocolError("forbidden", "typing in a room you are not subscribed to",
                                ref=request.ref, room=request.room)
        self.server.presence_feed.typing_sent(self.user, request.room)

    def _may_ask_database(self) -> bool:
        """Take one request that queries the database (subscribe, refresh) from this
        connection's and this user's bucket; false when either is empty."""
        return self._subscribe_bucket.take() and self.server.limits.subscribe_allowed(self.user)

    def _drop(self, sub: Subscription) -> None:
        self.server.hub.remove(sub)
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
        self.server.acks.record(self.user, request.room, request.seq)

    async def _refresh(self, request: Refresh) -> None:
        try:
            claims = self.server.verify_token(request.token)
        except AuthError as exc:
            raise ProtocolError("unauthorized", str(exc), ref=request.ref) from None
        if claims.sub != self.user:
            raise ProtocolError("unauthorized", "a refreshed token must be for the same user",
                                ref=request.ref)
        if not self._may_ask_database():
            raise ProtocolError("rate_limited", "too many refresh attempts; slow down",
                                ref=request.ref)
        if not await self.server.store.live_user(self.user):
            self.send(error("unauthorized", "the token's user does not exist or is deleted",
                            ref=request.ref))
            self.user_gone()
            return
        self._set_expiry(claims.exp)


def _kind(request: Request | None) -> str:
    return type(request).__name__.lower() if request is not None else "a frame"


def _ref(request: Request | None) -> str | None:
    return request.ref if request is not None else None


def _room(request: Request | None) -> str | None:
    return getattr(request, "room", None)
