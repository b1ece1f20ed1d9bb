"""daemon.presence_feed's reading of typing signals (PresenceFeed.typing_heard): no database is
asked; the hub and a subscription double stand for the watchers."""

from __future__ import annotations

import json
import time
from typing import Any, cast

from daemon.hub import Hub, Subscription
from daemon.metrics import Metrics
from daemon.presence_feed import PresenceFeed
from daemon.signing import NotifyKey
from tests.support.doubles import RecordingSink

KEY = NotifyKey(bytes(range(32)))


def feed_watching(user: str = "watcher") -> tuple[PresenceFeed, RecordingSink]:
    hub, sink = Hub(), RecordingSink(user)
    hub.track("r", 0)
    sub = Subscription(sink, "r", pending_limit=10, presence=True)
    hub.add(sub)
    hub.watch(sub)
    sub.presence_live()
    feed = PresenceFeed(cast(Any, None), hub, Metrics())  # typing_heard asks no store
    feed.configure("pgbridge.typing", KEY)
    return feed, sink


def signed(**fields: object) -> str:
    return KEY.derive("typing").sign(json.dumps(fields))


def test_a_fresh_signal_reaches_the_watchers_but_the_typist() -> None:
    feed, sink = feed_watching()
    now = round(time.time() * 1000)
    assert feed.typing_heard(signed(room="r", user="typist", at=now))
    assert feed.typing_heard(signed(room="r", user="watcher", at=now))  # its own: not sent
    assert sink.frames == ['{"type":"typing","room":"r","user":"typist"}']


def test_signed_signals_that_make_no_sense_are_dropped_without_raising() -> None:
    feed, sink = feed_watching()
    now = round(time.time() * 1000)
    for fields in ({"room": "r", "user": "typist", "at": 10**400},  # no float holds it
                   {"room": "r", "user": "typist", "at": -1},
                   {"room": "r", "user": "typist", "at": True},
                   {"room": "r", "user": "typist", "at": now / 1},
                   {"room": "r\u0000", "user": "typist", "at": now},
                   {"room": "r", "user": "\ud800", "at": now}):
        assert feed.typing_heard(signed(**fields)), fields
    assert not feed.typing_heard(KEY.sign(json.dumps({"room": "r", "user": "t", "at": now})))
    assert sink.frames == []
