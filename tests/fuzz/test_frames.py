"""Property tests of the frame parser (:func:`allspark.envelope.parse_frame`)
and of what it builds for recipients.

Whatever bytes a client sends, the parser answers a :class:`Message`, a
:class:`Control` or a :class:`FrameError` with a documented code, never another
exception; and what it accepts is exactly what the contract allows: a message
keeps only its content fields, and its delivered copy is valid JSON that
carries the content exactly (integers included) with the server's own
``src_id``, ``timestamp``, ``dest_id`` and ``seq``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial import unittest

from allspark.envelope import (
    CONTENT_FIELDS,
    CONTROL_OPS,
    DEST_FIELDS,
    MAX_FRAME_ID_LENGTH,
    MESSAGE_FIELDS,
    Control,
    FrameError,
    Message,
    addressed,
    delivery_body,
    parse_frame,
)
from allspark.ids import is_valid_id
from tests.fuzz import SERVER_FAILURE_CODES, documented_error_codes, fuzz_settings

#: What the parser itself may answer: it knows no stores, sessions or limits.
PARSER_CODES = frozenset({"bad_frame", "unknown_op"})

#: Every field name the contract gives a meaning to, messages and control ops.
REAL_FIELDS = sorted(MESSAGE_FIELDS | {"op"} | {name for spec in CONTROL_OPS.values() for name in spec})

#: Integers at the edges the parser and the stores care about.
EDGE_INTS = [0, 1, -1, 1000, 1001, 2**31, 2**53 - 1, 2**53, -(2**53), 2**63 - 1, 2**63, -(2**63),
             -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 10**30, -(10**30)]

#: Strings that are, or nearly are, ids; and ones that are not.
ID_LIKE = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9_.:@-]{1,128}\Z"),
    st.sampled_from(["", " ", "a b", "a\n", "\u00e9", "x" * 128, "x" * 129, "bob\x00", "../x", "a/b",
                     "\ud800", "null", "0"]),
    st.text(max_size=140),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EDGE_INTS),
    st.floats(),  # NaN and infinities too: json.dumps writes them, JSON does not allow them
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=["Cs"]), min_size=1, max_size=3),
    ID_LIKE,
)

json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=12), children, max_size=5),
    ),
    max_leaves=25,
)

#: Values for one field: anything, with values of the right shape more often.
field_values = st.one_of(
    json_values,
    ID_LIKE,
    st.sampled_from(EDGE_INTS),
    st.sampled_from(sorted(CONTROL_OPS) + ["", "PING", "frobnicate", "ping "]),
    st.sampled_from(["group", "game", "GAME", "true", "false"]),
)

#: Frames made of the contract's field names (and a few unknown ones) with any values.
frames_of_real_fields = st.dictionaries(
    st.one_of(st.sampled_from(REAL_FIELDS), st.text(max_size=12)), field_values, max_size=8
)


def encode_json(value: Any, ensure_ascii: bool) -> bytes:
    """``value`` as JSON text bytes the way a careless client might write it:
    Python's encoder (which writes NaN and lone surrogates) with the lone
    surrogates passed through as invalid UTF-8."""
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


class ParserProperties(unittest.SynchronousTestCase):
    """parse_frame never fails with anything but a documented FrameError."""

    def parse(self, data: bytes, is_binary: bool = False) -> Message | Control | None:
        """Parse ``data`` and check the outcome against the contract; the
        parsed frame, or None when it was refused."""
        try:
            frame = parse_frame(data, is_binary)
        except FrameError as e:
            self.assertIn(e.code, PARSER_CODES, e.message)
            self.assertIn(e.code, documented_error_codes())
            self.assertNotIn(e.code, SERVER_FAILURE_CODES)
            reply = orjson.loads(e.to_frame())  # the error frame itself is valid JSON
            self.assertEqual(reply["op"], "error")
            if e.frame_id is not None:
                self.assertTrue(1 <= len(e.frame_id) <= MAX_FRAME_ID_LENGTH)
            return None
        if is_binary:
            self.fail("a binary frame was accepted")
        if isinstance(frame, Message):
            self.check_message(frame, orjson.loads(data))
        else:
            self.assertIsInstance(frame, Control)
            self.check_control(frame)
        return frame

    def check_message(self, msg: Message, raw: dict[str, Any]) -> None:
        """A message keeps its valid destinations and content fields only, and
        its delivered copy is valid JSON holding the server's fields."""
        given_dests = [name for name in DEST_FIELDS if getattr(msg, name) is not None]
        self.assertTrue(given_dests)
        for name in given_dests:
            self.assertTrue(is_valid_id(getattr(msg, name)), name)
        self.assertLessEqual(set(msg.content), set(CONTENT_FIELDS))
        self.assertEqual(msg.ignored, sorted(set(raw) - MESSAGE_FIELDS))
        self.assertIsInstance(msg.ephemeral, bool)
        if msg.id is not None:
            self.assertTrue(1 <= len(msg.id) <= MAX_FRAME_ID_LENGTH)
        body = delivery_body(msg, "sender-node", "sender-client", 1_700_000_000_000)
        for copy in (addressed(body, "recipient", 7), addressed(body, "recipient")):
            delivered = orjson.loads(copy)
            self.assertEqual(delivered["src_id"], "sender-node")
            self.assertEqual(delivered["src_client_id"], "sender-client")
            self.assertEqual(delivered["timestamp"], 1_700_000_000_000)
            self.assertEqual(delivered["dest_id"], "recipient")
            for name in CONTENT_FIELDS:
                if name in msg.content:
                    self.assertIn(name, delivered)
        self.assertEqual(orjson.loads(addressed(body, "recipient", 7))["seq"], 7)

    def check_control(self, frame: Control) -> None:
        """A control frame names a known op, and carries only its arguments,
        the required ones included."""
        self.assertIn(frame.op, CONTROL_OPS)
        spec = CONTROL_OPS[frame.op]
        self.assertLessEqual(set(frame.args), set(spec))
        for name, (_, required) in spec.items():
            if required:
                self.assertIn(name, frame.args)

    @fuzz_settings()
    @given(st.binary(max_size=300), st.booleans())
    @example(b"", False)
    @example(b"\xff", False)
    @example(b'{"op":"ping"}', True)
    @example(b'{"x":"\xff"}', False)
    @example(b"\xef\xbb\xbf{}", False)
    def test_arbitrary_bytes(self, data: bytes, is_binary: bool) -> None:
        self.parse(data, is_binary)

    @fuzz_settings()
    @given(json_values, st.booleans())
    def test_arbitrary_json_values(self, value: Any, ensure_ascii: bool) -> None:
        self.parse(encode_json(value, ensure_ascii))

    @fuzz_settings()
    @given(frames_of_real_fields, st.booleans())
    @example({"op": "sync", "limit": 2**64}, True)
    @example({"op": "ack", "upto": -1}, True)
    @example({"op": "ack", "upto": 2**63}, True)
    @example({"op": "sync", "after": 1.5}, True)
    @example({"op": ["ping"]}, True)
    @example({"op": {"a": 1}}, True)
    @example({"dest_id": "bob", "type": 2**53}, True)
    @example({"dest_id": "bob", "id": ""}, True)
    @example({"dest_id": None, "dest_session_id": None}, True)
    @example({"dest_client_id": "c", "dest_id": "n"}, True)
    def test_frames_of_real_fields(self, frame: dict[str, Any], ensure_ascii: bool) -> None:
        self.parse(encode_json(frame, ensure_ascii))

    @fuzz_settings()
    @given(st.sampled_from(sorted(CONTROL_OPS)), st.dictionaries(st.sampled_from(REAL_FIELDS), field_values,
                                                                  max_size=5))
    def test_every_op_with_any_arguments(self, op: str, args: dict[str, Any]) -> None:
        args.pop("op", None)
        for name in DEST_FIELDS:
            args.pop(name, None)  # a destination would make it a message
        self.parse(encode_json({"op": op, **args}, True))

    @fuzz_settings()
    @given(st.sampled_from(["payload", "payload1", "payload2", "id", "dest_id", "op", "upto", "extra"]),
           st.integers(min_value=1, max_value=3000), st.sampled_from(["[", "{\"a\":"]))
    @example("payload", 1023, "[")
    @example("payload", 1025, "[")
    def test_deep_nesting(self, name: str, depth: int, opener: str) -> None:
        closer = "]" if opener == "[" else "}"
        nested = opener * depth + "1" + closer * depth
        self.parse(('{"dest_id":"bob","%s":%s}' % (name, nested)).encode())
        self.parse(('{"op":"ping","%s":%s}' % (name, nested)).encode())

    @fuzz_settings(share=0.5)
    @given(st.sampled_from(["payload", "id", "dest_id", "dest_session_id", "op", "session_id", "extra"]),
           st.integers(min_value=0, max_value=70_000), st.sampled_from(["a", "\u00e9", "\\u0000", "\U0001F600"]))
    def test_huge_strings(self, name: str, length: int, char: str) -> None:
        huge = char * length
        self.parse(('{"dest_id":"bob","%s":"%s"}' % (name, huge)).encode())
        self.parse(('{"op":"join_session","session_id":"s","%s":"%s"}' % (name, huge)).encode())

    @fuzz_settings()
    @given(frames_of_real_fields, st.binary(min_size=1, max_size=4), st.data())
    @example({"dest_id": "bob", "payload": "hello"}, b"\xff", None)
    @example({"op": "ping", "id": "p1"}, b"\xc0\xaf", None)
    @example({"dest_id": "bob", "payload": "x"}, b"\xed\xa0\x80", None)
    def test_invalid_utf8_anywhere(self, frame: dict[str, Any], junk: bytes, data: Any) -> None:
        text = encode_json(frame, False)
        at = 0 if data is None else data.draw(st.integers(min_value=0, max_value=len(text)))
        self.parse(text[:at] + junk + text[at:])
        if b'"' in text:  # inside a string, where a parser is most tempted to pass bytes through
            inside = text.index(b'"') + 1
            self.parse(text[:inside] + junk + text[inside:])


class IntegerProperties(unittest.SynchronousTestCase):
    """Integers in a message's content reach the recipient exactly, or the
    frame is refused with ``bad_frame``: never silently changed (issue 8,
    item 10: 2^64 arrived as 1.8446744073709552e19)."""

    @fuzz_settings()
    @given(st.one_of(st.integers(), st.sampled_from(EDGE_INTS)),
           st.sampled_from(["payload", "payload1", "payload2"]))
    @example(2**64, "payload")
    @example(-(2**63) - 1, "payload")
    @example(10**30, "payload1")
    def test_integers_are_carried_exactly_or_refused(self, number: int, name: str) -> None:
        for content in (number, [number], {"n": number}):
            data = json.dumps({"dest_id": "bob", name: content}).encode()
            try:
                msg = parse_frame(data)
            except FrameError as e:
                self.assertEqual(e.code, "bad_frame")
                continue
            assert isinstance(msg, Message)
            delivered = json.loads(addressed(delivery_body(msg, "alice", None, 1), "bob", 1))
            # compared as JSON text: 2**64 == 1.8446744073709552e19 in Python
            self.assertEqual(json.dumps(delivered[name]), json.dumps(content))
