"""Sessions against a real ``twistd -n allspark`` process.

Every rule of the contract's "Sessions" section, with its refusals: the HTTP
requests (query string, form and JSON bodies; 400/401/403/404/409), the same
operations as control frames, member events, broadcasts through the session
stream (``session_seq``, sync, ack), private messages by alias, game
sessions, the anonymity guarantee over a whole scenario, and a
10,000-member broadcast whose time is printed (not asserted).
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from allspark.client import AllsparkError, Client
from allspark.logs import logger
from tests.support import ServerProcess, client_for, key, sleep, start_server

log = logger(__name__)


async def http(server: ServerProcess, path: str, style: str = "get", **args: Any) -> tuple[int, Any]:
    """Call ``/path`` with ``args`` as a query string (``get``), a form body
    (``form``) or a JSON body (``json``); ``(status, parsed JSON body)``."""
    url = f"{server.base_url}/{path}"
    if style == "get":
        response = await treq.get(f"{url}?{urlencode(args)}", persistent=False)
    elif style == "form":
        response = await treq.post(url, data={k: str(v) for k, v in args.items()}, persistent=False)
    else:
        response = await treq.post(url, json=args, persistent=False)
    body = await response.content()
    return response.code, json.loads(body)


def record(client: Client) -> list[dict[str, Any]]:
    """Every frame ``client`` receives from now on, as parsed JSON."""
    frames: list[dict[str, Any]] = []
    original = client._frame

    def spy(frame: dict[str, Any]) -> None:
        frames.append(frame)
        original(frame)

    client._frame = spy  # type: ignore[method-assign]
    return frames


def drain(client: Client) -> list[dict[str, Any]]:
    got = list(client.messages.pending)
    client.messages.pending.clear()
    return got


async def events_until(client: Client, op: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next event named ``op`` (earlier other events are dropped)."""
    while True:
        event = await client.next_event(timeout)
        if event.get("op") == op:
            return event


class HTTPTests(unittest.TestCase):
    """The seed's HTTP requests and their status codes."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_create_join_info_unjoin_over_http(self) -> None:
        status, created = await http(self.server, "create_session", auth_key=key("alice", "A"),
                                     anyone_can_join="true")
        self.assertEqual(status, 200)
        session_id = created["session_id"]
        self.assertEqual(created["owner"], "alice")
        self.assertTrue(created["anyone_can_join"])
        status, joined = await http(self.server, "join_session", "form", auth_key=key("bob", "B"),
                                    session_id=session_id)
        self.assertEqual((status, joined["node_id"], joined["client_id"]), (200, "bob", "B"))
        status, joined = await http(self.server, "join_session", "json", auth_key=key("carol"),
                                    session_id=session_id, anonymous=True)
        self.assertEqual(status, 200)
        self.assertTrue(joined["anonymous"])
        self.assertTrue(joined["alias"].startswith("anon-"))
        status, info = await http(self.server, "get_session_info", auth_key=key("bob", "B"),
                                  session_id=session_id)
        self.assertEqual(status, 200)
        # members are listed by name (a page of them: see tests/e2e/test_bounds.py)
        self.assertEqual([m["name"] for m in info["members"]], sorted(["alice", "bob", joined["alias"]]))
        self.assertFalse(info["more"])
        self.assertNotIn("carol", json.dumps(info))
        status, left = await http(self.server, "unjoin_session", "json", auth_key=key("bob", "B"),
                                  session_id=session_id)
        self.assertEqual((status, left["member"]["name"]), (200, "bob"))
        status, _ = await http(self.server, "get_session_info", auth_key=key("bob"), session_id=session_id)
        self.assertEqual(status, 403)

    async def test_refusals_have_proper_statuses(self) -> None:
        status, body = await http(self.server, "create_session")
        self.assertEqual(status, 401)
        status, body = await http(self.server, "create_session", auth_key="forged.key.value")
        self.assertEqual(status, 401)
        _, created = await http(self.server, "create_session", auth_key=key("alice"), session_id="closed")
        status, body = await http(self.server, "create_session", auth_key=key("bob"), session_id="closed")
        self.assertEqual((status, body["error"]), (409, "session_exists"))
        status, body = await http(self.server, "join_session", auth_key=key("bob"))
        self.assertEqual((status, body["error"]), (400, "bad_frame"))
        status, body = await http(self.server, "join_session", auth_key=key("bob"), session_id="bad id!")
        self.assertEqual(status, 400)
        status, body = await http(self.server, "create_session", auth_key=key("bob"), anonymous="perhaps")
        self.assertEqual(status, 400)
        status, body = await http(self.server, "join_session", auth_key=key("bob"), session_id="closed")
        self.assertEqual((status, body["error"]), (403, "not_allowed"))
        status, body = await http(self.server, "join_session", auth_key=key("bob"), session_id="closed",
                                  node_id="carol")
        self.assertEqual((status, body["error"]), (403, "not_allowed"))
        status, body = await http(self.server, "get_session_info", auth_key=key("bob"), session_id="closed")
        self.assertEqual((status, body["error"]), (403, "not_a_member"))
        status, body = await http(self.server, "join_session", auth_key=key("bob"), session_id="nope")
        self.assertEqual((status, body["error"]), (404, "no_such_session"))
        status, body = await http(self.server, "get_session_info", auth_key=key("bob"), session_id="nope")
        self.assertEqual(status, 404)
        status, body = await http(self.server, "unjoin_session", auth_key=key("alice"), session_id="closed",
                                  node_id="nobody")
        self.assertEqual((status, body["error"]), (404, "no_such_member"))
        # the owner adds bob; bob may not remove the owner
        status, _ = await http(self.server, "join_session", auth_key=key("alice"), session_id="closed",
                               node_id="bob")
        self.assertEqual(status, 200)
        status, body = await http(self.server, "unjoin_session", auth_key=key("bob"), session_id="closed",
                                  node_id="alice")
        self.assertEqual((status, body["error"]), (403, "not_allowed"))
        status, body = await http(self.server, "set_master", auth_key=key("alice"), session_id="closed",
                                  node_id="bob")
        self.assertEqual((status, body["error"]), (400, "not_a_game"))


class ControlFrameTests(unittest.TestCase):
    """The same operations on the socket, with events and the stream."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_join_rules_and_events(self) -> None:
        alice = await client_for(self, self.server, "alice", "A")
        bob = await client_for(self, self.server, "bob", "B")
        carol = await client_for(self, self.server, "carol", "C")
        created = await alice.create_session(session_id="club")
        self.assertEqual(created["op"], "session")
        with self.assertRaises(AllsparkError) as refused:
            await bob.join_session("club")
        self.assertEqual(refused.exception.code, "not_allowed")
        with self.assertRaises(AllsparkError) as refused:
            await bob.join_session("club", node_id="carol")
        self.assertEqual(refused.exception.code, "not_allowed")
        added = await alice.join_session("club", node_id="bob")
        self.assertEqual(added["op"], "member")
        event = await events_until(bob, "member_joined")
        self.assertTrue(event["you"])
        self.assertEqual(event["member"]["node_id"], "bob")
        # bob's client starts its cursor where it was added, so it acks what it gets
        accepted = await alice.send(dest_session_id="club", payload="welcome")
        self.assertEqual((await bob.next_message())["session_seq"], accepted["session_seq"])
        await sleep(0.2)
        (mine,) = await bob.my_sessions()
        self.assertEqual(mine["acked_seq"], accepted["session_seq"])
        await alice.join_session("club", node_id="carol")
        joined = await events_until(bob, "member_joined")
        self.assertEqual(joined["member"]["name"], "carol")
        with self.assertRaises(AllsparkError) as refused:
            await bob.unjoin_session("club", node_id="carol")
        self.assertEqual(refused.exception.code, "not_allowed")
        left = await alice.unjoin_session("club", node_id="carol")
        self.assertEqual(left["op"], "left")
        self.assertEqual((await events_until(carol, "member_left"))["member"]["name"], "carol")
        self.assertEqual((await events_until(bob, "member_left"))["member"]["name"], "carol")
        with self.assertRaises(AllsparkError) as refused:
            await carol.session_info("club")
        self.assertEqual(refused.exception.code, "not_a_member")
        with self.assertRaises(AllsparkError) as refused:
            await carol.send(dest_session_id="club", payload="let me in")
        self.assertEqual(refused.exception.code, "not_a_member")
        with self.assertRaises(AllsparkError) as refused:
            await carol.send(dest_session_id="nowhere", payload="?")
        self.assertEqual(refused.exception.code, "unknown_destination")
        await bob.unjoin_session("club")
        self.assertEqual((await events_until(alice, "member_left"))["member"]["name"], "bob")

    async def test_broadcast_stream_sync_and_ack(self) -> None:
        alice = await client_for(self, self.server, "alice", "A")
        bob = await client_for(self, self.server, "bob", "B")
        await alice.create_session(session_id="room", anyone_can_join=True)
        await bob.join_session("room")
        await alice.join_session("room", node_id="dave")  # never connected yet: offline member
        accepted = await alice.send(dest_session_id="room", payload={"n": 1})
        self.assertEqual((accepted["status"], accepted["recipients"], accepted["live"]), ("stored", 2, 1))
        got = await bob.next_message()
        self.assertEqual((got["session_seq"], got["src_id"], got["src_client_id"], got["dest_session_id"]),
                         (accepted["session_seq"], "alice", "A", "room"))
        self.assertNotIn("seq", got)
        for n in (2, 3):
            await alice.send(dest_session_id="room", payload={"n": n})
        # dave connects: the client syncs every session it belongs to
        dave = await client_for(self, self.server, "dave", "D")
        self.assertEqual([m["payload"]["n"] for m in drain(dave)], [1, 2, 3])
        await dave.ping()
        await sleep(0.2)  # the batched automatic ack goes out
        await dave.close()
        sessions = await bob.my_sessions()
        self.assertEqual([s["session_id"] for s in sessions], ["room"])
        dave = await client_for(self, self.server, "dave", "D")
        self.assertEqual(drain(dave), [])  # acked: nothing comes again
        (mine,) = await dave.my_sessions()
        self.assertEqual((mine["acked_seq"], mine["last_seq"]), (3, 3))
        # explicit sync with after
        synced = await dave.request({"op": "sync", "session_id": "room", "after": 1})
        self.assertEqual((synced["upto"], synced["more"], synced["session_id"]), (3, False, "room"))
        # a member that joins later never reads older rows
        erin = await client_for(self, self.server, "erin")
        await erin.join_session("room")
        self.assertEqual(await erin.sync("room"), 0)

    async def test_private_message_by_alias_and_by_node_id(self) -> None:
        alice = await client_for(self, self.server, "alice", "A")
        bob = await client_for(self, self.server, "bob", "B")
        mallory = await client_for(self, self.server, "mallory", "M")
        await alice.create_session(session_id="room", anyone_can_join=True)
        await bob.join_session("room")
        me = await mallory.join_session("room", anonymous=True)
        await alice.send(dest_session_id="room", dest_id=me["alias"], payload="for you")
        got = await mallory.next_message()
        # a copy is addressed to the node it is for (only that node sees it)
        self.assertEqual((got["payload"], got["dest_session_id"], got["dest_id"]),
                         ("for you", "room", "mallory"))
        self.assertIn("seq", got)
        self.assertNotIn("session_seq", got)
        await mallory.send(dest_session_id="room", dest_id="bob", payload="psst")
        got = await bob.next_message()
        self.assertEqual((got["src_id"], got["payload"]), (me["alias"], "psst"))
        self.assertNotIn("src_client_id", got)
        self.assertEqual(drain(alice), [])  # private: nobody else got it
        with self.assertRaises(AllsparkError) as refused:
            await alice.send(dest_session_id="room", dest_id="mallory", payload="probe")
        self.assertEqual(refused.exception.code, "unknown_destination")

    async def test_game_session(self) -> None:
        gm = await client_for(self, self.server, "gm")
        p1 = await client_for(self, self.server, "p1")
        p2 = await client_for(self, self.server, "p2")
        created = await gm.create_session(session_id="game", session_type="game", anyone_can_join=True)
        self.assertEqual(created["master"], "gm")
        await p1.join_session("game")
        await p2.join_session("game")
        accepted = await p1.send(dest_session_id="game", payload="move e4")
        self.assertEqual(accepted["recipients"], 1)
        got = await gm.next_message()
        self.assertEqual((got["src_id"], got["payload"]), ("p1", "move e4"))
        with self.assertRaises(AllsparkError) as refused:
            await p1.send(dest_session_id="game", dest_id="p2", payload="collusion")
        self.assertEqual(refused.exception.code, "not_allowed")
        await gm.send(dest_session_id="game", payload="board")
        self.assertEqual((await p1.next_message())["payload"], "board")
        self.assertEqual((await p2.next_message())["payload"], "board")
        self.assertEqual(drain(p2), [])
        with self.assertRaises(AllsparkError) as refused:
            await p1.set_master("game", node_id="p1")
        self.assertEqual(refused.exception.code, "not_allowed")
        answer = await gm.set_master("game", node_id="p2")
        self.assertEqual(answer["master"], "p2")
        self.assertEqual((await events_until(p1, "master_changed"))["master"], "p2")
        await p1.send(dest_session_id="game", payload="to the new master")
        self.assertEqual((await p2.next_message())["payload"], "to the new master")
        await p2.send(dest_session_id="game", payload="new board")
        self.assertEqual((await p1.next_message())["payload"], "new board")
        self.assertEqual((await gm.next_message())["payload"], "new board")


class AnonymityTests(unittest.TestCase):
    """Nothing another member receives names an anonymous member's node_id
    or client_id, over a whole scenario, until it reveals itself."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_anonymous_member_is_only_its_alias_until_it_reveals(self) -> None:
        secret_node, secret_client = "mallory-node-7f3a", "mallory-user-91c2"
        alice = await client_for(self, self.server, "alice", "A")
        bob = await client_for(self, self.server, "bob", "B")
        seen_by_others: list[Any] = [record(alice), record(bob)]
        http_answers: list[Any] = []
        seen_by_others.append(http_answers)

        async def as_other(node: str, path: str, **args: Any) -> dict[str, Any]:
            status, body = await http(self.server, path, auth_key=key(node, node.upper()[0]), **args)
            http_answers.append(body)
            return body

        created = await alice.create_session(session_id="masq", anyone_can_join=True)
        http_answers.append(created)
        http_answers.append(await bob.join_session("masq"))
        mallory = await client_for(self, self.server, secret_node, secret_client)
        status, me = await http(self.server, "join_session", "json", auth_key=key(secret_node, secret_client),
                                session_id="masq", anonymous=True)
        self.assertEqual(status, 200)
        alias = me["alias"]
        self.assertEqual(me["node_id"], secret_node)  # its own view, to itself only
        # messages: broadcast, private to alice, private reply by alias, bob's broadcast
        await mallory.send(dest_session_id="masq", payload="hello all", type=3)
        await mallory.send(dest_session_id="masq", dest_id="alice", payload="hi alice")
        await alice.next_message()
        got = await alice.next_message()
        await alice.send(dest_session_id="masq", dest_id=got["src_id"], payload="hi stranger")
        self.assertEqual((await mallory.next_message())["payload"], "hi stranger")
        await bob.send(dest_session_id="masq", payload="bob here")
        # info, over the socket and over HTTP
        http_answers.append(await alice.session_info("masq"))
        await as_other("bob", "get_session_info", session_id="masq")
        await as_other("alice", "get_session_info", session_id="masq")
        # the owner removes mallory by alias; mallory joins again (a new alias), then leaves itself
        http_answers.append(await alice.unjoin_session("masq", alias=alias))
        again = await mallory.join_session("masq", anonymous=True)
        await mallory.send(dest_session_id="masq", payload="back")
        await mallory.unjoin_session("masq")
        await mallory.join_session("masq", anonymous=True)
        await as_other("bob", "get_session_info", session_id="masq")
        await alice.ping()
        await bob.ping()
        await sleep(0.2)

        everything = json.dumps(seen_by_others)
        self.assertIn(alias, everything)
        self.assertIn(again["alias"], everything)
        self.assertNotIn(secret_node, everything)
        self.assertNotIn(secret_client, everything)
        self.assertIn("hello all", everything)

        # the reveal: from now on others see who it is
        revealed = await mallory.reveal_anonymity("masq")
        self.assertEqual(revealed["op"], "revealed")
        event = await events_until(bob, "member_revealed")
        self.assertEqual(event["member"]["node_id"], secret_node)
        self.assertEqual(event["member"]["client_id"], secret_client)
        await mallory.send(dest_session_id="masq", payload="it was me")
        while True:
            message = await bob.next_message()
            if message["payload"] == "it was me":
                break
        self.assertEqual((message["src_id"], message["src_client_id"]), (secret_node, secret_client))


class LargeSessionTests(unittest.TestCase):
    """A 10,000-member session: one stream row per broadcast; the server
    keeps serving other clients while it goes out."""

    timeout = 300

    def setUp(self) -> None:
        # the owner sends 10,000 join frames in a burst: above the default rate limit
        self.server = start_server(self, "--max-rate=100000", "--max-burst=100000")

    async def test_ten_thousand_member_broadcast(self) -> None:
        members, online_count = 10_000, 300
        owner = await client_for(self, self.server, "owner")
        await owner.create_session(session_id="stadium")
        started = time.monotonic()
        batch = 500
        for start in range(0, members, batch):
            await gatherResults([
                owner.request({"op": "join_session", "session_id": "stadium", "node_id": f"fan-{i}"})
                for i in range(start, min(start + batch, members))
            ])
        add_time = time.monotonic() - started
        online: list[Client] = []
        for start in range(0, online_count, 50):
            online.extend(await gatherResults([
                Deferred.fromCoroutine(client_for(self, self.server, f"fan-{i}"))
                for i in range(start, min(start + 50, online_count))
            ]))
        bystander = await client_for(self, self.server, "bystander")

        started = time.monotonic()
        accepted = owner.send(dest_session_id="stadium", payload={"goal": True})
        pings = [bystander.ping() for _ in range(5)]
        answer = await accepted
        accept_time = time.monotonic() - started
        got = await gatherResults([c.next_message(30) for c in online])
        broadcast_time = time.monotonic() - started
        await gatherResults(pings)
        ping_time = time.monotonic() - started
        self.assertEqual((answer["recipients"], answer["live"]), (members, online_count))
        self.assertEqual({m["session_seq"] for m in got}, {answer["session_seq"]})

        # an offline member gets it on connect (sync), from the one stream row
        started = time.monotonic()
        late = await client_for(self, self.server, "fan-9999")
        sync_time = time.monotonic() - started
        self.assertEqual([m["payload"] for m in drain(late)], [{"goal": True}])
        report = (f"10,000-member session: adding members {add_time:.2f}s; broadcast accepted in "
                  f"{accept_time * 1000:.1f}ms, all {online_count} online members had it in "
                  f"{broadcast_time * 1000:.1f}ms, a bystander's pings answered within "
                  f"{ping_time * 1000:.1f}ms; an offline member connected and synced it in "
                  f"{sync_time * 1000:.1f}ms")
        print("\n" + report)
        log.info(report)
