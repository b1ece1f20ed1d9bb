"""Cursor arithmetic: where a subscription starts (whether a seq is new, old or past a gap is
:mod:`daemon.sequencer`'s).

Pure. Seqs are per room, 1, 2, 3, ... with no holes (sql/triggers/10_change_capture.sql).
"""

from __future__ import annotations

from .protocol import ProtocolError

__all__ = ["resolve_from"]


def resolve_from(*, room: str, since: int | None, acked: int | None, head: int,
                 retained_from: int, ref: str | None = None) -> int:
    """The ``from`` of a subscription (PROTOCOL.md, "Ordering and delivery guarantees").

    ``since`` if given, else the user's acknowledged seq (``acked``, from ``sync_state``), else
    ``head``. ``retained_from`` is the lowest seq still in the log (``head + 1`` when the log of
    the room is empty). Raises :class:`ProtocolError`: ``bad_request`` for ``since > head``,
    ``cursor_expired`` when events after the cursor were already pruned, or when ``acked`` is
    past ``head``: no bridge wrote that (acks never pass what was delivered), so where the
    client really is is unknown, and resuming from the head would skip events in silence.
    """
    if since is not None:
        if since > head:
            raise ProtocolError("bad_request", f"since {since} is ahead of the room's head {head}",
                                ref=ref, room=room)
        start = since
    elif acked is not None:
        if acked > head:
            raise ProtocolError(
                "cursor_expired",
                f"the acknowledged seq {acked} stored for you is ahead of the room's head "
                f"{head}; resync and subscribe with since={head}", ref=ref, room=room)
        start = acked
    else:
        return head
    if start + 1 < retained_from:
        raise ProtocolError(
            "cursor_expired",
            f"events after {start} are no longer retained (oldest kept: {retained_from}); "
            f"resync and subscribe with since={head}", ref=ref, room=room)
    return start
