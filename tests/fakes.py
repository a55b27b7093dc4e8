"""Fakes shared by unit tests: the one fake connection (docs/architecture.md, Seams)."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import Deferred, succeed


class FakeConnection:
    """A live connection for the registry, router, inbox and sessions
    (:class:`allspark.registry.Connection`): it records each frame it is
    sent, as sent (``raw``) and parsed (``frames``), and never blocks.

    ``queued`` is what :attr:`queued_bytes` reports (0 unless a test sets
    it, e.g. to play a slow reader); :meth:`when_drained` fires once a test
    lowers it far enough.
    """

    def __init__(self, node_id: str, client_id: str | None = None) -> None:
        self.node_id = node_id
        self.client_id = client_id
        self.raw: list[bytes] = []
        self.frames: list[Any] = []
        self._queued = 0
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def send(self, frame: bytes) -> None:
        self.raw.append(frame)
        self.frames.append(orjson.loads(frame))

    def clear(self) -> None:
        """Forget the frames sent so far."""
        self.raw.clear()
        self.frames.clear()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def queued(self) -> int:
        """The bytes this connection pretends wait in its send queue."""
        return self._queued

    @queued.setter
    def queued(self, value: int) -> None:
        self._queued = value
        waiting, self._waiting = self._waiting, []
        for below, d in waiting:
            if value <= below:
                d.callback(None)
            else:
                self._waiting.append((below, d))

    def when_drained(self, below: int) -> Deferred[None]:
        if self._queued <= below:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((below, d))
        return d
