"""The connection's task of a :class:`~pgbridge_client.Bridge`: it connects (a fresh token
each attempt), reads the frames (:mod:`.routing`), sends the acks and refreshes the token
while welcomed, and when the connection ends decides with :mod:`pgbridge_client.rules`
whether to reconnect after a backoff delay (at least an HTTP ``Retry-After``, at most
:data:`~pgbridge_client.rules.RETRY_AFTER_CAP`) or to end the bridge with a
:class:`RefusedError`. The token never reaches a log line: the logger handed to websockets
takes it out of the handshake's lines (:class:`_Redacting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .core import _cause, _escaped, _shown
from .errors import ClosedError, PgBridgeError, Unauthorized
from .routing import _Reconnect, _Routing
from .rules import (
    JWT_SHAPE,
    TOKEN_EXPIRED,
    close_refusal,
    is_token,
    retry_after,
    status_refusal,
    token_expiry,
)

log = logging.getLogger("pgbridge_client")

USER_AGENT = f"pgbridge-client websockets/{websockets.version.version}"
CLOSE_WAIT = 2.0  # seconds closing waits for the bridge to have read the last acks
STABLE = 5.0  # seconds welcomed: the next drop's backoff starts again from `base`


class _Connection(_Routing):
    """The connection's task and its side tasks (module docstring)."""

    def _start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run_guarded())

    async def _run_guarded(self) -> None:
        """:meth:`_run`, whose unexpected failure (a bug) ends the bridge rather than leave
        its consumers waiting forever."""
        try:
            await self._run()
        except Exception as exc:
            log.exception("the connection task failed", extra={"event": "internal"})
            error = PgBridgeError(f"internal error of pgbridge_client: {_cause(exc)}")
            error.__cause__ = exc
            self._end(error)

    async def _wait_connected(self) -> None:
        await self._connected.wait()
        if self._error is not None and not isinstance(self._error, ClosedError):
            raise self._error

    async def _run(self) -> None:
        """Connect, serve, and on each end either reconnect after a delay (logged as one
        WARNING line naming the cause, the delay and where each room resumes) or end the
        bridge with the refusal."""
        auth_retried = False  # 401 with a callable token: once more at once, with a new one
        attempt = 0
        while self._error is None:
            delay: float | None = None
            welcomed_at: float | None = None
            now = False
            try:
                token = await self._get_token()
                self._token, self._exp = token, token_expiry(token)
                async with websockets.connect(
                        self.url, additional_headers={"Authorization": f"Bearer {token}"},
                        max_size=self._max_size, open_timeout=self._open_timeout,
                        user_agent_header=USER_AGENT, logger=_WEBSOCKETS_LOG,
                ) as ws:
                    try:
                        await self._serve(ws)
                    finally:
                        welcomed_at = self._welcomed_at
                        self._detach()
            except _Reconnect as exc:
                cause = str(exc)
            except InvalidStatus as exc:
                status = exc.response.status_code
                body = _escaped(" ".join((exc.response.body or b"").decode(
                    errors="replace").split())[:300])
                refusal = status_refusal(status, body)
                cause = f"refused: HTTP {status} {body}".rstrip()
                if status == 401 and callable(self._token_source) and not auth_retried:
                    auth_retried, delay = True, 0.0  # once, with a fresh token
                elif refusal is not None:
                    refusal.__cause__ = exc
                    self._end(refusal)
                    return
                else:
                    delay = max(retry_after(exc.response.headers.get("Retry-After")),
                                self._backoff.next())
            except ConnectionClosed as exc:
                code, reason = _close_of(exc)
                refusal = close_refusal(code, reason)
                if refusal is None and code == TOKEN_EXPIRED and not callable(self._token_source):
                    refusal = Unauthorized("the token expired (4001) and token is a fixed "
                                           "string", code="unauthorized", close_code=code)
                if refusal is not None:
                    refusal.__cause__ = exc
                    self._end(refusal)
                    return
                cause = f"connection closed with {code} ({_shown(reason or 'no reason given')})"
                now = code == TOKEN_EXPIRED  # with a new token, at once unless it happens again
            except (OSError, InvalidHandshake, TimeoutError, _TokenUnavailable) as exc:
                cause = f"cannot connect to {_shown_url(self.url)}: {_cause(exc)}"
            if self._error is not None:
                return  # closed meanwhile
            if welcomed_at is not None:
                auth_retried = False
                if time.monotonic() - welcomed_at >= STABLE:
                    self._backoff.reset()
                    attempt = 0
            if now and attempt == 0:
                delay = 0.0
            if delay is None:
                delay = self._backoff.next()
            attempt += 1
            log.warning("%s; reconnecting in %.1f s (attempt %d%s)", cause, delay, attempt,
                        self._held(), extra={"event": "reconnecting", "cause": cause,
                                             "delay": delay, "attempt": attempt})
            await asyncio.sleep(delay)

    async def _get_token(self) -> str:
        source = self._token_source
        try:
            value = source() if callable(source) else source
            if inspect.isawaitable(value):
                async with asyncio.timeout(self._open_timeout):
                    value = await value
        except TimeoutError as exc:
            raise _TokenUnavailable(f"the token callable did not answer within "
                                    f"{self._open_timeout} s") from exc
        except Exception as exc:
            raise _TokenUnavailable(f"the token callable raised {_cause(exc)}") from exc
        if not is_token(value):  # not shown: it is a secret
            raise _TokenUnavailable(f"the token callable returned {type(value).__name__} of "
                                    f"length {len(value) if isinstance(value, str) else '-'}, "
                                    f"not a token ({JWT_SHAPE})")
        assert isinstance(value, str)
        return value

    async def _serve(self, ws: ClientConnection) -> None:
        """Read the connection until it ends (raises what ended it)."""
        self._ws = ws
        self._welcomed_at = None
        async with asyncio.timeout(self._open_timeout):
            while not self._welcomed:
                await self._on_message(await ws.recv())
        side = [asyncio.create_task(self._ack_loop()), asyncio.create_task(self._refresh_loop())]
        try:
            while True:
                await self._on_message(await ws.recv())
        finally:
            for task in side:
                task.cancel()

    def _detach(self) -> None:
        """Forget the connection: its refs, and each room's standing on it."""
        self._ws = None
        self._welcomed = False
        self._welcomed_at = None
        self._refs.clear()
        for stream in self._streams():
            if stream.retry is not None:
                stream.retry.cancel()
            stream.ref, stream.confirmed, stream.retry = None, False, None
        for state in self._rooms.values():
            state.feed_held.clear()

    # --- acks and token refresh ---------------------------------------------------------

    async def _flush_acks(self) -> bool:
        """Send the acks due (one per room); true if any was sent."""
        sent = False
        for state in list(self._rooms.values()):
            if state.confirmed and state.to_ack > state.acked:
                seq = state.to_ack
                if await self._send({"type": "ack", "room": state.room, "seq": seq}):
                    state.acked, sent = seq, True
        feed = self._feed
        if feed is not None and feed.confirmed:
            for room, seq in list(feed.to_ack.items()):
                if await self._send({"type": "ack", "room": room, "seq": seq}):
                    feed.acked[room], sent = seq, True
                    if feed.to_ack.get(room) == seq:
                        del feed.to_ack[room]
        return sent

    async def _answered(self) -> None:
        """Wait (at most :data:`CLOSE_WAIT`) for the answer to a ``ping`` sent now: the bridge
        answers frames in order, so it has then read the ones sent before (the acks sent
        before closing; a close frame right behind them could overtake their handling)."""
        ref = self._ref("c", "ping")
        self._pong = (ref, asyncio.Event())
        if await self._send({"type": "ping", "ref": ref}):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await self._pong[1].wait()

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ack_interval * self._ack_factor)
            await self._flush_acks()

    async def _refresh_loop(self) -> None:
        """Send ``refresh`` with a new token ``refresh_before`` seconds before ``exp``."""
        if not callable(self._token_source):
            return
        while self._exp is not None:
            await asyncio.sleep(max(self._exp - self._refresh_before - time.time(), 0.0))
            try:
                token = await self._get_token()
            except _TokenUnavailable as exc:
                log.warning("cannot refresh the token: %s", exc, extra={"event": "refresh"})
                token = None
            exp = token_expiry(token) if token is not None else None
            if token is None or exp is None or exp <= self._exp:
                left = self._exp - time.time()
                if left <= 0:
                    return  # expired: the bridge closes with 4001, and a new token connects
                await asyncio.sleep(min(max(left / 2, 1.0), 30.0))
                continue
            if await self._send({"type": "refresh", "token": token,
                                 "ref": self._ref("r", "refresh")}):
                self._token, self._exp = token, exp
                log.info("token refreshed (expires in %.0f s)", exp - time.time(),
                         extra={"event": "refreshed"})


class _TokenUnavailable(PgBridgeError):
    """The token callable raised or returned no string: retried with backoff."""

def _close_of(exc: ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    if exc.sent is not None and exc.sent.code == 1009:  # we refused a frame over max_size
        return 1009, exc.sent.reason
    return 1006, ""


_CREDENTIALS = re.compile(r"(?i)(\bBearer\s+|[?&]token=)[^&#\s]+")


def _redact(text: str) -> str:
    """``text`` with the token of a ``Bearer`` header value or a ``?token=`` taken out."""
    return _CREDENTIALS.sub(r"\1[redacted]", text)


class _Redacting(logging.LoggerAdapter[logging.Logger]):
    """The logger handed to websockets: its DEBUG lines of the handshake (the request line
    and each header) without the token (:func:`_redact`)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            self.logger.log(level, msg, *(_redact(a) if isinstance(a, str) else a
                                          for a in args), **kwargs)


_WEBSOCKETS_LOG = _Redacting(logging.getLogger("websockets.client"))


def _shown_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


