"""User-wide delivery (``dest_client_id``) against a real server process.

A message to a client reaches every node (device) of that client the cluster
has ever seen: online devices at once, offline ones from their inbox when
they connect and sync.  The sender's own other devices get a copy too, so a
user's phone and laptop show the same conversation; a client tells such a
copy apart because its ``src_client_id`` is its own ``client_id``
(``Client.is_own_copy``).
"""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from allspark.client import AllsparkError, Client
from tests.support import client_for, start_server


def drain(client: Client) -> list[dict[str, Any]]:
    got = list(client.messages.pending)
    client.messages.pending.clear()
    return got


class ClientWideTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def meet(self, node_id: str, client_id: str) -> None:
        """Connect once and leave, so the cluster knows the device."""
        client = await client_for(self, self.server, node_id, client_id)
        await client.ping()
        await client.close()

    async def test_every_device_of_the_user_and_the_senders_other_devices(self) -> None:
        await self.meet("bob-laptop", "bob")
        await self.meet("alice-tablet", "alice")
        bob_phone = await client_for(self, self.server, "bob-phone", "bob")
        alice_laptop = await client_for(self, self.server, "alice-laptop", "alice")
        alice_phone = await client_for(self, self.server, "alice-phone", "alice")

        accepted = await alice_laptop.send(dest_client_id="bob", id="m-1", payload={"text": "hi bob"})
        # bob-phone, bob-laptop, alice-phone, alice-tablet (not the sending device itself)
        self.assertEqual((accepted["recipients"], accepted["live"], accepted["status"]), (4, 2, "stored"))

        got = await bob_phone.next_message()
        self.assertEqual((got["src_id"], got["src_client_id"], got["dest_client_id"], got["dest_id"]),
                         ("alice-laptop", "alice", "bob", "bob-phone"))
        self.assertIn("seq", got)  # one inbox row per device
        self.assertFalse(bob_phone.is_own_copy(got))

        copy = await alice_phone.next_message()
        self.assertEqual((copy["src_client_id"], copy["dest_client_id"], copy["payload"]),
                         ("alice", "bob", {"text": "hi bob"}))
        self.assertTrue(alice_phone.is_own_copy(copy))
        self.assertEqual(drain(alice_laptop), [])  # the sending device gets no copy

        # offline devices get it on connect (sync of their inbox)
        bob_laptop = await client_for(self, self.server, "bob-laptop", "bob")
        (late,) = drain(bob_laptop)
        self.assertEqual((late["payload"], late["dest_client_id"], late["dest_id"], late["seq"]),
                         ({"text": "hi bob"}, "bob", "bob-laptop", 1))
        alice_tablet = await client_for(self, self.server, "alice-tablet", "alice")
        (late_copy,) = drain(alice_tablet)
        self.assertTrue(alice_tablet.is_own_copy(late_copy))

    async def test_note_to_self_reaches_only_the_other_devices(self) -> None:
        await self.meet("carol-laptop", "carol")
        phone = await client_for(self, self.server, "carol-phone", "carol")
        accepted = await phone.send(dest_client_id="carol", payload="remember milk")
        self.assertEqual(accepted["recipients"], 1)
        laptop = await client_for(self, self.server, "carol-laptop", "carol")
        (got,) = drain(laptop)
        self.assertTrue(laptop.is_own_copy(got))

    async def test_refusals(self) -> None:
        alice = await client_for(self, self.server, "alice-laptop", "alice")
        with self.assertRaises(AllsparkError) as refused:
            await alice.send(dest_client_id="nobody", payload="?")
        self.assertEqual(refused.exception.code, "unknown_destination")
        with self.assertRaises(AllsparkError) as refused:
            await alice.send(dest_client_id="alice", payload="only me")  # no other device
        self.assertEqual(refused.exception.code, "unknown_destination")
        with self.assertRaises(AllsparkError) as refused:
            await alice.send(dest_client_id="bob", dest_id="bob-phone", payload="both")
        self.assertEqual(refused.exception.code, "bad_frame")
