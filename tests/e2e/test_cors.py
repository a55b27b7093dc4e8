"""Browsers: CORS on the HTTP API and the ``Origin`` check of WebSocket
handshakes (``--allowed-origin``), against real servers over raw HTTP."""

from __future__ import annotations

from twisted.trial import unittest

from tests.e2e.helpers import HTTPAnswer, http_get, http_request, pre_connect, raw_handshake, ws_path_and_query
from tests.support import ServerProcess, key, start_server

ALLOWED = "https://app.example.com"
OTHER = "https://evil.example.net"


def preflight(server: ServerProcess, path: str, origin: str, method: str = "POST") -> HTTPAnswer:
    """A browser's preflight for a JSON ``method`` request to ``path``."""
    return http_request(server.base_url + path, "OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type"})


def handshake(server: ServerProcess, node_id: str, origin: str | None) -> HTTPAnswer:
    """A WebSocket handshake with fresh credentials for ``node_id``, sent
    with ``origin`` (none when None)."""
    answer = pre_connect(server, {"auth_key": key(node_id)})
    assert answer.status == 200, answer
    return raw_handshake(server, ws_path_and_query(answer.json()["node"]["ws_url"]),
                         headers={"Origin": origin} if origin is not None else None)


class AllowedOriginTests(unittest.TestCase):
    """One server started with ``--allowed-origin`` for the whole class."""

    server: ServerProcess
    timeout = 60

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = ServerProcess(args=(f"--allowed-origin={ALLOWED}",)).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    @property
    def own_origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def test_an_allowed_origin_may_read_answers(self) -> None:
        answer = http_get(self.server.base_url + "/health", headers={"Origin": ALLOWED})
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers.get("access-control-allow-origin"), ALLOWED)
        self.assertEqual(answer.headers.get("vary"), "Origin")

    def test_an_allowed_origin_may_read_refusals(self) -> None:
        """A page can tell a bad key (401) from a network failure."""
        answer = http_get(self.server.base_url + "/v1/pre_connection_info?auth_key=nope", headers={"Origin": ALLOWED})
        self.assertEqual(answer.status, 401)
        self.assertEqual(answer.json()["error"], "malformed_key")
        self.assertEqual(answer.headers.get("access-control-allow-origin"), ALLOWED)

    def test_another_origin_gets_no_cors_headers(self) -> None:
        answer = http_get(self.server.base_url + "/health", headers={"Origin": OTHER})
        self.assertEqual(answer.status, 200)
        self.assertNotIn("access-control-allow-origin", answer.headers)
        self.assertEqual(answer.headers.get("vary"), "Origin")

    def test_a_preflight_from_an_allowed_origin_is_answered(self) -> None:
        for path in ("/v1/pre_connection_info", "/create_session", "/presence", "/?get_pre_connection_info=true"):
            answer = preflight(self.server, path, ALLOWED)
            self.assertEqual(answer.status, 204, path)
            self.assertEqual(answer.body, b"")
            self.assertEqual(answer.headers.get("access-control-allow-origin"), ALLOWED)
            self.assertIn("POST", answer.headers["access-control-allow-methods"])
            self.assertEqual(answer.headers.get("access-control-allow-headers"), "Content-Type")
            self.assertEqual(answer.headers.get("access-control-max-age"), "600")
        health = preflight(self.server, "/health", ALLOWED, "GET")
        self.assertEqual(health.status, 204)
        self.assertEqual(health.headers["access-control-allow-methods"], "GET, HEAD")

    def test_a_preflight_from_another_origin_is_refused(self) -> None:
        answer = preflight(self.server, "/create_session", OTHER)
        self.assertEqual(answer.status, 403)
        self.assertEqual(answer.json()["error"], "origin_not_allowed")
        self.assertNotIn("access-control-allow-origin", answer.headers)

    def test_options_without_an_origin_is_not_a_preflight(self) -> None:
        answer = http_request(self.server.base_url + "/health", "OPTIONS")
        self.assertEqual(answer.status, 405)
        self.assertEqual(answer.json()["error"], "method_not_allowed")

    def test_the_servers_own_origin_is_allowed(self) -> None:
        answer = preflight(self.server, "/create_session", self.own_origin)
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer.headers.get("access-control-allow-origin"), self.own_origin)

    def test_a_websocket_from_an_allowed_origin_opens(self) -> None:
        self.assertEqual(handshake(self.server, "ws-allowed", ALLOWED).status, 101)

    def test_a_websocket_from_the_servers_own_origin_opens(self) -> None:
        self.assertEqual(handshake(self.server, "ws-same", self.own_origin).status, 101)
        # a page opened at localhost reaches the ws_url at 127.0.0.1: the same server
        self.assertEqual(handshake(self.server, "ws-local", f"http://localhost:{self.server.port}").status, 101)

    def test_a_websocket_without_an_origin_opens(self) -> None:
        """Non-browser clients send no Origin."""
        self.assertEqual(handshake(self.server, "ws-none", None).status, 101)

    def test_a_websocket_from_another_origin_is_refused(self) -> None:
        for origin in (OTHER, "null", f"http://127.0.0.1:{self.server.port + 1}", f"http://127.0.0.2:{self.server.port}"):
            answer = handshake(self.server, "ws-other", origin)
            self.assertEqual(answer.status, 403, origin)
            self.assertEqual(answer.headers.get("content-type"), "application/json")
            body = answer.json()
            self.assertEqual(body["error"], "origin_not_allowed", origin)

    def test_the_origin_is_refused_before_any_credential_is_read(self) -> None:
        """No auth_key at all: 403 for the origin, not 401 for the key."""
        answer = raw_handshake(self.server, "/ws", headers={"Origin": OTHER})
        self.assertEqual(answer.status, 403)
        self.assertEqual(answer.json()["error"], "origin_not_allowed")
        self.assertEqual(raw_handshake(self.server, "/ws").status, 401)


class SameOriginOnlyTests(unittest.TestCase):
    """Without ``--allowed-origin`` only the server's own origin is allowed."""

    timeout = 60

    def test_only_the_servers_own_origin(self) -> None:
        server = start_server(self)
        own = f"http://127.0.0.1:{server.port}"
        self.assertEqual(preflight(server, "/v1/pre_connection_info", ALLOWED).status, 403)
        self.assertEqual(preflight(server, "/v1/pre_connection_info", own).status, 204)
        self.assertNotIn("access-control-allow-origin",
                         http_get(server.base_url + "/health", headers={"Origin": ALLOWED}).headers)
        self.assertEqual(handshake(server, "n1", ALLOWED).status, 403)
        self.assertEqual(handshake(server, "n2", own).status, 101)
