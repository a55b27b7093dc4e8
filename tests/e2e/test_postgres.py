"""Real ``twistd -n allspark --store=postgresql://...`` servers on the throwaway cluster.

The cluster is the one the test run starts (``tests/store/postgres_cluster.py``);
each test gets a new database.  Skipped, with the reason, where PostgreSQL
cannot be found.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from allspark.client import Client
from tests.e2e.helpers import wait_until
from tests.store.postgres_cluster import database_for
from tests.support import ServerProcess, client_for, start_server


def drain(client: Client) -> list[dict[str, Any]]:
    """Every message handed to the app and not read yet."""
    got = list(client.messages.pending)
    client.messages.pending.clear()
    return got


class PostgresServerTests(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.url = database_for(self)

    async def test_direct_message_then_sync_after_reconnect(self) -> None:
        """Two clients on one server: a live direct message, then messages
        stored while the recipient is away come back by sync when it
        reconnects, also after the server was killed with kill -9."""
        server = start_server(self, f"--store={self.url}")
        alice = await client_for(self, server, "alice-laptop", "alice")
        bob = await client_for(self, server, "bob-phone", "bob", auto_ack=False)
        accepted = await alice.send(dest_id="bob-phone", id="m-0", payload={"i": 0})
        self.assertEqual(accepted["status"], "delivered")
        live = await bob.next_message()
        self.assertEqual((live["src_id"], live["seq"], live["payload"]), ("alice-laptop", 1, {"i": 0}))
        await bob.close()
        for i in range(1, 4):
            accepted = await alice.send(dest_id="bob-phone", id=f"m-{i}", payload={"i": i})
            self.assertEqual(accepted["status"], "stored")
        bob = await client_for(self, server, "bob-phone", "bob", auto_ack=False)  # syncs on connect
        await wait_until(lambda: len(bob.messages.pending) >= 4, timeout=20)
        self.assertEqual([(m["seq"], m["payload"]["i"]) for m in drain(bob)],
                         [(1, 0), (2, 1), (3, 2), (4, 3)])
        # a crash loses nothing that was accepted
        await alice.send(dest_id="bob-phone", id="m-4", payload={"i": 4})
        server.kill()
        restarted = ServerProcess(data_dir=server.data_dir, port=server.port,
                                  args=(f"--store={self.url}",)).start(force=True)
        self.addCleanup(restarted.stop)
        bob = await client_for(self, restarted, "bob-phone", "bob", auto_ack=False)
        await wait_until(lambda: len(bob.messages.pending) >= 5, timeout=20)
        self.assertEqual([m["seq"] for m in drain(bob)], [1, 2, 3, 4, 5])

    async def test_two_servers_share_one_database(self) -> None:
        """A message accepted by one server while its recipient is away is
        synced by the recipient from another server on the same database;
        a retry of the same id through the second server is recognised."""
        one = start_server(self, f"--store={self.url}")
        two = start_server(self, f"--store={self.url}")
        bob = await client_for(self, two, "bob-phone", "bob")  # the cluster now knows bob
        await bob.close()
        alice = await client_for(self, one, "alice-laptop", "alice")
        first = await alice.send(dest_id="bob-phone", id="hello-1", payload="from one")
        self.assertEqual(first["status"], "stored")
        await alice.close()
        alice_again = await client_for(self, two, "alice-laptop", "alice")
        retry = await alice_again.send(dest_id="bob-phone", id="hello-1", payload="from one")
        self.assertEqual(retry, first)  # the first answer, nothing stored twice
        bob = await client_for(self, two, "bob-phone", "bob", auto_ack=False)
        await wait_until(lambda: len(bob.messages.pending) >= 1, timeout=20)
        got = drain(bob)
        self.assertEqual([(m["src_id"], m["seq"], m["payload"]) for m in got],
                         [("alice-laptop", 1, "from one")])
        self.assertEqual(await bob.sync(), 0)

    async def test_senders_on_two_servers_at_once(self) -> None:
        """Four senders, two on each of two servers, pipeline messages to one
        offline recipient at the same time: it syncs every message exactly
        once, seqs 1..N without a gap, each sender's in its sending order."""
        one = start_server(self, f"--store={self.url}")
        two = start_server(self, f"--store={self.url}")
        bob = await client_for(self, one, "bob-phone", "bob")
        await bob.close()
        senders = [await client_for(self, server, f"sender-{n}") for n, server in enumerate((one, two, one, two))]
        per_sender = 200

        async def send_all(n: int) -> list[dict[str, Any]]:
            return await gatherResults([senders[n].send(dest_id="bob-phone", id=f"m-{i}", payload={"i": i})
                                        for i in range(per_sender)])

        answers = await gatherResults([Deferred.fromCoroutine(send_all(n)) for n in range(4)])
        self.assertEqual({a["status"] for batch in answers for a in batch}, {"stored"})
        bob = await client_for(self, two, "bob-phone", "bob", auto_ack=False)
        await wait_until(lambda: len(bob.messages.pending) >= 4 * per_sender, timeout=30)
        got = drain(bob)
        self.assertEqual(sorted(m["seq"] for m in got), list(range(1, 4 * per_sender + 1)))
        for n in range(4):
            mine = [m["payload"]["i"] for m in got if m["src_id"] == f"sender-{n}"]
            self.assertEqual(mine, list(range(per_sender)))
        self.assertEqual(await bob.sync(), 0)
