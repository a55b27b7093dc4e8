"""When to push: the scheduler over the memory store, the real inbox and
delivery point, a scripted provider and a Clock."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark.delivery import Delivery
from allspark.inbox import DeliveryConfig, Inbox
from allspark.push.config import PushSettings
from allspark.push.dispatcher import Dispatcher
from allspark.push.provider import Outcome, PushResult
from allspark.push.scheduler import PushScheduler
from allspark.registry import Registry
from allspark.store import PushTarget
from allspark.store.memory import MemoryStore
from tests.fakes import FakeConnection
from tests.push.fake_provider import HANG, FakeProvider

START = 1_700_000_000.0


class CountingStore(MemoryStore):
    """The memory store, counting schedule_push calls."""

    def __init__(self) -> None:
        super().__init__()
        self.schedule_calls: list[list[str]] = []

    def schedule_push(self, node_ids: Any, due_ms: int) -> Any:
        self.schedule_calls.append(list(node_ids))
        return super().schedule_push(node_ids, due_ms)


class FrozenAfterClaim:
    """A store as a process sees it that froze (or died) after its first
    claim: later claims find nothing and its finish never completes."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.claimed = False

    def claim_due_pushes(self, *args: Any) -> Any:
        if self.claimed:
            return succeed([])
        d = self.store.claim_due_pushes(*args)
        d.addCallback(lambda jobs: setattr(self, "claimed", bool(jobs)) or jobs)
        return d

    def finish_push(self, *args: Any) -> Any:
        return Deferred()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class SchedulerTestCase(unittest.TestCase):
    settings = PushSettings(grace_s=2.0, window_s=30.0, timeout_s=5.0, max_attempts=1, backoff_base_s=1.0,
                            backoff_cap_s=10.0, max_rounds=3, poll_s=1.0)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = CountingStore()
        self.registry = Registry()
        self.delivery = Delivery(self.registry, self.clock)
        self.inbox = Inbox(self.store, self.delivery, self.clock, DeliveryConfig())
        self.provider = FakeProvider("fcm")
        self.scheduler = self.make_scheduler("server-a")
        self.inbox.push = self.scheduler
        for node in ("phone", "tablet"):
            self.store.set_push_target(PushTarget(node, "fcm", f"tok-{node}", None, None, None, 0))

    def make_scheduler(self, owner: str, settings: PushSettings | None = None) -> PushScheduler:
        settings = settings or self.settings
        dispatcher = Dispatcher({"fcm": self.provider}, settings, self.clock, jitter=lambda: 0.5)
        scheduler = PushScheduler(self.store, self.delivery, dispatcher, settings, self.clock, owner)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        return scheduler

    def send(self, recipients: list[str], body: dict[str, Any] | None = None, push: bool = True,
             sender: str = "alice") -> None:
        frame = orjson.dumps({"src_id": sender, "text": "hi", **(body or {})})
        self.inbox.store_and_deliver(sender, None, recipients, frame, b"{}", push=push)

    def run_for(self, seconds: float, step: float = 0.1) -> None:
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)

    def pushes(self, node: str = "phone") -> list[Any]:
        return [note for target, note in self.provider.sent if target.node_id == node]


class WhenToPushTests(SchedulerTestCase):
    def test_a_burst_to_an_offline_node_is_one_push_with_the_count(self) -> None:
        for i in range(100):
            self.send(["phone"], {"push_text": f"message {i}"})
        self.clock.advance(0)  # the reactor turn after the stores
        self.assertEqual(self.store.schedule_calls, [["phone"]])  # one store call for the burst
        self.run_for(1.9)
        self.assertEqual(self.pushes(), [])  # the grace period
        self.run_for(0.3)
        [note] = self.pushes()
        self.assertEqual(note.unread, 100)
        self.assertEqual(note.sender_id, "alice")
        self.assertEqual(note.text, "message 99")
        self.run_for(60)
        self.assertEqual(len(self.pushes()), 1)

    def test_a_live_node_gets_no_push(self) -> None:
        self.registry.add(FakeConnection("phone"))
        self.send(["phone"])
        self.run_for(10)
        self.assertEqual((self.provider.sent, self.store.schedule_calls), ([], []))

    def test_connecting_within_the_grace_period_means_no_push(self) -> None:
        self.send(["phone"])
        self.run_for(1)
        self.registry.add(FakeConnection("phone"))
        self.run_for(10)
        self.assertEqual(self.provider.sent, [])

    def test_acking_within_the_grace_period_means_no_push(self) -> None:
        self.send(["phone"])
        self.send(["phone"])
        self.run_for(1)
        self.store.ack_inbox("phone", 2)
        self.run_for(10)
        self.assertEqual(self.provider.sent, [])

    def test_no_push_for_a_user_wide_message_another_device_of_the_user_got_live(self) -> None:
        for node in ("phone", "laptop"):
            self.store.remember_node(node, "user-1", 0)
        self.registry.add(FakeConnection("laptop", "user-1"))
        self.send(["phone", "laptop"], {"dest_client_id": "user-1"})
        self.run_for(5)
        self.assertEqual(self.provider.sent, [])
        self.send(["phone"])  # to the phone alone: the laptop never saw it
        self.run_for(5)
        self.assertEqual([n.unread for n in self.pushes()], [2])

    def test_push_false_schedules_nothing(self) -> None:
        self.send(["phone"], push=False)
        self.run_for(10)
        self.assertEqual((self.provider.sent, self.store.schedule_calls), ([], []))

    def test_a_muted_node_gets_no_push(self) -> None:
        self.store.set_push_muted("phone", True)
        self.send(["phone", "tablet"])
        self.run_for(5)
        self.assertEqual([t.node_id for t, _ in self.provider.sent], ["tablet"])

    def test_one_push_per_window_carrying_the_count_so_far(self) -> None:
        self.send(["phone"])
        self.run_for(3)
        self.assertEqual([n.unread for n in self.pushes()], [1])
        for _ in range(4):
            self.send(["phone"])
        self.run_for(28)  # 31 s after the first push was sent
        self.assertEqual(len(self.pushes()), 1)  # the window holds it
        self.run_for(2)
        self.assertEqual([n.unread for n in self.pushes()], [1, 5])

    def test_messages_after_a_push_schedule_again(self) -> None:
        self.send(["phone"])
        self.run_for(3)
        self.run_for(40)
        self.send(["phone"])
        self.run_for(3)
        self.assertEqual([n.unread for n in self.pushes()], [1, 2])

    def test_content_levels(self) -> None:
        cases = {"count": (None, None, None, None), "sender": ("alice", "room", None, None),
                 "text": ("alice", "room", "wake up", None),
                 "payload": ("alice", "room", "wake up", {"payload": '{"n":1,"s":"\u00e9"}'})}
        for content, expected in cases.items():
            self.provider.sent.clear()
            settings = PushSettings(grace_s=1.0, content=content)
            scheduler = PushScheduler(self.store, self.delivery, Dispatcher({}, settings, self.clock), settings,
                                      self.clock, "x")
            self.send(["phone"], {"dest_session_id": "room", "push_text": "wake up", "payload": {"n": 1, "s": "\u00e9"}})
            note: list[Any] = []
            ensureDeferred(scheduler.notification("phone")).addCallback(note.append)
            self.assertEqual((note[0].sender_id, note[0].session_id, note[0].text, note[0].data), expected)

    def test_a_payload_larger_than_max_payload_bytes_is_left_out(self) -> None:
        settings = PushSettings(grace_s=1.0, content="payload", max_payload_bytes=20)
        scheduler = PushScheduler(self.store, self.delivery, Dispatcher({}, settings, self.clock), settings,
                                  self.clock, "x")
        self.send(["phone"], {"payload": "x" * 19, "push_text": "big"})
        note: list[Any] = []
        ensureDeferred(scheduler.notification("phone")).addCallback(note.append)
        self.assertEqual((note[0].text, note[0].data), ("big", None))


class OutcomeTests(SchedulerTestCase):
    def test_a_dead_token_removes_the_target(self) -> None:
        self.provider.script.append(PushResult(Outcome.DEAD_TOKEN, 410, "gone"))
        self.send(["phone"])
        self.run_for(3)
        self.assertIsNone(self.store.get_push_target("phone").result)
        self.assertEqual(self.scheduler.dispatcher.stats["fcm", "token_removed"], 1)
        self.send(["phone"])
        self.run_for(60)
        self.assertEqual(len(self.provider.sent), 1)

    def test_a_transient_failure_is_due_again_then_dropped(self) -> None:
        self.provider.default = PushResult(Outcome.RETRY, 503, "server_error")
        self.send(["phone"])
        self.run_for(3)
        self.assertEqual(len(self.provider.sent), 1)
        self.run_for(60)  # backed off in the store, claimed again: max_rounds claims in all
        self.assertEqual(len(self.provider.sent), 3)
        self.assertEqual(self.scheduler.dispatcher.stats["fcm", "dropped"], 1)
        self.run_for(60)
        self.assertEqual(len(self.provider.sent), 3)

    def test_a_long_retry_after_re_dues_the_push_for_then(self) -> None:
        self.provider.script.append(PushResult(Outcome.RETRY, 429, "rate_limited", 50.0))
        self.send(["phone"])
        self.run_for(3)
        self.run_for(49)
        self.assertEqual(len(self.provider.sent), 1)
        self.run_for(2)
        self.assertEqual(len(self.provider.sent), 2)


class ClusterTests(SchedulerTestCase):
    def test_two_schedulers_on_one_store_send_one_push(self) -> None:
        other = self.make_scheduler("server-b")
        self.send(["phone"])
        other.copies_stored(["phone"])  # as if the other server stored a copy too
        self.run_for(5)
        self.assertEqual(len(self.pushes()), 1)

    def test_a_claimer_stuck_past_its_lease_costs_one_extra_push_never_none(self) -> None:
        self.scheduler.stopService()
        stuck_provider = FakeProvider("fcm", HANG)
        slow = PushSettings(grace_s=2.0, timeout_s=100.0, max_attempts=1, poll_s=1.0)
        stuck = PushScheduler(FrozenAfterClaim(self.store), self.delivery,
                              Dispatcher({"fcm": stuck_provider}, slow, self.clock), slow, self.clock, "stuck")
        stuck.startService()
        self.inbox.push = stuck
        self.send(["phone"])
        self.run_for(3)
        self.assertEqual(len(stuck_provider.sent), 1)  # claimed, and its request hangs
        other = self.make_scheduler("server-b")
        self.run_for(slow.lease_s - 5)
        self.assertEqual(self.pushes(), [])  # the lease still holds
        self.run_for(10)
        self.assertEqual(len(self.pushes()), 1)  # the other server took it over after the lease
        self.run_for(60)
        self.assertEqual((len(self.pushes()), len(stuck_provider.sent)), (1, 1))  # one extra at most
        self.assertEqual(other.dispatcher.stats["fcm", "sent"], 1)

    def test_a_restarted_scheduler_sends_what_was_scheduled(self) -> None:
        self.send(["phone"])
        self.clock.advance(0)
        self.scheduler.stopService()
        self.run_for(5)
        self.assertEqual(self.provider.sent, [])
        self.make_scheduler("server-a-again")
        self.run_for(2)
        self.assertEqual(len(self.pushes()), 1)


class SessionTests(SchedulerTestCase):
    def test_offline_members_are_scheduled_and_count_stream_rows(self) -> None:
        store = self.store
        store.create_session("room", "alice", {}, 0)
        for node in ("alice", "phone", "tablet"):
            store.add_member("room", node, None, False, node, 0)
        self.registry.add(FakeConnection("tablet"))
        for i in range(3):
            store.append_session("room", "alice", None, orjson.dumps({"src_id": "alice", "dest_session_id": "room",
                                                                      "push_text": f"t{i}"}), b"{}", 0, 1000)
            self.scheduler.copies_stored({"alice": 1, "phone": 1, "tablet": 1}, exclude="alice")
        self.send(["phone"])  # and one in the inbox
        self.clock.advance(0)
        self.assertEqual(store.schedule_calls, [["phone"]])
        self.run_for(3)
        [note] = self.pushes()
        self.assertEqual(note.unread, 4)
        self.assertEqual(self.pushes("tablet"), [])


class RoutedTests(unittest.TestCase):
    """Through the real router, inbox and sessions of a :class:`Server`:
    what they report to the scheduler."""

    def setUp(self) -> None:
        from allspark.auth import AuthKeyVerifier, ValidationTokens
        from allspark.server import Server, ServerConfig

        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryStore()
        config = ServerConfig(server_id="srv", host="127.0.0.1", port=1, listen=())
        tokens = ValidationTokens(b"k" * 32, "srv", self.clock)
        self.server = Server(config, self.store, AuthKeyVerifier([b"secret"]), tokens, self.clock)
        self.server.new_sessions()
        self.provider = FakeProvider("fcm")
        settings = PushSettings(grace_s=1.0, window_s=30.0)
        self.scheduler = PushScheduler(self.store, self.server.delivery,
                                       Dispatcher({"fcm": self.provider}, settings, self.clock), settings,
                                       self.clock, "srv/1")
        self.server.inbox.push = self.scheduler
        self.server.sessions.push = self.scheduler
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        for node in ("alice", "bob", "carol"):
            self.store.remember_node(node, None, 0)
            self.store.set_push_target(PushTarget(node, "fcm", f"tok-{node}", None, None, None, 0))
        self.alice = FakeConnection("alice")
        self.server.registry.add(self.alice)

    def route(self, **frame: Any) -> Any:
        from allspark.envelope import parse_frame
        from allspark.router import Sender

        d = self.server.router.route(Sender("alice", None), parse_frame(orjson.dumps(frame)))
        return self.successResultOf(d)

    def run_for(self, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            self.clock.advance(0.1)

    def pushed(self) -> list[tuple[str, int]]:
        return [(target.node_id, note.unread) for target, note in self.provider.sent]

    def test_session_broadcasts_and_direct_messages_wake_offline_recipients_unless_push_false(self) -> None:
        sessions = self.server.sessions
        from allspark.router import Sender

        self.successResultOf(ensureDeferred(sessions.create(Sender("alice", None), {"session_id": "room"})))
        for node in ("bob", "carol"):
            self.successResultOf(ensureDeferred(sessions.join(Sender("alice", None),
                                                              {"session_id": "room", "node_id": node})))
        self.server.registry.add(FakeConnection("carol"))  # carol is online: no push for her
        self.route(dest_session_id="room", id="s1", payload=1, push=False)
        self.run_for(3)
        self.assertEqual(self.pushed(), [])
        self.route(dest_session_id="room", id="s2", payload=2)
        self.run_for(2)
        self.assertEqual(self.pushed(), [("bob", 2)])  # both stream rows are unread
        self.route(dest_id="bob", id="d1", payload=3, push=False)
        self.route(dest_id="carol", id="d2", payload=3)
        self.route(dest_id="bob", id="d3", payload=3)
        self.run_for(40)
        self.assertEqual(self.pushed(), [("bob", 2), ("bob", 4)])
