"""Signed NOTIFY payloads: what the capture triggers send, and how the daemon checks it.

Pure. Any role that can connect may ``NOTIFY`` any channel, so a payload is trusted only when it
carries the HMAC-SHA256 (RFC 2104) of its JSON text under the schema's key
(``change_notify_key.key``, 32 random bytes created by ``setup_db.py`` and readable by the owner
and the bridge role only; sql/schema.sql). The triggers send::

    <64 lower-case hex digits: HMAC-SHA256(key, UTF-8 bytes of TEXT)><TEXT>

where ``TEXT`` is the JSON the daemon acts on (sql/triggers/10_change_capture.sql). The daemon's
own probe (``{"probe": ...}``) is not signed: it only proves that the LISTEN connection hears.

A valid payload can be replayed by a role that can name the channel (they are secret: only
the owner and the bridge role can; sql/triggers/10_change_capture.sql), which gains nothing: an
event's ``seq`` is at most delivered once per room, a pointer only makes the daemon read the
log, and a user hint only makes it read ``users``.

Checking a signature costs CPU, and a role that can name the channel can send payloads faster
than the daemon checks them: :class:`RejectBudget` bounds how many that fail are checked per
window; past it the listener drops payloads unchecked and reads the log instead.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["REJECT_LIMIT", "REJECT_WINDOW", "SIGNATURE_HEX", "NotifyKey", "RejectBudget"]

SIGNATURE_HEX = 64  # hex digits of an HMAC-SHA256
# Payloads that fail their signature check which the listener checks per window (seconds): 200
# a second. The rest of the window, payloads are dropped unchecked, and at its end the listener
# reads the log (:class:`RejectBudget`): a short window delays a real event sent behind a flood
# less (100,000 forged NOTIFYs: 0.44-0.56 s with 0.25 s windows, 1.15-1.23 s with 1 s ones),
# at the cost of one read of the log and of the connected users per window while it lasts. A
# real daemon sees none fail but forgeries (a key rotation changes the channels too).
REJECT_LIMIT = 50
REJECT_WINDOW = 0.25


class NotifyKey:
    """One schema's signing key. ``key``: the raw bytes of ``change_notify_key.key``."""

    __slots__ = ("_base", "fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a NOTIFY signing key must hold at least 16 bytes")
        self._base = hmac.new(key, digestmod=hashlib.sha256)
        # names the key in logs without revealing it
        self.fingerprint = hashlib.sha256(b"pgbridge key fingerprint\0" + key).hexdigest()[:12]

    def derive(self, purpose: str) -> NotifyKey:
        """A key for another kind of payload (``"typing"``: the signals instances relay to each
        other, :mod:`daemon.presence_feed`), so that no payload signed for one purpose is ever
        accepted for another: HMAC-SHA256(key, ``"pgbridge derive\0" + purpose``). The
        triggers sign only JSON texts, which start with ``{``, never that label."""
        mac = self._base.copy()
        mac.update(b"pgbridge derive\0" + purpose.encode())
        return NotifyKey(mac.digest())

    def sign(self, text: str) -> str:
        """``text`` prefixed with its signature (what the triggers send; for tests and tools)."""
        mac = self._base.copy()
        mac.update(text.encode())
        return mac.hexdigest() + text

    def open(self, payload: str) -> str | None:
        """The JSON text of a signed ``payload``, or ``None`` when its signature is missing or
        wrong (a forgery, or a payload signed with another key)."""
        if len(payload) <= SIGNATURE_HEX:
            return None
        text = payload[SIGNATURE_HEX:]
        mac = self._base.copy()
        mac.update(text.encode())
        if not hmac.compare_digest(mac.hexdigest(), payload[:SIGNATURE_HEX]):
            return None
        return text


class RejectBudget:
    """How many payloads failing their signature check are checked: at most ``limit`` per
    ``window`` seconds (:data:`REJECT_LIMIT`, :data:`REJECT_WINDOW`). Pure; times are
    ``time.monotonic()`` seconds.

    A window starts with the first rejection after the last one ended. Once ``limit`` were
    rejected in it, :meth:`shedding` is true until it ends (:attr:`until`): the caller then
    drops payloads without checking them, and afterwards reads what it may have dropped from
    the log. So a flood costs at most ``limit`` checks per window, whatever its rate.
    """

    __slots__ = ("_count", "_start", "limit", "until", "window")

    def __init__(self, limit: int = REJECT_LIMIT, window: float = REJECT_WINDOW) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a reject budget needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._start = float("-inf")
        self._count = 0
        self.until = float("-inf")  # end of the window whose budget is spent

    def shedding(self, now: float) -> bool:
        """Drop payloads unchecked (the budget of the window is spent)."""
        return now < self.until

    def rejected(self, now: float) -> bool:
        """Count a payload that failed its check; true when it spent the window's budget (the
        caller starts shedding until :attr:`until`)."""
        if now - self._start >= self.window:
            self._start, self._count = now, 0
        self._count += 1
        if self._count == self.limit:
            self.until = self._start + self.window
            return True
        return False
