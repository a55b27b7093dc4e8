"""This server's live client connections, by node_id.

A node may hold several connections at once (two tabs, a reconnect that
overlaps the old socket); a message for the node goes to each of them.
The registry knows nothing about sockets: a connection is anything with the
:class:`Connection` shape, so the router can be tested with fakes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class Connection(Protocol):
    """What the router needs from a live client connection."""

    node_id: str
    client_id: str | None

    def send(self, frame: bytes) -> None:
        """Queue ``frame`` for the client.  Never blocks; a connection whose
        bounded queue overflows closes itself."""

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted by :meth:`send` and not yet handed to the kernel."""

    def when_drained(self, below: int) -> Deferred[None]:
        """Fires once at most ``below`` bytes wait in the send queue (at once
        when that is already so); fails with
        :class:`~twisted.internet.error.ConnectionDone` if the connection
        closes first."""


class Registry:
    """node_id -> live connections on this server."""

    def __init__(self) -> None:
        self._by_node: dict[str, list[Connection]] = {}
        self._count = 0

    def add(self, conn: Connection) -> None:
        """Register an authenticated, open connection."""
        self._by_node.setdefault(conn.node_id, []).append(conn)
        self._count += 1

    def remove(self, conn: Connection) -> bool:
        """Forget a connection; whether it was registered."""
        conns = self._by_node.get(conn.node_id)
        if not conns or conn not in conns:
            return False
        conns.remove(conn)
        if not conns:
            del self._by_node[conn.node_id]
        self._count -= 1
        return True

    def connections(self, node_id: str) -> list[Connection]:
        """The live connections of ``node_id`` (empty when offline here)."""
        return self._by_node.get(node_id, [])

    def is_online(self, node_id: str) -> bool:
        """Whether ``node_id`` has a live connection on this server."""
        return node_id in self._by_node

    def send(self, node_id: str, frame: bytes) -> int:
        """Write ``frame`` to every live connection of ``node_id``; how many."""
        conns = self._by_node.get(node_id)
        if not conns:
            return 0
        targets = tuple(conns)  # a connection may leave while it is sent to
        for conn in targets:
            conn.send(frame)
        return len(targets)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Connection]:
        for conns in list(self._by_node.values()):
            yield from tuple(conns)

    def node_count(self) -> int:
        """How many distinct nodes are connected here."""
        return len(self._by_node)
