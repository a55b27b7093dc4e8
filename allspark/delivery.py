"""The one delivery point: where a finished copy of a frame goes.

Every copy the server writes to a client (a stored message after its append,
an ephemeral copy, a session broadcast or event, a join notice) goes through
:class:`Delivery`.  For each recipient node it is, in this order:

1. written to the node's live connections on this server (the registry);
2. else handed to the :class:`RemoteRoute` (the mesh, when one is wired in):
   "write this frame to these node_ids", which another server holding them
   writes to its own sockets;
3. else nothing: a durable copy waits in the store for the node's next
   ``sync`` (the inbox and the sessions note such recipients for push
   notifications: ``allspark.push.scheduler``).

Delivery never stores anything and never fails the caller: the store is the
truth, a copy that cannot be written costs only that copy (logged), and the
client reads it on sync.  A frame that arrived from a peer is written with
:meth:`Delivery.deliver_local` only, never forwarded again, so no frame can
loop between servers whatever their records say.
"""

from __future__ import annotations

from collections import deque
from itertools import chain
from typing import Callable, Collection, Iterable, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from allspark.logs import logger
from allspark.registry import Registry

log = logger(__name__)

#: Local copies of one many-recipient delivery written per reactor turn.
FANOUT_SLICE = 500


class RemoteRoute(Protocol):
    """What the delivery point needs from the mesh (``allspark.mesh``).

    Implemented by the peer links; until they are wired in, ``Delivery.remote``
    is None and copies for nodes not connected here wait in the store.
    """

    def holds(self, node_id: str) -> bool:
        """Whether a live connection of ``node_id`` is on another live server
        (from the location cache: no I/O, answered at once)."""

    def located(self) -> Collection[str]:
        """Every node_id the location cache places on another server (a view,
        not a copy: it may hold nodes whose server has no link, which
        :meth:`holds` answers false for).  Lets :meth:`Delivery.live_among`
        walk the online nodes instead of a large session's members."""

    def forward(self, node_ids: Sequence[str], frame: bytes) -> None:
        """Have the servers holding ``node_ids`` write ``frame`` (already
        addressed, encoded once) to those nodes' connections there.  One
        peer frame per server, with its list of node_ids.  Never blocks and
        never raises: a forward that fails costs only latency (the copy is
        read on sync)."""


class _Pending:
    """One many-recipient delivery not yet fully written."""

    __slots__ = ("frame", "node_ids", "start", "done")

    def __init__(self, frame: bytes, node_ids: list[str], done: Deferred[None]) -> None:
        self.frame = frame
        self.node_ids = node_ids
        self.start = 0  # the next index of node_ids to write
        self.done = done


class Delivery:
    """Writes finished frames to recipients: here, through the mesh, or nowhere.

    ``registry``: this server's live connections.  ``clock``: schedules the
    slices of large deliveries.  ``remote``: the mesh's :class:`RemoteRoute`
    (assigned once the mesh exists; None means a single server).
    """

    #: Whether a node is live here or elsewhere (see :meth:`_is_live_anywhere`).
    #: Without a mesh it is the registry's own ``is_online``, bound directly:
    #: one Python call less per copy on the hot path.
    is_live: Callable[[str], bool]
    #: Write a frame to a node here, else through the mesh (see
    #: :meth:`_deliver_anywhere`); truthy when it went anywhere.  Without a
    #: mesh it is the registry's own ``send``, bound directly.
    deliver: Callable[[str, bytes], int]

    def __init__(self, registry: Registry, clock: IReactorTime, remote: RemoteRoute | None = None) -> None:
        self.registry = registry
        self.clock = clock
        self.remote = remote  # binds is_live and deliver
        # many-recipient deliveries not yet fully written, in the order asked for
        self._fanouts: deque[_Pending] = deque()
        self._fanout_scheduled = False

    @property
    def remote(self) -> RemoteRoute | None:
        """The mesh's :class:`RemoteRoute`, or None (a single server)."""
        return self._remote

    @remote.setter
    def remote(self, remote: RemoteRoute | None) -> None:
        self._remote = remote
        self.links_changed(remote is not None)

    def links_changed(self, linked: bool) -> None:
        """Called by the mesh whenever its links change: whether it has any.
        A mesh without a link holds no node and forwards nothing, so until
        one comes up ``is_live`` and ``deliver`` are the registry's own
        methods (the same answers, one Python call less per copy)."""
        if linked and self._remote is not None:
            self.is_live = self._is_live_anywhere
            self.deliver = self._deliver_anywhere
        else:
            self.is_live = self.registry.is_online
            self.deliver = self.registry.send

    # -- where a node is ---------------------------------------------------
    def _is_live_anywhere(self, node_id: str) -> bool:
        """Whether ``node_id`` has a live connection here or (with a mesh) on
        another server: what ``live`` in ``accepted`` counts (``is_live``
        once a mesh is wired in)."""
        if self.registry.is_online(node_id):
            return True
        remote = self._remote
        return remote is not None and remote.holds(node_id)

    def live_among(self, node_ids: Iterable[str], exclude: str | None = None) -> list[str]:
        """The nodes of ``node_ids`` (a collection, e.g. a session's members)
        that are live here or elsewhere, except ``exclude``.  It walks whichever
        is smaller: ``node_ids``, or the nodes connected here plus those the
        mesh places elsewhere, so a join to a 10,000-member session with few
        members online costs the online nodes, not the members."""
        registry = self.registry
        members = node_ids if isinstance(node_ids, (dict, set, frozenset)) else set(node_ids)
        remote = self.remote
        located: Collection[str] = remote.located() if remote is not None else ()
        is_live = self.is_live
        if registry.node_count() + len(located) < len(members):
            seen: set[str] = set()
            found = []
            for node_id in chain((conn.node_id for conn in registry), located):
                if node_id in members and node_id != exclude and node_id not in seen and is_live(node_id):
                    seen.add(node_id)
                    found.append(node_id)
            return found
        return [n for n in node_ids if n != exclude and is_live(n)]

    # -- writing -------------------------------------------------------------
    def _deliver_anywhere(self, node_id: str, frame: bytes) -> int:
        """Write ``frame`` (addressed to ``node_id``) to the node's connections
        here, else hand it to the mesh; truthy when it went anywhere
        (``deliver`` once a mesh is wired in)."""
        sent = self.registry.send(node_id, frame)
        if sent:
            return sent
        remote = self._remote
        if remote is not None and remote.holds(node_id):
            remote.forward((node_id,), frame)
            return 1
        return 0

    def deliver_local(self, node_ids: Sequence[str], frame: bytes) -> int:
        """Write ``frame`` to the connections here of each of ``node_ids``;
        how many nodes had one.  For frames that came over a peer link: they
        are never forwarded again."""
        send = self.registry.send
        return sum(1 for node_id in node_ids if send(node_id, frame))

    def deliver_many(self, frame: bytes, node_ids: list[str]) -> Deferred[None]:
        """Write one ``frame`` (encoded once, the same bytes for everyone) to
        ``node_ids``; fires when the last local copy is written.

        Nodes held by other servers go to the mesh at once, one list per
        call.  Local copies go out in the order deliveries were asked for, at
        most :data:`FANOUT_SLICE` per reactor turn: a small one at once when
        nothing is queued, a large one in slices, and any later one after it,
        so every recipient gets broadcasts and events in order.  A copy that
        fails to be written is logged and skipped (a stored row is still read
        on sync); it never holds up the copies after it.
        """
        remote = self.remote
        if remote is not None:
            is_online = self.registry.is_online
            local = [n for n in node_ids if is_online(n)]
            elsewhere = [n for n in node_ids if not is_online(n) and remote.holds(n)]
            if elsewhere:
                try:
                    remote.forward(elsewhere, frame)
                except Exception:
                    log.failure("could not forward a frame ({size} bytes) to {count} nodes",
                                size=len(frame), count=len(elsewhere))
            node_ids = local
        done: Deferred[None] = Deferred()
        self._fanouts.append(_Pending(frame, node_ids, done))
        if not self._fanout_scheduled:
            self._write_fanouts()
        return done

    def _write_fanouts(self) -> None:
        """Write one slice of the queued deliveries; schedule the next slice."""
        queue = self._fanouts
        send = self.registry.send
        budget = FANOUT_SLICE
        while queue and budget > 0:
            item = queue[0]
            frame, node_ids, start = item.frame, item.node_ids, item.start
            end = min(start + budget, len(node_ids))
            for i in range(start, end):
                try:
                    send(node_ids[i], frame)
                except Exception:
                    # one copy that cannot be written costs only that copy:
                    # never the rest of this delivery, never the ones queued after it
                    log.failure("could not write a frame ({size} bytes) to {node_id}",
                                size=len(frame), node_id=node_ids[i])
            budget -= end - start
            if end < len(node_ids):
                item.start = end
                break
            queue.popleft()
            item.done.callback(None)
        self._fanout_scheduled = bool(queue)
        if queue:
            self.clock.callLater(0, self._write_fanouts)
