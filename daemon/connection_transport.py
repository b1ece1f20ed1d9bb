"""The base of :class:`~daemon.connection.Connection`: its state, and what it does to its
transport in both phases of its life (the opening handshake, :mod:`daemon.connection_opening`;
the frames, :mod:`daemon.connection`).

Held here: every slot of a connection (a connection is one object, its slots declared once so
that it keeps no ``__dict__``); writing what websockets' protocol has to send, a 101 answer
held back to leave with the first frames (corking); the ends of a connection (half-close,
the lingering close after an HTTP answer, abort) and the ``close_timeout`` watch; whether the
socket is read (:meth:`ConnectionBase._update_reading`); and :meth:`ConnectionBase.crashed`,
the answer of the fault boundary (:func:`daemon.connection_boundary.contained`) to a bug.

Why the seam is here: both phases end a connection, write to it and decide whether it is read
the same way, and "nothing written after the end" (``daemon/connection.py``'s docstring) holds
only if every write and every end goes through these few methods. The phases are subclasses
(:class:`~daemon.connection_opening.Opening`, then :class:`~daemon.connection.Connection`)
rather than objects of their own: the state they share (the unparsed bytes, the timer, the
ending flag) stays in one place, and a connection costs no more memory than one object. The
layers do not name the class built on them: the endpoint is an ``Endpoint[Self]``, handed the
connection itself whatever its class, and the one step of the frames phase the opening needs
is a method it declares (:meth:`~daemon.connection_opening.Opening._parse_frames`). Log
lines keep the logger ``daemon.connection``: one name for the whole connection layer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Self

from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike

from . import logs
from .closes import Close
from .connection_boundary import Endpoint, Receiver

log = logging.getLogger("daemon.connection")  # the connection layer's one logger name

__all__ = ["ConnectionBase"]

_ids = itertools.count(1)


class ConnectionBase(asyncio.Protocol):
    """The state of one TCP connection and what it does to its transport; see
    :class:`daemon.connection.Connection`, the one class built on it. ``transport``,
    ``protocol`` and ``remote_address`` are set by ``connection_made``."""

    __slots__ = ("__weakref__", "_corked", "_drain", "_ending", "_endpoint", "_fragments",
                 "_handshake", "_lost", "_overflowed", "_paused", "_ping", "_reading_held",
                 "_received_any", "_request_read", "_tail", "_text", "_timer", "_unparsed",
                 "correlation_id", "id", "protocol", "receiver", "remote_address", "transport")

    def __init__(self, endpoint: Endpoint[Self]) -> None:
        self._endpoint = endpoint
        self.id = next(_ids)
        # every line about this connection carries it (docs/reference/logs.md); its client
        # gets it in welcome
        self.correlation_id = logs.new_id()
        self.receiver: Receiver | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._fragments: list[BytesLike] | None = None  # of a fragmented message
        self._text = False  # ... which is a text message
        self._paused = False  # the transport's buffer is above its high-water mark
        self._lost = False  # connection_lost() was called
        self._ending = False  # closing() was reported: nothing more is written
        self._ping: bytes | None = None  # the payload of the ping waiting for its pong
        self._corked: list[bytes] | None = None  # what waits to leave with the 101 answer
        self._request_read = False  # the end of the request's headers reached the protocol
        self._received_any = False
        self._tail = b""  # the last bytes of the request so far (CRLF CRLF across reads)
        # bytes read and not yet given to the protocol: those after the request while it is
        # answered, then what a turn left for the next (whose parse is scheduled); None: none
        self._unparsed: bytearray | None = None
        self._overflowed = False  # more than EARLY_LIMIT bytes came before the answer
        self._reading_held = False  # the receiver asked to stop reading

    # handed this connection itself, whatever its class; a method that hands it ``self``
    # annotates ``self: Self`` (mypy binds Self in ``self._endpoint`` only then)
    _endpoint: Endpoint[Self]
    correlation_id: str  # 16 hex digits (daemon.logs.new_id), for the log and the client
    transport: asyncio.Transport  # or uvloop's
    protocol: ServerProtocol  # CONNECTING for the handshake, then OPEN for the frames
    remote_address: Any  # the transport's "peername"

    @logs.correlating  # called by code shared by all connections too (contained)
    def crashed(self, doing: str) -> None:
        """A bug met while ``doing``: logged once with an incident id (and this connection's
        correlation id); the connection is failed with 1011 (the client reconnects and
        resumes), or aborted when even that fails. The other connections go on. Never
        raises."""
        incident = logs.incident(log, "connection_crashed", "connection %s failed %s", self.id,
                                 doing)
        try:
            if self.protocol.state is State.OPEN and not self._ending:
                self._fail(Close.INTERNAL, f"internal error (incident {incident})")
                return
        except Exception:  # noqa: S110 - the abort below is the answer to any failure here
            pass
        try:
            self._abort()
        except Exception:  # the server's bookkeeping failed: the socket goes all the same
            logs.incident(log, "connection_crashed", "connection %s could not be forgotten",
                          self.id)
            self.transport.abort()


    # --- inside: writing and ending -----------------------------------------------------------

    def _fail(self, code: Close, reason: str) -> None:
        if self.protocol.state is State.OPEN and not self._ending:
            self.protocol.fail(code, reason)
            self._send_data()
            self._watch_close()

    def _send_data(self) -> None:
        """Write what the protocol has to send; its end-of-stream half-closes the transport."""
        if self._corked is not None:
            self._uncork()
        pending: list[bytes] = []  # consecutive frames (a pong per ping of a read) in one write
        for data in self.protocol.data_to_send():
            if data:
                pending.append(data)
                continue
            self._write_all(pending)
            pending = []
            if self._ending:
                return
            if self.transport.can_write_eof():  # half-close: the peer ends the connection
                self._end()
                try:
                    self.transport.write_eof()
                except Exception:  # OSError; uvloop raises RuntimeError once closing
                    self.transport.abort()
            else:
                self._close_transport()
        self._write_all(pending)

    def _write_all(self, frames: list[bytes]) -> None:
        if frames and not self._ending and not self.transport.is_closing():
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and not self._ending:
            self.transport.write(b"".join(corked))

    def _close_transport(self) -> None:
        """End the connection after what was written (an HTTP answer): half-close, so that the
        peer reads the answer and then the end, and read on, discarding, until the peer closes
        too (``close_timeout`` s at most). Closing with bytes unread would make the kernel
        reset the connection, and the peer lose the answer (a lingering close)."""
        self._end()
        transport = self.transport
        try:
            if not transport.can_write_eof():
                transport.close()
            else:
                transport.write_eof()
                if not transport.is_reading():
                    transport.resume_reading()
        except Exception:  # OSError; uvloop raises RuntimeError once closing
            transport.abort()
        self._watch_close(force=True)

    def _abort(self) -> None:
        self._end()
        self.transport.abort()

    def _end(self: Self) -> None:  # Self: see _endpoint
        """From here on nothing is written or read; the server forgets the connection."""
        if self._ending:
            return
        self._ending = True
        self._unparsed = None
        self._endpoint.closing(self)

    def _watch_close(self, *, force: bool = False) -> None:
        """Once the connection is expected to close, give the peer ``close_timeout`` s."""
        if self._timer is None and not self._lost and (force or self.protocol.close_expected()):
            self._timer = asyncio.get_running_loop().call_later(
                self._endpoint.close_timeout, self.transport.abort)

    def _update_reading(self) -> None:
        """Read while nobody holds it: the receiver (:meth:`pause_reading`), a write buffer
        above its high-water mark (what is read makes answers, pongs at least, that the
        client does not read), frames still waiting to be parsed, or more than
        :data:`EARLY_LIMIT` bytes after a request that is being answered."""
        if self._lost or self._ending:
            return
        hold = self._reading_held or self._paused or (
            self._overflowed if self._handshake is not None else self._unparsed is not None)
        if hold == self.transport.is_reading():
            if hold:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
