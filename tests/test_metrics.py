"""allspark.metrics: the plain numbers the hot paths keep, and how a scrape reads them."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.delivery import Delivery
from allspark.envelope import encode, error_frame
from allspark.inbox import Inbox
from allspark.metrics import (
    OUT_KINDS, Distribution, FrameCounts, ServerCollector, frame_kind, metrics_registry, out_key,
)
from allspark.registry import Registry
from allspark.store.memory import MemoryStore
from allspark.store.sqlite import SQLiteStore
from tests.fakes import FakeConnection


def samples_of(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class DistributionTests(unittest.TestCase):
    def test_buckets_are_cumulative_and_inclusive(self) -> None:
        depths = Distribution((0, 1, 10))
        for value in (0, 1, 1, 5, 10, 11):
            depths.observe(value)
        self.assertEqual(depths.count, 6)
        family = depths.family("allspark_x", "x")
        got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        self.assertEqual(got[("allspark_x_bucket", "0")], 1)
        self.assertEqual(got[("allspark_x_bucket", "1")], 3)
        self.assertEqual(got[("allspark_x_bucket", "10")], 5)
        self.assertEqual(got[("allspark_x_bucket", "+Inf")], 6)
        self.assertEqual(got[("allspark_x_count", None)], 6)
        self.assertEqual(got[("allspark_x_sum", None)], 28)

    def test_fractional_bounds_keep_their_digits(self) -> None:
        family = Distribution((0.0005, 1.0)).family("allspark_s", "s")
        self.assertEqual([s.labels.get("le") for s in family.samples if s.name.endswith("_bucket")],
                         ["0.0005", "1", "+Inf"])


class FrameKindTests(unittest.TestCase):
    def test_op_frames_count_by_op_and_copies_as_messages(self) -> None:
        self.assertEqual(frame_kind(out_key(encode({"op": "accepted", "id": "1"}))), "accepted")
        for op in OUT_KINDS:  # 9 bytes tell every op apart
            self.assertEqual(frame_kind(out_key(encode({"op": op, "id": "1"}))), op)
            self.assertEqual(frame_kind(out_key(encode({"op": op}))), op)
        self.assertEqual(frame_kind(out_key(error_frame("bad_frame", "no"))), "error")
        self.assertEqual(frame_kind(out_key(b'{"seq":3,"dest_id":"bob","src_id":"a"}')), "message")
        self.assertEqual(frame_kind(out_key(b'{"dest_id":"bob","src_id":"a","ephemeral":true}')), "message")
        self.assertEqual(frame_kind(out_key(b'{"session_seq":9,"src_id":"a"}')), "message")

    def test_an_unknown_op_is_other_so_labels_stay_bounded(self) -> None:
        self.assertEqual(frame_kind(out_key(encode({"op": "x" * 50}))), "other")
        self.assertEqual(frame_kind(b"\xff\xfe"), "other")


class InboxCountsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.registry = Registry()
        self.inbox = Inbox(self.store, Delivery(self.registry, self.clock), self.clock)

    def test_stored_delivered_live_acked_and_depth_at_sync(self) -> None:
        self.registry.add(FakeConnection("bob"))
        d = self.inbox.store_and_deliver("alice", "m1", ["bob", "carol"], b'{"src_id":"alice"}', b"ok")
        self.assertEqual(self.successResultOf(d), b"ok")
        self.successResultOf(self.inbox.store_and_deliver("alice", "m1", ["bob", "carol"], b'{"a":1}', b"ok"))
        # a retry counts nothing
        self.assertEqual((self.inbox.copies_stored, self.inbox.copies_live), (2, 1))
        carol = FakeConnection("carol")
        synced = self.successResultOf(defer.ensureDeferred(self.inbox.sync_all(carol, 0, 10, 1 << 20)))
        self.assertEqual(synced["upto"], 1)
        self.assertEqual((self.inbox.depths.count, self.inbox.depths.sum), (1, 1))
        self.successResultOf(defer.ensureDeferred(self.inbox.ack("carol", 1)))
        self.assertEqual(self.inbox.copies_acked, 1)


class StoreBatchTests(unittest.TestCase):
    def test_sqlite_observes_each_batch(self) -> None:
        from twisted.internet import reactor

        store = SQLiteStore(os.path.join(tempfile.mkdtemp(prefix="allspark-metrics-"), "a.db"), reactor)

        async def run() -> None:
            await store.start()
            await defer.gatherResults([store.remember_node(f"n{i}", None, 0) for i in range(3)])
            await store.close()

        d = defer.ensureDeferred(run())

        def check(_: object) -> None:
            assert store.batch_sizes is not None and store.batch_seconds is not None
            self.assertGreaterEqual(store.batch_sizes.count, 1)
            self.assertEqual(store.batch_sizes.count, store.batch_seconds.count)
            self.assertGreaterEqual(store.batch_sizes.sum, 3)

        return d.addCallback(check)


class CollectorTests(unittest.TestCase):
    def server(self, **extra: Any) -> Any:
        registry = Registry()
        registry.add(FakeConnection("a"))
        registry.add(FakeConnection("a"))
        inbox = Inbox(MemoryStore(), Delivery(registry, Clock()), Clock())
        inbox.copies_stored, inbox.copies_acked = 5, 2
        fields = dict(registry=registry, inbox=inbox, store=MemoryStore(), mesh=None, draining=False,
                      starting=False, sessions=SimpleNamespace(rows_stored=3))
        fields.update(extra)
        return SimpleNamespace(**fields)

    def test_reads_the_numbers_at_scrape_time(self) -> None:
        counts = FrameCounts()
        server = self.server()
        registry = metrics_registry(ServerCollector(server, counts))
        counts.messages_in = 4
        counts.frames_in.update(sync=1, over_rate=2)
        counts.copies_out = 7
        counts.frames_out.update({b'accepted"': 4, b'synced","': 1, b'made_up",': 1})
        counts.errors.update(rate_limited=2, inbox_full=1, bad_frame=3)
        counts.closes.update({4008: 1, 1008: 2})
        counts.refused_handshakes.update(too_many_connections=5)
        got = samples_of(registry)
        self.assertEqual(got[("allspark_connections", ())], 2)
        self.assertEqual(got[("allspark_connected_nodes", ())], 1)
        self.assertEqual(got[("allspark_frames_in_total", (("kind", "message"),))], 4)
        self.assertEqual(got[("allspark_frames_out_total", (("kind", "message"),))], 7)
        self.assertEqual(got[("allspark_frames_out_total", (("kind", "other"),))], 1)
        self.assertEqual(got[("allspark_messages_total", (("stage", "accepted"),))], 4)
        self.assertEqual(got[("allspark_messages_total", (("stage", "stored"),))], 5)
        self.assertEqual(got[("allspark_messages_total", (("stage", "acked"),))], 2)
        self.assertEqual(got[("allspark_messages_total", (("stage", "session_stored"),))], 3)
        self.assertEqual(got[("allspark_sync_pages_total", ())], 1)
        self.assertEqual(got[("allspark_errors_total", (("code", "bad_frame"),))], 3)
        self.assertEqual(got[("allspark_refusals_total", (("reason", "rate_limited"),))], 2)
        self.assertEqual(got[("allspark_refusals_total", (("reason", "inbox_full"),))], 1)
        self.assertEqual(got[("allspark_refusals_total", (("reason", "too_many_connections"),))], 5)
        self.assertEqual(got[("allspark_send_queue_overflows_total", ())], 1)
        self.assertEqual(got[("allspark_policy_closes_total", (("code", "1008"),))], 2)
        self.assertNotIn(("allspark_peer_links", ()), got)  # no mesh, no peer metrics
        self.assertNotIn(("allspark_push_notifications_total", (("outcome", "sent"), ("provider", "fcm"))), got)
        counts.messages_in += 1  # read again at the next scrape
        self.assertEqual(samples_of(registry)[("allspark_frames_in_total", (("kind", "message"),))], 5)

    def test_peer_links_and_push_outcomes_when_there_are_some(self) -> None:
        mesh = SimpleNamespace(links={"s2": object(), "s3": object()}, peer_frames_in=3, peer_frames_out=4,
                               peer_overflows=0)
        push = Counter({("fcm", "sent"): 3, ("webhook", "dead_token"): 1})
        registry = metrics_registry(ServerCollector(self.server(mesh=mesh), FrameCounts(), lambda: push))
        got = samples_of(registry)
        self.assertEqual(got[("allspark_peer_links", ())], 2)
        self.assertEqual(got[("allspark_peer_frames_total", (("direction", "out"),))], 4)
        self.assertEqual(got[("allspark_push_notifications_total", (("outcome", "sent"), ("provider", "fcm")))], 3)
        self.assertEqual(
            got[("allspark_push_notifications_total", (("outcome", "dead_token"), ("provider", "webhook")))], 1)

    def test_each_server_has_its_own_registry(self) -> None:
        first = metrics_registry(ServerCollector(self.server(), FrameCounts()))
        second = metrics_registry(ServerCollector(self.server(), FrameCounts()))
        self.assertEqual(samples_of(first), samples_of(second))  # no "duplicated timeseries" refusal
