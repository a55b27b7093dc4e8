"""Connections and logs against a real ``twistd -n allspark``: the per-node
connection limit, floods of frames over the rate limit, slow HTTP clients
(slowloris), trusted proxies, the connect/disconnect and JSON logs, usage
errors, and the ``Server`` header of every answer."""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import time

from twisted.internet import reactor
from twisted.trial import unittest

from tests.e2e.helpers import IO_TIMEOUT, http_get, pre_connect, run_to_exit, wait_until, ws_path_and_query
from tests.support import ServerProcess, client_for, free_port, key, sleep, start_server


def handshake_request(server: ServerProcess, path_and_query: str, *headers: str) -> bytes:
    """A WebSocket opening handshake for ``path_and_query`` with extra header lines."""
    lines = [
        f"GET {path_and_query} HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def exchange(server: ServerProcess, request: bytes, until_closed: bool = True) -> bytes:
    """Send ``request`` on a new socket and read the answer: until the server
    closes the socket, or (``until_closed`` false) until the head is in."""
    data = b""
    deadline = time.monotonic() + IO_TIMEOUT
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(request)
        for _ in range(1000):
            if not until_closed and b"\r\n\r\n" in data:
                break
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
    return data


def head_of(answer: bytes) -> tuple[str, dict[str, str]]:
    """The status line and the headers (lower-case names) of a raw answer."""
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return head[0], headers


def is_closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def read_all(sock: socket.socket) -> bytes:
    """Whatever the server sent before closing ``sock``."""
    sock.settimeout(IO_TIMEOUT)
    data = b""
    for _ in range(100):
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


class ServerHeaderTests(unittest.TestCase):
    """Every HTTP answer says ``Server: Allspark`` (never TwistedWeb and its
    version); a plain GET on the socket path is ``426 Upgrade Required``."""

    timeout = 60

    def test_every_answer_says_allspark(self) -> None:
        server = start_server(self)
        for path in ("/health", "/", "/nope", "/v1/pre_connection_info?auth_key=bad", "/ws"):
            answer = http_get(server.base_url + path)
            self.assertEqual(answer.headers.get("server"), "Allspark", path)
        put = exchange(server, b"PUT /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertEqual(head_of(put)[0], "HTTP/1.1 405 Method Not Allowed")
        self.assertEqual(head_of(put)[1]["server"], "Allspark")
        refused = exchange(server, handshake_request(server, f"/ws?auth_key={key('alice')}&validation_token=x"))
        self.assertEqual(head_of(refused)[0], "HTTP/1.1 401 Unauthorized")
        self.assertEqual(head_of(refused)[1]["server"], "Allspark")
        info = pre_connect(server, {"auth_key": key("alice")}).json()
        accepted = exchange(server, handshake_request(server, ws_path_and_query(info["node"]["ws_url"])),
                            until_closed=False)
        self.assertEqual(head_of(accepted)[1]["server"], "Allspark")
        self.assertNotIn(b"TwistedWeb", put + refused + accepted)

    def test_plain_get_on_the_socket_path_is_426_upgrade_required(self) -> None:
        server = start_server(self)
        answer = exchange(server, f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        status, headers = head_of(answer)
        self.assertEqual(status, "HTTP/1.1 426 Upgrade Required")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["server"], "Allspark")
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"], "bad_handshake")


class PerNodeLimitTests(unittest.TestCase):
    """``--max-connections-per-node``: one connection too many for a node
    closes that node's oldest connection with 4009; other nodes are not
    affected."""

    timeout = 60

    async def test_one_more_connection_closes_the_oldest_with_4009(self) -> None:
        server = start_server(self, "--max-connections-per-node=3")
        first = await client_for(self, server, "greedy", sync=False)
        others = [await client_for(self, server, "greedy", sync=False) for _ in range(2)]
        self.assertFalse(first.closed.called)
        newest = await client_for(self, server, "greedy", sync=False)
        code, reason = await first.closed.addTimeout(10, reactor)
        self.assertEqual(code, 4009)
        self.assertIn("too many connections", reason or "")
        for client in [*others, newest]:
            self.assertEqual((await client.ping())["op"], "pong")
            self.assertFalse(client.closed.called)
        bob = await client_for(self, server, "bob", sync=False)
        self.assertEqual((await bob.ping())["op"], "pong")
        await wait_until(lambda: http_get(server.base_url + "/health").json()["load"]["connections"] == 4,
                         timeout=10, what="4 connections in /health")


class FrameFloodTests(unittest.TestCase):
    """Frames over the rate limit are answered ``rate_limited``, and a
    connection that goes on flooding (malformed frames too) is closed with
    1008 after ``--max-refused`` refusals instead of being answered forever."""

    timeout = 60

    async def test_a_flood_of_malformed_frames_is_cut_with_1008(self) -> None:
        server = start_server(self, "--max-rate=10", "--max-burst=20", "--max-refused=30")
        flooder = await client_for(self, server, "flooder", sync=False)
        for _ in range(2000):
            flooder.send_raw(b"not json")
        code, reason = await flooder.closed.addTimeout(20, reactor)
        self.assertEqual(code, 1008)
        self.assertIn("rate limit", reason or "")
        answers = [frame["code"] for frame in flooder.events.pending if frame.get("op") == "error"]
        self.assertLess(len(answers), 200)  # 2000 before: every frame was answered
        self.assertIn("bad_frame", answers)
        self.assertIn("rate_limited", answers)
        # the others are served as before
        bystander = await client_for(self, server, "bystander", sync=False)
        self.assertEqual((await bystander.ping())["op"], "pong")


class SlowClientTests(unittest.TestCase):
    """``--request-timeout``: a connection that trickles its request head (a
    slowloris), a WebSocket handshake that never ends, and an idle keep-alive
    connection are closed once the deadline passes, whatever they keep
    sending."""

    timeout = 90

    def test_trickling_and_idle_connections_are_closed(self) -> None:
        server = start_server(self, "--request-timeout=3")
        trickled = {
            "http": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200,
            "handshake": handshake_request(server, f"/ws?auth_key={key('slow')}")[:-2] + b"X-Padding: " + b"a" * 200,
        }
        socks = {name: socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
                 for name in trickled}
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
        socks["idle keep-alive"] = idle
        for sock in socks.values():
            self.addCleanup(sock.close)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = idle.recv(65536)
        self.assertTrue(first.startswith(b"HTTP/1.1 200"), first)
        started = time.monotonic()
        closed_after: dict[str, float] = {}
        sent = 0
        for _ in range(30):  # one byte a second each, for at most 30 s
            for name, data in trickled.items():
                if name not in closed_after:
                    try:
                        socks[name].sendall(data[sent:sent + 1])
                    except OSError:
                        closed_after[name] = time.monotonic() - started
            sent += 1
            time.sleep(1.0)
            for name, sock in socks.items():
                if name not in closed_after and is_closed(sock):
                    closed_after[name] = time.monotonic() - started
            if len(closed_after) == len(socks):
                break
        self.assertEqual(sorted(closed_after), sorted(socks), f"still open after 30 s: {closed_after}")
        self.assertTrue(all(seconds < 15 for seconds in closed_after.values()), closed_after)
        for name in trickled:  # cut in the middle of a request: told so
            answer = read_all(socks[name])
            self.assertTrue(answer.startswith(b"HTTP/1.1 408 Request Timeout"), (name, answer[:100]))
            self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"], "request_timeout")
        self.assertEqual(read_all(idle), b"")  # idle: closed without a word
        self.assertEqual(http_get(server.base_url + "/health").status, 200)

    async def test_a_slow_but_complete_request_and_an_open_websocket_are_not_cut(self) -> None:
        server = start_server(self, "--request-timeout=2")
        alice = await client_for(self, server, "alice", sync=False)
        with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            time.sleep(1.0)
            sock.sendall(b"Connection: close\r\n\r\n")
            self.assertTrue(read_all(sock).startswith(b"HTTP/1.1 200 OK"))
        await sleep(3.0)  # past the deadline: the WebSocket's request was complete long ago
        self.assertEqual((await alice.ping())["op"], "pong")


class TrustedProxyTests(unittest.TestCase):
    """``--trusted-proxy``: X-Forwarded-For and X-Real-IP name the client in
    the logs only when the peer is a trusted proxy."""

    timeout = 60

    def forwarded(self, server: ServerProcess, node_id: str, address: str, header: str = "X-Forwarded-For") -> None:
        """An HTTP request, a refused handshake and an accepted one, each
        claiming to come from ``address``."""
        exchange(server, f"GET /health HTTP/1.1\r\nHost: x\r\n{header}: {address}\r\nConnection: close\r\n\r\n"
                 .encode())
        exchange(server, handshake_request(server, f"/ws?auth_key={key(node_id)}&validation_token=bad",
                                           f"{header}: {address}"))
        info = pre_connect(server, {"auth_key": key(node_id)}).json()
        with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(handshake_request(server, ws_path_and_query(info["node"]["ws_url"]),
                                           f"{header}: {address}"))
            self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 101"))

    def wait_for_log(self, server: ServerProcess, text: str) -> str:
        for _ in range(200):
            if text in server.log():
                break
            time.sleep(0.05)
        return server.log()

    def test_forwarded_for_is_believed_from_a_trusted_proxy_only(self) -> None:
        trusting = start_server(self, "--trusted-proxy=10.0.0.0/8", "--trusted-proxy=127.0.0.1")
        self.forwarded(trusting, "proxied", "203.0.113.7, 10.1.2.3")
        self.forwarded(trusting, "real-ip", "198.51.100.4", header="X-Real-IP")
        log = self.wait_for_log(trusting, "disconnected real-ip")
        self.assertIn('"203.0.113.7" - - [', log)  # the access log
        self.assertIn("refused handshake from 203.0.113.7: 401 bad_token", log)
        self.assertIn("connected proxied from 203.0.113.7", log)
        self.assertIn("connected real-ip from 198.51.100.4", log)
        self.assertNotIn("10.1.2.3", log)

        direct = start_server(self)
        self.forwarded(direct, "spoofer", "203.0.113.7")
        log = self.wait_for_log(direct, "disconnected spoofer")
        self.assertIn("connected spoofer from 127.0.0.1", log)
        self.assertIn("refused handshake from 127.0.0.1: 401 bad_token", log)
        self.assertNotIn("203.0.113.7", log)


class LogTests(unittest.TestCase):
    """Connects and disconnects at info, per-frame events at debug, one line
    per refused handshake, a JSON format, short usage errors."""

    timeout = 60

    async def test_connects_disconnects_and_one_line_per_refused_handshake(self) -> None:
        server = start_server(self)
        alice = await client_for(self, server, "alice", "alice-user", sync=False)
        await alice.ping()
        await alice.close()
        refused = exchange(server, handshake_request(server, "/ws?auth_key=nope&validation_token=nope"))
        self.assertTrue(refused.startswith(b"HTTP/1.1 401"))
        await wait_until(lambda: "refused handshake" in server.log() and "disconnected alice" in server.log(),
                         timeout=10, what="the log lines")
        lines = server.log().splitlines()
        self.assertEqual(len([line for line in lines if "connected alice from 127.0.0.1" in line
                              and "disconnected" not in line]), 1)
        disconnected = [line for line in lines if "disconnected alice from 127.0.0.1: 1000 after" in line]
        self.assertEqual(len(disconnected), 1, lines)
        self.assertEqual(len([line for line in lines if "refused handshake from 127.0.0.1: 401" in line]), 1)
        self.assertEqual([line for line in lines if "autobahn" in line.lower()], [])
        self.assertEqual([line for line in lines if "#debug]" in line], [])

    async def test_json_format_with_debug_events(self) -> None:
        server = start_server(self, "--log-format=json", "--log_level=debug")
        alice = await client_for(self, server, "alice", sync=False)
        await alice.ping()
        alice.send_raw(b"not json")
        await alice.close()
        await wait_until(lambda: "disconnected alice" in server.log(), timeout=10, what="the disconnect")
        events = [json.loads(line) for line in server.log().splitlines() if line.strip()]
        for event in events:
            self.assertTrue({"time", "level", "namespace", "message"} <= set(event), event)
        by_message = {event["message"].split(" from ")[0]: event for event in events
                      if event["namespace"] == "allspark.ws"}
        connected = by_message["connected alice"]
        self.assertEqual((connected["level"], connected["node_id"], connected["client"]), ("info", "alice", "127.0.0.1"))
        disconnected = by_message["disconnected alice"]
        self.assertEqual((disconnected["code"], disconnected["closed_by"]), (1000, "client"))
        self.assertIsInstance(disconnected["duration"], float)
        self.assertEqual(by_message["ping"]["level"], "debug")
        self.assertEqual(by_message["bad frame"]["code"], "bad_frame")
        access = [event for event in events if event["namespace"] == "allspark.access"]
        self.assertTrue(any(event["uri"].startswith("/?get_pre_connection_info=true&auth_key=REDACTED")
                            and event["status"] == 200 for event in access), access)

    def test_usage_error_comes_first_and_short(self) -> None:
        data_dir = tempfile.mkdtemp(prefix="allspark-test-")
        for bad in ("--max-connections-per-node=0", "--log-format=xml", "--trusted-proxy=nginx", "--nope"):
            result = run_to_exit(data_dir, free_port(), bad)
            self.assertEqual(result.returncode, 1, bad)
            lines = result.stdout.decode().strip().splitlines()
            self.assertTrue(lines[0].startswith("twistd allspark: error: "), (bad, lines[:3]))
            self.assertIn(bad.split("=")[0], lines[0])  # it names the option
            self.assertLessEqual(len(lines), 2, bad)

