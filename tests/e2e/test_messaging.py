"""Two clients exchange messages through a real ``twistd -n allspark`` process."""

from __future__ import annotations

import orjson
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from allspark.client import AllsparkError
from tests.support import client_for, sleep, start_server


class MessagingTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_direct_message_is_stamped_with_sender(self) -> None:
        alice = await client_for(self, self.server, "alice-laptop", "alice")
        bob = await client_for(self, self.server, "bob-phone", "bob")
        accepted = await alice.send(dest_id="bob-phone", payload={"text": "hi"}, payload1=[1], type=7,
                                    src_id="mallory", timestamp=1, seq=99, smuggled="x")
        self.assertEqual(accepted["op"], "accepted")
        self.assertEqual(accepted["status"], "delivered")
        self.assertEqual(accepted["ignored"], ["seq", "smuggled", "src_id", "timestamp"])
        got = await bob.next_message()
        self.assertEqual(got["src_id"], "alice-laptop")
        self.assertEqual(got["src_client_id"], "alice")
        self.assertEqual(got["payload"], {"text": "hi"})
        self.assertEqual(got["payload1"], [1])
        self.assertEqual(got["type"], 7)
        self.assertEqual(got["seq"], 1)
        self.assertNotIn("smuggled", got)
        self.assertNotEqual(got["timestamp"], 1)
        self.assertEqual(set(got), {"src_id", "src_client_id", "dest_id", "payload", "payload1", "type",
                                    "id", "timestamp", "seq"})

    async def test_control_frames_cannot_carry_sender_fields(self) -> None:
        alice = await client_for(self, self.server, "alice-laptop", "alice")
        for field in ("src_id", "src_client_id", "timestamp", "seq"):
            with self.assertRaises(AllsparkError) as caught:
                await alice.request({"op": "ping", field: "bob-phone"})
            self.assertEqual(caught.exception.code, "bad_frame", field)
        self.assertEqual((await alice.ping())["op"], "pong")

    async def test_a_message_op_field_is_dropped_not_obeyed(self) -> None:
        alice = await client_for(self, self.server, "alice-laptop", "alice")
        bob = await client_for(self, self.server, "bob-phone", "bob")
        accepted = await alice.send(dest_id="bob-phone", op="hello", payload=1, dest_client_id=None)
        self.assertEqual(accepted["ignored"], ["op"])
        got = await bob.next_message()
        self.assertNotIn("op", got)
        self.assertEqual(got["src_id"], "alice-laptop")

    async def test_sending_to_a_node_that_never_connected_is_unknown_destination(self) -> None:
        alice = await client_for(self, self.server, "alice-laptop", "alice")
        for fields in ({"dest_id": "nobody"}, {"dest_id": "nobody", "ephemeral": True},
                       {"dest_client_id": "no-such-client"}):
            with self.assertRaises(AllsparkError) as caught:
                await alice.send(payload="hi", id="m-1", **fields)
            self.assertEqual(caught.exception.code, "unknown_destination", fields)
            self.assertEqual(caught.exception.frame["id"], "m-1")
        # a node that connected once is known, and gets it later
        late = await client_for(self, self.server, "late")
        late.drop()
        await late.closed
        accepted = await alice.send(dest_id="late", payload="later")
        self.assertEqual((accepted["status"], accepted["live"]), ("stored", 0))

    async def test_every_malformed_frame_gets_an_error_and_the_connection_keeps_working(self) -> None:
        alice = await client_for(self, self.server, "alice-laptop", "alice")
        await client_for(self, self.server, "bob-phone", "bob")
        cases: list[tuple[bytes | str, str, str | None]] = [
            (b"not json", "bad_frame", None),
            (b'{"dest_id": "bob-phone", ', "bad_frame", None),
            (b"[1, 2]", "bad_frame", None),
            (b"42", "bad_frame", None),
            (b'"a string"', "bad_frame", None),
            (b"null", "bad_frame", None),
            (b"NaN", "bad_frame", None),
            (b"[" * 5000 + b"]" * 5000, "bad_frame", None),
            ({"dest_id": 5, "payload": 1, "id": "w1"}, "bad_frame", "w1"),
            ({"dest_id": "bob-phone", "type": "7", "id": "w2"}, "bad_frame", "w2"),
            ({"dest_id": "bob-phone", "type": 1.5, "id": "w3"}, "bad_frame", "w3"),
            ({"dest_id": "bob-phone", "type": True, "id": "w4"}, "bad_frame", "w4"),
            ({"dest_id": "bob-phone", "ephemeral": "yes", "id": "w5"}, "bad_frame", "w5"),
            ({"dest_id": "bob-phone", "id": "x" * 65}, "bad_frame", None),
            ({"dest_id": "bob-phone", "id": 17}, "bad_frame", None),
            ({"dest_id": "bob phone!", "id": "w6"}, "bad_frame", "w6"),
            ({"dest_id": "b" * 129, "id": "w7"}, "bad_frame", "w7"),
            ({"dest_id": "", "id": "w8"}, "bad_frame", "w8"),
            ({"dest_id": None, "payload": 1, "id": "w9"}, "bad_frame", "w9"),
            ({"dest_id": "bob-phone", "dest_client_id": "bob", "id": "w10"}, "bad_frame", "w10"),
            ({"op": "nope", "id": "w11"}, "unknown_op", "w11"),
            ({"op": 5, "id": "w12"}, "unknown_op", "w12"),
            ({"op": "ping", "extra": 1, "id": "w13"}, "bad_frame", "w13"),
            ({"op": "ack", "id": "w14"}, "bad_frame", "w14"),
            ({"op": "ack", "upto": -1, "id": "w15"}, "bad_frame", "w15"),
            ({"op": "sync", "limit": 0, "id": "w16"}, "bad_frame", "w16"),
            ({"payload": "no destination", "id": "w17"}, "bad_frame", "w17"),
            ({}, "bad_frame", None),
        ]
        assert alice.protocol is not None
        for frame, code, frame_id in cases:
            alice.send_raw(frame if isinstance(frame, bytes) else orjson.dumps(frame))
            error = await alice.next_event(timeout=5)
            self.assertEqual((error["op"], error["code"]), ("error", code), frame)
            self.assertEqual(error.get("id"), frame_id, frame)
            self.assertTrue(error["message"])
            self.assertEqual((await alice.ping())["op"], "pong", frame)
        alice.protocol.sendMessage(b'{"op": "ping"}', isBinary=True)
        error = await alice.next_event(timeout=5)
        self.assertEqual(error["code"], "bad_frame")
        self.assertIn("binary", error["message"])
        self.assertEqual((await alice.ping())["op"], "pong")
        # and messages still flow
        accepted = await alice.send(dest_id="bob-phone", payload="still here")
        self.assertEqual(accepted["status"], "delivered")


class RateLimitTests(unittest.TestCase):
    timeout = 60

    async def test_a_fast_sender_gets_rate_limited_errors_and_keeps_its_connection(self) -> None:
        server = start_server(self, "--max-rate=5", "--max-burst=10")
        alice = await client_for(self, server, "alice", sync=False)
        answers = await gatherResults(
            [alice.ping().addErrback(lambda f: f.value) for _ in range(30)], consumeErrors=True
        )
        limited = [a for a in answers if isinstance(a, AllsparkError)]
        self.assertTrue(all(a.code == "rate_limited" for a in limited))
        self.assertGreaterEqual(len(limited), 15)  # 10 at once, then 5 per second
        self.assertGreaterEqual(30 - len(limited), 10)
        await sleep(1.0)
        self.assertEqual((await alice.ping())["op"], "pong")  # the bucket refilled
        await sleep(2.0)
        for _ in range(20):  # malformed frames take tokens too
            alice.send_raw(b"not json")
        with self.assertRaises(AllsparkError) as refused:
            await alice.ping()
        self.assertEqual(refused.exception.code, "rate_limited")


class ReconnectTests(unittest.TestCase):
    timeout = 60

    async def test_a_reconnected_sender_is_not_taken_for_a_retry(self) -> None:
        """The client numbers frames afresh per connection object: the
        server must still see new messages as new (no de-dup collision)."""
        server = start_server(self)
        bob = await client_for(self, server, "bob-phone", "bob")
        for text in ("first", "second"):
            alice = await client_for(self, server, "alice-laptop", "alice")
            accepted = await alice.send(dest_id="bob-phone", payload=text)
            self.assertEqual(accepted["status"], "delivered")
            self.assertEqual((await bob.next_message())["payload"], text)
            await alice.close()
