"""Which rooms travel through the broker (docs/topics/broker.md, "A follower's new room").

I/O over the broker's NATS client (:class:`daemon.broker_relay.Relay`). An instance subscribes
to the subjects of the rooms its hub tracks, and to no other (:meth:`Interest.subscribe`). A
follower asks the leader of its epoch to publish them (:meth:`Interest.take_heads`: a request
on ``<prefix>.track.<epoch>``); the leader pins them in its own hub through its rooms' queue
and answers with each room's last seq (:meth:`Interest.on_track`), after which it publishes
every event of the room. The follower subscribed before it asked, so nothing after that seq
can pass it by; what came before it reads from the log as a gap. A room nobody asked for in
:data:`~daemon.broker_wire.PIN_EXPIRY` seconds is unpinned (:meth:`Interest.expire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

from .broker_relay import Relay
from .broker_wire import (
    INTEREST_REFRESH,
    PIN_EXPIRY,
    SWEEP_INTERVAL,
    TRACK_CHUNK,
    TRACK_TIMEOUT,
    read_track_reply,
    read_track_request,
    track_reply,
    track_request,
)
from .errors import BridgeError
from .events import Pointer
from .notes import Change

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from .hub import Hub
    from .rooms import Rooms

log = logging.getLogger(__name__)

# Seconds a leader remembers the requests it answered (a replay within them is dropped; a later
# one names an epoch's requests that a follower stopped waiting for long ago), and how many.
NONCE_MEMORY = 60.0
MAX_NONCES = 100_000

__all__ = ["Interest"]


class Following(Protocol):
    """The instance's state, as :class:`daemon.broker.Broker` keeps it."""

    state: str  # "leader", "follower" or "fallback"
    epoch: int  # the leader's followed (or its own)

    async def fall_back(self, reason: str, *, epoch: int | None = None) -> None:
        """Read the log ourselves; with ``epoch``, only if still following that leader."""


class Interest:
    """The rooms of ``hub`` on the broker, through ``relay``'s client; ``rooms`` pins the
    leader's and takes the follower's heads. :attr:`dirty` is set whenever the hub starts or
    stops tracking a room (:attr:`daemon.hub.Hub.observer`)."""

    def __init__(self, hub: Hub, rooms: Rooms, relay: Relay) -> None:
        self.hub, self.rooms, self.relay = hub, rooms, relay
        self.dirty = asyncio.Event()
        hub.observer = lambda room, tracked: self.dirty.set()
        self.epoch = 0  # leader: the epoch whose track requests it answers
        self._subs: dict[str, Any] = {}  # room -> its NATS subscription
        self._track_sub: Any = None  # leader: its track subject's subscription
        self._pinned_at: dict[str, float] = {}  # leader: room -> when last asked for
        self._nonces: dict[str, float] = {}  # leader: the requests answered lately -> when

    # --- every instance -------------------------------------------------------------------

    async def subscribe(self) -> list[str]:
        """Subscribe to the tracked rooms not subscribed yet, unsubscribe the others; return
        the new ones (none while the broker is down: nats-py subscribes the others again
        when it reconnects)."""
        nc, subjects = self.relay.nc, self.relay.subjects
        if nc is None or subjects is None or not nc.is_connected:
            return []
        wanted = set(self.hub.rooms())
        for room in [room for room in self._subs if room not in wanted]:
            with contextlib.suppress(Exception):
                await self._subs.pop(room).unsubscribe()
        new = [room for room in wanted if room not in self._subs]
        for room in new:
            self._subs[room] = await nc.subscribe(subjects.room(room), cb=self.relay.on_event)
        return new

    async def forget(self) -> None:
        """Unsubscribe every room (the key, and with it the subjects, changed)."""
        for sub in self._subs.values():
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def rooms_forever(self, instance: Following, changes: asyncio.Lock) -> None:
        """Subscribe to the subjects of the rooms the hub tracks, and no other, whenever they
        change (under ``changes``, the instance's lock of its state); a follower asks its
        leader to publish the new ones."""
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            async with changes:
                new = await self.subscribe()
                epoch, following = instance.epoch, instance.state == "follower"
            if new and following:
                await self._take_heads(instance, epoch, new)

    async def refresh_forever(self, instance: Following) -> None:
        """Follower: ask again for every room held (keeps them pinned on the leader) every
        ``INTEREST_REFRESH`` seconds, and read their logs every ``SWEEP_INTERVAL`` (the safety
        net for an event that NATS never brought, when no later one of its room follows)."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(INTEREST_REFRESH)
            epoch, rooms = instance.epoch, self.hub.rooms()
            if instance.state != "follower" or not rooms:
                continue
            await self._take_heads(instance, epoch, rooms)
            if time.monotonic() - swept >= SWEEP_INTERVAL and instance.state == "follower":
                swept = time.monotonic()
                await self.rooms.catch_up()

    async def _take_heads(self, instance: Following, epoch: int, rooms: list[str]) -> None:
        failed = await self.take_heads(epoch, rooms)
        if failed is not None:
            await instance.fall_back(failed, epoch=epoch)

    # --- a follower -----------------------------------------------------------------------

    async def track(self, epoch: int, rooms: list[str]) -> dict[str, int]:
        """Ask the leader of ``epoch`` to publish ``rooms`` (:data:`TRACK_CHUNK` per request);
        their heads. Raises :class:`BridgeError` when it does not answer within
        ``TRACK_TIMEOUT`` seconds, or not with a valid reply."""
        nc, keys, subjects = self.relay.nc, self.relay.keys, self.relay.subjects
        if nc is None or keys is None or subjects is None:
            raise BridgeError("not connected to the broker")
        heads: dict[str, int] = {}
        inbox = nc.new_inbox()
        try:
            replies = await nc.subscribe(inbox)
        except Exception as exc:  # nats: the connection closed
            raise BridgeError(f"track request: {str(exc) or type(exc).__name__}") from None
        try:
            for start in range(0, len(rooms), TRACK_CHUNK) if rooms else (0,):
                chunk, nonce = rooms[start:start + TRACK_CHUNK], secrets.token_hex(12)
                try:
                    await nc.publish(subjects.track(epoch),
                                     track_request(keys.control, epoch, chunk, nonce),
                                     reply=inbox)
                    heads.update(await self._reply(replies, epoch, nonce, chunk))
                except BridgeError:
                    raise
                except Exception as exc:  # nats: timeout, connection closed
                    raise BridgeError(
                        f"track request to epoch {epoch}: {str(exc) or type(exc).__name__}"
                    ) from None
        finally:
            with contextlib.suppress(Exception):
                await replies.unsubscribe()
        return heads

    async def _reply(self, replies: Any, epoch: int, nonce: str,
                     rooms: list[str]) -> dict[str, int]:
        """The first valid reply to the request ``nonce`` within ``TRACK_TIMEOUT`` seconds
        (anyone who heard the request may answer it first: a forged or replayed answer is
        dropped and counted, not taken for the leader's silence)."""
        keys = self.relay.keys
        assert keys is not None
        async with asyncio.timeout(TRACK_TIMEOUT):
            while True:
                msg = await replies.next_msg(timeout=None)
                if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                    # the server's own answer: nobody listens on that epoch's subject (its
                    # leader is gone)
                    raise BridgeError(f"no capture reader of epoch {epoch} answers")
                heads = read_track_reply(keys.control, msg.data, epoch, nonce, rooms)
                if heads is not None:
                    return heads
                self.relay.forged("track")

    async def take_heads(self, epoch: int, rooms: list[str]) -> str | None:
        """:meth:`track` ``rooms`` (subscribed already); what the leader published before its
        answer (up to each room's head) is read from the log as a gap. Returns why the leader
        did not answer (``None``: it did)."""
        try:
            heads = await self.track(epoch, rooms)
        except BridgeError as exc:
            return f"the capture reader did not take our rooms ({exc})"
        for room, head in heads.items():
            if head > 0 and room in self.hub:
                await self.rooms.changed(Change(Pointer(room, head)), rang=False)
        return None

    # --- the leader -----------------------------------------------------------------------

    async def serve(self, epoch: int) -> None:
        """Leader of ``epoch``: answer the track requests sent to it."""
        nc, subjects = self.relay.nc, self.relay.subjects
        self.epoch = epoch
        if nc is not None and subjects is not None:
            self._track_sub = await nc.subscribe(subjects.track(epoch), cb=self.on_track)

    async def unserve(self) -> None:
        """No longer the leader: answer nothing, unpin every room."""
        if self._track_sub is not None:
            with contextlib.suppress(Exception):
                await self._track_sub.unsubscribe()
            self._track_sub = None
        for room in self.hub.pinned():
            self.hub.unpin(room)
        self._pinned_at.clear()

    async def on_track(self, msg: Msg) -> None:
        """Pin the rooms asked for and answer with their last seqs."""
        keys, epoch = self.relay.keys, self.epoch  # answered as the leader it was asked as
        request = read_track_request(keys.control, epoch, msg.data) if keys else None
        if request is None or keys is None:
            self.relay.forged("track")
            return
        if not self._first_time(request.nonce):  # a recorded request replayed: answered once
            return
        try:
            heads = await self.rooms.pin_many(request.rooms)
        except BridgeError as exc:
            log.warning("could not pin %d rooms for a follower (%s)", len(request.rooms), exc,
                        extra={"event": "broker_pin_failed"})
            return
        now = time.monotonic()
        self._pinned_at.update((room, now) for room in request.rooms)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(track_reply(keys.control, epoch, request.nonce, heads))

    def _first_time(self, nonce: str) -> bool:
        now, seen = time.monotonic(), self._nonces
        while seen and next(iter(seen.values())) < now - NONCE_MEMORY:
            del seen[next(iter(seen))]
        if nonce in seen or len(seen) >= MAX_NONCES:
            return False
        seen[nonce] = now
        return True

    def expire(self) -> None:
        """Unpin the rooms nobody asked for in ``PIN_EXPIRY`` seconds."""
        old = time.monotonic() - PIN_EXPIRY
        for room in [room for room, at in self._pinned_at.items() if at < old]:
            del self._pinned_at[room]
            self.hub.unpin(room)
