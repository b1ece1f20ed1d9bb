"""The one exception hierarchy of pgbridge_client.

Every exception the client raises on purpose is a :class:`PgBridgeError`; the
websockets, OS and JSON errors it meets on the way are handled where they enter (retried, or
translated here with the original kept as ``__cause__``)::

    PgBridgeError                the root
    ├── RefusedError             the bridge refused, and a retry cannot fix it: ``code``, and
    │   │                        ``status`` (HTTP, before the upgrade) or ``close_code``
    │   ├── Unauthorized         HTTP 401 (twice with a token callable), close 4001 with a
    │   │                        fixed token, a refreshed token refused
    │   ├── Forbidden            HTTP 403 (origin), ``error`` ``forbidden`` (not a member)
    │   ├── NotFound             ``error`` ``not_found`` (no such room)
    │   ├── CursorExpired        ``since`` older than the retained log, or a hole in it
    │   ├── SubscriptionEnded    ``unsubscribed`` ``membership_revoked`` / ``room_deleted``
    │   └── UserDeleted          close 4003: sign the user out
    └── ClosedError              the bridge was closed (``async with`` left, ``close()``)

``RefusedError`` of a subscription ends that subscription only (its ``async for`` raises it);
one of the connection (HTTP 401/403, 4003, 1007, 1008, 1009) ends the bridge: every
subscription raises it. Refusals that pass (HTTP 429 and 5xx, close 1001, 1006, 1011, 1012,
1013, 4008, ``rate_limited`` and ``internal`` answers, a network error) are retried with
backoff, never raised (docs/clients/python.md, "Errors and stop rules").
"""

from __future__ import annotations


class PgBridgeError(Exception):
    """Root of every error pgbridge_client raises on purpose."""


class RefusedError(PgBridgeError):
    """The bridge refused, and asking again would be refused again.

    ``code``: the protocol's error code (``forbidden``, ``not_found``, ``bad_request``,
    ``cursor_expired``, ``unauthorized``, ...), the ``unsubscribed`` reason, or, for a closed
    connection or an HTTP refusal, a name (``user_deleted``, ``policy_violation``,
    ``message_too_big``, ``invalid_payload``, ``forbidden_origin``, ``http_404``).
    ``status``: the HTTP status of a refused upgrade, else ``None``. ``close_code``: the
    WebSocket close code, else ``None``. ``room``: the room the refusal concerns, else ``None``.
    """

    def __init__(self, message: str, *, code: str, status: int | None = None,
                 close_code: int | None = None, room: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.close_code = close_code
        self.room = room


class Unauthorized(RefusedError):
    """The token was refused: HTTP 401 (after one fresh token when ``token`` is a callable),
    close 4001 (expired) with a fixed token, or a ``refresh`` refused."""


class Forbidden(RefusedError):
    """HTTP 403 (a browser ``Origin`` the bridge does not admit), or ``forbidden``: the user
    is not a member of the room, or the room or user is deleted."""


class NotFound(RefusedError):
    """``not_found``: no such room."""


class CursorExpired(RefusedError):
    """Events the subscription needs are gone from the bridge's log (``since`` older than
    the retention, or a hole): reload the room from the application, then subscribe with
    ``since`` = its new head (PROTOCOL.md, "Ordering and delivery guarantees")."""


class SubscriptionEnded(RefusedError):
    """The bridge ended the subscription: ``code`` is the ``unsubscribed`` reason,
    ``membership_revoked`` or ``room_deleted``. Stop showing the room; do not subscribe again
    (PROTOCOL.md, "Losing access")."""


class UserDeleted(RefusedError):
    """Close 4003: the user was deleted; the token is refused from now on. Sign out."""


class ClosedError(PgBridgeError):
    """The bridge is closed: its ``async with`` block was left or ``close()`` was called."""
