"""Locations: which server holds each online node, known cluster-wide.

A **location** is one client connection: ``(node_id, server_id, epoch)``
(:class:`allspark.store.LocationRecord`), the epoch numbering this server
process's connections.  The store holds them all (the truth); every server
keeps a cache (:class:`Locations`) that the mesh reads to forward copies
(:meth:`allspark.mesh.Mesh.holds`, :meth:`~allspark.mesh.Mesh.forward`).

How the cache stays fresh (:class:`LocationTracker`):

- **Connect**: the location is written to the store, then announced to every
  linked peer as a ``location`` peer frame (``online: true``), which each peer
  applies to its cache and acknowledges (``location_ack``).
  :meth:`LocationTracker.ready` fires when the store write is committed and
  every peer linked at that moment acknowledged (or after
  :data:`ANNOUNCE_TIMEOUT` seconds, or when a link drops: that peer reloads
  on link up).  **A sync waits for it** (``Server._sync``): a message
  committed after the sync read the store is delivered by a server that
  already knows the new location, so it arrives live; one committed before
  is in the sync.  This is the moving-client order (docs/delivery.md).
- **Disconnect**: the location is removed from the store and announced
  (``online: false``, no acknowledgement needed).
- **Link up**: the peer's locations are reloaded from the store (frames that
  arrive while the read is in flight are replayed over its result).
- **Dead or restarted servers**: a server drops its own locations from the
  store when it starts (a restart, even after ``kill -9``); every
  :data:`SWEEP_INTERVAL` s each server drops from its cache, and from the
  store, the locations of servers the cluster view says are dead.
- **Stale entries**: a ``deliver`` forwarded to a server that no longer
  holds the node is answered ``delivered`` with ``missing``; the sender drops
  that (node, server) pair.  The receiver never forwards (no loops).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall

from allspark.logs import logger
from allspark.store import LocationRecord, Store

if TYPE_CHECKING:
    from allspark.mesh import Mesh

log = logger(__name__)

#: Seconds a connection's sync waits at most for its peers to acknowledge its location.
ANNOUNCE_TIMEOUT = 2.0
#: Seconds between sweeps of dead servers' locations.
SWEEP_INTERVAL = 3.0
#: Test hook: seconds to hold back each ``online`` announcement (reproduces
#: the moving-client race in tests/e2e/test_locations.py); never set in production.
ANNOUNCE_DELAY_ENV = "ALLSPARK_TEST_ANNOUNCE_DELAY"


class Locations:
    """The in-memory cache: node_id -> server_id -> the epochs of its
    connections there.  A node may be connected to several servers."""

    def __init__(self) -> None:
        self._nodes: dict[str, dict[str, set[int]]] = {}

    def add(self, node_id: str, server_id: str, epoch: int) -> None:
        """Note one connection of ``node_id`` on ``server_id``."""
        self._nodes.setdefault(node_id, {}).setdefault(server_id, set()).add(epoch)

    def remove(self, node_id: str, server_id: str, epoch: int) -> None:
        """Forget one connection (another epoch of the node stays)."""
        servers = self._nodes.get(node_id)
        if servers is None:
            return
        epochs = servers.get(server_id)
        if epochs is not None:
            epochs.discard(epoch)
            if not epochs:
                del servers[server_id]
        if not servers:
            del self._nodes[node_id]

    def drop_node_at(self, node_id: str, server_id: str) -> None:
        """Forget every connection of ``node_id`` on ``server_id`` (it said
        the node is missing there)."""
        servers = self._nodes.get(node_id)
        if servers is not None and servers.pop(server_id, None) is not None and not servers:
            del self._nodes[node_id]

    def drop_server(self, server_id: str) -> int:
        """Forget every location on ``server_id``; how many nodes it held."""
        dropped = 0
        for node_id in [n for n, servers in self._nodes.items() if server_id in servers]:
            self.drop_node_at(node_id, server_id)
            dropped += 1
        return dropped

    def replace_server(self, server_id: str, records: Iterable[LocationRecord]) -> None:
        """Make the cache's locations on ``server_id`` exactly ``records``'s."""
        self.drop_server(server_id)
        for r in records:
            if r.server_id == server_id:
                self.add(r.node_id, r.server_id, r.epoch)

    def servers_of(self, node_id: str) -> Iterable[str]:
        """The servers holding a connection of ``node_id``."""
        servers = self._nodes.get(node_id)
        return servers.keys() if servers else ()

    def server_ids(self) -> set[str]:
        """Every server the cache names."""
        return {s for servers in self._nodes.values() for s in servers}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    # dict-like shorthands (one connection, epoch 0), for tests and tools
    def __setitem__(self, node_id: str, server_id: str) -> None:
        self.add(node_id, server_id, 0)

    def update(self, mapping: dict[str, str]) -> None:
        """``self[node_id] = server_id`` for each item of ``mapping``."""
        for node_id, server_id in mapping.items():
            self[node_id] = server_id

    def get(self, node_id: str, default: str | None = None) -> str | None:
        """One server holding ``node_id`` (the first noted), or ``default``."""
        return next(iter(self.servers_of(node_id)), default)


class LocationTracker:
    """This server's side of the locations: writes and announces its
    connections' locations, applies its peers' announcements to the mesh's
    cache, reloads a peer's on link up, and sweeps dead servers' away.

    ``cluster`` (an :class:`allspark.cluster.ClusterRecords`, or None):
    ``servers`` and ``alive(record)`` say which servers are dead.
    """

    def __init__(self, server_id: str, store: Store, mesh: "Mesh", clock: Any, cluster: Any = None,
                 announce_timeout: float = ANNOUNCE_TIMEOUT, sweep_interval: float = SWEEP_INTERVAL) -> None:
        self.server_id = server_id
        self.store = store
        self.mesh = mesh
        self.clock = clock
        self.cluster = cluster
        self.announce_timeout = announce_timeout
        self.sweep_interval = sweep_interval
        self.announce_delay = float(os.environ.get(ANNOUNCE_DELAY_ENV) or 0)
        self._epochs = 0
        #: connection -> its location and the Deferred its sync waits for
        self._connections: dict[Any, tuple[LocationRecord, Deferred[None]]] = {}
        #: peers whose reload is in flight -> the frames that came meanwhile
        self._reloading: dict[str, list[tuple[str, int, bool]]] = {}
        self._swept: set[tuple[str, int]] = set()
        self._sweep: LoopingCall | None = None
        mesh.on_location = self.peer_location
        mesh.on_link_up.append(self._reload_on_link_up)

    # -- life cycle ------------------------------------------------------------
    def start(self) -> Deferred[int]:
        """Drop this server id's old locations (a restart) and start the sweep;
        fires with how many were dropped.  Call before taking connections."""
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = self.clock
        self._sweep.start(self.sweep_interval, now=False).addErrback(
            lambda f: log.failure("the location sweep stopped", f))
        d = self.store.drop_locations(self.server_id)

        def dropped(count: int) -> int:
            if count:
                log.info("dropped {count} locations left by a previous process of {server_id}",
                         count=count, server_id=self.server_id)
            return count

        return d.addCallback(dropped)

    def stop(self) -> None:
        """Stop the sweep."""
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()

    # -- this server's connections ------------------------------------------------
    def connected(self, conn: Any) -> Deferred[None]:
        """A client connection opened: write its location, then announce it;
        fires (never fails) when :meth:`ready` would."""
        self._epochs += 1
        record = LocationRecord(conn.node_id, self.server_id, self._epochs)
        ready: Deferred[None] = Deferred()
        self._connections[conn] = (record, ready)

        def announce(_: object) -> Deferred[None]:
            if self.announce_delay:
                from twisted.internet.task import deferLater

                held: Deferred[None] = deferLater(self.clock, self.announce_delay, lambda: None)
                return held.addCallback(lambda _: self._announce_online(conn, record))
            return self._announce_online(conn, record)

        def failed(failure: Any) -> None:
            log.failure("could not write the location of {node_id}", failure, node_id=record.node_id)

        def settle(_: object) -> None:
            if not ready.called:
                ready.callback(None)

        self.store.put_location(record).addCallback(announce).addErrback(failed).addBoth(settle)
        return ready

    def _announce_online(self, conn: Any, record: LocationRecord) -> Deferred[None]:
        if conn not in self._connections:
            return succeed(None)  # gone before it was announced: the removal follows
        return self.mesh.announce_location(record.node_id, record.epoch, True, self.announce_timeout)

    def ready(self, conn: Any) -> Deferred[None]:
        """Fires once ``conn``'s location is in the store and every peer linked
        when it was announced has it (or :data:`ANNOUNCE_TIMEOUT` passed)."""
        entry = self._connections.get(conn)
        return succeed(None) if entry is None else entry[1]

    def disconnected(self, conn: Any) -> None:
        """A client connection closed: remove its location and announce it."""
        entry = self._connections.pop(conn, None)
        if entry is None:
            return
        record = entry[0]
        self.mesh.announce_location(record.node_id, record.epoch, False)
        self.store.remove_location(record).addErrback(
            lambda f: log.failure("could not remove the location of {node_id}", f, node_id=record.node_id))

    # -- peers ---------------------------------------------------------------------
    def peer_location(self, peer_id: str, node_id: str, epoch: int, online: bool) -> None:
        """A peer announced a connection of ``node_id`` opening or closing."""
        journal = self._reloading.get(peer_id)
        if journal is not None:
            journal.append((node_id, epoch, online))
        self._apply(peer_id, node_id, epoch, online)

    def _apply(self, peer_id: str, node_id: str, epoch: int, online: bool) -> None:
        if online:
            self.mesh.locations.add(node_id, peer_id, epoch)
        else:
            self.mesh.locations.remove(node_id, peer_id, epoch)

    def _reload_on_link_up(self, peer_id: str) -> None:
        self.reload(peer_id)

    def reload(self, peer_id: str) -> Deferred[None]:
        """A link to ``peer_id`` came up: read its locations from the store
        (what it announced while unlinked was not heard here)."""
        self._reloading[peer_id] = []

        def loaded(records: list[LocationRecord]) -> None:
            journal = self._reloading.pop(peer_id, [])
            self.mesh.locations.replace_server(peer_id, records)
            for node_id, epoch, online in journal:
                self._apply(peer_id, node_id, epoch, online)
            log.debug("loaded {count} locations of peer {peer_id}", peer_id=peer_id,
                      count=sum(1 for r in records if r.server_id == peer_id))

        def failed(failure: Any) -> None:
            self._reloading.pop(peer_id, None)
            log.failure("could not load the locations of peer {peer_id}", failure, peer_id=peer_id)

        return self.store.list_locations().addCallbacks(loaded, failed)

    def sweep(self) -> Deferred[Any] | None:
        """Drop the locations of servers the cluster view says are dead: from
        the cache, and once per dead record from the store."""
        cluster = self.cluster
        if cluster is None:
            return None
        servers = dict(cluster.servers)
        if self.server_id not in servers:
            return None  # the cluster view is not read yet (or this record was lost): judge nothing
        alive = {sid for sid, r in servers.items() if cluster.alive(r)}
        alive.add(self.server_id)
        for server_id in self.mesh.locations.server_ids() - alive:
            count = self.mesh.locations.drop_server(server_id)
            log.info("dropped {count} cached locations of dead server {dead}", count=count, dead=server_id)
        drops = []
        for server_id, record in servers.items():
            key = (server_id, record.heartbeat_ms)
            if server_id not in alive and key not in self._swept:
                self._swept.add(key)
                drops.append(self.store.drop_locations(server_id).addErrback(self._drop_failed, server_id))
        return DeferredList(drops) if drops else None

    @staticmethod
    def _drop_failed(failure: Any, server_id: str) -> None:
        log.failure("could not drop the locations of {dead}", failure, dead=server_id)
