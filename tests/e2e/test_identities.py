"""Identities and parsing against a real ``twistd -n allspark`` process (issue 8,
items 7 to 10): an owner cannot unmask anonymous members, hostile auth keys are
401s with a code, a validation token cannot be replayed after a restart, and
integers beyond 64 bits are refused instead of arriving as floats.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from allspark.auth import ValidationTokens, derive_token_key
from allspark.client import AllsparkError, Client
from tests.e2e.helpers import http_get, pre_connect, raw_handshake, ws_path_and_query
from tests.e2e.test_sessions import http, record
from tests.support import CLUSTER_SECRET, SECRET, ServerProcess, client_for, key, sleep, start_server


class OwnerCannotUnmaskTests(unittest.TestCase):
    """No answer, event or message the owner of a session gets maps an
    anonymous member's node_id to its alias, over the socket or HTTP; adding
    a node tells the owner nothing about the node it would not show anyway."""

    timeout = 90

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_everything_the_owner_sees_keeps_anonymous_members_unlinked(self) -> None:
        victim_node, victim_client = "victim-node-5e1d", "victim-user-77aa"
        owner = await client_for(self, self.server, "owner", "O")
        owner_frames = record(owner)
        owner_http: list[Any] = []

        async def owner_over_http(path: str, **args: Any) -> tuple[int, Any]:
            status, body = await http(self.server, path, auth_key=key("owner", "O"), **args)
            owner_http.append(body)
            return status, body

        await owner.create_session(session_id="masked", anonymous=True, anyone_can_join=True,
                                   session_type="game")
        victim = await client_for(self, self.server, victim_node, victim_client)
        bystander = await client_for(self, self.server, "bystander", "B")
        alias = (await victim.join_session("masked"))["alias"]
        await bystander.join_session("masked")

        # the owner names the anonymous member by node_id in every op that takes one
        added_again = await owner.join_session("masked", node_id=victim_node)
        self.assertNotIn(alias, json.dumps(added_again))
        for op in (owner.set_master, owner.unjoin_session):
            with self.assertRaises(AllsparkError) as refused:
                await op("masked", node_id=victim_node)
            self.assertEqual(refused.exception.code, "no_such_member")
        status, _ = await owner_over_http("join_session", session_id="masked", node_id=victim_node)
        self.assertEqual(status, 200)
        for path in ("set_master", "unjoin_session"):
            status, body = await owner_over_http(path, session_id="masked", node_id=victim_node)
            self.assertEqual((status, body["error"]), (404, "no_such_member"))
        # ... and the same refusal for a node that is no member at all: nothing to tell them apart
        with self.assertRaises(AllsparkError) as refused:
            await owner.set_master("masked", node_id="nobody-at-all")
        self.assertEqual(refused.exception.code, "no_such_member")

        # the victim still talks to the master (the owner) and is still there
        await victim.send(dest_session_id="masked", payload="psst")
        message = await owner.next_message()
        self.assertEqual((message["src_id"], message.get("src_client_id")), (alias, None))
        info = await owner.session_info("masked")
        self.assertIn(alias, [m["name"] for m in info["members"]])
        owner_http.append((await owner_over_http("get_session_info", session_id="masked"))[1])
        await owner.my_sessions()
        # by alias the owner may do what it likes: names it knows, nothing new
        self.assertEqual((await owner.set_master("masked", alias=alias))["master"], alias)
        await owner.ping()
        await sleep(0.2)  # events the owner would get arrive before the pong above; a margin for stragglers

        seen = owner_frames + owner_http
        for answer in seen:
            text = json.dumps(answer)
            self.assertFalse(victim_node in text and alias in text, f"node_id and alias in one answer: {text}")
            self.assertNotIn(victim_client, text)
        self.assertIn(alias, json.dumps(seen))

    async def test_adding_a_node_does_not_tell_whether_it_exists(self) -> None:
        """The answer for a node that has connected (with a client_id) and
        for one never seen differ in nothing but the node_id and the fresh
        alias; an anonymous addition answers no alias at all."""
        owner = await client_for(self, self.server, "owner", "O")
        known = await client_for(self, self.server, "known-node", "known-user-3c3c")
        await known.ping()
        await owner.create_session(session_id="roster")
        answers = [await owner.join_session("roster", node_id="known-node"),
                   await owner.join_session("roster", node_id="ghost-node")]
        http_status, http_answer = await http(self.server, "join_session", auth_key=key("owner", "O"),
                                              session_id="roster", node_id="other-ghost")
        self.assertEqual(http_status, 200)
        shapes = [{k: v for k, v in a.items() if k not in ("node_id", "name", "alias", "id", "op")}
                  for a in answers + [http_answer]]
        self.assertEqual(shapes[0], shapes[1])
        self.assertEqual(shapes[0], shapes[2])
        self.assertNotIn("known-user-3c3c", json.dumps(answers))
        info = await owner.session_info("roster")
        self.assertNotIn("known-user-3c3c", json.dumps(info))
        hidden = await owner.join_session("roster", node_id="shy-node", anonymous=True)
        self.assertEqual(hidden, {"op": "member", "id": hidden["id"], "session_id": "roster",
                                  "node_id": "shy-node", "anonymous": True})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_key(header: bytes, claims: bytes, secret: str = SECRET) -> str:
    """An auth key with these raw header and claims bytes, signed with the
    server's secret (or ``secret``)."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    return f"{signing_input}.{b64(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())}"


def hostile_keys() -> dict[str, tuple[str, str]]:
    """name -> (auth key, the error code it must get)."""
    exp = int(time.time()) + 3600
    good = json.dumps({"sub": "mallory", "exp": exp}).encode()
    alg = b'{"alg":"HS256"}'
    return {
        "crit": (signed_key(b'{"alg":"HS256","crit":["exp"]}', good), "malformed_key"),
        "crit, forged": (signed_key(b'{"alg":"HS256","crit":["x"]}', good, "not-the-secret-0123456789abcdef"),
                         "malformed_key"),
        "kid int": (signed_key(b'{"alg":"HS256","kid":7}', good), "malformed_key"),
        "kid list": (signed_key(b'{"alg":"HS256","kid":["a"]}', good), "malformed_key"),
        "b64 false": (signed_key(b'{"alg":"HS256","b64":false}', good), "malformed_key"),
        "header list": (signed_key(b"[1]", good), "malformed_key"),
        "header not utf-8": (signed_key(b'{"alg":"HS256","x":"\xff\xfe"}', good), "malformed_key"),
        "header nested": (signed_key(b'{"alg":"HS256","x":' + b"[" * 1500 + b"]" * 1500 + b"}", good),
                          "malformed_key"),
        "alg none": (signed_key(b'{"alg":"none"}', good), "bad_signature"),
        "alg list": (signed_key(b'{"alg":["HS256"]}', good), "bad_signature"),
        "claims not utf-8": (signed_key(alg, b'{"sub":"\xff","exp":%d}' % exp), "malformed_key"),
        "claims list": (signed_key(alg, b"[1]"), "malformed_key"),
        "exp string": (signed_key(alg, b'{"sub":"m","exp":"%d"}' % exp), "bad_claims"),
        "exp bool": (signed_key(alg, b'{"sub":"m","exp":true}'), "bad_claims"),
        "exp infinity": (signed_key(alg, b'{"sub":"m","exp":Infinity}'), "bad_claims"),
        "exp nan": (signed_key(alg, b'{"sub":"m","exp":NaN}'), "bad_claims"),
        "exp 1e400": (signed_key(alg, b'{"sub":"m","exp":1e400}'), "bad_claims"),
        "exp 400 digits": (signed_key(alg, b'{"sub":"m","exp":' + b"9" * 400 + b"}"), "bad_claims"),
        "nbf 400 digits": (signed_key(alg, b'{"sub":"m","exp":%d,"nbf":%s}' % (exp, b"9" * 400)), "bad_claims"),
        "sub int": (signed_key(alg, b'{"sub":5,"exp":%d}' % exp), "bad_claims"),
        "sub object": (signed_key(alg, b'{"sub":{"a":[]},"exp":%d}' % exp), "bad_claims"),
        "client_id list": (signed_key(alg, b'{"sub":"m","client_id":["c"],"exp":%d}' % exp), "bad_claims"),
        # over the 8192-character cap (a request line over 16 KB is dropped by twisted.web itself)
        "huge": ("a" * 4000 + "." + "b" * 4000 + "." + "c" * 400, "malformed_key"),
    }


class HostileAuthKeyTests(unittest.TestCase):
    """Every malformed auth key gets a 401 with its code, on every door
    (pre-connection, the socket's handshake, the session endpoints), and
    no traceback in the log."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    def test_every_hostile_key_is_a_401_with_a_code(self) -> None:
        good_token = pre_connect(self.server, {"auth_key": key("mallory")}).json()["validation_token"]
        for name, (auth_key, code) in hostile_keys().items():
            answer = pre_connect(self.server, {"auth_key": auth_key}, "/v1/pre_connection_info")
            self.assertEqual((answer.status, answer.json()["error"]), (401, code), name)
            answer = http_get(f"{self.server.base_url}/get_session_info?"
                              + urlencode({"auth_key": auth_key, "session_id": "s"}))
            self.assertEqual((answer.status, answer.json()["error"]), (401, code), name)
            answer = raw_handshake(self.server, "/ws?" + urlencode({"auth_key": auth_key,
                                                                    "validation_token": good_token}))
            self.assertEqual((answer.status, answer.json()["error"]), (401, code), name)
        log = self.server.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
        # the token was never burnt by the refused handshakes
        path = "/ws?" + urlencode({"auth_key": key("mallory"), "validation_token": good_token})
        self.assertEqual(raw_handshake(self.server, path).status, 101)

    async def test_hostile_keys_in_json_bodies(self) -> None:
        """Over POST the key may be any JSON value and up to the body cap long."""
        for auth_key, code in ((["a.b.c"], "malformed_key"), ({"alg": "none"}, "malformed_key"), (7, "malformed_key"),
                               (True, "malformed_key"), ("x." * 30_000 + "y", "malformed_key"),
                               (hostile_keys()["crit"][0], "malformed_key")):
            status, body = await http(self.server, "get_session_info", "json", auth_key=auth_key, session_id="s")
            self.assertEqual((status, body["error"]), (401, code), auth_key)
        self.assertNotIn("Traceback", self.server.log())


class TokenReplayAfterRestartTests(unittest.TestCase):
    """A validation token redeemed before a restart (clean or after a crash
    with --force) is refused after it, while it has not expired yet."""

    timeout = 90

    def redeem_then_restart(self, crash: bool) -> tuple[ServerProcess, str]:
        first = start_server(self)
        info = pre_connect(first, {"auth_key": key("alice")}).json()
        path = ws_path_and_query(info["node"]["ws_url"])
        self.assertEqual(raw_handshake(first, path).status, 101)
        if crash:
            first.kill()
        else:
            first.terminate()
        again = ServerProcess(data_dir=first.data_dir, port=first.port)
        self.addCleanup(again.stop)
        again.start(force=crash)
        return again, path

    def assert_replay_refused(self, server: ServerProcess, path: str) -> None:
        replay = raw_handshake(server, path)
        self.assertEqual(replay.status, 401)
        self.assertEqual(replay.json()["error"], "expired_token")
        self.assertIn("before this server started", replay.json()["message"])
        # a new token works at once
        info = pre_connect(server, {"auth_key": key("alice")}).json()
        self.assertEqual(raw_handshake(server, ws_path_and_query(info["node"]["ws_url"])).status, 101)

    def test_replay_after_a_clean_restart_is_refused(self) -> None:
        self.assert_replay_refused(*self.redeem_then_restart(crash=False))

    def test_replay_after_a_crash_and_force_is_refused(self) -> None:
        self.assert_replay_refused(*self.redeem_then_restart(crash=True))

    async def test_tokens_another_server_minted_count_from_start(self) -> None:
        """Another server of the cluster (here: the test process, with the
        cluster secret) mints tokens for this one: one issued before this
        server started is refused, one issued after it is accepted once."""
        server = start_server(self)
        server_id = f"127.0.0.1:{server.port}"
        token_key = derive_token_key(CLUSTER_SECRET.encode())

        class At:
            def __init__(self, when: float) -> None:
                self.when = when

            def seconds(self) -> float:
                return self.when

        before_start = ValidationTokens(token_key, "peer-server", At(time.time() - 30))
        old, _ = before_start.issue("alice", server_id)
        query = {"auth_key": key("alice"), "validation_token": old}
        answer = raw_handshake(server, "/ws?" + urlencode(query))
        self.assertEqual((answer.status, answer.json()["error"]), (401, "expired_token"))
        await sleep(1.0)  # the server has been up over 1 s: a token issued 4.5 s ahead is after start + 5 s
        peer = ValidationTokens(token_key, "peer-server", At(time.time() + 4.5), ttl=50)
        fresh, _ = peer.issue("alice", server_id)
        path = "/ws?" + urlencode({"auth_key": key("alice"), "validation_token": fresh})
        self.assertEqual(raw_handshake(server, path).status, 101)
        self.assertEqual(raw_handshake(server, path).json()["error"], "replayed_token")


def raw_request(client: Client, text: bytes, frame_id: str) -> Deferred[dict[str, Any]]:
    """Send ``text`` (a frame the bundled client could not encode: orjson
    refuses integers over 64 bits) and fire with the answer to ``frame_id``
    (an error fails it with AllsparkError)."""
    answered: Deferred[dict[str, Any]] = Deferred()
    client._pending[frame_id] = answered
    client.send_raw(text)
    return answered


class BigIntegerTests(unittest.TestCase):
    """Integers beyond 64 bits are refused with bad_frame wherever they are;
    every integer within 64 bits arrives exactly."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_big_integers_are_refused_and_64_bit_ones_arrive_exactly(self) -> None:
        alice = await client_for(self, self.server, "alice", sync=False)
        bob = await client_for(self, self.server, "bob", sync=False)
        await alice.create_session(session_id="numbers")
        await alice.join_session("numbers", node_id="bob")
        refused_frames = [
            ("2^64", "r1", b'{"id":"r1","dest_id":"bob","payload":18446744073709551616}'),
            ("-2^63-1", "r2", b'{"id":"r2","dest_id":"bob","payload":-9223372036854775809}'),
            ("nested", "r3", b'{"id":"r3","dest_id":"bob","payload":{"a":[1,{"b":[100000000000000000000000]}]}}'),
            ("payload2", "r4", b'{"id":"r4","dest_id":"bob","payload2":[99999999999999999999]}'),
            ("session", "r5", b'{"id":"r5","dest_session_id":"numbers","payload":36893488147419103232}'),
            ("type", "r6", b'{"id":"r6","dest_id":"bob","type":18446744073709551616}'),
            ("ack", "r7", b'{"id":"r7","op":"ack","upto":18446744073709551616}'),
            ("sync", "r8", b'{"id":"r8","op":"sync","limit":18446744073709551616}'),
            ("ephemeral", "r9", b'{"id":"r9","dest_id":"bob","ephemeral":true,"payload":-99999999999999999999}'),
        ]
        for name, frame_id, text in refused_frames:
            with self.assertRaises(AllsparkError) as refused:
                await raw_request(alice, text, frame_id)
            self.assertEqual(refused.exception.code, "bad_frame", name)
            self.assertIn("2^64", refused.exception.frame["message"], name)
        # a float beyond the double range makes the frame unreadable: bad_frame without an id
        alice.send_raw(b'{"id":"r10","dest_id":"bob","payload":1e400}')
        error = await alice.next_event()
        self.assertEqual((error["op"], error["code"]), ("error", "bad_frame"))
        edges = [2**64 - 1, 2**63, 2**63 - 1, -(2**63), 2**53 + 1]
        text = b'{"id":"e1","dest_id":"bob","payload":{"n":%s}}' % json.dumps(edges).encode()
        accepted = await raw_request(alice, text, "e1")
        self.assertEqual(accepted["op"], "accepted")
        message = await bob.next_message()  # the first: nothing refused reached bob
        self.assertEqual(message["id"], "e1")
        self.assertEqual(json.dumps(message["payload"]), json.dumps({"n": edges}))  # no float crept in
        self.assertNotIn("Traceback", self.server.log())
