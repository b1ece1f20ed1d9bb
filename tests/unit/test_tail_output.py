"""What ``pgbridge tail`` prints of what the server sent on its status line: a hostile or broken
server cannot put control characters (a terminal escape sequence) on the user's terminal."""

from __future__ import annotations

from daemon.tail import _shown


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
