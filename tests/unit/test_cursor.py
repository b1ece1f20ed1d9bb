"""Unit tests of :mod:`daemon.cursor`, the cursor arithmetic, no I/O:
:func:`~daemon.cursor.resolve_from` (where a subscription starts from ``since``, the acked seq,
the head and the retained log, and which cursors it refuses)."""

from __future__ import annotations

import pytest

from daemon.cursor import resolve_from
from daemon.protocol import ProtocolError


def test_resolve_from_rules() -> None:
    base = {"room": "R", "head": 10, "retained_from": 4}
    assert resolve_from(since=None, acked=None, **base) == 10  # type: ignore[arg-type]
    assert resolve_from(since=None, acked=7, **base) == 7  # type: ignore[arg-type]
    assert resolve_from(since=None, acked=10, **base) == 10  # type: ignore[arg-type]
    assert resolve_from(since=3, acked=99, **base) == 3  # type: ignore[arg-type]
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


@pytest.mark.parametrize("acked", [11, 99, 9 * 10**18])
def test_a_stored_cursor_past_the_head_is_not_resumed_from(acked: int) -> None:
    """Issue 25 (6): ``sync_state.last_seq = 9e18`` made a client resuming without ``since``
    start at the head (``min(acked, head)``) and miss everything after its real ack in silence.
    No bridge stores an ack past the head, so such a cursor is refused as ``cursor_expired``,
    which tells the client to resync."""
    with pytest.raises(ProtocolError) as refused:
        resolve_from(room="R", since=None, acked=acked, head=10, retained_from=4, ref="r")
    assert refused.value.code == "cursor_expired"
    assert f"{acked}" in str(refused.value) and "since=10" in str(refused.value)
