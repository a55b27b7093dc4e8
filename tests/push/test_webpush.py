"""The Web Push provider against a local push-service stand-in
(tests/push/standins.py): a browser-side key pair made here decrypts what it
receives, the VAPID JWT verifies with the VAPID public key."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from email.utils import formatdate
from typing import Any

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.push import webpush
from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget
from tests.e2e.helpers import wait_until
from tests.push.standins import Answer, RecordingServer
from tests.support import free_port

NOW = 1_800_000_000.0
PUSH_PATH = "/wpush/v2/subscription-abc"
VAPID_KEY = ec.generate_private_key(ec.SECP256R1())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def temp_path(case: unittest.TestCase) -> str:
    """A new file name in a directory removed after ``case``."""
    directory = tempfile.mkdtemp(prefix="allspark-push-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "file")


class Browser:
    """The browser's side of a subscription: its key pair and auth secret."""

    def __init__(self, endpoint: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        self.endpoint = endpoint

    def subscription(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "expirationTime": None,
                "keys": {"p256dh": b64url(public_point(self.key)), "auth": b64url(self.auth)}}

    def target(self) -> PushTarget:
        return PushTarget("browser-1", "webpush", None, self.subscription(), None, None, 0)

    def decrypt(self, body: bytes) -> Any:
        return json.loads(http_ece.decrypt(body, private_key=self.key, auth_secret=self.auth,
                                           version="aes128gcm"))


def vapid_token(authorization: str) -> tuple[str, str]:
    """``(t, k)`` of a ``vapid t=..., k=...`` Authorization header."""
    scheme, _, params = authorization.partition(" ")
    assert scheme == "vapid", authorization
    fields = dict(part.strip().split("=", 1) for part in params.split(","))
    return fields["t"], fields["k"]


NOTE = Notification("browser-1", 4, "browser-1", sender_id="alice", text="hi")


class WebPushTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.standin = RecordingServer().start()
        self.standin.default = Answer(201, b"", headers={"Location": "/m/1"})
        self.clock = Clock()
        self.clock.advance(NOW)
        self.provider = self.make_provider()
        self.browser = Browser(self.standin.url + PUSH_PATH)

    def tearDown(self) -> Deferred[Any]:
        return self.standin.stop()

    def make_provider(self, **options: Any) -> webpush.WebPushProvider:
        options.setdefault("allow_http_endpoints", True)
        provider = webpush.WebPushProvider(reactor, webpush.Vapid02(VAPID_KEY), "mailto:ops@example.com",
                                           clock=self.clock, **options)
        self.addCleanup(provider.close)
        return provider

    def send(self, note: Notification = NOTE, target: PushTarget | None = None) -> Deferred[PushResult]:
        return self.provider.send(target or self.browser.target(), note)


class SendTests(WebPushTestCase):
    async def test_body_decrypts_with_the_subscription_keys(self) -> None:
        """The body is aes128gcm for the browser's p256dh and auth secret;
        the service worker gets the small JSON."""
        note = Notification("browser-1", 4, "browser-1", sender_id="alice", session_id="room-7",
                            text="hi there", data={"kind": "chat"})
        self.assertEqual(await self.send(note), PushResult(Outcome.SENT, 201))
        [request] = self.standin.requests
        self.assertEqual((request.method, request.path), ("POST", PUSH_PATH))
        self.assertEqual(self.browser.decrypt(request.body), {
            "node_id": "browser-1", "unread": 4, "sender_id": "alice", "session_id": "room-7",
            "text": "hi there", "data": {"kind": "chat"}})
        other = Browser(self.browser.endpoint)
        with self.assertRaises(Exception):
            other.decrypt(request.body)

    async def test_headers(self) -> None:
        """TTL, Urgency, Topic (the collapse key) and Content-Encoding."""
        await self.send()
        request = self.standin.requests[0]
        self.assertEqual(request.header("content-encoding"), "aes128gcm")
        self.assertEqual(request.header("ttl"), "86400")
        self.assertEqual(request.header("urgency"), "normal")
        self.assertEqual(request.header("topic"), "browser-1")
        self.assertEqual(request.header("content-type"), "application/octet-stream")

    async def test_configured_ttl_and_urgency(self) -> None:
        self.provider = self.make_provider(ttl_s=60, urgency="high")
        await self.send()
        self.assertEqual((self.standin.requests[0].header("ttl"),
                          self.standin.requests[0].header("urgency")), ("60", "high"))

    async def test_vapid_jwt_verifies_with_the_public_key(self) -> None:
        """ES256 over aud = the endpoint's origin, exp 12 h ahead, sub; k is
        the VAPID public key."""
        await self.send()
        token, k = vapid_token(self.standin.requests[0].header("authorization") or "")
        self.assertEqual(k, b64url(public_point(VAPID_KEY)))
        self.assertEqual(k, self.provider.public_key)
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), base64.urlsafe_b64decode(k + "=="))
        claims = jwt.decode(token, public, algorithms=["ES256"], audience=self.standin.url,
                            options={"verify_exp": False})
        self.assertEqual(claims, {"aud": self.standin.url, "sub": "mailto:ops@example.com",
                                  "exp": int(NOW) + 12 * 3600})
        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        with self.assertRaises(jwt.InvalidSignatureError):
            jwt.decode(token, other, algorithms=["ES256"], audience=self.standin.url,
                       options={"verify_exp": False})

    async def test_vapid_token_reused_for_an_hour_per_origin(self) -> None:
        """The same token for an origin within an hour, a new one (with a
        later exp) after; another origin has its own."""
        first = self.provider.authorization(self.standin.url + "/a")
        self.clock.advance(3599)
        self.assertEqual(self.provider.authorization(self.standin.url + "/b"), first)
        other = self.provider.authorization("https://push.example.com/c")
        self.assertNotEqual(other, first)
        self.clock.advance(2)
        renewed = self.provider.authorization(self.standin.url + "/a")
        self.assertNotEqual(renewed, first)
        claims = jwt.decode(vapid_token(renewed)[0], options={"verify_signature": False})
        self.assertEqual(claims["exp"], int(NOW) + 3601 + 12 * 3600)

    async def test_long_collapse_key_becomes_a_url_safe_topic(self) -> None:
        note = Notification("browser-1", 1, "tenant:acme/node:browser-1@example.com#with spaces")
        await self.send(note)
        await self.send(note)
        topics = [r.header("topic") for r in self.standin.requests]
        self.assertEqual(topics[0], topics[1])
        self.assertRegex(topics[0] or "", r"^[A-Za-z0-9_-]{32}$")

    async def test_big_payload_is_shortened_under_the_limit(self) -> None:
        """Over 4 KB: the data goes, then the text is cut; the body stays
        within 4096 bytes and still decrypts."""
        note = Notification("browser-1", 2, "browser-1", text="\u00e9" * 3000,
                            data={"blob": "x" * 3000})
        await self.send(note)
        body = self.standin.requests[0].body
        self.assertLessEqual(len(body), 4096)
        document = self.browser.decrypt(body)
        self.assertNotIn("data", document)
        self.assertTrue(document["text"].startswith("\u00e9" * 100))
        self.assertLess(len(document["text"]), 3000)

    async def test_bad_subscriptions_fail_without_a_request(self) -> None:
        good = self.browser.subscription()
        bad: list[Any] = [
            None,
            {"keys": good["keys"]},
            {"endpoint": "ftp://push.example.com/x", "keys": good["keys"]},
            {"endpoint": "http://[::1/x", "keys": good["keys"]},
            {"endpoint": "https://push.example.com/" + "x" * 3000, "keys": good["keys"]},
            {"endpoint": good["endpoint"]},
            {"endpoint": good["endpoint"], "keys": {"p256dh": good["keys"]["p256dh"], "auth": "AAAA"}},
            {"endpoint": good["endpoint"], "keys": {"p256dh": b64url(b"\x04" + b"\x01" * 64),
                                                    "auth": good["keys"]["auth"]}},
            {"endpoint": good["endpoint"], "keys": {"p256dh": "!!not base64!!", "auth": good["keys"]["auth"]}},
            {"endpoint": good["endpoint"], "keys": {"p256dh": 5, "auth": good["keys"]["auth"]}},
        ]
        for subscription in bad:
            result = await self.send(target=PushTarget("b", "webpush", None, subscription, None, None, 0))
            self.assertEqual(result, PushResult(Outcome.FAILED, 0, "bad_subscription"), subscription)
        self.assertEqual(self.standin.requests, [])


class ClassificationTests(WebPushTestCase):
    async def classify(self, answer: Answer) -> PushResult:
        self.standin.answer(answer)
        return await self.send()

    async def test_accepted(self) -> None:
        for status in (200, 201, 202):
            self.assertEqual(await self.classify(Answer(status)), PushResult(Outcome.SENT, status))

    async def test_gone_is_a_dead_subscription(self) -> None:
        self.assertEqual(await self.classify(Answer(404, {"errno": 102})),
                         PushResult(Outcome.DEAD_TOKEN, 404, "not_found"))
        self.assertEqual(await self.classify(Answer(410, {"errno": 103})),
                         PushResult(Outcome.DEAD_TOKEN, 410, "gone"))

    async def test_429_and_5xx_retry_with_retry_after(self) -> None:
        self.assertEqual(await self.classify(Answer(429, b"", headers={"Retry-After": "30"})),
                         PushResult(Outcome.RETRY, 429, "http_429", 30.0))
        when = formatdate(NOW + 45, usegmt=True)
        self.assertEqual(await self.classify(Answer(503, b"", headers={"Retry-After": when})),
                         PushResult(Outcome.RETRY, 503, "http_503", 45.0))
        self.assertEqual(await self.classify(Answer(502)), PushResult(Outcome.RETRY, 502, "http_502"))

    async def test_too_large_and_other_4xx_fail(self) -> None:
        self.assertEqual(await self.classify(Answer(413)),
                         PushResult(Outcome.FAILED, 413, "payload_too_large"))
        for status in (400, 401, 403):
            self.assertEqual(await self.classify(Answer(status, b"bad vapid")),
                             PushResult(Outcome.FAILED, status, f"http_{status}"))

    async def test_http_endpoints_refused_unless_allowed(self) -> None:
        """A subscription's endpoint is the client's choice: only https
        unless the configuration allows http (local stand-ins)."""
        self.provider = self.make_provider(allow_http_endpoints=False)
        self.assertEqual(await self.send(), PushResult(Outcome.FAILED, 0, "bad_subscription"))
        self.assertEqual(self.standin.requests, [])

    async def test_connection_refused_is_a_retry(self) -> None:
        self.browser.endpoint = f"http://127.0.0.1:{free_port()}/push/x"
        self.assertEqual(await self.send(), PushResult(Outcome.RETRY, 0, "connect_refused"))

    async def test_hung_push_service_cancels_and_closes(self) -> None:
        self.standin.answer(Answer(hang=True))
        d = self.send()
        await wait_until(lambda: len(self.standin.hung) == 1, 10, what="the hung request")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        await wait_until(lambda: len(self.standin.lost) == 1, 10, what="the connection closing")


def test_origin_of_endpoints() -> None:
    assert webpush.origin_of("https://fcm.googleapis.com/fcm/send/abc") == "https://fcm.googleapis.com"
    assert webpush.origin_of("https://push.example.com:443/x") == "https://push.example.com"
    assert webpush.origin_of("https://push.example.com:8443/x?y") == "https://push.example.com:8443"
    assert webpush.origin_of("http://127.0.0.1:9000/x") == "http://127.0.0.1:9000"


def test_topic_is_stable_and_url_safe() -> None:
    assert webpush.topic_for("node-1") == "node-1"
    long = webpush.topic_for("x" * 40)
    assert long == webpush.topic_for("x" * 40) and len(long) == 32
    assert long != webpush.topic_for("x" * 41)


class ConfigTests(unittest.TestCase):
    def write(self, content: bytes | str) -> str:
        path = temp_path(self)
        with open(path, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
        return path

    def pem(self, key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def build(self, table: dict[str, Any]) -> webpush.WebPushProvider:
        provider = webpush.from_config(table, reactor)
        self.addCleanup(provider.close)
        return provider

    def assertConfigError(self, table: dict[str, Any], *words: str) -> None:
        with self.assertRaises(PushConfigError) as caught:
            webpush.from_config(table, reactor)
        message = str(caught.exception)
        self.assertIn("[webpush]", message)
        for word in words:
            self.assertIn(word, message)

    def test_pem_key(self) -> None:
        provider = self.build({"vapid_private_key_file": self.write(self.pem(VAPID_KEY)),
                               "subject": "mailto:ops@example.com"})
        self.assertEqual(provider.name, "webpush")
        self.assertEqual(provider.public_key, b64url(public_point(VAPID_KEY)))
        self.assertEqual((provider.ttl_s, provider.urgency, provider.allow_http_endpoints),
                         (86400, "normal", False))

    def test_sec1_pem_and_raw_keys(self) -> None:
        """OpenSSL's EC PEM and the raw base64url private value work too."""
        sec1 = VAPID_KEY.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption())
        raw = b64url(VAPID_KEY.private_numbers().private_value.to_bytes(32, "big"))
        for content in (sec1, raw + "\n"):
            provider = self.build({"vapid_private_key_file": self.write(content),
                                   "subject": "https://example.com/contact", "ttl_s": 0,
                                   "urgency": "high", "allow_http_endpoints": True})
            self.assertTrue(provider.allow_http_endpoints)
            self.assertEqual(provider.public_key, b64url(public_point(VAPID_KEY)))

    def test_key_from_the_environment(self) -> None:
        self.patch(os, "environ", dict(os.environ, ALLSPARK_TEST_VAPID=self.pem(VAPID_KEY).decode()))
        provider = self.build({"vapid_private_key_env": "ALLSPARK_TEST_VAPID",
                               "subject": "mailto:ops@example.com"})
        self.assertEqual(provider.public_key, b64url(public_point(VAPID_KEY)))

    def test_bad_tables(self) -> None:
        key = self.write(self.pem(VAPID_KEY))
        subject = "mailto:ops@example.com"
        self.assertConfigError({"subject": subject}, "vapid_private_key_file", "vapid_private_key_env")
        self.assertConfigError({"vapid_private_key_env": "ALLSPARK_TEST_NO_SUCH_VARIABLE",
                                "subject": subject}, "not set")
        self.assertConfigError({"vapid_private_key_file": temp_path(self) + ".missing", "subject": subject},
                               "cannot read")
        self.assertConfigError({"vapid_private_key_file": self.write(""), "subject": subject}, "empty")
        self.assertConfigError({"vapid_private_key_file": self.write("garbage!"), "subject": subject},
                               "neither PEM")
        self.assertConfigError({"vapid_private_key_file": self.write(self.pem(
            rsa.generate_private_key(public_exponent=65537, key_size=2048))), "subject": subject},
            "P-256")
        self.assertConfigError({"vapid_private_key_file": self.write(self.pem(
            ec.generate_private_key(ec.SECP384R1()))), "subject": subject}, "P-256")
        self.assertConfigError({"vapid_private_key_file": key}, "subject")
        self.assertConfigError({"vapid_private_key_file": key, "subject": "ops@example.com"}, "subject")
        for ttl in (-1, "60", True, 10**9):
            self.assertConfigError({"vapid_private_key_file": key, "subject": subject, "ttl_s": ttl},
                                   "ttl_s")
        self.assertConfigError({"vapid_private_key_file": key, "subject": subject, "urgency": "now"},
                               "urgency")
        self.assertConfigError({"vapid_private_key_file": key, "subject": subject,
                                "allow_http_endpoints": "yes"}, "allow_http_endpoints")
        self.assertConfigError({"vapid_private_key_file": key, "subject": subject, "endpoint": "x"},
                               "unknown", "endpoint")

    def test_missing_key_file_is_not_generated(self) -> None:
        """py-vapid would write a new key where none is: the provider refuses."""
        path = temp_path(self)
        self.assertConfigError({"vapid_private_key_file": path, "subject": "mailto:a@example.com"},
                               "cannot read")
        self.assertFalse(os.path.exists(path))
