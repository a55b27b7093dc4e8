"""Push registration ops (allspark/push/registration.py): register_push,
unregister_push and mute_push, parsed as frames and answered by
``Server.control`` on the memory store, as a socket would."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from allspark.auth import AuthKeyVerifier, ValidationTokens
from allspark.envelope import Control, FrameError, control_from, parse_frame
from allspark.push.registration import push_target
from allspark.server import Server, ServerConfig
from allspark.store import PushTarget
from allspark.store.memory import MemoryStore
from tests.fakes import FakeConnection

NOW_S = 1_700_000_000
P256DH = base64.urlsafe_b64encode(b"\x04" + b"k" * 64).rstrip(b"=").decode()
AUTH = base64.urlsafe_b64encode(b"a" * 16).rstrip(b"=").decode()
SUBSCRIPTION: dict[str, Any] = {"endpoint": "https://push.example.net/send/abc", "expirationTime": None,
                "keys": {"p256dh": P256DH, "auth": AUTH}}


class _Conn(FakeConnection):
    """A fake connection with the ``sender`` the socket sets at its handshake."""

    @property
    def sender(self) -> Any:
        from allspark.router import Sender

        return Sender(self.node_id, self.client_id)


class RegistrationOpsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)
        self.store = MemoryStore()
        config = ServerConfig(server_id="srv", host="127.0.0.1", port=1, listen=())
        self.server = Server(config, self.store, AuthKeyVerifier([b"secret-0123456789abcdef"]),
                             ValidationTokens(b"k" * 32, "srv", self.clock), self.clock)
        self.server.new_sessions()
        self.conn = _Conn("phone-1", "alice")

    def control(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Parse ``frame`` and answer it; the answer (a FrameError is raised)."""
        parsed = parse_frame(orjson.dumps(frame))
        assert isinstance(parsed, Control)
        results: list[Any] = []
        ensureDeferred(self.server.control(self.conn, parsed)).addBoth(results.append)  # type: ignore[arg-type]
        self.assertEqual(len(results), 1, "no answer (the memory store answers at once)")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def refused(self, frame: dict[str, Any], code: str = "bad_frame") -> str:
        """``frame`` is refused with ``code`` (by the parser or the op) and
        nothing is stored; the message."""
        before = self.successResultOf(self.store.get_push_target("phone-1"))
        try:
            answer = self.control(frame)
        except FrameError as e:
            self.assertEqual(e.code, code, (frame, e.message))
            self.assertTrue(e.message)
            self.assertEqual(self.successResultOf(self.store.get_push_target("phone-1")), before, frame)
            return e.message
        raise AssertionError(f"{frame} was answered {answer}")

    def target(self) -> PushTarget | None:
        return self.successResultOf(self.store.get_push_target("phone-1"))

    def test_register_each_provider_and_the_latest_wins(self) -> None:
        """Every provider registers; each registration replaces the last, and
        the answer says whether this server has the provider configured."""
        answer = self.control({"op": "register_push", "provider": "fcm", "token": "fcm:tok-1", "id": "r1"})
        self.assertEqual(answer, {"op": "push_registered", "registered": True, "provider": "fcm", "active": False})
        self.assertEqual(self.target(), PushTarget("phone-1", "fcm", "fcm:tok-1", None, None, None, NOW_S * 1000))
        self.server.push_providers = frozenset({"apns", "webhook"})
        answer = self.control({"op": "register_push", "provider": "apns", "token": "a1B2" * 16,
                               "topic": "com.example.chat", "environment": "development"})
        self.assertEqual((answer["provider"], answer["active"]), ("apns", True))
        self.assertEqual(self.target(), PushTarget("phone-1", "apns", "a1B2" * 16, None, "com.example.chat",
                                                   "development", NOW_S * 1000))
        answer = self.control({"op": "register_push", "provider": "webpush", "subscription": SUBSCRIPTION})
        self.assertEqual((answer["provider"], answer["active"]), ("webpush", False))
        target = self.target()
        assert target is not None
        self.assertEqual((target.token, target.address), (None, SUBSCRIPTION["endpoint"]))
        self.assertEqual(target.subscription, {"endpoint": SUBSCRIPTION["endpoint"],
                                               "keys": {"p256dh": P256DH, "auth": AUTH}})
        answer = self.control({"op": "register_push", "provider": "webhook", "token": "user-77"})
        self.assertEqual((answer["provider"], answer["active"]), ("webhook", True))
        self.assertEqual(self.target(), PushTarget("phone-1", "webhook", "user-77", None, None, None, NOW_S * 1000))

    def test_unregister_and_mute(self) -> None:
        """unregister_push says whether a target was removed; mute_push sets
        and lifts the mute, which registering again does not change."""
        self.assertEqual(self.control({"op": "unregister_push"}),
                         {"op": "push_unregistered", "registered": False, "removed": False})
        self.control({"op": "register_push", "provider": "fcm", "token": "t"})
        self.assertEqual(self.control({"op": "mute_push", "muted": True}), {"op": "push_muted", "muted": True})
        self.control({"op": "register_push", "provider": "fcm", "token": "t2"})
        self.assertTrue(self.successResultOf(self.store.push_muted("phone-1")))
        self.assertEqual(self.control({"op": "unregister_push"})["removed"], True)
        self.assertIsNone(self.target())
        self.assertEqual(self.control({"op": "mute_push", "muted": False}), {"op": "push_muted", "muted": False})
        self.assertFalse(self.successResultOf(self.store.push_muted("phone-1")))

    def test_bad_registrations_are_refused_with_a_clear_error(self) -> None:
        """Every malformed registration is an error frame and stores nothing."""
        self.control({"op": "register_push", "provider": "fcm", "token": "kept"})
        self.assertIn("fcm, apns", self.refused({"op": "register_push", "provider": "gcm", "token": "t"},
                                                "unknown_provider"))
        keys = SUBSCRIPTION["keys"]
        for frame in (
            {"op": "register_push"},  # no provider
            {"op": "register_push", "provider": 5, "token": "t"},
            {"op": "register_push", "provider": "fcm"},  # no token
            {"op": "register_push", "provider": "fcm", "token": ""},
            {"op": "register_push", "provider": "fcm", "token": "x" * 4097},
            {"op": "register_push", "provider": "fcm", "token": "has space"},
            {"op": "register_push", "provider": "fcm", "token": "line\r\nbreak"},
            {"op": "register_push", "provider": "fcm", "token": 12345},
            {"op": "register_push", "provider": "fcm", "token": "t", "topic": "com.example"},
            {"op": "register_push", "provider": "webhook", "token": "t", "environment": "production"},
            {"op": "register_push", "provider": "fcm", "token": "t", "subscription": SUBSCRIPTION},
            {"op": "register_push", "provider": "fcm", "token": "t", "extra": 1},  # unknown field
            {"op": "register_push", "provider": "apns", "token": "not-hex"},
            {"op": "register_push", "provider": "apns", "token": "ab", "environment": "staging"},
            {"op": "register_push", "provider": "apns", "token": "ab", "topic": ""},
            {"op": "register_push", "provider": "webpush"},  # no subscription
            {"op": "register_push", "provider": "webpush", "token": "t"},
            {"op": "register_push", "provider": "webpush", "subscription": "https://push.example.net/x"},
            {"op": "register_push", "provider": "webpush", "subscription": {"keys": keys}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "ftp://push.example.net/x", "keys": keys}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "https:///no-host", "keys": keys}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "https://push.example.net/" + "x" * 2100, "keys": keys}},
            {"op": "register_push", "provider": "webpush", "subscription": {"endpoint": "https://p.example"}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "https://p.example", "keys": {"p256dh": P256DH}}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "https://p.example", "keys": {"p256dh": P256DH, "auth": "not base64!"}}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "https://p.example", "keys": {"p256dh": AUTH, "auth": AUTH}}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "https://p.example", "keys": {**keys, "more": "x"}}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {"endpoint": "https://p.example",
                              "keys": {**keys, "p256dh": P256DH.replace("B", "A", 1)}}},  # not 0x04
            {"op": "register_push", "provider": "webpush", "subscription": {**SUBSCRIPTION, "extra": 1}},
            {"op": "register_push", "provider": "webpush",
             "subscription": {**SUBSCRIPTION, "expirationTime": "soon"}},
            {"op": "register_push", "provider": "webpush", "subscription": SUBSCRIPTION, "topic": "t"},
            {"op": "unregister_push", "token": "t"},
            {"op": "mute_push"},
            {"op": "mute_push", "muted": "true"},
            {"op": "mute_push", "muted": True, "until": 5},
        ):
            self.refused(frame)
        target = self.target()
        assert target is not None
        self.assertEqual(target.token, "kept")
        self.assertFalse(self.successResultOf(self.store.push_muted("phone-1")))

    def test_push_target_takes_the_longest_token(self) -> None:
        """A token of exactly 4096 characters is accepted."""
        self.assertEqual(push_target("n", {"provider": "fcm", "token": "t" * 4096}, 1).token, "t" * 4096)

    def test_http_fields_are_checked_like_a_frame(self) -> None:
        """control_from refuses fields the op does not take, ``op`` and ``id`` too."""
        self.assertEqual(control_from("mute_push", {"muted": True}).args, {"muted": True})
        for fields in ({"muted": True, "op": "ping"}, {"muted": True, "id": "x"}, {"muted": 1}, {}):
            with self.assertRaises(FrameError):
                control_from("mute_push", fields)
