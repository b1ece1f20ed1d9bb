"""``pgbridge tail ROOM`` and ``pgbridge tail --feed``: the command-line client of the protocol
(PROTOCOL.md).

``tail ROOM`` runs on the Python client, :mod:`pgbridge_client` (clients/python,
docs/clients/python.md), and shows what it does: each ``event`` of the room as one JSON line on
stdout (with ``--snapshot N``, the ``snapshot`` frame of its N most recent messages first); the
other frames on stderr, and, on each ``welcome``, ``pgbridge tail: connected as user U, correlation
id C`` (C names the connection's lines in the bridge's log). The client reconnects with backoff when
the bridge goes away (1001, 1006, 1011, 1013, 4008, the network, HTTP 429 or 5xx) and resumes with
``since`` = the last seq printed, so nothing is missed or printed twice; it subscribes again after a
refusal that passes (``internal``, ``rate_limited``). Its log lines (the ``pgbridge_client`` logger)
are the progress on stderr: ``pgbridge tail: connection closed with 1001 (going away); reconnecting
in 0.4 s (attempt 1; room R since=12)``, ``pgbridge tail: subscribe failed (internal); trying again
in 0.4 s (room R, since=12)``. Refusals a retry cannot fix (401, 403, ``forbidden``, ``not_found``,
``unsubscribed``, 1007, 1008, 1009, 4003; 4001 with ``--token``: a fixed token) raise
:class:`RefusedError`, which the CLI's error boundary (:mod:`daemon.cli`) reports as one line, exit
code 1. The command line itself (``pgbridge tail ROOM --user ...``) is parsed in :mod:`daemon.cli`.

With ``--feed`` (:func:`tail_feed`, the client's ``feed()``, PROTOCOL.md "One feed per user") it
follows every room of the user instead: the ``feed`` frame (the rooms with ``head``, ``acked``,
``unread``) as one JSON line on stdout, with ``pgbridge tail: feed of N rooms, U unread`` on stderr,
then each event of any of the rooms, and each ``unsubscribed`` (a room left or deleted), on stdout.
A reconnect sends ``feed`` again and prints its answer, the rooms as they are then: the events in
between are not printed (a feed is an inbox, not a log: ``tail ROOM --since`` replays a room).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterable, Callable, Iterator, Mapping
from typing import Any

import pgbridge_client

from .errors import EXIT_OK, RefusedError

# what a subscription or a feed yields
Item = (pgbridge_client.Event | pgbridge_client.Snapshot | pgbridge_client.FeedRooms
        | pgbridge_client.RoomLeft)


def _shown(value: object) -> str:
    """A value the server sent, fit for a terminal: a short printable string as it is, anything
    else as JSON (whose escapes keep control characters, an escape sequence included, from
    reaching the terminal), cut at 128 characters; ``(none)`` when absent."""
    if value is None:
        return "(none)"
    if isinstance(value, str) and value.isprintable() and len(value) <= 128:
        return value
    return json.dumps(value)[:128]


def _line(frame: Mapping[str, Any]) -> str:
    """A frame as one JSON line, as the bridge writes it (no whitespace, ASCII)."""
    return json.dumps(frame, separators=(",", ":"))


def _on_frame(frame: Mapping[str, Any], stdout: tuple[str, ...] = ("event", "snapshot")) -> None:
    """Every frame but those printed on stdout (by type) goes to stderr."""
    if frame.get("type") in stdout:
        return
    print(json.dumps(frame), file=sys.stderr, flush=True)
    if frame.get("type") == "welcome":
        print(f"pgbridge tail: connected as user {_shown(frame.get('user'))}, "
              f"correlation id {_shown(frame.get('correlation_id'))}", file=sys.stderr,
              flush=True)


def _on_frame_of_feed(frame: Mapping[str, Any]) -> None:
    _on_frame(frame, ("event", "feed", "unsubscribed"))


@contextlib.contextmanager
def _client_progress() -> Iterator[None]:
    """The client's log lines on stderr as ``pgbridge tail: ...`` (WARNING and up, or the
    level the tools log at when lower: PGBRIDGE_LOG_LEVEL), not through the root handler."""
    logger = logging.getLogger("pgbridge_client")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pgbridge tail: %(message)s"))
    handler.setLevel(min(logging.getLogger().getEffectiveLevel(), logging.WARNING))
    propagate, level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(handler.level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level


async def tail(url: str, token: str | Callable[[], str], room: str, *, since: int | None,
               ack: bool, max_events: int | None = None, batch: int | None = 0,
               snapshot: int | None = None) -> int:
    """Follow ``room`` at ``url`` (``ws://host:port/ws``) with ``token`` (a JWT, or a callable
    minting one: called for each connection and before the token expires); returns 0 after
    ``max_events`` events (``None``: follow until interrupted). ``since``: the last seq held
    (``None``: from the user's ``sync_state``, else live). ``ack``: acknowledge each event
    printed. Frames are coalesced for at most ``batch`` ms (``?batch=``, PROTOCOL.md
    "Coalesced messages"; ``None``: one frame per message). ``snapshot``: first print the
    ``snapshot`` frame of the room's N most recent messages as one line (PROTOCOL.md,
    "Snapshot then live"), then the events after it.

    Raises :class:`RefusedError` on a refusal a retry cannot fix (module docstring)."""
    try:
        with _client_progress():
            async with pgbridge_client.connect(url, token=token, batch=batch, backoff_base=0.2,
                                               on_frame=_on_frame) as bridge:
                # in `async with`: leaving after the last event printed acknowledges it
                async with bridge.subscribe(room, since=since, snapshot=snapshot,
                                            ack=ack) as subscription:
                    if await _print_items(subscription, max_events):
                        return EXIT_OK
    except pgbridge_client.PgBridgeError as exc:
        raise RefusedError(str(exc)) from exc
    raise RefusedError(f"the subscription to {room} ended")  # never: it ends by raising


async def _print_items(items: AsyncIterable[Item], max_events: int | None) -> bool:
    """Print each item of a subscription or a feed as one JSON line on stdout (a feed's rooms
    also as their summary on stderr); true once ``max_events`` events were printed."""
    printed = 0
    async for item in items:
        print(_line(item.frame), flush=True)
        if isinstance(item, pgbridge_client.FeedRooms):
            print(feed_summary(item.frame), file=sys.stderr, flush=True)
        elif isinstance(item, pgbridge_client.Event):
            printed += 1
            if max_events is not None and printed >= max_events:
                return True
    return False


def feed_summary(frame: Mapping[str, Any]) -> str:
    """The stderr line of a ``feed`` answer: ``pgbridge tail: feed of N rooms, U unread``
    (U: the sum of the rooms' ``unread``, each counted up to 100 by the bridge)."""
    rooms = frame.get("rooms")
    rooms = rooms if isinstance(rooms, list) else []
    unread = sum(r["unread"] for r in rooms
                 if isinstance(r, dict) and isinstance(r.get("unread"), int))
    return f"pgbridge tail: feed of {len(rooms)} rooms, {unread} unread"


async def tail_feed(url: str, token: str | Callable[[], str], *, ack: bool,
                    max_events: int | None = None, batch: int | None = 0) -> int:
    """Follow every room of the token's user at ``url`` (PROTOCOL.md, "One feed per user";
    module docstring for what is printed); returns 0 after ``max_events`` events (``None``:
    until interrupted). ``ack``: acknowledge each event printed. ``token`` and ``batch`` as
    for :func:`tail`. A ``feed`` refused with ``internal`` or ``rate_limited`` is sent again
    after a backoff delay.

    Raises :class:`RefusedError` on a refusal a retry cannot fix (module docstring)."""
    try:
        with _client_progress():
            async with pgbridge_client.connect(url, token=token, batch=batch, backoff_base=0.2,
                                               on_frame=_on_frame_of_feed) as bridge:
                # in `async with`: leaving after the last event printed acknowledges it
                async with bridge.feed(ack=ack) as feed:
                    if await _print_items(feed, max_events):
                        return EXIT_OK
    except pgbridge_client.PgBridgeError as exc:
        raise RefusedError(str(exc)) from exc
    raise RefusedError("the feed ended")  # never: it ends by raising
