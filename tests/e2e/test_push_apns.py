"""APNs end to end: a real ``twistd allspark`` whose ``--push-config`` has an
``[apns]`` table pointing at the HTTP/2 stand-in in this test process
(``tests/push/apns_standin.py``, TLS with ALPN h2, its certificate as
``ca_file``), devices registered with ``register_push`` over their sockets.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from allspark.client import Client
from tests.e2e.helpers import wait_until
from tests.push.apns_standin import APNsStandIn, Received, Reply
from tests.support import ServerProcess, client_for, sleep

GRACE_S = 1.0
TEAM, KEY_ID, TOPIC = "TEAM123456", "KEY1234567", "com.example.chat"
PHONE_TOKEN, GONE_TOKEN = "ab" * 32, "cd" * 32


class APNsEndToEnd(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="allspark-push-apns-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.standin = APNsStandIn(self.dir).start()
        self.addCleanup(self.standin.stop)
        self.standin.default = lambda r: Reply(410, reason="Unregistered") if GONE_TOKEN in r.path else Reply(200)
        self.key = ec.generate_private_key(ec.SECP256R1())
        key_file = os.path.join(self.dir, "AuthKey.p8")
        with open(key_file, "wb") as f:
            f.write(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        self.config = os.path.join(self.dir, "push.toml")
        with open(self.config, "w") as f:
            f.write(f"[push]\ngrace_s = {GRACE_S}\nwindow_s = 4\npoll_s = 0.5\ntimeout_s = 5\n\n"
                    f"[apns]\nteam_id = \"{TEAM}\"\nkey_id = \"{KEY_ID}\"\nkey_file = \"{key_file}\"\n"
                    f"topic = \"{TOPIC}\"\nendpoint = \"{self.standin.url}\"\n"
                    f"sandbox_endpoint = \"{self.standin.url}\"\nca_file = \"{self.standin.ca_file}\"\n")

    def pushes(self, token: str) -> list[Received]:
        return [r for r in self.standin.received if r.path == f"/3/device/{token}"]

    async def register(self, server: ServerProcess, node_id: str, **target: str) -> None:
        client = await client_for(self, server, node_id)
        answer = await client.request({"op": "register_push", "provider": "apns", **target})
        self.assertTrue(answer.get("active"), answer)
        await client.close()

    async def test_offline_devices_get_one_push_each_and_a_dead_token_is_removed(self) -> None:
        server = ServerProcess(args=(f"--push-config={self.config}",))
        self.addCleanup(server.stop)
        server.start()
        await self.register(server, "phone", token=PHONE_TOKEN, environment="development")
        await self.register(server, "old-phone", token=GONE_TOKEN)
        alice: Client = await client_for(self, server, "alice")
        await gatherResults([alice.send(dest_id="phone", id=f"m{i}", payload={}, push_text=f"hello {i}")
                             for i in range(20)])
        await alice.send(dest_id="old-phone", id="x1", payload={})
        await wait_until(lambda: bool(self.pushes(PHONE_TOKEN)) and bool(self.pushes(GONE_TOKEN)), 15,
                         what="a push to each phone")
        await wait_until(lambda: "push_token_removed" in server.log(), 10, what="the dead token removed")
        await sleep(GRACE_S + 1.0)  # a bounded look for any second push
        [push] = self.pushes(PHONE_TOKEN)
        self.assertEqual(len(self.pushes(GONE_TOKEN)), 1)
        self.assertEqual((push.headers["apns-topic"], push.headers["apns-push-type"]), (TOPIC, "alert"))
        body = push.json()
        self.assertEqual(body["aps"]["alert"]["body"], "hello 19")
        self.assertEqual((body["allspark"]["node_id"], body["allspark"]["unread"], body["allspark"]["sender_id"]),
                         ("phone", 20, "alice"))
        token = push.headers["authorization"].removeprefix("bearer ")
        claims = jwt.decode(token, self.key.public_key(), algorithms=["ES256"])
        self.assertEqual(claims["iss"], TEAM)
        self.assertEqual(jwt.get_unverified_header(token)["kid"], KEY_ID)
        # one HTTP/2 connection carried both pushes
        self.assertEqual(self.standin.connections, 1)
