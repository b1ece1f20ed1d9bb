"""What leaves a connection, and in what: WebSocket frames encoded once per fan-out, and frames
coalesced into one message for clients that asked (PROTOCOL.md, "Coalesced messages").

Why (docs/topics/fan-out-cost.md): writing to a TCP socket costs the daemon about 7 µs of
kernel time per write on this kind of machine, whatever the size, more than all of its own
Python work per delivery. Two levers follow:

* **encode once**: a frame sent to the subscribers of a room is the same bytes on every
  connection (a server's frames are not masked, and the bridge negotiates no compression), so
  :func:`wire_message` serializes it once (websockets' own :class:`~websockets.frames.Frame`) and
  each connection only writes it;
* **coalescing**: a client that connects with ``?batch=MS`` receives the frames that are pending
  for it together, joined by ``\\n`` in one text message (:func:`take_frames`), one write for
  many events. :class:`Flusher` waits up to ``MS`` milliseconds for more frames, with one event
  loop callback per wait, whatever the number of connections waiting.

Pure except :class:`Flusher`, which only schedules callbacks on the running loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from websockets.frames import Frame, Opcode

log = logging.getLogger(__name__)

__all__ = ["BATCH_BYTES", "MAX_BATCH_MS", "Flushable", "Flusher", "joined", "take_frames",
           "wire_message"]

BATCH_BYTES = 64 * 1024  # a coalesced message holds at most this much (a larger frame goes alone)
MAX_BATCH_MS = 1000  # the longest wait a client may ask for (?batch=)


class _Last:
    """The frames most recently encoded and their wire bytes. The hub offers an event to all
    the subscribers of its room in a row, and the coalescing subscribers of a room flush the
    same frames in a row, so one entry encodes them once per fan-out. It holds the frames, so
    the identities it compares cannot be reused meanwhile."""

    __slots__ = ("frames", "wire")

    def __init__(self) -> None:
        self.frames: tuple[bytes | str, ...] = ()
        self.wire = b""


_last = _Last()


def wire_message(frames: Sequence[bytes | str]) -> bytes:
    """The bytes of an unfragmented, unmasked WebSocket text frame (RFC 6455, section 5.2), as
    a server sends it without extensions, that carries ``frames`` (UTF-8 bytes, or str to
    encode; at least one) joined by ``\\n``. Frames hold no raw newline (they are JSON without
    indentation), so a client splits the message on ``\\n`` to get them back. Encoded once
    for consecutive calls with the same frame objects."""
    last = _last.frames
    if len(frames) == len(last) and (frames[0] is last[0] if len(last) == 1 else all(
            a is b for a, b in zip(frames, last, strict=True))):
        return _last.wire
    _last.wire = Frame(Opcode.TEXT, joined(frames)).serialize(mask=False, extensions=[])
    _last.frames = tuple(frames)
    return _last.wire


def joined(frames: Sequence[bytes | str]) -> bytes:
    """The payload of a message of ``frames``: UTF-8, joined by ``\\n``."""
    if len(frames) == 1:
        frame = frames[0]
        return frame.encode() if isinstance(frame, str) else frame
    return b"\n".join(frame.encode() if isinstance(frame, str) else frame for frame in frames)


def take_frames(queue: deque[bytes | str], limit: int = BATCH_BYTES) -> list[bytes | str]:
    """Pop from the left of ``queue`` (not empty) the frames that fit in one message of
    ``limit`` bytes (:func:`wire_message`), at least one. A str frame is the daemon's own
    JSON, ASCII only (``json.dumps`` escapes the rest), so its length is its size."""
    frames = [queue.popleft()]
    size = len(frames[0])
    while queue and size + 1 + len(queue[0]) <= limit:
        frame = queue.popleft()
        frames.append(frame)
        size += 1 + len(frame)
    return frames


class Flushable(Protocol):
    def flush(self) -> None:
        """Send what is pending now."""


class Flusher:
    """Calls :meth:`Flushable.flush` of each connection :meth:`mark`-ed, at most ``delay``
    seconds after it was marked: every connection marked with the same delay while a wait runs
    is flushed when it ends, so a fan-out to thousands of coalescing connections costs one loop
    callback, not one timer per connection. A delay of 0 flushes on the next turn of the loop,
    after the current task step (a burst of events, a page of a replay) has queued everything."""

    def __init__(self) -> None:
        self._waiting: dict[float, list[Flushable]] = {}

    def mark(self, conn: Flushable, delay: float) -> None:
        """Flush ``conn`` within ``delay`` seconds; the caller marks it once until flushed."""
        waiting = self._waiting.get(delay)
        if waiting is None:
            waiting = self._waiting[delay] = []
            loop = asyncio.get_running_loop()
            # for every connection marked: none of the first one's context (its correlation
            # id, daemon/logs.py)
            context = contextvars.Context()
            if delay > 0:
                loop.call_later(delay, self._flush, delay, context=context)
            else:
                loop.call_soon(self._flush, delay, context=context)
        waiting.append(conn)

    def _flush(self, delay: float) -> None:
        for conn in self._waiting.pop(delay, ()):
            try:
                conn.flush()
            except Exception:  # a bug: it must not keep the other connections waiting
                log.exception("flushing a connection failed", extra={"event": "flush_failed"})
