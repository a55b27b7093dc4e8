"""The one delivery point: local connections first, then the remote route (a
fake mesh here), else nothing; the router, inbox and sessions all write through it."""

from __future__ import annotations

from typing import Any, Sequence

import orjson
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.auth import AuthKeyVerifier, ValidationTokens
from allspark.delivery import Delivery
from allspark.envelope import Control, Message, parse_frame
from allspark.router import Sender
from allspark.server import Server, ServerConfig
from allspark.store.memory import MemoryStore
from tests.fakes import FakeConnection

ALICE = Sender("alice", "a")


class FakeMesh:
    """A :class:`~allspark.delivery.RemoteRoute` that records what it was asked to forward."""

    def __init__(self, elsewhere: set[str]) -> None:
        self.elsewhere = elsewhere
        self.forwarded: list[tuple[list[str], Any]] = []

    def holds(self, node_id: str) -> bool:
        return node_id in self.elsewhere

    def located(self) -> set[str]:
        return self.elsewhere

    def forward(self, node_ids: Sequence[str], frame: bytes) -> None:
        self.forwarded.append((list(node_ids), orjson.loads(frame)))


def message(**frame: Any) -> Message:
    msg = parse_frame(orjson.dumps(frame))
    assert isinstance(msg, Message)
    return msg


class DeliveryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        config = ServerConfig(server_id="srv", host="127.0.0.1", port=1, listen=())
        tokens = ValidationTokens(b"k" * 32, "srv", self.clock)
        self.server = Server(config, self.store, AuthKeyVerifier([b"secret"]), tokens, self.clock)
        self.sessions = self.server.new_sessions()
        self.mesh = FakeMesh({"bob", "carol"})
        self.delivery = self.server.delivery
        for node_id in ("alice", "bob", "carol", "dave"):
            self.successResultOf(self.store.remember_node(node_id, None, 0))
        self.dave = FakeConnection("dave")
        self.server.registry.add(self.dave)

    def route(self, **frame: Any) -> dict[str, Any]:
        d = ensureDeferred(self.server.router.route(ALICE, message(**frame)))
        return orjson.loads(self.successResultOf(d))

    def test_without_a_mesh_a_node_elsewhere_is_not_live_and_waits_in_the_store(self) -> None:
        accepted = self.route(dest_id="bob", payload=1)
        self.assertEqual((accepted["status"], accepted["live"]), ("stored", 0))
        self.assertFalse(self.delivery.deliver("bob", b"{}"))

    def test_a_stored_copy_for_a_node_on_another_server_goes_to_the_mesh_addressed(self) -> None:
        self.delivery.remote = self.mesh
        accepted = self.route(dest_id="bob", payload=1, id="m1")
        self.assertEqual((accepted["status"], accepted["live"]), ("delivered", 1))
        [(node_ids, frame)] = self.mesh.forwarded
        self.assertEqual(node_ids, ["bob"])
        self.assertEqual((frame["dest_id"], frame["seq"], frame["payload"]), ("bob", 1, 1))

    def test_assigning_or_removing_the_mesh_switches_where_copies_go(self) -> None:
        """``is_live`` and ``deliver`` are rebound when ``remote`` changes
        (without a mesh they are the registry's own methods)."""
        self.delivery.remote = self.mesh
        self.assertTrue(self.delivery.is_live("bob"))
        self.assertTrue(self.delivery.deliver("bob", b"{}"))
        self.assertEqual(len(self.mesh.forwarded), 1)
        self.delivery.remote = None
        self.assertFalse(self.delivery.is_live("bob"))
        self.assertFalse(self.delivery.deliver("bob", b"{}"))
        self.assertEqual(len(self.mesh.forwarded), 1)
        self.assertTrue(self.delivery.is_live("dave"))
        self.assertTrue(self.delivery.deliver("dave", b"{}"))

    def test_a_mesh_without_links_is_skipped_until_one_comes_up(self) -> None:
        self.delivery.remote = self.mesh
        self.delivery.links_changed(False)
        self.assertFalse(self.delivery.is_live("bob"))
        self.assertFalse(self.delivery.deliver("bob", b"{}"))
        self.assertEqual(self.mesh.forwarded, [])
        self.delivery.links_changed(True)
        self.assertTrue(self.delivery.is_live("bob"))
        self.assertTrue(self.delivery.deliver("bob", b"{}"))
        self.assertEqual(len(self.mesh.forwarded), 1)

    def test_a_local_connection_wins_over_the_mesh(self) -> None:
        self.delivery.remote = FakeMesh({"dave"})
        self.route(dest_id="dave", payload="here")
        self.assertEqual([f["payload"] for f in self.dave.frames], ["here"])
        self.assertEqual(self.delivery.remote.forwarded, [])  # type: ignore[union-attr]

    def test_ephemeral_copies_go_through_the_delivery_point(self) -> None:
        self.delivery.remote = self.mesh
        accepted = self.route(dest_id="carol", payload="now", ephemeral=True)
        self.assertEqual((accepted["status"], accepted["live"]), ("delivered", 1))
        [(node_ids, frame)] = self.mesh.forwarded
        self.assertEqual((node_ids, frame["dest_id"]), (["carol"], "carol"))
        self.assertNotIn("seq", frame)

    def test_a_broadcast_is_one_forward_with_the_remote_members_and_local_copies(self) -> None:
        self.delivery.remote = self.mesh
        self.successResultOf(ensureDeferred(self.sessions.control(ALICE, Control(
            "create_session", None, {"session_id": "s1"}))))
        for node_id in ("bob", "carol", "dave"):
            self.successResultOf(ensureDeferred(self.sessions.control(ALICE, Control(
                "join_session", None, {"session_id": "s1", "node_id": node_id}))))
        self.mesh.forwarded.clear()
        self.dave.clear()
        accepted = self.route(dest_session_id="s1", payload="all")
        self.assertEqual((accepted["recipients"], accepted["live"]), (3, 3))
        [(node_ids, frame)] = self.mesh.forwarded
        self.assertEqual((sorted(node_ids), frame["payload"]), (["bob", "carol"], "all"))
        self.assertEqual([f["payload"] for f in self.dave.frames], ["all"])

    def test_a_frame_from_a_peer_is_written_here_only_never_forwarded(self) -> None:
        self.delivery.remote = self.mesh
        self.assertEqual(self.delivery.deliver_local(["bob", "dave"], b'{"payload":1}'), 1)
        self.assertEqual(self.mesh.forwarded, [])
        self.assertEqual(self.dave.frames, [{"payload": 1}])
