"""LocationTracker and the Locations cache, with MemoryStore, a Clock and a
mesh with no links (peer frames are driven by hand)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from allspark.locations import LocationTracker, Locations
from allspark.mesh import Mesh
from allspark.store import LocationRecord, ServerRecord
from allspark.store.memory import MemoryStore

SECRET = b"k" * 32


class Conn:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id


class FakeCluster:
    def __init__(self) -> None:
        self.servers: dict[str, ServerRecord] = {}
        self.dead: set[str] = set()

    def alive(self, record: ServerRecord) -> bool:
        return record.server_id not in self.dead


def record(server_id: str, heartbeat_ms: int = 1) -> ServerRecord:
    return ServerRecord(server_id, "h", "127.0.0.1", 1, None, "ws", 10, 0, "live", heartbeat_ms, 0)


class LocationsCacheTests(TestCase):
    def test_a_node_on_two_servers_and_its_removal_by_epoch(self) -> None:
        cache = Locations()
        cache.add("n", "a", 1)
        cache.add("n", "a", 2)
        cache.add("n", "b", 1)
        self.assertEqual(sorted(cache.servers_of("n")), ["a", "b"])
        cache.remove("n", "a", 1)
        self.assertEqual(sorted(cache.servers_of("n")), ["a", "b"])  # epoch 2 is still on a
        cache.drop_node_at("n", "b")
        cache.remove("n", "a", 2)
        self.assertNotIn("n", cache)
        self.assertEqual(list(cache.servers_of("n")), [])


class TrackerTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.mesh = Mesh("a", SECRET, self.clock, lambda: succeed([]), lambda ids, frame: 0)
        self.cluster = FakeCluster()
        self.tracker = LocationTracker("a", self.store, self.mesh, self.clock, self.cluster)

    def locations(self) -> list[LocationRecord]:
        return self.successResultOf(self.store.list_locations())

    def test_start_drops_what_a_previous_process_left(self) -> None:
        self.store.put_location(LocationRecord("ghost", "a", 5))
        self.store.put_location(LocationRecord("other", "b", 1))
        self.assertEqual(self.successResultOf(self.tracker.start()), 1)
        self.assertEqual(self.locations(), [LocationRecord("other", "b", 1)])
        self.tracker.stop()

    def test_a_connection_is_written_ready_and_removed(self) -> None:
        conn = Conn("n1")
        ready = self.tracker.connected(conn)
        self.assertIsNone(self.successResultOf(ready))  # no peers linked: ready once written
        self.assertEqual(self.locations(), [LocationRecord("n1", "a", 1)])
        self.tracker.disconnected(conn)
        self.assertEqual(self.locations(), [])
        self.assertIsNone(self.successResultOf(self.tracker.ready(conn)))

    def test_a_reload_keeps_announcements_heard_while_it_read(self) -> None:
        self.store.put_location(LocationRecord("stored", "b", 1))
        self.store.put_location(LocationRecord("gone", "b", 2))
        self.mesh.locations.add("stale", "b", 9)
        pending: Deferred[list[LocationRecord]] = Deferred()
        real = self.store.list_locations()
        self.store.list_locations = lambda: pending  # type: ignore[method-assign]
        self.tracker.reload("b")
        self.tracker.peer_location("b", "new", 3, True)  # heard while the read is in flight
        self.tracker.peer_location("b", "gone", 2, False)
        pending.callback(self.successResultOf(real))
        self.assertEqual(sorted(self.mesh.locations), ["new", "stored"])

    def test_the_sweep_judges_nothing_before_the_cluster_view_is_read(self) -> None:
        self.mesh.locations.add("on-b", "b", 1)
        self.assertIsNone(self.tracker.sweep())
        self.assertEqual(list(self.mesh.locations), ["on-b"])

    def test_the_sweep_drops_dead_servers_from_the_cache_and_the_store(self) -> None:
        self.cluster.servers["a"] = record("a")
        for server_id in ("b", "c"):
            self.cluster.servers[server_id] = record(server_id)
            self.store.put_location(LocationRecord(f"on-{server_id}", server_id, 1))
            self.mesh.locations.add(f"on-{server_id}", server_id, 1)
        self.cluster.dead.add("c")
        self.successResultOf(self.tracker.sweep())  # type: ignore[arg-type]
        self.assertEqual(list(self.mesh.locations), ["on-b"])
        self.assertEqual(self.locations(), [LocationRecord("on-b", "b", 1)])
        self.assertIsNone(self.tracker.sweep())  # the same dead record is dropped once

    def test_the_peer_answering_missing_corrects_the_cache(self) -> None:
        from allspark.mesh import PeerFrame

        class Link:
            peer_id = "b"

        self.mesh.locations.add("moved", "b", 1)
        self.mesh.handle(Link(), PeerFrame("delivered", {"id": 1, "missing": ["moved"]}))  # type: ignore[arg-type]
        self.assertNotIn("moved", self.mesh.locations)
