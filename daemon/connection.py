"""One TCP connection of the WebSocket server: bytes in and out of websockets' sans-I/O
:class:`~websockets.server.ServerProtocol`, driven from a plain :class:`asyncio.Protocol`.

Why not websockets' asyncio server (README, "Fan-out cost"): its connection object holds a task
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

What this driver owns, since it drives the protocol itself (DESIGN.md, "Trust boundaries"):

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
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Concatenate, Protocol, TypeVar, cast

from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike

from . import logs
from .closes import Close
from .logs import Throttled

log = logging.getLogger(__name__)
_refusals = Throttled(log)  # clients cause these at will: counted in metrics, logged sparingly

__all__ = ["EARLY_LIMIT", "FEED_CHUNK", "FRAMES_PER_TURN", "MAX_FRAGMENTS", "Connection",
           "Endpoint", "Receiver", "close_code_sent", "contained"]


EARLY_LIMIT = 64 * 1024  # bytes after the request held until it is answered
FRAMES_PER_TURN = 64  # frames of one connection parsed per turn of the event loop ...
FEED_CHUNK = 1024  # ... counted after each piece of this many bytes given to the protocol
MAX_FRAGMENTS = 256  # frames of one fragmented message
_END_OF_HEADERS = b"\r\n\r\n"
_ids = itertools.count(1)


def close_code_sent(closed: ConnectionClosed) -> int | None:
    """The code of the close frame this side sent first, from how websockets' protocol ended
    (its ``close_exc`` once CLOSED); ``None`` when the peer closed first (this side only echoed
    its frame), or no close frame was sent (a refused upgrade, a connection that just dropped).
    Pure."""
    if closed.sent is None or closed.rcvd_then_sent:
        return None
    return int(closed.sent.code)


class _Contained(Protocol):
    def crashed(self, doing: str) -> None: ...


_S = TypeVar("_S", bound=_Contained)
_R = TypeVar("_R")


def contained(doing: str) -> Callable[[Callable[Concatenate[_S, ...], _R]],
                                      Callable[Concatenate[_S, ...], _R | None]]:
    """The fault boundary of one connection: decorates the methods through which code shared
    by all connections (the heartbeat, the hub's fan-out, the listener, the flusher, access
    checks, presence, the server's shutdown) calls into one connection or its client. Whatever
    such a call raises is handed to the object's ``crashed(doing)`` (1011 and an incident id
    in the log) and the call returns ``None``: the caller goes on with the next connection.
    ``doing`` says what was being done, for the log."""

    def wrap(method: Callable[Concatenate[_S, ...], _R]) -> Callable[Concatenate[_S, ...],
                                                                     _R | None]:
        @functools.wraps(method)
        def guarded(self: _S, /, *args: object, **kwargs: object) -> _R | None:
            try:
                return method(self, *args, **kwargs)
            except Exception:
                self.crashed(doing)
                return None

        guarded.__contained__ = doing  # type: ignore[attr-defined]  # tests list the boundary
        return guarded

    return wrap


class Receiver(Protocol):
    """What an open connection hands its messages to."""

    def received(self, messages: list[str | bytes]) -> None:
        """The whole messages of one turn's parsing, in order (at least one): a text message
        decoded from UTF-8, a binary one as bytes. At most about :data:`FRAMES_PER_TURN` of
        them; to let other connections run, answer one now and the rest in later turns."""

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

    def new_protocol(self, state: State) -> ServerProtocol:
        """websockets' sans-I/O protocol for a new connection: in state CONNECTING for its
        handshake, then in state OPEN for its frames."""

    def serving(self) -> bool:
        """False once the server is shutting down: upgrades are then answered 503."""

    def process_request(self, conn: Connection,
                        request: Request) -> Awaitable[Response | None]:
        """The answer to ``request``; ``None`` to accept the upgrade. Never raises."""

    def opened(self, conn: Connection) -> None:
        """``conn`` was upgraded: set its :attr:`Connection.receiver`, or close it."""

    def abandoned(self, conn: Connection, reason: str) -> None:
        """``conn``'s upgrade, accepted by :meth:`process_request`, will not be opened:
        ``client_gone`` (its client left before the answer) or ``early_data`` (it sent more
        than :data:`EARLY_LIMIT` bytes before the answer; it is answered 400)."""

    def closing(self, conn: Connection) -> None:
        """``conn`` is ending (this side half-closed, closed or aborted it, or the peer is
        gone): forget it wherever it is shared; nothing is written to it from now on. Called
        once, before :meth:`closed`."""

    def closed(self, conn: Connection, code_sent: int | None) -> None:
        """``conn`` ended. ``code_sent``: the close code this side sent first, ``None`` when
        the peer closed first or no close frame was sent."""


class Connection(asyncio.Protocol):
    """One TCP connection, from its first byte to its end. ``id`` is a small integer unique in
    the process (for logs); :attr:`receiver` is set once the connection is open."""

    __slots__ = ("__weakref__", "_corked", "_drain", "_ending", "_endpoint", "_fragments",
                 "_handshake", "_lost", "_overflowed", "_paused", "_ping", "_reading_held",
                 "_received_any", "_request_read", "_tail", "_text", "_timer", "_unparsed",
                 "id", "protocol", "receiver", "remote_address", "transport")

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self.id = next(_ids)
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

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        endpoint = self._endpoint
        self.transport = transport = cast(asyncio.Transport, transport)  # or uvloop's
        self.remote_address = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(endpoint.write_limit)
        self.protocol = endpoint.new_protocol(State.CONNECTING)
        self._timer = asyncio.get_running_loop().call_later(endpoint.open_timeout,
                                                            self._open_timed_out)

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

    def connection_lost(self, exc: Exception | None) -> None:
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

    def crashed(self, doing: str) -> None:
        """A bug met while ``doing``: logged once with an incident id; the connection is
        failed with 1011 (the client reconnects and resumes), or aborted when even that fails.
        The other connections go on. Never raises."""
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

    # --- inside: the opening handshake ------------------------------------------------------

    def _read_request(self, data: bytes) -> None:
        """Give the handshake protocol the request's bytes up to the end of its headers; keep
        what follows for later."""
        seen = self._tail + data
        end = seen.find(_END_OF_HEADERS)
        if end < 0:
            self._tail = seen[-3:]
            head, early = data, b""
        else:
            cut = end + len(_END_OF_HEADERS) - len(self._tail)
            head, early = data[:cut], data[cut:]
            self._request_read = True
            self._tail = b""
        protocol = self.protocol
        protocol.receive_data(head)
        for event in protocol.events_received():
            if isinstance(event, Request) and self._handshake is None:
                self._request_read = True  # by construction, what was fed ends with it
                self._handshake = asyncio.get_running_loop().create_task(
                    self._answer(event), name=f"handshake-{self.id}")
        if protocol.handshake_exc is not None and self._handshake is None:
            self._refuse_unparsable()
        elif early and self._handshake is not None:
            self._hold_early(early)
        elif self._request_read and self._handshake is None:  # cannot happen: parsed above
            self._abort()

    def _hold_early(self, data: bytes) -> None:
        """Keep bytes sent after the request until it is answered, :data:`EARLY_LIMIT` at
        most: past that they are dropped, the connection stops reading, and an upgrade that
        would be accepted is answered 400 instead (a client must wait for the 101, RFC 6455,
        4.1)."""
        if self._overflowed:
            return
        if self._unparsed is None:
            self._unparsed = bytearray(data)
        else:
            self._unparsed += data
        if len(self._unparsed) > EARLY_LIMIT:
            self._overflowed = True
            self._unparsed = None
            self._update_reading()

    def _refuse_unparsable(self) -> None:
        """The handshake protocol could not parse the request: send its answer (414 or 431),
        or a 400 when it has none, and end the connection. A client that closed without a
        byte gets nothing."""
        protocol = self.protocol
        answer = b"".join(protocol.data_to_send())  # an answer and the end, or only the end
        exc = protocol.handshake_exc
        if not answer and self._received_any:
            cause = exc.__cause__ if exc is not None else None
            why = ("lines end with CRLF" if isinstance(cause, EOFError) else
                   "the request line must be ASCII" if isinstance(cause, UnicodeError) else
                   "not a valid HTTP/1.1 request")
            response = protocol.reject(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {why}\n")
            response.headers["Server"] = self._endpoint.server_header
            answer = response.serialize()
        if answer:
            _refusals.info("http", "unparsable HTTP request answered %s: %s",
                           answer[9:12].decode(errors="replace"), exc,
                           extra={"event": "http_refused"})
            self.transport.write(answer)
        self._close_transport()

    async def _answer(self, request: Request) -> None:
        """Answer the opening request: :meth:`Endpoint.process_request`, then 101 or not."""
        endpoint, protocol = self._endpoint, self.protocol
        try:
            response = await endpoint.process_request(self, request)
            if self._lost or self._ending:
                # the client closed (or half-closed) while the database answered: nobody to
                # answer, and its choice, not a fault of the bridge
                self._abort()
                endpoint.abandoned(self, "client_gone")
                _refusals.info("gone", "client %s left before its handshake was answered",
                               self.remote_address, extra={"event": "handshake_abandoned"})
                return
            if response is None and self._overflowed:
                _refusals.info("early", "client %s sent more than %d bytes before its upgrade "
                               "was answered; answered 400", self.remote_address, EARLY_LIMIT,
                               extra={"event": "http_refused"})
                endpoint.abandoned(self, "early_data")
                response = protocol.reject(
                    HTTPStatus.BAD_REQUEST, f"more than {EARLY_LIMIT} bytes were sent before "
                    "the upgrade was answered; wait for the 101 (RFC 6455, 4.1)\n")
            if response is None:
                response = (protocol.accept(request) if endpoint.serving() else
                            protocol.reject(503, "Server is shutting down.\n"))
            response.headers["Server"] = endpoint.server_header
            protocol.send_response(response)
            if protocol.state is not State.OPEN:
                self.transport.write(b"".join(protocol.data_to_send()))
                if protocol.handshake_exc is not None:  # bad upgrade headers: the client's fault
                    _refusals.info("http", "upgrade refused with %d: %s", response.status_code,
                                   protocol.handshake_exc, extra={"event": "http_refused"})
                self._close_transport()  # after the answer is written; what waits is dropped
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            # the 101 and the first frames (welcome) leave in one write: one system call
            # less per connection
            self._corked = list(protocol.data_to_send())
            self.protocol = endpoint.new_protocol(State.OPEN)  # the request is dropped here
            try:
                endpoint.opened(self)
            except Exception:
                self.crashed("opening the connection")  # the 101 leaves before the 1011
            self._uncork()
        except Exception:
            self.crashed("answering the opening handshake")
        finally:
            self._handshake = None
        if self._unparsed is not None and self.protocol.state is State.OPEN \
                and not self._ending:
            self._parse_frames()  # what the client sent with its request
        self._update_reading()

    def _open_timed_out(self) -> None:
        self._timer = None
        if self.protocol.state is State.CONNECTING:
            self._abort()  # no handshake within open_timeout (a slow or idle client)

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
                protocol.receive_data(data if len(data) <= FEED_CHUNK else
                                      data[offset:offset + FEED_CHUNK])
                offset += FEED_CHUNK
                events = protocol.events_received()
                frames += len(events)
                for event in events:
                    if isinstance(event, Frame):
                        self._frame(event, messages)
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
            if fragments is None:  # after a failed message: the protocol is closing
                return
            fragments.append(frame.data)
            if frame.fin:
                self._fragments = None
                self._message(self._text, b"".join(fragments), messages)
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
            self._fail(Close.INVALID_DATA, f"{exc.reason} at position {exc.start}")

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

    def _end(self) -> None:
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
