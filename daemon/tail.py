"""``pgbridge tail ROOM``: the reference client of the protocol (PROTOCOL.md).

Prints each ``event`` frame of the room as one JSON line on stdout (other frames go to stderr),
reconnects with backoff when the server goes away (1001, 1011, 1013, 4008, network, HTTP 429 or
503), resuming with ``since`` = the last seq it printed, so nothing is missed or printed twice.
A subscribe refused for a reason that passes (``internal``: the database failed; ``rate_limited``)
is sent again after a backoff delay. Refusals a retry cannot fix (401, 403, ``forbidden``,
``not_found``, ``unsubscribed``, 1008, 4003) end it with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .backoff import Backoff
from .errors import EXIT_OK, BridgeError
from .settings import DaemonSettings, DatabaseSettings, load_environment

RESUMABLE = {1001, 1006, 1011, 1012, 1013, 4008}  # close codes worth a reconnect
RETRIED_STATUS = {429, 503}  # handshake refusals that pass
RETRIED_ERRORS = {"internal", "rate_limited"}  # subscribe refusals that pass


def _subscribe_frame(room: str, since: int | None) -> str:
    request: dict[str, object] = {"type": "subscribe", "room": room, "ref": "tail"}
    if since is not None:
        request["since"] = since
    return json.dumps(request)


async def tail(url: str, token: str, room: str, *, since: int | None, ack: bool,
               max_events: int | None = None) -> int:
    """Follow ``room``; returns an exit code (0 after ``max_events`` events, 1 on refusal)."""
    backoff = Backoff(base=0.2, cap=10.0)
    last = since
    printed = 0
    while True:
        try:
            async with websockets.connect(url, additional_headers={
                    "Authorization": f"Bearer {token}"}, max_size=2**24) as ws:
                await ws.send(_subscribe_frame(room, last))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("type") == "event":
                        if last is not None and frame["seq"] <= last:
                            continue  # duplicate after a reconnect
                        print(raw if isinstance(raw, str) else raw.decode(), flush=True)
                        last = frame["seq"]
                        printed += 1
                        if ack:
                            await ws.send(json.dumps({"type": "ack", "room": room, "seq": last}))
                        if max_events is not None and printed >= max_events:
                            return EXIT_OK
                        continue
                    print(json.dumps(frame), file=sys.stderr, flush=True)
                    if frame.get("type") == "subscribed":
                        backoff.reset()
                        last = frame["from"] if last is None else last
                    elif (frame.get("type") == "error" and frame.get("code") in RETRIED_ERRORS
                          and frame.get("ref") == "tail"):
                        delay = backoff.next()
                        print(f"pgbridge tail: subscribe failed ({frame.get('code')}); trying "
                              f"again in {delay:.1f} s (since={last})", file=sys.stderr)
                        await asyncio.sleep(delay)
                        await ws.send(_subscribe_frame(room, last))
                    elif frame.get("type") in ("error", "unsubscribed"):
                        return 1
        except InvalidStatus as exc:
            print(f"pgbridge tail: refused: HTTP {exc.response.status_code} "
                  f"{exc.response.body.decode(errors='replace')}", file=sys.stderr)
            if exc.response.status_code not in RETRIED_STATUS:
                return 1
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            if code not in RESUMABLE:
                print(f"pgbridge tail: closed with {code}", file=sys.stderr)
                return 1
        except OSError as exc:
            print(f"pgbridge tail: {exc}", file=sys.stderr)
        delay = backoff.next()
        print(f"pgbridge tail: reconnecting in {delay:.1f} s (since={last})", file=sys.stderr)
        await asyncio.sleep(delay)


def tail_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="pgbridge tail", description="Subscribe to a room and "
                                     "print its events as JSON lines (reconnects and resumes).")
    parser.add_argument("room", help="channels.id")
    parser.add_argument("--since", type=int, help="last seq you hold (default: sync_state or "
                        "live only)")
    parser.add_argument("--url", help="WebSocket URL (default ws://PGBRIDGE_HOST:PGBRIDGE_PORT/ws)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="a JWT (see pgbridge token)")
    who.add_argument("--user", help="mint a token for this users.id with the configured secret")
    parser.add_argument("--ack", action="store_true", help="acknowledge each event (sync_state)")
    parser.add_argument("--count", type=int, help="exit after this many events")
    args = parser.parse_args(list(argv))
    try:
        env = load_environment()
        settings = DaemonSettings.from_env(env)
        token = args.token
        if token is None:
            from .auth import mint_token, resolve_secret

            token = mint_token(resolve_secret(settings, DatabaseSettings.from_env(env)),
                               args.user, audience=settings.jwt_audience,
                               issuer=settings.jwt_issuer)
    except BridgeError as exc:
        print(f"pgbridge tail: error: {exc}", file=sys.stderr)
        return exc.exit_code
    url = args.url or f"ws://{settings.host}:{settings.port}/ws"
    try:
        return asyncio.run(tail(url, token, args.room, since=args.since, ack=args.ack,
                                max_events=args.count))
    except KeyboardInterrupt:
        return 130
