"""Server records, the identity claim across hosts and the balancer, on the
memory store and a fake clock (tests/e2e/test_cluster.py runs real processes)."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.cluster import (
    AdminAuth,
    AdminAuthError,
    ClaimRefused,
    ClusterRecords,
    admin_token,
    derive_admin_key,
    new_holder,
    pre_connection_url,
)
from allspark.mesh import PeerAuth, derive_peer_key
from allspark.store import ServerRecord
from allspark.store.memory import MemoryStore


def record(server_id: str, holder: str = "elsewhere/1/a", **fields: object) -> ServerRecord:
    base = ServerRecord(server_id, holder, "127.0.0.1", 8000, None, "ws", 100, 0, "live", 0, 0)
    return replace(base, **fields)  # type: ignore[arg-type]


class ClusterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.connections = 0
        self.state = "live"

    def records(self, server_id: str = "a", capacity: int = 100, proxy: str | None = None) -> ClusterRecords:
        identity = ServerRecord(server_id, new_holder(), "127.0.0.1", 8001, proxy, "ws", capacity, 0, "live", 0, 0)
        return ClusterRecords(self.store, identity, self.clock, lambda: self.connections, lambda: self.state,
                              heartbeat_s=2.0, dead_after_s=10.0)

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def put(self, rec: ServerRecord) -> None:
        self.assertTrue(self.successResultOf(self.store.put_server(rec, None)))

    def claim(self, cluster: ClusterRecords, force: bool = False) -> None:
        self.successResultOf(ensureDeferred(cluster.claim(force)))

    def refused(self, cluster: ClusterRecords, force: bool = False) -> str:
        return str(self.failureResultOf(ensureDeferred(cluster.claim(force)), ClaimRefused).value)

    # -- the claim -----------------------------------------------------------
    def test_claim_heartbeat_and_clean_release(self) -> None:
        cluster = self.records()
        self.claim(cluster)
        cluster.start_heartbeat()
        self.connections = 7
        self.clock.advance(2)
        stored = self.successResultOf(self.store.get_server("a"))
        assert stored is not None
        self.assertEqual((stored.connections, stored.heartbeat_ms, stored.state), (7, self.now_ms(), "live"))
        self.successResultOf(ensureDeferred(cluster.release()))
        self.assertIsNone(self.successResultOf(self.store.get_server("a")))
        self.claim(self.records())  # released: a new start needs no --force

    def test_a_live_holder_on_another_host_refuses_even_with_force(self) -> None:
        self.put(record("a", "other-host/42/x", heartbeat_ms=self.now_ms() - 3000))
        self.assertIn("held by a live server", self.refused(self.records(), force=True))

    def test_a_crashed_holder_elsewhere_needs_force_after_the_dead_time(self) -> None:
        self.put(record("a", "other-host/42/x", heartbeat_ms=self.now_ms() - 10_001))
        self.assertIn("start with --force", self.refused(self.records()))
        cluster = self.records()
        self.claim(cluster, force=True)
        self.assertEqual(self.successResultOf(self.store.get_server("a")).holder,  # type: ignore[union-attr]
                         cluster.identity.holder)

    def test_a_holder_on_this_host_is_judged_by_its_pid(self) -> None:
        dead_pid = 2**22 + 12345  # above pid_max: never running
        self.put(record("a", f"{socket.gethostname()}/{dead_pid}/x", heartbeat_ms=self.now_ms()))
        self.assertIn("start with --force", self.refused(self.records()))
        self.claim(self.records(), force=True)  # at once, though its heartbeat is fresh

    def test_a_taken_identity_stops_the_old_holder(self) -> None:
        old = self.records()
        self.claim(old)
        lost: list[bool] = []
        old.on_lost = lambda: lost.append(True)
        current = self.successResultOf(self.store.get_server("a"))
        assert current is not None
        self.assertTrue(self.successResultOf(self.store.put_server(replace(current, holder="x/1/y"),
                                                                   current.holder)))
        self.successResultOf(ensureDeferred(old.beat()))
        self.assertEqual((lost, old.held), ([True], False))

    # -- the balancer --------------------------------------------------------
    def test_pick_spreads_a_burst_by_load_relative_to_capacity(self) -> None:
        cluster = self.records("a", capacity=100)
        self.claim(cluster)
        now = self.now_ms()
        self.put(record("b", heartbeat_ms=now, capacity=100, connections=10))
        self.put(record("c", heartbeat_ms=now, capacity=200, connections=10))
        self.successResultOf(ensureDeferred(cluster.refresh()))
        picked = [cluster.pick().server_id for _ in range(90)]  # type: ignore[union-attr]
        counts = {s: picked.count(s) for s in "abc"}
        # equal final load: a (0 + n) / 100, b (10 + n) / 100, c (10 + n) / 200
        self.assertEqual(counts, {"a": 28, "b": 18, "c": 44})  # loads .28, .28, .27

    def test_draining_and_dead_servers_are_never_picked(self) -> None:
        cluster = self.records("a")
        self.claim(cluster)
        now = self.now_ms()
        self.put(record("b", heartbeat_ms=now, state="draining"))
        self.put(record("c", heartbeat_ms=now - 10_001))
        self.put(record("d", heartbeat_ms=now, connections=99))
        self.successResultOf(ensureDeferred(cluster.refresh()))
        self.assertEqual({cluster.pick().server_id for _ in range(120)}, {"a", "d"})  # type: ignore[union-attr]
        self.state = "draining"
        self.assertEqual(cluster.pick().server_id, "d")  # type: ignore[union-attr]
        self.assertIsNone(cluster.pick(exclude="d"))
        states = {v["server_id"]: v["state"] for v in cluster.view()}
        self.assertEqual(states, {"a": "draining", "b": "draining", "c": "dead", "d": "live"})

    def test_need_proxy_picks_only_servers_with_a_proxy_address(self) -> None:
        cluster = self.records("a")
        self.claim(cluster)
        self.put(record("b", heartbeat_ms=self.now_ms(), connections=50, proxy_address="wss://chat.example.com",
                        scheme="wss", port=8443))
        self.successResultOf(ensureDeferred(cluster.refresh()))
        target = cluster.pick(need_proxy=True)
        assert target is not None
        self.assertEqual(target.server_id, "b")
        self.assertEqual(pre_connection_url(target), "https://127.0.0.1:8443")


class AdminAuthTests(unittest.SynchronousTestCase):
    SECRET = b"cluster-secret-0123456789"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.auth = AdminAuth(derive_admin_key(self.SECRET), "srv-a", self.clock)

    def refused(self, token: object, code: str) -> None:
        with self.assertRaises(AdminAuthError) as caught:
            self.auth.verify(token, "drain")
        self.assertEqual(caught.exception.code, code, caught.exception.message)

    def token(self, server_id: str = "srv-a", op: str = "drain", key: bytes | None = None) -> str:
        return admin_token(key or derive_admin_key(self.SECRET), op, server_id, self.clock.seconds())

    def test_a_token_drains_once(self) -> None:
        token = self.token()
        self.auth.verify(token, "drain")
        self.refused(token, "replayed_token")

    def test_refusals(self) -> None:
        self.refused(None, "bad_token")
        self.refused("x.y.z", "bad_token")
        self.refused(self.token(key=derive_admin_key(b"another-secret-0123456789")), "bad_token")
        self.refused(self.token(server_id="srv-b"), "foreign_token")
        self.refused(self.token(op="reboot"), "foreign_token")
        old = self.token()
        self.clock.advance(61)
        self.refused(old, "expired_token")
        before = admin_token(derive_admin_key(self.SECRET), "drain", "srv-a", self.auth.started_at - 1)
        self.refused(before, "expired_token")

    def test_no_peer_token_is_an_admin_token(self) -> None:
        peer = PeerAuth(derive_peer_key(self.SECRET), "srv-b", self.clock).token("srv-a")
        self.refused(peer, "bad_token")
