"""The router, without sockets: fake connections, a fake clock, the memory store."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.envelope import FrameError, Message, parse_frame
from allspark.delivery import Delivery
from allspark.inbox import Inbox
from allspark.registry import Registry
from allspark.router import Router, Sender
from allspark.store.memory import MemoryStore
from tests.fakes import FakeConnection

ALICE = Sender("alice-laptop", "alice")


def message(**frame: Any) -> Message:
    msg = parse_frame(orjson.dumps(frame))
    assert isinstance(msg, Message)
    return msg


class RouterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.registry = Registry()
        self.inbox = Inbox(self.store, Delivery(self.registry, self.clock), self.clock)
        self.router = Router(self.inbox.delivery, self.store, self.inbox, self.clock)

    def connect(self, node_id: str, client_id: str | None = None) -> FakeConnection:
        """A node that is online now (and so known to the store)."""
        conn = FakeConnection(node_id, client_id)
        self.registry.add(conn)
        self.successResultOf(self.store.remember_node(node_id, client_id, 0))
        return conn

    def known_offline(self, node_id: str, client_id: str | None = None) -> None:
        self.successResultOf(self.store.remember_node(node_id, client_id, 0))

    def route(self, sender: Sender, **frame: Any) -> dict[str, Any]:
        """Route a message; the decoded ``accepted`` frame."""
        d = ensureDeferred(self.router.route(sender, message(**frame)))
        return orjson.loads(self.successResultOf(d))

    def refused(self, sender: Sender, **frame: Any) -> FrameError:
        d = ensureDeferred(self.router.route(sender, message(**frame)))
        return self.failureResultOf(d, FrameError).value

    def test_online_recipient_gets_the_stamped_message_with_its_seq(self) -> None:
        bob = self.connect("bob-phone", "bob")
        accepted = self.route(ALICE, dest_id="bob-phone", payload={"t": 1}, type=4, id="c-1",
                              src_id="mallory", timestamp=5)
        self.assertEqual(accepted, {"op": "accepted", "id": "c-1", "status": "delivered", "recipients": 1,
                                    "live": 1, "ignored": ["src_id", "timestamp"]})
        [got] = bob.frames
        self.assertEqual(got, {"seq": 1, "src_id": "alice-laptop", "src_client_id": "alice",
                               "dest_id": "bob-phone", "payload": {"t": 1}, "type": 4, "id": "c-1",
                               "timestamp": 1_700_000_000_000})
        self.route(ALICE, dest_id="bob-phone", payload=2)
        self.assertEqual(bob.frames[1]["seq"], 2)

    def test_offline_recipient_is_stored_and_synced_later(self) -> None:
        self.known_offline("bob-phone", "bob")
        accepted = self.route(ALICE, dest_id="bob-phone", payload="later")
        self.assertEqual((accepted["status"], accepted["live"]), ("stored", 0))
        bob = self.connect("bob-phone", "bob")
        synced = self.successResultOf(Deferred.fromCoroutine(self.inbox.sync(bob, 0, 10, 1 << 20)))
        self.assertEqual((synced["upto"], synced["more"]), (1, False))
        self.assertEqual(bob.frames[0]["payload"], "later")

    def test_ephemeral_is_never_stored(self) -> None:
        self.known_offline("bob-phone")
        self.assertEqual(self.route(ALICE, dest_id="bob-phone", payload=1, ephemeral=True)["status"], "dropped")
        bob = self.connect("bob-phone")
        accepted = self.route(ALICE, dest_id="bob-phone", payload=2, ephemeral=True)
        self.assertEqual(accepted["status"], "delivered")
        [got] = bob.frames
        self.assertNotIn("seq", got)
        self.assertTrue(got["ephemeral"])
        page = self.successResultOf(self.store.fetch_inbox("bob-phone", 0, 10))
        self.assertEqual(page.messages, [])

    def test_unknown_destination(self) -> None:
        error = self.refused(ALICE, dest_id="nobody", id="c-9")
        self.assertEqual((error.code, error.frame_id), ("unknown_destination", "c-9"))
        self.assertEqual(self.refused(ALICE, dest_client_id="nobody").code, "unknown_destination")
        self.assertEqual(self.refused(ALICE, dest_session_id="s-1").code, "unknown_destination")

    def test_user_wide_message_reaches_every_device_and_the_senders_others(self) -> None:
        phone, tablet = self.connect("bob-phone", "bob"), self.connect("bob-tablet", "bob")
        self.known_offline("bob-watch", "bob")
        other_laptop = self.connect("alice-desktop", "alice")
        sender_itself = self.connect("alice-laptop", "alice")
        accepted = self.route(ALICE, dest_client_id="bob", payload="hi")
        self.assertEqual((accepted["recipients"], accepted["live"], accepted["status"]), (4, 3, "stored"))
        # one stored body, each copy addressed to its device on the way out
        for conn in (phone, tablet, other_laptop):
            [got] = conn.frames
            self.assertEqual((got["dest_client_id"], got["payload"], got["dest_id"]),
                             ("bob", "hi", conn.node_id))
        self.assertEqual(other_laptop.frames[0]["src_id"], "alice-laptop")
        self.assertEqual(sender_itself.frames, [])

    def test_a_client_with_only_the_sender_is_refused(self) -> None:
        self.connect("alice-laptop", "alice")
        self.assertEqual(self.refused(ALICE, dest_client_id="alice").code, "unknown_destination")

    def test_retried_id_is_stored_and_delivered_once(self) -> None:
        bob = self.connect("bob-phone")
        first = self.route(ALICE, dest_id="bob-phone", payload=1, id="r-1")
        again = self.route(ALICE, dest_id="bob-phone", payload=1, id="r-1")
        self.assertEqual(first, again)
        self.assertEqual(len(bob.frames), 1)
        # another sender may use the same id
        self.route(Sender("carol", None), dest_id="bob-phone", payload=1, id="r-1")
        self.assertEqual(len(bob.frames), 2)
        # after the window the id is fresh again
        self.clock.advance(11 * 60)
        self.route(ALICE, dest_id="bob-phone", payload=1, id="r-1")
        self.assertEqual([f["seq"] for f in bob.frames], [1, 2, 3])

    def test_timestamp_follows_the_clock(self) -> None:
        bob = self.connect("bob-phone")
        self.route(ALICE, dest_id="bob-phone", payload=1)
        self.clock.advance(2.5)
        self.route(ALICE, dest_id="bob-phone", payload=1)
        first, second = bob.frames
        self.assertEqual(second["timestamp"] - first["timestamp"], 2500)

    def test_pipelined_messages_to_an_unlooked_up_node_keep_their_order(self) -> None:
        """While the store looks a node up, later messages to it wait their
        turn: they are stored in the order they arrived."""
        lookups: list[Deferred[Any]] = []
        real_get_node = self.store.get_node

        def slow_get_node(node_id: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            lookups.append(d)
            real_get_node(node_id).addCallback(lambda r: self.clock.callLater(1, d.callback, r))
            return d

        self.store.get_node = slow_get_node  # type: ignore[method-assign]
        self.known_offline("bob-phone")
        first = ensureDeferred(self.router.route(ALICE, message(dest_id="bob-phone", payload=0)))
        bob = self.connect("bob-phone")  # online now, but the lookup is still in flight
        rest = [ensureDeferred(self.router.route(ALICE, message(dest_id="bob-phone", payload=i)))
                for i in range(1, 5)]
        self.assertNoResult(first)
        self.clock.advance(1)
        for d in [first, *rest]:
            self.successResultOf(d)
        self.assertEqual(len(lookups), 1)
        self.assertEqual([f["payload"] for f in bob.frames], [0, 1, 2, 3, 4])
        self.assertEqual([f["seq"] for f in bob.frames], [1, 2, 3, 4, 5])

    def test_store_failure_propagates(self) -> None:
        self.connect("bob-phone")

        def broken(*args: Any) -> Deferred[Any]:
            raise RuntimeError("disk on fire")

        self.store.append_inbox = broken  # type: ignore[method-assign]
        d = ensureDeferred(self.router.route(ALICE, message(dest_id="bob-phone", payload=1)))
        self.failureResultOf(d, RuntimeError)
