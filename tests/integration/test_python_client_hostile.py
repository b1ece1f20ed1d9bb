"""The Python client (clients/python) against a hostile or broken server: a real WebSocket
server over loopback whose every connection follows a script. Malformed JSON, unknown frame
types and ill-typed frames are dropped and logged; a seq going backwards is ignored; a gap (an
event lost or malformed) is resumed over with ``since``, never skipped; a message over
``max_size`` ends the bridge with a clear error; a server that never says ``welcome`` is left
after ``open_timeout`` and tried again."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pgbridge_client
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

ROOM = "01JD3V6Z7W2Q4X8Y9A0B1C2D3E"
Script = Callable[[ServerConnection, list[dict[str, Any]]], Awaitable[None]]


def event(seq: int, room: str = ROOM) -> str:
    return json.dumps({"type": "event", "room": room, "seq": seq, "table": "messages",
                       "op": "INSERT", "id": f"m{seq}", "data": {"id": f"m{seq}"},
                       "ts": "2026-11-21T10:15:02+00:00"})


WELCOME = json.dumps({"type": "welcome", "user": "u1", "protocol": 1, "heartbeat": 20,
                      "correlation_id": "c0ffee"})


@asynccontextmanager
async def scripted(*scripts: Script) -> AsyncIterator[tuple[int, list[list[dict[str, Any]]]]]:
    """A server on a free port whose n-th connection runs ``scripts[n]`` (the last one for
    any after) with the list of the frames it has received (filled as they arrive); yields
    the port and those lists, one per connection."""
    received: list[list[dict[str, Any]]] = []

    async def handler(ws: ServerConnection) -> None:
        frames: list[dict[str, Any]] = []
        received.append(frames)
        script = scripts[min(len(received) - 1, len(scripts) - 1)]
        pump = asyncio.create_task(read(ws, frames))
        try:
            await script(ws, frames)
            await ws.wait_closed()
        finally:
            pump.cancel()

    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield port, received


async def read(ws: ServerConnection, into: list[dict[str, Any]]) -> None:
    try:
        async for message in ws:
            into.append(json.loads(message))
            if into[-1].get("type") == "ping":
                await ws.send(json.dumps({"type": "pong", "ref": into[-1].get("ref")}))
    except ConnectionClosed:
        pass


async def subscribe_frame(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """The next ``subscribe`` the client sent on this connection."""
    for _ in range(2000):
        found = [f for f in frames if f.get("type") == "subscribe"]
        if found:
            return found[-1]
        await asyncio.sleep(0.005)
    raise AssertionError(f"no subscribe: {frames}")


async def welcome_and_subscribed(ws: ServerConnection, frames: list[dict[str, Any]],
                                 head: int) -> dict[str, Any]:
    await ws.send(WELCOME)
    request = await subscribe_frame(frames)
    since = request.get("since", head)
    await ws.send(json.dumps({"type": "subscribed", "room": ROOM, "from": since, "head": head,
                              "ref": request["ref"]}))
    return request


async def take(sub: pgbridge_client.Subscription[Any], n: int) -> list[int]:
    seqs = []
    while len(seqs) < n:
        item = await asyncio.wait_for(anext(sub), 20)
        seqs.append(item.seq)
    return seqs


def warnings_of(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pgbridge_client" and getattr(r, "event", None) == event]


async def test_junk_frames_are_dropped_and_logged_and_events_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(event(1))
        await ws.send("{not json")
        await ws.send("[" * 50_000)  # nested too deep for the parser
        await ws.send(b"\xff\xfe\x00")  # a binary message, not UTF-8
        await ws.send(json.dumps({"type": "from_the_future", "room": ROOM, "seq": 99}))
        await ws.send(json.dumps([1, 2, 3]))
        await ws.send(event(5, room="01JD3V6Z7W2Q4X8Y9A0B1C2D3F"))  # a room not followed
        await ws.send(event(2) + "\n" + "\x1b[2J" + "\n" + event(3))  # coalesced, one bad

    async with scripted(script) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
        assert await take(bridge.subscribe(ROOM, since=0), 3) == [1, 2, 3]
    assert len(received) == 1  # no reconnect: nothing was lost
    assert len(warnings_of(caplog, "bad_frame")) == 5, caplog.text
    assert all("\x1b" not in line for line in warnings_of(caplog, "bad_frame"))


async def test_a_seq_going_backwards_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        for seq in (1, 2, 1, 2, 0, 3):
            await ws.send(event(seq))

    async with scripted(script) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
        assert await take(bridge.subscribe(ROOM, since=0), 3) == [1, 2, 3]
    assert len(received) == 1


@pytest.mark.parametrize("lost", ["missing", "malformed"])
async def test_a_gap_is_resumed_over_never_skipped(caplog: pytest.LogCaptureFixture,
                                                   lost: str) -> None:
    async def first(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 4)
        await ws.send(event(1))
        await ws.send(event(2))
        if lost == "malformed":
            await ws.send(event(3).replace('"op": "INSERT"', '"op": 7'))
        await ws.send(event(4))

    async def second(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        request = await welcome_and_subscribed(ws, frames, 4)
        for seq in range(request["since"] + 1, 5):
            await ws.send(event(seq))

    async with scripted(first, second) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t", backoff_base=0.01) as bridge:
        assert await take(bridge.subscribe(ROOM, since=0), 4) == [1, 2, 3, 4]
    assert [c[0].get("since") for c in received] == [0, 2]
    assert any("a gap" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_a_message_over_max_size_ends_the_bridge_with_a_clear_error() -> None:
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(json.dumps({"type": "pong", "pad": "x" * 200_000}))

    async with scripted(script) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t", max_size=100_000) as bridge:
        with pytest.raises(pgbridge_client.RefusedError) as refused:
            await take(bridge.subscribe(ROOM, since=0), 1)
    assert (refused.value.code, refused.value.close_code) == ("message_too_big", 1009)
    assert len(received) == 1  # not retried: the same message would come again


async def test_a_server_that_never_welcomes_is_left_and_tried_again(
        caplog: pytest.LogCaptureFixture) -> None:
    async def silent(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await ws.send(event(1))  # before a welcome: not ours

    async def honest(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(event(1))

    async with scripted(silent, honest) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t", open_timeout=0.3,
            backoff_base=0.01) as bridge:
        assert await take(bridge.subscribe(ROOM, since=0), 1) == [1]
    assert len(received) == 2
    assert "TimeoutError" in warnings_of(caplog, "reconnecting")[0]


async def test_an_event_before_its_snapshot_is_not_delivered() -> None:
    async def first(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 3)
        await ws.send(event(4))  # the snapshot should have come first

    async def second(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        request = await welcome_and_subscribed(ws, frames, 3)
        assert request["snapshot"] == 2  # asked again: none arrived
        await ws.send(json.dumps({"type": "snapshot", "room": ROOM, "seq": 3,
                                  "messages": [{"id": "a"}, {"id": "b"}], "truncated": False}))
        await ws.send(event(4))

    async with scripted(first, second) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t", backoff_base=0.01) as bridge:
        sub = bridge.subscribe(ROOM, snapshot=2)
        snapshot = await asyncio.wait_for(anext(sub), 20)
        assert isinstance(snapshot, pgbridge_client.Snapshot) and snapshot.seq == 3
        assert (await asyncio.wait_for(anext(sub), 20)).seq == 4
    assert len(received) == 2


async def test_a_full_queue_holds_the_connection_and_loses_nothing() -> None:
    sent = asyncio.Event()

    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        for seq in range(1, 41):
            await ws.send(event(seq))
        sent.set()

    async with scripted(script) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t", max_queue=2) as bridge:
        sub = bridge.subscribe(ROOM, since=0)
        await asyncio.wait_for(sent.wait(), 20)  # the consumer has taken nothing yet
        assert len(sub._state.items) <= 2
        assert await take(sub, 40) == list(range(1, 41))
    assert len(received) == 1


async def frame_of(frames: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The first frame of type ``kind`` the client sent on this connection."""
    for _ in range(2000):
        found = [f for f in frames if f.get("type") == kind]
        if found:
            return found[0]
        await asyncio.sleep(0.005)
    raise AssertionError(f"no {kind}: {frames}")


async def test_an_exception_in_the_loop_body_does_not_ack_the_event_that_failed() -> None:
    """The subscription, no longer referenced once the exception left its ``async for``,
    unsubscribed with an ack of the event whose handling failed: it was never redelivered to
    the next subscription resuming from ``sync_state``. Only the events handled are acked."""
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        for seq in (1, 2, 3):
            await ws.send(event(seq))

    async with scripted(script) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
        with pytest.raises(RuntimeError):
            async for item in bridge.subscribe(ROOM, since=0):
                if item.seq == 2:
                    raise RuntimeError("the handling of 2 failed")
        await frame_of(received[0], "unsubscribe")
    assert [f["seq"] for f in received[0] if f["type"] == "ack"] == [1]


async def test_a_subscription_left_cleanly_acks_the_event_it_handled_last() -> None:
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        for seq in (1, 2, 3):
            await ws.send(event(seq))

    async with scripted(script) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
        async with bridge.subscribe(ROOM, since=0) as sub:
            async for item in sub:
                if item.seq == 2:
                    break
        await frame_of(received[0], "unsubscribe")
    assert [f["seq"] for f in received[0] if f["type"] == "ack"] == [2]


async def test_the_token_is_not_in_the_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    """websockets logs the handshake's headers and request line at DEBUG: the bearer token
    and a ``?token=`` in the URL were written to the log of any application logging DEBUG
    (``PGBRIDGE_LOG_LEVEL=DEBUG pgbridge tail``)."""
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(event(1))

    caplog.set_level(logging.DEBUG)
    async with scripted(script) as (port, _), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws?token=url.secret.token", token="header.secret.token"
    ) as bridge:
        assert await take(bridge.subscribe(ROOM, since=0), 1) == [1]
    client = [r.getMessage() for r in caplog.records if r.name != "websockets.server"]
    assert any("Authorization" in line for line in client), "nothing logged"
    assert not [line for line in client if "secret" in line]


async def test_a_token_callable_that_hangs_is_given_up_after_open_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    """A token callable that never answered held ``async with connect()`` forever, silently
    (``open_timeout`` did not cover it)."""
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # never
        return "t"

    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(event(1))

    async with scripted(script) as (port, _), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token=get_token, open_timeout=0.2,
            backoff_base=0.01) as bridge:
        assert await take(bridge.subscribe(ROOM, since=0), 1) == [1]
    assert "the token callable did not answer" in warnings_of(caplog, "reconnecting")[0]


async def test_leaving_the_bridge_right_after_a_break_sends_the_acks_pending() -> None:
    """The subscription, dropped by the ``break``, sent its ack from a task that ran only once
    the bridge was closing: the acks of the events handled since the last ``ack_interval``
    were lost at every exit, and delivered again to the next run."""
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        for seq in (1, 2, 3):
            await ws.send(event(seq))

    async with scripted(script) as (port, received):
        async with pgbridge_client.connect(f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
            async for item in bridge.subscribe(ROOM, since=0):
                if item.seq == 3:
                    break
        await frame_of(received[0], "ack")
    assert [f["seq"] for f in received[0] if f["type"] == "ack"] == [2]


async def test_strings_of_the_bridge_reach_the_log_escaped(
        caplog: pytest.LogCaptureFixture) -> None:
    """The welcome's ``user`` and ``correlation_id``, and the room of a feed's new room, went
    into INFO lines as they were: an escape sequence reached the terminal."""
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await ws.send(json.dumps({"type": "welcome", "user": "u\x1b[2J", "protocol": 1,
                                  "correlation_id": "c\x1b]0;owned\x07"}))
        request = await frame_of(frames, "feed")
        await ws.send(json.dumps({"type": "feed", "rooms": [], "ref": request["ref"]}))
        await ws.send(event(1, room="r\x1b[31m"))

    caplog.set_level(logging.INFO, logger="pgbridge_client")
    async with scripted(script) as (port, _), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
        feed = bridge.feed()
        assert isinstance(await asyncio.wait_for(anext(feed), 20), pgbridge_client.FeedRooms)
        assert (await asyncio.wait_for(anext(feed), 20)).seq == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "pgbridge_client"]
    assert any("joined" in line for line in lines) and any("connected" in line for line in lines)
    assert not [line for line in lines if "\x1b" in line or "\x07" in line]


async def test_an_http_refusal_body_reaches_the_log_escaped(
        caplog: pytest.LogCaptureFixture) -> None:
    """The body of an HTTP 503 went into the WARNING line (shown by ``pgbridge tail``) as it
    was, an escape sequence included."""
    answered = 0

    def refuse_once(connection: ServerConnection, request: Any) -> Any:
        nonlocal answered
        answered += 1
        return connection.respond(503, "busy\x1b[2J\n") if answered == 1 else None

    async def handler(ws: ServerConnection) -> None:
        frames: list[dict[str, Any]] = []
        pump = asyncio.create_task(read(ws, frames))
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(event(1))
        await ws.wait_closed()
        pump.cancel()

    async with serve(handler, "127.0.0.1", 0, process_request=refuse_once) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with pgbridge_client.connect(f"ws://127.0.0.1:{port}/ws", token="t",
                                           backoff_base=0.01) as bridge:
            assert await take(bridge.subscribe(ROOM, since=0), 1) == [1]
    lines = warnings_of(caplog, "reconnecting")
    assert "503" in lines[0] and "busy" in lines[0] and "\x1b" not in lines[0]


async def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A token with a newline (read from a file) was put in the ``Authorization`` header, which
    websockets refused with an error naming the header's value: each reconnect (forever, for a
    fixed token) logged the token at WARNING."""
    with pytest.raises(ValueError) as refused:
        pgbridge_client.connect("ws://127.0.0.1:1/ws", token="fixed.secret.token\n")
    assert "secret" not in str(refused.value)

    tokens = iter(["called.secret.token\r\nX-Injected: 1", "t"])

    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(event(1))

    async with scripted(script) as (port, received), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token=lambda: next(tokens),
            backoff_base=0.01) as bridge:
        assert await take(bridge.subscribe(ROOM, since=0), 1) == [1]
    assert len(received) == 1 and "not a token" in warnings_of(caplog, "reconnecting")[0]
    assert "secret" not in caplog.text


async def test_two_tasks_waiting_on_one_subscription_is_an_error() -> None:
    """Both waited, and the second one's wait acknowledged the event the first one was still
    handling (an ack means: handled): one consumer per subscription, as websockets allows one
    ``recv()`` at a time."""
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await welcome_and_subscribed(ws, frames, 0)
        await ws.send(event(1))

    async with scripted(script) as (port, _), pgbridge_client.connect(
            f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
        sub = bridge.subscribe(ROOM, since=0)
        assert await take(sub, 1) == [1]
        first = asyncio.create_task(anext(sub))
        await asyncio.sleep(0)  # it waits for event 2
        with pytest.raises(RuntimeError, match="another task"):
            await asyncio.wait_for(anext(sub), 20)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        feed = bridge.feed()
        waiting = asyncio.create_task(anext(feed))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="another task"):
            await asyncio.wait_for(anext(feed), 20)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


@pytest.mark.parametrize("stream", ["subscription", "feed"])
async def test_a_clean_close_of_the_bridge_does_not_ack_an_event_whose_handling_raised(
        stream: str) -> None:
    """The loop raised on event 2, the application caught it and left the bridge cleanly:
    closing acknowledged the event each stream had handed out last, 2 included."""
    async def script(ws: ServerConnection, frames: list[dict[str, Any]]) -> None:
        await ws.send(WELCOME)
        if stream == "feed":
            request = await frame_of(frames, "feed")
            await ws.send(json.dumps({"type": "feed", "ref": request["ref"], "rooms": [
                {"room": ROOM, "head": 0, "acked": 0, "unread": 0}]}))
        else:
            request = await subscribe_frame(frames)
            await ws.send(json.dumps({"type": "subscribed", "room": ROOM, "from": 0,
                                      "head": 0, "ref": request["ref"]}))
        for seq in (1, 2, 3):
            await ws.send(event(seq))

    async with scripted(script) as (port, received):
        async with pgbridge_client.connect(f"ws://127.0.0.1:{port}/ws", token="t") as bridge:
            items = bridge.feed() if stream == "feed" else bridge.subscribe(ROOM, since=0)
            with pytest.raises(RuntimeError):
                async for item in items:
                    if isinstance(item, pgbridge_client.Event) and item.seq == 2:
                        raise RuntimeError("the handling of 2 failed")
        await frame_of(received[0], "ack")
    assert [f["seq"] for f in received[0] if f["type"] == "ack"] == [1]
