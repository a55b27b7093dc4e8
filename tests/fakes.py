"""Fakes shared by unit tests: a connection that records what it is sent."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import Deferred, succeed


class FakeConnection:
    """A live connection for the registry and router: it records each frame
    it is sent (``frames``, as bytes) and never blocks."""

    def __init__(self, node_id: str, client_id: str | None = None) -> None:
        self.node_id = node_id
        self.client_id = client_id
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    @property
    def queued_bytes(self) -> int:
        return 0

    def when_drained(self, below: int) -> Deferred[None]:
        return succeed(None)

    def decoded(self) -> list[dict[str, Any]]:
        """Every frame sent, parsed."""
        return [orjson.loads(f) for f in self.frames]
