"""Definite delivery: store before accept, per-recipient seq, sync, ack, retention.

The rules (``docs/protocol.md`` has the user-facing version):

- A durable message is appended to every recipient's inbox in one atomic
  store operation *before* the sender hears ``accepted``.  Only then is it
  written to the recipients' live connections, each copy carrying its
  recipient's ``seq``.
- ``sync`` pages through what a node has not acked, in ``seq`` order, and ends
  with a ``synced`` frame saying where the page stopped, whether there is
  more, and whether retention removed something the node never acked (a gap).
- ``ack`` deletes everything up to a seq.  Nothing is deleted otherwise, except
  by retention (default 30 days), which a background loop applies.
- A retried message (same sender, same ``id``, within the de-duplication
  window) is stored once and answered with the first attempt's ``accepted``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from allspark.logs import logger

from allspark.envelope import FrameError, addressed
from allspark.delivery import Delivery
from allspark.metrics import DEPTH_BUCKETS, Distribution
from allspark.registry import Connection
from allspark.store import AppendResult, InboxFull, InboxPage, InboxQuota, Store, StreamQuota

if TYPE_CHECKING:
    from allspark.push.scheduler import PushScheduler

log = logger(__name__)

DAY_MS = 86_400_000

#: Bytes of stored messages one sync reads from the store at once, counted
#: at the largest message size (``--max-message-size``): 16 rows of 64 KiB.
SYNC_FETCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class DeliveryConfig:
    """Knobs of definite delivery."""

    retention_ms: int = 30 * DAY_MS
    dedup_window_ms: int = 10 * 60_000
    purge_interval_s: float = 3600.0
    #: unacked messages one sender may have in one inbox (--max-inbox-per-sender)
    max_inbox_per_sender: int = 10_000
    #: unacked messages one inbox may hold (--max-inbox)
    max_inbox: int = 100_000
    #: session stream rows one sender may add to one session per quota window
    #: (--max-session-rows-per-sender)
    max_session_rows_per_sender: int = 10_000
    #: session stream rows one session takes per quota window (--max-session-rows)
    max_session_rows: int = 100_000
    #: the session quota window in ms (--session-quota-window, in seconds)
    session_quota_window_ms: int = 60_000

    @property
    def inbox_quota(self) -> InboxQuota:
        """The inbox bounds as the store checks them."""
        return InboxQuota(per_sender=self.max_inbox_per_sender, per_inbox=self.max_inbox)

    @property
    def stream_quota(self) -> StreamQuota:
        """The session stream bounds as the store checks them."""
        return StreamQuota(per_sender=self.max_session_rows_per_sender,
                           per_session=self.max_session_rows,
                           window_ms=self.session_quota_window_ms)


def now_ms(clock: IReactorTime) -> int:
    """The clock's time in Unix milliseconds."""
    return int(clock.seconds() * 1000)


class Inbox:
    """Stores, delivers, syncs and acks a node's durable messages."""

    def __init__(
        self,
        store: Store,
        delivery: Delivery,
        clock: IReactorTime,
        config: DeliveryConfig = DeliveryConfig(),
    ) -> None:
        """``delivery``: where each stored copy is written (here, or through the mesh)."""
        self.store = store
        self.delivery = delivery
        self.clock = clock
        self.config = config
        self._quota = config.inbox_quota
        #: told which recipients of a stored message were not live (push notifications), when configured
        self.push: PushScheduler | None = None
        #: read by /metrics (plain ints: the hot path adds to them): copies
        #: appended, of those written to a live connection at once, copies
        #: removed by acks
        self.copies_stored = 0
        self.copies_live = 0
        self.copies_acked = 0
        #: read by /metrics: how many messages a node's inbox held for it at a full sync
        self.depths = Distribution(DEPTH_BUCKETS)

    def store_and_deliver(
        self,
        sender_id: str,
        dedup_id: str | None,
        recipients: Sequence[str],
        body: bytes,
        answer: bytes,
        push: bool = True,
    ) -> Deferred[bytes]:
        """Append ``body`` to each recipient's inbox, then hand each copy to
        the delivery point (:class:`~allspark.delivery.Delivery`).  A duplicate is not delivered
        again.  Fires once stored, with ``answer`` (the first attempt's answer
        for a duplicate).  The recipients no copy reached live are reported
        to :attr:`push` (unless ``push`` is false: the message said
        ``"push": false``).

        Fails with ``inbox_full`` (a :class:`FrameError`), storing nothing for
        any recipient, when a recipient's inbox holds ``max_inbox`` unacked
        messages, or ``max_inbox_per_sender`` from this sender."""
        d = self.store.append_inbox(
            sender_id,
            dedup_id,
            recipients,
            body,
            answer,
            now_ms(self.clock),
            self.config.dedup_window_ms,
            self._quota,
        )
        # one callback pair: _refuse_full only ever sees the store's failure
        return d.addCallbacks(self._deliver_stored, self._refuse_full, callbackArgs=(body, push),
                              errbackArgs=(sender_id, dedup_id, len(recipients)))

    def _refuse_full(
        self, failure: Failure, sender_id: str, frame_id: str | None, recipients: int
    ) -> Failure:
        """Turn the store's :class:`InboxFull` into the sender's ``inbox_full``."""
        error = failure.value
        if not isinstance(error, InboxFull):
            return failure
        log.debug("refused a message from {sender_id}: inbox full", sender_id=sender_id,
                  full=list(error.node_ids), per_sender=error.per_sender)
        whose = "the recipient's inbox" if recipients == 1 else "a recipient's inbox"
        if error.per_sender:
            why = (f"{whose} holds {self.config.max_inbox_per_sender} unacked messages from you: "
                   "nothing was stored; send again once it has acked some")
        else:
            why = (f"{whose} holds {self.config.max_inbox} unacked messages: nothing was stored; "
                   "send again once it has acked some")
        raise FrameError("inbox_full", why, frame_id)

    def _deliver_stored(self, result: AppendResult, body: bytes, push: bool = True) -> bytes:
        if not result.duplicate:
            deliver = self.delivery.deliver
            live = 0
            offline: list[str] = []
            for node_id, seq in result.seqs.items():
                if deliver(node_id, addressed(body, node_id, seq)):
                    live += 1
                else:
                    offline.append(node_id)
            if offline and push and self.push is not None:
                self.push.copies_stored(offline)
            self.copies_stored += len(result.seqs)
            self.copies_live += live
        return result.answer

    async def sync(
        self, conn: Connection, after: int, limit: int, max_queued: int, rows: int | None = None
    ) -> dict[str, Any]:
        """Send ``conn`` up to ``limit`` stored messages after ``after``,
        read from the store ``rows`` at a time (default: all at once).

        Stops early when the connection's send queue holds more than
        ``max_queued`` bytes, so that a sync never overflows a slow reader.
        Returns the ``synced`` frame (not yet sent).
        """
        return await write_rows(
            conn, partial(self.store.fetch_inbox, conn.node_id), after, limit=limit,
            rows=rows or limit, max_queued=max_queued, where="this inbox",
        )

    async def sync_all(self, conn: Connection, after: int, rows: int, max_queued: int) -> dict[str, Any]:
        """Send ``conn`` every stored message after ``after``, read from the
        store ``rows`` at a time; while more than ``max_queued`` bytes wait
        for the socket, wait for it to drain.  Returns the ``synced`` frame."""
        return await write_rows(
            conn, partial(self.store.fetch_inbox, conn.node_id), after, limit=None,
            rows=rows, max_queued=max_queued, where="this inbox", observe_sent=self.depths.observe,
        )

    async def ack(self, node_id: str, upto: int) -> dict[str, Any]:
        """Delete ``node_id``'s inbox up to ``upto``; the ``acked`` frame.

        An ``upto`` beyond the last seq ever assigned is refused with
        ``bad_cursor`` (nothing is deleted).
        """
        last_seq, _ = await self.store.inbox_state(node_id)
        check_cursor("upto", upto, last_seq, "this inbox")
        removed = await self.store.ack_inbox(node_id, upto)
        self.copies_acked += removed
        return {"op": "acked", "upto": upto, "removed": removed}

    def purge(self) -> Deferred[int]:
        """Apply retention and de-duplication expiry once; rows removed."""
        now = now_ms(self.clock)
        d = self.store.purge(now - self.config.retention_ms, now - self.config.dedup_window_ms)

        def report(removed: int) -> int:
            if removed:
                log.info("retention removed {removed} messages", removed=removed)
            return removed

        return d.addCallback(report)

    def retention_loop(self) -> LoopingCall:
        """A :class:`LoopingCall` running :meth:`purge` (not yet started)."""

        def tick() -> Deferred[Any]:
            return self.purge().addErrback(
                lambda f: log.failure("retention purge failed", f)
            )

        loop = LoopingCall(tick)
        loop.clock = self.clock
        return loop


def check_cursor(name: str, value: int, last_seq: int, where: str) -> None:
    """Refuse (``bad_cursor``) a cursor beyond the last seq ever assigned."""
    if value > last_seq:
        raise FrameError("bad_cursor", f"{name} {value} is beyond the last seq of {where} ({last_seq})")


def fetch_rows(limit: int, max_message_size: int) -> int:
    """How many rows a sync reads from the store at once: at most ``limit``,
    and no more than :data:`SYNC_FETCH_BYTES` worth of the largest message."""
    return max(1, min(limit, SYNC_FETCH_BYTES // max(1, max_message_size)))


async def write_rows(
    conn: Connection,
    fetch: Callable[[int, int], Deferred[InboxPage]],
    after: int,
    *,
    limit: int | None,
    rows: int,
    max_queued: int,
    extra: dict[str, Any] | None = None,
    splice: Callable[[bytes, int], bytes] | None = None,
    where: str | None = None,
    observe_sent: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write stored rows after ``after`` to ``conn``; their ``synced`` frame.

    ``fetch(after, n)`` reads up to ``n`` rows (an inbox or a member's view of
    a session stream); it is called with at most ``rows`` at a time, so a
    sync holds at most one such batch in memory.  ``splice`` makes a stored
    body the frame to send (by default: addressed to ``conn``'s node with its
    inbox ``seq``); ``extra`` fields (a ``session_id``) go into ``synced``.
    ``where`` names the stream for a ``bad_cursor`` refusal of an ``after``
    beyond its last seq (None: not checked).  ``observe_sent`` is called
    with the number of rows written, once, when the stream's end is reached
    (the inbox depth metric).

    Two ways to respect the socket's bound (more than ``max_queued`` bytes
    waiting for it):

    - ``limit`` given (one page): at most ``limit`` messages; the page stops
      early when the socket is behind, and ``synced`` says ``more``;
    - ``limit`` None (everything): the sync waits until the socket has
      drained to half of ``max_queued``, then goes on, until the stream's end
      (``more`` is false).  A connection that closes meanwhile fails the wait
      (:meth:`Connection.when_drained`).
    """
    if splice is None:
        node_id = conn.node_id

        def splice(body: bytes, seq: int) -> bytes:
            return addressed(body, node_id, seq)

    cursor = after
    sent = 0
    gap_upto = 0
    page: InboxPage | None = None
    while True:
        want = rows if limit is None else min(rows, limit - sent)
        if want <= 0:
            break
        if conn.queued_bytes > max_queued and page is not None:
            if limit is not None:
                break
            await conn.when_drained(max_queued // 2)
        page = await fetch(cursor, want)
        if where is not None and sent == 0 and cursor == after:
            check_cursor("after", after, page.last_seq, where)
        if cursor < page.purged_upto:
            gap_upto = max(gap_upto, page.purged_upto)
        stopped = False
        for message in page.messages:
            if conn.queued_bytes > max_queued:
                if limit is not None:
                    stopped = True
                    break
                await conn.when_drained(max_queued // 2)
            conn.send(splice(message.body, message.seq))
            cursor = message.seq
            sent += 1
        if stopped:
            break
        cursor = max(cursor, page.scanned_upto)
        if len(page.messages) < want:
            # the end of what is stored: nothing left up to last_seq (rows
            # were acked, or are this member's own)
            cursor = max(cursor, page.last_seq)
            break
    assert page is not None
    if observe_sent is not None:
        observe_sent(sent)
    synced: dict[str, Any] = {"op": "synced", **(extra or {}), "upto": cursor,
                              "more": cursor < page.last_seq, "last_seq": page.last_seq}
    if gap_upto:
        synced["gap"] = {"after": after, "upto": gap_upto}
    return synced


def send_page(
    conn: Connection,
    page: InboxPage,
    after: int,
    max_queued: int,
    extra: dict[str, Any],
    splice: Callable[[bytes, int], bytes] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write a fetched page to ``conn`` and build its ``synced`` frame.

    ``extra`` fields (a ``session_id``) are added to the ``synced`` frame.
    ``splice`` makes a stored body the frame to send (by default: addressed
    to ``conn``'s node with its inbox ``seq``; sessions pass one that adds
    ``session_seq``).  ``limit`` is the limit
    the page was fetched with: a page with fewer messages is the end of
    what is stored, so ``upto`` moves to ``last_seq`` and ``more`` is false
    (without it, an inbox whose rows were all acked would answer
    ``more: true`` forever).  That is safe with several writers because a
    page's ``last_seq`` only covers readable messages (every store keeps a
    seq allocated by a writer that has not finished out of it;
    ``docs/delivery.md``), so ``upto`` never passes a message still to come.
    """
    if splice is None:
        node_id = conn.node_id

        def splice(body: bytes, seq: int) -> bytes:
            return addressed(body, node_id, seq)

    upto = page.scanned_upto
    last_sent = after
    complete = True
    for message in page.messages:
        if conn.queued_bytes > max_queued:
            upto = last_sent
            complete = False
            break
        conn.send(splice(message.body, message.seq))
        last_sent = message.seq
    if complete and limit is not None and len(page.messages) < limit:
        upto = max(upto, page.last_seq)
    synced: dict[str, Any] = {"op": "synced", **extra, "upto": upto,
                              "more": upto < page.last_seq, "last_seq": page.last_seq}
    if after < page.purged_upto:
        synced["gap"] = {"after": after, "upto": page.purged_upto}
    return synced
