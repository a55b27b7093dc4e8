"""One real ``twistd -n allspark`` process on 127.0.0.1 with a temporary data
dir: credentials, HTTP answers, limits, slow readers, heartbeats and the
process life cycle (SIGTERM, crash and ``--force``)."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from allspark.auth import ValidationTokens, derive_token_key, mint_auth_key
from allspark.client import Client, open_socket
from tests.e2e.helpers import (
    health,
    http_get,
    pre_connect,
    raw_handshake,
    run_to_exit,
    wait_until,
    ws_path_and_query,
)
from tests.support import (
    CLUSTER_SECRET,
    ROOT,
    SECRET,
    ServerProcess,
    client_for,
    key,
    sleep,
    start_server,
    twistd,
)


def bad_keys(node_id: str) -> dict[str, str]:
    """Keys for ``node_id`` that must all be refused, by kind."""
    return {
        "malformed": "not-a-jwt",
        "expired": mint_auth_key(SECRET, node_id, ttl=60, now=time.time() - 3600),
        "forged": mint_auth_key("another-secret-0123456789abcdef0123", node_id),
        "missing": "",
    }


class SharedServerTestCase(unittest.TestCase):
    """One server for every test of the class (for tests that leave it as
    they found it)."""

    timeout = 30
    server_args: tuple[str, ...] = ()
    server: ServerProcess

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = ServerProcess(args=cls.server_args).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    async def raw_client(self, node_id: str, **options: Any) -> Client:
        """A connected client (no sync on connect); closed when the test ends."""
        return await client_for(self, self.server, node_id, sync=False, **options)


class CredentialTests(SharedServerTestCase):
    """Bad auth keys and validation tokens are refused: 401 with a JSON body on
    pre-connection, a refused handshake on the WebSocket."""

    def test_pre_connection_refuses_bad_keys(self) -> None:
        for path in ("/", "/v1/pre_connection_info"):
            for kind, bad in bad_keys("alice").items():
                answer = pre_connect(self.server, {"auth_key": bad} if bad else {}, path)
                self.assertEqual(answer.status, 401, (path, kind))
                self.assertEqual(answer.headers["content-type"], "application/json")
                body = answer.json()
                self.assertEqual(
                    body["error"],
                    {"malformed": "malformed_key", "expired": "expired_key",
                     "forged": "bad_signature", "missing": "missing_key"}[kind],
                )
                self.assertTrue(body["message"])
                self.assertNotIn("validation_token", body)

    def test_validation_token_is_not_an_auth_key(self) -> None:
        token = pre_connect(self.server, {"auth_key": key("alice")}).json()["validation_token"]
        answer = pre_connect(self.server, {"auth_key": token})
        self.assertEqual(answer.status, 401)
        self.assertEqual(answer.json()["error"], "malformed_key")

    def test_handshake_refuses_bad_keys(self) -> None:
        for kind, bad in bad_keys("alice").items():
            # a real token for alice, so only the key is wrong
            token = pre_connect(self.server, {"auth_key": key("alice")}).json()["validation_token"]
            answer = raw_handshake(self.server, f"/ws?auth_key={bad}&validation_token={token}")
            self.assertEqual(answer.status, 401, kind)
            self.assertEqual(answer.headers["content-type"], "application/json", kind)
            self.assertTrue(answer.json()["message"], kind)
        self.assertEqual(health(self.server)["load"]["connections"], 0)

    def test_handshake_accepts_a_good_token_once(self) -> None:
        info = pre_connect(self.server, {"auth_key": key("alice")}).json()
        path = ws_path_and_query(info["node"]["ws_url"])
        self.assertEqual(raw_handshake(self.server, path).status, 101)
        replay = raw_handshake(self.server, path)
        self.assertEqual(replay.status, 401)
        self.assertEqual(replay.json()["error"], "replayed_token")

    def test_handshake_refuses_missing_foreign_and_forged_tokens(self) -> None:
        alice, bob = key("alice"), key("bob")
        alice_token = pre_connect(self.server, {"auth_key": alice}).json()["validation_token"]
        # another server of the same cluster would accept this one, not us
        other_server = ValidationTokens(derive_token_key(CLUSTER_SECRET.encode()), "127.0.0.1:1", reactor)
        for_other_server, _ = other_server.issue("alice", "127.0.0.1:1")
        forged = ValidationTokens(derive_token_key(b"not-the-cluster-secret-0123456789"),
                                  f"127.0.0.1:{self.server.port}", reactor)
        forged_token, _ = forged.issue("alice", f"127.0.0.1:{self.server.port}")
        cases = {
            "missing_token": f"/ws?auth_key={alice}",
            "foreign_token": f"/ws?auth_key={bob}&validation_token={alice_token}",
            "foreign_token ": f"/ws?auth_key={alice}&validation_token={for_other_server}",
            "bad_token": f"/ws?auth_key={alice}&validation_token={forged_token}",
            "bad_token ": f"/ws?auth_key={alice}&validation_token=garbage",
        }
        for code, path in cases.items():
            answer = raw_handshake(self.server, path)
            self.assertEqual(answer.status, 401, code)
            self.assertEqual(answer.json()["error"], code.strip(), code)
        # bob's refused attempt did not burn alice's token
        info_path = f"/ws?auth_key={alice}&validation_token={alice_token}"
        self.assertEqual(raw_handshake(self.server, info_path).status, 101)

    def test_access_log_has_no_credentials(self) -> None:
        auth_key = key("log-checker")
        info = pre_connect(self.server, {"auth_key": auth_key, "need_proxy": "false"}).json()
        raw_handshake(self.server, ws_path_and_query(info["node"]["ws_url"]))
        pre_connect(self.server, {"auth_key": auth_key}, "/v1/pre_connection_info")
        pre_connect(self.server, {"auth_key": "x" + auth_key})

        def logged() -> bool:
            return "/v1/pre_connection_info?" in self.server.log()

        for _ in range(100):
            if logged():
                break
            time.sleep(0.02)
        log = self.server.log()
        self.assertIn("GET /?get_pre_connection_info=true&auth_key=REDACTED", log)
        self.assertIn("need_proxy=false", log)
        self.assertNotIn(auth_key, log)
        self.assertNotIn(auth_key.split(".")[2], log)
        self.assertNotIn(info["validation_token"], log)


class HTTPTests(SharedServerTestCase):
    """Health, 404s, both pre-connection forms, the proxy address, the plugin."""

    server_args = ("--proxy_80_port=proxy.example:80",)

    def test_health_answers_the_contract(self) -> None:
        body = health(self.server)
        self.assertEqual(body["node_id"], f"127.0.0.1:{self.server.port}")
        self.assertEqual(body["state"], "live")
        self.assertEqual(body["load"]["connections"], 0)
        self.assertIn("max_connections", body["load"])

    def test_unknown_paths_answer_json_404(self) -> None:
        for path in ("/nope", "/v1/nope", "/health/x", "/v2/pre_connection_info", "/ws/deeper"):
            answer = http_get(self.server.base_url + path)
            self.assertEqual(answer.status, 404, path)
            self.assertEqual(answer.headers["content-type"], "application/json", path)
            self.assertEqual(answer.json()["error"], "not_found", path)

    def test_plain_get_on_the_socket_path_is_json_426(self) -> None:
        for path in ("/ws", f"/ws?auth_key={key('eve')}", "/ws?redirect=http%3A%2F%2Fevil.example%2F"):
            answer = http_get(self.server.base_url + path)
            self.assertEqual(answer.status, 426, path)
            self.assertEqual(answer.headers["upgrade"], "websocket")
            self.assertEqual(answer.json()["error"], "bad_handshake")
            self.assertNotIn(b"autobahn", answer.body.lower())

    async def test_both_pre_connection_forms_answer_a_working_ws_url(self) -> None:
        for path in ("/", "/v1/pre_connection_info"):
            answer = pre_connect(self.server, {"auth_key": key("carol", "c")}, path)
            self.assertEqual(answer.status, 200, path)
            body = answer.json()
            self.assertEqual(body["expires_in"], 60)
            node = body["node"]
            self.assertEqual(node["node_id"], f"127.0.0.1:{self.server.port}")
            self.assertEqual((node["host"], node["port"]), ("127.0.0.1", self.server.port))
            self.assertEqual(node["proxy_address"], "proxy.example:80")
            self.assertTrue(node["ws_url"].startswith(f"ws://127.0.0.1:{self.server.port}/ws?"))
            self.assertIn(f"validation_token={body['validation_token']}", node["ws_url"])
            client = await open_socket(reactor, node["ws_url"])
            self.assertEqual(client.hello["node_id"], "carol")
            self.assertEqual(client.hello["client_id"], "c")
            self.assertEqual(client.hello["server_id"], node["node_id"])
            await client.close()

    def test_need_proxy_answers_the_proxy_address(self) -> None:
        body = pre_connect(self.server, {"auth_key": key("dave"), "need_proxy": "true"}).json()
        self.assertTrue(body["node"]["ws_url"].startswith("ws://proxy.example:80/ws?auth_key="))
        self.assertIn(f"validation_token={body['validation_token']}", body["node"]["ws_url"])

    def test_bad_need_proxy_is_400(self) -> None:
        answer = pre_connect(self.server, {"auth_key": key("dave"), "need_proxy": "perhaps"})
        self.assertEqual(answer.status, 400)
        self.assertEqual(answer.json()["error"], "bad_request")

    def test_twistd_help_lists_allspark(self) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT)
        out = subprocess.run([twistd(), "--help"], env=env, cwd=ROOT, capture_output=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(b"allspark", out.stdout)
        sub = subprocess.run([twistd(), "allspark", "--help"], env=env, cwd=ROOT, capture_output=True,
                             timeout=30)
        self.assertIn(b"--max-message-size", sub.stdout)


class NoProxyTests(SharedServerTestCase):
    """A cluster with no proxy address cannot answer ``need_proxy``."""

    def test_need_proxy_without_a_proxy_is_503(self) -> None:
        answer = pre_connect(self.server, {"auth_key": key("dave"), "need_proxy": "true"})
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.json()["error"], "no_proxy")


class OversizeTests(SharedServerTestCase):
    """A frame over ``--max-message-size`` closes the connection with 1009."""

    server_args = ("--max-message-size=4096",)

    async def test_frame_over_the_limit_closes_with_1009(self) -> None:
        alice = await self.raw_client("alice")
        await self.raw_client("bob")
        self.assertEqual(alice.hello["max_message_size"], 4096)
        accepted = await alice.send(dest_id="bob", payload="x" * 3000, ephemeral=True)
        self.assertEqual(accepted["status"], "delivered")
        alice.send_raw(b'{"dest_id":"bob","payload":"' + b"x" * 5000 + b'"}')
        code, _ = await alice.closed.addTimeout(10, reactor)
        self.assertEqual(code, 1009)


class ConnectionLimitTests(SharedServerTestCase):
    """``--max-connections``: the one over the limit is refused with 503."""

    server_args = ("--max-connections=2",)

    async def test_connection_over_the_limit_is_refused(self) -> None:
        await self.raw_client("one")
        await self.raw_client("two")
        info = pre_connect(self.server, {"auth_key": key("three")}).json()
        answer = raw_handshake(self.server, ws_path_and_query(info["node"]["ws_url"]))
        self.assertEqual(answer.status, 503)
        self.assertEqual(health(self.server)["load"]["connections"], 2)


class SlowReaderTests(SharedServerTestCase):
    """A reader that stops reading overflows its own bounded queue and is
    disconnected; nobody else waits for it."""

    server_args = ("--max-queue-bytes=1048576",)
    timeout = 60

    async def test_stuck_reader_does_not_slow_another_pair(self) -> None:
        stuck = await self.raw_client("stuck")
        flooder = await self.raw_client("flooder")
        alice = await self.raw_client("alice")
        bob = await self.raw_client("bob")
        assert stuck.protocol is not None
        stuck.protocol.transport.pauseProducing()  # connected, never reads again
        blob = "x" * 16000
        flood_state: dict[str, Any] = {"sent": 0, "dropped": False, "done": False}

        async def flood() -> None:
            """Send 16 kB messages to the stuck reader, about 10 MB/s, until
            the server reports it gone (at most 4000 messages, 30 s)."""
            deadline = time.monotonic() + 30
            try:
                for _ in range(200):
                    if time.monotonic() > deadline:
                        return
                    answers = await gatherResults(
                        [flooder.send(dest_id="stuck", payload=blob, ephemeral=True) for _ in range(20)]
                    )
                    flood_state["sent"] += len(answers)
                    if any(a["status"] == "dropped" for a in answers):
                        flood_state["dropped"] = True
                        return
                    await sleep(0.02)
            finally:
                flood_state["done"] = True

        latencies: list[float] = []
        while_stuck: list[float] = []

        async def pair() -> None:
            """alice -> bob round trips for as long as the flood lasts (at
            most 5000, 30 s)."""
            deadline = time.monotonic() + 30
            for i in range(5000):
                if flood_state["done"] or time.monotonic() > deadline:
                    return
                start = time.monotonic()
                await alice.send(dest_id="bob", payload={"n": i})
                got = await bob.next_message(timeout=5)
                self.assertEqual(got["payload"]["n"], i)
                latencies.append(time.monotonic() - start)
                if not flood_state["dropped"]:
                    while_stuck.append(latencies[-1])

        await gatherResults([Deferred.fromCoroutine(flood()), Deferred.fromCoroutine(pair())]).addTimeout(
            40, reactor
        )
        self.assertTrue(flood_state["dropped"], f"stuck reader still connected after {flood_state}")
        # the flood went well past the kernel buffers and the 1 MB queue while alice and bob talked
        self.assertGreater(flood_state["sent"] * len(blob), 2_000_000)
        # the other pair kept going while the reader was stuck (each round
        # trip also had to finish within next_message's 5 s)
        self.assertGreaterEqual(len(while_stuck), 10)
        self.assertIn("send queue overflow", self.server.log())
        # the server closes the stuck socket (4008, then a hard drop after 2 s)
        await wait_until(lambda: health(self.server)["load"]["connections"] == 3, 5,
                         what="stuck connection closed on the server")
        stuck.protocol.transport.resumeProducing()
        code, _ = await stuck.closed.addTimeout(10, reactor)
        self.assertIn(code, (4008, 1006, None))
        # the others are unharmed
        self.assertEqual((await flooder.ping())["op"], "pong")
        self.assertEqual((await alice.send(dest_id="bob", payload="after"))["status"], "delivered")


class HeartbeatTests(SharedServerTestCase):
    """``--heartbeat``: a client that stops answering pings is cut."""

    server_args = ("--heartbeat=1",)

    async def test_silent_client_is_cut(self) -> None:
        silent = await self.raw_client("silent")
        lively = await self.raw_client("lively")
        self.assertEqual(silent.hello["heartbeat"], 1)
        assert silent.protocol is not None
        silent.protocol.transport.pauseProducing()
        took = await wait_until(lambda: health(self.server)["load"]["connections"] == 1, 12,
                                interval=0.2, what="silent client cut")
        self.assertLess(took, 10)
        pong = await lively.ping()
        self.assertEqual(pong["op"], "pong")
        silent.protocol.transport.resumeProducing()
        await silent.closed.addTimeout(5, reactor)


class ShutdownTests(unittest.TestCase):
    """SIGTERM: every client is closed with 1001 and a reason, and the process
    exits with SIGTERM's status."""

    timeout = 30

    async def test_sigterm_closes_clients_with_1001(self) -> None:
        server = start_server(self)
        clients = [await client_for(self, server, f"n{i}") for i in range(3)]
        assert server.proc is not None
        server.proc.terminate()
        closes = await gatherResults([c.closed for c in clients]).addTimeout(10, reactor)
        for code, reason in closes:
            self.assertEqual(code, 1001)
            self.assertEqual(reason, "server shutting down")
        await wait_until(lambda: server.proc.poll() is not None, 10, what="process exit")
        self.assertEqual(server.proc.returncode, -15)
        self.assertIn("stopped", server.log())


class ForceTests(unittest.TestCase):
    """The identity (host_address, port) in a data dir: held while running,
    released by a clean stop, taken back after a crash only with --force."""

    timeout = 60

    def refused(self, data_dir: str, port: int) -> str:
        """Start a server on ``data_dir`` and ``port``; expect it to exit at
        once with status 1.  Its output."""
        done = run_to_exit(data_dir, port)
        output = done.stdout.decode(errors="replace")
        self.assertEqual(done.returncode, 1, output)
        self.assertIn("allspark: cannot start: server identity", output)
        return output

    def test_crash_needs_force_clean_stop_does_not(self) -> None:
        first = start_server(self)
        data_dir, port = first.data_dir, first.port
        # a second process on the same identity is refused, and leaves the claim alone
        self.assertIn("held by running process", self.refused(data_dir, port))
        self.assertEqual(health(first)["state"], "live")
        first.kill()
        assert first.proc is not None
        self.assertEqual(first.proc.returncode, -9)
        for _ in range(2):  # a refused start does not release the crashed server's claim
            self.assertIn("start with --force", self.refused(data_dir, port))
        forced = ServerProcess(data_dir=data_dir, port=port)
        self.addCleanup(forced.stop)
        forced.start(force=True)
        self.assertIn("taking back server identity", forced.log())
        self.assertEqual(forced.terminate(), -15)
        clean = ServerProcess(data_dir=data_dir, port=port)
        self.addCleanup(clean.stop)
        clean.start()
        self.assertEqual(health(clean)["state"], "live")
