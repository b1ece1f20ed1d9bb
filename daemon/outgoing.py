"""What one WebSocket connection sends after the upgrade: :class:`OutgoingQueue`, its bounded
queue of frames, the writer task that drains it at the pace of the socket, and the close of a
client that cannot keep up (4008, :attr:`daemon.closes.Close.TOO_SLOW`). Its owner, the
connection's :class:`daemon.client.Client`, decides what to send; this only sends.

The fan-out never waits for a client: a frame is written to the socket at once while the
client keeps up (its socket buffer below the high-water mark and nothing queued); otherwise it
joins the client's bounded queue (``PGBRIDGE_QUEUE_SIZE`` frames), which the client's writer task
drains at the pace of the socket. A client is closed with 4008 (it resumes with ``since``) when
its queue overflows, or when its socket accepts nothing for ``PGBRIDGE_SEND_TIMEOUT`` seconds
while frames wait; its kernel send buffer is ``PGBRIDGE_SEND_BUFFER`` bytes, so a client that
stops reading is noticed after that much, not after the megabytes an auto-tuned buffer holds.
One slow client never delays the others. A client that asked for coalesced messages
(``?batch=MS``, PROTOCOL.md) has its frames wait in the queue up to MS ms and leave together,
one message per write (:mod:`daemon.outbox`); its writer task, like the queue itself, exists
only while frames wait. A replay or a presence snapshot paces itself on the queue
(:meth:`OutgoingQueue.room_for`): it waits for room rather than overflow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import logs
from .closes import Close
from .connection import contained
from .metrics import Metrics
from .outbox import Flusher, take_frames, wire_message

log = logging.getLogger(__name__)

__all__ = ["OutgoingQueue", "Wire"]


class Wire(Protocol):
    """What the queue needs of its connection (:class:`daemon.connection.Connection`): its
    ``id`` and ``correlation_id`` (for the log), its asyncio ``transport`` (write buffer size
    and limits in bytes, the socket), and the methods below."""

    @property
    def id(self) -> int: ...

    @property
    def correlation_id(self) -> str: ...

    @property
    def transport(self) -> asyncio.WriteTransport: ...

    @property
    def open(self) -> bool:
        """True while frames may be sent."""

    def write(self, data: bytes) -> None:
        """Write encoded frames (:func:`daemon.outbox.wire_message`) without waiting."""

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark, or the connection
        ended."""

    def close(self, code: Close, reason: str = "") -> None:
        """Start the closing handshake."""

    def fail(self, code: Close, reason: str = "") -> None:
        """Send a close frame and end the connection without waiting for the peer's."""

    def crashed(self, doing: str) -> None:
        """A bug met while ``doing``: end the connection with 1011 and an incident id."""


_NO_FRAMES: deque[bytes | str] = deque(maxlen=0)  # the queue of every client with none waiting


def _nothing() -> None:
    """The ``on_close`` of a queue whose connection ended."""


class OutgoingQueue:
    """The frames waiting to leave one connection ``ws`` (of user ``user``, for the log) and
    the task that writes them; a :class:`daemon.outbox.Flushable` of ``flusher``.

    ``size``: frames the queue holds before the client is closed with 4008
    (``PGBRIDGE_QUEUE_SIZE``); ``page``: the most frames a replay queues at once, and the
    coalesced frames that leave at once rather than wait (at most half of ``size``);
    ``send_timeout``: seconds the socket may accept nothing while frames wait
    (``PGBRIDGE_SEND_TIMEOUT``); ``send_buffer``: the socket's kernel send buffer in bytes
    (``PGBRIDGE_SEND_BUFFER``); ``batch_ms``: the client's ``?batch=`` wait in milliseconds,
    ``None`` for one frame per message. ``on_close`` is called when the queue stops before
    the close frame is sent (the owner leaves its rooms there). :attr:`closing` is true once
    nothing more is sent: closed here, or the connection ended."""

    __slots__ = ("_batch", "_drained", "_flusher", "_high_water", "_limit", "_marked",
                 "_metrics", "_on_close", "_page", "_queue", "_send_timeout", "_user",
                 "_writer", "_writing", "closing", "ws")

    def __init__(self, ws: Wire, *, user: str, size: int, page: int, send_timeout: float,
                 send_buffer: int, batch_ms: int | None, flusher: Flusher, metrics: Metrics,
                 on_close: Callable[[], None]) -> None:
        self.ws = ws
        self._user = user
        # An idle connection holds no queue of its own (an empty deque is 760 bytes) and no
        # event: both are made when frames first wait (docs/topics/fan-out-cost.md).
        self._queue: deque[bytes | str] = _NO_FRAMES
        self._drained: asyncio.Event | None = None  # set when the queue was emptied
        self.closing = False
        self._writing = False  # a writer task is draining the queue
        # ?batch=MS (PROTOCOL.md, "Coalesced messages"): frames wait up to MS ms in the queue
        # and leave together; None: one frame per message
        self._batch = None if batch_ms is None else batch_ms / 1000
        self._marked = False  # waiting for the flusher
        self._limit = size
        self._page = page
        self._send_timeout = send_timeout
        self._flusher = flusher
        self._metrics = metrics
        self._on_close = on_close
        # what the connection's drain() waits below (its write_limit); fixed for its life
        self._high_water = ws.transport.get_write_buffer_limits()[1]
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:  # a fixed size also turns the kernel's auto-tuning off
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self._writer: asyncio.Task[None] | None = None

    def send(self, frame: bytes | str) -> None:
        """Send ``frame`` (bytes: UTF-8 JSON, shared by the subscribers of a room) now, or
        queue it; never blocks. A full queue closes the client with 4008. Called inside the
        owner's fault boundary (:func:`daemon.connection.contained`)."""
        if self.closing:
            return
        if not self._batch and not self._queue and not self._writing and not self._marked \
                and self._socket_has_room():
            # Fast path: nothing is waiting and the socket's buffer is below its high-water
            # mark, so write now, bytes encoded once for every subscriber of the room. With
            # ?batch=0, the frames that follow in this turn of the loop (the rest of a burst)
            # wait for its end, to leave together.
            self.ws.write(wire_message((frame,)))
            if self._batch is not None:
                self._marked = True
                self._flusher.mark(self, 0)
            return
        if len(self._queue) >= self._limit:
            self.overflow(f"its outgoing queue is full ({len(self._queue)} frames)")
            return
        if self._queue is _NO_FRAMES:
            self._queue = deque()
        self._queue.append(frame)
        if self._writing:
            return  # the writer task sends it after what is before it
        if self._batch is None:
            self._start_writer()
        elif len(self._queue) >= self._page:
            # half the queue waits: send now rather than close a client that reads, only
            # because its wait (?batch=) holds more frames than PGBRIDGE_QUEUE_SIZE
            self.flush()
        elif not self._marked:
            self._marked = True
            self._flusher.mark(self, self._batch)

    def write_now(self, frame: bytes | str) -> None:
        """Write ``frame`` to the socket at once, alone, whatever waits (the ``welcome``, the
        first frame, to an empty socket: it leaves at once, even when coalescing); skipped
        once the closing handshake started."""
        self.ws.write(wire_message((frame,)))

    @contained("flushing coalesced frames")
    def flush(self) -> None:
        """Coalescing (``?batch=``): send what is queued as one message now that the wait is
        over, if the socket has room; the writer task sends the rest."""
        self._marked = False
        if self.closing or self._writing or not self._queue:
            return
        if self._socket_has_room():
            self.ws.write(wire_message(take_frames(self._queue)))
        if self._queue:
            self._start_writer()
        else:
            self._emptied()

    @contained("closing a slow client")
    def overflow(self, why: str) -> None:
        """The client cannot keep up (``why``, for the log): close it with 4008 and count it
        in ``pgbridge_slow_client_closes``."""
        if self.closing:
            return
        self._metrics.slow_closes.inc()
        log.warning("client %s of user %s is too slow: %s; closing with 4008", self.ws.id,
                    self._user, why, extra={"event": "slow_client",
                                            "correlation_id": self.ws.correlation_id})
        self.close(Close.TOO_SLOW, "too slow: outgoing queue overflowed")

    def crashed(self, doing: str) -> None:
        """A bug met while ``doing``: the connection ends with 1011 and an incident id."""
        self.ws.crashed(doing)

    def close(self, code: Close, reason: str, *, fail: bool = False) -> None:
        """Stop sending and close with ``code``; ``fail``: without waiting for the client's
        close frame, and without reading what it sent meanwhile (an abuser's frames)."""
        log.debug("closing connection %s of user %s with %d: %s", self.ws.id, self._user,
                  code, reason, extra={"event": "closing", "code": int(code), "reason": reason,
                                       "correlation_id": self.ws.correlation_id})
        self.closing = True
        self._queue.clear()
        if self._writer is not None:
            self._writer.cancel()
        self._emptied()  # a replay waiting for room stops at closing
        self._on_close()
        if fail:
            self.ws.fail(code, reason)
        else:
            self.ws.close(code, reason)

    def lost(self) -> None:
        """The connection ended: nothing more is sent; the writer stops. ``on_close`` is let
        go: no reference cycle with the owner outlives the connection (a closed connection is
        freed without the cycle collector)."""
        self.closing = True
        self._on_close = _nothing
        if self._writer is not None:
            self._writer.cancel()

    async def room_for(self, frames: int) -> None:
        """Wait until ``frames`` more fit in the queue (replay paces itself, never overflows),
        or the queue stopped (:attr:`closing`)."""
        while not self.closing and self._queue and len(self._queue) + frames > self._limit:
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()

    def _socket_has_room(self) -> bool:
        return self.ws.transport.get_write_buffer_size() < self._high_water

    def _start_writer(self) -> None:
        """Drain the queue at the pace of the socket, in a task that lives while frames wait:
        an idle connection holds no task of its own."""
        self._writing = True
        self._writer = asyncio.create_task(self._write_queued(), name=f"writer-{self.ws.id}")

    async def _write_queued(self) -> None:
        ws, queue = self.ws, self._queue
        # started by whoever sent (the fan-out, another connection): its lines are this one's
        logs.adopt(ws.correlation_id)
        try:
            while queue and ws.open:
                frames = [queue.popleft()] if self._batch is None else take_frames(queue)
                ws.write(wire_message(frames))
                try:
                    # waits while the socket's buffer is full; the frame is written already
                    # when the wait is cut short, so the stream stays whole for the close
                    async with asyncio.timeout(self._send_timeout):
                        await ws.drain()
                except TimeoutError:
                    self.overflow(f"its socket accepted nothing for {self._send_timeout:g} s "
                                  f"({len(queue)} more frames queued)")
                    return
            if not ws.open:
                self.closing = True
        finally:
            self._writing = False
            self._writer = None
            self._emptied()

    def _emptied(self) -> None:
        """The queue was sent (or dropped): let go of it, and wake a replay waiting for room."""
        if not self._queue:
            self._queue = _NO_FRAMES
        if self._drained is not None:
            self._drained.set()
