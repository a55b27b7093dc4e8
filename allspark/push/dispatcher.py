"""The queue in front of the push providers.

:meth:`Dispatcher.send` takes one push and answers, some time later, with
how it ended; it never raises and never blocks the caller (routing never
calls it at all: the scheduler does, from its own timers).  For every
provider alike it:

- bounds the requests in flight (``concurrency``; more wait their turn);
- bounds every request (``timeout_s``: ``Deferred.addTimeout``, whose
  cancel aborts the request);
- retries a transient failure (``RETRY``: 5xx, 429, no answer, timeout) up
  to ``max_attempts`` sends, waiting ``backoff_base_s`` doubling up to
  ``backoff_cap_s`` with full jitter, or the provider's ``Retry-After`` when
  it said one; a ``Retry-After`` longer than ``backoff_cap_s`` ends the
  claim instead (the scheduler re-dues the push in the store for then);
- keeps a circuit breaker per provider: ``breaker_failures`` consecutive
  transient failures open it, and while open every push to that provider
  ends at once (``RETRY``, reason ``circuit_open``, due again when the
  cooldown ends) without a request; after ``breaker_cooldown_s`` one probe
  request is let through (half-open): success closes it, failure opens it
  for another cooldown.

Every outcome is a structured log event (``push_sent``, ``push_retried``,
``push_failed``) with ``node_id``, ``provider``, ``status`` and ``reason``,
and a count in :attr:`Dispatcher.stats`, keyed ``(provider, outcome)``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from allspark.logs import logger
from allspark.push.config import PushSettings
from allspark.push.provider import Notification, Outcome, Provider, PushResult
from allspark.store import PushTarget

log = logger(__name__)


class Breaker:
    """One provider's circuit breaker: closed, open, or half-open (one probe
    in flight)."""

    def __init__(self, failures: int, cooldown_s: float, clock: IReactorTime) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        if self.opened_at is None:
            return "closed"
        if self.probing or self.clock.seconds() >= self.opened_at + self.cooldown_s:
            return "half_open"
        return "open"

    def admit(self) -> bool:
        """Whether a request may go now (in half-open: the one probe)."""
        if self.opened_at is None:
            return True
        if self.probing or self.clock.seconds() < self.opened_at + self.cooldown_s:
            return False
        self.probing = True
        return True

    def reopens_in(self) -> float:
        """Seconds until a probe may go (0 when closed)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock.seconds())

    def record(self, ok: bool) -> bool:
        """Count one answered request; whether the circuit opened now."""
        self.probing = False
        if ok:
            self.consecutive = 0
            self.opened_at = None
            return False
        self.consecutive += 1
        if self.opened_at is not None or self.consecutive >= self.failures:
            self.opened_at = self.clock.seconds()
            return True
        return False


@dataclass(frozen=True)
class Dispatched:
    """How one push ended: the last :class:`PushResult`, and the sends made."""

    result: PushResult
    sends: int


class Dispatcher:
    """Sends pushes through the configured providers (see the module
    docstring for the rules)."""

    def __init__(self, providers: Mapping[str, Provider], settings: PushSettings, clock: IReactorTime,
                 jitter: Callable[[], float] = random.random) -> None:
        """``jitter``: a number in [0, 1) per wait (tests fix it)."""
        self.providers = dict(providers)
        self.settings = settings
        self.clock = clock
        self.jitter = jitter
        self.breakers = {name: Breaker(settings.breaker_failures, settings.breaker_cooldown_s, clock)
                         for name in self.providers}
        self._slots = DeferredSemaphore(settings.concurrency)
        #: pushes by ``(provider, outcome)``: ``sent``, ``retried`` (a send
        #: retried), ``failed`` (a push that ended unsent), ``timeout``
        #: (requests cut off), ``circuit_open`` (pushes refused by an open
        #: breaker); the scheduler adds ``dropped`` and ``token_removed``
        self.stats: Counter[tuple[str, str]] = Counter()
        #: pushes between :meth:`send` and their answer
        self.active = 0
        self._closing = False

    def backoff_s(self, attempt: int) -> float:
        """The wait before send number ``attempt + 1`` (``attempt`` >= 1):
        full jitter over ``backoff_base_s * 2**(attempt - 1)``, at most
        ``backoff_cap_s``, never below a tenth of the base."""
        s = self.settings
        ceiling = min(s.backoff_cap_s, s.backoff_base_s * 2 ** min(attempt - 1, 30))
        return max(s.backoff_base_s / 10, ceiling * self.jitter())

    def send(self, target: PushTarget, note: Notification) -> Deferred[Dispatched]:
        """Send ``note`` to ``target`` through its provider, retrying as the
        settings say; fires with the :class:`Dispatched` (never fails)."""
        self.active += 1
        d = Deferred.fromCoroutine(self._send(target, note))

        def done(result: Dispatched | Failure) -> Dispatched:
            self.active -= 1
            if isinstance(result, Failure):
                log.failure("push to {node_id} failed inside the dispatcher", result,
                            node_id=note.node_id, provider=target.provider)
                return Dispatched(PushResult(Outcome.RETRY, 0, "internal"), 0)
            return result

        return d.addBoth(done)

    async def _send(self, target: PushTarget, note: Notification) -> Dispatched:
        name = target.provider
        provider = self.providers.get(name)
        fields = {"node_id": note.node_id, "provider": name}
        if provider is None:
            log.warn("push_failed: {provider} is not configured on this server", event="push_failed",
                     status=0, reason="not_configured", **fields)
            self.stats[name, "failed"] += 1
            return Dispatched(PushResult(Outcome.RETRY, 0, "not_configured"), 0)
        breaker = self.breakers[name]
        settings = self.settings
        sends = 0
        while True:
            if self._closing:
                return Dispatched(PushResult(Outcome.RETRY, 0, "shutting_down"), sends)
            if not breaker.admit():
                self.stats[name, "circuit_open"] += 1
                log.info("push_failed: the {provider} circuit is open", event="push_failed", status=0,
                         reason="circuit_open", **fields)
                return Dispatched(PushResult(Outcome.RETRY, 0, "circuit_open",
                                             max(breaker.reopens_in(), settings.backoff_base_s)), sends)
            result = await self._slots.run(self._attempt, provider, target, note)
            sends += 1
            opened = breaker.record(result.outcome is not Outcome.RETRY)
            if opened:
                log.warn("the {provider} circuit opened after {count} failures in a row",
                         provider=name, count=breaker.consecutive, reason=result.reason)
            fields_now = {**fields, "status": result.status, "reason": result.reason}
            if result.outcome is Outcome.SENT:
                self.stats[name, "sent"] += 1
                log.info("push_sent to {node_id} through {provider}", event="push_sent", sends=sends,
                         **fields_now)
                return Dispatched(result, sends)
            if result.outcome is not Outcome.RETRY:
                self.stats[name, "failed"] += 1
                log.info("push_failed to {node_id} through {provider}: {reason}", event="push_failed",
                         **fields_now)
                return Dispatched(result, sends)
            wait = self.backoff_s(sends)
            if result.retry_after_s is not None:
                wait = max(wait, result.retry_after_s)
            if sends >= settings.max_attempts or wait > settings.backoff_cap_s:
                self.stats[name, "failed"] += 1
                log.info("push_failed to {node_id} through {provider} after {sends} sends: {reason}",
                         event="push_failed", sends=sends, **fields_now)
                return Dispatched(result, sends)
            self.stats[name, "retried"] += 1
            log.info("push_retried to {node_id} through {provider} in {wait:.2f} s: {reason}",
                     event="push_retried", wait=wait, sends=sends, **fields_now)
            await deferLater(self.clock, wait)

    def _attempt(self, provider: Provider, target: PushTarget, note: Notification) -> Deferred[PushResult]:
        """One request, cut off (cancelled) after ``timeout_s``."""
        try:
            d = provider.send(target, note)
        except Exception:
            log.failure("the {provider} provider raised", provider=target.provider, node_id=note.node_id)
            return succeed(PushResult(Outcome.RETRY, 0, "provider_error"))
        d.addTimeout(self.settings.timeout_s, self.clock)

        def failed(failure: Failure) -> PushResult:
            if failure.check(TimeoutError):
                self.stats[target.provider, "timeout"] += 1
                return PushResult(Outcome.RETRY, 0, "timeout")
            log.failure("the {provider} provider failed a send", failure, provider=target.provider,
                        node_id=note.node_id)
            return PushResult(Outcome.RETRY, 0, "provider_error")

        return d.addErrback(failed)

    def close(self) -> Deferred[Any]:
        """Stop retrying; close every provider's connections."""
        self._closing = True
        closing = []
        for name, provider in self.providers.items():
            try:
                closing.append(provider.close())
            except Exception:
                log.failure("closing the {provider} provider failed", provider=name)
        return DeferredList(closing, consumeErrors=True)
