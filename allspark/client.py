"""A small Python client for Allspark, on Twisted and Autobahn.

Tests, examples and the benchmarks use it; apps can too::

    client = await connect("http://127.0.0.1:8080", auth_key)
    await client.send(dest_id="bob-phone", payload={"text": "hi"})
    message = await client.next_message()

What it does for you:

- pre-connection (``GET /?get_pre_connection_info=true``), then the WebSocket
  to the ``ws_url`` it is given;
- an ``id`` on every frame it sends, so each answer (``accepted``, ``acked``,
  ``synced``, ``error``...) fires the Deferred of the request it answers;
- sync on connect: one ``sync`` brings everything the node has not acked,
  its inbox and then every session it is a member of, each part ending with
  its own ``synced`` and the whole with ``sync_done``;
- de-duplication: a message whose ``seq`` was already handed to the app (live
  and again by a sync) is dropped;
- automatic acks of what was handed to the app, batched (``ack_delay``);
- sessions: :meth:`Client.create_session`, :meth:`Client.join_session`,
  :meth:`Client.unjoin_session`, :meth:`Client.session_info`, ...; the sync
  on connect brings what every session sent meanwhile.  A session broadcast carries ``session_seq`` (its place in the session stream),
  de-duplicated and acked per session; a private message inside a session
  carries the inbox ``seq`` like any direct message;
- user-wide sends (``send(dest_client_id=...)``): every device of that user
  gets the message, and so do the sender's own other devices.  A copy of your
  own message (sent from another of your devices) is one whose
  ``src_client_id`` equals your own ``client_id`` (:meth:`Client.is_own_copy`);
- moving: a server that drains sends ``{"op": "reconnect", "pre_connection_url":
  ...}`` before closing with 1001; a client made by :func:`connect` then asks
  that URL (else its first one) for pre-connection, opens the new socket with
  the same :class:`Client` (its de-duplication state kept) and syncs, so
  nothing accepted meanwhile is lost (:meth:`Client.reconnect`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
import treq
from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from allspark.logs import logger

log = logger(__name__)

#: Consecutive sync pages without progress before :meth:`Client.sync` gives up.
MAX_STALLED_PAGES = 200

#: Answers the server sends to a request, matched by the request's id.
ANSWER_OPS = frozenset({"accepted", "acked", "synced", "error", "pong", "session", "member",
                        "left", "revealed", "master", "sessions", "sync_done", "presence",
                        "push_registered", "push_unregistered", "push_muted"})


class AllsparkError(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code = frame.get("code")
        self.frame = frame


class PreConnectionError(Exception):
    """Pre-connection was refused (a bad key: HTTP 401)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class _Stream:
    """De-duplication and ack state of one seq stream (the inbox or a session)."""

    watermark: int = 0
    seen: set[int] = field(default_factory=set)
    acked: int = 0

    def accept(self, seq: int) -> bool:
        """Whether ``seq`` is new; records it."""
        if seq <= self.watermark or seq in self.seen:
            return False
        self.seen.add(seq)
        self._advance()
        return True

    def skip_to(self, upto: int) -> None:
        """Everything up to ``upto`` was delivered or is gone."""
        if upto > self.watermark:
            self.watermark = upto
            self.seen = {s for s in self.seen if s > upto}
            self._advance()

    def _advance(self) -> None:
        while self.watermark + 1 in self.seen:
            self.watermark += 1
            self.seen.discard(self.watermark)


class ClientProtocol(WebSocketClientProtocol):
    """The socket side of :class:`Client`."""

    client: "Client"

    def onOpen(self) -> None:
        self.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client._frame(orjson.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client._closed(code, reason)


class Client:
    """One connected node.  Build it with :func:`connect`."""

    def __init__(
        self, reactor: Any, auto_ack: bool = True, ack_delay: float = 0.05, inbox_after: int = 0,
        tls_trust: Certificate | None = None,
    ) -> None:
        """``auto_ack``: ack what was handed to the app, ``ack_delay`` s later
        (batched).  ``inbox_after``: the last inbox seq the app already
        processed in an earlier run (it keeps it itself); sync starts after
        it and anything at or below it is dropped as a duplicate.
        ``tls_trust``: the CA certificate a ``wss://`` or ``https://``
        server's certificate must be signed by (None: the system's trust
        store); the certificate must also be valid for the server's host."""
        self.reactor = reactor
        self.tls_trust = tls_trust
        self.auto_ack = auto_ack
        self.ack_delay = ack_delay
        self.protocol: ClientProtocol | None = None
        self.hello: dict[str, Any] | None = None
        self.messages: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.events: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self._hello: Deferred[dict[str, Any]] = Deferred()
        self._pending: dict[str, Deferred[dict[str, Any]]] = {}
        # ids of full syncs in progress: their synced frames are parts, not answers
        self._full_syncs: set[str] = set()
        self._counter = 0
        self._id_prefix = f"c-{secrets.token_hex(4)}-"
        self.received = 0
        self._streams: dict[str | None, _Stream] = {None: _Stream(watermark=inbox_after)}
        self._ack_call: Any = None
        #: gaps reported by sync: ``{"after", "upto"[, "session_id"]}``, each
        #: a range of seqs the server removed by retention before they were acked
        self.gaps: list[dict[str, Any]] = []
        #: where :func:`connect` pre-connected, and with which key: set, the
        #: client follows a server's ``reconnect`` frame by itself
        self.base_url: str | None = None
        self.auth_key: str | None = None
        #: how many times the client moved to a new socket after a ``reconnect``
        self.reconnections = 0
        self._reconnect_to: str | None = None

    # -- sending ----------------------------------------------------------
    def _next_id(self) -> str:
        """A frame id unique to this Client object: the server de-duplicates
        on (node, id) for 10 minutes, so a new connection of the same node
        must never reuse an earlier one's ids (its messages would be taken
        for retries and dropped)."""
        self._counter += 1
        return f"{self._id_prefix}{self._counter}"

    def send_raw(self, data: bytes | str) -> None:
        """Write raw bytes as one text frame (for tests of bad input)."""
        assert self.protocol is not None
        self.protocol.sendMessage(data.encode() if isinstance(data, str) else data)

    def request(self, frame: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send ``frame`` with an id; fires with the answer, or fails with
        :class:`AllsparkError` when the answer is an error frame."""
        frame = dict(frame)
        frame_id = frame.setdefault("id", self._next_id())
        d: Deferred[dict[str, Any]] = Deferred()
        self._pending[frame_id] = d
        try:
            self.send_raw(orjson.dumps(frame))
        except (Disconnected, AssertionError):
            # closing: the socket is gone before onClose told us
            del self._pending[frame_id]
            d.errback(ConnectionDone("connection closed"))
        return d

    def send(self, **fields: Any) -> Deferred[dict[str, Any]]:
        """Send a message (``dest_id=``, ``dest_client_id=``,
        ``dest_session_id=``, ``payload=``, ``ephemeral=``, ``type=``,
        ``id=``); fires with the ``accepted`` frame.

        A session broadcast's ``accepted`` carries its ``session_seq``; the
        node never receives its own row, so that seq counts as handed over
        (the session's ack cursor can move past it)."""
        d = self.request(fields)
        session_id = fields.get("dest_session_id")
        if session_id is not None:
            def own_row(accepted: dict[str, Any]) -> dict[str, Any]:
                if "session_seq" in accepted:
                    self._stream(session_id).accept(accepted["session_seq"])
                return accepted

            d.addCallback(own_row)
        return d

    def ping(self) -> Deferred[dict[str, Any]]:
        return self.request({"op": "ping"})

    def ack(self, upto: int, session_id: str | None = None) -> Deferred[dict[str, Any]]:
        """Ack the inbox (or a session stream) up to ``upto``."""
        frame: dict[str, Any] = {"op": "ack", "upto": upto}
        if session_id is not None:
            frame["session_id"] = session_id
        stream = self._stream(session_id)
        stream.acked = max(stream.acked, upto)
        return self.request(frame)

    # -- sessions ---------------------------------------------------------
    async def create_session(self, **options: Any) -> dict[str, Any]:
        """``create_session`` (``session_id=``, ``anonymous=``,
        ``anyone_can_join=``, ``session_type="group"|"game"``); the
        ``session`` answer.  The stream cursor starts where the node joined."""
        answer = await self.request({"op": "create_session", **options})
        self._joined(answer["session_id"], answer["you"])
        return answer

    async def join_session(self, session_id: str, **options: Any) -> dict[str, Any]:
        """``join_session`` (``anonymous=``; ``node_id=`` when the owner adds
        someone); the ``member`` answer."""
        answer = await self.request({"op": "join_session", "session_id": session_id, **options})
        if "node_id" not in options or options["node_id"] == answer.get("node_id"):
            self._joined(session_id, answer)
        return answer

    def unjoin_session(self, session_id: str, **options: Any) -> Deferred[dict[str, Any]]:
        """``unjoin_session`` (the owner may name ``node_id=`` or ``alias=``);
        the ``left`` answer."""
        return self.request({"op": "unjoin_session", "session_id": session_id, **options})

    def session_info(self, session_id: str, after: str | None = None,
                     limit: int | None = None) -> Deferred[dict[str, Any]]:
        """``get_session_info``; the ``session`` answer, with one page of
        ``members`` (by name, after ``after``; ``more`` and ``next`` say
        whether and where to go on).  :meth:`session_members` reads them all."""
        frame: dict[str, Any] = {"op": "get_session_info", "session_id": session_id}
        if after is not None:
            frame["after"] = after
        if limit is not None:
            frame["limit"] = limit
        return self.request(frame)

    async def session_members(self, session_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every member of a session (``get_session_info`` page by page)."""
        members: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            answer = await self.session_info(session_id, after, limit)
            members.extend(answer["members"])
            if not answer.get("more"):
                return members
            after = answer["next"]

    def presence(self, **query: Any) -> Deferred[dict[str, Any]]:
        """``presence`` with ``session_id=`` (and ``subscribe=``, ``after=``,
        ``limit=``), ``client_id=`` or ``node_id=``; the ``presence`` answer.
        ``presence_changed`` events arrive through :meth:`next_event`."""
        return self.request({"op": "presence", **query})

    def reveal_anonymity(self, session_id: str) -> Deferred[dict[str, Any]]:
        """``reveal_anonymity``; the ``revealed`` answer."""
        return self.request({"op": "reveal_anonymity", "session_id": session_id})

    def set_master(self, session_id: str, **member: Any) -> Deferred[dict[str, Any]]:
        """``set_master`` with ``node_id=`` or ``alias=``; the ``master`` answer."""
        return self.request({"op": "set_master", "session_id": session_id, **member})

    # -- push notifications -------------------------------------------------
    def register_push(self, provider: str, **target: Any) -> Deferred[dict[str, Any]]:
        """``register_push`` for ``provider`` (``fcm``, ``apns``, ``webpush``,
        ``webhook``) with ``token=`` (or ``subscription=`` for webpush;
        ``topic=`` and ``environment=`` for apns); the ``push_registered``
        answer (``active``: whether this server has the provider configured)."""
        return self.request({"op": "register_push", "provider": provider, **target})

    def unregister_push(self) -> Deferred[dict[str, Any]]:
        """``unregister_push``; the ``push_unregistered`` answer (``removed``)."""
        return self.request({"op": "unregister_push"})

    def mute_push(self, muted: bool = True) -> Deferred[dict[str, Any]]:
        """``mute_push``; the ``push_muted`` answer."""
        return self.request({"op": "mute_push", "muted": muted})

    async def my_sessions(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Every session this node is a member of, with its cursors
        (``my_sessions`` page by page)."""
        sessions: list[dict[str, Any]] = []
        frame: dict[str, Any] = {"op": "my_sessions", "limit": limit}
        while True:
            answer = await self.request(frame)
            sessions.extend(answer["sessions"])
            if not answer.get("more"):
                return sessions
            frame = {"op": "my_sessions", "limit": limit, "after": answer["next"]}

    async def sync_sessions(self) -> int:
        """Sync every session this node is a member of; how many new
        messages arrived."""
        received = 0
        for entry in await self.my_sessions():
            self._stream(entry["session_id"]).skip_to(max(entry["acked_seq"], entry["joined_seq"]))
            received += await self.sync(entry["session_id"])
        return received

    def is_own_copy(self, message: dict[str, Any]) -> bool:
        """Whether ``message`` is a copy of something this user sent from
        another of its devices (a user-wide send): its ``src_client_id`` is
        this node's own client_id."""
        client_id = (self.hello or {}).get("client_id")
        return client_id is not None and message.get("src_client_id") == client_id

    def _joined(self, session_id: str, member: dict[str, Any]) -> None:
        stream = self._stream(session_id)
        cursor = max(member.get("acked_seq", 0), member.get("joined_seq", 0))
        stream.skip_to(cursor)
        stream.acked = max(stream.acked, member.get("acked_seq", 0))

    async def sync(self, session_id: str | None = None, limit: int = 500) -> int:
        """Fetch everything not yet handed over into :attr:`messages`; how
        many new messages arrived.

        Without ``session_id``: one full ``sync``, the inbox after what was
        handed over and then every session with rows past this member's
        cursor; each part's ``synced`` moves that stream's position, and
        ``sync_done`` ends it.  With ``session_id``: that session, page by
        page (``limit`` rows each).

        A ``synced`` frame that reports a gap (messages removed by retention
        before this node acked them) is recorded in :attr:`gaps`."""
        if session_id is None:
            return await self._sync_everything(limit)
        stream = self._stream(session_id)
        received = self.received
        stalled = 0
        # a session stream with no known position starts at the server's
        # cursor for this member (its acked_seq)
        after: int | None = stream.watermark if session_id is None or stream.watermark else None
        while True:
            frame: dict[str, Any] = {"op": "sync", "limit": limit}
            if after is not None:
                frame["after"] = after
            if session_id is not None:
                frame["session_id"] = session_id
            synced = await self.request(frame)
            self._synced(synced)
            if not synced["more"]:
                return self.received - received
            if after is not None and synced["upto"] <= after:
                # no progress: the server's send queue to us is full; let it drain
                stalled += 1
                if stalled > MAX_STALLED_PAGES:
                    raise AllsparkError({"code": "sync_stalled",
                                         "message": f"sync made no progress after {after}"})
                await deferLater(self.reactor, 0.05, lambda: None)
            else:
                stalled = 0
            after = synced["upto"]

    async def _sync_everything(self, limit: int) -> int:
        received = self.received
        frame_id = self._next_id()
        self._full_syncs.add(frame_id)
        try:
            await self.request({"op": "sync", "after": self._stream(None).watermark, "limit": limit,
                                "id": frame_id})
        finally:
            self._full_syncs.discard(frame_id)
        return self.received - received

    def _synced(self, synced: dict[str, Any]) -> None:
        """A ``synced`` frame (a page, or a part of a full sync): everything
        up to its ``upto`` was written before it; record a gap."""
        session_id = synced.get("session_id")
        if "gap" in synced:
            gap = dict(synced["gap"])
            if session_id is not None:
                gap["session_id"] = session_id
            self.gaps.append(gap)
        stream = self._stream(session_id)
        stream.skip_to(synced["upto"])
        if self.auto_ack and stream.watermark > stream.acked:
            self._schedule_ack()

    # -- receiving --------------------------------------------------------
    def next_message(self, timeout: float = 10.0) -> Deferred[dict[str, Any]]:
        """The next message handed to the app (fails after ``timeout`` s)."""
        return self.messages.get().addTimeout(timeout, self.reactor)

    def next_event(self, timeout: float = 10.0) -> Deferred[dict[str, Any]]:
        """The next server event (member_joined, an error without id...)."""
        return self.events.get().addTimeout(timeout, self.reactor)

    def _stream(self, session_id: str | None) -> _Stream:
        stream = self._streams.get(session_id)
        if stream is None:
            stream = self._streams[session_id] = _Stream()
        return stream

    def _frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op is None:
            self._message(frame)
            return
        if op == "hello":
            self.hello = frame
            if not self._hello.called:  # not after open_socket gave up waiting
                self._hello.callback(frame)
            return
        if op == "reconnect":
            # the server is draining: move to the server it names once the
            # socket closes (none named: no other server is live)
            self._reconnect_to = frame.get("pre_connection_url")
        if op == "member_joined" and frame.get("you"):
            # the owner added this node: its stream cursor starts where it joined
            self._joined(frame["session_id"], frame["member"])
        frame_id = frame.get("id")
        if op == "synced" and frame_id in self._full_syncs:
            self._synced(frame)  # one part of a full sync; sync_done answers it
            return
        if op in ANSWER_OPS and frame_id in self._pending:
            d = self._pending.pop(frame_id)
            if op == "error":
                d.errback(AllsparkError(frame))
            else:
                d.callback(frame)
            return
        self.events.put(frame)

    def _message(self, frame: dict[str, Any]) -> None:
        if "session_seq" in frame:
            seq, stream = frame["session_seq"], self._stream(frame.get("dest_session_id"))
        else:
            seq, stream = frame.get("seq"), self._stream(None)
        if seq is not None:
            if not stream.accept(seq):
                return
            if self.auto_ack:
                self._schedule_ack()
        self.received += 1
        self.messages.put(frame)

    def _schedule_ack(self) -> None:
        """Ack what was handed over ``ack_delay`` s from now (batched)."""
        if self._ack_call is None:
            self._ack_call = self.reactor.callLater(self.ack_delay, self._auto_ack)

    def _auto_ack(self) -> None:
        self._ack_call = None
        if self.protocol is None:
            return
        for session_id, stream in list(self._streams.items()):
            if stream.watermark > stream.acked:
                self.ack(stream.watermark, session_id).addErrback(lambda f: None)

    # -- life cycle -------------------------------------------------------
    def _opened(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol

    def _closed(self, code: int | None, reason: str | None) -> None:
        self.protocol = None
        self.close_code = code
        self.close_reason = reason
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(ConnectionDone(f"connection closed ({code}: {reason})"))
        if not self._hello.called:
            self._hello.errback(ConnectionDone(f"connection closed before hello ({code}: {reason})"))
        if not self.closed.called:
            self.closed.callback((code, reason))
        target, self._reconnect_to = self._reconnect_to, None
        if target is not None and self.auth_key is not None:
            moving = ensureDeferred(self.reconnect(target))
            moving.addErrback(lambda f: log.failure("could not reconnect to {url}", f, url=target))

    async def reconnect(self, base_url: str | None = None, attempts: int = 8) -> None:
        """Pre-connect at ``base_url`` (else the first URL), open a new socket
        for this client and sync, keeping what was already handed to the app
        (so nothing is handed over twice).  Retries with a growing pause
        (0.2 s, doubling, at most 2 s), ``attempts`` times, alternating
        between ``base_url`` and the first URL."""
        if self.auth_key is None:
            raise RuntimeError("this client was not made by connect(): it has no key to reconnect with")
        urls = [u for u in (base_url, self.base_url) if u]
        pause = 0.2
        for attempt in range(attempts):
            url = urls[attempt % len(urls)]
            try:
                info = await pre_connection(url, self.auth_key, tls_trust=self.tls_trust)
                self._hello = Deferred()
                self.closed = Deferred()
                _dial(self.reactor, self, info["node"]["ws_url"])
                await self._hello.addTimeout(15, self.reactor)
                await self.sync()
            except Exception as e:
                log.info("reconnect to {url} failed ({error}); attempt {attempt}", url=url,
                         error=type(e).__name__, attempt=attempt + 1)
                if self.protocol is not None:
                    self.drop()
                await deferLater(self.reactor, pause)
                pause = min(2.0, pause * 2)
                continue
            self.reconnections += 1
            return
        raise ConnectionDone(f"could not reconnect after {attempts} attempts")

    def close(self) -> Deferred[tuple[int | None, str | None]]:
        """Close the socket; fires with (code, reason) once closed."""
        if self.protocol is not None:
            self.protocol.sendClose(1000)
        return self.closed

    def drop(self) -> None:
        """Cut the TCP connection without a close handshake (a dead network)."""
        transport = self.protocol.transport if self.protocol is not None else None
        if transport is not None and ITCPTransport.providedBy(transport):  # TCP and TLS are
            transport.abortConnection()
        elif transport is not None:
            transport.loseConnection()


async def pre_connection(base_url: str, auth_key: str, need_proxy: bool = False,
                         tls_trust: Certificate | None = None) -> dict[str, Any]:
    """Ask ``base_url`` where to connect; the pre-connection answer.  An
    ``https://`` server's certificate is verified against ``tls_trust`` (None:
    the system's trust store) and its host."""
    from twisted.internet import reactor

    query = {"get_pre_connection_info": "true", "auth_key": auth_key}
    if need_proxy:
        query["need_proxy"] = "true"
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=tls_trust))
    response = await treq.get(f"{base_url.rstrip('/')}/?{urlencode(query)}", persistent=False, agent=agent)
    body = await response.json()
    if response.code != 200:
        raise PreConnectionError(response.code, body)
    return body


async def open_socket(reactor: Any, ws_url: str, **options: Any) -> Client:
    """Open the WebSocket at ``ws_url`` and wait for the hello frame."""
    client = Client(reactor, **options)
    _dial(reactor, client, ws_url)
    await client._hello.addTimeout(15, reactor)
    return client


def _dial(reactor: Any, client: Client, ws_url: str) -> None:
    """Open a WebSocket at ``ws_url`` whose frames go to ``client``.  Over
    ``wss://`` the server's certificate must be valid for the URL's host and
    signed by ``client.tls_trust`` (None: the system's trust store); Autobahn's
    own default would accept any certificate."""
    factory = WebSocketClientFactory(ws_url, reactor=reactor)
    factory.setProtocolOptions(autoPingInterval=0, maxMessagePayloadSize=0, maxFramePayloadSize=0)

    def build(addr: Any) -> ClientProtocol:
        protocol = ClientProtocol()
        protocol.factory = factory
        protocol.client = client
        return protocol

    factory.buildProtocol = build  # type: ignore[method-assign]
    tls = optionsForClientTLS(factory.host, trustRoot=client.tls_trust) if factory.isSecure else None
    connectWS(factory, contextFactory=tls, timeout=10)


async def connect(
    base_url: str, auth_key: str, reactor: Any = None, sync: bool = True, **options: Any
) -> Client:
    """Pre-connect at ``base_url``, open the socket, and (unless ``sync`` is
    false) sync what the node missed."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    info = await pre_connection(base_url, auth_key, tls_trust=options.get("tls_trust"))
    client = await open_socket(reactor, info["node"]["ws_url"], **options)
    client.base_url, client.auth_key = base_url, auth_key
    if sync:
        await client.sync()
    return client

