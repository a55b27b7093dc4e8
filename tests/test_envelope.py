"""Frames on the wire: what a client may send, what a recipient gets."""

from __future__ import annotations

import orjson
from twisted.trial import unittest

from allspark.envelope import (
    Control,
    FrameError,
    Message,
    addressed,
    delivery_body,
    encode,
    error_frame,
    parse_frame,
)


def parse(frame: object) -> Message | Control:
    return parse_frame(orjson.dumps(frame))


class ParseTests(unittest.SynchronousTestCase):
    def refused(self, data: bytes | object, code: str = "bad_frame", binary: bool = False) -> FrameError:
        raw = data if isinstance(data, bytes) else orjson.dumps(data)
        with self.assertRaises(FrameError) as caught:
            parse_frame(raw, binary)
        self.assertEqual(caught.exception.code, code, data)
        self.assertTrue(caught.exception.message)
        return caught.exception

    def test_a_frame_with_a_destination_is_a_message(self) -> None:
        msg = parse({"dest_id": "bob", "payload": {"a": [1]}, "payload1": "x", "payload2": None,
                     "type": 7, "id": "c-1", "ephemeral": True})
        assert isinstance(msg, Message)
        self.assertEqual((msg.id, msg.dest_id, msg.ephemeral), ("c-1", "bob", True))
        self.assertEqual(msg.content, {"payload": {"a": [1]}, "payload1": "x", "payload2": None, "type": 7})
        self.assertEqual(msg.ignored, [])

    def test_unknown_and_server_fields_of_a_message_are_dropped_and_reported(self) -> None:
        msg = parse({"dest_id": "bob", "src_id": "mallory", "src_client_id": "m", "timestamp": 1,
                     "seq": 9, "alias": "a", "op": "hello", "payload": 1})
        assert isinstance(msg, Message)
        self.assertEqual(msg.content, {"payload": 1})
        self.assertEqual(msg.ignored, ["alias", "op", "seq", "src_client_id", "src_id", "timestamp"])

    def test_session_message_may_name_a_member(self) -> None:
        msg = parse({"dest_session_id": "s-1", "dest_id": "alias-3", "payload": 1})
        assert isinstance(msg, Message)
        self.assertEqual((msg.dest_session_id, msg.dest_id), ("s-1", "alias-3"))

    def test_not_json_objects_are_refused(self) -> None:
        for data in (b"", b"not json", b"{", b"[1]", b"1", b'"s"', b"null", b"true", b"NaN",
                     b"[" * 3000 + b"]" * 3000, b"\xff\xfe"):
            self.refused(data)

    def test_binary_frames_are_refused(self) -> None:
        self.assertIn("binary", self.refused(b'{"op": "ping"}', binary=True).message)

    def test_wrong_types_are_refused_with_the_frame_id(self) -> None:
        for frame in (
            {"dest_id": 5},
            {"dest_id": ["bob"]},
            {"dest_id": "bob", "type": "7"},
            {"dest_id": "bob", "type": 1.0},
            {"dest_id": "bob", "type": False},
            {"dest_id": "bob", "type": 2**53},
            {"dest_id": "bob", "ephemeral": "true"},
            {"dest_id": "bob", "ephemeral": 1},
            {"dest_id": "bad id"},
            {"dest_id": "x" * 129},
            {"dest_id": ""},
            {"dest_id": None},
            {"dest_client_id": "bob", "dest_id": "bob-phone"},
            {"dest_client_id": "bob", "dest_session_id": "s"},
        ):
            self.assertEqual(self.refused({**frame, "id": "f-1"}).frame_id, "f-1", frame)

    def test_push_fields_are_kept_as_sent_and_exposed(self) -> None:
        """``push`` and ``push_text`` stay in the content (so in the stored
        body) as sent; ``Message.push`` is False only for ``"push": false``."""
        msg = parse({"dest_id": "bob", "payload": 1, "push": False, "push_text": "Dinner at 8?"})
        assert isinstance(msg, Message)
        self.assertEqual(msg.content, {"payload": 1, "push": False, "push_text": "Dinner at 8?"})
        self.assertEqual((msg.push, msg.push_text, msg.ignored), (False, "Dinner at 8?", []))
        body = orjson.loads(delivery_body(msg, "alice", None, 5))
        self.assertEqual((body["push"], body["push_text"]), (False, "Dinner at 8?"))
        plain = parse({"dest_id": "bob", "payload": 1})
        assert isinstance(plain, Message)
        self.assertEqual((plain.push, plain.push_text), (True, None))
        self.assertNotIn("push", orjson.loads(delivery_body(plain, "alice", None, 5)))
        explicit = parse({"dest_session_id": "s", "push": True, "push_text": "é" * 200})
        assert isinstance(explicit, Message)
        self.assertEqual((explicit.push, explicit.push_text), (True, "é" * 200))
        self.assertIs(explicit.content["push"], True)

    def test_bad_push_fields_are_refused(self) -> None:
        """``push`` must be a boolean, ``push_text`` a string of at most 200
        characters: anything else is ``bad_frame`` with the frame's id."""
        for frame in (
            {"dest_id": "bob", "push": "false"},
            {"dest_id": "bob", "push": 0},
            {"dest_id": "bob", "push": None},
            {"dest_id": "bob", "push_text": 5},
            {"dest_id": "bob", "push_text": None},
            {"dest_id": "bob", "push_text": ["hi"]},
            {"dest_id": "bob", "push_text": "x" * 201},
        ):
            error = self.refused({**frame, "id": "f-2"})
            self.assertEqual(error.frame_id, "f-2", frame)
            self.assertIn("push", error.message)

    def test_ids_are_bounded(self) -> None:
        self.assertEqual(parse({"dest_id": "b" * 128, "id": "i" * 64}).id, "i" * 64)
        for bad_id in ("i" * 65, "", 5, ["x"]):
            self.assertIsNone(self.refused({"dest_id": "bob", "id": bad_id}).frame_id)

    def test_control_frames(self) -> None:
        ping = parse({"op": "ping", "id": "p"})
        self.assertEqual((ping.op, ping.id, ping.args), ("ping", "p", {}))
        sync = parse({"op": "sync", "after": 5, "limit": 10})
        assert isinstance(sync, Control)
        self.assertEqual(sync.args, {"after": 5, "limit": 10})
        self.assertEqual(parse({"op": "ack", "upto": 0}).args, {"upto": 0})

    def test_bad_control_frames(self) -> None:
        self.refused({"op": "nope"}, "unknown_op")
        self.refused({"op": 1}, "unknown_op")
        self.refused({"op": None})
        self.refused({})
        self.refused({"payload": 1})
        self.refused({"op": "ping", "src_id": "x"})
        self.refused({"op": "ack"})
        for bad in (-1, 1.5, "3", True, 2**63):
            self.refused({"op": "ack", "upto": bad})
        for bad in (0, 1001, "10"):
            self.refused({"op": "sync", "limit": bad})

    def test_long_unknown_op_is_not_echoed_whole(self) -> None:
        self.assertLess(len(self.refused({"op": "x" * 10_000}, "unknown_op").message), 200)

    def test_content_nested_deeper_than_the_server_can_encode_is_refused(self) -> None:
        """Found by tests/fuzz: content nested ~254 levels parsed, then the
        delivered copy could not be encoded (internal_error, a traceback)."""

        def nested(depth: int, opener: str, closer: str) -> bytes:
            return (opener * depth + "1" + closer * depth).encode()

        for opener, closer in (("[", "]"), ('{"a":', "}")):
            for field in (b"payload", b"payload1", b"payload2"):
                deepest = b'{"dest_id":"bob","id":"d1","%s":%s}' % (field, nested(128, opener, closer))
                msg = parse_frame(deepest)
                assert isinstance(msg, Message)
                orjson.loads(addressed(delivery_body(msg, "alice", None, 1), "bob", 1))
                too_deep = b'{"dest_id":"bob","id":"d1","%s":%s}' % (field, nested(300, opener, closer))
                self.assertEqual(self.refused(too_deep).frame_id, "d1")
        # brackets inside strings and in ignored fields are not nesting
        parse_frame(b'{"dest_id":"bob","payload":"%s","extra":%s}' % (b"[" * 500, nested(300, "[", "]")))

    def test_integers_beyond_64_bits_are_refused_not_turned_into_floats(self) -> None:
        """orjson reads an integer outside int64/uint64 as a float, silently:
        2^64 arrived as 1.8446744073709552e19.  Such a frame is bad_frame,
        wherever the integer is."""
        too_big = [2**64, -(2**63) - 1, 10**30, -(10**30), 2**64 + 1, 10**19 * 99]
        for number in too_big:
            text = str(number).encode()
            for frame in (
                b'{"dest_id":"bob","id":"i1","payload":%s}' % text,
                b'{"dest_id":"bob","id":"i1","payload1":[1,"x",%s]}' % text,
                b'{"dest_id":"bob","id":"i1","payload2":{"a":{"b":[{"c":%s}]}}}' % text,
                b'{"dest_id":"bob","id":"i1","type":%s}' % text,
                b'{"dest_id":"bob","id":"i1","payload":1,"extra":%s}' % text,  # even in a dropped field
                b'{"op":"ack","id":"i1","upto":%s}' % text,
                b'{"op":"sync","id":"i1","limit":%s}' % text,
                b'{"op":"sync","id":"i1","after":%s,"session_id":"s"}' % text,
            ):
                error = self.refused(frame)
                self.assertEqual(error.frame_id, "i1", frame)
                self.assertIn("2^64", error.message)
        self.refused(b'{"dest_id":"bob","payload":%s}' % (b"9" * 5000))  # past Python's int digit limit

    def test_integers_within_64_bits_are_carried_exactly(self) -> None:
        """Every integer orjson reads exactly (-2^63 .. 2^64-1) reaches the
        recipient unchanged, at the edges too; digit runs in strings and
        long fractions are no integers."""
        for number in (2**64 - 1, 2**63, 2**63 - 1, -(2**63), 10**18, -(10**18), 0):
            frame = b'{"dest_id":"bob","payload":{"n":[%d]},"payload1":%d}' % (number, number)
            msg = parse_frame(frame)
            assert isinstance(msg, Message)
            delivered = addressed(delivery_body(msg, "alice", None, 1), "bob", 1)
            self.assertIn(b'"payload":{"n":[%d]},"payload1":%d' % (number, number), delivered)
        msg = parse_frame(b'{"dest_id":"bob","payload":"%s","payload1":1.%s5}' % (b"7" * 400, b"0" * 30))
        assert isinstance(msg, Message)
        self.assertEqual(msg.content, {"payload": "7" * 400, "payload1": 1.0})

    def test_floats_beyond_double_range_are_refused(self) -> None:
        for text in (b"1e400", b"-1e400", b"1E309", b"1" + b"0" * 400 + b".0"):
            self.refused(b'{"dest_id":"bob","payload":%s}' % text)


class OutputTests(unittest.SynchronousTestCase):
    def test_delivery_body_is_stamped_by_the_server(self) -> None:
        msg = parse({"dest_id": "bob", "payload": "hi", "type": 3, "id": "c-1", "src_id": "mallory"})
        assert isinstance(msg, Message)
        body = orjson.loads(delivery_body(msg, "alice", "a", 1234))
        self.assertEqual(body, {"src_id": "alice", "src_client_id": "a",
                                "payload": "hi", "type": 3, "id": "c-1", "timestamp": 1234})

    def test_delivery_body_without_client_addressed_to_each_device(self) -> None:
        msg = parse({"dest_client_id": "bob", "payload": 1, "ephemeral": True})
        assert isinstance(msg, Message)
        body = delivery_body(msg, "alias-1", None, 5)
        self.assertEqual(orjson.loads(addressed(body, "bob-phone")),
                         {"src_id": "alias-1", "dest_id": "bob-phone", "dest_client_id": "bob",
                          "payload": 1, "ephemeral": True, "timestamp": 5})
        self.assertEqual(orjson.loads(addressed(body, "bob-laptop", 42))["dest_id"], "bob-laptop")

    def test_addressed_adds_dest_and_seq(self) -> None:
        self.assertEqual(orjson.loads(addressed(b'{"a":1}', "n:1@x", 42)),
                         {"seq": 42, "dest_id": "n:1@x", "a": 1})

    def test_error_frame(self) -> None:
        self.assertEqual(orjson.loads(error_frame("bad_frame", "m", "i")),
                         {"op": "error", "code": "bad_frame", "message": "m", "id": "i"})
        self.assertNotIn("id", orjson.loads(error_frame("bad_frame", "m")))
        self.assertEqual(orjson.loads(FrameError("too_large", "big", "x").to_frame())["code"], "too_large")
        self.assertEqual(encode({"op": "pong"}), b'{"op":"pong"}')
