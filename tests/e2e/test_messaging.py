"""Two clients exchange messages through a real ``twistd -n allspark`` process."""

from __future__ import annotations

from twisted.trial import unittest

from tests.support import client_for, start_server


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
