"""Presence frames for the watchers of each room, and typing signals between instances
(PROTOCOL.md, "Presence and typing").

**Presence.** Whatever changes a user's ``user_status`` row (an instance's transition, the
application) rings the capture triggers' channel with a signed hint naming the user
(sql/triggers/40_presence.sql); the listener hands it to :meth:`PresenceFeed.hinted`, and the
rooms (:mod:`daemon.rooms`) tell :meth:`PresenceFeed.joined` of every member who joins a
room. One task, :meth:`PresenceFeed.run`, reads the hinted users' presence in the rooms
watched here, in one query per batch, and offers each frame to the room's watchers. The same
task reads snapshots (:meth:`PresenceFeed.snapshot`), and registers the new watcher as it
reads: reads happen one after another, so a watcher is offered only states read after its
snapshot, in the order they were read. Hints sent while the listener was away are lost, so
after each reconnect every watched room is read again (:meth:`PresenceFeed.missed`, a
:class:`daemon.listener.Follower`).

**Typing.** A client's signal passes the :class:`daemon.presence.TypingGate`, then this instance
NOTIFYs it on the typing channel without waiting; every instance, this one included, hears it
on its LISTEN connection, which checks it (:func:`daemon.notes.read_typing`) and hands it to
:meth:`PresenceFeed.typing`, which sends a ``typing`` frame to the room's watchers but the
typist. With a broker (``PGBRIDGE_BROKER``), the signal goes through NATS instead while it is
connected (:meth:`daemon.broker.Broker.broadcast_typing`), signed the same way.
The channel is secret (derived from the schema's key, sql/triggers/10_change_capture.sql,
"Secret channels"), so no role but the owner and the bridge role can LISTEN to the room and
user ids it carries; the payload is signed like the capture triggers' (a key derived from
theirs, :meth:`daemon.signing.NotifyKey.derive`), so a role that can name the channel still
cannot make an instance believe a signal it did not sign. It carries the time it was sent; one
older than ``TYPING_MAX_AGE`` seconds is dropped, so a recorded signal replayed later shows
nothing. Nothing is stored or replayed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import BridgeError
from .events import PresenceHint
from .hub import Hub, Subscription
from .logs import Throttled
from .metrics import Metrics
from .notes import Forged, Keys, Typing, read_typing
from .presence import Presence, TypingGate
from .protocol import typing
from .signing import NotifyKey
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["PresenceFeed"]

MAX_TYPING_SEEN = 50_000  # fresh typing signals remembered to drop a repeat (bounded memory)
TYPING_MAX_AGE = 10.0  # seconds a typing signal stays believable (clock skew between hosts)
MAX_TYPING_IN_FLIGHT = 64  # NOTIFYs of typing signals awaiting the database; more are dropped
RETRY_DELAY = 1.0  # seconds before a failed read of presence is retried
USERS_PER_READ = 1000  # hinted users per query


@dataclass(slots=True)
class _Snapshot:
    sub: Subscription
    future: asyncio.Future[list[Presence]]


class PresenceFeed:
    """``hub``: whose watchers get the frames. The typing channel and key are set by the
    listener (:meth:`missed`, or :meth:`configure`) each time its LISTEN connection learns the
    channels."""

    def __init__(self, store: Store, hub: Hub, metrics: Metrics) -> None:
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.typing_channel = ""
        self._typing_key: NotifyKey | None = None
        # with a broker (daemon.broker): sends a signed typing payload to every instance, false
        # when it cannot (then it is NOTIFYed)
        self.broadcast: Callable[[str], bool] | None = None
        self.gate = TypingGate()
        # (room, user, at) -> until when it is fresh (time.time()), in the order heard
        self._typing_seen: dict[tuple[str, str, int], float] = {}
        self._hinted: dict[str, set[str] | None] = {}  # user -> rooms to read (None: all)
        self._all = False  # read every watched room (after a listener reconnect)
        self._snapshots: list[_Snapshot] = []
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._failures = Throttled(log, interval=30.0)

    def configure(self, typing_channel: str, key: NotifyKey) -> None:
        """The typing channel (secret: ``pgbridge_listen()`` names it), and the capture
        triggers' key (the typing key derives from it); called again on every LISTEN
        connection, so a rotated key brings its channel."""
        self.typing_channel = typing_channel
        self._typing_key = key.derive("typing")

    # --- from the listener (daemon.listener.Follower, and the notes registered) -------------

    def deaf(self) -> None:
        """The LISTEN connection is down: nothing to do until :meth:`missed`."""

    async def missed(self, keys: Keys) -> None:
        """LISTEN is up on ``keys``' channels, but presence hints sent before were lost: take
        the typing channel and key, and read every watched room again."""
        self.configure(keys.typing_channel, keys.key)
        self.hint_all()

    def hinted(self, note: PresenceHint) -> None:
        """A presence hint (``user_status`` of ``note.user`` changed): read it again."""
        self.hint(note.user)

    def joined(self, user: str, room: str) -> None:
        """``user`` joined ``room`` (or their membership changed: a published event's
        :attr:`~daemon.events.Event.joins`): its watchers, if any, learn their presence."""
        if self.hub.watchers(room):
            self.hint(user, room)

    # --- presence -------------------------------------------------------------------------

    def hint(self, user: str, room: str | None = None) -> None:
        """Read ``user``'s presence again, in ``room`` only (a join) or in every watched room."""
        if room is None:
            self._hinted[user] = None
        else:
            rooms = self._hinted.setdefault(user, set())
            if rooms is not None:
                rooms.add(room)
        self._wake.set()

    def hint_all(self) -> None:
        """Read every watched room again (hints may have been lost)."""
        self._all = True
        self._wake.set()

    async def snapshot(self, sub: Subscription) -> list[Presence]:
        """The presence of every member of ``sub``'s room, read after every state offered so
        far; ``sub`` watches the room from that read on (its frames wait in it until the
        caller sends the snapshot and calls :meth:`Subscription.presence_live`). Raises
        :class:`BridgeError`."""
        future: asyncio.Future[list[Presence]] = asyncio.get_running_loop().create_future()
        self._snapshots.append(_Snapshot(sub, future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """Read and offer presence until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            hinted, self._hinted = self._hinted, {}
            everything, self._all = self._all, False
            snapshots, self._snapshots = self._snapshots, []
            try:
                await self._changes(hinted, everything)
            except BridgeError as exc:
                for user, rooms in hinted.items():  # keep them for the retry, under new ones
                    if user not in self._hinted:
                        self._hinted[user] = rooms
                self._all = self._all or everything
                self._failures.warning("read", "could not read presence (%s); retrying in "
                                       "%g s", exc, RETRY_DELAY,
                                       extra={"event": "presence_read_failed"})
                asyncio.get_running_loop().call_later(RETRY_DELAY, self._wake.set)
            for item in snapshots:
                await self._snapshot(item)

    async def _changes(self, hinted: dict[str, set[str] | None], everything: bool) -> None:
        rooms = self.hub.watched()
        if not rooms or not (hinted or everything):
            return
        if everything:
            self._offer(await self.store.rooms_presence(rooms))
            return
        users = list(hinted)
        for i in range(0, len(users), USERS_PER_READ):
            found = await self.store.members_presence(users[i:i + USERS_PER_READ], rooms)
            self._offer([p for p in found if (wanted := hinted[p.user]) is None
                         or p.room in wanted])

    def _offer(self, states: list[Presence]) -> None:
        for state in states:
            watchers = self.hub.watchers(state.room)
            if watchers:
                frame = state.frame()
                for sub in watchers:
                    sub.offer_presence(frame)
                self.metrics.presence_frames.inc(len(watchers))

    async def _snapshot(self, item: _Snapshot) -> None:
        if item.future.done():  # the subscriber went away
            return
        try:
            states = await self.store.rooms_presence([item.sub.room])
        except BridgeError as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done() and self.hub.watch(item.sub):
            item.future.set_result(states)
        elif not item.future.done():
            item.future.set_result([])  # the subscription ended meanwhile

    # --- typing ---------------------------------------------------------------------------

    def typing_sent(self, user: str, room: str) -> None:
        """A client of ``user`` subscribed to ``room`` signals typing: relay it unless over the
        rate (dropped silently) or too many are waiting for the database (dropped too)."""
        if self._typing_key is None or not self.gate.allow(user, room) or (
                len(self._in_flight) >= MAX_TYPING_IN_FLIGHT):
            self.metrics.typing.labels("dropped").inc()
            return
        text = json.dumps({"room": room, "user": user, "at": round(time.time() * 1000)},
                          separators=(",", ":"))
        payload = self._typing_key.sign(text)
        if self.broadcast is not None and self.broadcast(payload):
            self.metrics.typing.labels("relayed").inc()
            return
        task = asyncio.get_running_loop().create_task(self._relay(payload))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _relay(self, payload: str) -> None:
        try:
            await self.store.notify(self.typing_channel, payload, doing="relaying a typing signal")
        except BridgeError as exc:
            self.metrics.typing.labels("dropped").inc()
            self._failures.warning("typing", "could not relay a typing signal (%s); dropped",
                                   exc, extra={"event": "typing_failed"})
            return
        self.metrics.typing.labels("relayed").inc()

    def _first_time(self, note: Typing, now: float) -> bool:
        """Remember ``note`` as long as it is fresh (until its ``at`` + ``TYPING_MAX_AGE``);
        false when it was heard already, or when ``MAX_TYPING_SEEN`` fresh ones are remembered
        (a flood: a signal then is dropped rather than a fresh one forgotten)."""
        seen = self._typing_seen
        while seen and next(iter(seen.values())) < now:  # heard in order: roughly by expiry
            del seen[next(iter(seen))]
        key = (note.room, note.user, note.at)
        if key in seen or len(seen) >= MAX_TYPING_SEEN:
            return False
        seen[key] = note.at / 1000 + TYPING_MAX_AGE
        return True

    def typing_heard(self, payload: str) -> bool:
        """A payload of the typing channel (from any instance, this one included); false when
        its signature fails (the caller treats it as a forgery)."""
        if self._typing_key is None:
            return False
        note = read_typing(self._typing_key, payload)
        if isinstance(note, Typing):
            self.typing(note)
        return not isinstance(note, Forged)

    def typing(self, note: Typing) -> None:
        """A signed typing signal: send it to the room's watchers but the typist, unless it is
        older than ``TYPING_MAX_AGE`` seconds, or was heard already (a recorded signal replayed
        within that age, or one heard both on LISTEN and through the broker): both counted as
        stale."""
        now = time.time()
        if abs(now - note.at / 1000) > TYPING_MAX_AGE or not self._first_time(note, now):
            self.metrics.typing.labels("stale").inc()
            return
        frame = typing(note.room, note.user)
        delivered = sum(sub.offer_typing(frame) for sub in self.hub.watchers(note.room)
                        if sub.sink.user != note.user)
        self.metrics.typing.labels("delivered").inc(delivered)
