"""A second review of the broker mode (issue 29): what needs no server (the typing signals'
replay memory, daemon.presence_feed)."""

from __future__ import annotations

import time

from daemon.presence_feed import MAX_TYPING_SEEN
from tests.unit.test_typing_signals import feed_watching, signed


def test_a_replayed_typing_signal_is_dropped_however_many_others_were_heard_meanwhile() -> None:
    """On NATS anyone may record a typing signal and replay it within its 10 s of life; the
    presence feed remembers the signals heard to drop a repeat, at most ``MAX_TYPING_SEEN``.
    Once that many other (fresh, valid) signals were heard within the 10 s, the oldest is
    forgotten while still fresh, and its replay is shown to the watchers again."""
    feed, sink = feed_watching()
    now = round(time.time() * 1000)
    recorded = signed(room="r", user="typist", at=now)
    assert feed.typing_heard(recorded)
    assert len(sink.frames) == 1
    for n in range(MAX_TYPING_SEEN):  # other users typing in another room, all fresh
        assert feed.typing_heard(signed(room="elsewhere", user=f"u{n}", at=now))
    assert feed.typing_heard(recorded)  # the same signal, again, still fresh
    assert len(sink.frames) == 1, f"the replay was shown again: {sink.frames}"
