"""The embedded default store: one SQLite file, group commit once per reactor turn.

How it works
------------
Every :class:`SQLiteStore` owns **one** ``sqlite3`` connection, used on the
reactor thread.  A call only appends an operation ``(function, args,
Deferred)`` to a pending list; at the end of the reactor turn
(``callLater(0)``) the pending list becomes a *batch* that runs in **one**
transaction:

- ``BEGIN IMMEDIATE`` takes SQLite's write lock up front, so several processes
  sharing one file serialize cleanly.  While another process holds the lock,
  one attempt waits at most :attr:`SQLiteStore.busy_timeout_ms`; the batch then
  stays first in line and is tried again a few milliseconds later, so the
  reactor is never blocked for long;
- the operations run in submission order, reads included, so a process always
  reads its own writes in order (an ``ack_inbox`` followed by a ``fetch_inbox``
  in the same turn never sees the acked rows);
- runs of inbox appends go in with a few statements for the whole run
  (:func:`_append_many`), whatever their number;
- an operation that writes more than one statement runs inside a ``SAVEPOINT``;
  if it raises, its partial writes are rolled back and only its Deferred fails,
  the rest of the batch commits;
- ``COMMIT``; if the commit itself fails, every Deferred of the batch fails.

Then the batch's Deferreds fire in submission order.  Operations submitted
meanwhile (by those callbacks, or by frames read in the same turn) form the
next batch, so batches grow by themselves under load: one commit (and one WAL
append) per batch, not per message.

Why not a writer thread: the first version ran batches on a thread of their
own.  ``sqlite3`` releases the GIL around every row it steps, and getting it
back from a busy reactor thread cost more than the SQL itself: the direct
durable benchmark ran at about 8,000 messages/s that way and at 13,000-18,000
with batches on the reactor thread (``benchmarks/``, ``direct_durable``).

Durability
----------
The database runs in WAL mode with ``synchronous=NORMAL``: a commit is written
to the WAL before its Deferred fires, but the WAL is fsynced only at
checkpoints.  A committed transaction therefore survives the *process* dying
(including ``kill -9``, the tested case) because the data is in the OS page
cache; after a power loss or kernel crash the most recent transactions may be
lost, although the file is never corrupted.  Use ``synchronous=FULL`` (see
:attr:`SQLiteStore.synchronous`) for power-loss durability at the price of one
fsync per batch.

Several processes on one host may share a file (WAL needs shared memory, so
not over a network file system).  Sequence numbers are allocated inside the
transaction from ``inbox_state.last_seq`` and ``sessions.last_seq``, so two processes appending to one node never collide.

Schema versions
---------------
``PRAGMA user_version`` holds the schema version; :data:`MIGRATIONS` lists the
steps, applied in order, each in the startup transaction.  Append a step to
change the schema; never edit an existing one.
"""

from __future__ import annotations

import json
import os
import sqlite3
from time import perf_counter
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
    PushJob,
    PushTarget,
    SessionFull,
    LocationRecord,
    ServerRecord,
    SessionRecord,
    StoredMessage,
    StoreError,
    StreamQuota,
    quota_window_end,
)
from allspark.store.queued import QueuedStore, claimed_jobs, operations

log = logger(__name__)

#: Schema steps: ``MIGRATIONS[i]`` brings a file from version ``i`` to ``i + 1``.
MIGRATIONS: list[tuple[str, ...]] = [
    # 1: initial schema
    (
        """CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            client_id TEXT,
            seen_at INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX nodes_by_client ON nodes (client_id, node_id)",
        """CREATE TABLE inbox_state (
            node_id TEXT PRIMARY KEY,
            last_seq INTEGER NOT NULL,
            purged_upto INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        # A rowid table: new rows go to the end of the table b-tree; only the
        # small (node_id, seq) index takes random inserts.  (A WITHOUT ROWID
        # table keyed by (node_id, seq) was 3x slower to append to.)
        """CREATE TABLE inbox (
            node_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            stored_at INTEGER NOT NULL,
            body BLOB NOT NULL,
            UNIQUE (node_id, seq)
        )""",
        "CREATE INDEX inbox_by_stored_at ON inbox (stored_at)",
        # Version 1 numbered each row in its INSERT and moved last_seq up
        # with this trigger; version 2 drops it (see below).
        """CREATE TRIGGER inbox_last_seq AFTER INSERT ON inbox BEGIN
            INSERT INTO inbox_state (node_id, last_seq) VALUES (NEW.node_id, NEW.seq)
            ON CONFLICT (node_id) DO UPDATE SET last_seq = excluded.last_seq;
        END""",
        """CREATE TABLE dedup (
            sender_id TEXT NOT NULL,
            dedup_id TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            seqs TEXT NOT NULL,
            answer BLOB NOT NULL,
            PRIMARY KEY (sender_id, dedup_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX dedup_by_created_at ON dedup (created_at)",
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            owner_id TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            options TEXT NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0,
            purged_upto INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        """CREATE TABLE members (
            session_id TEXT NOT NULL,
            node_id TEXT NOT NULL,
            client_id TEXT,
            anonymous INTEGER NOT NULL,
            alias TEXT NOT NULL,
            joined_at INTEGER NOT NULL,
            joined_seq INTEGER NOT NULL,
            acked_seq INTEGER NOT NULL,
            PRIMARY KEY (session_id, node_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX members_by_node ON members (node_id, session_id)",
        """CREATE TABLE stream (
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            sender_id TEXT NOT NULL,
            stored_at INTEGER NOT NULL,
            body BLOB NOT NULL,
            UNIQUE (session_id, seq)
        )""",
        "CREATE INDEX stream_by_stored_at ON stream (stored_at)",
        """CREATE TRIGGER stream_last_seq AFTER INSERT ON stream BEGIN
            UPDATE sessions SET last_seq = NEW.seq WHERE session_id = NEW.session_id;
        END""",
    ),
    # 2: inbox appends number their copies in batches (see _append_many) and
    # store inbox_state.last_seq once per node per batch, not by a trigger per
    # row.  Stop every process on a file before a version-2 one migrates it:
    # a version-1 process would keep counting on the trigger.
    ("DROP TRIGGER inbox_last_seq",),
    # 3: quotas.  Each inbox row records its sender.  An inbox's unacked
    # count is last_seq minus the seq before its oldest row (one index seek;
    # acks and retention delete from the front).  Counts per (inbox, sender)
    # are kept in inbox_senders only for inboxes that hold many unacked
    # messages (inbox_state.tracked is the count at which tracking began, 0
    # when untracked; see _append_many): below half the per-sender quota no
    # sender can be over it, so the common case writes nothing more per
    # message.  The inbox_unacked trigger takes deleted rows (ack,
    # retention) off those counts; for an untracked inbox it finds nothing to
    # update.  Rows stored before version 3 count under the sender ''.
    # stream_quota counts stream rows per (session, sender) in the current
    # window, sender '' for the whole session.  As for version 2: stop every
    # process on a file before a version-3 one migrates it.
    (
        "ALTER TABLE inbox ADD COLUMN sender_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE inbox_state ADD COLUMN tracked INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE inbox_senders (
            node_id TEXT NOT NULL,
            sender_id TEXT NOT NULL,
            pending INTEGER NOT NULL,
            PRIMARY KEY (node_id, sender_id)
        ) WITHOUT ROWID""",
        """CREATE TRIGGER inbox_unacked AFTER DELETE ON inbox BEGIN
            UPDATE inbox_senders SET pending = pending - 1
            WHERE node_id = OLD.node_id AND sender_id = OLD.sender_id;
        END""",
        """CREATE TABLE stream_quota (
            session_id TEXT NOT NULL,
            sender_id TEXT NOT NULL,
            window_end INTEGER NOT NULL,
            rows INTEGER NOT NULL,
            PRIMARY KEY (session_id, sender_id)
        ) WITHOUT ROWID""",
    ),
    # 4: server records (the cluster): the record as JSON, its holder beside it
    # for the compare-and-set of put_server
    (
        """CREATE TABLE servers (
            server_id TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            record TEXT NOT NULL
        ) WITHOUT ROWID""",
    ),
    # 5: no trigger on inbox deletions.  inbox_unacked ran for every deleted
    # row (most acks: the inbox is not tracked, it found nothing to update)
    # and cost more than the rest of an ack; acks and retention now take a
    # tracked inbox's deleted rows off its per-sender counts themselves
    # (_op_ack_inbox, _op_purge).  As for version 2: stop every process on a
    # file before a version-5 one migrates it.
    ("DROP TRIGGER IF EXISTS inbox_unacked",),
    # 6: locations (which server holds which online node): one row per
    # connection, dropped in bulk by server
    (
        """CREATE TABLE locations (
            node_id TEXT NOT NULL,
            server_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            PRIMARY KEY (node_id, server_id, epoch)
        ) WITHOUT ROWID""",
        "CREATE INDEX locations_by_server ON locations (server_id)",
    ),
    # 7: push notifications: one row per node that registered a target or
    # muted its pushes (the target as JSON, its address beside it for
    # remove_push_target's compare; NULL once unregistered), its schedule
    # (due_ms, NULL when nothing is pending; gen counts schedules), the
    # lease of the server sending it, and the send history (last_sent_ms,
    # attempts).  push_due holds only rows with a due time: claims read it
    # in due order.  revocations: the server API's revoked nodes.
    (
        """CREATE TABLE push_devices (
            node_id TEXT PRIMARY KEY,
            target TEXT,
            address TEXT,
            muted INTEGER NOT NULL DEFAULT 0,
            due_ms INTEGER,
            gen INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_until_ms INTEGER NOT NULL DEFAULT 0,
            last_sent_ms INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        "CREATE INDEX push_due ON push_devices (due_ms, node_id) WHERE due_ms IS NOT NULL",
        """CREATE TABLE revocations (
            node_id TEXT PRIMARY KEY,
            until_ms INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)

_Op = tuple[Callable[..., Any], tuple[Any, ...], Deferred]


def _multi(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an operation that writes with more than one statement: it runs in a SAVEPOINT."""
    fn._savepoint = True  # type: ignore[attr-defined]
    return fn


# -- operations, run inside a batch's transaction with its cursor ----------------
# Each takes the cursor first; the SQL strings are constants so that sqlite3's
# statement cache keeps them prepared.

_INSERT_INBOX = "INSERT INTO inbox (node_id, seq, stored_at, body, sender_id) VALUES (?, ?, ?, ?, ?)"
_LAST_SEQS = (
    "SELECT node_id, last_seq, last_seq - COALESCE("
    "(SELECT MIN(seq) - 1 FROM inbox WHERE inbox.node_id = inbox_state.node_id), last_seq), "
    "tracked FROM inbox_state WHERE node_id IN (SELECT value FROM json_each(?))"
)
_LAST_SEQS_ONLY = "SELECT node_id, last_seq, tracked FROM inbox_state WHERE node_id IN (SELECT value FROM json_each(?))"
_SET_LAST_SEQ = (
    "INSERT INTO inbox_state (node_id, last_seq) VALUES (?, ?) "
    "ON CONFLICT (node_id) DO UPDATE SET last_seq = excluded.last_seq"
)
_SENDER_PENDING = "SELECT pending FROM inbox_senders WHERE node_id = ? AND sender_id = ?"
_UNTRACK_SENDERS = "DELETE FROM inbox_senders WHERE node_id = ?"
_COUNT_SENDERS = (
    "INSERT INTO inbox_senders (node_id, sender_id, pending) "
    "SELECT node_id, sender_id, COUNT(*) FROM inbox WHERE node_id = ? GROUP BY sender_id"
)
_ADD_SENDER_PENDING = (
    "INSERT INTO inbox_senders (node_id, sender_id, pending) VALUES (?, ?, ?) "
    "ON CONFLICT (node_id, sender_id) DO UPDATE SET pending = pending + excluded.pending"
)
_DEDUP_GET = "SELECT created_at, seqs, answer FROM dedup WHERE sender_id = ? AND dedup_id = ?"
_DEDUP_GET_MANY = (
    "SELECT sender_id, dedup_id, created_at, seqs, answer FROM dedup "
    "WHERE (sender_id, dedup_id) IN "
    "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
)
_DEDUP_PUT = (
    "INSERT OR REPLACE INTO dedup (sender_id, dedup_id, created_at, seqs, answer) "
    "VALUES (?, ?, ?, ?, ?)"
)
_MEMBER_COLS = (
    "session_id, node_id, client_id, anonymous, alias, joined_at, joined_seq, acked_seq"
)


def _is_busy(error: sqlite3.Error) -> bool:
    """Whether ``error`` means another connection holds a lock.  The primary
    code is the low byte: SQLITE_BUSY_RECOVERY, SQLITE_BUSY_SNAPSHOT... are
    busy too."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _owner_only(path: str) -> None:
    """Take group and other permissions off ``path`` if it exists and has
    any; a file this process may not chmod (another owner) is logged, not fatal."""
    try:
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except FileNotFoundError:
        pass
    except PermissionError as e:
        log.warn("cannot make {path} private to its owner: {error}", path=path, error=str(e))


def _member(row: tuple[Any, ...]) -> MemberRecord:
    return MemberRecord(row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6], row[7])


def _session(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(row[0], row[1], row[2], json.loads(row[3]))


def _duplicate(prior: tuple[int, Any, bytes] | None, now_ms: int, window_ms: int) -> AppendResult | None:
    """The first attempt's result when ``prior`` (a de-dup row: created_at,
    seqs as stored or as a dict, answer) is inside the window, else None."""
    if prior is None or now_ms - prior[0] >= window_ms:
        return None
    seqs = dict(prior[1]) if isinstance(prior[1], dict) else orjson.loads(prior[1])
    return AppendResult(True, seqs, bytes(prior[2]))


def _seen(
    cur: sqlite3.Cursor, sender_id: str, dedup_id: str, now_ms: int, window_ms: int
) -> AppendResult | None:
    return _duplicate(cur.execute(_DEDUP_GET, (sender_id, dedup_id)).fetchone(), now_ms, window_ms)


def _op_remember_node(cur: sqlite3.Cursor, node_id: str, client_id: str | None, now: int) -> None:
    cur.execute(
        "INSERT INTO nodes (node_id, client_id, seen_at) VALUES (?, ?, ?) "
        "ON CONFLICT (node_id) DO UPDATE SET client_id = excluded.client_id, "
        "seen_at = excluded.seen_at",
        (node_id, client_id, now),
    )


def _op_get_node(cur: sqlite3.Cursor, node_id: str) -> tuple[str, str | None] | None:
    row = cur.execute("SELECT node_id, client_id FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def _op_get_server(cur: sqlite3.Cursor, server_id: str) -> ServerRecord | None:
    row = cur.execute("SELECT record FROM servers WHERE server_id = ?", (server_id,)).fetchone()
    return None if row is None else ServerRecord.from_json(row[0])


def _op_list_servers(cur: sqlite3.Cursor) -> list[ServerRecord]:
    rows = cur.execute("SELECT record FROM servers ORDER BY server_id").fetchall()
    return [ServerRecord.from_json(r[0]) for r in rows]


def _op_put_server(cur: sqlite3.Cursor, record: ServerRecord, expect_holder: str | None) -> bool:
    if expect_holder is None:
        cur.execute("INSERT INTO servers (server_id, holder, record) VALUES (?, ?, ?) "
                    "ON CONFLICT (server_id) DO NOTHING", (record.server_id, record.holder, record.to_json()))
    else:
        cur.execute("UPDATE servers SET holder = ?, record = ? WHERE server_id = ? AND holder = ?",
                    (record.holder, record.to_json(), record.server_id, expect_holder))
    return cur.rowcount == 1


def _op_remove_server(cur: sqlite3.Cursor, server_id: str, holder: str) -> bool:
    cur.execute("DELETE FROM servers WHERE server_id = ? AND holder = ?", (server_id, holder))
    return cur.rowcount == 1


def _op_put_location(cur: sqlite3.Cursor, record: LocationRecord) -> None:
    cur.execute("INSERT INTO locations (node_id, server_id, epoch) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (record.node_id, record.server_id, record.epoch))


def _op_remove_location(cur: sqlite3.Cursor, record: LocationRecord) -> bool:
    cur.execute("DELETE FROM locations WHERE node_id = ? AND server_id = ? AND epoch = ?",
                (record.node_id, record.server_id, record.epoch))
    return cur.rowcount == 1


def _op_drop_locations(cur: sqlite3.Cursor, server_id: str) -> int:
    cur.execute("DELETE FROM locations WHERE server_id = ?", (server_id,))
    return cur.rowcount


def _op_list_locations(cur: sqlite3.Cursor) -> list[LocationRecord]:
    rows = cur.execute("SELECT node_id, server_id, epoch FROM locations ORDER BY node_id, server_id, epoch")
    return [LocationRecord(r[0], r[1], r[2]) for r in rows.fetchall()]


def _op_nodes_of_client(cur: sqlite3.Cursor, client_id: str) -> list[str]:
    rows = cur.execute(
        "SELECT node_id FROM nodes WHERE client_id = ? ORDER BY node_id", (client_id,)
    ).fetchall()
    return [r[0] for r in rows]


_AppendArgs = tuple[str, "str | None", Sequence[str], bytes, bytes, int, int, "InboxQuota | None"]


def _track(cur: sqlite3.Cursor, node_id: str, unacked: int) -> None:
    """Start counting ``node_id``'s unacked rows per sender (it holds ``unacked``)."""
    cur.execute(_UNTRACK_SENDERS, (node_id,))
    cur.execute(_COUNT_SENDERS, (node_id,))
    cur.execute("UPDATE inbox_state SET tracked = ? WHERE node_id = ?", (max(1, unacked), node_id))


def _untrack(cur: sqlite3.Cursor, node_id: str) -> None:
    """Stop counting ``node_id``'s rows per sender."""
    cur.execute(_UNTRACK_SENDERS, (node_id,))
    cur.execute("UPDATE inbox_state SET tracked = 0 WHERE node_id = ?", (node_id,))


def _append_many(cur: sqlite3.Cursor, appends: Sequence[_AppendArgs]) -> list[AppendResult | InboxFull]:
    """Append many messages (the arguments of :meth:`SQLiteStore.append_inbox`)
    with a handful of statements, whatever their number.

    One query reads the de-duplication rows of every ``(sender, id)`` of the
    run, one reads the ``last_seq``, unacked count and tracking state of every
    recipient; copies are numbered and counted in Python (the transaction
    holds SQLite's write lock, so no other process can number or count at the
    same time, and a quota holds across the run and across processes); then
    one ``executemany`` each inserts the copies, stores the new ``last_seq``
    per node and the de-duplication rows.  A ``(sender, id)`` repeated inside
    the run is a duplicate of its first occurrence.  A message over its quota
    is an :class:`InboxFull` in the returned list (nothing of it is written).

    Per-sender counts: an inbox holding fewer than half of
    ``quota.per_sender`` unacked messages cannot have a sender over it, so
    nothing is counted per sender.  When it reaches that, its rows are
    counted per sender once (``_track``) and from then on appends add to
    ``inbox_senders`` and acks and retention take off what they delete
    (:func:`_op_ack_inbox`, :func:`_op_purge`), until acks bring it under
    half of where tracking began (``_untrack`` at its next append).

    Quota checks: each append adds at most one copy to an inbox, so a run
    whose fullest inbox plus the run's length stays under both bounds (under
    half of ``per_sender`` and under ``per_inbox``) cannot bring any message
    to either, and skips the per-message checks.
    """
    known: dict[tuple[str, str], tuple[int, Any, bytes]] = {}
    keys = [(a[0], a[1]) for a in appends if a[1] is not None]
    if keys:
        for sender, dedup_id, created, seqs, answer in cur.execute(_DEDUP_GET_MANY, (orjson.dumps(keys),)):
            known[(sender, dedup_id)] = (created, seqs, answer)
    nodes = orjson.dumps(list({node for a in appends for node in a[2]}))
    last: dict[str, int] = {}
    unacked: dict[str, int] = {}
    tracked: set[str] = set()
    untrack = []
    # (by identity: a run nearly always shares one quota object, and hashing
    # the dataclass would cost a Python call per message)
    quotas = {id(a[7]): a[7] for a in appends if a[7] is not None}
    run_unchecked = min(min(q.per_sender // 2, q.per_inbox) for q in quotas.values()) if quotas else 0
    # An inbox holds at most last_seq rows (its seqs are distinct, 1..last_seq):
    # when no inbox of the run is tracked and the highest last_seq plus the
    # run's length stays under the bounds, the unacked counts (a seek for each
    # inbox's oldest row) are not needed at all.
    rows = cur.execute(_LAST_SEQS_ONLY, (nodes,)).fetchall()
    if any(tracking for _, _, tracking in rows) or (
        quotas and max((last_seq for _, last_seq, _ in rows), default=0) + len(appends) > run_unchecked
    ):
        counted = cur.execute(_LAST_SEQS, (nodes,)).fetchall()
    else:
        counted = [(node_id, last_seq, 0, 0) for node_id, last_seq, _ in rows]
    for node_id, last_seq, count, tracking in counted:
        last[node_id] = last_seq
        unacked[node_id] = count
        if tracking:
            if count * 2 < tracking:  # acks brought it under half of where tracking began
                untrack.append(node_id)
            else:
                tracked.add(node_id)
    for node_id in untrack:
        _untrack(cur, node_id)
    stored_counts: dict[tuple[str, str], int] = {}  # (node, sender) counts stored before this run
    added: dict[tuple[str, str], int] = {}  # copies this run adds per (node, sender), tracked inboxes only

    def sender_count(pair: tuple[str, str]) -> int:
        if pair not in stored_counts:
            row = cur.execute(_SENDER_PENDING, pair).fetchone()
            stored_counts[pair] = 0 if row is None else row[0]
        return stored_counts[pair] + added.get(pair, 0)

    # Below half of per_sender (and under per_inbox) no sender can be over
    # its share.  Each append adds at most one copy to an inbox, so when the
    # fullest inbox of the run plus the run's length stays below that, no
    # message of the run needs a look (nearly every run).
    check = bool(quotas) and max(unacked.values(), default=0) + len(appends) > run_unchecked
    touched: set[str] = set()
    inbox_rows: list[tuple[str, int, int, bytes, str]] = []
    dedup_rows: list[tuple[str, str, int, bytes, bytes]] = []
    results: list[AppendResult | InboxFull] = []
    for sender, dedup_id, recipients, body, answer, now_ms, window_ms, quota in appends:
        if dedup_id is not None:
            duplicate = _duplicate(known.get((sender, dedup_id)), now_ms, window_ms)
            if duplicate is not None:
                results.append(duplicate)
                continue
        if check and quota is not None:
            full: list[str] = []
            per_sender = False
            unchecked = min(quota.per_sender // 2, quota.per_inbox)
            for node_id in recipients if len(recipients) == 1 else dict.fromkeys(recipients):
                count = unacked.get(node_id, 0)
                if count < unchecked:
                    continue
                if count >= quota.per_inbox:
                    full.append(node_id)
                    continue
                if node_id not in tracked:
                    _track(cur, node_id, count)  # counts the rows stored before this run
                    tracked.add(node_id)
                    for row in inbox_rows:  # and this run's copies so far
                        if row[0] == node_id:
                            added[(node_id, row[4])] = added.get((node_id, row[4]), 0) + 1
                if sender_count((node_id, sender)) >= quota.per_sender:
                    full.append(node_id)
                    per_sender = True
            if full:
                results.append(InboxFull(full, per_sender))
                continue
        seqs = {}
        for node_id in recipients:
            if node_id in seqs:
                continue
            seq = last.get(node_id, 0) + 1
            last[node_id] = seqs[node_id] = seq
            if check:
                unacked[node_id] = unacked.get(node_id, 0) + 1
            if tracked and node_id in tracked:
                pair = (node_id, sender)
                added[pair] = added.get(pair, 0) + 1
            touched.add(node_id)
            inbox_rows.append((node_id, seq, now_ms, body, sender))
        if dedup_id is not None:
            known[(sender, dedup_id)] = (now_ms, seqs, answer)
            dedup_rows.append((sender, dedup_id, now_ms, orjson.dumps(seqs), answer))
        results.append(AppendResult(False, seqs, answer))
    cur.executemany(_INSERT_INBOX, inbox_rows)
    cur.executemany(_SET_LAST_SEQ, [(node_id, last[node_id]) for node_id in touched])
    if added:
        cur.executemany(_ADD_SENDER_PENDING, [(*pair, count) for pair, count in added.items()])
    if dedup_rows:
        cur.executemany(_DEDUP_PUT, dedup_rows)
    return results


@_multi
def _op_append_inbox(
    cur: sqlite3.Cursor,
    sender_id: str,
    dedup_id: str | None,
    recipients: Sequence[str],
    body: bytes,
    answer: bytes,
    now_ms: int,
    window_ms: int,
    quota: InboxQuota | None,
) -> AppendResult:
    """One append on its own (batches of appends go through :func:`_append_many`)."""
    result = _append_many(cur, [(sender_id, dedup_id, recipients, body, answer, now_ms, window_ms, quota)])[0]
    if isinstance(result, InboxFull):
        raise result
    return result


def _op_fetch_inbox(cur: sqlite3.Cursor, node_id: str, after: int, limit: int) -> InboxPage:
    state = cur.execute(
        "SELECT last_seq, purged_upto FROM inbox_state WHERE node_id = ?", (node_id,)
    ).fetchone()
    if state is None:
        return InboxPage([], 0, 0, after)
    rows = cur.execute(
        "SELECT seq, body, stored_at FROM inbox WHERE node_id = ? AND seq > ? "
        "ORDER BY seq LIMIT ?",
        (node_id, after, limit),
    ).fetchall()
    messages = [StoredMessage(r[0], r[1], r[2]) for r in rows]
    return InboxPage(messages, state[0], state[1], messages[-1].seq if messages else after)


_ACK_INBOX = "DELETE FROM inbox WHERE node_id = ? AND seq <= ?"
_TRACKED = "SELECT tracked FROM inbox_state WHERE node_id = ?"
_UNCOUNT_ACKED = (
    "UPDATE inbox_senders SET pending = pending - gone.n FROM "
    "(SELECT sender_id, COUNT(*) AS n FROM inbox WHERE node_id = ? AND seq <= ? GROUP BY sender_id) AS gone "
    "WHERE inbox_senders.node_id = ? AND inbox_senders.sender_id = gone.sender_id"
)
_UNCOUNT_PURGED = (
    "UPDATE inbox_senders SET pending = pending - gone.n FROM "
    "(SELECT node_id, sender_id, COUNT(*) AS n FROM inbox WHERE stored_at < ? "
    "GROUP BY node_id, sender_id) AS gone "
    "WHERE inbox_senders.node_id = gone.node_id AND inbox_senders.sender_id = gone.sender_id"
)


def _op_ack_inbox(cur: sqlite3.Cursor, node_id: str, upto: int) -> int:
    """Delete ``node_id``'s rows up to ``upto``.  An untracked inbox (the
    common case) costs one key lookup more than the DELETE; a tracked one
    first takes the rows off its per-sender counts, in a savepoint with the
    DELETE so that both or neither happen."""
    row = cur.execute(_TRACKED, (node_id,)).fetchone()
    if row is None or not row[0]:
        return cur.execute(_ACK_INBOX, (node_id, upto)).rowcount
    cur.execute("SAVEPOINT ack")
    try:
        cur.execute(_UNCOUNT_ACKED, (node_id, upto, node_id))
        count: int = cur.execute(_ACK_INBOX, (node_id, upto)).rowcount
    except BaseException:
        cur.execute("ROLLBACK TO ack")
        cur.execute("RELEASE ack")
        raise
    cur.execute("RELEASE ack")
    return count


def _op_inbox_state(cur: sqlite3.Cursor, node_id: str) -> tuple[int, int]:
    row = cur.execute(
        "SELECT last_seq, purged_upto FROM inbox_state WHERE node_id = ?", (node_id,)
    ).fetchone()
    return (0, 0) if row is None else (row[0], row[1])


@_multi
def _op_purge(cur: sqlite3.Cursor, stored_before: int, dedup_before: int) -> int:
    cur.execute(
        "UPDATE inbox_state SET purged_upto = gone.top FROM "
        "(SELECT node_id, MAX(seq) AS top FROM inbox WHERE stored_at < ? GROUP BY node_id) AS gone "
        "WHERE inbox_state.node_id = gone.node_id AND gone.top > inbox_state.purged_upto",
        (stored_before,),
    )
    cur.execute(_UNCOUNT_PURGED, (stored_before,))  # off the tracked inboxes' per-sender counts
    count = cur.execute("DELETE FROM inbox WHERE stored_at < ?", (stored_before,)).rowcount
    cur.execute(
        "UPDATE sessions SET purged_upto = gone.top FROM "
        "(SELECT session_id, MAX(seq) AS top FROM stream WHERE stored_at < ? "
        "GROUP BY session_id) AS gone "
        "WHERE sessions.session_id = gone.session_id AND gone.top > sessions.purged_upto",
        (stored_before,),
    )
    count += cur.execute("DELETE FROM stream WHERE stored_at < ?", (stored_before,)).rowcount
    cur.execute("DELETE FROM dedup WHERE created_at < ?", (dedup_before,))
    cur.execute("DELETE FROM stream_quota WHERE window_end < ?", (dedup_before,))
    return count


def _op_create_session(
    cur: sqlite3.Cursor, session_id: str, owner_id: str, options: str, now_ms: int
) -> SessionRecord:
    row = cur.execute(
        "INSERT INTO sessions (session_id, owner_id, created_at, options) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (session_id) DO NOTHING "
        "RETURNING session_id, owner_id, created_at, options",
        (session_id, owner_id, now_ms, options),
    ).fetchone()
    if row is None:
        raise DuplicateSession(session_id)
    return _session(row)


def _op_get_session(cur: sqlite3.Cursor, session_id: str) -> SessionRecord | None:
    row = cur.execute(
        "SELECT session_id, owner_id, created_at, options FROM sessions WHERE session_id = ?",
        (session_id,),
    ).fetchone()
    return None if row is None else _session(row)


def _op_update_session(cur: sqlite3.Cursor, session_id: str, options: str) -> SessionRecord | None:
    row = cur.execute(
        "UPDATE sessions SET options = ? WHERE session_id = ? "
        "RETURNING session_id, owner_id, created_at, options",
        (options, session_id),
    ).fetchone()
    return None if row is None else _session(row)


@_multi
def _op_delete_session(cur: sqlite3.Cursor, session_id: str) -> None:
    cur.execute("DELETE FROM stream WHERE session_id = ?", (session_id,))
    cur.execute("DELETE FROM stream_quota WHERE session_id = ?", (session_id,))
    cur.execute("DELETE FROM members WHERE session_id = ?", (session_id,))
    cur.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))


@_multi
def _op_add_member(
    cur: sqlite3.Cursor,
    session_id: str,
    node_id: str,
    client_id: str | None,
    anonymous: bool,
    alias: str,
    now_ms: int,
) -> MemberRecord:
    cur.execute(
        f"INSERT INTO members ({_MEMBER_COLS}) "
        "SELECT session_id, ?, ?, ?, ?, ?, last_seq, last_seq FROM sessions WHERE session_id = ? "
        "ON CONFLICT (session_id, node_id) DO NOTHING",
        (node_id, client_id, int(bool(anonymous)), alias, now_ms, session_id),
    )
    row = cur.execute(
        f"SELECT {_MEMBER_COLS} FROM members WHERE session_id = ? AND node_id = ?",
        (session_id, node_id),
    ).fetchone()
    if row is None:
        raise StoreError(f"no such session: {session_id!r}")
    return _member(row)


def _op_update_member(
    cur: sqlite3.Cursor, session_id: str, node_id: str, anonymous: bool, alias: str
) -> MemberRecord | None:
    row = cur.execute(
        "UPDATE members SET anonymous = ?, alias = ? WHERE session_id = ? AND node_id = ? "
        f"RETURNING {_MEMBER_COLS}",
        (int(bool(anonymous)), alias, session_id, node_id),
    ).fetchone()
    return None if row is None else _member(row)


def _op_remove_member(cur: sqlite3.Cursor, session_id: str, node_id: str) -> bool:
    return (
        cur.execute(
            "DELETE FROM members WHERE session_id = ? AND node_id = ?", (session_id, node_id)
        ).rowcount
        > 0
    )


def _op_get_members(cur: sqlite3.Cursor, session_id: str) -> list[MemberRecord]:
    rows = cur.execute(
        f"SELECT {_MEMBER_COLS} FROM members WHERE session_id = ? ORDER BY joined_at, node_id",
        (session_id,),
    ).fetchall()
    return [_member(r) for r in rows]


def _op_sessions_of_node(cur: sqlite3.Cursor, node_id: str) -> list[MemberRecord]:
    rows = cur.execute(
        f"SELECT {_MEMBER_COLS} FROM members WHERE node_id = ? ORDER BY joined_at, session_id",
        (node_id,),
    ).fetchall()
    return [_member(r) for r in rows]


@_multi
def _op_append_session(
    cur: sqlite3.Cursor,
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
        seen = _seen(cur, sender_id, dedup_id, now_ms, window_ms)
        if seen is not None:
            return seen
    if quota is not None:
        _count_stream_row(cur, session_id, sender_id, now_ms, quota)
    # The stream_last_seq trigger moves sessions.last_seq up in the same statement.
    row = cur.execute(
        "INSERT INTO stream (session_id, seq, sender_id, stored_at, body) "
        "SELECT session_id, last_seq + 1, ?, ?, ? FROM sessions WHERE session_id = ? "
        "RETURNING seq",
        (sender_id, now_ms, body, session_id),
    ).fetchone()
    if row is None:
        raise StoreError(f"no such session: {session_id!r}")
    seq = row[0]
    seqs = {session_id: seq}
    if dedup_id is not None:
        cur.execute(_DEDUP_PUT, (sender_id, dedup_id, now_ms, orjson.dumps(seqs), answer))
    return AppendResult(False, seqs, answer)


_STREAM_QUOTA_GET = (
    "SELECT sender_id, window_end, rows FROM stream_quota "
    "WHERE session_id = ? AND sender_id IN (?, '')"
)
_STREAM_QUOTA_PUT = (
    "INSERT INTO stream_quota (session_id, sender_id, window_end, rows) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (session_id, sender_id) DO UPDATE SET "
    "window_end = excluded.window_end, rows = excluded.rows"
)


def _count_stream_row(
    cur: sqlite3.Cursor, session_id: str, sender_id: str, now_ms: int, quota: StreamQuota
) -> None:
    """Count one more stream row of ``sender_id`` in the current window, or
    raise :class:`SessionFull` (writing nothing) when it is over ``quota``.
    Runs in the append's savepoint: a failed append counts nothing."""
    end = quota_window_end(now_ms, quota.window_ms)
    current = {
        sender: (window_end, rows)
        for sender, window_end, rows in cur.execute(_STREAM_QUOTA_GET, (session_id, sender_id))
    }
    counted = []
    for sender, limit in (("", quota.per_session), (sender_id, quota.per_sender)):
        window_end, rows = current.get(sender, (end, 0))
        if window_end < end:  # a later window: count again
            window_end, rows = end, 0
        if rows >= limit:
            raise SessionFull(session_id, per_sender=bool(sender))
        counted.append((session_id, sender, window_end, rows + 1))
    cur.executemany(_STREAM_QUOTA_PUT, counted)


def _op_fetch_session(
    cur: sqlite3.Cursor, session_id: str, reader_id: str, after: int, limit: int
) -> InboxPage:
    state = cur.execute(
        "SELECT s.last_seq, s.purged_upto, m.joined_seq FROM sessions AS s "
        "LEFT JOIN members AS m ON m.session_id = s.session_id AND m.node_id = ? "
        "WHERE s.session_id = ?",
        (reader_id, session_id),
    ).fetchone()
    if state is None:
        return InboxPage([], 0, 0, after)
    if state[2] is not None and state[2] > after:
        after = state[2]
    rows = cur.execute(
        "SELECT seq, body, stored_at FROM stream WHERE session_id = ? AND seq > ? "
        "AND sender_id != ? ORDER BY seq LIMIT ?",
        (session_id, after, reader_id, limit),
    ).fetchall()
    messages = [StoredMessage(r[0], r[1], r[2]) for r in rows]
    if len(messages) >= limit:
        scanned = messages[-1].seq if messages else after
    else:
        top = cur.execute(
            "SELECT MAX(seq) FROM stream WHERE session_id = ? AND seq > ?", (session_id, after)
        ).fetchone()[0]
        scanned = after if top is None else top
    return InboxPage(messages, state[0], state[1], scanned)


def _op_ack_session(cur: sqlite3.Cursor, session_id: str, node_id: str, upto: int) -> int:
    row = cur.execute(
        "UPDATE members SET acked_seq = MAX(acked_seq, MIN(?, "
        "(SELECT last_seq FROM sessions WHERE session_id = ?))) "
        "WHERE session_id = ? AND node_id = ? RETURNING acked_seq",
        (upto, session_id, session_id, node_id),
    ).fetchone()
    return 0 if row is None else row[0]


# -- push notifications --------------------------------------------------------

_CLAIM_PUSHES = (
    "UPDATE push_devices SET lease_owner = :owner, lease_until_ms = :until "
    "WHERE node_id IN (SELECT node_id FROM push_devices "
    "WHERE due_ms IS NOT NULL AND due_ms <= :now AND target IS NOT NULL AND muted = 0 "
    "AND (lease_owner IS NULL OR lease_until_ms < :now) ORDER BY due_ms, node_id LIMIT :limit) "
    "RETURNING node_id, target, gen, due_ms, last_sent_ms, attempts"
)
_FINISH_PUSH = (
    "UPDATE push_devices SET lease_owner = NULL, lease_until_ms = 0, "
    "last_sent_ms = COALESCE(:sent, last_sent_ms), "
    "attempts = (CASE WHEN :sent IS NULL THEN attempts ELSE 0 END) + :failed, "
    "due_ms = CASE WHEN :retry IS NOT NULL THEN :retry WHEN gen = :gen THEN NULL ELSE due_ms END "
    "WHERE node_id = :node AND lease_owner = :owner"
)


def _op_set_push_target(cur: sqlite3.Cursor, target: PushTarget) -> None:
    cur.execute(
        "INSERT INTO push_devices (node_id, target, address) VALUES (?, ?, ?) "
        "ON CONFLICT (node_id) DO UPDATE SET target = excluded.target, address = excluded.address",
        (target.node_id, target.to_json(), target.address),
    )


def _op_get_push_target(cur: sqlite3.Cursor, node_id: str) -> PushTarget | None:
    row = cur.execute("SELECT target FROM push_devices WHERE node_id = ?", (node_id,)).fetchone()
    return None if row is None or row[0] is None else PushTarget.from_json(row[0])


def _op_remove_push_target(cur: sqlite3.Cursor, node_id: str, address: str | None) -> bool:
    cur.execute(
        "UPDATE push_devices SET target = NULL, address = NULL "
        "WHERE node_id = ? AND target IS NOT NULL AND (? IS NULL OR address = ?)",
        (node_id, address, address),
    )
    return cur.rowcount == 1


def _op_set_push_muted(cur: sqlite3.Cursor, node_id: str, muted: bool) -> None:
    cur.execute(
        "INSERT INTO push_devices (node_id, muted) VALUES (?, ?) "
        "ON CONFLICT (node_id) DO UPDATE SET muted = excluded.muted",
        (node_id, int(muted)),
    )


def _op_push_muted(cur: sqlite3.Cursor, node_id: str) -> bool:
    row = cur.execute("SELECT muted FROM push_devices WHERE node_id = ?", (node_id,)).fetchone()
    return row is not None and bool(row[0])


def _op_schedule_push(cur: sqlite3.Cursor, node_ids: list[str], due_ms: int) -> list[str]:
    """``node_ids`` are distinct (QueuedStore removes repeats)."""
    if not node_ids:
        return []
    rows = cur.execute(
        "UPDATE push_devices SET gen = gen + 1, "
        "due_ms = CASE WHEN due_ms IS NULL OR due_ms > :due THEN :due ELSE due_ms END "
        "WHERE node_id IN (SELECT value FROM json_each(:ids)) AND target IS NOT NULL AND muted = 0 "
        "RETURNING node_id",
        {"due": due_ms, "ids": json.dumps(node_ids)},
    ).fetchall()
    scheduled = {r[0] for r in rows}
    return [n for n in node_ids if n in scheduled]


def _op_claim_due_pushes(
    cur: sqlite3.Cursor, now_ms: int, owner: str, lease_ms: int, limit: int
) -> list[PushJob]:
    if limit < 1:
        return []
    rows = cur.execute(
        _CLAIM_PUSHES, {"owner": owner, "until": now_ms + lease_ms, "now": now_ms, "limit": limit}
    ).fetchall()
    return claimed_jobs(rows)


def _op_finish_push(
    cur: sqlite3.Cursor,
    node_id: str,
    owner: str,
    gen: int,
    sent_ms: int | None,
    retry_at_ms: int | None,
    failed: bool,
) -> bool:
    cur.execute(_FINISH_PUSH, {"sent": sent_ms, "failed": int(failed), "retry": retry_at_ms,
                               "gen": gen, "node": node_id, "owner": owner})
    return cur.rowcount == 1


def _op_revoke_node(cur: sqlite3.Cursor, node_id: str, until_ms: int) -> None:
    if until_ms > 0:
        cur.execute(
            "INSERT INTO revocations (node_id, until_ms) VALUES (?, ?) "
            "ON CONFLICT (node_id) DO UPDATE SET until_ms = excluded.until_ms",
            (node_id, until_ms),
        )
    else:
        cur.execute("DELETE FROM revocations WHERE node_id = ?", (node_id,))


def _op_revoked_until(cur: sqlite3.Cursor, node_id: str) -> int:
    row = cur.execute("SELECT until_ms FROM revocations WHERE node_id = ?", (node_id,)).fetchone()
    return 0 if row is None else int(row[0])


# -- the store -----------------------------------------------------------------


class SQLiteStore(QueuedStore):
    """The SQLite :class:`~allspark.store.Store`.

    ``path`` is the database file (its directory is created on :meth:`start`);
    ``reactor`` provides ``callLater`` and ``seconds``.  After
    :meth:`start`, :attr:`migrations_applied` lists the schema versions this
    open created (empty when the file was already current).
    """

    OPS = operations(globals())

    #: ``PRAGMA busy_timeout`` in ms: how long one attempt to begin a batch
    #: waits for another process's write lock (the reactor waits with it).
    busy_timeout_ms = 100
    #: Seconds a batch keeps retrying a database locked by another process
    #: before its operations fail.
    busy_give_up_s = 30.0
    #: ``PRAGMA synchronous``; ``"NORMAL"`` survives a process kill, see the module docstring.
    synchronous = "NORMAL"

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self._reactor = reactor
        self._pending: list[_Op] = []
        self._flush_scheduled = False
        self._busy_since: float | None = None
        self._closing = False
        self._closed: Deferred[None] | None = None
        self._conn: sqlite3.Connection | None = None
        self._opening = False
        self.migrations_applied: list[int] = []

    # -- plumbing -----------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Queue ``fn(cursor, *args)`` for the next batch; its result as a Deferred."""
        if self._closing or self._conn is None:
            return fail(StoreError("store is not open"))
        d: Deferred[Any] = Deferred()
        self._pending.append((fn, args, d))
        self._schedule(0)
        return d

    def _schedule(self, delay: float) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._reactor.callLater(delay, self._flush)

    def _flush(self) -> None:
        """Run the pending operations as one batch and fire their Deferreds."""
        self._flush_scheduled = False
        if not self._pending or self._conn is None:
            return
        batch, self._pending = self._pending, []
        started = perf_counter()
        try:
            results = self._run_batch(batch)
        except Exception:  # e.g. a SAVEPOINT gone with a transaction SQLite rolled back
            results = self._abort(self._conn, batch)
        if results is not None:
            self._observe_batch(len(batch), perf_counter() - started)
        if results is None:
            # another process holds the write lock: stay first in line
            now = self._reactor.seconds()
            if self._busy_since is None:
                self._busy_since = now
            if now - self._busy_since < self.busy_give_up_s:
                self._pending = batch + self._pending
                self._schedule(0.005)
                return
            log.error("store {path} stayed locked for {seconds}s; failing a batch",
                      path=self.path, seconds=self.busy_give_up_s, size=len(batch))
            results = [(False, Failure(StoreError("the database stayed locked by another process")))] * len(batch)
        self._busy_since = None
        for (_, _, d), (ok, value) in zip(batch, results):
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def _run_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]] | None:
        """Run ``batch`` in one transaction; one ``(ok, result or Failure)``
        per op, or None when another process holds the write lock."""
        conn = self._conn
        if conn is None:
            failure = Failure(StoreError("store is not open"))
            return [(False, failure)] * len(batch)
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                return None
            failure = Failure()
            log.failure("store batch could not begin", failure, size=len(batch))
            return [(False, failure)] * len(batch)
        except sqlite3.Error:
            failure = Failure()
            log.failure("store batch could not begin", failure, size=len(batch))
            return [(False, failure)] * len(batch)
        results: list[tuple[bool, Any]] = []
        i, size, one_by_one_until = 0, len(batch), 0
        while i < size:
            fn, args, _ = batch[i]
            if fn is _op_append_inbox and i >= one_by_one_until:
                # A run of appends: a few statements for the whole run instead
                # of a few per message (see _append_many).
                j = i + 1
                while j < size and batch[j][0] is _op_append_inbox:
                    j += 1
                if j - i > 1:
                    run = self._append_run(cur, batch[i:j])
                    if run is not None:
                        results.extend(run)
                        i = j
                        continue
                    one_by_one_until = j
            i += 1
            if getattr(fn, "_savepoint", False):
                cur.execute("SAVEPOINT op")
                try:
                    result = fn(cur, *args)
                except Exception:
                    results.append((False, Failure()))
                    try:
                        cur.execute("ROLLBACK TO op")
                        cur.execute("RELEASE op")
                    except sqlite3.Error:
                        return self._abort(conn, batch)
                else:
                    cur.execute("RELEASE op")
                    results.append((True, result))
            else:
                try:
                    results.append((True, fn(cur, *args)))
                except Exception:
                    results.append((False, Failure()))
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back (e.g. disk full):
                # earlier operations of the batch are lost too.
                return self._abort(
                    conn, batch, Failure(StoreError("SQLite rolled the transaction back"))
                )
        try:
            cur.execute("COMMIT")
        except sqlite3.Error:
            return self._abort(conn, batch)
        return results

    @staticmethod
    def _append_run(cur: sqlite3.Cursor, run: list[_Op]) -> list[tuple[bool, Any]] | None:
        """Append a run of messages with :func:`_append_many`.  Returns None,
        having rolled the run back, if that fails: the caller then runs the
        operations one by one, so that only the faulty one fails."""
        cur.execute("SAVEPOINT run")
        try:
            appended = _append_many(cur, [args for _, args, _ in run])
        except Exception:
            log.failure("batched append failed; retrying one by one", size=len(run))
            cur.execute("ROLLBACK TO run")
            cur.execute("RELEASE run")
            return None
        cur.execute("RELEASE run")
        return [
            (False, Failure(result)) if isinstance(result, InboxFull) else (True, result)
            for result in appended
        ]

    @staticmethod
    def _abort(
        conn: sqlite3.Connection, batch: list[_Op], failure: Failure | None = None
    ) -> list[tuple[bool, Any]]:
        """Roll back and fail every operation of the batch (with the current exception)."""
        if failure is None:
            failure = Failure()
        log.failure("store batch rolled back", failure, size=len(batch))
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.failure("store rollback failed")
        return [(False, failure)] * len(batch)

    #: Seconds between two attempts to open a file another process has locked.
    open_retry_s = 0.005

    def _connect(self) -> sqlite3.Connection:
        """Make the directory and the file (mode 0600: it holds message
        bodies; SQLite gives the -wal and -shm files the file's mode), and
        open a connection whose lock waits last :attr:`busy_timeout_ms`."""
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old: 3.35 or newer is needed (RETURNING)")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            _owner_only(name)  # also the files an older version made 0644
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=256)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.path!r}: {e}") from e
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        return conn

    def _set_pragmas(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (needs the file's exclusive lock the first
        time) and set this connection's pragmas."""
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"could not switch {self.path!r} to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA cache_size = -65536")
        conn.execute("PRAGMA temp_store = MEMORY")

    def _migrate(self, conn: sqlite3.Connection) -> list[int]:
        """Create or migrate the schema in one transaction; the versions applied."""
        applied: list[int] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path!r} has schema version {version}, newer than this "
                    f"code's {SCHEMA_VERSION}"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    conn.execute(statement)
                applied.append(number + 1)
            if applied:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return applied

    async def _until_unlocked(self, conn: sqlite3.Connection, step: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``step(conn)``; while another process holds a lock it needs,
        try again every :attr:`open_retry_s` (each attempt waits at most
        :attr:`busy_timeout_ms`, the reactor keeps running in between), as a
        batch does, and fail with :class:`StoreError` after
        :attr:`busy_give_up_s`.  SQLite answers some conflicts (two processes
        switching a new file to WAL at once) with an immediate SQLITE_BUSY
        that no busy timeout waits for: only retrying gets past them."""
        since = self._reactor.seconds()
        attempts = 0
        while True:
            try:
                return step(conn)
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
                attempts += 1
                if self._reactor.seconds() - since >= self.busy_give_up_s:
                    raise StoreError(
                        f"could not open {self.path!r}: locked by another process for "
                        f"{self.busy_give_up_s:g}s"
                    ) from e
                if attempts == 1:
                    log.info("store {path} is locked by another process; waiting", path=self.path,
                             step=step.__name__)
            await deferLater(self._reactor, self.open_retry_s, lambda: None)

    async def _open(self) -> list[int]:
        """Open the connection, set pragmas, create or migrate the schema,
        each step retried while another process holds the file's lock."""
        conn = self._connect()
        try:
            await self._until_unlocked(conn, self._set_pragmas)
            applied: list[int] = await self._until_unlocked(conn, self._migrate)
            if self._closing:
                raise StoreError("store closed while it was opening")
        except sqlite3.Error as e:  # e.g. not a database: say which file
            conn.close()
            raise StoreError(f"cannot open {self.path!r}: {e}") from e
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return applied

    # -- life cycle -------------------------------------------------------
    def start(self) -> Deferred[None]:
        """Open the file, create or migrate the schema.  Waits (without
        blocking the reactor) for other processes that hold the file's
        lock, for at most :attr:`busy_give_up_s`."""
        if self._conn is not None or self._opening:
            return fail(StoreError("store already started"))
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._opening = True
        try:
            self.migrations_applied = await self._open()
        finally:
            self._opening = False
        if self.migrations_applied:
            log.info(
                "store {path} migrated to schema version {version}",
                path=self.path, version=SCHEMA_VERSION, applied=self.migrations_applied,
            )

    def close(self) -> Deferred[None]:
        """Run what was submitted, then close the connection."""
        if self._closed is None:
            self._closing = True
            self._closed = Deferred.fromCoroutine(self._drain_and_close())
        return self._closed

    async def _drain_and_close(self) -> None:
        while self._pending and self._conn is not None:
            self._flush()
            if self._pending:
                await deferLater(self._reactor, 0.005, lambda: None)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _encode_options(self, options: dict[str, Any]) -> str:
        """Session options as a JSON column."""
        return json.dumps(options)

