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
from typing import TYPE_CHECKING, Any, NoReturn

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from allspark import wsmask
from allspark.auth import AuthError, Identity
from allspark.envelope import Control, FrameError, Message, encode, error_frame, parse_frame
from allspark.logs import logger
from allspark.router import Sender

if TYPE_CHECKING:
    from allspark.server import Server

log = logger(__name__)
wsmask.install()

CLOSE_GOING_AWAY = 1001
CLOSE_QUEUE_OVERFLOW = 4008


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
        self._refusal: tuple[str, str] | None = None
        # (bytes, Deferred): fired once the send queue holds at most that many
        self._drain_waiters: list[tuple[int, Deferred[None]]] = []

    # -- handshake ----------------------------------------------------------
    def onConnect(self, request: ConnectionRequest) -> None:
        """Authenticate the handshake: a valid auth key and a validation token
        for this node and this server, redeemed once.  Refusals raise
        :class:`ConnectionDeny` (401 for credentials, 503 when the server is
        draining or full) and are answered by :meth:`sendHttpErrorResponse`
        with a JSON body."""
        server = self.factory.app
        if server.draining:
            self._deny(503, "unavailable", "server is shutting down")
        if len(server.registry) >= server.config.max_connections:
            self._deny(503, "too_many_connections", "server is at its connection limit")
        params = request.params
        key = params.get("auth_key", [None])[0]
        token = params.get("validation_token", [None])[0]
        try:
            identity = server.verifier.verify(key, server.clock.seconds())
            server.tokens.redeem(token, identity.node_id)
        except AuthError as e:
            log.info("refused handshake from {peer}: {code}", peer=request.peer, code=e.code)
            self._deny(401, e.code, str(e))
        self.identity = identity
        self.node_id = identity.node_id
        self.client_id = identity.client_id
        self.sender = Sender(identity.node_id, identity.client_id)

    def _deny(self, status: int, code: str, message: str) -> NoReturn:
        """Refuse the handshake with ``status`` and a JSON ``{"error": code,
        "message": message}`` body."""
        self._refusal = (code, message)
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
        body = encode({"error": error, "message": message})
        phrase = RESPONSES.get(code, b"Error").decode("latin-1")
        head = [f"HTTP/1.1 {code} {phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close"]
        if code == 426:
            head.append("Upgrade: websocket")
        for name, value in responseHeaders or ():
            head.append(f"{name}: {value}")
        self.sendData(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

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
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        server.registry.add(self)
        self._registered = True
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

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._unregister()
        self._queue.clear()
        self._queued = 0
        self._fail_drain_waiters()

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
        self.message_data = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        limited = not self._take_token()  # every frame counts, malformed ones too
        try:
            frame = parse_frame(payload, isBinary)
        except FrameError as e:
            self.send(e.to_frame())
            return
        if limited:
            self.send(error_frame("rate_limited", "too many frames: slow down", frame.id))
            return
        if isinstance(frame, Message):
            assert self.sender is not None
            d = self.factory.app.router.route(self.sender, frame)
            d.addCallbacks(self.send, self._refused, errbackArgs=(frame.id,))
        else:
            ensureDeferred(self._control(frame)).addErrback(self._refused, frame.id)

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
        if failure.check(FrameError):
            error = failure.value
            if error.frame_id is None:
                error.frame_id = frame_id
            self.send(error.to_frame())
            return
        self._unexpected(failure, frame_id)

    def _unexpected(self, failure: Failure, frame_id: str | None) -> None:
        log.failure("internal error handling a frame from {node_id}", failure, node_id=self.node_id)
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

    protocol = ClientProtocol

    def __init__(self, server: "Server", limits: SocketLimits, url: str | None = None) -> None:
        super().__init__(url=url, reactor=server.clock, server="Allspark")
        self.app = server
        self.limits = limits
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

