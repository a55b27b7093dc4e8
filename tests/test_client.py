"""The Python client's delivery logic without a network: de-duplication by
seq, automatic and manual acks, sync paging and gaps.

A fake protocol records what the client writes; frames from the "server" are
fed to :meth:`Client._frame`; time is a :class:`~twisted.internet.task.Clock`.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.client import MAX_STALLED_PAGES, AllsparkError, Client, _Stream


class FakeProtocol:
    """Stands in for the WebSocket: records every frame the client writes."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def sendMessage(self, data: bytes) -> None:
        self.sent.append(orjson.loads(data))


class StreamTests(unittest.TestCase):
    def test_accept_once_and_watermark_follows_the_contiguous_prefix(self) -> None:
        s = _Stream()
        self.assertTrue(s.accept(1))
        self.assertFalse(s.accept(1))
        self.assertTrue(s.accept(3))
        self.assertEqual((s.watermark, s.seen), (1, {3}))
        self.assertFalse(s.accept(3))
        self.assertTrue(s.accept(2))
        self.assertEqual((s.watermark, s.seen), (3, set()))

    def test_skip_to_covers_everything_below_and_keeps_what_is_above(self) -> None:
        s = _Stream()
        s.accept(7)
        s.skip_to(5)
        self.assertEqual(s.watermark, 5)
        self.assertFalse(s.accept(4))
        self.assertTrue(s.accept(6))
        self.assertEqual((s.watermark, s.seen), (7, set()))
        s.skip_to(2)  # never moves back
        self.assertEqual(s.watermark, 7)


class ClientTestCase(unittest.TestCase):
    auto_ack = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = self.make()

    def make(self, **options: Any) -> Client:
        client = Client(self.clock, auto_ack=options.pop("auto_ack", self.auto_ack), **options)
        self.proto = FakeProtocol()
        client.protocol = self.proto  # type: ignore[assignment]
        client._frame({"op": "hello", "node_id": "bob"})
        return client

    def deliver(self, seq: int, **fields: Any) -> None:
        self.client._frame({"src_id": "alice", "payload": seq, "seq": seq, **fields})

    def handed(self) -> list[int]:
        got = [m["seq"] for m in self.client.messages.pending]
        self.client.messages.pending.clear()
        return got

    def acks(self) -> list[int]:
        return [f["upto"] for f in self.proto.sent if f.get("op") == "ack"]

    def answer(self, **frame: Any) -> None:
        """Answer the last request the client sent."""
        request = self.proto.sent[-1]
        self.client._frame({"id": request["id"], **frame})


class DeduplicationTests(ClientTestCase):
    def test_a_seq_is_handed_to_the_app_once(self) -> None:
        for seq in (1, 2, 2, 1, 3):
            self.deliver(seq)
        self.assertEqual(self.handed(), [1, 2, 3])
        self.assertEqual(self.client.received, 3)

    def test_live_then_synced_copies_are_dropped(self) -> None:
        self.deliver(4)  # live, while the backlog 1..3 is not synced yet
        d = defer.ensureDeferred(self.client.sync())
        self.assertEqual(self.proto.sent[-1]["after"], 0)
        for seq in (1, 2, 3, 4):
            self.deliver(seq)
        self.answer(op="synced", upto=4, more=False, last_seq=4)
        self.answer(op="sync_done", upto=4, sessions=0)
        self.assertEqual(self.successResultOf(d), 3)
        self.assertEqual(self.handed(), [4, 1, 2, 3])

    def test_messages_without_seq_are_never_deduplicated(self) -> None:
        for _ in range(2):
            self.client._frame({"src_id": "alice", "payload": "typing", "ephemeral": True})
        self.assertEqual(len(self.client.messages.pending), 2)

    def test_inbox_after_skips_what_an_earlier_run_processed(self) -> None:
        self.client = self.make(inbox_after=5)
        d = defer.ensureDeferred(self.client.sync())
        self.assertEqual(self.proto.sent[-1]["after"], 5)
        for seq in (5, 6):
            self.deliver(seq)
        self.answer(op="synced", upto=6, more=False, last_seq=6)
        self.answer(op="sync_done", upto=6, sessions=0)
        self.successResultOf(d)
        self.assertEqual(self.handed(), [6])


class AutoAckTests(ClientTestCase):
    def test_acks_are_batched_after_the_delay(self) -> None:
        for seq in (1, 2, 3):
            self.deliver(seq)
        self.assertEqual(self.acks(), [])
        self.clock.advance(self.client.ack_delay)
        self.assertEqual(self.acks(), [3])
        self.clock.advance(1)
        self.assertEqual(self.acks(), [3])  # nothing new: no second ack

    def test_only_the_contiguous_prefix_is_acked(self) -> None:
        self.deliver(1)
        self.deliver(3)  # 2 is missing: acking 3 would delete 2 unseen
        self.clock.advance(self.client.ack_delay)
        self.assertEqual(self.acks(), [1])
        self.deliver(2)
        self.clock.advance(self.client.ack_delay)
        self.assertEqual(self.acks(), [1, 3])

    def test_no_ack_after_the_connection_closed(self) -> None:
        self.deliver(1)
        self.client._closed(1006, "gone")
        self.clock.advance(1)
        self.assertEqual(self.acks(), [])


class ManualAckTests(ClientTestCase):
    auto_ack = False

    def test_nothing_is_acked_unless_the_app_acks(self) -> None:
        for seq in (1, 2):
            self.deliver(seq)
        self.clock.advance(10)
        self.assertEqual(self.acks(), [])
        d = self.client.ack(2)
        self.assertEqual(self.acks(), [2])
        self.answer(op="acked", upto=2, removed=2)
        self.assertEqual(self.successResultOf(d)["removed"], 2)

    def test_an_error_answer_fails_the_request(self) -> None:
        d = self.client.ack(9)
        self.answer(op="error", code="bad_cursor", message="beyond")
        failure = self.failureResultOf(d, AllsparkError)
        self.assertEqual(failure.value.code, "bad_cursor")


class SyncTests(ClientTestCase):
    auto_ack = False

    def deliver_row(self, session_id: str, session_seq: int) -> None:
        self.client._frame({"src_id": "alice", "payload": session_seq, "session_seq": session_seq,
                            "dest_session_id": session_id})

    def test_a_session_pages_until_more_is_false(self) -> None:
        self.client._joined("s1", {"joined_seq": 0, "acked_seq": 0})
        d = defer.ensureDeferred(self.client.sync("s1", limit=2))
        for upto, more in ((2, True), (4, True), (5, False)):
            request = self.proto.sent[-1]
            self.assertEqual((request["op"], request["limit"], request["session_id"]), ("sync", 2, "s1"))
            for seq in range(request.get("after", 0) + 1, upto + 1):
                self.deliver_row("s1", seq)
            self.answer(op="synced", session_id="s1", upto=upto, more=more, last_seq=5)
        self.assertEqual(self.successResultOf(d), 5)
        self.assertEqual([f.get("after") for f in self.proto.sent], [None, 2, 4])
        self.assertEqual(len(self.client.messages.pending), 5)

    def test_one_sync_brings_the_inbox_and_every_session_part(self) -> None:
        d = defer.ensureDeferred(self.client.sync())
        request = self.proto.sent[-1]
        self.assertEqual((request["op"], request["after"]), ("sync", 0))
        self.assertNotIn("session_id", request)
        self.deliver(1)
        self.answer(op="synced", upto=1, more=False, last_seq=1)
        self.deliver_row("s1", 4)  # rows 1-3 were acked before, or are this node's own
        self.answer(op="synced", session_id="s1", upto=5, more=False, last_seq=5)
        self.deliver_row("s2", 1)
        self.answer(op="synced", session_id="s2", upto=1, more=False, last_seq=1)
        self.assertNoResult(d)  # the parts do not answer the request
        self.deliver_row("s1", 4)  # a live copy of something synced: a duplicate
        self.answer(op="sync_done", upto=1, sessions=2)
        self.assertEqual(self.successResultOf(d), 3)
        self.assertEqual({k: v.watermark for k, v in self.client._streams.items()},
                         {None: 1, "s1": 5, "s2": 1})
        self.assertEqual(len(self.proto.sent), 1)  # one request: no my_sessions, no per-session sync

    def test_a_gap_is_recorded_and_skipped(self) -> None:
        d = defer.ensureDeferred(self.client.sync())
        self.deliver(6)
        self.answer(op="synced", upto=6, more=False, last_seq=6, gap={"after": 0, "upto": 5})
        self.answer(op="sync_done", upto=6, sessions=0)
        self.successResultOf(d)
        self.assertEqual(self.client.gaps, [{"after": 0, "upto": 5}])
        self.deliver(3)  # a late copy from below the gap is not handed over
        self.assertEqual(self.handed(), [6])

    def test_a_page_without_progress_waits_then_retries_and_gives_up_bounded(self) -> None:
        self.client._joined("s1", {"joined_seq": 2, "acked_seq": 2})
        d = defer.ensureDeferred(self.client.sync("s1"))
        self.answer(op="synced", session_id="s1", upto=2, more=True, last_seq=3)  # the server's queue is full
        self.assertEqual(len(self.proto.sent), 1)  # it waits before asking again
        self.clock.advance(0.05)
        self.assertEqual(len(self.proto.sent), 2)
        for _ in range(MAX_STALLED_PAGES):
            self.answer(op="synced", session_id="s1", upto=2, more=True, last_seq=3)
            self.clock.advance(0.05)
        failure = self.failureResultOf(d, AllsparkError)
        self.assertEqual(failure.value.code, "sync_stalled")
        self.assertLessEqual(len(self.proto.sent), MAX_STALLED_PAGES + 3)

    def test_a_closed_connection_fails_the_sync(self) -> None:
        d = defer.ensureDeferred(self.client.sync())
        self.client._closed(1006, "gone")
        self.failureResultOf(d)
