"""What only the MongoDB store promises: its append txns, leases and start timeout.

Crashes are simulated by driving a store's internals part of the way (claim,
lock, insert) and abandoning it, as a process killed at that point would.
These tests need a server speaking MongoDB's wire protocol: the one named by
``ALLSPARK_TEST_MONGODB_URI`` when set, otherwise nx-27017 (a wire stand-in
backed by SQLite, NOT a MongoDB; see ``tests/store/nx27017.py``) started for
this class.  The start timeout needs no server at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

from bson.binary import Binary
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from allspark.store import AppendResult, InboxPage, StoreError
from allspark.store.mongo import MongoStore
from tests.store import nx27017
from tests.store.test_contract import WINDOW, inline, seqs_of


class Silent(protocol.Protocol):
    """Accepts a connection and never answers."""


class MongoStartTests(TestCase):
    """start() against a server that never answers."""

    @inline
    async def test_start_times_out_with_a_clear_error(self) -> None:
        """A port that accepts but never answers: start() fails with
        StoreError naming the host (not the credentials) after start_timeout_s,
        and the store refuses work."""
        factory = protocol.Factory.forProtocol(Silent)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        store = MongoStore(f"mongodb://user:secret@127.0.0.1:{number}/db", reactor)
        store.start_timeout_s = 0.5
        with self.assertRaises(StoreError) as caught:
            await store.start()
        message = str(caught.exception)
        self.assertIn(f"127.0.0.1:{number} did not answer within 0.5 s", message)
        self.assertNotIn("secret", message)
        with self.assertRaises(StoreError):
            await store.inbox_state("a")
        await store.close()


class MongoTxnTests(TestCase):
    """Leases, commit markers and recovery, against a wire-protocol server
    (a real MongoDB via ``ALLSPARK_TEST_MONGODB_URI``, else the nx-27017
    stand-in, which is NOT MongoDB)."""

    server: Any = None
    server_url: str | None = None

    @classmethod
    def setUpClass(cls) -> None:
        cls.server_url = os.environ.get("ALLSPARK_TEST_MONGODB_URI")
        if cls.server_url or not nx27017.available():
            return
        cls.server_dir = tempfile.mkdtemp(prefix="allspark-nx27017-")
        cls.server, cls.server_url = nx27017.start_nx27017(cls.server_dir)

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.server is not None:
            cls.server.kill()
            cls.server.wait(timeout=30)
            shutil.rmtree(cls.server_dir, ignore_errors=True)

    def setUp(self) -> None:
        if not self.server_url:
            raise SkipTest("no MongoDB wire server: set ALLSPARK_TEST_MONGODB_URI or install "
                           "nx-27017 (a wire stand-in, not MongoDB)")
        base = self.server_url.rstrip("/")
        if base.count("/") > 2:
            base = base[: base.rindex("/")]
        self.url = f"{base}/allspark_test_{uuid.uuid4().hex[:12]}"

    async def opened(self, lease_ms: int = 10_000) -> MongoStore:
        """A started store on this test's database (dropped at cleanup)."""
        store = MongoStore(self.url, reactor)
        store.lease_ms = lease_ms
        await store.start()
        self.addCleanup(store.close)
        if not hasattr(self, "dropped"):
            self.dropped = True
            self.addCleanup(lambda: MongoStore(self.url, reactor).drop_database())
        return store

    async def crash_after_insert(
        self, store: MongoStore, recipients: list[str], dedup_id: str | None = None
    ) -> str:
        """Do what an append does up to (not including) its commit, then stop
        as a killed process would: claim, lock every recipient, insert the
        copies.  The txn id."""
        txn = uuid.uuid4().hex
        if dedup_id is not None:
            self.assertIsNone(await store._claim("s", dedup_id, 1000, WINDOW, txn))
        rows = []
        for node in sorted(recipients):
            seq = await store._lock("inbox", node, txn)
            rows.append({"node_id": node, "seq": seq, "sender_id": "s", "stored_at": 1000,
                         "body": Binary(b"crashed"), "txn": txn})
        await store._c("inbox").insert_many(rows)
        return txn

    @inline
    async def test_uncommitted_copies_are_invisible(self) -> None:
        """Copies of an append that has not committed are not read, not
        counted in last_seq, and a reader's page stops before them."""
        store = await self.opened()
        await store.append_inbox("s", None, ["a"], b"one", b"", 1000, WINDOW)
        await self.crash_after_insert(store, ["a", "b"])
        reader = await self.opened()
        page = await reader.fetch_inbox("a", 0, 10)
        self.assertEqual((seqs_of(page), page.last_seq), ([1], 1))
        self.assertEqual(await reader.fetch_inbox("b", 0, 10), InboxPage([], 0, 0, 0))
        self.assertEqual(await reader.inbox_state("b"), (0, 0))

    @inline
    async def test_a_committed_append_whose_writer_died_is_read_in_every_inbox(self) -> None:
        """The commit marker is the commit point: once it is there, a reader
        reads the copies in every recipient's inbox (rolling the locks
        forward), even though the writer never released them."""
        store = await self.opened()
        txn = await self.crash_after_insert(store, ["a", "b"])
        reader = await self.opened()
        self.assertEqual(await reader.inbox_state("a"), (0, 0))
        await store._c("txns").insert_one({"_id": txn, "state": "committed", "at": 0,
                                           "seqs": [["a", 1], ["b", 1]], "answer": Binary(b"")})
        for node in ("a", "b"):
            page = await reader.fetch_inbox(node, 0, 10)
            self.assertEqual(([m.body for m in page.messages], page.last_seq), ([b"crashed"], 1))
        self.assertEqual((await reader.append_inbox("s", None, ["a"], b"next", b"", 1000, WINDOW)).seqs,
                         {"a": 2})

    @inline
    async def test_a_crashed_first_attempt_is_taken_over_after_its_lease(self) -> None:
        """A writer died after claiming the de-dup key, locking and inserting:
        once the leases ran out, the retry (another process) aborts it, takes
        the claim over and stores the message once, at the seq the dead
        attempt had; the dead copies are gone."""
        dead = await self.opened(lease_ms=300)
        await self.crash_after_insert(dead, ["a", "b"], dedup_id="m1")
        retry = await self.opened(lease_ms=300)
        result = await retry.append_inbox("s", "m1", ["a", "b"], b"retry", b"ans", 1000, WINDOW)
        self.assertEqual(result, AppendResult(False, {"a": 1, "b": 1}, b"ans"))
        for node in ("a", "b"):
            page = await retry.fetch_inbox(node, 0, 10)
            self.assertEqual(([m.body for m in page.messages], page.last_seq), ([b"retry"], 1))
        again = await retry.append_inbox("s", "m1", ["a", "b"], b"retry", b"x", 1001, WINDOW)
        self.assertEqual(again, AppendResult(True, {"a": 1, "b": 1}, b"ans"))

    @inline
    async def test_a_failed_settle_does_not_store_the_retry_twice(self) -> None:
        """The append committed but its de-dup entry was never settled (the
        process died, or the update failed): a retry is still a duplicate,
        answered with the first attempt's seqs and answer, and stores nothing."""
        first = await self.opened()

        async def settle_lost(*args: Any) -> None:
            return None

        first._settle = settle_lost  # type: ignore[method-assign]
        stored = await first.append_inbox("s", "m1", ["a", "b"], b"one", b"ans1", 1000, WINDOW)
        self.assertEqual(stored, AppendResult(False, {"a": 1, "b": 1}, b"ans1"))
        other = await self.opened()
        retry = await other.append_inbox("s", "m1", ["a", "b"], b"one", b"ans2", 1500, WINDOW)
        self.assertEqual(retry, AppendResult(True, {"a": 1, "b": 1}, b"ans1"))
        self.assertEqual(await other.inbox_state("a"), (1, 0))
        self.assertEqual(seqs_of(await other.fetch_inbox("b", 0, 10)), [1])

    @inline
    async def test_a_commit_that_loses_to_recovery_fails_and_shows_nothing(self) -> None:
        """A writer slower than its lease (held just before its commit):
        another writer recovers (aborts) its txn; the slow writer's commit
        then fails with StoreError, and none of its copies is ever read."""
        slow = await self.opened(lease_ms=200)
        fast = await self.opened(lease_ms=200)
        gate: defer.Deferred[None] = defer.Deferred()
        at_commit: list[bool] = []
        real = slow._c

        class HeldCommit:
            """The txns collection, holding a commit until ``gate`` fires."""

            def __init__(self, collection: Any) -> None:
                self.collection = collection

            def __getattr__(self, name: str) -> Any:
                return getattr(self.collection, name)

            async def insert_one(self, doc: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                if doc.get("state") == "committed":
                    at_commit.append(True)
                    await gate
                return await self.collection.insert_one(doc, *args, **kwargs)

        slow._c = lambda name: HeldCommit(real(name)) if name == "txns" else real(name)  # type: ignore[method-assign]
        pending = slow.append_inbox("s", None, ["a", "b"], b"slow", b"", 1000, WINDOW)
        for _ in range(500):
            if at_commit:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(at_commit, [True])
        self.assertEqual((await fast.append_inbox("s", None, ["b"], b"fast", b"", 1000, WINDOW)).seqs,
                         {"b": 1})
        gate.callback(None)
        with self.assertRaises(StoreError):
            await pending
        self.assertEqual([m.body for m in (await fast.fetch_inbox("b", 0, 10)).messages], [b"fast"])
        self.assertEqual(await fast.inbox_state("a"), (0, 0))
        self.assertEqual((await fast.append_inbox("s", None, ["a"], b"a1", b"", 1000, WINDOW)).seqs,
                         {"a": 1})
        self.assertEqual([m.body for m in (await fast.fetch_inbox("a", 0, 10)).messages], [b"a1"])

    @inline
    async def test_a_writer_waiting_for_a_lock_keeps_the_locks_it_holds(self) -> None:
        """A writer holding ``a`` waits for ``b``, locked by a crashed writer
        whose lease is longer than its own: it renews its lease on ``a``
        meanwhile, so a third writer waits for ``a`` instead of aborting it;
        both appends are stored, in order."""
        crashed = await self.opened(lease_ms=2000)  # lapses within the others' wait (3 leases)
        await self.crash_after_insert(crashed, ["b"])
        waiting = await self.opened(lease_ms=1000)
        third = await self.opened(lease_ms=1000)
        first = waiting.append_inbox("s", None, ["a", "b"], b"first", b"", 1000, WINDOW)
        for _ in range(500):
            state = await third._c("inbox_state").find_one({"_id": "a"})
            if state is not None and state.get("lock"):
                break
            await deferLater(reactor, 0.01, lambda: None)
        second = third.append_inbox("s", None, ["a"], b"second", b"", 1000, WINDOW)
        self.assertEqual((await first).seqs, {"a": 1, "b": 1})
        self.assertEqual((await second).seqs, {"a": 2})
        page = await third.fetch_inbox("a", 0, 10)
        self.assertEqual([m.body for m in page.messages], [b"first", b"second"])
        self.assertEqual([m.body for m in (await third.fetch_inbox("b", 0, 10)).messages], [b"first"])

    @inline
    async def test_debris_of_an_aborted_writer_is_cleared(self) -> None:
        """A row left above last_seq by a writer that outlived its lease (its
        txn aborted, its insert came after the recovery) does not block the
        next append at that seq and is never read."""
        store = await self.opened()
        await store._c("inbox").insert_one({"node_id": "a", "seq": 1, "sender_id": "s",
                                            "stored_at": 1, "body": Binary(b"ghost"), "txn": "ghost"})
        self.assertEqual(await store.fetch_inbox("a", 0, 10), InboxPage([], 0, 0, 0))
        result = await store.append_inbox("s", None, ["b", "a"], b"real", b"", 1000, WINDOW)
        self.assertEqual(result.seqs, {"b": 1, "a": 1})
        for node in ("a", "b"):
            page = await store.fetch_inbox(node, 0, 10)
            self.assertEqual(([m.body for m in page.messages], page.last_seq), ([b"real"], 1))
