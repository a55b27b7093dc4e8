"""etc/nginx/allspark.conf, proven: Debian's nginx in front of two servers.

nginx runs as a child process of the test (never the system service), with
``etc/nginx/allspark.conf`` included as written except for its ports (the
``listen`` port, on 127.0.0.1, and each ``proxy_pass`` port) and its log path.
The two servers share a store (one cluster) and each has the proxy address of
its ``server`` block (``--proxy_80_port``) and trusts nginx (``--trusted-proxy
127.0.0.1``).  A client asks pre-connection through nginx with ``need_proxy``
and opens the WebSocket at the ``ws_url`` it names, through nginx; the proxy
host names resolve to 127.0.0.1 through a resolver installed on the reactor for
the test, so nginx picks the ``server`` block by the ``Host`` header, as it does
in production.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IResolverSimple
from twisted.trial import unittest
from zope.interface import implementer

from allspark.client import open_socket, pre_connection
from tests.e2e.helpers import IO_TIMEOUT, wait_until
from tests.support import ROOT, ServerProcess, _die_with_parent, free_port, key

CONF = os.path.join(ROOT, "etc", "nginx", "allspark.conf")
#: The ports the sample's server blocks proxy to, and their host names.
SAMPLE_PORTS = {8080: "message-server1-8080.example.com", 8081: "message-server1-8081.example.com"}
#: An address the test's client claims to come from (documentation range, RFC 5737).
CLIENT_ADDRESS = "198.51.100.7"


def find_nginx() -> str | None:
    """Debian's nginx binary, if installed (``./dev test`` installs it)."""
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None)


def sample_conf(listen_port: int, upstream: dict[int, int], log_dir: str) -> str:
    """etc/nginx/allspark.conf with only its ports and paths substituted:
    ``listen 80`` becomes ``listen 127.0.0.1:<listen_port>``, each
    ``proxy_pass`` port its test server's port, ``/var/log/nginx/`` ``log_dir``."""
    with open(CONF) as f:
        text = f.read()
    assert text.count("listen 80;") == len(SAMPLE_PORTS), "the sample's listen lines changed"
    text = text.replace("listen 80;", f"listen 127.0.0.1:{listen_port};")
    for sample_port, port in upstream.items():
        line = f"proxy_pass http://127.0.0.1:{sample_port};"
        assert text.count(line) == 1, f"the sample has no {line!r}"
        text = text.replace(line, f"proxy_pass http://127.0.0.1:{port};")
    return text.replace("/var/log/nginx/", log_dir.rstrip("/") + "/")


def main_conf(prefix: str) -> str:
    """The main nginx.conf around the sample: foreground, every path in ``prefix``."""
    user = "user root root;\n" if os.geteuid() == 0 else ""  # the workers must reach the temp dir
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log info;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n{temp}    access_log {prefix}/access.log;\n    include {prefix}/allspark.conf;\n}}\n")


class NginxProcess:
    """nginx with the sample config, as a child process on 127.0.0.1."""

    def __init__(self, binary: str, port: int, upstream: dict[int, int]) -> None:
        self.prefix = tempfile.mkdtemp(prefix="allspark-nginx-")
        self.port = port
        with open(os.path.join(self.prefix, "allspark.conf"), "w") as f:
            f.write(sample_conf(port, upstream, self.prefix))
        with open(os.path.join(self.prefix, "nginx.conf"), "w") as f:
            f.write(main_conf(self.prefix))
        self.cmd = [binary, "-e", os.path.join(self.prefix, "error.log"), "-p", self.prefix,
                    "-c", os.path.join(self.prefix, "nginx.conf")]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> "NginxProcess":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen within {timeout}s:\n{self.error_log()}")

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.prefix, "error.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        """SIGQUIT (nginx's graceful stop), then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@implementer(IResolverSimple)
class ProxyNames:
    """Resolves the sample's host names to 127.0.0.1 (anything else as before)."""

    def __init__(self, fallback: IResolverSimple) -> None:
        self.fallback = fallback

    def getHostByName(self, name: str, timeout: Any = ()) -> Deferred[str]:
        if name in SAMPLE_PORTS.values():
            return succeed("127.0.0.1")
        return self.fallback.getHostByName(name, timeout)


def raw_request(port: int, head: str) -> tuple[int, bytes]:
    """Send ``head`` (a request without a body) to 127.0.0.1:``port``; the
    status and what came back until the end of the answer's head (or the
    connection's end, or a timeout)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(head.encode())
        for _ in range(1000):
            if b"\r\n\r\n" in data and (data.startswith(b"HTTP/1.1 101") or b"}" in data):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


class NginxTests(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        binary = find_nginx()
        if binary is None:
            raise unittest.SkipTest("nginx is not installed (./dev test installs Debian's nginx; "
                                    "or apt-get install nginx)")
        shared = tempfile.mkdtemp(prefix="allspark-nginx-cluster-")
        self.nginx_port = free_port()
        self.servers: dict[str, ServerProcess] = {}
        for sample_port, name in SAMPLE_PORTS.items():
            server = ServerProcess(args=(f"--store=sqlite:///{shared}/cluster.db",
                                         f"--proxy_80_port={name}:{self.nginx_port}",
                                         "--trusted-proxy", "127.0.0.1"))
            self.servers[name] = server.start()
            self.addCleanup(server.stop)
        self.nginx = NginxProcess(binary, self.nginx_port,
                                  {sample: self.servers[name].port for sample, name in SAMPLE_PORTS.items()})
        self.nginx.start()
        self.addCleanup(self.nginx.stop)
        old_resolver, old_names = reactor.resolver, reactor.nameResolver
        reactor.installResolver(ProxyNames(old_resolver))
        self.addCleanup(reactor.installNameResolver, old_names)
        self.addCleanup(reactor.installResolver, old_resolver)

    def base_url(self, name: str = SAMPLE_PORTS[8080]) -> str:
        return f"http://{name}:{self.nginx_port}"

    async def connect_through_nginx(self, node_id: str) -> Any:
        """Pre-connection with need_proxy through nginx, then the WebSocket
        at the ws_url it names (through nginx too); the connected client."""
        info = await pre_connection(self.base_url(), key(node_id), need_proxy=True)
        ws = urlsplit(info["node"]["ws_url"])
        self.assertIn(ws.hostname, SAMPLE_PORTS.values())
        self.assertEqual((ws.scheme, ws.port, ws.path), ("ws", self.nginx_port, "/ws"))
        self.assertEqual(info["node"]["proxy_address"], f"{ws.hostname}:{self.nginx_port}")
        client = await open_socket(reactor, info["node"]["ws_url"])
        self.addCleanup(lambda: client.drop() if client.protocol is not None else None)
        await client.sync()
        # the socket went through nginx: its peer is nginx's port, not a server's
        peer = client.protocol.transport.getPeer()
        self.assertEqual((peer.host, peer.port), ("127.0.0.1", self.nginx_port))
        return client

    async def test_a_message_round_trip_through_nginx(self) -> None:
        alice = await self.connect_through_nginx("alice")
        bob = await self.connect_through_nginx("bob")
        accepted = await alice.send(dest_id="bob", payload={"text": "through nginx"})
        self.assertEqual(accepted["status"], "delivered")
        got = await bob.next_message()
        self.assertEqual((got["src_id"], got["payload"]), ("alice", {"text": "through nginx"}))
        # and back, stored while bob's reply waits for nobody
        await bob.send(dest_id="alice", payload="pong")
        self.assertEqual((await alice.next_message())["payload"], "pong")

    async def test_both_servers_are_reached_by_their_host_names(self) -> None:
        for name, server in self.servers.items():
            status, data = raw_request(self.nginx_port, f"GET /health HTTP/1.1\r\nHost: {name}:{self.nginx_port}"
                                                        "\r\nConnection: close\r\n\r\n")
            self.assertEqual(status, 200, data)
            self.assertIn(f'"node_id":"127.0.0.1:{server.port}"'.encode(), data.replace(b" ", b""))
            # the metrics stay inside: nginx does not forward /metrics, the node's own port serves it
            status, data = raw_request(self.nginx_port, f"GET /metrics HTTP/1.1\r\nHost: {name}:{self.nginx_port}"
                                                        "\r\nConnection: close\r\n\r\n")
            self.assertEqual(status, 404, data)
            status, data = raw_request(server.port, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                    "Connection: close\r\n\r\n")
            self.assertEqual(status, 200, data)

    async def test_the_server_sees_the_forwarded_client_address(self) -> None:
        host = SAMPLE_PORTS[8081]
        query = urlencode({"get_pre_connection_info": "true", "auth_key": key("carol"), "need_proxy": "true"})
        status, data = raw_request(self.nginx_port, f"GET /?{query} HTTP/1.1\r\nHost: {host}:{self.nginx_port}\r\n"
                                                    f"X-Forwarded-For: {CLIENT_ADDRESS}\r\nConnection: close\r\n\r\n")
        self.assertEqual(status, 200, data)
        import json

        info = json.loads(data.partition(b"\r\n\r\n")[2])
        ws = urlsplit(info["node"]["ws_url"])
        status, data = raw_request(self.nginx_port, (
            f"GET {ws.path}?{ws.query} HTTP/1.1\r\nHost: {ws.hostname}:{ws.port}\r\n"
            f"X-Forwarded-For: {CLIENT_ADDRESS}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"))
        self.assertEqual(status, 101, data)
        target = self.servers[ws.hostname]
        # nginx appended its own hop (127.0.0.1, trusted): the client is the address before it
        await wait_until(lambda: f"connected carol from {CLIENT_ADDRESS}" in target.log(), 10,
                         what="the server logging carol's forwarded address")
        self.assertIn(CLIENT_ADDRESS, self.servers[host].log())  # the pre-connection's access log line
