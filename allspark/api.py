"""The server API: what the application's backend asks of the cluster, over
HTTP under ``/api/v1`` (``docs/api.md``; the OpenAPI document is
:mod:`allspark.api_schema`, served at ``/api/v1/openapi.json``).

**Authentication.**  ``Authorization: Bearer <API key>``, an API key of its
own (``--api-key-file``, else ``$ALLSPARK_API_KEYS``; several for rotation),
never an auth key or the cluster secret.  Keys are compared in constant time
(each configured key's SHA-256 against the presented key's, every key
compared).  Without a key configured the API is off: 503 ``api_disabled``.
A missing key is 401 ``missing_api_key``, a wrong one 401 ``bad_api_key``.

**Endpoints.**

- ``POST /api/v1/publish``: a message to ``dest_id``, ``dest_client_id`` or
  ``dest_session_id`` (exactly one), with the fields a client may send
  (:data:`allspark.envelope.MESSAGE_FIELDS`) and ``sender_id``.  It takes the
  client's path (:meth:`allspark.router.Router.route`): stored before the
  answer, seq, live delivery, sync, de-duplication by ``(sender_id, id)``;
  the answer is the ``accepted`` frame.  The sender is one of the configured
  app node ids (``--api-sender-id``, default ``app``; ``sender_id`` picks one,
  default the first): recipients see it as ``src_id``, and it may send to any
  session without being a member.
- ``GET /api/v1/presence?node_id=..&client_id=..`` (each repeatable): online
  anywhere in the cluster (:meth:`allspark.delivery.Delivery.is_live`).
- ``POST /api/v1/nodes/{node_id}/disconnect``: closes the node's connections
  here and, through the ``disconnect`` peer frame, on every linked server;
  with ``revoke_until`` it first stores a revocation
  (:mod:`allspark.revocations`).
- ``GET /api/v1/nodes/{node_id}/inbox``: unacked count and seqs.
- ``POST /api/v1/drain`` and ``POST /api/v1/servers/{server_id}/drain``: drain
  this server as SIGTERM does, or another through the ``drain`` peer frame.
- ``GET /api/v1/servers``: the cluster view.

Every answer is JSON; every error is ``{"error": code, "message": text}``
with a proper status (:data:`ERROR_CODES`).  Bodies are at most 64 KiB
(:class:`allspark.web.AllsparkRequest`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import orjson
from twisted.internet.defer import ensureDeferred
from twisted.web import http, resource, server
from twisted.web.iweb import IRequest

from allspark.envelope import (
    DEST_FIELDS, MAX_FRAME_INT, MIN_FRAME_INT, MESSAGE_FIELDS, Control, FrameError, Message, parse_frame,
)
from allspark.ids import is_valid_id
from allspark.logs import logger
from allspark.router import Sender
from allspark.web import MAX_BODY, HTTPError, write_json

if TYPE_CHECKING:
    from allspark.server import Server

log = logger(__name__)

#: Environment variable holding API keys when no ``--api-key-file`` is given
#: (several separated by commas or newlines).
API_KEYS_ENV = "ALLSPARK_API_KEYS"
#: Shortest API key accepted, in characters.
MIN_API_KEY_CHARS = 16
#: Longest API key accepted, and longest ``Authorization`` header read.
MAX_API_KEY_CHARS = 512
#: The app node id messages are sent as by default (``--api-sender-id``).
DEFAULT_SENDER_ID = "app"
#: Most node_ids plus client_ids one presence request may ask about.
MAX_PRESENCE_IDS = 100
#: Longest ``reason`` of a disconnect, in characters.
MAX_REASON_CHARS = 200
#: Latest ``revoke_until`` accepted (Unix seconds: the end of year 9999).
MAX_REVOKE_UNTIL = 253_402_300_799
#: Every error code the API answers with (the OpenAPI document lists the same).
ERROR_CODES = (
    "api_disabled", "missing_api_key", "bad_api_key", "not_found", "method_not_allowed",
    "unsupported_media_type", "bad_request", "too_large", "sender_not_allowed", "unknown_destination",
    "not_allowed", "inbox_full", "session_full", "unknown_node", "unknown_server", "unreachable",
    "not_supported", "unavailable", "internal_error",
)
#: Fields of a publish body: the message fields of the client contract and ``sender_id``.
PUBLISH_FIELDS = MESSAGE_FIELDS | {"sender_id"}

#: Publish fields that may be JSON null (the content; any other is left out instead).
_NULLABLE = frozenset(("payload", "payload1", "payload2"))

_KEY_CHARS = re.compile(r"[!-~]+")  # printable ASCII without spaces: safe in a header


def load_api_keys(env: Mapping[str, str], key_file: str | None) -> list[bytes]:
    """The API keys: from ``key_file`` (one per line; blank lines and lines
    starting with ``#`` skipped) when given, else from ``env[API_KEYS_ENV]``
    (commas or newlines between keys); none means the API is off.  Raises
    ``ValueError`` for an unreadable file, a file without keys, or a key
    shorter than :data:`MIN_API_KEY_CHARS` or not printable ASCII."""
    if key_file is not None:
        origin = f"API key file {key_file}"
        try:
            with open(key_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read API key file {key_file}: {getattr(e, 'strerror', None) or e}") from None
        found = [line.strip() for line in lines if not line.strip().startswith("#")]
    else:
        origin = f"${API_KEYS_ENV}"
        found = [part.strip() for part in env.get(API_KEYS_ENV, "").replace("\n", ",").split(",")]
    keys: list[bytes] = []
    for text in found:
        if not text:
            continue
        if not MIN_API_KEY_CHARS <= len(text) <= MAX_API_KEY_CHARS or not _KEY_CHARS.fullmatch(text):
            raise ValueError(f"an API key in {origin} is not {MIN_API_KEY_CHARS}-{MAX_API_KEY_CHARS} printable "
                             f"ASCII characters without spaces")
        if text.encode() not in keys:
            keys.append(text.encode())
    if key_file is not None and not keys:
        raise ValueError(f"API key file {key_file} holds no key")
    return keys


class ApiKeys:
    """The configured API keys, checked in constant time."""

    def __init__(self, keys: list[bytes] | tuple[bytes, ...]) -> None:
        self._digests = [hashlib.sha256(k).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, presented: bytes) -> bool:
        """Whether ``presented`` is one of the keys: its digest is compared
        with every key's (no early exit, no length leak)."""
        digest = hashlib.sha256(presented).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found


@dataclass(frozen=True)
class ApiConfig:
    """The server API's settings: its keys, and the app node ids it sends as
    (the first is the default ``sender_id``)."""

    keys: tuple[bytes, ...] = ()
    senders: tuple[str, ...] = (DEFAULT_SENDER_ID,)


Handler = Callable[[IRequest, dict[str, str]], Awaitable[tuple[int, dict[str, Any]]]]


class ServerAPI(resource.Resource):
    """``/api``: authenticates, routes ``/api/v1/...`` by method and path,
    and answers JSON (see the module docstring)."""

    isLeaf = True

    def __init__(self, app: "Server", config: ApiConfig) -> None:
        super().__init__()
        self.app = app
        self.config = config
        self.keys = ApiKeys(config.keys)
        #: (path pattern, method, handler); a pattern's ``{name}`` segment matches any one segment
        self.routes: list[tuple[tuple[str, ...], bytes, Handler]] = [
            (("v1", "publish"), b"POST", self.publish),
            (("v1", "presence"), b"GET", self.presence),
            (("v1", "nodes", "{node_id}", "disconnect"), b"POST", self.disconnect),
            (("v1", "nodes", "{node_id}", "inbox"), b"GET", self.inbox),
            (("v1", "servers"), b"GET", self.servers),
            (("v1", "servers", "{server_id}", "drain"), b"POST", self.drain_server),
            (("v1", "drain"), b"POST", self.drain_here),
        ]

    def render(self, request: IRequest) -> Any:
        d = ensureDeferred(self._answer(request))
        d.addErrback(lambda f: log.failure("unhandled error in the server API", f))
        return server.NOT_DONE_YET

    async def _answer(self, request: IRequest) -> None:
        finished: list[object] = []
        if isinstance(request, http.Request):
            request.notifyFinish().addBoth(finished.append)
        try:
            status, body = await self._handle(request)
        except HTTPError as e:
            status, body = e.status, {"error": e.code, "message": e.message}
            if e.code in ("missing_api_key", "bad_api_key"):
                request.setHeader(b"www-authenticate", b'Bearer realm="allspark-api"')
        except Exception:
            log.failure("internal error in the server API", path=request.path)
            status, body = 500, {"error": "internal_error", "message": "the server could not answer"}
        if not finished:
            write_json(request, status, body)

    async def _handle(self, request: IRequest) -> tuple[int, dict[str, Any]]:
        segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
        if segments == ["v1", "openapi.json"]:
            if request.method != b"GET":
                raise self._not_allowed(request, (b"GET",))
            from allspark.api_schema import openapi_document

            return 200, openapi_document()
        if not self.keys:
            raise HTTPError(503, "api_disabled", "the server API is off: no API key is configured "
                                                 "(--api-key-file or $ALLSPARK_API_KEYS)")
        self._authenticate(request)
        methods: list[bytes] = []
        for pattern, method, handler in self.routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            if method == request.method:
                return await handler(request, params)
            methods.append(method)
        if methods:
            raise self._not_allowed(request, tuple(methods))
        raise HTTPError(404, "not_found", "no such path in the server API (see /api/v1/openapi.json)")

    def _not_allowed(self, request: IRequest, methods: tuple[bytes, ...]) -> HTTPError:
        request.setHeader(b"allow", b", ".join(methods))
        return HTTPError(405, "method_not_allowed", f"use {b', '.join(methods).decode()}")

    def _authenticate(self, request: IRequest) -> None:
        header = request.getHeader(b"authorization")
        if header is None:
            raise HTTPError(401, "missing_api_key", "send Authorization: Bearer <API key>")
        scheme, _, presented = header.partition(b" ")
        presented = presented.strip()
        if (scheme.lower() != b"bearer" or not presented or len(presented) > MAX_API_KEY_CHARS
                or not self.keys.check(presented)):
            log.info("refused a server API request: bad API key", path=request.path.decode("latin-1"))
            raise HTTPError(401, "bad_api_key", "the API key is not one of this server's")

    # -- publish ------------------------------------------------------------
    async def publish(self, request: IRequest, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``POST /api/v1/publish``: route the message as a client's."""
        raw = _json_body(request, required=True)
        body = _object(raw)
        unknown = sorted(body.keys() - PUBLISH_FIELDS)
        if unknown:
            raise HTTPError(400, "bad_request", f"unknown fields: {', '.join(n[:64] for n in unknown[:5])}")
        nulls = sorted(name for name, value in body.items() if value is None and name not in _NULLABLE)
        if nulls:
            raise HTTPError(400, "bad_request", f"{nulls[0]} cannot be null: leave it out instead")
        given = [name for name in DEST_FIELDS if name in body]
        if len(given) != 1:
            raise HTTPError(400, "bad_request", "give exactly one of dest_id, dest_client_id, dest_session_id")
        sender_id = body.get("sender_id", self.config.senders[0])
        if not is_valid_id(sender_id):
            raise HTTPError(400, "bad_request", "sender_id must be 1-128 characters of [A-Za-z0-9_.:@-]")
        if sender_id not in self.config.senders:
            raise HTTPError(403, "sender_not_allowed",
                            "sender_id must be one of this server's app node ids (--api-sender-id)")
        try:
            msg = _parse_message(raw, body)
        except FrameError as e:
            raise _http_error(e) from None
        assert isinstance(msg, Message)  # a destination makes it a message
        msg.ignored = []  # sender_id is the only field the client contract does not name
        try:
            accepted = await self.app.router.route(Sender(sender_id, None, app=True), msg)
        except FrameError as e:
            raise _http_error(e) from None
        answer: dict[str, Any] = orjson.loads(accepted)
        log.info("published {status} from {sender_id} to {dest}", status=answer.get("status"),
                 sender_id=sender_id, dest=body[given[0]], dest_field=given[0], id=msg.id,
                 recipients=answer.get("recipients"))
        return 200, answer

    # -- presence -----------------------------------------------------------
    async def presence(self, request: IRequest, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``GET /api/v1/presence``: whether nodes, and which nodes of
        clients, are online anywhere in the cluster."""
        args = request.args or {}
        unknown = sorted(k.decode("utf-8", "replace") for k in args if k not in (b"node_id", b"client_id"))
        if unknown:
            raise HTTPError(400, "bad_request", f"unknown arguments: {', '.join(n[:64] for n in unknown[:5])}")
        node_ids = [v.decode("utf-8", "replace") for v in args.get(b"node_id", [])]
        client_ids = [v.decode("utf-8", "replace") for v in args.get(b"client_id", [])]
        if len(node_ids) > MAX_PRESENCE_IDS or len(client_ids) > MAX_PRESENCE_IDS:
            raise HTTPError(400, "bad_request", f"ask about at most {MAX_PRESENCE_IDS} node_ids and "
                                                f"{MAX_PRESENCE_IDS} client_ids at once")
        for value in node_ids + client_ids:
            if not is_valid_id(value):
                raise HTTPError(400, "bad_request", "node_id and client_id must be 1-128 characters of "
                                                    "[A-Za-z0-9_.:@-]")
        is_live = self.app.delivery.is_live
        clients: dict[str, list[str]] = {}
        for client_id in client_ids:
            nodes = await self.app.store.nodes_of_client(client_id)
            clients[client_id] = [n for n in nodes if is_live(n)]
        return 200, {"nodes": {n: is_live(n) for n in node_ids}, "clients": clients}

    # -- nodes --------------------------------------------------------------
    async def disconnect(self, request: IRequest, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``POST /api/v1/nodes/{node_id}/disconnect``: revoke (optionally),
        then close the node's connections here and on every linked peer."""
        node_id = _path_id(params["node_id"], "node_id")
        body = _object(_json_body(request, required=False) or b"{}")
        unknown = sorted(body.keys() - {"revoke_until", "reason"})
        if unknown:
            raise HTTPError(400, "bad_request", f"unknown fields: {', '.join(n[:64] for n in unknown[:5])}")
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise HTTPError(400, "bad_request", f"reason must be a string of at most {MAX_REASON_CHARS} characters")
        until_ms: int | None = None
        if "revoke_until" in body:
            until = body["revoke_until"]
            if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 <= until <= MAX_REVOKE_UNTIL:
                raise HTTPError(400, "bad_request", f"revoke_until must be a Unix time in seconds from 0 to "
                                                    f"{MAX_REVOKE_UNTIL} (0 lifts a revocation)")
            until_ms = int(until * 1000)
            try:
                await self.app.revocations.revoke(node_id, until_ms)
            except (AttributeError, NotImplementedError):
                raise HTTPError(501, "not_supported", "this server's store keeps no revocations") from None
        closed = self.app.close_node(node_id, reason, until_ms)
        mesh = self.app.mesh
        told: list[str] = mesh.disconnect(node_id, reason, until_ms) if mesh is not None else []
        here = self.app.config.server_id
        unreachable = [s["server_id"] for s in self.app.cluster.view()
                       if s["state"] != "dead" and s["server_id"] != here and s["server_id"] not in told]
        log.info("disconnect {node_id}: closed {closed} here, told {peers}", node_id=node_id, closed=closed,
                 peers=told, unreachable=unreachable, revoked_until=until_ms, reason=reason)
        return 200, {"node_id": node_id, "closed": closed, "servers_told": told, "unreachable": unreachable,
                     "revoked_until": None if until_ms is None else until_ms // 1000}

    async def inbox(self, request: IRequest, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``GET /api/v1/nodes/{node_id}/inbox``: how much the node has not acked."""
        node_id = _path_id(params["node_id"], "node_id")
        store = self.app.store
        if await store.get_node(node_id) is None:
            raise HTTPError(404, "unknown_node", f"no node {node_id!r} has ever connected to this cluster")
        page = await store.fetch_inbox(node_id, 0, 1)
        oldest = page.messages[0] if page.messages else None
        # seqs of one inbox are consecutive and only deleted from the oldest
        # (ack up to a seq, retention by age): the unacked ones run from the
        # oldest row kept to the last seq
        unacked = page.last_seq - oldest.seq + 1 if oldest is not None else 0
        return 200, {
            "node_id": node_id,
            "unacked": max(0, unacked),
            "last_seq": page.last_seq,
            "acked_upto": oldest.seq - 1 if oldest is not None else page.last_seq,
            "purged_upto": page.purged_upto,
            "oldest_stored_ms": oldest.stored_at if oldest is not None else None,
        }

    # -- servers ------------------------------------------------------------
    async def servers(self, request: IRequest, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``GET /api/v1/servers``: every server record, with state and load."""
        cluster = self.app.cluster
        if cluster.held:
            await cluster.refresh()
        return 200, {"server_id": self.app.config.server_id, "servers": cluster.view()}

    async def drain_here(self, request: IRequest, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``POST /api/v1/drain``: drain this server as SIGTERM does (after the answer)."""
        return self._drain_self("this server")

    async def drain_server(self, request: IRequest, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``POST /api/v1/servers/{server_id}/drain``: drain that server, here
        or through its peer link."""
        server_id = _path_id(params["server_id"], "server_id")
        if server_id == self.app.config.server_id:
            return self._drain_self(server_id)
        cluster = self.app.cluster
        record = cluster.servers.get(server_id)
        if record is None or not cluster.alive(record):
            raise HTTPError(404, "unknown_server", f"no live server {server_id!r} in this cluster")
        mesh = self.app.mesh
        if mesh is None or not mesh.drain(server_id):
            raise HTTPError(503, "unreachable", f"no peer link to {server_id!r} is up: ask that server itself")
        log.info("asked peer {server_id} to drain", server_id=server_id)
        return 202, {"server_id": server_id, "state": "draining"}

    def _drain_self(self, what: str) -> tuple[int, dict[str, Any]]:
        app = self.app
        if not app.draining:
            if app.request_drain is None:
                raise HTTPError(503, "unavailable", "this server cannot drain on request")
            log.info("drain requested through the server API", server_id=app.config.server_id)
            app.request_drain()
        return 202, {"server_id": app.config.server_id, "state": "draining"}


def _parse_message(raw: bytes, body: dict[str, Any]) -> Message | Control:
    """``raw`` parsed as a client's message frame (the same checks).  JSON
    Schema counts ``3.0`` as an integer, so an integral float ``type`` is
    taken as that integer: the body is then encoded again, which changes
    nothing else once every integer literal in ``raw`` is one ``orjson``
    reads exactly (:func:`_exact_integers`)."""
    try:
        return parse_frame(raw)
    except FrameError:
        kind = body.get("type")
        if (not isinstance(kind, float) or not kind.is_integer() or not abs(kind) < 2**53
                or not _exact_integers(raw)):
            raise
        return parse_frame(orjson.dumps({**body, "type": int(kind)}))


def _exact_integers(raw: bytes) -> bool:
    """Whether every integer literal in ``raw`` (valid JSON) lies in
    ``MIN_FRAME_INT..MAX_FRAME_INT`` (read by the standard library's parser,
    which sees each literal as written)."""

    def exact(text: str) -> int:
        value = int(text)
        if not MIN_FRAME_INT <= value <= MAX_FRAME_INT:
            raise ValueError(text)
        return value

    try:
        json.loads(raw, parse_int=exact)
    except (ValueError, RecursionError):
        return False
    return True


def _match(pattern: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    """The ``{name}`` values when ``segments`` fit ``pattern``, else None."""
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, segments):
        if want.startswith("{"):
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _path_id(value: str, name: str) -> str:
    if not is_valid_id(value):
        raise HTTPError(400, "bad_request", f"{name} must be 1-128 characters of [A-Za-z0-9_.:@-]")
    return value


def _json_body(request: IRequest, required: bool) -> bytes:
    """The request's body, which must be JSON (``application/json``); empty
    bytes for a missing optional body."""
    request.content.seek(0)
    raw: bytes = request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise HTTPError(413, "too_large", f"the body is over {MAX_BODY} bytes")
    if not raw:  # only no body at all is a missing body; whitespace is not JSON
        if required:
            raise HTTPError(400, "bad_request", "send a JSON object as the body")
        return b""
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/json":
        raise HTTPError(415, "unsupported_media_type", "send the body as Content-Type: application/json")
    return raw


def _object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HTTPError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "bad_request", "the body must be a JSON object")
    return body


#: HTTP status of each router refusal (any other: 400 with the router's code).
_ROUTER_STATUS = {"unknown_destination": 404, "not_allowed": 403, "not_a_member": 403, "too_large": 413,
                  "inbox_full": 429, "session_full": 429}


def _http_error(error: FrameError) -> HTTPError:
    """A router or parser refusal as the API's answer (``bad_frame`` is ``bad_request``)."""
    code = "bad_request" if error.code == "bad_frame" else error.code
    if code == "not_a_member":
        code = "not_allowed"
    return HTTPError(_ROUTER_STATUS.get(error.code, 400), code if code in ERROR_CODES else "bad_request",
                     error.message)

