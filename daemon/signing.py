"""Signed NOTIFY payloads: what the capture triggers send, and how the daemon checks it.

Pure. Any role that can connect may ``NOTIFY`` any channel, so a payload is trusted only when it
carries the HMAC-SHA256 (RFC 2104) of its JSON text under the schema's key
(``change_notify_key.key``, 32 random bytes created by ``setup_db.py`` and readable by the owner
and the bridge role only; sql/schema.sql). The triggers send::

    <64 lower-case hex digits: HMAC-SHA256(key, UTF-8 bytes of TEXT)><TEXT>

where ``TEXT`` is the JSON the daemon acts on (sql/triggers/10_change_capture.sql). The daemon's
own probe (``{"probe": ...}``) is not signed: it only proves that the LISTEN connection hears.

A valid payload can be replayed by anyone who LISTENs, which gains nothing: an event's ``seq``
is at most delivered once per room, a pointer only makes the daemon read the log, and a user hint
only makes it read ``users``.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["SIGNATURE_HEX", "NotifyKey"]

SIGNATURE_HEX = 64  # hex digits of an HMAC-SHA256


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
