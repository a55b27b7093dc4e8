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

from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote_to_bytes, urlencode

import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import ensureDeferred
from allspark.logs import logger
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from allspark.auth import AuthError, Identity

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
        if request.method not in self.methods:
            request.setHeader(b"allow", b", ".join(self.methods))
            write_json(request, 405, {"error": "method_not_allowed",
                                      "message": f"use {b', '.join(self.methods).decode()}"})
            return server.NOT_DONE_YET
        d = ensureDeferred(self._run(request))
        d.addErrback(lambda f: log.failure("unhandled error in {path}", f, path=request.path))
        return server.NOT_DONE_YET

    async def _run(self, request: IRequest) -> None:
        finished = []
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
            write_json(request, status, body)


class Root(resource.Resource):
    """``/``: pre-connection in the seed's form; children for everything else."""

    def __init__(self, server: "Server") -> None:
        super().__init__()
        self.server = server

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        if path == b"":
            return self
        return NotFound()

    def render(self, request: IRequest) -> Any:
        if request.args.get(b"get_pre_connection_info", [b""])[0].lower() in (b"true", b"1", b"yes"):
            return JSONEndpoint(self.pre_connection, (b"GET", b"HEAD", b"POST")).render(request)
        return JSONEndpoint(self.about, (b"GET", b"HEAD")).render(request)

    def about(self, request: IRequest, args: dict[str, Any]) -> dict[str, Any]:
        return {"service": "allspark", "server_id": self.server.config.server_id,
                "docs": "see docs/protocol.md"}

    def pre_connection(self, request: IRequest, args: dict[str, Any]) -> dict[str, Any]:
        """Where to open the WebSocket: the best live server, a token bound to
        the caller's node_id and that server, and the ``ws_url`` to use."""
        server = self.server
        identity = authenticate(server, args)
        if server.draining:
            raise HTTPError(503, "unavailable", "this server is shutting down; ask another")
        need_proxy = parse_bool(args, "need_proxy")
        config = server.config
        if need_proxy and not config.proxy_address:
            raise HTTPError(503, "no_proxy", "no server of this cluster has a proxy address")
        token, expires_in = server.tokens.issue(identity.node_id, config.server_id)
        query = urlencode({"auth_key": args["auth_key"], "validation_token": token})
        if need_proxy:
            ws_url = f"{proxy_base(config.proxy_address)}/{config.ws_path}?{query}"
        else:
            ws_url = f"{config.scheme}://{_host_for_url(config.host)}:{config.port}/{config.ws_path}?{query}"
        return {
            "validation_token": token,
            "expires_in": expires_in,
            "node": {
                "node_id": config.server_id,
                "host": config.host,
                "port": config.port,
                "proxy_address": config.proxy_address,
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


def redacted_log_formatter(timestamp: str, request: IRequest) -> str:
    """twisted.web's combined log line, with credentials redacted from the
    request line and the referrer."""
    ip = request.getClientAddress()
    host = getattr(ip, "host", "-")
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


def build_site(srv: "Server", ws_factory: "ClientFactory", extra: dict[bytes, resource.Resource] | None = None) -> server.Site:
    """The one site that serves HTTP and the WebSocket on one port."""
    root = Root(srv)
    root.putChild(b"health", JSONEndpoint(lambda request, args: srv.health(), (b"GET", b"HEAD")))
    v1 = Directory()
    v1.putChild(b"pre_connection_info", JSONEndpoint(root.pre_connection))
    root.putChild(b"v1", v1)
    root.putChild(srv.config.ws_path.encode(), SocketResource(ws_factory))
    for path, child in (extra or {}).items():
        root.putChild(path, child)
    site = server.Site(root, logFormatter=redacted_log_formatter)
    site.displayTracebacks = False
    site.noisy = False
    return site
