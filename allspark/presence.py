"""Presence: who is online, cluster-wide, and online/offline events.

A node is **online** when it has a live connection on this server or, with a
mesh, on another live server the location cache names
(:meth:`allspark.delivery.Delivery.is_live`: the registry, else
:meth:`allspark.mesh.Mesh.holds`).  So there are no zombies: a server that
dies takes its nodes offline for every other server as soon as its link drops
(a ``kill -9`` closes its sockets at once) and at the latest when its
locations are swept (``--server-dead-after``, default 10 s, plus the 3 s
sweep, :mod:`allspark.locations`).

One op, ``presence`` (a control frame and ``/presence`` over HTTP, one
implementation: :meth:`Presence.query`), with exactly one of:

- ``session_id``: the online members of a session the caller is a member
  of, by the name other members know them by (an anonymous member by its
  alias only, never its node_id): ``{"op": "presence", "session_id": S,
  "online": [names...], "more": bool[, "next": name]}``, sorted, paged like
  ``get_session_info`` (``after``, ``limit``).
- ``client_id``: the caller's own client only (its devices):
  ``{"op": "presence", "client_id": C, "online": [node_ids...]}``.
- ``node_id``: the caller itself, a node of the caller's own client, or a
  member of one of the caller's sessions who is not anonymous there:
  ``{"op": "presence", "node_id": N, "online": bool}``.  Any other node
  (an anonymous co-member, a stranger, a node that never connected) is
  ``not_allowed``, the same answer for all, so nothing can be probed.

**Events.**  A member connected to this server by WebSocket sends
``presence`` with ``session_id`` and ``"subscribe": true`` (``false`` to
stop); from then on it gets ``{"op": "presence_changed", "session_id": S,
"name": N, "online": bool}`` when another member comes online or goes
offline, anywhere in the cluster.  Each server compares the online members of
the sessions its own connections subscribed to every
:data:`PRESENCE_POLL_S` seconds (only while there are subscribers), so an
event follows the change by at most that plus the location's own delay.  A
subscription ends when the node has no connection here any more or leaves
the session.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from allspark.delivery import Delivery
from allspark.envelope import DEFAULT_PAGE_LIMIT, FrameError, encode
from allspark.logs import logger
from allspark.router import Sender
from allspark.store import Store

if TYPE_CHECKING:
    from allspark.sessions import Sessions

log = logger(__name__)

#: Seconds between two comparisons of the subscribed sessions' online members.
PRESENCE_POLL_S = 1.0
#: Bytes a presence answer keeps free under the frame limit (id, more, next).
_PAGE_SLACK = 512


class Presence:
    """Answers ``presence`` and sends ``presence_changed`` to subscribers."""

    def __init__(self, store: Store, delivery: Delivery, sessions: "Sessions", clock: IReactorTime,
                 max_message_size: int = 64 * 1024, poll_s: float = PRESENCE_POLL_S) -> None:
        self.store = store
        self.delivery = delivery
        self.sessions = sessions
        self.clock = clock
        self.max_message_size = max_message_size
        self.poll_s = poll_s
        #: session_id -> node_ids subscribed to it on this server
        self._subscribers: dict[str, set[str]] = {}
        #: session_id -> node_ids of its members online at the last comparison
        self._last_online: dict[str, set[str]] = {}
        self._loop: LoopingCall | None = None

    # -- the op ---------------------------------------------------------------
    async def query(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``presence``: see the module docstring."""
        asked = [name for name in ("session_id", "client_id", "node_id") if name in args]
        if len(asked) != 1:
            raise FrameError("bad_frame", "presence takes exactly one of session_id, client_id, node_id")
        if "subscribe" in args and asked != ["session_id"]:
            raise FrameError("bad_frame", "subscribe goes with session_id")
        if "session_id" in args:
            return await self._session(sender, args)
        if "client_id" in args:
            return await self._client(sender, args["client_id"])
        return await self._node(sender, args["node_id"])

    async def _session(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        from allspark.sessions import public_id

        session_id = args["session_id"]
        entry, _ = await self.sessions.membership(sender, session_id)
        subscribe = args.get("subscribe")
        if subscribe is True:
            if not self.delivery.registry.is_online(sender.node_id):
                raise FrameError("bad_frame", "subscribe needs a WebSocket connection to this server")
            await self._compare(session_id)  # earlier subscribers get what changed up to now
            self._subscribers.setdefault(session_id, set()).add(sender.node_id)
            self._start()
        elif subscribe is False:
            self._unsubscribe(session_id, sender.node_id)
        online = self.delivery.live_among(entry.members)
        if subscribe is True:  # the answer is the new subscriber's starting point
            self._last_online[session_id] = set(online)
        names = sorted(public_id(entry.members[n]) for n in online)
        after = args.get("after")
        if after is not None:
            names = names[bisect_right(names, after):]
        limit = args.get("limit", DEFAULT_PAGE_LIMIT)
        answer: dict[str, Any] = {"op": "presence", "session_id": session_id, "online": []}
        if subscribe is not None:
            answer["subscribed"] = subscribe
        budget = self.max_message_size - len(encode(answer)) - _PAGE_SLACK
        page: list[str] = []
        for name in names[:limit]:
            budget -= len(name) + 3
            if page and budget < 0:
                break
            page.append(name)
        answer["online"] = page
        answer["more"] = len(names) > len(page)
        if answer["more"]:
            answer["next"] = page[-1]
        return answer

    async def _client(self, sender: Sender, client_id: str) -> dict[str, Any]:
        if sender.client_id is None or sender.client_id != client_id:
            raise FrameError("not_allowed", "presence by client_id is for your own client's devices only")
        nodes = await self.store.nodes_of_client(client_id)
        is_live = self.delivery.is_live
        return {"op": "presence", "client_id": client_id, "online": [n for n in nodes if is_live(n)]}

    async def _node(self, sender: Sender, node_id: str) -> dict[str, Any]:
        if not await self._may_see(sender, node_id):
            raise FrameError("not_allowed", "presence of that node is not yours to see: ask about yourself, "
                                            "your own client's devices or the members of your sessions")
        return {"op": "presence", "node_id": node_id, "online": self.delivery.is_live(node_id)}

    async def _may_see(self, sender: Sender, node_id: str) -> bool:
        """Whether ``sender`` may learn whether ``node_id`` is online: itself,
        a node of its own client, or a member of one of its sessions that is
        not anonymous there."""
        if node_id == sender.node_id:
            return True
        if sender.client_id is not None:
            known = await self.store.get_node(node_id)
            if known is not None and known[1] == sender.client_id:
                return True
        theirs = {m.session_id for m in await self.store.sessions_of_node(node_id) if not m.anonymous}
        if not theirs:
            return False
        return any(m.session_id in theirs for m in await self.store.sessions_of_node(sender.node_id))

    # -- events ---------------------------------------------------------------
    def _start(self) -> None:
        if self._loop is None or not self._loop.running:
            self._loop = LoopingCall(lambda: ensureDeferred(self.compare_all()))
            self._loop.clock = self.clock
            self._loop.start(self.poll_s, now=False).addErrback(
                lambda f: log.failure("the presence comparison stopped", f))

    def _unsubscribe(self, session_id: str, node_id: str) -> None:
        subscribers = self._subscribers.get(session_id)
        if subscribers is None:
            return
        subscribers.discard(node_id)
        if not subscribers:
            del self._subscribers[session_id]
            self._last_online.pop(session_id, None)
        if not self._subscribers and self._loop is not None and self._loop.running:
            self._loop.stop()

    async def compare_all(self) -> None:
        """Compare every subscribed session once (what the loop runs)."""
        for session_id in list(self._subscribers):
            try:
                await self._compare(session_id)
            except Exception:
                log.failure("could not compare the presence of session {session_id}", session_id=session_id)

    async def _compare(self, session_id: str) -> None:
        """Send ``presence_changed`` to this server's subscribers of
        ``session_id`` for each member whose online state changed since the
        last comparison; drop subscribers gone from here or from the session."""
        from allspark.sessions import public_id

        subscribers = self._subscribers.get(session_id)
        if not subscribers:
            return
        entry = await self.sessions.entry(session_id)
        registry = self.delivery.registry
        for node_id in list(subscribers):
            if entry is None or node_id not in entry.members or not registry.is_online(node_id):
                self._unsubscribe(session_id, node_id)
        subscribers = self._subscribers.get(session_id)
        if not subscribers or entry is None:
            return
        now = set(self.delivery.live_among(entry.members))
        before = self._last_online.get(session_id, now)
        self._last_online[session_id] = now
        for node_id, online in [*((n, True) for n in now - before), *((n, False) for n in before - now)]:
            member = entry.members.get(node_id)
            if member is None:
                continue  # left the session: member_left said so
            frame = encode({"op": "presence_changed", "session_id": session_id, "name": public_id(member),
                            "online": online})
            targets = [n for n in subscribers if n != node_id]
            if targets:
                self.delivery.deliver_many(frame, targets)

    def stop(self) -> Deferred[None] | None:
        """Stop the comparisons (the server is stopping)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return None
