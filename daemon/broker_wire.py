"""What the bridges say to each other through the broker (docs/topics/broker.md): subjects,
signed messages, and the timings they keep.

Pure. Anyone who can reach the NATS servers can publish on any subject, so every message is
signed, as a NOTIFY of the capture triggers is (:mod:`daemon.signing`), with keys derived
from the schema's key (``change_notify_key.key``), which only the owner and the bridge role
can read: a forged message is dropped and counted (``pgbridge_broker_forged_total``). The
subjects are ``pgbridge.<digest>.*``, a digest of the key's fingerprint and the database's
identity, so installs that share NATS servers never mix, nor do copies of one database (which
hold the same key), and a rotated key moves its bridges to new subjects.

* ``<prefix>.room.<room id>``: the room's events, in seq order, each its frame signed with
  :attr:`BrokerKeys.events` (a :mod:`daemon.notes` capture payload, read by
  :func:`daemon.notes.classify`);
* ``<prefix>.signal``: user, membership and presence hints, signed likewise, and the leader's
  :func:`missed` (hints may have been lost), signed with :attr:`BrokerKeys.control`;
* ``<prefix>.typing``: typing signals, signed with the typing key as on the typing channel;
* ``<prefix>.leader``: the leader's heartbeat, :func:`heartbeat`, every
  :data:`HEARTBEAT_INTERVAL`;
* ``<prefix>.track.<epoch>``: requests of the rooms an instance holds (:func:`track_request`),
  which the leader of that epoch answers with their last seqs (:func:`track_reply`), naming
  the request's epoch and nonce.

A leader's epoch is a fencing token: a PostgreSQL transaction id taken after it won the
advisory lock, so a later leader's is always larger. A heartbeat counts up within its epoch,
so an instance takes only ever newer ``(epoch, beat)`` pairs: a replayed or stale heartbeat
is ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .notes import Keys
from .protocol import is_id, load_json
from .signing import NotifyKey

__all__ = ["CAPTURE", "HEARTBEAT_INTERVAL", "LEADER_TIMEOUT", "TRACK_CHUNK", "BrokerKeys",
           "Heartbeat", "Subjects", "TrackRequest", "heartbeat", "missed", "read_heartbeat",
           "read_missed", "read_track_reply", "read_track_request", "takes", "track_reply",
           "track_request"]

# Seconds between two heartbeats of the leader, and without one after which an instance reads
# the log itself (the fallback): an event waits at most about this long for a dead leader.
HEARTBEAT_INTERVAL = 0.25
LEADER_TIMEOUT = 1.0
STALE_EPOCH = 3 * LEADER_TIMEOUT  # seconds of silence after which an older epoch is taken
# Seconds a track request may take; rooms per request (a reply of 1,000 heads is ~40 KB, well
# under NATS's 1 MB payload limit).
TRACK_TIMEOUT = 2.0
TRACK_CHUNK = 1000
# Seconds between two requests of every room an instance holds (which keep them pinned on the
# leader), and after which the leader unpins a room nobody requested again.
INTEREST_REFRESH = 10.0
PIN_EXPIRY = 35.0
# Seconds between two reads of the log of every room a follower holds: the safety net for a
# relayed event that never arrived, when no later one of its room follows (NATS interest that
# reached a cluster's other servers late). One query per 500 rooms.
SWEEP_INTERVAL = 30.0

CAPTURE = "capture"  # the channel name the broker's capture payloads are classified under
TYPING = "typing"


@dataclass(frozen=True, slots=True)
class Subjects:
    """The subjects of one install (``prefix``: ``pgbridge.<key fingerprint>``)."""

    prefix: str

    @classmethod
    def of(cls, key: NotifyKey, database: str = "") -> Subjects:
        """The subjects of the install that ``key`` signs for, in ``database``
        (:meth:`daemon.store.Store.database_identity`): a copy of the database that holds the
        same key on the same cluster, or restored into another one, has subjects of its own."""
        place = hashlib.sha256(f"{key.fingerprint}\0{database}".encode()).hexdigest()[:16]
        return cls(f"pgbridge.{place}")

    def room(self, room: str) -> str:
        """The room's subject (a room id is 1 to 26 of ``A-Z a-z 0-9 _ -``: a valid token)."""
        return f"{self.prefix}.room.{room}"

    @property
    def signal(self) -> str:
        return f"{self.prefix}.signal"

    @property
    def typing(self) -> str:
        return f"{self.prefix}.typing"

    @property
    def leader(self) -> str:
        return f"{self.prefix}.leader"

    def track(self, epoch: int) -> str:
        return f"{self.prefix}.track.{epoch}"


@dataclass(frozen=True, slots=True)
class BrokerKeys:
    """The keys of the broker's messages, derived from the schema's ``key``."""

    events: NotifyKey  # room events and hints
    control: NotifyKey  # heartbeats and track requests and replies
    typing: NotifyKey  # typing signals, as on the typing channel
    notes: Keys  # for daemon.notes.classify, on the CAPTURE and TYPING "channels"

    @classmethod
    def of(cls, key: NotifyKey) -> BrokerKeys:
        events = key.derive("broker")
        return cls(events, key.derive("broker control"), key.derive("typing"),
                   Keys(CAPTURE, TYPING, events, key.derive("typing")))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    epoch: int
    beat: int
    leader: str


def takes(beat: Heartbeat, newest: tuple[int, int], silent: float) -> bool:
    """Whether an instance takes ``beat``, ``newest`` being the ``(epoch, beat)`` it took last,
    ``silent`` seconds ago: a newer one; or, once the newest epoch has been silent for
    :data:`STALE_EPOCH` seconds, one of another epoch (the database moved to another cluster,
    whose transaction ids are smaller). A replayed heartbeat is never newer."""
    return (beat.epoch, beat.beat) > newest or (
        beat.epoch != newest[0] and silent >= STALE_EPOCH)


def _dump(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _load(key: NotifyKey, data: bytes) -> dict[str, object] | None:
    try:
        text = key.open(data.decode())
        obj = None if text is None else load_json(text, max_depth=2, max_brackets=None)
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def heartbeat(key: NotifyKey, epoch: int, beat: int, leader: str) -> bytes:
    """The leader's heartbeat number ``beat`` of ``epoch`` (``leader``: its name, for logs)."""
    return key.sign(_dump({"epoch": epoch, "beat": beat, "leader": leader[:100]})).encode()


def read_heartbeat(key: NotifyKey, data: bytes) -> Heartbeat | None:
    """A heartbeat, or ``None`` when ``data`` is not one signed with ``key``."""
    obj = _load(key, data)
    if obj is None:
        return None
    epoch, beat, leader = _count(obj.get("epoch")), _count(obj.get("beat")), obj.get("leader")
    if epoch is None or beat is None or not isinstance(leader, str):
        return None
    return Heartbeat(epoch, beat, leader)


def missed(key: NotifyKey, epoch: int, count: int) -> bytes:
    """The leader of ``epoch`` tells its followers, for the ``count``-th time, that hints may
    have been lost (its LISTEN reconnected, or shed a flood): check every user, read every
    room's log."""
    return key.sign(_dump({"missed": epoch, "count": count})).encode()


def read_missed(key: NotifyKey, data: bytes) -> tuple[int, int] | None:
    """``(epoch, count)`` of a :func:`missed` signal, ``None`` when ``data`` is not one."""
    obj = _load(key, data)
    if obj is None:
        return None
    epoch, count = _count(obj.get("missed")), _count(obj.get("count"))
    return None if epoch is None or count is None else (epoch, count)


@dataclass(frozen=True, slots=True)
class TrackRequest:
    rooms: list[str]
    nonce: str


def track_request(key: NotifyKey, epoch: int, rooms: list[str], nonce: str) -> bytes:
    """Ask the leader of ``epoch`` to publish ``rooms`` (at most :data:`TRACK_CHUNK`);
    ``nonce``: random, repeated in the reply, so that no recorded reply answers another
    request."""
    return key.sign(_dump({"epoch": epoch, "rooms": rooms, "nonce": nonce})).encode()


def read_track_request(key: NotifyKey, epoch: int, data: bytes) -> TrackRequest | None:
    """A request to the leader of ``epoch``; ``None`` when ``data`` is not a valid one
    (forged, another epoch's, too many rooms, a room that is not an id, no nonce)."""
    obj = _load(key, data)
    if obj is None or obj.get("epoch") != epoch:
        return None
    rooms, nonce = obj.get("rooms"), obj.get("nonce")
    if (not isinstance(rooms, list) or len(rooms) > TRACK_CHUNK
            or not all(is_id(room) for room in rooms) or not is_id(nonce)):
        return None
    return TrackRequest(list(dict.fromkeys(rooms)), nonce)


def track_reply(key: NotifyKey, epoch: int, nonce: str, heads: dict[str, int]) -> bytes:
    """The answer of the leader of ``epoch`` to the request ``nonce``: each room's last seq,
    after which it publishes every event."""
    return key.sign(_dump({"epoch": epoch, "nonce": nonce, "heads": heads})).encode()


def read_track_reply(key: NotifyKey, data: bytes, epoch: int, nonce: str,
                     rooms: list[str]) -> dict[str, int] | None:
    """The heads of the ``rooms`` asked for in the request ``nonce`` to the leader of
    ``epoch``; ``None`` when ``data`` is not that request's valid reply."""
    obj = _load(key, data)
    if obj is None or obj.get("epoch") != epoch or obj.get("nonce") != nonce:
        return None
    heads = obj.get("heads")
    if not isinstance(heads, dict):
        return None
    found = {room: _count(heads.get(room)) for room in rooms}
    return None if any(head is None for head in found.values()) else {
        room: head for room, head in found.items() if head is not None}
