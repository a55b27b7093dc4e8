"""HTTP pieces without sockets: the access log never holds credentials;
client addresses through trusted proxies."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from allspark.web import TrustedProxies, redact_uri, redacted_log_formatter


class RedactionTests(unittest.SynchronousTestCase):
    def test_redact_uri(self) -> None:
        cases = {
            b"/health": b"/health",
            b"/?get_pre_connection_info=true&auth_key=a.b.c":
                b"/?get_pre_connection_info=true&auth_key=REDACTED",
            b"/ws?auth_key=a.b.c&validation_token=t.s": b"/ws?auth_key=REDACTED&validation_token=REDACTED",
            b"/v1/pre_connection_info?need_proxy=1&auth%5Fkey=k": b"/v1/pre_connection_info?need_proxy=1&auth%5Fkey=REDACTED",
            b"/x?auth_key": b"/x?auth_key",
            b"/x?auth_keys=keep": b"/x?auth_keys=keep",
        }
        for uri, expected in cases.items():
            self.assertEqual(redact_uri(uri), expected, uri)

    def test_log_line_has_no_credentials(self) -> None:
        request = DummyRequest([b""])
        request.uri = b"/?get_pre_connection_info=true&auth_key=SECRETKEY"
        request.method = b"GET"
        request.clientproto = b"HTTP/1.1"
        request.code = 200
        request.sentLength = 10
        request.client = IPv4Address("TCP", "127.0.0.1", 5555)
        request.requestHeaders.setRawHeaders(b"referer", [b"https://app.example/?auth_key=SECRETREF"])
        request.requestHeaders.setRawHeaders(b"user-agent", [b'agent "x"'])
        line = redacted_log_formatter("[ts]", request)
        self.assertNotIn("SECRET", line)
        self.assertEqual(
            line,
            '"127.0.0.1" - - [ts] "GET /?get_pre_connection_info=true&auth_key=REDACTED HTTP/1.1" 200 10 '
            '"https://app.example/?auth_key=REDACTED" "agent \\"x\\""',
        )


class ProxyBaseTests(unittest.SynchronousTestCase):
    def test_a_bare_proxy_address_is_plain_ws_and_a_url_is_kept(self) -> None:
        from allspark.web import proxy_base

        self.assertEqual(proxy_base("message-server1-8080.example.com"), "ws://message-server1-8080.example.com")
        self.assertEqual(proxy_base("wss://chat.example.com/"), "wss://chat.example.com")
        self.assertEqual(proxy_base("ws://10.0.0.5:80"), "ws://10.0.0.5:80")


class TrustedProxiesTests(unittest.SynchronousTestCase):
    """``--trusted-proxy``: forwarded addresses are believed from trusted
    peers only, read from the nearest hop outwards."""

    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])

    def test_untrusted_peer_is_the_client_whatever_it_says(self) -> None:
        self.assertEqual(self.proxies.client_address("192.0.2.1", ["203.0.113.7"], "203.0.113.8"), "192.0.2.1")
        self.assertEqual(TrustedProxies().client_address("127.0.0.1", ["203.0.113.7"]), "127.0.0.1")

    def test_forwarded_for_from_a_trusted_peer(self) -> None:
        cases = {
            ("203.0.113.7",): "203.0.113.7",
            ("203.0.113.7, 10.1.2.3",): "203.0.113.7",  # through two trusted proxies
            ("198.51.100.1, 203.0.113.7, 10.1.2.3",): "203.0.113.7",  # the leftmost one is the client's word
            ("198.51.100.1", "203.0.113.7"): "203.0.113.7",  # the header given twice
            ("10.9.9.9, 10.1.2.3",): "10.9.9.9",  # only proxies: the farthest one
            ("garbage, 10.1.2.3",): "10.1.2.3",  # the walk stops at what is not an address
            ("203.0.113.7:4711",): "203.0.113.7",
            ("[2001:db8::1]:4711",): "2001:db8::1",
            ("",): "127.0.0.1",
        }
        for header, client in cases.items():
            self.assertEqual(self.proxies.client_address("127.0.0.1", list(header)), client, header)

    def test_real_ip_when_there_is_no_forwarded_for(self) -> None:
        self.assertEqual(self.proxies.client_address("10.0.0.1", [], "198.51.100.4"), "198.51.100.4")
        self.assertEqual(self.proxies.client_address("10.0.0.1", ["203.0.113.7"], "198.51.100.4"), "203.0.113.7")
        self.assertEqual(self.proxies.client_address("10.0.0.1", [], "not-an-ip"), "10.0.0.1")

    def test_ipv4_mapped_and_ipv6_peers(self) -> None:
        self.assertEqual(self.proxies.client_address("::ffff:127.0.0.1", ["203.0.113.7"]), "203.0.113.7")
        self.assertEqual(self.proxies.client_address("fd00::5", ["2001:db8::7"]), "2001:db8::7")


class AnswerTests(unittest.SynchronousTestCase):
    """Every request gets a JSON answer, even one whose body cannot be encoded."""

    def test_an_answer_that_cannot_be_encoded_is_a_500_not_a_hang(self) -> None:
        """Found by tests/fuzz: an AuthError message quoting a lone surrogate
        made write_json raise, and the request was never answered."""
        import orjson

        from allspark.web import JSONEndpoint

        request = DummyRequest([b""])
        request.method = b"GET"
        request.path = b"/x"
        JSONEndpoint(lambda request, args: {"message": "\ud800"}).render(request)
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(orjson.loads(b"".join(request.written))["error"], "internal_error")
        self.flushLoggedErrors(TypeError)
