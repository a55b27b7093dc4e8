"""The inbox and the router's durable path in one process: the memory store,
fake connections and a :class:`~twisted.internet.task.Clock`.

``tests/e2e/test_delivery.py`` proves the same rules against real server
processes and the SQLite store.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.envelope import FrameError, parse_frame
from allspark.delivery import Delivery
from allspark.inbox import DeliveryConfig, Inbox, fetch_rows
from allspark.registry import Registry
from allspark.router import Router, Sender
from allspark.store.memory import MemoryStore
from tests.fakes import FakeConnection

MINUTE = 60.0


class InboxTestCase(unittest.TestCase):
    """A router and inbox over a memory store, with helpers."""

    config = DeliveryConfig(retention_ms=3_600_000, dedup_window_ms=600_000, purge_interval_s=60.0)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.registry = Registry()
        self.inbox = Inbox(self.store, Delivery(self.registry, self.clock), self.clock, self.config)
        self.router = Router(self.inbox.delivery, self.store, self.inbox, self.clock)
        for node_id in ("alice", "bob", "carol"):
            self.store.remember_node(node_id, None, 0)

    def done(self, coro: Any) -> Any:
        """The result of a coroutine that must have finished already."""
        return self.successResultOf(defer.ensureDeferred(coro))

    def refused(self, coro: Any, code: str) -> FrameError:
        """The FrameError a coroutine failed with; its code must be ``code``."""
        failure = self.failureResultOf(defer.ensureDeferred(coro), FrameError)
        self.assertEqual(failure.value.code, code, failure.value.message)
        return failure.value

    def online(self, node_id: str) -> FakeConnection:
        conn = FakeConnection(node_id)
        self.registry.add(conn)
        return conn

    def send(self, sender: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Route ``frame`` from ``sender``; the ``accepted`` answer."""
        msg = parse_frame(orjson.dumps(frame))
        return orjson.loads(self.done(self.router.route(Sender(sender, None), msg)))

    def sync(self, conn: FakeConnection, after: int = 0, limit: int = 100,
             max_queued: int = 1 << 20) -> dict[str, Any]:
        return self.done(self.inbox.sync(conn, after, limit, max_queued))


class StoreBeforeAcceptTests(InboxTestCase):
    def test_offline_recipient_gets_it_stored_with_a_growing_seq(self) -> None:
        for n in range(3):
            answer = self.send("alice", {"dest_id": "bob", "id": f"m{n}", "payload": n})
            self.assertEqual((answer["status"], answer["recipients"], answer["live"]), ("stored", 1, 0))
        page = self.successResultOf(self.store.fetch_inbox("bob", 0, 10))
        self.assertEqual([m.seq for m in page.messages], [1, 2, 3])

    def test_live_recipient_gets_it_at_once_carrying_seq_and_it_stays_stored(self) -> None:
        bob = self.online("bob")
        answer = self.send("alice", {"dest_id": "bob", "payload": "hi"})
        self.assertEqual(answer["status"], "delivered")
        self.assertEqual([(f["seq"], f["payload"], f["src_id"]) for f in bob.frames], [(1, "hi", "alice")])
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (1, 0))

    def test_nothing_is_delivered_when_the_store_fails(self) -> None:
        bob = self.online("bob")

        def broken(*args: Any) -> Deferred[Any]:
            return defer.fail(RuntimeError("disk full"))

        self.store.append_inbox = broken  # type: ignore[method-assign]
        d = defer.ensureDeferred(self.router.route(Sender("alice", None),
                                                   parse_frame(b'{"dest_id":"bob","payload":1}')))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(bob.frames, [])

    def test_unknown_destination_is_refused(self) -> None:
        msg = parse_frame(b'{"dest_id":"nobody","id":"x","payload":1}')
        error = self.refused(self.router.route(Sender("alice", None), msg), "unknown_destination")
        self.assertEqual(error.frame_id, "x")

    def test_ephemeral_is_never_stored(self) -> None:
        answer = self.send("alice", {"dest_id": "bob", "payload": 1, "ephemeral": True})
        self.assertEqual((answer["status"], answer["live"]), ("dropped", 0))
        bob = self.online("bob")
        answer = self.send("alice", {"dest_id": "bob", "payload": 2, "ephemeral": True})
        self.assertEqual(answer["status"], "delivered")
        self.assertNotIn("seq", bob.frames[0])
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (0, 0))


class DeduplicationTests(InboxTestCase):
    def test_retry_is_stored_and_delivered_once_with_the_first_answer(self) -> None:
        first = self.send("alice", {"dest_id": "bob", "id": "r1", "payload": 1})
        bob = self.online("bob")  # the retry would now be "delivered": it is not delivered again
        retry = self.send("alice", {"dest_id": "bob", "id": "r1", "payload": 1})
        self.assertEqual(retry, first)
        self.assertEqual(bob.frames, [])
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (1, 0))

    def test_another_sender_with_the_same_id_is_another_message(self) -> None:
        self.send("alice", {"dest_id": "bob", "id": "r1", "payload": 1})
        self.send("carol", {"dest_id": "bob", "id": "r1", "payload": 1})
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (2, 0))

    def test_the_window_ends_after_ten_minutes(self) -> None:
        self.send("alice", {"dest_id": "bob", "id": "r1", "payload": 1})
        self.clock.advance(9 * MINUTE)
        self.send("alice", {"dest_id": "bob", "id": "r1", "payload": 1})
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (1, 0))
        self.clock.advance(1 * MINUTE)
        self.send("alice", {"dest_id": "bob", "id": "r1", "payload": 1})
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (2, 0))

    def test_messages_without_id_are_never_deduplicated(self) -> None:
        self.send("alice", {"dest_id": "bob", "payload": 1})
        self.send("alice", {"dest_id": "bob", "payload": 1})
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (2, 0))


class SyncTests(InboxTestCase):
    def fill(self, count: int) -> None:
        for n in range(count):
            self.send("alice", {"dest_id": "bob", "payload": n})

    def test_pages_in_order_until_more_is_false(self) -> None:
        self.fill(25)
        bob = FakeConnection("bob")
        frames = []
        after = 0
        for _ in range(10):
            synced = self.sync(bob, after, limit=10)
            frames.append((synced["upto"], synced["more"], synced["last_seq"]))
            if not synced["more"]:
                break
            after = synced["upto"]
        self.assertEqual(frames, [(10, True, 25), (20, True, 25), (25, False, 25)])
        self.assertEqual([f["seq"] for f in bob.frames], list(range(1, 26)))
        self.assertEqual([f["payload"] for f in bob.frames], list(range(25)))

    def test_an_exact_page_boundary_ends_with_an_empty_page(self) -> None:
        self.fill(10)
        bob = FakeConnection("bob")
        self.assertEqual(self.sync(bob, 0, limit=10)["more"], False)
        self.assertEqual(len(bob.frames), 10)

    def test_fully_acked_inbox_is_not_more_forever(self) -> None:
        """Regression: an inbox whose rows were all acked answered a sync
        from 0 with ``upto: 0, more: true``, and the client looped forever."""
        self.fill(5)
        self.done(self.inbox.ack("bob", 5))
        synced = self.sync(FakeConnection("bob"), 0)
        self.assertEqual((synced["upto"], synced["more"]), (5, False))

    def test_after_the_acked_part_starts_at_the_first_unacked(self) -> None:
        self.fill(5)
        self.done(self.inbox.ack("bob", 3))
        bob = FakeConnection("bob")
        synced = self.sync(bob, 0)
        self.assertEqual([f["seq"] for f in bob.frames], [4, 5])
        self.assertEqual((synced["upto"], synced["more"]), (5, False))
        self.assertNotIn("gap", synced)

    def test_a_new_node_syncs_nothing(self) -> None:
        synced = self.sync(FakeConnection("carol"), 0)
        self.assertEqual((synced["upto"], synced["more"], synced["last_seq"]), (0, False, 0))

    def test_a_cursor_beyond_the_last_seq_is_a_bad_cursor(self) -> None:
        self.fill(2)
        self.refused(self.inbox.sync(FakeConnection("bob"), 3, 10, 1 << 20), "bad_cursor")
        self.refused(self.inbox.sync(FakeConnection("carol"), 1, 10, 1 << 20), "bad_cursor")

    def test_a_full_send_queue_stops_the_page_early(self) -> None:
        self.fill(5)
        bob = FakeConnection("bob")
        bob.queued = 10_000
        synced = self.sync(bob, 0, max_queued=1000)
        self.assertEqual(bob.frames, [])
        self.assertEqual((synced["upto"], synced["more"]), (0, True))
        bob.queued = 0
        synced = self.sync(bob, 0, max_queued=1000)
        self.assertEqual((synced["upto"], synced["more"]), (5, False))


class BoundedSyncTests(InboxTestCase):
    """A sync reads the store a few rows at a time, and one that brings
    everything waits for a reader that is behind instead of queueing more."""

    def test_pages_are_read_a_few_rows_at_a_time(self) -> None:
        for n in range(10):
            self.send("alice", {"dest_id": "bob", "payload": n})
        reads: list[int] = []
        fetch = self.store.fetch_inbox

        def counting(node_id: str, after: int, limit: int) -> Deferred[Any]:
            reads.append(limit)
            return fetch(node_id, after, limit)

        self.store.fetch_inbox = counting  # type: ignore[method-assign]
        bob = FakeConnection("bob")
        synced = self.done(self.inbox.sync(bob, 0, 100, 1 << 20, rows=4))
        self.assertEqual((synced["upto"], synced["more"]), (10, False))
        self.assertEqual([f["seq"] for f in bob.frames], list(range(1, 11)))
        self.assertEqual(reads, [4, 4, 4])
        self.assertEqual(fetch_rows(1000, 64 * 1024), 16)  # 1 MiB of the largest messages
        self.assertEqual(fetch_rows(5, 64 * 1024), 5)

    def test_sync_all_waits_for_the_reader_to_drain_then_goes_on(self) -> None:
        for n in range(5):
            self.send("alice", {"dest_id": "bob", "payload": n})
        bob = FakeConnection("bob")
        bob.queued = 10_000  # a reader that is behind
        d = defer.ensureDeferred(self.inbox.sync_all(bob, 0, 2, max_queued=1000))
        self.assertNoResult(d)
        self.assertEqual(bob.frames, [])  # nothing more was queued for it
        bob.queued = 600  # not yet at half of max_queued
        self.assertEqual(bob.frames, [])
        bob.queued = 0
        synced = self.successResultOf(d)
        self.assertEqual([f["seq"] for f in bob.frames], [1, 2, 3, 4, 5])
        self.assertEqual((synced["upto"], synced["more"], synced["last_seq"]), (5, False, 5))

    def test_a_closing_connection_ends_sync_all(self) -> None:
        self.send("alice", {"dest_id": "bob", "payload": 1})
        bob = FakeConnection("bob")
        bob.queued = 10_000
        waiting: Deferred[None] = Deferred()
        bob.when_drained = lambda below: waiting  # type: ignore[method-assign]
        d = defer.ensureDeferred(self.inbox.sync_all(bob, 0, 2, max_queued=1000))
        waiting.errback(ConnectionDone("gone"))
        self.failureResultOf(d, ConnectionDone)


class AckTests(InboxTestCase):
    def test_ack_deletes_up_to_and_is_idempotent(self) -> None:
        for n in range(4):
            self.send("alice", {"dest_id": "bob", "payload": n})
        self.assertEqual(self.done(self.inbox.ack("bob", 2)), {"op": "acked", "upto": 2, "removed": 2})
        self.assertEqual(self.done(self.inbox.ack("bob", 2))["removed"], 0)
        self.assertEqual(self.done(self.inbox.ack("bob", 0))["removed"], 0)
        page = self.successResultOf(self.store.fetch_inbox("bob", 0, 10))
        self.assertEqual([m.seq for m in page.messages], [3, 4])

    def test_ack_beyond_the_last_seq_is_refused_and_deletes_nothing(self) -> None:
        self.send("alice", {"dest_id": "bob", "payload": 1})
        self.refused(self.inbox.ack("bob", 2), "bad_cursor")
        self.refused(self.inbox.ack("carol", 1), "bad_cursor")
        self.assertEqual(len(self.successResultOf(self.store.fetch_inbox("bob", 0, 10)).messages), 1)


class RetentionTests(InboxTestCase):
    def test_the_background_loop_purges_old_unacked_messages_and_sync_reports_the_gap(self) -> None:
        loop = self.inbox.retention_loop()
        loop.start(self.config.purge_interval_s, now=True)
        self.addCleanup(loop.stop)
        for n in range(3):
            self.send("alice", {"dest_id": "bob", "payload": n})
        self.clock.advance(59 * MINUTE)
        self.send("alice", {"dest_id": "bob", "payload": "young"})
        self.clock.advance(2 * MINUTE)  # the first three are past one hour; a purge ran
        bob = FakeConnection("bob")
        synced = self.sync(bob, 0)
        self.assertEqual([f["payload"] for f in bob.frames], ["young"])
        self.assertEqual(synced["gap"], {"after": 0, "upto": 3})
        self.assertEqual((synced["upto"], synced["more"]), (4, False))
        # a reader already past the gap is told nothing
        self.assertNotIn("gap", self.sync(FakeConnection("bob"), 3))

    def test_acked_messages_never_count_as_a_gap(self) -> None:
        for n in range(3):
            self.send("alice", {"dest_id": "bob", "payload": n})
        self.done(self.inbox.ack("bob", 3))
        self.clock.advance(2 * 60 * MINUTE)
        self.successResultOf(self.inbox.purge())
        self.assertNotIn("gap", self.sync(FakeConnection("bob"), 0))

    def test_purge_ends_the_dedup_window_entries(self) -> None:
        self.send("alice", {"dest_id": "bob", "id": "r1", "payload": 1})
        self.clock.advance(11 * MINUTE)
        self.successResultOf(self.inbox.purge())
        self.assertEqual(self.store._dedup, {})

    def test_a_failing_purge_does_not_stop_the_loop(self) -> None:
        calls = []

        def broken(*args: Any) -> Deferred[int]:
            calls.append(args)
            return defer.fail(RuntimeError("locked"))

        self.store.purge = broken  # type: ignore[method-assign]
        loop = self.inbox.retention_loop()
        loop.start(self.config.purge_interval_s, now=True)
        self.addCleanup(loop.stop)
        self.clock.advance(self.config.purge_interval_s)
        self.assertEqual(len(calls), 2)
        self.assertTrue(loop.running)
        self.flushLoggedErrors(RuntimeError)


class ArrivalOrderTests(InboxTestCase):
    """Messages from one sender to one node are stored in arrival order even
    while the store lookup of an unknown-yet node is slow."""

    def test_messages_that_skip_the_lookup_wait_for_the_one_in_flight(self) -> None:
        slow: list[Deferred[Any]] = []
        real_get_node = self.store.get_node

        def get_node(node_id: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            slow.append(d)
            real_get_node(node_id).addCallback(lambda r: slow.append(r))
            return d

        self.store.get_node = get_node  # type: ignore[method-assign]
        routed = [defer.ensureDeferred(self.router.route(
            Sender("alice", None), parse_frame(orjson.dumps({"dest_id": "bob", "payload": n}))))
            for n in range(2)]
        bob = self.online("bob")  # online now: a new message needs no lookup at all
        routed.append(defer.ensureDeferred(self.router.route(
            Sender("alice", None), parse_frame(b'{"dest_id":"bob","payload":2}'))))
        self.assertEqual(len([d for d in slow if isinstance(d, Deferred)]), 1)
        self.assertFalse(any(d.called for d in routed))
        slow[0].callback(slow[1])
        for d in routed:
            self.successResultOf(d)
        self.assertEqual([(f["seq"], f["payload"]) for f in bob.frames], [(1, 0), (2, 1), (3, 2)])

    def test_a_failed_lookup_fails_its_message_and_the_next_one_looks_up_again(self) -> None:
        pending: list[Deferred[Any]] = []

        def get_node(node_id: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        self.store.get_node = get_node  # type: ignore[method-assign]
        frame = parse_frame(b'{"dest_id":"bob","payload":1}')
        first, second = (defer.ensureDeferred(self.router.route(Sender("alice", None), frame)) for _ in range(2))
        self.assertEqual(len(pending), 1)  # the second waits behind the first
        pending[0].errback(RuntimeError("store down"))
        self.failureResultOf(first, RuntimeError)
        self.assertNoResult(second)
        self.assertEqual(len(pending), 2)
        pending[1].callback(("bob", None))
        self.assertEqual(orjson.loads(self.successResultOf(second))["status"], "stored")

    def test_any_number_of_messages_can_wait_behind_a_lookup(self) -> None:
        pending: list[Deferred[Any]] = []
        real_get_node = self.store.get_node

        def get_node(node_id: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            real_get_node(node_id).addCallback(lambda r: pending.append(r))
            return d

        self.store.get_node = get_node  # type: ignore[method-assign]
        routed = [defer.ensureDeferred(self.router.route(
            Sender("alice", None), parse_frame(orjson.dumps({"dest_id": "bob", "payload": n}))))
            for n in range(5000)]
        pending[0].callback(pending[1])
        self.assertEqual([orjson.loads(self.successResultOf(d))["status"] for d in routed[-2:]],
                         ["stored", "stored"])
        page = self.successResultOf(self.store.fetch_inbox("bob", 0, 5000))
        self.assertEqual([orjson.loads(m.body)["payload"] for m in page.messages], list(range(5000)))


class QuotaTests(InboxTestCase):
    """--max-inbox-per-sender and --max-inbox through the router and inbox."""

    config = DeliveryConfig(retention_ms=3_600_000, dedup_window_ms=600_000, purge_interval_s=60.0,
                            max_inbox_per_sender=3, max_inbox=5)

    def route(self, sender: str, frame: dict[str, Any]) -> Deferred[bytes]:
        return self.router.route(Sender(sender, None), parse_frame(orjson.dumps(frame)))

    def test_a_flooding_sender_gets_inbox_full_and_others_still_get_through(self) -> None:
        bob = self.online("bob")
        for n in range(3):
            self.send("alice", {"dest_id": "bob", "id": f"a{n}", "payload": n})
        error = self.refused(self.route("alice", {"dest_id": "bob", "id": "a3", "payload": 3}),
                             "inbox_full")
        self.assertEqual(error.frame_id, "a3")
        self.assertIn("3 unacked messages from you", error.message)
        self.assertEqual(len(bob.frames), 3)  # the refused message was neither stored nor delivered
        self.assertEqual(self.send("carol", {"dest_id": "bob", "payload": "c"})["status"], "delivered")
        self.assertEqual(self.send("carol", {"dest_id": "bob", "payload": "c"})["status"], "delivered")
        error = self.refused(self.route("carol", {"dest_id": "bob", "payload": "c"}), "inbox_full")
        self.assertIn("5 unacked messages", error.message)
        # a retry of a stored message still gets its first answer
        retry = self.send("alice", {"dest_id": "bob", "id": "a1", "payload": 1})
        self.assertEqual(retry["id"], "a1")
        # bob acks: alice may send again
        self.assertEqual(self.done(self.inbox.ack("bob", 2))["removed"], 2)
        self.assertEqual(self.send("alice", {"dest_id": "bob", "id": "a3", "payload": 3})["status"],
                         "delivered")

    def test_a_user_wide_message_is_refused_whole_when_one_device_is_full(self) -> None:
        for node_id in ("phone", "laptop"):
            self.store.remember_node(node_id, "dave", 0)
        for n in range(3):
            self.send("alice", {"dest_id": "phone", "payload": n})
        self.refused(self.route("alice", {"dest_client_id": "dave", "payload": "x"}), "inbox_full")
        self.assertEqual(self.successResultOf(self.store.inbox_state("laptop")), (0, 0))
