"""The FCM HTTP v1 provider against a local stand-in for Google's token
endpoint and FCM (tests/push/standins.py), with a fake clock for the token
cache."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.push import fcm
from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget
from tests.e2e.helpers import wait_until
from tests.push.standins import Answer, Recorded, RecordingServer
from tests.support import free_port

PROJECT = "demo-project"
SEND_PATH = f"/v1/projects/{PROJECT}/messages:send"
TOKEN_PATH = "/token"
NOW = 1_800_000_000.0

ACCOUNT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def temp_path(case: unittest.TestCase) -> str:
    """A new file name in a directory removed after ``case``."""
    directory = tempfile.mkdtemp(prefix="allspark-push-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "file")


def account_json(token_uri: str = "https://oauth2.googleapis.com/token", **overrides: Any) -> dict[str, Any]:
    """A service-account key file's content, with a throwaway RSA key."""
    pem = ACCOUNT_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    info: dict[str, Any] = {
        "type": "service_account", "project_id": PROJECT, "private_key_id": "key-id-1",
        "private_key": pem, "client_email": "pusher@demo-project.iam.gserviceaccount.com",
        "client_id": "1234", "token_uri": token_uri,
    }
    info.update(overrides)
    return {k: v for k, v in info.items() if v is not None}


def target(token: str | None = "device-token-1") -> PushTarget:
    return PushTarget("phone-1", "fcm", token, None, None, None, 0)


NOTE = Notification("phone-1", 3, "phone-1", sender_id="alice", session_id=None, text="hello")


class FcmTestCase(unittest.TestCase):
    """A stand-in serving both the token endpoint and FCM; a provider
    pointed at it whose clock is a :class:`Clock` at :data:`NOW`."""

    def setUp(self) -> None:
        self.standin = RecordingServer().start()
        self.tokens_issued = 0

        def issue(_: Recorded) -> Answer:
            self.tokens_issued += 1
            return Answer(200, {"access_token": f"tok-{self.tokens_issued}", "expires_in": 3599,
                                "token_type": "Bearer"})

        self.standin.defaults[TOKEN_PATH] = issue
        self.standin.defaults[SEND_PATH] = Answer(200, {"name": f"projects/{PROJECT}/messages/1"})
        self.clock = Clock()
        self.clock.advance(NOW)
        self.provider = self.make_provider()

    def make_provider(self, endpoint: str | None = None, token_uri: str | None = None) -> fcm.FcmProvider:
        account = fcm.ServiceAccount.from_file(self.write_account())
        provider = fcm.FcmProvider(reactor, PROJECT, account, endpoint or self.standin.url,
                                   token_uri or self.standin.url + TOKEN_PATH, clock=self.clock)
        self.addCleanup(provider.close)
        return provider

    def write_account(self, **overrides: Any) -> str:
        path = temp_path(self)
        with open(path, "w") as handle:
            json.dump(account_json(**overrides), handle)
        return path

    def tearDown(self) -> Deferred[Any]:
        return self.standin.stop()

    def send(self, note: Notification = NOTE, provider: fcm.FcmProvider | None = None) -> Deferred[PushResult]:
        return (provider or self.provider).send(target(), note)

    def bearer_tokens(self) -> list[str | None]:
        return [r.header("authorization") for r in self.standin.requests_to(SEND_PATH)]


class SendTests(FcmTestCase):
    async def test_message_shape(self) -> None:
        """POST .../messages:send with the Bearer token; data values are all
        strings, Android collapse key and high priority, the text as the
        notification body."""
        note = Notification("phone-1", 12, "phone-1", sender_id="alice", session_id="room-7",
                            text="hello there", data={"kind": "chat"})
        result = await self.send(note)
        self.assertEqual(result, PushResult(Outcome.SENT, 200))
        [request] = self.standin.requests_to(SEND_PATH)
        self.assertEqual(request.method, "POST")
        self.assertEqual(request.header("authorization"), "Bearer tok-1")
        self.assertTrue(request.header("content-type").startswith("application/json"))
        self.assertEqual(request.json(), {"message": {
            "token": "device-token-1",
            "data": {"node_id": "phone-1", "unread": "12", "sender_id": "alice",
                     "session_id": "room-7", "kind": "chat"},
            "android": {"collapse_key": "phone-1", "priority": "high"},
            "notification": {"body": "hello there"},
        }})

    async def test_silent_push_has_no_notification(self) -> None:
        """Without text it is a data-only wake-up: no notification block,
        no absent sender or session fields."""
        await self.send(Notification("phone-1", 1, "phone-1"))
        message = self.standin.requests_to(SEND_PATH)[0].json()["message"]
        self.assertNotIn("notification", message)
        self.assertEqual(message["data"], {"node_id": "phone-1", "unread": "1"})

    async def test_target_without_token_fails_without_request(self) -> None:
        result = await self.provider.send(target(None), NOTE)
        self.assertEqual((result.outcome, result.reason), (Outcome.FAILED, "no_token"))
        self.assertEqual(self.standin.requests, [])


class TokenTests(FcmTestCase):
    async def test_assertion_verifies_with_the_public_key(self) -> None:
        """The token request is the JWT-bearer grant; its assertion is RS256
        over iss/scope/aud/iat/exp with the key id in the header."""
        await self.send()
        [request] = self.standin.requests_to(TOKEN_PATH)
        self.assertEqual(request.header("content-type"), "application/x-www-form-urlencoded")
        form = parse_qs(request.body.decode())
        self.assertEqual(form["grant_type"], ["urn:ietf:params:oauth:grant-type:jwt-bearer"])
        assertion = form["assertion"][0]
        self.assertEqual(jwt.get_unverified_header(assertion)["kid"], "key-id-1")
        claims = jwt.decode(assertion, ACCOUNT_KEY.public_key(), algorithms=["RS256"],
                            audience=self.standin.url + TOKEN_PATH,
                            options={"verify_exp": False, "verify_iat": False})
        self.assertEqual(claims, {
            "iss": "pusher@demo-project.iam.gserviceaccount.com",
            "scope": "https://www.googleapis.com/auth/firebase.messaging",
            "aud": self.standin.url + TOKEN_PATH, "iat": int(NOW), "exp": int(NOW) + 3600})
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with self.assertRaises(jwt.InvalidSignatureError):
            jwt.decode(assertion, other.public_key(), algorithms=["RS256"],
                       audience=self.standin.url + TOKEN_PATH, options={"verify_exp": False})

    async def test_token_cached_and_shared_by_concurrent_sends(self) -> None:
        """Five sends at once make one token request; later sends reuse it."""
        results = [self.send() for _ in range(5)]
        for d in results:
            self.assertEqual((await d).outcome, Outcome.SENT)
        await self.send()
        self.assertEqual(len(self.standin.requests_to(TOKEN_PATH)), 1)
        self.assertEqual(self.bearer_tokens(), ["Bearer tok-1"] * 6)

    async def test_token_refreshed_shortly_before_expiry(self) -> None:
        """A 3599 s token is reused until 300 s before it expires, then
        replaced."""
        await self.send()
        self.clock.advance(3599 - 300 - 1)
        await self.send()
        self.clock.advance(2)
        await self.send()
        self.assertEqual(self.bearer_tokens(), ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"])
        self.assertEqual(len(self.standin.requests_to(TOKEN_PATH)), 2)

    async def test_401_drops_the_token(self) -> None:
        """FCM's 401 is a retry, and the next send fetches a new token."""
        await self.send()
        self.standin.answer(Answer(401, {"error": {"code": 401, "status": "UNAUTHENTICATED",
                                                   "message": "Request had invalid credentials."}}),
                            path=SEND_PATH)
        result = await self.send()
        self.assertEqual((result.outcome, result.status, result.reason),
                         (Outcome.RETRY, 401, "UNAUTHENTICATED"))
        await self.send()
        self.assertEqual(self.bearer_tokens(), ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"])

    async def test_refused_assertion_fails(self) -> None:
        """A token endpoint refusing the key (400 invalid_grant) is a
        permanent failure named after its error; no send is attempted."""
        self.standin.answer(Answer(400, {"error": "invalid_grant", "error_description": "Invalid JWT"}),
                            path=TOKEN_PATH)
        result = await self.send()
        self.assertEqual((result.outcome, result.status, result.reason),
                         (Outcome.FAILED, 400, "oauth_invalid_grant"))
        self.assertEqual(self.standin.requests_to(SEND_PATH), [])

    async def test_token_endpoint_overloaded_is_a_retry(self) -> None:
        self.standin.answer(Answer(503, b"busy", headers={"Retry-After": "9"}), path=TOKEN_PATH)
        result = await self.send()
        self.assertEqual(result, PushResult(Outcome.RETRY, 503, "oauth_http_503", 9.0))
        self.assertEqual((await self.send()).outcome, Outcome.SENT)

    async def test_token_endpoint_bad_answer_is_a_retry(self) -> None:
        for body in ({"token_type": "Bearer"}, [1], b"<html>", {"access_token": "t", "expires_in": "nan"},
                     {"access_token": "t", "expires_in": -5}, {"access_token": 7}):
            self.standin.answer(Answer(200, body), path=TOKEN_PATH)
            result = await self.send()
            self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "oauth_bad_answer"), body)
        self.assertEqual(self.standin.requests_to(SEND_PATH), [])

    async def test_token_endpoint_unreachable_is_a_retry(self) -> None:
        provider = self.make_provider(token_uri=f"http://127.0.0.1:{free_port()}/token")
        result = await self.send(provider=provider)
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "oauth_connect_refused"))


class ClassificationTests(FcmTestCase):
    async def classify(self, answer: Answer) -> PushResult:
        self.standin.answer(answer, path=SEND_PATH)
        return await self.send()

    @staticmethod
    def error(code: int, status: str, message: str = "", *details: dict[str, Any]) -> dict[str, Any]:
        return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}

    async def test_unregistered_is_a_dead_token(self) -> None:
        body = self.error(404, "NOT_FOUND", "Requested entity was not found.",
                          {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                           "errorCode": "UNREGISTERED"})
        self.assertEqual(await self.classify(Answer(404, body)),
                         PushResult(Outcome.DEAD_TOKEN, 404, "UNREGISTERED"))

    async def test_invalid_argument_naming_the_token_is_a_dead_token(self) -> None:
        body = self.error(400, "INVALID_ARGUMENT",
                          "The registration token is not a valid FCM registration token",
                          {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                           "errorCode": "INVALID_ARGUMENT"},
                          {"@type": "type.googleapis.com/google.rpc.BadRequest",
                           "fieldViolations": [{"field": "message.token",
                                                "description": "Invalid registration token"}]})
        self.assertEqual(await self.classify(Answer(400, body)),
                         PushResult(Outcome.DEAD_TOKEN, 400, "INVALID_ARGUMENT"))

    async def test_other_invalid_argument_fails(self) -> None:
        """An INVALID_ARGUMENT about another field is not the token's fault."""
        body = self.error(400, "INVALID_ARGUMENT", "Invalid value at 'message.android.ttl'",
                          {"@type": "type.googleapis.com/google.rpc.BadRequest",
                           "fieldViolations": [{"field": "message.android.ttl"}]})
        self.assertEqual(await self.classify(Answer(400, body)),
                         PushResult(Outcome.FAILED, 400, "INVALID_ARGUMENT"))

    async def test_not_found_without_unregistered_fails(self) -> None:
        self.assertEqual(await self.classify(Answer(404, self.error(404, "NOT_FOUND", "no project"))),
                         PushResult(Outcome.FAILED, 404, "NOT_FOUND"))

    async def test_sender_id_mismatch_fails(self) -> None:
        body = self.error(403, "PERMISSION_DENIED", "SenderId mismatch",
                          {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                           "errorCode": "SENDER_ID_MISMATCH"})
        self.assertEqual(await self.classify(Answer(403, body)),
                         PushResult(Outcome.FAILED, 403, "SENDER_ID_MISMATCH"))

    async def test_non_json_4xx_fails(self) -> None:
        self.assertEqual(await self.classify(Answer(413, b"<html>too big</html>")),
                         PushResult(Outcome.FAILED, 413, "http_413"))

    async def test_429_retry_after_seconds(self) -> None:
        body = self.error(429, "RESOURCE_EXHAUSTED", "quota",
                          {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                           "errorCode": "QUOTA_EXCEEDED"})
        self.assertEqual(await self.classify(Answer(429, body, headers={"Retry-After": "17"})),
                         PushResult(Outcome.RETRY, 429, "QUOTA_EXCEEDED", 17.0))

    async def test_503_retry_after_http_date(self) -> None:
        when = formatdate(NOW + 120, usegmt=True)
        result = await self.classify(Answer(503, self.error(503, "UNAVAILABLE"),
                                            headers={"Retry-After": when}))
        self.assertEqual(result, PushResult(Outcome.RETRY, 503, "UNAVAILABLE", 120.0))

    async def test_500_without_retry_after(self) -> None:
        self.assertEqual(await self.classify(Answer(500, b"oops")),
                         PushResult(Outcome.RETRY, 500, "http_500", None))

    async def test_unreadable_retry_after_is_ignored(self) -> None:
        result = await self.classify(Answer(503, b"", headers={"Retry-After": "soon"}))
        self.assertEqual(result, PushResult(Outcome.RETRY, 503, "http_503", None))

    async def test_connection_refused_is_a_retry(self) -> None:
        await self.send()  # a token first: the refusal is the send's
        provider = self.make_provider(endpoint=f"http://127.0.0.1:{free_port()}")
        result = await self.send(provider=provider)
        self.assertEqual((result.outcome, result.status, result.reason),
                         (Outcome.RETRY, 0, "connect_refused"))

    async def test_connection_dropped_is_a_retry(self) -> None:
        """A stand-in that closes the connection without answering."""
        await self.send()

        def drop(_: Recorded) -> Answer:
            for channel in list(self.standin.channels):
                channel.transport.abortConnection()
            return Answer(hang=True)

        self.standin.answer(drop, path=SEND_PATH)
        result = await self.send()
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "connection_lost"))


class HungTests(FcmTestCase):
    async def test_hung_send_cancels_and_closes(self) -> None:
        """Cancelling a send FCM does not answer fails it with
        CancelledError and closes its connection."""
        self.standin.answer(Answer(hang=True), path=SEND_PATH)
        d = self.send()
        await wait_until(lambda: len(self.standin.hung) == 1, 10, what="the hung request")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        await wait_until(lambda: len(self.standin.lost) == 1, 10, what="the connection closing")

    async def test_stalled_answer_body_cancels_and_closes(self) -> None:
        """FCM sends the headers and half the body, then nothing: the
        cancelled send closes the connection too."""
        await self.send()
        self.standin.answer(Answer(200, {"name": "x" * 100}, stall_body=True), path=SEND_PATH)
        d = self.send()
        await wait_until(lambda: len(self.standin.hung) == 1, 10, what="the stalled answer")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        await wait_until(lambda: len(self.standin.lost) == 1, 10, what="the connection closing")

    async def test_hung_token_endpoint(self) -> None:
        """A send cancelled while waiting for the token leaves the refresh
        to the other waiters; the token request gives up after its timeout
        (closing its connection) and the waiters get a retry."""
        self.standin.answer(Answer(hang=True), path=TOKEN_PATH)
        first, second = self.send(), self.send()
        await wait_until(lambda: len(self.standin.hung) == 1, 10, what="the hung token request")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        self.clock.advance(fcm.TOKEN_REQUEST_TIMEOUT_S)
        result = await second
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "oauth_timeout"))
        await wait_until(lambda: len(self.standin.lost) == 1, 10, what="the connection closing")
        self.assertEqual((await self.send()).outcome, Outcome.SENT)
        self.assertEqual(len(self.standin.requests_to(TOKEN_PATH)), 2)


class ConfigTests(unittest.TestCase):
    def write(self, content: Any) -> str:
        path = temp_path(self)
        with open(path, "w") as handle:
            handle.write(content if isinstance(content, str) else json.dumps(content))
        return path

    def build(self, table: dict[str, Any]) -> fcm.FcmProvider:
        provider = fcm.from_config(table, reactor)
        self.addCleanup(provider.close)
        return provider

    def assertConfigError(self, table: dict[str, Any], *words: str) -> None:
        with self.assertRaises(PushConfigError) as caught:
            fcm.from_config(table, reactor)
        message = str(caught.exception)
        self.assertIn("[fcm]", message)
        for word in words:
            self.assertIn(word, message)

    def test_good_table(self) -> None:
        provider = self.build({"project_id": "my-app", "endpoint": "http://127.0.0.1:9/",
                               "service_account_file": self.write(account_json())})
        self.assertEqual(provider.name, "fcm")
        self.assertEqual(provider.send_url, "http://127.0.0.1:9/v1/projects/my-app/messages:send")
        self.assertEqual(provider.tokens.token_uri, "https://oauth2.googleapis.com/token")

    def test_defaults_from_the_key_file(self) -> None:
        """Google's endpoint by default; project_id and token_uri from the
        key file unless the table overrides them."""
        provider = self.build({"service_account_file": self.write(account_json()),
                               "token_uri": "http://127.0.0.1:9/token"})
        self.assertEqual(provider.send_url,
                         f"https://fcm.googleapis.com/v1/projects/{PROJECT}/messages:send")
        self.assertEqual(provider.tokens.token_uri, "http://127.0.0.1:9/token")

    def test_key_from_the_environment(self) -> None:
        self.patch(os, "environ", dict(os.environ, ALLSPARK_TEST_FCM_KEY=json.dumps(account_json())))
        provider = self.build({"service_account_env": "ALLSPARK_TEST_FCM_KEY"})
        self.assertEqual(provider.tokens.account.client_email,
                         "pusher@demo-project.iam.gserviceaccount.com")
        self.assertConfigError({"service_account_env": "ALLSPARK_TEST_NO_SUCH_VARIABLE"}, "not set")

    def test_bad_tables(self) -> None:
        good = self.write(account_json())
        self.assertConfigError({"project_id": "x"}, "service_account_file")
        self.assertConfigError({"service_account_file": good, "api_key": "x"}, "unknown", "api_key")
        self.assertConfigError({"service_account_file": temp_path(self) + ".missing"},
                               "cannot read")
        self.assertConfigError({"service_account_file": self.write("not json")}, "not JSON")
        self.assertConfigError({"service_account_file": self.write([1])}, "not a JSON object")
        self.assertConfigError({"service_account_file": self.write(account_json(client_email=None))},
                               "client_email")
        self.assertConfigError({"service_account_file": self.write(account_json(private_key="xyz"))},
                               "private_key", "PEM")
        ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        self.assertConfigError({"service_account_file": self.write(account_json(private_key=ec_pem))},
                               "not an RSA key")
        self.assertConfigError({"service_account_file": self.write(account_json(project_id=None))},
                               "project_id")
        self.assertConfigError({"service_account_file": good, "project_id": "a/b"}, "project_id")
        self.assertConfigError({"service_account_file": good, "endpoint": "fcm.googleapis.com"},
                               "endpoint", "URL")
        self.assertConfigError({"service_account_file": good, "token_uri": 5}, "token_uri")

