"""Three real servers sharing one SQLite file: server records, the balancer,
dead servers, and a drain that moves clients without losing anything.

Live cross-server delivery needs the mesh (tests/e2e/test_mesh.py); here a
moved client gets what was accepted for it by syncing on its new server.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from allspark import cli
from allspark.client import Client
from tests.e2e.cluster_scenarios import DEAD_AFTER, client_on_server, start_sqlite_cluster, wait_meshed
from tests.e2e.helpers import http_get, pre_connect, raw_handshake, wait_until, ws_path_and_query
from tests.support import CLUSTER_SECRET, ServerProcess, free_port, key


def drain(url: str, cluster_secret: str) -> int:
    """``allspark drain URL`` with ``cluster_secret`` in its environment; its exit status."""
    args = cli.build_parser().parse_args(["drain", url])
    return cli.SUBCOMMANDS["drain"].run(args, {"ALLSPARK_CLUSTER_SECRET": cluster_secret})


def cluster_view(server: ServerProcess) -> dict[str, str]:
    """server_id -> state, as ``server``'s /health shows the cluster."""
    body = http_get(server.base_url + "/health").json()
    return {entry["server_id"]: entry["state"] for entry in body.get("cluster", [])}


def pre_connections(server: ServerProcess, count: int) -> list[dict[str, Any]]:
    """``count`` pre-connection answers of ``server`` for as many nodes."""
    answers = []
    for i in range(count):
        answer = pre_connect(server, {"auth_key": key(f"spread-{i}")})
        assert answer.status == 200, answer.body
        answers.append(answer.json())
    return answers


class ThreeServers(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.servers = start_sqlite_cluster(self)
        self.by_id = {f"127.0.0.1:{s.port}": s for s in self.servers}

    # -- helpers ------------------------------------------------------------
    async def all_live_on(self, server: ServerProcess) -> None:
        """Wait until ``server`` sees three live servers, each running long
        enough to be handed out (5 s: allspark.auth, "Restarts")."""
        await wait_until(lambda: sorted(cluster_view(server).values()) == ["live"] * 3, 15,
                         interval=0.1, what=f"three live servers in {server.port}'s view")

        def old_enough() -> bool:
            body = http_get(server.base_url + "/health").json()
            return all(time.time() * 1000 - e["started_ms"] > 5_500 for e in body["cluster"])

        await wait_until(old_enough, 20, interval=0.2, what="servers running for 5 s")

    async def client_on(self, server: ServerProcess, node_id: str) -> Client:
        """A synced client of ``node_id`` whose socket is on ``server``."""
        return await client_on_server(self, server, node_id)

    # -- tests --------------------------------------------------------------
    async def test_pre_connections_on_one_server_are_spread_over_all_three(self) -> None:
        first = self.servers[0]
        await self.all_live_on(first)
        answers = pre_connections(first, 30)
        counts = Counter(a["node"]["node_id"] for a in answers)
        self.assertEqual(set(counts), set(self.by_id), counts)
        self.assertLessEqual(max(counts.values()), 15, counts)
        # each token opens a socket on the server it names, and only there
        for i, answer in enumerate(answers[:6]):
            named = self.by_id[answer["node"]["node_id"]]
            self.assertEqual(answer["node"]["port"], named.port)
            other = next(s for s in self.servers if s is not named)
            path = ws_path_and_query(answer["node"]["ws_url"])
            self.assertEqual(raw_handshake(other, path).status, 401, f"token {i} redeemed elsewhere")
            opened = raw_handshake(named, path)
            self.assertEqual(opened.status, 101, opened.body)

    async def test_a_stopped_or_dead_server_gets_no_clients(self) -> None:
        first, stopped, crashed = self.servers
        await self.all_live_on(first)
        self.assertEqual(stopped.terminate(), -15)  # a clean stop (SIGTERM) removes its record
        crashed.kill()  # its record stays, its heartbeats stop
        await wait_until(lambda: cluster_view(first).get(f"127.0.0.1:{crashed.port}") == "dead",
                         DEAD_AFTER + 10, interval=0.2, what="the killed server shown dead")
        view = cluster_view(first)
        self.assertNotIn(f"127.0.0.1:{stopped.port}", view)
        answers = pre_connections(first, 30)
        self.assertEqual({a["node"]["port"] for a in answers}, {first.port})
        # the crashed server's identity: --force takes it back, and it is handed out again
        restarted = ServerProcess(data_dir=crashed.data_dir, port=crashed.port, args=crashed.args)
        self.addCleanup(restarted.stop)
        restarted.start(force=True)
        await wait_until(lambda: cluster_view(first).get(f"127.0.0.1:{crashed.port}") == "live",
                         15, interval=0.1, what="the restarted server shown live")

    async def test_sigterm_moves_clients_and_loses_nothing_accepted(self) -> None:
        first, second, draining = self.servers
        await self.all_live_on(first)
        receiver = await self.client_on(draining, "mover")
        sender = await self.client_on(first, "talker")
        accepted = 0
        total = 120
        for i in range(total):
            if i == 40:
                self.assertEqual(draining.proc.poll(), None)  # type: ignore[union-attr]
                draining.proc.send_signal(15)  # type: ignore[union-attr]
            answer = await sender.send(dest_id="mover", payload=i, id=f"m-{i}")
            self.assertIn(answer["status"], ("delivered", "stored"))
            accepted += 1
        self.assertEqual(draining.proc.wait(15), -15)  # type: ignore[union-attr]
        self.assertEqual(receiver.close_code, 1001)
        await wait_until(lambda: receiver.reconnections == 1, 30, interval=0.1, what="the client moved")
        assert receiver.hello is not None
        self.assertIn(receiver.hello["server_id"], (f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"))
        # what was stored after its reconnect's sync reaches it live only once
        # the mesh knows where it is (its location), else on sync
        await receiver.sync()
        got: list[int] = []
        while len(got) < total:
            message = await receiver.next_message(timeout=20)
            got.append(message["payload"])
        self.assertEqual(sorted(got), list(range(total)))  # every accepted message, once
        self.assertEqual(len(set(got)), accepted)
        reconnect_events = []
        while receiver.events.pending:
            reconnect_events.append(receiver.events.pending.pop(0))
        self.assertIn("reconnect", [e.get("op") for e in reconnect_events])

    async def test_an_admin_drain_moves_clients_and_the_drained_server_gets_none(self) -> None:
        first, second, drained = self.servers
        await self.all_live_on(first)
        receiver = await self.client_on(drained, "mover")
        sender = await self.client_on(first, "talker")
        for i in range(20):
            await sender.send(dest_id="mover", payload=i, id=f"a-{i}")
        # a wrong secret, and no token, are refused; the server stays live
        self.assertEqual(await deferToThread(drain, drained.base_url, "not-the-cluster-secret-at-all"), 1)
        request = urllib.request.Request(drained.base_url + "/admin/drain", data=b"", method="POST")
        with self.assertRaises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        with refused.exception as answer:
            self.assertEqual((answer.code, json.loads(answer.read())["error"]), (401, "missing_token"))
        self.assertEqual(cluster_view(first)[f"127.0.0.1:{drained.port}"], "live")
        self.assertEqual(await deferToThread(drain, drained.base_url, CLUSTER_SECRET), 0)
        self.assertEqual(await deferToThread(drained.proc.wait, 15), 0)  # type: ignore[union-attr]
        await wait_until(lambda: receiver.reconnections == 1, 30, interval=0.1, what="the client moved")
        await wait_until(lambda: f"127.0.0.1:{drained.port}" not in cluster_view(first), 10,
                         interval=0.1, what="the drained server's record gone from the view")
        answers = pre_connections(first, 30)
        self.assertEqual({a["node"]["port"] for a in answers} & {drained.port}, set())
        await receiver.sync()
        got = []
        while len(got) < 20:
            got.append((await receiver.next_message(timeout=20))["payload"])
        self.assertEqual(sorted(got), list(range(20)))


class DrainAnnounced(TestCase):
    """A server that starts draining tells its peers over the mesh, so their
    balancers stop naming it at once, not at their next heartbeat (30 s
    here, so that only the announcement can explain what is seen)."""

    timeout = 90

    async def test_peers_stop_naming_a_draining_server_before_their_next_heartbeat(self) -> None:
        # the second server sorts lower, so it dials the first: the first learns of
        # it from the link coming up (its own view was read before the second existed)
        ports = sorted(free_port() for _ in range(2))
        first, drained = start_sqlite_cluster(
            self, 2, ("--server-heartbeat=30", "--server-dead-after=90"), ports=ports[::-1])
        drained_id = f"127.0.0.1:{drained.port}"
        await wait_meshed([first, drained])
        self.assertIn(drained_id, {a["node"]["node_id"] for a in pre_connections(first, 6)})
        self.assertEqual(await deferToThread(drain, drained.base_url, CLUSTER_SECRET), 0)
        self.assertEqual(await deferToThread(drained.proc.wait, 15), 0)  # type: ignore[union-attr]
        await wait_until(lambda: cluster_view(first).get(drained_id, "gone") != "live", 10, interval=0.1,
                         what="the first server's view no longer shows the drained server live")
        self.assertNotIn(drained_id, {a["node"]["node_id"] for a in pre_connections(first, 10)})

