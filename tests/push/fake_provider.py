"""A scripted push provider for the dispatcher, scheduler and config tests."""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping

from twisted.internet.defer import Deferred, succeed

from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget

SENT = PushResult(Outcome.SENT, 200)
HANG = "hang"


class FakeProvider:
    """Answers each send with the next scripted :class:`PushResult` (or
    :data:`HANG`: a Deferred that never fires on its own), then
    :attr:`default`.  Records every send (``sent``), the hung Deferreds
    (``pending``) and how many were cancelled."""

    def __init__(self, name: str = "fake", *script: PushResult | str) -> None:
        self.name = name
        self.script: deque[PushResult | str] = deque(script)
        self.default: PushResult | str = SENT
        self.sent: list[tuple[PushTarget, Notification]] = []
        self.pending: list[Deferred[PushResult]] = []
        self.cancelled = 0
        self.closed = False

    def send(self, target: PushTarget, note: Notification) -> Deferred[PushResult]:
        self.sent.append((target, note))
        answer = self.script.popleft() if self.script else self.default
        if answer == HANG:
            def cancel(_: Deferred[PushResult]) -> None:
                self.cancelled += 1

            d: Deferred[PushResult] = Deferred(cancel)
            self.pending.append(d)
            return d
        assert isinstance(answer, PushResult)
        return succeed(answer)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def from_config(table: Mapping[str, Any], reactor: Any) -> FakeProvider:
    """``[fcm]`` pointed here by a test: ``name`` is the only key."""
    if set(table) - {"name"}:
        raise PushConfigError(f"[fake] has no key {sorted(set(table) - {'name'})[0]!r}")
    return FakeProvider(str(table.get("name", "fake")))
