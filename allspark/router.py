"""The router: where a message goes.  It knows no sockets.

``Router.route`` takes a validated :class:`~allspark.envelope.Message` from an
authenticated sender and resolves its destination:

- ``dest_id``: one node;
- ``dest_client_id``: every node of that client, plus the sender's own other
  nodes (so that a user's devices all show the same conversation);
- ``dest_session_id``: handed to :class:`~allspark.sessions.Sessions`.

Durable messages go through :class:`~allspark.inbox.Inbox` (stored, then
delivered); ephemeral ones are written to live connections and never stored.
The answer is the ``accepted`` frame for the sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from allspark.envelope import FrameError, Message, addressed, delivery_body, encode
from allspark.inbox import Inbox, now_ms
from allspark.registry import Registry
from allspark.store import Store

if TYPE_CHECKING:
    from allspark.sessions import Sessions


class _Lookup:
    """One store lookup that several coroutines wait for, resumed in the
    order they started waiting."""

    def __init__(self) -> None:
        self._waiters: list[Deferred[bool]] = []
        self._result: bool | Failure | None = None

    def wait(self) -> Deferred[bool]:
        """A Deferred firing with the lookup's answer (whether the node is known)."""
        if self._result is not None:
            return fail(self._result) if isinstance(self._result, Failure) else succeed(self._result)
        d: Deferred[bool] = Deferred()
        self._waiters.append(d)
        return d

    def fire(self, result: bool | Failure) -> None:
        """Hand ``result`` to every waiter, first come first served."""
        self._result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


@dataclass(frozen=True)
class Sender:
    """The authenticated node a frame came from."""

    node_id: str
    client_id: str | None


def accepted_frame(
    msg: Message, status: str, recipients: int, live: int, **extra: Any
) -> bytes:
    """The ``accepted`` answer.

    ``status`` is ``delivered`` (every recipient had a live connection when
    the message was routed), ``stored`` (at least one had not: it is kept in
    its inbox for sync) or ``dropped`` (ephemeral and nobody was online).
    """
    frame: dict[str, Any] = {"op": "accepted"}
    if msg.id is not None:
        frame["id"] = msg.id
    frame["status"] = status
    frame["recipients"] = recipients
    frame["live"] = live
    frame.update(extra)
    if msg.ignored:
        frame["ignored"] = msg.ignored
    return encode(frame)


class Router:
    """Resolves destinations and hands copies to the inbox or live sockets."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        inbox: Inbox,
        clock: IReactorTime,
    ) -> None:
        self.registry = registry
        self.store = store
        self.inbox = inbox
        self.clock = clock
        self.sessions: Sessions | None = None
        # node_ids known to exist; nodes are never forgotten, so this only grows
        # up to the number of nodes that received something from this server.
        self._known_nodes: set[str] = set()
        # node_id -> the store lookup in flight for it (see _check_known)
        self._lookups: dict[str, _Lookup] = {}

    def route(self, sender: Sender, msg: Message) -> Deferred[bytes]:
        """Route ``msg``; fires with the ``accepted`` frame, or fails with
        :class:`~allspark.envelope.FrameError` for destinations that cannot
        be served.

        The common case, a message to a node that is online or known, runs
        without a coroutine: it is handed to the store (or, ephemeral,
        written) before this returns.
        """
        dest_id = msg.dest_id
        if (
            msg.dest_session_id is None
            and msg.dest_client_id is None
            and dest_id is not None
            and dest_id not in self._lookups
            and (dest_id in self._known_nodes or self.registry.is_online(dest_id))
        ):
            try:
                return self.send_to_nodes(sender, msg, [dest_id])
            except Exception:  # a Deferred-returning call reports failures, never raises
                return fail()
        return ensureDeferred(self._route_resolving(sender, msg))

    async def _route_resolving(self, sender: Sender, msg: Message) -> bytes:
        """:meth:`route` for destinations that need a lookup first."""
        if msg.dest_session_id is not None:
            if self.sessions is None:
                raise FrameError("unknown_destination", "sessions are not served here", msg.id)
            return await self.sessions.route(sender, msg)
        if msg.dest_client_id is not None:
            recipients = await self._client_recipients(sender, msg.dest_client_id, msg.id)
        else:
            assert msg.dest_id is not None
            await self._check_known(msg.dest_id, msg.id)
            recipients = [msg.dest_id]
        return await self.send_to_nodes(sender, msg, recipients)

    def send_to_nodes(
        self, sender: Sender, msg: Message, recipients: list[str],
        src_id: str | None = None, omit_client: bool = False,
    ) -> Deferred[bytes]:
        """Deliver ``msg`` to ``recipients`` (node ids), each copy addressed to
        its node; fires with the ``accepted`` frame once every copy is stored
        (at once, ephemeral).

        ``src_id`` overrides the sender's node_id and ``omit_client`` drops
        its client_id (an anonymous session member is known by its alias
        only)."""
        body_src = sender.node_id if src_id is None else src_id
        body_client = None if omit_client else sender.client_id
        online = self.registry.is_online
        live = sum(1 for r in recipients if online(r))
        body = delivery_body(msg, body_src, body_client, now_ms(self.clock))
        if msg.ephemeral:
            for node_id in recipients:
                self.registry.send(node_id, addressed(body, node_id))
            status = "dropped" if live == 0 else "delivered"
            return succeed(accepted_frame(msg, status, len(recipients), live))
        status = "delivered" if live == len(recipients) else "stored"
        answer = accepted_frame(msg, status, len(recipients), live)
        return self.inbox.store_and_deliver(sender.node_id, msg.id, recipients, body, answer)

    async def _check_known(self, node_id: str, frame_id: str | None) -> None:
        """Raise ``unknown_destination`` unless ``node_id`` ever connected.

        Ordering matters: messages one connection sends to one node must be
        stored in the order they arrived.  While a store lookup for
        ``node_id`` is in flight, every later message to it waits for that
        same lookup (even once the node is online or known), so they all
        resume in arrival order and reach the store in that order.
        """
        lookup = self._lookups.get(node_id)
        if lookup is None:
            if node_id in self._known_nodes or self.registry.is_online(node_id):
                return
            lookup = self._lookups[node_id] = _Lookup()
            self.store.get_node(node_id).addBoth(self._looked_up, node_id, lookup)
        if not await lookup.wait():
            raise FrameError(
                "unknown_destination",
                f"no node {node_id!r} has ever connected to this cluster",
                frame_id,
            )

    def _looked_up(self, result: Any, node_id: str, lookup: "_Lookup") -> None:
        if self._lookups.get(node_id) is lookup:
            del self._lookups[node_id]
        if isinstance(result, Failure):
            lookup.fire(result)
            return
        if result is not None:
            self._known_nodes.add(node_id)
        lookup.fire(result is not None)

    async def _client_recipients(
        self, sender: Sender, client_id: str, frame_id: str | None
    ) -> list[str]:
        nodes = await self.store.nodes_of_client(client_id)
        if not nodes:
            raise FrameError(
                "unknown_destination", f"client {client_id!r} has no known nodes", frame_id
            )
        recipients = list(nodes)
        if sender.client_id is not None and sender.client_id != client_id:
            recipients.extend(await self.store.nodes_of_client(sender.client_id))
        seen: set[str] = {sender.node_id}
        unique = []
        for node_id in recipients:
            if node_id not in seen:
                seen.add(node_id)
                unique.append(node_id)
        if not unique:
            raise FrameError(
                "unknown_destination", f"client {client_id!r} has no other node than the sender", frame_id
            )
        return unique
