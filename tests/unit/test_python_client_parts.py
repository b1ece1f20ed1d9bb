"""The pure parts of the Python client (clients/python): its version is the project's, frames
from a hostile or broken server are parsed or refused without surprise, the stop rules, the
backoff, a token's expiry, the URL it connects to, and the checks of its arguments."""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path

import pgbridge_client
import pytest
from pgbridge_client.bridge import Bridge, _with_batch
from pgbridge_client.frames import Event, FrameError, Snapshot, Welcome, split
from pgbridge_client.rules import (
    Backoff,
    close_refusal,
    retry_after,
    status_refusal,
    token_expiry,
)

from daemon.auth import mint_token

ROOT = Path(__file__).resolve().parents[2]
EVENT = {"type": "event", "room": "r1", "seq": 7, "table": "messages", "op": "INSERT",
         "id": "m1", "data": {"id": "m1", "content": "hi"}, "ts": "2026-11-21T10:15:02+00:00"}


def version(pyproject: Path) -> str:
    return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def test_the_client_is_versioned_with_the_project() -> None:
    assert version(ROOT / "clients" / "python" / "pyproject.toml") == version(
        ROOT / "pyproject.toml")


def test_the_server_depends_on_the_client_of_its_own_version() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"pgbridge-client=={root['project']['version']}" in root["project"]["dependencies"]


def test_the_client_depends_on_websockets_only() -> None:
    config = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())
    assert [d.split(">")[0] for d in config["project"]["dependencies"]] == ["websockets"]


# --- frames -----------------------------------------------------------------------------------

def test_a_coalesced_message_gives_its_frames_in_order() -> None:
    frames, problems = split('{"type":"pong","ref":"a"}\n{"type":"pong","ref":"b"}')
    assert [f["ref"] for f in frames] == ["a", "b"] and problems == []


@pytest.mark.parametrize("part", [
    "not json", "[1, 2]", '"text"', "1e999999", "9" * 5000, "[" * 100_000, "{" * 100_000, "",
])
def test_parts_that_are_no_json_object_are_named_not_raised(part: str) -> None:
    frames, problems = split(f'{{"type":"pong"}}\n{part}\n{{"type":"pong","ref":"z"}}')
    if part == "1e999999":  # inf: valid to Python's json, but no object
        assert len(problems) == 1
    assert [f.get("ref") for f in frames] == [None, "z"]
    assert len(problems) == 1 and all(len(p) < 200 for p in problems)


def test_a_binary_message_is_decoded_or_named() -> None:
    assert split(b'{"type":"pong"}')[0] == [{"type": "pong"}]
    assert split(b"\xff\xfe")[1] == ["a binary message that is not UTF-8"]


def test_an_event_is_typed_and_keeps_its_frame() -> None:
    event = Event.from_frame(EVENT | {"extra": 1})
    assert (event.room, event.seq, event.op, event.id, event.data["content"]) == (
        "r1", 7, "INSERT", "m1", "hi")
    assert event.frame["extra"] == 1
    with pytest.raises(AttributeError):
        event.seq = 8  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("change", [
    {"seq": True}, {"seq": -1}, {"seq": 2**63}, {"seq": 7.0}, {"seq": "7"}, {"room": None},
    {"op": "TRUNCATE"}, {"data": [1]}, {"data": None}, {"ts": 1}, {"id": 5},
])
def test_an_ill_typed_event_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(FrameError):
        Event.from_frame(EVENT | change)


def test_snapshot_and_welcome_parse_what_may_be_missing() -> None:
    snap = Snapshot.from_frame({"type": "snapshot", "room": "r1", "seq": 3, "messages": [{}]})
    assert snap.truncated is False and len(snap.messages) == 1
    with pytest.raises(FrameError):
        Snapshot.from_frame({"type": "snapshot", "room": "r1", "seq": 3, "messages": [1]})
    welcome = Welcome.from_frame({"type": "welcome", "user": "u", "heartbeat": 0.5})
    assert (welcome.heartbeat, welcome.batch, welcome.correlation_id) == (0.5, None, None)
    with pytest.raises(FrameError):
        Welcome.from_frame({"type": "welcome"})


def test_a_welcome_with_a_heartbeat_too_big_for_a_float_is_read() -> None:
    """It raised OverflowError, which ended the bridge as an internal error of the client."""
    welcome = Welcome.from_frame({"type": "welcome", "user": "u", "heartbeat": 10**400})
    assert welcome.heartbeat == 0.0


# --- stop rules, backoff, token ----------------------------------------------------------------

@pytest.mark.parametrize(("code", "name"), [
    (1007, "invalid_payload"), (1008, "policy_violation"), (1009, "message_too_big"),
    (4003, "user_deleted")])
def test_closes_a_retry_cannot_fix(code: int, name: str) -> None:
    refusal = close_refusal(code, "why")
    assert refusal is not None and (refusal.code, refusal.close_code) == (name, code)
    assert isinstance(refusal, pgbridge_client.UserDeleted) == (code == 4003)


@pytest.mark.parametrize("code", [1000, 1001, 1006, 1011, 1012, 1013, 4008, 4001, 3000])
def test_closes_that_are_retried(code: int) -> None:
    assert close_refusal(code, "") is None


def test_http_refusals() -> None:
    for status in (429, 500, 502, 503, 504):
        assert status_refusal(status, "") is None
    assert isinstance(status_refusal(401, ""), pgbridge_client.Unauthorized)
    assert isinstance(status_refusal(403, ""), pgbridge_client.Forbidden)
    missing = status_refusal(404, "not found")
    assert missing is not None and (missing.code, missing.status) == ("http_404", 404)
    assert str(missing) == "refused: HTTP 404 not found"


def test_retry_after() -> None:
    assert [retry_after(v) for v in (None, "2", "-1", "soon", "1e9", "nan")] == [
        0.0, 2.0, 0.0, 0.0, 300.0, 0.0]


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(base=1.0, cap=8.0)
    delays = [backoff.next() for _ in range(10)]
    assert all(0.5 <= d <= 8.0 for d in delays) and delays[0] <= 1.0
    backoff.reset()
    assert backoff.next() <= 1.0


def test_token_expiry() -> None:
    assert token_expiry(mint_token("s" * 40, "u", ttl=60)) is not None
    claims = base64.urlsafe_b64encode(json.dumps({"exp": "soon"}).encode()).decode()
    for bad in ("", "a.b.c", f"x.{claims}.y", "x." + "W" * 8 + ".y", "only.two"):
        assert token_expiry(bad) is None, bad


# --- arguments ---------------------------------------------------------------------------------

def test_the_url_asks_for_batch_once() -> None:
    assert _with_batch("ws://h:1/ws", 0) == "ws://h:1/ws?batch=0"
    assert _with_batch("http://h/ws?batch=5&a=1", 20) == "ws://h/ws?a=1&batch=20"
    assert _with_batch("https://h/ws?batch=5", None) == "wss://h/ws?batch=5"


@pytest.mark.parametrize("kwargs", [{"batch": 1001}, {"batch": True}, {"batch": -1},
                                    {"token": 5}])
def test_bad_connect_arguments_raise_at_once(kwargs: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        pgbridge_client.connect("ws://127.0.0.1:1/ws", **({"token": "t"} | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"backoff_base": 0}, {"backoff_base": -1.0}, {"backoff_cap": 0}, {"ack_interval": 0},
    {"ack_interval": float("nan")}, {"open_timeout": 0}, {"refresh_before": -1},
    {"max_queue": 0}, {"max_size": 0}])
def test_connect_arguments_that_would_spin_or_stall_raise_at_once(
        kwargs: dict[str, object]) -> None:
    """They were taken: a backoff of 0 reconnected in a hot loop, an ``ack_interval`` of 0
    flushed acks in one, a ``max_queue`` of 0 held the connection's reader forever."""
    with pytest.raises(ValueError):
        pgbridge_client.connect("ws://127.0.0.1:1/ws", **({"token": "t"} | kwargs))  # type: ignore[arg-type]


def test_an_unusable_url_raises_at_once() -> None:
    with pytest.raises(ValueError):
        pgbridge_client.connect("ftp://host/ws", token="t")


@pytest.mark.parametrize("kwargs", [
    {"room": "no spaces"}, {"room": ""}, {"room": "x" * 27}, {"room": "é"},
    {"since": -1}, {"since": True}, {"snapshot": 0}, {"since": 1, "snapshot": 2}])
async def test_bad_subscribe_arguments_raise(kwargs: dict[str, object]) -> None:
    bridge = Bridge("ws://127.0.0.1:1/ws", token="t")
    with pytest.raises(ValueError):
        bridge.subscribe(**({"room": "r1"} | kwargs))  # type: ignore[call-overload]
    held = bridge.subscribe("r1")
    with pytest.raises(ValueError):
        bridge.subscribe("r1")
    del held  # no longer referenced: its room is free again
    bridge.subscribe("r1")
    await bridge.close()
    with pytest.raises(pgbridge_client.ClosedError):
        bridge.subscribe("r2")
