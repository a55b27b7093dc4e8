"""Property tests of frames sent over a real WebSocket to ONE real
``twistd allspark`` process per test class: the parser, the router, the
sessions and the store, as a hostile client reaches them.

Each example sends one frame (any bytes, any JSON, frames of the contract's
fields with any values, messages to real nodes and sessions with any
content) and then a ``ping`` with a fresh id.  Everything the server writes
before the ``pong`` must be a JSON object, an error frame must carry a
documented code and never ``internal_error``, the connection must stay open
(the ``pong`` comes), and the server must log no traceback.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
import unittest
from typing import Any
from urllib.parse import urlencode, urlsplit

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz import (
    FAILURE_MARKS,
    SERVER_FAILURE_CODES,
    documented_error_codes,
    fuzz_settings,
    http_call,
    log_since,
)
from tests.fuzz.test_frames import encode_json, field_values, frames_of_real_fields
from tests.support import ServerProcess, key

#: Seconds to wait for the server's answers to one frame.
ANSWER_TIMEOUT = 10.0
#: Most frames read while waiting for one pong.
MAX_FRAMES_PER_ANSWER = 10_000


class BlockingWebSocket:
    """A minimal blocking WebSocket client over a plain socket: it sends
    masked text frames and reads the server's (unmasked) frames, every read
    with a timeout."""

    def __init__(self, server: ServerProcess, node_id: str) -> None:
        status, body = http_call(server, "GET", "/v1/pre_connection_info?" + urlencode(
            {"auth_key": key(node_id)}))
        assert status == 200, (status, body)
        url = urlsplit(json.loads(body)["node"]["ws_url"])
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_TIMEOUT)
        self.sock.sendall((
            f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:300]
        hello = self.read_frame()
        assert hello is not None and json.loads(hello[1])["op"] == "hello", hello

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send_frame(self, payload: bytes, opcode: int = 0x1) -> None:
        """One masked frame (text by default)."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(
            n, "big") if n else b""
        self.sock.sendall(head + mask + masked)

    def read_frame(self) -> tuple[int, bytes] | None:
        """The next data or close frame: (opcode, payload); pings are answered."""
        for _ in range(MAX_FRAMES_PER_ANSWER):
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._take(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._take(8))[0]
            payload = self._take(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping
                self.send_frame(payload, 0xA)
                continue
            if opcode == 0xA:
                continue
            return opcode, payload
        return None

    def close(self) -> None:
        self.sock.close()


class WebSocketFuzzTests(unittest.TestCase):
    """One server and one connection (reopened if the server closed it) for
    every property of the class."""

    server: ServerProcess
    ws: BlockingWebSocket | None = None
    log_offset = 0
    pings = 0

    @classmethod
    def setUpClass(cls) -> None:
        # no rate limit in the way: every frame must be handled, not refused
        cls.server = ServerProcess(args=("--max-rate=1000000", "--max-burst=1000000")).start()
        try:
            BlockingWebSocket(cls.server, "bob").close()  # bob has connected: messages to him route
            for op, caller, args in (
                ("create_session", "alice", {"session_id": "grp"}),
                ("create_session", "alice", {"session_id": "game", "session_type": "game"}),
                ("join_session", "alice", {"session_id": "grp", "node_id": "bob"}),
                ("join_session", "alice", {"session_id": "game", "node_id": "bob"}),
            ):
                status, _ = http_call(cls.server, "GET", f"/{op}?" + urlencode(
                    {"auth_key": key(caller), **args}))
                assert status == 200, (op, args, status)
        except BaseException:
            cls.server.stop()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            if cls.ws is not None:
                cls.ws.close()
            status, body = http_call(cls.server, "GET", "/health")
            assert status == 200 and json.loads(body)["status"] == "ok", (status, body)
            log = cls.server.log()
            for mark in FAILURE_MARKS:
                assert mark not in log, log[log.index(mark) - 2000:][:6000]
        finally:
            cls.server.stop()

    def socket(self) -> BlockingWebSocket:
        cls = type(self)
        if cls.ws is None:
            cls.ws = BlockingWebSocket(cls.server, "alice")
        return cls.ws

    def check(self, payload: bytes, opcode: int = 0x1) -> None:
        """Send one frame, then a ping; every frame before the pong is a
        JSON object, errors have documented codes, the server logged no
        traceback."""
        ws = self.socket()
        cls = type(self)
        cls.pings += 1
        ping_id = f"fuzz-ping-{cls.pings}"
        ws.send_frame(payload, opcode)
        ws.send_frame(json.dumps({"op": "ping", "id": ping_id}).encode())
        deadline = time.monotonic() + ANSWER_TIMEOUT
        what = repr(payload[:300])
        for _ in range(MAX_FRAMES_PER_ANSWER):
            self.assertLess(time.monotonic(), deadline, f"no pong for {what}")
            got = ws.read_frame()
            self.assertIsNotNone(got, what)
            assert got is not None
            frame_opcode, data = got
            if frame_opcode == 0x8:  # close
                cls.ws = None
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                self.fail(f"the server closed the connection ({code}, {data[2:]!r}) after {what}")
            frame = json.loads(data)
            self.assertIsInstance(frame, dict, what)
            if frame.get("op") == "error":
                self.assertIn(frame["code"], documented_error_codes(), f"{frame} for {what}")
                self.assertNotIn(frame["code"], SERVER_FAILURE_CODES, f"{frame} for {what}")
            if frame.get("op") == "pong" and frame.get("id") == ping_id:
                break
        log, cls.log_offset = log_since(self.server, cls.log_offset)
        for mark in FAILURE_MARKS:
            self.assertNotIn(mark, log, f"for {what}:\n{log[:6000]}")

    @fuzz_settings()
    @given(st.binary(max_size=200))
    @example(b"\xff")
    @example(b"")
    def test_any_bytes(self, payload: bytes) -> None:
        self.check(payload)

    @fuzz_settings()
    @given(frames_of_real_fields, st.booleans())
    def test_frames_of_real_fields(self, frame: dict[str, Any], ensure_ascii: bool) -> None:
        self.check(encode_json(frame, ensure_ascii))

    @fuzz_settings()
    @given(st.sampled_from([{"dest_id": "bob"}, {"dest_client_id": "nobody"}, {"dest_session_id": "grp"},
                            {"dest_session_id": "game"}, {"dest_session_id": "grp", "dest_id": "bob"},
                            {"dest_id": "alice"}]),
           st.dictionaries(st.sampled_from(["payload", "payload1", "payload2", "type", "ephemeral", "id",
                                            "src_id", "timestamp", "seq"]), field_values, max_size=4))
    @example({"dest_id": "bob"}, {"payload": [[[[1]]]] * 3})
    @example({"dest_id": "bob"}, {"payload": json.loads("[" * 200 + "]" * 200)})
    @example({"dest_session_id": "grp"}, {"payload": json.loads("[" * 300 + "]" * 300)})
    @example({"dest_id": "bob"}, {"payload": 2**64})
    @example({"dest_id": "bob"}, {"payload": "x" * 65_000})
    def test_messages_with_any_content(self, dest: dict[str, str], content: dict[str, Any]) -> None:
        self.check(encode_json({**content, **dest}, True))

    @fuzz_settings(share=0.5)
    @given(st.sampled_from([0x0, 0x2, 0x3, 0xB]), st.binary(max_size=50))
    def test_binary_and_reserved_opcodes(self, opcode: int, payload: bytes) -> None:
        """A binary frame is refused with bad_frame; a reserved opcode is a
        protocol error the server may close for, never a traceback."""
        if opcode == 0x2:
            self.check(payload, opcode)
            return
        ws = self.socket()
        ws.send_frame(payload, opcode)
        type(self).ws = None  # a protocol error: the server closes it, a new one is opened next time
        ws.close()
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            status, _ = http_call(self.server, "GET", "/health")
            if status == 200:
                break
        log, type(self).log_offset = log_since(self.server, type(self).log_offset)
        for mark in FAILURE_MARKS:
            self.assertNotIn(mark, log, log[:6000])

