"""One WebSocket connection after the upgrade: :class:`Client` parses its frames and answers
them, and owns its subscriptions; what it sends leaves through its
:class:`daemon.outgoing.OutgoingQueue` (the queue, the writer, coalescing, the 4008 close of a
client that cannot keep up). What it works with is named in its
:class:`daemon.collaborators.Collaborators`, built once by :class:`daemon.server.Server`.

Frames arrive from :class:`daemon.connection.Connection`, one read at a time
(:meth:`Client.received`): the first is answered at once when it needs no database, the rest
one per turn of the event loop by a task that exists only while frames wait, so that a flood
on one connection never holds the others. Each frame is handled inside a fault boundary:
whatever it causes ends at most that request (an ``error`` frame with its ``ref`` and
``room``; an unexpected exception is logged once with an incident id, never with the client's
bytes). Limits (PROTOCOL.md, "Limits") are applied before any work: frames and WebSocket
pings share one token bucket per connection; subscribe and refresh attempts take from the
connection's and the user's bucket before the database is asked. A new subscription is
caught up (:mod:`daemon.replay`: its missed events, its room's presence) before it goes live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from contextlib import AbstractContextManager

from .answers import fault_boundary
from .auth import AuthError, Claims
from .closes import Close
from .collaborators import Collaborators
from .connection import Connection, contained
from .cursor import resolve_from
from .feed import Feed
from .hub import Subscription
from .outgoing import OutgoingQueue
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
from .protocol import (
    Feed as FeedRequest,
)
from .ratelimit import TokenBucket
from .replay import replay, send_snapshot
from .snapshot import check_subscribe, send_recent
from .store import READ_PAGE

log = logging.getLogger(__name__)

__all__ = ["Client"]


INBOX_HIGH = 16  # frames waiting for a request's answer before the connection stops reading
INBOX_LOW = 4  # ... and after which it reads again (websockets' max_queue, 16 and 4)


class Client:
    """One WebSocket connection: parses its frames, owns its subscriptions; sends through
    :attr:`outgoing`. Implements :class:`daemon.hub.Sink` and :class:`daemon.access.Session`.
    ``batch``: the client's ``?batch=`` wait in milliseconds, ``None`` when not coalescing."""

    __slots__ = ("__weakref__", "_batch_ms", "_bucket", "_expiry", "_inbox", "_page", "_parts",
                 "_requests", "_strikes", "_subscribe_bucket", "feed", "outgoing", "subs", "user",
                 "ws")

    def __init__(self, parts: Collaborators, ws: Connection, claims: Claims, *,
                 batch: int | None = None) -> None:
        self._parts = parts
        settings = parts.settings
        self.ws = ws
        self.user = claims.sub
        self.subs: dict[str, Subscription] = {}  # a feed's (daemon.feed) and subscribes'
        self.feed: Feed | None = None
        self._batch_ms = batch
        # replay and snapshots go out in pages that leave half the queue to live frames: a page
        # larger than the queue would close a client that is only catching up with 4008
        self._page = max(1, min(READ_PAGE, settings.queue_size // 2))
        self.outgoing = OutgoingQueue(
            ws, user=self.user, size=settings.queue_size, page=self._page,
            send_timeout=settings.send_timeout, send_buffer=settings.send_buffer,
            batch_ms=batch, flusher=parts.flusher, metrics=parts.metrics,
            on_close=self._leave_rooms)
        self._bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
        self._subscribe_bucket = TokenBucket(settings.subscribe_rate, settings.subscribe_burst)
        # refused frames tolerated: a burst of rate_burst, then one a second; past that, 1008
        self._strikes = TokenBucket(1.0, settings.rate_burst)
        # the frames received while a request waits for the database, and the task that
        # answers them in order; both exist only then
        self._inbox: deque[str | bytes] | None = None
        self._requests: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._set_expiry(claims.exp)

    @property
    def correlation_id(self) -> str:
        """The connection's correlation id (:mod:`daemon.logs`): every line about it carries
        it, and its ``welcome`` says it."""
        return self.ws.correlation_id

    # --- Sink -------------------------------------------------------------------------------
    # What the hub, the listener, presence and access checks (code shared by all connections)
    # call here goes through the connection's fault boundary (contained): a bug met in one
    # client ends that client with 1011, never the caller. The flusher calls the outgoing
    # queue's own boundary.

    @contained("sending a frame")
    def send(self, frame: bytes | str) -> None:
        self.outgoing.send(frame)

    @contained("closing a slow client")
    def overflow(self, why: str) -> None:
        self.outgoing.overflow(why)

    @contained("ending a subscription")
    def subscription_ended(self, sub: Subscription) -> None:
        if self.subs.get(sub.room) is sub:
            del self.subs[sub.room]
            self._parts.metrics.subscriptions.dec()
            if sub.ended:  # by the bridge (the client's own unsubscribe logs its own line)
                log.debug("subscription of user %s to room %s ended: %s", self.user, sub.room,
                          sub.end_reason, extra={"event": "subscription_ended", "room": sub.room,
                                                 "reason": sub.end_reason,
                                                 "correlation_id": self.ws.correlation_id})
            if self.feed is not None:
                self.feed.ended(sub)

    # --- Session ----------------------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        return list(self.subs.values())

    @contained("closing for a deleted user")
    def user_gone(self) -> None:
        if not self.outgoing.closing:
            self.outgoing.close(Close.USER_GONE, "user deleted")

    @contained("revoking a subscription")
    def revoke(self, sub: Subscription, reason: str) -> None:
        if self.subs.get(sub.room) is sub and not sub.ended:
            sub.end(reason)
            self._drop(sub)

    @contained("closing for a failed access check")
    def retry_later(self) -> None:
        if not self.outgoing.closing:
            self.outgoing.close(Close.OVERLOADED, "access could not be checked; retry later")

    def crashed(self, doing: str) -> None:
        """A bug met while ``doing``: the connection ends with 1011 and an incident id."""
        self.ws.crashed(doing)

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """The connection is open: greet the client. Its frames then arrive in
        :meth:`received`, and :meth:`lost` ends it."""
        self.outgoing.write_now(welcome(self.user, self._parts.settings.heartbeat,
                                        batch=self._batch_ms,
                                        correlation_id=self.ws.correlation_id))

    def received(self, messages: list[str | bytes]) -> None:
        """The frames of one read from the client. The first is answered at once when nothing
        waits and it needs no database (ack, ping, unsubscribe, typing, a refusal); the others,
        and a subscribe or refresh, are answered by a task, one per turn of the event loop (a
        read of hostile frames holds thousands), in order. Past :data:`INBOX_HIGH` frames
        waiting, the connection stops reading (TCP pushes back on the client) until
        :data:`INBOX_LOW` are left."""
        if self.outgoing.closing:
            self._last_acks(messages)
            return
        inbox = self._inbox
        if inbox is not None:
            inbox.extend(messages)
        else:
            first = self._parse(messages[0])
            if first is not None and not isinstance(first, Subscribe | Refresh | FeedRequest):
                with self._fault_boundary(first):
                    self._answer_now(first)
                first = None
            if (first is None and len(messages) == 1) or self.outgoing.closing:
                return
            inbox = self._inbox = deque(messages[1:])
            self._requests = asyncio.create_task(self._answer_in_order(first),
                                                 name=f"requests-{self.ws.id}")
        if len(inbox) >= INBOX_HIGH:
            self.ws.pause_reading()

    def pinged(self) -> None:
        """A WebSocket ping (answered already) counts in the client's rate limit."""
        if self._over_rate():
            self._parts.metrics.refusals.labels("rate_limited").inc()

    def lost(self) -> None:
        """The connection ended: record its last acks, leave the rooms, stop the writer."""
        self.outgoing.lost()
        with self._fault_boundary(None):  # the request task, if any, ends as it resumes
            self._last_acks(self._inbox or ())
        self._leave_rooms()
        self._parts.metrics.subscriptions.dec(len(self.subs))
        self.subs.clear()
        if self.feed is not None:
            self.feed.close()
        if self._expiry is not None:
            self._expiry.cancel()
        # a request waiting for the database finds the client closing when it resumes, and
        # ends there (a cancelled query would wait for PostgreSQL anyway)

    def _last_acks(self, messages: Iterable[str | bytes]) -> None:
        """Record the acks among frames left unanswered: a client's last words before a close."""
        for message in messages:
            if isinstance(request := self._parse(message), Ack):
                with self._fault_boundary(request):
                    self._ack(request)

    def _leave_rooms(self) -> None:
        """Nothing more is sent: the hub stops offering this client its rooms' events (its
        subscriptions stay counted until :meth:`lost`)."""
        for sub in self.subs.values():
            self._parts.hub.remove(sub)

    def _set_expiry(self, exp: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, exp - time.time())
        self._expiry = loop.call_later(delay, self.outgoing.close, Close.TOKEN_EXPIRED,
                                       "token expired")

    # --- requests ---------------------------------------------------------------------------

    def _over_rate(self) -> bool:
        """Take one frame (or WebSocket ping) from the bucket; true when refused. A client that
        keeps sending into a refusing bucket (``rate_burst`` refusals beyond one a second) is
        closed with 1008: answering its every frame would cost more than serving it, and so
        would reading the frames it still sent, so the connection is failed, not closed (RFC
        6455, 7.1.7: nothing more is read from it)."""
        if self._bucket.take():
            return False
        if not self._strikes.take() and not self.outgoing.closing:
            self._parts.metrics.refusals.labels("abuse").inc()
            self.outgoing.close(Close.POLICY, "rate limit exceeded repeatedly", fail=True)
        return True

    def _parse(self, message: str | bytes) -> Request | None:
        """The request of a frame, after the rate limit; ``None`` when it was answered with an
        ``error`` frame instead."""
        if self._over_rate():
            if not self.outgoing.closing:
                self._parts.metrics.refusals.labels("rate_limited").inc()
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
                        elif isinstance(request, FeedRequest):
                            await self._feed(request)
                        else:
                            self._answer_now(request)
                if not inbox or self.outgoing.closing:
                    return
                # let the fan-out and other clients run between two frames of this one
                await asyncio.sleep(0)
                if self.outgoing.closing:
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

    def _fault_boundary(self, request: Request | None) -> AbstractContextManager[None]:
        return fault_boundary(request, log=log, user=self.user, metrics=self._parts.metrics,
                              correlation_id=self.ws.correlation_id, send=self.send)

    async def _subscribe(self, request: Subscribe) -> None:
        room, ref = request.room, request.ref
        settings = self._parts.settings
        if not self._may_ask_database():
            raise ProtocolError("rate_limited", "too many subscribe attempts; slow down",
                                ref=ref, room=room)
        if room in self.subs and not self.subs[room].feed:  # a feed's is taken over
            raise ProtocolError("bad_request", "already subscribed to this room", ref=ref,
                                room=room)
        if sum(not sub.feed for sub in self.subs.values()) >= settings.max_subscriptions:
            raise ProtocolError("rate_limited", f"at most {settings.max_subscriptions} "
                                "subscriptions per connection", ref=ref, room=room)
        # Membership first: a room the user may not read never reaches the listener.
        info, snap = await check_subscribe(self._parts.store, self.user, request, settings)
        if info.status == "not_found":
            raise ProtocolError("not_found", "no such room", ref=ref, room=room)
        if info.status != "ok":
            raise ProtocolError("forbidden", "not a member of this room, or the room or user "
                                "is deleted", ref=ref, room=room)
        from_seq = resolve_from(room=room, since=request.since, acked=info.acked,
                                head=info.head, retained_from=info.retained_from, ref=ref)
        if self.outgoing.closing:  # closed while the database answered
            return
        # Events after info.head were committed after the membership check: replayed ones
        # revoke or end the subscription exactly as live ones do.
        sub = Subscription(self, room, pending_limit=settings.queue_size, checked_at=info.head,
                           presence=request.presence)
        sub.from_seq = from_seq
        if (held := self.subs.get(room)) is not None:  # the feed's: released, no frame
            held.release()
            self._drop(held)
        self.subs[room] = sub
        self._parts.metrics.subscriptions.inc()
        try:
            live_from = await self._parts.rooms.add(sub)
            # Events up to live_from were committed before now; if some came after the check,
            # the user must still be live now for them to be the user's (a deletion's hint may
            # still be on its way to the listener). Membership is accounted for by checked_at.
            if live_from > info.head and not await self._parts.store.live_user(self.user):
                self.user_gone()
            if self.outgoing.closing:
                self._drop(sub)
                return
            head = max(info.head, live_from)
            self.send(subscribed(room, from_seq, head, ref))
            log.debug("user %s subscribed to room %s: from seq %d, head %d", self.user, room,
                      from_seq, head, extra={"event": "subscribed", "room": room, "ref": ref,
                                             "from": from_seq, "head": head,
                                             "correlation_id": self.ws.correlation_id})
            parts, page, outgoing = self._parts, self._page, self.outgoing
            await send_recent(snap, sub, outgoing)  # "snapshot": N, if asked (daemon.snapshot)
            if sub.presence:
                await send_snapshot(sub, page=page, presence_feed=parts.presence_feed,
                                    metrics=parts.metrics, outgoing=outgoing)
            await replay(sub, after=from_seq, upto=live_from, page=page, store=parts.store,
                         metrics=parts.metrics, outgoing=outgoing)
        except BaseException:
            self._drop(sub)
            raise
        if sub.ended:
            self._drop(sub)
        elif not self.outgoing.closing and sub.go_live():  # ended by an event it buffered
            self._parts.hub.remove(sub)

    def _typing(self, request: Typing) -> None:
        if (sub := self.subs.get(request.room)) is None or sub.ended:
            raise ProtocolError("forbidden", "typing in a room you are not subscribed to",
                                ref=request.ref, room=request.room)
        self._parts.presence_feed.typing_sent(self.user, request.room)

    def _may_ask_database(self) -> bool:
        """Take one request that queries the database (subscribe, refresh) from this
        connection's and this user's bucket; false when either is empty."""
        return self._subscribe_bucket.take() and self._parts.limits.subscribe_allowed(self.user)

    def _drop(self, sub: Subscription) -> None:
        self._parts.hub.remove(sub)
        self.subscription_ended(sub)

    def _unsubscribe(self, request: Unsubscribe) -> None:
        if (sub := self.subs.get(request.room)) is None:
            raise ProtocolError("not_found", "not subscribed to this room", ref=request.ref,
                                room=request.room)
        if sub.feed:
            raise ProtocolError("bad_request", "the feed follows this room, as every room of "
                                "the user", ref=request.ref, room=request.room)
        self._drop(sub)
        sub.end("client", request.ref)
        log.debug("user %s unsubscribed from room %s", self.user, request.room,
                  extra={"event": "unsubscribed", "room": request.room, "ref": request.ref,
                         "correlation_id": self.ws.correlation_id})

    def _ack(self, request: Ack) -> None:
        if (sub := self.subs.get(request.room)) is None:
            raise ProtocolError("bad_request", "ack for a room you are not subscribed to",
                                ref=request.ref, room=request.room)
        if request.seq > sub.cursor:
            raise ProtocolError("bad_request", f"seq {request.seq} was not delivered yet "
                                f"(latest: {sub.cursor})", ref=request.ref, room=request.room)
        self._parts.acks.record(self.user, request.room, request.seq)
        log.debug("user %s acknowledged seq %d of room %s", self.user, request.seq, request.room,
                  extra={"event": "ack", "room": request.room, "seq": request.seq,
                         "ref": request.ref, "correlation_id": self.ws.correlation_id})

    async def _feed(self, request: FeedRequest) -> None:
        if self.feed is not None:
            raise ProtocolError("bad_request", "a feed is already open on this connection",
                                ref=request.ref)
        if not self._may_ask_database():
            raise ProtocolError("rate_limited", "too many subscribe attempts; slow down",
                                ref=request.ref)
        self.feed = Feed(self, self._parts.feeds, page=self._page)
        try:
            await self.feed.start(request.ref)
        except BaseException:
            self.feed.close()
            self.feed = None
            raise

    async def _refresh(self, request: Refresh) -> None:
        try:
            claims = self._parts.verify_token(request.token)
        except AuthError as exc:
            raise ProtocolError("unauthorized", str(exc), ref=request.ref) from None
        if claims.sub != self.user:
            raise ProtocolError("unauthorized", "a refreshed token must be for the same user",
                                ref=request.ref)
        if not self._may_ask_database():
            raise ProtocolError("rate_limited", "too many refresh attempts; slow down",
                                ref=request.ref)
        if not await self._parts.store.live_user(self.user):
            self.send(error("unauthorized", "the token's user does not exist or is deleted",
                            ref=request.ref))
            self.user_gone()
            return
        self._set_expiry(claims.exp)

