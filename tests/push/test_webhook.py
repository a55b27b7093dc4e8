"""The webhook provider against a local recording HTTP server: the request,
its signature, and how answers are classified."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial import unittest

from allspark.push.provider import Notification, Outcome, PushResult
from allspark.push.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookProvider, sign, verify_signature
from allspark.store import PushTarget
from tests.push.standins import Answer, RecordingServer

SECRET = b"webhook-secret-0123456789"
TARGET = PushTarget("phone", "webhook", "app-user-7", None, None, None, 0)
NOTE = Notification("phone", 4, "allspark", sender_id="alice", session_id="room", text="hello")


class SignatureTests(unittest.TestCase):
    def test_a_signature_verifies_and_anything_changed_does_not(self) -> None:
        body = b'{"unread":1}'
        signature = sign(SECRET, 1_700_000_000, body)
        self.assertTrue(signature.startswith("v1="))
        self.assertTrue(verify_signature(SECRET, "1700000000", body, signature, now=1_700_000_100))
        self.assertFalse(verify_signature(SECRET, "1700000000", body + b" ", signature, now=1_700_000_100))
        self.assertFalse(verify_signature(b"another-secret", "1700000000", body, signature, now=1_700_000_100))
        self.assertFalse(verify_signature(SECRET, "1700000001", body, signature, now=1_700_000_100))
        self.assertFalse(verify_signature(SECRET, "soon", body, signature, now=1_700_000_100))

    def test_an_old_or_future_timestamp_is_refused(self) -> None:
        body = b"{}"
        signature = sign(SECRET, 1_700_000_000, body)
        self.assertFalse(verify_signature(SECRET, 1_700_000_000, body, signature, now=1_700_000_301))
        self.assertFalse(verify_signature(SECRET, 1_700_000_000, body, signature, now=1_699_999_699))
        self.assertTrue(verify_signature(SECRET, 1_700_000_000, body, signature, now=1_700_000_301,
                                         tolerance_s=400))


class WebhookTests(unittest.TestCase):
    def setUp(self) -> None:
        self.hook = RecordingServer().start()
        self.addCleanup(self.hook.stop)
        self.provider = WebhookProvider(self.hook.url + "/push", SECRET, reactor)
        self.addCleanup(self.provider.close)

    def send(self) -> Deferred[PushResult]:
        return self.provider.send(TARGET, NOTE)

    def test_the_request_is_signed_json(self) -> Deferred[None]:
        async def run() -> None:
            result = await self.send()
            self.assertEqual(result.outcome, Outcome.SENT)
            [request] = self.hook.requests
            self.assertEqual((request.method, request.path), ("POST", "/push"))
            self.assertEqual(request.header("content-type"), "application/json")
            body = request.json()
            self.assertEqual({k: body[k] for k in ("node_id", "token", "unread", "sender_id", "session_id", "text",
                                                  "collapse_key")},
                             {"node_id": "phone", "token": "app-user-7", "unread": 4, "sender_id": "alice",
                              "session_id": "room", "text": "hello", "collapse_key": "allspark"})
            timestamp = request.header(TIMESTAMP_HEADER)
            self.assertEqual(int(timestamp or 0), body["timestamp"])
            self.assertTrue(verify_signature(SECRET, timestamp or "", request.body,
                                             request.header(SIGNATURE_HEADER) or "", now=reactor.seconds()))

        return ensureDeferred(run())

    def test_answers_are_classified(self) -> Deferred[None]:
        cases: list[tuple[Answer, tuple[Outcome, int, Any]]] = [
            (Answer(204), (Outcome.SENT, 204, None)),
            (Answer(503), (Outcome.RETRY, 503, None)),
            (Answer(429, headers={"Retry-After": "7"}), (Outcome.RETRY, 429, 7.0)),
            (Answer(410), (Outcome.DEAD_TOKEN, 410, None)),
            (Answer(404), (Outcome.DEAD_TOKEN, 404, None)),
            (Answer(400, {"error": "bad"}), (Outcome.FAILED, 400, None)),
        ]

        async def run() -> None:
            for answer, expected in cases:
                self.hook.answer(answer)
                result = await self.send()
                self.assertEqual((result.outcome, result.status, result.retry_after_s), expected, answer)

        return ensureDeferred(run())

    def test_no_answer_is_a_retry(self) -> Deferred[None]:
        async def run() -> None:
            url = self.hook.url
            await self.hook.stop()
            provider = WebhookProvider(url + "/push", SECRET, reactor)
            result = await provider.send(TARGET, NOTE)
            self.assertEqual((result.outcome, result.status), (Outcome.RETRY, 0))
            self.assertTrue(result.reason, result)
            await provider.close()

        return ensureDeferred(run())

    def test_cancelling_aborts_a_hung_request(self) -> Deferred[None]:
        self.hook.default = Answer(hang=True)

        async def run() -> None:
            d = self.send()
            for _ in range(200):  # until the stand-in has the request (bounded: 10 s)
                if self.hook.hung:
                    break
                await _sleep(0.05)
            self.assertEqual(len(self.hook.hung), 1)
            d.cancel()
            self.failureResultOf(d)
            for _ in range(200):
                if self.hook.lost:
                    break
                await _sleep(0.05)
            self.assertEqual(len(self.hook.lost), 1)

        return ensureDeferred(run())


def _sleep(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds)

