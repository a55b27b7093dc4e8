"""A dict-backed :class:`~allspark.store.Store` for unit tests and throwaway runs.

Every method does its work at once and returns an already-fired Deferred, so
submission order is trivially the order of application.  Nothing survives the
process.  The semantics (seq allocation, de-duplication, paging, purge) are
the same as the SQLite and MongoDB backends': the contract suite in
``tests/store/test_contract.py`` runs against all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from allspark.store import (
    AppendResult,
    DuplicateSession,
    InboxFull,
    InboxPage,
    InboxQuota,
    MemberRecord,
    SessionFull,
    LocationRecord,
    PushJob,
    PushTarget,
    ServerRecord,
    SessionRecord,
    StoredMessage,
    StoreError,
    StreamQuota,
    quota_window_end,
)

_T = TypeVar("_T")


@dataclass
class _Stream:
    """Per-inbox or per-session-stream state: counters and rows by seq."""

    last_seq: int = 0
    purged_upto: int = 0
    #: seq -> (sender_id, message); dicts keep insertion order, which is seq order.
    rows: dict[int, tuple[str, StoredMessage]] = field(default_factory=dict)
    #: sender_id -> how many of ``rows`` it sent (inboxes only: their quota)
    by_sender: dict[str, int] = field(default_factory=dict)

    def forget(self, seqs: list[int]) -> None:
        """Delete the rows ``seqs`` (all present), keeping ``by_sender`` true."""
        for seq in seqs:
            sender, _ = self.rows.pop(seq)
            left = self.by_sender.get(sender, 0) - 1
            if left > 0:
                self.by_sender[sender] = left
            else:
                self.by_sender.pop(sender, None)


@dataclass
class _Session:
    record: SessionRecord
    stream: _Stream = field(default_factory=_Stream)
    members: dict[str, MemberRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class _Dedup:
    created_at: int
    seqs: dict[str, int]
    answer: bytes


@dataclass
class _PushState:
    """One node's push row: its target, mute flag, schedule and lease."""

    target: PushTarget | None = None
    muted: bool = False
    due_ms: int | None = None
    gen: int = 0
    lease_owner: str | None = None
    lease_until_ms: int = 0
    last_sent_ms: int | None = None
    attempts: int = 0


def _page(stream: _Stream | None, skip_sender: str | None, after: int, limit: int) -> InboxPage:
    """One page of ``stream`` after ``after``, skipping rows of ``skip_sender``."""
    if stream is None:
        return InboxPage([], 0, 0, after)
    messages: list[StoredMessage] = []
    scanned = after
    for seq, (sender, msg) in stream.rows.items():
        if seq <= after:
            continue
        if len(messages) >= limit:
            break
        scanned = seq
        if sender != skip_sender:
            messages.append(msg)
    if len(messages) >= limit:
        scanned = messages[-1].seq if messages else after
    return InboxPage(messages, stream.last_seq, stream.purged_upto, scanned)


class MemoryStore:
    """The in-memory store.  ``MemoryStore()`` needs no reactor."""

    def __init__(self) -> None:
        self._nodes: dict[str, str | None] = {}
        self._inboxes: dict[str, _Stream] = {}
        self._dedup: dict[tuple[str, str], _Dedup] = {}
        self._sessions: dict[str, _Session] = {}
        #: (session_id, sender_id or "" for the whole session) -> (window end, rows)
        self._stream_quota: dict[tuple[str, str], tuple[int, int]] = {}
        self._servers: dict[str, ServerRecord] = {}
        self._locations: set[LocationRecord] = set()
        self._push: dict[str, _PushState] = {}
        self._revoked: dict[str, int] = {}

    @staticmethod
    def _run(fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Call ``fn`` now; its result or exception as a fired Deferred."""
        try:
            return succeed(fn(*args))
        except Exception:
            return fail(Failure())

    # -- life cycle -------------------------------------------------------
    def start(self) -> Deferred[None]:
        """Nothing to open."""
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Nothing to release; the data stays readable until garbage-collected."""
        return succeed(None)

    # -- nodes ------------------------------------------------------------
    def remember_node(self, node_id: str, client_id: str | None, now_ms: int) -> Deferred[None]:
        """Record ``node_id`` as belonging to ``client_id``."""
        self._nodes[node_id] = client_id
        return succeed(None)

    def get_node(self, node_id: str) -> Deferred[tuple[str, str | None] | None]:
        """``(node_id, client_id)`` or None."""
        if node_id not in self._nodes:
            return succeed(None)
        return succeed((node_id, self._nodes[node_id]))

    def nodes_of_client(self, client_id: str) -> Deferred[list[str]]:
        """Every node remembered for ``client_id``, sorted."""
        return succeed(sorted(n for n, c in self._nodes.items() if c == client_id))

    # -- de-duplication ----------------------------------------------------
    def _seen(
        self, sender_id: str, dedup_id: str | None, now_ms: int, window_ms: int
    ) -> AppendResult | None:
        if dedup_id is None:
            return None
        entry = self._dedup.get((sender_id, dedup_id))
        if entry is None or now_ms - entry.created_at >= window_ms:
            return None
        return AppendResult(True, dict(entry.seqs), entry.answer)

    def _remember(
        self, sender_id: str, dedup_id: str | None, seqs: dict[str, int], answer: bytes, now_ms: int
    ) -> None:
        if dedup_id is not None:
            self._dedup[(sender_id, dedup_id)] = _Dedup(now_ms, dict(seqs), answer)

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
        """Store one copy per (distinct) recipient; see :meth:`Store.append_inbox`."""
        seen = self._seen(sender_id, dedup_id, now_ms, dedup_window_ms)
        if seen is not None:
            return succeed(seen)
        targets = list(dict.fromkeys(recipients))
        if quota is not None:
            full, per_sender = [], False
            for node_id in targets:
                inbox = self._inboxes.get(node_id)
                if inbox is None:
                    continue
                if len(inbox.rows) >= quota.per_inbox:
                    full.append(node_id)
                elif inbox.by_sender.get(sender_id, 0) >= quota.per_sender:
                    full.append(node_id)
                    per_sender = True
            if full:
                return fail(InboxFull(full, per_sender))
        body = bytes(body)
        seqs: dict[str, int] = {}
        for node_id in targets:
            inbox = self._inboxes.get(node_id)
            if inbox is None:
                inbox = self._inboxes[node_id] = _Stream()
            inbox.last_seq += 1
            seq = inbox.last_seq
            inbox.rows[seq] = (sender_id, StoredMessage(seq, body, now_ms))
            inbox.by_sender[sender_id] = inbox.by_sender.get(sender_id, 0) + 1
            seqs[node_id] = seq
        self._remember(sender_id, dedup_id, seqs, answer, now_ms)
        return succeed(AppendResult(False, seqs, answer))

    def fetch_inbox(self, node_id: str, after: int, limit: int) -> Deferred[InboxPage]:
        """A page of ``node_id``'s inbox."""
        return succeed(_page(self._inboxes.get(node_id), None, after, limit))

    def ack_inbox(self, node_id: str, upto: int) -> Deferred[int]:
        """Delete rows with ``seq <= upto``; how many went."""
        inbox = self._inboxes.get(node_id)
        if inbox is None:
            return succeed(0)
        gone = [seq for seq in inbox.rows if seq <= upto]
        inbox.forget(gone)
        return succeed(len(gone))

    def inbox_state(self, node_id: str) -> Deferred[tuple[int, int]]:
        """``(last_seq, purged_upto)``."""
        inbox = self._inboxes.get(node_id)
        if inbox is None:
            return succeed((0, 0))
        return succeed((inbox.last_seq, inbox.purged_upto))

    # -- retention --------------------------------------------------------
    def purge(self, stored_before_ms: int, dedup_before_ms: int) -> Deferred[int]:
        """Drop old rows (advancing ``purged_upto``) and old de-dup entries."""
        count = 0
        streams = list(self._inboxes.values()) + [s.stream for s in self._sessions.values()]
        for stream in streams:
            old = [seq for seq, (_, msg) in stream.rows.items() if msg.stored_at < stored_before_ms]
            stream.forget(old)
            if old:
                stream.purged_upto = max(stream.purged_upto, max(old))
            count += len(old)
        for key in [k for k, v in self._dedup.items() if v.created_at < dedup_before_ms]:
            del self._dedup[key]
        for qkey in [k for k, (end, _) in self._stream_quota.items() if end < dedup_before_ms]:
            del self._stream_quota[qkey]
        return succeed(count)

    # -- sessions ---------------------------------------------------------
    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise StoreError(f"no such session: {session_id!r}")
        return session

    def create_session(
        self, session_id: str, owner_id: str, options: dict[str, Any], now_ms: int
    ) -> Deferred[SessionRecord]:
        """Create a session or fail with :class:`DuplicateSession`."""
        if session_id in self._sessions:
            return fail(DuplicateSession(session_id))
        record = SessionRecord(session_id, owner_id, now_ms, dict(options))
        self._sessions[session_id] = _Session(record)
        return succeed(record)

    def get_session(self, session_id: str) -> Deferred[SessionRecord | None]:
        """The session or None."""
        session = self._sessions.get(session_id)
        return succeed(None if session is None else session.record)

    def update_session(
        self, session_id: str, options: dict[str, Any]
    ) -> Deferred[SessionRecord | None]:
        """Replace the options."""
        session = self._sessions.get(session_id)
        if session is None:
            return succeed(None)
        session.record = replace(session.record, options=dict(options))
        return succeed(session.record)

    def delete_session(self, session_id: str) -> Deferred[None]:
        """Remove the session, its members, its stream and its quota windows."""
        self._sessions.pop(session_id, None)
        for key in [k for k in self._stream_quota if k[0] == session_id]:
            del self._stream_quota[key]
        return succeed(None)

    def add_member(
        self,
        session_id: str,
        node_id: str,
        client_id: str | None,
        anonymous: bool,
        alias: str,
        now_ms: int,
    ) -> Deferred[MemberRecord]:
        """Add a member (idempotent); :class:`StoreError` for an unknown session."""
        return self._run(self._add_member, session_id, node_id, client_id, anonymous, alias, now_ms)

    def _add_member(
        self,
        session_id: str,
        node_id: str,
        client_id: str | None,
        anonymous: bool,
        alias: str,
        now_ms: int,
    ) -> MemberRecord:
        session = self._session(session_id)
        member = session.members.get(node_id)
        if member is None:
            last = session.stream.last_seq
            member = MemberRecord(
                session_id, node_id, client_id, bool(anonymous), alias, now_ms, last, last
            )
            session.members[node_id] = member
        return member

    def update_member(
        self, session_id: str, node_id: str, anonymous: bool, alias: str
    ) -> Deferred[MemberRecord | None]:
        """Change anonymity and alias."""
        session = self._sessions.get(session_id)
        member = None if session is None else session.members.get(node_id)
        if session is None or member is None:
            return succeed(None)
        member = replace(member, anonymous=bool(anonymous), alias=alias)
        session.members[node_id] = member
        return succeed(member)

    def remove_member(self, session_id: str, node_id: str) -> Deferred[bool]:
        """Remove a member; whether it was one."""
        session = self._sessions.get(session_id)
        if session is None:
            return succeed(False)
        return succeed(session.members.pop(node_id, None) is not None)

    def get_members(self, session_id: str) -> Deferred[list[MemberRecord]]:
        """Members by join time, then node_id."""
        session = self._sessions.get(session_id)
        if session is None:
            return succeed([])
        return succeed(sorted(session.members.values(), key=lambda m: (m.joined_at, m.node_id)))

    def sessions_of_node(self, node_id: str) -> Deferred[list[MemberRecord]]:
        """Memberships of ``node_id`` by join time, then session_id."""
        found = [s.members[node_id] for s in self._sessions.values() if node_id in s.members]
        return succeed(sorted(found, key=lambda m: (m.joined_at, m.session_id)))

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
        """Append a stream row; :class:`StoreError` for an unknown session,
        :class:`SessionFull` over the ``quota``."""
        return self._run(
            self._append_session,
            session_id, sender_id, dedup_id, body, answer, now_ms, dedup_window_ms, quota,
        )

    def _append_session(
        self,
        session_id: str,
        sender_id: str,
        dedup_id: str | None,
        body: bytes,
        answer: bytes,
        now_ms: int,
        dedup_window_ms: int,
        quota: StreamQuota | None,
    ) -> AppendResult:
        seen = self._seen(sender_id, dedup_id, now_ms, dedup_window_ms)
        if seen is not None:
            return seen
        stream = self._session(session_id).stream
        if quota is not None:
            end = quota_window_end(now_ms, quota.window_ms)
            counts = []
            for key, limit in (((session_id, ""), quota.per_session),
                               ((session_id, sender_id), quota.per_sender)):
                window_end, rows = self._stream_quota.get(key, (end, 0))
                if window_end < end:  # a later window: start counting again
                    window_end, rows = end, 0
                if rows >= limit:
                    raise SessionFull(session_id, per_sender=bool(key[1]))
                counts.append((key, window_end, rows + 1))
            for key, window_end, rows in counts:
                self._stream_quota[key] = (window_end, rows)
        stream.last_seq += 1
        seq = stream.last_seq
        stream.rows[seq] = (sender_id, StoredMessage(seq, bytes(body), now_ms))
        seqs = {session_id: seq}
        self._remember(sender_id, dedup_id, seqs, answer, now_ms)
        return AppendResult(False, seqs, answer)

    def fetch_session(
        self, session_id: str, reader_id: str, after: int, limit: int
    ) -> Deferred[InboxPage]:
        """A member's page of the stream (never at or below its ``joined_seq``)."""
        session = self._sessions.get(session_id)
        if session is None:
            return succeed(InboxPage([], 0, 0, after))
        member = session.members.get(reader_id)
        if member is not None:
            after = max(after, member.joined_seq)
        return succeed(_page(session.stream, reader_id, after, limit))

    def ack_session(self, session_id: str, node_id: str, upto: int) -> Deferred[int]:
        """Move the member's cursor up (clamped to ``last_seq``); 0 for a non-member."""
        session = self._sessions.get(session_id)
        member = None if session is None else session.members.get(node_id)
        if session is None or member is None:
            return succeed(0)
        acked = max(member.acked_seq, min(upto, session.stream.last_seq))
        if acked != member.acked_seq:
            session.members[node_id] = replace(member, acked_seq=acked)
        return succeed(acked)

    # -- server records ---------------------------------------------------
    def get_server(self, server_id: str) -> Deferred[ServerRecord | None]:
        """See :meth:`allspark.store.Store.get_server`."""
        return succeed(self._servers.get(server_id))

    def list_servers(self) -> Deferred[list[ServerRecord]]:
        """See :meth:`allspark.store.Store.list_servers`."""
        return succeed([self._servers[k] for k in sorted(self._servers)])

    def put_server(self, record: ServerRecord, expect_holder: str | None) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.put_server`."""
        current = self._servers.get(record.server_id)
        if (current.holder if current is not None else None) != expect_holder:
            return succeed(False)
        self._servers[record.server_id] = record
        return succeed(True)

    def remove_server(self, server_id: str, holder: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_server`."""
        current = self._servers.get(server_id)
        if current is None or current.holder != holder:
            return succeed(False)
        del self._servers[server_id]
        return succeed(True)

    # -- locations ----------------------------------------------------------
    def put_location(self, record: LocationRecord) -> Deferred[None]:
        """See :meth:`allspark.store.Store.put_location`."""
        self._locations.add(record)
        return succeed(None)

    def remove_location(self, record: LocationRecord) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_location`."""
        if record not in self._locations:
            return succeed(False)
        self._locations.discard(record)
        return succeed(True)

    def drop_locations(self, server_id: str) -> Deferred[int]:
        """See :meth:`allspark.store.Store.drop_locations`."""
        gone = {r for r in self._locations if r.server_id == server_id}
        self._locations -= gone
        return succeed(len(gone))

    def list_locations(self) -> Deferred[list[LocationRecord]]:
        """See :meth:`allspark.store.Store.list_locations`."""
        return succeed(sorted(self._locations, key=lambda r: (r.node_id, r.server_id, r.epoch)))

    # -- push notifications -------------------------------------------------
    def set_push_target(self, target: PushTarget) -> Deferred[None]:
        """See :meth:`allspark.store.Store.set_push_target`."""
        self._push.setdefault(target.node_id, _PushState()).target = target
        return succeed(None)

    def get_push_target(self, node_id: str) -> Deferred[PushTarget | None]:
        """See :meth:`allspark.store.Store.get_push_target`."""
        state = self._push.get(node_id)
        return succeed(state.target if state is not None else None)

    def remove_push_target(self, node_id: str, address: str | None = None) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_push_target`."""
        state = self._push.get(node_id)
        if state is None or state.target is None:
            return succeed(False)
        if address is not None and state.target.address != address:
            return succeed(False)
        state.target = None
        return succeed(True)

    def set_push_muted(self, node_id: str, muted: bool) -> Deferred[None]:
        """See :meth:`allspark.store.Store.set_push_muted`."""
        self._push.setdefault(node_id, _PushState()).muted = muted
        return succeed(None)

    def push_muted(self, node_id: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.push_muted`."""
        state = self._push.get(node_id)
        return succeed(state is not None and state.muted)

    def schedule_push(self, node_ids: Sequence[str], due_ms: int) -> Deferred[list[str]]:
        """See :meth:`allspark.store.Store.schedule_push`."""
        scheduled: list[str] = []
        for node_id in dict.fromkeys(node_ids):
            state = self._push.get(node_id)
            if state is None or state.target is None or state.muted:
                continue
            if state.due_ms is None or due_ms < state.due_ms:
                state.due_ms = due_ms
            state.gen += 1
            scheduled.append(node_id)
        return succeed(scheduled)

    def claim_due_pushes(
        self, now_ms: int, owner: str, lease_ms: int, limit: int
    ) -> Deferred[list[PushJob]]:
        """See :meth:`allspark.store.Store.claim_due_pushes`."""
        due = sorted(
            (
                (state.due_ms, node_id)
                for node_id, state in self._push.items()
                if state.due_ms is not None
                and state.due_ms <= now_ms
                and state.target is not None
                and not state.muted
                and (state.lease_owner is None or state.lease_until_ms < now_ms)
            ),
        )
        jobs: list[PushJob] = []
        for due_ms, node_id in due[: max(limit, 0)]:
            state = self._push[node_id]
            assert state.target is not None
            state.lease_owner = owner
            state.lease_until_ms = now_ms + lease_ms
            jobs.append(
                PushJob(node_id, state.target, state.gen, due_ms, state.last_sent_ms, state.attempts)
            )
        return succeed(jobs)

    def finish_push(
        self,
        node_id: str,
        owner: str,
        gen: int,
        sent_ms: int | None,
        retry_at_ms: int | None,
        failed: bool = False,
    ) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.finish_push`."""
        state = self._push.get(node_id)
        if state is None or state.lease_owner != owner:
            return succeed(False)
        state.lease_owner = None
        state.lease_until_ms = 0
        if sent_ms is not None:
            state.last_sent_ms = sent_ms
            state.attempts = 0
        if failed:
            state.attempts += 1
        if retry_at_ms is not None:
            state.due_ms = retry_at_ms
        elif state.gen == gen:
            state.due_ms = None
        return succeed(True)

    # -- revocations ----------------------------------------------------------
    def revoke_node(self, node_id: str, until_ms: int) -> Deferred[None]:
        """See :meth:`allspark.store.Store.revoke_node`."""
        if until_ms > 0:
            self._revoked[node_id] = until_ms
        else:
            self._revoked.pop(node_id, None)
        return succeed(None)

    def revoked_until(self, node_id: str) -> Deferred[int]:
        """See :meth:`allspark.store.Store.revoked_until`."""
        return succeed(self._revoked.get(node_id, 0))
