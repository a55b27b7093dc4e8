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

from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from allspark.envelope import (
    DELIVERY_OVERHEAD, FrameError, Message, addressed, check_deliverable, delivery_body, encode,
)
from allspark.inbox import Inbox, now_ms
from allspark.delivery import Delivery
from allspark.store import Store

if TYPE_CHECKING:
    from allspark.sessions import Sessions


@dataclass(frozen=True)
class Sender:
    """The authenticated node a frame came from.  ``app`` marks the
    application's backend publishing through the server API
    (:mod:`allspark.api`): it may send to any session without being a member."""

    node_id: str
    client_id: str | None
    app: bool = False


def accepted_frame(msg: Message, recipients: int, live: int, **extra: Any) -> bytes:
    """The ``accepted`` answer for ``msg`` sent to ``recipients`` nodes of
    which ``live`` had a live connection when it was routed.

    Its ``status`` is ``delivered`` (every recipient was live), ``stored``
    (durable, and at least one was not: it is kept for sync) or ``dropped``
    (ephemeral, and nobody was live).
    """
    if msg.ephemeral:
        status = "delivered" if live else "dropped"
    else:
        status = "delivered" if live >= recipients else "stored"
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
        delivery: Delivery,
        store: Store,
        inbox: Inbox,
        clock: IReactorTime,
        max_message_size: int = 64 * 1024,
    ) -> None:
        """``max_message_size``: the largest frame a recipient may be sent;
        a message whose delivered copy could be larger is refused with
        ``too_large`` before it is stored.  ``delivery``: where copies are
        written (the router itself never touches a connection)."""
        self.delivery = delivery
        self.max_message_size = max_message_size
        self.store = store
        self.inbox = inbox
        self.clock = clock
        self.sessions: Sessions | None = None
        # node_ids known to exist; nodes are never forgotten, so this only grows
        # up to the number of nodes that received something from this server.
        self._known_nodes: set[str] = set()
        # sender node_id -> its messages waiting for a lookup, or behind one
        # (see _route_in_order)
        self._waiting: dict[str, deque[tuple[Message, Deferred[bytes]]]] = {}

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
            and sender.node_id not in self._waiting
            and (dest_id in self._known_nodes or self.delivery.is_live(dest_id))
        ):
            try:
                return self.send_to_nodes(sender, msg, [dest_id])
            except Exception:  # a Deferred-returning call reports failures, never raises
                return fail()
        d: Deferred[bytes] = Deferred()
        waiting = self._waiting.get(sender.node_id)
        if waiting is None:
            waiting = self._waiting[sender.node_id] = deque()
            waiting.append((msg, d))
            ensureDeferred(self._route_in_order(sender, waiting))
        else:
            waiting.append((msg, d))
        return d

    async def _route_in_order(
        self, sender: Sender, waiting: deque[tuple[Message, Deferred[bytes]]]
    ) -> None:
        """Route a sender's messages that need a lookup, one after the other.

        Messages from one sender reach the store in the order they arrived:
        while one of them waits for a lookup, the sender's later messages
        (even those that need none) queue behind it, and each is handed to
        the store as soon as its own recipients are known.  A loop, not a
        chain of callbacks, so that any number can wait.
        """
        while waiting:
            msg, d = waiting[0]
            try:
                deliver = await self._resolve(sender, msg)
                done = deliver()  # hands the message to the store before returning
            except Exception:
                waiting.popleft()
                d.errback()
                continue
            waiting.popleft()
            done.chainDeferred(d)
        del self._waiting[sender.node_id]

    async def _resolve(self, sender: Sender, msg: Message) -> Callable[[], Deferred[bytes]]:
        """Look up the recipients of ``msg``; a call that stores and delivers it."""
        if msg.dest_session_id is not None:
            if self.sessions is None:
                raise FrameError("unknown_destination", "sessions are not served here", msg.id)
            return await self.sessions.resolve(sender, msg)
        if msg.dest_client_id is not None:
            recipients = await self._client_recipients(sender, msg.dest_client_id, msg.id)
        else:
            assert msg.dest_id is not None
            await self._check_known(msg.dest_id, msg.id)
            recipients = [msg.dest_id]
        return partial(self.send_to_nodes, sender, msg, recipients)

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
        is_live = self.delivery.is_live
        live = sum(1 for r in recipients if is_live(r))
        body = delivery_body(msg, body_src, body_client, now_ms(self.clock))
        if len(body) + DELIVERY_OVERHEAD > self.max_message_size:
            check_deliverable(body, self.max_message_size, msg.id)  # raises too_large
        if msg.ephemeral:
            deliver = self.delivery.deliver
            for node_id in recipients:
                deliver(node_id, addressed(body, node_id))
            return succeed(accepted_frame(msg, len(recipients), live))
        answer = accepted_frame(msg, len(recipients), live)
        return self.inbox.store_and_deliver(sender.node_id, msg.id, recipients, body, answer,
                                            push=msg.push)

    async def _check_known(self, node_id: str, frame_id: str | None) -> None:
        """Raise ``unknown_destination`` unless ``node_id`` ever connected."""
        if node_id in self._known_nodes or self.delivery.is_live(node_id):
            return
        if await self.store.get_node(node_id) is None:
            raise FrameError(
                "unknown_destination",
                f"no node {node_id!r} has ever connected to this cluster",
                frame_id,
            )
        self._known_nodes.add(node_id)

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
