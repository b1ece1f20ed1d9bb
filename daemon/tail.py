"""``pgbridge tail ROOM`` and ``pgbridge tail --feed``: the reference client of the protocol
(PROTOCOL.md).

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

With ``--feed`` (:func:`tail_feed`, PROTOCOL.md "One feed per user") it follows every room of
the user instead: the ``feed`` frame (the rooms with ``head``, ``acked``, ``unread``) as one
JSON line on stdout, with ``pgbridge tail: feed of N rooms, U unread`` on stderr, then each
event of any of the rooms, and each ``unsubscribed`` (a room left or deleted), on stdout. A
reconnect sends ``feed`` again and prints its answer, the rooms as they are then: the events in
between are not printed (a feed is an inbox, not a log: ``tail ROOM --since`` replays a room).
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
        except (InvalidStatus, ConnectionClosed, OSError) as exc:
            _dropped(exc)
        delay = backoff.next()
        print(f"pgbridge tail: reconnecting in {delay:.1f} s (since={last})", file=sys.stderr)
        await asyncio.sleep(delay)


def _dropped(exc: InvalidStatus | ConnectionClosed | OSError) -> None:
    """A connection refused or lost: returns when a reconnect may help (said on stderr);
    raises :class:`RefusedError` when it cannot, and ``BrokenPipeError`` as it is (our stdout
    was closed, ``| head``: the CLI exits quietly, no reconnect)."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        body = " ".join(exc.response.body.decode(errors="replace").split())[:300]
        if status not in RETRIED_STATUS:
            raise RefusedError(f"refused: HTTP {status} {body}") from None
        print(f"pgbridge tail: refused: HTTP {status} {body}", file=sys.stderr)
    elif isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd else 1006
        if code not in RESUMABLE:
            reason = exc.rcvd.reason if exc.rcvd and exc.rcvd.reason else "no reason given"
            raise RefusedError(f"the bridge closed the connection with {code} "
                               f"({reason})") from None
    elif isinstance(exc, BrokenPipeError):
        raise exc
    else:
        print(f"pgbridge tail: {exc}", file=sys.stderr)


def feed_summary(frame: dict[str, Any]) -> str:
    """The stderr line of a ``feed`` answer: ``pgbridge tail: feed of N rooms, U unread``
    (U: the sum of the rooms' ``unread``, each counted up to 100 by the bridge)."""
    rooms = frame.get("rooms")
    rooms = rooms if isinstance(rooms, list) else []
    unread = sum(r["unread"] for r in rooms
                 if isinstance(r, dict) and isinstance(r.get("unread"), int))
    return f"pgbridge tail: feed of {len(rooms)} rooms, {unread} unread"


async def tail_feed(url: str, token: str, *, ack: bool, max_events: int | None = None,
                    batch: int | None = 0) -> int:
    """Follow every room of the token's user at ``url`` (PROTOCOL.md, "One feed per user";
    module docstring for what is printed); returns 0 after ``max_events`` events (``None``:
    until interrupted). ``ack``: acknowledge each event printed. ``batch`` as for
    :func:`tail`. A ``feed`` refused with ``internal`` or ``rate_limited`` is sent again after
    a backoff delay.

    Raises :class:`RefusedError` on a refusal a retry cannot fix (module docstring)."""
    backoff = Backoff(base=0.2, cap=10.0)
    request = json.dumps({"type": "feed", "ref": "tail"})
    printed = 0
    while True:
        heads: dict[str, int] = {}  # room -> last seq printed (or the answer's head)
        try:
            async with websockets.connect(_with_batch(url, batch), additional_headers={
                    "Authorization": f"Bearer {token}"}, max_size=2**24) as ws:
                await ws.send(request)
                async for text, frame in _frames(ws):
                    kind = frame.get("type")
                    if kind == "event" and heads.get(frame["room"], -1) < frame["seq"]:
                        print(text, flush=True)
                        heads[frame["room"]] = frame["seq"]
                        printed += 1
                        if ack:
                            await ws.send(json.dumps({"type": "ack", "room": frame["room"],
                                                      "seq": frame["seq"]}))
                        if max_events is not None and printed >= max_events:
                            return EXIT_OK
                    elif kind == "feed":
                        backoff.reset()
                        print(text, flush=True)
                        print(feed_summary(frame), file=sys.stderr, flush=True)
                        heads = {str(r.get("room")): r.get("head", 0)
                                 for r in frame.get("rooms") or [] if isinstance(r, dict)}
                    elif kind == "unsubscribed":
                        print(text, flush=True)
                        heads.pop(str(frame.get("room")), None)
                    elif kind == "event":
                        continue  # held already
                    elif kind == "welcome":
                        print(json.dumps(frame), file=sys.stderr, flush=True)
                        print(f"pgbridge tail: connected as user {_shown(frame.get('user'))}, "
                              f"correlation id {_shown(frame.get('correlation_id'))}",
                              file=sys.stderr, flush=True)
                    elif kind == "error" and frame.get("ref") == "tail":
                        print(json.dumps(frame), file=sys.stderr, flush=True)
                        if frame.get("code") not in RETRIED_ERRORS:
                            raise RefusedError(f"refused: {frame.get('code')}: "
                                               f"{frame.get('message')} (feed)")
                        delay = backoff.next()
                        print(f"pgbridge tail: feed failed ({frame.get('code')}); trying "
                              f"again in {delay:.1f} s", file=sys.stderr)
                        await asyncio.sleep(delay)
                        await ws.send(request)
                    else:
                        print(json.dumps(frame), file=sys.stderr, flush=True)
        except (InvalidStatus, ConnectionClosed, OSError) as exc:
            _dropped(exc)
        delay = backoff.next()
        print(f"pgbridge tail: reconnecting in {delay:.1f} s (feed)", file=sys.stderr)
        await asyncio.sleep(delay)
