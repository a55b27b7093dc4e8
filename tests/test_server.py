"""The identity claim (one running server per (host_address, port) and data
dir) and what a failed start does."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial import unittest

from allspark import server as server_module
from allspark.cluster import ClusterRecords, new_holder
from allspark.server import IdentityClaim, ServerService
from allspark.store import ServerRecord
from allspark.store import StoreError


class IdentityClaimTests(unittest.SynchronousTestCase):
    def claim_file(self, pid: int | None) -> IdentityClaim:
        data_dir = tempfile.mkdtemp(prefix="allspark-claim-")
        self.addCleanup(shutil.rmtree, data_dir)
        claim = IdentityClaim(data_dir, "127.0.0.1", 8080, "127.0.0.1:8080")
        if pid is not None:
            with open(claim.path, "w") as f:
                json.dump({"pid": pid, "server_id": "127.0.0.1:8080"}, f)
        return claim

    def test_fresh_claim_and_clean_release(self) -> None:
        claim = self.claim_file(None)
        claim.claim(force=False)
        with open(claim.path) as f:
            self.assertEqual(json.load(f)["pid"], os.getpid())
        claim.release()
        self.assertFalse(os.path.exists(claim.path))

    def test_a_crashed_claim_needs_force(self) -> None:
        claim = self.claim_file(2**22 + 12345)  # no such process
        with self.assertRaises(RuntimeError) as refused:
            claim.claim(force=False)
        self.assertIn("--force", str(refused.exception))
        claim.claim(force=True)

    def test_a_pid_reused_by_another_program_is_not_a_live_server(self) -> None:
        claim = self.claim_file(1)  # pid 1 is alive, and it is not allspark
        with self.assertRaises(RuntimeError) as refused:
            claim.claim(force=False)
        self.assertIn("--force", str(refused.exception))
        claim.claim(force=True)


class FakeReactor:
    """The parts of the reactor ServerService uses when a start fails."""

    def __init__(self) -> None:
        self.running = True
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1

    def callWhenRunning(self, fn: Any) -> None:
        fn()


class SlowStore:
    """A store whose start() the test fails or finishes by hand."""

    def __init__(self) -> None:
        self.starting: Deferred[None] = Deferred()
        self.closed = 0

    def start(self) -> Deferred[None]:
        return self.starting

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)


class FailedStartTests(unittest.SynchronousTestCase):
    """A start that fails exits with status 1 and one line on stderr, having
    given back the identity claim (e2e: tests/e2e/test_operator.py)."""

    def service(self) -> tuple[ServerService, SlowStore, FakeReactor, list[int], list[str]]:
        data_dir = tempfile.mkdtemp(prefix="allspark-start-")
        self.addCleanup(shutil.rmtree, data_dir)
        store = SlowStore()
        config = SimpleNamespace(data_dir=data_dir, host="127.0.0.1", port=8080, server_id="127.0.0.1:8080",
                                 force=False, listen=("tcp:8080:interface=127.0.0.1",))
        reactor = FakeReactor()
        cluster = ClusterRecords(store, ServerRecord("127.0.0.1:8080", new_holder(), "127.0.0.1", 8080, None, "ws",
                                                     10, 0, "live", 0, 0), reactor, lambda: 0, lambda: "live")
        service = ServerService(SimpleNamespace(config=config, store=store, cluster=cluster),  # type: ignore[arg-type]
                                None, reactor)
        statuses: list[int] = []
        service.exit_status_on_failure = statuses.append
        said: list[str] = []
        self.patch(server_module, "say_on_stderr", said.append)
        return service, store, reactor, statuses, said

    def test_a_store_failing_later_stops_the_reactor_with_status_1(self) -> None:
        service, store, reactor, statuses, said = self.service()
        service.startService()
        self.assertTrue(os.path.exists(service.claim.path))
        store.starting.errback(StoreError("could not open 'x.db': locked by another process for 30s"))
        self.assertEqual(said, ["allspark: cannot start: cannot open the store: could not open 'x.db': "
                                "locked by another process for 30s"])
        self.assertEqual(statuses, [1])
        self.assertEqual(reactor.stops, 1)  # stopping runs stopService, which releases the claim

    def test_a_store_failing_at_once_is_refused_and_gives_the_claim_back(self) -> None:
        service, store, reactor, statuses, said = self.service()
        store.starting.errback(StoreError("'x.db' has schema version 999, newer than this code's 3"))
        with self.assertRaises(server_module.StartRefused):
            service.startService()
        self.assertEqual(said, ["allspark: cannot start: cannot open the store: 'x.db' has schema version "
                                "999, newer than this code's 3"])
        self.assertFalse(os.path.exists(service.claim.path))
        self.assertEqual(store.closed, 1)
        self.assertEqual((statuses, reactor.stops), ([], 0))

    def test_a_claim_held_by_a_crash_is_one_line_and_status_1(self) -> None:
        service, store, reactor, statuses, said = self.service()
        with open(service.claim.path, "w") as f:
            json.dump({"pid": 2**22 + 12345, "server_id": "127.0.0.1:8080"}, f)
        with self.assertRaises(server_module.StartRefused):
            service.startService()
        self.assertEqual(len(said), 1)
        self.assertIn("start with --force", said[0])
        self.assertTrue(os.path.exists(service.claim.path))  # the crashed server's claim stays


class DataModeTests(unittest.SynchronousTestCase):
    def test_claim_file_and_data_dir_are_private(self) -> None:
        parent = tempfile.mkdtemp(prefix="allspark-claim-")
        self.addCleanup(shutil.rmtree, parent)
        previous = os.umask(0o022)
        try:
            claim = IdentityClaim(os.path.join(parent, "data"), "127.0.0.1", 8080, "127.0.0.1:8080")
            claim.claim(force=False)
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE(os.stat(claim.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(claim.path)).st_mode), 0o700)


class _PipeLink:
    """An open peer link in memory: a frame sent on it is handled at once by
    the other mesh, as if it came over the socket (``up`` false: a cut link
    that loses what is sent)."""

    direction = "out"

    def __init__(self, to_mesh: Any, peer_id: str, from_id: str) -> None:
        self.to_mesh = to_mesh
        self.peer_id = peer_id
        self.from_id = from_id
        self.up = True

    def send(self, frame: bytes) -> None:
        from allspark.mesh import decode_peer_frame

        if self.up:
            self.to_mesh.handle(SimpleNamespace(peer_id=self.from_id, send=lambda f: None),
                                decode_peer_frame(frame))

    def close(self, code: int, reason: str) -> None:
        self.up = False


class ShareCachesTests(unittest.TestCase):
    """Two servers on one store with their meshes joined in memory: a
    membership change on one is seen by the other at once (the e2e form is
    tests/e2e/test_mesh.py, SessionCacheAcrossServers)."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from allspark.auth import AuthKeyVerifier, ValidationTokens
        from allspark.mesh import Mesh
        from allspark.server import Server, ServerConfig
        from allspark.store.memory import MemoryStore

        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        store = MemoryStore()
        self.servers: dict[str, Any] = {}
        for sid in ("a", "b"):
            config = ServerConfig(server_id=sid, host="127.0.0.1", port=1, listen=())
            server = Server(config, store, AuthKeyVerifier([b"secret"]),
                            ValidationTokens(b"k" * 32, sid, self.clock), self.clock)
            server.new_sessions()
            mesh = Mesh(sid, b"cluster-secret", self.clock, lambda: succeed([]), server.delivery.deliver_local)
            server.mesh = mesh
            server.share_caches(mesh)
            self.servers[sid] = server
        self.a_to_b = _PipeLink(self.servers["b"].mesh, "b", "a")
        self.servers["a"].mesh.link_up(self.a_to_b)
        self.servers["b"].mesh.link_up(_PipeLink(self.servers["a"].mesh, "a", "b"))

    def op(self, server: str, caller: str, op: str, **args: Any) -> Any:
        from twisted.internet.defer import ensureDeferred

        from allspark.envelope import Control
        from allspark.router import Sender

        sessions = self.servers[server].sessions
        return ensureDeferred(sessions.control(Sender(caller, None), Control(op, None, args)))

    def members_seen_by(self, server: str) -> set[str]:
        info = self.successResultOf(self.op(server, "owner", "get_session_info", session_id="s1"))
        return {m["name"] for m in info["members"]}

    def test_a_member_removed_on_one_server_is_gone_on_the_other_at_once(self) -> None:
        self.successResultOf(self.op("a", "owner", "create_session", session_id="s1"))
        self.successResultOf(self.op("a", "owner", "join_session", session_id="s1", node_id="m"))
        self.assertEqual(self.members_seen_by("b"), {"owner", "m"})  # now cached on b
        self.successResultOf(self.op("a", "owner", "unjoin_session", session_id="s1", node_id="m"))
        self.assertEqual(self.members_seen_by("b"), {"owner"})

    def test_a_change_missed_while_the_link_was_down_is_dropped_when_it_comes_up(self) -> None:
        self.successResultOf(self.op("a", "owner", "create_session", session_id="s1"))
        self.successResultOf(self.op("a", "owner", "join_session", session_id="s1", node_id="m"))
        self.assertEqual(self.members_seen_by("b"), {"owner", "m"})
        self.a_to_b.up = False  # the link is cut: the invalidation is lost
        self.successResultOf(self.op("a", "owner", "unjoin_session", session_id="s1", node_id="m"))
        self.assertEqual(self.members_seen_by("b"), {"owner", "m"})  # stale, within the ttl
        self.servers["b"].mesh.link_up(_PipeLink(self.servers["a"].mesh, "a", "b"))  # relinked
        self.assertEqual(self.members_seen_by("b"), {"owner"})
