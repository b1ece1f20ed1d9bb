"""Shared test doubles for the unit tests: :class:`RecordingSink`, a :class:`daemon.hub.Sink`
that records the frames, overflows and ended subscriptions it is handed, and :func:`event`, a
factory of :class:`daemon.events.Event` objects whose frame carries only the seq. No I/O."""

from __future__ import annotations

import asyncio
import json

from websockets.frames import Frame
from websockets.streams import StreamReader

from daemon.events import Event
from daemon.hub import Subscription


class RecordingSink:
    """A hub :class:`~daemon.hub.Sink` that keeps what it is sent; ``sent`` is set at each
    frame (clear it to wait for the next)."""

    def __init__(self, user: str = "u1", correlation_id: str = "00000000000000a1") -> None:
        self.user = user
        self.correlation_id = correlation_id
        self.frames: list[bytes | str] = []
        self.sent = asyncio.Event()
        self.overflowed = False
        self.why = ""
        self.ended: list[Subscription] = []

    def send(self, frame: bytes | str) -> None:
        self.frames.append(frame)
        self.sent.set()

    def overflow(self, why: str) -> None:
        self.overflowed = True
        self.why = why

    def subscription_ended(self, sub: Subscription) -> None:
        self.ended.append(sub)

    def seqs(self) -> list[int]:
        return [json.loads(f)["seq"] for f in self.frames if isinstance(f, bytes)]


def event(seq: int, room: str = "R", **kw: object) -> Event:
    return Event(room=room, seq=seq, frame=json.dumps({"type": "event", "seq": seq}).encode(),
                 **kw)  # type: ignore[arg-type]


def parse_wire(data: bytes) -> Frame:
    """Read back one frame as a client does (unmasked, from a server)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError(f"not one whole frame: {data[:40]!r}")
