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
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from allspark.logs import logger

from allspark.envelope import FrameError, addressed
from allspark.registry import Connection, Registry
from allspark.store import AppendResult, InboxPage, Store

log = logger(__name__)

DAY_MS = 86_400_000


@dataclass(frozen=True)
class DeliveryConfig:
    """Knobs of definite delivery."""

    retention_ms: int = 30 * DAY_MS
    dedup_window_ms: int = 10 * 60_000
    purge_interval_s: float = 3600.0


def now_ms(clock: IReactorTime) -> int:
    """The clock's time in Unix milliseconds."""
    return int(clock.seconds() * 1000)


class Inbox:
    """Stores, delivers, syncs and acks a node's durable messages."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: IReactorTime,
        config: DeliveryConfig = DeliveryConfig(),
    ) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.config = config

    def store_and_deliver(
        self,
        sender_id: str,
        dedup_id: str | None,
        recipients: Sequence[str],
        body: bytes,
        answer: bytes,
    ) -> Deferred[bytes]:
        """Append ``body`` to each recipient's inbox, then write each copy to
        the recipient's live connections here.  A duplicate is not delivered
        again.  Fires once stored, with ``answer`` (the first attempt's answer
        for a duplicate)."""
        d = self.store.append_inbox(
            sender_id,
            dedup_id,
            recipients,
            body,
            answer,
            now_ms(self.clock),
            self.config.dedup_window_ms,
        )
        d.addCallback(self._deliver_stored, body)
        return d

    def _deliver_stored(self, result: AppendResult, body: bytes) -> bytes:
        if not result.duplicate:
            send = self.registry.send
            for node_id, seq in result.seqs.items():
                send(node_id, addressed(body, node_id, seq))
        return result.answer

    async def sync(self, conn: Connection, after: int, limit: int, max_queued: int) -> dict[str, Any]:
        """Send ``conn`` up to ``limit`` stored messages after ``after``.

        Stops early when the connection's send queue holds more than
        ``max_queued`` bytes, so that a sync never overflows a slow reader.
        Returns the ``synced`` frame (not yet sent).
        """
        page: InboxPage = await self.store.fetch_inbox(conn.node_id, after, limit)
        check_cursor("after", after, page.last_seq, "this inbox")
        return send_page(conn, page, after, max_queued, {}, limit=limit)

    async def ack(self, node_id: str, upto: int) -> dict[str, Any]:
        """Delete ``node_id``'s inbox up to ``upto``; the ``acked`` frame.

        An ``upto`` beyond the last seq ever assigned is refused with
        ``bad_cursor`` (nothing is deleted).
        """
        last_seq, _ = await self.store.inbox_state(node_id)
        check_cursor("upto", upto, last_seq, "this inbox")
        removed = await self.store.ack_inbox(node_id, upto)
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
    ``more: true`` forever).
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
