"""What ``pgbridge tail`` prints of what the server sent on its status line: a hostile or broken
server cannot put control characters (a terminal escape sequence) on the user's terminal; the
summary line of a ``feed`` answer; the usage errors of ``--feed``."""

from __future__ import annotations

import pytest

from daemon.cli import _tail_command
from daemon.tail import _shown, feed_summary


def test_a_plain_id_is_shown_as_it_is() -> None:
    assert _shown("9f2c4e1a0b3d5c7e") == "9f2c4e1a0b3d5c7e"


def test_control_characters_are_escaped_not_printed() -> None:
    shown = _shown("\x1b]0;owned\x07\x1b[2J")
    assert "\x1b" not in shown and "\x07" not in shown
    assert shown == '"\\u001b]0;owned\\u0007\\u001b[2J"'


def test_absent_non_string_and_long_values() -> None:
    assert _shown(None) == "(none)"
    assert _shown({"a": 1}) == '{"a": 1}'
    assert len(_shown("x" * 10_000)) == 128


def test_the_feed_line_counts_rooms_and_unread() -> None:
    frame = {"type": "feed", "ref": "tail", "rooms": [
        {"room": "a", "head": 9, "acked": 2, "unread": 4},
        {"room": "b", "head": 0, "acked": 0, "unread": 0},
        {"room": "c", "head": 10**6, "acked": 0, "unread": 100}]}
    assert feed_summary(frame) == "pgbridge tail: feed of 3 rooms, 104 unread"
    assert feed_summary({"type": "feed", "rooms": "junk"}) == \
        "pgbridge tail: feed of 0 rooms, 0 unread"


@pytest.mark.parametrize("argv", [
    ["--feed", "ROOM", "--user", "u"],  # a feed follows every room
    ["--feed", "--since", "3", "--user", "u"],
    ["--feed", "--snapshot", "3", "--user", "u"],
    ["--user", "u"],  # neither a room nor --feed
])
def test_tail_feed_usage_errors_exit_2(argv: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _tail_command(argv, "pgbridge tail")
    assert exc.value.code == 2
    assert "pgbridge tail: error:" in capsys.readouterr().err
