"""The MongoDB store, on txmongo (an optional dependency: ``pip install allspark[mongodb]``).

This module is imported only by :func:`allspark.store.open_store` for a
``mongodb://`` URL, so txmongo is needed only by those who use it.

Collections (in the database named by the URL path, default ``allspark``):

``nodes``        ``{_id: node_id, client_id, seen_at}``; index ``client_id``.
``inbox_state``  ``{_id: node_id, last_seq, purged_upto}``: the per-node counter,
                 bumped with ``find_one_and_update({$inc})``, upserted.
``inbox``        ``{node_id, seq, stored_at, body}``; unique ``(node_id, seq)``,
                 index ``stored_at``.
``sessions``     ``{_id: session_id, owner_id, created_at, options, last_seq,
                 purged_upto}``: the stream counter lives in the session.
``members``      ``{session_id, node_id, client_id, anonymous, alias, joined_at,
                 joined_seq, acked_seq}``; unique ``(session_id, node_id)``,
                 indexes for both listing orders.
``stream``       ``{session_id, seq, sender_id, stored_at, body}``; unique
                 ``(session_id, seq)``, index ``stored_at``.
``dedup``        ``{sender_id, dedup_id, created_at, pending, seqs, answer}``;
                 unique ``(sender_id, dedup_id)``, index ``created_at``.

Ordering.  The contract says one process's operations apply in submission
order.  Most operations here are several round trips, so this store runs its
operations one after another (a FIFO of Deferreds): simple and correct, but
its throughput is bounded by round-trip latency.  SQLite's group commit is the
fast path; a keyed scheduler (order per node/session) is the next step here if
MongoDB throughput matters.

Atomicity without transactions.  A standalone MongoDB has no multi-document
transactions, so:

- a multi-recipient append allocates every seq, then inserts every copy with
  one ordered ``insert_many``; if that fails, the copies already inserted are
  deleted before the error is returned (seqs may then have gaps, which the
  contract allows: seqs only grow);
- de-duplication claims ``(sender_id, dedup_id)`` first with an upsert on the
  unique index (a ``pending`` entry), so that two processes retrying the same
  message store it once; the second waits for the first's answer.

Known limit: between two *processes*, a reader can page past a seq that a
concurrent append has allocated but not inserted yet.  Within one process the
FIFO rules that out.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import unquote

from bson.binary import Binary
from pymongo.collection import ReturnDocument
from pymongo.errors import DuplicateKeyError
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.python.failure import Failure
from txmongo import filter as qf
from txmongo.connection import ConnectionPool

from allspark.logs import logger
from allspark.store import (
    AppendResult,
    DuplicateSession,
    InboxPage,
    MemberRecord,
    SessionRecord,
    StoredMessage,
    StoreError,
)

log = logger(__name__)

_T = TypeVar("_T")

DEFAULT_DATABASE = "allspark"

#: How long a retry waits for a concurrent first attempt (another process) to finish.
PENDING_WAIT_S = 5.0
_PENDING_POLL_S = 0.05

_NO_ID = {"_id": False}


def database_name(url: str) -> str:
    """The database named by a ``mongodb://`` URL's path, or ``allspark``."""
    rest = url.split("://", 1)[1] if "://" in url else url
    path = rest.split("/", 1)[1] if "/" in rest else ""
    name = unquote(path.split("?", 1)[0])
    return name or DEFAULT_DATABASE


def _by(*fields: str) -> Any:
    """An ascending txmongo sort/index specification over ``fields``."""
    spec: tuple[tuple[str, int], ...] = ()
    for name in fields:
        spec += qf.ASCENDING(name)
    return qf.sort(spec)


def _member(doc: dict[str, Any]) -> MemberRecord:
    return MemberRecord(
        doc["session_id"],
        doc["node_id"],
        doc.get("client_id"),
        bool(doc["anonymous"]),
        doc["alias"],
        doc["joined_at"],
        doc["joined_seq"],
        doc["acked_seq"],
    )


def _session(doc: dict[str, Any]) -> SessionRecord:
    return SessionRecord(doc["_id"], doc["owner_id"], doc["created_at"], dict(doc["options"]))


def _message(doc: dict[str, Any]) -> StoredMessage:
    return StoredMessage(doc["seq"], bytes(doc["body"]), doc["stored_at"])


class MongoStore:
    """The MongoDB :class:`~allspark.store.Store`.

    ``url`` is a ``mongodb://`` (or ``mongodb+srv://``) URL; its path names the
    database.  Nothing connects before :meth:`start`.
    """

    #: txmongo connections; operations run one at a time, so one is plenty.
    pool_size = 1

    def __init__(self, url: str, reactor: Any) -> None:
        self.url = url
        self.database_name = database_name(url)
        self._reactor = reactor
        self._pool: ConnectionPool | None = None
        self._db: Any = None
        self._tail: Deferred[None] = succeed(None)
        self._closing = False

    # -- plumbing ---------------------------------------------------------------
    def _run(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> Deferred[_T]:
        """Run ``fn(*args)`` after every operation submitted before it."""
        if self._closing or self._db is None:
            return fail(StoreError("store is not open"))
        result: Deferred[_T] = Deferred()

        def go(_: object) -> Deferred[None]:
            d = ensureDeferred(fn(*args))
            return d.addBoth(fire)

        def fire(value: Any) -> None:
            # The chain itself never fails: the outcome goes to the caller.
            if isinstance(value, Failure):
                result.errback(value)
            else:
                result.callback(value)

        self._tail = self._tail.addCallback(go)
        return result

    def _c(self, name: str) -> Any:
        return self._db[name]

    # -- life cycle -------------------------------------------------------------
    def start(self) -> Deferred[None]:
        """Connect and create the indexes."""
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self._pool = ConnectionPool(self.url, pool_size=self.pool_size)
        self._db = self._pool[self.database_name]
        indexes: list[tuple[str, Any, dict[str, Any]]] = [
            ("nodes", _by("client_id", "_id"), {}),
            ("inbox", _by("node_id", "seq"), {"unique": True}),
            ("inbox", _by("stored_at"), {}),
            ("stream", _by("session_id", "seq"), {"unique": True}),
            ("stream", _by("stored_at"), {}),
            ("members", _by("session_id", "node_id"), {"unique": True}),
            ("members", _by("session_id", "joined_at", "node_id"), {}),
            ("members", _by("node_id", "joined_at", "session_id"), {}),
            ("dedup", _by("sender_id", "dedup_id"), {"unique": True}),
            ("dedup", _by("created_at"), {}),
        ]
        for collection, spec, options in indexes:
            await self._c(collection).create_index(spec, **options)
        log.info("store connected to MongoDB database {database}", database=self.database_name)

    def close(self) -> Deferred[None]:
        """Let submitted operations finish, then disconnect."""
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        await self._tail
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.disconnect()

    def drop_database(self) -> Deferred[None]:
        """Drop this store's whole database (for tests).  Works after :meth:`close`."""
        return ensureDeferred(self._drop_database())

    async def _drop_database(self) -> None:
        pool = ConnectionPool(self.url, pool_size=1)
        try:
            await pool.drop_database(self.database_name)
        finally:
            await pool.disconnect()

    # -- nodes ------------------------------------------------------------------
    def remember_node(self, node_id: str, client_id: str | None, now_ms: int) -> Deferred[None]:
        """See :meth:`allspark.store.Store.remember_node`."""
        return self._run(self._remember_node, node_id, client_id, now_ms)

    async def _remember_node(self, node_id: str, client_id: str | None, now_ms: int) -> None:
        await self._c("nodes").update_one(
            {"_id": node_id}, {"$set": {"client_id": client_id, "seen_at": now_ms}}, upsert=True
        )

    def get_node(self, node_id: str) -> Deferred[tuple[str, str | None] | None]:
        """See :meth:`allspark.store.Store.get_node`."""
        return self._run(self._get_node, node_id)

    async def _get_node(self, node_id: str) -> tuple[str, str | None] | None:
        doc = await self._c("nodes").find_one({"_id": node_id})
        return None if doc is None else (doc["_id"], doc.get("client_id"))

    def nodes_of_client(self, client_id: str) -> Deferred[list[str]]:
        """See :meth:`allspark.store.Store.nodes_of_client`."""
        return self._run(self._nodes_of_client, client_id)

    async def _nodes_of_client(self, client_id: str) -> list[str]:
        docs = await self._c("nodes").find({"client_id": client_id}, {"_id": True}, sort=_by("_id"))
        return [d["_id"] for d in docs]

    # -- de-duplication -----------------------------------------------------------
    async def _claim(
        self, sender_id: str, dedup_id: str, now_ms: int, window_ms: int
    ) -> AppendResult | None:
        """Claim ``(sender_id, dedup_id)`` for a new append, or the first attempt's result."""
        dedup = self._c("dedup")
        key = {"sender_id": sender_id, "dedup_id": dedup_id}
        fresh = {"created_at": now_ms, "pending": True, "seqs": [], "answer": Binary(b"")}
        waited = 0.0
        while True:
            try:
                before = await dedup.find_one_and_update(
                    key, {"$setOnInsert": fresh}, upsert=True,
                    return_document=ReturnDocument.BEFORE,
                )
            except DuplicateKeyError:
                continue  # another process inserted it at the same moment: read it
            if before is None:
                return None  # ours
            if now_ms - before["created_at"] >= window_ms:
                taken = await dedup.find_one_and_update(
                    {**key, "created_at": before["created_at"]}, {"$set": fresh}
                )
                if taken is not None:
                    return None  # the old entry expired and is ours now
                continue
            if not before.get("pending"):
                seqs = {k: v for k, v in before["seqs"]}
                return AppendResult(True, seqs, bytes(before["answer"]))
            if waited >= PENDING_WAIT_S:
                raise StoreError(f"first attempt of {dedup_id!r} by {sender_id!r} is still pending")
            await task.deferLater(self._reactor, _PENDING_POLL_S, lambda: None)
            waited += _PENDING_POLL_S

    async def _settle(
        self, sender_id: str, dedup_id: str, seqs: dict[str, int], answer: bytes
    ) -> None:
        await self._c("dedup").update_one(
            {"sender_id": sender_id, "dedup_id": dedup_id},
            {"$set": {"pending": False, "seqs": list(seqs.items()), "answer": Binary(answer)}},
        )

    async def _release(self, sender_id: str, dedup_id: str) -> None:
        await self._c("dedup").delete_one(
            {"sender_id": sender_id, "dedup_id": dedup_id, "pending": True}
        )

    # -- inbox ------------------------------------------------------------------
    def append_inbox(
        self,
        sender_id: str,
        dedup_id: str | None,
        recipients: Sequence[str],
        body: bytes,
        answer: bytes,
        now_ms: int,
        dedup_window_ms: int,
    ) -> Deferred[AppendResult]:
        """See :meth:`allspark.store.Store.append_inbox`."""
        return self._run(
            self._append_inbox,
            sender_id, dedup_id, list(recipients), body, answer, now_ms, dedup_window_ms,
        )

    async def _append_inbox(
        self,
        sender_id: str,
        dedup_id: str | None,
        recipients: list[str],
        body: bytes,
        answer: bytes,
        now_ms: int,
        window_ms: int,
    ) -> AppendResult:
        if dedup_id is not None:
            seen = await self._claim(sender_id, dedup_id, now_ms, window_ms)
            if seen is not None:
                return seen
        try:
            seqs: dict[str, int] = {}
            for node_id in dict.fromkeys(recipients):
                state = await self._c("inbox_state").find_one_and_update(
                    {"_id": node_id},
                    {"$inc": {"last_seq": 1}, "$setOnInsert": {"purged_upto": 0}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                seqs[node_id] = state["last_seq"]
            blob = Binary(body)
            docs = [
                {"node_id": n, "seq": s, "stored_at": now_ms, "body": blob} for n, s in seqs.items()
            ]
            if docs:
                try:
                    await self._c("inbox").insert_many(docs, ordered=True)
                except Exception:
                    await self._undo_copies(seqs)
                    raise
            if dedup_id is not None:
                await self._settle(sender_id, dedup_id, seqs, answer)
        except Exception:
            if dedup_id is not None:
                await self._release(sender_id, dedup_id)
            raise
        return AppendResult(False, seqs, answer)

    async def _undo_copies(self, seqs: dict[str, int]) -> None:
        """Delete the copies of a failed multi-recipient append that did go in."""
        try:
            await self._c("inbox").delete_many(
                {"$or": [{"node_id": n, "seq": s} for n, s in seqs.items()]}
            )
        except Exception as e:  # the original error matters more; log this one
            log.error("could not undo a partial append: {error}", error=repr(e), copies=len(seqs))

    def fetch_inbox(self, node_id: str, after: int, limit: int) -> Deferred[InboxPage]:
        """See :meth:`allspark.store.Store.fetch_inbox`."""
        return self._run(self._fetch_inbox, node_id, after, limit)

    async def _fetch_inbox(self, node_id: str, after: int, limit: int) -> InboxPage:
        state = await self._c("inbox_state").find_one({"_id": node_id})
        if state is None:
            return InboxPage([], 0, 0, after)
        docs = await self._c("inbox").find(
            {"node_id": node_id, "seq": {"$gt": after}}, _NO_ID, limit=limit, sort=_by("seq")
        ) if limit > 0 else []
        messages = [_message(d) for d in docs]
        return InboxPage(
            messages, state["last_seq"], state.get("purged_upto", 0),
            messages[-1].seq if messages else after,
        )

    def ack_inbox(self, node_id: str, upto: int) -> Deferred[int]:
        """See :meth:`allspark.store.Store.ack_inbox`."""
        return self._run(self._ack_inbox, node_id, upto)

    async def _ack_inbox(self, node_id: str, upto: int) -> int:
        result = await self._c("inbox").delete_many({"node_id": node_id, "seq": {"$lte": upto}})
        return int(result.deleted_count)

    def inbox_state(self, node_id: str) -> Deferred[tuple[int, int]]:
        """See :meth:`allspark.store.Store.inbox_state`."""
        return self._run(self._inbox_state, node_id)

    async def _inbox_state(self, node_id: str) -> tuple[int, int]:
        state = await self._c("inbox_state").find_one({"_id": node_id})
        if state is None:
            return (0, 0)
        return (state["last_seq"], state.get("purged_upto", 0))

    # -- retention --------------------------------------------------------------
    def purge(self, stored_before_ms: int, dedup_before_ms: int) -> Deferred[int]:
        """See :meth:`allspark.store.Store.purge`."""
        return self._run(self._purge, stored_before_ms, dedup_before_ms)

    async def _purge(self, stored_before: int, dedup_before: int) -> int:
        count = 0
        for rows, key, states in (
            ("inbox", "node_id", "inbox_state"),
            ("stream", "session_id", "sessions"),
        ):
            old = {"stored_at": {"$lt": stored_before}}
            tops = await self._c(rows).aggregate(
                [{"$match": old}, {"$group": {"_id": f"${key}", "top": {"$max": "$seq"}}}]
            )
            for top in tops:
                await self._c(states).update_one(
                    {"_id": top["_id"]}, {"$max": {"purged_upto": top["top"]}}
                )
            count += int((await self._c(rows).delete_many(old)).deleted_count)
        await self._c("dedup").delete_many({"created_at": {"$lt": dedup_before}})
        return count

    # -- sessions ---------------------------------------------------------------
    def create_session(
        self, session_id: str, owner_id: str, options: dict[str, Any], now_ms: int
    ) -> Deferred[SessionRecord]:
        """See :meth:`allspark.store.Store.create_session`."""
        return self._run(self._create_session, session_id, owner_id, dict(options), now_ms)

    async def _create_session(
        self, session_id: str, owner_id: str, options: dict[str, Any], now_ms: int
    ) -> SessionRecord:
        doc = {
            "_id": session_id,
            "owner_id": owner_id,
            "created_at": now_ms,
            "options": options,
            "last_seq": 0,
            "purged_upto": 0,
        }
        try:
            await self._c("sessions").insert_one(doc)
        except DuplicateKeyError:
            raise DuplicateSession(session_id) from None
        return _session(doc)

    def get_session(self, session_id: str) -> Deferred[SessionRecord | None]:
        """See :meth:`allspark.store.Store.get_session`."""
        return self._run(self._get_session, session_id)

    async def _get_session(self, session_id: str) -> SessionRecord | None:
        doc = await self._c("sessions").find_one({"_id": session_id})
        return None if doc is None else _session(doc)

    def update_session(
        self, session_id: str, options: dict[str, Any]
    ) -> Deferred[SessionRecord | None]:
        """See :meth:`allspark.store.Store.update_session`."""
        return self._run(self._update_session, session_id, dict(options))

    async def _update_session(
        self, session_id: str, options: dict[str, Any]
    ) -> SessionRecord | None:
        doc = await self._c("sessions").find_one_and_update(
            {"_id": session_id}, {"$set": {"options": options}},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else _session(doc)

    def delete_session(self, session_id: str) -> Deferred[None]:
        """See :meth:`allspark.store.Store.delete_session`."""
        return self._run(self._delete_session, session_id)

    async def _delete_session(self, session_id: str) -> None:
        # The session first: once it is gone, no append or join can add rows.
        await self._c("sessions").delete_one({"_id": session_id})
        await self._c("members").delete_many({"session_id": session_id})
        await self._c("stream").delete_many({"session_id": session_id})

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
        return self._run(
            self._add_member, session_id, node_id, client_id, anonymous, alias, now_ms
        )

    async def _add_member(
        self,
        session_id: str,
        node_id: str,
        client_id: str | None,
        anonymous: bool,
        alias: str,
        now_ms: int,
    ) -> MemberRecord:
        session = await self._c("sessions").find_one({"_id": session_id})
        if session is None:
            raise StoreError(f"no such session: {session_id!r}")
        last = session["last_seq"]
        new = {
            "client_id": client_id,
            "anonymous": bool(anonymous),
            "alias": alias,
            "joined_at": now_ms,
            "joined_seq": last,
            "acked_seq": last,
        }
        key = {"session_id": session_id, "node_id": node_id}
        for _ in range(3):
            try:
                doc = await self._c("members").find_one_and_update(
                    key, {"$setOnInsert": new}, upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                continue  # a concurrent add won: read the winner's record
            return _member(doc)
        raise StoreError(f"could not add {node_id!r} to {session_id!r}")

    def update_member(
        self, session_id: str, node_id: str, anonymous: bool, alias: str
    ) -> Deferred[MemberRecord | None]:
        """See :meth:`allspark.store.Store.update_member`."""
        return self._run(self._update_member, session_id, node_id, anonymous, alias)

    async def _update_member(
        self, session_id: str, node_id: str, anonymous: bool, alias: str
    ) -> MemberRecord | None:
        doc = await self._c("members").find_one_and_update(
            {"session_id": session_id, "node_id": node_id},
            {"$set": {"anonymous": bool(anonymous), "alias": alias}},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else _member(doc)

    def remove_member(self, session_id: str, node_id: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_member`."""
        return self._run(self._remove_member, session_id, node_id)

    async def _remove_member(self, session_id: str, node_id: str) -> bool:
        result = await self._c("members").delete_one({"session_id": session_id, "node_id": node_id})
        return bool(result.deleted_count)

    def get_members(self, session_id: str) -> Deferred[list[MemberRecord]]:
        """See :meth:`allspark.store.Store.get_members`."""
        return self._run(self._get_members, session_id)

    async def _get_members(self, session_id: str) -> list[MemberRecord]:
        docs = await self._c("members").find(
            {"session_id": session_id}, sort=_by("joined_at", "node_id")
        )
        return [_member(d) for d in docs]

    def sessions_of_node(self, node_id: str) -> Deferred[list[MemberRecord]]:
        """See :meth:`allspark.store.Store.sessions_of_node`."""
        return self._run(self._sessions_of_node, node_id)

    async def _sessions_of_node(self, node_id: str) -> list[MemberRecord]:
        docs = await self._c("members").find(
            {"node_id": node_id}, sort=_by("joined_at", "session_id")
        )
        return [_member(d) for d in docs]

    def append_session(
        self,
        session_id: str,
        sender_id: str,
        dedup_id: str | None,
        body: bytes,
        answer: bytes,
        now_ms: int,
        dedup_window_ms: int,
    ) -> Deferred[AppendResult]:
        """See :meth:`allspark.store.Store.append_session`."""
        return self._run(
            self._append_session,
            session_id, sender_id, dedup_id, body, answer, now_ms, dedup_window_ms,
        )

    async def _append_session(
        self,
        session_id: str,
        sender_id: str,
        dedup_id: str | None,
        body: bytes,
        answer: bytes,
        now_ms: int,
        window_ms: int,
    ) -> AppendResult:
        if dedup_id is not None:
            seen = await self._claim(sender_id, dedup_id, now_ms, window_ms)
            if seen is not None:
                return seen
        try:
            session = await self._c("sessions").find_one_and_update(
                {"_id": session_id}, {"$inc": {"last_seq": 1}},
                return_document=ReturnDocument.AFTER,
            )
            if session is None:
                raise StoreError(f"no such session: {session_id!r}")
            seq = session["last_seq"]
            await self._c("stream").insert_one(
                {
                    "session_id": session_id,
                    "seq": seq,
                    "sender_id": sender_id,
                    "stored_at": now_ms,
                    "body": Binary(body),
                }
            )
            seqs = {session_id: seq}
            if dedup_id is not None:
                await self._settle(sender_id, dedup_id, seqs, answer)
        except Exception:
            if dedup_id is not None:
                await self._release(sender_id, dedup_id)
            raise
        return AppendResult(False, seqs, answer)

    def fetch_session(
        self, session_id: str, reader_id: str, after: int, limit: int
    ) -> Deferred[InboxPage]:
        """See :meth:`allspark.store.Store.fetch_session`."""
        return self._run(self._fetch_session, session_id, reader_id, after, limit)

    async def _fetch_session(
        self, session_id: str, reader_id: str, after: int, limit: int
    ) -> InboxPage:
        session = await self._c("sessions").find_one({"_id": session_id})
        if session is None:
            return InboxPage([], 0, 0, after)
        member = await self._c("members").find_one({"session_id": session_id, "node_id": reader_id})
        if member is not None and member["joined_seq"] > after:
            after = member["joined_seq"]
        stream = self._c("stream")
        docs = await stream.find(
            {"session_id": session_id, "seq": {"$gt": after}, "sender_id": {"$ne": reader_id}},
            _NO_ID, limit=limit, sort=_by("seq"),
        ) if limit > 0 else []
        messages = [_message(d) for d in docs]
        if len(messages) >= limit:
            scanned = messages[-1].seq if messages else after
        else:
            top = await stream.find(
                {"session_id": session_id, "seq": {"$gt": after}}, {"seq": True, "_id": False},
                limit=1, sort=qf.sort(qf.DESCENDING("seq")),
            )
            scanned = top[0]["seq"] if top else after
        return InboxPage(messages, session["last_seq"], session.get("purged_upto", 0), scanned)

    def ack_session(self, session_id: str, node_id: str, upto: int) -> Deferred[int]:
        """See :meth:`allspark.store.Store.ack_session`."""
        return self._run(self._ack_session, session_id, node_id, upto)

    async def _ack_session(self, session_id: str, node_id: str, upto: int) -> int:
        session = await self._c("sessions").find_one({"_id": session_id}, {"last_seq": True})
        if session is None:
            return 0
        doc = await self._c("members").find_one_and_update(
            {"session_id": session_id, "node_id": node_id},
            {"$max": {"acked_seq": min(upto, session["last_seq"])}},
            return_document=ReturnDocument.AFTER,
        )
        return 0 if doc is None else int(doc["acked_seq"])
