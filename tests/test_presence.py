"""Presence in one process: the memory store, fake connections, a Clock, and
(for nodes on another server) a remote route that says which nodes it holds.

tests/e2e/test_presence.py runs it with three real servers.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer

from allspark.envelope import Control, FrameError
from allspark.router import Sender
from tests.test_sessions import SessionsTestCase


class ElsewhereRoute:
    """A RemoteRoute: the nodes in ``held`` are online on another server."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.forwarded: list[tuple[tuple[str, ...], bytes]] = []

    def holds(self, node_id: str) -> bool:
        return node_id in self.held

    def located(self) -> set[str]:
        return self.held

    def forward(self, node_ids: Sequence[str], frame: bytes) -> None:
        self.forwarded.append((tuple(node_ids), frame))


class PresenceTestCase(SessionsTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.elsewhere = ElsewhereRoute()
        self.server.delivery.remote = self.elsewhere

    def presence(self, caller: str, client_id: str | None = None, /, **args: Any) -> dict[str, Any]:
        return self.done(self.sessions.control(Sender(caller, client_id), Control("presence", None, args)))

    def presence_refused(self, caller: str, code: str, client_id: str | None = None, /, **args: Any
                         ) -> FrameError:
        return self.refused(self.sessions.control(Sender(caller, client_id), Control("presence", None, args)),
                            code)

    def room(self) -> None:
        """alice owns "room"; bob (known), anna (anonymous: alias shown) and
        carl are members; dave is in no session."""
        self.online("alice", "A")
        self.op("alice", "create_session", "A", session_id="room")
        self.op("alice", "join_session", session_id="room", node_id="bob")
        self.op("alice", "join_session", session_id="room", node_id="anna", anonymous=True)
        self.op("alice", "join_session", session_id="room", node_id="carl")
        self.store.remember_node("dave", "D", 0)

    def alias_of(self, node_id: str) -> str:
        entry = self.sessions._cache["room"]
        return entry.members[node_id].alias


class SessionPresence(PresenceTestCase):
    def test_online_members_here_and_elsewhere_by_public_name(self) -> None:
        self.room()
        self.online("bob")
        self.elsewhere.held.add("anna")
        answer = self.presence("alice", "A", session_id="room")
        self.assertEqual(answer["online"], sorted(["alice", "bob", self.alias_of("anna")]))
        self.assertNotIn("anna", str(answer))  # an anonymous member only by alias
        self.assertFalse(answer["more"])

    def test_only_members_may_ask(self) -> None:
        self.room()
        self.presence_refused("dave", "not_a_member", "D", session_id="room")
        self.presence_refused("dave", "no_such_session", "D", session_id="nowhere")

    def test_pages(self) -> None:
        self.room()
        for n in ("bob", "carl"):
            self.online(n)
        first = self.presence("alice", "A", session_id="room", limit=2)
        self.assertEqual((first["online"], first["more"], first["next"]), (["alice", "bob"], True, "bob"))
        rest = self.presence("alice", "A", session_id="room", after="bob")
        self.assertEqual((rest["online"], rest["more"]), (["carl"], False))

    def test_exactly_one_subject(self) -> None:
        self.room()
        self.presence_refused("alice", "bad_frame", "A")
        self.presence_refused("alice", "bad_frame", "A", session_id="room", node_id="bob")
        self.presence_refused("alice", "bad_frame", "A", node_id="bob", subscribe=True)


class NodeAndClientPresence(PresenceTestCase):
    def test_own_client_devices_only(self) -> None:
        self.online("alice", "A")
        self.store.remember_node("alice-phone", "A", 0)
        self.store.remember_node("alice-tablet", "A", 0)
        self.elsewhere.held.add("alice-tablet")
        answer = self.presence("alice", "A", client_id="A")
        self.assertEqual(answer["online"], ["alice", "alice-tablet"])
        self.presence_refused("alice", "not_allowed", "A", client_id="B")
        self.presence_refused("alice", "not_allowed", None, client_id="A")

    def test_who_may_ask_about_a_node(self) -> None:
        self.room()
        self.store.remember_node("alice-phone", "A", 0)
        self.elsewhere.held.update({"bob", "anna", "dave", "alice-phone"})
        self.assertTrue(self.presence("alice", "A", node_id="alice")["online"])  # itself
        self.assertTrue(self.presence("alice", "A", node_id="alice-phone")["online"])  # own client
        self.assertTrue(self.presence("alice", "A", node_id="bob")["online"])  # a known co-member
        self.assertFalse(self.presence("alice", "A", node_id="carl")["online"])
        self.assertTrue(self.presence("bob", None, node_id="alice")["online"])
        # an anonymous co-member, a stranger and a node that never connected: the same refusal
        for node in ("anna", "dave", "nobody"):
            self.presence_refused("alice", "not_allowed", "A", node_id=node)
        self.presence_refused("dave", "not_allowed", "D", node_id="bob")


class PresenceEvents(PresenceTestCase):
    def changes(self, node_id: str) -> list[tuple[str, bool]]:
        return [(f["name"], f["online"]) for f in self.events(node_id, "presence_changed")]

    def test_subscribers_hear_members_come_and_go_anywhere(self) -> None:
        self.room()
        answer = self.presence("alice", "A", session_id="room", subscribe=True)
        self.assertEqual((answer["online"], answer["subscribed"]), (["alice"], True))
        self.online("bob")  # here
        self.elsewhere.held.add("anna")  # on another server
        self.clock.advance(1.0)
        self.assertEqual(sorted(self.changes("alice")), sorted([("bob", True), (self.alias_of("anna"), True)]))
        self.elsewhere.held.discard("anna")  # its server died: its locations went with it
        self.clock.advance(1.0)
        self.assertEqual(self.changes("alice")[-1], (self.alias_of("anna"), False))
        self.assertNotIn("anna", str(self.conns["alice"].frames))

    def test_only_subscribers_get_events_and_unsubscribe_stops_them(self) -> None:
        self.room()
        self.online("bob")
        self.presence("alice", "A", session_id="room", subscribe=True)
        self.online("carl")
        self.clock.advance(1.0)
        self.assertEqual(self.changes("alice"), [("carl", True)])
        self.assertEqual(self.changes("bob"), [])
        self.presence("alice", "A", session_id="room", subscribe=False)
        self.elsewhere.held.add("anna")
        self.clock.advance(5.0)
        self.assertEqual(self.changes("alice"), [("carl", True)])
        self.assertFalse(self.sessions_presence_running())

    def test_subscribing_needs_a_connection_here(self) -> None:
        self.room()
        self.presence_refused("bob", "bad_frame", None, session_id="room", subscribe=True)

    def test_a_subscriber_that_leaves_or_disconnects_is_dropped(self) -> None:
        self.room()
        bob = self.online("bob")
        self.presence("bob", None, session_id="room", subscribe=True)
        self.server.registry.remove(bob)
        self.online("carl")
        self.clock.advance(1.0)
        self.assertEqual(self.changes("bob"), [])
        self.assertFalse(self.sessions_presence_running())

    def sessions_presence_running(self) -> bool:
        loop = self.server.presence._loop
        return loop is not None and loop.running


class HTTPPresence(PresenceTestCase):
    def test_presence_is_an_http_path_too_without_subscribe(self) -> None:
        from allspark.sessions import session_resources

        self.assertIn(b"presence", session_resources(self.server))


class PresenceEventsAfterQueries(PresenceTestCase):
    def test_a_plain_query_between_comparisons_loses_no_event(self) -> None:
        self.room()
        self.presence("alice", "A", session_id="room", subscribe=True)
        self.online("bob")
        self.presence("alice", "A", session_id="room")  # a query is not a comparison
        self.clock.advance(1.0)
        self.assertEqual([(f["name"], f["online"]) for f in self.events("alice", "presence_changed")],
                         [("bob", True)])
