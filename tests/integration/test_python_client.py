"""The Python client (clients/python, ``pgbridge_client``) against a real daemon and a real
PostgreSQL over loopback: installed alone into an empty venv, it resumes across a SIGKILL and
restart of the daemon with every event once and in order; a snapshot then the live events; a
token replaced before it expires without a drop; refusals raised as typed errors without a
retry loop; a bridge that is not listening yet waited for, with progress in the log."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
import venv
from pathlib import Path
from typing import Any

import pgbridge_client
import psycopg
import pytest

from daemon.app import Bridge
from tests.support.fixtures import ROOT, running_bridge
from tests.support.helpers import head, make_room, make_user, post, token
from tests.support.procs import daemon_process, free_port, until

Conn = psycopg.AsyncConnection[Any]
CLIENT = ROOT / "clients" / "python"


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "pgbridge_client" and getattr(r, "event", None) == event]


async def next_item(sub: pgbridge_client.Subscription[Any], timeout: float = 20.0) -> Any:
    return await asyncio.wait_for(anext(sub), timeout)


# --- done when: an empty venv, a SIGKILL, every seq once and in order -------------------------

SCRIPT = """
import asyncio, logging, sys
import pgbridge_client

async def main(url, token, room, since, count):
    async with pgbridge_client.connect(url, token=token, backoff_base=0.05,
                                       backoff_cap=0.5) as bridge:
        seen = 0
        async for event in bridge.subscribe(room, since=since):
            print(event.seq, flush=True)
            seen += 1
            if seen == count:
                return

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
url, token, room, since, count = sys.argv[1:]
asyncio.run(main(url, token, room, int(since), int(count)))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv holding ``pip install ./clients/python`` (its dependencies from PyPI)."""
    where = tmp_path_factory.mktemp("client-venv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(CLIENT)], check=True, timeout=300, cwd=where)
    return python


@pytest.mark.slow
def test_an_empty_venv_gets_websockets_and_no_server_dependency(client_venv: Path) -> None:
    listed = subprocess.run([str(client_venv), "-m", "pip", "list", "--format=freeze",
                             "--disable-pip-version-check"], check=True, capture_output=True,
                            text=True, timeout=120).stdout
    names = {line.split("==")[0].lower() for line in listed.split()}
    assert names - {"pip", "setuptools"} == {"pgbridge-client", "websockets"}, listed


@pytest.mark.slow
async def test_subscribe_resumes_across_a_sigkill_of_the_daemon_with_every_seq_once(
        client_venv: Path, db_url: str, conn: Conn, tmp_path: Path) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    base = await head(conn, room)
    port = free_port()
    per_phase = 4
    script = tmp_path / "subscriber.py"
    script.write_text(SCRIPT)
    async with daemon_process(db_url, port, tmp_path) as first:
        for i in range(per_phase):
            await post(conn, room, user, f"before {i}")
        proc = await asyncio.create_subprocess_exec(
            str(client_venv), str(script), url(port), token(user), room, str(base),
            str(3 * per_phase), cwd=tmp_path, env={"PATH": os.environ["PATH"]},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        seqs: list[int] = []

        async def read_until(n: int) -> None:
            assert proc.stdout is not None and proc.stderr is not None
            while len(seqs) < n:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line, f"the subscriber exited: {(await proc.stderr.read()).decode()}"
                seqs.append(int(line))

        try:
            await read_until(per_phase)
            await first.kill()  # SIGKILL: no close frame, the socket just ends
            for i in range(per_phase):  # while no daemon listens
                await post(conn, room, user, f"during {i}")
            async with daemon_process(db_url, port, tmp_path):
                for i in range(per_phase):
                    await post(conn, room, user, f"after {i}")
                await read_until(3 * per_phase)
                assert await asyncio.wait_for(proc.wait(), 60) == 0
            err = (await proc.stderr.read()).decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert seqs == list(range(base + 1, base + 3 * per_phase + 1)), seqs
    assert "reconnecting in" in err, err  # the drop is reported, as progress
    assert "Traceback" not in err, err


# --- snapshot, sharing, token refresh ---------------------------------------------------------

async def test_a_snapshot_then_the_live_events(bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    before = [await post(conn, room, user, f"before {i}") for i in range(5)]
    async with pgbridge_client.connect(url(bridge.port), token=token(user)) as client:
        sub = client.subscribe(room, snapshot=3)
        snapshot = await next_item(sub)
        assert isinstance(snapshot, pgbridge_client.Snapshot)
        assert [m["id"] for m in snapshot.messages] == before[-3:]
        assert snapshot.seq == await head(conn, room) and not snapshot.truncated
        after = [await post(conn, room, user, f"after {i}") for i in range(2)]
        events = [await next_item(sub), await next_item(sub)]
        assert all(isinstance(e, pgbridge_client.Event) for e in events)
        assert [(e.id, e.seq, e.table, e.op) for e in events] == [
            (after[0], snapshot.seq + 1, "messages", "INSERT"),
            (after[1], snapshot.seq + 2, "messages", "INSERT")]
        assert events[0].data["content"] == "after 0" and events[0].room == room
        await sub.aclose()


async def test_concurrent_subscribes_share_one_connection(bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    rooms = [await make_room(conn, user) for _ in range(3)]
    heads = [await head(conn, r) for r in rooms]
    async with pgbridge_client.connect(url(bridge.port), token=token(user)) as client:
        assert client.user == user and client.correlation_id

        async def follow(room: str, since: int) -> list[int]:
            seqs = []
            async for event in client.subscribe(room, since=since):
                seqs.append(event.seq)
                if len(seqs) == 3:
                    return seqs
            raise AssertionError("the subscription ended")

        tasks = [asyncio.create_task(follow(r, h)) for r, h in zip(rooms, heads, strict=True)]
        for i in range(3):
            for r in rooms:
                await post(conn, r, user, f"m{i}")
        got = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert got == [[h + 1, h + 2, h + 3] for h in heads]
        assert bridge.limits.connections(user) == 1


async def test_acks_reach_sync_state(bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    base = await head(conn, room)
    async with pgbridge_client.connect(url(bridge.port), token=token(user),
                                       ack_interval=0.05) as client:
        sub = client.subscribe(room, since=base)
        await post(conn, room, user, "one")
        await post(conn, room, user, "two")
        assert (await next_item(sub)).seq == base + 1
        assert (await next_item(sub)).seq == base + 2
        await sub.aclose()  # the last one handed out is acknowledged with it

    async def acked() -> bool:
        cur = await conn.execute("SELECT last_seq FROM sync_state WHERE user_id = %s AND "
                                 "room_id = %s AND sync_type = 'events'", [user, room])
        row = await cur.fetchone()
        return row is not None and row[0] == base + 2

    await until(acked, "the ack of the last event in sync_state")


@pytest.mark.slow
async def test_a_token_about_to_expire_is_replaced_without_a_drop(
        bridge: Bridge, conn: Conn, caplog: pytest.LogCaptureFixture) -> None:
    """The first token expires 3 s after it is made; the callable's next one, sent as a
    ``refresh`` ``refresh_before`` seconds before that, keeps the connection open past it."""
    caplog.set_level(logging.INFO, logger="pgbridge_client")
    user = await make_user(conn)
    room = await make_room(conn, user)
    base = await head(conn, room)
    calls: list[float] = []

    async def get_token() -> str:
        calls.append(time.time())
        return token(user, ttl=3 if len(calls) == 1 else 3600)

    async with pgbridge_client.connect(url(bridge.port), token=get_token,
                                       refresh_before=2.5) as client:
        first = client.correlation_id
        sub = client.subscribe(room, since=base)
        await until(lambda: _true(records(caplog, "refreshed")), "the token to be refreshed")
        # time itself is awaited: the first token's exp (whole seconds), and a margin
        await asyncio.sleep(max(int(calls[0]) + 3 + 1.5 - time.time(), 0))
        await post(conn, room, user, "after the first token expired")
        assert (await next_item(sub)).seq == base + 1
        assert client.correlation_id == first
        assert len(calls) == 2
    assert not records(caplog, "reconnecting"), caplog.text


async def _true(value: object) -> bool:
    return bool(value)


# --- refusals ---------------------------------------------------------------------------------

async def test_a_bad_token_raises_unauthorized_after_one_fresh_attempt(bridge: Bridge) -> None:
    calls = 0

    def bad() -> str:
        nonlocal calls
        calls += 1
        return token("someone", secret="x" * 40)

    with pytest.raises(pgbridge_client.Unauthorized) as refused:
        async with pgbridge_client.connect(url(bridge.port), token=bad):
            pytest.fail("connected with a bad token")
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert "refused: HTTP 401" in str(refused.value)
    assert calls == 2  # one fresh token, then the refusal: no retry loop
    with pytest.raises(pgbridge_client.Unauthorized):
        async with pgbridge_client.connect(url(bridge.port), token=bad()):
            pass
    assert calls == 3


async def test_a_forbidden_and_a_missing_room_raise_and_the_connection_goes_on(
        bridge: Bridge, conn: Conn, caplog: pytest.LogCaptureFixture) -> None:
    user, owner = await make_user(conn), await make_user(conn)
    theirs = await make_room(conn, owner)
    mine = await make_room(conn, user)
    async with pgbridge_client.connect(url(bridge.port), token=token(user)) as client:
        with pytest.raises(pgbridge_client.Forbidden) as forbidden:
            async for _ in client.subscribe(theirs):
                pass
        assert (forbidden.value.code, forbidden.value.room) == ("forbidden", theirs)
        with pytest.raises(pgbridge_client.NotFound) as missing:
            async for _ in client.subscribe("01JD3V6Z7W2Q4X8Y9A0B1C2D3E"):
                pass
        assert missing.value.code == "not_found"
        sub = client.subscribe(mine, since=await head(conn, mine))
        await post(conn, mine, user, "still here")
        assert (await next_item(sub)).data["content"] == "still here"
    assert not records(caplog, "reconnecting") and not records(caplog, "subscribe_retry")


async def test_a_revoked_membership_ends_the_subscription_and_a_deleted_user_the_bridge(
        bridge: Bridge, conn: Conn) -> None:
    user, owner = await make_user(conn), await make_user(conn)
    room, other = await make_room(conn, user, owner), await make_room(conn, user)
    async with pgbridge_client.connect(url(bridge.port), token=token(user)) as client:
        sub = client.subscribe(room, since=await head(conn, room))
        still = client.subscribe(other, since=await head(conn, other))
        await post(conn, room, owner, "before")
        await post(conn, other, user, "before too")
        assert (await next_item(sub)).data["content"] == "before"
        assert (await next_item(still)).data["content"] == "before too"  # both subscribed
        await conn.execute("DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
                           (room, user))
        with pytest.raises(pgbridge_client.SubscriptionEnded) as ended:
            await next_item(sub)
        assert (ended.value.code, ended.value.room) == ("membership_revoked", room)
        await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [user])
        with pytest.raises(pgbridge_client.UserDeleted) as deleted:
            await next_item(still)
        assert deleted.value.close_code == 4003
        assert client.closed


async def test_a_room_left_with_break_can_be_subscribed_again_at_once(
        bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    base = await head(conn, room)
    async with pgbridge_client.connect(url(bridge.port), token=token(user)) as client:
        await post(conn, room, user, "one")
        async for event in client.subscribe(room, since=base):
            assert event.seq == base + 1
            break  # no longer referenced: unsubscribed, and its room free again
        again = client.subscribe(room, since=base + 1)
        await post(conn, room, user, "two")
        assert (await next_item(again)).seq == base + 2
        assert bridge.hub.subscribers(room) == 1


@pytest.mark.slow
async def test_a_fixed_token_that_expires_raises_unauthorized(bridge: Bridge,
                                                              conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with pgbridge_client.connect(url(bridge.port), token=token(user, ttl=1)) as client:
        with pytest.raises(pgbridge_client.Unauthorized) as expired:
            async for _ in client.subscribe(room):
                pass
    assert expired.value.close_code == 4001


# --- a bridge that is not listening yet --------------------------------------------------------

async def test_a_bridge_not_listening_is_waited_for_with_progress_in_the_log(
        db_url: str, conn: Conn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgbridge_client")
    user = await make_user(conn)
    room = await make_room(conn, user)
    port = free_port()
    connecting = pgbridge_client.connect(url(port), token=token(user), backoff_base=0.05,
                                         backoff_cap=0.2)
    entered = asyncio.create_task(connecting.__aenter__())
    await until(lambda: _true(len(records(caplog, "reconnecting")) >= 3),
                "three reconnect delays in the log")
    assert not entered.done()
    first = records(caplog, "reconnecting")[0].getMessage()
    assert first.startswith(f"cannot connect to {url(port)}: ConnectionRefusedError"), first
    async with running_bridge(db_url, port=port) as bridge:
        client = await asyncio.wait_for(entered, 30)
        try:
            sub = client.subscribe(room, since=await head(conn, room))
            await post(conn, room, user, "hello")
            assert (await next_item(sub)).data["content"] == "hello"
            assert bridge.limits.connections(user) == 1
        finally:
            await connecting.__aexit__(None, None, None)
    assert records(caplog, "connected")


# --- the feed ---------------------------------------------------------------------------------

async def test_the_feed_gives_the_rooms_then_their_events_joins_and_leaves(
        bridge: Bridge, conn: Conn) -> None:
    user, other = await make_user(conn), await make_user(conn)
    a, b = await make_room(conn, user, other), await make_room(conn, user, other)
    for text in ("one", "two"):
        await post(conn, a, other, text)
    await post(conn, a, user, "mine")
    async with pgbridge_client.connect(url(bridge.port), token=token(user),
                                       ack_interval=0.05) as client:
        feed = client.feed()
        with pytest.raises(ValueError):
            client.feed()
        rooms = await asyncio.wait_for(anext(feed), 20)
        assert isinstance(rooms, pgbridge_client.FeedRooms)
        assert {r.room: (r.head, r.acked, r.unread) for r in rooms.rooms} == {
            a: (await head(conn, a), 0, 2), b: (await head(conn, b), 0, 0)}
        in_b = await post(conn, b, other, "in b")
        event = await asyncio.wait_for(anext(feed), 20)
        assert isinstance(event, pgbridge_client.Event) and (event.room, event.id) == (b, in_b)
        c = await make_room(conn, other)
        await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                           (c, user))
        joined = await asyncio.wait_for(anext(feed), 20)
        assert isinstance(joined, pgbridge_client.Event)
        assert (joined.room, joined.table, joined.op) == (c, "channel_members", "INSERT")
        await conn.execute("DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
                           (b, user))
        left = await asyncio.wait_for(anext(feed), 20)
        assert isinstance(left, pgbridge_client.RoomLeft)
        assert (left.room, left.reason) == (b, "membership_revoked")
        # a room subscribed to is taken over from the feed: its events come there only
        sub = client.subscribe(a)
        assert sub.last_seq == await head(conn, a)
        in_a = await post(conn, a, other, "in a")
        in_c = await post(conn, c, other, "in c")
        assert (await next_item(sub)).id == in_a
        after = await asyncio.wait_for(anext(feed), 20)
        assert isinstance(after, pgbridge_client.Event) and after.id == in_c
        last_c = after.seq
        await sub.aclose()
        await feed.aclose()

    async def acked() -> bool:  # the feed's events, acknowledged once the loop went on
        cur = await conn.execute("SELECT room_id, last_seq FROM sync_state WHERE user_id = "
                                 "%s AND sync_type = 'events'", [user])
        return dict(await cur.fetchall()).get(c) == last_c

    await until(acked, "the feed's acks in sync_state")
