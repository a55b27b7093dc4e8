"""HTTP: pre-connection, health, sessions; the WebSocket path hangs off the
same site, so HTTP and WebSocket share one port.

Every answer is JSON with a proper status: 400 for bad requests, 401 for a
missing or bad ``auth_key``, 403 for what the caller may not do, 404 for what
does not exist, 405 for a wrong method.  Nothing is ever answered 200 with an
empty body.

Paths:

- ``GET /?get_pre_connection_info=true&auth_key=K`` (the seed's form) and
  ``GET /v1/pre_connection_info?auth_key=K``: where to open the WebSocket.
- ``GET /health``: this server's id, state and load.
- ``/ws``: the client WebSocket (``?auth_key=K&validation_token=T``).
- ``/create_session``, ``/join_session``, ... (see :mod:`allspark.sessions`).
"""

from __future__ import annotations

import io
import ipaddress
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import unquote_to_bytes, urlencode

import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IDelayedCall, ITCPTransport, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from allspark.logs import logger
from twisted.web import http, resource, server
from twisted.web.iweb import IRequest

from allspark.auth import AuthError, Identity
from allspark.origins import ALLOWED_HEADERS, PREFLIGHT_MAX_AGE, OriginPolicy, origin_text, parse_origin

if TYPE_CHECKING:
    from allspark.server import Server
    from allspark.ws import ClientFactory

log = logger(__name__)

MAX_BODY = 64 * 1024


class HTTPError(Exception):
    """An HTTP answer other than 200, with a JSON body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def write_json(request: IRequest, status: int, body: dict[str, Any]) -> None:
    """Finish ``request`` with ``body`` as JSON."""
    data = orjson.dumps(body)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", str(len(data)).encode())
    if request.method != b"HEAD":
        request.write(data)
    request.finish()


def request_args(request: IRequest) -> dict[str, Any]:
    """The request's arguments: the query string, plus a form or JSON body
    for POST.  Each value is a single string (JSON bodies keep their types).
    Repeated query arguments are refused."""
    args: dict[str, Any] = {}
    for raw_key, values in (request.args or {}).items():
        key = raw_key.decode("utf-8", "replace")
        if len(values) != 1:
            raise HTTPError(400, "bad_request", f"argument {key!r} is given more than once")
        args[key] = values[0].decode("utf-8", "replace")
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if request.method == b"POST" and ctype == b"application/json":
        request.content.seek(0)
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise HTTPError(413, "too_large", f"the body is over {MAX_BODY} bytes")
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise HTTPError(400, "bad_request", "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "bad_request", "the JSON body must be an object")
            args.update(body)
    return args


def authenticate(server: "Server", args: dict[str, Any]) -> Identity:
    """The identity of ``args["auth_key"]``, or a 401."""
    try:
        return server.verifier.verify(args.get("auth_key"), server.clock.seconds())
    except AuthError as e:
        raise HTTPError(401, e.code, str(e)) from None


def parse_bool(args: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean argument: JSON true/false, or "true"/"false"/"1"/"0"."""
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    raise HTTPError(400, "bad_request", f"{name} must be true or false")


Handler = Callable[[IRequest, dict[str, Any]], Any]


def answer_cors(request: IRequest, methods: tuple[bytes, ...]) -> bool:
    """CORS for one request of the HTTP API (:mod:`allspark.origins`):
    ``Vary: Origin`` always, ``Access-Control-Allow-Origin`` for an allowed
    origin, and a preflight answered here (204 with the allowed ``methods``,
    or 403 ``origin_not_allowed``).  True when the request was a preflight
    and is answered."""
    request.setHeader(b"vary", b"Origin")
    raw = request.getHeader(b"origin")
    if raw is None:
        return False
    origin = raw.decode("latin-1")
    policy: OriginPolicy = getattr(getattr(request, "site", None), "origins", None) or OriginPolicy()
    host = request.getHeader(b"host")
    allowed = policy.allows(origin, host.decode("latin-1") if host is not None else None)
    parsed = parse_origin(origin)
    if allowed and parsed is not None:
        request.setHeader(b"access-control-allow-origin", origin_text(parsed).encode("latin-1"))
    if request.method != b"OPTIONS" or request.getHeader(b"access-control-request-method") is None:
        return False
    if not allowed:
        log.debug("refused a CORS preflight from {origin}", origin=origin, uri=redact_uri(request.uri).decode("latin-1"))
        write_json(request, 403, {"error": "origin_not_allowed",
                                  "message": f"pages from {origin!r} may not use this server (see --allowed-origin)"})
        return True
    request.setResponseCode(204)
    request.setHeader(b"access-control-allow-methods", b", ".join(methods))
    request.setHeader(b"access-control-allow-headers", ALLOWED_HEADERS.encode())
    request.setHeader(b"access-control-max-age", str(PREFLIGHT_MAX_AGE).encode())
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", b"0")
    request.finish()
    return True


class JSONEndpoint(resource.Resource):
    """A leaf that parses arguments, runs ``handler`` (sync or ``async``) and
    answers its dict as JSON, mapping :class:`HTTPError` to its status."""

    isLeaf = True

    def __init__(self, handler: Handler, methods: tuple[bytes, ...] = (b"GET", b"HEAD", b"POST")) -> None:
        super().__init__()
        self.handler = handler
        self.methods = methods

    def render(self, request: IRequest) -> Any:
        if request.postpath and request.postpath != [b""]:
            return NotFound().render(request)
        if answer_cors(request, self.methods):  # a preflight, answered
            return server.NOT_DONE_YET
        if request.method not in self.methods:
            request.setHeader(b"allow", b", ".join(self.methods))
            write_json(request, 405, {"error": "method_not_allowed",
                                      "message": f"use {b', '.join(self.methods).decode()}"})
            return server.NOT_DONE_YET
        d = ensureDeferred(self._run(request))
        d.addErrback(lambda f: log.failure("unhandled error in {path}", f, path=request.path))
        return server.NOT_DONE_YET

    async def _run(self, request: IRequest) -> None:
        finished: list[object] = []  # the client went away before the answer
        if isinstance(request, http.Request):  # every request of AllsparkSite
            request.notifyFinish().addBoth(finished.append)
        try:
            args = request_args(request)
            result = self.handler(request, args)
            if hasattr(result, "__await__") or hasattr(result, "addCallback"):
                result = await result
            status, body = 200, result
        except HTTPError as e:
            status, body = e.status, {"error": e.code, "message": e.message}
        except Exception:
            log.failure("internal error in {path}", path=request.path)
            status, body = 500, {"error": "internal_error", "message": "the server could not answer"}
        if not finished:
            try:
                write_json(request, status, body)
            except TypeError:  # a string orjson cannot encode: answer anyway, never leave it hanging
                log.failure("could not encode the answer to {path}", path=request.path)
                write_json(request, 500, {"error": "internal_error", "message": "the server could not answer"})


class Root(resource.Resource):
    """``/``: pre-connection in the seed's form; children for everything else."""

    def __init__(self, server: "Server") -> None:
        super().__init__()
        self.app = server  # not ``server``: twisted.web's Resource has an attribute of that name

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        if path == b"":
            return self
        return NotFound()

    def render(self, request: IRequest) -> Any:
        if request.args.get(b"get_pre_connection_info", [b""])[0].lower() in (b"true", b"1", b"yes"):
            return JSONEndpoint(self.pre_connection, (b"GET", b"HEAD", b"POST")).render(request)
        return JSONEndpoint(self.about, (b"GET", b"HEAD")).render(request)

    def about(self, request: IRequest, args: dict[str, Any]) -> dict[str, Any]:
        return {"service": "allspark", "server_id": self.app.config.server_id,
                "docs": "see docs/protocol.md"}

    async def pre_connection(self, request: IRequest, args: dict[str, Any]) -> dict[str, Any]:
        """Where to open the WebSocket: the least loaded live server of the
        cluster (:meth:`allspark.cluster.ClusterRecords.pick`; this one when
        it knows no records, e.g. before its first heartbeat), a token bound
        to the caller's node_id and that server, and the ``ws_url`` to use.
        A revoked node (:mod:`allspark.revocations`) gets 401 ``revoked``."""
        server = self.app
        identity = authenticate(server, args)
        revoked_until = await server.revocations.until(identity.node_id)
        if revoked_until and server.revocations.revoked_now(revoked_until):
            raise HTTPError(401, "revoked", f"this node is revoked until {revoked_until // 1000} (Unix time)")
        if server.draining:
            raise HTTPError(503, "unavailable", "this server is shutting down; ask another")
        if server.starting:
            raise HTTPError(503, "unavailable", "this server is starting; ask again in a moment")
        need_proxy = parse_bool(args, "need_proxy")
        config = server.config
        if server.cluster.servers:
            target = server.cluster.pick(need_proxy)
            if target is None:
                if need_proxy:
                    raise HTTPError(503, "no_proxy", "no live server of this cluster has a proxy address")
                raise HTTPError(503, "unavailable", "no live server in this cluster")
            server_id, host, port = target.server_id, target.host, target.port
            scheme, proxy_address = target.scheme, target.proxy_address
        else:
            server_id, host, port = config.server_id, config.host, config.port
            scheme, proxy_address = config.scheme, config.proxy_address
        if need_proxy and not proxy_address:
            raise HTTPError(503, "no_proxy", "no server of this cluster has a proxy address")
        token, expires_in = server.tokens.issue(identity.node_id, server_id)
        query = urlencode({"auth_key": args["auth_key"], "validation_token": token})
        if need_proxy and proxy_address:  # (refused above without one)
            ws_url = f"{proxy_base(proxy_address)}/{config.ws_path}?{query}"
        else:
            ws_url = f"{scheme}://{_host_for_url(host)}:{port}/{config.ws_path}?{query}"
        return {
            "validation_token": token,
            "expires_in": expires_in,
            "node": {
                "node_id": server_id,
                "host": host,
                "port": port,
                "proxy_address": proxy_address,
                "ws_url": ws_url,
            },
        }


def proxy_base(proxy_address: str) -> str:
    """The URL base of a proxy address: ``host[:port]`` is plain ``ws://``
    (the seed's port-80 proxy); ``wss://host`` (TLS ending at the proxy) or
    ``ws://host`` is taken as written."""
    if proxy_address.startswith(("ws://", "wss://")):
        return proxy_address.rstrip("/")
    return f"ws://{proxy_address}"


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class NotFound(resource.Resource):
    """Any unknown path: a JSON 404."""

    isLeaf = True

    def render(self, request: IRequest) -> Any:
        write_json(request, 404, {"error": "not_found", "message": "no such path"})
        return server.NOT_DONE_YET


class SocketResource(WebSocketResource):
    """The client WebSocket path.  Only the path itself upgrades; anything
    under it is a JSON 404."""

    def render(self, request: IRequest) -> Any:
        if request.postpath and request.postpath != [b""]:
            return NotFound().render(request)
        return super().render(request)


class Directory(resource.Resource):
    """A path with children only: anything else under it is a JSON 404
    (twisted.web's default would be an HTML page)."""

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        return NotFound()

    def render(self, request: IRequest) -> Any:
        return NotFound().render(request)


#: Query arguments whose values are credentials: never written to a log.
SECRET_ARGS = frozenset((b"auth_key", b"validation_token"))


def redact_uri(uri: bytes) -> bytes:
    """``uri`` with the values of :data:`SECRET_ARGS` replaced by ``REDACTED``;
    other arguments stay (they help reading logs)."""
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    parts = []
    for part in query.split(b"&"):
        name, eq, _ = part.partition(b"=")
        if eq and unquote_to_bytes(name.replace(b"+", b" ")) in SECRET_ARGS:
            part = name + b"=REDACTED"
        parts.append(part)
    return path + b"?" + b"&".join(parts)


def redacted_log_formatter(timestamp: str, request: http.Request) -> str:
    """twisted.web's combined log line, with credentials redacted from the
    request line and the referrer."""
    host = client_host(request)
    referrer = request.getHeader(b"referer")
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        _escape(host),
        timestamp,
        _escape(request.method),
        _escape(redact_uri(request.uri)),
        _escape(request.clientproto),
        request.code,
        request.sentLength or "-",
        _escape(redact_uri(referrer)) if referrer else "-",
        _escape(request.getHeader(b"user-agent") or b"-"),
    )


def _escape(value: str | bytes) -> str:
    """A value safe to put inside double quotes on one log line."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "backslashreplace")
    return value.encode("unicode_escape").decode("ascii").replace('"', '\\"')


#: The ``Server`` header of every answer: no software name or version.
SERVER_NAME = b"Allspark"


class TrustedProxies:
    """The peers whose ``X-Forwarded-For`` and ``X-Real-IP`` headers are
    believed (``--trusted-proxy``: addresses or CIDR networks).

    A request from any other peer is that peer's, whatever its headers say.
    From a trusted peer, ``X-Forwarded-For`` is read from the right (the hop
    the nearest proxy saw) leftwards, skipping trusted proxies: the first
    address that is not a trusted proxy is the client's.  Without
    ``X-Forwarded-For``, a valid ``X-Real-IP`` is the client's.  An entry
    that is not an IP address ends the walk at the hop before it.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: "ipaddress.IPv4Address | ipaddress.IPv6Address | None") -> bool:
        """Whether ``address`` is one of the trusted proxies."""
        return address is not None and any(address in network for network in self.networks)

    def client_address(self, peer: str, forwarded_for: Iterable[str] = (), real_ip: str | None = None) -> str:
        """The client's address for a connection from ``peer`` (an IP
        address) with these header values."""
        peer_ip = parse_ip(peer)
        if peer_ip is None:
            return peer
        if not self.trusts(peer_ip):
            return _show_ip(peer_ip)
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
        if not hops and real_ip:
            hops = [real_ip.strip()]
        client = peer_ip
        for hop in reversed(hops):
            hop_ip = parse_ip(hop)
            if hop_ip is None:
                break
            client = hop_ip
            if not self.trusts(hop_ip):
                break
        return _show_ip(client)


def parse_ip(text: str) -> "ipaddress.IPv4Address | ipaddress.IPv6Address | None":
    """``text`` as an IP address (an IPv4-mapped IPv6 address as IPv4; a
    port, as some proxies add, is dropped), or None."""
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _show_ip(address: "ipaddress.IPv4Address | ipaddress.IPv6Address") -> str:
    return str(address)


def client_host(request: http.Request) -> str:
    """The address of the client that sent ``request``: the peer's, or what a
    trusted proxy says it is (see :class:`TrustedProxies`)."""
    peer = getattr(request.getClientAddress(), "host", None)
    if peer is None:
        return "-"
    proxies: TrustedProxies | None = getattr(getattr(request, "site", None), "trusted_proxies", None)
    if not proxies:
        return peer
    headers = request.requestHeaders
    real_ip = headers.getRawHeaders(b"x-real-ip")
    return proxies.client_address(
        peer,
        [v.decode("latin-1") for v in headers.getRawHeaders(b"x-forwarded-for") or ()],
        real_ip[-1].decode("latin-1") if real_ip else None,
    )


class AllsparkRequest(server.Request):
    """A twisted.web request whose answers say ``Server: Allspark``
    (twisted.web would name itself and its version), and whose body is
    capped at :data:`MAX_BODY` bytes on every path and method before it is
    buffered (twisted.web would keep any body, in memory or in a temporary
    file, before a resource sees it).  A body announced larger, or a chunked
    one that grows larger, is answered 413 ``too_large`` at once and the
    connection is closed; the request is never handled."""

    _body_size = 0
    _too_large = False

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        if (name.lower() if isinstance(name, bytes) else name.lower().encode()) == b"server":
            value = SERVER_NAME
        super().setHeader(name, value)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the 413
            self._refuse_too_large(length)
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(data)
        if self._body_size > MAX_BODY:
            self._refuse_too_large(None)
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if self._too_large:
            return  # answered already; the connection is closing
        super().process()

    def _refuse_too_large(self, announced: int | None) -> None:
        self._too_large = True
        self.content = io.BytesIO()  # what was buffered goes now
        transport = self.channel.transport
        if transport is None:  # the connection is gone already
            return
        log.debug("refused an HTTP body over {limit} bytes from {client}", limit=MAX_BODY,
                  client=getattr(transport.getPeer(), "host", "-"), announced=announced,
                  uri=redact_uri(self.uri).decode("latin-1"))
        transport.write(raw_json_answer(413, {"error": "too_large",
                                              "message": f"the body is over {MAX_BODY} bytes"}))
        self.channel.loseConnection()


def _abort_connection(transport: ITransport) -> None:
    """Cut ``transport`` without waiting for its buffer (TCP and TLS
    transports can; ``ITransport`` does not promise it)."""
    if ITCPTransport.providedBy(transport):
        transport.abortConnection()
    else:
        transport.loseConnection()


#: Reason phrases twisted.web's table lacks (or spells the old way).
_PHRASES = {408: b"Request Timeout", 426: b"Upgrade Required", 429: b"Too Many Requests"}


def raw_json_answer(status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 answer with a JSON ``body`` that closes the
    connection, for the places that write to a socket themselves (refused
    WebSocket handshakes, the request deadline)."""
    data = orjson.dumps(body)
    phrase = (_PHRASES.get(status) or http.RESPONSES.get(status, b"Error")).decode("latin-1")
    head = [f"HTTP/1.1 {status} {phrase}", f"Server: {SERVER_NAME.decode()}",
            f"Date: {http.datetimeToString().decode()}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Cache-Control: no-store", "Connection: close",
            *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


class DeadlineChannel(http.HTTPChannel):
    """twisted.web's HTTP channel with an absolute deadline for each request.

    twisted.web's own timeout is an idle timeout, restarted by every byte: a
    client that trickles one header byte a second (slowloris) would hold its
    socket forever.  Here a connection must deliver a complete request (head
    and body; for the WebSocket, the opening handshake) within the site's
    ``request_timeout`` seconds of opening, or of the end of its previous
    answer.  A request still incomplete then is answered 408
    ``request_timeout``; an idle keep-alive connection is closed without a
    word.  Either way the socket is cut 2 s later if it has not gone.
    """

    site: "AllsparkSite"
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None
    _partial = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._partial = False
        self._deadline = self.callLater(self.site.request_timeout, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def dataReceived(self, data: bytes) -> None:
        self._partial = True
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        # the request is complete: handling it (or the WebSocket that takes
        # the socket over) has no deadline here
        self._stop_deadline()
        super().allContentReceived()

    def requestDone(self, request: IRequest) -> None:
        if self.persistent:  # the next request's clock starts now
            self._start_deadline()
        super().requestDone(request)

    def _deadline_passed(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        log.debug("closing HTTP connection from {client}: no complete request within {timeout}s",
                  client=getattr(transport.getPeer(), "host", "-"), timeout=self.site.request_timeout,
                  partial=self._partial)
        if self._partial:
            transport.write(raw_json_answer(408, {"error": "request_timeout",
                                                  "message": "the request did not arrive in time"}))
        self.loseConnection()
        self._abort = self.callLater(2.0, lambda: _abort_connection(transport))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        super().connectionLost(reason)


#: The HTTP access log: one event per answered request, with structured
#: fields (``client``, ``method``, ``uri`` without credentials, ``status``,
#: ``size``, ``user_agent``).  Not filtered by ``--log_level``, as before.
access_log = Logger(namespace="allspark.access")


class AllsparkSite(server.Site):
    """The one site: ``Server: Allspark`` on every answer, a deadline for
    every request (:class:`DeadlineChannel`), client addresses through
    trusted proxies, the browser origins its JSON endpoints answer CORS for
    (:func:`answer_cors`), and an access log without credentials."""

    requestFactory = AllsparkRequest

    def __init__(self, root: resource.Resource, request_timeout: float = 10.0,
                 trusted_proxies: TrustedProxies | None = None, origins: OriginPolicy | None = None) -> None:
        super().__init__(root, logFormatter=redacted_log_formatter)
        self.request_timeout = request_timeout
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.origins = origins or OriginPolicy()

    def protocol(self) -> DeadlineChannel:  # type: ignore[override]
        return DeadlineChannel()

    def log(self, request: http.Request) -> None:
        """One access log event for ``request`` (the combined log format as
        its text, the parts as fields)."""
        line = redacted_log_formatter(self._logDateTime or "-", request)
        referrer = request.getHeader(b"referer")
        access_log.info(
            line.replace("{", "{{").replace("}", "}}"),  # the line is the text, not a format
            client=client_host(request),
            referrer=redact_uri(referrer).decode("latin-1") if referrer else None,
            method=request.method.decode("latin-1"),
            uri=redact_uri(request.uri).decode("latin-1"),
            status=request.code,
            size=request.sentLength,
            user_agent=(request.getHeader(b"user-agent") or b"-").decode("latin-1"),
        )


def admin_drain(srv: "Server", request: IRequest) -> dict[str, Any]:
    """``POST /admin/drain``: drain this server as SIGTERM does (it answers
    first).  Needs ``Authorization: Allspark-Admin <token>``, a single-use
    token made with the cluster secret for this server
    (:func:`allspark.cluster.admin_token`; ``allspark drain URL`` makes one)."""
    from allspark.cluster import AdminAuthError

    if srv.admin is None or srv.request_drain is None:
        raise HTTPError(503, "no_cluster_secret", "admin requests need a cluster secret, and this server has none")
    header = request.getHeader(b"authorization") or b""
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme != "Allspark-Admin" or not token.strip():
        raise HTTPError(401, "missing_token", "send Authorization: Allspark-Admin <token>")
    try:
        srv.admin.verify(token.strip(), "drain")
    except AdminAuthError as e:
        raise HTTPError(401, e.code, e.message) from None
    if not srv.draining:
        srv.request_drain()
    return {"state": "draining", "server_id": srv.config.server_id}


def build_site(srv: "Server", ws_factory: "ClientFactory", extra: dict[bytes, resource.Resource] | None = None) -> server.Site:
    """The one site that serves HTTP and the WebSocket on one port."""
    root = Root(srv)
    root.putChild(b"health", JSONEndpoint(lambda request, args: srv.health(), (b"GET", b"HEAD")))
    v1 = Directory()
    v1.putChild(b"pre_connection_info", JSONEndpoint(root.pre_connection))
    root.putChild(b"v1", v1)
    root.putChild(srv.config.ws_path.encode(), SocketResource(ws_factory))
    admin = Directory()
    admin.putChild(b"drain", JSONEndpoint(lambda request, args: admin_drain(srv, request), (b"POST",)))
    root.putChild(b"admin", admin)
    for path, child in (extra or {}).items():
        root.putChild(path, child)
    site = AllsparkSite(root, srv.config.request_timeout, TrustedProxies(srv.config.trusted_proxies),
                        OriginPolicy(srv.config.allowed_origins))
    site.displayTracebacks = False
    site.noisy = False
    return site
