"""Revoked nodes: a node whose auth keys are refused until a time.

The server API (``POST /api/v1/nodes/{node_id}/disconnect`` with
``revoke_until``, :mod:`allspark.api`) writes a revocation to the store
(:meth:`allspark.store.Store.revoke_node`); every server then refuses that
node's keys at pre-connection (401 ``revoked``) and at the WebSocket
handshake (401 ``revoked``) until the time has passed.

Each server keeps what it read in a small cache (:class:`Revocations`): an
answer is used for at most :data:`REVOCATION_CACHE_S` seconds before the
store is asked again, so a handshake costs no store read while its node was
looked up recently.  The server that revokes updates its own cache at once
and tells its peers (the ``disconnect`` peer frame, :mod:`allspark.mesh`),
which update theirs; a peer that missed the frame (its link was down) sees
the revocation within :data:`REVOCATION_CACHE_S` seconds.  The time is
compared with the clock at each check, so a revocation ends on time whatever
the cache holds.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from allspark.logs import logger
from allspark.store import Store

log = logger(__name__)

#: Seconds a server trusts what it read about a node's revocation.
REVOCATION_CACHE_S = 5.0
#: Nodes whose revocation state one server remembers (least recently used go first).
REVOCATION_CACHE_SIZE = 100_000


class Revocations:
    """Until when nodes are revoked, read from ``store`` and cached."""

    def __init__(self, store: Store, clock: IReactorTime, ttl: float = REVOCATION_CACHE_S,
                 size: int = REVOCATION_CACHE_SIZE) -> None:
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self.size = size
        # node_id -> (revoked until, Unix ms; when it was read, clock seconds)
        self._cache: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._unsupported_logged = False

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def note(self, node_id: str, until_ms: int) -> None:
        """Remember that ``node_id`` is revoked until ``until_ms`` (0: it is
        not), as read or written just now."""
        self._cache[node_id] = (until_ms, self.clock.seconds())
        self._cache.move_to_end(node_id)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def cached_until(self, node_id: str) -> int | None:
        """Until when ``node_id`` is revoked (Unix ms, 0: not revoked) when a
        fresh answer is cached; None when the store must be asked."""
        entry = self._cache.get(node_id)
        if entry is None or self.clock.seconds() - entry[1] > self.ttl:
            return None
        return entry[0]

    def until(self, node_id: str) -> Deferred[int]:
        """Until when ``node_id`` is revoked (Unix ms; 0: not revoked), from
        the cache or the store.  A store without revocations (an older
        backend) answers 0, logged once."""
        cached = self.cached_until(node_id)
        if cached is not None:
            return succeed(cached)
        try:
            d = self.store.revoked_until(node_id)
        except (AttributeError, NotImplementedError):
            return succeed(self._unsupported())
        if not isinstance(d, Deferred):  # a backend that only declares the method
            return succeed(self._unsupported())

        def read(until_ms: int) -> int:
            self.note(node_id, int(until_ms or 0))
            return int(until_ms or 0)

        return d.addCallback(read)

    def _unsupported(self) -> int:
        if not self._unsupported_logged:
            self._unsupported_logged = True
            log.warn("this store keeps no revocations: revoked nodes are not refused",
                     store=type(self.store).__name__)
        return 0

    def revoked_now(self, until_ms: int) -> bool:
        """Whether a revocation until ``until_ms`` is still in force."""
        return until_ms > self._now_ms()

    async def revoke(self, node_id: str, until_ms: int) -> None:
        """Write a revocation of ``node_id`` until ``until_ms`` (0 lifts it)
        to the store, then to this server's cache."""
        await self.store.revoke_node(node_id, until_ms)
        self.note(node_id, until_ms)
