"""Property-based fuzzing of a real daemon: hostile WebSocket frames and raw HTTP requests sent
over loopback to a :class:`Bridge` on a real PostgreSQL; docs/PROTOCOL.md is the oracle.

The bridge, an honest subscriber and a writer run on an event loop in a background thread
(Hypothesis drives synchronous tests); the hostile client is websockets' synchronous client,
raw HTTP goes through asyncio streams on that loop. Strategies and the oracle are in
``tests/support/fuzz_strategies.py``. ``PGBRIDGE_FUZZ_EXAMPLES=<n>`` runs n examples per test
instead of the CI default (150 frame examples, 100 requests); a failure prints the falsifying
example and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from typing import Any, NamedTuple, TypeVar

import jwt
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ulid import ULID
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from daemon.app import Bridge
from daemon.connection import Connection
from daemon.settings import DaemonSettings
from tests.support.fixtures import running_bridge
from tests.support.fuzz_strategies import (
    ERROR_CODES,
    Answer,
    EarlyWrites,
    Frame,
    FrameContext,
    HandshakeContext,
    RawRequest,
    Reply,
    early_writes,
    expected_answer,
    frames,
    http_requests,
    is_count,
    is_id,
    ref_verdict,
    repeated,
)
from tests.support.helpers import (
    SECRET,
    connect,
    make_room,
    make_user,
    post,
    send,
    subscribe,
    token,
)
from tests.support.procs import until

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

EXAMPLES = int(os.environ.get("PGBRIDGE_FUZZ_EXAMPLES") or 0)
ANSWER_TIMEOUT = 10.0  # seconds for the server to answer a frame or a request
TOLERATED_CLOSES = {1008, 1013}  # for any hostile frame (PROTOCOL.md, "Close codes")
WATCHED_LOGGERS = ("daemon", "websockets", "asyncio")
SERVER_TYPES = {"welcome", "subscribed", "event", "unsubscribed", "pong", "error"}
LIMITLESS = {  # so that fuzzing exercises processing, not the rate limits (if they exist)
    "rate_limit": 1e6, "rate_burst": 1_000_000, "subscribe_rate": 1e6,
    "subscribe_burst": 1_000_000, "user_subscribe_rate": 1e6, "user_subscribe_burst": 1_000_000,
    "max_connections_per_user": 100_000,
}
# websockets draws keepalive ping payloads from the global ``random``; a draw in another thread
# while Hypothesis generates an example makes it report the strategy as using ``random``
NO_KEEPALIVE = 3600.0


def fuzz_settings(default_examples: int) -> settings:
    return settings(max_examples=EXAMPLES or default_examples, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example,
                                           HealthCheck.filter_too_much])


pytestmark = pytest.mark.timeout(max(120, 3 * EXAMPLES))


# --- the world: a bridge on a loop in a thread ------------------------------------------------

class LoopThread:
    """An event loop running in a daemon thread; :meth:`run` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the loop; wait at most ``timeout`` seconds for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


class ErrorRecords(logging.Handler):
    """Collects records at ERROR or above from the daemon's, websockets' and asyncio's loggers
    (a traceback in the server's log is a failure even when the client saw nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in WATCHED_LOGGERS:
            self.records.append(record)

    def assert_none(self) -> None:
        shown = [logging.Formatter("%(name)s %(levelname)s %(message)s").format(r)
                 for r in self.records]
        self.records.clear()
        assert not shown, "the server logged errors:\n" + "\n".join(shown)


@dataclasses.dataclass
class World:
    loop: LoopThread
    bridge: Bridge
    conn: Conn
    errors: ErrorRecords
    honest: str  # a user, only member of honest_room
    honest_room: str
    frames: FrameContext
    handshakes: HandshakeContext

    lasting: set[Connection] = dataclasses.field(default_factory=set)

    @property
    def port(self) -> int:
        return self.bridge.port

    def keep_current_connections(self) -> None:
        """Mark the connections open now as lasting: :meth:`settle` does not wait for them."""
        async def current() -> set[Connection]:
            return set(self.bridge.server.connections)

        self.lasting = self.loop.run(current())

    def settle(self) -> None:
        """Wait until the server is done with every connection but the lasting ones (fails
        after ``ANSWER_TIMEOUT``): what it logs about them has been logged by then."""
        connections = self.bridge.server.connections

        async def done() -> bool:
            return not connections - self.lasting

        self.loop.run(until(done, "the server to end the fuzzer's connections",
                            timeout=ANSWER_TIMEOUT, every=0.01))

    def assert_no_errors_logged(self) -> None:
        self.settle()
        self.errors.assert_none()


def limitless_settings() -> dict[str, Any]:
    """``LIMITLESS`` restricted to the fields ``DaemonSettings`` has."""
    names = {f.name for f in dataclasses.fields(DaemonSettings)}
    return {name: value for name, value in LIMITLESS.items() if name in names}


async def start(stack: AsyncExitStack, db_url: str) -> tuple[Bridge, Conn]:
    bridge = await stack.enter_async_context(running_bridge(db_url, heartbeat=NO_KEEPALIVE,
                                                            **limitless_settings()))
    conn = await stack.enter_async_context(
        await psycopg.AsyncConnection.connect(db_url, autocommit=True))
    return bridge, conn


async def populate(conn: Conn, port: int) -> tuple[str, str, FrameContext, HandshakeContext]:
    """Users, rooms and tokens for the fuzzing; returns the honest user and room and the two
    contexts."""
    fuzzer, honest, gone = (await make_user(conn, "fuzzer"), await make_user(conn, "honest"),
                            await make_user(conn, "gone"))
    own = await make_room(conn, fuzzer, name="own")
    for i in range(3):
        await post(conn, own, fuzzer, f"seed {i}")
    honest_room = await make_room(conn, honest, name="honest")
    deleted = await make_room(conn, fuzzer, name="deleted")
    await conn.execute("UPDATE channels SET deleted_at = now() WHERE id = %s", [deleted])
    await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [gone])
    later = int(time.time()) + 3600
    refused = (
        token(fuzzer, ttl=-60), token(fuzzer, secret="another-secret-long-enough-for-hs256-0123"),
        token(str(ULID())), token(gone), token("\x00"), token("A" * 27), token("\ud800"),
        token("' OR '1'='1"), jwt.encode({"sub": fuzzer}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": fuzzer, "exp": later}, "", algorithm="none"),
        jwt.encode({"sub": fuzzer, "exp": "tomorrow"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": 42, "exp": later}, SECRET, algorithm="HS256"),
    )
    frame_ctx = FrameContext(rooms=(own, honest_room, deleted, str(ULID())),
                             token=token(fuzzer), refused_tokens=(*refused, token(honest)))
    return honest, honest_room, frame_ctx, HandshakeContext(port, (token(fuzzer),), refused)


@pytest.fixture(scope="module")
def world(db_url: str) -> Iterator[World]:
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    loop = LoopThread()
    stack = AsyncExitStack()
    try:
        bridge, conn = loop.run(start(stack, db_url))
        honest, honest_room, frame_ctx, handshake_ctx = loop.run(populate(conn, bridge.port))
        yield World(loop, bridge, conn, errors, honest, honest_room, frame_ctx, handshake_ctx)
    finally:
        loop.run(stack.aclose())
        loop.close()
        logging.getLogger().removeHandler(errors)


# --- what the server sends --------------------------------------------------------------------

def server_frame(raw: str | bytes) -> dict[str, Any]:
    """Decode one server frame and check it is well formed (PROTOCOL.md, "Server → client");
    an ``error`` has a documented code other than ``internal``."""
    assert isinstance(raw, str), f"the server sent a binary frame: {raw!r}"
    frame = json.loads(raw)
    assert isinstance(frame, dict) and frame.get("type") in SERVER_TYPES, frame
    kind = frame["type"]
    if "ref" in frame:
        assert ref_verdict(frame["ref"]) != "invalid", f"the server echoed a bad ref: {frame}"
    if "room" in frame:
        assert is_id(frame["room"]), f"the server echoed a room that is no id: {frame}"
    if kind == "error":
        assert frame.get("code") in ERROR_CODES, f"undocumented or internal error: {frame}"
        assert isinstance(frame.get("message"), str), frame
    elif kind == "welcome":
        assert is_id(frame.get("user")) and frame.get("protocol") == 1, frame
        assert isinstance(frame.get("heartbeat"), int | float), frame
    elif kind == "subscribed":
        assert is_id(frame.get("room")), frame
        assert is_count(frame.get("from")) and is_count(frame.get("head")), frame
    elif kind == "event":
        assert is_id(frame.get("room")) and is_count(frame.get("seq")) and frame["seq"] >= 1
        assert frame.get("op") in ("INSERT", "UPDATE", "DELETE"), frame
        assert all(isinstance(frame.get(k), str) for k in ("table", "id", "ts")), frame
        assert isinstance(frame.get("data"), dict), frame
    elif kind == "unsubscribed":
        assert is_id(frame.get("room")), frame
        assert frame.get("reason") in ("client", "membership_revoked", "room_deleted"), frame
    return frame


# --- the hostile client -----------------------------------------------------------------------

class Outcome(NamedTuple):
    frames: list[dict[str, Any]]  # received before the sentinel's pong (or the close)
    close: int | None  # the server's close code; 1006 when it closed without one
    pinged: bool  # a WebSocket ping got its pong


class HostileClient:
    """A synchronous WebSocket connection of the fuzzing user (``welcome`` consumed)."""

    def __init__(self, port: int, jwt_token: str) -> None:
        self.ws: SyncConnection = sync_connect(
            f"ws://127.0.0.1:{port}/ws?token={jwt_token}", compression=None, max_size=2**24,
            open_timeout=ANSWER_TIMEOUT, close_timeout=2, ping_interval=None,
            legacy=True)  # websockets 17: a connection to close by hand (close())
        welcome = server_frame(self.ws.recv(timeout=ANSWER_TIMEOUT))
        assert welcome["type"] == "welcome", welcome

    def close(self) -> None:
        self.ws.close()

    def exchange(self, frame: Frame, sentinel: str) -> Outcome:
        """Send ``frame`` then ``{"type":"ping","ref":sentinel}``; read until its pong."""
        got: list[dict[str, Any]] = []
        waiter = None
        try:
            if frame.opcode == "ping":
                waiter = self.ws.ping(frame.data)
            else:
                chunks = frame.chunks()
                self.ws.send(chunks[0] if len(chunks) == 1 else iter(chunks),
                             text=frame.opcode == "text")
            self.ws.send(json.dumps({"type": "ping", "ref": sentinel}))
            while True:
                try:
                    reply = server_frame(self.ws.recv(timeout=ANSWER_TIMEOUT))
                except TimeoutError:
                    raise AssertionError(f"no pong to the sentinel within {ANSWER_TIMEOUT} s; "
                                         f"received {got}") from None
                if reply["type"] == "pong" and reply.get("ref") == sentinel:
                    break
                got.append(reply)
        except ConnectionClosed as closed:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:  # frames the server sent before closing
                    got.append(server_frame(self.ws.recv(timeout=ANSWER_TIMEOUT)))
            return Outcome(got, closed.rcvd.code if closed.rcvd else 1006, False)
        pinged = waiter is None or waiter.wait(ANSWER_TIMEOUT)
        return Outcome(got, None, pinged)


def sent_ref(frame: Frame) -> str | None:
    """The ``ref`` the server reads from ``frame`` with Python's JSON reader, if any."""
    if frame.opcode != "text":
        return None
    try:
        obj = json.loads(frame.data.decode())
    except (ValueError, RecursionError):
        return None
    ref = obj.get("ref") if isinstance(obj, dict) else None
    return ref if isinstance(ref, str) else None


def check_outcome(frame: Frame, answer: Answer, outcome: Outcome) -> None:
    replies = [f for f in outcome.frames if f["type"] != "event"]
    if answer.close is not None:
        assert outcome.close == answer.close, (
            f"expected close {answer.close}, got "
            f"{outcome.close or 'the connection still open'}; frames: {replies}")
        return
    if outcome.close is not None:
        assert outcome.close in TOLERATED_CLOSES, (
            f"closed with {outcome.close} (tolerated: {sorted(TOLERATED_CLOSES)}); "
            f"frames: {replies}")
        return
    assert outcome.pinged, "no pong to a WebSocket ping"
    ref = sent_ref(frame)
    for reply in replies:
        assert "ref" not in reply or reply["ref"] == ref, (
            f"a reply carries a ref the frame did not have: {reply}")
    if answer.replies is not None:
        assert_replies(replies, answer.replies)


def assert_replies(got: list[dict[str, Any]], want: tuple[Reply, ...]) -> None:
    message = f"expected {list(want)}, got {got}"
    assert len(got) == len(want), message
    for frame, reply in zip(got, want, strict=True):
        assert frame["type"] == reply.type, message
        if reply.type == "error" and reply.codes is not None:
            assert frame["code"] in reply.codes, message
        if reply.ref is None:
            assert "ref" not in frame, message
        else:
            assert frame.get("ref") == reply.ref, message


# --- the honest subscriber and the writer -----------------------------------------------------

class Honest:
    """A well-behaved member subscribed to its room, reading every frame until :meth:`finish`."""

    def __init__(self, ws: ClientConnection, start_seq: int) -> None:
        self.ws = ws
        self.start_seq = start_seq
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int, user: str, room: str) -> Honest:
        ws = await connect(port, user, ping_interval=None)
        return cls(ws, int((await subscribe(ws, room))["from"]))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(server_frame(raw))
                self.arrived.set()
        finally:
            self.arrived.set()

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            if self.reader.done():
                self.reader.result()
                raise AssertionError(f"the honest client was disconnected: "
                                     f"{self.ws.close_code} {self.ws.close_reason}")
            self.arrived.clear()
            await self.arrived.wait()

    async def finish(self, events: int) -> list[dict[str, Any]]:
        """Wait for ``events`` events, then for the pong of a last ping; return every frame
        received after ``subscribed``."""
        await asyncio.wait_for(self._until(lambda: sum(
            f["type"] == "event" for f in self.frames) >= events), 60)
        await send(self.ws, type="ping", ref="honest-end")
        await asyncio.wait_for(self._until(lambda: any(
            f["type"] == "pong" for f in self.frames)), ANSWER_TIMEOUT)
        return self.frames

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self.reader


class Writer:
    """Inserts a message into the honest room for each content put in ``queue``."""

    def __init__(self, conn: Conn, room: str, user: str) -> None:
        self.conn, self.room, self.user = conn, room, user
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.posted: list[str] = []
        self.failures: list[BaseException] = []
        self.task = asyncio.create_task(self._run())

    @classmethod
    async def start(cls, conn: Conn, room: str, user: str) -> Writer:
        """A writer running on the calling loop."""
        return cls(conn, room, user)

    async def _run(self) -> None:
        while True:
            content = await self.queue.get()
            try:
                await post(self.conn, self.room, self.user, content)
                self.posted.append(content)
            except Exception as exc:
                self.failures.append(exc)
            finally:
                self.queue.task_done()

    async def stop(self) -> None:
        await asyncio.wait_for(self.queue.join(), 60)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


_content_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")  # TEXT
contents = st.text(_content_chars, max_size=200) | repeated(
    st.text(_content_chars, min_size=1, max_size=4), 500, 5000)


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.slow
def test_hostile_frames_get_documented_answers_while_an_honest_subscriber_misses_nothing(
        world: World) -> None:
    """Every hostile frame gets well-formed answers with documented codes (never ``internal``)
    or a documented close, nothing is logged at ERROR, and a member subscribed meanwhile
    receives every message written to its room during the run, once, in order."""
    loop, ctx = world.loop, world.frames
    sentinels = itertools.count()

    def fuzz(writer: Writer) -> None:
        @fuzz_settings(150)
        @given(messages=st.lists(frames(ctx), min_size=1, max_size=6), content=contents)
        def hostile_client(messages: list[Frame], content: str) -> None:
            world.errors.records.clear()
            loop.loop.call_soon_threadsafe(writer.queue.put_nowait, content)
            client: HostileClient | None = None
            try:
                for frame in messages:
                    client = client or HostileClient(world.port, ctx.token)
                    outcome = client.exchange(frame, f"sentinel-{next(sentinels)}")
                    check_outcome(frame, expected_answer(frame, ctx), outcome)
                    if outcome.close is not None:
                        client = None
            finally:
                if client is not None:
                    client.close()
            world.assert_no_errors_logged()

        hostile_client()

    with_an_honest_member(world, fuzz)


def test_every_http_request_gets_an_answer_never_a_5xx(world: World) -> None:
    """Every raw request gets an HTTP status line (never silence), a status the contract
    allows for it (414, 431, 405, 400, 401, 404, 426, 101 only for a valid upgrade with a valid
    token), never a 5xx, and nothing is logged at ERROR."""

    @fuzz_settings(100)
    @given(request=http_requests(world.handshakes))
    def raw_client(request: RawRequest) -> None:
        world.errors.records.clear()
        answer = world.loop.run(http_exchange(world.port, request.data))
        match = re.match(rb"HTTP/1\.[01] (\d{3})[ \r]", answer)
        assert match, f"no HTTP status line in the answer: {answer[:300]!r}"
        status = int(match.group(1))
        assert status < 500, f"{status} for {request.why}: {answer[:300]!r}"
        assert status in request.allowed, (
            f"{status} for {request.why}; allowed: {request.statuses}: {answer[:300]!r}")
        world.assert_no_errors_logged()

    raw_client()
    assert_still_serving(world)


def test_bytes_sent_with_a_request_never_come_before_its_answer(world: World) -> None:
    """Issue 25: a request (a valid upgrade, a refused one, or any raw request) followed in the
    same stream by frames and junk (close, pings, fragments, reserved opcodes, bytes), cut into
    writes at random points. The answer is a well-formed HTTP response that begins the stream,
    a status the contract allows for the request alone; after a 101 the first frame is the
    welcome; nothing is logged at ERROR; the daemon serves, and a member subscribed
    meanwhile receives every message written to its room during the run, once, in order."""
    loop = world.loop

    def fuzz(writer: Writer) -> None:
        @fuzz_settings(100)
        @given(sent=early_writes(world.handshakes), content=contents)
        def attacker(sent: EarlyWrites, content: str) -> None:
            world.errors.records.clear()
            loop.loop.call_soon_threadsafe(writer.queue.put_nowait, content)
            answer = loop.run(http_exchange(world.port, *sent.writes))
            match = re.match(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n", answer)
            assert match, f"the answer does not begin with a status line: {answer[:300]!r}"
            status = int(match.group(1))
            assert status in sent.allowed, f"{status} for {sent.why}: {answer[:300]!r}"
            _, end, rest = answer.partition(b"\r\n\r\n")
            assert end, f"the answer's head never ended: {answer[:300]!r}"
            if status == 101:
                assert rest[:1] == b"\x81" and b'"welcome"' in rest[:200], (
                    f"the first frame after the 101 is not the welcome: {rest[:100]!r}")
            world.assert_no_errors_logged()

        attacker()

    with_an_honest_member(world, fuzz)


def with_an_honest_member(world: World, fuzz: Callable[[Writer], None]) -> None:
    """Run ``fuzz`` (a Hypothesis test that puts a content in the writer's queue per example)
    while a member of the honest room is subscribed; then check that the member received every
    message written meanwhile, once, in order, and nothing else, and that the bridge serves."""
    loop = world.loop
    honest = loop.run(Honest.open(world.port, world.honest, world.honest_room))
    world.keep_current_connections()
    writer = loop.run(Writer.start(world.conn, world.honest_room, world.honest))
    try:
        try:
            fuzz(writer)
        finally:
            loop.run(writer.stop(), timeout=90)
        assert not writer.failures, f"the writer failed: {writer.failures[:3]}"
        got = loop.run(honest.finish(len(writer.posted)), timeout=90)
    finally:
        loop.run(honest.close())
    events = [f for f in got if f["type"] == "event"]
    assert [f for f in got if f["type"] != "event"] == [{"type": "pong", "ref": "honest-end"}]
    first = honest.start_seq + 1
    assert [e["seq"] for e in events] == list(range(first, first + len(writer.posted)))
    assert all(e["room"] == world.honest_room and e["table"] == "messages" for e in events)
    assert [e["data"]["content"] for e in events] == writer.posted
    assert_still_serving(world)


async def http_exchange(port: int, *writes: bytes) -> bytes:
    """Send ``writes`` on a new TCP connection, each its own write; return the answer read
    until EOF, or, after a 101, until the end of its first frame (bytes sent with the request
    may keep the connection open), or what arrived within ``ANSWER_TIMEOUT``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        for data in writes:
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(ANSWER_TIMEOUT):
                while chunk := await reader.read(65536):
                    answer += chunk
                    _, end, rest = answer.partition(b"\r\n\r\n")
                    if answer.startswith(b"HTTP/1.1 101 ") and end and len(rest) >= 2 \
                            and len(rest) >= 2 + (rest[1] & 0x7F):
                        break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer


def assert_still_serving(world: World) -> None:
    """A fresh connection of the fuzzing user opens and gets a pong."""
    client = HostileClient(world.port, world.frames.token)
    try:
        outcome = client.exchange(Frame("text", b'{"type":"ping","ref":"still"}'), "end")
    finally:
        client.close()
    assert outcome == Outcome([{"type": "pong", "ref": "still"}], None, True), outcome
    world.assert_no_errors_logged()
