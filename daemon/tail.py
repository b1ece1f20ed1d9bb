"""``pgbridge tail ROOM``: the reference client of the protocol (PROTOCOL.md).

Prints each ``event`` frame of the room as one JSON line on stdout (with ``--snapshot N``, the
``snapshot`` frame of its N most recent messages first; other frames go to stderr,
and, on each ``welcome``, ``pgbridge tail: connected as user U, correlation id C``: C names the
connection's lines in the bridge's log),
reconnects with backoff when the server goes away (1001, 1011, 1013, 4008, network, HTTP 429 or
503), resuming with ``since`` = the last seq it printed, so nothing is missed or printed twice.
A subscribe refused for a reason that passes (``internal``: the database failed; ``rate_limited``)
is sent again after a backoff delay; those waits are reported on stderr as progress
(``pgbridge tail: reconnecting in 0.4 s (since=12)``). Refusals a retry cannot fix (401, 403,
``forbidden``, ``not_found``, ``unsubscribed``, 1008, 4003) raise :class:`RefusedError`, which
the CLI's error boundary (:mod:`daemon.cli`) reports as one line, exit code 1. The command line
itself (``pgbridge tail ROOM --user ...``) is parsed in :mod:`daemon.cli`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .backoff import Backoff
from .errors import EXIT_OK, RefusedError

RESUMABLE = {1001, 1006, 1011, 1012, 1013, 4008}  # close codes worth a reconnect
RETRIED_STATUS = {429, 503}  # handshake refusals that pass
RETRIED_ERRORS = {"internal", "rate_limited"}  # subscribe refusals that pass


async def _frames(ws: ClientConnection) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Each frame the bridge sends, as text and parsed: one per message, or several
    newline-separated (``?batch=``; PROTOCOL.md, "Coalesced messages")."""
    async for raw in ws:
        for text in (raw if isinstance(raw, str) else raw.decode()).split("\n"):
            yield text, json.loads(text)


def _shown(value: object) -> str:
    """A value the server sent, fit for a terminal: a short printable string as it is, anything
    else as JSON (whose escapes keep control characters, an escape sequence included, from
    reaching the terminal), cut at 128 characters; ``(none)`` when absent."""
    if value is None:
        return "(none)"
    if isinstance(value, str) and value.isprintable() and len(value) <= 128:
        return value
    return json.dumps(value)[:128]


def _with_batch(url: str, batch: int | None) -> str:
    if batch is None:
        return url
    return f"{url}{'&' if '?' in url else '?'}batch={batch}"


def _subscribe_frame(room: str, since: int | None, snapshot: int | None = None) -> str:
    request: dict[str, object] = {"type": "subscribe", "room": room, "ref": "tail"}
    if since is not None:
        request["since"] = since
    elif snapshot is not None:
        request["snapshot"] = snapshot
    return json.dumps(request)


async def tail(url: str, token: str, room: str, *, since: int | None, ack: bool,
               max_events: int | None = None, batch: int | None = 0,
               snapshot: int | None = None) -> int:
    """Follow ``room`` at ``url`` (``ws://host:port/ws``) with ``token``; returns 0 after
    ``max_events`` events (``None``: follow until interrupted). Frames are coalesced for at
    most ``batch`` ms (``?batch=``, PROTOCOL.md "Coalesced messages"; ``None``: one frame per
    message). ``snapshot``: first print the ``snapshot`` frame of the room's N most recent
    messages as one line (PROTOCOL.md, "Snapshot then live"), then the events after it; asked
    until one arrived, then reconnects resume with ``since``.

    Raises :class:`RefusedError` on a refusal a retry cannot fix (module docstring)."""
    backoff = Backoff(base=0.2, cap=10.0)
    last = since
    printed = 0
    while True:
        try:
            async with websockets.connect(_with_batch(url, batch), additional_headers={
                    "Authorization": f"Bearer {token}"}, max_size=2**24) as ws:
                await ws.send(_subscribe_frame(room, last, snapshot))
                async for text, frame in _frames(ws):
                    if frame.get("type") == "event":
                        if last is not None and frame["seq"] <= last:
                            continue  # duplicate after a reconnect
                        print(text, flush=True)
                        last = frame["seq"]
                        printed += 1
                        if ack:
                            await ws.send(json.dumps({"type": "ack", "room": room, "seq": last}))
                        if max_events is not None and printed >= max_events:
                            return EXIT_OK
                        continue
                    if frame.get("type") == "snapshot" and snapshot is not None:
                        print(text, flush=True)
                        last, snapshot = frame["seq"], None  # held: resume after it
                        continue
                    print(json.dumps(frame), file=sys.stderr, flush=True)
                    if frame.get("type") == "welcome":
                        print(f"pgbridge tail: connected as user {_shown(frame.get('user'))}, "
                              f"correlation id {_shown(frame.get('correlation_id'))}",
                              file=sys.stderr, flush=True)
                    elif frame.get("type") == "subscribed":
                        backoff.reset()
                        if snapshot is None:  # else its seq is held once it is printed
                            last = frame["from"] if last is None else last
                    elif (frame.get("type") == "error" and frame.get("code") in RETRIED_ERRORS
                          and frame.get("ref") == "tail"):
                        delay = backoff.next()
                        print(f"pgbridge tail: subscribe failed ({frame.get('code')}); trying "
                              f"again in {delay:.1f} s (since={last})", file=sys.stderr)
                        await asyncio.sleep(delay)
                        await ws.send(_subscribe_frame(room, last, snapshot))
                    elif frame.get("type") == "error":
                        raise RefusedError(f"refused: {frame.get('code')}: "
                                           f"{frame.get('message')} (room {room})")
                    elif frame.get("type") == "unsubscribed":
                        raise RefusedError(f"unsubscribed from room {room}: "
                                           f"{frame.get('reason')}")
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = " ".join(exc.response.body.decode(errors="replace").split())[:300]
            if status not in RETRIED_STATUS:
                raise RefusedError(f"refused: HTTP {status} {body}") from None
            print(f"pgbridge tail: refused: HTTP {status} {body}", file=sys.stderr)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            if code not in RESUMABLE:
                reason = exc.rcvd.reason if exc.rcvd and exc.rcvd.reason else "no reason given"
                raise RefusedError(f"the bridge closed the connection with {code} "
                                   f"({reason})") from None
        except BrokenPipeError:
            raise  # our stdout was closed (| head): the CLI exits quietly, no reconnect
        except OSError as exc:
            print(f"pgbridge tail: {exc}", file=sys.stderr)
        delay = backoff.next()
        print(f"pgbridge tail: reconnecting in {delay:.1f} s (since={last})", file=sys.stderr)
        await asyncio.sleep(delay)
