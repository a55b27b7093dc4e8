"""End-to-end: the server API (``/api/v1``, :mod:`allspark.api`) through real
server processes and the bundled client.

One server: publish to an offline node (stored, counted in its inbox depth,
synced on connect, with the app's ``src_id``), a retry with the same id (the
same answer, one stored row), publish to a session the app is not a member
of, revocation (the live connection closed with 4011, pre-connection and a
handshake with a token got before refused with 401 ``revoked``, allowed again
once it ends), drain, bad keys, the API off, bad bodies.  Two meshed servers
on one SQLite file: presence of nodes and clients on both, disconnect of a
node connected to the other server, a revocation refused there too, and a
drain of the other server over its peer link.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from allspark.client import connect
from tests.e2e.helpers import IO_TIMEOUT, HTTPAnswer, health, http_request, pre_connect, raw_handshake, wait_until, \
    ws_path_and_query
from tests.e2e.test_invalidation import client_on, server_id
from tests.support import ServerProcess, client_for, key, start_server

API_KEY = "test-api-key-0123456789abcdef"
OLD_API_KEY = "test-old-api-key-9876543210"


def api(server: ServerProcess, method: str, path: str, body: Any = None, api_key: str | None = API_KEY,
        raw: bytes | None = None, content_type: str = "application/json") -> HTTPAnswer:
    """One request to the server API; any status is returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers: dict[str, str] = {}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    if data is not None:
        headers["Content-Type"] = content_type
    return http_request(server.base_url + path, method, data, headers)


def api_server(testcase: TestCase, *args: str, **kw: Any) -> ServerProcess:
    """A server with the API on (two keys: rotation)."""
    return start_server(testcase, *args, env={"ALLSPARK_API_KEYS": f"{API_KEY},{OLD_API_KEY}"}, **kw)


class OneServer(TestCase):
    timeout = 90

    async def test_publish_to_offline_node_is_stored_counted_and_synced(self) -> None:
        server = api_server(self)
        bob = await client_for(self, server, "bob", "bob-account")
        await bob.close()
        answer = api(server, "POST", "/api/v1/publish",
                     {"dest_id": "bob", "id": "order-1", "payload": {"text": "shipped"}, "type": 7})
        self.assertEqual(answer.status, 200, answer)
        self.assertEqual(answer.json(), {"op": "accepted", "id": "order-1", "status": "stored",
                                         "recipients": 1, "live": 0})
        depth = api(server, "GET", "/api/v1/nodes/bob/inbox").json()
        self.assertEqual((depth["unacked"], depth["last_seq"], depth["acked_upto"]), (1, 1, 0))
        self.assertIsInstance(depth["oldest_stored_ms"], int)

        bob = await client_for(self, server, "bob", "bob-account")  # connect() syncs
        message = await bob.next_message()
        self.assertEqual((message["src_id"], message["dest_id"], message["seq"], message["payload"],
                          message["type"], message["id"]), ("app", "bob", 1, {"text": "shipped"}, 7, "order-1"))
        self.assertNotIn("src_client_id", message)

        def acked() -> bool:
            return api(server, "GET", "/api/v1/nodes/bob/inbox").json()["unacked"] == 0

        await wait_until(acked, 10, what="bob's auto-ack emptying the inbox")
        self.assertEqual(api(server, "GET", "/api/v1/nodes/bob/inbox").json()["acked_upto"], 1)
        self.assertEqual(api(server, "GET", "/api/v1/nodes/nobody/inbox").json()["error"], "unknown_node")

    async def test_retry_with_the_same_id_is_not_a_second_message(self) -> None:
        server = api_server(self, "--api-sender-id=billing", "--api-sender-id=alerts")
        carol = await client_for(self, server, "carol", "carol-account")
        await carol.close()
        body = {"dest_client_id": "carol-account", "id": "invoice-9", "payload": "due", "sender_id": "alerts"}
        first = api(server, "POST", "/api/v1/publish", body)
        again = api(server, "POST", "/api/v1/publish", body, api_key=OLD_API_KEY)  # the other key works too
        self.assertEqual(first.status, 200, first)
        self.assertEqual(first.body, again.body)
        self.assertEqual(api(server, "GET", "/api/v1/nodes/carol/inbox").json()["last_seq"], 1)
        # the same id from the other app node is another message; an id not configured is refused
        other = api(server, "POST", "/api/v1/publish", {**body, "sender_id": "billing"})
        self.assertEqual(other.status, 200, other)
        self.assertEqual(api(server, "GET", "/api/v1/nodes/carol/inbox").json()["last_seq"], 2)
        refused = api(server, "POST", "/api/v1/publish", {**body, "sender_id": "app"})
        self.assertEqual((refused.status, refused.json()["error"]), (403, "sender_not_allowed"))
        carol = await client_for(self, server, "carol", "carol-account")
        senders = [(await carol.next_message())["src_id"] for _ in range(2)]
        self.assertEqual(senders, ["alerts", "billing"])

    async def test_publish_to_a_session_without_being_a_member(self) -> None:
        server = api_server(self)
        alice = await client_for(self, server, "alice")
        bob = await client_for(self, server, "bob")
        await alice.create_session(session_id="room", anyone_can_join=True)
        await bob.join_session("room")
        answer = api(server, "POST", "/api/v1/publish",
                     {"dest_session_id": "room", "id": "news-1", "payload": "welcome"})
        self.assertEqual(answer.status, 200, answer)
        accepted = answer.json()
        self.assertEqual((accepted["recipients"], accepted["live"], accepted["session_seq"]), (2, 2, 1))
        for member in (alice, bob):
            message = await member.next_message()
            self.assertEqual((message["src_id"], message["dest_session_id"], message["session_seq"],
                              message["payload"]), ("app", "room", 1, "welcome"))
        self.assertEqual(api(server, "POST", "/api/v1/publish", {"dest_session_id": "nowhere"}).json()["error"],
                         "unknown_destination")

    async def test_revoked_node_is_closed_refused_and_allowed_again_after(self) -> None:
        server = api_server(self)
        dave = await client_for(self, server, "dave")
        spare = pre_connect(server, {"auth_key": key("dave")}).json()  # a token got before the revocation
        until = int(time.time()) + 4
        answer = api(server, "POST", "/api/v1/nodes/dave/disconnect", {"revoke_until": until, "reason": "abuse"})
        self.assertEqual(answer.status, 200, answer)
        self.assertEqual((answer.json()["closed"], answer.json()["revoked_until"]), (1, until))
        self.assertEqual(await dave.closed, (4011, "revoked: abuse"))
        refused = pre_connect(server, {"auth_key": key("dave")})
        self.assertEqual((refused.status, refused.json()["error"]), (401, "revoked"))
        handshake = raw_handshake(server, ws_path_and_query(spare["node"]["ws_url"]))
        self.assertEqual((handshake.status, handshake.json()["error"]), (401, "revoked"))
        await wait_until(lambda: pre_connect(server, {"auth_key": key("dave")}).status == 200, 15, 0.2,
                         "the revocation ending")
        await client_for(self, server, "dave")
        # a disconnect without revocation closes with 4010 and leaves the keys alone
        erin = await client_for(self, server, "erin")
        answer = api(server, "POST", "/api/v1/nodes/erin/disconnect")
        self.assertEqual((answer.status, answer.json()["revoked_until"]), (200, None))
        self.assertEqual(await erin.closed, (4010, "disconnected"))
        erin = await client_for(self, server, "erin")
        # a long reason is cut to fit a close frame, between characters
        api(server, "POST", "/api/v1/nodes/erin/disconnect", {"reason": "x" + "é" * 150})
        self.assertEqual(await erin.closed, (4010, "disconnected: x" + "é" * 52))

    async def test_drain_this_server(self) -> None:
        server = api_server(self)
        frank = await client_for(self, server, "frank")
        self.assertEqual([s["state"] for s in api(server, "GET", "/api/v1/servers").json()["servers"]], ["live"])
        answer = api(server, "POST", "/api/v1/drain")
        self.assertEqual((answer.status, answer.json()["state"]), (202, "draining"))
        self.assertEqual((await frank.closed)[0], 1001)
        assert server.proc is not None
        self.assertEqual(server.proc.wait(15), 0)

    def test_keys(self) -> None:
        server = api_server(self)
        for api_key, code in ((None, "missing_api_key"), ("wrong-key-0123456789abcdef", "bad_api_key"),
                              ("x" * 600, "bad_api_key"), (key("bob"), "bad_api_key")):
            answer = api(server, "GET", "/api/v1/servers", api_key=api_key)
            self.assertEqual((answer.status, answer.json()["error"]), (401, code), api_key)
            self.assertEqual(answer.headers["www-authenticate"], 'Bearer realm="allspark-api"')
        basic = urllib.request.Request(server.base_url + "/api/v1/servers",
                                       headers={"Authorization": f"Basic {API_KEY}"})
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(basic, timeout=IO_TIMEOUT)
        self.assertEqual(caught.exception.code, 401)
        caught.exception.close()
        self.assertEqual(api(server, "GET", "/api/v1/openapi.json", api_key=None).json()["openapi"], "3.1.0")

    def test_api_off_without_a_key(self) -> None:
        server = start_server(self)
        answer = api(server, "GET", "/api/v1/servers")
        self.assertEqual((answer.status, answer.json()["error"]), (503, "api_disabled"))
        self.assertEqual(api(server, "GET", "/api/v1/openapi.json").status, 200)

    async def test_bad_requests(self) -> None:
        server = api_server(self)
        await client_for(self, server, "bob")
        cases: list[tuple[dict[str, Any], int, str]] = [
            (dict(raw=b"{not json"), 400, "bad_request"),
            (dict(raw=b"[1, 2]"), 400, "bad_request"),
            (dict(raw=b""), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "colour": "red"}), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "dest_client_id": "b"}), 400, "bad_request"),
            (dict(body={"payload": "no destination"}), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "type": "seven"}), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "id": None}), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "id": "x" * 65}), 400, "bad_request"),
            (dict(body={"dest_id": "bad id!"}), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "payload": 2**64}), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "sender_id": ""}), 400, "bad_request"),
            (dict(body={"dest_id": "bob", "payload": "x" * 65_400}), 413, "too_large"),
            (dict(raw=b"{" + b" " * 70_000 + b"}"), 413, "too_large"),
            (dict(body={"dest_id": "bob"}, content_type="text/plain"), 415, "unsupported_media_type"),
            (dict(body={"dest_id": "ghost"}), 404, "unknown_destination"),
        ]
        for request, status, code in cases:
            answer = api(server, "POST", "/api/v1/publish", **request)
            self.assertEqual((answer.status, answer.json().get("error")), (status, code), (request, answer))
        for path, body in (("/api/v1/nodes/bob/disconnect", {"revoke_until": "tomorrow"}),
                           ("/api/v1/nodes/bob/disconnect", {"revoke_until": -1}),
                           ("/api/v1/nodes/bob/disconnect", {"reason": "x" * 201}),
                           ("/api/v1/nodes/bob/disconnect", {"kick": True}),
                           ("/api/v1/nodes/bad%20id/disconnect", {})):
            answer = api(server, "POST", path, body)
            self.assertEqual((answer.status, answer.json()["error"]), (400, "bad_request"), (path, body))
        for path in ("/api/v1/presence?node_id=bad%20id", "/api/v1/presence?colour=red",
                     "/api/v1/presence?" + "&".join(f"node_id=n{i}" for i in range(101)),
                     "/api/v1/nodes/bad%20id/inbox"):
            answer = api(server, "GET", path)
            self.assertEqual((answer.status, answer.json()["error"]), (400, "bad_request"), path)
        wrong = api(server, "DELETE", "/api/v1/publish")
        self.assertEqual((wrong.status, wrong.json()["error"], wrong.headers["allow"]),
                         (405, "method_not_allowed", "POST"))
        self.assertEqual(api(server, "GET", "/api/v1/nowhere").json()["error"], "not_found")
        self.assertEqual(api(server, "POST", "/api/v1/servers/nope/drain").json()["error"], "unknown_server")
        self.assertNotIn("Traceback", server.log())


class TwoServers(TestCase):
    timeout = 120

    def setUp(self) -> None:
        shared = tempfile.mkdtemp(prefix="allspark-api-")
        self.addCleanup(shutil.rmtree, shared, True)
        store = f"--store=sqlite://{shared}/allspark.db"
        env = {"ALLSPARK_API_KEYS": API_KEY}
        self.a = ServerProcess(args=(store,), env=env)
        self.b = ServerProcess(args=(store,), env=env)
        for server in (self.a, self.b):
            self.addCleanup(shutil.rmtree, server.data_dir, True)
            self.addCleanup(server.stop)
            server.start()

    async def linked(self) -> None:
        await wait_until(lambda: all(len(health(s).get("peers", {})) == 1 for s in (self.a, self.b)), 30, 0.1,
                         "the two servers linked")

    async def test_presence_disconnect_revocation_and_drain_across_servers(self) -> None:
        a, b = self.a, self.b
        await self.linked()
        await client_on(self, a, "alice", client_id="A")
        bob = await client_on(self, b, "bob", client_id="B")
        await client_on(self, b, "bob-tablet", client_id="B")

        def seen_from_a() -> dict[str, Any]:
            return api(a, "GET", "/api/v1/presence?node_id=alice&node_id=bob&node_id=carl&client_id=B&client_id=Z"
                       ).json()

        await wait_until(lambda: seen_from_a()["nodes"]["bob"], 10, what="bob seen online from a")
        self.assertEqual(seen_from_a(), {"nodes": {"alice": True, "bob": True, "carl": False},
                                         "clients": {"B": ["bob", "bob-tablet"], "Z": []}})

        # a message published on a reaches bob live on b
        answer = api(a, "POST", "/api/v1/publish", {"dest_id": "bob", "id": "p1", "payload": "hi"})
        self.assertEqual(answer.json()["status"], "delivered", answer)
        self.assertEqual((await bob.next_message())["payload"], "hi")

        until = int(time.time()) + 60
        answer = api(a, "POST", "/api/v1/nodes/bob/disconnect", {"reason": "banned", "revoke_until": until}).json()
        self.assertEqual((answer["closed"], answer["servers_told"], answer["unreachable"]), (0, [server_id(b)], []))
        self.assertEqual(await bob.closed, (4011, "revoked: banned"))
        refused = pre_connect(b, {"auth_key": key("bob", "B")})
        self.assertEqual((refused.status, refused.json()["error"]), (401, "revoked"))
        await wait_until(lambda: not seen_from_a()["nodes"]["bob"], 10, what="bob offline")
        lifted = api(a, "POST", "/api/v1/nodes/bob/disconnect", {"revoke_until": 0})
        self.assertEqual(lifted.json()["revoked_until"], 0)
        # b hears it over the peer link (a frame in flight), at the latest when its cache expires
        await wait_until(lambda: pre_connect(b, {"auth_key": key("bob", "B")}).status == 200, 10, 0.1,
                         "the lifted revocation reaching b")

        # a drains b over the peer link; b's clients are told to reconnect to a
        tablet_closed = (await client_on(self, b, "bob-tablet-2", client_id="B")).closed
        answer = api(a, "POST", f"/api/v1/servers/{server_id(b)}/drain")
        self.assertEqual((answer.status, answer.json()), (202, {"server_id": server_id(b), "state": "draining"}))
        self.assertEqual((await tablet_closed)[0], 1001)
        assert b.proc is not None
        self.assertEqual(b.proc.wait(15), 0)
        await wait_until(lambda: api(a, "POST", f"/api/v1/servers/{server_id(b)}/drain").status == 404, 20, 0.2,
                         "b gone from the cluster view")
        servers = api(a, "GET", "/api/v1/servers").json()["servers"]
        self.assertEqual([s["server_id"] for s in servers], [server_id(a)])
        client = await connect(a.base_url, key("bob", "B"), reactor)
        self.addCleanup(client.drop)
