"""Property tests of every HTTP endpoint's parameters against ONE real
``twistd allspark`` process per test class.

Requests are drawn from the endpoints (pre-connection in both forms,
``/health``, every session and push endpoint, ``/ws`` without an upgrade, unknown
paths), methods (GET, HEAD, POST and odd ones), query strings (real argument
names with good and bad values, repeated arguments, broken percent escapes),
auth keys (valid, junk, and hand-made JWTs with odd headers such as ``crit``
or a non-string ``kid``) and bodies (form, JSON of any shape, broken JSON,
invalid UTF-8, bodies over the 64 KiB cap, chunked).  Every request has a
timeout.  Each answer must be a JSON object with a 2xx or 4xx status (never
5xx, never a hang), and after every request the server must not have logged
a traceback (``Traceback``/``Unhandled``); at the end it must still be
healthy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import unittest
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import example, given
from hypothesis import strategies as st

from allspark.envelope import CONTROL_OPS
from tests.fuzz import FAILURE_MARKS, fuzz_settings, http_call, log_since
from tests.fuzz.test_frames import EDGE_INTS, ID_LIKE, json_values
from tests.support import SECRET, ServerProcess, key

SESSION_PATHS = ["/" + op for op in ("create_session", "join_session", "unjoin_session", "get_session_info",
                                     "reveal_anonymity", "set_master", "my_sessions")]
PUSH_PATHS = ["/push/register", "/push/unregister", "/push/mute", "/push", "/push/register/x"]
PATHS = ["/", "/v1/pre_connection_info", "/health", "/ws", "/v1", "/v1/", "/nothing", "/health/x",
         "/create_session/x", "/%2e%2e/health", "//health", "/ws/x"] + SESSION_PATHS + PUSH_PATHS
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "FOO"]

#: Every argument name an endpoint reads.
ARG_NAMES = sorted({"auth_key", "get_pre_connection_info", "need_proxy", "validation_token"}
                   | {name for spec in CONTROL_OPS.values() for name in spec})

#: Bytes of request line and headers twisted.web reads; over it, it answers a
#: bare 400 and closes the connection (while the client may still be writing).
MAX_HEAD_BYTES = 16384


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_jwt(header: bytes, claims: bytes) -> str:
    """A JWT of these raw header and claims bytes, signed with the test secret."""
    signing_input = f"{b64url(header)}.{b64url(claims)}"
    return f"{signing_input}.{b64url(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())}"


@st.composite
def crafted_jwts(draw: Any) -> str:
    """A JWT-shaped key with any header and claims, signed with the test
    secret (so that it gets past the signature when its header is usable),
    with a junk signature, or with none."""
    header = draw(st.one_of(
        st.fixed_dictionaries({"alg": st.sampled_from(["HS256", "none", "RS256", "ES256", "HS512", "", "hs256"])},
                              optional={"typ": json_values, "kid": json_values, "crit": json_values,
                                        "jku": json_values, "x5u": json_values, "b64": json_values}),
        json_values,
    ))
    claims = draw(st.one_of(
        st.fixed_dictionaries({"sub": ID_LIKE, "exp": st.one_of(st.sampled_from(EDGE_INTS), json_values)},
                              optional={"iat": json_values, "nbf": json_values, "client_id": json_values}),
        json_values,
    ))
    head = b64url(json.dumps(header).encode("utf-8", "surrogatepass"))
    body = b64url(json.dumps(claims).encode("utf-8", "surrogatepass"))
    signing_input = f"{head}.{body}".encode()
    signature = draw(st.sampled_from(["secret", "junk", "none"]))
    if signature == "secret":
        sig = b64url(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())
    elif signature == "junk":
        sig = b64url(b"x" * 32)
    else:
        sig = ""
    return f"{head}.{body}.{sig}"


#: Keys of the world's nodes (alice owns its sessions).
VALID_KEYS = [key("alice", "alice-app"), key("alice"), key("bob"), key("carol", "carol-app")]


def auth_keys() -> st.SearchStrategy[str]:
    """Valid keys of the world's nodes, junk, and crafted JWTs."""
    return st.one_of(
        st.sampled_from(VALID_KEYS + [key("alice", ttl=1)]),
        st.sampled_from(["", "x", "a.b.c", "..", "a" * 9000, "\u00e9.\u00e9.\u00e9", "Bearer x"]),
        st.text(max_size=60),
        crafted_jwts(),
    )


def argument_values(name: str) -> st.SearchStrategy[Any]:
    """Query or form values for argument ``name``: good ones and bad ones."""
    if name == "auth_key":
        return auth_keys()
    common = st.one_of(st.sampled_from(["", "true", "false", "1", "0", "yes", "TRUE", "null", "[]", "-1",
                                        str(2**64), "x" * 5000]), ID_LIKE)
    if name == "session_id":
        return st.one_of(st.sampled_from(["grp", "game", "anon", "nosuch"]), common)
    if name in ("node_id", "alias"):
        return st.one_of(st.sampled_from(["alice", "bob", "carol", "nobody"]), common)
    if name in ("upto", "after", "limit"):
        return st.one_of(st.sampled_from([str(n) for n in EDGE_INTS]), common)
    if name == "session_type":
        return st.one_of(st.sampled_from(["group", "game"]), common)
    return common


@st.composite
def arguments(draw: Any) -> list[tuple[str, str]]:
    """Argument pairs, a name sometimes repeated, sometimes an unknown name."""
    names = draw(st.lists(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=10)), max_size=6))
    pairs = []
    for name in names:
        value = draw(argument_values(name))
        pairs.append((name, value if isinstance(value, str) else json.dumps(value)))
    return pairs


def query_string(pairs: list[tuple[str, str]], junk: str) -> str:
    """``pairs`` percent-encoded (lone surrogates as invalid UTF-8), plus ``junk``."""
    parts = [quote(n.encode("utf-8", "surrogatepass"), safe="") + "=" + quote(v.encode("utf-8", "surrogatepass"),
                                                                              safe="")
             for n, v in pairs]
    return "&".join(parts) + junk


@st.composite
def bodies(draw: Any, pairs: list[tuple[str, str]]) -> tuple[bytes | None, dict[str, str]]:
    """A body and its headers: none, a form, JSON (typed or of any shape),
    broken JSON, invalid UTF-8, over the cap, or with an odd content type."""
    kind = draw(st.sampled_from(["none", "form", "json", "json-any", "json-broken", "bytes", "huge-json",
                                 "huge-form", "multipart", "odd-type"]))
    form = {"content-type": "application/x-www-form-urlencoded"}
    js = {"content-type": draw(st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                "APPLICATION/JSON"]))}
    if kind == "none":
        return None, {}
    if kind == "form":
        return query_string(pairs, "").encode(), form
    if kind == "json":
        typed: dict[str, Any] = {}
        for name, value in pairs:
            typed[name] = draw(st.one_of(st.just(value), json_values))
        return json.dumps(typed).encode("utf-8", "surrogatepass"), js
    if kind == "json-any":
        return json.dumps(draw(json_values)).encode("utf-8", "surrogatepass"), js
    if kind == "json-broken":
        return draw(st.sampled_from([b"{", b'{"auth_key":', b"\xff\xfe", b'{"a":1}}', b"[1,", b'"x"', b"NaN",
                                     b'{"auth_key":"\xff"}', b"\x00", b" "])), js
    if kind == "bytes":
        return draw(st.binary(max_size=200)), draw(st.sampled_from([form, js, {}]))
    if kind == "huge-json":
        size = draw(st.sampled_from([64 * 1024 - 20, 64 * 1024 + 1, 100_000]))
        return json.dumps({"auth_key": key("alice"), "pad": "x" * size}).encode(), js
    if kind == "huge-form":
        size = draw(st.sampled_from([64 * 1024, 100_000]))
        return b"auth_key=" + key("alice").encode() + b"&pad=" + b"x" * size, form
    if kind == "multipart":
        boundary = draw(st.sampled_from(["b", "", "x" * 80]))
        body = draw(st.sampled_from([
            f'--{boundary}\r\nContent-Disposition: form-data; name="auth_key"\r\n\r\n{key("alice")}\r\n'
            f"--{boundary}--\r\n",
            f"--{boundary}\r\nbroken",
            "",
        ])).encode()
        return body, {"content-type": f"multipart/form-data; boundary={boundary}"}
    return draw(st.binary(max_size=50)), {"content-type": draw(st.sampled_from(
        ["text/plain", "application/xml", "application/json;;", "*/*", "application/x-www-form-urlencoded; x"]))}


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    """One request: method, path, query, headers and body."""
    path = draw(st.sampled_from(PATHS))
    method = draw(st.one_of(st.sampled_from(["GET", "POST"]), st.sampled_from(METHODS)))
    pairs = draw(arguments())
    if draw(st.integers(min_value=0, max_value=3)) > 0:  # mostly a valid caller, to get past authentication
        pairs.insert(0, ("auth_key", draw(st.sampled_from(VALID_KEYS))))
    if path in SESSION_PATHS and draw(st.integers(min_value=0, max_value=3)) > 0:
        pairs.insert(0, ("session_id", draw(st.sampled_from(["grp", "anon", "game", "nosuch"]))))
    # the arguments go in the query, in the body, or in both (repeated: refused)
    where = draw(st.sampled_from(["query", "query", "body", "body", "both"]))
    in_query = pairs if where != "body" else []
    if path == "/" and draw(st.booleans()):
        in_query = [("get_pre_connection_info", draw(st.sampled_from(["true", "1", "yes", "TRUE", "false"])))] + in_query
    junk = draw(st.sampled_from(["", "", "", "&", "&&=", "%", "%zz", "%ff%fe", "=x", "&a", ";b=c", "#frag"]))
    query = query_string(in_query, junk)
    body, headers = draw(bodies(pairs if where != "query" else [])) if method != "HEAD" else (None, {})
    chunked = body is not None and draw(st.integers(min_value=0, max_value=5)) == 0
    return {"method": method, "url": path + ("?" + query if query else ""), "body": body, "headers": headers,
            "chunked": chunked}


class HTTPFuzzTests(unittest.TestCase):
    """One server process for every property of the class."""

    server: ServerProcess
    log_offset = 0

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = ServerProcess(args=("--proxy_80_port=127.0.0.1:8081",)).start()
        try:
            # the world the requests find: sessions of every kind, with members
            for op, caller, args in (
                ("create_session", "alice", {"session_id": "grp"}),
                ("create_session", "alice", {"session_id": "anon", "anonymous": "true", "anyone_can_join": "true"}),
                ("create_session", "alice", {"session_id": "game", "session_type": "game"}),
                ("join_session", "alice", {"session_id": "grp", "node_id": "bob"}),
                ("join_session", "alice", {"session_id": "game", "node_id": "bob"}),
                ("join_session", "carol", {"session_id": "anon"}),
            ):
                status, _ = cls.call("GET", f"/{op}?" + urlencode({"auth_key": key(caller), **args}))
                assert status == 200, (op, args, status)
        except BaseException:
            cls.server.stop()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            status, body = cls.call("GET", "/health")
            assert status == 200 and json.loads(body)["status"] == "ok", (status, body)
            log = cls.server.log()
            for mark in FAILURE_MARKS:
                assert mark not in log, log[log.index(mark) - 2000:][:6000]
        finally:
            cls.server.stop()

    @classmethod
    def call(cls, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             chunked: bool = False) -> tuple[int, bytes]:
        """One request to the class's server (see :func:`tests.fuzz.http_call`)."""
        return http_call(cls.server, method, url, body, headers, chunked)

    def new_log(self) -> str:
        """What the server logged since the last call."""
        log, type(self).log_offset = log_since(self.server, type(self).log_offset)
        return log

    def check(self, request: dict[str, Any]) -> None:
        """Send ``request``; a JSON object with a 2xx/4xx status, and nothing
        failed in the server."""
        what = f"{request['method']} {request['url'][:300]} body={str(request['body'])[:300]}"
        if len(request["url"]) + 200 > MAX_HEAD_BYTES:
            # twisted.web refuses the head: a bare 400 or a closed connection, never a hang
            try:
                status, body = self.call(**request)
            except (ConnectionError, http.client.RemoteDisconnected):
                return
            self.assertTrue(400 <= status < 500, f"{status} {body[:300]!r} for {what}")
            return
        status, body = self.call(**request)
        self.assertTrue(200 <= status < 500, f"{status} {body[:300]!r} for {what}")
        if request["method"] != "HEAD":
            try:
                answer = json.loads(body)
            except ValueError:
                self.fail(f"{status} with a body that is not JSON ({body[:200]!r}) for {what}")
            self.assertIsInstance(answer, dict, what)
        log = self.new_log()
        for mark in FAILURE_MARKS:
            self.assertNotIn(mark, log, f"for {what}:\n{log[:6000]}")

    @fuzz_settings()
    @given(requests())
    def test_any_request_to_any_endpoint(self, request: dict[str, Any]) -> None:
        self.check(request)

    @fuzz_settings(share=0.5)
    @given(st.sampled_from(["/", "/v1/pre_connection_info"] + SESSION_PATHS), st.sampled_from(["GET", "POST"]),
           crafted_jwts())
    @example("/v1/pre_connection_info", "GET", b64url(b'{"alg":"HS256","crit":["exp"]}') + ".e30.x")
    @example("/v1/pre_connection_info", "GET", b64url(b'{"alg":"HS256","kid":1}') + ".e30.x")
    @example("/get_session_info", "POST", b64url(b'{"alg":"HS256","kid":[]}') + ".e30.x")
    @example("/join_session", "POST", signed_jwt(b'{"alg":"HS256","crit":["\\ud800"]}', b"null"))
    @example("/v1/pre_connection_info", "GET", signed_jwt(b'{"alg":"HS256","crit":["\\udfff"]}', b"{}"))
    def test_crafted_auth_keys(self, path: str, method: str, auth_key: str) -> None:
        query = {"auth_key": auth_key, "session_id": "grp"}
        if path == "/":
            query["get_pre_connection_info"] = "true"
        if method == "GET":
            self.check({"method": "GET", "url": path + "?" + urlencode(query), "body": None, "headers": {},
                        "chunked": False})
        else:
            self.check({"method": "POST", "url": path, "body": json.dumps(query).encode(),
                        "headers": {"content-type": "application/json"}, "chunked": False})

    @fuzz_settings(share=0.5)
    @given(st.sampled_from(SESSION_PATHS), st.sampled_from(["alice", "bob", "carol"]),
           st.dictionaries(st.sampled_from(ARG_NAMES), json_values, max_size=5))
    def test_session_endpoints_with_json_arguments_of_any_type(self, path: str, caller: str,
                                                               args: dict[str, Any]) -> None:
        args["auth_key"] = key(caller)
        self.check({"method": "POST", "url": path, "body": json.dumps(args).encode("utf-8", "surrogatepass"),
                    "headers": {"content-type": "application/json"}, "chunked": False})
