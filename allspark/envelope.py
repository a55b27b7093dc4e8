"""Frames on the wire: parse and validate what clients send, build what they get.

A client frame is a JSON object.  One that names ``dest_id``,
``dest_client_id`` or ``dest_session_id`` is a :class:`Message`; any other is a
:class:`Control` frame named by ``"op"``.  Everything the contract does not
name is dropped from messages (and reported back to the sender in
``accepted.ignored``), so nobody can smuggle ``src_id``, an alias or a
``timestamp`` into what a recipient gets.  Control frames with fields their op
does not take are refused with ``bad_frame``.

Problems raise :class:`FrameError`, which carries the error ``code`` of the
contract and the frame's ``id`` when it was readable, so the socket can answer
with an error frame and keep the connection open.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from allspark.ids import is_valid_id

#: Fields of a message that are carried to recipients as the sender wrote them.
#: ``push`` (false: this message schedules no push notification) and
#: ``push_text`` (a short text a push may show) are kept in the stored body
#: too, where the push scheduler reads them.
CONTENT_FIELDS = ("payload", "payload1", "payload2", "type", "push", "push_text")
#: Longest ``push_text``, in characters.
MAX_PUSH_TEXT = 200
#: Longest push ``token`` (``register_push``), in characters.
MAX_PUSH_TOKEN = 4096
#: Longest APNs ``topic`` (a bundle id, maybe with a suffix such as ``.voip``).
MAX_PUSH_TOPIC = 255
#: Tokens, topics and endpoints: printable ASCII without spaces (they go into
#: URLs and headers).
PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
#: Destination fields; at least one makes a frame a message.
DEST_FIELDS = ("dest_id", "dest_client_id", "dest_session_id")
DEST_SET = frozenset(DEST_FIELDS)
MESSAGE_FIELDS = frozenset(("id", "ephemeral") + DEST_FIELDS + CONTENT_FIELDS)
MAX_FRAME_ID_LENGTH = 64
#: Deepest nesting of arrays and objects a message's content may have.  The
#: server's encoder (``orjson.dumps``) refuses values nested more than about
#: 250 levels, so deeper content could be accepted but never delivered.
MAX_CONTENT_DEPTH = 128
#: The integers a frame may hold anywhere (content and control arguments): what
#: ``orjson`` reads exactly (int64 and uint64).  It reads a longer integer as a
#: float without a word (2^64 became 1.8446744073709552e19), so such a frame is
#: refused with ``bad_frame`` instead of being delivered changed.
MIN_FRAME_INT = -(2**63)
MAX_FRAME_INT = 2**64 - 1
# Digits -> "0", every other byte -> " ".  An integer outside the range above has
# at least 19 digits (JSON has no leading zeros), so a frame without a run of 19
# digits needs no further look.  translate + find are two passes in C: measured
# 0.3 us for a 114-byte frame (orjson.loads: 0.5 us) and 40 us for 60 KB of text
# (orjson.loads: 20 us); a regular expression took 800 us for the 60 KB.
_DIGIT_MASK = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGIT_RUN = b"0" * 19
MAX_SYNC_LIMIT = 1000
DEFAULT_SYNC_LIMIT = 100
#: Entries per page of a listing (members, sessions) when ``limit`` is not given.
DEFAULT_PAGE_LIMIT = 100


class FrameError(Exception):
    """A frame the server refuses; answered with an error frame."""

    def __init__(self, code: str, message: str, frame_id: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id
        #: more fields of the error frame (``too_large`` names its ``limit``)
        self.details = details

    def to_frame(self) -> bytes:
        """The ``{"op": "error", ...}`` frame that reports this problem."""
        return error_frame(self.code, self.message, self.frame_id, **self.details)


@dataclass(slots=True)
class Message:
    """A message frame, validated.  ``content`` holds only the fields of
    :data:`CONTENT_FIELDS` that the sender gave; ``ignored`` the names that
    were dropped."""

    id: str | None
    dest_id: str | None
    dest_client_id: str | None
    dest_session_id: str | None
    ephemeral: bool
    content: dict[str, Any]
    ignored: list[str] = field(default_factory=list)

    @property
    def push(self) -> bool:
        """False when the sender asked for no push notification (``"push": false``)."""
        return self.content.get("push", True) is not False

    @property
    def push_text(self) -> str | None:
        """The short text the sender offered for a push notification, if any."""
        text = self.content.get("push_text")
        return text if isinstance(text, str) else None


@dataclass(slots=True)
class Control:
    """A control frame: its ``op``, its optional ``id`` and its validated arguments."""

    op: str
    id: str | None
    args: dict[str, Any]


def _non_negative_int(name: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or value < 0 or value >= 2**63:
            raise ValueError(f"{name} must be a non-negative integer")
        return value

    return check


def _limit(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_SYNC_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_SYNC_LIMIT}")
    return value


def _an_id(name: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not is_valid_id(value):
            raise ValueError(f"{name} must be 1-128 characters of [A-Za-z0-9_.:@-]")
        return value

    return check


def _flag(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if type(value) is not bool:
            raise ValueError(f"{name} must be true or false")
        return value

    return check


def _session_type(value: Any) -> str:
    if value not in ("group", "game"):
        raise ValueError('session_type must be "group" or "game"')
    return value


def _push_provider(value: Any) -> str:
    # which names are providers is register_push's own check (unknown_provider)
    if type(value) is not str or not 1 <= len(value) <= 64:
        raise ValueError('provider must be a string: "fcm", "apns", "webpush" or "webhook"')
    return value


def _printable(name: str, limit: int, what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if type(value) is not str or not 1 <= len(value) <= limit or not PRINTABLE_ASCII.fullmatch(value):
            raise ValueError(f"{name} must be 1-{limit} printable ASCII characters without spaces{what}")
        return value

    return check


def _push_subscription(value: Any) -> dict[str, Any]:
    # its pieces are register_push's own check
    if type(value) is not dict:
        raise ValueError("subscription must be an object: the browser's PushSubscription as JSON")
    return value


def _push_environment(value: Any) -> str:
    if value not in ("production", "development"):
        raise ValueError('environment must be "production" or "development"')
    return str(value)


#: op -> {argument: (validator, required)}.  ``id`` is allowed on every op.
CONTROL_OPS: dict[str, dict[str, tuple[Callable[[Any], Any], bool]]] = {
    "ping": {},
    "ack": {
        "upto": (_non_negative_int("upto"), True),
        "session_id": (_an_id("session_id"), False),
    },
    "sync": {
        "after": (_non_negative_int("after"), False),
        "limit": (_limit, False),
        "session_id": (_an_id("session_id"), False),
    },
    "create_session": {
        "session_id": (_an_id("session_id"), False),
        "anonymous": (_flag("anonymous"), False),
        "anyone_can_join": (_flag("anyone_can_join"), False),
        "session_type": (_session_type, False),
    },
    "join_session": {
        "session_id": (_an_id("session_id"), True),
        "anonymous": (_flag("anonymous"), False),
        "node_id": (_an_id("node_id"), False),
    },
    "unjoin_session": {
        "session_id": (_an_id("session_id"), True),
        "node_id": (_an_id("node_id"), False),
        "alias": (_an_id("alias"), False),
    },
    "get_session_info": {
        "session_id": (_an_id("session_id"), True),
        "after": (_an_id("after"), False),
        "limit": (_limit, False),
    },
    "reveal_anonymity": {"session_id": (_an_id("session_id"), True)},
    "set_master": {
        "session_id": (_an_id("session_id"), True),
        "node_id": (_an_id("node_id"), False),
        "alias": (_an_id("alias"), False),
    },
    "my_sessions": {
        "after": (_an_id("after"), False),
        "limit": (_limit, False),
    },
    "presence": {
        "session_id": (_an_id("session_id"), False),
        "client_id": (_an_id("client_id"), False),
        "node_id": (_an_id("node_id"), False),
        "subscribe": (_flag("subscribe"), False),
        "after": (_an_id("after"), False),
        "limit": (_limit, False),
    },
    # push registration (allspark.push.registration checks what depends on the provider)
    "register_push": {
        "provider": (_push_provider, True),
        "token": (_printable("token", MAX_PUSH_TOKEN, ""), False),
        "subscription": (_push_subscription, False),
        "topic": (_printable("topic", MAX_PUSH_TOPIC, " (the app's bundle id)"), False),
        "environment": (_push_environment, False),
    },
    "unregister_push": {},
    "mute_push": {"muted": (_flag("muted"), True)},
}


def _frame_id(frame: dict[str, Any]) -> str | None:
    value = frame.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_FRAME_ID_LENGTH:
        raise FrameError("bad_frame", f"id must be a string of 1-{MAX_FRAME_ID_LENGTH} characters")
    return value


def parse_frame(data: bytes, is_binary: bool = False) -> Message | Control:
    """Parse one client frame.  Raises :class:`FrameError` for anything the
    contract does not allow."""
    if is_binary:
        raise FrameError("bad_frame", "binary frames are not accepted: send JSON text")
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FrameError("bad_frame", "the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise FrameError("bad_frame", "a frame must be a JSON object")
    frame_id = _frame_id(frame)
    if _LONG_DIGIT_RUN in data.translate(_DIGIT_MASK):
        _check_integers(data, frame_id)
    if not DEST_SET.isdisjoint(frame):
        # only a frame with that many brackets (each opened and closed: more
        # than twice as many bytes) can nest that deep: the counts and the walk
        # are skipped for nearly every frame
        if (len(data) > 2 * MAX_CONTENT_DEPTH and data.count(b"[") + data.count(b"{") > MAX_CONTENT_DEPTH
                and _nested_deeper(frame, MAX_CONTENT_DEPTH)):
            raise FrameError(
                "bad_frame", f"the content is nested more than {MAX_CONTENT_DEPTH} levels deep", frame_id
            )
        return _parse_message(frame, frame_id)
    return _parse_control(frame, frame_id)


class _IntegerOutOfRange(Exception):
    """An integer literal outside ``MIN_FRAME_INT..MAX_FRAME_INT``."""


def _exact_int(text: str) -> int:
    value = int(text)
    if not MIN_FRAME_INT <= value <= MAX_FRAME_INT:
        raise _IntegerOutOfRange(text)
    return value


def _check_integers(data: bytes, frame_id: str | None) -> None:
    """Refuse ``data`` (a frame ``orjson`` parsed, with a run of 19 or more
    digits somewhere) when any integer literal in it lies outside
    ``MIN_FRAME_INT..MAX_FRAME_INT``: it is read again by the standard
    library's parser, which sees every integer literal exactly.  Only frames
    with such a digit run (in a number or in a string) pay for it."""
    try:
        json.loads(data, parse_int=_exact_int)
    except _IntegerOutOfRange:
        raise FrameError(
            "bad_frame", "integers must be from -2^63 to 2^64-1: a larger one would not arrive exactly", frame_id
        ) from None
    except (ValueError, RecursionError):  # over 4300 digits, or nesting the stdlib parser cannot follow
        raise FrameError("bad_frame", "the frame holds a number or nesting too large to carry exactly",
                         frame_id) from None


def _nested_deeper(frame: dict[str, Any], limit: int) -> bool:
    """Whether a content field of ``frame`` nests arrays and objects more
    than ``limit`` levels deep (a scalar is level 0, ``[1]`` level 1)."""
    stack = [(frame[name], 0) for name in CONTENT_FIELDS if name in frame]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            if depth >= limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def _parse_message(frame: dict[str, Any], frame_id: str | None) -> Message:
    dests: dict[str, str | None] = {}
    for name in DEST_FIELDS:
        value = frame.get(name)
        if value is not None and not is_valid_id(value):
            raise FrameError(
                "bad_frame", f"{name} must be 1-128 characters of [A-Za-z0-9_.:@-]", frame_id
            )
        dests[name] = value
    given = [name for name in DEST_FIELDS if dests[name] is not None]
    if not given:
        raise FrameError("bad_frame", "a message needs dest_id, dest_client_id or dest_session_id", frame_id)
    if dests["dest_client_id"] is not None and len(given) > 1:
        raise FrameError("bad_frame", "dest_client_id cannot be combined with another destination", frame_id)
    ephemeral = frame.get("ephemeral", False)
    if type(ephemeral) is not bool:
        raise FrameError("bad_frame", "ephemeral must be true or false", frame_id)
    msg_type = frame.get("type")
    if msg_type is not None and (type(msg_type) is not int or not -(2**53) < msg_type < 2**53):
        raise FrameError("bad_frame", "type must be an integer", frame_id)
    if "push" in frame and type(frame["push"]) is not bool:
        raise FrameError("bad_frame", "push must be true or false", frame_id)
    if "push_text" in frame:
        push_text = frame["push_text"]
        if type(push_text) is not str or len(push_text) > MAX_PUSH_TEXT:
            raise FrameError("bad_frame", f"push_text must be a string of at most {MAX_PUSH_TEXT} characters",
                             frame_id, limit=MAX_PUSH_TEXT)
    content = {name: frame[name] for name in CONTENT_FIELDS if name in frame}
    extra = frame.keys() - MESSAGE_FIELDS
    ignored = sorted(extra) if extra else []
    return Message(
        id=frame_id,
        dest_id=dests["dest_id"],
        dest_client_id=dests["dest_client_id"],
        dest_session_id=dests["dest_session_id"],
        ephemeral=ephemeral,
        content=content,
        ignored=ignored,
    )


def control_from(op: str, fields: dict[str, Any]) -> Control:
    """The :class:`Control` frame ``op`` with ``fields`` as arguments,
    validated exactly as a frame would be (for HTTP endpoints that answer a
    control op); :class:`FrameError` when they are not its arguments."""
    for name in ("op", "id"):
        if name in fields:
            raise FrameError("bad_frame", f"op {op!r} takes no field {name!r}")
    return _parse_control({**fields, "op": op}, None)


def _parse_control(frame: dict[str, Any], frame_id: str | None) -> Control:
    op = frame.get("op")
    if op is None:
        raise FrameError(
            "bad_frame", 'a frame needs "op", or a destination (dest_id, dest_client_id, dest_session_id)', frame_id
        )
    if not isinstance(op, str) or op not in CONTROL_OPS:
        raise FrameError("unknown_op", f"unknown op {str(op)[:64]!r}", frame_id)
    spec = CONTROL_OPS[op]
    args: dict[str, Any] = {}
    for name, value in frame.items():
        if name in ("op", "id"):
            continue
        if name not in spec:
            raise FrameError("bad_frame", f"op {op!r} takes no field {name[:64]!r}", frame_id)
        try:
            args[name] = spec[name][0](value)
        except ValueError as e:
            raise FrameError("bad_frame", str(e), frame_id) from None
    for name, (_, required) in spec.items():
        if required and name not in args:
            raise FrameError("bad_frame", f"op {op!r} needs {name!r}", frame_id)
    return Control(op=op, id=frame_id, args=args)


def encode(frame: dict[str, Any]) -> bytes:
    """Serialize a frame the server sends."""
    return orjson.dumps(frame)


def error_frame(code: str, message: str, frame_id: str | None = None, **details: Any) -> bytes:
    """An ``{"op": "error"}`` frame, with ``details`` as more fields."""
    frame: dict[str, Any] = {"op": "error", "code": code, "message": message, **details}
    if frame_id is not None:
        frame["id"] = frame_id
    return orjson.dumps(frame)


#: Bytes the server may add to a stored body on its way out, whatever the
#: copy: ``{"seq":N,"dest_id":"<128 characters>",`` for an inbox copy (the
#: longest), ``{"session_seq":N,`` for a session row, with N up to 2**63.
DELIVERY_OVERHEAD = 192


def check_deliverable(body: bytes, max_message_size: int, frame_id: str | None) -> None:
    """Refuse (``too_large``) a message whose delivered copy could be over
    ``max_message_size``: ``body`` (from :func:`delivery_body`, with
    ``src_id``, ``src_client_id``, ``timestamp``...) plus what is spliced in
    on delivery (:data:`DELIVERY_OVERHEAD`).  Checked before anything is
    stored, so that nothing accepted is ever too large to deliver."""
    size = len(body) + DELIVERY_OVERHEAD
    if size > max_message_size:
        raise FrameError(
            "too_large",
            f"this message would be up to {size} bytes as delivered (with the fields the server adds), "
            f"over the limit of {max_message_size} bytes: send less",
            frame_id, limit=max_message_size, size=size,
        )


def delivery_body(
    msg: Message,
    src_id: str,
    src_client_id: str | None,
    timestamp: int,
) -> bytes:
    """The frame recipients get, before it is addressed.

    ``src_id``/``src_client_id``/``timestamp`` come from the authenticated
    connection and the server clock, never from the frame.  It holds no
    ``dest_id``: a copy in a node's inbox is addressed to that node on its way
    out (:func:`addressed`), so every device of a user-wide message is named.
    """
    out: dict[str, Any] = {"src_id": src_id}
    if src_client_id is not None:
        out["src_client_id"] = src_client_id
    if msg.dest_client_id is not None:
        out["dest_client_id"] = msg.dest_client_id
    if msg.dest_session_id is not None:
        out["dest_session_id"] = msg.dest_session_id
    out.update(msg.content)
    if msg.id is not None:
        out["id"] = msg.id
    if msg.ephemeral:
        out["ephemeral"] = True
    out["timestamp"] = timestamp
    return orjson.dumps(out)


def addressed(body: bytes, dest_id: str, seq: int | None = None) -> bytes:
    """``body`` (from :func:`delivery_body`) as delivered to node ``dest_id``:
    with its ``dest_id`` and, when it was stored, the node's inbox ``seq``;
    spliced in without parsing the body again (ids never need escaping)."""
    if seq is None:
        return b'{"dest_id":"%s",%s' % (dest_id.encode(), body[1:])
    return b'{"seq":%d,"dest_id":"%s",%s' % (seq, dest_id.encode(), body[1:])
