"""The store: everything Allspark keeps beyond one process's memory.

One small interface, :class:`Store`, with one contract test suite
(``tests/store/test_contract.py``) that every backend passes:

- ``memory``: a dict-backed store for unit tests and throwaway runs;
- ``sqlite``: the embedded default (WAL, one transaction per reactor turn);
- ``postgresql``: servers on several hosts sharing one database (psycopg
  through ``twisted.enterprise.adbapi``, one transaction per batch), an
  optional extra imported only when asked for;
- ``mongodb``: txmongo, an optional extra, imported only when asked for.

Every method returns a :class:`~twisted.internet.defer.Deferred`.  Operations
submitted by one process are applied in the order they were submitted, so an
``ack`` followed by a ``fetch_inbox`` never sees the acked rows again.

Message bodies are opaque ``bytes``: a JSON object as the router serialized it,
*without* its ``seq`` (the router splices the recipient's ``seq`` in on
delivery).  Times are Unix milliseconds and are always passed in by the caller,
so tests can drive them with a fake clock.

Two storage shapes, chosen for their cost:

- **inbox**: one row per recipient node, keyed ``(node_id, seq)`` with a
  per-node ``seq`` that only grows.  Used for direct messages (``dest_id``),
  user-wide messages (``dest_client_id``: one row per device) and private
  messages inside a session.
- **session stream**: one row per session message, keyed ``(session_id, seq)``,
  plus a cursor per member (``acked_seq``).  A broadcast to a 10,000-member
  session is one row, not 10,000; each member reads the stream after its own
  cursor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, Sequence, runtime_checkable

from twisted.internet.defer import Deferred


class StoreError(Exception):
    """A store operation failed for a reason the caller should report."""


class DuplicateSession(StoreError):
    """``create_session`` was given an id that exists already."""


class InboxFull(StoreError):
    """``append_inbox`` refused a message: a recipient's inbox is at its quota.

    ``node_ids`` are the recipients that were full (nothing was stored for
    any recipient).  ``per_sender`` is true when at least one of them was
    full only of the sender's own unacked messages, false when the inbox as
    a whole was full.
    """

    def __init__(self, node_ids: Sequence[str], per_sender: bool) -> None:
        super().__init__(f"inbox full: {', '.join(node_ids)}")
        self.node_ids = tuple(node_ids)
        self.per_sender = per_sender


class SessionFull(StoreError):
    """``append_session`` refused a message: the session stream's quota for
    the current window is used up (by this sender when ``per_sender``, by
    all senders together otherwise); nothing was stored."""

    def __init__(self, session_id: str, per_sender: bool) -> None:
        super().__init__(f"session stream full: {session_id}")
        self.session_id = session_id
        self.per_sender = per_sender


@dataclass(frozen=True)
class InboxQuota:
    """Bounds on unacked inbox messages, checked by :meth:`Store.append_inbox`.

    An inbox holds at most ``per_inbox`` unacked (not deleted) messages, and
    at most ``per_sender`` of them from any one sender.  An ack or retention
    frees room.
    """

    per_sender: int
    per_inbox: int


@dataclass(frozen=True)
class StreamQuota:
    """Bounds on session stream rows, checked by :meth:`Store.append_session`.

    Time is cut into fixed windows of ``window_ms`` (``[k * window_ms,
    (k + 1) * window_ms)``); within one window a session stream takes at most
    ``per_session`` rows, and at most ``per_sender`` of them from any one
    sender.  Stream rows are not deleted by acks, so a count of stored rows
    would never go down before retention: a rate is the bound that fits.
    """

    per_sender: int
    per_session: int
    window_ms: int


def quota_window_end(now_ms: int, window_ms: int) -> int:
    """The end (exclusive, ms) of the fixed quota window holding ``now_ms``."""
    return (now_ms // window_ms + 1) * window_ms


@dataclass(frozen=True)
class AppendResult:
    """What :meth:`Store.append_inbox` / :meth:`Store.append_session` did.

    ``duplicate`` is true when ``(sender_id, dedup_id)`` was seen within the
    de-duplication window: nothing was stored and ``seqs``/``answer`` are those
    of the first attempt.  ``seqs`` maps each recipient node_id (or, for a
    session stream, the session_id) to the seq its copy got.  ``answer`` is the
    opaque bytes the caller asked to remember with the first attempt (the
    ``accepted`` frame), returned unchanged on a retry.
    """

    duplicate: bool
    seqs: dict[str, int]
    answer: bytes


@dataclass(frozen=True)
class StoredMessage:
    """One stored message: its ``seq``, body bytes and the time it was stored."""

    seq: int
    body: bytes
    stored_at: int


@dataclass(frozen=True)
class InboxPage:
    """A page of a node's inbox (or a member's view of a session stream).

    ``messages`` are in ``seq`` order, all with ``seq > after``.
    ``last_seq`` is the highest seq ever assigned in this inbox/stream (0 when
    none) *whose message is readable*: every backend keeps a seq that a
    writer (this process or another) has allocated but not yet made readable
    out of it, so a reader that pages up to ``last_seq`` never steps past a
    message it could still receive (``docs/delivery.md``, "Several writers").
    ``purged_upto`` is the highest seq removed by retention rather than
    by an ack (0 when none): a reader whose cursor is below it has a gap that
    cannot be filled.  ``scanned_upto`` is the highest seq this page looked at
    (``after`` when it looked at nothing); a reader continues from it.  It may
    be above the last returned message when rows were skipped (a session
    member's own messages are skipped).
    """

    messages: list[StoredMessage]
    last_seq: int
    purged_upto: int
    scanned_upto: int


@dataclass(frozen=True)
class SessionRecord:
    """A session: its id, owner node, creation time and options.

    ``options`` holds at least ``anonymous`` (bool: members join anonymously
    by default), ``anyone_can_join`` (bool), ``session_type`` (str: ``"group"``
    or ``"game"``) and ``master_id`` (str or None: the game master's node_id).
    """

    session_id: str
    owner_id: str
    created_at: int
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemberRecord:
    """A session member.

    ``alias`` is the name other members see when ``anonymous`` is true.
    ``joined_seq`` is the stream's ``last_seq`` when the member joined: it
    never sees stream rows at or below it.  ``acked_seq`` is its cursor.
    """

    session_id: str
    node_id: str
    client_id: str | None
    anonymous: bool
    alias: str
    joined_at: int
    joined_seq: int
    acked_seq: int


@dataclass(frozen=True)
class LocationRecord:
    """Where one connection of an online node is: ``node_id`` is connected
    to server ``server_id``; ``epoch`` tells this connection from the
    node's earlier and later ones on that server (unique per connection of
    one server process).  Written when the connection opens, removed when
    it closes, dropped in bulk with its server (:meth:`Store.drop_locations`).
    """

    node_id: str
    server_id: str
    epoch: int


@dataclass(frozen=True)
class ServerRecord:
    """One server of the cluster, as it announces itself in the store.

    Written by the server at start (its identity claim), rewritten by its
    heartbeat every few seconds, removed by a clean stop.  ``holder`` names
    the process holding the identity (``<hostname>/<pid>/<random>``): only
    that process may rewrite or remove the record (see
    :meth:`Store.put_server`).  ``state`` is ``live`` or ``draining``;
    ``heartbeat_ms`` is when the holder last wrote it.
    """

    server_id: str
    holder: str
    host: str
    port: int
    proxy_address: str | None
    scheme: str
    capacity: int
    connections: int
    state: str
    heartbeat_ms: int
    started_ms: int

    def to_json(self) -> str:
        """The record as one JSON object (how the backends keep it)."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ServerRecord":
        """A record from :meth:`to_json`'s output (unknown fields ignored)."""
        data = json.loads(text)
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class PushTarget:
    """Where a node's push notifications go (one per node: the latest wins).

    ``provider`` is ``fcm``, ``apns``, ``webpush`` or ``webhook``.  ``token``
    is the device token (FCM registration token, APNs device token, or the
    app's own identifier for a webhook); for Web Push it is None and
    ``subscription`` holds the browser's PushSubscription JSON
    (``endpoint`` and ``keys`` with ``p256dh`` and ``auth``).  ``topic`` and
    ``environment`` (``production`` or ``development``) are APNs options.
    ``registered_ms`` is when the node registered it.
    """

    node_id: str
    provider: str
    token: str | None
    subscription: dict[str, Any] | None
    topic: str | None
    environment: str | None
    registered_ms: int

    @property
    def address(self) -> str:
        """What identifies this target at its provider: the token, or the
        Web Push subscription's endpoint URL.  A provider that reports an
        address dead removes the target only if it still has that address
        (:meth:`Store.remove_push_target`), never a newer registration."""
        if self.token is not None:
            return self.token
        return str((self.subscription or {}).get("endpoint", ""))

    def to_json(self) -> str:
        """The target as one JSON object (how the SQL backends keep it)."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "PushTarget":
        """A target from :meth:`to_json`'s output (unknown fields ignored)."""
        data = json.loads(text)
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class PushJob:
    """A push a server has claimed (:meth:`Store.claim_due_pushes`).

    ``gen`` counts the schedules of this node: :meth:`Store.finish_push`
    compares it to tell "nothing new since the claim" from "new copies were
    stored while the push was being sent".  ``last_sent_ms`` is when the
    node's previous push was sent (None: never), so the claimer can respect
    the coalescing window; ``attempts`` counts failed sends since the last
    success (for backoff).
    """

    node_id: str
    target: PushTarget
    gen: int
    due_ms: int
    last_sent_ms: int | None
    attempts: int


@runtime_checkable
class Store(Protocol):
    """The persistence interface.  See the module docstring for the shapes."""

    # -- life cycle -------------------------------------------------------
    def start(self) -> Deferred[None]:
        """Open connections, create or migrate the schema, build indexes."""

    def close(self) -> Deferred[None]:
        """Finish what was submitted, then release every resource."""

    # -- nodes ------------------------------------------------------------
    def remember_node(
        self, node_id: str, client_id: str | None, now_ms: int
    ) -> Deferred[None]:
        """Record that ``node_id`` exists (and belongs to ``client_id``).

        Called on each authenticated connection.  A node seen with another
        client_id later is moved to it.
        """

    def get_node(self, node_id: str) -> Deferred[tuple[str, str | None] | None]:
        """``(node_id, client_id)`` for a node ever remembered, else None."""

    def nodes_of_client(self, client_id: str) -> Deferred[list[str]]:
        """Every node_id remembered for ``client_id``, sorted."""

    # -- inbox ------------------------------------------------------------
    def append_inbox(
        self,
        sender_id: str,
        dedup_id: str | None,
        recipients: Sequence[str],
        body: bytes,
        answer: bytes,
        now_ms: int,
        dedup_window_ms: int,
        quota: InboxQuota | None = None,
    ) -> Deferred[AppendResult]:
        """Store ``body`` once per recipient, each with its next seq.

        Atomic: either every copy is stored or none.  A node listed twice in
        ``recipients`` gets one copy.  When ``dedup_id`` is
        given and ``(sender_id, dedup_id)`` was appended less than
        ``dedup_window_ms`` before ``now_ms`` (to an inbox or a session
        stream), nothing is stored and the first attempt's seqs and answer
        are returned with ``duplicate=True``.

        With a ``quota``, a message that would take any recipient's inbox
        beyond ``quota.per_inbox`` unacked messages, or beyond
        ``quota.per_sender`` unacked messages from ``sender_id``, fails with
        :class:`InboxFull` and nothing is stored for any recipient.  The check
        is atomic with the append (across processes sharing the store), and
        comes after de-duplication: a retry of a stored message gets its
        first answer even when the inbox is full now.  Every backend counts
        unacked messages per inbox and per (inbox, sender) whether or not a
        quota is given; acks and retention lower the counts.
        """

    def fetch_inbox(self, node_id: str, after: int, limit: int) -> Deferred[InboxPage]:
        """Up to ``limit`` (>= 1) inbox messages of ``node_id`` with ``seq > after``.

        A node that never got anything has ``InboxPage([], 0, 0, after)``.
        """

    def ack_inbox(self, node_id: str, upto: int) -> Deferred[int]:
        """Delete ``node_id``'s inbox messages with ``seq <= upto``; the count."""

    def inbox_state(self, node_id: str) -> Deferred[tuple[int, int]]:
        """``(last_seq, purged_upto)`` of ``node_id``'s inbox; ``(0, 0)`` if new."""

    # -- retention --------------------------------------------------------
    def purge(self, stored_before_ms: int, dedup_before_ms: int) -> Deferred[int]:
        """Remove inbox and session-stream rows stored before
        ``stored_before_ms`` (advancing ``purged_upto``) and de-duplication
        entries older than ``dedup_before_ms``.  Returns how many message rows
        went.  Removed inbox rows no longer count against an
        :class:`InboxQuota`; stream quota windows that ended before
        ``dedup_before_ms`` are forgotten.
        """

    # -- sessions ---------------------------------------------------------
    def create_session(
        self, session_id: str, owner_id: str, options: dict[str, Any], now_ms: int
    ) -> Deferred[SessionRecord]:
        """Create a session; :class:`DuplicateSession` if the id is taken."""

    def get_session(self, session_id: str) -> Deferred[SessionRecord | None]:
        """The session, or None."""

    def update_session(
        self, session_id: str, options: dict[str, Any]
    ) -> Deferred[SessionRecord | None]:
        """Replace the session's options; the new record, or None if gone."""

    def delete_session(self, session_id: str) -> Deferred[None]:
        """Remove the session, its members and its stream."""

    def add_member(
        self,
        session_id: str,
        node_id: str,
        client_id: str | None,
        anonymous: bool,
        alias: str,
        now_ms: int,
    ) -> Deferred[MemberRecord]:
        """Add (or, when already a member, return unchanged) a member.

        A new member's ``joined_seq`` and ``acked_seq`` are the stream's
        current ``last_seq``.  :class:`StoreError` if the session does not
        exist.
        """

    def update_member(
        self, session_id: str, node_id: str, anonymous: bool, alias: str
    ) -> Deferred[MemberRecord | None]:
        """Change a member's anonymity/alias; the new record or None."""

    def remove_member(self, session_id: str, node_id: str) -> Deferred[bool]:
        """Remove a member; whether it was one."""

    def get_members(self, session_id: str) -> Deferred[list[MemberRecord]]:
        """Every member of the session, ordered by join time then node_id."""

    def sessions_of_node(self, node_id: str) -> Deferred[list[MemberRecord]]:
        """Every membership of ``node_id``."""

    def append_session(
        self,
        session_id: str,
        sender_id: str,
        dedup_id: str | None,
        body: bytes,
        answer: bytes,
        now_ms: int,
        dedup_window_ms: int,
        quota: StreamQuota | None = None,
    ) -> Deferred[AppendResult]:
        """Append one row to the session stream; ``seqs == {session_id: seq}``.

        De-duplication as in :meth:`append_inbox` (the key is shared: a retry
        is recognised whichever of the two appends it was).
        :class:`StoreError` if the session does not exist.  With a ``quota``,
        a row beyond the window's ``per_session`` rows, or beyond
        ``per_sender`` rows of ``sender_id``, fails with :class:`SessionFull`
        (after de-duplication, atomically with the append); nothing is
        stored.  Refused rows do not count.
        """

    def fetch_session(
        self, session_id: str, reader_id: str, after: int, limit: int
    ) -> Deferred[InboxPage]:
        """Up to ``limit`` (>= 1) stream rows with ``seq > after``, skipping
        rows sent by ``reader_id`` itself.  ``purged_upto`` as for an inbox.

        When ``reader_id`` is a member, ``after`` is first raised to its
        ``joined_seq`` (so ``scanned_upto`` is at least that).  A session that
        does not exist reads as ``InboxPage([], 0, 0, after)``.
        """

    def ack_session(self, session_id: str, node_id: str, upto: int) -> Deferred[int]:
        """Move the member's ``acked_seq`` up to ``upto`` (never down, never
        past ``last_seq``); returns the new ``acked_seq``, or 0 when
        ``node_id`` is not a member.  Stream rows are not deleted by an ack.
        """

    # -- server records (the cluster) --------------------------------------
    def get_server(self, server_id: str) -> Deferred[ServerRecord | None]:
        """The record of ``server_id``, or None."""

    def list_servers(self) -> Deferred[list[ServerRecord]]:
        """Every server record, by ``server_id`` (dead ones too: the caller
        judges liveness from ``heartbeat_ms``)."""

    def put_server(self, record: ServerRecord, expect_holder: str | None) -> Deferred[bool]:
        """Write ``record`` if, atomically, the stored record of its
        ``server_id`` is held by ``expect_holder`` (None: there is no
        record); whether it was written.  A compare-and-set: two processes
        claiming one identity at once cannot both succeed, and a process
        whose identity was taken (``--force`` elsewhere) stops writing."""

    def remove_server(self, server_id: str, holder: str) -> Deferred[bool]:
        """Delete the record of ``server_id`` if ``holder`` holds it; whether
        it was deleted."""

    # -- locations (which server holds which online node) -----------------
    def put_location(self, record: LocationRecord) -> Deferred[None]:
        """Record that ``record.node_id`` has a connection on
        ``record.server_id`` (idempotent for the same three fields)."""

    def remove_location(self, record: LocationRecord) -> Deferred[bool]:
        """Delete exactly this location (node, server and epoch); whether it
        existed.  A later connection of the node (another epoch) stays."""

    def drop_locations(self, server_id: str) -> Deferred[int]:
        """Delete every location of ``server_id`` (it died or restarted); how
        many."""

    def list_locations(self) -> Deferred[list[LocationRecord]]:
        """Every location, ordered by ``(node_id, server_id, epoch)``."""

    # -- push notifications (one row per node: target, mute, schedule) -----
    def set_push_target(self, target: PushTarget) -> Deferred[None]:
        """Register ``target`` for ``target.node_id``, replacing any earlier
        target of that node.  The node's mute flag and schedule are kept."""

    def get_push_target(self, node_id: str) -> Deferred[PushTarget | None]:
        """The node's registered target, or None."""

    def remove_push_target(self, node_id: str, address: str | None = None) -> Deferred[bool]:
        """Forget the node's target; when ``address`` is given, only if the
        stored target still has that :attr:`PushTarget.address` (a token a
        provider reported dead never removes a newer registration).  Whether
        a target was removed.  A pending schedule stays but is never claimed
        while there is no target."""

    def set_push_muted(self, node_id: str, muted: bool) -> Deferred[None]:
        """Mute (or unmute) pushes to ``node_id``; kept across re-registrations.
        A muted node's schedule is never claimed."""

    def push_muted(self, node_id: str) -> Deferred[bool]:
        """Whether ``node_id`` muted its pushes (False for an unknown node)."""

    def schedule_push(self, node_ids: Sequence[str], due_ms: int) -> Deferred[list[str]]:
        """Ask for a push to each of ``node_ids`` at ``due_ms``: for each node
        that has a target and is not muted, set its due time to ``due_ms``
        unless an earlier one is already set (the earliest due time wins) and
        add one to its ``gen`` (once per call, even when the node is listed
        twice).  Returns the node_ids that were scheduled, each once, in the
        order given (a node without a target, or muted, is left alone and not
        returned)."""

    def claim_due_pushes(
        self, now_ms: int, owner: str, lease_ms: int, limit: int
    ) -> Deferred[list[PushJob]]:
        """Atomically take up to ``limit`` pushes that are due (due time
        ``<= now_ms``, a target, not muted) and not leased (no lease, or its
        lease ended before ``now_ms``: a lease until ``t`` is held at ``t``),
        in due order (then node_id): each gets a lease held by ``owner`` until
        ``now_ms + lease_ms``; the due time stays until :meth:`finish_push`.
        Two processes calling this at once never get the same node; this is
        what makes one push per device per window cluster-wide."""

    def finish_push(
        self,
        node_id: str,
        owner: str,
        gen: int,
        sent_ms: int | None,
        retry_at_ms: int | None,
        failed: bool = False,
    ) -> Deferred[bool]:
        """End ``owner``'s lease on ``node_id``'s push.

        ``sent_ms``: the push was sent at that time (``last_sent_ms`` becomes
        it, ``attempts`` returns to 0).  ``failed``: the send failed
        (``attempts`` goes up by one).  ``retry_at_ms``: the push is due again
        then (a retry after a failure, or the end of the coalescing window).
        Otherwise, when the node's ``gen`` is still ``gen`` the schedule is
        cleared (done); when it moved on (copies stored since the claim) the
        schedule stays due as it is.  Returns False, changing nothing, when
        ``owner`` no longer holds the lease (it ended and another took it);
        a lease that ended but was not taken by anyone is still ``owner``'s."""

    # -- revocations (the server API's "disconnect and revoke") -----------
    def revoke_node(self, node_id: str, until_ms: int) -> Deferred[None]:
        """Refuse every auth key of ``node_id`` until ``until_ms`` (a later
        call replaces the time; 0 lifts the revocation)."""

    def revoked_until(self, node_id: str) -> Deferred[int]:
        """Until when ``node_id`` is revoked, in Unix ms (0: it is not)."""

def open_store(url: str, reactor: Any) -> Store:
    """Build (without starting) the store named by ``url``.

    ``reactor`` is the one the store schedules on (threads, timers).

    ``memory:`` (or ``memory://``), ``sqlite:///absolute/path.db`` or
    ``sqlite:relative.db``, ``postgresql://user@host:port/db`` (or
    ``postgres://``, any libpq URL), ``mongodb://...``.  Raises
    ``ValueError`` for anything else.
    """
    if url in ("memory:", "memory://", "memory"):
        from allspark.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:"):
        from allspark.store.sqlite import SQLiteStore

        path = url[len("sqlite:"):]
        if path.startswith("///"):
            path = path[2:]
        elif path.startswith("//"):
            raise ValueError(f"sqlite URL needs three slashes: {url!r}")
        if not path or path.endswith("/"):
            raise ValueError(f"sqlite URL names no file: {url!r}")
        return SQLiteStore(path, reactor)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from allspark.store.mongo import MongoStore

        return MongoStore(url, reactor)
    if url.startswith(("postgresql://", "postgres://")):
        from allspark.store.postgres import PostgresStore

        return PostgresStore(url, reactor)
    raise ValueError(
        f"unknown store URL {url!r}: use sqlite:///path, memory:, postgresql://... or mongodb://"
    )
