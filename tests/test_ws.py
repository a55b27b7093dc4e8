"""The client socket without a network: a failure while opening is logged
and the connection dropped, never left half-open."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from allspark.auth import Identity
from allspark.registry import Registry
from allspark.metrics import FrameCounts
from allspark.ws import ClientProtocol, SocketLimits


class FakeTransport:
    """Just the producer calls ``onOpen`` makes."""

    def __init__(self) -> None:
        self.producer: Any = None

    def unregisterProducer(self) -> None:
        self.producer = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer


class OnOpenTests(unittest.SynchronousTestCase):
    def build(self, on_connected: Any) -> tuple[ClientProtocol, SimpleNamespace, list[bool]]:
        server = SimpleNamespace(
            registry=Registry(),
            clock=Clock(),
            config=SimpleNamespace(server_id="s1", max_connections_per_node=10),
            on_connected=on_connected,
            on_disconnected=lambda conn: None,
        )
        protocol = ClientProtocol()
        protocol.factory = SimpleNamespace(app=server, limits=SocketLimits(),  # type: ignore[assignment]
                                           counts=FrameCounts())
        protocol.transport = FakeTransport()
        protocol.state = ClientProtocol.STATE_OPEN
        protocol.identity = Identity("alice", None)
        protocol.node_id, protocol.client_id = "alice", None
        sent: list[bytes] = []
        protocol.sendMessage = lambda payload, *a, **kw: sent.append(payload)  # type: ignore[method-assign]
        drops: list[bool] = []
        protocol.dropConnection = lambda abort=False: drops.append(abort)  # type: ignore[method-assign]
        return protocol, server, drops

    def test_open_registers_and_says_hello(self) -> None:
        protocol, server, drops = self.build(lambda conn: None)
        protocol.onOpen()
        self.assertEqual(server.registry.connections("alice"), [protocol])
        self.assertIs(protocol.transport.producer, protocol)
        self.assertEqual(drops, [])

    def test_failure_in_open_is_logged_and_the_connection_dropped(self) -> None:
        def broken(conn: Any) -> None:
            raise RuntimeError("boom")

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol, server, drops = self.build(broken)
        protocol.onOpen()  # does not raise into Autobahn's Deferred
        self.assertEqual(drops, [True])
        self.assertFalse(server.registry.is_online("alice"))
        failures = [e for e in events if e.get("log_level") == LogLevel.critical and "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)

    def test_close_fails_what_waits_for_the_queue_to_drain(self) -> None:
        """A sync waiting for a slow reader's queue to drain ends when the
        connection closes (it would otherwise wait forever)."""
        protocol, server, drops = self.build(lambda conn: None)
        protocol.onOpen()
        protocol.pauseProducing()
        protocol.send(b"x" * 100)
        waiting = protocol.when_drained(10)
        self.assertNoResult(waiting)
        protocol.closedByMe = protocol.droppedByMe = False  # Autobahn's close bookkeeping
        protocol.localCloseCode = protocol.remoteCloseCode = None
        protocol.onClose(False, 1006, "gone")
        self.failureResultOf(waiting, ConnectionDone)
