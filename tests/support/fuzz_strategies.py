"""Hypothesis strategies for ``tests/integration/test_fuzz.py``, each value with what
docs/PROTOCOL.md says the daemon must answer to it (the oracle). Pure: no sockets, no database.

* :func:`frames` draws one client WebSocket message (:class:`Frame`): protocol frames with
  missing, ill-typed or hostile fields, random JSON, numbers as raw text (5,000 digits, 2^64,
  ``NaN``), nesting up to 3,000 levels (built as text: ``json.dumps`` would recurse), invalid
  JSON, text that is not UTF-8, binary frames, frames around and over 64 KiB, fragmented
  messages and WebSocket pings. :func:`expected_answer` says what the server must do with it
  where the contract decides (close 1007/1009, which ``error``, ``pong``), ``None`` elsewhere.
* :func:`http_requests` draws one raw HTTP request (:class:`RawRequest`) for the port of the
  bridge, with the set of statuses the contract allows for it ("HTTP answers before the
  upgrade").
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

T = TypeVar("T")

MAX_FRAME_BYTES = 64 * 1024  # PROTOCOL.md, "What each field may be"
MAX_REF = 128
MAX_TOKEN = 4096
MAX_DEPTH = 32
MAX_BRACKETS = 256  # "[" and "{" characters in one frame, strings included
MAX_LINE = 8192  # request line and header lines, bytes
MAX_HEADERS = 128
KNOWN_TYPES = ("subscribe", "unsubscribe", "ack", "ping", "refresh")
FIELDS = ("room", "since", "seq", "token")  # of some types; every type has ``ref``
FIELDS_OF = {"subscribe": ("room", "since"), "unsubscribe": ("room",), "ack": ("room", "seq"),
             "refresh": ("token",)}
ERROR_CODES = frozenset({"bad_request", "unknown_type", "unauthorized", "forbidden",
                         "not_found", "cursor_expired", "rate_limited"})
CLIENT_ERRORS = frozenset(range(400, 500))

_ID = re.compile(r"[0-9A-Za-z_-]{1,26}")
_HTTP_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

HOSTILE_CHARS = (
    "\x00", "\x01", "\x1b", "\x7f", "\t", "\n", "\r", "\x85", "\xa0", "\u2028", "\u200b",
    "\u202e", "\ufeff", "\ufffd", "\uffff", "\U0010ffff", "\ud800", "\udbff", "\udc00", "\udcff",
    "\udfff", "\U0001f600", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "e\u0301", "\u03a9",
    "\uff10", "\u041e", " ", '"', "\\", "/", "%", "'", "{", "[", "-", "_",
)


def _rarely(draw: st.DrawFn, one_in: int) -> bool:
    """True once in ``one_in`` draws; shrinks to False (a minimal example leaves it out)."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


def _mostly(draw: st.DrawFn, usual: T, one_in: int, other: SearchStrategy[T]) -> T:
    """``usual``, except once in ``one_in`` draws something from ``other``."""
    return draw(other) if _rarely(draw, one_in) else usual


# --- strings and JSON values ------------------------------------------------------------------

_safe_chars = st.one_of(st.characters(), st.sampled_from(
    [c for c in HOSTILE_CHARS if not any(0xD800 <= ord(x) <= 0xDFFF for x in c)]))
_chars = st.one_of(_safe_chars, st.characters(categories=["Cs"]), st.sampled_from(HOSTILE_CHARS))


def _strings(*, min_size: int = 0, max_size: int) -> SearchStrategy[str]:
    """Text of single characters or ZWJ sequences; one string in three may hold lone
    surrogates (they cannot be sent as UTF-8 unless escaped)."""
    return st.one_of(
        st.lists(_safe_chars, min_size=min_size, max_size=max_size),
        st.lists(_safe_chars, min_size=min_size, max_size=max_size),
        st.lists(_chars, min_size=min_size, max_size=max_size),
    ).map("".join)


@st.composite
def almost_ulids(draw: st.DrawFn, bases: tuple[str, ...]) -> str:
    """A real id (or a ULID-looking string) mutated by one character: too short or too long,
    lower-cased, a character replaced or inserted (``I``, ``O``, NUL, a surrogate, a homoglyph),
    padded with spaces, or doubled."""
    base = draw(st.sampled_from(bases) | st.text(_CROCKFORD, min_size=26, max_size=26))
    i = draw(st.integers(0, len(base) - 1))
    c = draw(st.sampled_from(HOSTILE_CHARS) | st.sampled_from("IiLlOoUu!.~-_ 0Z"))
    mutate = {
        "cut": lambda: base[:-1],
        "extend": lambda: base + c,
        "lower": lambda: base.lower(),
        "replace": lambda: base[:i] + c + base[i + 1:],
        "insert": lambda: base[:i] + c + base[i:],
        "pad": lambda: f" {base}\n",
        "twice": lambda: base + base,
    }
    return draw(st.sampled_from(sorted(mutate)).map(lambda name: mutate[name]()))


def repeated(unit: SearchStrategy[str], least: int, most: int) -> SearchStrategy[str]:
    """``unit`` repeated ``least`` to ``most`` times: long strings without drawing each
    character (and without ``st.builds``, whose report would quote them whole)."""
    return st.tuples(unit, st.integers(least, most)).map(lambda t: t[0] * t[1])


@functools.cache
def hostile_text(bases: tuple[str, ...]) -> SearchStrategy[str]:
    """Strings for any string field: lone surrogates, NUL and control characters, emoji,
    almost-ids, up to 40,000 characters."""
    return st.one_of(
        _strings(max_size=40),
        st.text(max_size=20),
        almost_ulids(bases),
        repeated(_strings(min_size=1, max_size=3), 100, 20_000),
        st.sampled_from(["", " ", "null", "0", "-1", "ping", "\x00\x00", "\ud800", "\udcff",
                         "A" * 27, "A" * 26, "%FF", "' OR 1=1 --", "${jndi:x}"]),
    )


@dataclass(frozen=True)
class Raw:
    """JSON text inserted as is (numbers Python cannot produce, ``NaN``, deep nesting)."""

    text: str


RAW_NUMBERS = (
    "0", "-0", "1", "-1", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
    "18446744073709551616", "1e3", "1E400", "-1e400", "0.5", "1.0", "2.5e-3", "NaN", "Infinity",
    "-Infinity", "true", "false", "null", '"1"', "[1]", "{}", "01", "0x10", "+1", ".5", "1.",
    "1_000",
)


def raw_numbers() -> SearchStrategy[Raw]:
    return st.one_of(
        st.sampled_from(RAW_NUMBERS),
        st.integers(4000, 6000).map(lambda n: "9" * n),  # over Python's 4,300-digit limit
        st.integers(2**63 - 3, 2**64 + 3).map(str),
        st.integers(-(2**70), 2**70).map(str),
        st.floats().map(repr).map(lambda r: {"nan": "NaN", "inf": "Infinity",
                                             "-inf": "-Infinity"}.get(r, r)),
    ).map(Raw)


@functools.cache
def json_values(bases: tuple[str, ...]) -> SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                        hostile_text(bases), raw_numbers())
    return st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=4)
        | st.dictionaries(_strings(max_size=8), kids, max_size=4),
        max_leaves=12,
    )


def dump(value: Any, *, ascii_only: bool, separators: tuple[str, str]) -> str:
    """JSON text of ``value``; :class:`Raw` inside goes in verbatim; a ``tuple`` of pairs is an
    object that may repeat keys."""
    item, key = separators

    def go(v: Any) -> str:
        if isinstance(v, Raw):
            return v.text
        if isinstance(v, tuple):
            return "{" + item.join(f"{go(str(k))}{key}{go(x)}" for k, x in v) + "}"
        if isinstance(v, dict):
            return go(tuple(v.items()))
        if isinstance(v, list):
            return "[" + item.join(go(x) for x in v) + "]"
        return json.dumps(v, ensure_ascii=ascii_only)

    return go(value)


# --- client frames ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """One client message: a ``text`` frame (``data`` deliberately may be invalid UTF-8), a
    ``binary`` frame, or a WebSocket ``ping`` control frame; ``cuts`` sends a text or binary
    message as fragments split at these byte offsets."""

    opcode: Literal["text", "binary", "ping"]
    data: bytes
    cuts: tuple[int, ...] = ()

    def chunks(self) -> list[bytes]:
        edges = [0, *self.cuts, len(self.data)]
        return [self.data[a:b] for a, b in itertools.pairwise(edges)]

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 300 else (
            self.data[:200] + b"..." + self.data[-60:])
        cut = f", fragments at {list(self.cuts)}" if self.cuts else ""
        return f"Frame({self.opcode}, {len(self.data)} bytes{cut}: {shown!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' report
        printer.text(repr(self))


@dataclass(frozen=True)
class FrameContext:
    """Ids and tokens of the fuzzing world: ``rooms`` (the fuzzer's own room, a room it is not
    a member of, a deleted one, an unknown ULID), ``token`` (valid, of the fuzzing user) and
    ``refused_tokens`` (expired, another user's, badly signed...)."""

    rooms: tuple[str, ...]
    token: str
    refused_tokens: tuple[str, ...]


def _text(data: str) -> Frame:
    return Frame("text", data.encode("utf-8", "surrogatepass"))


@st.composite
def protocol_objects(draw: st.DrawFn, ctx: FrameContext) -> tuple[tuple[str, Any], ...]:
    """A frame of a known type (mostly) whose fields are all good, or one of them hostile, or
    all of them anything; sometimes with fields of other types, unknown fields, repeated keys.
    A tuple of pairs (see :func:`dump`)."""
    bases = ctx.rooms
    weird = st.one_of(st.sampled_from(["PING", "Subscribe", "ping ", " ping", "pong", "welcome",
                                       "event", "error", "subscribe\x00"]),
                      hostile_text(bases), json_values(bases))
    kind = draw(weird if _rarely(draw, 5) else st.sampled_from(KNOWN_TYPES))
    good: dict[str, SearchStrategy[Any]] = {
        "ref": st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
                       max_size=MAX_REF),
        "room": st.sampled_from(ctx.rooms),
        "since": st.integers(0, 4) | st.integers(0, 2**63 - 1),
        "seq": st.integers(0, 4) | st.integers(0, 2**63 - 1),
        "token": st.sampled_from((ctx.token, *ctx.refused_tokens)),
    }
    anything = st.one_of(hostile_text(bases), json_values(bases), raw_numbers())
    own = ("ref", *(FIELDS_OF.get(kind, ()) if isinstance(kind, str) else ()))
    names = [name for name in good if draw(st.integers(0, 9)) >= (2 if name in own else 9)]
    mode = draw(st.sampled_from(["good", "good", "one bad", "one bad", "chaos"]))
    bad = draw(st.sampled_from(names)) if names and mode == "one bad" else None
    pairs: list[tuple[str, Any]] = []
    if not _rarely(draw, 10):
        pairs.append(("type", kind))
    for name in names:
        hostile = name == bad or (mode == "chaos" and draw(st.booleans()))
        pairs.append((name, draw(anything if hostile else good[name])))
    if _rarely(draw, 4):
        extra = st.tuples(st.sampled_from(["type", "room", "ref", "x", "data", ""])
                          | _strings(max_size=6), json_values(bases))
        pairs.extend(draw(st.lists(extra, min_size=1, max_size=2)))
    return tuple(draw(st.permutations(pairs)))


_separators = st.sampled_from([(",", ":"), (", ", ": "), (" ,\n\t", " :\r\n ")])
_ascii_only = st.sampled_from([True, True, True, False])  # False: surrogates break UTF-8


def protocol_frames(ctx: FrameContext) -> SearchStrategy[Frame]:
    return st.tuples(protocol_objects(ctx), _ascii_only, _separators).map(
        lambda t: _text(dump(t[0], ascii_only=t[1], separators=t[2])))


@st.composite
def session_frames(draw: st.DrawFn, ctx: FrameContext) -> Frame:
    """A well-formed frame about the fuzzing user's own room (or a deleted or foreign one), so
    that a few in a row subscribe, replay, acknowledge and unsubscribe for real."""
    room = draw(st.sampled_from(ctx.rooms[:1] * 3 + ctx.rooms[1:3]))
    ref = draw(st.none() | st.sampled_from(["a", "b", "s-1"]))
    kind = draw(st.sampled_from(["subscribe", "subscribe", "ack", "ack", "unsubscribe",
                                 "refresh", "ping"]))
    obj: dict[str, Any] = {"type": kind, "room": room, "ref": ref}
    if kind == "subscribe":
        obj["since"] = draw(st.none() | st.integers(0, 4))
    elif kind == "ack":
        obj["seq"] = draw(st.integers(0, 5))
    elif kind == "refresh":
        obj = {"type": kind, "token": ctx.token, "ref": ref}
    elif kind == "ping":
        del obj["room"]
    return _text(json.dumps({k: v for k, v in obj.items() if v is not None}))


@st.composite
def numeric_frames(draw: st.DrawFn, ctx: FrameContext) -> Frame:
    """``since``/``seq`` as raw number text: 5,000 digits, 2^63, floats, NaN, booleans."""
    number = draw(raw_numbers()).text
    room = json.dumps(draw(st.sampled_from(ctx.rooms)))
    template = draw(st.sampled_from([
        '{"type":"ack","room":%s,"seq":%s,"ref":"n"}',
        '{"type":"subscribe","room":%s,"since":%s,"ref":"n"}',
    ]))
    return _text(template % (room, number))


@st.composite
def deep_frames(draw: st.DrawFn) -> Frame:
    """Nesting 28..3,000 levels deep, as text."""
    n = draw(st.integers(28, 36) | st.integers(37, 3000))
    shape = draw(st.sampled_from(["array", "object", "mixed", "field", "unclosed"]))
    if shape == "array":
        text = "[" * n + "]" * n
    elif shape == "object":
        text = '{"a":' * n + "1" + "}" * n
    elif shape == "mixed":
        text = '[{"type":"ping","a":' * (n // 2) + "0" + "}]" * (n // 2)
    elif shape == "field":
        text = '{"type":"ping","ref":"deep","x":' + "[" * (n - 1) + "]" * (n - 1) + "}"
    else:
        text = '{"type":"ping","x":' + "[" * n
    return _text(text)


@st.composite
def broken_json_frames(draw: st.DrawFn, ctx: FrameContext) -> Frame:
    """Text that is not JSON, or a valid frame damaged: cut, a character inserted, garbage
    after it, a BOM, single quotes, a comment."""
    valid = dump(draw(protocol_objects(ctx)), ascii_only=True, separators=(",", ":"))
    i = draw(st.integers(0, len(valid)))
    c = draw(_chars)
    text = draw(st.sampled_from([
        valid[:i], valid[:i] + c + valid[i:], valid + draw(_strings(min_size=1,
                                                                   max_size=5)),
        "\ufeff" + valid, valid.replace('"', "'"), valid[:-1] + ",}", "//x\n" + valid, "", " ",
        "{", "}", "nul", "tru", '{"type":"ping",}', '{"type" "ping"}', '{"type":ping}',
    ]) | _strings(max_size=60))
    return _text(text)


@st.composite
def non_utf8_frames(draw: st.DrawFn, ctx: FrameContext) -> Frame:
    """A text frame whose bytes are not UTF-8 (invalid byte, overlong form, encoded surrogate,
    code point over U+10FFFF, cut sequence)."""
    valid = dump(draw(protocol_objects(ctx)), ascii_only=True, separators=(",", ":")).encode()
    bad = draw(st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc0\x80", b"\xc1\xbf",
                                b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
                                b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]))
    i = draw(st.integers(0, len(valid)))
    return Frame("text", valid[:i] + bad + valid[i:])


@st.composite
def sized_frames(draw: st.DrawFn) -> Frame:
    """A ping padded to a size around 64 KiB, or far over it (up to 300 KB)."""
    size = draw(st.integers(MAX_FRAME_BYTES - 3, MAX_FRAME_BYTES + 3)
                | st.integers(MAX_FRAME_BYTES + 4, 300_000))
    fill = draw(st.sampled_from(["a", "\u00e9", "\U0001f600"]))
    opcode: Literal["text", "binary"] = draw(st.sampled_from(["text", "text", "binary"]))
    head, tail = b'{"type":"ping","ref":"big","pad":"', b'"}'
    room = size - len(head) - len(tail)
    width = len(fill.encode())
    body = (fill * (room // width)).encode() + b"b" * (room % width)
    return Frame(opcode, head + body + tail)


def binary_frames(ctx: FrameContext) -> SearchStrategy[Frame]:
    return st.one_of(
        st.binary(max_size=300),
        protocol_frames(ctx).map(lambda f: f.data),
    ).map(lambda data: Frame("binary", data))


@st.composite
def fragmented(draw: st.DrawFn, inner: SearchStrategy[Frame]) -> Frame:
    frame = draw(inner.filter(lambda f: f.opcode != "ping" and len(f.data) > 1))
    cuts = draw(st.lists(st.integers(1, len(frame.data) - 1), min_size=1, max_size=4,
                         unique=True))
    return Frame(frame.opcode, frame.data, tuple(sorted(cuts)))


def frames(ctx: FrameContext) -> SearchStrategy[Frame]:
    """Any client message (see the module docstring)."""
    simple = st.one_of(
        protocol_frames(ctx), protocol_frames(ctx), protocol_frames(ctx), protocol_frames(ctx),
        session_frames(ctx), session_frames(ctx), numeric_frames(ctx),
        deep_frames(), broken_json_frames(ctx), non_utf8_frames(ctx),
        st.tuples(json_values(ctx.rooms), _ascii_only).map(
            lambda t: _text(dump(t[0], ascii_only=t[1], separators=(",", ":")))),
        binary_frames(ctx), sized_frames(),
        st.binary(max_size=125).map(lambda data: Frame("ping", data)),
    )
    return simple | fragmented(simple)


# --- the oracle for frames --------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """A frame the server must send in answer: ``type``; for an ``error`` the admitted
    ``codes`` (``None``: any documented code); ``ref`` the exact ``ref`` it must carry
    (``None``: no ``ref`` at all)."""

    type: str
    codes: frozenset[str] | None = None
    ref: str | None = None


@dataclass(frozen=True)
class Answer:
    """What the contract says about one frame: ``close`` the close code the server must use,
    else ``replies`` the exact frames other than ``event`` before the next ``pong`` (``None``
    when the contract leaves it open, for example when it depends on subscription state)."""

    close: int | None = None
    replies: tuple[Reply, ...] | None = None


def json_depth(text: str) -> int:
    """Deepest bracket nesting of ``text`` outside JSON strings (no parsing, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def ref_verdict(value: object) -> Literal["valid", "invalid", "unclear"]:
    """``ref`` per PROTOCOL.md: 1 to 128 printable characters. ``unclear`` for characters whose
    printability is a matter of definition (format characters, non-ASCII spaces)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_REF:
        return "invalid"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        return "invalid"
    return "valid" if value.isprintable() else "unclear"


def is_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_count(value: object) -> bool:
    """``since``/``seq``: an integer from 0 to 2^63-1, not a float, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**63 - 1


class _NotJSON(Exception):
    """``NaN``/``Infinity``: Python's reader takes them, JSON has no such literal."""


def _no_constant(name: str) -> Any:
    raise _NotJSON(name)


BAD = (Reply("error", frozenset({"bad_request"})),)
_JWT = re.compile(rf"[0-9A-Za-z_.=-]{{1,{MAX_TOKEN}}}")


def _well_shaped(name: str, value: object) -> bool:
    if name == "room":
        return is_id(value)
    if name == "token":
        return isinstance(value, str) and _JWT.fullmatch(value) is not None
    return is_count(value)


def expected_answer(frame: Frame, ctx: FrameContext) -> Answer:
    """What PROTOCOL.md requires for ``frame``, sent on a fresh connection of the user whose
    valid token is ``ctx.token``."""
    if frame.opcode == "ping":
        return Answer(replies=())
    if len(frame.data) > MAX_FRAME_BYTES:
        return Answer(close=1009)
    if frame.opcode == "binary":
        return Answer(replies=BAD)
    try:
        text = frame.data.decode("utf-8")
    except UnicodeDecodeError:
        return Answer(close=1007)
    return Answer(replies=_replies_to(text, ctx))


def _replies_to(text: str, ctx: FrameContext) -> tuple[Reply, ...] | None:
    if re.search(r"\d{4000}", text):
        return None  # a number Python will not convert: refused or ignored, both defensible
    if text.count("[") + text.count("{") > MAX_BRACKETS:
        return BAD
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        return BAD
    except _NotJSON:
        return None
    except ValueError:
        return BAD
    depth = json_depth(text)
    if depth > MAX_DEPTH + 1 or not isinstance(obj, dict):
        return BAD
    if depth > MAX_DEPTH:
        return None  # 33 levels: whether the outer object counts as a level is not said
    if "ref" in obj and obj["ref"] is None:
        return None
    ref = obj.get("ref")
    verdict = "valid" if ref is None else ref_verdict(ref)
    if verdict == "unclear":
        return None
    if verdict == "invalid":
        codes = ERROR_CODES if obj.get("type") != "ping" else frozenset({"bad_request"})
        return (Reply("error", codes),)
    kind = obj.get("type")
    # a protocol field sent with a type that has no such field should be ignored as unknown,
    # but a server that checks every known name first is defensible: then it may refuse
    foreign = {name for name in FIELDS if name not in FIELDS_OF.get(str(kind), ())
               and obj.get(name) is not None and not _well_shaped(name, obj[name])}

    def refuse(*codes: str) -> tuple[Reply, ...]:
        if foreign:
            codes = (*codes, "bad_request", "unauthorized")
        return (Reply("error", frozenset(codes), ref),)

    if not isinstance(kind, str):
        return refuse("bad_request")
    if kind == "ping":
        return None if foreign else (Reply("pong", ref=ref),)
    if kind not in KNOWN_TYPES:
        return refuse("unknown_type")
    if kind == "refresh":
        token = obj.get("token")
        if not isinstance(token, str):
            return refuse("bad_request", "unauthorized")
        if token == ctx.token:
            return None if foreign else ()
        return refuse("unauthorized")
    if not is_id(obj.get("room")):
        return refuse("bad_request")
    if kind == "ack" and not is_count(obj.get("seq")):
        return refuse("bad_request")
    if kind == "subscribe" and obj.get("since") is not None and not is_count(obj["since"]):
        return refuse("bad_request")
    return None  # depends on membership and subscription state


# --- raw HTTP requests ------------------------------------------------------------------------

@dataclass(frozen=True)
class RawRequest:
    """Bytes of one HTTP request, the statuses the contract allows for it, and why."""

    data: bytes
    allowed: frozenset[int]
    why: str

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 600 else (
            self.data[:400] + b"..." + self.data[-150:])
        return f"RawRequest({len(self.data)} bytes, allowed {self.statuses}, {self.why}: {shown!r})"

    @property
    def statuses(self) -> str:
        """``allowed`` for people: ``4xx`` stands for every status from 400 to 499."""
        rest = sorted(self.allowed - CLIENT_ERRORS if CLIENT_ERRORS <= self.allowed
                      else self.allowed)
        return "+".join([*(["4xx"] if CLIENT_ERRORS <= self.allowed else []), *map(str, rest)])

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' report
        printer.text(repr(self))


@dataclass(frozen=True)
class HandshakeContext:
    """``port`` of the bridge; ``valid`` tokens (a live user) and ``refused`` ones (expired,
    wrong secret, unknown or deleted user, malformed ``sub``, no ``exp``)."""

    port: int
    valid: tuple[str, ...]
    refused: tuple[str, ...]


# defects with the one status the contract gives them when alone
_STATUS = {"method": 405, "target_ctl": 400, "long_target": 414, "long_header": 431,
           "many_headers": 431, "target_bytes": 400, "query_not_utf8": 400, "bad_header": 400,
           "bad_line": 400}
# oddities the contract does not rule on: the clean answer or any 4xx
_ODD = {"old_version", "obs_text", "obs_fold", "no_host", "body", "lf_only", "odd_path",
        "ws_extras", "near_limit", "repeated", "query_not_utf8"}


_HANDSHAKE_HEADERS = (b"Authorization", b"Upgrade", b"Connection", b"Sec-WebSocket-Key",
                      b"Sec-WebSocket-Version", b"Host")


def _percent(value: bytes) -> bytes:
    return unquote_to_bytes(value.replace(b"+", b" "))


@st.composite
def _token_value(draw: st.DrawFn, ctx: HandshakeContext) -> bytes:
    value: bytes = draw(st.one_of(
        st.sampled_from(ctx.valid).map(str.encode),
        st.sampled_from(ctx.valid).map(str.encode),
        st.sampled_from(ctx.refused).map(str.encode),
        st.sampled_from(ctx.valid).map(lambda t: t[:-2].encode()),
        st.binary(min_size=1, max_size=60),
        st.lists(st.sampled_from([b"%FF", b"%00", b"%zz", b"%", b"%C3%A9", b"%ED%A0%80",
                                  b"%E2%82", b"%2F", b"+", b"%20", b"%0D%0A", b"abc", b"."]),
                 min_size=1, max_size=6).map(b"".join),
        st.sampled_from([b"a" * (MAX_TOKEN + 1), b"a.b.c", b"=", b"-", b"null"]),
    ))
    return value


@st.composite
def http_requests(draw: st.DrawFn, ctx: HandshakeContext) -> RawRequest:
    """A request to the bridge built from parts, each part possibly damaged; ``allowed`` is
    what the contract admits (see ``_STATUS`` and ``_ODD``)."""
    defects: set[str] = set()
    odd: set[str] = set()

    method = _mostly(draw, b"GET", 4, st.sampled_from(
        [b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
         b"get", b"Get", b"PRI"]) | st.binary(max_size=8))
    if method != b"GET":
        defects.add("method" if _HTTP_TOKEN.fullmatch(method) else "bad_line")

    path = _mostly(draw, b"/ws", 3, st.sampled_from(
        [b"/healthz", b"/metrics", b"/", b"/nope", b"/ws/", b"/WS", b"//ws", b"/healthz/x",
         b"/ws/../ws", b"*", b"http://127.0.0.1/ws", b"/ws#x"]))
    route = {b"/ws": "ws", b"/healthz": "health", b"/metrics": "health"}.get(
        path, "odd" if path in (b"/ws/../ws", b"*", b"http://127.0.0.1/ws", b"/ws#x")
        else "missing")

    where = draw(st.sampled_from(["query", "query", "bearer", "none", "both"]))
    query_token = draw(_token_value(ctx)) if where in ("query", "both") else None
    auth = None
    if where in ("bearer", "both"):
        scheme = draw(st.sampled_from([b"Bearer"] * 4 + [b"bearer", b"BEARER", b"Basic",
                                                          b"Token", b"Bearer "]))
        auth = (scheme, draw(_token_value(ctx)))

    # the token the server sees, as far as the contract decides it
    states: set[str] = set()
    target = path
    if query_token is not None:
        target += b"?token=" + query_token
        if any(b > 0x7F or b in b" \n" for b in query_token):
            defects.add("target_bytes")  # not ASCII, or the request line falls apart
        elif any(b < 0x20 or b == 0x7F for b in query_token):
            defects.add("target_ctl")
        else:
            query = query_token.split(b"#")[0]
            try:
                _percent(query).decode()
            except UnicodeDecodeError:  # the probes and a 404 need not read the query
                (defects if route == "ws" else odd).add("query_not_utf8")
            value = _percent(query.split(b"&")[0]).decode(errors="replace")
            states.add("valid" if value in ctx.valid else "missing" if not value else "bad")
    if auth is not None:
        scheme, value_bytes = auth
        if any(b in (0x0A, 0x0D) for b in value_bytes):
            value_bytes = value_bytes.replace(b"\r", b"").replace(b"\n", b"")
            auth = (scheme, value_bytes)
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value_bytes):
            defects.add("bad_header")
        elif any(b > 0x7F for b in value_bytes):
            odd.add("obs_text")
        token = value_bytes.decode("latin-1").strip()
        if scheme.strip().lower() != b"bearer" or not token:
            states.add("missing")
        elif token in ctx.valid and scheme == b"Bearer":
            states.add("valid")
        elif token in ctx.valid:
            states.add("either")
        else:
            states.add("bad")
    if not states:
        states.add("missing")
    if _rarely(draw, 6) and b"#" not in target:
        target += b"&x=%FF" if b"?" in target else b"?x=%FF"
        (defects if route == "ws" else odd).add("query_not_utf8")

    version = _mostly(draw, b"HTTP/1.1", 8, st.sampled_from(
        [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTX/1.1", b"", b"HTTP/1.1 ",
         b"HTTP/1.1\x00"]))
    if version in (b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0"):
        odd.add("old_version")
    elif version != b"HTTP/1.1":
        defects.add("bad_line")

    line_length = len(method) + len(target) + len(version) + 2
    if _rarely(draw, 5):  # pad the target around and over 8,192 bytes
        goal = draw(st.integers(MAX_LINE - 4, MAX_LINE + 4) | st.integers(MAX_LINE + 5, 20_000))
        pad = goal - line_length - len(b"&pad=")
        if pad > 0:
            target += (b"&pad=" if b"?" in target else b"?pad=") + b"a" * pad
            line_length = goal
    if line_length > MAX_LINE:
        defects.add("long_target")
    elif line_length > MAX_LINE - 2:
        odd.add("near_limit")  # whether the CRLF counts is not said

    # headers
    key = base64.b64encode(draw(st.binary(min_size=16, max_size=16)))
    upgrade = _mostly(draw, "full", 3, st.sampled_from(
        ["none", "no_upgrade", "h2c", "bad_key", "no_key", "bad_version"]))
    headers: list[bytes] = []
    if not _rarely(draw, 10):
        headers.append(b"Host: 127.0.0.1:%d" % ctx.port)
    else:
        odd.add("no_host")
    if upgrade != "none":
        if upgrade != "no_upgrade":
            headers.append(b"Upgrade: " + draw(st.sampled_from(
                [b"h2c"] if upgrade == "h2c" else [b"websocket", b"WebSocket"])))
        headers.append(b"Connection: " + draw(st.sampled_from(
            [b"Upgrade", b"upgrade", b"keep-alive, Upgrade"])))
        if upgrade != "no_key":
            headers.append(b"Sec-WebSocket-Key: " + (b"x" if upgrade == "bad_key" else key))
        headers.append(b"Sec-WebSocket-Version: " + (b"8" if upgrade == "bad_version"
                                                     else b"13"))
    if auth is not None:
        headers.append(b"Authorization: " + auth[0] + b" " + auth[1])
    plain = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
    names = st.sampled_from([b"X-Fuzz", b"User-Agent", b"Accept", b"Cookie", b"X-Forwarded-For"])
    for name in draw(st.lists(names, max_size=6)):
        headers.append(name + b": " + draw(plain).encode())
    # Origin (once: several are a malformed request): only the bridge's own is admitted by
    # default, and only when Host names it
    origin = draw(st.sampled_from(["none", "own", "foreign", "null", "junk"]))
    if origin != "none":
        headers.append(b"Origin: " + {
            "own": b"http://127.0.0.1:%d" % ctx.port, "foreign": b"https://evil.example",
            "null": b"null", "junk": draw(plain).encode()}[origin])
    origin_refused = origin not in ("none", "own") or (origin == "own" and "no_host" in odd)
    if _rarely(draw, 6):
        odd.add("ws_extras")
        headers.append(draw(st.sampled_from([b"Sec-WebSocket-Extensions", b"Sec-WebSocket-"
                                             b"Protocol"])) + b": " + draw(plain).encode())
    body = b""
    damage = _mostly(draw, "none", 3, st.sampled_from(
        ["long", "many", "bad", "obs_text", "obs_fold", "body", "chunked", "twice"]))
    if damage == "long":
        length = draw(st.integers(MAX_LINE - 4, MAX_LINE + 4) | st.integers(MAX_LINE + 5, 20_000))
        headers.append(b"X-Long: " + b"v" * (length - len(b"X-Long: ")))
        if length > MAX_LINE:
            defects.add("long_header")
        elif length > MAX_LINE - 2:
            odd.add("near_limit")
    elif damage == "many":
        total = draw(st.integers(MAX_HEADERS - 4, MAX_HEADERS + 4) | st.integers(133, 600))
        headers.extend(b"X-Pad-%d: p" % i for i in range(max(0, total - len(headers))))
        if len(headers) > MAX_HEADERS:
            defects.add("many_headers")
    elif damage == "bad":
        defects.add("bad_header")
        headers.insert(draw(st.integers(0, len(headers))), draw(st.sampled_from([
            b"NoColonHere", b"Bad Name: x", b": empty-name", b"X-Ctl: a\x00b", b"X-Ctl: \x7f",
            b"X-\xff: v", b"X-Ctl: \x1b[31m"])))
    elif damage == "obs_text":
        odd.add("obs_text")
        headers.append(b"X-Obs: caf\xe9 \xff\xfe")
    elif damage == "obs_fold":
        odd.add("obs_fold")
        headers.append(b"X-Folded: first")
        headers.append(b" continued")
    elif damage == "body":
        odd.add("body")
        body = draw(st.binary(min_size=1, max_size=20))
        headers.append(b"Content-Length: %d" % len(body))
    elif damage == "chunked":
        odd.add("body")
        headers.append(b"Transfer-Encoding: chunked")
        body = b"0\r\n\r\n"
    elif damage == "twice" and headers:  # a header repeated: Authorization, Upgrade, Host...
        odd.add("repeated")
        wanted = [h for h in headers if h.split(b":")[0] in _HANDSHAKE_HEADERS] or headers
        twice = draw(st.sampled_from(wanted))
        if auth is not None and draw(st.booleans()):
            other = draw(_token_value(ctx)).replace(b"\r", b"").replace(b"\n", b"")
            twice = b"Authorization: " + auth[0] + b" " + other
        headers.insert(draw(st.integers(0, len(headers))), twice)
    if _rarely(draw, 4):  # header names are case-insensitive
        headers = [line.split(b":", 1)[0].lower() + line[len(line.split(b":", 1)[0]):]
                   for line in headers]
    newline = b"\r\n"
    if _rarely(draw, 13):
        odd.add("lf_only")
        newline = b"\n"
    head = newline.join([method + b" " + target + b" " + version, *headers])
    data = head + newline + newline + body

    if route == "odd":
        odd.add("odd_path")
    clean = _clean_answer(route if route != "odd" else "ws", upgrade, states, origin_refused)
    assert defects <= _STATUS.keys() and odd <= _ODD, (defects, odd)
    allowed = _allowed(defects, odd, clean)
    why = ", ".join(sorted(defects | odd)) or "clean"
    return RawRequest(data, frozenset(allowed), f"{why}; token {'/'.join(sorted(states))}, "
                      f"upgrade {upgrade}")


def _clean_answer(route: str, upgrade: str, states: set[str], origin_refused: bool) -> set[int]:
    """The answer to a well-formed GET: 200 for the probes, 404 for other paths, on ``/ws`` 403
    for a foreign origin, else 101, 401 or 426 by token and upgrade headers."""
    if route == "health":
        return {200}
    if route == "missing":
        return {404}
    if origin_refused:
        return {403}
    if upgrade not in ("full", "none", "no_upgrade", "h2c"):
        return set(CLIENT_ERRORS)  # a broken WebSocket handshake: not said which 4xx
    answers: set[int] = set()
    for state in states:
        if state in ("valid", "either"):
            answers.add(101 if upgrade == "full" else 426)
        if state != "valid":
            answers.add(401)
    if upgrade != "full" and answers != {426}:
        answers |= {401, 426}
    return answers


def _allowed(defects: set[str], odd: set[str], clean: set[int]) -> set[int]:
    near = {414, 431} if "near_limit" in odd else set()
    if not defects:
        return clean | near | (set(CLIENT_ERRORS) if odd - {"near_limit"} else set())
    if len(defects) > 1 or "odd_path" in odd:
        return set(CLIENT_ERRORS)  # which defect wins is not said
    (defect,) = defects
    statuses = {_STATUS[defect]} | near
    if defect == "target_ctl":
        # a control character is ASCII, so "not ASCII" does not cover it: a bad request line
        # (400), or part of the query like any other character
        statuses |= clean
    if defect == "bad_line":
        statuses |= {405}
    if odd - {"near_limit", "ws_extras"}:
        statuses |= {400}  # a parse-level oddity may be refused first
    return statuses


# --- bytes sent with the request (issue 25: no frame before the 101) ---------------------------

@dataclass(frozen=True)
class EarlyWrites:
    """A request followed, in the same stream, by client frames and junk, cut into writes at
    random points; ``allowed`` is what the contract admits for the request alone."""

    writes: tuple[bytes, ...]
    allowed: frozenset[int]
    why: str

    def __repr__(self) -> str:
        sizes = "+".join(str(len(w)) for w in self.writes)
        data = b"".join(self.writes)
        shown = data if len(data) <= 600 else data[:400] + b"..." + data[-150:]
        return f"EarlyWrites({sizes} bytes, allowed {sorted(self.allowed)}, {self.why}: {shown!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' report
        printer.text(repr(self))


_KEY_HEADERS = (b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


def _masked(opcode: int, data: bytes, fin: bool = True) -> bytes:
    """A client frame (masked, RFC 6455 5.2) with any opcode, even a reserved one."""
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(data) < 126:
        head += bytes([0x80 | len(data)])
    else:
        head += bytes([0x80 | 126]) + len(data).to_bytes(2, "big")
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@st.composite
def _early_frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["close", "ping", "pong", "text", "binary", "cont", "start",
                                 "reserved", "junk", "pings"]))
    if kind == "close":
        code = draw(st.sampled_from([1000, 1001, 1002, 1005, 1006, 1011, 1015, 3000, 4999, 0,
                                     65535]))
        reason = draw(st.binary(max_size=20))
        return _masked(0x8, code.to_bytes(2, "big") + reason if draw(st.booleans()) else b"")
    if kind in ("ping", "pong"):
        return _masked(0x9 if kind == "ping" else 0xA, draw(st.binary(max_size=125)))
    if kind in ("text", "binary", "start"):
        return _masked(0x1 if kind != "binary" else 0x2,
                       draw(st.binary(max_size=300)) if kind != "text" else
                       b'{"type":"ping","ref":"early"}', fin=kind != "start")
    if kind == "cont":
        return _masked(0x0, draw(st.binary(max_size=20)), fin=draw(st.booleans()))
    if kind == "reserved":
        return _masked(draw(st.sampled_from([0x3, 0x7, 0xB, 0xF])), b"")
    if kind == "pings":  # a tail of empty pings
        return _masked(0x9, b"") * draw(st.integers(1, 3000))
    return draw(st.binary(min_size=1, max_size=40))


@st.composite
def early_writes(draw: st.DrawFn, ctx: HandshakeContext) -> EarlyWrites:
    """A valid upgrade (valid or refused token) or any request of :func:`http_requests`,
    then 0 to 5 frames or junk, all cut into 1 to 4 writes."""
    if draw(st.booleans()):
        valid = draw(st.booleans())
        jwt_token = draw(st.sampled_from(ctx.valid if valid else ctx.refused))
        request = b"GET /ws?token=" + jwt_token.encode() + b" HTTP/1.1\r\n" + _KEY_HEADERS + \
            b"\r\n"
        allowed, why = frozenset({101} if valid else {401}), (
            "a valid upgrade" if valid else "an upgrade with a refused token")
    else:
        raw = draw(http_requests(ctx))
        request, why = raw.data, raw.why
        # a request whose headers never end takes the bytes after it as more of its head
        allowed = raw.allowed if b"\r\n\r\n" in request else raw.allowed | CLIENT_ERRORS
    data = request + b"".join(draw(st.lists(_early_frame(), max_size=5)))
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=3))) if len(data) > 1 \
        else []
    bounds = [0, *cuts, len(data)]
    return EarlyWrites(tuple(data[a:b] for a, b in itertools.pairwise(bounds)), allowed, why)
