"""The opening handshake of a :class:`~daemon.connection.Connection`: from its first byte to
the answer to its request (101, or any other status and the end of the connection).

The connection's first protocol, websockets' :class:`~websockets.server.ServerProtocol` in
state CONNECTING, reads the request and writes the answer; :meth:`Endpoint.process_request
<daemon.connection_boundary.Endpoint.process_request>` decides it, in a task (the database),
the only task a connection ever has. What this phase owns (``daemon/connection.py``'s
docstring, "No frame before the answer"): only the bytes up to the end of the request's
headers (the first CRLF CRLF) reach the protocol; what the client sends after them waits,
unparsed, until the upgrade is answered, :data:`EARLY_LIMIT` bytes at most; a request that
cannot be parsed is answered 400 (or websockets' 414 or 431); an answer other than 101 is
followed by a lingering close; no handshake within ``open_timeout`` seconds aborts.

Why the seam is here: this phase ends where websockets' second protocol, created in state OPEN,
takes over (:mod:`daemon.connection` parses its frames); the first protocol and the request it
parsed are then dropped. :class:`Opening` is the layer of :class:`~daemon.connection.Connection`
that holds this phase's methods (its state is declared with the others in
:class:`~daemon.connection_transport.ConnectionBase`). What the endpoint is handed is the
connection itself, typed ``Self`` (the endpoint is an ``Endpoint[Self]``); the frames that came
with the request are parsed by :meth:`Opening._parse_frames`, declared here and implemented by
the frames phase.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from http import HTTPStatus
from typing import Self

from websockets.http11 import Request
from websockets.protocol import State

from . import logs
from .connection_transport import ConnectionBase
from .logs import Throttled

log = logging.getLogger("daemon.connection")  # the connection layer's one logger name
_refusals = Throttled(log)  # clients cause these at will: counted in metrics, logged sparingly

__all__ = ["EARLY_LIMIT", "Opening"]


EARLY_LIMIT = 64 * 1024  # bytes after the request held until it is answered
_END_OF_HEADERS = b"\r\n\r\n"


class Opening(ConnectionBase):
    """The opening handshake's layer of a connection (see the module docstring)."""

    __slots__ = ()

    @abstractmethod
    def _parse_frames(self, data: bytes | bytearray | None = None) -> None:
        """Parse ``data`` (by default, what waits unparsed) as frames of the open connection:
        the frames phase's (:class:`daemon.connection.Connection`). Called here once a 101 was
        sent, for what the client sent with its request."""
        raise NotImplementedError

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

    async def _answer(self: Self, request: Request) -> None:  # Self: see ConnectionBase._endpoint
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
            if response.status_code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
                # websockets answers an upgrade in another HTTP version than 1.1 with 505 (RFC
                # 9110, 15.6.6); what a client sent gets a 4xx here (PROTOCOL.md, "HTTP answers
                # before the upgrade"), as any other request the upgrade cannot be built from
                response = protocol.reject(HTTPStatus.BAD_REQUEST,
                                           "a WebSocket upgrade needs HTTP/1.1 (RFC 6455, 4.1)\n")
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

    @logs.correlating
    def _open_timed_out(self) -> None:
        self._timer = None
        if self.protocol.state is State.CONNECTING:
            self._abort()  # no handshake within open_timeout (a slow or idle client)
