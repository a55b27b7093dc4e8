"""Sessions in one process: the memory store, fake connections and a
:class:`~twisted.internet.task.Clock`.

Covers who may join, anonymity of what other members get, private messages,
game sessions, the session stream (session_seq, sync, ack), the membership
cache and sliced fan-out.  ``tests/e2e/test_sessions.py`` runs the same rules
against a real server process.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from allspark import delivery as delivery_module
from allspark.auth import AuthKeyVerifier, ValidationTokens
from allspark.envelope import Control, FrameError, Message, parse_frame
from allspark.inbox import DeliveryConfig
from allspark.router import Sender
from allspark.server import Server, ServerConfig
from allspark.sessions import http_args
from allspark.store.memory import MemoryStore
from tests.fakes import FakeConnection


class SessionsTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        config = ServerConfig(server_id="srv", host="127.0.0.1", port=1, listen=())
        tokens = ValidationTokens(b"k" * 32, "srv", self.clock)
        self.server = Server(config, self.store, AuthKeyVerifier([b"secret"]), tokens, self.clock)
        self.sessions = self.server.new_sessions()
        self.conns: dict[str, FakeConnection] = {}

    # -- helpers ----------------------------------------------------------
    def done(self, coro: Any) -> Any:
        return self.successResultOf(defer.ensureDeferred(coro))

    def refused(self, coro: Any, code: str) -> FrameError:
        failure = self.failureResultOf(defer.ensureDeferred(coro), FrameError)
        self.assertEqual(failure.value.code, code, failure.value.message)
        return failure.value

    def online(self, node_id: str, client_id: str | None = None) -> FakeConnection:
        conn = FakeConnection(node_id, client_id)
        self.server.registry.add(conn)
        self.store.remember_node(node_id, client_id, 0)
        self.conns[node_id] = conn
        return conn

    def op(self, caller: str, op: str, client_id: str | None = None, /, **args: Any) -> dict[str, Any]:
        return self.done(self.sessions.control(Sender(caller, client_id), Control(op, None, args)))

    def op_refused(self, caller: str, op: str, code: str, /, **args: Any) -> FrameError:
        return self.refused(self.sessions.control(Sender(caller, None), Control(op, None, args)), code)

    def send(self, node_id: str, client_id: str | None = None, **frame: Any) -> dict[str, Any]:
        msg = parse_frame(orjson.dumps(frame))
        assert isinstance(msg, Message)
        return orjson.loads(self.done(self.server.router.route(Sender(node_id, client_id), msg)))

    def messages(self, node_id: str) -> list[dict[str, Any]]:
        return [f for f in self.conns[node_id].frames if "op" not in f]

    def events(self, node_id: str, op: str) -> list[dict[str, Any]]:
        return [f for f in self.conns[node_id].frames if f.get("op") == op]


class JoinRules(SessionsTestCase):
    def test_creator_is_owner_and_member(self) -> None:
        info = self.op("alice", "create_session", "A", session_id="s1")
        self.assertEqual(info["op"], "session")
        self.assertEqual(info["session_id"], "s1")
        self.assertEqual(info["owner"], "alice")
        self.assertEqual(info["you"]["node_id"], "alice")
        self.assertEqual([m["name"] for m in info["members"]], ["alice"])

    def test_generated_session_id_and_duplicate_refused(self) -> None:
        info = self.op("alice", "create_session")
        self.assertTrue(info["session_id"].startswith("s-"))
        self.op_refused("bob", "create_session", "session_exists", session_id=info["session_id"])

    def test_nobody_joins_a_closed_session_but_the_owner_adds_anyone(self) -> None:
        self.op("alice", "create_session", session_id="s1")
        self.op_refused("bob", "join_session", "not_allowed", session_id="s1")
        self.op_refused("bob", "join_session", "not_allowed", session_id="s1", node_id="carol")
        added = self.op("alice", "join_session", session_id="s1", node_id="bob")
        self.assertEqual(added["op"], "member")
        self.assertNotIn("id", added)  # "id" is the request's id, set by the socket
        self.assertEqual(added["node_id"], "bob")
        # joining again answers the same membership
        again = self.op("bob", "join_session", session_id="s1")
        self.assertEqual(again["alias"], added["alias"])

    def test_anyone_can_join(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        joined = self.op("bob", "join_session", "B", session_id="s1")
        self.assertEqual(joined["client_id"], "B")
        self.assertEqual(joined["acked_seq"], 0)

    def test_unknown_session(self) -> None:
        self.op_refused("bob", "join_session", "no_such_session", session_id="nope")
        self.op_refused("bob", "get_session_info", "no_such_session", session_id="nope")

    def test_only_members_read_info(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        self.op_refused("bob", "get_session_info", "not_a_member", session_id="s1")

    def test_owner_removes_members_others_do_not(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        self.op("bob", "join_session", session_id="s1")
        self.op("carol", "join_session", session_id="s1")
        self.op_refused("bob", "unjoin_session", "not_allowed", session_id="s1", node_id="carol")
        left = self.op("alice", "unjoin_session", session_id="s1", node_id="carol")
        self.assertEqual(left["op"], "left")
        self.op_refused("alice", "unjoin_session", "no_such_member", session_id="s1", node_id="carol")
        self.op("bob", "unjoin_session", session_id="s1")
        self.op_refused("bob", "unjoin_session", "not_a_member", session_id="s1")


class Anonymity(SessionsTestCase):
    def test_anonymous_member_seen_by_alias_only(self) -> None:
        alice = self.online("alice", "A")
        self.op("alice", "create_session", "A", session_id="s1", anyone_can_join=True)
        self.online("mallory", "M")
        me = self.op("mallory", "join_session", "M", session_id="s1", anonymous=True)
        alias = me["alias"]
        self.assertEqual(me["node_id"], "mallory")  # its own view
        self.send("mallory", "M", dest_session_id="s1", payload="hi")
        self.send("mallory", "M", dest_session_id="s1", dest_id="alice", payload="psst")
        info = self.op("alice", "get_session_info", session_id="s1")
        self.op("mallory", "unjoin_session", session_id="s1")
        seen = orjson.dumps([alice.frames, info])
        self.assertNotIn(b"mallory", seen)
        self.assertNotIn(b'"M"', seen)
        self.assertIn(alias.encode(), seen)
        broadcast, private = self.messages("alice")
        self.assertEqual(broadcast["src_id"], alias)
        self.assertNotIn("src_client_id", broadcast)
        self.assertEqual(private["src_id"], alias)
        self.assertIn("seq", private)

    def test_anonymous_node_id_is_not_an_address(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        self.op("mallory", "join_session", session_id="s1", anonymous=True)
        self.refused(self._route("alice", dest_session_id="s1", dest_id="mallory"), "unknown_destination")
        self.refused(self._route("alice", dest_session_id="s1", dest_id="nobody"), "unknown_destination")

    def _route(self, node_id: str, **frame: Any) -> Any:
        msg = parse_frame(orjson.dumps(frame))
        return self.server.router.route(Sender(node_id, None), msg)

    def test_owner_cannot_tie_an_anonymous_node_id_to_its_alias(self) -> None:
        """Issue 8, item 7: join_session, set_master and unjoin_session with
        the node_id of an anonymous member answered its alias."""
        owner = self.online("owner", "O")
        self.op("owner", "create_session", "O", session_id="g", session_type="game", anyone_can_join=True)
        alias = self.op("mallory", "join_session", "M", session_id="g", anonymous=True)["alias"]
        added = self.op("owner", "join_session", session_id="g", node_id="mallory")
        self.assertEqual(added, {"op": "member", "session_id": "g", "node_id": "mallory", "anonymous": True})
        added = self.op("owner", "join_session", session_id="g", node_id="mallory", anonymous=False)
        self.assertNotIn(alias, orjson.dumps(added).decode())
        for op in ("set_master", "unjoin_session"):
            # exactly as for a node that is not in the session
            anonymous = self.op_refused("owner", op, "no_such_member", session_id="g", node_id="mallory")
            nobody = self.op_refused("owner", op, "no_such_member", session_id="g", node_id="nobody")
            self.assertEqual(anonymous.message, nobody.message)
        # by alias the owner still does both
        self.assertEqual(self.op("owner", "set_master", session_id="g", alias=alias)["master"], alias)
        self.assertEqual(self.op("owner", "unjoin_session", session_id="g", alias=alias)["member"]["name"], alias)
        for frame in owner.frames:
            text = orjson.dumps(frame).decode()
            self.assertFalse("mallory" in text and alias in text, text)

    def test_an_anonymous_member_still_names_itself_by_node_id(self) -> None:
        self.op("owner", "create_session", session_id="s1", anyone_can_join=True)
        self.op("mallory", "join_session", session_id="s1", anonymous=True)
        left = self.op("mallory", "unjoin_session", session_id="s1", node_id="mallory")
        self.assertEqual(left["op"], "left")

    def test_adding_a_node_does_not_look_it_up(self) -> None:
        """The owner learns neither the client_id of a node it adds nor
        whether that node ever connected."""
        self.online("known", "K")
        self.op("owner", "create_session", session_id="s1")
        known = self.op("owner", "join_session", session_id="s1", node_id="known")
        ghost = self.op("owner", "join_session", session_id="s1", node_id="ghost")
        self.assertEqual(known.keys(), ghost.keys())
        self.assertNotIn("client_id", known)
        info = self.op("owner", "get_session_info", session_id="s1")
        self.assertNotIn(b'"K"', orjson.dumps(info))
        # the member sees itself as it was added; its messages carry its client_id as always
        self.assertEqual(self.events("known", "member_joined")[0]["member"]["node_id"], "known")

    def test_reveal(self) -> None:
        alice = self.online("alice")
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True, anonymous=True)
        me = self.op("bob", "join_session", "B", session_id="s1")
        self.assertTrue(me["anonymous"])  # the session's default
        revealed = self.op("bob", "reveal_anonymity", "B", session_id="s1")
        self.assertEqual(revealed["op"], "revealed")
        event = self.events("alice", "member_revealed")[0]
        self.assertEqual(event["alias"], me["alias"])
        self.assertEqual(event["member"]["node_id"], "bob")
        self.assertEqual(event["member"]["client_id"], "B")
        self.send("bob", "B", dest_session_id="s1", payload=1)
        self.assertEqual(self.messages("alice")[-1]["src_id"], "bob")
        self.assertEqual(self.messages("alice")[-1]["src_client_id"], "B")
        self.assertTrue(alice.frames)


class Stream(SessionsTestCase):
    def test_broadcast_is_one_stream_row_with_session_seq(self) -> None:
        self.online("alice")
        self.online("bob")
        self.op("alice", "create_session", session_id="s1")
        self.op("alice", "join_session", session_id="s1", node_id="bob")
        self.op("alice", "join_session", session_id="s1", node_id="carol")  # offline
        accepted = self.send("alice", dest_session_id="s1", id="m1", payload="x")
        self.assertEqual(accepted["status"], "stored")
        self.assertEqual((accepted["recipients"], accepted["live"]), (2, 1))
        self.assertEqual(accepted["session_seq"], 1)
        (got,) = self.messages("bob")
        self.assertEqual(got["session_seq"], 1)
        self.assertNotIn("seq", got)
        self.assertEqual(got["dest_session_id"], "s1")
        self.assertEqual(self.messages("alice"), [])  # the sender gets no copy
        # a retry is stored and delivered once
        again = self.send("alice", dest_session_id="s1", id="m1", payload="x")
        self.assertEqual(again["session_seq"], 1)
        self.assertEqual(len(self.messages("bob")), 1)

    def test_offline_member_syncs_and_acks(self) -> None:
        self.op("alice", "create_session", session_id="s1")
        self.op("alice", "join_session", session_id="s1", node_id="carol")
        for i in range(3):
            self.send("alice", dest_session_id="s1", payload=i)
        carol = self.online("carol")
        synced = self.done(self.sessions.sync(carol, "s1", None, 2, 10**6))
        self.assertEqual(synced, {"op": "synced", "session_id": "s1", "upto": 2, "more": True, "last_seq": 3})
        self.assertEqual([m["session_seq"] for m in self.messages("carol")], [1, 2])
        acked = self.done(self.sessions.ack(Sender("carol", None), "s1", 2))
        self.assertEqual(acked, {"op": "acked", "session_id": "s1", "upto": 2})
        carol.clear()
        synced = self.done(self.sessions.sync(carol, "s1", None, 10, 10**6))
        self.assertEqual([m["payload"] for m in self.messages("carol")], [2])
        self.assertFalse(synced["more"])
        sessions = self.op("carol", "my_sessions")["sessions"]
        self.assertEqual(sessions, [{"session_id": "s1", "acked_seq": 2, "joined_seq": 0, "last_seq": 3}])

    def test_new_member_does_not_read_older_rows(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        self.send("alice", dest_session_id="s1", payload="before")
        bob = self.online("bob")
        self.op("bob", "join_session", session_id="s1")
        self.done(self.sessions.sync(bob, "s1", 0, 10, 10**6))
        self.assertEqual(self.messages("bob"), [])

    def test_non_members_cannot_send_sync_or_ack(self) -> None:
        self.op("alice", "create_session", session_id="s1")
        eve = self.online("eve")
        msg = parse_frame(b'{"dest_session_id": "s1", "payload": 1}')
        self.refused(self.server.router.route(Sender("eve", None), msg), "not_a_member")
        self.refused(self.sessions.sync(eve, "s1", None, 10, 10**6), "not_a_member")
        self.refused(self.sessions.ack(Sender("eve", None), "s1", 1), "not_a_member")
        msg = parse_frame(b'{"dest_session_id": "nope", "payload": 1}')
        self.refused(self.server.router.route(Sender("eve", None), msg), "unknown_destination")

    def test_cursors_beyond_the_stream_are_refused(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        bob = self.online("bob")
        self.op("bob", "join_session", session_id="s1")
        self.send("alice", dest_session_id="s1", payload=1)
        self.refused(self.sessions.ack(Sender("bob", None), "s1", 2), "bad_cursor")
        self.refused(self.sessions.sync(bob, "s1", 5, 10, 10**6), "bad_cursor")
        self.assertEqual(self.done(self.sessions.ack(Sender("bob", None), "s1", 1))["upto"], 1)
        synced = self.done(self.sessions.sync(bob, "s1", None, 10, 10**6))
        self.assertEqual((synced["upto"], synced["more"]), (1, False))


class SessionStreamQuotaTests(SessionsTestCase):
    """--max-session-rows-per-sender and --max-session-rows: rows per quota window."""

    def setUp(self) -> None:
        super().setUp()
        self.server.config = replace(self.server.config, delivery=DeliveryConfig(
            max_session_rows_per_sender=2, max_session_rows=3, session_quota_window_ms=60_000))
        self.sessions.config = self.server.config.delivery
        for node_id in ("alice", "bob", "carol"):
            self.online(node_id)
        self.op("alice", "create_session", session_id="s1")
        for node_id in ("bob", "carol"):
            self.op("alice", "join_session", session_id="s1", node_id=node_id)
        self.clock.advance(60 - self.clock.seconds() % 60)  # the start of a window

    def broadcast(self, node_id: str, frame_id: str) -> Any:
        msg = parse_frame(orjson.dumps({"dest_session_id": "s1", "id": frame_id, "payload": 1}))
        return self.server.router.route(Sender(node_id, None), msg)

    def test_a_flooding_member_gets_session_full_for_the_rest_of_the_window(self) -> None:
        self.send("alice", dest_session_id="s1", id="a1", payload=1)
        self.send("alice", dest_session_id="s1", id="a2", payload=2)
        error = self.refused(self.broadcast("alice", "a3"), "session_full")
        self.assertEqual(error.frame_id, "a3")
        self.assertIn("you sent 2 messages", error.message)
        self.assertEqual(self.send("bob", dest_session_id="s1", id="b1", payload=1)["session_seq"], 3)
        error = self.refused(self.broadcast("carol", "c1"), "session_full")
        self.assertIn("took 3 messages", error.message)
        self.assertEqual(len(self.messages("carol")), 3)  # refused rows were not delivered
        self.assertEqual(self.send("alice", dest_session_id="s1", id="a1", payload=1)["session_seq"], 1)
        self.clock.advance(60)
        self.assertEqual(self.send("alice", dest_session_id="s1", id="a3", payload=3)["session_seq"], 4)


class Games(SessionsTestCase):
    def test_non_master_reaches_master_only(self) -> None:
        for n in ("gm", "p1", "p2"):
            self.online(n)
        self.op("gm", "create_session", session_id="g", session_type="game", anyone_can_join=True)
        self.op("p1", "join_session", session_id="g")
        self.op("p2", "join_session", session_id="g")
        accepted = self.send("p1", dest_session_id="g", payload="move")
        self.assertNotIn("session_seq", accepted)
        (got,) = self.messages("gm")
        self.assertEqual((got["src_id"], got["payload"], got["dest_session_id"]), ("p1", "move", "g"))
        self.assertIn("seq", got)
        self.assertEqual(self.messages("p2"), [])
        self.refused(self._route("p1", dest_session_id="g", dest_id="p2"), "not_allowed")
        self.send("gm", dest_session_id="g", payload="state")
        self.assertEqual(self.messages("p1")[-1]["payload"], "state")
        self.assertEqual(self.messages("p2")[-1]["payload"], "state")

    def _route(self, node_id: str, **frame: Any) -> Any:
        return self.server.router.route(Sender(node_id, None), parse_frame(orjson.dumps(frame)))

    def test_set_master(self) -> None:
        self.online("p1")
        self.op("gm", "create_session", session_id="g", session_type="game", anyone_can_join=True)
        self.op("p1", "join_session", session_id="g")
        self.op_refused("p1", "set_master", "not_allowed", session_id="g", node_id="p1")
        answer = self.op("gm", "set_master", session_id="g", node_id="p1")
        self.assertEqual(answer, {"op": "master", "session_id": "g", "master": "p1"})
        self.send("gm", dest_session_id="g", payload="to the master")
        self.assertEqual(self.messages("p1")[-1]["payload"], "to the master")
        self.op("alice", "create_session", session_id="plain")
        self.op_refused("alice", "set_master", "not_a_game", session_id="plain", node_id="alice")


class Cache(SessionsTestCase):
    def test_membership_is_cached_and_changes_apply(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        calls = []
        original = self.store.get_members
        self.store.get_members = lambda sid: (calls.append(sid), original(sid))[1]  # type: ignore
        self.op("bob", "join_session", session_id="s1")
        self.send("bob", dest_session_id="s1", payload=1)
        self.op("alice", "get_session_info", session_id="s1")
        self.assertEqual(calls, [])
        self.sessions.membership_changed("s1")  # what a peer's report does
        info = self.op("alice", "get_session_info", session_id="s1")
        self.assertEqual(calls, ["s1"])
        self.assertEqual({m["name"] for m in info["members"]}, {"alice", "bob"})

    def test_a_change_without_details_during_a_load_is_not_cached_stale(self) -> None:
        self.op("alice", "create_session", session_id="s1")
        self.sessions.membership_changed("s1")
        loading = defer.Deferred()
        original = self.store.get_members
        self.store.get_members = lambda sid: loading.addCallback(lambda _: original(sid))  # type: ignore
        d = defer.ensureDeferred(self.sessions._entry("s1"))
        self.sessions.membership_changed("s1")
        loading.callback(None)
        self.successResultOf(d)
        self.assertNotIn("s1", self.sessions._cache)

    def test_a_member_change_during_a_load_is_applied_to_it(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        self.op("bob", "join_session", session_id="s1")
        self.sessions.membership_changed("s1")
        loading = defer.Deferred()
        original = self.store.get_members
        before = self.successResultOf(original("s1"))  # read before bob left
        self.store.get_members = lambda sid: loading.addCallback(lambda _: before)  # type: ignore
        d = defer.ensureDeferred(self.sessions._entry("s1"))
        self.sessions.membership_changed("s1", "bob")  # bob left while the read was in flight
        loading.callback(None)
        self.assertNotIn("bob", self.successResultOf(d).members)
        self.assertNotIn("bob", self.sessions._cache["s1"].members)

    def test_callers_during_a_load_share_it(self) -> None:
        self.op("alice", "create_session", session_id="s1")
        self.sessions.membership_changed("s1")
        loading = defer.Deferred()
        calls: list[str] = []
        original = self.store.get_members
        self.store.get_members = lambda sid: (calls.append(sid), loading.addCallback(lambda _: original(sid)))[1]  # type: ignore
        waiting = [defer.ensureDeferred(self.sessions._entry("s1")) for _ in range(50)]
        loading.callback(None)
        entries = [self.successResultOf(d) for d in waiting]
        self.assertEqual(calls, ["s1"])
        self.assertTrue(all(e is entries[0] for e in entries))


class CacheAcrossServers(SessionsTestCase):
    """The cache's side of invalidation over the mesh (the wiring itself is
    tests/test_server.py, ShareCaches)."""

    def count_loads(self) -> list[str]:
        calls: list[str] = []
        original = self.store.get_members
        self.store.get_members = lambda sid: (calls.append(sid), original(sid))[1]  # type: ignore
        return calls

    def test_every_change_made_here_is_announced_but_not_a_cursor_move(self) -> None:
        announced: list[str] = []
        self.sessions.announce = announced.append
        self.online("alice")
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True, session_type="game",
                anonymous=True)
        self.op("bob", "join_session", session_id="s1")
        self.op("bob", "reveal_anonymity", session_id="s1")
        self.op("alice", "set_master", session_id="s1", node_id="bob")
        self.op("alice", "set_master", session_id="s1", node_id="alice")
        self.op("bob", "unjoin_session", session_id="s1")
        self.assertEqual(announced, ["s1"] * 6)
        self.send("alice", dest_session_id="s1", payload=1)
        self.done(self.sessions.ack(Sender("alice", None), "s1", 1))
        self.assertEqual(announced, ["s1"] * 6)

    def test_a_peers_report_drops_the_session_and_is_not_announced_again(self) -> None:
        announced: list[str] = []
        self.op("alice", "create_session", session_id="s1")
        self.sessions.announce = announced.append
        calls = self.count_loads()
        self.sessions.membership_changed("s1", from_peer=True)
        self.op("alice", "get_session_info", session_id="s1")
        self.assertEqual((calls, announced), (["s1"], []))

    def test_a_cached_session_is_read_again_after_the_ttl(self) -> None:
        self.op("alice", "create_session", session_id="s1", anyone_can_join=True)
        calls = self.count_loads()
        self.op("alice", "get_session_info", session_id="s1")
        self.clock.advance(self.sessions.cache_ttl - 0.1)
        self.op("alice", "get_session_info", session_id="s1")
        self.assertEqual(calls, [])
        # another server removed nothing here: the store changes behind the cache
        self.done(self.store.add_member("s1", "bob", None, False, "anon-b", 0))
        self.assertEqual(self.op("alice", "get_session_info", session_id="s1")["member_count"], 1)
        self.clock.advance(0.1)
        self.assertEqual(self.op("alice", "get_session_info", session_id="s1")["member_count"], 2)
        self.assertEqual(calls, ["s1"])

    def test_drop_all_forgets_every_session(self) -> None:
        for sid in ("s1", "s2"):
            self.op("alice", "create_session", session_id=sid)
        calls = self.count_loads()
        self.sessions.drop_all("peer-a")
        for sid in ("s1", "s2"):
            self.op("alice", "get_session_info", session_id=sid)
        self.assertEqual(calls, ["s1", "s2"])


class FanOut(SessionsTestCase):
    def test_large_broadcast_goes_out_in_slices(self) -> None:
        self.patch(delivery_module, "FANOUT_SLICE", 10)
        self.op("alice", "create_session", session_id="big")
        for i in range(35):
            self.online(f"n{i}")
            self.op("alice", "join_session", session_id="big", node_id=f"n{i}")
            self.clock.advance(0)  # let member_joined events finish going out
        for conn in self.conns.values():
            conn.clear()
        self.send("alice", dest_session_id="big", payload="hello")
        got = sum(len(self.messages(f"n{i}")) for i in range(35))
        self.assertEqual(got, 10)  # the first slice; the rest waits for the reactor
        self.clock.advance(0)
        self.clock.advance(0)
        self.clock.advance(0)
        got = sum(len(self.messages(f"n{i}")) for i in range(35))
        self.assertEqual(got, 35)
        # encoded once: every member got the same bytes object
        self.assertEqual(len({id(self.conns[f"n{i}"].raw[0]) for i in range(35)}), 1)
        self.assertEqual(len(self.sessions.delivery._fanouts), 0)

    def test_a_copy_that_fails_costs_only_that_copy(self) -> None:
        for node_id in ("bob", "carol"):
            self.online(node_id)
        self.op("alice", "create_session", session_id="s1")
        self.op("alice", "create_session", session_id="s2")
        for session_id in ("s1", "s2"):
            for node_id in ("bob", "carol"):
                self.op("alice", "join_session", session_id=session_id, node_id=node_id)
        self.clock.advance(0)

        def broken(frame: bytes) -> None:
            raise RuntimeError("this socket cannot take it")

        self.conns["bob"].send = broken  # type: ignore[method-assign]
        first = self.send("alice", dest_session_id="s1", payload="one")
        self.assertEqual(first["status"], "delivered")
        self.assertEqual([m["payload"] for m in self.messages("carol")], ["one"])  # after bob's failure
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.sessions.delivery._fanouts), 0)  # nothing left at the head of the queue
        # later fan-outs, in any session, and joins go on
        del self.conns["bob"].send
        self.assertEqual(self.send("alice", dest_session_id="s2", payload="two")["status"], "delivered")
        self.op("alice", "join_session", session_id="s2", node_id="dave")
        self.assertEqual([m["payload"] for m in self.messages("bob")], ["two"])
        self.assertEqual([m["payload"] for m in self.messages("carol")], ["one", "two"])


class DeliverableSize(SessionsTestCase):
    """A message whose delivered copy could exceed the frame limit is refused
    with too_large before it is stored; one that fits is delivered."""

    def test_too_large_is_refused_before_storing_direct_and_session(self) -> None:
        self.online("bob")
        self.op("alice", "create_session", session_id="s1")
        self.op("alice", "join_session", session_id="s1", node_id="bob")
        limit = self.server.config.limits.max_message_size
        big = "x" * (limit - 150)  # the client's frame fits; the delivered copy would not
        for dest in ({"dest_id": "bob"}, {"dest_session_id": "s1"}, {"dest_session_id": "s1", "dest_id": "bob"},
                     {"dest_id": "bob", "ephemeral": True}):
            msg = parse_frame(orjson.dumps({"payload": big, "id": "m1", **dest}))
            assert isinstance(msg, Message)
            error = self.failureResultOf(self.server.router.route(Sender("alice", None), msg), FrameError).value
            self.assertEqual((error.code, error.details["limit"]), ("too_large", limit), dest)
            self.assertEqual(orjson.loads(error.to_frame())["limit"], limit)
        self.assertEqual(self.messages("bob"), [])
        self.assertEqual(self.successResultOf(self.store.inbox_state("bob")), (0, 0))
        fits = "x" * (limit - 400)
        self.assertEqual(self.send("alice", dest_id="bob", payload=fits)["status"], "delivered")
        self.assertEqual(self.send("alice", dest_session_id="s1", payload=fits)["status"], "delivered")
        self.assertTrue(all(len(raw) <= limit for raw in self.conns["bob"].raw))


class HTTPArgs(unittest.TestCase):
    def test_strings_become_typed_args(self) -> None:
        args = http_args("create_session", {"auth_key": "k", "anonymous": "true", "session_type": "game"})
        self.assertEqual(args, {"anonymous": True, "session_type": "game"})

    def test_missing_and_bad_args(self) -> None:
        with self.assertRaises(FrameError):
            http_args("join_session", {})
        with self.assertRaises(FrameError):
            http_args("join_session", {"session_id": "bad id!"})
        with self.assertRaises(FrameError):
            http_args("create_session", {"anonymous": "maybe"})
