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

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from .broker_relay import Relay
from .broker_wire import (
    PIN_EXPIRY,
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

__all__ = ["Interest"]


class Interest:
    """The rooms of ``hub`` on the broker, through ``relay``'s client; ``rooms`` pins the
    leader's and takes the follower's heads."""

    def __init__(self, hub: Hub, rooms: Rooms, relay: Relay) -> None:
        self.hub, self.rooms, self.relay = hub, rooms, relay
        self.epoch = 0  # leader: the epoch whose track requests it answers
        self._subs: dict[str, Any] = {}  # room -> its NATS subscription
        self._track_sub: Any = None  # leader: its track subject's subscription
        self._pinned_at: dict[str, float] = {}  # leader: room -> when last asked for

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

    # --- a follower -----------------------------------------------------------------------

    async def track(self, epoch: int, rooms: list[str]) -> dict[str, int]:
        """Ask the leader of ``epoch`` to publish ``rooms`` (:data:`TRACK_CHUNK` per request);
        their heads. Raises :class:`BridgeError` when it does not answer within
        ``TRACK_TIMEOUT`` seconds, or not with a valid reply."""
        nc, keys, subjects = self.relay.nc, self.relay.keys, self.relay.subjects
        if nc is None or keys is None or subjects is None:
            raise BridgeError("not connected to the broker")
        heads: dict[str, int] = {}
        for start in range(0, len(rooms), TRACK_CHUNK) if rooms else (0,):
            chunk = rooms[start:start + TRACK_CHUNK]
            try:
                reply = await nc.request(subjects.track(epoch),
                                         track_request(keys.control, epoch, chunk),
                                         timeout=TRACK_TIMEOUT)
            except Exception as exc:  # nats: timeout, no responders, connection closed
                raise BridgeError(f"track request: {str(exc) or type(exc).__name__}") from None
            got = read_track_reply(keys.control, reply.data, chunk)
            if got is None:
                raise BridgeError("the track reply failed its signature check")
            heads.update(got)
        return heads

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
                await self.rooms.changed(Change(Pointer(room, head)))
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
        keys = self.relay.keys
        rooms = read_track_request(keys.control, self.epoch, msg.data) if keys else None
        if rooms is None or keys is None:
            self.relay.forged("track")
            return
        try:
            heads = await self.rooms.pin_many(rooms)
        except BridgeError as exc:
            log.warning("could not pin %d rooms for a follower (%s)", len(rooms), exc,
                        extra={"event": "broker_pin_failed"})
            return
        now = time.monotonic()
        self._pinned_at.update((room, now) for room in rooms)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(track_reply(keys.control, heads))

    def expire(self) -> None:
        """Unpin the rooms nobody asked for in ``PIN_EXPIRY`` seconds."""
        old = time.monotonic() - PIN_EXPIRY
        for room in [room for room, at in self._pinned_at.items() if at < old]:
            del self._pinned_at[room]
            self.hub.unpin(room)
