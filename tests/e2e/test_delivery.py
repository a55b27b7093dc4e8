"""Definite delivery, end to end, against real ``twistd -n allspark`` processes.

Each test starts its own server on 127.0.0.1 with a temporary data directory
(the SQLite store) and talks to it with :mod:`allspark.client`.  Timings of
the big tests are printed (run pytest with ``-s`` to see them); they are
measured, not asserted.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from allspark.client import AllsparkError, Client
from tests.support import ServerProcess, client_for, sleep, start_server


def report(what: str, seconds: float, count: int) -> None:
    """Print a measurement (seen with ``pytest -s``)."""
    print(f"\n[measure] {what}: {count} in {seconds:.2f} s = {count / seconds:,.0f}/s",
          file=sys.stderr)


def drain(client: Client) -> list[dict[str, Any]]:
    """Every message already handed to the app and not yet read (no waiting)."""
    got = list(client.messages.pending)
    client.messages.pending.clear()
    return got


async def meet(testcase: unittest.TestCase, server: ServerProcess, node_id: str) -> None:
    """Connect ``node_id`` once and leave: the cluster now knows the node."""
    client = await client_for(testcase, server, node_id)
    await client.ping()
    await client.close()


async def send_all(client: Client, dest_id: str, count: int, prefix: str = "m",
                   **fields: Any) -> list[dict[str, Any]]:
    """Send ``count`` messages pipelined (no waiting between them), each with
    id ``{prefix}-{i}`` and payload ``{"i": i}``; the ``accepted`` answers."""
    ds = [client.send(dest_id=dest_id, id=f"{prefix}-{i}", payload={"i": i}, **fields)
          for i in range(count)]
    return await gatherResults(ds, consumeErrors=True)


async def wait_for(predicate: Any, timeout: float = 10.0, step: float = 0.02) -> None:
    """Poll ``predicate`` on the reactor until it is true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await sleep(step)


class OfflineBacklogTests(unittest.TestCase):
    """Messages to an offline node are kept and come back, in order, on sync."""

    timeout = 60

    def setUp(self) -> None:
        # one client pipelines 10,000 messages: above the default rate limit
        self.server = start_server(self, "--max-rate=100000", "--max-burst=100000")

    async def test_ten_thousand_messages_arrive_complete_and_in_order(self) -> None:
        count = 10_000
        await meet(self, self.server, "bob-phone")
        alice = await client_for(self, self.server, "alice-laptop", "alice")
        started = time.monotonic()
        answers = await send_all(alice, "bob-phone", count)
        report("durable sends, one client, pipelined", time.monotonic() - started, count)
        self.assertEqual({a["status"] for a in answers}, {"stored"})

        started = time.monotonic()
        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)  # syncs on connect
        report("sync of an offline backlog (connect + all pages)", time.monotonic() - started, count)
        got = drain(bob)
        self.assertEqual([m["seq"] for m in got], list(range(1, count + 1)))
        self.assertEqual([m["payload"]["i"] for m in got], list(range(count)))
        self.assertEqual({m["src_id"] for m in got}, {"alice-laptop"})

    async def test_acked_messages_do_not_come_back_unacked_ones_do(self) -> None:
        await meet(self, self.server, "bob-phone")
        alice = await client_for(self, self.server, "alice-laptop")
        await send_all(alice, "bob-phone", 10)
        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)
        self.assertEqual([m["seq"] for m in drain(bob)], list(range(1, 11)))
        acked = await bob.ack(6)
        self.assertEqual((acked["upto"], acked["removed"]), (6, 6))
        await bob.close()

        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)
        self.assertEqual([m["payload"]["i"] for m in drain(bob)], [6, 7, 8, 9])
        await bob.close()
        # the same again: nothing was acked on the second connection
        bob = await client_for(self, self.server, "bob-phone", auto_ack=True)
        self.assertEqual([m["seq"] for m in drain(bob)], [7, 8, 9, 10])
        await wait_for(lambda: bob._streams[None].acked == 10)  # the automatic ack went out
        await bob.ping()  # and was answered before this pong
        await bob.close()
        bob = await client_for(self, self.server, "bob-phone")
        self.assertEqual(drain(bob), [])

    async def test_live_messages_carry_seq_and_are_not_synced_twice(self) -> None:
        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)
        alice = await client_for(self, self.server, "alice-laptop")
        answers = await send_all(alice, "bob-phone", 5)
        self.assertEqual({a["status"] for a in answers}, {"delivered"})
        live = [await bob.next_message() for _ in range(5)]
        self.assertEqual([m["seq"] for m in live], [1, 2, 3, 4, 5])
        # a sync now sees the same (unacked) rows; the client drops them as duplicates
        self.assertEqual(await bob.sync(), 0)
        self.assertEqual(drain(bob), [])


class DeduplicationTests(unittest.TestCase):
    """A retried id is stored and delivered once and answered identically."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_retried_id_is_delivered_once_with_the_same_answer(self) -> None:
        await meet(self, self.server, "bob-phone")
        alice = await client_for(self, self.server, "alice-laptop")
        first = await alice.send(dest_id="bob-phone", id="order-1", payload="once")
        again = await alice.send(dest_id="bob-phone", id="order-1", payload="once")
        # pipelined retries while the first may still be in the store's queue (the
        # client matches answers by id, so the retries go raw: their answers are events)
        pending = alice.send(dest_id="bob-phone", id="order-2", payload=0)
        for n in range(1, 5):
            alice.send_raw(orjson.dumps({"dest_id": "bob-phone", "id": "order-2", "payload": n}))
        more = [await pending] + [await alice.next_event() for _ in range(4)]
        self.assertEqual(first, again)
        self.assertEqual(first["status"], "stored")
        self.assertEqual(more, [more[0]] * 5)

        await alice.close()  # the sender reconnects and retries once more
        alice = await client_for(self, self.server, "alice-laptop")
        after_reconnect = await alice.send(dest_id="bob-phone", id="order-1", payload="once")
        self.assertEqual(after_reconnect, first)

        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)
        got = drain(bob)
        self.assertEqual([(m["id"], m["payload"]) for m in got], [("order-1", "once"), ("order-2", 0)])
        # the same id from another sender is another message
        carol = await client_for(self, self.server, "carol-tab")
        await carol.send(dest_id="bob-phone", id="order-1", payload="carol's")
        self.assertEqual((await bob.next_message())["src_id"], "carol-tab")


class CrashTests(unittest.TestCase):
    """kill -9 right after ``accepted``: nothing accepted is lost."""

    timeout = 60

    async def test_every_accepted_message_survives_kill_9(self) -> None:
        server = ServerProcess().start()
        self.addCleanup(server.stop)
        await meet(self, server, "bob-phone")
        senders = [await client_for(self, server, f"sender-{n}") for n in range(4)]
        per_sender = 500
        results = await gatherResults(
            [Deferred.fromCoroutine(send_all(s, "bob-phone", per_sender, prefix=f"s{n}"))
             for n, s in enumerate(senders)]
        )
        server.kill()  # SIGKILL at once: no drain, no clean close of the store
        accepted = {(f"sender-{n}", a["id"]) for n, answers in enumerate(results) for a in answers}
        self.assertEqual(len(accepted), 4 * per_sender)
        for s in senders:
            await s.closed

        restarted = ServerProcess(data_dir=server.data_dir, port=server.port)
        with self.assertRaises(RuntimeError):  # the crashed process left its claim behind
            restarted.start(timeout=10)
        restarted.start(force=True)
        self.addCleanup(restarted.stop)
        bob = await client_for(self, restarted, "bob-phone", auto_ack=False)
        got = drain(bob)
        received = {(m["src_id"], m["id"]) for m in got}
        self.assertEqual(received, accepted)
        self.assertEqual(len(got), len(accepted))  # exactly once after the client's de-dup
        self.assertEqual(len({m["seq"] for m in got}), len(got))
        # each sender's messages are in its sending order
        for n in range(4):
            mine = [m["payload"]["i"] for m in got if m["src_id"] == f"sender-{n}"]
            self.assertEqual(mine, list(range(per_sender)))


class BrokenConnectionTests(unittest.TestCase):
    """A connection that dies with messages in flight loses nothing."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_recipient_connection_dies_while_messages_stream_in(self) -> None:
        count = 2000
        bob = await client_for(self, self.server, "bob-phone", auto_ack=True)
        alice = await client_for(self, self.server, "alice-laptop")
        ds = [alice.send(dest_id="bob-phone", id=f"m-{i}", payload={"i": i}) for i in range(count)]
        await wait_for(lambda: bob.received >= 50)
        bob.drop()  # no close handshake: the server finds out late
        await bob.closed
        first = drain(bob)
        answers = await gatherResults(ds)
        self.assertEqual(len(answers), count)
        if len(first) == count:
            self.skipTest("every message arrived before the connection was dropped: nothing was in flight")

        bob = await client_for(self, self.server, "bob-phone", auto_ack=True)
        second = drain(bob)
        seqs = {m["seq"] for m in first} | {m["seq"] for m in second}
        self.assertEqual(seqs, set(range(1, count + 1)))
        self.assertEqual({m["payload"]["i"] for m in first + second}, set(range(count)))

    async def test_sender_connection_dies_then_retries_with_the_same_ids(self) -> None:
        count = 1000
        await meet(self, self.server, "bob-phone")
        alice = await client_for(self, self.server, "alice-laptop")
        ds = [alice.send(dest_id="bob-phone", id=f"m-{i}", payload={"i": i}) for i in range(count)]
        for d in ds:
            d.addErrback(lambda f: None)
        alice.drop()
        await alice.closed
        # the sender does not know what got through: it retries everything
        alice = await client_for(self, self.server, "alice-laptop")
        answers = await send_all(alice, "bob-phone", count)
        self.assertEqual(len(answers), count)
        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)
        got = drain(bob)
        self.assertEqual([m["payload"]["i"] for m in got], list(range(count)))


class BadCursorTests(unittest.TestCase):
    """Malformed or impossible cursors get an error frame; the connection goes on."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def expect_error(self, client: Client, frame: dict[str, Any], code: str) -> None:
        """``frame`` is answered with an error ``code``; a ping still works after it."""
        try:
            answer = await client.request(frame)
        except AllsparkError as e:
            self.assertEqual(e.code, code, f"{frame} -> {e.frame}")
            self.assertTrue(e.frame["message"])
        else:
            self.fail(f"{frame} was answered with {answer}")
        self.assertEqual((await client.ping())["op"], "pong")

    async def full_sync(self, client: Client, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a sync without session_id as a raw request: its first part
        (the inbox's ``synced``) answers it; wait for its ``sync_done``."""
        synced = await client.request(frame)
        done = await client.next_event()
        self.assertEqual((done["op"], done["id"]), ("sync_done", synced["id"]))
        return synced

    async def test_bad_sync_and_ack_cursors(self) -> None:
        await meet(self, self.server, "bob-phone")
        alice = await client_for(self, self.server, "alice-laptop")
        await send_all(alice, "bob-phone", 3)
        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)
        self.assertEqual(len(drain(bob)), 3)
        for bad in (-1, "5", 1.5, True, None, [1], {"seq": 1}, 2**63):
            await self.expect_error(bob, {"op": "sync", "after": bad}, "bad_frame")
            await self.expect_error(bob, {"op": "ack", "upto": bad}, "bad_frame")
        for bad in (0, -1, 1001, 10**6, "10", 2.0, False):
            await self.expect_error(bob, {"op": "sync", "limit": bad}, "bad_frame")
        await self.expect_error(bob, {"op": "ack"}, "bad_frame")
        await self.expect_error(bob, {"op": "sync", "after": 0, "cursor": 1}, "bad_frame")
        # well-formed but impossible: beyond the last seq this inbox ever had
        await self.expect_error(bob, {"op": "ack", "upto": 4}, "bad_cursor")
        await self.expect_error(bob, {"op": "ack", "upto": 2**62}, "bad_cursor")
        await self.expect_error(bob, {"op": "sync", "after": 4}, "bad_cursor")
        await self.expect_error(bob, {"op": "sync", "after": 2**62}, "bad_cursor")
        # nothing was deleted by the refused acks
        synced = await self.full_sync(bob, {"op": "sync", "after": 0, "limit": 1000})
        self.assertEqual((synced["upto"], synced["more"], synced["last_seq"]), (3, False, 3))
        # an integer JSON cannot even hold is a frame error without an id
        bob.send_raw('{"op": "ack", "upto": 1' + "0" * 40 + ', "id": "huge"}')
        event = await bob.next_event()
        self.assertEqual((event["op"], event["code"]), ("error", "bad_frame"))
        # limits at the edges are fine
        self.assertFalse((await self.full_sync(bob, {"op": "sync", "limit": 1}))["more"] is None)
        self.assertEqual((await self.full_sync(bob, {"op": "sync", "after": 3, "limit": 1000}))["more"], False)
        self.assertEqual((await bob.ack(3))["removed"], 3)
        self.assertEqual((await bob.ack(3))["removed"], 0)  # acking again is harmless


class EphemeralAndUnknownTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_ephemeral_to_an_offline_node_is_dropped_and_never_stored(self) -> None:
        await meet(self, self.server, "bob-phone")
        alice = await client_for(self, self.server, "alice-laptop")
        answer = await alice.send(dest_id="bob-phone", id="e-1", payload="typing", ephemeral=True)
        self.assertEqual((answer["status"], answer["live"]), ("dropped", 0))
        durable = await alice.send(dest_id="bob-phone", id="d-1", payload="hello")
        self.assertEqual(durable["status"], "stored")
        bob = await client_for(self, self.server, "bob-phone", auto_ack=False)
        self.assertEqual([m["id"] for m in drain(bob)], ["d-1"])
        # online: delivered live, without a seq, and still never stored
        answer = await alice.send(dest_id="bob-phone", id="e-2", payload="typing", ephemeral=True)
        self.assertEqual(answer["status"], "delivered")
        live = await bob.next_message()
        self.assertEqual((live["id"], live.get("ephemeral")), ("e-2", True))
        self.assertNotIn("seq", live)
        synced = await bob.request({"op": "sync", "after": 0})
        self.assertEqual(synced["last_seq"], 1)

    async def test_never_connected_node_is_an_unknown_destination(self) -> None:
        alice = await client_for(self, self.server, "alice-laptop")
        with self.assertRaises(AllsparkError) as caught:
            await alice.send(dest_id="nobody-ever", id="x-1", payload=1)
        self.assertEqual(caught.exception.code, "unknown_destination")
        self.assertEqual(caught.exception.frame["id"], "x-1")
        # once the node has connected, it is known and offline messages are stored
        await meet(self, self.server, "nobody-ever")
        self.assertEqual((await alice.send(dest_id="nobody-ever", payload=1))["status"], "stored")


class RetentionTests(unittest.TestCase):
    """Unacked messages past the retention are purged; sync reports the gap."""

    timeout = 60

    async def test_purged_messages_are_reported_as_a_gap(self) -> None:
        server = start_server(self, "--retention-seconds=1.5", "--purge-interval=0.2")
        await meet(self, server, "bob-phone")
        alice = await client_for(self, server, "alice-laptop")
        await send_all(alice, "bob-phone", 5, prefix="old")
        await sleep(3.0)  # past the retention, and purges ran since
        await send_all(alice, "bob-phone", 2, prefix="new")
        bob = await client_for(self, server, "bob-phone", auto_ack=False)
        self.assertEqual([(m["id"], m["seq"]) for m in drain(bob)], [("new-0", 6), ("new-1", 7)])
        self.assertEqual(bob.gaps, [{"after": 0, "upto": 5}])
        # asking from beyond the gap reports nothing missing
        synced = await bob.request({"op": "sync", "after": 5})
        self.assertNotIn("gap", synced)
        synced = await bob.request({"op": "sync", "after": 2})
        self.assertEqual(synced["gap"], {"after": 2, "upto": 5})
