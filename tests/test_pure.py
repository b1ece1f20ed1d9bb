"""The pure modules (protocol, cursor, hub, events, rate limit, settings): no I/O."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.cursor import Arrival, classify, resolve_from
from daemon.errors import ConfigError
from daemon.events import Event, Pointer, Probe, parse_notify
from daemon.hub import Hub, Subscription
from daemon.logs import Throttled
from daemon.origins import Allowlist, origin_allowed, parse_allowlist
from daemon.protocol import Ack, ProtocolError, Subscribe, is_id, is_token, load_json, parse_frame
from daemon.ratelimit import ClientLimits, TokenBucket
from daemon.settings import DaemonSettings, DatabaseSettings, SSHSettings


class RecordingSink:
    def __init__(self, user: str = "u1") -> None:
        self.user = user
        self.frames: list[bytes | str] = []
        self.overflowed = False
        self.why = ""
        self.ended: list[Subscription] = []

    def send(self, frame: bytes | str) -> None:
        self.frames.append(frame)

    def overflow(self, why: str) -> None:
        self.overflowed = True
        self.why = why

    def subscription_ended(self, sub: Subscription) -> None:
        self.ended.append(sub)

    def seqs(self) -> list[int]:
        return [json.loads(f)["seq"] for f in self.frames if isinstance(f, bytes)]


def event(seq: int, room: str = "R", **kw: object) -> Event:
    return Event(room=room, seq=seq, frame=json.dumps({"type": "event", "seq": seq}).encode(),
                 **kw)  # type: ignore[arg-type]


@given(st.data())
def test_switch_from_replay_to_live_has_no_gap_and_no_duplicate(data: st.DataObject) -> None:
    """Whatever the interleaving of live events with the replay, a subscriber gets exactly
    from+1 .. last, in order."""
    total = data.draw(st.integers(0, 60), label="events in the log")
    at = data.draw(st.integers(0, total), label="published when the subscriber registers")
    # from may exceed L: the database's head can be ahead of what the hub has published yet
    start = data.draw(st.integers(0, total), label="from")
    hub = Hub()
    hub.track("R", 0)
    keep = Subscription(RecordingSink("other"), "R", pending_limit=1000)
    hub.add(keep)  # keeps the room tracked throughout
    for seq in range(1, at + 1):
        hub.publish(event(seq))
    sink = RecordingSink()
    sub = Subscription(sink, "R", pending_limit=1000)
    live_from = hub.add(sub)
    assert live_from == at
    sub.from_seq = start
    published = at
    replay = list(range(start + 1, live_from + 1))
    while replay or published < total:  # replay pages and live events, interleaved at random
        if replay and (published == total or data.draw(st.booleans())):
            sub.replay(event(replay.pop(0)))
        else:
            published += 1
            hub.publish(event(published))
    sub.go_live()
    for seq in range(total + 1, total + 4):
        hub.publish(event(seq))
    assert sink.seqs() == list(range(start + 1, total + 4))


def test_revocation_ends_subscription_before_later_events() -> None:
    hub, sink = Hub(), RecordingSink("bob")
    hub.track("R", 0)
    sub = Subscription(sink, "R", pending_limit=10)
    hub.add(sub)
    sub.go_live()
    hub.publish(event(1))
    hub.publish(event(2, revokes="alice"))  # somebody else: delivered
    hub.publish(event(3, revokes="bob"))
    hub.publish(event(4))
    assert sink.seqs() == [1, 2]
    assert json.loads(sink.frames[-1]) == {"type": "unsubscribed", "room": "R",
                                           "reason": "membership_revoked"}
    assert sink.ended == [sub] and "R" not in hub


def test_revocation_buffered_during_replay_is_applied_at_go_live() -> None:
    hub, sink = Hub(), RecordingSink("bob")
    hub.track("R", 5)
    sub = Subscription(sink, "R", pending_limit=10)
    assert hub.add(sub) == 5
    hub.publish(event(6, revokes="bob"))
    hub.publish(event(7))
    sub.replay(event(5))
    assert sub.go_live() is True
    assert sink.seqs() == [5]
    assert json.loads(sink.frames[-1])["reason"] == "membership_revoked"


def test_room_deleted_event_is_delivered_then_subscription_ends() -> None:
    hub, sink = Hub(), RecordingSink()
    hub.track("R", 0)
    sub = Subscription(sink, "R", pending_limit=10)
    hub.add(sub)
    sub.go_live()
    hub.publish(event(1, ends_room=True))
    hub.publish(event(2))
    assert sink.seqs() == [1]
    assert json.loads(sink.frames[-1])["reason"] == "room_deleted"


def test_pending_overflow_reports_slow_client() -> None:
    hub, sink = Hub(), RecordingSink()
    hub.track("R", 0)
    sub = Subscription(sink, "R", pending_limit=3)
    hub.add(sub)
    for seq in range(1, 5):
        hub.publish(event(seq))
    assert sink.overflowed
    # the log names the buffer that overflowed (not the empty outgoing queue)
    assert sink.why == "more than 3 live events of room R arrived while its replay was running"


@pytest.mark.parametrize(("last", "seq", "arrival"), [
    (5, 5, Arrival.DUPLICATE), (5, 3, Arrival.DUPLICATE), (5, 6, Arrival.NEXT),
    (5, 9, Arrival.GAP), (0, 1, Arrival.NEXT)])
def test_classify(last: int, seq: int, arrival: Arrival) -> None:
    assert classify(last, seq) is arrival


def test_resolve_from_rules() -> None:
    base = {"room": "R", "head": 10, "retained_from": 4}
    assert resolve_from(since=None, acked=None, **base) == 10  # type: ignore[arg-type]
    assert resolve_from(since=None, acked=7, **base) == 7  # type: ignore[arg-type]
    assert resolve_from(since=None, acked=99, **base) == 10  # type: ignore[arg-type]
    assert resolve_from(since=3, acked=7, **base) == 3  # type: ignore[arg-type]
    assert resolve_from(since=10, acked=None, **base) == 10  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as ahead:
        resolve_from(since=11, acked=None, **base)  # type: ignore[arg-type]
    assert ahead.value.code == "bad_request"
    with pytest.raises(ProtocolError) as expired:
        resolve_from(since=2, acked=None, **base)  # type: ignore[arg-type]
    assert expired.value.code == "cursor_expired"
    with pytest.raises(ProtocolError):
        resolve_from(since=None, acked=1, **base)  # type: ignore[arg-type]
    # empty log (everything pruned): only the head itself is a valid cursor
    assert resolve_from(room="R", since=10, acked=None, head=10, retained_from=11) == 10
    with pytest.raises(ProtocolError):
        resolve_from(room="R", since=9, acked=None, head=10, retained_from=11)


def test_parse_frame_accepts_valid_requests() -> None:
    assert parse_frame('{"type":"subscribe","room":"R","since":0,"ref":"a","extra":1}') == \
        Subscribe(room="R", since=0, ref="a")
    assert parse_frame('{"type":"ack","room":"R","seq":9}') == Ack(room="R", seq=9)


@given(st.text(max_size=200))
def test_parse_frame_never_raises_anything_but_protocol_error(text: str) -> None:
    try:
        parse_frame(text)
    except ProtocolError as exc:
        assert exc.code in ("bad_request", "unknown_type", "unauthorized")
        assert json.loads(exc.frame())["type"] == "error"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=30),
       st.integers(1, 40))
def test_load_json_limits_depth_exactly(value: object, limit: int) -> None:
    text = json.dumps(value)

    def depth(v: object) -> int:
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        return 0 if children is None else 1 + max(map(depth, children), default=0)

    if depth(value) > limit:
        with pytest.raises(ValueError, match="nests deeper"):
            load_json(text, max_depth=limit)
    else:
        assert load_json(text, max_depth=limit) == value


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 3000 + "1" + "}" * 3000,
                                  "[" * 50_000])
def test_load_json_never_raises_recursion_error(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        load_json(text)
    assert not isinstance(refused.value, RecursionError)


def test_frames_with_many_containers_are_refused_before_decoding() -> None:
    """A 64 KiB frame of shallow arrays (20,000 of them) used to cost 13 ms to check; the
    bracket count refuses it before the decoder runs."""
    with pytest.raises(ProtocolError, match="more than 256"):
        parse_frame("[" + "[[1]]," * 10_000 + "1]")
    assert parse_frame('{"type":"ping","ref":"' + "[" * 100 + '","x":[[1]]}') is not None


def test_ids_and_tokens_admit_only_their_alphabet() -> None:
    assert is_id("01JD3V6Z7W2Q4X8Y9A0B1C2D3E") and is_id("general-2_x") and is_id("R")
    for bad in ("", "A" * 27, "\ud800", "a\x00b", "a b", "é", "a/b", None, 7):
        assert not is_id(bad), bad
    assert is_token("eyJ.eyJ.sig-_=") and not is_token("a" * 4097)
    for bad in ("", "a b", "\udcff", "tok\x00", "a\nb"):
        assert not is_token(bad), bad


def test_client_limits_per_user_total_and_subscribe_buckets() -> None:
    now = [0.0]
    limits = ClientLimits(max_connections=3, max_per_user=2, user_rate=1.0, user_burst=2,
                          clock=lambda: now[0])
    limits.opened("a")
    limits.opened("a")
    assert limits.user_at_capacity("a") and not limits.user_at_capacity("b")
    assert not limits.at_capacity() and limits.at_capacity(pending=1)
    limits.opened("b")
    assert limits.at_capacity()
    assert [limits.subscribe_allowed("a") for _ in range(3)] == [True, True, False]
    assert limits.subscribe_allowed("b")  # each user has its own bucket
    limits.closed("a")
    limits.closed("a")
    assert limits.connections("a") == 0 and limits.total == 1
    now[0] += 0.5  # a user who leaves and comes back finds its bucket as it left it
    assert limits.subscribe_allowed("a") is False
    now[0] += ClientLimits.SWEEP_INTERVAL  # refilled and gone: forgotten at the next sweep
    limits.closed("b")
    assert limits.buckets() == 0 and limits.total == 0


def test_replayed_revocation_after_the_membership_check_ends_the_subscription() -> None:
    """Membership is checked at head 5; the log then holds the user's removal at 7: replaying
    it ends the subscription exactly as the live event would. Older removals (a membership
    ended and granted again before the check) are history and change nothing."""
    hub, sink = Hub(), RecordingSink("bob")
    hub.track("R", 8)
    sub = Subscription(sink, "R", pending_limit=10, checked_at=5)
    sub.from_seq = 2
    assert hub.add(sub) == 8
    assert sub.replay(event(3, revokes="bob")) is False
    assert sub.replay(event(6)) is False
    assert sub.replay(event(7, revokes="bob")) is True
    assert sub.replay(event(8)) is False
    assert sink.seqs() == [3, 6] and sub.ended and sink.ended == [sub]
    assert json.loads(sink.frames[-1])["reason"] == "membership_revoked"


def test_parse_notify_kinds() -> None:
    full = json.dumps({"type": "event", "room": "R", "seq": 3, "table": "channel_members",
                       "op": "DELETE", "data": {"user_id": "U"}})
    parsed = parse_notify(full)
    assert isinstance(parsed, Event) and parsed.revokes == "U" and parsed.frame == full.encode()
    assert parse_notify('{"room": "R", "seq": 4}') == Pointer("R", 4)
    assert parse_notify('{"probe": "abc"}') == Probe("abc")
    assert parse_notify("garbage") is None and parse_notify("[1]") is None

    def channel_update(deleted_at: str | None) -> Event | Pointer | Probe | None:
        return parse_notify(json.dumps({"type": "event", "room": "R", "seq": 1,
                                        "table": "channels", "op": "UPDATE",
                                        "data": {"deleted_at": deleted_at}}))

    deleted, kept = channel_update("2026-01-01"), channel_update(None)
    assert isinstance(deleted, Event) and deleted.ends_room
    assert isinstance(kept, Event) and not kept.ends_room


def test_token_bucket_rate_and_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 1.0
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_settings_errors_name_the_variable() -> None:
    for env, name in [({"PGBRIDGE_PORT": "http"}, "PGBRIDGE_PORT"),
                      ({"PGBRIDGE_RETENTION": "a week"}, "PGBRIDGE_RETENTION"),
                      ({"PGBRIDGE_SCHEMA": "Robert'); DROP"}, "PGBRIDGE_SCHEMA"),
                      ({"PGBRIDGE_LOG_LEVEL": "loud"}, "PGBRIDGE_LOG_LEVEL")]:
        with pytest.raises(ConfigError, match=name):
            DaemonSettings.from_env(env)
    with pytest.raises(ConfigError, match="SSH_STRICT_HOST_KEY_CHECKING"):
        SSHSettings.from_env({"SSH_HOST": "h", "SSH_STRICT_HOST_KEY_CHECKING": "maybe"})
    assert DaemonSettings.from_env({"PGBRIDGE_RETENTION": "12h"}).retention == 43200
    assert DatabaseSettings.from_env({}).embedded
    assert not DatabaseSettings.from_env({"POSTGRES_HOST": "db"}).embedded
    assert "secret" not in repr(DatabaseSettings.from_env({"DATABASE_URL": "postgres://u:secret@h/d"}))
    assert "pw" not in repr(SSHSettings.from_env({"SSH_HOST": "h", "SSH_KEY_PASSPHRASE": "pw"}))


def test_throttled_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = Throttled(logging.getLogger("t"), interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="t")
    for _ in range(5):
        throttled.info("a", "refused %s", "x")
    throttled.info("b", "other")
    now[0] += 10.0
    throttled.info("a", "refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "other", "refused y (and 4 more like it in the last 10 s)"]


# --- origins (PGBRIDGE_ALLOWED_ORIGINS) -------------------------------------------------------

@pytest.mark.parametrize(("value", "exact"), [
    ("https://app.example", ("https", "app.example", 443)),
    ("HTTPS://App.EXAMPLE", ("https", "app.example", 443)),
    ("https://app.example:443", ("https", "app.example", 443)),
    ("http://app.example:80", ("http", "app.example", 80)),
    ("http://app.example:8080", ("http", "app.example", 8080)),
    ("http://127.0.0.1:5173", ("http", "127.0.0.1", 5173)),
    ("http://[::1]:8080", ("http", "[::1]", 8080)),
    ("http://[::1]", ("http", "[::1]", 80)),
    ("  https://app.example  ", ("https", "app.example", 443)),
    # an app's webview (Capacitor, Electron) has a scheme of its own and no port
    ("capacitor://localhost", ("capacitor", "localhost", 0)),
])
def test_allowlist_entries_are_normalised_like_serialized_origins(
        value: str, exact: tuple[str, str, int]) -> None:
    """An entry compares as RFC 6454 serializes an origin: scheme and host in lowercase, the
    default port the same as none, IPv6 in brackets. A case or port spelling mismatch would
    refuse the very page the operator listed."""
    assert parse_allowlist(value) == Allowlist(exact=frozenset({exact}))


def test_allowlist_lists_wildcards_and_any() -> None:
    allowlist = parse_allowlist(" https://app.example , HTTPS://*.Example.ORG,, "
                                "http://*.dev.test:8080,")
    assert allowlist.exact == {("https", "app.example", 443)}
    assert set(allowlist.subdomains) == {("https", ".example.org", 443),
                                         ("http", ".dev.test", 8080)}
    assert not allowlist.any
    assert parse_allowlist("*").any
    assert parse_allowlist("https://app.example, *").any
    for unset in (None, "", "  ", ",", " , "):
        assert parse_allowlist(unset) == Allowlist(), unset  # own origin only


@pytest.mark.parametrize("value", [
    "null", "NULL", " null ", "https://app.example, null",
    "https://a.example/x", "https://a.example/", "https://*.example.org/",
    "https://user:pw@a.example", "https://user@a.example",
    "https://a.example?x=1", "https://a.example#top",
    "a.example", "//a.example", "a.example:443", "*.example.org",
    "https://a.example:0", "https://.example", "https://a..example", "https://*..example",
    "https://a.example.", "garbage, *", "*, garbage",  # every entry is checked, * or not
    "https://a.example:", "https://a.example:99999", "https://a.example:http",
    "https://*", "https://*.", "https://*.:443", "https://*.*.example.org",
    "https://a.*.example.org", "https://*example.org", "https://**.example.org",
    "https://exa mple.org", "https://münchen.example", "https://a_b.example",
    "https://[::1", "https://[zz]:443",
    "https://app.example, garbage",
])
def test_allowlist_refuses_what_is_not_an_origin(value: str) -> None:
    """A path, credentials, a query, a missing scheme or a misplaced ``*`` is a typo that
    would otherwise silently admit nothing (or something else): refused at startup. ``null``
    is refused because every sandboxed frame and file:// page of any site sends it."""
    with pytest.raises(ValueError, match=r"null|not an origin"):
        parse_allowlist(value)


def test_null_in_the_allowlist_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^PGBRIDGE_ALLOWED_ORIGINS") as refused:
        DaemonSettings.from_env({"PGBRIDGE_ALLOWED_ORIGINS": "null"})
    assert "null" in str(refused.value)
    with pytest.raises(ConfigError, match=r"^PGBRIDGE_ALLOWED_ORIGINS.*a\.example/x"):
        DaemonSettings.from_env({"PGBRIDGE_ALLOWED_ORIGINS": "https://a.example/x"})
    settings = DaemonSettings.from_env({"PGBRIDGE_ALLOWED_ORIGINS": "https://App.example"})
    assert settings.allowed_origins.exact == {("https", "app.example", 443)}
    assert DaemonSettings.from_env({}).allowed_origins == Allowlist()


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    (None, "127.0.0.1:8080", True),  # not a browser
    (None, None, True),
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://127.0.0.1", "127.0.0.1", True),
    ("http://127.0.0.1", "127.0.0.1:80", True),
    ("http://127.0.0.1:80", "127.0.0.1", True),
    ("https://bridge.example", "bridge.example", True),
    ("https://bridge.example", "bridge.example:443", True),
    ("https://bridge.example:443", "bridge.example", True),
    ("https://BRIDGE.Example", "bridge.example", True),
    ("https://bridge.example", "BRIDGE.EXAMPLE:443", True),
    ("http://[::1]:8080", "[::1]:8080", True),
    ("http://localhost:8080", "127.0.0.1:8080", False),  # another origin, same machine
    ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
    ("http://bridge.example", "bridge.example:443", False),
    ("https://bridge.example", "bridge.example:80", False),
    ("http://127.0.0.1:8080", None, False),  # no Host: no own origin
    ("http://127.0.0.1:8080", "evil@127.0.0.1:8080", False),
    ("http://127.0.0.1:8080", "127.0.0.1:8080/x", False),
    ("http://evil@127.0.0.1:8080", "127.0.0.1:8080", False),
    ("http://127.0.0.1:8080/", "127.0.0.1:8080", False),
    ("null", "127.0.0.1:8080", False),
    ("null", None, False),
    ("file://", "127.0.0.1:8080", False),
    # only a web page's origin can be the bridge's own
    ("file://127.0.0.1:8080", "127.0.0.1:8080", False),
    ("ftp://127.0.0.1:8080", "127.0.0.1:8080", False),
    ("file:///home/u/chat.html", "127.0.0.1:8080", False),
    ("", "127.0.0.1:8080", False),
    ("https://evil.example", "127.0.0.1:8080", False),
])
def test_own_origin_is_the_host_header(origin: str | None, host: str | None,
                                       allowed: bool) -> None:
    """With the default (empty) allowlist, only non-browsers and pages of the bridge's own
    origin (the host and port the browser connected to, as ``Host`` names them) get in."""
    assert origin_allowed(origin, host, Allowlist()) is allowed


@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://app.example", True),
    ("https://app.example:443", True),
    ("HTTPS://APP.example", True),
    ("http://app.example", False),  # another scheme
    ("https://app.example:8443", False),  # another port
    ("https://www.app.example", False),  # an exact entry admits no subdomain
    ("https://a.example.org", True),
    ("https://a.b.example.org", True),
    ("https://A.Example.Org", True),
    ("https://example.org", False),  # the apex is not a subdomain
    ("https://evilexample.org", False),
    ("https://a.example.org.evil", False),
    ("https://example.org.a.example", False),
    ("http://a.example.org", False),
    ("https://a.example.org:8443", False),
    ("http://x.dev.test:8080", True),
    ("http://x.dev.test", False),
    ("null", False),
    ("file://", False),
    ("https://evil.example", False),
])
def test_allowlist_admits_exact_origins_and_subdomains(origin: str, allowed: bool) -> None:
    allowlist = parse_allowlist("https://app.example, https://*.example.org, "
                                "http://*.dev.test:8080")
    assert origin_allowed(origin, "bridge.internal:8080", allowlist) is allowed


def test_allowlist_keeps_the_own_origin() -> None:
    allowlist = parse_allowlist("https://app.example")
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", allowlist)
    assert not origin_allowed("http://127.0.0.1:8080", "127.0.0.1:9090", allowlist)


@pytest.mark.parametrize("origin", [
    "null", "file://", "https://evil.example", "http://localhost:1", "not an origin", ""])
def test_any_admits_every_origin_null_included(origin: str) -> None:
    assert origin_allowed(origin, "127.0.0.1:8080", parse_allowlist("*"))
    assert origin_allowed(origin, None, parse_allowlist("https://app.example,*"))
