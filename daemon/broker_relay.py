"""The broker's messages (docs/topics/broker.md): what the leader publishes, and what every
instance hears, checked and handed on (:mod:`daemon.broker_wire` has their shapes).

I/O over one NATS client (``nats-py``), which :class:`daemon.broker.Broker` connects and
hands over (:attr:`Relay.nc`). Publishing never blocks the caller: messages wait in an
outbox, which one task empties in order (a room's events leave in seq order). What an
instance hears goes to the handlers the listener would use for the same note
(:meth:`daemon.listener.Listener.hand`): an event to the rooms (a repeat is dropped by seq, a
gap read from the log), a hint to its handler, a typing signal to the presence feed. A
message whose signature fails is dropped and counted (``pgbridge_broker_forged_total``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .broker_wire import CAPTURE, BrokerKeys, Subjects, missed, read_missed
from .events import Event, MemberHint, PresenceHint, UserHint, parse_notify
from .listener import Listener
from .logs import Throttled, incident
from .metrics import Metrics
from .notes import Change, Typing, classify
from .protocol import load_json
from .signing import NotifyKey, RejectBudget

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

    from .presence_feed import PresenceFeed
    from .rooms import Rooms

log = logging.getLogger(__name__)

__all__ = ["OUTBOX_LIMIT", "Relay", "tee"]

# Messages waiting to be published, past which ``overflow`` is called (the leader steps down:
# its followers read the log meanwhile, and find the gaps of what it dropped).
OUTBOX_LIMIT = 100_000
# Bytes kept free under the server's max_payload (1 MB by default) for the subject and headers.
PAYLOAD_MARGIN = 4096
# The subjects an instance hears, each with its own budget of forgeries (heartbeats, hints and
# typing signals, track replies: under 1 KB; a track reply of 1,000 rooms about 40 KB).
SUBJECTS = ("room", "signal", "typing", "leader", "track")
CONTROL_MAX = 64 * 1024  # bytes: a larger message on a subject but a room's is dropped unchecked


async def _ignore() -> None:
    pass


class Relay:
    """Publish and hear the broker's messages for ``rooms``, ``listener``'s handlers and
    ``presence_feed``. ``overflow()`` is called when the outbox is full."""

    def __init__(self, *, rooms: Rooms, listener: Listener, presence_feed: PresenceFeed,
                 metrics: Metrics, overflow: Callable[[], None]) -> None:
        self.rooms, self.listener, self.presence_feed = rooms, listener, presence_feed
        self.metrics = metrics
        self.overflow = overflow
        self.nc: NATS | None = None  # set by the broker once connected
        self.leading = False  # relay what this instance hears on LISTEN (the leader)
        self.following = False  # take the hints of the leader of `epoch` (a follower)
        self.epoch = 0  # the leader's, or ours while we lead (:meth:`start`)
        # the signal subject's messages are numbered in each epoch, so that a recorded one
        # replayed is dropped: the last number sent (leader), taken (follower)
        self._sent = self._taken = 0
        # forged messages checked per window and subject, then shed: a flood on one subject
        # (the signal's) does not drop another's messages (the leader's heartbeats)
        self.rejects = {subject: RejectBudget() for subject in SUBJECTS}
        self._shed = dict.fromkeys(SUBJECTS, 0)  # dropped unchecked in the current window
        self._shed_timers: dict[str, asyncio.TimerHandle] = {}
        self.on_shed: Callable[[], None] = lambda: None  # a window of shedding ended
        self.key: NotifyKey | None = None
        self.keys: BrokerKeys | None = None
        self.subjects: Subjects | None = None
        # the leader's missed() heard (set by the broker)
        self.on_missed: Callable[[], Awaitable[None]] = _ignore
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._forgeries = Throttled(log, interval=10.0)
        self._failures = Throttled(log, interval=30.0)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def start(self, epoch: int, *, leading: bool) -> None:
        """Lead (``leading``) or follow the leader of ``epoch`` from now on."""
        self.epoch, self.leading, self.following = epoch, leading, not leading
        self._sent = self._taken = 0

    def stop(self) -> None:
        """Neither lead nor follow (the fallback)."""
        self.leading = self.following = False

    def rekey(self, key: NotifyKey, database: str) -> None:
        """Use ``key`` (the schema's) and its subjects in ``database`` (its identity) from now
        on."""
        self.key, self.keys = key, BrokerKeys.of(key)
        self.subjects = Subjects.of(key, database)
        self.presence_feed.configure(self.presence_feed.typing_channel, key)
        self.presence_feed.broadcast = self.broadcast_typing

    # --- out ------------------------------------------------------------------------------

    def event(self, event: Event) -> None:
        """Leader: publish a published event to its room's subject (``Rooms.relay``); one
        larger than the broker takes goes as a pointer (its followers read it from the log)."""
        if self.subjects is None or self.keys is None:
            return
        data = self.keys.events.sign(event.frame.decode()).encode()
        if self.nc is not None and len(data) > self.nc.max_payload - PAYLOAD_MARGIN:
            pointer = json.dumps({"room": event.room, "seq": event.seq}, separators=(",", ":"))
            data = self.keys.events.sign(pointer).encode()
        self.put(self.subjects.room(event.room), data)
        self.metrics.broker_relayed.inc()

    def note(self, note: UserHint | MemberHint | PresenceHint | Typing) -> None:
        """Leader: relay a hint or a typing signal heard on LISTEN (a registered handler's
        :func:`daemon.broker.tee`); nothing on any other instance."""
        if not self.leading or self.subjects is None or self.keys is None:
            return
        if isinstance(note, Typing):
            text = json.dumps({"room": note.room, "user": note.user, "at": note.at},
                              separators=(",", ":"))
            self.put(self.subjects.typing, self.keys.typing.sign(text).encode())
            return
        kind = "presence" if isinstance(note, PresenceHint) else "access"
        what = "member" if isinstance(note, MemberHint) else "user"
        self._sent += 1
        text = json.dumps({kind: what, "user": note.user, "epoch": self.epoch, "n": self._sent},
                          separators=(",", ":"))
        self.put(self.subjects.signal, self.keys.events.sign(text).encode())

    def missed(self) -> None:
        """Leader: tell the followers that hints may have been lost (:func:`missed`)."""
        if self.leading and self.subjects is not None and self.keys is not None:
            self._sent += 1
            self.put(self.subjects.signal, missed(self.keys.control, self.epoch, self._sent))

    def broadcast_typing(self, payload: str) -> bool:
        """Send a typing signal (signed with the typing key) to every instance, this one's
        watchers included (NATS does not echo it back to us); false when the broker is not
        connected (the presence feed NOTIFYs it instead)."""
        if not self.connected or self.subjects is None:
            return False
        self.put(self.subjects.typing, payload.encode())
        self.presence_feed.typing_heard(payload)
        return True

    def put(self, subject: str, data: bytes) -> None:
        if self._outbox.qsize() < OUTBOX_LIMIT:
            self._outbox.put_nowait((subject, data))
        else:
            self.overflow()

    async def publish_forever(self) -> None:
        """Empty the outbox, in order, until cancelled. While the broker is down, messages are
        dropped: every instance then reads the log itself."""
        while True:
            subject, data = await self._outbox.get()
            nc = self.nc
            if nc is None or not nc.is_connected:
                continue
            try:
                await nc.publish(subject, data)
            except Exception as exc:  # nats: outbound buffer full, connection closed
                self._failures.warning("publish", "could not publish to the broker (%s)",
                                       str(exc) or type(exc).__name__,
                                       extra={"event": "broker_publish_failed"})

    async def on_error(self, exc: Exception) -> None:
        """nats-py's ``error_cb``: its errors, and what a subscription's callback raised (a bug
        of ours); a slow consumer's drop is :attr:`on_shed`'s to recover."""
        from nats.errors import Error, SlowConsumerError

        if not isinstance(exc, Error | OSError):
            incident(log, "broker_crashed", "a broker message's handler failed", exc_info=exc)
            return
        if isinstance(exc, SlowConsumerError):  # messages for us were dropped: the log has them
            self._failures.warning("slow", "the broker dropped messages to this instance (slow "
                                   "consumer); reading the log of every room",
                                   extra={"event": "broker_slow_consumer"})
            self.on_shed()  # not awaited: nats-py calls this in its read loop, once per drop
            return
        self._failures.warning("error", "broker: %s (reading the log ourselves until it is "
                               "back)", str(exc) or type(exc).__name__,
                               extra={"event": "broker_error"})

    # --- in -------------------------------------------------------------------------------

    def checking(self, subject: str, msg: Msg) -> bool:
        """Whether to check ``msg``, heard on ``subject`` (one of :data:`SUBJECTS`): false while
        a flood of forged messages on that subject is shed (what it may have carried is read
        from the log when the window ends, :meth:`forged`), and for a message on a control
        subject larger than any real one (:data:`CONTROL_MAX`), counted as forged unchecked."""
        if self.rejects[subject].shedding(time.monotonic()):
            self._shed[subject] += 1
            return False
        if subject != "room" and len(msg.data) > CONTROL_MAX:
            self.forged(subject)
            return False
        return True

    async def on_event(self, msg: Msg) -> None:
        """A room's subject: its signed event, to the rooms."""
        if not self.checking("room", msg):
            return
        note = classify(CAPTURE, _text(msg), self.keys.notes) if self.keys else None
        if isinstance(note, Change) and msg.subject.endswith("." + note.event.room):
            await self.rooms.changed(note, rang=False)
        else:
            self.forged("room")

    async def on_signal(self, msg: Msg) -> None:
        """The signal subject: a signed hint of the leader followed, newer than the last one
        taken, to the listener's handler of its kind; its :func:`missed`, to
        :attr:`on_missed`. A repeat, or another leader's, is dropped."""
        keys = self.keys
        if not self.checking("signal", msg) or keys is None:
            return
        lost = read_missed(keys.control, msg.data)
        text = keys.events.open(_text(msg)) if lost is None else None
        if lost is None and text is None:
            self.forged("signal")
            return
        try:
            obj = load_json(text, max_depth=1, max_brackets=1) if text is not None else {}
        except ValueError:
            obj = {}
        epoch, n = lost if lost is not None else (obj.get("epoch"), obj.get("n"))
        if not (self.following and epoch == self.epoch and isinstance(n, int)
                and n > self._taken):
            return  # replayed, a stale leader's, or not following
        self._taken = n
        if lost is not None:
            await self.on_missed()
            return
        note = parse_notify(text) if text is not None else None
        if isinstance(note, UserHint | MemberHint | PresenceHint):
            pending = self.listener.hand(note)
            if pending is not None:
                await pending

    async def on_typing(self, msg: Msg) -> None:
        """The typing subject: a signed typing signal, to the presence feed."""
        if self.checking("typing", msg) and not self.presence_feed.typing_heard(_text(msg)):
            self.forged("typing")

    def forged(self, subject: str) -> None:
        """Count a message that failed its check on ``subject``; once its budget
        (:attr:`rejects`) is spent, shed the rest of its window."""
        self.metrics.broker_forged.inc()
        self._forgeries.warning("forged", "ignored a message on the broker's %s subject that "
                                "failed its signature check (or was signed with another key)",
                                subject, extra={"event": "broker_forged"})
        now, budget = time.monotonic(), self.rejects[subject]
        if budget.rejected(now) and subject not in self._shed_timers:
            self._shed[subject] = 0
            self._shed_timers[subject] = asyncio.get_running_loop().call_later(
                max(0.0, budget.until - now), self._shed_over, subject)

    def _shed_over(self, subject: str) -> None:
        del self._shed_timers[subject]
        budget = self.rejects[subject]
        self._forgeries.warning("shed", "%d messages on the broker's %s subject failed their "
                                "signature check within %g s; dropped %d more unchecked; "
                                "reading every room's log", budget.limit, subject,
                                budget.window, self._shed[subject],
                                extra={"event": "broker_shed"})
        self.on_shed()


def _text(msg: Msg) -> str:
    try:
        return msg.data.decode()
    except UnicodeDecodeError:
        return ""


Handler = Callable[[Any], Awaitable[None] | None]


def tee(relay: Callable[[Any], None], handler: Handler) -> Handler:
    """A listener handler that also gives the note to ``relay`` (the leader relays the hints
    and typing signals it hears: :meth:`Relay.note`)."""
    def both(note: Any) -> Awaitable[None] | None:
        relay(note)
        return handler(note)
    return both
