"""Sessions: membership, aliases, owners, game masters, session streams.

A session is a group of nodes.  One implementation serves both faces of every
operation: the control frames on the WebSocket (``create_session``,
``join_session``, ``unjoin_session``, ``get_session_info``,
``reveal_anonymity``, ``set_master``, ``my_sessions``, and ``presence`` from
:mod:`allspark.presence`) and the HTTP requests of the same names (:func:`session_resources`).  Refusals raise
:class:`~allspark.envelope.FrameError`; HTTP maps their codes to statuses
(:data:`HTTP_STATUS`).

Rules
-----
- **Who may join**: the owner (the creator) adds anyone (``join_session`` with
  ``node_id``); anyone may join itself when the session has
  ``anyone_can_join``; nobody else.  The owner may remove members
  (``unjoin_session`` with ``node_id`` or ``alias``); every member may leave.
- **Only members** send to a session, read its info, sync or ack its stream.
- **Anonymity**: every member has an alias, stable while it stays a member.
  An anonymous member is named by its alias only: as ``src_id`` of what it
  sends (with no ``src_client_id``), in events, in ``get_session_info`` and in
  every HTTP answer.  Its node_id and client_id never leave the server in
  anything another member receives, until it sends ``reveal_anonymity``.
  Inside a session a member is addressed (``dest_id``) by its alias, or by its
  node_id when it is not anonymous; an anonymous member's node_id is answered
  like an unknown name, so nobody can probe it.
- **Not even the owner** can tie an anonymous member's node_id to its alias:
  adding it again by node_id answers only ``node_id`` and ``anonymous: true``
  (:func:`added_view`), and ``unjoin_session``/``set_master`` take an
  anonymous member by alias only (its node_id is ``no_such_member``, as for a
  node that is not there).  A node the owner adds is not looked up: the answer
  is the same whether it ever connected, with no client_id.  What remains is
  inherent: the owner knows which nodes it added, and one addition followed by
  ``get_session_info`` shows which alias is new.
- **Game sessions** (``session_type: "game"``): a master node (the owner at
  first; the owner moves it with ``set_master``).  A non-master's messages go
  to the master's inbox only; the master's go to the stream (everyone).
- **Private messages**: ``dest_session_id`` + ``dest_id`` go to that one
  member's inbox (they carry ``seq`` and ``dest_session_id``).

Storage shape (why a stream)
----------------------------
A broadcast is ONE row in the session stream (``store.append_session``), not
one inbox row per member: a 10,000-member session costs one write per
message, and each member keeps only a cursor (``acked_seq``).  Delivered
broadcast frames carry ``"session_seq": N`` (never ``seq``, which always means
the recipient's own inbox seq) plus ``dest_session_id``.  Members ack with
``{"op": "ack", "session_id": S, "upto": N}`` and catch up with
``{"op": "sync", "session_id": S[, "after": N][, "limit": L]}`` (``after``
defaults to the member's acked cursor), answered by ``synced`` with
``session_id``.  A member never reads rows from before it joined, nor its own
rows.

Events
------
``member_joined``, ``member_left``, ``member_revealed`` and
``master_changed`` go to the members that are online when the change happens
(except the one whose request caused it: it gets the answer instead).  They
are live only, not stored in the stream: they describe state that
``get_session_info`` always returns whole, so a member that was offline
refreshes the roster with one request instead of paging through one stored row
per join (adding 10,000 members would otherwise put 10,000 rows in front of
every member's messages).

Membership cache
----------------
Each session's record and members are cached in memory (LRU,
``cache_size`` sessions) on first use.  Every change goes through ONE method,
:meth:`Sessions.membership_changed`, which also tells the other servers
(:attr:`Sessions.announce`: the mesh's ``invalidate`` frame, ``what:
"session"``); a peer's report comes back into the same method with
``from_peer=True`` and drops the cached session.  A server that misses a
report (its link was down) serves a session it cached at most ``cache_ttl``
seconds (default :data:`DEFAULT_CACHE_TTL`) after it read it from the store,
and drops its whole cache whenever a link comes up (:meth:`Sessions.drop_all`).
Cursor moves (``ack``) update the local entry only: they are not announced.

Fan-out
-------
A broadcast frame is encoded once and written to the online members in slices
of :data:`allspark.delivery.FANOUT_SLICE` nodes, one slice per reactor turn
(:meth:`allspark.delivery.Delivery.deliver_many`), so other clients
keep being served while a large session's message goes out.  Members that are
offline (or that connect while it goes out) read it on sync: the row is stored
before the first slice is written.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.iweb import IRequest

from allspark.envelope import (
    CONTROL_OPS,
    DEFAULT_PAGE_LIMIT,
    Control,
    FrameError,
    Message,
    check_deliverable,
    delivery_body,
    encode,
)
from allspark.ids import new_id
from allspark.delivery import Delivery
from allspark.inbox import DeliveryConfig, check_cursor, now_ms, write_rows
from allspark.logs import logger
from allspark.registry import Connection
from allspark.router import Router, Sender, accepted_frame
from allspark.store import DuplicateSession, MemberRecord, SessionFull, SessionRecord, Store, StoreError

if TYPE_CHECKING:
    from allspark.push.scheduler import PushScheduler
    from allspark.server import Server

log = logger(__name__)

#: Seconds a cached session is served before it is read from the store again
#: (the bound on stale membership when an invalidation from a peer is missed).
DEFAULT_CACHE_TTL = 5.0

#: Bytes a paged answer keeps free under the frame limit for its ``id``,
#: ``more`` and ``next`` (an id is at most 128 characters).
PAGE_SLACK = 512


def _fill_page(entries: list[dict[str, Any]], limit: int, budget: int) -> tuple[list[dict[str, Any]], bool]:
    """The first of ``entries`` (already after the cursor, at most
    ``limit + 1`` of them) that make a page: at most ``limit``, and no more
    than ``budget`` bytes encoded (at least one, so that paging always moves
    on); whether more follow."""
    page: list[dict[str, Any]] = []
    used = 0
    for entry in entries[:limit]:
        size = len(encode(entry)) + 1
        if page and used + size > budget:
            return page, True
        page.append(entry)
        used += size
    return page, len(entries) > len(page)

#: Error code -> HTTP status for the HTTP face of the session operations.
HTTP_STATUS: dict[str, int] = {
    "bad_frame": 400,
    "bad_request": 400,
    "not_a_game": 400,
    "not_a_member": 403,
    "not_allowed": 403,
    "no_such_session": 404,
    "no_such_member": 404,
    "unknown_destination": 404,
    "session_exists": 409,
}


def with_session_seq(body: bytes, seq: int) -> bytes:
    """``body`` (a serialized JSON object) with ``"session_seq": seq`` added,
    without parsing it again."""
    return b'{"session_seq":%d,%s' % (seq, body[1:])


def _answer_with_session_seq(answer: bytes, seq: int) -> bytes:
    return b'%s,"session_seq":%d}' % (answer[:-1], seq)


@dataclass
class _Entry:
    """One cached session: its record, members by node_id, node_id by alias."""

    record: SessionRecord
    members: dict[str, MemberRecord]
    by_alias: dict[str, str]
    #: clock time it was read from the store (served until loaded_at + cache_ttl)
    loaded_at: float = 0.0


@dataclass
class _Load:
    """A session being read from the store: callers waiting for it, and the
    changes made meanwhile (applied to it before it is cached; ``dirty``: a
    change without details, so it is not cached)."""

    waiters: list[Deferred[_Entry | None]] = field(default_factory=list)
    changes: list[tuple[str, MemberRecord | None]] = field(default_factory=list)
    dirty: bool = False


def _apply(entry: _Entry, node_id: str, member: MemberRecord | None) -> None:
    """Member ``node_id`` of ``entry`` is now ``member`` (None: it left)."""
    old = entry.members.pop(node_id, None)
    if old is not None and entry.by_alias.get(old.alias) == node_id:
        del entry.by_alias[old.alias]
    if member is not None:
        entry.members[node_id] = member
        entry.by_alias[member.alias] = node_id


def public_id(member: MemberRecord) -> str:
    """The name other members know ``member`` by: its alias when anonymous,
    else its node_id."""
    return member.alias if member.anonymous else member.node_id


def public_view(record: SessionRecord, member: MemberRecord) -> dict[str, Any]:
    """What any member (and any HTTP answer) may see of ``member``.

    ``name`` is what it is addressed by (``dest_id``) and what its messages
    carry as ``src_id``: its alias when anonymous, else its node_id.  An
    anonymous member shows only its alias: no node_id, no client_id.  (The
    key is not ``id``, which names the request an answer belongs to.)"""
    view: dict[str, Any] = {"name": public_id(member), "alias": member.alias,
                            "anonymous": member.anonymous}
    if not member.anonymous:
        view["node_id"] = member.node_id
        if member.client_id is not None:
            view["client_id"] = member.client_id
    if member.node_id == record.owner_id:
        view["owner"] = True
    if member.node_id == record.options.get("master_id"):
        view["master"] = True
    return view


def added_view(record: SessionRecord, member: MemberRecord) -> dict[str, Any]:
    """What the owner is answered when it adds another node (``join_session``
    with ``node_id``), new or already a member: the public view when the
    member is not anonymous; for an anonymous one only the node_id the owner
    gave and ``anonymous: true``, never its alias, which would tie the two
    together."""
    if member.anonymous:
        return {"node_id": member.node_id, "anonymous": True}
    return public_view(record, member)


def own_view(record: SessionRecord, member: MemberRecord) -> dict[str, Any]:
    """What a member sees of itself: the public view plus its node_id,
    client_id and stream cursors."""
    view = public_view(record, member)
    view["node_id"] = member.node_id
    if member.client_id is not None:
        view["client_id"] = member.client_id
    view["joined_seq"] = member.joined_seq
    view["acked_seq"] = member.acked_seq
    return view


class Sessions:
    """Session operations, routing into sessions, and the membership cache."""

    def __init__(
        self,
        store: Store,
        delivery: Delivery,
        router: Router,
        clock: IReactorTime,
        config: DeliveryConfig = DeliveryConfig(),
        max_message_size: int = 64 * 1024,
        cache_size: int = 10_000,
        cache_ttl: float = DEFAULT_CACHE_TTL,
    ) -> None:
        """``delivery``: where events and broadcasts are written; ``router``:
        sends a message to one member (a direct copy); ``config``: the
        de-duplication window and stream quotas; ``max_message_size``: the
        largest frame a member may be sent (broadcasts and info pages fit);
        ``cache_ttl``: seconds a cached session is served before it is read
        again."""
        self.store = store
        self.delivery = delivery
        self.router = router
        self.clock = clock
        self.config = config
        self.max_message_size = max_message_size
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        #: tells the other servers that a session changed (its id); set when
        #: the mesh is wired in (:meth:`allspark.server.Server.share_caches`)
        self.announce: Callable[[str], None] | None = None
        #: told the members of each stored broadcast (push notifications), when configured
        self.push: PushScheduler | None = None
        #: broadcasts stored as stream rows (read by /metrics)
        self.rows_stored = 0
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        #: session_id -> the load from the store in flight
        self._loads: dict[str, _Load] = {}
        self._ops: dict[str, Callable[[Sender, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "create_session": self.create,
            "join_session": self.join,
            "unjoin_session": self.unjoin,
            "get_session_info": self.info,
            "reveal_anonymity": self.reveal,
            "set_master": self.set_master,
            "my_sessions": self.my_sessions,
        }

    # -- the membership cache --------------------------------------------
    def membership_changed(
        self, session_id: str, node_id: str | None = None, member: MemberRecord | None = None,
        *, from_peer: bool = False, announce: bool = True,
    ) -> None:
        """THE one place where cached membership changes.

        - ``node_id`` and ``member``: that member joined or changed (alias,
          anonymity); the cached session is updated in place.
        - ``node_id`` alone: that node left.
        - neither: anything else (options, master, a change reported by a
          peer without details): the cached session is dropped and is read
          from the store again on next use.

        A change made here is announced to the other servers (:attr:`announce`)
        unless ``announce`` is false (a cursor move); one a peer reported
        (``from_peer``) drops the cached session and is never announced again.
        A load of the session in flight when this ran (it may have read the
        store before the change) gets the change applied before it is cached;
        one without details (``node_id`` None, or from a peer) is not cached.
        """
        load = self._loads.get(session_id)
        if load is not None:
            if node_id is None or from_peer:
                load.dirty = True
            else:
                load.changes.append((node_id, member))
        if from_peer:
            self._cache.pop(session_id, None)
            return
        if announce and self.announce is not None:
            try:
                self.announce(session_id)
            except Exception:
                log.failure("could not announce a change of session {session_id}", session_id=session_id)
        entry = self._cache.get(session_id)
        if entry is None:
            return
        if node_id is None:
            del self._cache[session_id]
            return
        _apply(entry, node_id, member)

    def drop_all(self, *_: object) -> None:
        """Forget every cached session (a peer link came up: changes made
        while it was down were not reported); each is read again on next use."""
        for load in self._loads.values():
            load.dirty = True
        self._cache.clear()

    async def _entry(self, session_id: str) -> _Entry | None:
        """The cached session, loaded from the store when needed; None when
        there is no such session.  One load per session at a time: callers
        meanwhile wait for it (a large session that expires while members
        join is read once, not once per join)."""
        entry = self._cache.get(session_id)
        now = self.clock.seconds()
        if entry is not None:
            if now - entry.loaded_at < self.cache_ttl:
                self._cache.move_to_end(session_id)
                return entry
            del self._cache[session_id]  # too old: a change elsewhere may have been missed
        load = self._loads.get(session_id)
        if load is not None:
            waiter: Deferred[_Entry | None] = Deferred()
            load.waiters.append(waiter)
            return await waiter
        load = self._loads[session_id] = _Load()
        try:
            record = await self.store.get_session(session_id)
            members = [] if record is None else await self.store.get_members(session_id)
        except Exception:
            failure = Failure()
            del self._loads[session_id]
            for waiter in load.waiters:
                waiter.errback(failure)
            raise
        del self._loads[session_id]
        loaded: _Entry | None = None
        if record is not None:
            loaded = _Entry(record, {m.node_id: m for m in members}, {m.alias: m.node_id for m in members}, now)
            for node_id, member in load.changes:
                _apply(loaded, node_id, member)
            if not load.dirty:
                self._cache[session_id] = loaded
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        for waiter in load.waiters:
            waiter.callback(loaded)
        return loaded

    def add_op(self, op: str, handler: Callable[[Sender, dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        """Serve ``op`` (in ``CONTROL_OPS``) with ``handler`` like the session
        operations: a control frame and an HTTP path, one implementation
        (``presence``, :mod:`allspark.presence`)."""
        self._ops[op] = handler

    async def entry(self, session_id: str) -> _Entry | None:
        """The session (record, members by node_id), from the cache; None
        when there is no such session."""
        return await self._entry(session_id)

    async def membership(self, sender: Sender, session_id: str) -> tuple[_Entry, MemberRecord]:
        """The session and the caller's membership; ``no_such_session`` or
        ``not_a_member`` otherwise."""
        return await self._membership(sender, session_id)

    async def _session(self, session_id: str) -> _Entry:
        entry = await self._entry(session_id)
        if entry is None:
            raise FrameError("no_such_session", f"no session {session_id!r}")
        return entry

    async def _membership(self, sender: Sender, session_id: str) -> tuple[_Entry, MemberRecord]:
        entry = await self._session(session_id)
        me = entry.members.get(sender.node_id)
        if me is None:
            raise FrameError("not_a_member", f"you are not a member of session {session_id!r}")
        return entry, me

    @staticmethod
    def _named(entry: _Entry, args: dict[str, Any], caller: str) -> MemberRecord | None:
        """The member ``args`` names by ``alias`` or ``node_id``.  Only the
        member itself may name an anonymous member by node_id; for anyone
        else, the owner included, that node_id names no member (answered like
        a node that is not in the session), or removing it or making it
        master by node_id would show which alias it has."""
        if "alias" in args:
            node_id = entry.by_alias.get(args["alias"])
            return None if node_id is None else entry.members.get(node_id)
        member = entry.members.get(args["node_id"])
        if member is not None and member.anonymous and member.node_id != caller:
            return None
        return member

    @staticmethod
    def _resolve(entry: _Entry, name: str) -> MemberRecord | None:
        """A member by alias, or by node_id when it is not anonymous."""
        node_id = entry.by_alias.get(name)
        if node_id is not None:
            return entry.members.get(node_id)
        member = entry.members.get(name)
        if member is None or member.anonymous:
            return None
        return member

    def _new_alias(self, entry: _Entry) -> str:
        while True:
            alias = "anon-" + secrets.token_urlsafe(6)
            if alias not in entry.by_alias and alias not in entry.members:
                return alias

    # -- fan-out ----------------------------------------------------------
    def _online_members(self, entry: _Entry, exclude: str | None) -> list[str]:
        """Members with a live connection (here, or through the mesh on
        another server), except ``exclude``."""
        return self.delivery.live_among(entry.members, exclude)

    def fan_out(self, frame: bytes, node_ids: list[str]) -> Deferred[None]:
        """Write ``frame`` (encoded once) to ``node_ids`` through the delivery
        point, in order and in slices (:meth:`Delivery.deliver_many`)."""
        return self.delivery.deliver_many(frame, node_ids)

    def _event(self, entry: _Entry, frame: dict[str, Any], exclude: str | None) -> None:
        self.fan_out(encode(frame), self._online_members(entry, exclude))

    # -- operations (control frames and HTTP) ------------------------------
    def ops(self) -> list[str]:
        """The session operations, each a control op and an HTTP path."""
        return list(self._ops)

    async def control(self, sender: Sender, frame: Control) -> dict[str, Any]:
        """Answer a session control frame."""
        handler = self._ops.get(frame.op)
        if handler is None:
            raise FrameError("unknown_op", f"op {frame.op!r} is not served here", frame.id)
        return await handler(sender, frame.args)

    async def create(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``create_session``: the caller becomes owner and first member
        (anonymous when the session's ``anonymous`` default is true).  Game
        sessions start with the owner as master.  Answers ``session``."""
        session_id = args.get("session_id") or new_id("s-")
        session_type = args.get("session_type", "group")
        options: dict[str, Any] = {
            "anonymous": args.get("anonymous", False),
            "anyone_can_join": args.get("anyone_can_join", False),
            "session_type": session_type,
            "master_id": sender.node_id if session_type == "game" else None,
        }
        now = now_ms(self.clock)
        try:
            record = await self.store.create_session(session_id, sender.node_id, options, now)
        except DuplicateSession:
            raise FrameError("session_exists", f"session {session_id!r} exists already") from None
        entry = _Entry(record, {}, {})
        alias = self._new_alias(entry)
        member = await self.store.add_member(
            session_id, sender.node_id, sender.client_id, options["anonymous"], alias, now
        )
        self.membership_changed(session_id)
        log.info("session {session_id} created by {node_id}", session_id=session_id, node_id=sender.node_id)
        entry = await self._session(session_id)
        return self._info(entry, member, op="session")

    async def join(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``join_session``: join (or, for the owner, add ``node_id``).
        Answers ``member`` with the member's view (its own view when it
        joined itself).  Joining again answers the existing membership."""
        session_id = args["session_id"]
        entry = await self._session(session_id)
        record = entry.record
        target = args.get("node_id", sender.node_id)
        by_self = target == sender.node_id
        is_owner = sender.node_id == record.owner_id
        if not by_self and not is_owner:
            raise FrameError("not_allowed", "only the session's owner adds other nodes")
        existing = entry.members.get(target)
        if existing is None and by_self and not (is_owner or record.options.get("anyone_can_join")):
            raise FrameError("not_allowed", f"session {session_id!r} is joined only when its owner adds you")
        if existing is not None:
            member = existing
        else:
            anonymous = args.get("anonymous", bool(record.options.get("anonymous")))
            # a node the owner adds is not looked up: its client_id (and whether
            # it ever connected) is not the owner's to learn
            client_id = sender.client_id if by_self else None
            try:
                member = await self.store.add_member(
                    session_id, target, client_id, anonymous, self._new_alias(entry), now_ms(self.clock)
                )
            except StoreError:
                self.membership_changed(session_id)
                raise FrameError("no_such_session", f"no session {session_id!r}") from None
            self.membership_changed(session_id, target, member)
            entry = await self._session(session_id)
            others = self._online_members(entry, sender.node_id)
            joined = {"op": "member_joined", "session_id": session_id, "member": public_view(record, member)}
            if not by_self:
                others = [n for n in others if n != target]
                if self.delivery.is_live(target):
                    self.delivery.deliver(target, encode({**joined, "member": own_view(record, member), "you": True}))
            self.fan_out(encode(joined), others)
        view = own_view(record, member) if by_self else added_view(record, member)
        return {"op": "member", "session_id": session_id, **view}

    async def unjoin(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``unjoin_session``: leave (or, for the owner, remove the member
        named by ``node_id`` or ``alias``).  Answers ``left``."""
        session_id = args["session_id"]
        entry = await self._session(session_id)
        record = entry.record
        is_owner = sender.node_id == record.owner_id
        if "node_id" in args or "alias" in args:
            named = self._named(entry, args, sender.node_id)
            if named is not None and named.node_id != sender.node_id and not is_owner:
                raise FrameError("not_allowed", "only the session's owner removes other members")
            if named is None:
                if not is_owner and sender.node_id not in entry.members:
                    raise FrameError("not_a_member", f"you are not a member of session {session_id!r}")
                raise FrameError("no_such_member", "no such member in this session")
            member = named
        else:
            found = entry.members.get(sender.node_id)
            if found is None:
                raise FrameError("not_a_member", f"you are not a member of session {session_id!r}")
            member = found
        await self.store.remove_member(session_id, member.node_id)
        self.membership_changed(session_id, member.node_id)
        entry = await self._session(session_id)
        view = public_view(record, member)
        left = encode({"op": "member_left", "session_id": session_id, "member": view})
        others = self._online_members(entry, sender.node_id)
        if member.node_id != sender.node_id and self.delivery.is_live(member.node_id):
            others.append(member.node_id)
        self.fan_out(left, others)
        return {"op": "left", "session_id": session_id, "member": view}

    async def info(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``get_session_info``, for members: answers ``session`` with one
        page of ``members`` (see :meth:`_info`)."""
        entry, me = await self._membership(sender, args["session_id"])
        return self._info(entry, me, op="session", after=args.get("after"),
                          limit=args.get("limit", DEFAULT_PAGE_LIMIT))

    def _page_budget(self, frame: dict[str, Any]) -> int:
        """Bytes left for the entries of a paged answer ``frame`` (without
        them) so that it stays under the frame limit, with room for ``id``,
        ``more`` and ``next``."""
        return self.max_message_size - len(encode(frame)) - PAGE_SLACK

    def _info(self, entry: _Entry, me: MemberRecord, op: str, after: str | None = None,
              limit: int = DEFAULT_PAGE_LIMIT) -> dict[str, Any]:
        """The ``session`` answer: the session, ``member_count``, ``you``, and
        one page of ``members``, ordered by ``name``, after the name
        ``after``: at most ``limit`` of them and never more than fit in one
        frame.  ``more`` says whether more follow; ``next`` (when ``more``) is
        the ``after`` of the next page."""
        record = entry.record
        owner = entry.members.get(record.owner_id)
        master_id = record.options.get("master_id")
        master = entry.members.get(master_id) if master_id is not None else None
        info: dict[str, Any] = {
            "op": op,
            "session_id": record.session_id,
            "created_at": record.created_at,
            "anonymous": bool(record.options.get("anonymous")),
            "anyone_can_join": bool(record.options.get("anyone_can_join")),
            "session_type": record.options.get("session_type", "group"),
            "owner": None if owner is None else public_id(owner),
            "member_count": len(entry.members),
            "members": [],
            "you": own_view(record, me),
        }
        if info["session_type"] == "game":
            info["master"] = None if master is None else public_id(master)
        ordered = sorted(entry.members.values(), key=public_id)
        if after is not None:
            ordered = ordered[bisect_right(ordered, after, key=public_id):]
        members, more = _fill_page([public_view(record, m) for m in ordered[:limit + 1]], limit,
                                   self._page_budget(info))
        info["members"] = members
        info["more"] = more
        if more:
            info["next"] = members[-1]["name"]
        return info

    async def reveal(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``reveal_anonymity``: the caller is no longer anonymous in this
        session (its alias stays valid as a name).  Answers ``revealed``;
        other online members get ``member_revealed``."""
        session_id = args["session_id"]
        entry, me = await self._membership(sender, session_id)
        record = entry.record
        if me.anonymous:
            updated = await self.store.update_member(session_id, sender.node_id, False, me.alias)
            if updated is None:
                self.membership_changed(session_id)
                raise FrameError("not_a_member", f"you are not a member of session {session_id!r}")
            self.membership_changed(session_id, sender.node_id, updated)
            me = updated
            entry = await self._session(session_id)
            self._event(entry, {"op": "member_revealed", "session_id": session_id, "alias": me.alias,
                                "member": public_view(record, me)}, sender.node_id)
        return {"op": "revealed", "session_id": session_id, "member": own_view(record, me)}

    async def set_master(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``set_master`` (owner only, game sessions): the member named by
        ``node_id`` or ``alias`` becomes master.  Answers ``master``; other
        online members get ``master_changed``."""
        session_id = args["session_id"]
        entry = await self._session(session_id)
        record = entry.record
        if sender.node_id != record.owner_id:
            raise FrameError("not_allowed", "only the session's owner sets the master")
        if record.options.get("session_type") != "game":
            raise FrameError("not_a_game", f"session {session_id!r} is not a game session")
        if "node_id" not in args and "alias" not in args:
            raise FrameError("bad_frame", "set_master needs node_id or alias")
        member = self._named(entry, args, sender.node_id)
        if member is None:
            raise FrameError("no_such_member", "no such member in this session")
        updated = await self.store.update_session(session_id, {**record.options, "master_id": member.node_id})
        self.membership_changed(session_id)
        if updated is None:
            raise FrameError("no_such_session", f"no session {session_id!r}")
        entry = await self._session(session_id)
        master = public_id(member)
        self._event(entry, {"op": "master_changed", "session_id": session_id, "master": master},
                    sender.node_id)
        return {"op": "master", "session_id": session_id, "master": master}

    async def my_sessions(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """``my_sessions``: the sessions the caller is a member of, with its
        cursor and the stream's last seq, one page at a time: ordered by
        ``session_id``, after ``after``, at most ``limit`` and never more
        than fit in one frame; ``more`` and ``next`` as for
        ``get_session_info``."""
        limit = args.get("limit", DEFAULT_PAGE_LIMIT)
        after = args.get("after")
        memberships = sorted(await self.store.sessions_of_node(sender.node_id), key=lambda m: m.session_id)
        if after is not None:
            memberships = memberships[bisect_right(memberships, after, key=lambda m: m.session_id):]
        out = []
        for m in memberships[:limit + 1]:
            page = await self.store.fetch_session(m.session_id, sender.node_id, m.acked_seq, 1)
            out.append({"session_id": m.session_id, "acked_seq": m.acked_seq,
                        "joined_seq": m.joined_seq, "last_seq": page.last_seq})
        answer: dict[str, Any] = {"op": "sessions", "sessions": []}
        sessions, more = _fill_page(out, limit, self._page_budget(answer))
        answer["sessions"] = sessions
        answer["more"] = more
        if more:
            answer["next"] = sessions[-1]["session_id"]
        return answer

    # -- the session stream --------------------------------------------------
    async def resolve(self, sender: Sender, msg: Message) -> Callable[[], Deferred[bytes]]:
        """Check a message with ``dest_session_id`` against the session's
        rules and members; a call that stores and delivers it (and fires with
        the ``accepted`` frame, with ``session_seq`` when it went to the
        stream)."""
        session_id = msg.dest_session_id
        assert session_id is not None
        entry = await self._entry(session_id)
        if entry is None:
            raise FrameError("unknown_destination", f"no session {session_id!r}", msg.id)
        me = entry.members.get(sender.node_id)
        if me is None and sender.app:
            # the app's backend (the server API) speaks to any session under its own name
            me = MemberRecord(session_id, sender.node_id, None, False, sender.node_id, 0, 0, 0)
        if me is None:
            raise FrameError("not_a_member", f"you are not a member of session {session_id!r}", msg.id)
        src_id = public_id(me)
        options = entry.record.options
        master_id = options.get("master_id") if options.get("session_type") == "game" else None
        restricted = master_id is not None and sender.node_id != master_id and not sender.app
        if msg.dest_id is not None:
            target = self._resolve(entry, msg.dest_id)
            if target is None:
                raise FrameError("unknown_destination", f"no member {msg.dest_id!r} in session {session_id!r}",
                                 msg.id)
            if restricted and target.node_id != master_id:
                raise FrameError("not_allowed", "in a game session your messages go to the master only", msg.id)
            return partial(self.router.send_to_nodes, sender, msg, [target.node_id],
                           src_id=src_id, omit_client=me.anonymous)
        if restricted:
            if master_id not in entry.members:
                raise FrameError("unknown_destination", "this game session has no master", msg.id)
            return partial(self.router.send_to_nodes, sender, msg, [master_id],
                           src_id=src_id, omit_client=me.anonymous)
        return lambda: ensureDeferred(self._broadcast(sender, msg, entry, me))

    async def _broadcast(self, sender: Sender, msg: Message, entry: _Entry, me: MemberRecord) -> bytes:
        session_id = entry.record.session_id
        client_id = None if me.anonymous else sender.client_id
        body = delivery_body(msg, public_id(me), client_id, now_ms(self.clock))
        check_deliverable(body, self.max_message_size, msg.id)
        others = len(entry.members) - (1 if sender.node_id in entry.members else 0)
        online = self._online_members(entry, sender.node_id)
        if msg.ephemeral:
            self.fan_out(body, online)
            return accepted_frame(msg, others, len(online))
        answer = accepted_frame(msg, others, len(online))
        delivery = self.config
        try:
            result = await self.store.append_session(
                session_id, sender.node_id, msg.id, body, answer, now_ms(self.clock),
                delivery.dedup_window_ms, delivery.stream_quota,
            )
        except SessionFull as e:
            if e.per_sender:
                why = (f"you sent {delivery.max_session_rows_per_sender} messages to session "
                       f"{session_id!r} in this quota window")
            else:
                why = f"session {session_id!r} took {delivery.max_session_rows} messages in this quota window"
            seconds = delivery.session_quota_window_ms // 1000
            raise FrameError("session_full", f"{why} ({seconds} s): nothing was stored; send again later",
                             msg.id) from None
        seq = result.seqs.get(session_id)
        if seq is None:  # the id was first used for a message elsewhere: that one's answer
            return result.answer
        if not result.duplicate:
            self.rows_stored += 1
            # online members are looked up again (without waiting, so that
            # broadcasts go out in the order they were stored): some may have
            # joined or connected while the row was being stored
            current = self._cache.get(session_id) or entry
            self.fan_out(with_session_seq(body, seq), self._online_members(current, sender.node_id))
            if self.push is not None and msg.push:
                # the offline members are picked out by the scheduler, on the next reactor turn
                self.push.copies_stored(current.members, exclude=sender.node_id)
        return _answer_with_session_seq(result.answer, seq)

    async def sync(
        self, conn: Connection, session_id: str, after: int | None, limit: int, max_queued: int,
        rows: int | None = None,
    ) -> dict[str, Any]:
        """Send ``conn`` up to ``limit`` stream rows after ``after`` (default:
        the member's acked cursor), each with ``session_seq``, read from the
        store ``rows`` at a time (default: all at once); the ``synced`` frame
        with ``session_id``.  Stops early (``more``) while more than
        ``max_queued`` bytes wait for the socket."""
        sender = Sender(conn.node_id, conn.client_id)
        _, me = await self._membership(sender, session_id)
        if after is None:
            after = me.acked_seq
        # (an after below joined_seq starts there; one above it is checked as is)
        return await write_rows(
            conn, partial(self.store.fetch_session, session_id, conn.node_id), max(after, me.joined_seq),
            limit=limit, rows=rows or limit, max_queued=max_queued, extra={"session_id": session_id},
            splice=with_session_seq, where=f"session {session_id!r}",
        )

    async def sync_all(self, conn: Connection, rows: int, max_queued: int, frame_id: str | None) -> int:
        """The sessions' part of a full ``sync``: for every session ``conn``'s
        node is a member of with rows past its cursor (its acked seq, or
        where it joined), write those rows and then their ``synced`` frame
        (with ``session_id`` and ``frame_id``), waiting for the socket to
        drain while it is behind.  How many sessions had rows."""
        parts = 0
        memberships = sorted(await self.store.sessions_of_node(conn.node_id), key=lambda m: m.session_id)
        for m in memberships:
            after = max(m.acked_seq, m.joined_seq)
            synced = await write_rows(
                conn, partial(self.store.fetch_session, m.session_id, conn.node_id), after, limit=None,
                rows=rows, max_queued=max_queued, extra={"session_id": m.session_id},
                splice=with_session_seq,
            )
            if synced["last_seq"] <= after and "gap" not in synced:
                continue  # nothing past the cursor
            if frame_id is not None:
                synced["id"] = frame_id
            conn.send(encode(synced))
            parts += 1
        return parts

    async def ack(self, sender: Sender, session_id: str, upto: int) -> dict[str, Any]:
        """Move the member's cursor up to ``upto`` (never down); the ``acked``
        frame with the new cursor.  An ``upto`` beyond the stream's last seq
        is refused with ``bad_cursor``, as for an inbox."""
        await self._membership(sender, session_id)
        state = await self.store.fetch_session(session_id, sender.node_id, upto, 1)
        check_cursor("upto", upto, state.last_seq, f"session {session_id!r}")
        acked = await self.store.ack_session(session_id, sender.node_id, upto)
        entry = self._cache.get(session_id)
        member = entry.members.get(sender.node_id) if entry is not None else None
        if member is not None and member.acked_seq != acked:
            self.membership_changed(session_id, sender.node_id, replace(member, acked_seq=acked), announce=False)
        return {"op": "acked", "session_id": session_id, "upto": acked}


# -- HTTP -----------------------------------------------------------------------
_BOOL_ARGS = frozenset({"anonymous", "anyone_can_join"})
_INT_ARGS = frozenset({"limit"})


def http_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``op`` from an HTTP request, validated like the
    control frame's.  Arguments the op does not take (``auth_key``, a cache
    buster) are ignored.  Raises :class:`FrameError` (``bad_frame``)."""
    from allspark.web import HTTPError, parse_bool

    spec = CONTROL_OPS[op]
    out: dict[str, Any] = {}
    for name, (check, required) in spec.items():
        if name not in args or args[name] is None or args[name] == "":
            if required:
                raise FrameError("bad_frame", f"{op} needs {name!r}")
            continue
        try:
            value = args[name]
            if name in _BOOL_ARGS:
                out[name] = parse_bool(args, name)
                continue
            if name in _INT_ARGS and isinstance(value, str):
                value = int(value) if value.isdigit() and len(value) < 20 else value
            out[name] = check(value)
        except HTTPError as e:
            raise FrameError("bad_frame", e.message) from None
        except ValueError as e:
            raise FrameError("bad_frame", str(e)) from None
    return out


def session_resources(server: "Server") -> dict[bytes, resource.Resource]:
    """``/create_session``, ``/join_session``, ``/unjoin_session``,
    ``/get_session_info``, ``/reveal_anonymity``, ``/set_master``,
    ``/my_sessions``: GET with a query string or POST with a form or JSON
    body, ``auth_key`` required.  The answer is the control op's answer
    without ``op``; refusals map to 400/401/403/404/409."""
    from allspark.web import HTTPError, JSONEndpoint, authenticate

    def endpoint(op: str) -> JSONEndpoint:
        async def handler(request: IRequest, args: dict[str, Any]) -> dict[str, Any]:
            identity = authenticate(server, args)
            sender = Sender(identity.node_id, identity.client_id)
            sessions: Sessions = server.sessions
            if op == "presence" and args.get("subscribe") not in (None, ""):
                raise HTTPError(400, "bad_frame", "subscribe needs a WebSocket connection (the presence op)")
            try:
                answer = await sessions.control(sender, Control(op, None, http_args(op, args)))
            except FrameError as e:
                raise HTTPError(HTTP_STATUS.get(e.code, 400), e.code, e.message) from None
            answer.pop("op", None)
            return answer

        return JSONEndpoint(handler)

    return {op.encode(): endpoint(op) for op in server.sessions.ops()}
