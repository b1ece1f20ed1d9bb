"""The connection layer (daemon/connection.py): websockets' sans-I/O protocol driven from an
asyncio.Protocol. What websockets' asyncio server did around the protocol must still happen
(an opening handshake has a deadline, frames that arrive while a request waits are answered in
order, a shutdown ends every connection), and an idle connection must hold no task."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
import websockets
from websockets.exceptions import ConnectionClosedError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from daemon.connection import Connection
from tests.support.fixtures import running_bridge
from tests.support.helpers import connect, make_room, make_user, recv, send, subscribe
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]


@pytest.mark.slow
async def test_an_idle_connection_holds_no_task(db_url: str, conn: Conn) -> None:
    """The handshake's task ends with the handshake, a subscribe's with its answer: twenty
    idle subscribed connections leave the loop with the tasks it had without them (the
    clients, without keepalive, have none; websockets' server had one per connection)."""
    users = [await make_user(conn) for _ in range(20)]
    rooms = [await make_room(conn, user) for user in users]
    async with running_bridge(db_url) as bridge:
        before = asyncio.all_tasks()
        clients = [await connect(bridge.port, user, ping_interval=None) for user in users]
        for ws, room in zip(clients, rooms, strict=True):
            await subscribe(ws, room)

        async def no_task_more() -> bool:  # a task ending with its last answer ends soon after
            return not asyncio.all_tasks() - before

        await until(no_task_more, "the tasks of the connections to end", timeout=5)
        assert len(bridge.server.clients) == 20
        for ws in clients:
            await ws.close()


async def test_frames_sent_while_a_subscribe_waits_are_answered_in_order(
        db_url: str, conn: Conn) -> None:
    """A subscribe is answered by a task (it asks the database); 40 pings sent right behind it,
    more than the 16 after which the connection stops reading, are answered after it, in the
    order they were sent, none lost."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with running_bridge(db_url) as bridge:
        ws = await connect(bridge.port, user)
        await ws.send(json.dumps({"type": "subscribe", "room": room, "ref": "s"}))
        for i in range(40):
            await send(ws, type="ping", ref=f"p{i}")
        answers = [await recv(ws) for _ in range(41)]
        assert answers[0]["type"] == "subscribed"
        assert [a.get("ref") for a in answers[1:]] == [f"p{i}" for i in range(40)]
        await ws.close()


async def test_the_frames_of_one_read_are_answered_one_per_turn_of_the_loop(
        db_url: str, conn: Conn) -> None:
    """A read can hold thousands of a client's frames (a flood); answered in one callback,
    they stalled every other connection and the listener (bench/abuse.py). 50 pings written
    at once, read at once, must take about 50 turns of the event loop to be answered."""
    user = await make_user(conn)
    async with running_bridge(db_url, rate_burst=1000) as bridge:
        ws = await connect(bridge.port, user)
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count_turns())
        try:
            for i in range(50):  # no await yields here: the 50 frames leave together
                await send(ws, type="ping", ref=f"p{i}")
            # nor here, for a message that arrived already (recv() would wait in a task)
            answers = [json.loads(await ws.recv()) for _ in range(50)]
        finally:
            counter.cancel()
        assert [a["ref"] for a in answers] == [f"p{i}" for i in range(50)]
        assert turns >= 45, f"50 frames answered within {turns} turns of the loop"
        await ws.close()


async def test_a_connection_that_sends_no_request_is_dropped_at_its_open_timeout(
        db_url: str) -> None:
    """A TCP connection that never completes its request (a slowloris) holds its slot only
    until the opening handshake's deadline, as with websockets' ``open_timeout``."""
    async with running_bridge(db_url) as bridge:
        bridge.server.open_timeout = 0.5
        silent = await asyncio.open_connection("127.0.0.1", bridge.port)
        partial = await asyncio.open_connection("127.0.0.1", bridge.port)
        partial[1].write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        for reader, writer in (silent, partial):
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the bridge
            writer.close()

        async def no_connections_left() -> bool:
            return not bridge.server.connections

        await until(no_connections_left, "the dropped connections to be forgotten", 5)


async def test_shutdown_ends_open_and_unfinished_connections(db_url: str, conn: Conn) -> None:
    """Stopping the bridge closes an open connection with 1001 and drops one whose request
    has not arrived, instead of waiting for its open timeout."""
    user = await make_user(conn)
    async with running_bridge(db_url) as bridge:
        ws = await connect(bridge.port, user)
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        await bridge.server.close(timeout=5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await ws.wait_closed()
        assert ws.close_code == 1001
        assert not bridge.server.connections


class _Echo:
    """An Endpoint (daemon.connection) with no database: every upgrade is accepted and its
    frames go to ``receiver``; the close code each connection ended with is kept."""

    open_timeout = close_timeout = 10.0
    write_limit = 32 * 1024
    server_header = "test"

    def __init__(self, receiver: Any) -> None:
        self.receiver = receiver
        self.codes: list[int | None] = []

    def new_protocol(self, state: State) -> ServerProtocol:
        return ServerProtocol(state=state, max_size=65536)

    def serving(self) -> bool:
        return True

    async def process_request(self, conn: Connection, request: Request) -> Response | None:
        return None

    def opened(self, conn: Connection) -> None:
        conn.receiver = self.receiver

    def abandoned(self, conn: Connection, reason: str) -> None:
        pass

    def closing(self, conn: Connection) -> None:
        pass

    def closed(self, conn: Connection, code_sent: int | None) -> None:
        self.codes.append(code_sent)


class _Buggy:
    def received(self, messages: list[str | bytes]) -> None:
        raise RuntimeError("a bug")

    def pinged(self) -> None:
        pass


async def test_a_bug_met_by_a_frame_closes_that_connection_with_1011(
        caplog: pytest.LogCaptureFixture) -> None:
    """What a receiver raises ends its connection with 1011 and an incident id in the log, and
    the server goes on serving."""
    endpoint = _Echo(_Buggy())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(endpoint), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(2):  # the second connection is served like the first
            async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send("hello")
                with pytest.raises(ConnectionClosedError) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1011
            assert closed.value.rcvd.reason.startswith("internal error (incident ")
        crashes = [r for r in caplog.records if getattr(r, "event", None) == "connection_crashed"]
        assert len(crashes) == 2 and crashes[0].exc_info is not None
        assert closed.value.rcvd.reason.endswith(f"{crashes[1].incident})")  # type: ignore[attr-defined]

        async def both_ended() -> bool:
            return endpoint.codes == [1011, 1011]

        await until(both_ended, "both connections to end with 1011 sent")
    finally:
        server.close()


def test_websockets_is_the_release_the_connection_layer_is_written_for() -> None:
    """daemon/connection.py drives websockets' sans-I/O protocol through its public API only,
    as documented for websockets 17 (pyproject.toml: >=17,<18). A new major may change that
    API: this fails first, naming what to check, rather than the connection layer in some
    stranger way (./dev upgrade moves only within the range)."""
    major = int(websockets.__version__.split(".")[0])
    assert major == 17, (
        f"websockets {websockets.__version__}: daemon/connection.py is written for 17; read "
        "the changelog's sans-I/O entries (ServerProtocol, Request, Frame), then move the range "
        "in pyproject.toml and this test together")
    used = ("receive_data", "receive_eof", "events_received", "data_to_send", "accept",
            "reject", "send_response", "send_close", "send_ping", "fail", "close_expected")
    missing = [name for name in used if not callable(getattr(ServerProtocol, name, None))]
    assert missing == [], f"websockets' ServerProtocol lost {missing}"
    protocol = ServerProtocol(state=State.OPEN, max_size=65536)
    assert protocol.state is State.OPEN and protocol.handshake_exc is None
    protocol.receive_eof()
    assert protocol.state is State.CLOSED and protocol.close_exc.sent is None
