"""Catching a new subscription up before it goes live: :func:`replay` sends it the events of
its room it missed, :func:`send_snapshot` its room's presence. Both go out in pages of at most
``page`` frames, each waiting for room in the connection's
:class:`daemon.outgoing.OutgoingQueue`: a client that only catches up, reading at the pace of
its socket, is never closed with 4008. They send through the subscription (its sink, the
:class:`daemon.client.Client`, behind its fault boundary) and stop when it ends or the queue
closes. The reading and the decisions are the store's and the sequencer's
(:func:`daemon.sequencer.take_page`); this only paces them.
"""

from __future__ import annotations

import logging
import time

from .events import capture_time
from .hub import Subscription
from .metrics import Metrics
from .outgoing import OutgoingQueue
from .presence_feed import PresenceFeed
from .sequencer import Hole, take_page
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["replay", "send_snapshot"]


async def replay(sub: Subscription, *, after: int, upto: int, page: int, store: Store,
                 metrics: Metrics, outgoing: OutgoingQueue) -> None:
    """Replay to ``sub`` the events of its room with ``after < seq <= upto``, read from
    ``store`` in pages of at most ``page`` events; ``pgbridge_replayed_events`` counts the
    ones sent. Events missing from the log end ``sub`` with ``cursor_expired`` (logged, event
    ``log_hole``), never a silent gap. Raises :class:`daemon.errors.BridgeError` when the
    database fails."""
    room = sub.room
    while after < upto and not sub.ended and not outgoing.closing:
        await outgoing.room_for(page)
        with metrics.read_replay.time():
            events = await store.read_events(room, after=after, upto=upto, limit=page)
        taken = take_page(room, after, events, limit=page, upto=upto)
        now, sent = time.time(), 0
        for step in taken.steps:
            if isinstance(step, Hole):
                break
            sub.replay(step)
            if sub.last_sent == step.seq:  # sent: not skipped, not a revocation
                sent += 1
                captured = capture_time(step.frame)
                if captured is not None:
                    metrics.latency_replay.observe(max(0.0, now - captured))
        metrics.replayed.inc(sent)
        if sent and log.isEnabledFor(logging.DEBUG):  # once per page
            log.debug("replayed %d event(s) of room %s after seq %d, up to seq %d", sent, room,
                      after, sub.last_sent,
                      extra={"event": "replayed", "room": room, "after": after,
                             "seq": sub.last_sent, "correlation_id": sub.sink.correlation_id})
        hole = next((s for s in taken.steps if isinstance(s, Hole)), taken.missing)
        if hole is not None and not sub.ended:
            # events the subscription needs are gone from the log: never a silent gap
            log.warning("events %s..%s of room %s are missing from change_events; the "
                        "subscription of user %s replaying them ended with cursor_expired",
                        hole.first, hole.last, room, sub.sink.user,
                        extra={"event": "log_hole", "room": room, "first": hole.first,
                               "last": hole.last, "correlation_id": sub.sink.correlation_id})
            sub.end("cursor_expired")
        if not taken.more:
            break
        after = taken.cursor


async def send_snapshot(sub: Subscription, *, page: int, presence_feed: PresenceFeed,
                        metrics: Metrics, outgoing: OutgoingQueue) -> None:
    """The presence snapshot of ``sub``'s room, paced like a replay (``page`` frames at a
    time); then the changes since (:meth:`daemon.hub.Subscription.presence_live`).
    ``pgbridge_presence_frames`` counts the frames."""
    states = await presence_feed.snapshot(sub)
    for i in range(0, len(states), page):
        await outgoing.room_for(page)
        if sub.ended or outgoing.closing:
            return
        for state in states[i:i + page]:
            sub.sink.send(state.frame())
    metrics.presence_frames.inc(len(states))
    sub.presence_live()
