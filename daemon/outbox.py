"""What leaves a connection, and in what: WebSocket frames encoded once per fan-out, and frames
coalesced into one message for clients that asked (PROTOCOL.md, "Coalesced messages").

Why (README, "Fan-out cost"): writing to a TCP socket costs the daemon about 7 µs of kernel time
per write on this kind of machine, whatever the size, more than all of its own Python work per
delivery. Two levers follow:

* **encode once**: a frame sent to the subscribers of a room is the same bytes on every
  connection (a server's frames are not masked, and the bridge negotiates no compression), so
  :func:`wire_frame` serializes it once (websockets' own :class:`~websockets.frames.Frame`) and
  each connection only writes it;
* **coalescing**: a client that connects with ``?batch=MS`` receives the frames that are pending
  for it together, joined by ``\\n`` in one text message (:func:`take_message`), one write for
  many events. :class:`Flusher` waits up to ``MS`` milliseconds for more frames, with one event
  loop callback per wait, whatever the number of connections waiting.

Pure except :class:`Flusher`, which only schedules callbacks on the running loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from websockets.frames import Frame, Opcode

log = logging.getLogger(__name__)

__all__ = ["BATCH_BYTES", "MAX_BATCH_MS", "Flushable", "Flusher", "take_message", "text_frame",
           "wire_frame"]

BATCH_BYTES = 64 * 1024  # a coalesced message holds at most this much (a larger frame goes alone)
MAX_BATCH_MS = 1000  # the longest wait a client may ask for (?batch=)


class _LastFrame:
    """The frame most recently encoded and its wire bytes. The hub offers an event to all the
    subscribers of its room in a row, so one entry makes the encoding once per fan-out; it holds
    the frame, so the identity it is looked up by cannot be reused meanwhile."""

    __slots__ = ("frame", "wire")

    def __init__(self) -> None:
        self.frame: bytes | str | None = None
        self.wire = b""


_last = _LastFrame()


def wire_frame(frame: bytes | str) -> bytes:
    """The bytes of an unfragmented, unmasked WebSocket text frame (RFC 6455, section 5.2) that
    carries ``frame`` (UTF-8 bytes, or a str to encode), as a server sends it without
    extensions. Encoded once for consecutive calls with the same object."""
    if frame is not _last.frame:
        _last.wire = text_frame(frame.encode() if isinstance(frame, str) else frame)
        _last.frame = frame
    return _last.wire


def text_frame(payload: bytes) -> bytes:
    """:func:`wire_frame` without the memory of the last frame (a coalesced message is sent
    once)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


def take_message(queue: deque[bytes | str], limit: int = BATCH_BYTES) -> tuple[bytes, int]:
    """Pop from the left of ``queue`` (not empty) the frames that fit in ``limit`` bytes, at
    least one, and return them joined by ``\\n`` as one message, with their count. Frames hold
    no raw newline (they are JSON without indentation), so a client splits the message on
    ``\\n`` to get them back."""
    parts: list[bytes] = []
    size = -1
    while queue:
        frame = queue[0]
        data = frame.encode() if isinstance(frame, str) else frame
        if parts and size + 1 + len(data) > limit:
            break
        queue.popleft()
        parts.append(data)
        size += 1 + len(data)
    return b"\n".join(parts), len(parts)


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
            if delay > 0:
                loop.call_later(delay, self._flush, delay)
            else:
                loop.call_soon(self._flush, delay)
        waiting.append(conn)

    def _flush(self, delay: float) -> None:
        for conn in self._waiting.pop(delay, ()):
            try:
                conn.flush()
            except Exception:  # a bug: it must not keep the other connections waiting
                log.exception("flushing a connection failed", extra={"event": "flush_failed"})
