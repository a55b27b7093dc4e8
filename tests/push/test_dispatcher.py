"""The dispatcher: timeouts, retries with backoff and Retry-After, the
circuit breaker, bounded concurrency; a scripted provider and a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.push.config import PushSettings
from allspark.push.dispatcher import Dispatched, Dispatcher
from allspark.push.provider import Notification, Outcome, PushResult
from allspark.store import PushTarget
from tests.push.fake_provider import HANG, SENT, FakeProvider

TARGET = PushTarget("phone", "fake", "tok", None, None, None, 0)
NOTE = Notification("phone", 3, "allspark")
UNAVAILABLE = PushResult(Outcome.RETRY, 503, "server_error")


class DispatcherTests(unittest.TestCase):
    def make(self, *script: PushResult | str, **settings: Any) -> tuple[Dispatcher, FakeProvider]:
        self.clock = Clock()
        provider = FakeProvider("fake", *script)
        options = {"timeout_s": 10.0, "max_attempts": 3, "backoff_base_s": 1.0, "backoff_cap_s": 30.0,
                   "breaker_failures": 5, "breaker_cooldown_s": 60.0, **settings}
        # jitter fixed at its top: each wait is the full exponential step
        return Dispatcher({"fake": provider}, PushSettings(**options), self.clock, jitter=lambda: 0.999999), \
            provider

    def send(self, dispatcher: Dispatcher) -> list[Dispatched]:
        out: list[Dispatched] = []
        dispatcher.send(TARGET, NOTE).addCallback(out.append)
        return out

    def test_sent_at_once(self) -> None:
        dispatcher, provider = self.make(SENT)
        out = self.send(dispatcher)
        self.assertEqual(out, [Dispatched(SENT, 1)])
        self.assertEqual(dispatcher.stats["fake", "sent"], 1)
        self.assertEqual(provider.sent[0][1].unread, 3)

    def test_5xx_is_retried_with_exponential_backoff(self) -> None:
        dispatcher, provider = self.make(UNAVAILABLE, UNAVAILABLE, SENT)
        out = self.send(dispatcher)
        self.assertEqual(len(provider.sent), 1)
        self.clock.advance(0.99)
        self.assertEqual(len(provider.sent), 1)
        self.clock.advance(0.02)  # first wait: 1 s
        self.assertEqual(len(provider.sent), 2)
        self.clock.advance(1.98)
        self.assertEqual(len(provider.sent), 2)
        self.clock.advance(0.03)  # second wait: 2 s
        self.assertEqual(out, [Dispatched(SENT, 3)])
        self.assertEqual(dispatcher.stats["fake", "retried"], 2)

    def test_retry_after_is_respected(self) -> None:
        dispatcher, provider = self.make(PushResult(Outcome.RETRY, 429, "rate_limited", 7.0), SENT)
        out = self.send(dispatcher)
        self.clock.advance(6.9)
        self.assertEqual((len(provider.sent), out), (1, []))
        self.clock.advance(0.2)
        self.assertEqual(out, [Dispatched(SENT, 2)])

    def test_retry_after_beyond_the_cap_ends_the_claim(self) -> None:
        too_long = PushResult(Outcome.RETRY, 429, "rate_limited", 120.0)
        dispatcher, provider = self.make(too_long, SENT)
        out = self.send(dispatcher)
        self.assertEqual(out, [Dispatched(too_long, 1)])  # the scheduler re-dues it for then
        self.assertEqual(dispatcher.stats["fake", "failed"], 1)

    def test_attempts_are_bounded(self) -> None:
        dispatcher, provider = self.make(max_attempts=2)
        provider.default = UNAVAILABLE
        out = self.send(dispatcher)
        self.clock.advance(100)
        self.assertEqual(out, [Dispatched(UNAVAILABLE, 2)])
        self.assertEqual(len(provider.sent), 2)

    def test_a_hung_request_is_cancelled_at_the_timeout(self) -> None:
        dispatcher, provider = self.make(HANG, SENT)
        out = self.send(dispatcher)
        self.clock.advance(9.9)
        self.assertEqual((provider.cancelled, out), (0, []))
        self.clock.advance(0.2)
        self.assertEqual(provider.cancelled, 1)
        self.assertEqual(dispatcher.stats["fake", "timeout"], 1)
        self.clock.advance(1.1)
        self.assertEqual(out, [Dispatched(SENT, 2)])

    def test_dead_token_and_permanent_failures_are_not_retried(self) -> None:
        for result in (PushResult(Outcome.DEAD_TOKEN, 410, "gone"), PushResult(Outcome.FAILED, 400, "http_400")):
            dispatcher, provider = self.make(result)
            out = self.send(dispatcher)
            self.clock.advance(100)
            self.assertEqual(out, [Dispatched(result, 1)])
            self.assertEqual(len(provider.sent), 1)

    def test_an_unconfigured_provider_is_a_retry_without_a_request(self) -> None:
        dispatcher, provider = self.make()
        out: list[Dispatched] = []
        dispatcher.send(PushTarget("phone", "apns", "tok", None, None, None, 0), NOTE).addCallback(out.append)
        self.assertEqual(out[0].result.reason, "not_configured")
        self.assertEqual(provider.sent, [])

    def test_the_breaker_opens_then_lets_one_probe_through(self) -> None:
        dispatcher, provider = self.make(max_attempts=1, breaker_failures=2, breaker_cooldown_s=60.0)
        provider.default = UNAVAILABLE
        self.send(dispatcher)
        self.send(dispatcher)
        self.assertEqual(dispatcher.breakers["fake"].state, "open")
        refused = self.send(dispatcher)
        self.assertEqual(len(provider.sent), 2)  # no request while open
        self.assertEqual(refused[0].result.reason, "circuit_open")
        self.assertGreater(refused[0].result.retry_after_s or 0, 59)
        self.assertEqual(dispatcher.stats["fake", "circuit_open"], 1)
        self.clock.advance(60)
        provider.default = HANG
        self.send(dispatcher)  # the probe
        second = self.send(dispatcher)  # refused while the probe is out
        self.assertEqual(len(provider.sent), 3)
        self.assertEqual(second[0].result.reason, "circuit_open")
        provider.pending[0].callback(SENT)
        self.assertEqual(dispatcher.breakers["fake"].state, "closed")
        provider.default = SENT
        self.assertEqual(self.send(dispatcher)[0].result, SENT)

    def test_a_failed_probe_opens_it_again(self) -> None:
        dispatcher, provider = self.make(max_attempts=1, breaker_failures=1, breaker_cooldown_s=30.0)
        provider.default = UNAVAILABLE
        self.send(dispatcher)
        self.clock.advance(30)
        self.send(dispatcher)  # the probe fails
        self.assertEqual(len(provider.sent), 2)
        self.assertEqual(self.send(dispatcher)[0].result.reason, "circuit_open")
        self.assertEqual(len(provider.sent), 2)

    def test_concurrency_is_bounded(self) -> None:
        dispatcher, provider = self.make(concurrency=2)
        provider.default = HANG
        outs = [self.send(dispatcher) for _ in range(5)]
        self.assertEqual(len(provider.sent), 2)
        self.assertEqual(dispatcher.active, 5)
        provider.pending[0].callback(SENT)
        self.assertEqual(len(provider.sent), 3)
        self.assertEqual(outs[0], [Dispatched(SENT, 1)])

    def test_close_closes_the_providers(self) -> None:
        dispatcher, provider = self.make()
        dispatcher.close()
        self.assertTrue(provider.closed)
