"""A connection's fault boundary (:func:`fault_boundary`): how whatever answering one client
request raises is answered, so that it ends that request and nothing else
(:class:`daemon.client.Client`, PROTOCOL.md "error" codes)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from . import logs
from .errors import BridgeError
from .metrics import Metrics
from .protocol import ProtocolError, Request, error

__all__ = ["fault_boundary"]


@contextlib.contextmanager
def fault_boundary(request: Request | None, *, log: logging.Logger, user: str,
                   correlation_id: str, metrics: Metrics,
                   send: Callable[[str], None]) -> Iterator[None]:
    """Whatever answering ``request`` (or parsing a frame, ``None``) of ``user``'s connection
    raises ends there: a refusal (:class:`ProtocolError`) is its ``error`` frame, counted in
    ``pgbridge_refusals_total``; a database failure (:class:`BridgeError`) an ``internal``
    error the client may retry; a bug is logged once with an incident id, never with the
    client's bytes. Lines go to ``log`` with the connection's ``correlation_id``; frames to
    ``send``."""
    try:
        yield
    except ProtocolError as exc:
        metrics.refusals.labels(exc.code).inc()
        # ref and room were checked by daemon.protocol (printable, at most 128 characters;
        # a channels.id); the message is the bridge's own
        log.debug("%s of user %s refused: %s", _kind(request), user, exc.code,
                  extra={"event": "request_refused", "code": exc.code, "ref": exc.ref,
                         "room": exc.room, "correlation_id": correlation_id})
        send(exc.frame())
    except BridgeError as exc:  # the database failed: the client may retry
        log.error("%s of user %s failed: %s", _kind(request), user, exc,
                  extra={"event": "request_failed", "ref": _ref(request),
                         "room": _room(request), "correlation_id": correlation_id})
        send(error("internal", "temporary failure; retry", ref=_ref(request),
                   room=_room(request)))
    except Exception:  # a bug: it ends this request, not the connection or the bridge
        with logs.correlated(correlation_id):
            incident = logs.incident(log, "request_crashed", "%s (ref %r, room %s) of user %s "
                                     "crashed", _kind(request), _ref(request), _room(request),
                                     user)
        send(error("internal", f"internal error (incident {incident}); retry",
                   ref=_ref(request), room=_room(request)))


def _kind(request: Request | None) -> str:
    return type(request).__name__.lower() if request is not None else "a frame"


def _ref(request: Request | None) -> str | None:
    return request.ref if request is not None else None


def _room(request: Request | None) -> str | None:
    return getattr(request, "room", None)
