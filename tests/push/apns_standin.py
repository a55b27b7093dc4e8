"""A local stand-in for APNs: HTTP/2 (the ``h2`` library) over TLS with ALPN
``h2`` on 127.0.0.1, with a throwaway self-signed certificate.

It records every request (which connection, stream, headers, body) and
answers as the test scripts::

    standin = APNsStandIn(directory)                 # writes apns-standin.pem / .key there
    standin.start()                                  # listens on a free port
    standin.script(Reply(410, reason="Unregistered"))
    ... the provider, with endpoint=standin.url and ca_file=standin.ca_file ...
    standin.received[0].headers["apns-topic"]
    yield standin.stop()

An answer is a :class:`Reply`, or :data:`HANG` (no answer: the stream stays
open until the client resets it or the test calls :meth:`APNsStandIn.reply`).
Scripted answers are used in order; then :attr:`APNsStandIn.default`.

Run it alone to point a development server at it (it prints every request)::

    python -m tests.push.apns_standin --port 8443 --directory /tmp/apns
    # then [apns] endpoint = "https://127.0.0.1:8443", ca_file = "/tmp/apns/apns-standin.pem"
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, PingReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


def make_certificate(directory: str, address: str = "127.0.0.1", name: str = "apns-standin") -> tuple[str, str]:
    """A self-signed certificate for the IP ``address`` (its IP SAN) with a
    new P-256 key, written as ``<name>.pem`` and
    ``<name>.key`` in ``directory``: their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    # a subject of its own: a trust store holding several of these finds each by it
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {uuid.uuid4().hex[:8]}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def server_options(cert_path: str, key_path: str, protocols: list[bytes]) -> ssl.CertificateOptions:
    """TLS server options with this certificate and key, offering
    ``protocols`` by ALPN."""
    with open(cert_path, "rb") as f, open(key_path, "rb") as g:
        certificate, key = x509.load_pem_x509_certificate(f.read()), serialization.load_pem_private_key(g.read(), None)
    # cryptography objects: pyOpenSSL deprecates its own PKey and X509 here
    return ssl.CertificateOptions(privateKey=key, certificate=certificate,
                                  acceptableProtocols=protocols or None)


@dataclass
class Received:
    """One request as the stand-in received it."""

    connection: int
    """Which accepted connection (1 for the first)."""
    stream_id: int
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.headers.get(":path", "")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """An answer: a status, headers, and an APNs error ``reason`` (sent as
    ``{"reason": ...}``) or a raw ``body``."""

    status: int = 200
    reason: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


HANG = "hang"
"""A scripted answer: do not answer this request."""

Script = Union[Reply, str, Callable[[Received], Union[Reply, str]]]


class _StandInProtocol(Protocol):
    """One client connection: an h2 server connection."""

    def __init__(self, standin: APNsStandIn, number: int) -> None:
        self.standin = standin
        self.number = number
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.partial: dict[int, Received] = {}
        self.open_streams: set[int] = set()
        self.frozen = False

    def connectionMade(self) -> None:
        self.conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: self.standin.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: self.standin.initial_window_size})
        self.conn.initiate_connection()
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        if self.frozen:
            return  # a peer that died silently: reads nothing, answers nothing
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.flush()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self.open_streams.add(event.stream_id)
                self.standin.most_open = max(self.standin.most_open, len(self.open_streams))
                self.partial[event.stream_id] = Received(self.number, event.stream_id, dict(event.headers))
            elif isinstance(event, DataReceived):
                self.partial[event.stream_id].body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                received = self.partial.pop(event.stream_id)
                self.standin.received.append(received)
                answer = self.standin.next_answer(received)
                if isinstance(answer, Reply):
                    self.reply(received.stream_id, answer)
                else:
                    self.standin.hung.append(received)
            elif isinstance(event, StreamReset):
                self.open_streams.discard(event.stream_id)
                self.standin.resets.append((self.number, event.stream_id, int(event.error_code or 0)))
            elif isinstance(event, PingReceived):
                self.standin.pings += 1  # h2 acknowledges it
            elif isinstance(event, ConnectionTerminated):
                self.transport.loseConnection()  # type: ignore[union-attr]
        self.flush()

    def reply(self, stream_id: int, answer: Reply) -> None:
        body = answer.body if answer.body is not None else (
            json.dumps({"reason": answer.reason}).encode() if answer.reason else b"")
        headers = [(":status", str(answer.status)), ("apns-id", str(uuid.uuid4()))]
        headers += [(name.lower(), value) for name, value in answer.headers.items()]
        self.conn.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.open_streams.discard(stream_id)
        self.flush()

    def goaway(self, last_stream_id: int) -> None:
        """Send GOAWAY naming ``last_stream_id`` and close (written as a raw
        frame: h2 would refuse to answer anything after its own GOAWAY)."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = 0
        frame.additional_data = b'{"reason":"Shutdown"}'
        self.transport.write(frame.serialize())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.standin.live.discard(self)
        self.standin.closed += 1


class _StandInFactory(Factory):
    def __init__(self, standin: APNsStandIn) -> None:
        self.standin = standin

    def buildProtocol(self, addr: Any) -> _StandInProtocol:
        self.standin.connections += 1
        protocol = _StandInProtocol(self.standin, self.standin.connections)
        self.standin.live.add(protocol)
        return protocol


class APNsStandIn:
    """The stand-in server (see the module docstring)."""

    def __init__(self, directory: str, *, name: str = "apns-standin", max_concurrent_streams: int = 100,
                 initial_window_size: int = 65535, reactor: Any = None) -> None:
        """Its certificate and key go to ``directory`` as ``<name>.pem`` and
        ``<name>.key``; ``max_concurrent_streams`` and
        ``initial_window_size`` are the SETTINGS it announces."""
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.ca_file, self.key_file = make_certificate(directory, name=name)
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.received: list[Received] = []
        self.hung: list[Received] = []
        self.resets: list[tuple[int, int, int]] = []
        self.connections = 0
        self.closed = 0
        self.most_open = 0
        self.pings = 0
        self.live: set[_StandInProtocol] = set()
        self.default: Script = Reply(200)
        self._scripted: deque[Script] = deque()
        self._port: Any = None

    def start(self, port: int = 0) -> APNsStandIn:
        """Listen on 127.0.0.1 (a free port unless ``port``), TLS with ALPN h2."""
        options = server_options(self.ca_file, self.key_file, [b"h2"])
        self._port = self.reactor.listenSSL(port, _StandInFactory(self), options, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port.getHost().port}"

    def script(self, *answers: Script) -> None:
        """Answer the next requests with these, in order."""
        self._scripted.extend(answers)

    def next_answer(self, received: Received) -> Reply | str:
        answer = self._scripted.popleft() if self._scripted else self.default
        return answer(received) if callable(answer) else answer

    def _protocol(self, number: int) -> _StandInProtocol:
        return next(p for p in self.live if p.number == number)

    def reply(self, received: Received, answer: Reply) -> None:
        """Answer a request that was left hanging."""
        self._protocol(received.connection).reply(received.stream_id, answer)

    def goaway(self, connection: int, last_stream_id: int) -> None:
        """Send GOAWAY on connection number ``connection`` and close it."""
        self._protocol(connection).goaway(last_stream_id)

    def freeze(self, connection: int) -> None:
        """Make connection number ``connection`` silent from now on (it
        neither reads nor answers, PINGs included), as a dead peer would."""
        protocol = self._protocol(connection)
        protocol.frozen = True
        protocol.transport.pauseProducing()  # type: ignore[union-attr]  # not even TLS reads

    def stop(self) -> Deferred[Any]:
        """Stop listening and close every connection."""
        for protocol in list(self.live):
            protocol.transport.abortConnection()  # type: ignore[union-attr]
        return DeferredList([self._port.stopListening() if self._port else succeed(None)])


def main() -> None:
    """Run the stand-in until interrupted, printing each request."""
    parser = argparse.ArgumentParser(description="A local APNs stand-in (HTTP/2, TLS, ALPN h2) on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--directory", default=".", help="where to write its certificate (pem) and key")
    parser.add_argument("--status", type=int, default=200, help="the status of every answer")
    parser.add_argument("--reason", default=None, help="the APNs reason of every answer (e.g. Unregistered)")
    args = parser.parse_args()
    from twisted.internet import reactor

    standin = APNsStandIn(args.directory, reactor=reactor)
    reply = Reply(args.status, reason=args.reason)

    def log_and_answer(received: Received) -> Reply:
        print(json.dumps({"connection": received.connection, "stream": received.stream_id,
                          "headers": received.headers, "body": received.body.decode(errors="replace")}),
              flush=True)
        return reply

    standin.default = log_and_answer
    standin.start(args.port)
    print(f"APNs stand-in on {standin.url}; trust {standin.ca_file}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
