"""Scenarios shared by the cluster tests on one host (test_locations.py) and
on several hosts in network namespaces (test_hosts.py), and the helpers of
every one-host cluster test (test_cluster, test_locations, test_push).

A test case mixes in :class:`CrossServerScenarios` and provides
``client_on(server, node_id, client_id=None)`` (a synced client whose socket
is on ``server``) and ``server_id(server)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from allspark.client import Client, open_socket
from tests.e2e.helpers import http_get, pre_connect, wait_until
from tests.support import ServerProcess, key

#: Heartbeat and dead-after of the one-host clusters: a dead server is seen within seconds.
HEARTBEAT = "0.5"
DEAD_AFTER = 3.0


def start_sqlite_cluster(testcase: TestCase, count: int = 3, args: Sequence[str] = (),
                         env: dict[int, dict[str, str]] | None = None,
                         ports: Sequence[int] | None = None) -> list[ServerProcess]:
    """``count`` servers on one host sharing one SQLite file (fast heartbeat,
    ``args`` added, ``env``: extra environment by index, ``ports``: each
    server's port, free ones otherwise), started in order, stopped and their
    directories removed when ``testcase`` ends."""
    shared = tempfile.mkdtemp(prefix="allspark-cluster-")
    testcase.addCleanup(shutil.rmtree, shared, True)
    store = "sqlite://" + os.path.join(shared, "allspark.db")
    servers = []
    for i in range(count):
        server = ServerProcess(port=ports[i] if ports else None,
                               args=(f"--store={store}", f"--server-heartbeat={HEARTBEAT}",
                                     f"--server-dead-after={DEAD_AFTER}", *args), env=(env or {}).get(i))
        testcase.addCleanup(shutil.rmtree, server.data_dir, True)
        testcase.addCleanup(server.stop)
        servers.append(server.start())
    return servers


async def wait_meshed(servers: Sequence[ServerProcess]) -> None:
    """Wait until every server links to all the others and all are old
    enough (5 s) to be handed out by the balancer (allspark.auth, "Restarts")."""
    others = len(servers) - 1

    def linked() -> bool:
        return all(len(http_get(s.base_url + "/health").json().get("peers", {})) == others for s in servers)

    await wait_until(linked, 30, interval=0.1, what=f"{len(servers)} servers linked pairwise")

    def old_enough() -> bool:
        body = http_get(servers[0].base_url + "/health").json()
        return len(body["cluster"]) == len(servers) and all(
            time.time() * 1000 - e["started_ms"] > 5_500 for e in body["cluster"])

    await wait_until(old_enough, 20, interval=0.2, what="servers running for 5 s")


def close_at_cleanup(testcase: TestCase, client: Client) -> None:
    """Cut ``client``'s socket when ``testcase`` ends."""

    async def close() -> None:
        if client.protocol is not None:
            client.protocol.dropConnection(abort=True)
            await client.closed

    testcase.addCleanup(lambda: Deferred.fromCoroutine(close()))


async def client_on_server(testcase: TestCase, server: ServerProcess, node_id: str,
                           client_id: str | None = None, sync: bool = True) -> Client:
    """A client of ``node_id`` whose socket is on ``server`` itself (its
    pre-connection asked, at most 60 times, until the balancer names it),
    set up to follow a ``reconnect`` like one made by
    :func:`allspark.client.connect`, synced unless ``sync`` is false, cut
    when ``testcase`` ends."""
    auth_key = key(node_id, client_id)
    for _ in range(60):
        info = pre_connect(server, {"auth_key": auth_key}).json()
        if info["node"]["port"] == server.port:
            break
    else:
        raise AssertionError(f"the balancer never named {server.port}")
    client = await open_socket(reactor, info["node"]["ws_url"])
    client.base_url, client.auth_key = server.base_url, auth_key
    assert client.hello is not None
    testcase.assertEqual(client.hello["server_id"], f"127.0.0.1:{server.port}")
    if sync:
        await client.sync()
    close_at_cleanup(testcase, client)
    return client


class CrossServerScenarios:
    """What every cluster must show, whatever its servers' addresses."""

    def close_at_cleanup(self, client: Client) -> None:
        """Cut ``client``'s socket when the test ends."""
        close_at_cleanup(self, client)  # type: ignore[arg-type]

    async def received(self, client: Client, count: int, timeout: float = 20) -> list[Any]:
        """The payloads of the next ``count`` messages handed to ``client``'s app."""
        return [(await client.next_message(timeout=timeout))["payload"] for _ in range(count)]

    async def messages_cross_live(self, s0: ServerProcess, s1: ServerProcess, s2: ServerProcess,
                                  total: int) -> None:
        """Direct, user-wide (devices on two other servers) and session
        messages (members on every server) arrive live, each once, in the
        sender's order."""
        check: Any = self  # the TestCase this is mixed into, with client_on and server_id
        alice = await check.client_on(s0, "alice")
        bob = await check.client_on(s1, "bob")
        phone = await check.client_on(s1, "carol-phone", "carol")
        laptop = await check.client_on(s2, "carol-laptop", "carol")
        dave = await check.client_on(s2, "dave")
        await alice.create_session(session_id="everywhere")
        for member in ("bob", "dave", "carol-phone"):
            await alice.join_session("everywhere", node_id=member)
        for i in range(total):
            direct = await alice.send(dest_id="bob", payload=["direct", i])
            check.assertEqual((direct["status"], direct["live"]), ("delivered", 1), direct)
            user_wide = await alice.send(dest_client_id="carol", payload=["user", i])
            check.assertEqual((user_wide["status"], user_wide["live"]), ("delivered", 2), user_wide)
            await alice.send(dest_session_id="everywhere", payload=["session", i])
        # live only: none of these clients syncs again; each gets each message
        # once, in the sender's order, then the marker (nothing after it was doubled)
        await alice.send(dest_id="bob", payload="end")
        await alice.send(dest_client_id="carol", payload="end")
        await alice.send(dest_session_id="everywhere", payload="end")
        expected_bob = [x for i in range(total) for x in (["direct", i], ["session", i])] + ["end", "end"]
        check.assertEqual(await self.received(bob, len(expected_bob)), expected_bob)
        expected_phone = [x for i in range(total) for x in (["user", i], ["session", i])] + ["end", "end"]
        check.assertEqual(await self.received(phone, len(expected_phone)), expected_phone)
        check.assertEqual(await self.received(laptop, total + 1), [["user", i] for i in range(total)] + ["end"])
        check.assertEqual(await self.received(dave, total + 1), [["session", i] for i in range(total)] + ["end"])
        for client in (bob, phone, laptop, dave):
            check.assertEqual(client.messages.pending, [])

    async def kill_9_moves_the_client(self, s0: ServerProcess, s1: ServerProcess, victim: ServerProcess,
                                      total: int, kill_at: int) -> None:
        """``victim`` is killed with kill -9 while messages flow to its client,
        which comes back through pre-connection elsewhere and gets every
        accepted message once, then live ones on its new server."""
        check: Any = self  # the TestCase this is mixed into, with client_on and server_id
        sender = await check.client_on(s0, "talker")
        receiver = await check.client_on(victim, "mover")
        got: list[int] = []
        for i in range(total):
            if i == kill_at:
                victim.kill()
                await receiver.closed
                # the dead server is never named once it is dead; a try at it
                # meanwhile fails and is retried
                moving = ensureDeferred(receiver.reconnect(s1.base_url, attempts=20))
            answer = await sender.send(dest_id="mover", payload=i, id=f"m-{i}")
            check.assertIn(answer["status"], ("delivered", "stored"), answer)
        await moving
        assert receiver.hello is not None
        check.assertNotEqual(receiver.hello["server_id"], check.server_id(victim))
        while len(got) < total:
            got.append((await receiver.next_message(timeout=20))["payload"])
        check.assertEqual(sorted(got), list(range(total)))  # every accepted message, once
        answer = await sender.send(dest_id="mover", payload="after")
        check.assertEqual((answer["status"], answer["live"]), ("delivered", 1), answer)
        check.assertEqual((await receiver.next_message(timeout=20))["payload"], "after")
