"""The rooms: the one task that moves rooms forward in the hub, in order (docs/design.md, "The event
log is the truth; NOTIFY is the doorbell").

The **processor** takes one queue in order and is the only code that advances a room's last
seq. What it publishes, and when it reads the log instead, is decided by the pure
:mod:`daemon.sequencer` (a NOTIFY with seq = last + 1 carrying its frame is published as is; a
gap, a payload too large for NOTIFY, a catch-up after reconnect read the log; a hole in the log
ends the subscriptions that needed it); this module only does the reading. Subscribing goes
through the same queue (:meth:`Rooms.add`), so a new subscriber's starting point ``L`` is
consistent with what was and will be published.

What enters the queue comes from the listener (:mod:`daemon.listener`), already sorted
(:mod:`daemon.notes`): changes of rooms (:meth:`Rooms.changed`), user hints
(:meth:`Rooms.user_hinted`), and, when the LISTEN connection may have missed notifications
(after every reconnect, after a flood was shed: :meth:`Rooms.missed`), a catch-up of every
tracked room.

User hints (a user deleted; sql/triggers/20_access.sql) take their place in the queue, so the
user's connections are closed before anything committed after the change is published
(:meth:`daemon.access.Access.check_users`). Hints that arrive while one is waiting join it: a
flood of them costs one ``users`` query per turn of the processor. After every (re)connect
nothing is published until every connected user was checked, since hints sent while the
listener was away are lost.

The **doorbell** task makes the ``pgbridge_doorbell()`` calls :class:`daemon.doorbell.Doorbell`
asks for (docs/topics/doorbell.md), and the **poll** task, while writers do not ring,
queues a catch-up every ``PGBRIDGE_POLL_INTERVAL``: every tracked room in one query
(:mod:`daemon.polls`).

Metrics (docs/reference/metrics.md): every published event is observed once, whatever the
number of its subscribers, in ``pgbridge_commit_to_send_seconds{kind="live"}`` (from its
capture time, read from the frame's fixed-width tail: :func:`daemon.events.capture_time`);
every read of the log in ``pgbridge_log_read_seconds`` (``gap_fill``, ``catch_up``, ``poll``);
every published event, by its table and op, in ``pgbridge_trigger_executions_total``.
A member who joins a room is told to the room's presence watchers (``joined``), nothing more:
presence rules are :mod:`daemon.presence_feed`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .doorbell import Doorbell
from .errors import BridgeError
from .events import Event, Pointer, UserHint, capture_time
from .hub import Hub, Subscription
from .logs import incident
from .metrics import Metrics
from .notes import Change, Keys, Unreadable
from .polls import Polls
from .sequencer import Hole, Pass, Read, on_notify, page_size, take_page
from .store import READ_PAGE, Store

if TYPE_CHECKING:
    from .access import Access

log = logging.getLogger(__name__)

__all__ = ["MAX_HINTED", "Rooms"]

# distinct users hinted before one check; past that, the check takes every connected user
MAX_HINTED = 1000


@dataclass(slots=True)
class _Track:
    sub: Subscription
    future: asyncio.Future[int]


@dataclass(slots=True)
class _TrackMany:
    subs: list[Subscription]
    future: asyncio.Future[list[int]]


@dataclass(slots=True)
class _Pin:
    rooms: list[str]
    future: asyncio.Future[dict[str, int]]


class _CatchUp:
    """Read every tracked room to the end of its log: after a (re)connect, a failed read or a
    rotated key, and as the poll while writers do not ring. ``done`` gets the number of events
    it published (0 when it failed)."""

    def __init__(self, done: asyncio.Future[int] | None = None) -> None:
        self.done = done


class _CheckUsers:
    """Check the users hinted since this item was queued (``Rooms._hinted``)."""


_Item = Event | Pointer | _Track | _TrackMany | _Pin | _CatchUp | _CheckUsers


class Rooms:
    """Every tracked room of ``hub``, moved forward in order from the notes the listener hands
    over and from the log in ``store``. ``access`` checks hinted users; ``joined(user, room)``
    is told of each published event that adds or changes ``user``'s membership of ``room``
    (:attr:`daemon.events.Event.joins`). ``queue_size``: items waiting for the processor, past
    which the listener waits (its notifications wait in the server's queue meanwhile).

    :attr:`retry_delay`: seconds before a failed read of the log is retried."""

    def __init__(self, hub: Hub, store: Store, metrics: Metrics, access: Access, *,
                 joined: Callable[[str, str], None], doorbell: Doorbell | None = None,
                 queue_size: int = 10000) -> None:
        self.hub = hub
        self.store = store
        self.metrics = metrics
        self.access = access
        self.joined = joined
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(queue_size)
        self._hinted: set[str] = set()  # non-empty exactly while a _CheckUsers is queued
        self._hinted_all = False  # more than MAX_HINTED: check every connected user
        self._users_checked = False  # every connected user checked since the last connect
        self._retry: asyncio.Task[None] | None = None
        self._stopped = False  # run() ended: nothing may start a task of its own any more
        self.retry_delay = 1.0  # seconds before a failed log read is retried
        # each published event, when set (the broker's leader relays it: daemon.broker)
        self.relay: Callable[[Event], None] | None = None
        self.polls = Polls(doorbell if doorbell is not None else Doorbell(now=time.monotonic()),
                           store, metrics, self.catch_up)

    @property
    def bell(self) -> Doorbell:
        """The doorbell (:mod:`daemon.doorbell`): whether writers ring, whether to poll."""
        return self.polls.bell

    # --- public ---------------------------------------------------------------------------

    async def run(self, *, capture: bool = True) -> None:
        """Run the processor, and with ``capture`` the doorbell and the poll
        (:meth:`capture`), until cancelled. Without it (a broker's instance,
        :mod:`daemon.broker`), whoever feeds the rooms runs :meth:`capture` while it reads the
        log itself."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.process(), name="listener-processor")
                if capture:
                    tasks.create_task(self.capture(), name="listener-capture")
        finally:
            self._stopped = True
            if self._retry is not None:
                self._retry.cancel()

    async def capture(self) -> None:
        """Run the doorbell and the poll (:mod:`daemon.polls`) until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.polls.ring_forever(), name="listener-doorbell")
            tasks.create_task(self.polls.poll_forever(), name="listener-poll")

    async def add(self, sub: Subscription) -> int:
        """Register ``sub`` (tracking its room if new) and return ``L``: events after ``L`` will
        be delivered to it live; ``(from, L]`` is the caller's to replay. Raises
        :class:`BridgeError` when the room's head cannot be read."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Track(sub, future))
        return await future

    async def add_many(self, subs: list[Subscription]) -> list[int]:
        """:meth:`add` for many subscriptions at once (a feed's rooms): one turn of the
        processor, and one query for the heads of the rooms not tracked yet, however many;
        returns each one's ``L``, in order. Raises :class:`BridgeError` as :meth:`add`."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_TrackMany(subs, future))
        return await future

    async def pin_many(self, rooms: list[str]) -> dict[str, int]:
        """Track ``rooms`` without subscribers (for the broker's followers: the leader
        publishes them, :mod:`daemon.broker`), through the queue like :meth:`add_many`; return
        each room's last seq at that point: every later event is published (and relayed).
        Raises :class:`BridgeError` when the heads cannot be read."""
        future: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pin(rooms, future))
        return await future

    async def catch_up(self, done: asyncio.Future[int] | None = None) -> None:
        """Queue one read of every tracked room to the end of its log; ``done``, if given, gets
        the number of events it published (0 when it failed)."""
        await self._queue.put(_CatchUp(done))

    # --- from the listener (daemon.listener.Follower, and the notes registered) -------------

    def deaf(self) -> None:
        """The LISTEN connection is down: hints are lost until :meth:`missed`, so a catch-up
        meanwhile checks every connected user first, and the poll waits."""
        self._users_checked = False
        self.polls.listening = False

    async def missed(self, keys: Keys) -> None:
        """LISTEN is up (on ``keys``' channels), but what was sent before was lost (a
        reconnect, a flood shed): check every connected user and catch every room up."""
        del keys  # the channels are the listener's business
        self._users_checked = False
        self.polls.listening = True
        await self._queue.put(_CatchUp())

    async def changed(self, note: Change, *, rang: bool = True) -> None:
        """A signed change of a room, in the order heard. ``rang``: a writer's NOTIFY (what the
        doorbell measures); not for what the broker relays (:mod:`daemon.broker`)."""
        if rang:
            self.polls.rang()
        await self._queue.put(note.event)

    async def user_hinted(self, note: UserHint) -> None:
        """Queue a check of the hinted user (joined to a check already waiting, if any)."""
        first = not self._hinted and not self._hinted_all
        if len(self._hinted) < MAX_HINTED:
            self._hinted.add(note.user)
        else:
            self._hinted_all = True
        if first:  # added before the put: the processor may take the item while we wait
            try:
                await self._queue.put(_CheckUsers())
            except asyncio.CancelledError:
                # no check queued: forget, or no later hint would queue one (the listener or
                # the broker being stopped: their next missed() checks every user)
                self._hinted, self._hinted_all = set(), False
                raise

    def unreadable(self, note: Unreadable) -> None:
        """A signed change this daemon cannot read: the log has it."""
        del note
        self.polls.rang()
        self._catch_up_soon()

    # --- processor ------------------------------------------------------------------------

    async def process(self) -> None:
        """Take the queue in order until cancelled (:meth:`run` runs it). Nothing that one item
        causes stops this task: the log is still there, so a catch-up a moment later fills
        whatever the item could not (as would the room's next NOTIFY or a reconnect)."""
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, Event | Pointer):
                    await self._on_change(item)
                elif isinstance(item, _Track):
                    await self._on_track(item)
                elif isinstance(item, _TrackMany):
                    await self._on_track_many(item)
                elif isinstance(item, _Pin):
                    await self._on_pin(item)
                elif isinstance(item, _CheckUsers):
                    await self._check_hinted()
                else:
                    published = await self._catch_up(poll=item.done is not None)
                    if item.done is not None and not item.done.done():
                        item.done.set_result(published)
            except BridgeError as exc:
                log.warning("could not read the log (%s); catching up again in %.1f s", exc,
                            self.retry_delay, extra={"event": "fill_failed"})
                self._failed(item, exc)
            except Exception:  # a bug: log it once, keep the rooms moving
                kind = "notify" if isinstance(item, Event | Pointer) else (
                    type(item).__name__.strip("_").lower())
                number = incident(log, "listener_crashed", "listener failed on a %s (catching "
                                  "up again in %.1f s)", kind, self.retry_delay)
                self._failed(item, BridgeError(f"internal error (incident {number})"))
            # not kept while the next item is awaited: a _Track holds its subscription, and
            # through it a connection that may end meanwhile
            del item

    def _failed(self, item: _Item, exc: BridgeError) -> None:
        if isinstance(item, _Track | _TrackMany | _Pin):
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if isinstance(item, _CatchUp) and item.done is not None and not item.done.done():
            item.done.set_result(0)
        self._catch_up_soon()

    def _catch_up_soon(self) -> None:
        """One catch-up of every tracked room after ``retry_delay``; calls meanwhile coalesce
        into it, so whatever triggers them costs at most one pass over the log per delay."""
        if not self._stopped and (self._retry is None or self._retry.done()):
            self._retry = asyncio.create_task(self._catch_up_later())

    async def _catch_up_later(self) -> None:
        await asyncio.sleep(self.retry_delay)
        await self._queue.put(_CatchUp())

    async def _check_hinted(self) -> None:
        users = None if self._hinted_all else self._hinted
        self._hinted, self._hinted_all = set(), False
        await self.access.check_users(users, fail_closed=True, why="hint")

    async def _on_change(self, note: Event | Pointer) -> None:
        """``note``: a verified change (signed by the capture triggers)."""
        if note.room not in self.hub:
            return
        if not self._users_checked:
            # Hints sent while the listener was away are lost: publish nothing before the
            # catch-up has checked every connected user. The log keeps what this announced.
            self._catch_up_soon()
            return
        action = on_notify(self.hub.last(note.room), note)
        if isinstance(action, Event):
            self._apply([action])
        elif isinstance(action, Read):
            await self._fill(action)

    async def _on_track(self, item: _Track) -> None:
        room = item.sub.room
        if room not in self.hub:
            head = await self.store.head(room)
            if item.future.done():  # the subscriber went away while we read
                return
            self.hub.track(room, head)
        if not item.future.done():
            item.future.set_result(self.hub.add(item.sub))

    async def _on_track_many(self, item: _TrackMany) -> None:
        # a room tracked when this began may lose its last subscriber while the heads are
        # read: its head is read too, in one more query
        heads: dict[str, int] = {}
        while new := sorted({sub.room for sub in item.subs
                             if sub.room not in self.hub and sub.room not in heads}):
            got = await self.store.heads(new)
            heads.update((room, got.get(room, 0)) for room in new)
            if item.future.done():  # the subscriber went away while we read
                return
        for sub in item.subs:
            self.hub.track(sub.room, heads.get(sub.room, 0))  # no-op for a tracked room
        item.future.set_result([self.hub.add(sub) for sub in item.subs])

    async def _on_pin(self, item: _Pin) -> None:
        # as _on_track_many: a room tracked when this began may lose its last subscriber while
        # the heads are read, and the asker may be gone (a leader stepping down) after it
        heads: dict[str, int] = {}
        while new := sorted({room for room in item.rooms
                             if room not in self.hub and room not in heads}):
            got = await self.store.heads(new)
            heads.update((room, got.get(room, 0)) for room in new)
            if item.future.done():
                return
        for room in item.rooms:
            self.hub.track(room, heads.get(room, 0))  # no-op for a tracked room
        item.future.set_result({room: self.hub.pin(room) for room in item.rooms})

    async def _catch_up(self, *, poll: bool = False) -> int:
        """Read every tracked room to the end of its log, in as few queries as the sequencer's
        :class:`~daemon.sequencer.Pass` allows (one for up to 500 rooms); return how many events
        were published. ``pgbridge_listener_rooms_behind`` counts the rooms not read to the end
        yet: 0 once this returns (by construction: comparing with the rooms' heads afterwards
        would cost a query and only measure commits racing their NOTIFYs); after a failure, the
        rooms it did not reach, until the retry (:meth:`_catch_up_soon`) starts over. Raises
        :class:`BridgeError`."""
        work = Pass(self.hub.rooms())
        self.metrics.rooms_behind.set(len(work))
        if not self._users_checked:
            await self.access.check_users(None, fail_closed=False,
                                          why="check after the listener connected")
            self._users_checked = True
        timer = self.metrics.read_poll if poll else self.metrics.read_catch_up
        published = 0
        while rooms := work.batch():
            cursors = {room: self.hub.last(room) for room in rooms if room in self.hub}
            limit = page_size(len(cursors))
            with timer.time():
                found = await self.store.read_rooms(cursors, limit=limit)
            self.metrics.gap_fills.inc()
            for room, after in cursors.items():
                page = take_page(room, after, found.get(room, ()), limit=limit)
                published += self._apply(page.steps)
                if page.more and room in self.hub:
                    work.again(room)
                else:
                    self.metrics.rooms_behind.dec()
        return published

    async def _fill(self, read: Read) -> None:
        """Publish the room's events after its last seq, up to ``read.upto``, from the log.
        Raises :class:`BridgeError`."""
        room = read.room
        self.metrics.gap_fills.inc()
        while room in self.hub:
            last = self.hub.last(room)
            with self.metrics.read_gap_fill.time():
                events = await self.store.read_events(room, after=last, upto=read.upto)
            page = take_page(room, last, events, limit=READ_PAGE, upto=read.upto)
            self._apply(page.steps)
            if page.missing is not None and room in self.hub:
                log.error("events %s..%s of room %s were announced but are not in "
                          "change_events (deleted or pruned?)", page.missing.first,
                          page.missing.last, room,
                          extra={"event": "log_hole", "room": room,
                                 "first": page.missing.first, "last": page.missing.last})
            if not page.more:
                return

    def _apply(self, steps: list[Event | Hole]) -> int:
        """Publish a page's events and report its holes, in order; return how many events.
        At DEBUG, each event's line and one per connection it was sent to (with its
        correlation id); the level is checked once per page, never per delivery."""
        published = 0
        debug = log.isEnabledFor(logging.DEBUG)
        for step in steps:
            if step.room not in self.hub:
                break
            if isinstance(step, Hole):
                ended = self.hub.hole(step.room, step.first, step.last)
                log.error("events %s..%s of room %s are missing from change_events (deleted "
                          "or pruned?); %d subscription(s) that needed them ended with "
                          "cursor_expired", step.first, step.last, step.room, ended,
                          extra={"event": "log_hole", "room": step.room, "first": step.first,
                                 "last": step.last})
                continue
            self.metrics.events.inc()
            self.metrics.captured(step.table, step.op)  # pgbridge_trigger_executions_total
            self.metrics.deliveries.inc(self.hub.publish(step))
            if self.relay is not None:
                self.relay(step)
            if debug:
                self._log_sent(step)
            # once per event, not per subscriber: every live subscriber has it written or queued
            captured = capture_time(step.frame)
            if captured is not None:
                self.metrics.latency_live.observe(max(0.0, time.time() - captured))
            if step.joins is not None:
                self.joined(step.joins, step.room)
            published += 1
        return published

    def _log_sent(self, event: Event) -> None:
        """DEBUG: ``event`` was published; one line per connection it was sent to (written or
        queued), carrying that connection's correlation id."""
        sent = self.hub.sent(event.room, event.seq)
        log.debug("event seq %d of room %s (%s %s) published to %d subscriber(s)", event.seq,
                  event.room, event.op, event.table, len(sent),
                  extra={"event": "event_published", "room": event.room, "seq": event.seq})
        for sub in sent:
            log.debug("event seq %d of room %s sent to user %s", event.seq, event.room,
                      sub.sink.user, extra={"event": "event_sent", "room": event.room,
                                            "seq": event.seq,
                                            "correlation_id": sub.sink.correlation_id})
