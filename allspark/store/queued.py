"""The Store methods of the backends that queue every operation for their
next batch (SQLite and PostgreSQL).

Such a backend writes one function per operation, ``fn(cursor, *args)``,
named ``_op_<method>``, collects them with :func:`operations`, and queues one
with ``_submit(fn, *args)``, which answers a Deferred; it runs the queued
functions of a reactor turn in one transaction (the group commit).
:class:`QueuedStore` is every :class:`allspark.store.Store` method written once
as a ``_submit`` of the backend's function of the same name, so that the
backends differ only in their functions and their batching.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred

from allspark.metrics import BATCH_SECONDS_BUCKETS, BATCH_SIZE_BUCKETS, Distribution
from allspark.store import (
    AppendResult,
    InboxPage,
    InboxQuota,
    LocationRecord,
    MemberRecord,
    PushJob,
    PushTarget,
    ServerRecord,
    SessionRecord,
    StreamQuota,
)


def claimed_jobs(rows: Sequence[Sequence[Any]]) -> list[PushJob]:
    """The rows a claim returned (node_id, target JSON, gen, due_ms,
    last_sent_ms, attempts) as jobs, in due order (then node_id): an
    ``UPDATE ... RETURNING`` does not keep its subquery's order."""
    jobs = (PushJob(r[0], PushTarget.from_json(r[1]), r[2], r[3], r[4], r[5]) for r in rows)
    return sorted(jobs, key=lambda j: (j.due_ms, j.node_id))


def operations(namespace: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """The ``_op_<method>`` functions of a backend module's ``namespace``
    (its ``globals()``), by Store method name."""
    return {name[len("_op_"):]: fn for name, fn in namespace.items() if name.startswith("_op_")}


class QueuedStore(ABC):
    """The Store interface over a backend's queued operation functions."""

    #: the backend's operation functions by Store method name (:func:`operations`)
    OPS: Mapping[str, Callable[..., Any]]
    #: operations per batch and seconds per batch, read by /metrics (made on
    #: the first batch: see :meth:`_observe_batch`)
    batch_sizes: Distribution | None = None
    batch_seconds: Distribution | None = None

    def _observe_batch(self, size: int, seconds: float) -> None:
        """Count one batch of ``size`` operations that took ``seconds``
        (the backend calls it once per batch it ran)."""
        sizes, took = self.batch_sizes, self.batch_seconds
        if sizes is None or took is None:
            sizes = self.batch_sizes = Distribution(BATCH_SIZE_BUCKETS)
            took = self.batch_seconds = Distribution(BATCH_SECONDS_BUCKETS)
        sizes.observe(size)
        took.observe(seconds)

    @abstractmethod
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Queue ``fn(cursor, *args)`` for the next batch; its result as a Deferred."""

    @abstractmethod
    def _encode_options(self, options: dict[str, Any]) -> Any:
        """Session options as the backend's functions take them."""

    # -- nodes ------------------------------------------------------------
    def remember_node(self, node_id: str, client_id: str | None, now_ms: int) -> Deferred[None]:
        """See :meth:`allspark.store.Store.remember_node`."""
        return self._submit(self.OPS["remember_node"], node_id, client_id, now_ms)

    def get_node(self, node_id: str) -> Deferred[tuple[str, str | None] | None]:
        """See :meth:`allspark.store.Store.get_node`."""
        return self._submit(self.OPS["get_node"], node_id)

    def nodes_of_client(self, client_id: str) -> Deferred[list[str]]:
        """See :meth:`allspark.store.Store.nodes_of_client`."""
        return self._submit(self.OPS["nodes_of_client"], client_id)

    # -- server records ---------------------------------------------------
    def get_server(self, server_id: str) -> Deferred[ServerRecord | None]:
        """See :meth:`allspark.store.Store.get_server`."""
        return self._submit(self.OPS["get_server"], server_id)

    def list_servers(self) -> Deferred[list[ServerRecord]]:
        """See :meth:`allspark.store.Store.list_servers`."""
        return self._submit(self.OPS["list_servers"])

    def put_server(self, record: ServerRecord, expect_holder: str | None) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.put_server`."""
        return self._submit(self.OPS["put_server"], record, expect_holder)

    def remove_server(self, server_id: str, holder: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_server`."""
        return self._submit(self.OPS["remove_server"], server_id, holder)

    # -- locations ----------------------------------------------------------
    def put_location(self, record: LocationRecord) -> Deferred[None]:
        """See :meth:`allspark.store.Store.put_location`."""
        return self._submit(self.OPS["put_location"], record)

    def remove_location(self, record: LocationRecord) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_location`."""
        return self._submit(self.OPS["remove_location"], record)

    def drop_locations(self, server_id: str) -> Deferred[int]:
        """See :meth:`allspark.store.Store.drop_locations`."""
        return self._submit(self.OPS["drop_locations"], server_id)

    def list_locations(self) -> Deferred[list[LocationRecord]]:
        """See :meth:`allspark.store.Store.list_locations`."""
        return self._submit(self.OPS["list_locations"])

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
        """See :meth:`allspark.store.Store.append_inbox`."""
        return self._submit(
            self.OPS["append_inbox"],
            sender_id, dedup_id, recipients, body, answer, now_ms, dedup_window_ms, quota,
        )

    def fetch_inbox(self, node_id: str, after: int, limit: int) -> Deferred[InboxPage]:
        """See :meth:`allspark.store.Store.fetch_inbox`."""
        return self._submit(self.OPS["fetch_inbox"], node_id, after, limit)

    def ack_inbox(self, node_id: str, upto: int) -> Deferred[int]:
        """See :meth:`allspark.store.Store.ack_inbox`."""
        return self._submit(self.OPS["ack_inbox"], node_id, upto)

    def inbox_state(self, node_id: str) -> Deferred[tuple[int, int]]:
        """See :meth:`allspark.store.Store.inbox_state`."""
        return self._submit(self.OPS["inbox_state"], node_id)

    def purge(self, stored_before_ms: int, dedup_before_ms: int) -> Deferred[int]:
        """See :meth:`allspark.store.Store.purge`."""
        return self._submit(self.OPS["purge"], stored_before_ms, dedup_before_ms)

    # -- sessions ---------------------------------------------------------
    def create_session(
        self, session_id: str, owner_id: str, options: dict[str, Any], now_ms: int
    ) -> Deferred[SessionRecord]:
        """See :meth:`allspark.store.Store.create_session`."""
        return self._submit(self.OPS["create_session"], session_id, owner_id, self._encode_options(options), now_ms)

    def get_session(self, session_id: str) -> Deferred[SessionRecord | None]:
        """See :meth:`allspark.store.Store.get_session`."""
        return self._submit(self.OPS["get_session"], session_id)

    def update_session(
        self, session_id: str, options: dict[str, Any]
    ) -> Deferred[SessionRecord | None]:
        """See :meth:`allspark.store.Store.update_session`."""
        return self._submit(self.OPS["update_session"], session_id, self._encode_options(options))

    def delete_session(self, session_id: str) -> Deferred[None]:
        """See :meth:`allspark.store.Store.delete_session`."""
        return self._submit(self.OPS["delete_session"], session_id)

    def add_member(
        self,
        session_id: str,
        node_id: str,
        client_id: str | None,
        anonymous: bool,
        alias: str,
        now_ms: int,
    ) -> Deferred[MemberRecord]:
        """See :meth:`allspark.store.Store.add_member`."""
        return self._submit(self.OPS["add_member"], session_id, node_id, client_id, anonymous, alias, now_ms)

    def update_member(
        self, session_id: str, node_id: str, anonymous: bool, alias: str
    ) -> Deferred[MemberRecord | None]:
        """See :meth:`allspark.store.Store.update_member`."""
        return self._submit(self.OPS["update_member"], session_id, node_id, anonymous, alias)

    def remove_member(self, session_id: str, node_id: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_member`."""
        return self._submit(self.OPS["remove_member"], session_id, node_id)

    def get_members(self, session_id: str) -> Deferred[list[MemberRecord]]:
        """See :meth:`allspark.store.Store.get_members`."""
        return self._submit(self.OPS["get_members"], session_id)

    def sessions_of_node(self, node_id: str) -> Deferred[list[MemberRecord]]:
        """See :meth:`allspark.store.Store.sessions_of_node`."""
        return self._submit(self.OPS["sessions_of_node"], node_id)

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
        """See :meth:`allspark.store.Store.append_session`."""
        return self._submit(
            self.OPS["append_session"],
            session_id, sender_id, dedup_id, body, answer, now_ms, dedup_window_ms, quota,
        )

    def fetch_session(
        self, session_id: str, reader_id: str, after: int, limit: int
    ) -> Deferred[InboxPage]:
        """See :meth:`allspark.store.Store.fetch_session`."""
        return self._submit(self.OPS["fetch_session"], session_id, reader_id, after, limit)

    def ack_session(self, session_id: str, node_id: str, upto: int) -> Deferred[int]:
        """See :meth:`allspark.store.Store.ack_session`."""
        return self._submit(self.OPS["ack_session"], session_id, node_id, upto)

    # -- push notifications -------------------------------------------------
    def set_push_target(self, target: PushTarget) -> Deferred[None]:
        """See :meth:`allspark.store.Store.set_push_target`."""
        return self._submit(self.OPS["set_push_target"], target)

    def get_push_target(self, node_id: str) -> Deferred[PushTarget | None]:
        """See :meth:`allspark.store.Store.get_push_target`."""
        return self._submit(self.OPS["get_push_target"], node_id)

    def remove_push_target(self, node_id: str, address: str | None = None) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_push_target`."""
        return self._submit(self.OPS["remove_push_target"], node_id, address)

    def set_push_muted(self, node_id: str, muted: bool) -> Deferred[None]:
        """See :meth:`allspark.store.Store.set_push_muted`."""
        return self._submit(self.OPS["set_push_muted"], node_id, muted)

    def push_muted(self, node_id: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.push_muted`."""
        return self._submit(self.OPS["push_muted"], node_id)

    def schedule_push(self, node_ids: Sequence[str], due_ms: int) -> Deferred[list[str]]:
        """See :meth:`allspark.store.Store.schedule_push`."""
        return self._submit(self.OPS["schedule_push"], list(dict.fromkeys(node_ids)), due_ms)

    def claim_due_pushes(
        self, now_ms: int, owner: str, lease_ms: int, limit: int
    ) -> Deferred[list[PushJob]]:
        """See :meth:`allspark.store.Store.claim_due_pushes`."""
        return self._submit(self.OPS["claim_due_pushes"], now_ms, owner, lease_ms, limit)

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
        return self._submit(
            self.OPS["finish_push"], node_id, owner, gen, sent_ms, retry_at_ms, failed
        )

    # -- revocations --------------------------------------------------------
    def revoke_node(self, node_id: str, until_ms: int) -> Deferred[None]:
        """See :meth:`allspark.store.Store.revoke_node`."""
        return self._submit(self.OPS["revoke_node"], node_id, until_ms)

    def revoked_until(self, node_id: str) -> Deferred[int]:
        """See :meth:`allspark.store.Store.revoked_until`."""
        return self._submit(self.OPS["revoked_until"], node_id)
