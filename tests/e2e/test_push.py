"""Push notifications end to end: real ``twistd allspark`` processes with a
``--push-config`` whose ``[webhook]`` points at a recording HTTP server in
this test process (``tests/push/standins.py``), devices registered with
``register_push`` over their sockets.

What is counted is what the stand-in receives: one request per push.
Grace and window are short (``GRACE_S``, ``WINDOW_S``) so that the rules
show in seconds; every wait is a bounded poll.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from allspark.push.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from tests.e2e.cluster_scenarios import client_on_server, start_sqlite_cluster, wait_meshed
from tests.e2e.helpers import run_to_exit, wait_until
from tests.push.standins import Answer, Recorded, RecordingServer
from tests.support import ServerProcess, client_for, free_port, sleep

GRACE_S = 1.0
WINDOW_S = 4.0
SECRET = "e2e-webhook-secret-0123456789"


class PushTestCase(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.hook = RecordingServer().start()
        self.addCleanup(self.hook.stop)
        self.dir = tempfile.mkdtemp(prefix="allspark-push-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        secret_file = os.path.join(self.dir, "webhook.secret")
        with open(secret_file, "w") as f:
            f.write(SECRET)
        self.config = os.path.join(self.dir, "push.toml")
        with open(self.config, "w") as f:
            f.write(f"[push]\ngrace_s = {GRACE_S}\nwindow_s = {WINDOW_S}\npoll_s = 0.5\ntimeout_s = 5\n"
                    f"backoff_base_s = 0.2\nbackoff_cap_s = 5\n\n"
                    f"[webhook]\nurl = \"{self.hook.url}/push\"\nsecret_file = \"{secret_file}\"\n")

    def server(self, *args: str, data_dir: str | None = None) -> ServerProcess:
        server = ServerProcess(data_dir=data_dir, args=(f"--push-config={self.config}", *args))
        self.addCleanup(server.stop)
        return server.start()

    def pushes(self, token: str) -> list[Recorded]:
        return [r for r in self.hook.requests if r.json().get("token") == token]

    async def register(self, server: ServerProcess, node_id: str) -> None:
        """Register ``node_id``'s webhook target (its token: the node_id), then leave."""
        client = await client_for(self, server, node_id)
        answer = await client.request({"op": "register_push", "provider": "webhook", "token": node_id})
        self.assertTrue(answer.get("registered"), answer)
        self.assertTrue(answer.get("active"), answer)
        await client.close()

    async def no_more_pushes(self, token: str, count: int, seconds: float) -> None:
        """Wait ``seconds`` (a bounded look, not a timing assert) and check
        that ``token`` still has ``count`` pushes."""
        await sleep(seconds)
        self.assertEqual(len(self.pushes(token)), count, [r.json() for r in self.pushes(token)])


class OneServer(PushTestCase):
    async def test_a_burst_to_an_offline_device_is_one_signed_push_with_the_count(self) -> None:
        server = self.server()
        await self.register(server, "phone")
        alice = await client_for(self, server, "alice")
        await gatherResults([alice.send(dest_id="phone", id=f"m{i}", payload={"i": i}, push_text=f"hello {i}")
                             for i in range(100)])
        await wait_until(lambda: len(self.pushes("phone")) > 0, 15, what="a push to phone")
        await self.no_more_pushes("phone", 1, GRACE_S + 1.5)
        [push] = self.pushes("phone")
        body = push.json()
        self.assertEqual((body["node_id"], body["unread"], body["sender_id"], body["text"]),
                         ("phone", 100, "alice", "hello 99"))
        self.assertTrue(verify_signature(SECRET.encode(), push.header(TIMESTAMP_HEADER) or "", push.body,
                                         push.header(SIGNATURE_HEADER) or "", now=time.time()))
        self.assertFalse(verify_signature(b"not-the-secret-000000", push.header(TIMESTAMP_HEADER) or "",
                                          push.body, push.header(SIGNATURE_HEADER) or "", now=time.time()))

    async def test_no_push_after_an_ack_within_the_grace_period_nor_for_push_false(self) -> None:
        server = self.server()
        await self.register(server, "tablet")
        alice = await client_for(self, server, "alice")
        await alice.send(dest_id="tablet", id="quiet", payload={}, push=False)
        await alice.send(dest_id="tablet", id="m1", payload={})
        tablet = await client_for(self, server, "tablet")  # syncs; the client acks what it got
        await wait_until(lambda: len(tablet.messages.pending) >= 2, 10,
                         what="tablet synced")
        await tablet.ack(tablet.messages.pending[-1]["seq"])
        await tablet.close()
        await self.no_more_pushes("tablet", 0, GRACE_S + 1.5)

    async def test_5xx_and_429_are_retried_after_retry_after(self) -> None:
        server = self.server()
        await self.register(server, "watch")
        arrived: list[float] = []

        def answering(answer: Answer) -> Any:
            def record(_: Recorded) -> Answer:
                arrived.append(time.monotonic())
                return answer
            return record

        self.hook.answer(answering(Answer(503)), answering(Answer(429, headers={"Retry-After": "1"})),
                         path="/push")
        self.hook.defaults["/push"] = answering(Answer(200))
        alice = await client_for(self, server, "alice")
        await alice.send(dest_id="watch", id="m1", payload={})
        await wait_until(lambda: len(self.pushes("watch")) >= 3, 20, what="three requests for watch")
        await self.no_more_pushes("watch", 3, 1.5)
        # the 429 said one second: the third request waited at least that long
        self.assertGreaterEqual(arrived[2] - arrived[1], 0.9)
        self.assertIn("push_retried", server.log())


class BadConfig(PushTestCase):
    def test_a_bad_push_config_stops_the_start_with_one_line(self) -> None:
        with open(self.config, "a") as f:
            f.write("\n[gcm]\nkey = 1\n")
        done = run_to_exit(self.dir, free_port(), f"--push-config={self.config}")
        output = done.stdout.decode(errors="replace")
        self.assertEqual(done.returncode, 1, output)
        [line] = [line for line in output.splitlines() if "gcm" in line]
        self.assertIn("unknown table [gcm]", line)


class Restart(PushTestCase):
    async def test_a_pending_push_survives_a_restart_once(self) -> None:
        data_dir = tempfile.mkdtemp(prefix="allspark-push-restart-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        # a long grace: the server is stopped before it ends
        with open(self.config) as f:
            text = f.read().replace(f"grace_s = {GRACE_S}", "grace_s = 3")
        with open(self.config, "w") as f:
            f.write(text)
        server = self.server(data_dir=data_dir)
        await self.register(server, "phone")
        alice = await client_for(self, server, "alice")
        await gatherResults([alice.send(dest_id="phone", id=f"m{i}", payload={}) for i in range(5)])
        alice.protocol.dropConnection(abort=True)  # type: ignore[union-attr]
        self.assertEqual(server.terminate(), -15)  # a clean stop (SIGTERM)
        self.assertEqual(self.pushes("phone"), [])
        again = self.server(data_dir=data_dir)
        await wait_until(lambda: len(self.pushes("phone")) > 0, 15, what="the push after the restart")
        await self.no_more_pushes("phone", 1, 2.0)
        self.assertEqual(self.pushes("phone")[0].json()["unread"], 5)
        again.stop()


class ThreeServers(PushTestCase):
    timeout = 120

    async def test_one_push_from_three_servers_and_none_while_connected_elsewhere(self) -> None:
        servers = start_sqlite_cluster(self, args=(f"--push-config={self.config}",))
        await wait_meshed(servers)
        for node in ("phone", "tablet"):
            await self.register(servers[0], node)
        senders = [await client_on_server(self, s, f"sender-{i}") for i, s in enumerate(servers)]
        tablet = await client_on_server(self, servers[2], "tablet")
        # every server stores copies for the offline phone (and so schedules it)
        await gatherResults([sender.send(dest_id="phone", id=f"m{i}-{j}", payload={})
                             for i, sender in enumerate(senders) for j in range(10)])
        # the tablet is connected to server 2 only: copies from servers 0 and 1 reach it live
        await gatherResults([sender.send(dest_id="tablet", id=f"t{i}", payload={})
                             for i, sender in enumerate(senders[:2])])
        await wait_until(lambda: len(self.pushes("phone")) > 0, 15, what="a push to phone")
        await self.no_more_pushes("phone", 1, GRACE_S + 2.0)
        self.assertEqual(self.pushes("phone")[0].json()["unread"], 30)
        self.assertEqual(self.pushes("tablet"), [])
        await wait_until(lambda: len(tablet.messages.pending) >= 2, 10, what="tablet got both live")
