"""One TCP connection of the WebSocket server: bytes in and out of websockets' sans-I/O
:class:`~websockets.server.ServerProtocol`, driven from a plain :class:`asyncio.Protocol`.

Why not websockets' asyncio server (README, "Fan-out cost"): its connection object holds a task
for the connection's whole life, a message assembler and a queue of drain waiters, about
13 KB of an idle connection, and costs about 200 µs more per handshake than the same sans-I/O
protocol driven by callbacks (``bench/handshake_floor.py``). Here a connection holds the
protocol and a few slots; a task exists only while the handshake waits for
:meth:`Endpoint.process_request` (the database). What websockets' asyncio layer does around
the protocol is done the same way here:

* the opening handshake must end within ``open_timeout`` seconds of the TCP connection;
* a response other than 101 is followed by the end of the connection;
* once a close frame was sent or received, the peer has ``close_timeout`` seconds to close
  the TCP connection before it is aborted;
* fragmented messages are joined, and a text message that is not UTF-8 fails the connection
  with 1007;
* :meth:`drain` waits while the transport's buffer is above its high-water mark
  (``write_limit`` bytes, low-water a quarter of it).

What a connection carries after the upgrade goes to its :class:`Receiver` (the bridge's
:class:`daemon.client.Client`), set by :meth:`Endpoint.opened`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable
from typing import Protocol, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as WebSocketProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike

from .logs import Throttled

log = logging.getLogger(__name__)
_refusals = Throttled(log)  # clients cause these at will: counted in metrics, logged sparingly

__all__ = ["Connection", "Endpoint", "Receiver", "close_code_sent"]

CLOSE_INVALID_DATA = 1007
CLOSE_INTERNAL = 1011
_ids = itertools.count(1)


def close_code_sent(protocol: WebSocketProtocol) -> int | None:
    """The code of the close frame this side sent first on ``protocol``; ``None`` when the peer
    closed first (this side only echoed its frame), or no close frame was sent (a refused
    upgrade, a connection that just dropped). Pure: reads websockets' protocol state."""
    sent = protocol.close_sent
    if sent is None or protocol.close_rcvd_then_sent:
        return None
    return int(sent.code)


class Receiver(Protocol):
    """What an open connection hands its messages to."""

    def received(self, messages: list[str | bytes]) -> None:
        """The whole messages of one read from the socket, in order (at least one): a text
        message decoded from UTF-8, a binary one as bytes. A read holds as many as fit in
        256 KiB; to let other connections run, answer one now and the rest in later turns."""

    def pinged(self) -> None:
        """The peer sent a ping (already answered with a pong)."""


class Endpoint(Protocol):
    """What a :class:`Connection` asks of its server (:class:`daemon.server.Server`).
    ``open_timeout``: seconds from the TCP connection to the end of the opening handshake;
    ``close_timeout``: seconds for the peer to end the TCP connection once a close frame was
    sent or received; ``write_limit``: the transport's high-water mark in bytes (low-water: a
    quarter of it); ``server_header``: the ``Server`` header of every HTTP answer."""

    open_timeout: float
    close_timeout: float
    write_limit: int
    server_header: str

    def new_protocol(self) -> ServerProtocol:
        """The sans-I/O protocol of a new connection."""

    def serving(self) -> bool:
        """False once the server is shutting down: upgrades are then answered 503."""

    def process_request(self, conn: Connection,
                        request: Request) -> Awaitable[Response | None]:
        """The answer to ``request``; ``None`` to accept the upgrade. Never raises."""

    def opened(self, conn: Connection) -> None:
        """``conn`` was upgraded: set its :attr:`Connection.receiver`, or close it."""

    def abandoned(self, conn: Connection) -> None:
        """``conn``'s client left before its handshake was answered."""

    def closed(self, conn: Connection, code_sent: int | None) -> None:
        """``conn`` ended. ``code_sent``: the close code this side sent first, ``None`` when
        the peer closed first or no close frame was sent."""


class Connection(asyncio.Protocol):
    """One TCP connection, from its first byte to its end. ``id`` is a small integer unique in
    the process (for logs); :attr:`receiver` is set once the connection is open."""

    __slots__ = ("__weakref__", "_corked", "_drain", "_endpoint", "_fragments", "_handshake",
                 "_lost", "_paused", "_ping", "_text", "_timer", "id", "protocol", "receiver",
                 "remote_address", "transport")

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self.id = next(_ids)
        self.receiver: Receiver | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._fragments: list[BytesLike] | None = None  # of a fragmented message
        self._text = False  # ... which is a text message
        self._paused = False
        self._lost = False
        self._ping: bytes | None = None  # the payload of the ping waiting for its pong
        self._corked: list[bytes] | None = None  # what waits to leave with the 101 answer

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        endpoint = self._endpoint
        self.transport = transport = cast(asyncio.Transport, transport)  # or uvloop's
        self.remote_address = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(endpoint.write_limit)
        self.protocol = endpoint.new_protocol()
        self._timer = asyncio.get_running_loop().call_later(endpoint.open_timeout,
                                                            self._open_timed_out)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._send_data()  # pongs, the echo of a close frame, an answer to a bad request
        messages: list[str | bytes] = []
        for event in events:
            if isinstance(event, Frame):
                self._frame(event, messages)
            elif isinstance(event, Request) and self._handshake is None \
                    and protocol.state is State.CONNECTING:
                self._handshake = asyncio.get_running_loop().create_task(
                    self._answer(event), name=f"handshake-{self.id}")
        if messages and self.receiver is not None:
            try:
                self.receiver.received(messages)
            except Exception:  # a bug of the receiver: it ends this connection only
                self._crashed("handling a frame")
        self._watch_close()

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self._send_data()
        # returning None closes the transport: a WebSocket never writes after the peer's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        protocol = self.protocol
        protocol.receive_eof()  # idempotent: the state is CLOSED from here on
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_drain()
        self._endpoint.closed(self, close_code_sent(protocol))
        self.receiver = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # --- for the receiver -----------------------------------------------------------------

    @property
    def open(self) -> bool:
        """True while frames may be sent (the closing handshake did not start)."""
        return self.protocol.state is State.OPEN

    def write(self, data: bytes) -> None:
        """Write an encoded frame (:func:`daemon.outbox.wire_message`); nothing once the
        closing handshake started, as websockets' ``broadcast()`` does."""
        if self.protocol.state is State.OPEN:
            if self._corked is not None:
                self._corked.append(data)
            else:
                self.transport.write(data)

    def backed_up(self) -> bool:
        """True while the transport's buffer is above its high-water mark."""
        return self._paused

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark, or the connection
        ended. One caller at a time (the connection's writer)."""
        if self._paused and not self._lost:
            assert self._drain is None, "one drain() at a time"
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code`` and ``reason``; the peer then has
        ``close_timeout`` seconds to end the TCP connection. Nothing when it already started."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._send_data()
            self._watch_close()

    def fail(self, code: int, reason: str = "") -> None:
        """Send a close frame and end the connection without waiting for the peer's (RFC 6455,
        "Fail the WebSocket Connection"), as websockets does on a keepalive timeout."""
        if self.protocol.state is State.OPEN:
            self.protocol.fail(code, reason)
            self._send_data()
            self._watch_close()

    def ping(self) -> None:
        """Send a ping; :attr:`awaiting_pong` is true until its pong comes back."""
        if self.protocol.state is State.OPEN:
            self._ping = os.urandom(4)
            self.protocol.send_ping(self._ping)
            self._send_data()

    @property
    def awaiting_pong(self) -> bool:
        """True when the last :meth:`ping` has not been answered yet."""
        return self._ping is not None

    def pause_reading(self) -> None:
        """Stop reading from the socket (TCP then pushes back on the peer); idempotent."""
        if not self._lost and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again; idempotent."""
        if not self._lost and not self.transport.is_reading():
            self.transport.resume_reading()

    def shutdown(self, code: int) -> None:
        """The server is stopping: an open connection is closed with ``code``; one whose
        request did not arrive yet is dropped (one whose request is being answered gets 503,
        :meth:`Endpoint.serving`)."""
        if self.protocol.state is State.OPEN:
            self.close(code)
        elif self.protocol.state is State.CONNECTING and self._handshake is None:
            self.transport.abort()

    # --- inside -------------------------------------------------------------------------------

    def _send_data(self) -> None:
        if self._corked is not None:
            self._uncork()
        transport = self.transport
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # half-close: the peer ends the connection
                try:
                    transport.write_eof()
                except Exception:  # OSError; uvloop raises RuntimeError once closing
                    transport.abort()
            else:
                transport.close()

    def _uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked:
            self.transport.write(b"".join(corked))

    def _watch_close(self) -> None:
        """Once the connection is expected to close, give the peer ``close_timeout`` s."""
        if self._timer is None and self.protocol.close_expected() and not self._lost:
            self._timer = asyncio.get_running_loop().call_later(
                self._endpoint.close_timeout, self.transport.abort)

    def _open_timed_out(self) -> None:
        self._timer = None
        if self.protocol.state is State.CONNECTING:
            self.transport.abort()  # no handshake within open_timeout (a slow or idle client)

    def _crashed(self, doing: str) -> None:
        """A bug met while ``doing``: logged once with an incident id; the connection is
        closed with 1011 (the client reconnects and resumes), the others go on."""
        incident = secrets.token_hex(4)
        log.error("connection %s failed %s: incident %s", self.id, doing, incident,
                  exc_info=True, extra={"event": "connection_crashed", "incident": incident})
        self.fail(CLOSE_INTERNAL, f"internal error (incident {incident})")

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def _answer(self, request: Request) -> None:
        """Answer the opening request: :meth:`Endpoint.process_request`, then 101 or not."""
        endpoint, protocol = self._endpoint, self.protocol
        try:
            response = await endpoint.process_request(self, request)
            if self._lost or protocol.reader.eof:
                # the client closed (or half-closed) while the database answered: nobody to
                # answer, and its choice, not a fault of the bridge
                self.transport.abort()
                endpoint.abandoned(self)
                _refusals.info("gone", "client %s left before its handshake was answered",
                               self.remote_address, extra={"event": "handshake_abandoned"})
                return
            if response is None:
                response = (protocol.accept(request) if endpoint.serving() else
                            protocol.reject(503, "Server is shutting down.\n"))
            response.headers["Server"] = endpoint.server_header
            protocol.send_response(response)
            if protocol.state is State.OPEN:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                # the 101 and the first frames (welcome) leave in one write: one system call
                # less per connection
                self._corked = list(protocol.data_to_send())
                try:
                    endpoint.opened(self)
                except Exception:
                    self._crashed("opening the connection")
                self._uncork()
            else:
                self._send_data()
                if protocol.handshake_exc is not None:  # bad upgrade headers: the client's fault
                    _refusals.info("http", "upgrade refused with %d: %s", response.status_code,
                                   protocol.handshake_exc, extra={"event": "http_refused"})
                self.transport.close()  # after the answer is written
        finally:
            self._handshake = None

    def _frame(self, frame: Frame, messages: list[str | bytes]) -> None:
        """Act on one frame; a message it completes is appended to ``messages``."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(opcode is Opcode.TEXT, frame.data, messages)
            else:  # the protocol checks the continuations and their total size
                self._fragments = [frame.data]
                self._text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            assert fragments is not None
            fragments.append(frame.data)
            if frame.fin:
                self._fragments = None
                self._message(self._text, b"".join(fragments), messages)
        elif opcode is Opcode.PING:
            if self.receiver is not None:
                self.receiver.pinged()
        elif opcode is Opcode.PONG:
            if frame.data == self._ping:
                self._ping = None

    def _message(self, text: bool, payload: BytesLike, messages: list[str | bytes]) -> None:
        if self.receiver is None or self.protocol.state is not State.OPEN:
            return  # closing: what the peer sent after the close is dropped
        data = bytes(payload)  # the same object when it is bytes already
        if not text:
            messages.append(data)
            return
        try:
            messages.append(data.decode())
        except UnicodeDecodeError as exc:
            self.fail(CLOSE_INVALID_DATA, f"{exc.reason} at position {exc.start}")
