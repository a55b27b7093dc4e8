"""When to push: the one place that decides.

Routing only reports, after a copy is stored, which recipients did not get
it live (:meth:`PushScheduler.copies_stored`; a session broadcast reports
its members).  That costs the routing path a list append: the rest happens
on the next reactor turn and later.

1. **Schedule.**  Once per reactor turn, the reported nodes that are not
   live anywhere in the cluster (``Delivery.is_live``: a connection here, or
   a location the mesh holds) and not already scheduled by this process
   (an in-memory map of node to due time, forgotten once the time passes)
   go to the store in ONE ``schedule_push(node_ids, now + grace_s)``.  The
   store keeps the earliest due time and bumps the node's ``gen``; a node
   without a target, or muted, is skipped there.
2. **Claim.**  A timer at the earliest due time this process scheduled, and
   a poll every ``poll_s`` (pushes other servers scheduled, retries, a
   restart), call ``claim_due_pushes(now, owner, lease)``: the store hands
   each due node to exactly one claimer, leased for
   :attr:`PushSettings.lease_s`.
3. **Decide.**  For each claimed job: live again anywhere, or nothing unread
   (inbox messages not acked plus session stream rows past the member's
   cursor), or the latest unread message was user-wide (``dest_client_id``)
   and another device of the same user is live: finish without sending.  A push sent less than ``window_s`` ago:
   due again when the window ends (that is the coalescing: a burst gives
   one push now and at most one per window after).  Else the notification
   (the unread count; the sender or session and ``push_text`` of the latest
   message, as ``content`` allows) goes through the
   :class:`~allspark.push.dispatcher.Dispatcher`.
4. **Finish.**  Sent: ``finish_push(sent_ms=now)`` (copies stored meanwhile
   leave it due, and the window then holds it).  A dead token: the target is
   removed (only if it is still that address) and the push ends.  A
   transient failure: due again after a backoff, dropped after
   ``max_rounds`` claims in a row failed.  A permanent failure: dropped.

A process that dies holding a lease leaves the push to whoever claims it
after the lease ends: at worst one extra push, never a lost one.
"""

from __future__ import annotations

import heapq
from typing import Any, Collection

import orjson
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

from allspark.delivery import Delivery
from allspark.inbox import now_ms
from allspark.logs import logger
from allspark.push.config import PushSettings
from allspark.push.dispatcher import Dispatcher
from allspark.push.provider import Notification, Outcome
from allspark.store import PushJob, Store

log = logger(__name__)

#: Every push of one device carries this collapse key: a newer push replaces
#: an older one still waiting on the device.
COLLAPSE_KEY = "allspark"


class PushScheduler(service.Service):
    """Decides and sends the pushes of one process (see the module
    docstring).  Started after the store, stopped before it closes."""

    def __init__(self, store: Store, delivery: Delivery, dispatcher: Dispatcher, settings: PushSettings,
                 clock: IReactorTime, owner: str) -> None:
        """``owner``: this process's name in the store's leases (unique per
        process: the server id and a random part)."""
        self.store = store
        self.delivery = delivery
        self.dispatcher = dispatcher
        self.settings = settings
        self.clock = clock
        self.owner = owner
        self._reported: list[tuple[Collection[str], str | None]] = []
        self._flush_call: IDelayedCall | None = None
        #: node -> due time (ms) of a schedule this process made that has not come yet
        self._scheduled: dict[str, int] = {}
        self._timer: IDelayedCall | None = None
        self._timer_due: int | None = None
        #: the times (ms) a claim is wanted at, earliest first (a heap), and the same as a set
        self._wake_times: list[int] = []
        self._wakes: set[int] = set()
        self._poll: LoopingCall | None = None
        self._claiming = False
        self._again = False
        self._jobs: set[Deferred[None]] = set()

    # -- from the routing path ------------------------------------------------
    def copies_stored(self, node_ids: Collection[str], exclude: str | None = None) -> None:
        """Copies of a message were stored for ``node_ids`` (except
        ``exclude``, the sender) and may not have reached them live.  Cheap:
        the nodes are looked at on the next reactor turn."""
        if not self.running or not node_ids:
            return
        reported = self._reported
        if reported and reported[-1][0] is node_ids and reported[-1][1] == exclude:
            return  # the same session's members again in this turn
        reported.append((node_ids, exclude))
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        """Schedule, in one store call, the reported nodes that are offline
        everywhere and not already scheduled here."""
        self._flush_call = None
        reported, self._reported = self._reported, []
        now = now_ms(self.clock)
        due = now + int(self.settings.grace_s * 1000)
        scheduled = self._scheduled
        is_live = self.delivery.is_live
        batch: list[str] = []
        for node_ids, exclude in reported:
            for node_id in node_ids:
                if node_id == exclude:
                    continue
                pending = scheduled.get(node_id)
                if pending is not None and pending > now:
                    continue  # the push already due then counts this copy too
                if is_live(node_id):
                    continue
                scheduled[node_id] = due
                batch.append(node_id)
        if not batch:
            return
        d = self.store.schedule_push(batch, due)

        def done(node_ids: list[str]) -> None:
            if node_ids:
                log.debug("push scheduled for {count} nodes at {due}", count=len(node_ids), due=due)
                self._wake_at(due)

        d.addCallbacks(done, lambda f: log.failure("scheduling pushes for {count} nodes failed", f,
                                                   count=len(batch)))

    # -- claiming -----------------------------------------------------------
    def startService(self) -> None:
        """Poll the store for due pushes every ``poll_s``."""
        super().startService()
        self._poll = LoopingCall(self.claim_now)
        self._poll.clock = self.clock
        self._poll.start(self.settings.poll_s, now=True).addErrback(
            lambda f: log.failure("the push poll stopped", f))

    def stopService(self) -> Deferred[Any]:
        """Stop claiming; wait (at most ``timeout_s``) for the pushes being
        sent, then close the providers.  A push still unfinished then keeps
        its lease and is sent again by whoever claims it after the lease."""
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for call in (self._flush_call, self._timer):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._timer = None
        self._reported = []
        self._wake_times.clear()
        self._wakes.clear()
        jobs = list(self._jobs)
        waiting: Deferred[Any] = DeferredList(jobs, consumeErrors=True)
        if jobs:
            waiting.addTimeout(self.settings.timeout_s, self.clock)
            waiting.addErrback(lambda f: log.warn("stopped with {count} pushes unfinished (their leases "
                                                  "will expire)", count=len(self._jobs)))
        return waiting.addBoth(lambda _: self.dispatcher.close())

    def _wake_at(self, due: int) -> None:
        """Claim at ``due`` (ms) too: a timer at the earliest time asked for,
        re-armed for the next one when it fires."""
        if not self.running:
            return
        if due in self._wakes:
            return
        heapq.heappush(self._wake_times, due)
        self._wakes.add(due)
        self._arm()

    def _arm(self) -> None:
        if not self._wake_times:
            return
        earliest = self._wake_times[0]
        if self._timer is not None and self._timer.active():
            if self._timer_due is not None and self._timer_due <= earliest:
                return
            self._timer.cancel()
        self._timer_due = earliest
        # a millisecond late, so that the clock read then (rounded down to ms) has reached it
        self._timer = self.clock.callLater(max(0.0, earliest / 1000 - self.clock.seconds()) + 0.001,
                                           self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_due = None
        now = now_ms(self.clock)
        while self._wake_times and self._wake_times[0] <= now:
            self._wakes.discard(heapq.heappop(self._wake_times))
        self._arm()
        self.claim_now()

    def claim_now(self) -> None:
        """Take the due pushes this process has room for and handle each."""
        if not self.running:
            return
        if self._claiming:
            self._again = True
            return
        now = now_ms(self.clock)
        # forget schedules whose time has come: a copy stored from now on schedules again
        self._scheduled = {n: due for n, due in self._scheduled.items() if due > now}
        room = self.settings.concurrency * 2 - len(self._jobs)
        if room <= 0:
            return
        self._claiming = True
        d = self.store.claim_due_pushes(now, self.owner, int(self.settings.lease_s * 1000), room)

        def claimed(jobs: list[PushJob]) -> None:
            self._claiming = False
            for job in jobs:
                self._start_job(job)
            if self._again or len(jobs) == room:
                self._again = False
                self.clock.callLater(0, self.claim_now)

        def failed(failure: Any) -> None:
            self._claiming = False
            log.failure("claiming due pushes failed", failure)

        d.addCallbacks(claimed, failed)

    def _start_job(self, job: PushJob) -> None:
        d = ensureDeferred(self._handle(job))
        self._jobs.add(d)

        def done(result: Any) -> None:
            self._jobs.discard(d)
            if self.running and len(self._jobs) == self.settings.concurrency:
                self.clock.callLater(0, self.claim_now)  # room again

        d.addErrback(lambda f: log.failure("handling the push of {node_id} failed (due again after its "
                                           "lease)", f, node_id=job.node_id))
        d.addBoth(done)

    # -- one job --------------------------------------------------------------
    async def _handle(self, job: PushJob) -> None:
        node_id = job.node_id
        settings = self.settings
        if self.delivery.is_live(node_id):
            await self._finish(job, None, None)
            return
        unread, latest = await self.unread(node_id)
        if unread <= 0:
            await self._finish(job, None, None)
            return
        if "dest_client_id" in latest and await self._user_live_elsewhere(node_id):
            # a user-wide message that another device of the user got live: nothing to wake
            log.debug("no push to {node_id}: another device of its user is online", node_id=node_id)
            await self._finish(job, None, None)
            return
        note = self._note(node_id, unread, latest)
        now = now_ms(self.clock)
        window_ms = int(settings.window_s * 1000)
        if job.last_sent_ms is not None and job.last_sent_ms + window_ms > now:
            await self._finish(job, None, job.last_sent_ms + window_ms)
            self._wake_at(job.last_sent_ms + window_ms)
            return
        dispatched = await self.dispatcher.send(job.target, note)
        result = dispatched.result
        now = now_ms(self.clock)
        fields = {"node_id": node_id, "provider": job.target.provider, "status": result.status,
                  "reason": result.reason}
        if result.outcome is Outcome.SENT:
            await self._finish(job, now, None)
            return
        if result.outcome is Outcome.DEAD_TOKEN:
            removed = await self.store.remove_push_target(node_id, job.target.address)
            self.dispatcher.stats[job.target.provider, "token_removed"] += 1
            log.info("push_token_removed: {provider} says the target of {node_id} is gone",
                     event="push_token_removed", removed=removed, **fields)
            await self._finish(job, None, None)
            return
        rounds = job.attempts + 1
        if result.outcome is Outcome.FAILED or rounds >= settings.max_rounds:
            self.dispatcher.stats[job.target.provider, "dropped"] += 1
            log.warn("push_dropped: the push to {node_id} through {provider} is given up: {reason}",
                     event="push_dropped", rounds=rounds, **fields)
            await self._finish(job, None, None, failed=True)
            return
        wait_s = self.dispatcher.backoff_s(rounds + settings.max_attempts)
        if result.retry_after_s is not None:
            wait_s = max(wait_s, result.retry_after_s)
        retry_at = now + int(wait_s * 1000)
        log.info("push_retried: the push to {node_id} is due again in {wait:.1f} s", event="push_retried",
                 wait=wait_s, rounds=rounds, **fields)
        await self._finish(job, None, retry_at, failed=True)
        self._wake_at(retry_at)

    async def _finish(self, job: PushJob, sent_ms: int | None, retry_at_ms: int | None,
                      failed: bool = False) -> None:
        held = await self.store.finish_push(job.node_id, self.owner, job.gen, sent_ms, retry_at_ms, failed)
        if not held:
            log.warn("the lease on the push of {node_id} had been taken over", node_id=job.node_id)

    # -- what a push says -------------------------------------------------------
    async def notification(self, node_id: str) -> Notification | None:
        """The notification ``node_id`` would get now (None: nothing unread)."""
        unread, latest = await self.unread(node_id)
        return self._note(node_id, unread, latest) if unread > 0 else None

    async def unread(self, node_id: str) -> tuple[int, dict[str, Any]]:
        """How many messages ``node_id`` has not acked, and the fields of the
        latest of them (empty when none).

        Inbox messages not acked (an inbox's rows are contiguous up to its
        ``last_seq``: acks and retention remove the oldest) plus, per
        session, the stream rows past the member's cursor."""
        store = self.store
        unread = 0
        latest: tuple[int, bytes] | None = None
        first = await store.fetch_inbox(node_id, 0, 1)
        if first.messages:
            unread += first.last_seq - first.messages[0].seq + 1
            last = first.messages[0]
            if last.seq != first.last_seq:
                page = await store.fetch_inbox(node_id, first.last_seq - 1, 1)
                if page.messages:
                    last = page.messages[-1]
            latest = (last.stored_at, last.body)
        for member in await store.sessions_of_node(node_id):
            cursor = max(member.acked_seq, member.joined_seq)
            page = await store.fetch_session(member.session_id, node_id, max(cursor, 0), 1)
            if page.last_seq <= cursor:
                continue
            unread += page.last_seq - cursor
            if page.scanned_upto < page.last_seq:
                page = await store.fetch_session(member.session_id, node_id, page.last_seq - 1, 1)
            if page.messages and (latest is None or page.messages[-1].stored_at >= latest[0]):
                latest = (page.messages[-1].stored_at, page.messages[-1].body)
        fields: Any = {}
        if latest is not None:
            try:
                fields = orjson.loads(latest[1])
            except orjson.JSONDecodeError:
                fields = {}
        return unread, fields if isinstance(fields, dict) else {}

    async def _user_live_elsewhere(self, node_id: str) -> bool:
        """Whether another node of ``node_id``'s client is live anywhere."""
        node = await self.store.get_node(node_id)
        if node is None or node[1] is None:
            return False
        is_live = self.delivery.is_live
        return any(other != node_id and is_live(other) for other in await self.store.nodes_of_client(node[1]))

    def _note(self, node_id: str, unread: int, fields: dict[str, Any]) -> Notification:
        """What the push says, as ``[push] content`` allows: the count; the
        sender or session of the latest message; its ``push_text``; its
        ``payload`` (as ``data["payload"]``, a JSON string, when small enough)."""
        content = self.settings.content
        sender_id = session_id = text = None
        data: dict[str, str] | None = None
        if content != "count":
            session_id = _string(fields.get("dest_session_id"))
            sender_id = _string(fields.get("src_id"))
            if content in ("text", "payload"):
                text = _string(fields.get("push_text"))
            if content == "payload" and "payload" in fields:
                encoded = orjson.dumps(fields["payload"]).decode()
                if len(encoded.encode()) <= self.settings.max_payload_bytes:
                    data = {"payload": encoded}
        return Notification(node_id=node_id, unread=unread, collapse_key=COLLAPSE_KEY,
                            sender_id=sender_id, session_id=session_id, text=text, data=data)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None

