"""HTTP request bodies are capped at 64 KiB on every path and method, before
twisted.web buffers them (in memory or a temporary file), against a real
server over raw sockets."""

from __future__ import annotations

import json
import socket
import time

from twisted.trial import unittest

from allspark.web import MAX_BODY
from tests.support import ServerProcess, start_server

IO_TIMEOUT = 10.0


def exchange(server: ServerProcess, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` and ``body`` on a new connection, read the answer until
    the server closes the connection or the answer's Content-Length is in
    (bounded by :data:`IO_TIMEOUT`); its status, headers and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(head + body)
        received = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received:
                raw_head, _, rest = received.partition(b"\r\n\r\n")
                lengths = [line for line in raw_head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if lengths and len(rest) >= int(lengths[0].split(b":")[1]):
                    break
    raw_head, _, answer = received.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    if not lines[0]:
        raise AssertionError("no answer from the server")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, answer


class BodyCapTests(unittest.TestCase):
    """Over 64 KiB: 413 ``too_large`` as soon as the server knows, the
    connection closed, nothing handled; at 64 KiB the request goes on."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    def test_an_announced_body_over_the_cap_is_refused_before_it_is_sent(self) -> None:
        """Only the head is sent: the 413 comes without waiting for 10 MiB."""
        head = (b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: 10485760\r\n\r\n")
        status, headers, body = exchange(self.server, head)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"], "too_large")
        self.assertEqual(headers.get("connection"), "close")

    def test_a_chunked_body_growing_over_the_cap_is_refused(self) -> None:
        """No length announced: refused at the byte that passes the cap."""
        size = MAX_BODY + 1
        head = (b"POST /create_session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        status, _, body = exchange(self.server, head, b"%x\r\n" % size + b" " * size)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"], "too_large")

    def test_a_body_at_the_cap_is_handled(self) -> None:
        head = (b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % MAX_BODY)
        status, _, body = exchange(self.server, head, b"x" * MAX_BODY)
        self.assertEqual(status, 405)  # /health is GET and HEAD: the resource saw the request
        self.assertEqual(json.loads(body)["error"], "method_not_allowed")
