"""``--demo``: the page at /demo/ and key minting at POST /demo/key exist only
with the flag, against real servers (the browser test is
test_demo_browser.py)."""

from __future__ import annotations

import json

from twisted.trial import unittest

from tests.e2e.helpers import http_get, http_request, pre_connect, raw_handshake, ws_path_and_query
from tests.support import ServerProcess, start_server


def mint(server: ServerProcess, body: object, content_type: str = "application/json") -> tuple[int, dict]:
    """POST /demo/key with ``body`` as JSON; the status and the JSON answer."""
    answer = http_request(server.base_url + "/demo/key", "POST", json.dumps(body).encode(),
                          {"Content-Type": content_type})
    return answer.status, answer.json()


class WithoutDemoTests(unittest.TestCase):
    timeout = 60

    def test_no_page_and_no_keys(self) -> None:
        server = start_server(self)
        for path in ("/demo", "/demo/", "/demo/app.js", "/demo/allspark.js"):
            answer = http_get(server.base_url + path)
            self.assertEqual((answer.status, answer.json()["error"]), (404, "not_found"), path)
        status, body = mint(server, {"name": "mallory", "device": "d1"})
        self.assertEqual((status, body["error"]), (404, "not_found"))
        self.assertNotIn("--demo is on", server.log())


class DemoTests(unittest.TestCase):
    """One server with ``--demo`` for the class."""

    server: ServerProcess
    timeout = 60

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = ServerProcess(args=("--demo",)).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def test_the_page_is_served(self) -> None:
        for path, content_type, marker in (
            ("/demo/", "text/html", b'<script type="module" src="app.js">'),
            ("/demo/index.html", "text/html", b"Allspark demo chat"),
            ("/demo/app.js", "text/javascript", b'from "./allspark.js"'),
            ("/demo/style.css", "text/css", b"#messages"),
            ("/demo/allspark.js", "text/javascript", b"export class AllsparkClient"),
        ):
            answer = http_get(self.server.base_url + path)
            self.assertEqual(answer.status, 200, path)
            self.assertTrue(answer.headers["content-type"].startswith(content_type), (path, answer.headers))
            self.assertIn(marker, answer.body, path)
            self.assertIn("default-src 'self'", answer.headers["content-security-policy"])

    def test_demo_without_a_slash_redirects(self) -> None:
        answer = http_request(self.server.base_url + "/demo", "HEAD")  # urllib follows the redirect
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers["content-type"], "text/html; charset=utf-8")

    def test_unknown_paths_and_methods(self) -> None:
        self.assertEqual(http_get(self.server.base_url + "/demo/nope.js").status, 404)
        self.assertEqual(http_get(self.server.base_url + "/demo/app.js/x").status, 404)
        self.assertEqual(http_request(self.server.base_url + "/demo/app.js", "POST", b"x").status, 405)
        answer = http_get(self.server.base_url + "/demo/key?name=a&device=b")
        self.assertEqual((answer.status, answer.json()["error"]), (405, "method_not_allowed"))

    def test_a_minted_key_connects_as_that_name_and_device(self) -> None:
        status, body = mint(self.server, {"name": "alice", "device": "tab-1"})
        self.assertEqual(status, 200)
        self.assertEqual((body["node_id"], body["client_id"]), ("alice@tab-1", "alice"))
        self.assertGreater(body["expires_in"], 3600)
        answer = pre_connect(self.server, {"auth_key": body["auth_key"]})
        self.assertEqual(answer.status, 200)
        self.assertEqual(raw_handshake(self.server, ws_path_and_query(answer.json()["node"]["ws_url"])).status, 101)

    def test_bad_names_are_refused(self) -> None:
        for body in ({"name": "alice"}, {"device": "d"}, {"name": "", "device": "d"}, {"name": "a@b", "device": "d"},
                     {"name": "a", "device": "x" * 33}, {"name": 7, "device": "d"}, {"name": ["a"], "device": "d"},
                     {"name": "bob", "device": "d:1"}):
            status, answer = mint(self.server, body)
            self.assertEqual((status, answer["error"]), (400, "bad_request"), body)
        status, answer = mint(self.server, ["not", "an", "object"])
        self.assertEqual((status, answer["error"]), (400, "bad_request"))

    def test_the_server_warns_loudly(self) -> None:
        self.assertIn("ANYONE who can reach this server can mint an auth key", self.server.log())
