"""allspark.origins: what an origin is, and which ones a server allows."""

from __future__ import annotations

from twisted.trial import unittest

from allspark.origins import OriginPolicy, check_allowed_origin, origin_text, parse_origin


class ParseOriginTests(unittest.TestCase):
    def test_the_default_port_is_filled_in(self) -> None:
        self.assertEqual(parse_origin("https://App.Example.com"), ("https", "app.example.com", 443))
        self.assertEqual(parse_origin("http://127.0.0.1:8080"), ("http", "127.0.0.1", 8080))
        self.assertEqual(parse_origin("http://[::1]:81"), ("http", "::1", 81))

    def test_what_is_not_an_origin(self) -> None:
        for value in ("null", "", "file://", "ws://a.example", "https://a.example/path", "https://a.example?x=1",
                      "https://u@a.example", "https://a.example:99999", "https://a.example:x", "a.example",
                      "https://", "https://a.example#f"):
            self.assertIsNone(parse_origin(value), value)

    def test_written_as_a_browser_writes_it(self) -> None:
        self.assertEqual(origin_text(("https", "a.example", 443)), "https://a.example")
        self.assertEqual(origin_text(("http", "a.example", 8080)), "http://a.example:8080")
        self.assertEqual(origin_text(("http", "::1", 80)), "http://[::1]")

    def test_an_option_value_is_checked_and_made_canonical(self) -> None:
        self.assertEqual(check_allowed_origin("HTTPS://App.Example.com:443"), "https://app.example.com")
        for bad in ("*", "app.example.com", "https://app.example.com/", "https://app.example.com/x", "null"):
            with self.assertRaises(ValueError) as caught:
                check_allowed_origin(bad)
            self.assertIn("scheme://host[:port]", str(caught.exception))


class OriginPolicyTests(unittest.TestCase):
    def test_same_origin_is_the_host_header(self) -> None:
        policy = OriginPolicy()
        self.assertTrue(policy.allows("http://127.0.0.1:8080", "127.0.0.1:8080"))
        self.assertTrue(policy.allows("https://chat.example.com", "chat.example.com"))
        self.assertTrue(policy.allows("http://chat.example.com", "Chat.Example.com:80"))
        self.assertFalse(policy.allows("http://127.0.0.1:8081", "127.0.0.1:8080"))
        self.assertFalse(policy.allows("https://chat.example.com:8443", "chat.example.com"))
        self.assertFalse(policy.allows("http://evil.example", "127.0.0.1:8080"))
        self.assertFalse(policy.allows("http://127.0.0.1:8080", None))
        self.assertFalse(policy.allows("null", "127.0.0.1:8080"))

    def test_the_loopback_names_are_one_host(self) -> None:
        """A page at http://localhost:8080 reaches ws://127.0.0.1:8080."""
        policy = OriginPolicy()
        self.assertTrue(policy.allows("http://localhost:8080", "127.0.0.1:8080"))
        self.assertTrue(policy.allows("http://127.0.0.1:8080", "[::1]:8080"))
        self.assertFalse(policy.allows("http://localhost:8081", "127.0.0.1:8080"))
        self.assertFalse(policy.allows("http://evil.localhost:8080", "127.0.0.1:8080"))
        self.assertFalse(policy.allows("http://localhost:8080", "10.0.0.1:8080"))

    def test_listed_origins_are_allowed_anywhere(self) -> None:
        policy = OriginPolicy(["https://app.example.com", "http://localhost:3000"])
        self.assertTrue(policy.allows("https://app.example.com", "api.example.com"))
        self.assertTrue(policy.allows("https://APP.example.com:443", None))
        self.assertTrue(policy.allows("http://localhost:3000", "127.0.0.1:8080"))
        self.assertFalse(policy.allows("http://app.example.com", "api.example.com"))
        self.assertFalse(policy.allows("http://localhost:3001", "127.0.0.1:8080"))

    def test_a_bad_host_header_is_no_same_origin(self) -> None:
        policy = OriginPolicy()
        for host in ("", "a.example:x", "[::1", ":80"):
            self.assertFalse(policy.is_same_origin("http://a.example", host), host)
