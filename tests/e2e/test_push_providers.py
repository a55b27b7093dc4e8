"""FCM and Web Push through a real ``twistd allspark`` process: its
``--push-config`` points FCM's ``endpoint`` / ``token_uri`` at a recording
stand-in in this test process, and a Web Push subscription's endpoint at the
same stand-in (``allow_http_endpoints``).  What arrives there must be the
documented request, and a dead-token answer must remove the target."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from typing import Any
from urllib.parse import parse_qs

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from allspark.store import PushTarget, open_store
from tests.e2e.helpers import wait_until
from tests.push.standins import Answer, Recorded, RecordingServer
from tests.support import ServerProcess, client_for

PROJECT = "e2e-project"
SEND_PATH = f"/v1/projects/{PROJECT}/messages:send"
ACCOUNT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
VAPID_KEY = ec.generate_private_key(ec.SECP256R1())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class ProviderThroughServer(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.standin = RecordingServer().start()
        self.addCleanup(self.standin.stop)
        self.standin.defaults["/token"] = Answer(200, {"access_token": "e2e-access", "expires_in": 3599})
        self.standin.defaults[SEND_PATH] = Answer(200, {"name": f"projects/{PROJECT}/messages/1"})
        self.standin.default = Answer(201)
        self.dir = tempfile.mkdtemp(prefix="allspark-push-providers-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        account = os.path.join(self.dir, "fcm.json")
        with open(account, "w") as f:
            json.dump({"type": "service_account", "project_id": PROJECT, "private_key_id": "kid-e2e",
                       "private_key": pem(ACCOUNT_KEY).decode(), "client_email": "push@e2e.example.com",
                       "token_uri": "https://oauth2.googleapis.com/token"}, f)
        vapid = os.path.join(self.dir, "vapid.pem")
        with open(vapid, "wb") as f:
            f.write(pem(VAPID_KEY))
        config = os.path.join(self.dir, "push.toml")
        with open(config, "w") as f:
            f.write(f"[push]\ngrace_s = 0.5\nwindow_s = 30\npoll_s = 0.5\ncontent = \"text\"\n\n"
                    f"[fcm]\nproject_id = \"{PROJECT}\"\nservice_account_file = \"{account}\"\n"
                    f"endpoint = \"{self.standin.url}\"\ntoken_uri = \"{self.standin.url}/token\"\n\n"
                    f"[webpush]\nvapid_private_key_file = \"{vapid}\"\nsubject = \"mailto:ops@example.com\"\n"
                    f"allow_http_endpoints = true\n")
        self.server = ServerProcess(args=(f"--push-config={config}",))
        self.addCleanup(shutil.rmtree, self.server.data_dir, True)
        self.addCleanup(self.server.stop)
        self.server.start()

    async def store_call(self, method: str, *args: Any) -> Any:
        """One call on the server's SQLite store, from this process."""
        store = open_store("sqlite://" + os.path.join(self.server.data_dir, "allspark.db"), reactor)
        await store.start()
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.close()

    async def register(self, target: PushTarget) -> None:
        await self.store_call("set_push_target", target)
        client = await client_for(self, self.server, target.node_id)  # the node exists, then leaves
        await client.close()

    async def burst(self, dest: str, count: int) -> None:
        alice = await client_for(self, self.server, "alice")
        await gatherResults([alice.send(dest_id=dest, id=f"{dest}-{i}", payload={"i": i},
                                        push_text=f"hello {i}") for i in range(count)])
        await alice.close()

    def sent_to(self, path: str) -> list[Recorded]:
        return self.standin.requests_to(path)

    async def test_fcm_push_and_dead_token(self) -> None:
        """Three messages: one FCM send with the count, after one token
        request whose assertion verifies; an UNREGISTERED answer removes
        the target."""
        await self.register(PushTarget("phone", "fcm", "fcm-token-1", None, None, None, 0))
        await self.burst("phone", 3)
        await wait_until(lambda: len(self.sent_to(SEND_PATH)) == 1, 20, what="the FCM send")
        [send] = self.sent_to(SEND_PATH)
        self.assertEqual(send.header("authorization"), "Bearer e2e-access")
        message = send.json()["message"]
        self.assertEqual(message["token"], "fcm-token-1")
        self.assertEqual((message["data"]["node_id"], message["data"]["unread"]), ("phone", "3"))
        self.assertEqual(message["android"]["priority"], "high")
        [token_request] = self.sent_to("/token")
        assertion = parse_qs(token_request.body.decode())["assertion"][0]
        claims = jwt.decode(assertion, ACCOUNT_KEY.public_key(), algorithms=["RS256"],
                            audience=f"{self.standin.url}/token")
        self.assertEqual(claims["iss"], "push@e2e.example.com")

        await self.register(PushTarget("tablet", "fcm", "fcm-token-dead", None, None, None, 0))
        self.standin.defaults[SEND_PATH] = Answer(404, {"error": {
            "code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found.",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                         "errorCode": "UNREGISTERED"}]}})
        await self.burst("tablet", 1)
        await wait_until(lambda: len(self.sent_to(SEND_PATH)) == 2, 20, what="the FCM send to tablet")

        async def removed() -> bool:
            return await self.store_call("get_push_target", "tablet") is None

        await wait_until(removed, 20, interval=0.2, what="the dead FCM token removed")
        self.assertIsNotNone(await self.store_call("get_push_target", "phone"))

    async def test_web_push_decrypts_and_gone_removes(self) -> None:
        """One Web Push POST whose body the browser's keys decrypt and
        whose VAPID token verifies for the stand-in's origin; 410 removes
        the subscription."""
        browser = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        point = browser.public_key().public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint)
        subscription = {"endpoint": f"{self.standin.url}/wp/browser-1",
                        "keys": {"p256dh": b64url(point), "auth": b64url(auth)}}
        await self.register(PushTarget("browser", "webpush", None, subscription, None, None, 0))
        await self.burst("browser", 2)
        await wait_until(lambda: len(self.sent_to("/wp/browser-1")) == 1, 20, what="the Web Push POST")
        [push] = self.sent_to("/wp/browser-1")
        document = json.loads(http_ece.decrypt(push.body, private_key=browser, auth_secret=auth,
                                               version="aes128gcm"))
        self.assertEqual((document["node_id"], document["unread"]), ("browser", 2))
        scheme, _, params = (push.header("authorization") or "").partition(" ")
        fields = dict(part.strip().split("=", 1) for part in params.split(","))
        self.assertEqual(scheme, "vapid")
        public = VAPID_KEY.public_key()
        self.assertEqual(fields["k"], b64url(public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)))
        claims = jwt.decode(fields["t"], public, algorithms=["ES256"], audience=self.standin.url)
        self.assertEqual(claims["sub"], "mailto:ops@example.com")
        self.assertEqual(push.header("content-encoding"), "aes128gcm")

        self.standin.answer(Answer(410), path="/wp/browser-2")
        gone = dict(subscription, endpoint=f"{self.standin.url}/wp/browser-2")
        await self.register(PushTarget("browser2", "webpush", None, gone, None, None, 0))
        await self.burst("browser2", 1)
        await wait_until(lambda: len(self.sent_to("/wp/browser-2")) == 1, 20, what="the POST to browser-2")

        async def removed() -> bool:
            return await self.store_call("get_push_target", "browser2") is None

        await wait_until(removed, 20, interval=0.2, what="the gone subscription removed")
