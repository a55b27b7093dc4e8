"""End-to-end: peer links between real server processes on 127.0.0.1.

Two servers link up (``/health`` lists the link), only a handshake made with
the cluster secret opens ``/peer`` (a client key, a wrong secret and a
replayed handshake are refused), a link cut by ``kill -9`` comes back by
itself, a frame from a peer is delivered here once and never forwarded, and
links run over wss with a CA the test makes (and fail with another CA).
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import signal
import socket
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from allspark.mesh import PEER_PROOF_HEADER, PEER_TOKEN_HEADER, PeerAuth, derive_peer_key, encode_peer_frame, \
    decode_peer_frame
from tests.e2e.helpers import IO_TIMEOUT, HTTPAnswer, health, pre_connect, wait_until, ws_path_and_query, \
    ws_read_frames
from tests.support import CLUSTER_SECRET, ServerProcess, client_for, free_port, key

#: A slow heartbeat: the raw sockets of these tests read frames, not pings.
QUIET = ("--peer-heartbeat=60",)


def server_id(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.port}"


def peer_url(server: ServerProcess, scheme: str = "ws", port: int | None = None) -> str:
    return f"{scheme}://127.0.0.1:{port or server.port}/peer"


def token_for(server: ServerProcess, secret: str = CLUSTER_SECRET, sender: str = "test-peer") -> str:
    """A peer handshake token from ``sender`` to ``server``."""
    return PeerAuth(derive_peer_key(secret.encode()), sender, reactor).token(server_id(server))


def peer_handshake(server: ServerProcess, headers: dict[str, str], path: str = "/peer"
                   ) -> tuple[HTTPAnswer, socket.socket]:
    """Open ``path`` with ``headers`` over a plain socket: the HTTP answer
    and the socket (open after a 101; the caller closes it)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
             "Sec-WebSocket-Version: 13", *(f"{name}: {value}" for name, value in headers.items())]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    deadline = time.monotonic() + IO_TIMEOUT
    for _ in range(10_000):  # byte by byte until the head ends, then the body until close
        if data.startswith(b"HTTP/1.1 101") and data.endswith(b"\r\n\r\n"):
            break
        if time.monotonic() > deadline:
            break
        byte = sock.recv(1 if b"\r\n\r\n" not in data else 65536)
        if not byte:
            break
        data += byte
    head, _, body = data.partition(b"\r\n\r\n")
    lines_in = head.decode("latin-1").split("\r\n")
    answer_headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines_in[1:])}
    answer = HTTPAnswer(int(lines_in[0].split()[1]), answer_headers, body)
    if answer.status != 101:
        sock.close()
    return answer, sock


def ws_binary_frame(payload: bytes) -> bytes:
    """``payload`` as one masked binary WebSocket frame."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes([0x82, 0x80 | length])
    else:
        head = bytes([0x82, 0x80 | 126]) + length.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def peers_of(server: ServerProcess) -> dict[str, Any]:
    return health(server).get("peers", {})


def linked(a: ServerProcess, b: ServerProcess) -> bool:
    return server_id(b) in peers_of(a) and server_id(a) in peers_of(b)


def pair(testcase: TestCase, extra_a: tuple[str, ...] = (), extra_b: tuple[str, ...] = (),
         urls: tuple[str, str] | None = None) -> tuple[ServerProcess, ServerProcess]:
    """Two servers told about each other (the lower id dials)."""
    a, b = ServerProcess(), ServerProcess()
    url_a, url_b = urls or (peer_url(a), peer_url(b))
    a.args = (f"--peer={server_id(b)}={url_b}", *extra_a)
    b.args = (f"--peer={server_id(a)}={url_a}", *extra_b)
    for server in (a, b):
        server.start()
        testcase.addCleanup(server.stop)
    return a, b


class PeerLinkTests(TestCase):
    timeout = 120

    async def test_two_servers_link_up(self) -> None:
        a, b = pair(self)
        await wait_until(lambda: linked(a, b), 20, 0.1, "the peer link")
        low, high = sorted((a, b), key=server_id)
        self.assertEqual(peers_of(low)[server_id(high)]["direction"], "out")
        self.assertEqual(peers_of(high)[server_id(low)]["direction"], "in")
        self.assertIn("peer link up", a.log())

    async def test_a_frozen_peer_is_dropped_by_the_pings_and_relinked_when_it_wakes(self) -> None:
        a, b = pair(self, ("--peer-heartbeat=1",), ("--peer-heartbeat=1",))
        await wait_until(lambda: linked(a, b), 20, 0.1, "the peer link")
        low, high = sorted((a, b), key=server_id)
        assert high.proc is not None
        high.proc.send_signal(signal.SIGSTOP)  # no FIN, no RST: only the pings can tell
        try:
            await wait_until(lambda: not peers_of(low), 30, 0.1, "the ping timeout")
        finally:
            high.proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: linked(a, b), 30, 0.1, "the link coming back")

    async def test_servers_sharing_a_store_find_each_other_in_their_records(self) -> None:
        a = ServerProcess().start()
        self.addCleanup(a.stop)
        b = ServerProcess(data_dir=a.data_dir).start()  # one SQLite file, no --peer
        self.addCleanup(b.stop)
        await wait_until(lambda: linked(a, b), 30, 0.1, "the peer link")
        b.stop()  # a clean stop removes its record: no more dialling
        await wait_until(lambda: not peers_of(a), 30, 0.1, "the link going down")

    async def test_a_killed_peer_comes_back_by_itself(self) -> None:
        a, b = pair(self)
        await wait_until(lambda: linked(a, b), 20, 0.1, "the peer link")
        for victim, survivor in ((b, a), (a, b)):  # the acceptor, then the dialer
            victim.kill()
            await wait_until(lambda: server_id(victim) not in peers_of(survivor), 30, 0.1, "the link going down")
            victim.start(force=True)
            await wait_until(lambda: linked(a, b), 30, 0.1, "the link coming back")


class PeerHandshakeTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = ServerProcess(args=QUIET).start()
        self.addCleanup(self.server.stop)

    def refused(self, headers: dict[str, str], path: str = "/peer") -> dict[str, Any]:
        answer, _ = peer_handshake(self.server, headers, path)
        self.assertEqual(answer.status, 401, answer)
        body: dict[str, Any] = json.loads(answer.body)
        return body

    def test_the_cluster_secret_opens_a_link_and_the_server_proves_it_back(self) -> None:
        token = token_for(self.server)
        answer, sock = peer_handshake(self.server, {PEER_TOKEN_HEADER: token})
        with sock:
            self.assertEqual(answer.status, 101)
            auth = PeerAuth(derive_peer_key(CLUSTER_SECRET.encode()), "test-peer", reactor)
            self.assertTrue(auth.check_proof(token, answer.headers[PEER_PROOF_HEADER]))
            hello = decode_peer_frame(ws_read_frames(sock, lambda f: len(f) >= 1, 10)[0])
            self.assertEqual((hello.type, hello.fields), ("hello", {"server_id": server_id(self.server)}))

    def test_no_token_a_wrong_secret_or_a_client_key_is_refused(self) -> None:
        self.assertEqual(self.refused({})["error"], "missing_token")
        wrong = token_for(self.server, secret="not-the-cluster-secret-0123456789")
        self.assertEqual(self.refused({PEER_TOKEN_HEADER: wrong})["error"], "bad_token")
        auth_key = key("n1")
        self.assertEqual(self.refused({PEER_TOKEN_HEADER: auth_key})["error"], "bad_token")
        # a client's whole credentials, as the client socket takes them
        info = pre_connect(self.server, {"auth_key": auth_key}).json()
        query = ws_path_and_query(info["node"]["ws_url"]).partition("?")[2]
        self.assertEqual(self.refused({}, f"/peer?{query}")["error"], "missing_token")
        self.assertEqual(self.refused({PEER_TOKEN_HEADER: info["validation_token"]})["error"], "bad_token")
        self.assertEqual(self.refused({PEER_TOKEN_HEADER: token_for(self.server, sender=server_id(self.server))}
                                      )["error"], "foreign_token")

    def test_a_replayed_handshake_is_refused(self) -> None:
        token = token_for(self.server)
        answer, sock = peer_handshake(self.server, {PEER_TOKEN_HEADER: token})
        sock.close()
        self.assertEqual(answer.status, 101)
        self.assertEqual(self.refused({PEER_TOKEN_HEADER: token})["error"], "replayed_token")


class PeerFrameTests(TestCase):
    timeout = 120

    async def test_a_frame_from_a_peer_is_delivered_here_once_and_never_forwarded(self) -> None:
        a, b = pair(self, QUIET, QUIET)
        await wait_until(lambda: linked(a, b), 20, 0.1, "the peer link")
        on_a = await client_for(self, a, "on-a")
        on_b = await client_for(self, b, "on-b")
        answer, sock = peer_handshake(a, {PEER_TOKEN_HEADER: token_for(a)})
        self.addCleanup(sock.close)
        self.assertEqual(answer.status, 101)
        crafted = json.dumps({"src_id": "x", "body": "crafted", "forwarded": False, "hops": 0}).encode()
        sock.sendall(ws_binary_frame(encode_peer_frame("nonsense", id=1)))
        sock.sendall(ws_binary_frame(b'{"v":9,"t":"deliver","id":2}\n'))
        # claims to come from elsewhere, asks for a forward: A writes it to its own node only
        sock.sendall(ws_binary_frame(encode_peer_frame("deliver", crafted, to=["on-a", "on-b"], id=3,
                                                       forwarded=True, forward_to=server_id(b))))
        frames = ws_read_frames(sock, lambda f: len(f) >= 4, 20)  # hello, 2 errors, delivered
        replies = [decode_peer_frame(f) for f in frames[1:4]]
        self.assertEqual([(r.type, r.fields.get("code")) for r in replies[:2]],
                         [("error", "unknown_type"), ("error", "unsupported_version")])
        self.assertEqual((replies[2].type, replies[2].fields), ("delivered", {"id": 3, "missing": ["on-b"]}))
        got = await on_a.next_message(10)
        self.assertEqual(got["body"], "crafted")
        # the link is still open after the bad frames; markers behind the crafted frame
        sock.sendall(ws_binary_frame(encode_peer_frame("deliver", b'{"body":"marker"}', to=["on-a"])))
        self.assertEqual((await on_a.next_message(10))["body"], "marker")
        answer_b, sock_b = peer_handshake(b, {PEER_TOKEN_HEADER: token_for(b)})
        self.addCleanup(sock_b.close)
        sock_b.sendall(ws_binary_frame(encode_peer_frame("deliver", b'{"body":"marker"}', to=["on-b"])))
        self.assertEqual((await on_b.next_message(10))["body"], "marker")  # not the crafted frame
        self.assertEqual((on_a.received, on_b.received), (2, 1))


def make_ca(directory: str, name: str) -> tuple[Any, Any, str]:
    """A self-signed CA in ``directory``: its certificate, key and PEM path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    path = os.path.join(directory, f"{name}.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert, ca_key, path


def make_server_cert(directory: str, ca: tuple[Any, Any, str], name: str,
                     address: str = "127.0.0.1") -> tuple[str, str]:
    """A certificate for the IP ``address`` (its common name and IP SAN)
    signed by ``ca``: its PEM path and its key's."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert, ca_key, _ = ca
    server_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca_cert.subject).public_key(server_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return cert_path, key_path


class PeerTLSTests(TestCase):
    timeout = 120

    def tls_pair(self, ca_for_a: str, ca_for_b: str, ca: tuple[Any, Any, str], directory: str
                 ) -> tuple[ServerProcess, ServerProcess]:
        """Two servers with an HTTP port each and a TLS port their peer dials."""
        tls_ports = free_port(), free_port()
        args = []
        for index, (port, ca_path) in enumerate(zip(tls_ports, (ca_for_a, ca_for_b))):
            cert, key_path = make_server_cert(directory, ca, f"server{index}")
            args.append((f"--listen=ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert}",
                         f"--peer-tls-ca={ca_path}", f"--peer-tls-cert={cert}", f"--peer-tls-key={key_path}"))
        a, b = ServerProcess(), ServerProcess()
        for server, own, other, other_tls in ((a, args[0], b, tls_ports[1]), (b, args[1], a, tls_ports[0])):
            server.args = (f"--listen=tcp:{server.port}:interface=127.0.0.1", *own,
                           f"--peer={server_id(other)}={peer_url(other, 'wss', other_tls)}")
        for server in (a, b):
            server.start()
            self.addCleanup(server.stop)
        return a, b

    async def test_a_link_over_wss_verified_against_the_ca(self) -> None:
        directory = tempfile.mkdtemp(prefix="allspark-tls-")
        ca = make_ca(directory, "ca")
        a, b = self.tls_pair(ca[2], ca[2], ca, directory)
        await wait_until(lambda: linked(a, b), 30, 0.1, "the wss peer link")

    async def test_a_peer_certificate_from_another_ca_is_refused(self) -> None:
        directory = tempfile.mkdtemp(prefix="allspark-tls-")
        ca, other_ca = make_ca(directory, "ca"), make_ca(directory, "other-ca")
        # both servers' certificates come from ca; both trust only other_ca
        a, b = self.tls_pair(other_ca[2], other_ca[2], ca, directory)
        low = min((a, b), key=server_id)
        await wait_until(lambda: low.log().count("could not open the peer link") >= 2, 30, 0.2,
                         "two refused attempts")
        self.assertFalse(peers_of(a) or peers_of(b))
        self.assertIn("certificate verify failed", low.log())
