"""The APNs provider against a local HTTP/2-over-TLS stand-in
(tests/push/apns_standin.py), with a fake clock for the provider token."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.push import apns
from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget
from tests.e2e.helpers import wait_until
from tests.push.apns_standin import HANG, APNsStandIn, Received, Reply, make_certificate, server_options
from tests.support import free_port

NOW = 1_700_000_000.0
TEAM = "TEAM123456"
KEY_ID = "KEY7654321"
TOPIC = "com.example.chat"
TOKEN = "a1b2c3d4" * 8
WAIT_S = 10.0

NOTE = Notification("phone-1", 3, "phone-1", sender_id="alice", session_id="room-1", text="hello")
SILENT = Notification("phone-1", 7, "phone-1")


def target(token: str | None = TOKEN, topic: str | None = None, environment: str | None = None) -> PushTarget:
    return PushTarget("phone-1", "apns", token, None, topic, environment, 0)


def write_p8(directory: str, key: Any) -> str:
    """``key`` as a .p8 file (PEM, PKCS #8), as Apple hands them out."""
    path = os.path.join(directory, "AuthKey.p8")
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return path


def outcome_of(d: Deferred[Any]) -> Deferred[Any]:
    """The result of a send, failing the test (not hanging it) after WAIT_S."""
    return d.addTimeout(WAIT_S, reactor)


class APNsTestCase(unittest.TestCase):
    """A stand-in and a provider whose endpoint is it, trusting its
    certificate, with a :class:`Clock` at :data:`NOW`."""

    standin_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="allspark-apns-")
        self.standin = APNsStandIn(self.directory, **self.standin_options).start()
        self.addCleanup(self.standin.stop)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.clock = Clock()
        self.clock.advance(NOW)
        self.provider = self.make_provider()

    def make_provider(self, endpoint: str | None = None, sandbox: str | None = None,
                      ca_file: str | None = None, **timing: float) -> apns.APNsProvider:
        provider = apns.APNsProvider(
            reactor, team_id=TEAM, key_id=KEY_ID, key=self.key, topic=TOPIC,
            endpoint=endpoint or self.standin.url, sandbox_endpoint=sandbox or self.standin.url,
            trust_root=apns.load_trust_root(ca_file or self.standin.ca_file), clock=self.clock, **timing)
        self.addCleanup(provider.close)
        return provider

    def bearer(self, received: Received) -> str:
        authorization = received.headers["authorization"]
        self.assertTrue(authorization.startswith("bearer "))
        return authorization[len("bearer "):]


class RequestShapeTests(APNsTestCase):
    async def test_alert_request_shape(self) -> None:
        result = await outcome_of(self.provider.send(target(), NOTE))
        self.assertEqual(result.outcome, Outcome.SENT)
        self.assertEqual(result.status, 200)
        [received] = self.standin.received
        headers = received.headers
        port = self.standin.url.rsplit(":", 1)[1]
        self.assertEqual(headers[":method"], "POST")
        self.assertEqual(headers[":scheme"], "https")
        self.assertEqual(headers[":authority"], f"127.0.0.1:{port}")
        self.assertEqual(received.path, f"/3/device/{TOKEN}")
        self.assertEqual(headers["apns-topic"], TOPIC)
        self.assertEqual(headers["apns-push-type"], "alert")
        self.assertEqual(headers["apns-priority"], "10")
        self.assertEqual(headers["apns-collapse-id"], "phone-1")
        self.assertEqual(headers["apns-expiration"], str(int(NOW) + apns.DEFAULT_EXPIRATION_S))
        self.assertEqual(int(headers["content-length"]), len(received.body))
        self.assertEqual(received.json(), {
            "aps": {"alert": {"body": "hello"}, "badge": 3},
            "allspark": {"node_id": "phone-1", "unread": 3, "sender_id": "alice", "session_id": "room-1"}})

    async def test_without_text_a_background_push(self) -> None:
        result = await outcome_of(self.provider.send(target(), SILENT))
        self.assertEqual(result.outcome, Outcome.SENT)
        [received] = self.standin.received
        self.assertEqual(received.headers["apns-push-type"], "background")
        self.assertEqual(received.headers["apns-priority"], "5")
        self.assertEqual(received.json(), {"aps": {"content-available": 1},
                                           "allspark": {"node_id": "phone-1", "unread": 7}})

    async def test_target_topic_wins_and_a_long_collapse_key_is_hashed(self) -> None:
        note = Notification("phone-1", 1, "k" * 100, data={"kind": "chat"})
        await outcome_of(self.provider.send(target(topic="com.example.other"), note))
        [received] = self.standin.received
        self.assertEqual(received.headers["apns-topic"], "com.example.other")
        self.assertEqual(len(received.headers["apns-collapse-id"]), 64)
        self.assertEqual(received.json()["allspark"]["data"], {"kind": "chat"})

    async def test_long_text_is_shortened_to_fit_4kb(self) -> None:
        note = Notification("phone-1", 1, "phone-1", text="é\"" * 3000)
        result = await outcome_of(self.provider.send(target(), note))
        self.assertEqual(result.outcome, Outcome.SENT)
        [received] = self.standin.received
        self.assertLessEqual(len(received.body), apns.MAX_PAYLOAD_BYTES)
        self.assertTrue(received.json()["aps"]["alert"]["body"].endswith("\u2026"))

    async def test_data_that_cannot_fit_4kb_is_left_out(self) -> None:
        note = Notification("phone-1", 1, "phone-1", text="hi", data={"blob": "x" * 5000})
        result = await outcome_of(self.provider.send(target(), note))
        self.assertEqual(result.outcome, Outcome.SENT)
        [received] = self.standin.received
        self.assertEqual(received.json()["aps"]["alert"]["body"], "hi")
        self.assertNotIn("data", received.json()["allspark"])

    async def test_an_empty_text_is_a_background_push(self) -> None:
        await outcome_of(self.provider.send(target(), Notification("phone-1", 1, "phone-1", text="")))
        self.assertEqual(self.standin.received[0].headers["apns-push-type"], "background")

    async def test_an_oversized_answer_is_not_read(self) -> None:
        self.patch(apns, "MAX_RESPONSE_BYTES", 100)
        self.standin.script(Reply(400, body=b"x" * 500))
        result = await outcome_of(self.provider.send(target(), NOTE))
        self.assertEqual((result.outcome, result.status, result.reason), (Outcome.FAILED, 400, "response_too_large"))
        self.assertEqual((await outcome_of(self.provider.send(target(), NOTE))).outcome, Outcome.SENT)
        self.assertEqual(self.standin.connections, 1)

    async def test_development_targets_go_to_the_sandbox(self) -> None:
        sandbox = APNsStandIn(self.directory, name="sandbox").start()
        self.addCleanup(sandbox.stop)
        both = os.path.join(self.directory, "both.pem")
        with open(both, "wb") as out:
            for path in (self.standin.ca_file, sandbox.ca_file):
                with open(path, "rb") as f:
                    out.write(f.read())
        provider = self.make_provider(sandbox=sandbox.url, ca_file=both)
        for environment in ("development", "production", None):
            result = await outcome_of(provider.send(target(environment=environment), NOTE))
            self.assertEqual(result.outcome, Outcome.SENT)
        self.assertEqual(len(sandbox.received), 1)
        self.assertEqual(len(self.standin.received), 2)

    async def test_bad_targets_are_answered_without_a_request(self) -> None:
        cases = [(target(token=None), Outcome.DEAD_TOKEN), (target(token="../../x"), Outcome.DEAD_TOKEN),
                 (target(token="ab cd"), Outcome.DEAD_TOKEN), (target(environment="staging"), Outcome.FAILED)]
        for bad, expected in cases:
            result = await outcome_of(self.provider.send(bad, NOTE))
            self.assertEqual(result.outcome, expected, bad)
        provider = apns.APNsProvider(reactor, team_id=TEAM, key_id=KEY_ID, key=self.key,
                                     endpoint=self.standin.url, clock=self.clock)
        self.addCleanup(provider.close)
        result = await outcome_of(provider.send(target(), NOTE))
        self.assertEqual((result.outcome, result.reason), (Outcome.FAILED, "MissingTopic"))
        self.assertEqual(self.standin.received, [])
        self.assertEqual(self.standin.connections, 0)


class ProviderTokenTests(APNsTestCase):
    async def test_the_jwt_verifies_with_the_public_key_of_the_p8(self) -> None:
        await outcome_of(self.provider.send(target(), NOTE))
        token = self.bearer(self.standin.received[0])
        public_pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        header = jwt.get_unverified_header(token)
        self.assertEqual((header["alg"], header["kid"]), ("ES256", KEY_ID))
        claims = jwt.decode(token, public_pem, algorithms=["ES256"])
        self.assertEqual(claims, {"iss": TEAM, "iat": int(NOW)})
        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        with self.assertRaises(jwt.InvalidSignatureError):
            jwt.decode(token, other, algorithms=["ES256"])

    async def test_the_jwt_is_reused_then_refreshed_after_50_minutes(self) -> None:
        await outcome_of(self.provider.send(target(), NOTE))
        self.clock.advance(49 * 60)
        await outcome_of(self.provider.send(target(), NOTE))
        self.clock.advance(60)
        await outcome_of(self.provider.send(target(), NOTE))
        first, second, third = (self.bearer(r) for r in self.standin.received)
        self.assertEqual(first, second)
        self.assertNotEqual(second, third)
        self.assertEqual(jwt.decode(third, options={"verify_signature": False})["iat"], int(NOW) + 50 * 60)

    async def test_expired_provider_token_is_refreshed_and_retried(self) -> None:
        self.standin.script(Reply(403, reason="ExpiredProviderToken"), Reply(403, reason="ExpiredProviderToken"))
        results = await gatherResults([outcome_of(self.provider.send(target(), NOTE)) for _ in range(2)])
        self.assertEqual({(r.outcome, r.status, r.reason) for r in results},
                         {(Outcome.RETRY, 403, "ExpiredProviderToken")})
        self.clock.advance(1)
        await outcome_of(self.provider.send(target(), NOTE))
        first, second, third = (self.bearer(r) for r in self.standin.received)
        self.assertEqual(first, second)
        self.assertNotEqual(first, third)
        self.assertEqual(jwt.decode(third, options={"verify_signature": False})["iat"], int(NOW) + 1)


class ClassificationTests(APNsTestCase):
    async def test_each_status_class(self) -> None:
        cases = [
            (Reply(200), Outcome.SENT, ""),
            (Reply(410, reason="Unregistered"), Outcome.DEAD_TOKEN, "Unregistered"),
            (Reply(400, reason="BadDeviceToken"), Outcome.DEAD_TOKEN, "BadDeviceToken"),
            (Reply(400, reason="DeviceTokenNotForTopic"), Outcome.DEAD_TOKEN, "DeviceTokenNotForTopic"),
            (Reply(429, reason="TooManyRequests", headers={"Retry-After": "7"}), Outcome.RETRY, "TooManyRequests"),
            (Reply(503, reason="ServiceUnavailable"), Outcome.RETRY, "ServiceUnavailable"),
            (Reply(500), Outcome.RETRY, "http_500"),
            (Reply(403, reason="InvalidProviderToken"), Outcome.FAILED, "InvalidProviderToken"),
            (Reply(400, reason="BadCollapseId"), Outcome.FAILED, "BadCollapseId"),
            (Reply(413, reason="PayloadTooLarge"), Outcome.FAILED, "PayloadTooLarge"),
            (Reply(400, body=b"not json"), Outcome.FAILED, "http_400"),
        ]
        for reply, expected, reason in cases:
            self.standin.script(reply)
            result = await outcome_of(self.provider.send(target(), NOTE))
            self.assertEqual(result.outcome, expected, reply)
            self.assertEqual(result.status, reply.status)
            if reason:
                self.assertEqual(result.reason, reason)
            self.assertEqual(result.retry_after_s, 7.0 if reply.status == 429 else None)
        self.assertEqual(self.standin.connections, 1)


class ConnectionTests(APNsTestCase):
    async def test_concurrent_sends_share_one_connection(self) -> None:
        results = await gatherResults([outcome_of(self.provider.send(target(), NOTE)) for _ in range(40)])
        self.assertEqual({r.outcome for r in results}, {Outcome.SENT})
        self.assertEqual(self.standin.connections, 1)
        self.assertEqual(self.provider.connections_made(), 1)
        self.assertEqual(len({r.stream_id for r in self.standin.received}), 40)

    async def test_goaway_reconnects_and_later_sends_succeed(self) -> None:
        first = await outcome_of(self.provider.send(target(), NOTE))
        self.standin.goaway(1, last_stream_id=self.standin.received[0].stream_id)
        await wait_until(lambda: self.standin.closed == 1, WAIT_S, what="the connection closed")
        later = await gatherResults([outcome_of(self.provider.send(target(), NOTE)) for _ in range(3)])
        self.assertEqual([r.outcome for r in [first, *later]], [Outcome.SENT] * 4)
        self.assertEqual(self.standin.connections, 2)
        self.assertEqual([r.connection for r in self.standin.received], [1, 2, 2, 2])

    async def test_streams_the_peer_never_saw_are_sent_again_after_goaway(self) -> None:
        self.standin.default = HANG
        sends = [self.provider.send(target(), Notification("phone-1", n, "phone-1")) for n in range(3)]
        await wait_until(lambda: len(self.standin.hung) == 3, WAIT_S, what="three requests")
        self.standin.default = Reply(200)
        self.standin.goaway(1, last_stream_id=min(r.stream_id for r in self.standin.hung))
        results = [await outcome_of(d) for d in sends]
        # the first stream was seen (its answer is lost with the connection),
        # the two above last_stream_id are sent again on a new connection
        self.assertEqual((results[0].outcome, results[0].reason), (Outcome.RETRY, "goaway"))
        self.assertEqual([r.outcome for r in results[1:]], [Outcome.SENT] * 2)
        again = [r for r in self.standin.received if r.connection == 2]
        self.assertEqual(sorted(r.json()["allspark"]["unread"] for r in again), [1, 2])

    async def test_a_dropped_connection_answers_retry_and_reconnects(self) -> None:
        self.standin.default = HANG
        hung = self.provider.send(target(), NOTE)
        await wait_until(lambda: len(self.standin.hung) == 1, WAIT_S, what="the request")
        self.standin.default = Reply(200)
        for protocol in list(self.standin.live):
            protocol.transport.abortConnection()
        result = await outcome_of(hung)
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "connection_lost"))
        result = await outcome_of(self.provider.send(target(), NOTE))
        self.assertEqual(result.outcome, Outcome.SENT)
        self.assertEqual(self.standin.connections, 2)

    async def test_cancelling_a_hung_request_resets_only_its_stream(self) -> None:
        self.standin.default = HANG
        hung, other = self.provider.send(target(), NOTE), self.provider.send(target(), SILENT)
        await wait_until(lambda: len(self.standin.hung) == 2, WAIT_S, what="two requests")
        hung_stream = next(r.stream_id for r in self.standin.hung if r.json()["allspark"]["unread"] == 3)
        hung.cancel()
        with self.assertRaises(CancelledError):
            await hung
        await wait_until(lambda: bool(self.standin.resets), WAIT_S, what="the reset")
        self.assertEqual(self.standin.resets, [(1, hung_stream, 8)])  # 8: CANCEL
        self.standin.reply(next(r for r in self.standin.hung if r.stream_id != hung_stream), Reply(200))
        self.assertEqual((await outcome_of(other)).outcome, Outcome.SENT)
        self.standin.default = Reply(200)
        self.assertEqual((await outcome_of(self.provider.send(target(), NOTE))).outcome, Outcome.SENT)
        self.assertEqual(self.standin.connections, 1)

    async def test_a_server_reset_is_a_retry(self) -> None:
        self.standin.default = HANG
        d = self.provider.send(target(), NOTE)
        await wait_until(lambda: len(self.standin.hung) == 1, WAIT_S, what="the request")
        [protocol] = self.standin.live
        protocol.conn.reset_stream(self.standin.hung[0].stream_id, 7)  # REFUSED_STREAM
        protocol.flush()
        result = await outcome_of(d)
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "stream_reset_REFUSED_STREAM"))

    async def test_close_ends_the_connection_and_later_sends(self) -> None:
        await outcome_of(self.provider.send(target(), NOTE))
        await self.provider.close()
        await wait_until(lambda: self.standin.closed == 1, WAIT_S, what="the connection closed")
        result = await outcome_of(self.provider.send(target(), NOTE))
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "closed"))


class LivenessTests(APNsTestCase):
    async def test_a_silently_dead_connection_is_found_by_ping_and_replaced(self) -> None:
        provider = self.make_provider(ping_interval_s=0, ping_timeout_s=0.5)
        self.assertEqual((await outcome_of(provider.send(target(), NOTE))).outcome, Outcome.SENT)
        self.standin.freeze(1)
        hung, other = provider.send(target(), NOTE), provider.send(target(), SILENT)
        hung.cancel()  # the dispatcher's timeout: a PING asks whether the connection lives
        with self.assertRaises(CancelledError):
            await hung
        result = await outcome_of(other)
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "connection_lost"))
        self.assertEqual((await outcome_of(provider.send(target(), NOTE))).outcome, Outcome.SENT)
        self.assertEqual(self.standin.connections, 2)
        self.assertEqual([r.connection for r in self.standin.received], [1, 2])

    async def test_an_open_connection_is_pinged(self) -> None:
        provider = self.make_provider(ping_interval_s=0.1)
        await outcome_of(provider.send(target(), NOTE))
        await wait_until(lambda: self.standin.pings >= 2, WAIT_S, what="two PINGs")
        self.assertEqual((await outcome_of(provider.send(target(), NOTE))).outcome, Outcome.SENT)
        self.assertEqual(self.standin.connections, 1)

    async def test_close_ends_even_when_the_peer_is_silent(self) -> None:
        self.patch(apns, "CLOSE_GRACE_S", 0.2)
        self.assertEqual((await outcome_of(self.provider.send(target(), NOTE))).outcome, Outcome.SENT)
        self.standin.freeze(1)  # it will not answer the TLS close
        await outcome_of(self.provider.close())  # fires: the connection was aborted after the grace

    async def test_a_handshake_that_never_ends_times_out(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        provider = self.make_provider(endpoint=f"https://127.0.0.1:{port.getHost().port}", connect_timeout_s=0.3)
        result = await outcome_of(provider.send(target(), NOTE))
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "connect_timeout"))
        # the next push tries a new connection
        result = await outcome_of(provider.send(target(), NOTE))
        self.assertEqual(result.reason, "connect_timeout")
        self.assertEqual(provider.connections_made(), 2)
        # closing while a connection is being set up aborts it at once
        waiting = provider.send(target(), NOTE)
        await outcome_of(provider.close())
        result = await outcome_of(waiting)
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "closed"))


class StreamLimitTests(APNsTestCase):
    standin_options = {"max_concurrent_streams": 3}

    async def test_at_most_max_concurrent_streams_at_a_time(self) -> None:
        self.standin.default = HANG
        sends = [self.provider.send(target(), Notification("phone-1", n, "phone-1")) for n in range(10)]
        for answered in range(10):
            await wait_until(lambda: len(self.standin.hung) > answered, WAIT_S, what=f"request {answered + 1}")
            self.assertLessEqual(len(self.standin.hung) - answered, 3)
            self.standin.reply(self.standin.hung[answered], Reply(200))
        results = [await outcome_of(d) for d in sends]
        self.assertEqual({r.outcome for r in results}, {Outcome.SENT})
        self.assertEqual(self.standin.most_open, 3)
        self.assertEqual(self.standin.connections, 1)
        # the queue keeps the order of the sends
        self.assertEqual([r.json()["allspark"]["unread"] for r in self.standin.received], list(range(10)))

    async def test_cancelling_a_queued_request_sends_nothing(self) -> None:
        self.standin.default = HANG
        sends = [self.provider.send(target(), Notification("phone-1", n, "phone-1")) for n in range(4)]
        await wait_until(lambda: len(self.standin.hung) == 3, WAIT_S, what="three requests")
        sends[3].cancel()
        with self.assertRaises(CancelledError):
            await sends[3]
        for received in list(self.standin.hung):
            self.standin.reply(received, Reply(200))
        self.assertEqual([(await outcome_of(d)).outcome for d in sends[:3]], [Outcome.SENT] * 3)
        self.assertEqual(len(self.standin.received), 3)
        self.assertEqual(self.standin.resets, [])


class FlowControlTests(APNsTestCase):
    standin_options = {"initial_window_size": 100}

    async def test_bodies_larger_than_the_window_arrive_whole(self) -> None:
        notes = [Notification("phone-1", n, "phone-1", text="x" * (500 + n)) for n in range(5)]
        results = await gatherResults([outcome_of(self.provider.send(target(), note)) for note in notes])
        self.assertEqual({r.outcome for r in results}, {Outcome.SENT})
        self.assertEqual(sorted(len(r.json()["aps"]["alert"]["body"]) for r in self.standin.received),
                         [500, 501, 502, 503, 504])


class TLSTests(APNsTestCase):
    async def test_an_untrusted_certificate_is_refused(self) -> None:
        other = tempfile.mkdtemp(prefix="allspark-apns-other-")
        other_ca, _ = make_certificate(other)
        provider = self.make_provider(ca_file=other_ca)
        result = await outcome_of(provider.send(target(), NOTE))
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "tls"))
        self.assertEqual(self.standin.received, [])

    async def test_a_server_without_h2_is_refused_not_hung(self) -> None:
        # a TLS server that knows no ALPN (an HTTP/1.1 server of old)
        options = server_options(self.standin.ca_file, self.standin.key_file, [])
        port = reactor.listenSSL(0, Factory.forProtocol(Protocol), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        provider = self.make_provider(endpoint=f"https://127.0.0.1:{port.getHost().port}")
        result = await outcome_of(provider.send(target(), NOTE))
        # OpenSSL's server ends the handshake when ALPN finds nothing in
        # common ("tls"); a server that ignored ALPN would get "alpn"
        self.assertEqual(result.outcome, Outcome.RETRY)
        self.assertIn(result.reason, ("tls", "alpn"))

    async def test_nothing_listening_is_a_connect_retry(self) -> None:
        provider = self.make_provider(endpoint=f"https://127.0.0.1:{free_port()}")
        result = await outcome_of(provider.send(target(), NOTE))
        self.assertEqual((result.outcome, result.reason), (Outcome.RETRY, "connect"))


class FromConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="allspark-apns-config-")
        self.key_file = write_p8(self.directory, ec.generate_private_key(ec.SECP256R1()))
        self.ca_file, _ = make_certificate(self.directory)

    def table(self, **changes: Any) -> dict[str, Any]:
        table: dict[str, Any] = {"team_id": TEAM, "key_id": KEY_ID, "key_file": self.key_file, "topic": TOPIC}
        table.update(changes)
        return {k: v for k, v in table.items() if v is not None}

    def test_a_good_table(self) -> None:
        provider = apns.from_config(self.table(ca_file=self.ca_file, expiration_s=0, ping_interval_s=0,
                                               ping_timeout_s=2.5, connect_timeout_s=3,
                                               endpoint="https://127.0.0.1:8443"), reactor)
        self.assertEqual(provider._timing, (3.0, 0.0, 2.5))
        self.assertEqual(provider.name, "apns")
        self.assertEqual(provider._endpoints["production"].authority, "127.0.0.1:8443")
        self.assertEqual(provider._endpoints["development"].url, apns.SANDBOX_ENDPOINT)
        with open(self.key_file) as f:
            os.environ["ALLSPARK_TEST_APNS_KEY"] = f.read()
        self.addCleanup(os.environ.pop, "ALLSPARK_TEST_APNS_KEY")
        default = apns.from_config(self.table(topic=None, key_file=None, key_env="ALLSPARK_TEST_APNS_KEY"), reactor)
        self.assertEqual(default._endpoints["production"].url, apns.PRODUCTION_ENDPOINT)
        self.assertIsNone(default._trust_root)

    def test_bad_tables_name_the_key(self) -> None:
        rsa_file = write_p8(tempfile.mkdtemp(dir=self.directory),
                            rsa.generate_private_key(public_exponent=65537, key_size=2048))
        p384_file = write_p8(tempfile.mkdtemp(dir=self.directory), ec.generate_private_key(ec.SECP384R1()))
        not_pem = os.path.join(self.directory, "not.pem")
        with open(not_pem, "w") as f:
            f.write("hello")
        cases = [
            (self.table(team_id=None), "[apns] team_id"), (self.table(key_id=""), "[apns] key_id"),
            (self.table(key_file=None), "exactly one of key_file or key_env"),
            (self.table(key_env="ALLSPARK_TEST_NO_SUCH_VARIABLE"), "exactly one of key_file or key_env"),
            (self.table(key_file=None, key_env="ALLSPARK_TEST_NO_SUCH_VARIABLE"), "[apns] key_env"),
            (self.table(key_file="/nonexistent/AuthKey.p8"), "key_file"),
            (self.table(key_file=not_pem), "key_file"), (self.table(key_file=rsa_file), "key_file"),
            (self.table(key_file=p384_file), "key_file"), (self.table(topic=5), "topic"),
            (self.table(endpoint="http://api.push.apple.com"), "endpoint"),
            (self.table(endpoint="https://api.push.apple.com/3/device"), "endpoint"),
            (self.table(sandbox_endpoint="https://:99999"), "sandbox_endpoint"),
            (self.table(ca_file="/nonexistent/ca.pem"), "ca_file"), (self.table(ca_file=not_pem), "ca_file"),
            (self.table(expiration_s=-1), "expiration_s"), (self.table(expiration_s="1"), "expiration_s"),
            (self.table(keyfile=self.key_file), "keyfile"), (self.table(ping_timeout_s=0), "ping_timeout_s"),
            (self.table(ping_interval_s=-1), "ping_interval_s"), (self.table(connect_timeout_s=True), "connect_timeout_s"),
        ]
        for table, expected in cases:
            with self.assertRaises(PushConfigError, msg=expected) as raised:
                apns.from_config(table, reactor)
            message = str(raised.exception)
            self.assertIn("[apns]", message)
            self.assertIn(expected, message)


class ClassifyTests(unittest.TestCase):
    def test_retry_after_as_a_date(self) -> None:
        result = apns.classify(503, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, b"", 1445412470.0)
        self.assertEqual((result.outcome, result.retry_after_s), (Outcome.RETRY, 10.0))
        self.assertIsNone(apns.classify(503, {"retry-after": "soon"}, b"", NOW).retry_after_s)
