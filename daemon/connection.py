"""One TCP connection of the WebSocket server: bytes in and out of websockets' sans-I/O
:class:`~websockets.server.ServerProtocol`, driven from a plain :class:`asyncio.Protocol`.

Why not websockets' asyncio server (docs/topics/fan-out-cost.md): its connection object holds a task
for the connection's whole life, a message assembler and a queue of drain waiters, about
13 KB of an idle connection, and costs about 200 µs more per handshake than the same sans-I/O
protocol driven by callbacks (``bench/handshake_floor.py``). Here a connection holds the
protocol and a few slots; a task exists only while the handshake waits for
:meth:`Endpoint.process_request` (the database).

Only websockets' public sans-I/O API is used (``receive_data``, ``receive_eof``,
``events_received``, ``data_to_send``, ``accept``, ``reject``, ``send_response``, the
``send_*`` methods, ``fail``, ``close_expected``, ``state``, ``handshake_exc``,
``close_exc``; the ``Request``, ``Response`` and ``Frame`` events), as the websockets guide
"Integrate the Sans-I/O layer" describes it; ``tests/integration/test_connection.py`` pins the
supported major version and fails loudly on another. A connection has two protocols, as that
API allows: one in state CONNECTING that reads the request and writes the answer, and, once
the upgrade is answered 101, one created in state OPEN for the frames; the first, and the
request it parsed, are then dropped.

What this driver owns, since it drives the protocol itself (docs/design.md, "Trust boundaries"):

* **No frame before the answer.** Only the bytes up to the end of the request's headers
  (the first CRLF CRLF) reach the handshake protocol. What the client sends after them waits,
  unparsed, until the upgrade is answered: up to :data:`EARLY_LIMIT` bytes; past that they
  are dropped, the connection stops reading (TCP pushes back) and an upgrade that would be
  accepted is answered 400. A 101 is followed by those bytes' frames; any other answer by
  the end of the connection, the waiting bytes unread.
* **A bounded share of the loop.** One turn of the event loop parses at most
  :data:`FRAMES_PER_TURN` frames of a connection (plus what one :data:`FEED_CHUNK` holds); the
  rest of a read waits, the connection not reading meanwhile, for later turns.
* **No reading while the client does not read.** While the transport's buffer is above its
  high-water mark, nothing is parsed and the connection is not read: what a read makes
  (pongs at least) cannot pile up for a client that reads nothing.
* **Bounded messages.** A message is at most ``max_size`` bytes (the protocol checks) in at
  most :data:`MAX_FRAGMENTS` frames; past that, 1009.
* **Nothing written after the end.** Once this side half-closed, closed or aborted the
  transport, nothing more is written to it, and a connection whose peer is gone is not written
  to either (asyncio would log a line per write). After an HTTP answer other than 101 the
  connection is half-closed and read, discarding, until the peer closes (``close_timeout`` s
  at most): closing with bytes unread would reset it, and the peer lose its answer.
* **Fault isolation.** A bug met in a callback of this connection, or in a call that code
  shared by all connections makes into it (the :func:`contained` boundary), ends this
  connection with 1011 and an incident id in the log; never the caller's task.

What websockets' asyncio layer does around the protocol is done the same way here:

* the opening handshake must end within ``open_timeout`` seconds of the TCP connection;
* a response other than 101 is followed by the end of the connection;
* once a close frame was sent or received, the peer has ``close_timeout`` seconds to close
  the TCP connection before it is aborted;
* fragmented messages are joined, and a text message that is not UTF-8 fails the connection
  with 1007;
* :meth:`drain` waits while the transport's buffer is above its high-water mark
  (``write_limit`` bytes, low-water a quarter of it).

A request websockets cannot parse is answered 400 (websockets itself answers a request line
or headers over its limits with 414 or 431, and closes without an answer otherwise); a client
that closes without sending a byte (a port probe) gets nothing.

What a connection carries after the upgrade goes to its :class:`Receiver` (the bridge's
:class:`daemon.client.Client`), set by :meth:`Endpoint.opened`.

The connection layer is four modules and one class: :mod:`daemon.connection_boundary` holds
its contracts (:class:`Endpoint`, :class:`Receiver`, the fault boundary :func:`contained`,
:func:`close_code_sent`); :mod:`daemon.connection_transport` its state and what it does to
the transport in both phases (writing, the ends of a connection, whether it is read, the answer
to a bug); :mod:`daemon.connection_opening` the opening handshake (:data:`EARLY_LIMIT`); this
module the asyncio callbacks, the frames of an open connection and the methods its receiver and
server call. Every name the others import is exported here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Self, cast

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import BytesLike

from . import logs
from .closes import Close
from .connection_boundary import Endpoint, Receiver, close_code_sent, contained
from .connection_opening import EARLY_LIMIT, Opening

log = logging.getLogger("daemon.connection")  # the connection layer's one logger name

__all__ = ["EARLY_LIMIT", "FEED_CHUNK", "FRAMES_PER_TURN", "MAX_FRAGMENTS", "Connection",
           "Endpoint", "Receiver", "close_code_sent", "contained"]


FRAMES_PER_TURN = 64  # frames of one connection parsed per turn of the event loop ...
FEED_CHUNK = 1024  # ... counted after each piece of this many bytes given to the protocol
MAX_FRAGMENTS = 256  # frames of one fragmented message


class Connection(Opening):
    """One TCP connection, from its first byte to its end. ``id`` is a small integer unique in
    the process (for logs); ``correlation_id`` (16 hex digits, also sent to the client in
    ``welcome``) is on every log line about it (docs/reference/logs.md); :attr:`receiver` is
    set once the connection is open. Its state and
    transport handling are :class:`~daemon.connection_transport.ConnectionBase`'s, its opening
    handshake :class:`~daemon.connection_opening.Opening`'s."""

    __slots__ = ()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    # The event loop runs these callbacks in the context their handle was made in, which may
    # be another connection's or a shared task's: each makes this connection's correlation id
    # current while it runs (daemon.logs.correlating), and the tasks and timers it starts
    # keep it. pause_writing() is called inside someone else's write: it logs nothing.

    @logs.correlating
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        endpoint = self._endpoint
        self.transport = transport = cast(asyncio.Transport, transport)  # or uvloop's
        self.remote_address = transport.get_extra_info("peername")
        log.debug("connection %s accepted from %s", self.id, self.remote_address,
                  extra={"event": "connection_accepted"})
        transport.set_write_buffer_limits(endpoint.write_limit)
        self.protocol = endpoint.new_protocol(State.CONNECTING)
        self._timer = asyncio.get_running_loop().call_later(endpoint.open_timeout,
                                                            self._open_timed_out)

    @logs.correlating
    def data_received(self, data: bytes) -> None:
        if self._ending:
            return  # ending: what the peer still sends is not read
        try:
            self._received_any = True
            if not self._request_read:
                self._read_request(data)
            elif self._handshake is not None:  # the upgrade is being answered: wait
                self._hold_early(data)
            elif self._unparsed is not None:  # a backlog: parsed in the next turns
                self._unparsed += data
            else:
                self._parse_frames(data)
        except Exception:
            self.crashed("reading from the socket")

    @logs.correlating
    def eof_received(self) -> None:
        # returning None closes the transport: a WebSocket never writes after the peer's EOF
        self._unparsed = None  # the peer will read no answer to what it sent last
        if self._ending or self._handshake is not None:
            return  # answering the upgrade: _answer() finds the connection lost
        try:
            self.protocol.receive_eof()
            if not self._request_read:  # a partial request, or none
                self._refuse_unparsable()
            else:
                self._send_data()
        except Exception:
            self.crashed("reading the end of the stream")

    @logs.correlating
    def connection_lost(self: Self, exc: Exception | None) -> None:  # Self: see _endpoint
        self._lost = True
        self._end()
        protocol = self.protocol
        protocol.receive_eof()  # idempotent: the state is CLOSED from here on
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_drain()
        self._fragments = None
        self._unparsed = None
        code_sent = close_code_sent(protocol.close_exc) if protocol.state is State.CLOSED \
            else None
        self._endpoint.closed(self, code_sent)
        self.receiver = None

    def pause_writing(self) -> None:
        self._paused = True
        self._update_reading()

    @logs.correlating
    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()
        if self._unparsed is not None and self._handshake is None and not self._ending:
            asyncio.get_running_loop().call_soon(self._parse_frames)  # what waited for room
        self._update_reading()

    # --- for the receiver and the server ----------------------------------------------------

    @property
    def open(self) -> bool:
        """True while frames may be sent (the closing handshake did not start)."""
        return self.protocol.state is State.OPEN and not self._ending

    @contained("writing a frame")
    def write(self, data: bytes) -> None:
        """Write an encoded frame (:func:`daemon.outbox.wire_message`); nothing once the
        closing handshake started, as websockets' ``broadcast()`` does."""
        if self.protocol.state is State.OPEN and not self._ending:
            if self._corked is not None:
                self._corked.append(data)
            elif not self.transport.is_closing():  # the peer is gone (asyncio logs writes)
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

    @contained("closing")
    def close(self, code: Close, reason: str = "") -> None:
        """Start the closing handshake with ``code`` and ``reason``; the peer then has
        ``close_timeout`` seconds to end the TCP connection. Nothing when it already started."""
        if self.protocol.state is State.OPEN and not self._ending:
            self.protocol.send_close(code, reason)
            self._send_data()
            self._watch_close()

    @contained("failing the connection")
    def fail(self, code: Close, reason: str = "") -> None:
        """Send a close frame and end the connection without waiting for the peer's (RFC 6455,
        "Fail the WebSocket Connection"), as websockets does on a keepalive timeout."""
        self._fail(code, reason)

    @contained("pinging")
    def ping(self) -> None:
        """Send a ping; :attr:`awaiting_pong` is true until its pong comes back."""
        if self.protocol.state is State.OPEN and not self._ending:
            self._ping = os.urandom(4)
            self.protocol.send_ping(self._ping)
            self._send_data()

    @property
    def awaiting_pong(self) -> bool:
        """True when the last :meth:`ping` has not been answered yet."""
        return self._ping is not None

    @contained("pausing reading")
    def pause_reading(self) -> None:
        """Stop reading from the socket (TCP then pushes back on the peer) until
        :meth:`resume_reading`; idempotent."""
        self._reading_held = True
        self._update_reading()

    @contained("resuming reading")
    def resume_reading(self) -> None:
        """Read from the socket again (unless this connection's own parsing still holds
        it); idempotent."""
        self._reading_held = False
        self._update_reading()

    @contained("shutting down")
    def shutdown(self, code: Close) -> None:
        """The server is stopping: an open connection is closed with ``code``; one whose
        request did not arrive yet is dropped (one whose request is being answered gets 503,
        :meth:`Endpoint.serving`)."""
        if self.protocol.state is State.OPEN:
            self.close(code)
        elif self.protocol.state is State.CONNECTING and self._handshake is None:
            self._abort()


    # --- inside: frames -----------------------------------------------------------------------

    def _parse_frames(self, data: bytes | bytearray | None = None) -> None:
        """Give the protocol ``data`` (by default, what waits in :attr:`_unparsed`),
        :data:`FEED_CHUNK` bytes at a time, until it yielded :data:`FRAMES_PER_TURN` frames;
        hand the messages they complete to the receiver. What is left is parsed in a later turn
        of the event loop, the connection not reading meanwhile."""
        if data is None:
            data, self._unparsed = self._unparsed, None
        if data is None or self._ending:
            return
        protocol = self.protocol
        messages: list[str | bytes] = []
        frames = offset = 0
        try:
            while offset < len(data) and frames < FRAMES_PER_TURN and not self._ending \
                    and not self._paused:
                # the protocol parses the whole chunk at once: a close frame in it makes its
                # state CLOSING before the messages sent ahead of the close are handled, and
                # those are the peer's last words (an ack before closing), not to be dropped
                peer_open = protocol.state is State.OPEN
                protocol.receive_data(data if len(data) <= FEED_CHUNK else
                                      data[offset:offset + FEED_CHUNK])
                close_sent = protocol.close_sent  # the echo of a close in this chunk, if any
                offset += FEED_CHUNK
                events = protocol.events_received()
                frames += len(events)
                for event in events:
                    if isinstance(event, Frame):
                        self._frame(event, messages, peer_open)
                        # after the peer's close, or once this side failed the connection
                        if event.opcode is Opcode.CLOSE or protocol.close_sent is not close_sent:
                            peer_open = False
                if messages and not peer_open and self.receiver is not None:
                    # handed over before the echo of the close ends the connection (_send_data)
                    self.receiver.received(messages)
                    messages = []
                self._send_data()  # pongs, the echo of a close frame
            if messages and self.receiver is not None:
                self.receiver.received(messages)
            self._watch_close()
        except Exception:
            self.crashed("handling a frame")
            return
        if offset < len(data) and not self._ending:
            self._unparsed = bytearray(data[offset:])
            if not self._paused:  # else resume_writing() parses the rest
                asyncio.get_running_loop().call_soon(self._parse_frames)
        self._update_reading()

    def _frame(self, frame: Frame, messages: list[str | bytes], peer_open: bool) -> None:
        """Act on one frame; a message it completes is appended to ``messages`` when
        ``peer_open`` (the peer's close did not come before it)."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(opcode is Opcode.TEXT, frame.data, messages, peer_open)
            else:  # the protocol checks the continuations and their total size
                self._fragments = [frame.data]
                self._text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            if fragments is None:  # after a failed message: the protocol is closing
                return
            fragments.append(frame.data)
            if frame.fin:
                self._fragments = None
                self._message(self._text, b"".join(fragments), messages, peer_open)
            elif len(fragments) >= MAX_FRAGMENTS:
                self._fragments = None
                self._fail(Close.TOO_BIG, f"a message may have at most {MAX_FRAGMENTS} "
                                          "fragments")
        elif opcode is Opcode.PING:
            if self.receiver is not None:
                self.receiver.pinged()
        elif opcode is Opcode.PONG:
            if frame.data == self._ping:
                self._ping = None

    def _message(self, text: bool, payload: BytesLike, messages: list[str | bytes],
                 peer_open: bool) -> None:
        if self.receiver is None or not peer_open:
            return  # closing: what the peer sent after the close is dropped
        data = bytes(payload)  # the same object when it is bytes already
        if not text:
            messages.append(data)
            return
        try:
            messages.append(data.decode())
        except UnicodeDecodeError as exc:
            self._fail(Close.INVALID_DATA, f"{exc.reason} at position {exc.start}")
