"""The store contract, written once and run against every backend.

:class:`StoreContract` holds the behaviour every :class:`~allspark.store.Store`
must have (the docstrings of ``allspark/store/__init__.py`` are the spec); the
``*ContractTests`` classes at the bottom bind it to the memory, SQLite and
MongoDB backends.  MongoDB runs only when ``ALLSPARK_TEST_MONGODB_URI`` names a
server.  SQLite-only behaviour (durability, several processes on one file,
group commit, schema versions) and ``open_store`` URL parsing follow.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import replace
from typing import Any, Awaitable, Callable, Coroutine

import orjson
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from allspark.inbox import send_page
from allspark.store import (
    LocationRecord,
    ServerRecord,
    AppendResult,
    DuplicateSession,
    InboxFull,
    InboxPage,
    InboxQuota,
    MemberRecord,
    PushJob,
    PushTarget,
    SessionFull,
    SessionRecord,
    Store,
    StoreError,
    StreamQuota,
    open_store,
)
from allspark.store.memory import MemoryStore
from tests.store.postgres_cluster import database_for
from tests.fakes import FakeConnection
from tests.store import nx27017, seq_writer

WINDOW = 600_000  # the de-duplication window the router uses: 10 minutes
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seq_writer.py")
PUSH_CLAIMER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "push_claimer.py")
#: Bounds of the multi-process sync loop: pages per reader, and seconds.
SYNC_STEPS = 200_000
SYNC_DEADLINE_S = 180.0
SYNC_PAGE = 50
MONGO_SKIP = "MongoDB tests skipped: set ALLSPARK_TEST_MONGODB_URI=mongodb://host:port to run them"


def inline(
    fn: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], defer.Deferred[None]]:
    """Run an ``async def`` test method as a Deferred-returning trial test."""

    @functools.wraps(fn)
    def wrapper(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(fn(self))

    return wrapper


def temp_dir(case: TestCase) -> str:
    """A new directory outside the working tree, removed when ``case`` ends."""
    path = tempfile.mkdtemp(prefix="allspark-store-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def fcm_target(node_id: str, token: str = "tok-1", registered: int = 1) -> PushTarget:
    """An FCM push target for ``node_id``."""
    return PushTarget(node_id, "fcm", token, None, None, None, registered)


def seqs_of(page: InboxPage) -> list[int]:
    """The seqs of a page's messages."""
    return [m.seq for m in page.messages]


class StoreContract:
    """The tests every backend passes.  Mixed into a trial ``TestCase``."""

    store: Store

    # -- to be provided by each backend's class -------------------------------
    async def make_store(self) -> Store:
        """A new, unstarted, empty store."""
        raise NotImplementedError

    # -- fixture ------------------------------------------------------------------
    def setUp(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._set_up())

    async def _set_up(self) -> None:
        self.store = await self.make_store()
        await self.store.start()
        self.addCleanup(self.store.close)  # type: ignore[attr-defined]

    async def append(
        self,
        recipients: list[str],
        body: bytes = b'{"x":1}',
        now: int = 1000,
        sender: str = "sender",
        dedup_id: str | None = None,
        answer: bytes = b"",
        window: int = WINDOW,
        quota: InboxQuota | None = None,
    ) -> AppendResult:
        """``append_inbox`` with defaults."""
        return await self.store.append_inbox(
            sender, dedup_id, recipients, body, answer, now, window, quota
        )

    async def refused(self, recipients: list[str], quota: InboxQuota, sender: str = "sender",
                      dedup_id: str | None = None) -> InboxFull:
        """``append_inbox`` that must fail with :class:`InboxFull`; the error."""
        try:
            result = await self.append(recipients, sender=sender, dedup_id=dedup_id, quota=quota)
        except InboxFull as e:
            return e
        raise AssertionError(f"append to {recipients} by {sender} was not refused: {result}")

    async def session_with(self, session_id: str = "s1", owner: str = "owner") -> SessionRecord:
        """Create a session with the usual options."""
        options = {
            "anonymous": False,
            "anyone_can_join": True,
            "session_type": "group",
            "master_id": None,
        }
        return await self.store.create_session(session_id, owner, options, 500)

    async def say(self, sender: str, body: bytes, session_id: str = "s1", now: int = 1000) -> int:
        """Append one session-stream row; its seq."""
        result = await self.store.append_session(session_id, sender, None, body, b"", now, WINDOW)
        return result.seqs[session_id]

    # -- life cycle ---------------------------------------------------------------
    def test_is_a_store(self) -> None:
        """Every backend satisfies the runtime-checkable protocol."""
        self.assertIsInstance(self.store, Store)  # type: ignore[attr-defined]

    # -- nodes --------------------------------------------------------------------
    @inline
    async def test_nodes(self) -> None:
        """remember_node records a node's client; a later client moves it."""
        self.assertIsNone(await self.store.get_node("n1"))
        await self.store.remember_node("n2", "c1", 1)
        await self.store.remember_node("n1", "c1", 1)
        await self.store.remember_node("n3", None, 1)
        self.assertEqual(await self.store.get_node("n1"), ("n1", "c1"))
        self.assertEqual(await self.store.get_node("n3"), ("n3", None))
        self.assertEqual(await self.store.nodes_of_client("c1"), ["n1", "n2"])
        await self.store.remember_node("n2", "c2", 2)
        self.assertEqual(await self.store.nodes_of_client("c1"), ["n1"])
        self.assertEqual(await self.store.nodes_of_client("c2"), ["n2"])
        self.assertEqual(await self.store.nodes_of_client("nobody"), [])

    # -- server records -------------------------------------------------------------
    @inline
    async def test_server_records_are_claimed_by_compare_and_set(self) -> None:
        """put_server writes only over the holder it expects (None: no record);
        the holder alone rewrites or removes it; records list by server_id."""
        a = ServerRecord("s-b", "host/1/x", "127.0.0.1", 8081, None, "ws", 100, 0, "live", 1000, 900)
        self.assertIsNone(await self.store.get_server("s-b"))
        self.assertTrue(await self.store.put_server(a, None))
        self.assertFalse(await self.store.put_server(replace(a, holder="other/2/y"), None))  # taken
        self.assertEqual(await self.store.get_server("s-b"), a)
        beat = replace(a, connections=7, state="draining", heartbeat_ms=4000)
        self.assertFalse(await self.store.put_server(beat, "other/2/y"))  # not its holder
        self.assertTrue(await self.store.put_server(beat, "host/1/x"))
        forced = replace(a, holder="host/3/z", proxy_address="wss://chat.example.com", heartbeat_ms=5000)
        self.assertTrue(await self.store.put_server(forced, "host/1/x"))  # --force takes it over
        self.assertFalse(await self.store.put_server(beat, "host/1/x"))  # the old holder lost it
        other = replace(a, server_id="s-a", holder="h/4/w", port=8080)
        self.assertTrue(await self.store.put_server(other, None))
        self.assertEqual(await self.store.list_servers(), [other, forced])
        self.assertFalse(await self.store.remove_server("s-b", "host/1/x"))
        self.assertTrue(await self.store.remove_server("s-b", "host/3/z"))
        self.assertIsNone(await self.store.get_server("s-b"))
        self.assertEqual(await self.store.list_servers(), [other])

    # -- locations -------------------------------------------------------------------
    @inline
    async def test_locations_are_per_connection_and_dropped_by_server(self) -> None:
        """A location is one connection (node, server, epoch): writing it twice
        keeps one, removing it leaves the node's other connections, and
        drop_locations deletes every location of one server only."""
        self.assertEqual(await self.store.list_locations(), [])
        a1 = LocationRecord("n1", "s-a", 1)
        a2 = LocationRecord("n1", "s-a", 2)
        b1 = LocationRecord("n1", "s-b", 1)
        other = LocationRecord("n2", "s-a", 3)
        for record in (a2, b1, other, a1, a1):
            await self.store.put_location(record)
        self.assertEqual(await self.store.list_locations(), [a1, a2, b1, other])
        self.assertTrue(await self.store.remove_location(a1))
        self.assertFalse(await self.store.remove_location(a1))  # already gone
        self.assertFalse(await self.store.remove_location(LocationRecord("n1", "s-b", 9)))  # another epoch
        self.assertEqual(await self.store.list_locations(), [a2, b1, other])
        self.assertEqual(await self.store.drop_locations("s-a"), 2)
        self.assertEqual(await self.store.list_locations(), [b1])
        self.assertEqual(await self.store.drop_locations("s-a"), 0)

    # -- inbox --------------------------------------------------------------------
    @inline
    async def test_seq_is_per_recipient_and_only_grows(self) -> None:
        """Each inbox counts on its own; acking everything never lets a seq be reused."""
        self.assertEqual((await self.append(["a"])).seqs, {"a": 1})
        self.assertEqual((await self.append(["a"])).seqs, {"a": 2})
        self.assertEqual((await self.append(["b"])).seqs, {"b": 1})
        await self.store.ack_inbox("a", 2)
        self.assertEqual((await self.append(["a"])).seqs, {"a": 3})
        self.assertEqual(await self.store.inbox_state("a"), (3, 0))

    @inline
    async def test_multi_recipient_append(self) -> None:
        """One append stores one copy per distinct recipient, each with its own seq."""
        await self.append(["b"])
        result = await self.append(["a", "b", "c", "a"], body=b"hello", answer=b"ok")
        self.assertEqual(result, AppendResult(False, {"a": 1, "b": 2, "c": 1}, b"ok"))
        for node, seq in result.seqs.items():
            page = await self.store.fetch_inbox(node, seq - 1, 10)
            self.assertEqual([(m.seq, m.body, m.stored_at) for m in page.messages], [(seq, b"hello", 1000)])
        self.assertEqual(await self.store.inbox_state("a"), (1, 0))

    @inline
    async def test_ack_deletes_up_to_and_only_up_to(self) -> None:
        """ack_inbox deletes seq <= upto of that node only and returns the count."""
        for _ in range(5):
            await self.append(["a", "b"])
        self.assertEqual(await self.store.ack_inbox("a", 3), 3)
        self.assertEqual(seqs_of(await self.store.fetch_inbox("a", 0, 10)), [4, 5])
        self.assertEqual(seqs_of(await self.store.fetch_inbox("b", 0, 10)), [1, 2, 3, 4, 5])
        self.assertEqual(await self.store.ack_inbox("a", 3), 0)
        self.assertEqual(await self.store.ack_inbox("a", 99), 2)
        self.assertEqual(await self.store.ack_inbox("nobody", 5), 0)
        page = await self.store.fetch_inbox("a", 0, 10)
        self.assertEqual((page.messages, page.last_seq, page.purged_upto), ([], 5, 0))

    @inline
    async def test_fetch_pages_through_a_backlog(self) -> None:
        """A backlog larger than one page comes in seq order, page by page."""
        for i in range(25):
            await self.append(["a"], body=b"m%d" % i, now=1000 + i)
        after, seen, pages = 0, [], 0
        while True:
            page = await self.store.fetch_inbox("a", after, 10)
            self.assertEqual(page.last_seq, 25)
            if not page.messages:
                self.assertEqual(page.scanned_upto, after)
                break
            pages += 1
            self.assertTrue(all(m.seq > after for m in page.messages))
            self.assertEqual(page.scanned_upto, page.messages[-1].seq)
            seen.extend(page.messages)
            after = page.scanned_upto
        self.assertEqual(pages, 3)
        self.assertEqual([m.seq for m in seen], list(range(1, 26)))
        self.assertEqual([m.body for m in seen], [b"m%d" % i for i in range(25)])
        self.assertEqual([m.stored_at for m in seen], [1000 + i for i in range(25)])
        page = await self.store.fetch_inbox("a", 22, 10)
        self.assertEqual(seqs_of(page), [23, 24, 25])

    @inline
    async def test_fetch_unknown_inbox(self) -> None:
        """A node that never got anything has an empty inbox at (0, 0)."""
        page = await self.store.fetch_inbox("nobody", 0, 10)
        self.assertEqual(page, InboxPage([], 0, 0, 0))
        self.assertEqual(await self.store.inbox_state("nobody"), (0, 0))

    # -- retention ----------------------------------------------------------------
    @inline
    async def test_purge_advances_purged_upto(self) -> None:
        """Retention removes old rows and records the highest removed seq."""
        for now in (1000, 1000, 1000, 2000, 2000):
            await self.append(["a"], now=now)
        await self.append(["b"], now=1000)
        await self.append(["c"], now=1000)
        await self.store.ack_inbox("c", 1)  # acked, not purged
        await self.session_with()
        await self.say("x", b"old", now=1000)
        await self.say("x", b"new", now=3000)
        self.assertEqual(await self.store.purge(1500, 0), 5)
        self.assertEqual(await self.store.inbox_state("a"), (5, 3))
        self.assertEqual(await self.store.inbox_state("b"), (1, 1))
        self.assertEqual(await self.store.inbox_state("c"), (1, 0))
        page = await self.store.fetch_inbox("a", 0, 10)
        self.assertEqual((seqs_of(page), page.purged_upto), ([4, 5], 3))
        spage = await self.store.fetch_session("s1", "reader", 0, 10)
        self.assertEqual((seqs_of(spage), spage.last_seq, spage.purged_upto), ([2], 2, 1))
        # Nothing old is left: purged_upto stays where it is.
        self.assertEqual(await self.store.purge(1500, 0), 0)
        self.assertEqual(await self.store.inbox_state("a"), (5, 3))

    @inline
    async def test_purge_expires_dedup_entries(self) -> None:
        """A de-dup entry older than dedup_before_ms goes; the retry is stored again."""
        first = await self.append(["a"], dedup_id="m1", now=1000)
        self.assertEqual(await self.store.purge(0, 1000), 0)  # not older than 1000: kept
        again = await self.append(["a"], dedup_id="m1", now=1500)
        self.assertTrue(again.duplicate)
        await self.store.purge(0, 1001)
        third = await self.append(["a"], dedup_id="m1", now=1600)
        self.assertFalse(third.duplicate)
        self.assertEqual((first.seqs, third.seqs), ({"a": 1}, {"a": 2}))

    # -- de-duplication -----------------------------------------------------------
    @inline
    async def test_dedup_within_window(self) -> None:
        """A retry within the window stores nothing and returns the first answer."""
        first = await self.append(["a", "b"], dedup_id="m1", body=b"one", answer=b"ans1", now=1000)
        self.assertEqual(first, AppendResult(False, {"a": 1, "b": 1}, b"ans1"))
        retry = await self.append(
            ["a", "b"], dedup_id="m1", body=b"two", answer=b"ans2", now=1000 + WINDOW - 1
        )
        self.assertEqual(retry, AppendResult(True, {"a": 1, "b": 1}, b"ans1"))
        self.assertEqual(await self.store.inbox_state("a"), (1, 0))
        page = await self.store.fetch_inbox("a", 0, 10)
        self.assertEqual([m.body for m in page.messages], [b"one"])
        # Another sender, or no dedup_id, is never a duplicate.
        other = await self.append(["a"], dedup_id="m1", sender="other", now=1001)
        self.assertEqual((other.duplicate, other.seqs), (False, {"a": 2}))
        plain = await self.append(["a"], now=1002)
        self.assertEqual((plain.duplicate, plain.seqs), (False, {"a": 3}))

    @inline
    async def test_dedup_after_window_stores_again(self) -> None:
        """Once the window has passed, the same key is a new message."""
        await self.append(["a"], dedup_id="m1", answer=b"ans1", now=1000)
        later = await self.append(["a"], dedup_id="m1", answer=b"ans2", now=1000 + WINDOW)
        self.assertEqual(later, AppendResult(False, {"a": 2}, b"ans2"))
        retry = await self.append(["a"], dedup_id="m1", answer=b"ans3", now=1000 + WINDOW + 5)
        self.assertEqual(retry, AppendResult(True, {"a": 2}, b"ans2"))
        self.assertEqual(seqs_of(await self.store.fetch_inbox("a", 0, 10)), [1, 2])

    @inline
    async def test_dedup_in_the_same_turn(self) -> None:
        """Two appends with one key submitted together: the second is the duplicate."""
        d1 = self.store.append_inbox("s", "m1", ["a"], b"one", b"ans1", 1000, WINDOW)
        d2 = self.store.append_inbox("s", "m1", ["a"], b"two", b"ans2", 1000, WINDOW)
        first, second = await d1, await d2
        self.assertEqual(first, AppendResult(False, {"a": 1}, b"ans1"))
        self.assertEqual(second, AppendResult(True, {"a": 1}, b"ans1"))
        self.assertEqual(await self.store.inbox_state("a"), (1, 0))

    @inline
    async def test_dedup_spans_inbox_and_session(self) -> None:
        """The key (sender_id, dedup_id) is shared by inbox and session appends."""
        await self.session_with()
        first = await self.store.append_session("s1", "x", "m1", b"b", b"ans", 1000, WINDOW)
        self.assertEqual(first, AppendResult(False, {"s1": 1}, b"ans"))
        retry = await self.store.append_session("s1", "x", "m1", b"b", b"no", 1001, WINDOW)
        self.assertEqual(retry, AppendResult(True, {"s1": 1}, b"ans"))
        cross = await self.append(["a"], sender="x", dedup_id="m1", now=1002)
        self.assertEqual(cross, AppendResult(True, {"s1": 1}, b"ans"))
        self.assertEqual(await self.store.inbox_state("a"), (0, 0))
        page = await self.store.fetch_session("s1", "reader", 0, 10)
        self.assertEqual((seqs_of(page), page.last_seq), ([1], 1))

    # -- quotas ---------------------------------------------------------------------
    @inline
    async def test_inbox_quota_per_sender_and_per_inbox(self) -> None:
        """Over a sender's share of an inbox, or over the inbox's total, an
        append is refused and stores nothing; other senders still get in, and
        an ack makes room again."""
        quota = InboxQuota(per_sender=3, per_inbox=5)
        for _ in range(3):
            await self.append(["a"], sender="x", quota=quota)
        error = await self.refused(["a"], quota, sender="x")
        self.assertEqual((error.node_ids, error.per_sender), (("a",), True))
        self.assertEqual(await self.store.inbox_state("a"), (3, 0))  # no seq was taken
        self.assertEqual((await self.append(["a"], sender="y", quota=quota)).seqs, {"a": 4})
        self.assertEqual((await self.append(["a"], sender="y", quota=quota)).seqs, {"a": 5})
        error = await self.refused(["a"], quota, sender="z")
        self.assertEqual((error.node_ids, error.per_sender), (("a",), False))
        # Without a quota nothing is refused (and the message still counts).
        self.assertEqual((await self.append(["a"], sender="x")).seqs, {"a": 6})
        self.assertEqual(await self.store.ack_inbox("a", 3), 3)  # x's first three
        # a holds x:1 (seq 6) and y:2: x may add two, then its share is used up
        for seq in (7, 8):
            self.assertEqual((await self.append(["a"], sender="x", quota=quota)).seqs, {"a": seq})
        self.assertEqual(await self.store.ack_inbox("a", 4), 1)  # y's first: a holds 4
        self.assertTrue((await self.refused(["a"], quota, sender="x")).per_sender)
        self.assertEqual((await self.append(["a"], sender="z", quota=quota)).seqs, {"a": 9})
        self.assertFalse((await self.refused(["a"], quota, sender="z")).per_sender)
        self.assertEqual(seqs_of(await self.store.fetch_inbox("a", 0, 10)), [5, 6, 7, 8, 9])
        # another inbox is not affected
        self.assertEqual((await self.append(["b"], sender="x", quota=quota)).seqs, {"b": 1})

    @inline
    async def test_inbox_quota_refuses_a_multi_recipient_message_whole(self) -> None:
        """One full recipient refuses the whole message: no copy is stored for anyone."""
        quota = InboxQuota(per_sender=2, per_inbox=10)
        await self.append(["a"], sender="x", quota=quota)
        await self.append(["a"], sender="x", quota=quota)
        error = await self.refused(["b", "a", "c"], quota, sender="x")
        self.assertEqual(error.node_ids, ("a",))
        for node in ("b", "c"):
            self.assertEqual(await self.store.inbox_state(node), (0, 0))
        self.assertEqual((await self.append(["b", "c"], sender="x", quota=quota)).seqs, {"b": 1, "c": 1})

    @inline
    async def test_inbox_quota_retry_of_a_stored_message_gets_its_answer(self) -> None:
        """De-duplication comes first: the retry of a stored message is a
        duplicate even when the inbox is full now; a refused message is not
        remembered, so its retry after an ack is stored."""
        quota = InboxQuota(per_sender=2, per_inbox=10)
        await self.append(["a"], sender="x", dedup_id="m1", answer=b"one", quota=quota)
        await self.append(["a"], sender="x", dedup_id="m2", answer=b"two", quota=quota)
        retry = await self.append(["a"], sender="x", dedup_id="m1", answer=b"no", now=1001, quota=quota)
        self.assertEqual(retry, AppendResult(True, {"a": 1}, b"one"))
        await self.refused(["a"], quota, sender="x", dedup_id="m3")
        await self.store.ack_inbox("a", 1)
        third = await self.append(["a"], sender="x", dedup_id="m3", answer=b"three", now=1002, quota=quota)
        self.assertEqual(third, AppendResult(False, {"a": 3}, b"three"))

    @inline
    async def test_inbox_quota_holds_within_one_turn(self) -> None:
        """Appends submitted together (one batch) count against each other."""
        quota = InboxQuota(per_sender=3, per_inbox=4)
        pending = [self.store.append_inbox("x", None, ["a"], b"m", b"", 1000, WINDOW, quota)
                   for _ in range(5)]
        pending.append(self.store.append_inbox("y", None, ["a"], b"m", b"", 1000, WINDOW, quota))
        pending.append(self.store.append_inbox("y", None, ["a"], b"m", b"", 1000, WINDOW, quota))
        outcomes = []
        for d in pending:
            try:
                outcomes.append((await d).seqs["a"])
            except InboxFull as e:
                outcomes.append("per_sender" if e.per_sender else "per_inbox")
        self.assertEqual(outcomes, [1, 2, 3, "per_sender", "per_sender", 4, "per_inbox"])

    @inline
    async def test_inbox_quota_counts_what_retention_removed(self) -> None:
        """Rows removed by retention no longer count."""
        quota = InboxQuota(per_sender=2, per_inbox=10)
        await self.append(["a"], sender="x", now=1000, quota=quota)
        await self.append(["a"], sender="x", now=2000, quota=quota)
        await self.refused(["a"], quota, sender="x")
        await self.store.purge(1500, 0)
        self.assertEqual((await self.append(["a"], sender="x", now=3000, quota=quota)).seqs, {"a": 3})
        await self.refused(["a"], quota, sender="x")

    @inline
    async def test_session_stream_quota_per_window(self) -> None:
        """A stream takes at most per_session rows per window, per_sender of
        them from one sender; refused rows do not count, the next window
        starts again, a retry of a stored row gets its answer."""
        await self.session_with()
        quota = StreamQuota(per_sender=2, per_session=3, window_ms=1000)

        async def say(sender: str, now: int, dedup_id: str | None = None) -> int | str:
            try:
                result = await self.store.append_session("s1", sender, dedup_id, b"m", b"ok",
                                                         now, WINDOW, quota)
            except SessionFull as e:
                self.assertEqual(e.session_id, "s1")
                return "per_sender" if e.per_sender else "per_session"
            return result.seqs["s1"]

        self.assertEqual([await say("x", 1000, "m1"), await say("x", 1100), await say("x", 1200)],
                         [1, 2, "per_sender"])
        self.assertEqual([await say("y", 1300), await say("z", 1400)], [3, "per_session"])
        self.assertEqual(await say("x", 1500, "m1"), 1)  # the retry: its first answer
        page = await self.store.fetch_session("s1", "reader", 0, 10)
        self.assertEqual((seqs_of(page), page.last_seq), ([1, 2, 3], 3))
        # the next window (2000-2999)
        self.assertEqual([await say("x", 2000), await say("z", 2999), await say("x", 2500)], [4, 5, 6])
        self.assertEqual(await say("y", 2600), "per_session")
        # without a quota nothing is refused
        result = await self.store.append_session("s1", "x", None, b"m", b"", 2700, WINDOW)
        self.assertEqual(result.seqs, {"s1": 7})
        # a session deleted and created again starts with a fresh window
        await self.store.delete_session("s1")
        await self.session_with()
        self.assertEqual(await say("x", 2800), 1)

    # -- ordering -----------------------------------------------------------------
    @inline
    async def test_operations_apply_in_submission_order(self) -> None:
        """An ack then a fetch submitted together, without waiting, sees the ack."""
        for _ in range(3):
            await self.append(["a"])
        appended = self.store.append_inbox("s", None, ["a"], b"4", b"", 1000, WINDOW)
        acked = self.store.ack_inbox("a", 2)
        fetched = self.store.fetch_inbox("a", 0, 10)
        state = self.store.inbox_state("a")
        self.assertEqual((await appended).seqs, {"a": 4})
        self.assertEqual(await acked, 2)
        self.assertEqual(seqs_of(await fetched), [3, 4])
        self.assertEqual(await state, (4, 0))

    # -- sessions -----------------------------------------------------------------
    @inline
    async def test_session_life_cycle(self) -> None:
        """create, duplicate, get, update, delete."""
        record = await self.session_with()
        self.assertEqual(record.session_id, "s1")
        self.assertEqual(record.owner_id, "owner")
        self.assertEqual(record.created_at, 500)
        self.assertEqual(record.options["session_type"], "group")
        self.assertIsNone(record.options["master_id"])
        self.assertEqual(await self.store.get_session("s1"), record)
        with self.assertRaises(DuplicateSession):  # type: ignore[attr-defined]
            await self.store.create_session("s1", "other", {}, 600)
        self.assertEqual((await self.store.get_session("s1")).owner_id, "owner")
        new = {"anonymous": True, "anyone_can_join": False, "session_type": "game", "master_id": "m"}
        updated = await self.store.update_session("s1", new)
        self.assertEqual(updated, SessionRecord("s1", "owner", 500, new))
        self.assertEqual(await self.store.get_session("s1"), updated)
        self.assertIsNone(await self.store.update_session("nope", new))
        self.assertIsNone(await self.store.get_session("nope"))
        await self.store.add_member("s1", "n1", "c1", False, "a1", 600)
        await self.say("n1", b"hi")
        await self.store.delete_session("s1")
        self.assertIsNone(await self.store.get_session("s1"))
        self.assertEqual(await self.store.get_members("s1"), [])
        self.assertEqual(await self.store.sessions_of_node("n1"), [])
        self.assertEqual(await self.store.fetch_session("s1", "n2", 0, 10), InboxPage([], 0, 0, 0))
        await self.store.delete_session("s1")  # deleting twice is harmless
        # The id is free again, and the new stream starts from scratch.
        await self.session_with()
        self.assertEqual(await self.say("n1", b"again"), 1)

    @inline
    async def test_members(self) -> None:
        """add (idempotent), update, remove, get_members order, sessions_of_node."""
        await self.session_with("s1")
        await self.session_with("s2")
        m2 = await self.store.add_member("s1", "n2", "c2", True, "alias2", 700)
        m1 = await self.store.add_member("s1", "n1", None, False, "alias1", 700)
        m0 = await self.store.add_member("s1", "n9", "c9", False, "alias9", 600)
        self.assertEqual(m1, MemberRecord("s1", "n1", None, False, "alias1", 700, 0, 0))
        self.assertEqual(m2, MemberRecord("s1", "n2", "c2", True, "alias2", 700, 0, 0))
        again = await self.store.add_member("s1", "n2", "other", False, "changed", 900)
        self.assertEqual(again, m2)
        self.assertEqual(await self.store.get_members("s1"), [m0, m1, m2])
        self.assertEqual(await self.store.get_members("s2"), [])
        other = await self.store.add_member("s2", "n1", None, True, "x", 650)
        self.assertEqual(await self.store.sessions_of_node("n1"), [other, m1])
        self.assertEqual(await self.store.sessions_of_node("n5"), [])
        changed = await self.store.update_member("s1", "n2", False, "alias2b")
        self.assertEqual(changed, MemberRecord("s1", "n2", "c2", False, "alias2b", 700, 0, 0))
        self.assertIsNone(await self.store.update_member("s1", "nope", False, "x"))
        self.assertIsNone(await self.store.update_member("nope", "n2", False, "x"))
        self.assertTrue(await self.store.remove_member("s1", "n2"))
        self.assertFalse(await self.store.remove_member("s1", "n2"))
        self.assertFalse(await self.store.remove_member("nope", "n2"))
        self.assertEqual(await self.store.get_members("s1"), [m0, m1])
        # A removed member that joins again is new: it joins at the current last_seq.
        await self.say("n1", b"x")
        back = await self.store.add_member("s1", "n2", "c2", False, "b", 800)
        self.assertEqual((back.joined_seq, back.acked_seq, back.alias), (1, 1, "b"))

    @inline
    async def test_unknown_session_is_an_error_for_writes(self) -> None:
        """add_member and append_session need an existing session."""
        with self.assertRaises(StoreError):  # type: ignore[attr-defined]
            await self.store.add_member("nope", "n1", None, False, "a", 1)
        with self.assertRaises(StoreError):  # type: ignore[attr-defined]
            await self.store.append_session("nope", "n1", None, b"x", b"", 1, WINDOW)
        self.assertEqual(await self.store.ack_session("nope", "n1", 5), 0)

    @inline
    async def test_joined_seq(self) -> None:
        """A member joins at the stream's last_seq and never sees rows at or below it."""
        await self.session_with()
        await self.store.add_member("s1", "early", None, False, "e", 600)
        for i in range(3):
            await self.say("early", b"%d" % i)
        late = await self.store.add_member("s1", "late", None, False, "l", 700)
        self.assertEqual((late.joined_seq, late.acked_seq), (3, 3))
        await self.say("early", b"3")
        page = await self.store.fetch_session("s1", "late", 0, 10)
        self.assertEqual((seqs_of(page), page.last_seq, page.scanned_upto), ([4], 4, 4))
        empty = await self.store.fetch_session("s1", "late", 4, 10)
        self.assertEqual((empty.messages, empty.scanned_upto), ([], 4))

    @inline
    async def test_fetch_session_skips_own_rows(self) -> None:
        """A reader's own rows are skipped; scanned_upto lets it continue past them."""
        await self.session_with()
        for node in ("a", "b"):
            await self.store.add_member("s1", node, None, False, node, 600)
        senders = ["a", "b", "a", "b", "b", "a", "b", "b"]  # seqs 1..8
        for i, sender in enumerate(senders):
            await self.say(sender, b"%d" % (i + 1))
        page = await self.store.fetch_session("s1", "a", 0, 100)
        self.assertEqual(seqs_of(page), [2, 4, 5, 7, 8])
        self.assertEqual([m.body for m in page.messages], [b"2", b"4", b"5", b"7", b"8"])
        self.assertEqual((page.last_seq, page.purged_upto, page.scanned_upto), (8, 0, 8))
        # Paging with limit 1 as "b": every page skips b's own rows.
        after, got = 0, []
        while True:
            page = await self.store.fetch_session("s1", "b", after, 1)
            got.extend(seqs_of(page))
            self.assertGreaterEqual(page.scanned_upto, after)
            if page.scanned_upto == after:
                break
            after = page.scanned_upto
        self.assertEqual(got, [1, 3, 6])
        self.assertEqual(after, 8)
        # A page that finds only own rows still moves past them.
        tail = await self.store.fetch_session("s1", "b", 6, 10)
        self.assertEqual((tail.messages, tail.scanned_upto), ([], 8))

    @inline
    async def test_ack_session(self) -> None:
        """The cursor moves up, never down, never past last_seq."""
        await self.session_with()
        await self.store.add_member("s1", "a", None, False, "a", 600)
        for i in range(5):
            await self.say("x", b"%d" % i)
        self.assertEqual(await self.store.ack_session("s1", "a", 3), 3)
        self.assertEqual(await self.store.ack_session("s1", "a", 2), 3)
        self.assertEqual(await self.store.ack_session("s1", "a", 99), 5)
        self.assertEqual((await self.store.get_members("s1"))[0].acked_seq, 5)
        self.assertEqual(await self.store.ack_session("s1", "nobody", 3), 0)
        # Acking a session does not delete stream rows others still need.
        page = await self.store.fetch_session("s1", "other", 0, 10)
        self.assertEqual(seqs_of(page), [1, 2, 3, 4, 5])

    @inline
    async def test_session_ordering(self) -> None:
        """append_session then fetch_session submitted together: the fetch sees it."""
        await self.session_with()
        appended = self.store.append_session("s1", "x", None, b"1", b"", 1000, WINDOW)
        fetched = self.store.fetch_session("s1", "y", 0, 10)
        acked = self.store.ack_session("s1", "y", 1)
        self.assertEqual((await appended).seqs, {"s1": 1})
        self.assertEqual(seqs_of(await fetched), [1])
        self.assertEqual(await acked, 0)  # "y" is not a member

    # -- push notifications ----------------------------------------------------------
    async def push_row(self, node_id: str, token: str = "tok-1", registered: int = 1) -> PushTarget:
        """Register an FCM target for ``node_id``; the target."""
        target = fcm_target(node_id, token, registered)
        await self.store.set_push_target(target)
        return target

    async def claimed(self, now: int, owner: str = "srv-a", lease: int = 1000,
                      limit: int = 100) -> dict[str, PushJob]:
        """``claim_due_pushes`` as a dict by node_id."""
        jobs = await self.store.claim_due_pushes(now, owner, lease, limit)
        return {job.node_id: job for job in jobs}

    @inline
    async def test_push_target_latest_wins_and_keeps_mute_and_schedule(self) -> None:
        """A second registration replaces the first; the node's mute flag and
        pending schedule (due time and gen) stay as they were."""
        self.assertIsNone(await self.store.get_push_target("n1"))
        await self.push_row("n1", "old")
        self.assertEqual(await self.store.schedule_push(["n1"], 500), ["n1"])
        newer = await self.push_row("n1", "new", registered=2)
        self.assertEqual(await self.store.get_push_target("n1"), newer)
        jobs = await self.claimed(500)
        self.assertEqual(list(jobs), ["n1"])
        self.assertEqual((jobs["n1"].target, jobs["n1"].gen, jobs["n1"].due_ms), (newer, 1, 500))
        await self.store.set_push_muted("n2", True)
        await self.push_row("n2")
        self.assertTrue(await self.store.push_muted("n2"))

    @inline
    async def test_push_target_fields_round_trip(self) -> None:
        """Every provider's target comes back as it was registered: Web Push
        with its subscription and no token, APNs with topic and environment."""
        sub = {"endpoint": "https://push.example/s/1", "keys": {"p256dh": "BPk", "auth": "au"}}
        web = PushTarget("w", "webpush", None, sub, None, None, 7)
        apns = PushTarget("a", "apns", "abc123", None, "com.example.app", "development", 8)
        hook = PushTarget("h", "webhook", "user-77", None, None, None, 9)
        for target in (web, apns, hook):
            await self.store.set_push_target(target)
        self.assertEqual(await self.store.get_push_target("w"), web)
        self.assertEqual((await self.store.get_push_target("w")).address, "https://push.example/s/1")
        self.assertEqual(await self.store.get_push_target("a"), apns)
        self.assertEqual(await self.store.get_push_target("h"), hook)

    @inline
    async def test_remove_push_target_with_a_stale_address_keeps_the_newer(self) -> None:
        """remove_push_target(node, address) removes only a target that still
        has that address; without an address it removes whatever is there."""
        await self.push_row("n1", "dead-token")
        newer = await self.push_row("n1", "fresh-token")
        self.assertFalse(await self.store.remove_push_target("n1", "dead-token"))
        self.assertEqual(await self.store.get_push_target("n1"), newer)
        self.assertTrue(await self.store.remove_push_target("n1", "fresh-token"))
        self.assertIsNone(await self.store.get_push_target("n1"))
        self.assertFalse(await self.store.remove_push_target("n1"))
        self.assertFalse(await self.store.remove_push_target("never-registered"))
        await self.push_row("n1", "again")
        self.assertTrue(await self.store.remove_push_target("n1"))
        self.assertIsNone(await self.store.get_push_target("n1"))

    @inline
    async def test_push_mute_is_kept_and_lifted(self) -> None:
        """push_muted is False for unknown nodes; a mute set before or after
        registering holds until unmuted, and removing the target keeps it."""
        self.assertFalse(await self.store.push_muted("nobody"))
        await self.push_row("n1")
        await self.store.set_push_muted("n1", True)
        self.assertTrue(await self.store.push_muted("n1"))
        await self.store.remove_push_target("n1")
        self.assertTrue(await self.store.push_muted("n1"))
        await self.push_row("n1")
        self.assertTrue(await self.store.push_muted("n1"))
        await self.store.set_push_muted("n1", False)
        self.assertFalse(await self.store.push_muted("n1"))

    @inline
    async def test_schedule_push_keeps_the_earliest_due_time_and_bumps_gen(self) -> None:
        """schedule_push sets the due time unless an earlier one is set, adds
        one to gen per call, and skips nodes without a target or muted."""
        await self.push_row("a")
        await self.push_row("b")
        await self.push_row("muted")
        await self.store.set_push_muted("muted", True)
        scheduled = await self.store.schedule_push(["a", "none", "muted", "b", "a"], 3000)
        self.assertEqual(scheduled, ["a", "b"])
        self.assertEqual(await self.store.schedule_push(["a"], 5000), ["a"])  # later: a keeps 3000
        self.assertEqual(await self.store.schedule_push(["b"], 2000), ["b"])  # earlier: b moves
        self.assertEqual(await self.claimed(1999), {})
        jobs = await self.claimed(10_000)
        self.assertEqual(sorted(jobs), ["a", "b"])
        self.assertEqual((jobs["a"].due_ms, jobs["a"].gen), (3000, 2))
        self.assertEqual((jobs["b"].due_ms, jobs["b"].gen), (2000, 2))
        self.assertEqual((jobs["a"].last_sent_ms, jobs["a"].attempts), (None, 0))
        self.assertEqual(await self.store.schedule_push([], 1), [])

    @inline
    async def test_claim_respects_due_time_order_and_limit(self) -> None:
        """Only due rows are claimed, in due order (then node_id), at most
        ``limit``; a claimed row is not claimed again while leased."""
        for node, due in (("c", 300), ("a", 200), ("b", 200), ("later", 900)):
            await self.push_row(node)
            await self.store.schedule_push([node], due)
        self.assertEqual(await self.claimed(199), {})
        first = await self.store.claim_due_pushes(500, "srv-a", 1000, 2)
        self.assertEqual([j.node_id for j in first], ["a", "b"])
        rest = await self.store.claim_due_pushes(500, "srv-b", 1000, 10)
        self.assertEqual([j.node_id for j in rest], ["c"])
        self.assertEqual(await self.claimed(500, "srv-c"), {})
        self.assertEqual(list(await self.claimed(900, "srv-c")), ["later"])

    @inline
    async def test_claims_submitted_at_once_are_exclusive(self) -> None:
        """Two owners claiming at the same moment (both calls submitted before
        either answers) get disjoint sets that together hold every due node."""
        nodes = [f"n{i:02d}" for i in range(30)]
        for node in nodes:
            await self.push_row(node)
        await self.store.schedule_push(nodes, 100)
        firsts = [self.store.claim_due_pushes(200, owner, 1000, 7) for owner in ("x", "y")]
        seconds = [self.store.claim_due_pushes(200, owner, 1000, 20) for owner in ("x", "y")]
        got: dict[str, list[str]] = {"x": [], "y": []}
        for owner, d in zip(["x", "y", "x", "y"], firsts + seconds):
            got[owner].extend(job.node_id for job in await d)
        self.assertEqual(set(got["x"]) & set(got["y"]), set())
        self.assertEqual(sorted(got["x"] + got["y"]), nodes)

    @inline
    async def test_an_ended_lease_lets_another_owner_claim(self) -> None:
        """A lease holds until its end (inclusive); after it another owner
        takes the push, and the first owner's finish_push then changes nothing."""
        await self.push_row("n1")
        await self.store.schedule_push(["n1"], 100)
        self.assertEqual(list(await self.claimed(100, "srv-a", lease=500)), ["n1"])
        self.assertEqual(await self.claimed(600, "srv-b"), {})  # held until 600
        job = (await self.claimed(601, "srv-b"))["n1"]
        self.assertEqual((job.gen, job.due_ms), (1, 100))
        self.assertFalse(await self.store.finish_push("n1", "srv-a", 1, 700, None))
        self.assertTrue(await self.store.finish_push("n1", "srv-b", 1, 700, None))
        await self.store.schedule_push(["n1"], 800)
        job = (await self.claimed(800, "srv-c"))["n1"]
        self.assertEqual((job.last_sent_ms, job.attempts), (700, 0))  # srv-a's finish left no trace

    @inline
    async def test_muted_and_targetless_rows_are_never_claimed(self) -> None:
        """A schedule made before a mute or an unregistration stays, unclaimed,
        until the node unmutes or registers again."""
        await self.push_row("m")
        await self.push_row("gone")
        await self.store.schedule_push(["m", "gone"], 100)
        await self.store.set_push_muted("m", True)
        self.assertTrue(await self.store.remove_push_target("gone"))
        self.assertEqual(await self.claimed(10_000), {})
        await self.store.set_push_muted("m", False)
        await self.push_row("gone", "tok-2")
        jobs = await self.claimed(10_000)
        self.assertEqual(sorted(jobs), ["gone", "m"])
        self.assertEqual(jobs["gone"].target.token, "tok-2")

    @inline
    async def test_finish_push_clears_only_when_gen_is_unchanged(self) -> None:
        """finish_push with the claimed gen clears the schedule; if a schedule
        came in since the claim, the push stays due (at its due time)."""
        await self.push_row("same")
        await self.push_row("moved")
        await self.store.schedule_push(["same", "moved"], 100)
        jobs = await self.claimed(100)
        await self.store.schedule_push(["moved"], 150)  # a copy stored during the send
        self.assertTrue(await self.store.finish_push("same", "srv-a", jobs["same"].gen, 120, None))
        self.assertTrue(await self.store.finish_push("moved", "srv-a", jobs["moved"].gen, 120, None))
        again = await self.claimed(10_000, "srv-b")
        self.assertEqual(list(again), ["moved"])
        self.assertEqual((again["moved"].due_ms, again["moved"].gen), (100, 2))
        self.assertEqual(again["moved"].last_sent_ms, 120)

    @inline
    async def test_finish_push_retry_and_attempts(self) -> None:
        """retry_at_ms makes the push due again then; ``failed`` counts
        attempts, a send (sent_ms) returns them to 0; a second finish by the
        same owner after the lease is released changes nothing."""
        await self.push_row("n1")
        await self.store.schedule_push(["n1"], 100)
        for attempt in range(1, 3):
            job = (await self.claimed(10_000 * attempt))["n1"]
            self.assertEqual(job.attempts, attempt - 1)
            retry_at = 10_000 * (attempt + 1)
            self.assertTrue(await self.store.finish_push("n1", "srv-a", job.gen, None, retry_at, True))
            self.assertFalse(await self.store.finish_push("n1", "srv-a", job.gen, None, None))
            self.assertEqual(await self.claimed(retry_at - 1), {})
        job = (await self.claimed(30_000))["n1"]
        self.assertEqual((job.attempts, job.due_ms, job.last_sent_ms), (2, 30_000, None))
        # sent, then due again at the end of the coalescing window
        self.assertTrue(await self.store.finish_push("n1", "srv-a", job.gen, 30_500, 60_000))
        job = (await self.claimed(60_000))["n1"]
        self.assertEqual((job.attempts, job.due_ms, job.last_sent_ms), (0, 60_000, 30_500))
        self.assertTrue(await self.store.finish_push("n1", "srv-a", job.gen, None, None))
        self.assertEqual(await self.claimed(10**9), {})
        self.assertFalse(await self.store.finish_push("unknown", "srv-a", 1, 1, None))

    @inline
    async def test_revoke_node_and_lift_it(self) -> None:
        """revoked_until is 0 for a node never revoked, the latest time after
        revoke_node (a later call replaces it), 0 again after revoking until 0."""
        self.assertEqual(await self.store.revoked_until("n1"), 0)
        await self.store.revoke_node("n1", 5000)
        await self.store.revoke_node("n2", 7000)
        self.assertEqual(await self.store.revoked_until("n1"), 5000)
        await self.store.revoke_node("n1", 4000)
        self.assertEqual(await self.store.revoked_until("n1"), 4000)
        await self.store.revoke_node("n1", 0)
        self.assertEqual(await self.store.revoked_until("n1"), 0)
        self.assertEqual(await self.store.revoked_until("n2"), 7000)
        await self.store.revoke_node("never", 0)
        self.assertEqual(await self.store.revoked_until("never"), 0)

    @inline
    async def test_claims_from_two_processes_are_exclusive(self) -> None:
        """Two processes (``tests/store/push_claimer.py``) claim the same 150
        due pushes at the same time, 3 per call: no node goes to both, both
        got some, and together they claim every one."""
        url = self.shared_url()
        if url is None:
            raise SkipTest("this backend cannot be shared between processes")
        nodes = [f"n{i:03d}" for i in range(150)]
        await defer.gatherResults([self.store.set_push_target(fcm_target(node)) for node in nodes])
        self.assertEqual(len(await self.store.schedule_push(nodes, 100)), 150)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = []
        barrier = temp_dir(self)  # type: ignore[arg-type]
        for owner in ("claimer-1", "claimer-2"):
            proc = subprocess.Popen([sys.executable, PUSH_CLAIMER, url, owner, barrier, "2"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            self.addCleanup(lambda p=proc: p.poll() is None and p.kill())  # type: ignore[attr-defined]
            procs.append(proc)
        outputs = []
        for proc in procs:
            out, err = await threads.deferToThread(proc.communicate, timeout=120)
            self.assertEqual(proc.returncode, 0, err.decode())  # type: ignore[attr-defined]
            outputs.append(out.decode().split())
        self.assertEqual(set(outputs[0]) & set(outputs[1]), set())
        self.assertEqual(sorted(outputs[0] + outputs[1]), nodes)
        self.assertTrue(outputs[0] and outputs[1], "one claimer took everything: no contention")

    # -- several writer processes: a reader never steps past an unreadable seq -------
    def shared_url(self) -> str | None:
        """A URL another process can open to reach this test's store, or None
        for a backend that lives in this process only (the multi-process tests
        then skip).  Every backend that can be shared overrides it."""
        return None

    def start_writer(self, url: str, name: str, rounds: int) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``tests/store/seq_writer.py`` as a process; it and the file
        its acknowledged appends are printed to.  Killed at cleanup if alive."""
        out_path = os.path.join(temp_dir(self), f"{name}.out")  # type: ignore[arg-type]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(out_path, "wb") as out, open(out_path + ".err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, SEQ_WRITER, url, name, str(rounds)], stdout=out, stderr=err, env=env
            )

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)

        self.addCleanup(stop)  # type: ignore[attr-defined]
        return proc, out_path

    async def sync_while_writing(
        self, writers: list[subprocess.Popen[bytes]], on_step: Callable[[], None] | None = None
    ) -> dict[str, SyncReader]:
        """Sync inboxes ``x`` and ``y`` and session ``s`` in a tight loop (each
        reader checking after every page that its ``upto`` never passed a seq
        it did not receive) until every writer has exited and every reader has
        caught up.  Bounded by :data:`SYNC_STEPS` pages and :data:`SYNC_DEADLINE_S`."""
        readers = {
            "x": SyncReader(self, self.store, "x"),
            "y": SyncReader(self, self.store, "y"),
            "s": SyncReader(self, self.store, "s", session=True),
        }
        deadline = time.monotonic() + SYNC_DEADLINE_S
        for _ in range(SYNC_STEPS):
            if on_step is not None:
                on_step()
            finished = all(w.poll() is not None for w in writers)
            caught_up = [await reader.step() for reader in readers.values()]
            if finished and all(caught_up):
                for w in writers:
                    w.wait(timeout=30)
                return readers
            if time.monotonic() > deadline:
                break
        self.fail(  # type: ignore[attr-defined]
            f"readers did not catch up: {[(n, r.after) for n, r in readers.items()]}, "
            f"writers {[w.poll() for w in writers]}"
        )
        raise AssertionError  # not reached

    def check_delivered(
        self, readers: dict[str, SyncReader], outputs: list[str], complete: list[bool]
    ) -> None:
        """Nothing lost, nothing duplicated, multi-recipient appends all or nothing.

        Every append a writer printed (the store acknowledged it) reached the
        reader at the seq the store gave it; nothing reached a reader twice;
        the store holds exactly what the readers got; a writer that ran to the
        end (``complete``) stored nothing it did not print; a two-recipient
        append is in both inboxes or in neither.
        """
        acknowledged: dict[str, dict[str, int]] = {}
        for path, done in zip(outputs, complete):
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
            if done:
                self.assertEqual(len(lines) % (seq_writer.PER_ROUND + 1), 0)  # type: ignore[attr-defined]
            for line in lines:
                acknowledged[line["key"]] = line["seqs"]
        by_key: dict[str, dict[str, int]] = {}
        for name, reader in readers.items():
            keys = list(reader.received.values())
            self.assertEqual(len(keys), len(set(keys)), f"{name}: a message came twice")  # type: ignore[attr-defined]
            for seq, key in reader.received.items():
                by_key.setdefault(key, {})[name] = seq
        for key, seqs in acknowledged.items():
            self.assertEqual(by_key.get(key), seqs, f"acknowledged {key} lost or moved")  # type: ignore[attr-defined]
        done_names = {path: done for path, done in zip(outputs, complete)}
        for key, seqs in by_key.items():
            writer, _, i = key.split(":")
            if i != "s":
                expected = {"x"} if int(i) % 3 == 2 else {"x", "y"}
                self.assertEqual(set(seqs), expected, f"{key} stored in part")  # type: ignore[attr-defined]
            if key not in acknowledged:
                finished = [d for p, d in done_names.items() if os.path.basename(p) == f"{writer}.out"]
                self.assertEqual(finished, [False], f"{key} stored but never acknowledged")  # type: ignore[attr-defined]

    async def check_store_matches(self, readers: dict[str, SyncReader]) -> None:
        """A fresh full read of the store holds exactly what the readers received."""
        for name, reader in readers.items():
            if reader.session:
                page = await self.store.fetch_session("s", "someone-else", 0, 100_000)
            else:
                page = await self.store.fetch_inbox(name, 0, 100_000)
            stored = {m.seq: m.body.decode() for m in page.messages}
            self.assertEqual(stored, reader.received, f"{name}: the store differs from what was read")  # type: ignore[attr-defined]
            self.assertEqual(page.last_seq, len(stored))  # type: ignore[attr-defined]

    @inline
    async def test_two_writer_processes_and_a_syncing_reader(self) -> None:
        """Two processes append (batches of two-recipient, one-recipient and
        session appends) while this process syncs ``x``, ``y`` and session
        ``s`` in a tight loop through :func:`allspark.inbox.send_page`: no
        page's ``upto`` passes a seq the reader did not get, and in the end
        every acknowledged append arrived exactly once at its seq."""
        url = self.shared_url()
        if url is None:
            raise SkipTest("this backend cannot be shared between processes")
        await self.session_with("s")
        rounds = 40
        writers = [self.start_writer(url, name, rounds) for name in ("w1", "w2")]
        readers = await self.sync_while_writing([proc for proc, _ in writers])
        for proc, out in writers:
            with open(out + ".err") as err:
                self.assertEqual(proc.returncode, 0, err.read())  # type: ignore[attr-defined]
        self.check_delivered(readers, [out for _, out in writers], [True, True])
        per_writer = rounds * seq_writer.PER_ROUND
        self.assertEqual(len(readers["x"].received), 2 * per_writer)  # type: ignore[attr-defined]
        self.assertEqual(len(readers["s"].received), 2 * rounds)  # type: ignore[attr-defined]
        await self.check_store_matches(readers)

    @inline
    async def test_writer_killed_in_the_middle_of_a_batch(self) -> None:
        """As above, but one writer gets ``kill -9`` while it appends (a batch
        in flight): the reader still skips no seq, every acknowledged append is
        there once, a two-recipient append is in both inboxes or neither, and
        the other writer carries on."""
        url = self.shared_url()
        if url is None:
            raise SkipTest("this backend cannot be shared between processes")
        await self.session_with("s")
        victim, victim_out = self.start_writer(url, "w1", 400)
        other, other_out = self.start_writer(url, "w2", 40)
        killed: list[bool] = []

        def kill_once_under_way() -> None:
            if killed or victim.poll() is not None:
                return
            with open(victim_out, "rb") as f:
                printed = f.read().count(b"\n")
            if printed >= 5 * (seq_writer.PER_ROUND + 1):
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(True)

        readers = await self.sync_while_writing([victim, other], on_step=kill_once_under_way)
        self.assertEqual(killed, [True])  # type: ignore[attr-defined]
        self.assertEqual(victim.returncode, -signal.SIGKILL)  # type: ignore[attr-defined]
        with open(other_out + ".err") as err:
            self.assertEqual(other.returncode, 0, err.read())  # type: ignore[attr-defined]
        self.check_delivered(readers, [victim_out, other_out], [False, True])
        await self.check_store_matches(readers)


class SyncReader:
    """Reads one inbox (or session ``s``, as a non-member) the way the server
    syncs a client: fetch a page after the cursor, write it with
    :func:`allspark.inbox.send_page`, continue from the ``synced`` frame's
    ``upto``.  ``received`` maps each seq to the body it carried."""

    def __init__(self, case: Any, store: Store, target: str, session: bool = False) -> None:
        self.case = case
        self.store = store
        self.target = target
        self.session = session
        self.conn = FakeConnection("reader")
        self.after = 0
        self.received: dict[int, str] = {}

    async def step(self) -> bool:
        """One page; whether the reader is at the end of what is readable."""
        if self.session:
            page = await self.store.fetch_session("s", "reader", self.after, SYNC_PAGE)
        else:
            page = await self.store.fetch_inbox(self.target, self.after, SYNC_PAGE)
        synced = send_page(self.conn, page, self.after, 1 << 30, {},
                           splice=lambda body, seq: orjson.dumps([seq, body.decode()]),
                           limit=SYNC_PAGE)
        for seq, key in self.conn.frames:
            self.case.assertNotIn(seq, self.received, f"{self.target}: seq {seq} sent twice")
            self.received[seq] = key
        self.conn.clear()
        upto = synced["upto"]
        # Nothing is acked or purged here, so after every page the reader must
        # hold exactly the seqs 1..upto: upto never passes a seq not yet read.
        self.case.assertEqual(
            len(self.received), upto,
            f"{self.target}: upto {upto} passed a seq not received "
            f"(missing {sorted(set(range(1, upto + 1)) - set(self.received))[:5]})",
        )
        self.after = upto
        return not synced["more"] and upto == page.last_seq


# -- backends -----------------------------------------------------------------------


class MemoryContractTests(StoreContract, TestCase):
    """The contract against :class:`~allspark.store.memory.MemoryStore`."""

    async def make_store(self) -> Store:
        return MemoryStore()


class SQLiteContractTests(StoreContract, TestCase):
    """The contract against :class:`~allspark.store.sqlite.SQLiteStore`, a new file per test."""

    async def make_store(self) -> Store:
        self.path = os.path.join(temp_dir(self), "data", "allspark.db")
        return open_store(f"sqlite:///{os.path.abspath(self.path)}", reactor)

    def shared_url(self) -> str | None:
        return f"sqlite:///{os.path.abspath(self.path)}"


class MongoContractTests(StoreContract, TestCase):
    """The contract against :class:`~allspark.store.mongo.MongoStore` (needs a server)."""

    def base_url(self) -> str | None:
        """The server's ``mongodb://`` URL (without a database), or None to skip."""
        return os.environ.get("ALLSPARK_TEST_MONGODB_URI")

    def setUp(self) -> defer.Deferred[None]:
        if not self.base_url():
            raise SkipTest(MONGO_SKIP)
        return super().setUp()

    async def make_store(self) -> Store:
        from allspark.store.mongo import MongoStore

        base = (self.base_url() or "").rstrip("/")
        if base.count("/") > 2:  # a database given: replace it, keep the options
            base = base[: base.rindex("/")]
        self.db_name = f"allspark_test_{uuid.uuid4().hex[:12]}"
        self.url = f"{base}/{self.db_name}"
        store = MongoStore(self.url, reactor)
        self.addCleanup(lambda: store.drop_database())
        return store

    def shared_url(self) -> str | None:
        return self.url


#: Contract tests that fail against nx-27017 because of nx-27017, and why.
NX27017_GAPS = {
    "test_nodes": "nx-27017 (not MongoDB) answers remember_node's upsert by _id, as txmongo "
                  "sends it, with \"JSON path error near '_id'\"",
}


class NX27017WireStandInContractTests(MongoContractTests):
    """The MongoDB store's contract over its real txmongo code path against
    nx-27017, a MongoDB wire-protocol server backed by SQLite: **NOT a
    MongoDB**.  A wire-level smoke test (commands, BSON, duplicate-key errors,
    cursors) started on a free port per class, with the one handshake patch of
    ``tests/store/nx27017.py``; MongoDB's own semantics need
    ``ALLSPARK_TEST_MONGODB_URI``.  Tests that fail because of nx-27017's gaps
    are skipped with the reason (:data:`NX27017_GAPS`)."""

    server: Any = None
    server_url: str | None = None

    @classmethod
    def setUpClass(cls) -> None:
        if not nx27017.available():
            return
        cls.server_dir = tempfile.mkdtemp(prefix="allspark-nx27017-")
        cls.server, cls.server_url = nx27017.start_nx27017(cls.server_dir)

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.server is not None:
            cls.server.kill()
            cls.server.wait(timeout=30)
            shutil.rmtree(cls.server_dir, ignore_errors=True)

    def base_url(self) -> str | None:
        return self.server_url

    def setUp(self) -> defer.Deferred[None]:
        if not nx27017.available():
            raise SkipTest("nx-27017 (a MongoDB wire stand-in, not MongoDB) is not installed: "
                           "pip install -e '.[test]'")
        gap = NX27017_GAPS.get(self._testMethodName)
        if gap is not None:
            raise SkipTest(gap)
        return super().setUp()



class PostgresContractTests(StoreContract, TestCase):
    """The contract against :class:`~allspark.store.postgres.PostgresStore`:
    a new database per test on the throwaway cluster this test run starts
    (``tests/store/postgres_cluster.py``)."""

    async def make_store(self) -> Store:
        self.url = database_for(self)
        return open_store(self.url, reactor)

    def shared_url(self) -> str | None:
        return self.url

# -- SQLite only ----------------------------------------------------------------------


class SurvivesReopen:
    """A durable backend's promise, for its own test class: everything
    committed is there for the next store opened on the same location
    (the class gives ``new_location()``, and ``opened(location)``, which
    starts a store there)."""

    @inline
    async def test_data_survives_close_and_reopen(self) -> None:
        """Everything committed is there after a close and a reopen."""
        case: Any = self
        path = case.new_location()
        store = await case.opened(path)
        await store.append_inbox("s", "m1", ["a", "b"], b"body", b"ans", 1000, WINDOW)
        await store.append_inbox("s", None, ["a"], b"body2", b"", 1001, WINDOW)
        await store.remember_node("a", "c", 1)
        await store.create_session("s1", "a", {"anonymous": True}, 1)
        await store.add_member("s1", "a", "c", True, "al", 2)
        await store.append_session("s1", "b", None, b"sb", b"", 3, WINDOW)
        await store.ack_session("s1", "a", 1)
        await store.close()
        store = await case.opened(path)
        case.assertEqual(seqs_of(await store.fetch_inbox("a", 0, 10)), [1, 2])
        case.assertEqual(await store.inbox_state("b"), (1, 0))
        case.assertEqual(await store.get_node("a"), ("a", "c"))
        case.assertEqual((await store.get_session("s1")).options, {"anonymous": True})
        case.assertEqual((await store.get_members("s1"))[0].acked_seq, 1)
        retry = await store.append_inbox("s", "m1", ["a", "b"], b"body", b"x", 2000, WINDOW)
        case.assertEqual(retry, AppendResult(True, {"a": 1, "b": 1}, b"ans"))

    @inline
    async def test_push_state_survives_close_and_reopen(self) -> None:
        """Targets, mutes, pending schedules (due time, gen), leases, send
        history and revocations are all there after a close and a reopen: a
        restarted server neither loses nor repeats a pending push."""
        case: Any = self
        path = case.new_location()
        store = await case.opened(path)
        sub = {"endpoint": "https://push.example/1", "keys": {"p256dh": "BP", "auth": "au"}}
        web = PushTarget("w", "webpush", None, sub, None, None, 5)
        await store.set_push_target(web)
        await store.set_push_target(fcm_target("first"))
        await store.set_push_target(fcm_target("second"))
        await store.set_push_muted("muted", True)
        await store.schedule_push(["w", "first", "second"], 100)
        await store.schedule_push(["w"], 200)
        [first] = await store.claim_due_pushes(100, "srv-a", 10_000, 1)  # due, then node_id order
        case.assertEqual(first.node_id, "first")
        await store.finish_push("first", "srv-a", first.gen, 150, None)  # sent: done
        [second] = await store.claim_due_pushes(160, "srv-a", 10_000, 1)  # leased, not finished
        case.assertEqual(second.node_id, "second")
        await store.revoke_node("r", 9000)
        await store.close()
        store = await case.opened(path)
        case.assertEqual(await store.get_push_target("w"), web)
        case.assertTrue(await store.push_muted("muted"))
        case.assertEqual(await store.revoked_until("r"), 9000)
        # "second"'s lease taken before the close still holds (until 10_160)
        jobs = await store.claim_due_pushes(10_160, "srv-b", 1000, 10)
        case.assertEqual([(j.node_id, j.gen, j.due_ms) for j in jobs], [("w", 2, 100)])
        jobs = await store.claim_due_pushes(10_161, "srv-b", 1000, 10)
        case.assertEqual([j.node_id for j in jobs], ["second"])
        case.assertEqual((jobs[0].last_sent_ms, jobs[0].gen), (None, 1))


class SQLiteStoreTests(SurvivesReopen, TestCase):
    """What only the SQLite backend promises: files, processes, batches, schema."""

    def new_path(self) -> str:
        return os.path.join(temp_dir(self), "sub", "allspark.db")

    new_location = new_path

    async def opened(self, path: str) -> Any:
        from allspark.store.sqlite import SQLiteStore

        store = SQLiteStore(path, reactor)
        await store.start()
        self.addCleanup(store.close)
        return store

    @inline
    async def test_start_creates_directory_and_records_schema_version(self) -> None:
        """start() makes the directory, creates the schema, records its version."""
        from allspark.store.sqlite import SCHEMA_VERSION

        path = self.new_path()
        store = await self.opened(path)
        self.assertTrue(os.path.isfile(path))
        self.assertEqual(store.migrations_applied, list(range(1, SCHEMA_VERSION + 1)))
        await store.close()
        with sqlite3.connect(path) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        again = await self.opened(path)
        self.assertEqual(again.migrations_applied, [])

    @inline
    async def test_newer_schema_is_refused(self) -> None:
        """A file from a newer version is not touched."""
        path = self.new_path()
        os.makedirs(os.path.dirname(path))
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA user_version = 999")
        from allspark.store.sqlite import SQLiteStore

        store = SQLiteStore(path, reactor)
        with self.assertRaises(StoreError):
            await store.start()
        await store.close()

    @inline
    async def test_closed_store_refuses_work(self) -> None:
        """After close(), operations fail with StoreError; close() twice is fine."""
        store = await self.opened(self.new_path())
        pending = store.append_inbox("s", None, ["a"], b"x", b"", 1, WINDOW)
        closed = store.close()
        self.assertEqual((await pending).seqs, {"a": 1})  # drained before closing
        await closed
        await store.close()
        with self.assertRaises(StoreError):
            await store.inbox_state("a")

    @inline
    async def test_failure_in_a_batch_fails_only_that_operation(self) -> None:
        """A DuplicateSession in the middle of a batch leaves the rest committed."""
        store = await self.opened(self.new_path())
        await store.create_session("s1", "o", {}, 1)
        before = store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)
        duplicate = store.create_session("s1", "o", {}, 2)
        after = store.append_inbox("s", None, ["a"], b"2", b"", 1, WINDOW)
        self.assertEqual((await before).seqs, {"a": 1})
        with self.assertRaises(DuplicateSession):
            await duplicate
        self.assertEqual((await after).seqs, {"a": 2})
        self.assertEqual(seqs_of(await store.fetch_inbox("a", 0, 10)), [1, 2])

    @inline
    async def test_failing_operation_rolls_back_its_own_writes(self) -> None:
        """An operation that wrote and then raised leaves nothing behind (its SAVEPOINT)."""
        from allspark.store import sqlite as sqlite_store

        store = await self.opened(self.new_path())

        @sqlite_store._multi
        def half_then_fail(cur: sqlite3.Cursor) -> None:
            sqlite_store._append_many(cur, [("s", None, ["a"], b"half", b"", 1, WINDOW, None)])
            raise StoreError("boom")

        first = store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)
        broken = store._submit(half_then_fail)
        last = store.append_inbox("s", None, ["a", "b"], b"2", b"", 1, WINDOW)
        self.assertEqual((await first).seqs, {"a": 1})
        with self.assertRaises(StoreError):
            await broken
        self.assertEqual((await last).seqs, {"a": 2, "b": 1})
        page = await store.fetch_inbox("a", 0, 10)
        self.assertEqual([m.body for m in page.messages], [b"1", b"2"])

    @inline
    async def test_two_stores_on_one_file(self) -> None:
        """Two stores (as two processes would) appending to one node get distinct seqs."""
        path = self.new_path()
        one, two = await self.opened(path), await self.opened(path)
        count = 300
        pending = []
        for i in range(count):
            pending.append(one.append_inbox("s", None, ["x"], b"one%d" % i, b"", 1, WINDOW))
            pending.append(two.append_inbox("s", None, ["x", "y"], b"two%d" % i, b"", 1, WINDOW))
        results = await defer.gatherResults(pending)
        seqs = [r.seqs["x"] for r in results]
        self.assertEqual(sorted(seqs), list(range(1, 2 * count + 1)))
        # Each store's own appends come back in increasing order.
        self.assertEqual(seqs[0::2], sorted(seqs[0::2]))
        self.assertEqual(seqs[1::2], sorted(seqs[1::2]))
        page = await one.fetch_inbox("x", 0, 10 * count)
        self.assertEqual(seqs_of(page), list(range(1, 2 * count + 1)))
        self.assertEqual(page.last_seq, 2 * count)
        self.assertEqual(await two.inbox_state("y"), (count, 0))

    @inline
    async def test_inbox_quota_holds_across_two_stores_on_one_file(self) -> None:
        """Two stores on one file (as two processes would) flooding one inbox
        store exactly the quota between them: the check is atomic with the append."""
        path = self.new_path()
        one, two = await self.opened(path), await self.opened(path)
        quota = InboxQuota(per_sender=100, per_inbox=1000)
        pending = [store.append_inbox("s", None, ["x"], b"m", b"", 1, WINDOW, quota)
                   for _ in range(150) for store in (one, two)]
        outcomes = await defer.DeferredList(pending, consumeErrors=True)
        stored = [value.seqs["x"] for ok, value in outcomes if ok]
        refused = [value for ok, value in outcomes if not ok]
        self.assertEqual(sorted(stored), list(range(1, 101)))
        self.assertEqual({type(f.value) for f in refused}, {InboxFull})
        self.assertEqual(await one.inbox_state("x"), (100, 0))

    @inline
    async def test_version_2_file_migrates_with_its_unacked_counts(self) -> None:
        """Migrating a version-2 file counts the rows already there against
        their inbox (under no sender), and acks take them off again."""
        from allspark.store.sqlite import MIGRATIONS, SCHEMA_VERSION

        path = self.new_path()
        os.makedirs(os.path.dirname(path))
        with sqlite3.connect(path) as conn:
            for statement in MIGRATIONS[0] + MIGRATIONS[1]:
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 2")
            conn.executemany("INSERT INTO inbox (node_id, seq, stored_at, body) VALUES ('a', ?, 1, 'b')",
                             [(1,), (2,), (3,)])
            conn.execute("INSERT INTO inbox_state (node_id, last_seq) VALUES ('a', 3)")
        store = await self.opened(path)
        self.assertEqual(store.migrations_applied, list(range(3, SCHEMA_VERSION + 1)))
        quota = InboxQuota(per_sender=10, per_inbox=4)
        self.assertEqual((await store.append_inbox("s", None, ["a"], b"m", b"", 2, WINDOW, quota)).seqs,
                         {"a": 4})
        with self.assertRaises(InboxFull):
            await store.append_inbox("s", None, ["a"], b"m", b"", 2, WINDOW, quota)
        self.assertEqual(await store.ack_inbox("a", 2), 2)
        self.assertEqual((await store.append_inbox("t", None, ["a"], b"m", b"", 2, WINDOW, quota)).seqs,
                         {"a": 5})
        self.assertEqual((await store.append_inbox("t", None, ["a"], b"m", b"", 2, WINDOW, quota)).seqs,
                         {"a": 6})
        with self.assertRaises(InboxFull):
            await store.append_inbox("t", None, ["a"], b"m", b"", 2, WINDOW, quota)
        # counted per sender, the old rows count under no sender
        sender_quota = InboxQuota(per_sender=2, per_inbox=10)
        with self.assertRaises(InboxFull):
            await store.append_inbox("t", None, ["a"], b"m", b"", 2, WINDOW, sender_quota)
        self.assertEqual((await store.append_inbox("u", None, ["a"], b"m", b"", 2, WINDOW, sender_quota)).seqs,
                         {"a": 7})

    @inline
    async def test_version_4_file_loses_the_deletion_trigger(self) -> None:
        """Version 5 drops the trigger that ran for every deleted inbox row:
        acks and retention take a tracked inbox's rows off its per-sender
        counts themselves, once (not again through a leftover trigger), also
        in a run of appends that skips the quota checks."""
        from allspark.store.sqlite import MIGRATIONS

        path = self.new_path()
        os.makedirs(os.path.dirname(path))
        with sqlite3.connect(path) as conn:
            for migration in MIGRATIONS[:4]:
                for statement in migration:
                    conn.execute(statement)
            conn.execute("PRAGMA user_version = 4")
        store = await self.opened(path)
        self.assertEqual(store.migrations_applied[0], 5)
        self.assertEqual(store._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'inbox'").fetchall(), [])
        quota = InboxQuota(per_sender=10, per_inbox=100)

        def pending() -> list[tuple[str, int]]:
            return store._conn.execute("SELECT sender_id, pending FROM inbox_senders WHERE node_id = 'a'").fetchall()

        async def append(at: int) -> None:
            await store.append_inbox("x", None, ["a"], b"m", b"", at, WINDOW, quota)

        for _ in range(10):  # tracked from the 6th (5 >= 10 // 2)
            await append(1000)
        with self.assertRaises(InboxFull):
            await append(1000)
        self.assertEqual(await store.ack_inbox("a", 1), 1)  # x has 9 unacked: one more fits
        await append(1000)
        with self.assertRaises(InboxFull):
            await append(1000)
        self.assertEqual(await store.ack_inbox("a", 7), 6)  # 4 unacked, still tracked (4 >= 5 / 2)
        self.assertEqual(pending(), [("x", 4)])
        await append(2000)  # 4 stored + a run of 1 <= 10 // 2: the run skips the checks, and counts
        self.assertEqual(pending(), [("x", 5)])
        for _ in range(5):
            await append(2000)
        with self.assertRaises(InboxFull):
            await append(2000)
        self.assertEqual(await store.purge(1500, 0), 4)  # seqs 8-11
        self.assertEqual(pending(), [("x", 6)])

    @inline
    async def test_per_sender_counts_start_and_stop_with_the_inbox_size(self) -> None:
        """Per-sender counts are kept only while an inbox holds at least half
        a sender's share; they are right whenever they are needed, through
        acks, retention and tracking starting in the middle of a batch."""
        store = await self.opened(self.new_path())
        quota = InboxQuota(per_sender=10, per_inbox=100)

        def tracked() -> list[tuple[str, int]]:
            return store._conn.execute(
                "SELECT sender_id, pending FROM inbox_senders WHERE node_id = 'a' AND pending > 0 "
                "ORDER BY sender_id"
            ).fetchall()

        for sender in ("x", "y", "x", "y"):
            await store.append_inbox(sender, None, ["a"], b"m", b"", 1000, WINDOW, quota)
        self.assertEqual(tracked(), [])  # 4 < 10 // 2: nothing counted per sender
        # one batch: tracking begins at the 5th message, counting the stored four and the run's own
        batch = [store.append_inbox("x", None, ["a"], b"m", b"", 2000, WINDOW, quota) for _ in range(12)]
        outcomes = await defer.DeferredList(batch, consumeErrors=True)
        self.assertEqual([ok for ok, _ in outcomes], [True] * 8 + [False] * 4)
        self.assertEqual(tracked(), [("x", 10), ("y", 2)])
        await store.ack_inbox("a", 3)  # x, y, x
        self.assertEqual(tracked(), [("x", 8), ("y", 1)])
        for _ in range(2):
            await store.append_inbox("x", None, ["a"], b"m", b"", 2000, WINDOW, quota)
        with self.assertRaises(InboxFull):
            await store.append_inbox("x", None, ["a"], b"m", b"", 2000, WINDOW, quota)
        await store.purge(1500, 0)  # the y left from the first four
        self.assertEqual(tracked(), [("x", 10)])
        await store.ack_inbox("a", 12)  # 14 -> 2 unacked, under half of 5: no longer tracked
        await store.append_inbox("y", None, ["a"], b"m", b"", 3000, WINDOW, quota)  # (noticed here)
        self.assertEqual(tracked(), [])
        for _ in range(8):
            await store.append_inbox("x", None, ["a"], b"m", b"", 3000, WINDOW, quota)
        with self.assertRaises(InboxFull):
            await store.append_inbox("x", None, ["a"], b"m", b"", 3000, WINDOW, quota)
        self.assertEqual(await store.inbox_state("a"), (23, 4))
        self.assertEqual(tracked(), [("x", 10), ("y", 1)])

    def test_two_processes_on_one_file(self) -> None:
        """Two OS processes appending to one node at once: every seq 1..N exactly once."""
        path = self.new_path()
        per_process = 2000
        script = textwrap.dedent(
            """
            import json, sys
            from twisted.internet import defer, task
            from allspark.store import open_store

            async def main(reactor):
                store = open_store("sqlite:///" + sys.argv[1], reactor)
                await store.start()
                results = []
                for start in range(0, int(sys.argv[2]), 100):
                    batch = [
                        store.append_inbox("p", None, ["x"], sys.argv[3].encode(), b"", 1, 1)
                        for _ in range(100)
                    ]
                    results += await defer.gatherResults(batch)
                await store.close()
                print(json.dumps([r.seqs["x"] for r in results]))

            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
            """
        )
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, path, str(per_process), name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for name in ("first", "second")
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            self.assertEqual(proc.returncode, 0, err.decode())
        reported = [json.loads(out) for out, _ in outputs]
        for seqs in reported:
            self.assertEqual(len(seqs), per_process)
            self.assertEqual(seqs, sorted(seqs))
        total = 2 * per_process
        self.assertEqual(sorted(reported[0] + reported[1]), list(range(1, total + 1)))
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT seq, body FROM inbox WHERE node_id = 'x' ORDER BY seq").fetchall()
            last = conn.execute("SELECT last_seq FROM inbox_state WHERE node_id = 'x'").fetchone()[0]
        self.assertEqual([r[0] for r in rows], list(range(1, total + 1)))
        self.assertEqual(last, total)
        bodies = [r[1] for r in rows]
        self.assertEqual((bodies.count(b"first"), bodies.count(b"second")), (per_process, per_process))


# -- open_store -------------------------------------------------------------------------


    @inline
    async def test_a_lock_held_by_another_process_is_waited_for_in_order(self) -> None:
        """While another connection holds the write lock, batches wait (the
        reactor is not blocked long) and then run in submission order."""
        path = self.new_path()
        store = await self.opened(path)
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("PRAGMA busy_timeout = 20")
        other.execute("BEGIN IMMEDIATE")
        first = store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(first.called)  # still waiting for the lock
        second = store.append_inbox("s", None, ["a"], b"2", b"", 1, WINDOW)
        other.execute("COMMIT")
        self.assertEqual((await first).seqs, {"a": 1})
        self.assertEqual((await second).seqs, {"a": 2})

    @inline
    async def test_a_lock_held_too_long_fails_the_batch(self) -> None:
        path = self.new_path()
        store = await self.opened(path)
        store.busy_give_up_s = 0.2
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        with self.assertRaises(StoreError):
            await store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)
        other.execute("COMMIT")
        self.assertEqual((await store.append_inbox("s", None, ["a"], b"2", b"", 1, WINDOW)).seqs, {"a": 1})

    def old_format_file(self) -> tuple[str, sqlite3.Connection]:
        """A new file as another process would have it while it opens it
        too: one table, still in the rollback journal mode; and a second
        connection to it (closed after the test)."""
        path = self.new_path()
        os.makedirs(os.path.dirname(path))
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("CREATE TABLE other_process (x)")
        return path, other

    @inline
    async def test_start_waits_while_another_process_reads_the_new_file(self) -> None:
        """The CI race, made deterministic: another process holds a read lock
        on a new file (it is opening it at the same moment).  Switching to
        WAL needs the exclusive lock, and SQLite answers SQLITE_BUSY at once,
        without a busy timeout; start() retries until the reader is done."""
        from allspark.store.sqlite import SQLiteStore

        path, other = self.old_format_file()
        other.execute("BEGIN")
        other.execute("SELECT COUNT(*) FROM other_process").fetchone()  # holds SHARED
        store = SQLiteStore(path, reactor)
        self.addCleanup(store.close)
        starting = store.start()
        await deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(starting.called)  # still waiting, and the reactor runs meanwhile
        other.execute("COMMIT")
        await starting
        self.assertEqual(store.migrations_applied[0], 1)
        self.assertEqual((await store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)).seqs, {"a": 1})
        with sqlite3.connect(path) as fresh:
            self.assertEqual(fresh.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    @inline
    async def test_start_waits_for_a_write_lock_without_blocking_the_reactor(self) -> None:
        """Another process writing to the file while this one opens it: start()
        waits for the lock in short attempts, so the reactor keeps running
        (here: to release the lock) and the open then succeeds."""
        from allspark.store.sqlite import SQLiteStore

        path, other = self.old_format_file()
        other.execute("BEGIN EXCLUSIVE")
        store = SQLiteStore(path, reactor)
        store.busy_give_up_s = 10.0
        self.addCleanup(store.close)
        starting = store.start()
        await deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(starting.called)
        other.execute("COMMIT")
        await starting
        self.assertEqual((await store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)).seqs, {"a": 1})

    @inline
    async def test_start_gives_up_on_a_lock_held_too_long(self) -> None:
        """A file locked for longer than busy_give_up_s fails start() with a
        StoreError that says so (the server then exits); nothing is left open."""
        from allspark.store.sqlite import SQLiteStore

        path, other = self.old_format_file()
        other.execute("BEGIN EXCLUSIVE")
        store = SQLiteStore(path, reactor)
        store.busy_give_up_s = 0.3
        with self.assertRaisesRegex(StoreError, "locked by another process"):
            await store.start()
        other.execute("COMMIT")
        with self.assertRaises(StoreError):
            await store.inbox_state("a")


# -- PostgreSQL only --------------------------------------------------------------------


class PostgresStoreTests(SurvivesReopen, TestCase):
    """What only the PostgreSQL backend promises: schema versions, batches
    that survive an SQL error or a deadlock, acks batched in order, several
    processes on one database, a bounded start against a dead server."""

    def new_location(self) -> str:
        return database_for(self)

    async def opened(self, url: str) -> Any:
        from allspark.store.postgres import PostgresStore

        store = PostgresStore(url, reactor)
        await store.start()
        self.addCleanup(store.close)
        return store

    def query(self, url: str, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description is not None else []

    @inline
    async def test_start_creates_the_schema_and_records_its_version(self) -> None:
        """start() creates the schema once; a second store (a second server) applies nothing."""
        from allspark.store.postgres import SCHEMA_VERSION

        url = database_for(self)
        store = await self.opened(url)
        self.assertEqual(store.migrations_applied, list(range(1, SCHEMA_VERSION + 1)))
        self.assertEqual(self.query(url, "SELECT version FROM schema_version"), [(SCHEMA_VERSION,)])
        again = await self.opened(url)
        self.assertEqual(again.migrations_applied, [])

    @inline
    async def test_newer_schema_is_refused(self) -> None:
        """A database from a newer version is not touched, and the store stays closed."""
        from allspark.store.postgres import PostgresStore

        url = database_for(self)
        self.query(url, "CREATE TABLE schema_version (version integer NOT NULL)")
        self.query(url, "INSERT INTO schema_version VALUES (999)")
        store = PostgresStore(url, reactor)
        with self.assertRaisesRegex(StoreError, "newer"):
            await store.start()
        with self.assertRaises(StoreError):
            await store.inbox_state("a")
        await store.close()

    @inline
    async def test_unreachable_server_fails_start(self) -> None:
        """Nothing listening: start() fails (bounded by connect_timeout_s) and the store stays closed."""
        from allspark.store.postgres import PostgresStore

        database_for(self)  # skips where there is no PostgreSQL (and so no psycopg)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = PostgresStore(f"postgresql://nobody@127.0.0.1:{port}/none", reactor)
        store.connect_timeout_s = 2
        with self.assertRaises(Exception):
            await store.start()
        with self.assertRaises(StoreError):
            await store.append_inbox("s", None, ["a"], b"x", b"", 1, WINDOW)
        await store.close()

    @inline
    async def test_closed_store_refuses_work(self) -> None:
        """After close(), operations fail with StoreError; what was submitted before ran."""
        store = await self.opened(database_for(self))
        pending = store.append_inbox("s", None, ["a"], b"x", b"", 1, WINDOW)
        closed = store.close()
        self.assertEqual((await pending).seqs, {"a": 1})
        await closed
        await store.close()
        with self.assertRaises(StoreError):
            await store.inbox_state("a")

    @inline
    async def test_an_sql_error_fails_only_its_operation(self) -> None:
        """An SQL error aborts a PostgreSQL transaction: the batch runs again
        with savepoints, and only the faulty operation fails."""
        import psycopg

        store = await self.opened(database_for(self))

        def broken(cur: Any) -> None:
            cur.execute("SELECT * FROM no_such_table")

        first = store.append_inbox("s", "k1", ["a"], b"1", b"", 1, WINDOW)
        bad = store._submit(broken)
        duplicate = store.create_session("s1", "o", {}, 1)
        again = store.create_session("s1", "o", {}, 2)
        last = store.append_inbox("s", None, ["a", "b"], b"2", b"", 1, WINDOW)
        self.assertEqual((await first).seqs, {"a": 1})
        with self.assertRaises(psycopg.errors.UndefinedTable):
            await bad
        self.assertEqual((await duplicate).session_id, "s1")
        with self.assertRaises(DuplicateSession):
            await again
        self.assertEqual((await last).seqs, {"a": 2, "b": 1})
        page = await store.fetch_inbox("a", 0, 10)
        self.assertEqual([m.body for m in page.messages], [b"1", b"2"])
        retry = await store.append_inbox("s", "k1", ["a"], b"1", b"", 2, WINDOW)
        self.assertEqual((retry.duplicate, retry.seqs), (True, {"a": 1}))

    @inline
    async def test_a_deadlock_reruns_the_batch_once_whole(self) -> None:
        """A batch PostgreSQL aborted (deadlock, serialization failure) runs
        again from the start; nothing of the aborted attempt remains."""
        import psycopg

        store = await self.opened(database_for(self))
        attempts: list[int] = []

        def deadlocks_once(cur: Any) -> str:
            attempts.append(1)
            if len(attempts) == 1:
                raise psycopg.errors.DeadlockDetected("deadlock detected (test)")
            return "ok"

        first = store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)
        flaky = store._submit(deadlocks_once)
        last = store.append_inbox("s", None, ["a"], b"2", b"", 1, WINDOW)
        self.assertEqual([(await first).seqs, await flaky, (await last).seqs], [{"a": 1}, "ok", {"a": 2}])
        self.assertEqual(len(attempts), 2)
        self.assertEqual(seqs_of(await store.fetch_inbox("a", 0, 10)), [1, 2])
        self.assertEqual(await store.inbox_state("a"), (2, 0))

    @inline
    async def test_a_retry_committed_by_another_server_meanwhile_is_a_duplicate(self) -> None:
        """The same (sender, id) appended by another server while this batch
        runs: the batch waits for it, runs again and answers as a duplicate;
        nothing is stored twice."""
        import psycopg

        url = database_for(self)
        store = await self.opened(url)
        other = psycopg.connect(url)
        self.addCleanup(other.close)
        other.execute(
            "INSERT INTO dedup (sender_id, dedup_id, created_at, seqs, answer) "
            "VALUES ('s', 'k1', 1000, %s, 'first')", ('{"a": 7}',)
        )  # not committed yet: the other server's transaction is in flight
        appended = store.append_inbox("s", "k1", ["a"], b"retry", b"second", 1001, WINDOW)
        for _ in range(400):  # until the store's INSERT waits for the other transaction's key
            waiting = self.query(url, "SELECT count(*) FROM pg_stat_activity "
                                      "WHERE application_name = 'allspark' AND wait_event_type = 'Lock'")
            if waiting[0][0]:
                break
            await deferLater(reactor, 0.025, lambda: None)
        else:
            self.fail("the store never waited for the other transaction")
        other.commit()
        self.assertEqual(await appended, AppendResult(True, {"a": 7}, b"first"))
        self.assertEqual(await store.inbox_state("a"), (0, 0))
        self.assertEqual((await store.fetch_inbox("a", 0, 10)).messages, [])

    @inline
    async def test_a_lost_connection_fails_its_batch_and_the_next_one_reconnects(self) -> None:
        """The database drops the store's connection: the batch in flight
        fails (it may or may not have committed: the caller decides), the
        next batch runs on a new connection."""
        url = database_for(self)
        store = await self.opened(url)
        await store.append_inbox("s", None, ["a"], b"1", b"", 1, WINDOW)
        self.query(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'allspark' AND datname = current_database()")
        with self.assertRaises(Exception):
            await store.append_inbox("s", None, ["a"], b"2", b"", 1, WINDOW)
        self.flushLoggedErrors()  # adbapi logs the failed rollback of the dead connection
        self.assertEqual((await store.append_inbox("s", None, ["a"], b"3", b"", 1, WINDOW)).seqs, {"a": 2})
        self.assertEqual([m.body for m in (await store.fetch_inbox("a", 0, 10)).messages], [b"1", b"3"])

    @inline
    async def test_acks_in_one_batch_count_in_order(self) -> None:
        """A run of acks goes in together; each returns what it deleted, in submission order."""
        store = await self.opened(database_for(self))
        for _ in range(5):
            await store.append_inbox("s", None, ["a", "b"], b"m", b"", 1, WINDOW)
        counts = [store.ack_inbox("a", 3), store.ack_inbox("b", 1), store.ack_inbox("a", 5),
                  store.ack_inbox("a", 2), store.ack_inbox("nobody", 9), store.ack_inbox("b", 4)]
        self.assertEqual([await d for d in counts], [3, 1, 2, 0, 0, 3])
        quota = InboxQuota(per_sender=1, per_inbox=1)
        self.assertEqual((await store.append_inbox("s", None, ["a"], b"m", b"", 1, WINDOW, quota)).seqs,
                         {"a": 6})  # the acks freed the inbox: its counters went down
        with self.assertRaises(InboxFull):
            await store.append_inbox("s", None, ["b"], b"m", b"", 1, WINDOW, quota)

    def test_counters_stay_exact_with_two_processes_appending_and_acking(self) -> None:
        """Two processes append to and ack the same inboxes at once (batches
        that lock counter rows in different mixes): no batch fails, and every
        inbox's unacked counters equal the rows it holds."""
        url = database_for(self)
        script = textwrap.dedent(
            """
            import sys
            from twisted.internet import defer, task
            from allspark.store import InboxQuota, open_store

            async def main(reactor):
                store = open_store(sys.argv[1], reactor)
                await store.start()
                name, nodes = sys.argv[2], ["n0", "n1", "n2", "n3", "n4"]
                quota = InboxQuota(per_sender=10**6, per_inbox=10**6)
                for r in range(60):
                    ops = []
                    for i in range(40):
                        targets = [nodes[(r + i) % 5], nodes[(r * 3 + i * 7) % 5]]
                        ops.append(store.append_inbox(name, f"{name}-{r}-{i}", targets, b"m", b"", 1, 600000, quota))
                    for j, node in enumerate(nodes):
                        last, _ = await store.inbox_state(node)
                        if (r + j) % 2:
                            ops.append(store.ack_inbox(node, max(0, last - 30)))
                    await defer.gatherResults(ops)
                await store.close()

            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
            """
        )
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = [
            subprocess.Popen([sys.executable, "-c", script, url, name],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            for name in ("p1", "p2")
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            self.assertEqual(proc.returncode, 0, err.decode()[-3000:])
        state = self.query(url, "SELECT s.node_id, s.pending, (SELECT count(*) FROM inbox AS i "
                                "WHERE i.node_id = s.node_id) FROM inbox_state AS s ORDER BY 1")
        self.assertEqual(len(state), 5)
        for node_id, pending, rows in state:
            self.assertEqual(pending, rows, node_id)
        senders = self.query(url, "SELECT t.node_id, t.sender_id, t.pending, (SELECT count(*) FROM inbox AS i "
                                  "WHERE i.node_id = t.node_id AND i.sender_id = t.sender_id) "
                                  "FROM inbox_senders AS t")
        for node_id, sender_id, pending, rows in senders:
            self.assertEqual(pending, rows, (node_id, sender_id))
        self.assertEqual(self.query(url, "SELECT count(*) FROM dedup"), [(2 * 60 * 40,)])

    def test_two_processes_on_one_database(self) -> None:
        """Two OS processes appending to one node at once: every seq 1..N exactly once, each in order."""
        url = database_for(self)
        per_process = 2000
        script = textwrap.dedent(
            """
            import json, sys
            from twisted.internet import defer, task
            from allspark.store import open_store

            async def main(reactor):
                store = open_store(sys.argv[1], reactor)
                await store.start()
                results = []
                for start in range(0, int(sys.argv[2]), 100):
                    batch = [
                        store.append_inbox("p", None, ["x"], sys.argv[3].encode(), b"", 1, 1)
                        for _ in range(100)
                    ]
                    results += await defer.gatherResults(batch)
                await store.close()
                print(json.dumps([r.seqs["x"] for r in results]))

            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
            """
        )
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, url, str(per_process), name],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            )
            for name in ("first", "second")
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            self.assertEqual(proc.returncode, 0, err.decode())
        reported = [json.loads(out) for out, _ in outputs]
        for seqs in reported:
            self.assertEqual(len(seqs), per_process)
            self.assertEqual(seqs, sorted(seqs))
        total = 2 * per_process
        self.assertEqual(sorted(reported[0] + reported[1]), list(range(1, total + 1)))
        rows = self.query(url, "SELECT seq, body FROM inbox WHERE node_id = 'x' ORDER BY seq")
        self.assertEqual([r[0] for r in rows], list(range(1, total + 1)))
        self.assertEqual(self.query(url, "SELECT last_seq, pending FROM inbox_state WHERE node_id = 'x'"),
                         [(total, total)])
        bodies = [bytes(r[1]) for r in rows]
        self.assertEqual((bodies.count(b"first"), bodies.count(b"second")), (per_process, per_process))


class OpenStoreTests(TestCase):
    """``open_store`` picks the backend from the URL and rejects the rest."""

    def test_memory(self) -> None:
        for url in ("memory:", "memory://", "memory"):
            self.assertIsInstance(open_store(url, reactor), MemoryStore)

    def test_sqlite_paths(self) -> None:
        from allspark.store.sqlite import SQLiteStore

        store = open_store("sqlite:///var/lib/allspark/a.db", reactor)
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.path, "/var/lib/allspark/a.db")
        self.assertEqual(open_store("sqlite:data/a.db", reactor).path, "data/a.db")

    def test_bad_urls(self) -> None:
        for url in ("sqlite:", "sqlite://host/a.db", "sqlite:///", "mysql://x/y", "postgresql:", "", "mem"):
            with self.assertRaises(ValueError, msg=url):
                open_store(url, reactor)

    def test_postgresql(self) -> None:
        """postgresql:// and postgres:// URLs build (without connecting) the PostgreSQL store."""
        from allspark.store.postgres import PostgresStore

        for url in ("postgresql://allspark@db.example:5432/chat", "postgres://u:pw@h/db?sslmode=require"):
            store = open_store(url, reactor)
            self.assertIsInstance(store, PostgresStore)
            self.assertEqual(store.url, url)

    def test_mongodb(self) -> None:
        """The MongoDB store is built lazily; the database comes from the path."""
        from allspark.store.mongo import MongoStore

        store = open_store("mongodb://db.example:27017/chat?w=majority", reactor)
        self.assertIsInstance(store, MongoStore)
        self.assertEqual(store.database_name, "chat")
        self.assertEqual(open_store("mongodb://db.example", reactor).database_name, "allspark")
        self.assertEqual(open_store("mongodb://h:1/?w=1", reactor).database_name, "allspark")
