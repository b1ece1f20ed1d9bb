"""One feed per user (PROTOCOL.md, "One feed per user"): a connection's ``feed`` follows every
room its user is a member of, now and later, without a ``subscribe`` per room.

A :class:`Feed` is a set of ordinary :class:`daemon.hub.Subscription` objects of its connection
(``feed=True``: not counted against ``PGBRIDGE_MAX_SUBSCRIPTIONS``), so delivery, order,
revocation (``membership_revoked``, ``room_deleted``), ``cursor_expired`` and acks are the hub's
and the client's as for any subscription. What is the feed's own:

* **The start** (:meth:`Feed.start`): ONE statement, :data:`FEED_ROOMS`, reads in one MVCC snapshot
  whether the user is live, every room the user is a member of, each one's head H and the
  user's acked seq, and the unread count (messages of other users, not soft-deleted, whose
  ``INSERT`` event is after the acked seq, counted up to :data:`UNREAD_MAX`). Each room's
  subscription starts at H (``from`` = ``checked_at`` = H, as a ``subscribe`` whose membership
  was checked at H) and all of them are registered in one turn of the rooms' processor
  (:meth:`daemon.rooms.Rooms.add_many`: one more query, for the heads of the rooms nobody here
  followed yet). The ``feed`` frame leaves before any event; events in (H, L] committed
  between the read and the registration are replayed from the log, the rest arrive live.
* **Joins.** A ``channel_members`` row inserted or moved, or a room restored, sends a signed
  hint naming the user (``{"access": "member", ...}``, sql/triggers/20_access.sql).
  :class:`Feeds` reads the memberships of the hinted users' feeds again, batched
  (:meth:`Feeds.recheck`), and follows each room a feed does not cover yet from its join event
  (:data:`JOINS`; without one, after the room's restore, else from the head), up to
  ``PGBRIDGE_FEED_MAX_ROOMS`` rooms: past it, an ``error`` ``rate_limited`` names each room not
  followed, once. After every listener reconnect (hints may have been lost) and after a feed's
  room ended with ``membership_revoked`` (the user may be back already), the same happens.
* **Take-over and give-back.** A ``subscribe`` to a room the feed follows releases the feed's
  subscription (:meth:`daemon.hub.Subscription.release`, no frame) and takes the room over;
  its ``unsubscribe`` gives the room back (:meth:`Feed.ended`): the feed follows it again from
  that subscription's cursor, after checking the membership as for a join (from its join
  event instead when the user left and came back after that cursor).

Each feed's follows run in order in its own task (:meth:`Feed._work`), never in the shared
recheck task, so that a client that reads slowly (a replay waits for room in its queue) holds
nothing but itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from . import logs
from .errors import BridgeError
from .events import MemberHint
from .feed_queries import FEED_ROOMS, JOIN_LOOKBACK, JOINS, MEMBERSHIPS, UNREAD_MAX
from .hub import Hub, Sink, Subscription
from .metrics import Metrics
from .notes import Keys
from .outgoing import OutgoingQueue
from .protocol import FeedRoom, ProtocolError, error, feed_frame
from .replay import replay
from .settings import DaemonSettings
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["JOIN_LOOKBACK", "UNREAD_MAX", "Feed", "FeedOwner", "FeedRooms", "Feeds"]

RECHECK_BATCH = 500  # feeds whose memberships one statement reads


class FeedRooms(Protocol):
    """Where a feed's subscriptions are registered: :meth:`daemon.rooms.Rooms.add_many`."""

    async def add_many(self, subs: list[Subscription]) -> list[int]: ...


class FeedOwner(Sink, Protocol):
    """The connection a feed belongs to (:class:`daemon.client.Client`): the sink of its
    subscriptions, and where they are kept (``subs``, room -> subscription)."""

    subs: dict[str, Subscription]
    outgoing: OutgoingQueue

    def user_gone(self) -> None: ...

    def crashed(self, doing: str) -> None: ...


# (room, from, checked_at): a room to follow, from this seq on, its membership checked at this
# seq (its head when checked)
_Start = tuple[str, int, int]


class Feed:
    """One connection's feed. ``rooms``: the rooms it covers, followed by its own subscription
    or taken over by a ``subscribe`` of the connection; ``ready``: :meth:`start` is over."""

    def __init__(self, owner: FeedOwner, feeds: Feeds, *, page: int) -> None:
        self.owner = owner
        self.feeds = feeds  # the registry, and what every feed works with
        self.page = page
        self.rooms: set[str] = set()
        self.ready = False
        self.dirty = False  # a recheck was asked for while starting
        self.refused: set[str] = set()  # rooms not followed, past PGBRIDGE_FEED_MAX_ROOMS
        self._queued: list[list[_Start]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def user(self) -> str:
        return self.owner.user

    async def start(self, ref: str | None) -> None:
        """Answer the ``feed`` request: read the rooms, register them, send the ``feed`` frame,
        catch each room up and let it go live. Raises :class:`ProtocolError` (over
        ``PGBRIDGE_FEED_MAX_ROOMS``) and :class:`daemon.errors.BridgeError` (the database
        failed: nothing is followed)."""
        began = time.perf_counter()
        self.feeds.register(self)
        try:
            rows = await self.feeds.store._all(  # the Store's pool; this module holds the query
                FEED_ROOMS, {"user": self.user, "max_rooms": self.feeds.settings.feed_max_rooms,
                        "cap": UNREAD_MAX}, "reading a feed's rooms", purpose="feed")
        except BaseException:
            self.feeds.unregister(self)
            raise
        live, count = rows[0][0], int(rows[0][1])
        if not live or self.owner.outgoing.closing:
            self.feeds.unregister(self)
            if not live:
                self.owner.user_gone()
            return
        if count > self.feeds.settings.feed_max_rooms:
            self.feeds.unregister(self)
            raise ProtocolError("rate_limited", f"a feed follows at most "
                                f"{self.feeds.settings.feed_max_rooms} rooms; this user is in "
                                f"{count}", ref=ref)
        listed = [FeedRoom(str(room), int(head), int(acked), int(unread))
                  for _, _, room, head, acked, unread in rows if room is not None]
        await self._follow([(r.room, r.head, r.head) for r in listed],
                           first=feed_frame(listed, ref))
        self.ready = True
        log.debug("user %s opened a feed of %d room(s) in %.1f ms", self.user, len(listed),
                  (time.perf_counter() - began) * 1000,
                  extra={"event": "feed_opened", "rooms": len(listed),
                         "correlation_id": self.owner.correlation_id})
        if self.dirty:
            self.feeds.recheck(self)

    def ended(self, sub: Subscription) -> None:
        """``sub`` of the owner ended (the owner calls this from its ``subscription_ended``):
        a room revoked, deleted or expired is no longer covered (after a revocation the
        memberships are read again: the user may be back already); a ``subscribe``'s that
        was unsubscribed gives its room back, followed again from its cursor."""
        if sub.room not in self.rooms or self.owner.outgoing.closing:
            return
        if sub.ended and sub.end_reason is None:  # released: a subscribe took the room over
            return
        if sub.feed and not sub.ended:  # the feed's own, dropped by _follow: not followed
            self.rooms.discard(sub.room)
            return
        if sub.ended:
            self.rooms.discard(sub.room)
            if sub.end_reason == "membership_revoked":
                self.feeds.recheck(self)
            return
        self.rooms.discard(sub.room)  # unsubscribed: back to the feed once checked
        self.feeds.recheck(self, {sub.room: sub.cursor})

    def close(self) -> None:
        """The connection ended."""
        self.feeds.unregister(self)
        if self._task is not None:
            self._task.cancel()

    def follow(self, starts: list[_Start]) -> None:
        """Follow ``starts`` (found by a recheck), in this feed's own task, after what it
        already follows."""
        if starts and not self.owner.outgoing.closing:
            self._queued.append(starts)
            if self._task is None:
                self._task = asyncio.create_task(self._work(), name=f"feed-{id(self):x}")

    async def _work(self) -> None:
        starts: list[_Start] = []
        try:
            while self._queued and not self.owner.outgoing.closing:
                starts = self._queued.pop(0)
                await self._follow(starts)
        except BridgeError as exc:  # the rooms it could not follow are tried again later,
            log.warning("could not follow new rooms of user %s's feed (%s); reading its "
                        "memberships again", self.user, exc,
                        extra={"event": "feed_follow_failed",
                               "correlation_id": self.owner.correlation_id})
            # from where each was to start (a room given back keeps its cursor)
            self.feeds.recheck(self, {room: after for part in (starts, *self._queued)
                                      for room, after, _ in part}, later=True)
        except Exception:  # a bug: it ends this connection, never the feeds of others
            with logs.correlated(self.owner.correlation_id):
                self.owner.crashed("following a feed's new rooms")
        finally:
            self._task = None
            self._queued.clear()

    async def _follow(self, starts: list[_Start], *, first: str | None = None) -> None:
        """Register a subscription per start not covered yet, send ``first`` (the ``feed``
        frame), replay what each missed and let it go live. Raises
        :class:`daemon.errors.BridgeError`."""
        owner, parts = self.owner, self.feeds
        subs = []
        for room, from_seq, checked_at in starts:
            self.rooms.add(room)
            if room in owner.subs:  # a subscribe of the connection covers it
                continue
            sub = Subscription(owner, room, pending_limit=parts.settings.queue_size,
                               checked_at=checked_at, feed=True)
            sub.from_seq = from_seq
            owner.subs[room] = sub
            subs.append(sub)
        parts.metrics.subscriptions.inc(len(subs))
        try:
            lasts = await parts.rooms.add_many(subs)
            if first is not None and not owner.outgoing.closing:
                owner.send(first)
            if any(last > sub.checked_at for sub, last in zip(subs, lasts, strict=True)
                   if sub.checked_at is not None) and not await parts.store.live_user(self.user):
                owner.user_gone()  # deleted after the check (its hint may still be on its way)
            for sub, last in zip(subs, lasts, strict=True):
                if owner.outgoing.closing:
                    break
                await replay(sub, after=sub.from_seq, upto=last, page=self.page,
                             store=parts.store, metrics=parts.metrics, outgoing=owner.outgoing)
        except BaseException:
            for sub in subs:
                self._drop(sub)
            raise
        for sub in subs:
            if sub.ended or owner.outgoing.closing or owner.subs.get(sub.room) is not sub:
                self._drop(sub)
            elif sub.go_live():  # an event buffered meanwhile ended it (and told the owner)
                parts.hub.remove(sub)

    def _drop(self, sub: Subscription) -> None:
        self.feeds.hub.remove(sub)
        if self.owner.subs.get(sub.room) is sub:
            self.owner.subscription_ended(sub)


class Feeds:
    """Every feed of this daemon by user: where membership hints (:meth:`hinted`) and listener
    reconnects (:meth:`missed`, a :class:`daemon.listener.Follower`) reach them. One task
    reads the memberships of the feeds that need it, :data:`RECHECK_BATCH` at a time; what a
    feed then follows, it follows in its own task (:meth:`Feed.follow`).

    What every feed works with: ``store`` (its statements, the replays), ``rooms``
    (:meth:`daemon.rooms.Rooms.add_many`), ``hub`` (where its subscriptions are removed),
    ``metrics`` and ``settings`` (``PGBRIDGE_QUEUE_SIZE``, ``PGBRIDGE_FEED_MAX_ROOMS``).
    :attr:`retry_delay`: seconds before a failed read is tried again."""

    def __init__(self, store: Store, rooms: FeedRooms, hub: Hub, metrics: Metrics,
                 settings: DaemonSettings) -> None:
        self.store = store
        self.rooms = rooms
        self.hub = hub
        self.metrics = metrics
        self.settings = settings
        self._by_user: dict[str, set[Feed]] = {}
        # feeds to read again, with the rooms to give back to them (room -> the seq after
        # which to follow it again)
        self._pending: dict[Feed, dict[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self.retry_delay = 1.0

    def register(self, feed: Feed) -> None:
        self._by_user.setdefault(feed.user, set()).add(feed)

    def unregister(self, feed: Feed) -> None:
        feeds = self._by_user.get(feed.user)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._by_user[feed.user]
        self._pending.pop(feed, None)

    def __len__(self) -> int:
        return sum(len(feeds) for feeds in self._by_user.values())

    def hinted(self, note: MemberHint) -> None:
        """A membership of ``note.user`` was added or moved: read that user's feeds again."""
        for feed in tuple(self._by_user.get(note.user, ())):
            self.recheck(feed)

    def deaf(self) -> None:
        """The LISTEN connection is down: hints are lost until :meth:`missed`."""

    async def missed(self, keys: Keys) -> None:
        """Hints sent before may have been lost: read every feed's memberships again."""
        del keys
        for feeds in tuple(self._by_user.values()):
            for feed in tuple(feeds):
                self.recheck(feed)

    def recheck(self, feed: Feed, give_back: dict[str, int] | None = None, *,
                later: bool = False) -> None:
        """Read ``feed``'s memberships again and follow the rooms it does not cover;
        ``give_back``: rooms to follow again after the given seq (their ``subscribe`` ended)
        rather than from their join event. ``later``: after :attr:`retry_delay` (a failure)."""
        if feed.user not in self._by_user or feed not in self._by_user[feed.user]:
            return
        if not feed.ready:
            feed.dirty = True
            if give_back:
                self._pending.setdefault(feed, {}).update(give_back)
            return
        self._pending.setdefault(feed, {}).update(give_back or {})
        if self._task is None:
            self._task = asyncio.create_task(self._run(self.retry_delay if later else 0.0),
                                             name="feeds-recheck")

    async def _run(self, delay: float) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)
            while ready := [f for f in self._pending if f.ready][:RECHECK_BATCH]:
                batch = {feed: self._pending.pop(feed) for feed in ready}
                try:
                    await self._recheck(batch)
                except BridgeError as exc:
                    log.warning("could not read the memberships of %d feed(s) (%s); trying "
                                "again in %.1f s", len(batch), exc, self.retry_delay,
                                extra={"event": "feed_recheck_failed"})
                    for feed, rooms in batch.items():
                        if feed in self._by_user.get(feed.user, ()):  # still open
                            self._pending.setdefault(feed, {}).update(rooms)
                    await asyncio.sleep(self.retry_delay)
        except Exception:  # a bug: logged once; the next hint or reconnect starts over
            logs.incident(log, "feed_recheck_crashed", "reading feeds' memberships failed")
            self._pending.clear()
        finally:
            self._task = None

    async def _recheck(self, batch: dict[Feed, dict[str, int]]) -> None:
        users = sorted({feed.user for feed in batch})
        rows = await self.store._all(MEMBERSHIPS, (users,), "reading feeds' memberships",
                                     purpose="feed_members")
        member: dict[str, set[str]] = {}
        for user, room in rows:
            member.setdefault(str(user), set()).add(str(room))
        wanted = {(feed.user, room) for feed in batch
                  for room in member.get(feed.user, set()) - feed.rooms}
        wanted |= {(feed.user, room) for feed, back in batch.items() for room in back}
        if not wanted:
            return
        pairs = sorted(wanted)
        checked = await self.store._all(
            JOINS, ([u for u, _ in pairs], [r for _, r in pairs]),
            "reading the joins of feeds' new rooms", purpose="feed_members")
        found: dict[str, list[tuple[str, int, int | None, int | None]]] = {}
        for user, room, head, left, join in checked:
            found.setdefault(str(user), []).append(
                (str(room), int(head), None if left is None else int(left),
                 None if join is None else int(join)))
        for feed, back in batch.items():
            # a room given back while these reads ran is not covered now: it comes back after
            # its subscription's cursor, never from its join event or this head
            back = {**back, **self._pending.get(feed, {})}
            starts = []
            for room, head, left, join in found.get(feed.user, ()):
                if room in feed.rooms and room not in back:
                    continue
                if room in back and (left is None or left <= back[room]):
                    after = back[room]  # given back, the user a member since
                else:  # joined (again, after the cursor of a room given back: nothing between)
                    # without a join since the last leave or soft delete: a room restored,
                    # followed from its restoring event (or a membership the log misses)
                    after = (head if left is None else left) if join is None else join - 1
                starts.append((room, min(after, head), head))
            feed.follow(self._within_cap(feed, sorted(starts), back))

    def _within_cap(self, feed: Feed, starts: list[_Start], back: dict[str, int]
                    ) -> list[_Start]:
        """``starts`` that keep ``feed`` within ``PGBRIDGE_FEED_MAX_ROOMS`` (rooms given back
        first: they were followed before); each room left out is named once, in an ``error``
        ``rate_limited`` frame and a log line."""
        given = [s for s in starts if s[0] in back]
        fresh = [s for s in starts if s[0] not in back]
        room_left = max(0, self.settings.feed_max_rooms - len(feed.rooms) - len(given))
        for room, _, _ in fresh[room_left:]:
            if room not in feed.refused:
                feed.refused.add(room)
                log.warning("the feed of user %s follows %d rooms, PGBRIDGE_FEED_MAX_ROOMS: "
                            "room %s is not followed", feed.user, len(feed.rooms), room,
                            extra={"event": "feed_full", "room": room,
                                   "correlation_id": feed.owner.correlation_id})
                feed.owner.send(error("rate_limited", f"a feed follows at most "
                                      f"{self.settings.feed_max_rooms} rooms: this one is "
                                      "not followed", room=room))
        return given + fresh[:room_left]
