"""Peer links between the servers of one cluster.

Every pair of live servers keeps one WebSocket link, on a path of its own
(``/peer``, on the same site and port as the client socket ``/ws``).  The
server whose id sorts lower dials (a :class:`~twisted.application.internet.ClientService`
per peer: re-established with exponential backoff, kept alive by WebSocket
pings); the other accepts.  Either side sends over the link once it is open.

**Authentication.**  Peer links are opened with the cluster secret only
(``ALLSPARK_CLUSTER_SECRET`` / ``--cluster-secret-file``), never with the auth
secret: the link key is ``HMAC-SHA256(cluster secret, "allspark peer link v1")``
(:func:`derive_peer_key`), so neither the secret nor anything a client holds
(an auth key, a validation token) opens a link.  Without a cluster secret the
mesh is off and ``/peer`` answers 503.  The dialer sends a short-lived token in
the ``X-Allspark-Peer`` header of its opening handshake (:class:`PeerAuth`):
``base64url(JSON {"f": from server, "t": to server, "i": issued at, "n": nonce})
"." base64url(HMAC(link key, first part))``.  The acceptor refuses it (401, a
JSON body naming the reason) unless the MAC is right, it names this server,
it was issued within :data:`PEER_TOKEN_TTL` seconds (and not before this
process started: a token a previous process may have accepted is never
accepted again), and its nonce was not seen before (a replayed handshake is
``replayed_token``).  The acceptor's 101 answer carries
``X-Allspark-Peer-Proof``, a MAC of the token under the link key, which the
dialer checks before it uses the link: both ends prove they hold the secret.

**Frames** (:func:`encode_peer_frame`, :func:`decode_peer_frame`): binary
WebSocket messages, a JSON header ``{"v": 1, "t": TYPE, ...}``, a newline and
an opaque payload.  Types: ``hello`` (``server_id``), ``deliver`` (``to``: a
list of node_ids; the payload is a client frame, written as it is),
``delivered`` (the answer to a ``deliver`` with an ``id``: ``missing``, the
node_ids not connected here), ``invalidate`` (``what``, ``key``: a cache entry
to drop), ``error`` (``code``, ``message``), ``location`` (``node_id``,
``epoch``, ``online``: a connection of the sender opened or closed; with an
``id`` it is answered ``location_ack`` with that ``id``; see
:mod:`allspark.locations`), ``disconnect`` (``node_id``, ``reason``,
``revoked_until``: close that node's connections, and refuse its keys until
then; sent by the server API, :mod:`allspark.api`), ``drain``
(``server_id``: the receiver drains as on SIGTERM when it is that server).  A ``deliver`` with ``"report": "missing"`` is
answered ``delivered`` only when some node_ids are missing, and the sender
then drops those nodes' locations on the answering server (a stale cache is
corrected, never looped).  ``batch`` (``n``; the payload is the frames, each
prefixed by its length in 4 bytes big-endian: :func:`encode_batch`) carries
the ``deliver`` frames one reactor turn forwarded to one peer in one
WebSocket message (:meth:`_LinkMixin.send_batched`; at most
:data:`MAX_BATCH_FRAMES` frames or about :data:`MAX_BATCH_BYTES`); its
frames are handled in order, a batch inside a batch is refused.  An unknown
version or type, or a
malformed frame, is answered with an ``error`` frame and the link stays open.

**No loops.**  A frame that came over a peer link is written to this server's
connections only (``deliver_local``, :meth:`allspark.delivery.Delivery.deliver_local`):
nothing received from a peer is ever forwarded again, whatever the location
records say.  A copy for a node not connected here is dropped; a durable copy
waits in the store for the node's next sync.

**Bounded queues.**  Each link is a streaming producer on its transport like a
client socket: while the kernel buffer is full, frames wait in a queue bounded
by ``max_queue_bytes``; an overflow closes the link with 4008 (it is dialled
again; forwarded copies are in the store).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import secrets as _secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NoReturn, Sequence
from urllib.parse import urlsplit

import orjson
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny, ConnectionRequest, ConnectionResponse
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from allspark.ids import is_valid_id
from allspark.locations import Locations
from allspark.logs import logger

log = logger(__name__)

#: The path of peer links on the site (``/peer``).
PEER_PATH = "peer"
#: Handshake header carrying the dialer's token.
PEER_TOKEN_HEADER = "x-allspark-peer"
#: Header of the 101 answer carrying the acceptor's proof.
PEER_PROOF_HEADER = "x-allspark-peer-proof"
#: Seconds a peer token is valid (and a nonce remembered).
PEER_TOKEN_TTL = 30.0
#: Clock difference allowed between servers for a token issued "in the future".
PEER_CLOCK_SKEW = 5.0
#: The peer frame version this server speaks.
PEER_FRAME_VERSION = 1
#: Peer frame types and the fields each must have.
PEER_TYPES = ("hello", "deliver", "delivered", "invalidate", "error", "location", "location_ack", "batch",
              "disconnect", "drain")
#: Most frames one ``batch`` carries, and the bytes after which a batch is sent at once.
MAX_BATCH_FRAMES = 1000
MAX_BATCH_BYTES = 1024 * 1024
#: Most node_ids one ``deliver`` frame may name (longer lists are split).
MAX_DELIVER_IDS = 1000
#: Longest token accepted, in characters.
_MAX_TOKEN_CHARS = 1024
_PEER_KEY_LABEL = b"allspark peer link v1"

CLOSE_GOING_AWAY = 1001
CLOSE_QUEUE_OVERFLOW = 4008
CLOSE_REPLACED = 4009


# ----------------------------------------------------------------------------- auth


def derive_peer_key(cluster_secret: bytes) -> bytes:
    """The link key: ``HMAC-SHA256(cluster_secret, "allspark peer link v1")``,
    distinct from the secret and from the validation-token key."""
    if not isinstance(cluster_secret, bytes) or not cluster_secret:
        raise ValueError("the cluster secret must be non-empty bytes")
    return hmac.new(cluster_secret, _PEER_KEY_LABEL, hashlib.sha256).digest()


class PeerAuthError(Exception):
    """A peer handshake refused: ``code`` is ``missing_token``, ``bad_token``,
    ``foreign_token``, ``expired_token`` or ``replayed_token``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or len(text) % 4 == 1:
        raise ValueError("bad base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error as e:
        raise ValueError("bad base64") from e


class PeerAuth:
    """Issues and checks peer handshake tokens for server ``server_id``.

    See the module docstring for the token.  Accepted nonces are remembered
    until their token expires (only tokens with a valid MAC are remembered,
    so nobody without the secret can grow the set).
    """

    def __init__(self, key: bytes, server_id: str, clock: IReactorTime, ttl: float = PEER_TOKEN_TTL) -> None:
        if len(key) < 16:
            raise ValueError("the link key must be at least 16 bytes")
        self._key = key
        self.server_id = server_id
        self._clock = clock
        self.ttl = ttl
        #: tokens issued before this are refused (a previous process may have taken them)
        self.started_at = clock.seconds()
        self._seen: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def _mac(self, label: bytes, text: str) -> bytes:
        return hmac.new(self._key, label + text.encode("ascii"), hashlib.sha256).digest()

    def token(self, to_server: str) -> str:
        """A fresh token for a handshake from this server to ``to_server``."""
        claims = {"f": self.server_id, "t": to_server, "i": self._clock.seconds(),
                  "n": _b64encode(_secrets.token_bytes(16))}
        payload = _b64encode(orjson.dumps(claims))
        return payload + "." + _b64encode(self._mac(b"token.", payload))

    def verify(self, token: object) -> str:
        """The id of the server that sent ``token``, accepted once; else
        :class:`PeerAuthError`."""
        if token is None or token == "":
            raise PeerAuthError("missing_token", "no peer token: this path is for the servers of the cluster")
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            raise PeerAuthError("bad_token", "the peer token is malformed")
        payload_text, dot, signature_text = token.partition(".")
        try:
            signature = _b64decode(signature_text)
            payload = _b64decode(payload_text)
        except ValueError:
            raise PeerAuthError("bad_token", "the peer token is malformed") from None
        if not dot or not hmac.compare_digest(signature, self._mac(b"token.", payload_text)):
            raise PeerAuthError("bad_token", "the peer token's signature is not valid")
        try:
            claims = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise PeerAuthError("bad_token", "the peer token is malformed") from None
        if not isinstance(claims, dict):
            raise PeerAuthError("bad_token", "the peer token is malformed")
        sender, target, issued, nonce = claims.get("f"), claims.get("t"), claims.get("i"), claims.get("n")
        if (not is_valid_id(sender) or not isinstance(target, str) or not isinstance(nonce, str) or not nonce
                or isinstance(issued, bool) or not isinstance(issued, (int, float))):
            raise PeerAuthError("bad_token", "the peer token is malformed")
        assert isinstance(sender, str)
        if target != self.server_id or sender == self.server_id:
            raise PeerAuthError("foreign_token", "the peer token was issued for another server")
        now = self._clock.seconds()
        self._prune(now)
        if issued > now + PEER_CLOCK_SKEW:
            raise PeerAuthError("bad_token", "the peer token was issued in the future")
        if now >= issued + self.ttl:
            raise PeerAuthError("expired_token", "the peer token has expired")
        if issued < self.started_at:
            raise PeerAuthError("expired_token", "the peer token was issued before this server started")
        if nonce in self._seen:
            raise PeerAuthError("replayed_token", "the peer token was already used")
        expiry = issued + self.ttl
        self._seen[nonce] = expiry
        heapq.heappush(self._expiries, (expiry, nonce))
        return sender

    def proof(self, token: str) -> str:
        """The acceptor's answer to ``token``: proves it holds the link key."""
        return _b64encode(self._mac(b"proof.", token))

    def check_proof(self, token: str, proof: object) -> bool:
        """Whether ``proof`` is the acceptor's right answer to ``token``."""
        return isinstance(proof, str) and hmac.compare_digest(proof.encode("ascii", "replace"),
                                                              self.proof(token).encode("ascii"))

    def _prune(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, nonce = heapq.heappop(self._expiries)
            self._seen.pop(nonce, None)

    @property
    def remembered(self) -> int:
        """How many accepted nonces are remembered."""
        return len(self._seen)


# ----------------------------------------------------------------------------- frames


class PeerFrameError(Exception):
    """A peer frame that cannot be handled: ``code`` is ``bad_frame``,
    ``unsupported_version`` or ``unknown_type``."""

    def __init__(self, code: str, message: str, frame_id: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.frame_id = frame_id


@dataclass(frozen=True)
class PeerFrame:
    """One decoded peer frame: its type, its header fields and its payload."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


def encode_peer_frame(frame_type: str, payload: bytes = b"", **fields: Any) -> bytes:
    """A peer frame: ``{"v": 1, "t": frame_type, **fields}``, a newline, ``payload``."""
    return orjson.dumps({"v": PEER_FRAME_VERSION, "t": frame_type, **fields}) + b"\n" + payload


def encode_batch(frames: Sequence[bytes]) -> bytes:
    """One ``batch`` peer frame carrying ``frames`` (each a peer frame), in
    order: the payload is each frame's length (4 bytes, big-endian) and bytes."""
    parts = [len(f).to_bytes(4, "big") + f for f in frames]
    return encode_peer_frame("batch", b"".join(parts), n=len(frames))


def split_batch(payload: bytes) -> list[bytes]:
    """The frames of a ``batch`` payload; :class:`PeerFrameError` if it is malformed."""
    frames: list[bytes] = []
    at, end = 0, len(payload)
    while at < end:
        if end - at < 4 or len(frames) >= MAX_BATCH_FRAMES:
            raise PeerFrameError("bad_frame", "malformed batch")
        size = int.from_bytes(payload[at:at + 4], "big")
        at += 4
        if size == 0 or at + size > end:
            raise PeerFrameError("bad_frame", "malformed batch")
        frames.append(payload[at:at + size])
        at += size
    return frames


def _ids(value: object) -> list[str] | None:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_DELIVER_IDS:
        return None
    return value if all(is_valid_id(n) for n in value) else None


def decode_peer_frame(data: bytes) -> PeerFrame:
    """Parse and check one peer frame, or raise :class:`PeerFrameError`."""
    head, newline, payload = data.partition(b"\n")
    if not newline:
        raise PeerFrameError("bad_frame", "a peer frame is a JSON header, a newline and a payload")
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise PeerFrameError("bad_frame", "the peer frame header is not JSON") from None
    if not isinstance(header, dict):
        raise PeerFrameError("bad_frame", "the peer frame header is not an object")
    frame_id = header.get("id")
    version, frame_type = header.get("v"), header.get("t")
    if version != PEER_FRAME_VERSION or isinstance(version, bool):
        raise PeerFrameError("unsupported_version",
                             f"peer frame version {version!r} is not spoken here (only {PEER_FRAME_VERSION})",
                             frame_id)
    if frame_type not in PEER_TYPES:
        raise PeerFrameError("unknown_type", f"peer frame type {frame_type!r} is unknown", frame_id)
    fields = {k: v for k, v in header.items() if k not in ("v", "t")}
    if frame_id is not None and (isinstance(frame_id, bool) or not isinstance(frame_id, (int, str))):
        raise PeerFrameError("bad_frame", "id must be an integer or a string")
    if frame_type == "deliver":
        if _ids(fields.get("to")) is None:
            raise PeerFrameError("bad_frame", f"deliver needs to: 1-{MAX_DELIVER_IDS} node_ids", frame_id)
        if not payload:
            raise PeerFrameError("bad_frame", "deliver needs a payload", frame_id)
    elif frame_type == "hello":
        if not is_valid_id(fields.get("server_id")):
            raise PeerFrameError("bad_frame", "hello needs server_id", frame_id)
    elif frame_type == "invalidate":
        if not isinstance(fields.get("what"), str) or not isinstance(fields.get("key"), str):
            raise PeerFrameError("bad_frame", "invalidate needs what and key (strings)", frame_id)
    elif frame_type == "delivered":
        missing = fields.get("missing", [])
        if not isinstance(missing, list) or not all(isinstance(n, str) for n in missing):
            raise PeerFrameError("bad_frame", "delivered.missing must be a list of node_ids", frame_id)
    elif frame_type == "location":
        epoch = fields.get("epoch")
        if (not is_valid_id(fields.get("node_id")) or isinstance(epoch, bool) or not isinstance(epoch, int)
                or not isinstance(fields.get("online"), bool)):
            raise PeerFrameError("bad_frame", "location needs node_id, epoch (integer) and online (boolean)",
                                 frame_id)
    elif frame_type == "batch":
        if not payload:
            raise PeerFrameError("bad_frame", "batch needs a payload", frame_id)
    elif frame_type == "location_ack":
        if frame_id is None:
            raise PeerFrameError("bad_frame", "location_ack needs id")
    elif frame_type == "disconnect":
        until = fields.get("revoked_until", 0)  # absent: no change to the node's revocation
        if (not is_valid_id(fields.get("node_id")) or not isinstance(fields.get("reason", ""), str)
                or isinstance(until, bool) or not isinstance(until, int) or until < 0):
            raise PeerFrameError("bad_frame", "disconnect needs node_id, and takes reason (a string) and "
                                              "revoked_until (Unix ms)", frame_id)
    elif frame_type == "drain":
        if not is_valid_id(fields.get("server_id")):
            raise PeerFrameError("bad_frame", "drain needs server_id", frame_id)
    elif frame_type == "error":
        if not isinstance(fields.get("code"), str):
            raise PeerFrameError("bad_frame", "error needs code", frame_id)
    return PeerFrame(frame_type, fields, payload)


# ----------------------------------------------------------------------------- links


@dataclass(frozen=True)
class PeerLimits:
    """Limits of one peer link."""

    #: largest peer frame in bytes (a deliver of MAX_DELIVER_IDS ids and a client frame)
    max_message_size: int = 16 * 1024 * 1024
    #: bytes waiting for the kernel before the link is closed with 4008
    max_queue_bytes: int = 64 * 1024 * 1024
    #: seconds between WebSocket pings on a link
    heartbeat: float = 5.0
    #: seconds a ping may go unanswered before the link is dropped
    heartbeat_timeout: float = 10.0
    #: seconds the opening handshake may take
    handshake_timeout: float = 10.0


class _LinkMixin:
    """What both ends of a link share: the send queue, frame dispatch and
    the mesh's bookkeeping.  Mixed into an Autobahn protocol."""

    mesh: "Mesh"
    peer_id: str
    direction: str
    limits: PeerLimits
    _queue: deque[bytes]
    _queued: int
    _paused: bool
    _link_open: bool

    def _init_link(self) -> None:
        self._queue = deque()
        self._queued = 0
        self._paused = False
        self._link_open = False
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_call: Any = None

    def send_batched(self, frame: bytes) -> None:
        """Send ``frame`` at the end of this reactor turn, in one ``batch``
        WebSocket message with the others sent so (one message when alone).
        Order is kept: :meth:`send` writes what is batched first."""
        if not self._link_open:
            return
        self._batch.append(frame)
        self._batch_bytes += len(frame)
        if len(self._batch) >= MAX_BATCH_FRAMES or self._batch_bytes >= MAX_BATCH_BYTES:
            self.flush_batch()
        elif self._batch_call is None:
            self._batch_call = self.mesh.clock.callLater(0, self.flush_batch)

    def flush_batch(self) -> None:
        """Send what :meth:`send_batched` holds, now."""
        if self._batch_call is not None:
            if self._batch_call.active():
                self._batch_call.cancel()
            self._batch_call = None
        frames, self._batch, self._batch_bytes = self._batch, [], 0
        if len(frames) == 1:
            self._send_now(frames[0])
        elif frames:
            self._send_now(encode_batch(frames))

    def _open_link(self) -> None:
        transport: Any = getattr(self, "transport")
        if self.direction == "in":  # twisted.web's channel was the producer until now
            transport.unregisterProducer()
        transport.registerProducer(self, True)
        self._link_open = True
        self.mesh.link_up(self)
        self.send(encode_peer_frame("hello", server_id=self.mesh.server_id))

    def _open_or_drop(self) -> None:
        """Open the link; a failure is logged and the connection dropped
        (Autobahn calls onOpen where an exception would vanish)."""
        try:
            self._open_link()
        except Exception:
            where = "from" if self.direction == "in" else "to"
            log.failure("could not open the peer link {where} {peer_id}", where=where, peer_id=self.peer_id)
            getattr(self, "dropConnection")(abort=True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._close_link()

    def _close_link(self) -> None:
        self._queue.clear()
        self._queued = 0
        self._batch, self._batch_bytes = [], 0
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        self._batch_call = None
        if self._link_open:
            self._link_open = False
            self.mesh.link_down(self)

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def send(self, frame: bytes) -> None:
        """Write ``frame`` now or queue it (after anything batched); an
        overflowing queue closes the link."""
        if self._batch:
            self.flush_batch()
        self._send_now(frame)

    def _send_now(self, frame: bytes) -> None:
        if not self._link_open:
            return
        self.mesh.peer_frames_out += 1
        if not self._paused and not self._queue:
            self.sendMessage(frame, isBinary=True)  # type: ignore[attr-defined]
            return
        self._queue.append(frame)
        self._queued += len(frame)
        if self._queued > self.limits.max_queue_bytes:
            log.warn("closing the peer link to {peer_id}: send queue overflow ({queued} bytes)",
                     peer_id=self.peer_id, queued=self._queued)
            self.mesh.peer_overflows += 1
            self._close_link()
            self.sendClose(CLOSE_QUEUE_OVERFLOW, "peer send queue overflow")  # type: ignore[attr-defined]
            self.mesh.clock.callLater(2.0, self.dropConnection, abort=True)  # type: ignore[attr-defined]

    def close(self, code: int, reason: str) -> None:
        """Close the link (it leaves the mesh at once)."""
        self._close_link()
        if getattr(self, "state") == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:120], isReply=False)  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._queue and not self._paused:
            frame = self._queue.popleft()
            self._queued -= len(frame)
            self.sendMessage(frame, isBinary=True)  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._queue.clear()
        self._queued = 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self._link_open:
            return
        self.mesh.peer_frames_in += 1
        try:
            frame = decode_peer_frame(payload)
        except PeerFrameError as e:
            log.warn("bad peer frame from {peer_id}: {code}: {message}", peer_id=self.peer_id, code=e.code,
                     message=str(e), size=len(payload))
            fields: dict[str, Any] = {"code": e.code, "message": str(e)}
            if e.frame_id is not None:
                fields["id"] = e.frame_id
            self.send(encode_peer_frame("error", **fields))
            return
        if frame.type == "batch":
            try:
                inner = split_batch(frame.payload)
            except PeerFrameError as e:
                self.send(encode_peer_frame("error", code=e.code, message=str(e)))
                return
            for data in inner:
                self._handle_one(data)
            return
        self._dispatch(frame)

    def _handle_one(self, payload: bytes) -> None:
        try:
            frame = decode_peer_frame(payload)
        except PeerFrameError as e:
            fields: dict[str, Any] = {"code": e.code, "message": str(e)}
            if e.frame_id is not None:
                fields["id"] = e.frame_id
            self.send(encode_peer_frame("error", **fields))
            return
        if frame.type == "batch":
            self.send(encode_peer_frame("error", code="bad_frame", message="a batch inside a batch"))
            return
        self._dispatch(frame)

    def _dispatch(self, frame: PeerFrame) -> None:
        try:
            self.mesh.handle(self, frame)
        except Exception:
            log.failure("could not handle a {type} frame from peer {peer_id}", type=frame.type,
                        peer_id=self.peer_id)


@implementer(IPushProducer)
# Autobahn annotates _transport_details and peer differently in its two bases,
# which mypy reports for any class deriving from both a mixin and its protocol
class PeerServerProtocol(_LinkMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """The accepting end of a link (``/peer``)."""

    factory: "PeerServerFactory"
    direction = "in"

    def __init__(self) -> None:
        super().__init__()
        self._init_link()
        self.peer_id = "-"
        self._refusal: tuple[str, str] | None = None

    @property
    def mesh(self) -> "Mesh":  # type: ignore[override]
        return self.factory.mesh

    @property
    def limits(self) -> PeerLimits:  # type: ignore[override]
        return self.factory.mesh.limits

    def onConnect(self, request: ConnectionRequest) -> tuple[None, dict[str, str]]:
        """Accept a peer whose token (see :class:`PeerAuth`) is valid, else
        refuse with 401 (503 without a cluster secret or while stopping)."""
        mesh = self.mesh
        auth = mesh.auth
        if auth is None:
            self._deny(503, "no_cluster_secret", "peer links need a cluster secret, and this server has none")
        if not mesh.running:
            self._deny(503, "unavailable", "this server is not taking peer links now")
        token = request.headers.get(PEER_TOKEN_HEADER)
        try:
            self.peer_id = auth.verify(token)
        except PeerAuthError as e:
            self._deny(401, e.code, str(e))
        assert isinstance(token, str)
        return None, {PEER_PROOF_HEADER: auth.proof(token)}

    def _deny(self, status: int, code: str, message: str) -> NoReturn:
        self._refusal = (code, message)
        raise ConnectionDeny(status, f"{code}: {message}")

    def failHandshake(self, reason: str, code: int = 400,
                      responseHeaders: list[tuple[str, str]] | None = None) -> None:
        """Refuse the handshake: one log line (the address, the status and
        the error code, never the token), the JSON answer, then the
        connection closes.  Autobahn's own lines for it are left out."""
        transport = self.transport
        client = (getattr(transport.getPeer(), "host", None) if transport is not None else None) or "-"
        error = self._refusal[0] if self._refusal is not None else "bad_handshake"
        log.warn("refused a peer link from {client}: {status} {code}", client=client, status=code, code=error,
                 reason=reason if self._refusal is None else None)
        self.wasNotCleanReason = reason
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        self.wasClean = True  # the refusal is ours: Autobahn need not warn about the close
        self.dropConnection(abort=False)

    def sendHttpErrorResponse(self, code: int, reason: str,
                              responseHeaders: list[tuple[str, str]] | None = None) -> None:
        """A refused peer handshake is answered with a JSON body, like the client socket's."""
        from allspark.web import raw_json_answer

        error, message = self._refusal or (("bad_handshake", reason) if code < 500
                                           else ("internal_error", "the server could not accept this link"))
        self.sendData(raw_json_answer(code, {"error": error, "message": message}, responseHeaders or ()))

    def onOpen(self) -> None:
        self._open_or_drop()


@implementer(IPushProducer)
class PeerClientProtocol(_LinkMixin, WebSocketClientProtocol):  # type: ignore[misc]  # (as above)
    """The dialling end of a link."""

    factory: "PeerClientFactory"
    direction = "out"

    def __init__(self) -> None:
        super().__init__()
        self._init_link()
        self._token = ""
        self._proven = False
        self._opened_once = False

    @property
    def mesh(self) -> "Mesh":  # type: ignore[override]
        return self.factory.mesh

    @property
    def limits(self) -> PeerLimits:  # type: ignore[override]
        return self.factory.mesh.limits

    @property
    def peer_id(self) -> str:  # type: ignore[override]
        return self.factory.peer_id

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        """The opening handshake, with a fresh token for this attempt."""
        factory = self.factory
        auth = factory.mesh.auth
        assert auth is not None
        self._token = auth.token(factory.peer_id)
        return ConnectingRequest(host=factory.host, port=factory.port, resource=factory.resource,
                                 headers={PEER_TOKEN_HEADER: self._token}, useragent="Allspark peer")

    def onConnect(self, response: ConnectionResponse) -> None:
        """Use the link only if the acceptor proved it holds the link key."""
        auth = self.factory.mesh.auth
        assert auth is not None
        if not auth.check_proof(self._token, response.headers.get(PEER_PROOF_HEADER)):
            log.warn("peer {peer_id} did not prove it holds the cluster secret: link dropped",
                     peer_id=self.peer_id)
            raise ConnectionError("the peer's proof is missing or wrong")
        self._proven = True

    def onOpen(self) -> None:
        if not self._proven:
            self.dropConnection(abort=True)
            return
        self._opened_once = True
        self._open_or_drop()

    def connectionLost(self, reason: Any = None) -> None:
        """Say why a dial that never opened the link failed (a refused
        handshake, a TLS certificate that did not verify); ClientService
        dials again after its backoff."""
        if not self._opened_once:
            why = reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else str(reason)
            log.warn("could not open the peer link to {peer_id}: {reason}", peer_id=self.peer_id,
                     reason=self.wasNotCleanReason or why, error=why)
        super().connectionLost(reason)


def _protocol_options(limits: PeerLimits) -> dict[str, Any]:
    return {
        "maxFramePayloadSize": limits.max_message_size,
        "maxMessagePayloadSize": limits.max_message_size,
        "failByDrop": False,
        "autoPingInterval": limits.heartbeat,
        "autoPingTimeout": limits.heartbeat_timeout,
        "openHandshakeTimeout": limits.handshake_timeout,
        "closeHandshakeTimeout": 2.0,
        "utf8validateIncoming": False,
    }


class PeerServerFactory(WebSocketServerFactory):
    """Builds :class:`PeerServerProtocol` for ``/peer``."""

    protocol = PeerServerProtocol  # type: ignore[assignment]

    def __init__(self, mesh: "Mesh") -> None:
        super().__init__(reactor=mesh.clock, server="Allspark")
        self.mesh = mesh
        self.setProtocolOptions(webStatus=False, allowNullOrigin=True, **_protocol_options(mesh.limits))


class PeerClientFactory(WebSocketClientFactory):
    """Builds :class:`PeerClientProtocol` for the link to one peer."""

    protocol = PeerClientProtocol  # type: ignore[assignment]

    def __init__(self, mesh: "Mesh", peer_id: str, url: str) -> None:
        super().__init__(url=url, reactor=mesh.clock, useragent="Allspark peer")
        self.mesh = mesh
        self.peer_id = peer_id
        self.noisy = False  # no "Starting factory" line per dial
        self.setProtocolOptions(**_protocol_options(mesh.limits))


# ----------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class PeerTLS:
    """TLS for ``wss://`` peer links: the CA that signs the peers'
    certificates (PEM; None: the system's trust store) and, for mutual TLS,
    this server's certificate and key (PEM) presented to the peer."""

    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    def options_for(self, host: str) -> Any:
        """Client TLS options for ``host``: the peer's certificate must be
        signed by the CA and name ``host`` (checked with service-identity)."""
        from twisted.internet import ssl

        trust = ssl.Certificate.loadPEM(self.ca_pem) if self.ca_pem else ssl.platformTrust()
        client_cert = None
        if self.cert_pem and self.key_pem:
            client_cert = ssl.PrivateCertificate.loadPEM(self.cert_pem + b"\n" + self.key_pem)
        return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_cert)


# ----------------------------------------------------------------------------- the mesh

#: A source of peers: a callable returning a Deferred list of (server_id, url).
PeerSource = Callable[[], "Deferred[list[tuple[str, str]]]"]
#: Writes a frame to this server's connections of these node_ids; how many had one.
LocalDelivery = Callable[[Sequence[str], bytes], int]


@implementer(IStreamClientEndpoint)
class _SayWhyEndpoint:
    """An endpoint that logs each failed connection attempt to a peer
    (ClientService retries silently)."""

    def __init__(self, inner: IStreamClientEndpoint, peer_id: str) -> None:
        self.inner = inner
        self.peer_id = peer_id

    def connect(self, factory: Any) -> Deferred[Any]:
        def failed(failure: Any) -> Any:
            log.info("could not reach peer {peer_id}: {reason}", peer_id=self.peer_id,
                     reason=failure.getErrorMessage())
            return failure

        return self.inner.connect(factory).addErrback(failed)


@dataclass
class _Dialer:
    url: str
    service: ClientService


class Mesh(service.MultiService):
    """This server's peer links: dials the peers ``peers`` names (polled every
    ``poll_interval`` s), accepts links on ``/peer`` (:meth:`resource`), and
    implements :class:`allspark.delivery.RemoteRoute`.

    ``deliver_local`` writes a frame that came over a link to this server's
    connections only.  ``locations`` maps a node_id to the server holding it
    (filled by the location records; empty until they exist): what
    :meth:`holds` and :meth:`forward` use.  An ``invalidate`` frame goes to
    ``invalidation_handlers[what](key)`` (``"session"``: the session cache,
    :meth:`allspark.server.Server.share_caches`), else to
    ``on_invalidate(what, key)``; every hook in ``on_link_up`` is called with
    the peer's id when a link comes up.
    """

    def __init__(self, server_id: str, cluster_secret: bytes | None, clock: Any, peers: PeerSource,
                 deliver_local: LocalDelivery, limits: PeerLimits | None = None, tls: PeerTLS | None = None,
                 poll_interval: float = 3.0) -> None:
        super().__init__()
        self.server_id = server_id
        self.clock = clock
        self.auth = PeerAuth(derive_peer_key(cluster_secret), server_id, clock) if cluster_secret else None
        self.peers = peers
        self.deliver_local = deliver_local
        self.limits = limits or PeerLimits()
        self.tls = tls or PeerTLS()
        self.poll_interval = poll_interval
        self.links: dict[str, _LinkMixin] = {}
        #: WebSocket messages on the links and queue overflows, read by /metrics
        self.peer_frames_in = 0
        self.peer_frames_out = 0
        self.peer_overflows = 0
        #: where online nodes are (allspark.locations: filled by the LocationTracker)
        self.locations = Locations()
        #: called with (peer_id, node_id, epoch, online) for each ``location`` frame
        self.on_location: Callable[[str, str, int, bool], None] = lambda peer, node, epoch, online: None
        #: announcement id -> (fires when every peer acknowledged, peers still to answer)
        self._announcements: dict[int, tuple[Deferred[None], set[str]]] = {}
        self.on_invalidate: Callable[[str, str], None] = lambda what, key: None
        #: what -> handler(key) for ``invalidate`` frames (a ``what`` without
        #: one goes to :attr:`on_invalidate`)
        self.invalidation_handlers: dict[str, Callable[[str], None]] = {}
        #: called with the peer's id each time a link comes up (a peer that was
        #: unreachable may have missed invalidations meanwhile)
        self.on_link_up: list[Callable[[str], None]] = []
        #: called with whether any link is up, each time a link comes up or
        #: goes down (the delivery point skips the mesh while there is none)
        self.on_links_changed: list[Callable[[bool], None]] = []
        #: called with (node_id, reason, revoked_until) for each ``disconnect``
        #: frame: close that node's connections here; ``revoked_until`` (Unix
        #: ms, 0: lifted) is None when the frame changes no revocation
        self.on_disconnect: Callable[[str, str, int | None], None] = lambda node_id, reason, until: None
        #: called for a ``drain`` frame naming this server: drain as on SIGTERM
        self.on_drain: Callable[[], None] = lambda: None
        self._dialers: dict[str, _Dialer] = {}
        self._poll: LoopingCall | None = None
        self._since: dict[str, float] = {}
        self._frame_ids = 0
        self.server_factory = PeerServerFactory(self)

    # -- life cycle ----------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        if self.auth is None:
            log.warn("no cluster secret: peer links are off (set ALLSPARK_CLUSTER_SECRET or --cluster-secret-file)")
            return
        self._poll = LoopingCall(self.refresh)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=True).addErrback(
            lambda f: log.failure("the peer poll stopped", f))

    def stopService(self) -> Deferred[None]:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for link in list(self.links.values()):
            link.close(CLOSE_GOING_AWAY, "server shutting down")
        self._dialers.clear()
        return super().stopService()  # stops the ClientServices (our children)

    def refresh(self) -> Deferred[None]:
        """Ask the peer source once and dial (or stop dialling) to match it."""
        d = self.peers().addCallback(self._match)
        d.addErrback(lambda f: log.failure("could not list the peers", f))
        return d

    def _match(self, peers: Iterable[tuple[str, str]]) -> None:
        wanted: dict[str, str] = {}
        for peer_id, url in peers:
            # one link per pair: the server whose id sorts lower dials
            if peer_id != self.server_id and self.server_id < peer_id:
                wanted[peer_id] = url
        for peer_id, dialer in list(self._dialers.items()):
            if wanted.get(peer_id) != dialer.url:
                log.info("no longer dialling peer {peer_id}", peer_id=peer_id)
                del self._dialers[peer_id]
                dialer.service.disownServiceParent()
                link = self.links.get(peer_id)
                if link is not None and link.direction == "out":
                    link.close(CLOSE_GOING_AWAY, "peer gone")
        for peer_id, url in wanted.items():
            if peer_id not in self._dialers:
                self._dial(peer_id, url)

    def _dial(self, peer_id: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            log.error("cannot dial peer {peer_id}: {url} is not a ws:// or wss:// URL", peer_id=peer_id, url=url)
            return
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.clock, host, port, timeout=10)
        if parts.scheme == "wss":
            endpoint = wrapClientTLS(self.tls.options_for(host), endpoint)
        elif not _on_a_private_network(host):
            log.warn("the peer link to {peer_id} is plain ws:// to {host}: messages cross the network in "
                     "clear (use wss:// outside one host or a private network)", peer_id=peer_id, host=host)
        factory = PeerClientFactory(self, peer_id, url)
        dialer = ClientService(_SayWhyEndpoint(endpoint, peer_id), factory, retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=10.0),
                               clock=self.clock)
        self._dialers[peer_id] = _Dialer(url, dialer)
        dialer.setServiceParent(self)
        log.info("dialling peer {peer_id} at {url}", peer_id=peer_id, url=url)

    # -- links ---------------------------------------------------------------
    def link_up(self, link: _LinkMixin) -> None:
        """A link authenticated and open: it replaces an older link to the same peer."""
        old = self.links.get(link.peer_id)
        self.links[link.peer_id] = link
        self._since[link.peer_id] = self.clock.seconds()
        if old is not None and old is not link:
            old.close(CLOSE_REPLACED, "replaced by a newer link")
        log.info("peer link up: {peer_id} ({direction})", peer_id=link.peer_id, direction=link.direction)
        self._links_changed()
        for hook in list(self.on_link_up):
            try:
                hook(link.peer_id)
            except Exception:
                log.failure("a link-up hook failed for peer {peer_id}", peer_id=link.peer_id)

    def _links_changed(self) -> None:
        """Tell :attr:`on_links_changed` whether any link is up."""
        linked = bool(self.links)
        for hook in list(self.on_links_changed):
            try:
                hook(linked)
            except Exception:
                log.failure("a links-changed hook failed")

    def link_down(self, link: _LinkMixin) -> None:
        """A link closed."""
        if self.links.get(link.peer_id) is link:
            del self.links[link.peer_id]
            self._since.pop(link.peer_id, None)
            self._links_changed()
            # announcements waiting for this peer's acknowledgement stop waiting:
            # it reloads this server's locations from the store when it relinks
            for frame_id in list(self._announcements):
                self._acknowledged(frame_id, link.peer_id)
            log.info("peer link down: {peer_id} ({direction})", peer_id=link.peer_id, direction=link.direction)

    def status(self) -> dict[str, Any]:
        """The links, for ``/health``: peer id -> direction and how long it has been up."""
        now = self.clock.seconds()
        return {peer_id: {"direction": link.direction, "up_for": round(now - self._since.get(peer_id, now), 3)}
                for peer_id, link in sorted(self.links.items())}

    # -- frames in -----------------------------------------------------------
    def handle(self, link: _LinkMixin, frame: PeerFrame) -> None:
        """Act on one frame from ``link``.  Nothing here forwards: a frame from
        a peer is written to this server's connections or dropped."""
        if frame.type == "deliver":
            to: list[str] = frame.fields["to"]
            missing = [n for n in to if self.deliver_local((n,), frame.payload) == 0]
            if "id" in frame.fields and (missing or frame.fields.get("report") != "missing"):
                link.send(encode_peer_frame("delivered", id=frame.fields["id"], missing=missing))
        elif frame.type == "delivered":
            # our location cache named this peer for nodes it does not hold: drop them
            # (the copies are in the store; nothing is sent again, so nothing loops)
            for node_id in frame.fields.get("missing", []):
                self.locations.drop_node_at(node_id, link.peer_id)
        elif frame.type == "location":
            f = frame.fields
            self.on_location(link.peer_id, f["node_id"], f["epoch"], f["online"])
            if "id" in f:
                link.send(encode_peer_frame("location_ack", id=f["id"]))
        elif frame.type == "location_ack":
            self._acknowledged(frame.fields["id"], link.peer_id)
        elif frame.type == "invalidate":
            handler = self.invalidation_handlers.get(frame.fields["what"])
            if handler is not None:
                handler(frame.fields["key"])
            else:
                self.on_invalidate(frame.fields["what"], frame.fields["key"])
        elif frame.type == "disconnect":
            f = frame.fields
            self.on_disconnect(f["node_id"], f.get("reason", ""), f.get("revoked_until"))
        elif frame.type == "drain":
            if frame.fields["server_id"] == self.server_id:
                log.info("drain requested by peer {peer_id}", peer_id=link.peer_id)
                self.on_drain()
            else:
                log.warn("peer {peer_id} asked server {target} to drain, not this one", peer_id=link.peer_id,
                         target=frame.fields["server_id"])
        elif frame.type == "hello":
            if frame.fields["server_id"] != link.peer_id:
                log.warn("peer {peer_id} says it is {claimed}", peer_id=link.peer_id,
                         claimed=frame.fields["server_id"])
        elif frame.type == "error":
            log.warn("peer {peer_id} refused a frame: {code}: {message}", peer_id=link.peer_id,
                     code=frame.fields["code"], message=frame.fields.get("message"))

    # -- frames out (allspark.delivery.RemoteRoute) --------------------------
    def holds(self, node_id: str) -> bool:
        """Whether ``node_id`` is connected to another server we have a link to."""
        links = self.links
        return any(server_id in links for server_id in self.locations.servers_of(node_id))

    def located(self) -> Locations:
        """The node_ids placed on other servers (see :meth:`holds`)."""
        return self.locations

    def forward(self, node_ids: Sequence[str], frame: bytes) -> None:
        """Send ``frame`` to the servers holding ``node_ids`` (from
        :attr:`locations`): one ``deliver`` per server and list of at most
        :data:`MAX_DELIVER_IDS` ids.  Never raises."""
        by_server: dict[str, list[str]] = {}
        servers_of = self.locations.servers_of
        for node_id in node_ids:
            for server_id in servers_of(node_id):
                if server_id != self.server_id:
                    by_server.setdefault(server_id, []).append(node_id)
        for server_id, ids in by_server.items():
            self.send_to(server_id, ids, frame)

    def send_to(self, server_id: str, node_ids: Sequence[str], frame: bytes) -> bool:
        """Send ``frame`` for ``node_ids`` to ``server_id`` over its link;
        whether there was a link (a copy without one waits in the store)."""
        link = self.links.get(server_id)
        if link is None or not node_ids:
            return False
        send = getattr(link, "send_batched", link.send)
        for start in range(0, len(node_ids), MAX_DELIVER_IDS):
            self._frame_ids += 1
            send(encode_peer_frame("deliver", frame, to=list(node_ids[start:start + MAX_DELIVER_IDS]),
                                   id=self._frame_ids, report="missing"))
        return True

    def announce_location(self, node_id: str, epoch: int, online: bool,
                          timeout: float | None = None) -> Deferred[None]:
        """Tell every linked peer that a connection of ``node_id`` (``epoch``)
        opened (``online``) or closed.  With a ``timeout``, each peer is asked
        to acknowledge and the Deferred fires once all peers linked now have
        (a peer whose link drops counts as answered), or after ``timeout``
        seconds; without one it fires at once."""
        links = list(self.links.values())
        if timeout is None or not links:
            frame = encode_peer_frame("location", node_id=node_id, epoch=epoch, online=online)
            for link in links:
                link.send(frame)
            return succeed(None)
        self._frame_ids += 1
        frame_id = self._frame_ids
        done: Deferred[None] = Deferred()
        self._announcements[frame_id] = (done, {link.peer_id for link in links})
        frame = encode_peer_frame("location", node_id=node_id, epoch=epoch, online=online, id=frame_id)
        for link in links:
            link.send(frame)
        call = self.clock.callLater(timeout, self._announcement_timed_out, frame_id)
        done.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return done

    def _acknowledged(self, frame_id: object, peer_id: str) -> None:
        entry = self._announcements.get(frame_id)  # type: ignore[call-overload]
        if entry is None:
            return
        done, waiting = entry
        waiting.discard(peer_id)
        if not waiting:
            del self._announcements[frame_id]  # type: ignore[arg-type]
            done.callback(None)

    def _announcement_timed_out(self, frame_id: int) -> None:
        entry = self._announcements.pop(frame_id, None)
        if entry is not None:
            log.warn("peers {peers} did not acknowledge a location within the timeout",
                     peers=sorted(entry[1]))
            entry[0].callback(None)

    def invalidate(self, what: str, key: str) -> None:
        """Tell every linked peer to drop its cache entry ``what``/``key``."""
        frame = encode_peer_frame("invalidate", what=what, key=key)
        for link in list(self.links.values()):
            link.send(frame)

    def disconnect(self, node_id: str, reason: str, revoked_until_ms: int | None = None) -> list[str]:
        """Tell every linked peer to close ``node_id``'s connections (and,
        with ``revoked_until_ms``, that it is revoked until then: Unix ms, 0
        lifts a revocation); the ids of the peers told."""
        if revoked_until_ms is None:
            frame = encode_peer_frame("disconnect", node_id=node_id, reason=reason)
        else:
            frame = encode_peer_frame("disconnect", node_id=node_id, reason=reason, revoked_until=revoked_until_ms)
        told = []
        for peer_id, link in sorted(self.links.items()):
            link.send(frame)
            told.append(peer_id)
        return told

    def drain(self, server_id: str) -> bool:
        """Ask peer ``server_id`` to drain (as on SIGTERM); whether a link
        to it was up to carry the request."""
        link = self.links.get(server_id)
        if link is None:
            return False
        link.send(encode_peer_frame("drain", server_id=server_id))
        return True

    def resource(self) -> Any:
        """The ``/peer`` resource for the site."""
        from allspark.web import SocketResource

        return SocketResource(self.server_factory)


def _on_a_private_network(host: str) -> bool:
    """Whether ``host`` is a loopback or private address (or ``localhost``),
    where plain ``ws://`` peer links are acceptable."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: it could resolve anywhere
    return address.is_loopback or address.is_private or address.is_link_local


def peer_url(scheme: str, host: str, port: int) -> str:
    """The peer link URL of a server whose clients use ``scheme`` (ws or
    wss) at ``host:port``: peers dial the same port, on ``/peer``."""
    host = f"[{host}]" if ":" in host else host
    return f"{'wss' if scheme == 'wss' else 'ws'}://{host}:{port}/{PEER_PATH}"


def record_peers(cluster: Any) -> PeerSource:
    """A peer source from the cluster view (``allspark.cluster.ClusterRecords``:
    ``servers`` as last read by the heartbeat, ``alive(record)``): every
    other server whose heartbeat is within the dead time, live or draining
    (a draining server still holds clients until they move)."""
    from twisted.internet.defer import succeed

    def live_servers() -> Deferred[list[tuple[str, str]]]:
        return succeed([(r.server_id, peer_url(r.scheme, r.host, r.port)) for r in list(cluster.servers.values())
                        if r.server_id != cluster.server_id and cluster.alive(r)])

    return live_servers


def combined_peers(*sources: PeerSource) -> PeerSource:
    """A peer source that asks each of ``sources``; the first URL given for
    a server id wins."""
    from twisted.internet.defer import gatherResults

    def combined() -> Deferred[list[tuple[str, str]]]:
        def merge(results: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
            seen: dict[str, str] = {}
            for peers in results:
                for peer_id, url in peers:
                    seen.setdefault(peer_id, url)
            return list(seen.items())

        return gatherResults([source() for source in sources], consumeErrors=True).addCallback(merge)

    return combined


def static_peers(specs: Iterable[str]) -> PeerSource:
    """A peer source from ``--peer ID=URL`` options (each ``server_id=ws://host:port/peer``)."""
    from twisted.internet.defer import succeed

    peers = []
    for spec in specs:
        peer_id, eq, url = spec.partition("=")
        if not eq or not is_valid_id(peer_id) or not url.startswith(("ws://", "wss://")):
            raise ValueError(f"--peer {spec!r}: expected SERVER_ID=ws://host:port/{PEER_PATH} (or wss://)")
        peers.append((peer_id, url))
    return lambda: succeed(list(peers))
