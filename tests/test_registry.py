"""The registry: node_id -> live connections on this server."""

from __future__ import annotations

from twisted.trial import unittest

from allspark.registry import Registry
from tests.fakes import FakeConnection


class RegistryTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = Registry()

    def test_empty(self) -> None:
        self.assertEqual(len(self.registry), 0)
        self.assertEqual(self.registry.node_count(), 0)
        self.assertFalse(self.registry.is_online("a"))
        self.assertEqual(self.registry.connections("a"), [])
        self.assertEqual(self.registry.send("a", b"x"), 0)
        self.assertEqual(list(self.registry), [])

    def test_a_node_may_hold_several_connections_and_each_gets_the_frame(self) -> None:
        tab1, tab2, other = FakeConnection("a"), FakeConnection("a"), FakeConnection("b")
        for conn in (tab1, tab2, other):
            self.registry.add(conn)
        self.assertEqual((len(self.registry), self.registry.node_count()), (3, 2))
        self.assertEqual(self.registry.send("a", b'"hi"'), 2)
        self.assertEqual((tab1.raw, tab2.raw, other.raw), ([b'"hi"'], [b'"hi"'], []))
        self.assertEqual(set(map(id, self.registry)), {id(tab1), id(tab2), id(other)})

    def test_remove_is_exact_and_idempotent(self) -> None:
        tab1, tab2 = FakeConnection("a"), FakeConnection("a")
        self.registry.add(tab1)
        self.registry.add(tab2)
        self.assertTrue(self.registry.remove(tab1))
        self.assertFalse(self.registry.remove(tab1))
        self.assertFalse(self.registry.remove(FakeConnection("zzz")))
        self.assertTrue(self.registry.is_online("a"))
        self.assertEqual(self.registry.connections("a"), [tab2])
        self.assertTrue(self.registry.remove(tab2))
        self.assertFalse(self.registry.is_online("a"))
        self.assertEqual((len(self.registry), self.registry.node_count()), (0, 0))

    def test_a_connection_may_leave_while_a_frame_is_being_sent(self) -> None:
        """A connection that closes itself inside send (queue overflow) does
        not make the registry skip the node's other connections."""
        registry = self.registry

        class Leaving(FakeConnection):
            def send(self, frame: bytes) -> None:
                super().send(frame)
                registry.remove(self)

        leaving, staying = Leaving("a"), FakeConnection("a")
        registry.add(leaving)
        registry.add(staying)
        self.assertEqual(registry.send("a", b'"x"'), 2)
        self.assertEqual(staying.raw, [b'"x"'])
        self.assertEqual(registry.connections("a"), [staying])

    def test_iterating_while_connections_leave(self) -> None:
        conns = [FakeConnection(f"n{i}") for i in range(5)]
        for conn in conns:
            self.registry.add(conn)
        seen = []
        for conn in self.registry:
            seen.append(conn)
            self.registry.remove(conn)
        self.assertEqual(len(seen), 5)
        self.assertEqual(len(self.registry), 0)
