"""What one notification heard on the LISTEN connection is: sorted once, into a typed note.

Pure: no I/O, no clock, no state. The listener (:mod:`daemon.listener`) calls :func:`classify`
on every notification and hands the note to whoever registered for its kind; everything that
decides on a note's text (prefixes, signatures, JSON) is here.

The LISTEN connection hears two secret channels (sql/triggers/10_change_capture.sql, "Secret
channels"), whose names and keys a :class:`Keys` holds:

* the **capture** channel, from the capture triggers: signed payloads (:mod:`daemon.signing`)
  that are a change of a room (:class:`Change`: an event, or a pointer to one too large for
  NOTIFY), a user hint or a membership hint (:class:`~daemon.events.UserHint`,
  :class:`~daemon.events.MemberHint`, sql/triggers/20_access.sql) or a
  presence hint (:class:`~daemon.events.PresenceHint`, sql/triggers/40_presence.sql); and two
  unsigned ones, recognised by their exact start without parsing (a flood of them costs a
  prefix comparison each): the daemons' own probe (:class:`ProbeEcho`) and the doorbell's hint
  (:class:`DoorbellHint`), which only make the daemon look;
* the **typing** channel, from the instances (:mod:`daemon.presence_feed`): signed with a key
  derived from the capture key (:meth:`daemon.signing.NotifyKey.derive`), so that a payload
  signed for one channel is never accepted on the other (:class:`Typing`).

A payload whose signature fails is :class:`Forged`; one signed but meaning nothing here is
:class:`Ignored` (or :class:`Unreadable` on the capture channel: its event, if any, is in the
log). While the listener sheds a flood (:class:`daemon.signing.RejectBudget`), a payload that
would need a signature check is :class:`Shed` unchecked.

Notes of a kind nobody registered for are dropped by the listener.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import Event, MemberHint, Pointer, PresenceHint, Probe, UserHint, parse_notify
from .protocol import is_id, load_json
from .signing import NotifyKey

__all__ = ["Change", "DoorbellHint", "Forged", "Ignored", "Keys", "MemberHint", "Note",
           "PresenceHint", "ProbeEcho", "Shed", "Typing", "Unreadable", "UserHint", "classify",
           "read_typing"]

PROBE_PREFIX = '{"probe"'  # the daemon's own probe, unsigned (daemon.listener)
DOORBELL_PREFIX = '{"doorbell"'  # pgbridge_doorbell's hint to read the lease, unsigned


@dataclass(frozen=True, slots=True)
class Keys:
    """What one LISTEN connection learnt from ``pgbridge_listen()``: the names of the capture
    and typing channels, and the schema's signing key (``change_notify_key.key``)."""

    # secret (only the roles that may LISTEN learn them): kept out of the repr, as the keys are
    channel: str = field(repr=False)
    typing_channel: str = field(repr=False)
    key: NotifyKey = field(repr=False)
    typing_key: NotifyKey = field(repr=False)

    @classmethod
    def of(cls, channel: str, typing_channel: str, key: NotifyKey) -> Keys:
        """The keys of both channels, the typing one derived from ``key``."""
        return cls(channel, typing_channel, key, key.derive("typing"))


@dataclass(frozen=True, slots=True)
class Change:
    """A signed change of a room: an event (with its frame) or a pointer to one in the log."""

    event: Event | Pointer


@dataclass(frozen=True, slots=True)
class Typing:
    """A signed typing signal: ``user`` types in ``room``; ``at`` in milliseconds since the
    epoch (sender's clock; whether it is still fresh is the receiver's call)."""

    room: str
    user: str
    at: int


@dataclass(frozen=True, slots=True)
class ProbeEcho:
    """A probe (``{"probe": token}``, unsigned): ``payload`` is its exact text, which the
    listener matches against the probes it sent; another instance's matches none."""

    payload: str


@dataclass(frozen=True, slots=True)
class DoorbellHint:
    """``{"doorbell": ...}`` (unsigned): read the doorbell's lease again; carries nothing."""


@dataclass(frozen=True, slots=True)
class Forged:
    """A payload of the ``kind`` channel (``"capture"`` or ``"typing"``) whose signature is
    missing or wrong: a role that can name the channel, or a key this daemon does not hold yet.
    ``size``: its length in characters (what the log may say of it)."""

    kind: str
    size: int


@dataclass(frozen=True, slots=True)
class Shed:
    """A payload dropped unchecked, because the listener is shedding a flood of forgeries."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A signed capture payload that means nothing here (too deeply nested, or of a shape this
    daemon does not know): whatever it announced is read from the log."""


@dataclass(frozen=True, slots=True)
class Ignored:
    """Nothing to act on: a signed payload that makes no sense (a hint of an unknown kind, a
    typing signal with a bad field, a signed probe), or a channel the connection does not
    LISTEN to."""

    why: str


Note = (Change | UserHint | MemberHint | PresenceHint | Typing | ProbeEcho | DoorbellHint | Forged
        | Shed | Unreadable | Ignored)


def classify(channel: str, payload: str, keys: Keys, *, shedding: bool = False) -> Note:
    """Sort one notification (``channel``, ``payload``: untrusted text) into a note.

    ``shedding``: the listener drops payloads unchecked (:class:`Shed`) instead of checking a
    signature; probes and doorbell hints, which carry none, are still recognised."""
    if channel == keys.typing_channel:
        return Shed() if shedding else read_typing(keys.typing_key, payload)
    if channel != keys.channel:
        return Ignored("channel")
    if payload.startswith(PROBE_PREFIX):
        return ProbeEcho(payload)
    if payload.startswith(DOORBELL_PREFIX):
        return DoorbellHint()
    if shedding:
        return Shed()
    text = keys.key.open(payload)
    if text is None:
        return Forged("capture", len(payload))
    note = parse_notify(text)
    if isinstance(note, Event | Pointer):
        return Change(note)
    if isinstance(note, UserHint | MemberHint | PresenceHint):
        return note
    if isinstance(note, Probe):
        return Ignored("signed probe")
    if text.startswith(('{"access"', '{"presence"')):  # a hint of a kind unknown here
        return Ignored("hint")
    return Unreadable()


def read_typing(key: NotifyKey, payload: str) -> Typing | Forged | Ignored:
    """A payload of the typing channel, checked with the typing ``key``: ``{"room": id, "user":
    id, "at": ms}`` signed (:meth:`daemon.presence_feed.PresenceFeed.typing_sent`)."""
    text = key.open(payload)
    if text is None:
        return Forged("typing", len(payload))
    try:
        obj = load_json(text, max_depth=1, max_brackets=1)
    except ValueError:
        return Ignored("typing")  # signed but unreadable: nothing to act on
    if not isinstance(obj, dict):
        return Ignored("typing")
    room, user, at = obj.get("room"), obj.get("user"), obj.get("at")
    if (is_id(room) and is_id(user) and isinstance(at, int) and not isinstance(at, bool)
            and 0 <= at < 2**53):  # a float holds it exactly
        return Typing(room, user, at)
    return Ignored("typing")
