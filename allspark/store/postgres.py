"""The PostgreSQL store: several servers, on several hosts, sharing one database.

Chosen with ``--store=postgresql://user@host:port/dbname`` (``postgres://``
works too; any libpq URL parameter may follow, e.g. ``?sslmode=require``).

How it works
------------
As Synapse does, the store talks to PostgreSQL through a
:class:`twisted.enterprise.adbapi.ConnectionPool` with a DB-API driver
(psycopg 3): blocking driver calls run on the pool's thread, results come
back to the reactor as Deferreds, and the pool reconnects a connection that
died.  The pool has **one** connection per store (per server process):

- operations must apply in the order one process submitted them (an ``ack``
  followed by a ``fetch_inbox`` never sees the acked rows), and two
  connections would let a later batch commit before an earlier one;
- throughput comes from batching, not from parallel connections: as with
  SQLite (``allspark/store/sqlite.py``), every operation submitted during one
  reactor turn joins a *batch* that runs in **one** transaction, so a
  commit (one WAL flush) is paid per batch, not per message.  While a batch
  is on the database the next one gathers, so batches grow by themselves
  under load.  A run of inbox appends in a batch goes in with a few
  statements whatever its length (:func:`_append_many`: one binary ``COPY``
  for the copies, unnest arrays for the counters, not one ``INSERT`` per
  copy), and so does a run of acks (:func:`_ack_many`).  Statements that do
  not need each other's results go out together as one psycopg pipeline
  (one round trip).  Several servers give several connections.

Why group commit: a commit costs a WAL flush (an fsync with the default
``synchronous_commit = on``) and a round trip, and each statement a round
trip to another process; a batch of 2,000 appends is about ten statements
and one commit, where one transaction per message would be ten statements
and a flush *per message* (``docs/performance.md`` has the numbers).  Why
psycopg through adbapi rather than an asynchronous driver: it is how
Synapse talks to PostgreSQL in production (psycopg2 there; psycopg 3 here
for binary ``COPY`` rows and pipelines, which are what made batches cheap),
and one thread hop per batch, not per message, costs little.

Seqs and the gap a reader must never skip
-----------------------------------------
Each inbox has a counter row (``inbox_state``), each session stream its
``sessions`` row.  An append allocates its seqs and inserts its rows in
**one** transaction while holding that counter row's lock (``SELECT ... FOR
UPDATE``, then ``UPDATE``): a second writer to the same inbox, from any
process, waits for the first to commit before it reads ``last_seq``.  So
seqs of one inbox commit in seq order, and once a reader sees ``last_seq =
n`` committed, every row with ``seq <= n`` is committed too.  Readers use
that: a page reads ``last_seq`` and the rows in one statement (one snapshot)
or bounds the rows by the ``last_seq`` it read, so ``scanned_upto`` (and the
``upto`` the router derives from ``last_seq``) never steps past a seq that was
allocated but is not readable yet.

Deadlocks are avoided by taking the counter rows a batch writes up front, in
one sorted ``FOR UPDATE`` (inboxes, then sessions).  (An ``UPDATE ...
RETURNING`` per append would lock the same rows, but in the order the
batch's appends come, so two servers' batches could each hold a row the
other waits for; the counters are then moved by one upsert per run, under
the locks already held.)  Locks on other rows
(de-duplication keys, nodes, members) can still meet in another order in
rare cases; PostgreSQL then aborts one transaction (deadlock or
serialization failure), which is retried whole, up to
:attr:`PostgresStore.retry_limit` times.  Such a transaction changed
nothing, so a retry is safe.  A lost connection is not retried: the commit
may or may not have happened, so the batch's Deferreds fail (a client's
retry with the same id is then recognised by de-duplication).

Errors inside a batch: an operation that fails in Python (``DuplicateSession``,
``StoreError``, ``InboxFull``) fails alone.  An SQL error aborts a whole
PostgreSQL transaction, so when one happens the batch is rolled back and run
again with every operation in a ``SAVEPOINT`` of its own: only the faulty
operation fails.

De-duplication across servers: an append reads its ``(sender, id)`` keys
with ``FOR UPDATE`` and inserts the new ones at the end (one ``COPY``).  When
a retry reached another server at the same moment and that server committed
the key first, the ``COPY`` meets the key (a unique violation): the batch is
rolled back and runs again, and then sees the first attempt's answer.  Nothing is written before the transaction commits, so a crashed
process leaves nothing behind: no lease is needed.  (A first version
inserted a placeholder per key and filled it in: twice the writes, and the
filling ``UPDATE`` was the most expensive statement of a batch.)

Durability
----------
A Deferred fires after ``COMMIT`` returned: with PostgreSQL's default
``synchronous_commit = on`` the transaction is in the WAL on disk, so it
survives a crash of the Allspark process, of PostgreSQL or of the host.  (With
a standby and ``synchronous_standby_names``, it is also on the standby.)

Schema versions
---------------
Table ``schema_version`` holds the version; :data:`MIGRATIONS` lists the
steps, applied in order in the startup transaction under an advisory lock, so
servers starting together migrate once.  Append a step to change the schema;
never edit an existing one.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Sequence

import orjson
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

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
from allspark.store.queued import QueuedStore, claimed_jobs, operations

log = logger(__name__)

#: Schema steps: ``MIGRATIONS[i]`` brings a database from version ``i`` to ``i + 1``.
#: Ids are ``COLLATE "C"``: they sort by code point whatever the database's
#: locale, as in the other backends.
MIGRATIONS: list[tuple[str, ...]] = [
    # 1: initial schema
    (
        """CREATE TABLE nodes (
            node_id text COLLATE "C" PRIMARY KEY,
            client_id text COLLATE "C",
            seen_at bigint NOT NULL
        )""",
        "CREATE INDEX nodes_by_client ON nodes (client_id, node_id)",
        # One counter row per inbox: last_seq, purged_upto and the number of
        # unacked rows (pending, for quotas).  Appends lock it (see above).
        """CREATE TABLE inbox_state (
            node_id text COLLATE "C" PRIMARY KEY,
            last_seq bigint NOT NULL DEFAULT 0,
            purged_upto bigint NOT NULL DEFAULT 0,
            pending bigint NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE inbox (
            node_id text COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            stored_at bigint NOT NULL,
            sender_id text COLLATE "C" NOT NULL,
            body bytea NOT NULL,
            PRIMARY KEY (node_id, seq)
        )""",
        "CREATE INDEX inbox_by_stored_at ON inbox (stored_at)",
        # unacked rows per (inbox, sender), for InboxQuota.per_sender
        """CREATE TABLE inbox_senders (
            node_id text COLLATE "C" NOT NULL,
            sender_id text COLLATE "C" NOT NULL,
            pending bigint NOT NULL,
            PRIMARY KEY (node_id, sender_id)
        )""",
        """CREATE TABLE dedup (
            sender_id text COLLATE "C" NOT NULL,
            dedup_id text COLLATE "C" NOT NULL,
            created_at bigint NOT NULL,
            seqs text NOT NULL,
            answer bytea NOT NULL,
            PRIMARY KEY (sender_id, dedup_id)
        )""",
        "CREATE INDEX dedup_by_created_at ON dedup (created_at)",
        """CREATE TABLE sessions (
            session_id text COLLATE "C" PRIMARY KEY,
            owner_id text COLLATE "C" NOT NULL,
            created_at bigint NOT NULL,
            options jsonb NOT NULL,
            last_seq bigint NOT NULL DEFAULT 0,
            purged_upto bigint NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE members (
            session_id text COLLATE "C" NOT NULL,
            node_id text COLLATE "C" NOT NULL,
            client_id text COLLATE "C",
            anonymous boolean NOT NULL,
            alias text NOT NULL,
            joined_at bigint NOT NULL,
            joined_seq bigint NOT NULL,
            acked_seq bigint NOT NULL,
            PRIMARY KEY (session_id, node_id)
        )""",
        "CREATE INDEX members_by_node ON members (node_id, session_id)",
        """CREATE TABLE stream (
            session_id text COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            sender_id text COLLATE "C" NOT NULL,
            stored_at bigint NOT NULL,
            body bytea NOT NULL,
            PRIMARY KEY (session_id, seq)
        )""",
        "CREATE INDEX stream_by_stored_at ON stream (stored_at)",
        # rows per (session, sender) in the current quota window; sender '' is the whole session
        """CREATE TABLE stream_quota (
            session_id text COLLATE "C" NOT NULL,
            sender_id text COLLATE "C" NOT NULL,
            window_end bigint NOT NULL,
            rows bigint NOT NULL,
            PRIMARY KEY (session_id, sender_id)
        )""",
    ),
    # 2: server records (the cluster): the record as JSON, its holder beside it
    # for the compare-and-set of put_server
    (
        """CREATE TABLE servers (
            server_id text COLLATE "C" PRIMARY KEY,
            holder text NOT NULL,
            record text NOT NULL
        )""",
    ),
    # 3: locations (which server holds which online node): one row per
    # connection, dropped in bulk by server
    (
        """CREATE TABLE locations (
            node_id text COLLATE "C" NOT NULL,
            server_id text COLLATE "C" NOT NULL,
            epoch bigint NOT NULL,
            PRIMARY KEY (node_id, server_id, epoch)
        )""",
        "CREATE INDEX locations_by_server ON locations (server_id)",
    ),
    # 4: push notifications: one row per node that registered a target or
    # muted its pushes (the target as JSON, its address beside it for
    # remove_push_target's compare; NULL once unregistered), its schedule
    # (due_ms, NULL when nothing is pending; gen counts schedules), the
    # lease of the server sending it, and the send history (last_sent_ms,
    # attempts).  push_due holds only rows with a due time: claims read it
    # in due order.  revocations: the server API's revoked nodes.
    (
        """CREATE TABLE push_devices (
            node_id text COLLATE "C" PRIMARY KEY,
            target text,
            address text,
            muted boolean NOT NULL DEFAULT false,
            due_ms bigint,
            gen bigint NOT NULL DEFAULT 0,
            lease_owner text,
            lease_until_ms bigint NOT NULL DEFAULT 0,
            last_sent_ms bigint,
            attempts integer NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX push_due ON push_devices (due_ms, node_id) WHERE due_ms IS NOT NULL",
        """CREATE TABLE revocations (
            node_id text COLLATE "C" PRIMARY KEY,
            until_ms bigint NOT NULL
        )""",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)

#: ``pg_advisory_xact_lock`` key held while checking and migrating the schema.
_MIGRATION_LOCK = 0x616C6C73  # "alls"

_Op = tuple[Callable[..., Any], tuple[Any, ...], Deferred]


class _Careful(Exception):
    """An SQL error aborted the transaction: run the batch again, each operation in a savepoint."""


def _multi(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an operation that may write and then fail: it always runs in a SAVEPOINT."""
    fn._savepoint = True  # type: ignore[attr-defined]
    return fn


# -- operations, run inside a batch's transaction with its cursor ----------------

_MEMBER_COLS = (
    "session_id, node_id, client_id, anonymous, alias, joined_at, joined_seq, acked_seq"
)


def _member(row: Sequence[Any]) -> MemberRecord:
    return MemberRecord(row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6], row[7])


def _session(row: Sequence[Any]) -> SessionRecord:
    return SessionRecord(row[0], row[1], row[2], dict(row[3]))


def _jsonb(value: dict[str, Any]) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value)


def _duplicate(prior: tuple[int, str, bytes] | None, now_ms: int, window_ms: int) -> AppendResult | None:
    """The first attempt's result when ``prior`` (a de-dup row: created_at,
    seqs as JSON, answer) is inside the window, else None."""
    if prior is None or now_ms - prior[0] >= window_ms:
        return None
    return AppendResult(True, orjson.loads(prior[1]), bytes(prior[2]))


class _DedupRace(Exception):
    """Another transaction committed a de-duplication key this batch took for
    new: the batch is rolled back and runs again (and then sees the key)."""


_DEDUP_READ = (
    "SELECT sender_id, dedup_id, created_at, seqs, answer FROM dedup "
    "WHERE (sender_id, dedup_id) IN (SELECT s, d FROM unnest(%s::text[], %s::text[]) AS k(s, d)) "
    "ORDER BY sender_id, dedup_id FOR UPDATE"
)
# COPY (three times faster than INSERT ... SELECT FROM unnest ... ON CONFLICT DO NOTHING)
_DEDUP_COPY = "COPY dedup (sender_id, dedup_id, created_at, seqs, answer) FROM STDIN (FORMAT BINARY)"
_DEDUP_COPY_TYPES = ["text", "text", "int8", "text", "bytea"]
_DEDUP_REPLACE = (
    "UPDATE dedup SET created_at = %s, seqs = %s, answer = %s WHERE sender_id = %s AND dedup_id = %s"
)


def _dedup_read(cur: Any, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, str, bytes]]:
    """The stored de-duplication rows of ``keys``, locked until the batch commits."""
    cur.execute(_DEDUP_READ, ([k[0] for k in keys], [k[1] for k in keys]))
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in cur.fetchall()}


def _dedup_write(
    cur: Any, rows: list[tuple[str, str, int, bytes, bytes]], existing: dict[tuple[str, str], Any]
) -> None:
    """Store the de-duplication rows of appended messages: keys that
    :func:`_dedup_read` found (expired ones) are replaced, new keys inserted.
    A new key that another transaction committed meanwhile (a retry that
    reached another server at the same moment) raises :class:`_DedupRace`."""
    new = [r for r in rows if (r[0], r[1]) not in existing]
    for r in rows:
        if (r[0], r[1]) in existing:
            cur.execute(_DEDUP_REPLACE, (r[2], r[3].decode(), r[4], r[0], r[1]))
    if new:
        import psycopg.errors

        # A unique violation aborts the transaction; the batch reruns whole anyway.
        try:
            with cur.copy(_DEDUP_COPY) as copy:
                copy.set_types(_DEDUP_COPY_TYPES)
                for r in new:
                    copy.write_row((r[0], r[1], r[2], r[3].decode(), r[4]))
        except psycopg.errors.UniqueViolation:
            raise _DedupRace() from None


def _op_remember_node(cur: Any, node_id: str, client_id: str | None, now: int) -> None:
    cur.execute(
        "INSERT INTO nodes (node_id, client_id, seen_at) VALUES (%s, %s, %s) "
        "ON CONFLICT (node_id) DO UPDATE SET client_id = excluded.client_id, "
        "seen_at = excluded.seen_at",
        (node_id, client_id, now),
    )


def _op_get_node(cur: Any, node_id: str) -> tuple[str, str | None] | None:
    cur.execute("SELECT node_id, client_id FROM nodes WHERE node_id = %s", (node_id,))
    row = cur.fetchone()
    return None if row is None else (row[0], row[1])


def _op_get_server(cur: Any, server_id: str) -> ServerRecord | None:
    cur.execute("SELECT record FROM servers WHERE server_id = %s", (server_id,))
    row = cur.fetchone()
    return None if row is None else ServerRecord.from_json(row[0])


def _op_list_servers(cur: Any) -> list[ServerRecord]:
    cur.execute("SELECT record FROM servers ORDER BY server_id")
    return [ServerRecord.from_json(r[0]) for r in cur.fetchall()]


def _op_put_server(cur: Any, record: ServerRecord, expect_holder: str | None) -> bool:
    if expect_holder is None:
        cur.execute("INSERT INTO servers (server_id, holder, record) VALUES (%s, %s, %s) "
                    "ON CONFLICT (server_id) DO NOTHING", (record.server_id, record.holder, record.to_json()))
    else:
        cur.execute("UPDATE servers SET holder = %s, record = %s WHERE server_id = %s AND holder = %s",
                    (record.holder, record.to_json(), record.server_id, expect_holder))
    return bool(cur.rowcount == 1)


def _op_remove_server(cur: Any, server_id: str, holder: str) -> bool:
    cur.execute("DELETE FROM servers WHERE server_id = %s AND holder = %s", (server_id, holder))
    return bool(cur.rowcount == 1)


def _op_put_location(cur: Any, record: LocationRecord) -> None:
    cur.execute("INSERT INTO locations (node_id, server_id, epoch) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (record.node_id, record.server_id, record.epoch))


def _op_remove_location(cur: Any, record: LocationRecord) -> bool:
    cur.execute("DELETE FROM locations WHERE node_id = %s AND server_id = %s AND epoch = %s",
                (record.node_id, record.server_id, record.epoch))
    return bool(cur.rowcount == 1)


def _op_drop_locations(cur: Any, server_id: str) -> int:
    cur.execute("DELETE FROM locations WHERE server_id = %s", (server_id,))
    return int(cur.rowcount)


def _op_list_locations(cur: Any) -> list[LocationRecord]:
    cur.execute("SELECT node_id, server_id, epoch FROM locations ORDER BY node_id, server_id, epoch")
    return [LocationRecord(r[0], r[1], r[2]) for r in cur.fetchall()]


def _op_nodes_of_client(cur: Any, client_id: str) -> list[str]:
    cur.execute("SELECT node_id FROM nodes WHERE client_id = %s ORDER BY node_id", (client_id,))
    return [r[0] for r in cur.fetchall()]


_AppendArgs = tuple[str, "str | None", Sequence[str], bytes, bytes, int, int, "InboxQuota | None"]

_STATE_OF = "SELECT node_id, last_seq, pending FROM inbox_state WHERE node_id = ANY(%s)"
_SENDERS_OF = (
    "SELECT node_id, sender_id, pending FROM inbox_senders WHERE (node_id, sender_id) IN "
    "(SELECT n, s FROM unnest(%s::text[], %s::text[]) AS k(n, s))"
)
# COPY in binary: three times faster than INSERT ... SELECT FROM unnest for a batch of rows
_COPY_INBOX = "COPY inbox (node_id, seq, stored_at, sender_id, body) FROM STDIN (FORMAT BINARY)"
_COPY_INBOX_TYPES = ["text", "int8", "int8", "text", "bytea"]
_SET_STATE = (
    "INSERT INTO inbox_state AS t (node_id, last_seq, pending) "
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
    "ON CONFLICT (node_id) DO UPDATE SET last_seq = excluded.last_seq, "
    "pending = t.pending + excluded.pending"
)
_ADD_SENDER_PENDING = (
    "INSERT INTO inbox_senders AS t (node_id, sender_id, pending) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
    "ON CONFLICT (node_id, sender_id) DO UPDATE SET pending = t.pending + excluded.pending"
)


def _append_many(cur: Any, appends: Sequence[_AppendArgs]) -> list[AppendResult | Exception]:
    """Append many messages (the arguments of :meth:`PostgresStore.append_inbox`)
    with a handful of statements, whatever their number.

    The batch already holds the lock of every recipient's counter row (see
    :meth:`PostgresStore._lock_counters`).  One query reads (and locks) the
    de-duplication rows of the run's keys, one the counters, one the
    per-sender counts (when a quota is given); the copies are numbered and
    the quotas checked in Python, in order, so appends of one run count
    against each other; then one ``COPY`` inserts the copies, two upserts
    move the counters and the per-sender counts, and one more ``COPY``
    writes the new de-duplication rows (:func:`_dedup_write`).
    A ``(sender, id)`` repeated inside the run is a duplicate of its first
    occurrence.  The result of an append is its :class:`AppendResult` or the
    :class:`InboxFull` it failed with.
    """
    keys = sorted({(a[0], a[1]) for a in appends if a[1] is not None})
    nodes = sorted({node for a in appends for node in a[2]})
    pairs = sorted({(node, a[0]) for a in appends if a[7] is not None for node in a[2]})
    conn = cur.connection
    # the three reads go out together: one round trip
    with conn.pipeline(), conn.cursor() as dedup_cur, conn.cursor() as senders_cur:
        if keys:
            dedup_cur.execute(_DEDUP_READ, ([k[0] for k in keys], [k[1] for k in keys]))
        cur.execute(_STATE_OF, (nodes,))
        if pairs:
            senders_cur.execute(_SENDERS_OF, ([p[0] for p in pairs], [p[1] for p in pairs]))
        stored_keys = {(r[0], r[1]): (r[2], r[3], r[4]) for r in dedup_cur.fetchall()} if keys else {}
        state_rows = cur.fetchall()
        by_sender: dict[tuple[str, str], int] = (
            {(r[0], r[1]): r[2] for r in senders_cur.fetchall()} if pairs else {}
        )
    known = dict(stored_keys)
    last: dict[str, int] = {}
    pending: dict[str, int] = {}
    for node_id, last_seq, count in state_rows:
        last[node_id], pending[node_id] = last_seq, count
    added: dict[str, int] = {}
    added_by_sender: dict[tuple[str, str], int] = {}
    rows: list[tuple[str, int, int, str, bytes]] = []
    settle: list[tuple[str, str, int, bytes, bytes]] = []
    results: list[AppendResult | Exception] = []
    for sender, dedup_id, recipients, body, answer, now_ms, window_ms, quota in appends:
        if dedup_id is not None:
            duplicate = _duplicate(known.get((sender, dedup_id)), now_ms, window_ms)
            if duplicate is not None:
                results.append(duplicate)
                continue
        targets = list(dict.fromkeys(recipients))
        if quota is not None:
            full, per_sender = [], False
            for node_id in targets:
                if pending.get(node_id, 0) >= quota.per_inbox:
                    full.append(node_id)
                elif by_sender.get((node_id, sender), 0) >= quota.per_sender:
                    full.append(node_id)
                    per_sender = True
            if full:
                results.append(InboxFull(full, per_sender))
                continue
        seqs: dict[str, int] = {}
        body = bytes(body)
        for node_id in targets:
            seq = last.get(node_id, 0) + 1
            last[node_id] = seqs[node_id] = seq
            pending[node_id] = pending.get(node_id, 0) + 1
            added[node_id] = added.get(node_id, 0) + 1
            key = (node_id, sender)
            by_sender[key] = by_sender.get(key, 0) + 1
            added_by_sender[key] = added_by_sender.get(key, 0) + 1
            rows.append((node_id, seq, now_ms, sender, body))
        if dedup_id is not None:
            encoded = orjson.dumps(seqs)
            if (sender, dedup_id) in known and (sender, dedup_id) not in stored_keys:
                # the same key twice in the run, the first out of the window: one row
                settle = [r for r in settle if (r[0], r[1]) != (sender, dedup_id)]
            known[(sender, dedup_id)] = (now_ms, encoded.decode(), answer)
            settle.append((sender, dedup_id, now_ms, encoded, answer))
        results.append(AppendResult(False, seqs, answer))
    if rows:
        with cur.copy(_COPY_INBOX) as copy:
            copy.set_types(_COPY_INBOX_TYPES)
            for row in rows:
                copy.write_row(row)
        touched = sorted(added)
        sender_keys = sorted(added_by_sender)
        with conn.pipeline():
            cur.execute(_SET_STATE, (touched, [last[n] for n in touched], [added[n] for n in touched]))
            cur.execute(_ADD_SENDER_PENDING, (
                [k[0] for k in sender_keys], [k[1] for k in sender_keys],
                [added_by_sender[k] for k in sender_keys],
            ))
    if settle:
        _dedup_write(cur, settle, stored_keys)
    return results


def _op_append_inbox(
    cur: Any,
    sender_id: str,
    dedup_id: str | None,
    recipients: Sequence[str],
    body: bytes,
    answer: bytes,
    now_ms: int,
    window_ms: int,
    quota: InboxQuota | None,
) -> AppendResult:
    """One append on its own (runs of appends go through :func:`_append_many`)."""
    result = _append_many(cur, [(sender_id, dedup_id, recipients, body, answer, now_ms, window_ms, quota)])[0]
    if isinstance(result, Exception):
        raise result
    return result


_FETCH_INBOX = (
    # one statement, one snapshot: the counters and the rows agree, and rows
    # are bounded by the last_seq read (see the module docstring)
    "SELECT s.last_seq, s.purged_upto, i.seq, i.body, i.stored_at FROM inbox_state AS s "
    "LEFT JOIN LATERAL (SELECT seq, body, stored_at FROM inbox "
    "WHERE node_id = s.node_id AND seq > %s AND seq <= s.last_seq ORDER BY seq LIMIT %s) AS i ON true "
    "WHERE s.node_id = %s"
)


def _op_fetch_inbox(cur: Any, node_id: str, after: int, limit: int) -> InboxPage:
    cur.execute(_FETCH_INBOX, (after, limit, node_id))
    rows = cur.fetchall()
    if not rows or rows[0][0] == 0:
        return InboxPage([], 0, 0, after)
    messages = [StoredMessage(r[2], bytes(r[3]), r[4]) for r in rows if r[2] is not None]
    return InboxPage(messages, rows[0][0], rows[0][1], messages[-1].seq if messages else after)


_ACK_DELETE = (
    "DELETE FROM inbox AS i USING unnest(%s::text[], %s::bigint[]) AS v(n, u) "
    "WHERE i.node_id = v.n AND i.seq <= v.u RETURNING i.node_id, i.seq, i.sender_id"
)
_ACK_SENDERS = (
    "UPDATE inbox_senders AS t SET pending = t.pending - v.c "
    "FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS v(n, s, c) "
    "WHERE t.node_id = v.n AND t.sender_id = v.s"
)
_ACK_STATE = (
    "UPDATE inbox_state AS t SET pending = t.pending - v.c "
    "FROM unnest(%s::text[], %s::bigint[]) AS v(n, c) WHERE t.node_id = v.n"
)


def _ack_many(cur: Any, acks: Sequence[tuple[str, int]]) -> list[int]:
    """Apply many acks (``(node_id, upto)``, in order) with three statements:
    one ``DELETE`` for all of them, then the unacked counters per (inbox,
    sender) and per inbox go down.  The batch holds the counter rows' locks
    (:meth:`PostgresStore._lock_counters`).  Each ack's count is what it
    would have deleted on its own, in order."""
    upto: dict[str, int] = {}
    for node_id, until in acks:
        upto[node_id] = max(until, upto.get(node_id, until))
    nodes = sorted(upto)
    cur.execute(_ACK_DELETE, (nodes, [upto[n] for n in nodes]))
    gone: dict[str, list[int]] = {}
    per_sender: dict[tuple[str, str], int] = {}
    for node_id, seq, sender_id in cur.fetchall():
        gone.setdefault(node_id, []).append(seq)
        per_sender[(node_id, sender_id)] = per_sender.get((node_id, sender_id), 0) + 1
    if per_sender:
        pairs = sorted(per_sender)
        cur.execute(_ACK_SENDERS, ([p[0] for p in pairs], [p[1] for p in pairs], [per_sender[p] for p in pairs]))
        touched = sorted(gone)
        cur.execute(_ACK_STATE, (touched, [len(gone[n]) for n in touched]))
    counts = []
    for seqs in gone.values():
        seqs.sort(reverse=True)  # popped from the end, lowest first
    for node_id, until in acks:
        seqs = gone.get(node_id, [])
        count = 0
        while seqs and seqs[-1] <= until:
            seqs.pop()
            count += 1
        counts.append(count)
    return counts


def _op_ack_inbox(cur: Any, node_id: str, upto: int) -> int:
    """One ack on its own (runs of acks go through :func:`_ack_many`)."""
    return _ack_many(cur, [(node_id, upto)])[0]


def _op_inbox_state(cur: Any, node_id: str) -> tuple[int, int]:
    cur.execute("SELECT last_seq, purged_upto FROM inbox_state WHERE node_id = %s", (node_id,))
    row = cur.fetchone()
    return (0, 0) if row is None else (row[0], row[1])


_PURGE_INBOX = (
    "WITH gone AS (DELETE FROM inbox WHERE stored_at < %s RETURNING node_id, seq, sender_id), "
    "per_node AS (SELECT node_id, max(seq) AS top, count(*) AS n FROM gone GROUP BY node_id), "
    "per_sender AS (SELECT node_id, sender_id, count(*) AS n FROM gone GROUP BY node_id, sender_id), "
    "senders AS (UPDATE inbox_senders AS t SET pending = t.pending - p.n FROM per_sender AS p "
    "WHERE t.node_id = p.node_id AND t.sender_id = p.sender_id), "
    "state AS (UPDATE inbox_state AS t SET purged_upto = GREATEST(t.purged_upto, p.top), "
    "pending = t.pending - p.n FROM per_node AS p WHERE t.node_id = p.node_id) "
    "SELECT coalesce(sum(n), 0) FROM per_node"
)
_PURGE_STREAM = (
    "WITH gone AS (DELETE FROM stream WHERE stored_at < %s RETURNING session_id, seq), "
    "per AS (SELECT session_id, max(seq) AS top, count(*) AS n FROM gone GROUP BY session_id), "
    "up AS (UPDATE sessions AS t SET purged_upto = GREATEST(t.purged_upto, p.top) FROM per AS p "
    "WHERE t.session_id = p.session_id) "
    "SELECT coalesce(sum(n), 0) FROM per"
)


@_multi
def _op_purge(cur: Any, stored_before: int, dedup_before: int) -> int:
    # Lock the counter rows of the inboxes it touches in the order appends do.
    cur.execute(
        "SELECT node_id FROM inbox_state WHERE node_id IN "
        "(SELECT DISTINCT node_id FROM inbox WHERE stored_at < %s) ORDER BY node_id FOR UPDATE",
        (stored_before,),
    )
    cur.execute(_PURGE_INBOX, (stored_before,))
    count = int(cur.fetchone()[0])
    cur.execute(_PURGE_STREAM, (stored_before,))
    count += int(cur.fetchone()[0])
    cur.execute("DELETE FROM inbox_senders WHERE pending <= 0")
    cur.execute("DELETE FROM dedup WHERE created_at < %s", (dedup_before,))
    cur.execute("DELETE FROM stream_quota WHERE window_end < %s", (dedup_before,))
    return count


def _op_create_session(
    cur: Any, session_id: str, owner_id: str, options: dict[str, Any], now_ms: int
) -> SessionRecord:
    cur.execute(
        "INSERT INTO sessions (session_id, owner_id, created_at, options) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (session_id) DO NOTHING "
        "RETURNING session_id, owner_id, created_at, options",
        (session_id, owner_id, now_ms, _jsonb(options)),
    )
    row = cur.fetchone()
    if row is None:
        raise DuplicateSession(session_id)
    return _session(row)


def _op_get_session(cur: Any, session_id: str) -> SessionRecord | None:
    cur.execute(
        "SELECT session_id, owner_id, created_at, options FROM sessions WHERE session_id = %s",
        (session_id,),
    )
    row = cur.fetchone()
    return None if row is None else _session(row)


def _op_update_session(cur: Any, session_id: str, options: dict[str, Any]) -> SessionRecord | None:
    cur.execute(
        "UPDATE sessions SET options = %s WHERE session_id = %s "
        "RETURNING session_id, owner_id, created_at, options",
        (_jsonb(options), session_id),
    )
    row = cur.fetchone()
    return None if row is None else _session(row)


@_multi
def _op_delete_session(cur: Any, session_id: str) -> None:
    cur.execute("DELETE FROM stream WHERE session_id = %s", (session_id,))
    cur.execute("DELETE FROM members WHERE session_id = %s", (session_id,))
    cur.execute("DELETE FROM stream_quota WHERE session_id = %s", (session_id,))
    cur.execute("DELETE FROM sessions WHERE session_id = %s", (session_id,))


def _op_add_member(
    cur: Any,
    session_id: str,
    node_id: str,
    client_id: str | None,
    anonymous: bool,
    alias: str,
    now_ms: int,
) -> MemberRecord:
    # Inserts nothing when the session does not exist, so raising after it leaves nothing behind.
    cur.execute(
        f"INSERT INTO members ({_MEMBER_COLS}) "
        "SELECT session_id, %s, %s, %s, %s, %s, last_seq, last_seq FROM sessions WHERE session_id = %s "
        "ON CONFLICT (session_id, node_id) DO NOTHING",
        (node_id, client_id, bool(anonymous), alias, now_ms, session_id),
    )
    cur.execute(
        f"SELECT {_MEMBER_COLS} FROM members WHERE session_id = %s AND node_id = %s",
        (session_id, node_id),
    )
    row = cur.fetchone()
    if row is None:
        raise StoreError(f"no such session: {session_id!r}")
    return _member(row)


def _op_update_member(
    cur: Any, session_id: str, node_id: str, anonymous: bool, alias: str
) -> MemberRecord | None:
    cur.execute(
        "UPDATE members SET anonymous = %s, alias = %s WHERE session_id = %s AND node_id = %s "
        f"RETURNING {_MEMBER_COLS}",
        (bool(anonymous), alias, session_id, node_id),
    )
    row = cur.fetchone()
    return None if row is None else _member(row)


def _op_remove_member(cur: Any, session_id: str, node_id: str) -> bool:
    cur.execute("DELETE FROM members WHERE session_id = %s AND node_id = %s", (session_id, node_id))
    return cur.rowcount > 0


def _op_get_members(cur: Any, session_id: str) -> list[MemberRecord]:
    cur.execute(
        f"SELECT {_MEMBER_COLS} FROM members WHERE session_id = %s ORDER BY joined_at, node_id",
        (session_id,),
    )
    return [_member(r) for r in cur.fetchall()]


def _op_sessions_of_node(cur: Any, node_id: str) -> list[MemberRecord]:
    cur.execute(
        f"SELECT {_MEMBER_COLS} FROM members WHERE node_id = %s ORDER BY joined_at, session_id",
        (node_id,),
    )
    return [_member(r) for r in cur.fetchall()]


@_multi
def _op_append_session(
    cur: Any,
    session_id: str,
    sender_id: str,
    dedup_id: str | None,
    body: bytes,
    answer: bytes,
    now_ms: int,
    window_ms: int,
    quota: StreamQuota | None,
) -> AppendResult:
    if dedup_id is not None:
        stored_keys = _dedup_read(cur, [(sender_id, dedup_id)])
        seen = _duplicate(stored_keys.get((sender_id, dedup_id)), now_ms, window_ms)
        if seen is not None:
            return seen
    # the batch locked this row already (_lock_counters); FOR UPDATE keeps it so on its own
    cur.execute("SELECT last_seq FROM sessions WHERE session_id = %s FOR UPDATE", (session_id,))
    row = cur.fetchone()
    if row is None:
        raise StoreError(f"no such session: {session_id!r}")
    if quota is not None:
        end = quota_window_end(now_ms, quota.window_ms)
        cur.execute(
            "SELECT sender_id, window_end, rows FROM stream_quota "
            "WHERE session_id = %s AND sender_id IN ('', %s)",
            (session_id, sender_id),
        )
        counts = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
        updates = []
        for key, limit in (("", quota.per_session), (sender_id, quota.per_sender)):
            window_end, rows = counts.get(key, (end, 0))
            if window_end < end:  # a later window: start counting again
                window_end, rows = end, 0
            if rows >= limit:
                raise SessionFull(session_id, per_sender=bool(key))
            updates.append((key, window_end, rows + 1))
        cur.execute(
            "INSERT INTO stream_quota (session_id, sender_id, window_end, rows) "
            "SELECT %s, * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
            "ON CONFLICT (session_id, sender_id) DO UPDATE SET window_end = excluded.window_end, "
            "rows = excluded.rows",
            (session_id, [u[0] for u in updates], [u[1] for u in updates], [u[2] for u in updates]),
        )
    seq = row[0] + 1
    cur.execute("UPDATE sessions SET last_seq = %s WHERE session_id = %s", (seq, session_id))
    cur.execute(
        "INSERT INTO stream (session_id, seq, sender_id, stored_at, body) VALUES (%s, %s, %s, %s, %s)",
        (session_id, seq, sender_id, now_ms, bytes(body)),
    )
    seqs = {session_id: seq}
    if dedup_id is not None:
        _dedup_write(cur, [(sender_id, dedup_id, now_ms, orjson.dumps(seqs), answer)], stored_keys)
    return AppendResult(False, seqs, answer)


def _op_fetch_session(cur: Any, session_id: str, reader_id: str, after: int, limit: int) -> InboxPage:
    cur.execute(
        "SELECT s.last_seq, s.purged_upto, m.joined_seq FROM sessions AS s "
        "LEFT JOIN members AS m ON m.session_id = s.session_id AND m.node_id = %s "
        "WHERE s.session_id = %s",
        (reader_id, session_id),
    )
    state = cur.fetchone()
    if state is None:
        return InboxPage([], 0, 0, after)
    last_seq = state[0]
    if state[2] is not None and state[2] > after:
        after = state[2]
    # Rows are bounded by the last_seq read above: every seq up to it is
    # committed (see the module docstring), later ones are for the next page.
    cur.execute(
        "SELECT seq, body, stored_at FROM stream WHERE session_id = %s AND seq > %s AND seq <= %s "
        "AND sender_id <> %s ORDER BY seq LIMIT %s",
        (session_id, after, last_seq, reader_id, limit),
    )
    messages = [StoredMessage(r[0], bytes(r[1]), r[2]) for r in cur.fetchall()]
    if len(messages) >= limit:
        scanned = messages[-1].seq
    else:
        cur.execute(
            "SELECT max(seq) FROM stream WHERE session_id = %s AND seq > %s AND seq <= %s",
            (session_id, after, last_seq),
        )
        top = cur.fetchone()[0]
        scanned = after if top is None else top
    return InboxPage(messages, last_seq, state[1], scanned)


def _op_ack_session(cur: Any, session_id: str, node_id: str, upto: int) -> int:
    cur.execute(
        "UPDATE members AS m SET acked_seq = GREATEST(m.acked_seq, LEAST(%s, s.last_seq)) "
        "FROM sessions AS s WHERE s.session_id = m.session_id "
        "AND m.session_id = %s AND m.node_id = %s RETURNING m.acked_seq",
        (upto, session_id, node_id),
    )
    row = cur.fetchone()
    return 0 if row is None else row[0]


# -- push notifications --------------------------------------------------------
# Claims lock their rows with FOR UPDATE SKIP LOCKED: a row another server's
# transaction is claiming (or scheduling) is skipped, not waited for, and a
# row it claimed and committed meanwhile is re-checked against the lease
# condition before it is taken (READ COMMITTED re-reads a locked row), so two
# servers never take the same node.  Schedules lock their rows in node_id
# order, as the appends' counters are, so two servers scheduling the same
# nodes wait for each other instead of deadlocking.

_CLAIM_PUSHES = (
    "UPDATE push_devices SET lease_owner = %(owner)s, lease_until_ms = %(until)s "
    "WHERE node_id IN (SELECT node_id FROM push_devices "
    "WHERE due_ms IS NOT NULL AND due_ms <= %(now)s AND target IS NOT NULL AND NOT muted "
    "AND (lease_owner IS NULL OR lease_until_ms < %(now)s) ORDER BY due_ms, node_id "
    "LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
    "RETURNING node_id, target, gen, due_ms, last_sent_ms, attempts"
)
_FINISH_PUSH = (
    "UPDATE push_devices SET lease_owner = NULL, lease_until_ms = 0, "
    "last_sent_ms = COALESCE(%(sent)s::bigint, last_sent_ms), "
    "attempts = (CASE WHEN %(sent)s::bigint IS NULL THEN attempts ELSE 0 END) + %(failed)s, "
    "due_ms = CASE WHEN %(retry)s::bigint IS NOT NULL THEN %(retry)s::bigint "
    "WHEN gen = %(gen)s THEN NULL ELSE due_ms END "
    "WHERE node_id = %(node)s AND lease_owner = %(owner)s"
)


def _op_set_push_target(cur: Any, target: PushTarget) -> None:
    cur.execute(
        "INSERT INTO push_devices (node_id, target, address) VALUES (%s, %s, %s) "
        "ON CONFLICT (node_id) DO UPDATE SET target = excluded.target, address = excluded.address",
        (target.node_id, target.to_json(), target.address),
    )


def _op_get_push_target(cur: Any, node_id: str) -> PushTarget | None:
    cur.execute("SELECT target FROM push_devices WHERE node_id = %s", (node_id,))
    row = cur.fetchone()
    return None if row is None or row[0] is None else PushTarget.from_json(row[0])


def _op_remove_push_target(cur: Any, node_id: str, address: str | None) -> bool:
    cur.execute(
        "UPDATE push_devices SET target = NULL, address = NULL "
        "WHERE node_id = %s AND target IS NOT NULL AND (%s::text IS NULL OR address = %s::text)",
        (node_id, address, address),
    )
    return bool(cur.rowcount == 1)


def _op_set_push_muted(cur: Any, node_id: str, muted: bool) -> None:
    cur.execute(
        "INSERT INTO push_devices (node_id, muted) VALUES (%s, %s) "
        "ON CONFLICT (node_id) DO UPDATE SET muted = excluded.muted",
        (node_id, muted),
    )


def _op_push_muted(cur: Any, node_id: str) -> bool:
    cur.execute("SELECT muted FROM push_devices WHERE node_id = %s", (node_id,))
    row = cur.fetchone()
    return row is not None and bool(row[0])


def _op_schedule_push(cur: Any, node_ids: list[str], due_ms: int) -> list[str]:
    """``node_ids`` are distinct (QueuedStore removes repeats)."""
    if not node_ids:
        return []
    cur.execute(
        "UPDATE push_devices SET gen = gen + 1, "
        "due_ms = CASE WHEN due_ms IS NULL OR due_ms > %(due)s THEN %(due)s ELSE due_ms END "
        "WHERE node_id IN (SELECT node_id FROM push_devices WHERE node_id = ANY(%(ids)s) "
        "AND target IS NOT NULL AND NOT muted ORDER BY node_id FOR UPDATE) "
        "AND target IS NOT NULL AND NOT muted RETURNING node_id",
        {"due": due_ms, "ids": node_ids},
    )
    scheduled = {r[0] for r in cur.fetchall()}
    return [n for n in node_ids if n in scheduled]


def _op_claim_due_pushes(cur: Any, now_ms: int, owner: str, lease_ms: int, limit: int) -> list[PushJob]:
    if limit < 1:
        return []
    cur.execute(_CLAIM_PUSHES, {"owner": owner, "until": now_ms + lease_ms, "now": now_ms, "limit": limit})
    return claimed_jobs(cur.fetchall())


def _op_finish_push(
    cur: Any,
    node_id: str,
    owner: str,
    gen: int,
    sent_ms: int | None,
    retry_at_ms: int | None,
    failed: bool,
) -> bool:
    cur.execute(_FINISH_PUSH, {"sent": sent_ms, "failed": int(failed), "retry": retry_at_ms,
                               "gen": gen, "node": node_id, "owner": owner})
    return bool(cur.rowcount == 1)


def _op_revoke_node(cur: Any, node_id: str, until_ms: int) -> None:
    if until_ms > 0:
        cur.execute(
            "INSERT INTO revocations (node_id, until_ms) VALUES (%s, %s) "
            "ON CONFLICT (node_id) DO UPDATE SET until_ms = excluded.until_ms",
            (node_id, until_ms),
        )
    else:
        cur.execute("DELETE FROM revocations WHERE node_id = %s", (node_id,))


def _op_revoked_until(cur: Any, node_id: str) -> int:
    cur.execute("SELECT until_ms FROM revocations WHERE node_id = %s", (node_id,))
    row = cur.fetchone()
    return 0 if row is None else int(row[0])


#: Operations that run in runs: consecutive ones in a batch go to one call.
_RUNS: dict[Callable[..., Any], Callable[[Any, Any], list[Any]]] = {
    _op_append_inbox: _append_many,
    _op_ack_inbox: _ack_many,
}


# -- the store -----------------------------------------------------------------


def _is_retryable(error: BaseException) -> bool:
    """A deadlock or serialization failure: the transaction was rolled back and may run again."""
    import psycopg.errors

    return isinstance(error, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
                              _DedupRace))


class PostgresStore(QueuedStore):
    """The PostgreSQL :class:`~allspark.store.Store`.

    ``url`` is a libpq connection URL (``postgresql://user@host:port/db``);
    ``reactor`` provides ``callLater``, ``seconds`` and the thread pool.
    After :meth:`start`, :attr:`migrations_applied` lists the schema versions
    this start created (empty when the database was already current).
    """

    OPS = operations(globals())

    #: Seconds a connection attempt may take (libpq ``connect_timeout``)
    #: unless the URL sets ``connect_timeout`` itself.
    connect_timeout_s = 10
    #: How many times a batch runs again after a deadlock or serialization failure.
    retry_limit = 10

    def __init__(self, url: str, reactor: Any) -> None:
        self.url = url
        self._reactor = reactor
        self._pool: Any = None
        self._pending: list[_Op] = []
        self._flush_scheduled = False
        self._in_flight = False
        self._closing = False
        self._closed: Deferred[None] | None = None
        self.migrations_applied: list[int] = []

    # -- plumbing -----------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Queue ``fn(cursor, *args)`` for the next batch; its result as a Deferred."""
        if self._closing or self._pool is None:
            return fail(StoreError("store is not open"))
        d: Deferred[Any] = Deferred()
        self._pending.append((fn, args, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if not self._flush_scheduled and not self._in_flight:
            self._flush_scheduled = True
            self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        """Send the pending operations to the database as one batch."""
        self._flush_scheduled = False
        if self._in_flight or not self._pending or self._pool is None:
            return
        batch, self._pending = self._pending, []
        self._in_flight = True
        d = self._pool.runWithConnection(self._run_batch, batch)
        d.addBoth(self._batch_done, batch, time.perf_counter())

    def _batch_done(self, outcome: Any, batch: list[_Op], started: float) -> None:
        """Fire the batch's Deferreds in submission order; start the next batch."""
        self._in_flight = False
        self._observe_batch(len(batch), time.perf_counter() - started)
        if isinstance(outcome, Failure):
            log.failure("store batch failed", outcome, size=len(batch))
            results: list[tuple[bool, Any]] = [(False, outcome)] * len(batch)
        else:
            results = outcome
        for (_, _, d), (ok, value) in zip(batch, results):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        if self._pending:
            self._schedule()

    # -- in the pool's thread ------------------------------------------------
    def _run_batch(self, conn: Any, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Run ``batch`` in one transaction and commit; one ``(ok, result or
        Failure)`` per operation.  Runs on the pool's thread."""
        careful = False
        attempt = 0
        while True:
            try:
                results = self._attempt(conn, batch, careful)
                conn.commit()
                return results
            except _Careful:
                conn.rollback()
                careful = True
            except Exception as e:
                if not _is_retryable(e) or attempt >= self.retry_limit:
                    raise
                conn.rollback()
                attempt += 1
                self._reactor.callFromThread(
                    log.info, "store batch retried after {error}", error=type(e).__name__,
                    attempt=attempt, size=len(batch),
                )
                time.sleep(random.uniform(0.001, 0.005) * attempt)

    def _attempt(self, conn: Any, batch: list[_Op], careful: bool) -> list[tuple[bool, Any]]:
        import psycopg

        results: list[tuple[bool, Any]] = []
        with conn.cursor() as cur:
            self._lock_counters(cur, batch)
            i, size = 0, len(batch)
            while i < size:
                fn, args, _ = batch[i]
                run_of = _RUNS.get(fn)
                if run_of is not None and not careful:
                    # a run of appends (or of acks): a few statements for the whole run
                    j = i + 1
                    while j < size and batch[j][0] is fn:
                        j += 1
                    try:
                        done = run_of(cur, [a for _, a, _ in batch[i:j]])
                    except Exception as e:
                        if _is_retryable(e):
                            raise
                        raise _Careful() from e
                    results.extend(
                        (False, Failure(r)) if isinstance(r, Exception) else (True, r) for r in done
                    )
                    i = j
                    continue
                i += 1
                if careful or getattr(fn, "_savepoint", False):
                    cur.execute("SAVEPOINT op")
                    try:
                        result = fn(cur, *args)
                    except Exception as e:
                        if _is_retryable(e):
                            raise
                        results.append((False, Failure()))
                        cur.execute("ROLLBACK TO SAVEPOINT op")
                    else:
                        results.append((True, result))
                    cur.execute("RELEASE SAVEPOINT op")
                else:
                    try:
                        results.append((True, fn(cur, *args)))
                    except psycopg.Error as e:
                        if _is_retryable(e):
                            raise
                        raise _Careful() from e
                    except Exception:
                        results.append((False, Failure()))
        return results

    @staticmethod
    def _lock_counters(cur: Any, batch: list[_Op]) -> None:
        """Take the counter rows the batch will write, sorted, before anything
        else: every batch locks in the same order, so two servers' batches
        wait for each other instead of deadlocking."""
        appended: set[str] = set()
        acked: set[str] = set()
        sessions: set[str] = set()
        for fn, args, _ in batch:
            if fn is _op_append_inbox:
                appended.update(args[2])
            elif fn is _op_ack_inbox:
                acked.add(args[0])
            elif fn is _op_append_session:
                sessions.add(args[0])
        if not (appended or acked or sessions):
            return
        with cur.connection.pipeline():  # one round trip for all of them
            PostgresStore._lock_counter_rows(cur, appended, acked, sessions)

    @staticmethod
    def _lock_counter_rows(cur: Any, appended: set[str], acked: set[str], sessions: set[str]) -> None:
        if appended:
            cur.execute(
                "INSERT INTO inbox_state (node_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
                (sorted(appended),),
            )
        if appended or acked:
            cur.execute(
                "SELECT 1 FROM inbox_state WHERE node_id = ANY(%s) ORDER BY node_id FOR UPDATE",
                (sorted(appended | acked),),
            )
        if sessions:
            cur.execute(
                "SELECT 1 FROM sessions WHERE session_id = ANY(%s) ORDER BY session_id FOR UPDATE",
                (sorted(sessions),),
            )

    def _migrate(self, conn: Any) -> list[int]:
        """Create or migrate the schema (in the pool's thread); the versions applied."""
        applied: list[int] = []
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = row[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database has schema version {version}, newer than this code's {SCHEMA_VERSION}"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    cur.execute(statement)
                applied.append(number + 1)
            if applied:
                cur.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
        conn.commit()
        return applied

    # -- life cycle -------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(self.url)
        kwargs: dict[str, Any] = {"autocommit": False}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = self.connect_timeout_s
        if "application_name" not in params:
            kwargs["application_name"] = "allspark"
        return kwargs

    def start(self) -> Deferred[None]:
        """Connect (at most :attr:`connect_timeout_s`), create or migrate the schema."""
        if self._pool is not None:
            return fail(StoreError("store already started"))
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return fail(StoreError("the PostgreSQL store needs psycopg 3: pip install '.[postgresql]'"))
        try:
            from twisted.enterprise import adbapi

            kwargs = self._connect_kwargs()
            self._pool = adbapi.ConnectionPool(
                "psycopg", self.url, cp_min=1, cp_max=1, cp_reconnect=True, cp_noisy=False,
                cp_reactor=self._reactor, **kwargs,
            )
        except Exception:
            self._pool = None
            return fail()
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            self.migrations_applied = await self._pool.runWithConnection(self._migrate)
        except BaseException:
            pool, self._pool = self._pool, None
            pool.close()
            raise
        if self.migrations_applied:
            log.info(
                "store {url} migrated to schema version {version}",
                url=self._safe_url(), version=SCHEMA_VERSION, applied=self.migrations_applied,
            )

    def _safe_url(self) -> str:
        """The URL without a password."""
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(self.url)
        return f"postgresql://{params.get('user', '')}@{params.get('host', '')}:" \
               f"{params.get('port', '')}/{params.get('dbname', '')}"

    def close(self) -> Deferred[None]:
        """Run what was submitted, then close the connection."""
        if self._closed is None:
            self._closing = True
            self._closed = Deferred.fromCoroutine(self._drain_and_close())
        return self._closed

    async def _drain_and_close(self) -> None:
        while (self._pending or self._in_flight) and self._pool is not None:
            if not self._in_flight:
                self._flush()
            await deferLater(self._reactor, 0.005, lambda: None)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def _encode_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Session options as a dict (the functions adapt it to JSONB)."""
        return dict(options)

