"""The WebSocket close codes the bridge sends, defined once (docs/PROTOCOL.md, "Close codes").

Every close the bridge starts uses a member of :class:`Close`; the metric ``pgbridge_closes``
exports one series per member and its help text is built from :attr:`Close.meaning`;
``tests/unit/test_closes.py`` checks that PROTOCOL.md's table names exactly these codes. The
standard codes take their values from websockets' :class:`~websockets.frames.CloseCode` (RFC
6455, section 7.4.1); 4000 to 4999 are the application's own (RFC 6455, section 7.4.2).
"""

from __future__ import annotations

from enum import IntEnum

from websockets.frames import CloseCode

__all__ = ["Close"]


class Close(IntEnum):
    """A close code the bridge sends, with its meaning for logs and metrics."""

    GOING_AWAY = CloseCode.GOING_AWAY, "shutting down"
    INVALID_DATA = CloseCode.INVALID_DATA, "a text frame that is not UTF-8"
    POLICY = CloseCode.POLICY_VIOLATION, "policy (abuse, too many connections of the user)"
    TOO_BIG = CloseCode.MESSAGE_TOO_BIG, "frame too large or too many fragments"
    INTERNAL = CloseCode.INTERNAL_ERROR, "internal error or keepalive timeout"
    OVERLOADED = CloseCode.TRY_AGAIN_LATER, "overloaded or access could not be checked"
    TOKEN_EXPIRED = 4001, "token expired"
    USER_GONE = 4003, "user deleted"
    TOO_SLOW = 4008, "too slow"

    meaning: str

    def __new__(cls, value: int, meaning: str) -> Close:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member
