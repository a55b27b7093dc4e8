"""End-to-end: presence with three real servers on one SQLite file, meshed.

Members connected to three different servers are seen online from the first
(an anonymous one by its alias only, over the control op and over HTTP), a
subscriber hears them come online, and after a ``kill -9`` of one server its
nodes are offline everywhere within 15 s (no zombies), with an offline event.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any
from urllib.parse import urlencode

from twisted.trial.unittest import TestCase

from allspark.client import Client
from tests.e2e.helpers import health, http_get, wait_until
from tests.e2e.test_invalidation import client_on, server_id
from tests.support import ServerProcess, key


async def events_until(client: Client, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``count`` presence_changed events of ``client`` (other events skipped)."""
    seen: list[dict[str, Any]] = []
    for _ in range(200):
        event = await client.next_event(timeout)
        if event.get("op") == "presence_changed":
            seen.append(event)
            if len(seen) == count:
                return seen
    raise AssertionError(f"only {seen} after 200 events")


class PresenceAcrossServers(TestCase):
    timeout = 180

    def setUp(self) -> None:
        shared = tempfile.mkdtemp(prefix="allspark-presence-")
        self.addCleanup(shutil.rmtree, shared, True)
        store = "sqlite://" + os.path.join(shared, "allspark.db")
        self.servers: list[ServerProcess] = []
        for _ in range(3):
            server = ServerProcess(args=(f"--store={store}",))
            self.addCleanup(shutil.rmtree, server.data_dir, True)
            self.addCleanup(server.stop)
            self.servers.append(server.start())

    def all_linked(self) -> bool:
        return all(len(health(s).get("peers", {})) == 2 for s in self.servers)

    def http_presence(self, server: ServerProcess, caller: str, client_id: str | None = None,
                      **query: str) -> tuple[int, dict[str, Any]]:
        answer = http_get(f"{server.base_url}/presence?"
                          + urlencode({"auth_key": key(caller, client_id), **query}))
        return answer.status, json.loads(answer.body)

    async def test_presence_across_servers_anonymity_and_no_zombie_after_kill_9(self) -> None:
        a, b, c = self.servers
        await wait_until(self.all_linked, 30, 0.1, "three linked servers")
        alice = await client_on(self, a, "alice", client_id="A")
        await alice.create_session(session_id="room")
        await alice.request({"op": "join_session", "session_id": "room", "node_id": "bob"})
        await alice.request({"op": "join_session", "session_id": "room", "node_id": "anna", "anonymous": True})
        await alice.request({"op": "join_session", "session_id": "room", "node_id": "carl"})
        subscribed = await alice.presence(session_id="room", subscribe=True)
        self.assertEqual((subscribed["online"], subscribed["subscribed"]), (["alice"], True))

        bob = await client_on(self, b, "bob", client_id="B")
        await client_on(self, c, "bob-tablet", client_id="B")
        anna = await client_on(self, c, "anna")
        alias = (await anna.session_info("room"))["you"]["alias"]
        everyone = sorted(["alice", "bob", alias])

        async def online_seen_from_a() -> list[str]:
            return (await alice.presence(session_id="room"))["online"]

        await wait_until(lambda: self._equals(online_seen_from_a(), everyone), 20, 0.1, "everyone online")
        came = await events_until(alice, 2)
        self.assertEqual(sorted((e["name"], e["online"]) for e in came), sorted([("bob", True), (alias, True)]))
        self.assertEqual((await bob.presence(client_id="B"))["online"], ["bob", "bob-tablet"])

        # HTTP: the same answers; an anonymous member is named by alias, and
        # its node_id cannot be probed
        status, body = self.http_presence(b, "alice", "A", session_id="room")
        self.assertEqual((status, body["online"]), (200, everyone))
        self.assertNotIn("anna", json.dumps(body))
        status, body = self.http_presence(a, "alice", "A", node_id="bob")
        self.assertEqual((status, body["online"]), (200, True))
        for node in ("anna", "nobody"):
            status, body = self.http_presence(a, "alice", "A", node_id=node)
            self.assertEqual((status, body["error"]), (403, "not_allowed"))
        status, body = self.http_presence(a, "alice", "A", session_id="room", subscribe="true")
        self.assertEqual(status, 400)

        c.kill()  # kill -9: anna and bob-tablet were there
        await wait_until(lambda: self._equals(online_seen_from_a(), ["alice", "bob"]), 15, 0.2,
                         "no zombie on a")
        gone = await events_until(alice, 1)
        self.assertEqual([(e["name"], e["online"]) for e in gone], [(alias, False)])
        self.assertEqual((await bob.presence(client_id="B"))["online"], ["bob"])
        status, body = self.http_presence(b, "alice", "A", session_id="room")
        self.assertEqual(body["online"], ["alice", "bob"])
        self.assertNotIn(server_id(c), health(a).get("peers", {}))

    @staticmethod
    async def _equals(value: Any, expected: Any) -> bool:
        return (await value) == expected
