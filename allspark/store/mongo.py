"""The MongoDB store, on txmongo (an optional dependency: ``pip install allspark[mongodb]``).

This module is imported only by :func:`allspark.store.open_store` for a
``mongodb://`` URL, so txmongo is needed only by those who use it.

Collections (in the database named by the URL path, default ``allspark``):

``nodes``        ``{_id: node_id, client_id, seen_at}``; index ``client_id``.
``inbox_state``  ``{_id: node_id, last_seq, purged_upto, lock}``: the per-node
                 counter (``last_seq`` is the *readable* watermark, see below)
                 and, while an append is in flight, its ``lock``.
``inbox``        ``{node_id, seq, stored_at, body, txn}``; unique ``(node_id, seq)``,
                 index ``stored_at``.
``sessions``     ``{_id: session_id, owner_id, created_at, options, last_seq,
                 purged_upto, lock}``: the stream counter lives in the session.
``members``      ``{session_id, node_id, client_id, anonymous, alias, joined_at,
                 joined_seq, acked_seq}``; unique ``(session_id, node_id)``,
                 indexes for both listing orders.
``stream``       ``{session_id, seq, sender_id, stored_at, body, txn}``; unique
                 ``(session_id, seq)``, index ``stored_at``.
``txns``         ``{_id: txn, state, at, seqs, answer}``: one outcome per append,
                 ``committed`` or ``aborted``, written once (unique ``_id``).
``dedup``        ``{sender_id, dedup_id, created_at, pending, txn, lease_until,
                 seqs, answer}``; unique ``(sender_id, dedup_id)``, index
                 ``created_at``.
``push_devices`` ``{_id: node_id, target, address, muted, due_ms, gen,
                 lease_owner, lease_until_ms, last_sent_ms, attempts}``: one
                 document per node (the target as JSON, None once
                 unregistered; ``due_ms`` is *absent* when nothing is pending,
                 so ``$min`` sets it on a first schedule and keeps the earliest
                 after); index ``due_ms`` for claims.
``revocations``  ``{_id: node_id, until_ms}``.

Ordering.  The contract says one process's operations apply in submission
order.  Most operations here are several round trips, so this store runs its
operations one after another (a FIFO of Deferreds): simple and correct, but
its throughput is bounded by round-trip latency.  SQLite's group commit is the
fast path; a keyed scheduler (order per node/session) is the next step here if
MongoDB throughput matters.

Appends without multi-document transactions.  A standalone MongoDB has no
multi-document transactions, and several servers may append to one inbox at
once, so every append (inbox or session stream) is a small transaction of its
own, built on single-document atomicity:

1. **Lock** each target (every recipient's ``inbox_state``, or the session),
   in sorted order, by setting its ``lock`` ``{txn, until}`` where there is
   none.  The lock has a lease (:attr:`MongoStore.lease_ms`, wall clock): a
   lock whose lease ran out is *recovered* by the next writer (step 5).  The
   target's next seq is ``last_seq + 1``: under the lock nobody else numbers.
2. **Insert** every copy, tagged with ``txn``.  Rows above ``last_seq`` are
   invisible: readers only read ``seq <= last_seq``.
3. **Commit**: insert ``{_id: txn, state: committed, seqs, answer}`` into
   ``txns``.  That one insert is the commit point of the whole append.
4. **Release** each lock and move ``last_seq`` to the new seq in one
   conditional update (``lock.txn == txn``), so it happens once.
5. **Recovery** of a lock whose txn has no outcome yet: insert
   ``{_id: txn, state: aborted}``; the unique ``_id`` means exactly one of
   commit and abort wins.  Committed: roll forward (step 4); aborted: delete
   the txn's rows and drop the lock.  A writer whose own commit loses to an
   abort fails with :class:`StoreError` and stored nothing visible.

So a reader never steps past a seq that was allocated but is not readable:
``last_seq`` (and every page's ``last_seq``) only covers committed copies, a
multi-recipient append becomes visible in every inbox at its commit point or
never, and a crash leaves nothing visible that a retry would store again.  A
reader that finds a lock whose txn committed reads through it (and rolls it
forward).

De-duplication.  A first attempt claims ``(sender_id, dedup_id)`` by
inserting a ``pending`` entry naming its ``txn``, with a lease.  A retry that
finds it pending asks the txn's outcome: committed means a duplicate (answered
with the committed seqs and answer, even when the first attempt's settle
failed); aborted, or a lease run out (the retry then aborts the txn, see step
5), means the retry takes the claim over.  Otherwise it waits, at most about
one lease.  Settling the entry after the commit is only a shortcut.

Push claims.  :meth:`MongoStore.claim_due_pushes` takes its jobs one
``find_one_and_update`` at a time (at most ``limit`` of them, each the
earliest due document whose filter, due and unleased, still holds when
MongoDB applies the update), so two servers claiming at once never take one
node: each document changes atomically.  It costs a round trip per job, and
the jobs of one call are not taken at one instant (another server's claim
may interleave; each job is still taken once).  :meth:`MongoStore.finish_push`
is two conditional updates at most: the first applies only if ``gen`` did not
move (it also clears the schedule), the second otherwise (it keeps it).
:meth:`MongoStore.schedule_push` reads which nodes have a target and no mute,
then updates those in one ``update_many``; a node muted between the two is
left alone but still returned.

Leases use the wall clock (:attr:`MongoStore.lease_ms`, default 10 s): servers
sharing a database need clocks within a small fraction of that.
:meth:`MongoStore.start` gives up after :attr:`MongoStore.start_timeout_s`
when the server does not answer.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Coroutine, Sequence, TypeVar
from urllib.parse import unquote, urlsplit

from bson.binary import Binary
from pymongo.collection import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure
from txmongo import filter as qf
from txmongo.connection import ConnectionPool

from allspark.logs import logger
from allspark.store import (
    AppendResult,
    DuplicateSession,
    InboxFull,
    InboxPage,
    InboxQuota,
    MemberRecord,
    LocationRecord,
    PushJob,
    PushTarget,
    ServerRecord,
    SessionFull,
    SessionRecord,
    StoredMessage,
    StoreError,
    StreamQuota,
    quota_window_end,
)

log = logger(__name__)

_T = TypeVar("_T")

DEFAULT_DATABASE = "allspark"

#: The lease of an append's locks and of a first attempt's de-dup claim (wall clock, ms).
LEASE_MS = 10_000
#: How often a writer looks again at a lock (or a pending claim) held by another process.
_POLL_S = 0.02
#: How long start() waits for the server before failing.
START_TIMEOUT_S = 10.0

_NO_ID = {"_id": False}
#: A bound on the attempts of one lock or claim (the lease bounds their time).
_LOCK_ATTEMPTS = 100_000

# The two kinds of append: where the lock and counter live, where rows go,
# and the rows' key field.
_INBOX, _SESSION = "inbox", "session"
_STATE = {_INBOX: "inbox_state", _SESSION: "sessions"}
_ROWS = {_INBOX: "inbox", _SESSION: "stream"}
_KEY = {_INBOX: "node_id", _SESSION: "session_id"}


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


def _duplicate_key(error: Exception) -> bool:
    """Whether a write failed only on a unique index (error code 11000)."""
    if isinstance(error, DuplicateKeyError):
        return True
    errors = (getattr(error, "details", None) or {}).get("writeErrors") or []
    return bool(errors) and all(e.get("code") == 11000 for e in errors)


def _message(doc: dict[str, Any]) -> StoredMessage:
    return StoredMessage(doc["seq"], bytes(doc["body"]), doc["stored_at"])


class MongoStore:
    """The MongoDB :class:`~allspark.store.Store`.

    ``url`` is a ``mongodb://`` (or ``mongodb+srv://``) URL; its path names the
    database.  Nothing connects before :meth:`start`.
    """

    #: txmongo connections; operations run one at a time, so one is plenty.
    pool_size = 1
    #: The lease of an append's locks (ms); a lapsed lock is recovered by the next writer.
    lease_ms = LEASE_MS
    #: How long :meth:`start` waits for the server to answer before failing.
    start_timeout_s = START_TIMEOUT_S

    def __init__(self, url: str, reactor: Any) -> None:
        self.url = url
        self.database_name = database_name(url)
        self._reactor = reactor
        self._pool: ConnectionPool | None = None
        self._db: Any = None
        self._tail: Deferred[None] = succeed(None)
        self._closing = False

    # -- plumbing ---------------------------------------------------------------
    def _run(self, fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> Deferred[_T]:
        """Run ``fn(*args)`` after every operation submitted before it."""
        if self._closing or self._db is None:
            return fail(StoreError("store is not open"))
        result: Deferred[_T] = Deferred()

        def go(_: object) -> Deferred[None]:
            d: Deferred[_T] = ensureDeferred(fn(*args))
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
        """Connect and create the indexes.  Fails with :class:`StoreError` when
        the server has not answered within :attr:`start_timeout_s`."""
        return ensureDeferred(self._start())

    @property
    def server(self) -> str:
        """The URL's host part, without credentials (for messages and logs)."""
        return urlsplit(self.url).netloc.rpartition("@")[2]

    async def _start(self) -> None:
        self._pool = ConnectionPool(self.url, pool_size=self.pool_size)
        self._db = self._pool[self.database_name]
        ready = ensureDeferred(self._create_indexes())
        ready.addTimeout(self.start_timeout_s, self._reactor)
        try:
            await ready
        except DeferredTimeout:
            pool, self._pool, self._db = self._pool, None, None
            await pool.disconnect()
            raise StoreError(
                f"MongoDB at {self.server} did not answer within {self.start_timeout_s:g} s"
            ) from None
        log.info("store connected to MongoDB database {database}", database=self.database_name,
                 server=self.server)

    async def _create_indexes(self) -> None:
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
            ("txns", _by("at"), {}),
            ("locations", _by("server_id"), {}),
            # (due_ms alone: nx-27017 cannot index a compound key holding _id)
            ("push_devices", _by("due_ms"), {}),
        ]
        for collection, spec, options in indexes:
            await self._c(collection).create_index(spec, **options)

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

    # -- server records (collection ``servers``: _id, holder, record as JSON) -----
    def get_server(self, server_id: str) -> Deferred[ServerRecord | None]:
        """See :meth:`allspark.store.Store.get_server`."""
        return self._run(self._get_server, server_id)

    async def _get_server(self, server_id: str) -> ServerRecord | None:
        doc = await self._c("servers").find_one({"_id": server_id})
        return None if doc is None else ServerRecord.from_json(doc["record"])

    def list_servers(self) -> Deferred[list[ServerRecord]]:
        """See :meth:`allspark.store.Store.list_servers`."""
        return self._run(self._list_servers)

    async def _list_servers(self) -> list[ServerRecord]:
        docs = await self._c("servers").find({}, sort=_by("_id"))
        return [ServerRecord.from_json(d["record"]) for d in docs]

    def put_server(self, record: ServerRecord, expect_holder: str | None) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.put_server`."""
        return self._run(self._put_server, record, expect_holder)

    async def _put_server(self, record: ServerRecord, expect_holder: str | None) -> bool:
        servers = self._c("servers")
        if expect_holder is None:
            try:
                await servers.insert_one({"_id": record.server_id, "holder": record.holder,
                                          "record": record.to_json()})
            except DuplicateKeyError:
                return False
            return True
        result = await servers.update_one(
            {"_id": record.server_id, "holder": expect_holder},
            {"$set": {"holder": record.holder, "record": record.to_json()}},
        )
        return bool(result.matched_count == 1)

    def remove_server(self, server_id: str, holder: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_server`."""
        return self._run(self._remove_server, server_id, holder)

    async def _remove_server(self, server_id: str, holder: str) -> bool:
        result = await self._c("servers").delete_one({"_id": server_id, "holder": holder})
        return bool(result.deleted_count == 1)

    # -- locations (collection ``locations``: _id "node_id server_id epoch") ----
    @staticmethod
    def _location_id(record: LocationRecord) -> str:
        # ids never hold a space, so the three fields cannot run together
        return f"{record.node_id} {record.server_id} {record.epoch}"

    def put_location(self, record: LocationRecord) -> Deferred[None]:
        """See :meth:`allspark.store.Store.put_location`."""
        return self._run(self._put_location, record)

    async def _put_location(self, record: LocationRecord) -> None:
        await self._c("locations").update_one(
            {"_id": self._location_id(record)},
            {"$set": {"node_id": record.node_id, "server_id": record.server_id, "epoch": record.epoch}},
            upsert=True)

    def remove_location(self, record: LocationRecord) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_location`."""
        return self._run(self._remove_location, record)

    async def _remove_location(self, record: LocationRecord) -> bool:
        result = await self._c("locations").delete_one({"_id": self._location_id(record)})
        return bool(result.deleted_count == 1)

    def drop_locations(self, server_id: str) -> Deferred[int]:
        """See :meth:`allspark.store.Store.drop_locations`."""
        return self._run(self._drop_locations, server_id)

    async def _drop_locations(self, server_id: str) -> int:
        result = await self._c("locations").delete_many({"server_id": server_id})
        return int(result.deleted_count)

    def list_locations(self) -> Deferred[list[LocationRecord]]:
        """See :meth:`allspark.store.Store.list_locations`."""
        return self._run(self._list_locations)

    async def _list_locations(self) -> list[LocationRecord]:
        docs = await self._c("locations").find({})
        records = [LocationRecord(d["node_id"], d["server_id"], int(d["epoch"])) for d in docs]
        return sorted(records, key=lambda r: (r.node_id, r.server_id, r.epoch))

    # -- appends: locks, commit markers, recovery (see the module docstring) ------
    def _wall_ms(self) -> int:
        """The wall clock in ms (leases), not the caller's ``now_ms``."""
        return int(self._reactor.seconds() * 1000)

    async def _wait(self) -> None:
        await task.deferLater(self._reactor, _POLL_S, lambda: None)

    async def _outcome(self, txn: str) -> dict[str, Any]:
        """The txn's outcome, deciding it (aborted) when it has none yet."""
        txns = self._c("txns")
        try:
            await txns.insert_one({"_id": txn, "state": "aborted", "at": self._wall_ms()})
            return {"_id": txn, "state": "aborted"}
        except DuplicateKeyError:
            found = await txns.find_one({"_id": txn})
            if found is None:  # pragma: no cover - purged between the two calls
                raise StoreError(f"append {txn} has no outcome") from None
            return found

    async def _release(self, kind: str, target: str, txn: str) -> None:
        """Roll a committed txn's lock on ``target`` forward: ``last_seq`` moves
        to the txn's seq and the lock goes, once (conditional on the lock)."""
        await self._c(_STATE[kind]).update_one(
            {"_id": target, "lock.txn": txn}, {"$inc": {"last_seq": 1}, "$unset": {"lock": ""}}
        )

    async def _roll_back(self, kind: str, target: str, txn: str) -> None:
        """Remove an aborted txn's rows on ``target`` and its lock."""
        await self._c(_ROWS[kind]).delete_many({_KEY[kind]: target, "txn": txn})
        await self._c(_STATE[kind]).update_one(
            {"_id": target, "lock.txn": txn}, {"$unset": {"lock": ""}}
        )

    async def _recover(self, kind: str, target: str, txn: str) -> None:
        """Finish a txn whose lock on ``target`` outlived its lease."""
        outcome = await self._outcome(txn)
        if outcome["state"] == "committed":
            await self._release(kind, target, txn)
        else:
            await self._roll_back(kind, target, txn)
        log.info("recovered a lapsed append lock", kind=kind, target=target, txn=txn,
                 outcome=outcome["state"])

    async def _lock(self, kind: str, target: str, txn: str, held: Sequence[str] = ()) -> int:
        """Lock ``target`` for ``txn``; the seq its copy gets (``last_seq + 1``).

        Waits while another live txn holds the lock (renewing the leases of
        the locks ``txn`` already ``held``), recovers one whose lease ran out.
        An inbox's state is created on first use; a session must exist
        (:class:`StoreError`).
        """
        states = self._c(_STATE[kind])
        give_up = self._wall_ms() + 3 * self.lease_ms
        for _ in range(_LOCK_ATTEMPTS):
            if self._wall_ms() > give_up:
                break
            lock = {"txn": txn, "until": self._wall_ms() + self.lease_ms}
            doc = await states.find_one_and_update(
                {"_id": target, "lock": None}, {"$set": {"lock": lock}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return int(doc["last_seq"]) + 1
            if kind == _INBOX:
                try:
                    await states.insert_one(
                        {"_id": target, "last_seq": 0, "purged_upto": 0, "lock": lock}
                    )
                    return 1
                except DuplicateKeyError:
                    pass  # it exists and is locked (or was just created): look at it
            current = await states.find_one({"_id": target})
            if current is None:
                if kind == _SESSION:
                    raise StoreError(f"no such session: {target!r}")
                continue
            holder = current.get("lock")
            if holder is None:
                continue
            if holder["until"] < self._wall_ms():
                await self._recover(kind, target, holder["txn"])
                continue
            if held:
                await states.update_many(
                    {"_id": {"$in": list(held)}, "lock.txn": txn},
                    {"$set": {"lock.until": self._wall_ms() + self.lease_ms}},
                )
            await self._wait()
        raise StoreError(f"could not lock {target!r}: busy")

    async def _readable(self, kind: str, state: dict[str, Any]) -> int:
        """The readable watermark of an inbox/session state document: its
        ``last_seq``, or one more when its lock belongs to a committed txn
        (which is then rolled forward)."""
        last = int(state["last_seq"])
        holder = state.get("lock")
        if holder is not None:
            marker = await self._c("txns").find_one({"_id": holder["txn"]})
            if marker is not None and marker["state"] == "committed":
                await self._release(kind, state["_id"], holder["txn"])
                return last + 1
        return last

    async def _append(
        self,
        kind: str,
        sender_id: str,
        dedup_id: str | None,
        targets: list[str],
        body: bytes,
        answer: bytes,
        now_ms: int,
        window_ms: int,
        quota: InboxQuota | StreamQuota | None = None,
    ) -> AppendResult:
        """One append (inbox copies or a stream row) as a txn: claim, lock,
        check the quota, insert, commit, release, settle."""
        txn = uuid.uuid4().hex
        if dedup_id is not None:
            seen = await self._claim(sender_id, dedup_id, now_ms, window_ms, txn)
            if seen is not None:
                return seen
        seqs: dict[str, int] = {}
        committing = False
        try:
            for target in sorted(targets):  # one order everywhere: no deadlock
                seqs[target] = await self._lock(kind, target, txn, list(seqs))
            if isinstance(quota, InboxQuota):
                await self._check_inbox_quota(quota, sender_id, seqs)
            elif isinstance(quota, StreamQuota):
                await self._check_stream_quota(quota, sender_id, targets[0], now_ms)
            blob = Binary(body)
            if kind == _INBOX:
                rows = [{"node_id": t, "seq": s, "sender_id": sender_id, "stored_at": now_ms,
                         "body": blob, "txn": txn} for t, s in seqs.items()]
            else:
                rows = [{"session_id": t, "seq": s, "sender_id": sender_id, "stored_at": now_ms,
                         "body": blob, "txn": txn} for t, s in seqs.items()]
            try:
                await self._c(_ROWS[kind]).insert_many(rows, ordered=True)
            except (DuplicateKeyError, BulkWriteError) as taken:
                if not _duplicate_key(taken):
                    raise
                await self._clear_debris(kind, txn, seqs)
                await self._c(_ROWS[kind]).insert_many(rows, ordered=True)
            committing = True
            await self._c("txns").insert_one({
                "_id": txn, "state": "committed", "at": self._wall_ms(),
                "seqs": list(seqs.items()), "answer": Binary(answer),
            })
        except Exception as error:
            if not await self._settle_failure(kind, txn, seqs, sender_id, dedup_id, error):
                if committing and isinstance(error, DuplicateKeyError):
                    raise StoreError(
                        "append aborted by another writer: its locks' lease ran out before it "
                        "committed; nothing was stored"
                    ) from None
                raise
        result = AppendResult(False, {t: seqs[t] for t in dict.fromkeys(targets)}, answer)
        try:
            for target in seqs:
                await self._release(kind, target, txn)
        except Exception as e:  # committed: readers and writers roll it forward
            log.warn("could not release an append's locks (it is committed): {error}",
                     error=repr(e), txn=txn)
        if dedup_id is not None:
            await self._settle(sender_id, dedup_id, txn, result.seqs, answer)
        return result

    async def _clear_debris(self, kind: str, txn: str, seqs: dict[str, int]) -> None:
        """A row is already at one of our seqs.  If ``txn`` still holds every
        lock, it held them all along (a lost lock is never taken back), so
        nobody committed at or above our seqs: the rows there are debris of
        aborted txns whose writers outlived their lease; remove them.  If a
        lock was lost (our lease ran out and another writer recovered it),
        fail: our txn is aborted."""
        held = await self._c(_STATE[kind]).count_documents(
            {"_id": {"$in": list(seqs)}, "lock.txn": txn}
        )
        if held != len(seqs):
            raise StoreError("append lost its locks (lease ran out); nothing was stored")
        for target, seq in seqs.items():
            await self._c(_ROWS[kind]).delete_many(
                {_KEY[kind]: target, "seq": {"$gte": seq}, "txn": {"$ne": txn}}
            )
        # our own rows of the failed insert_many go too: it is run again
        await self._c(_ROWS[kind]).delete_many({_KEY[kind]: {"$in": list(seqs)}, "txn": txn})

    async def _check_inbox_quota(
        self, quota: InboxQuota, sender_id: str, seqs: dict[str, int]
    ) -> None:
        """:class:`InboxFull` when a locked recipient holds ``per_inbox``
        unacked messages, or ``per_sender`` of ``sender_id``'s.  Under the
        locks nobody else adds rows, so the counts hold until the commit."""
        inbox = self._c("inbox")
        full: list[str] = []
        per_sender = False
        for node_id, seq in seqs.items():
            below = {"node_id": node_id, "seq": {"$lt": seq}}
            if await inbox.count_documents(below) >= quota.per_inbox:
                full.append(node_id)
            elif await inbox.count_documents({**below, "sender_id": sender_id}) >= quota.per_sender:
                full.append(node_id)
                per_sender = True
        if full:
            raise InboxFull(sorted(full), per_sender)

    async def _check_stream_quota(
        self, quota: StreamQuota, sender_id: str, session_id: str, now_ms: int
    ) -> None:
        """:class:`SessionFull` when the session's rows stored in the quota
        window holding ``now_ms`` reach ``per_session``, or ``sender_id``'s
        reach ``per_sender`` (the session is locked: counts hold)."""
        end = quota_window_end(now_ms, quota.window_ms)
        window = {"session_id": session_id, "stored_at": {"$gte": end - quota.window_ms, "$lt": end}}
        stream = self._c("stream")
        if await stream.count_documents(window) >= quota.per_session:
            raise SessionFull(session_id, per_sender=False)
        if await stream.count_documents({**window, "sender_id": sender_id}) >= quota.per_sender:
            raise SessionFull(session_id, per_sender=True)

    async def _settle_failure(
        self,
        kind: str,
        txn: str,
        seqs: dict[str, int],
        sender_id: str,
        dedup_id: str | None,
        error: Exception,
    ) -> bool:
        """After an append failed: whether it committed after all (the commit's
        answer was lost).  When not, roll its rows and locks back and drop its
        de-dup claim.  When even that fails, the leases let others finish it."""
        try:
            outcome = await self._outcome(txn)
            if outcome["state"] == "committed":
                return True
            for target in seqs:
                await self._roll_back(kind, target, txn)
            if dedup_id is not None:
                await self._c("dedup").delete_one(
                    {"sender_id": sender_id, "dedup_id": dedup_id, "txn": txn, "pending": True}
                )
        except Exception as cleanup:
            log.error("append failed and could not be cleaned up; leases will: {error}",
                      error=repr(cleanup), txn=txn, cause=repr(error))
        return False

    # -- de-duplication -----------------------------------------------------------
    async def _claim(
        self, sender_id: str, dedup_id: str, now_ms: int, window_ms: int, txn: str
    ) -> AppendResult | None:
        """Claim ``(sender_id, dedup_id)`` for ``txn``, or the first attempt's result.

        A pending claim of another txn is a duplicate once that txn committed,
        is taken over once it aborted or its lease ran out, and is waited for
        otherwise (about one lease at most).
        """
        dedup = self._c("dedup")
        key = {"sender_id": sender_id, "dedup_id": dedup_id}
        give_up = self._wall_ms() + 3 * self.lease_ms
        for _ in range(_LOCK_ATTEMPTS):
            if self._wall_ms() > give_up:
                break
            fresh = {"created_at": now_ms, "pending": True, "txn": txn,
                     "lease_until": self._wall_ms() + 2 * self.lease_ms,
                     "seqs": [], "answer": Binary(b"")}
            try:
                await dedup.insert_one({**key, **fresh})
                return None  # ours
            except DuplicateKeyError:
                before = await dedup.find_one(key)
            if before is None:
                continue  # expired and purged meanwhile: claim again
            take_over = False
            if now_ms - before["created_at"] >= window_ms:
                take_over = True
            elif not before.get("pending"):
                return AppendResult(True, {k: v for k, v in before["seqs"]}, bytes(before["answer"]))
            else:
                marker = await self._c("txns").find_one({"_id": before["txn"]})
                if marker is None and before["lease_until"] < self._wall_ms():
                    marker = await self._outcome(before["txn"])
                if marker is None:
                    await self._wait()
                    continue
                if marker["state"] == "committed":
                    seqs = {k: v for k, v in marker["seqs"]}
                    await self._settle(sender_id, dedup_id, before["txn"], seqs, bytes(marker["answer"]))
                    return AppendResult(True, seqs, bytes(marker["answer"]))
                take_over = True
            if take_over:
                taken = await dedup.find_one_and_update(
                    {**key, "txn": before.get("txn"), "created_at": before["created_at"]},
                    {"$set": fresh},
                )
                if taken is not None:
                    return None
        raise StoreError(f"first attempt of {dedup_id!r} by {sender_id!r} is still pending")

    async def _settle(
        self, sender_id: str, dedup_id: str, txn: str, seqs: dict[str, int], answer: bytes
    ) -> None:
        """Record a committed first attempt's answer in its claim (a shortcut
        for retries: the txn's outcome says the same)."""
        try:
            await self._c("dedup").update_one(
                {"sender_id": sender_id, "dedup_id": dedup_id, "txn": txn},
                {"$set": {"pending": False, "seqs": list(seqs.items()), "answer": Binary(answer)}},
            )
        except Exception as e:
            log.warn("could not settle a de-dup entry (a retry reads the txn): {error}",
                     error=repr(e), txn=txn)

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
        quota: InboxQuota | None = None,
    ) -> Deferred[AppendResult]:
        """See :meth:`allspark.store.Store.append_inbox`."""
        return self._run(
            self._append,
            _INBOX, sender_id, dedup_id, list(dict.fromkeys(recipients)), body, answer, now_ms,
            dedup_window_ms, quota,
        )

    def fetch_inbox(self, node_id: str, after: int, limit: int) -> Deferred[InboxPage]:
        """See :meth:`allspark.store.Store.fetch_inbox`."""
        return self._run(self._fetch_inbox, node_id, after, limit)

    async def _fetch_inbox(self, node_id: str, after: int, limit: int) -> InboxPage:
        state = await self._c("inbox_state").find_one({"_id": node_id})
        if state is None:
            return InboxPage([], 0, 0, after)
        readable = await self._readable(_INBOX, state)
        docs = await self._c("inbox").find(
            {"node_id": node_id, "seq": {"$gt": after, "$lte": readable}}, _NO_ID,
            limit=limit, sort=_by("seq"),
        ) if limit > 0 and after < readable else []
        messages = [_message(d) for d in docs]
        return InboxPage(
            messages, readable, state.get("purged_upto", 0),
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
        return (await self._readable(_INBOX, state), state.get("purged_upto", 0))

    # -- retention --------------------------------------------------------------
    def purge(self, stored_before_ms: int, dedup_before_ms: int) -> Deferred[int]:
        """See :meth:`allspark.store.Store.purge`."""
        return self._run(self._purge, stored_before_ms, dedup_before_ms)

    async def _purge(self, stored_before: int, dedup_before: int) -> int:
        # Finish appends whose locks lapsed (a crashed writer's) first: their
        # txn outcomes may then go with the old de-dup entries below.
        now = self._wall_ms()
        for kind in (_INBOX, _SESSION):
            lapsed = await self._c(_STATE[kind]).find({"lock.until": {"$lt": now}}, {"lock": True})
            for doc in lapsed:
                await self._recover(kind, doc["_id"], doc["lock"]["txn"])
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
        await self._c("txns").delete_many({"at": {"$lt": dedup_before}})
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
        last = await self._readable(_SESSION, session)
        new = {
            "client_id": client_id,
            "anonymous": bool(anonymous),
            "alias": alias,
            "joined_at": now_ms,
            "joined_seq": last,
            "acked_seq": last,
        }
        key = {"session_id": session_id, "node_id": node_id}
        members = self._c("members")
        for _ in range(3):
            # insert, or read the member that is there (unique index): one
            # round trip either way, and no upsert
            try:
                await members.insert_one({**key, **new})
                return _member({**key, **new})
            except DuplicateKeyError:
                doc = await members.find_one(key)
            if doc is not None:
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
        quota: StreamQuota | None = None,
    ) -> Deferred[AppendResult]:
        """See :meth:`allspark.store.Store.append_session`."""
        return self._run(
            self._append,
            _SESSION, sender_id, dedup_id, [session_id], body, answer, now_ms, dedup_window_ms,
            quota,
        )

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
        readable = await self._readable(_SESSION, session)
        member = await self._c("members").find_one({"session_id": session_id, "node_id": reader_id})
        if member is not None and member["joined_seq"] > after:
            after = member["joined_seq"]
        stream = self._c("stream")
        seqs = {"$gt": after, "$lte": readable}
        docs = await stream.find(
            {"session_id": session_id, "seq": seqs, "sender_id": {"$ne": reader_id}},
            _NO_ID, limit=limit, sort=_by("seq"),
        ) if limit > 0 and after < readable else []
        messages = [_message(d) for d in docs]
        if len(messages) >= limit:
            scanned = messages[-1].seq if messages else after
        else:
            top = await stream.find(
                {"session_id": session_id, "seq": seqs}, {"seq": True, "_id": False},
                limit=1, sort=qf.sort(qf.DESCENDING("seq")),
            ) if after < readable else []
            scanned = top[0]["seq"] if top else after
        return InboxPage(messages, readable, session.get("purged_upto", 0), scanned)

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

    # -- push notifications (collection ``push_devices``, see the module docstring) --
    #: Fields a new push document starts with (``due_ms`` stays absent).
    _PUSH_DEFAULTS: dict[str, Any] = {
        "muted": False, "gen": 0, "lease_owner": None, "lease_until_ms": 0,
        "last_sent_ms": None, "attempts": 0,
    }

    def set_push_target(self, target: PushTarget) -> Deferred[None]:
        """See :meth:`allspark.store.Store.set_push_target`."""
        return self._run(self._set_push_target, target)

    async def _push_upsert(self, node_id: str, fields: dict[str, Any]) -> None:
        """Set ``fields`` on the node's push document, creating it (with
        :attr:`_PUSH_DEFAULTS` and no target) when there is none."""
        defaults = {k: v for k, v in self._PUSH_DEFAULTS.items() if k not in fields}
        defaults.update({k: None for k in ("target", "address") if k not in fields})
        await self._c("push_devices").update_one(
            {"_id": node_id}, {"$set": fields, "$setOnInsert": defaults}, upsert=True
        )

    async def _set_push_target(self, target: PushTarget) -> None:
        await self._push_upsert(target.node_id, {"target": target.to_json(), "address": target.address})

    def get_push_target(self, node_id: str) -> Deferred[PushTarget | None]:
        """See :meth:`allspark.store.Store.get_push_target`."""
        return self._run(self._get_push_target, node_id)

    async def _get_push_target(self, node_id: str) -> PushTarget | None:
        doc = await self._c("push_devices").find_one({"_id": node_id})
        if doc is None or doc.get("target") is None:
            return None
        return PushTarget.from_json(doc["target"])

    def remove_push_target(self, node_id: str, address: str | None = None) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.remove_push_target`."""
        return self._run(self._remove_push_target, node_id, address)

    async def _remove_push_target(self, node_id: str, address: str | None) -> bool:
        query: dict[str, Any] = {"_id": node_id, "target": {"$ne": None}}
        if address is not None:
            query["address"] = address
        result = await self._c("push_devices").update_one(
            query, {"$set": {"target": None, "address": None}}
        )
        return bool(result.matched_count == 1)

    def set_push_muted(self, node_id: str, muted: bool) -> Deferred[None]:
        """See :meth:`allspark.store.Store.set_push_muted`."""
        return self._run(self._set_push_muted, node_id, muted)

    async def _set_push_muted(self, node_id: str, muted: bool) -> None:
        await self._push_upsert(node_id, {"muted": bool(muted)})

    def push_muted(self, node_id: str) -> Deferred[bool]:
        """See :meth:`allspark.store.Store.push_muted`."""
        return self._run(self._push_muted, node_id)

    async def _push_muted(self, node_id: str) -> bool:
        doc = await self._c("push_devices").find_one({"_id": node_id}, {"muted": True})
        return doc is not None and bool(doc.get("muted"))

    def schedule_push(self, node_ids: Sequence[str], due_ms: int) -> Deferred[list[str]]:
        """See :meth:`allspark.store.Store.schedule_push`."""
        return self._run(self._schedule_push, list(dict.fromkeys(node_ids)), due_ms)

    async def _schedule_push(self, node_ids: list[str], due_ms: int) -> list[str]:
        if not node_ids:
            return []
        eligible = {"target": {"$ne": None}, "muted": False}
        docs = await self._c("push_devices").find(
            dict(eligible, _id={"$in": node_ids}), {"_id": True}
        )
        found = {d["_id"] for d in docs}
        scheduled = [n for n in node_ids if n in found]
        if scheduled:
            await self._c("push_devices").update_many(
                dict(eligible, _id={"$in": scheduled}),
                {"$min": {"due_ms": due_ms}, "$inc": {"gen": 1}},
            )
        return scheduled

    def claim_due_pushes(
        self, now_ms: int, owner: str, lease_ms: int, limit: int
    ) -> Deferred[list[PushJob]]:
        """See :meth:`allspark.store.Store.claim_due_pushes` (one
        ``find_one_and_update`` per job, see the module docstring)."""
        return self._run(self._claim_due_pushes, now_ms, owner, lease_ms, limit)

    async def _claim_due_pushes(
        self, now_ms: int, owner: str, lease_ms: int, limit: int
    ) -> list[PushJob]:
        query = {
            "due_ms": {"$lte": now_ms},
            "target": {"$ne": None},
            "muted": False,
            # no lease is lease_until_ms 0 (times are positive): one condition, no $or
            "lease_until_ms": {"$lt": now_ms},
        }
        jobs: list[PushJob] = []
        for _ in range(max(limit, 0)):
            doc = await self._c("push_devices").find_one_and_update(
                query,
                {"$set": {"lease_owner": owner, "lease_until_ms": now_ms + lease_ms}},
                sort=_by("due_ms", "_id"),
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                break
            jobs.append(PushJob(
                doc["_id"], PushTarget.from_json(doc["target"]), int(doc["gen"]),
                int(doc["due_ms"]), doc.get("last_sent_ms"), int(doc.get("attempts", 0)),
            ))
        return jobs

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
        return self._run(self._finish_push, node_id, owner, gen, sent_ms, retry_at_ms, failed)

    async def _finish_push(
        self,
        node_id: str,
        owner: str,
        gen: int,
        sent_ms: int | None,
        retry_at_ms: int | None,
        failed: bool,
    ) -> bool:
        update: dict[str, Any] = {"$set": {"lease_owner": None, "lease_until_ms": 0}}
        if sent_ms is not None:
            update["$set"].update(last_sent_ms=sent_ms, attempts=int(failed))
        elif failed:
            update["$inc"] = {"attempts": 1}
        devices = self._c("push_devices")
        if retry_at_ms is not None:
            update["$set"]["due_ms"] = retry_at_ms
        else:
            done = dict(update, **{"$unset": {"due_ms": ""}})
            result = await devices.update_one({"_id": node_id, "lease_owner": owner, "gen": gen}, done)
            if result.matched_count == 1:
                return True
        result = await devices.update_one({"_id": node_id, "lease_owner": owner}, update)
        return bool(result.matched_count == 1)

    # -- revocations (collection ``revocations``) -------------------------------
    def revoke_node(self, node_id: str, until_ms: int) -> Deferred[None]:
        """See :meth:`allspark.store.Store.revoke_node`."""
        return self._run(self._revoke_node, node_id, until_ms)

    async def _revoke_node(self, node_id: str, until_ms: int) -> None:
        if until_ms > 0:
            await self._c("revocations").update_one(
                {"_id": node_id}, {"$set": {"until_ms": until_ms}}, upsert=True
            )
        else:
            await self._c("revocations").delete_one({"_id": node_id})

    def revoked_until(self, node_id: str) -> Deferred[int]:
        """See :meth:`allspark.store.Store.revoked_until`."""
        return self._run(self._revoked_until, node_id)

    async def _revoked_until(self, node_id: str) -> int:
        doc = await self._c("revocations").find_one({"_id": node_id})
        return 0 if doc is None else int(doc["until_ms"])
