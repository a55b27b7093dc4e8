"""Apple Push Notification service (APNs): token authentication over HTTP/2.

One :class:`APNsProvider` per team.  It signs an ES256 provider token (a JWT
whose header names the key, ``kid``, and whose claims are the team, ``iss``,
and the time it was made, ``iat``) with the team's ``.p8`` key and reuses it
for :data:`TOKEN_REUSE_S` (Apple refuses a new token more often than every 20
minutes and rejects one older than 60); an answer ``403
ExpiredProviderToken`` makes a new one at once.

Apple wants few, long-lived connections: connecting again and again is
treated as abuse.  So each endpoint (production, and the sandbox for targets
registered with ``environment: development``) has ONE HTTP/2 connection
(:class:`_EndpointConnection`), opened on the first send, negotiated with
ALPN ``h2`` over TLS that is always verified, and shared by all concurrent
requests as streams: at most the peer's ``MAX_CONCURRENT_STREAMS`` at a time
(the rest wait in order), bodies sent as the flow-control windows allow.  A
GOAWAY closes the connection and the next request opens a new one; requests
the peer says it never saw (stream ids above its ``last_stream_id``) are sent
again there (once), those it saw but had not answered are answered ``RETRY``
(``goaway``: ``h2`` reads no frame after a GOAWAY).  A connection that drops
answers its open streams ``RETRY`` (``connection_lost``) and is opened again
for the requests still waiting.

A send is one request, classified (:func:`classify`); cancelling its Deferred
(the dispatcher's timeout) resets only that stream with ``RST_STREAM
CANCEL``, never the connection.  Everything else (retries, backoff,
``Retry-After``) is the dispatcher's.

HTTP/2 is spoken with the ``h2`` library (a state machine without I/O) on a
Twisted TLS client connection: Twisted's own HTTP/2 is server-only.
"""

from __future__ import annotations

import dataclasses

import hashlib
import os
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet._sslverify import IOpenSSLTrustRoot  # not re-exported by twisted.internet.ssl
from twisted.python.failure import Failure
from zope.interface import implementer

from allspark.logs import logger
from allspark.push.config import check_keys, read_secret
from allspark.push.httpclient import retry_after_s
from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget

log = logger("allspark.push.apns")

PRODUCTION_ENDPOINT = "https://api.push.apple.com"
SANDBOX_ENDPOINT = "https://api.sandbox.push.apple.com"

TOKEN_REUSE_S = 50 * 60
"""How long one provider token is used (Apple: at most one new token per 20
minutes, none accepted after 60)."""

MAX_PAYLOAD_BYTES = 4096
"""Apple's limit for the JSON body of a notification."""

MAX_COLLAPSE_ID_BYTES = 64
"""Apple's limit for ``apns-collapse-id``."""

DEFAULT_EXPIRATION_S = 86400
"""How long Apple keeps trying to deliver a push to a device that is off
(``apns-expiration``), unless ``expiration_s`` says otherwise (0: once, now)."""

CONNECT_TIMEOUT_S = 10.0
"""How long a new connection may take to be usable (TCP, TLS, the peer's
SETTINGS); then it is closed and the waiting pushes answered ``RETRY``
(``connect_timeout``)."""

CLOSE_GRACE_S = 2.0
"""How long a closing connection waits for the peer's TLS close before it is
aborted."""

PING_INTERVAL_S = 60.0
"""A PING on an open connection this often (0: never), so that one that died
silently (a NAT or firewall forgot it) is noticed and replaced."""

PING_TIMEOUT_S = 10.0
"""A PING not acknowledged within this closes the connection.  A PING is also
sent when a push is cancelled (it timed out): is the connection still alive?"""

MAX_RESPONSE_BYTES = 65536
"""A response body larger than this is not read: the stream is reset and the
send answered ``FAILED`` (``response_too_large``)."""

DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"})
"""Apple's reasons that mean the device token will never work again."""

ENVIRONMENTS = ("production", "development")

_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,512}")
"""What may go into ``/3/device/<token>`` (Apple's tokens are hex)."""


class ProviderToken:
    """The ES256 provider token, made again only when it is
    :data:`TOKEN_REUSE_S` old or Apple said it expired."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, team_id: str, key_id: str,
                 clock: IReactorTime, reuse_s: float = TOKEN_REUSE_S) -> None:
        self._key = key
        self._team_id = team_id
        self._key_id = key_id
        self.clock = clock
        self._reuse_s = reuse_s
        self._token: str | None = None
        self._issued_at = 0.0

    def current(self) -> str:
        """The token to send now (a new one when the last is too old)."""
        now = self.clock.seconds()
        if self._token is None or now - self._issued_at >= self._reuse_s:
            self._issued_at = now
            self._token = jwt.encode({"iss": self._team_id, "iat": int(now)}, self._key,
                                     algorithm="ES256", headers={"kid": self._key_id})
            log.debug("apns provider token made", team_id=self._team_id, key_id=self._key_id)
        return self._token

    def expired(self, token: str) -> None:
        """Apple answered ``ExpiredProviderToken`` to ``token``: forget it,
        unless a newer one was made meanwhile (several streams failing with
        the same token make one new token, not one each)."""
        if token == self._token:
            self._token = None
            log.info("apns provider token expired, refreshing", team_id=self._team_id, key_id=self._key_id)


@dataclass(frozen=True)
class _Endpoint:
    """An ``https://host[:port]`` URL, parsed."""

    url: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """The ``:authority`` header: the host, and the port unless 443."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


def _parse_endpoint(url: str, key: str) -> _Endpoint:
    """``url`` as an :class:`_Endpoint`, or PushConfigError naming ``key``."""
    if not isinstance(url, str):
        raise PushConfigError(f"[apns] {key}: expected an https:// URL, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as error:
        raise PushConfigError(f"[apns] {key}: {url!r} is not a URL ({error})") from None
    if parts.scheme != "https" or not parts.hostname:
        raise PushConfigError(f"[apns] {key}: expected an https:// URL with a host, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise PushConfigError(f"[apns] {key}: expected only scheme, host and port, got {url!r}")
    return _Endpoint(url=url, host=parts.hostname, port=port)


@dataclass(eq=False)
class _Request:
    """One notification on its way: its path, headers (the pseudo-headers
    and authorization are added when its stream starts), body and result."""

    path: str
    headers: list[tuple[str, str]]
    body: bytes
    result: Deferred[PushResult]
    token: str = ""
    stream_id: int | None = None
    protocol: _H2ClientProtocol | None = None
    unsent: bytes = b""
    resent: bool = False
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    response: bytearray = field(default_factory=bytearray)

    def finish(self, result: PushResult) -> None:
        """Fire the result (unless cancelled already) and forget the stream."""
        self.protocol = None
        self.stream_id = None
        if not self.result.called:
            self.result.callback(result)


def _reason_of(body: bytes) -> str:
    """The ``reason`` of an APNs error body, or ""."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return ""
    if isinstance(parsed, dict) and isinstance(parsed.get("reason"), str):
        return str(parsed["reason"])[:100]
    return ""


def classify(status: int, headers: Mapping[str, str], body: bytes, now_s: float) -> PushResult:
    """An APNs answer as a :class:`PushResult`: 200 ``SENT``; 410 and 400
    ``BadDeviceToken``/``DeviceTokenNotForTopic`` ``DEAD_TOKEN``; 429, 5xx and
    403 ``ExpiredProviderToken`` ``RETRY`` (with ``Retry-After`` when given);
    any other status ``FAILED``.  ``reason`` is Apple's reason, else
    ``http_<status>``; ``now_s`` (Unix time) reads a dated ``Retry-After``."""
    reason = _reason_of(body) or f"http_{status}"
    if status == 200:
        return PushResult(Outcome.SENT, status, headers.get("apns-id", ""))
    if status == 410 or (status == 400 and reason in DEAD_TOKEN_REASONS):
        return PushResult(Outcome.DEAD_TOKEN, status, reason)
    if status == 429 or status >= 500 or (status == 403 and reason == "ExpiredProviderToken"):
        return PushResult(Outcome.RETRY, status, reason, retry_after_s(headers.get("retry-after"), now_s))
    return PushResult(Outcome.FAILED, status, reason)


def _collapse_id(key: str) -> str:
    """``key`` if it fits ``apns-collapse-id`` (64 bytes), else its SHA-256 in
    hex (64 characters): one device's pushes still share it."""
    if len(key.encode()) <= MAX_COLLAPSE_ID_BYTES:
        return key
    return hashlib.sha256(key.encode()).hexdigest()


def build_payload(note: Notification) -> bytes | None:
    """:func:`payload_with_data`, or without ``data`` when it does not fit
    with it (the count and the text matter more)."""
    body = payload_with_data(note)
    if body is None and note.data:
        body = payload_with_data(dataclasses.replace(note, data=None))
    return body


def payload_with_data(note: Notification) -> bytes | None:
    """The JSON body: ``aps`` (an alert with ``body`` and ``badge`` when the
    note has a non-empty text, else ``content-available: 1``) and ``allspark`` (node_id,
    unread, sender_id and session_id when given, ``data`` when given: the names FCM, Web Push and the webhook use too).  A text that
    would make it over :data:`MAX_PAYLOAD_BYTES` is shortened; None when even
    without text it would not fit."""
    extra: dict[str, Any] = {"node_id": note.node_id, "unread": note.unread}
    if note.sender_id is not None:
        extra["sender_id"] = note.sender_id
    if note.session_id is not None:
        extra["session_id"] = note.session_id
    if note.data:
        extra["data"] = note.data
    if not note.text:
        body = orjson.dumps({"aps": {"content-available": 1}, "allspark": extra})
        return body if len(body) <= MAX_PAYLOAD_BYTES else None
    body = _alert_payload(note.text, note.unread, extra)
    if len(body) <= MAX_PAYLOAD_BYTES:
        return body
    # the room the text may take: the limit less the rest of the payload and
    # the ellipsis (3 bytes); then as many characters as their JSON fits
    room = MAX_PAYLOAD_BYTES - len(_alert_payload("", note.unread, extra)) - 3
    kept = 0
    for character in note.text[:MAX_PAYLOAD_BYTES]:
        room -= len(orjson.dumps(character)) - 2
        if room < 0:
            break
        kept += 1
    if kept == 0:
        return None
    return _alert_payload(note.text[:kept] + "\u2026", note.unread, extra)


def _alert_payload(text: str, unread: int, extra: dict[str, Any]) -> bytes:
    return orjson.dumps({"aps": {"alert": {"body": text}, "badge": unread}, "allspark": extra})


@implementer(IHandshakeListener)
class _H2ClientProtocol(Protocol):
    """One HTTP/2 connection to an APNs endpoint, carrying many streams."""

    def __init__(self, owner: _EndpointConnection) -> None:
        self.owner = owner
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, _Request] = {}
        self.handshake_done = False
        self.settings_received = False
        self.alpn_refused = False
        self.going_away = False
        self.disconnected = False
        self.timed_out = False
        self.lost: Deferred[None] = Deferred()
        self._ready_deadline: IDelayedCall | None = None
        self._ping_due: IDelayedCall | None = None
        self._ping_deadline: IDelayedCall | None = None
        self._abort_later: IDelayedCall | None = None

    @property
    def ready(self) -> bool:
        """TLS is up with ``h2``, the peer's SETTINGS arrived, and neither
        GOAWAY nor a disconnection happened since."""
        return (self.handshake_done and self.settings_received and not self.going_away
                and not self.disconnected)

    def has_capacity(self) -> bool:
        """Whether one more stream may be opened now."""
        return self.ready and self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self._flush()
        self._ready_deadline = self.owner.reactor.callLater(self.owner.connect_timeout_s, self._not_ready_in_time)

    def _not_ready_in_time(self) -> None:
        self._ready_deadline = None
        self.timed_out = True
        log.warn("apns connection not ready in time", endpoint=self.owner.endpoint.url,
                 timeout_s=self.owner.connect_timeout_s, handshake_done=self.handshake_done)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _check_ready(self) -> None:
        """Once TLS (with h2) is up and the peer's SETTINGS came: stop the
        connect deadline, start the keepalive PINGs, start waiting pushes."""
        if not (self.handshake_done and self.settings_received) or self._ready_deadline is None:
            return
        self._ready_deadline.cancel()
        self._ready_deadline = None
        log.info("apns connected", endpoint=self.owner.endpoint.url,
                 max_concurrent_streams=self.conn.remote_settings.max_concurrent_streams)
        self._schedule_ping()
        self.owner.pump()

    def _schedule_ping(self) -> None:
        if self.owner.ping_interval_s > 0 and not self.disconnected:
            if self._ping_due is not None and self._ping_due.active():
                self._ping_due.cancel()
            self._ping_due = self.owner.reactor.callLater(self.owner.ping_interval_s, self.check_alive)

    def check_alive(self) -> None:
        """Send a PING (unless one is awaited); without its ACK within
        ``ping_timeout_s`` the connection is closed (its streams answered
        ``RETRY``, the next push connects again)."""
        if self.disconnected or self._ping_deadline is not None:
            return
        try:
            self.conn.ping(os.urandom(8))
        except H2Error:
            return
        self._flush()
        self._ping_deadline = self.owner.reactor.callLater(self.owner.ping_timeout_s, self._ping_unanswered)

    def _ping_unanswered(self) -> None:
        self._ping_deadline = None
        log.warn("apns connection did not answer PING, closing it", endpoint=self.owner.endpoint.url,
                 timeout_s=self.owner.ping_timeout_s, open_streams=len(self.streams))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        protocol = getattr(self.transport, "negotiatedProtocol", None)
        if protocol != b"h2":
            log.warn("apns endpoint did not negotiate h2", endpoint=self.owner.endpoint.url,
                     negotiated=repr(protocol))
            self.alpn_refused = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.handshake_done = True
        self._check_ready()

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error as error:
            log.warn("apns endpoint broke the HTTP/2 protocol", endpoint=self.owner.endpoint.url,
                     error=repr(error))
            self._flush()
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        for event in events:
            self._handle(event)
        self._flush()
        self.owner.pump()

    def _handle(self, event: Event) -> None:
        if isinstance(event, ResponseReceived) and event.stream_id in self.streams:
            request = self.streams[event.stream_id]
            for name, value in event.headers or ():
                name_s = name.decode("latin-1") if isinstance(name, bytes) else name
                value_s = value.decode("latin-1") if isinstance(value, bytes) else value
                request.response_headers[name_s.lower()] = value_s
            try:
                request.status = int(request.response_headers.get(":status", "0"))
            except ValueError:
                request.status = 0
        elif isinstance(event, DataReceived):
            if event.stream_id is not None and event.flow_controlled_length is not None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            request_or_none = self.streams.get(event.stream_id or 0)
            if request_or_none is not None:
                request_or_none.response += event.data or b""
                if len(request_or_none.response) > MAX_RESPONSE_BYTES:
                    self.reset(request_or_none, ErrorCodes.CANCEL)
                    request_or_none.finish(PushResult(Outcome.FAILED, request_or_none.status,
                                                      "response_too_large"))
        elif isinstance(event, StreamEnded):
            ended = self.streams.pop(event.stream_id or 0, None)
            if ended is not None:
                self.owner.answered(ended)
        elif isinstance(event, StreamReset):
            reset = self.streams.pop(event.stream_id or 0, None)
            if reset is not None:
                code = event.error_code
                reason = f"stream_reset_{code.name if isinstance(code, ErrorCodes) else code}"
                reset.finish(PushResult(Outcome.RETRY, reset.status, reason))
        elif isinstance(event, WindowUpdated):
            for request in list(self.streams.values()):
                if request.unsent:
                    self._send_body(request)
        elif isinstance(event, RemoteSettingsChanged):
            self.settings_received = True
            self._check_ready()
        elif isinstance(event, PingAckReceived):
            if self._ping_deadline is not None:
                self._ping_deadline.cancel()
                self._ping_deadline = None
            self._schedule_ping()
        elif isinstance(event, ConnectionTerminated):
            self._goaway(event)

    def _goaway(self, event: ConnectionTerminated) -> None:
        """The peer sent GOAWAY: streams above its ``last_stream_id`` (never
        seen by the peer) go back to the queue for a new connection (once);
        ``h2`` reads nothing more after a GOAWAY, so streams the peer did see
        but had not answered are answered ``RETRY`` (``goaway``), and this
        connection closes."""
        self.going_away = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        log.info("apns endpoint sent GOAWAY", endpoint=self.owner.endpoint.url, last_stream_id=last,
                 error_code=str(event.error_code), debug=(event.additional_data or b"")[:200].decode(errors="replace"))
        unseen = sorted(stream_id for stream_id in self.streams if stream_id > last)
        for stream_id in reversed(unseen):
            self.owner.requeue(self.streams.pop(stream_id))
        self.owner.retired(self)
        seen = list(self.streams.values())
        self.streams.clear()
        for request in seen:
            request.finish(PushResult(Outcome.RETRY, 0, "goaway"))
        self._shut()

    def start(self, request: _Request, token: str) -> None:
        """Open a stream for ``request`` and send what the windows allow."""
        stream_id = self.conn.get_next_available_stream_id()
        request.token = token
        request.stream_id = stream_id
        request.protocol = self
        request.unsent = request.body
        request.status = 0
        request.response_headers.clear()
        request.response.clear()
        headers = [(":method", "POST"), (":scheme", "https"), (":authority", self.owner.endpoint.authority),
                   (":path", request.path), ("authorization", f"bearer {token}"), *request.headers,
                   ("content-length", str(len(request.body)))]
        self.conn.send_headers(stream_id, headers)
        self.streams[stream_id] = request
        self._send_body(request)
        self._flush()

    def _send_body(self, request: _Request) -> None:
        """Send as much of the body as the stream's and the connection's
        flow-control windows allow; the rest waits for WINDOW_UPDATE."""
        stream_id = request.stream_id
        assert stream_id is not None
        while request.unsent:
            size = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size,
                       len(request.unsent))
            if size <= 0:
                return
            chunk, request.unsent = request.unsent[:size], request.unsent[size:]
            self.conn.send_data(stream_id, chunk, end_stream=not request.unsent)

    def reset(self, request: _Request, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """End ``request``'s stream with RST_STREAM; the connection stays."""
        if request.stream_id is None or self.streams.pop(request.stream_id, None) is None:
            return
        try:
            self.conn.reset_stream(request.stream_id, code)
        except H2Error:
            pass  # already closed on the peer's side: nothing to reset
        self._flush()

    def close(self) -> None:
        """Say GOAWAY and close (abort a connection still being set up)."""
        if not (self.handshake_done and self.settings_received):
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        try:
            self.conn.close_connection()
            self._flush()
        except H2Error:
            pass
        self._shut()

    def _shut(self) -> None:
        """Close the TLS connection.  TLS waits for the peer's own
        close_notify: a peer that does not send it within
        :data:`CLOSE_GRACE_S` has the connection aborted, so closing always
        ends."""
        if self.transport is None or self.disconnected or self._abort_later is not None:
            return
        self.transport.loseConnection()
        self._abort_later = self.owner.reactor.callLater(CLOSE_GRACE_S, self._abort)

    def _abort(self) -> None:
        self._abort_later = None
        if self.transport is not None and not self.disconnected:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.disconnected = True
        for call in (self._ready_deadline, self._ping_due, self._ping_deadline, self._abort_later):
            if call is not None and call.active():
                call.cancel()
        self.owner.lost(self, reason)
        self.lost.callback(None)


class _ProtocolFactory(Factory):
    """Builds the one protocol of a connection attempt."""

    def __init__(self, owner: _EndpointConnection) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _H2ClientProtocol:
        protocol = _H2ClientProtocol(self.owner)
        self.owner.protocol = protocol
        return protocol


class _EndpointConnection:
    """The one connection to one endpoint and the requests waiting for a
    stream on it, in order."""

    def __init__(self, reactor: Any, endpoint: _Endpoint, trust_root: IOpenSSLTrustRoot | None,
                 token: ProviderToken, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 ping_interval_s: float = PING_INTERVAL_S, ping_timeout_s: float = PING_TIMEOUT_S) -> None:
        self.reactor = reactor
        self.connect_timeout_s = connect_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.endpoint = endpoint
        self.trust_root = trust_root
        self.token = token
        self.queue: deque[_Request] = deque()
        self.protocol: _H2ClientProtocol | None = None
        self.retiring: set[_H2ClientProtocol] = set()
        self.connecting: Deferred[Any] | None = None
        self.connections_made = 0

    def submit(self, request: _Request) -> None:
        """Queue ``request``; it starts as soon as a stream is free."""
        self.queue.append(request)
        self.pump()

    def requeue(self, request: _Request) -> None:
        """Send again on a new connection a request the peer never saw
        (GOAWAY), once; a second time it is answered ``RETRY``."""
        request.protocol = None
        request.stream_id = None
        if request.resent:
            request.finish(PushResult(Outcome.RETRY, 0, "goaway"))
            return
        request.resent = True
        self.queue.appendleft(request)

    def cancel(self, request: _Request) -> None:
        """The dispatcher gave up on ``request``: drop it from the queue, or
        reset its stream (only that stream)."""
        if request in self.queue:
            self.queue.remove(request)
        elif request.protocol is not None:
            protocol = request.protocol
            protocol.reset(request, ErrorCodes.CANCEL)
            request.protocol = None
            protocol.check_alive()
        self.pump()

    def pump(self) -> None:
        """Start waiting requests while the connection has free streams;
        connect when there is none."""
        while self.queue:
            protocol = self.protocol
            if protocol is None:
                if self.connecting is None:
                    self._connect()
                return
            if not protocol.has_capacity():
                return
            request = self.queue.popleft()
            if request.result.called:
                continue
            try:
                protocol.start(request, self.token.current())
            except H2Error as error:
                # h2 refused to open or write the stream (its state and ours
                # disagree): answer it, and start again on a new connection
                log.error("apns stream refused by h2", endpoint=self.endpoint.url, error=repr(error))
                protocol.streams.pop(request.stream_id or 0, None)
                request.finish(PushResult(Outcome.RETRY, 0, "h2_error"))
                self.retired(protocol)
                protocol.close()

    def _connect(self) -> None:
        self.connections_made += 1
        options = ssl.optionsForClientTLS(self.endpoint.host, trustRoot=self.trust_root,
                                          acceptableProtocols=[b"h2"])
        tcp = HostnameEndpoint(self.reactor, self.endpoint.host, self.endpoint.port,
                               timeout=max(1, int(self.connect_timeout_s)))
        log.info("apns connecting", endpoint=self.endpoint.url)
        attempt = wrapClientTLS(options, tcp).connect(_ProtocolFactory(self))
        self.connecting = attempt
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol: Any) -> None:
        self.connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        log.warn("apns connect failed", endpoint=self.endpoint.url, error=failure.getErrorMessage())
        self._fail_queue("connect")

    def _fail_queue(self, reason: str) -> None:
        while self.queue:
            self.queue.popleft().finish(PushResult(Outcome.RETRY, 0, reason))

    def retired(self, protocol: _H2ClientProtocol) -> None:
        """``protocol`` takes no new streams (GOAWAY, or h2 refused one): the
        next request opens a new connection while this one closes."""
        if self.protocol is protocol:
            self.protocol = None
        self.retiring.add(protocol)

    def answered(self, request: _Request) -> None:
        """A stream ended with a complete answer: classify it."""
        result = classify(request.status, request.response_headers, bytes(request.response),
                          self.token.clock.seconds())
        if result.reason == "ExpiredProviderToken":
            self.token.expired(request.token)
        log.debug("apns answered", endpoint=self.endpoint.url, status=result.status, reason=result.reason)
        request.finish(result)

    def lost(self, protocol: _H2ClientProtocol, reason: Failure) -> None:
        """``protocol``'s connection closed: its open streams are answered
        ``RETRY``; waiting requests get a new connection if this one had
        worked, else ``RETRY`` with why it did not (``tls``, ``alpn``,
        ``connect``)."""
        # detach first: a result's callbacks may send again at once
        self.retiring.discard(protocol)
        if self.protocol is protocol:
            self.protocol = None
        open_streams = list(protocol.streams.values())
        protocol.streams.clear()
        for request in open_streams:
            request.finish(PushResult(Outcome.RETRY, 0, "connection_lost"))
        worked = protocol.handshake_done and protocol.settings_received
        if worked:
            log.info("apns connection closed", endpoint=self.endpoint.url, why=reason.getErrorMessage())
            self.pump()
            return
        if protocol.timed_out:
            why = "connect_timeout"
        elif protocol.alpn_refused:
            why = "alpn"
        elif reason.check(SSL.Error):
            why = "tls"
        else:
            why = "connect"
        log.warn("apns connection failed", endpoint=self.endpoint.url, reason=why, error=reason.getErrorMessage())
        self._fail_queue(why)

    def close(self) -> Deferred[Any]:
        """Answer waiting requests ``RETRY`` (``closed``), close the
        connections; fires when they are closed."""
        self._fail_queue("closed")
        protocols = [p for p in (self.protocol, *self.retiring) if p is not None]
        if self.connecting is not None and self.protocol is None:
            self.connecting.cancel()
        for protocol in protocols:
            protocol.close()
        return DeferredList([p.lost for p in protocols])


class APNsProvider:
    """The APNs :class:`~allspark.push.provider.Provider` of one team."""

    name = "apns"

    def __init__(self, reactor: Any, *, team_id: str, key_id: str, key: ec.EllipticCurvePrivateKey,
                 topic: str | None = None, endpoint: str = PRODUCTION_ENDPOINT,
                 sandbox_endpoint: str = SANDBOX_ENDPOINT, trust_root: IOpenSSLTrustRoot | None = None,
                 expiration_s: int = DEFAULT_EXPIRATION_S, clock: IReactorTime | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, ping_interval_s: float = PING_INTERVAL_S,
                 ping_timeout_s: float = PING_TIMEOUT_S) -> None:
        """``reactor`` connects and times connections; ``clock`` (default:
        the reactor) dates the provider token and ``apns-expiration``.
        ``trust_root`` None means the system's trust store."""
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.token = ProviderToken(key, team_id, key_id, self._clock)
        self._topic = topic
        self._endpoints = {"production": _parse_endpoint(endpoint, "endpoint"),
                           "development": _parse_endpoint(sandbox_endpoint, "sandbox_endpoint")}
        self._trust_root = trust_root
        self._expiration_s = expiration_s
        self._timing = (connect_timeout_s, ping_interval_s, ping_timeout_s)
        self._connections: dict[str, _EndpointConnection] = {}
        self._closed = False

    def connections_made(self) -> int:
        """How many connections were opened (each endpoint, all time)."""
        return sum(c.connections_made for c in self._connections.values())

    def send(self, target: PushTarget, note: Notification) -> Deferred[PushResult]:
        """POST the notification to ``/3/device/<token>`` on the target's
        environment's connection; fires with the classified answer.
        Cancelling resets that stream only."""
        problem = self._refuse(target)
        if problem is not None:
            return succeed(problem)
        body = build_payload(note)
        if body is None:
            return succeed(PushResult(Outcome.FAILED, 0, "PayloadTooLarge"))
        endpoint = self._endpoints[target.environment or "production"]
        topic = target.topic or self._topic
        assert topic is not None and target.token is not None
        alert = bool(note.text)
        expiration = 0 if self._expiration_s == 0 else int(self._clock.seconds()) + self._expiration_s
        headers = [("apns-topic", topic), ("apns-push-type", "alert" if alert else "background"),
                   ("apns-priority", "10" if alert else "5"), ("apns-expiration", str(expiration)),
                   ("apns-collapse-id", _collapse_id(note.collapse_key)),
                   ("content-type", "application/json")]
        connection = self._connection(endpoint)
        request: _Request

        def cancel(_: Deferred[PushResult]) -> None:
            connection.cancel(request)

        result: Deferred[PushResult] = Deferred(cancel)
        request = _Request(f"/3/device/{target.token}", headers, body, result)
        connection.submit(request)
        return result

    def _refuse(self, target: PushTarget) -> PushResult | None:
        """Why ``target`` cannot be sent to without asking Apple, or None."""
        if self._closed:
            return PushResult(Outcome.RETRY, 0, "closed")
        if target.token is None or not _TOKEN_SHAPE.fullmatch(target.token):
            return PushResult(Outcome.DEAD_TOKEN, 0, "BadDeviceToken")
        if target.environment is not None and target.environment not in ENVIRONMENTS:
            return PushResult(Outcome.FAILED, 0, "BadEnvironment")
        if not (target.topic or self._topic):
            return PushResult(Outcome.FAILED, 0, "MissingTopic")
        return None

    def _connection(self, endpoint: _Endpoint) -> _EndpointConnection:
        connection = self._connections.get(endpoint.url)
        if connection is None:
            connection = _EndpointConnection(self._reactor, endpoint, self._trust_root, self.token, *self._timing)
            self._connections[endpoint.url] = connection
        return connection

    def close(self) -> Deferred[None]:
        """Close the connections; later sends answer ``RETRY`` (``closed``)."""
        self._closed = True
        closing = DeferredList([c.close() for c in self._connections.values()])
        return closing.addCallback(lambda _: None)


def _required_str(table: Mapping[str, Any], key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PushConfigError(f"[apns] {key}: required, a non-empty string")
    return value.strip()


def load_key(pem: bytes, where: str = "key") -> ec.EllipticCurvePrivateKey:
    """The P-256 private key of a ``.p8`` (PEM, PKCS #8), or PushConfigError
    naming ``where`` (the key that gave it)."""
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise PushConfigError(f"[apns] {where}: not a PEM private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PushConfigError(f"[apns] {where}: not a P-256 (ES256) key")
    return key


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
    """The CA certificates of a PEM file as a trust root, or PushConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise PushConfigError(f"[apns] ca_file: cannot read {path!r}: {error.strerror}") from None
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)
    try:
        certificates = [ssl.Certificate.loadPEM(pem) for pem in pems]
    except SSL.Error as error:
        raise PushConfigError(f"[apns] ca_file: {path!r} holds a bad certificate ({error})") from None
    if not certificates:
        raise PushConfigError(f"[apns] ca_file: {path!r} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


KNOWN_KEYS = frozenset({"team_id", "key_id", "key_file", "key_env", "topic", "endpoint", "sandbox_endpoint",
                        "ca_file", "expiration_s", "connect_timeout_s", "ping_interval_s", "ping_timeout_s"})


def _seconds(table: Mapping[str, Any], key: str, default: float, zero_ok: bool) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
        raise PushConfigError(f"[apns] {key}: expected a number of seconds {'>= 0' if zero_ok else '> 0'}")
    return float(value)


def from_config(table: Mapping[str, Any], reactor: Any) -> APNsProvider:
    """The provider of an ``[apns]`` table: ``team_id``, ``key_id`` and the
    ``.p8`` key, named by ``key_file`` (a path) or ``key_env`` (an environment
    variable holding the PEM), required; ``topic`` (the default bundle id),
    ``endpoint``, ``sandbox_endpoint``, ``ca_file``, ``expiration_s``,
    ``connect_timeout_s``, ``ping_interval_s`` (0: no keepalive PING),
    ``ping_timeout_s`` optional.  Raises PushConfigError naming the key."""
    if not isinstance(table, Mapping):
        raise PushConfigError("[apns]: expected a table")
    check_keys(table, "apns", KNOWN_KEYS)
    team_id = _required_str(table, "team_id")
    key_id = _required_str(table, "key_id")
    key = load_key(read_secret(table, "apns", "key"), "key_file" if "key_file" in table else "key_env")
    topic = table.get("topic")
    if topic is not None and (not isinstance(topic, str) or not topic.strip()):
        raise PushConfigError("[apns] topic: expected a non-empty string (the app's bundle id)")
    endpoint = table.get("endpoint", PRODUCTION_ENDPOINT)
    sandbox = table.get("sandbox_endpoint", SANDBOX_ENDPOINT)
    _parse_endpoint(endpoint, "endpoint")
    _parse_endpoint(sandbox, "sandbox_endpoint")
    ca_file = table.get("ca_file")
    if ca_file is not None and not isinstance(ca_file, str):
        raise PushConfigError("[apns] ca_file: expected a path")
    trust_root = load_trust_root(ca_file) if ca_file else None
    expiration_s = table.get("expiration_s", DEFAULT_EXPIRATION_S)
    if isinstance(expiration_s, bool) or not isinstance(expiration_s, int) or expiration_s < 0:
        raise PushConfigError("[apns] expiration_s: expected a whole number of seconds >= 0")
    return APNsProvider(reactor, team_id=team_id, key_id=key_id, key=key,
                        topic=topic.strip() if topic else None, endpoint=endpoint, sandbox_endpoint=sandbox,
                        trust_root=trust_root, expiration_s=expiration_s,
                        connect_timeout_s=_seconds(table, "connect_timeout_s", CONNECT_TIMEOUT_S, zero_ok=False),
                        ping_interval_s=_seconds(table, "ping_interval_s", PING_INTERVAL_S, zero_ok=True),
                        ping_timeout_s=_seconds(table, "ping_timeout_s", PING_TIMEOUT_S, zero_ok=False))
