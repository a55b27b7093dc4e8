"""Unit tests of allspark.revocations: the per-server cache of revoked nodes
in front of the store, and the server closing a revoked node's connections."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from allspark.revocations import REVOCATION_CACHE_S, Revocations
from allspark.store.memory import MemoryStore


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def revoked_until(self, node_id: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().revoked_until(node_id)


class RevocationsTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.store = CountingStore()
        self.revocations = Revocations(self.store, self.clock)

    async def test_a_revocation_is_stored_cached_and_ends_on_time(self) -> None:
        until = 1_010_000  # ms: 10 s from now
        await self.revocations.revoke("bob", until)
        self.assertEqual(await self.store.revoked_until("bob"), until)
        self.assertEqual(await self.revocations.until("bob"), until)
        self.assertTrue(self.revocations.revoked_now(until))
        self.clock.advance(10.001)
        self.assertFalse(self.revocations.revoked_now(until))

    async def test_answers_are_cached_for_a_while_then_read_again(self) -> None:
        self.assertEqual(await self.revocations.until("bob"), 0)
        self.assertEqual(await self.revocations.until("bob"), 0)
        self.assertEqual(self.store.reads, 1)
        await self.store.revoke_node("bob", 2_000_000)  # another server revoked it; no frame reached us
        self.clock.advance(REVOCATION_CACHE_S + 0.1)
        self.assertIsNone(self.revocations.cached_until("bob"))
        self.assertEqual(await self.revocations.until("bob"), 2_000_000)
        self.assertEqual(self.store.reads, 2)

    def test_a_note_from_a_peer_replaces_the_cached_answer(self) -> None:
        self.revocations.note("bob", 0)
        self.revocations.note("bob", 1_500_000)
        self.assertEqual(self.revocations.cached_until("bob"), 1_500_000)

    def test_the_cache_is_bounded(self) -> None:
        small = Revocations(self.store, self.clock, size=2)
        for node_id in ("a", "b", "c"):
            small.note(node_id, 0)
        self.assertIsNone(small.cached_until("a"))
        self.assertEqual(small.cached_until("c"), 0)

    async def test_a_store_without_revocations_refuses_nobody(self) -> None:
        class Older:
            pass

        older = Revocations(Older(), self.clock)  # type: ignore[arg-type]
        self.assertEqual(await older.until("bob"), 0)
