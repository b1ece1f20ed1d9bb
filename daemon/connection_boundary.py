"""Where a :class:`~daemon.connection.Connection` meets the code around it: what it asks of its
server (:class:`Endpoint`), what it hands its messages to (:class:`Receiver`), the fault
boundary through which code shared by all connections calls into one (:func:`contained`), and
what its end reports (:func:`close_code_sent`).

Why a module of its own: these are the contracts of the connection layer, read by whoever
implements or calls it (:mod:`daemon.server`, :mod:`daemon.client`, :mod:`daemon.heartbeat`),
while how a connection keeps them (``daemon/connection.py`` and the modules it is built from)
is read by whoever changes the driver. Nothing here does I/O; :mod:`daemon.connection` exports
every name.

Nothing here imports the connection either: a connection hands its server itself, so
:class:`Endpoint` is generic in the type of what it is handed (the server is an
``Endpoint[Connection]``), and the connection's base class asks for an ``Endpoint[Self]``
(:class:`~daemon.connection_transport.ConnectionBase`). The contracts come first, the
connection is built on them, and no module of the connection layer imports
:mod:`daemon.connection` back (``tests/unit/test_no_import_cycles.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Concatenate, Protocol, TypeVar

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

__all__ = ["Endpoint", "Receiver", "close_code_sent", "contained"]


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
        decoded from UTF-8, a binary one as bytes. At most about
        :data:`~daemon.connection.FRAMES_PER_TURN` of them; to let other connections run, answer
        one now and the rest in later turns."""

    def pinged(self) -> None:
        """The peer sent a ping (already answered with a pong)."""


_Conn_contra = TypeVar("_Conn_contra", contravariant=True)


class Endpoint(Protocol[_Conn_contra]):
    """What a connection asks of its server (:class:`daemon.server.Server`, an
    ``Endpoint[Connection]``); the type parameter is the connection's class
    (:class:`daemon.connection.Connection`), which the server's methods are handed.
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

    def process_request(self, conn: _Conn_contra,
                        request: Request) -> Awaitable[Response | None]:
        """The answer to ``request``; ``None`` to accept the upgrade. Never raises."""

    def opened(self, conn: _Conn_contra) -> None:
        """``conn`` was upgraded: set its ``receiver``, or close it."""

    def abandoned(self, conn: _Conn_contra, reason: str) -> None:
        """``conn``'s upgrade, accepted by :meth:`process_request`, will not be opened:
        ``client_gone`` (its client left before the answer) or ``early_data`` (it sent more
        than :data:`~daemon.connection_opening.EARLY_LIMIT` bytes before the answer; it is
        answered 400)."""

    def closing(self, conn: _Conn_contra) -> None:
        """``conn`` is ending (this side half-closed, closed or aborted it, or the peer is
        gone): forget it wherever it is shared; nothing is written to it from now on. Called
        once, before :meth:`closed`."""

    def closed(self, conn: _Conn_contra, code_sent: int | None) -> None:
        """``conn`` ended. ``code_sent``: the close code this side sent first, ``None`` when
        the peer closed first or no close frame was sent."""

