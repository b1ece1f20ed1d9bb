"""What to do when the bridge refuses or a connection ends: the client's stop rules
(docs/PROTOCOL.md "Close codes" and "HTTP answers before the upgrade"; the same as the
JavaScript client's), the backoff between attempts, and a token's expiry. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
from dataclasses import dataclass

from .errors import Forbidden, RefusedError, Unauthorized, UserDeleted

# Close codes a retry cannot fix, with the code the RefusedError names.
FATAL_CLOSE = {1007: "invalid_payload", 1008: "policy_violation", 1009: "message_too_big",
               4003: "user_deleted"}
TOKEN_EXPIRED = 4001  # a new token, at once (a fixed one: Unauthorized)
RETRIED_ERRORS = frozenset({"rate_limited", "internal"})  # refusals of a subscribe that pass
RETRY_AFTER_CAP = 300.0  # seconds: the longest Retry-After honoured


def close_refusal(code: int, reason: str) -> RefusedError | None:
    """The error a connection closed with ``code`` ends the bridge with, or ``None`` when a
    reconnect may help (1000, 1001, 1006, 1011, 1012, 1013, 4008 and every code not named in
    PROTOCOL.md; 4001 is decided by the caller, who knows whether it can get a new token)."""
    name = FATAL_CLOSE.get(code)
    if name is None:
        return None
    text = f"the bridge closed the connection with {code} ({reason or 'no reason given'})"
    if code == 4003:
        return UserDeleted(text, code=name, close_code=code)
    return RefusedError(text, code=name, close_code=code)


def status_refusal(status: int, body: str) -> RefusedError | None:
    """The error an upgrade refused with HTTP ``status`` ends the bridge with, or ``None``
    when a retry may help (429, and 5xx: an overloaded bridge, one shutting down, a proxy
    whose bridge restarts). 401 is retried once with a fresh token by the caller when the
    token is a callable."""
    if status == 429 or 500 <= status <= 599:
        return None
    text = f"refused: HTTP {status} {body}".rstrip()
    if status == 401:
        return Unauthorized(text, code="unauthorized", status=status)
    if status == 403:
        return Forbidden(text, code="forbidden_origin", status=status)
    return RefusedError(text, code=f"http_{status}", status=status)


def retry_after(value: str | None) -> float:
    """A ``Retry-After`` header in seconds (at most :data:`RETRY_AFTER_CAP`); 0 when absent
    or not a number of seconds (an HTTP date is not honoured)."""
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(seconds, RETRY_AFTER_CAP) if seconds > 0 else 0.0


@dataclass
class Backoff:
    """Jittered exponential backoff: the n-th consecutive failure waits a delay uniform in
    ``[base/2, min(cap, base * 2**(n-1))]`` seconds; :meth:`reset` after a success."""

    base: float = 0.25
    cap: float = 10.0
    failures: int = 0

    def next(self) -> float:
        """The delay before the next attempt, in seconds (counts one more failure)."""
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 40))
        self.failures += 1
        return random.uniform(min(self.base / 2, ceiling), ceiling)

    def reset(self) -> None:
        self.failures = 0


_TOKEN = re.compile(r"[A-Za-z0-9_.=-]{1,4096}")
JWT_SHAPE = "1 to 4,096 of A-Z a-z 0-9 - _ . ="  # PROTOCOL.md "Limits", `token`


def is_token(value: object) -> bool:
    """Whether ``value`` can be a token the bridge takes (:data:`JWT_SHAPE`): anything
    else is refused by it, and may not even fit in an HTTP header (a newline)."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def token_expiry(token: str) -> float | None:
    """A JWT's ``exp`` (seconds since 1970), read without checking the signature (the bridge
    checks it); ``None`` when the token has none or is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or exp != exp:
        return None
    return float(exp)
