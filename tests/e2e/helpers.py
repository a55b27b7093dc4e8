"""Blocking HTTP and raw-handshake helpers for the end-to-end tests.

The servers under test are separate processes, so a short blocking call from
the test process never holds up the server.  Every call here has a timeout.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from tests.support import CLUSTER_SECRET, ROOT, SECRET, ServerProcess, sleep, twistd

#: Seconds any single blocking call may take.
IO_TIMEOUT = 5.0


@dataclass(frozen=True)
class HTTPAnswer:
    """An HTTP response: its status, headers (lower-case names) and raw body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def http_get(url: str, timeout: float = IO_TIMEOUT, headers: dict[str, str] | None = None) -> HTTPAnswer:
    """GET ``url`` (with ``headers``); any status is returned, not raised."""
    return http_request(url, "GET", headers=headers, timeout=timeout)


def http_request(url: str, method: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 timeout: float = IO_TIMEOUT) -> HTTPAnswer:
    """``method`` on ``url`` with ``body`` and ``headers``; any status is
    returned, not raised."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return HTTPAnswer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        with e:
            return HTTPAnswer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def pre_connect(server: ServerProcess, query: dict[str, str], path: str = "/") -> HTTPAnswer:
    """Pre-connection with ``query``; ``path`` ``/`` adds the seed's
    ``get_pre_connection_info=true``."""
    if path == "/":
        query = {"get_pre_connection_info": "true", **query}
    return http_get(f"{server.base_url}{path}?{urlencode(query)}")


def ws_path_and_query(ws_url: str) -> str:
    """The path and query string of a ``ws://`` URL."""
    parts = urlsplit(ws_url)
    return f"{parts.path}?{parts.query}"


def raw_handshake(server: ServerProcess, path_and_query: str, timeout: float = IO_TIMEOUT,
                  headers: dict[str, str] | None = None) -> HTTPAnswer:
    """Send a WebSocket opening handshake for ``path_and_query`` (with extra
    ``headers``) over a plain socket and return the server's HTTP answer (101
    when accepted; the socket is then closed without a close frame).  The
    body is read until the server closes the connection or ``timeout``
    passes."""
    request = (
        f"GET {path_and_query} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()) +
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    deadline = time.monotonic() + timeout
    data = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        for _ in range(1000):
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0 and data.startswith(b"HTTP/1.1 101"):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise AssertionError(f"no HTTP answer to the handshake: {data[:200]!r}")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 101:
        body = b""
    return HTTPAnswer(status, headers, body)


def health(server: ServerProcess) -> dict[str, Any]:
    """``GET /health`` as JSON."""
    answer = http_get(server.base_url + "/health")
    assert answer.status == 200, answer
    return answer.json()


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float,
                     interval: float = 0.05, what: str = "condition") -> float:
    """Poll ``predicate`` on the reactor until it is true; the seconds it
    took.  Raises ``AssertionError`` after ``timeout`` seconds."""
    start = time.monotonic()
    for _ in range(int(timeout / interval) + 1):
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        await sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def run_to_exit(data_dir: str, port: int, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
    """Run ``twistd -n allspark`` on ``data_dir`` and ``port`` the way
    :class:`ServerProcess` does, for a start that must fail: wait for the
    process to exit (killed after ``timeout`` s) and return its status and
    output."""
    env = dict(os.environ, ALLSPARK_AUTH_SECRET=SECRET, ALLSPARK_CLUSTER_SECRET=CLUSTER_SECRET)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [twistd(), "-n", "--pidfile=", "allspark", "--host_address=127.0.0.1", f"--port={port}",
           f"--data-dir={data_dir}", *args]
    return subprocess.run(cmd, env=env, cwd=data_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout)


def raw_socket(server: ServerProcess, auth_key: str, rcvbuf: int | None = None,
               timeout: float = IO_TIMEOUT) -> socket.socket:
    """An open WebSocket to ``server`` for ``auth_key`` over a plain socket,
    after pre-connection and the opening handshake, with nothing read past
    the 101 answer.  ``rcvbuf`` shrinks the kernel's receive buffer (set
    before connecting), for a client that reads slowly or never.  The caller
    closes it."""
    info = pre_connect(server, {"auth_key": auth_key}).json()
    path = ws_path_and_query(info["node"]["ws_url"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall((
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode())
    head = b""
    for _ in range(10_000):  # byte by byte: leave the first frame in the kernel buffer
        if head.endswith(b"\r\n\r\n"):
            break
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise AssertionError(f"handshake refused: {head[:200]!r}")
    return sock


def ws_text_frame(payload: bytes) -> bytes:
    """``payload`` as one masked WebSocket text frame, as a client sends it."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes([0x81, 0x80 | length])
    elif length < 65536:
        head = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def ws_read_frames(sock: socket.socket, done: Callable[[list[bytes]], bool],
                   timeout: float = 30.0) -> list[bytes]:
    """Read the server's (unmasked) frames from ``sock`` until ``done(frames)``
    is true; their payloads.  Raises ``AssertionError`` after ``timeout`` s
    or when the server closes the connection first."""
    deadline = time.monotonic() + timeout
    buffer = b""
    frames: list[bytes] = []
    for _ in range(1_000_000):
        while len(buffer) >= 2:
            length, start = buffer[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                break
            frames.append(buffer[start:start + length])
            buffer = buffer[start + length:]
        if done(frames):
            return frames
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except socket.timeout:
            break
        if not chunk:
            break
        buffer += chunk
    raise AssertionError(f"not done after {len(frames)} frames: {[f[:80] for f in frames[-3:]]}")
