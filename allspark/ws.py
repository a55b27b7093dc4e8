"""The client WebSocket: authenticate the handshake, parse frames, call the
router, write answers through a bounded send queue.

Limits, all enforced by Autobahn before a frame is buffered:
``max_message_size`` (over it the connection closes with 1009), the open
handshake timeout, and heartbeats (a WebSocket ping every ``heartbeat``
seconds; a peer that does not answer within the timeout is dropped).

Back-pressure: the connection registers itself as a streaming producer on its
TCP transport.  While the kernel buffer is full, frames wait in a queue
bounded by ``max_queue_bytes``; a reader that lets it overflow is closed with
code 4008 ("send queue overflow").  One slow reader never delays another.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from allspark import logs, wsmask
from allspark.auth import AuthError, Identity
from allspark.envelope import Control, FrameError, Message, encode, error_frame, parse_frame
from allspark.logs import logger
from allspark.metrics import FrameCounts
from allspark.origins import OriginPolicy
from allspark.router import Sender
from allspark.web import TrustedProxies, raw_json_answer

if TYPE_CHECKING:
    from allspark.server import Server

log = logger(__name__)
wsmask.install()

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_QUEUE_OVERFLOW = 4008
CLOSE_REPLACED = 4009
#: closed by the server API's disconnect (``disconnected: <reason>``)
CLOSE_DISCONNECTED = 4010
#: closed by the server API's disconnect with a revocation (``revoked: <reason>``):
#: the node's keys are refused until the revocation ends
CLOSE_REVOKED = 4011


@dataclass(frozen=True)
class SocketLimits:
    """Per-connection limits."""

    max_message_size: int = 64 * 1024
    max_queue_bytes: int = 8 * 1024 * 1024
    heartbeat: float = 30.0
    heartbeat_timeout: float = 20.0
    handshake_timeout: float = 10.0
    #: frames per second a connection may send, sustained (a token bucket)
    max_rate: float = 1000.0
    #: frames a connection may send at once before the rate applies
    max_burst: float = 5000.0
    #: frames refused over the rate (draining at ``max_rate``) before the connection is closed with 1008
    max_refused: float = 50_000.0


@runtime_checkable
class TakesProducer(Protocol):
    """A transport that takes a producer: TCP and TLS transports (their
    IConsumer side, which ``ITransport`` does not promise)."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@implementer(IPushProducer)
class ClientProtocol(WebSocketServerProtocol):
    """One authenticated client connection."""

    factory: "ClientFactory"
    node_id: str
    client_id: str | None

    def __init__(self) -> None:
        super().__init__()
        self.identity: Identity | None = None
        self.sender: Sender | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._paused = False
        self._registered = False
        self._tokens = -1.0  # a full bucket at the first frame (see _take_token)
        self._refilled = 0.0
        self._refused_frames = 0.0  # frames refused over the rate, draining (see _refuse_over_rate)
        self._refused_at = 0.0
        self._refusal: tuple[str, str] | None = None
        #: the client's address (through trusted proxies), known at the handshake
        self.client_address = "-"
        self._opened_at: float | None = None
        # (bytes, Deferred): fired once the send queue holds at most that many
        self._drain_waiters: list[tuple[int, Deferred[None]]] = []

    # -- handshake ----------------------------------------------------------
    # Autobahn's annotation leaves out that onConnect may return a Deferred (it waits for it)
    def onConnect(self, request: ConnectionRequest) -> Deferred[None] | None:  # type: ignore[override]
        """Authenticate the handshake: a browser ``Origin`` this server
        allows (:mod:`allspark.origins`; checked first), a valid auth key and
        a validation token for this node and this server, redeemed once,
        and a node the server API has not revoked (:mod:`allspark.revocations`:
        from the cache, else a Deferred that Autobahn waits for).
        Refusals raise :class:`ConnectionDeny` (403 for the origin, 401 for
        credentials and ``revoked``, 503 when the server is draining or full)
        and are answered by :meth:`sendHttpErrorResponse` with a JSON body."""
        server = self.factory.app
        self.client_address = self._client_address(request.headers)
        origin = request.headers.get("origin")
        if origin is not None and not self.factory.origins.allows(origin, request.headers.get("host")):
            self._deny(403, "origin_not_allowed",
                       f"pages from {origin!r} may not open this WebSocket (see --allowed-origin)")
        if server.draining:
            self._deny(503, "unavailable", "server is shutting down")
        if server.starting:
            self._deny(503, "unavailable", "server is starting")
        if len(server.registry) >= server.config.max_connections:
            self._deny(503, "too_many_connections", "server is at its connection limit")
        params = request.params
        key = params.get("auth_key", [None])[0]
        token = params.get("validation_token", [None])[0]
        try:
            identity = server.verifier.verify(key, server.clock.seconds())
            server.tokens.redeem(token, identity.node_id)
        except AuthError as e:
            self._deny(401, e.code, str(e))
        self.identity = identity
        self.node_id = identity.node_id
        self.client_id = identity.client_id
        self.sender = Sender(identity.node_id, identity.client_id)
        # a revoked node (the server API's disconnect) is refused: from the
        # cache at once, else after one store read (Autobahn waits for it)
        revocations = server.revocations
        cached = revocations.cached_until(identity.node_id)
        if cached is not None:
            self._refuse_revoked(cached)
            return None
        return revocations.until(identity.node_id).addCallback(self._refuse_revoked)

    def _refuse_revoked(self, until_ms: int) -> None:
        """Refuse the handshake (401 ``revoked``) while the node is revoked."""
        if until_ms and self.factory.app.revocations.revoked_now(until_ms):
            self._deny(401, "revoked", f"this node is revoked until {until_ms // 1000} (Unix time)")

    def _client_address(self, headers: dict[str, str]) -> str:
        """The client's address: the peer's, or what a trusted proxy says in
        ``headers`` (the handshake's, names in lower case)."""
        transport = self.transport
        peer = (getattr(transport.getPeer(), "host", None) if transport is not None else None) or "-"
        proxies = self.factory.trusted_proxies
        if not proxies:
            return peer
        return proxies.client_address(peer, [headers.get("x-forwarded-for", "")], headers.get("x-real-ip"))

    def failHandshake(self, reason: str, code: int = 400,
                      responseHeaders: list[tuple[str, str]] | None = None) -> None:
        """Refuse the handshake: one log line (the client, the status and the
        error code, never the credentials), the JSON answer, then the
        connection closes.  Autobahn's own lines for it are left out."""
        error = self._refusal[0] if self._refusal is not None else ("bad_handshake" if code < 500 else "internal_error")
        if self.client_address == "-":  # refused before onConnect (a malformed handshake)
            self.client_address = self._client_address(getattr(self, "http_headers", None) or {})
        log.info("refused handshake from {client}: {status} {code}", client=self.client_address,
                 status=code, code=error, reason=reason if self._refusal is None else None)
        self.wasNotCleanReason = reason
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        self.wasClean = True  # the refusal is ours: Autobahn need not warn about the close
        self.dropConnection(abort=False)

    def _deny(self, status: int, code: str, message: str) -> NoReturn:
        """Refuse the handshake with ``status`` and a JSON ``{"error": code,
        "message": message}`` body."""
        self._refusal = (code, message)
        self.factory.counts.refused_handshakes[code] += 1
        raise ConnectionDeny(status, f"{code}: {message}")

    def sendHttpErrorResponse(
        self, code: int, reason: str, responseHeaders: list[tuple[str, str]] | None = None
    ) -> None:
        """Answer a refused handshake like the HTTP endpoints do: the standard
        reason phrase, then a JSON body naming the error.  Autobahn's own
        refusals (a malformed handshake) get ``bad_handshake``."""
        if self._refusal is not None:
            error, message = self._refusal
        elif code >= 500:  # an unexpected error: its text stays in the server's log
            error, message = "internal_error", "the server could not accept this connection"
        else:
            error, message = "bad_handshake", reason
        headers = list(responseHeaders or ())
        if code == 426 and not any(name.lower() == "upgrade" for name, _ in headers):
            headers.append(("Upgrade", "websocket"))
        self.sendData(raw_json_answer(code, {"error": error, "message": message}, headers))

    def onOpen(self) -> None:
        """Take over back-pressure, register the connection and send hello.

        Autobahn calls this inside a Deferred callback, where an exception
        would vanish and leave a half-open connection: any failure is
        logged and the connection dropped."""
        try:
            self._open()
        except Exception:
            log.failure("could not open the connection of {node_id}", node_id=getattr(self, "node_id", None))
            self._unregister()
            self.dropConnection(abort=True)

    def _open(self) -> None:
        server = self.factory.app
        assert self.identity is not None
        # twisted.web's channel was the transport's producer until Autobahn
        # took the transport over; this connection is its producer now.
        transport = self.transport
        if not isinstance(transport, TakesProducer):
            raise TypeError(f"{transport!r} cannot take a producer")
        transport.unregisterProducer()
        transport.registerProducer(self, True)
        server.registry.add(self)
        self._registered = True
        self._opened_at = server.clock.seconds()
        log.info("connected {node_id} from {client}", node_id=self.node_id, client_id=self.client_id,
                 client=self.client_address, connections=len(server.registry))
        self._replace_oldest(server)
        hello: dict[str, Any] = {
            "op": "hello",
            "node_id": self.node_id,
            "server_id": server.config.server_id,
            "heartbeat": self.factory.limits.heartbeat,
            "max_message_size": self.factory.limits.max_message_size,
        }
        if self.client_id is not None:
            hello["client_id"] = self.client_id
        self.send(encode(hello))
        server.on_connected(self)

    def _replace_oldest(self, server: "Server") -> None:
        """``--max-connections-per-node``: when this connection is one too
        many for its node, the node's oldest connections are closed with
        4009; the newest connection is the one a reconnecting device uses."""
        conns = server.registry.connections(self.node_id)
        for old in conns[: max(0, len(conns) - server.config.max_connections_per_node)]:
            if isinstance(old, ClientProtocol) and old is not self:
                old.close_for_policy(
                    CLOSE_REPLACED, "replaced: too many connections for this node",
                    limit=server.config.max_connections_per_node)

    def close_for_policy(self, code: int, reason: str, **fields: Any) -> None:
        """Close this connection at once with ``code`` and ``reason``: it
        leaves the registry now (nothing more is routed to it), its queue is
        dropped, and the socket is cut if the close frame is not answered
        within 2 s."""
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        log.info("closing {node_id} from {client}: {code} {reason}", node_id=self.node_id,
                 client=self.client_address, code=code, reason=reason, **fields)
        self.factory.counts.closes[code] += 1
        self._unregister()
        self._queue.clear()
        self._queued = 0
        self._fail_drain_waiters()  # a sync waiting for this socket ends now
        # sendCloseFrame, not sendClose: Autobahn's sendClose refuses 1008
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:120], isReply=False)
        self.factory.app.clock.callLater(2.0, self.dropConnection, abort=True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._unregister()
        self._queue.clear()
        self._queued = 0
        self._fail_drain_waiters()
        if self._opened_at is not None:
            opened_at, self._opened_at = self._opened_at, None
            code, reason, closed_by = self._how_closed(code, reason)
            log.info("disconnected {node_id} from {client}: {code} after {duration}s",
                     node_id=self.node_id, client_id=self.client_id, client=self.client_address,
                     code=code, reason=reason, closed_by=closed_by,
                     duration=round(self.factory.app.clock.seconds() - opened_at, 3))

    def _how_closed(self, code: int | None, reason: str | None) -> tuple[int | None, str | None, str]:
        """The close code and reason that ended this connection, and who
        closed it: ``server`` (its close frame, or a drop), ``client``, or
        ``network`` (the TCP connection went without a close frame: 1006)."""
        if self.closedByMe and self.localCloseCode is not None:
            code, reason, closed_by = self.localCloseCode, self.localCloseReason, "server"
        elif self.remoteCloseCode is not None:
            code, reason, closed_by = self.remoteCloseCode, self.remoteCloseReason, "client"
        else:
            closed_by = "server" if self.droppedByMe else "network"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return code, reason or None, closed_by

    def _unregister(self) -> None:
        """Leave the registry once: nothing is routed to this connection any more."""
        if self._registered:
            self._registered = False
            self.factory.app.registry.remove(self)
            self.factory.app.on_disconnected(self)

    # -- frames from the client --------------------------------------------
    def onMessageEnd(self) -> None:
        # Autobahn's own onMessageEnd also fires a "message" event for
        # observers on every frame; nobody observes, so skip that cost.
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        # Autobahn's own onMessageEnd does the same: None between messages,
        # although it annotates the attribute list[bytes]
        self.message_data = None  # type: ignore[assignment]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        counts = self.factory.counts
        if not self._take_token():  # every frame counts, malformed ones too
            counts.frames_in["over_rate"] += 1
            self._refuse_over_rate(payload, isBinary)
            return
        try:
            frame = parse_frame(payload, isBinary)
        except FrameError as e:
            if logs.DEBUG:
                log.debug("bad frame from {node_id}: {code}", node_id=self.node_id, code=e.code,
                          size=len(payload), id=e.frame_id)
            counts.frames_in["bad"] += 1
            counts.errors[e.code] += 1
            self.send(e.to_frame())
            return
        if logs.DEBUG:
            self._log_frame(frame, len(payload))
        if isinstance(frame, Message):
            counts.messages_in += 1
            assert self.sender is not None
            d = self.factory.app.router.route(self.sender, frame)
            d.addCallbacks(self.send, self._refused, errbackArgs=(frame.id,))
        else:
            try:
                counts.frames_in[frame.op] += 1
            except KeyError:
                counts.frames_in[frame.op] = 1
            ensureDeferred(self._control(frame)).addErrback(self._refused, frame.id)

    def _refuse_over_rate(self, payload: bytes, isBinary: bool) -> None:
        """Answer a frame over the rate limit with ``rate_limited`` (and its
        ``id`` when it has one), unhandled.

        Refusals are bounded too: they fill a second bucket of
        ``max_refused`` frames that drains at ``max_rate`` per second.  A
        connection that overflows it (one that goes on sending at more than
        twice the rate) is closed with 1008 (policy violation) instead of
        being answered frame after frame."""
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return  # closing: nothing more is answered
        limits = self.factory.limits
        now = self.factory.app.clock.seconds()
        drained = max(0.0, now - self._refused_at) * limits.max_rate
        self._refused_frames = max(0.0, self._refused_frames - drained) + 1.0
        self._refused_at = now
        if self._refused_frames > limits.max_refused:
            self.close_for_policy(CLOSE_POLICY_VIOLATION, "rate limit exceeded: too many frames",
                                  max_rate=limits.max_rate, max_refused=limits.max_refused)
            return
        try:
            frame_id = parse_frame(payload, isBinary).id
        except FrameError as e:
            frame_id = e.frame_id
        if logs.DEBUG:
            log.debug("rate limited a frame from {node_id}", node_id=self.node_id, id=frame_id,
                      size=len(payload))
        self.factory.counts.errors["rate_limited"] += 1
        self.send(error_frame("rate_limited", "too many frames: slow down", frame_id))

    def _log_frame(self, frame: Message | Control, size: int) -> None:
        """One debug event per frame: what it asks for, never its content."""
        if isinstance(frame, Message):
            log.debug("message from {node_id}: id={id} to {dest}", node_id=self.node_id, id=frame.id,
                      dest=frame.dest_id or frame.dest_client_id or frame.dest_session_id,
                      dest_kind="dest_id" if frame.dest_id else "dest_client_id" if frame.dest_client_id
                      else "dest_session_id", ephemeral=frame.ephemeral, size=size)
        else:
            log.debug("{op} from {node_id}: id={id}", op=frame.op, node_id=self.node_id, id=frame.id,
                      size=size)

    def _take_token(self) -> bool:
        """The rate limit: a token bucket of ``max_burst`` frames refilled at
        ``max_rate`` per second.  Whether this frame may go on."""
        limits = self.factory.limits
        now = self.factory.app.clock.seconds()
        if self._tokens < 0:
            self._tokens = limits.max_burst
        elapsed = max(0.0, now - self._refilled)  # the wall clock may step back
        tokens = min(limits.max_burst, self._tokens + elapsed * limits.max_rate)
        self._refilled = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    async def _control(self, frame: Control) -> None:
        reply = await self.factory.app.control(self, frame)
        if reply is not None:
            if frame.id is not None:
                reply.setdefault("id", frame.id)
            self.send(encode(reply))

    def _refused(self, failure: Failure, frame_id: str | None) -> None:
        """Answer a frame that failed: its error frame, or internal_error."""
        error = failure.value
        if isinstance(error, FrameError):
            if error.frame_id is None:
                error.frame_id = frame_id
            if logs.DEBUG:
                log.debug("answered {node_id} with error {code}", node_id=self.node_id, code=error.code,
                          id=error.frame_id)
            self.factory.counts.errors[error.code] += 1
            self.send(error.to_frame())
            return
        self._unexpected(failure, frame_id)

    def _unexpected(self, failure: Failure, frame_id: str | None) -> None:
        log.failure("internal error handling a frame from {node_id}", failure, node_id=self.node_id)
        self.factory.counts.errors["internal_error"] += 1
        self.send(error_frame("internal_error", "the server could not handle this frame", frame_id))

    # -- frames to the client ----------------------------------------------
    @property
    def queued_bytes(self) -> int:
        return self._queued

    def send(self, frame: bytes) -> None:
        """Write ``frame`` now, or queue it while the transport is full.

        A frame over ``max_message_size`` is never sent (a client may not be
        able to take it): the server refuses messages whose delivered copy
        would be larger, and pages answers, so only a row stored under a
        larger limit can get here; it is logged and replaced by a
        ``too_large`` error frame, so that nothing behind it is held up."""
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        limit = self.factory.limits.max_message_size
        if len(frame) > limit:
            log.error("not sending {size} bytes to {node_id}: over the frame limit of {limit}",
                      size=len(frame), node_id=self.node_id, limit=limit)
            frame = error_frame("too_large", f"a frame of {len(frame)} bytes for you was over the "
                                f"limit of {limit} bytes and was not sent")
            self.factory.counts.errors["too_large"] += 1
        # counted by kind (plain ints and a plain dict: a Counter costs 200 ns more per frame):
        # an op frame ({"op":"<name>"...) under the first 9 bytes of its name, else a message copy
        counts = self.factory.counts
        try:
            op_frame = frame[2] == 111  # b"o" (an int: no slice to allocate)
        except IndexError:  # no frame of ours is that short; free when it does not happen
            op_frame = False
        if op_frame:
            key = frame[7:16]
            try:
                counts.frames_out[key] += 1
            except KeyError:
                counts.frames_out[key] = 1
        else:
            counts.copies_out += 1
        if not self._paused and not self._queue:
            self.sendMessage(frame)
            return
        self._queue.append(frame)
        self._queued += len(frame)
        if self._queued > self.factory.limits.max_queue_bytes:
            self.overflow()

    def overflow(self) -> None:
        """Close a reader that let its send queue overflow."""
        log.warn(
            "closing {node_id}: send queue overflow ({queued} bytes)",
            node_id=self.node_id, queued=self._queued,
        )
        self.factory.counts.closes[CLOSE_QUEUE_OVERFLOW] += 1
        self._queue.clear()
        self._queued = 0
        self._fail_drain_waiters()
        # nothing more is routed here: later messages are stored (or, when
        # ephemeral, reported as dropped) instead of vanishing into a socket
        # that is closing
        self._unregister()
        self.sendClose(CLOSE_QUEUE_OVERFLOW, "send queue overflow: the client reads too slowly")
        # the close frame may never get through a full buffer: do not wait long
        self.factory.app.clock.callLater(2.0, self.dropConnection, abort=True)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        queue = self._queue
        while queue and not self._paused:
            frame = queue.popleft()
            self._queued -= len(frame)
            self.sendMessage(frame)
        if self._drain_waiters:
            self._wake_drain_waiters()

    def stopProducing(self) -> None:
        self._queue.clear()
        self._queued = 0
        self._fail_drain_waiters()

    def when_drained(self, below: int) -> Deferred[None]:
        """Fires once at most ``below`` bytes wait in the send queue (at once
        when that is already so); fails with :class:`ConnectionDone` when
        the connection closes or overflows first.  A sync that must not
        outrun its reader waits on it."""
        if self._queued <= below:
            return succeed(None)
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return fail(ConnectionDone("the connection closed"))
        d: Deferred[None] = Deferred()
        self._drain_waiters.append((below, d))
        return d

    def _wake_drain_waiters(self) -> None:
        ready = [d for below, d in self._drain_waiters if self._queued <= below]
        self._drain_waiters = [(b, d) for b, d in self._drain_waiters if self._queued > b]
        for d in ready:
            d.callback(None)

    def _fail_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for _, d in waiters:
            d.errback(ConnectionDone("the connection closed"))

    def going_away(self, reason: str) -> None:
        """Close with 1001 (going away), which Autobahn's ``sendClose`` does
        not allow.  The connection leaves the registry at once: nothing more
        is routed to a socket that is closing."""
        self._unregister()
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=CLOSE_GOING_AWAY, reasonUtf8=reason.encode()[:120], isReply=False)

    def still_connected(self) -> bool:
        """Whether the TCP connection is still there (open or closing)."""
        return self.state != WebSocketServerProtocol.STATE_CLOSED


class ClientFactory(WebSocketServerFactory):
    """Builds :class:`ClientProtocol` for one server."""

    # Twisted types Factory.protocol as building the factory's protocol type,
    # and Autobahn's factory is a plain Factory[_ProtoWithFactory], which a
    # protocol whose ``factory`` is a ClientFactory can never match
    protocol = ClientProtocol  # type: ignore[assignment]

    def __init__(self, server: "Server", limits: SocketLimits, url: str | None = None,
                 trusted_proxies: TrustedProxies | None = None) -> None:
        super().__init__(url=url, reactor=server.clock, server="Allspark")
        self.app = server
        self.limits = limits
        self.trusted_proxies = trusted_proxies or TrustedProxies(server.config.trusted_proxies)
        #: what the sockets count (frames, errors, refusals, closes), read by /metrics
        self.counts = FrameCounts()
        #: the browser origins whose pages may open a connection (checked in onConnect)
        self.origins = OriginPolicy(server.config.allowed_origins)
        self.setProtocolOptions(
            maxFramePayloadSize=limits.max_message_size,
            maxMessagePayloadSize=limits.max_message_size,
            failByDrop=False,
            autoPingInterval=limits.heartbeat,
            autoPingTimeout=limits.heartbeat_timeout,
            openHandshakeTimeout=limits.handshake_timeout,
            closeHandshakeTimeout=2.0,
            allowNullOrigin=True,
            # orjson refuses invalid UTF-8 with a bad_frame error: no need to
            # validate every frame twice
            utf8validateIncoming=False,
            # a plain GET on the socket path is a JSON 426, not Autobahn's
            # status page (which names its version and follows ?redirect=)
            webStatus=False,
        )

