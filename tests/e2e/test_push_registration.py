"""Push registration against a real ``twistd -n allspark`` process.

``register_push``, ``unregister_push`` and ``mute_push`` over the socket
(through the bundled client) and over HTTP (``POST /push/register``,
``/push/unregister``, ``/push/mute`` with the node's ``auth_key``): every
provider, a replacement, every kind of bad input answered with a clear error
(the connection stays usable), and the registration surviving a restart of
the server on its SQLite file.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from typing import Any

import treq
from twisted.trial import unittest

from allspark.client import AllsparkError, Client
from tests.support import ServerProcess, client_for, key, start_server

P256DH = base64.urlsafe_b64encode(b"\x04" + bytes(range(64))).rstrip(b"=").decode()
AUTH = base64.urlsafe_b64encode(bytes(range(16))).rstrip(b"=").decode()
SUBSCRIPTION: dict[str, Any] = {"endpoint": "https://push.example.net/wp/abc", "expirationTime": None,
                                "keys": {"p256dh": P256DH, "auth": AUTH}}
APNS_TOKEN = "0f" * 32

#: Registrations refused, each with the code its error frame (or HTTP answer) carries.
BAD_REGISTRATIONS: list[tuple[dict[str, Any], str]] = [
    ({"provider": "gcm", "token": "t"}, "unknown_provider"),
    ({}, "bad_frame"),
    ({"provider": "fcm"}, "bad_frame"),
    ({"provider": "fcm", "token": "x" * 4097}, "bad_frame"),
    ({"provider": "fcm", "token": "two words"}, "bad_frame"),
    ({"provider": "fcm", "token": 7}, "bad_frame"),
    ({"provider": "fcm", "token": "t", "topic": "com.example.app"}, "bad_frame"),
    ({"provider": "webhook", "token": "t", "environment": "development"}, "bad_frame"),
    ({"provider": "apns", "token": APNS_TOKEN, "environment": "sandbox"}, "bad_frame"),
    ({"provider": "apns", "token": "not-hex"}, "bad_frame"),
    ({"provider": "webpush", "token": "t"}, "bad_frame"),
    ({"provider": "webpush"}, "bad_frame"),
    ({"provider": "webpush", "subscription": {"endpoint": "https://push.example.net/x"}}, "bad_frame"),
    ({"provider": "webpush", "subscription": {**SUBSCRIPTION, "endpoint": "javascript:alert(1)"}}, "bad_frame"),
    ({"provider": "webpush", "subscription": {**SUBSCRIPTION, "keys": {"p256dh": P256DH}}}, "bad_frame"),
    ({"provider": "webpush", "subscription": {**SUBSCRIPTION, "keys": {"p256dh": "%%", "auth": AUTH}}},
     "bad_frame"),
    ({"provider": "fcm", "token": "t", "unknown": 1}, "bad_frame"),
]


async def post(server: ServerProcess, path: str, body: Any) -> tuple[int, Any]:
    """POST ``body`` as JSON to ``path``; ``(status, parsed JSON answer)``."""
    response = await treq.post(f"{server.base_url}{path}", json.dumps(body).encode(),
                               headers={b"content-type": [b"application/json"]}, persistent=False)
    return response.code, json.loads(await response.content())


def stored(server: ServerProcess, node_id: str) -> tuple[dict[str, Any] | None, bool] | None:
    """``(target, muted)`` of ``node_id`` as the server's SQLite file holds
    it (read beside the running server: WAL lets a reader in), or None."""
    with sqlite3.connect(f"file:{os.path.join(server.data_dir, 'allspark.db')}?mode=ro", uri=True) as db:
        row = db.execute("SELECT target, muted FROM push_devices WHERE node_id = ?", (node_id,)).fetchone()
    if row is None:
        return None
    return (json.loads(row[0]) if row[0] is not None else None), bool(row[1])


class SocketRegistrationTests(unittest.TestCase):
    """The three ops as control frames, through the bundled client."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def refused(self, client: Client, fields: dict[str, Any], code: str) -> None:
        """``register_push`` with ``fields`` is answered with an error frame
        carrying ``code`` and a message."""
        try:
            answer = await client.request({"op": "register_push", **fields})
        except AllsparkError as e:
            self.assertEqual(e.code, code, (fields, e.frame))
            self.assertTrue(e.frame.get("message"))
            return
        self.fail(f"{fields} was answered {answer}")

    async def test_register_replace_unregister_and_mute(self) -> None:
        """Each provider registers; the latest registration is the one
        stored; unregister removes it (and says so once); mute holds across
        a re-registration.  ``active`` is false: no --push-config here."""
        phone = await client_for(self, self.server, "phone-1", "alice")
        answer = await phone.register_push("fcm", token="fcm-token:1")
        self.assertEqual(answer["op"], "push_registered")
        self.assertEqual((answer["registered"], answer["provider"], answer["active"]), (True, "fcm", False))
        answer = await phone.register_push("apns", token=APNS_TOKEN, topic="com.example.chat",
                                           environment="development")
        self.assertEqual(answer["provider"], "apns")
        target, muted = stored(self.server, "phone-1") or (None, True)
        assert target is not None
        self.assertEqual((target["provider"], target["token"], target["topic"], target["environment"], muted),
                         ("apns", APNS_TOKEN, "com.example.chat", "development", False))
        self.assertEqual((await phone.mute_push())["muted"], True)
        await phone.register_push("webpush", subscription=SUBSCRIPTION)
        target, muted = stored(self.server, "phone-1") or (None, False)
        assert target is not None
        self.assertEqual((target["provider"], target["token"], muted), ("webpush", None, True))
        self.assertEqual(target["subscription"], {"endpoint": SUBSCRIPTION["endpoint"], "keys": SUBSCRIPTION["keys"]})
        answer = await phone.unregister_push()
        self.assertEqual((answer["op"], answer["removed"]), ("push_unregistered", True))
        self.assertEqual((await phone.unregister_push())["removed"], False)
        self.assertEqual(stored(self.server, "phone-1"), (None, True))
        self.assertEqual((await phone.mute_push(False))["muted"], False)
        browser = await client_for(self, self.server, "browser-1", "alice")
        self.assertEqual((await browser.register_push("webhook", token="alice-browser"))["provider"], "webhook")
        self.assertEqual(stored(self.server, "phone-1"), (None, False))  # another node's row is its own

    async def test_every_bad_registration_is_an_error_frame(self) -> None:
        """Unknown provider, missing or too long token, subscription pieces
        missing, APNs options elsewhere, unknown fields: each is an error
        frame with its code, nothing is stored, the connection stays open."""
        phone = await client_for(self, self.server, "phone-2")
        await phone.register_push("fcm", token="good")
        for fields, code in BAD_REGISTRATIONS:
            await self.refused(phone, fields, code)
        for frame in ({"op": "mute_push"}, {"op": "mute_push", "muted": "yes"},
                      {"op": "unregister_push", "token": "good"}):
            with self.assertRaises(AllsparkError) as caught:
                await phone.request(frame)
            self.assertEqual(caught.exception.code, "bad_frame", frame)
        target, muted = stored(self.server, "phone-2") or (None, True)
        assert target is not None
        self.assertEqual((target["token"], muted), ("good", False))
        self.assertEqual((await phone.ping())["op"], "pong")


class HTTPRegistrationTests(unittest.TestCase):
    """``POST /push/register``, ``/push/unregister``, ``/push/mute``."""

    timeout = 60

    def setUp(self) -> None:
        self.server = start_server(self)

    async def test_register_mute_unregister_over_http(self) -> None:
        """The same ops with the node's auth_key in a JSON body; the answer
        is the op's answer without ``op``."""
        auth = key("tablet-1", "bob")
        status, body = await post(self.server, "/push/register",
                                  {"auth_key": auth, "provider": "webpush", "subscription": SUBSCRIPTION})
        self.assertEqual((status, body), (200, {"registered": True, "provider": "webpush", "active": False}))
        status, body = await post(self.server, "/push/register",
                                  {"auth_key": auth, "provider": "fcm", "token": "fcm-2"})
        self.assertEqual((status, body["provider"]), (200, "fcm"))
        self.assertEqual(await post(self.server, "/push/mute", {"auth_key": auth, "muted": True}),
                         (200, {"muted": True}))
        target, muted = stored(self.server, "tablet-1") or (None, False)
        assert target is not None
        self.assertEqual((target["token"], target["node_id"], muted), ("fcm-2", "tablet-1", True))
        self.assertEqual(await post(self.server, "/push/unregister", {"auth_key": auth}),
                         (200, {"registered": False, "removed": True}))
        self.assertEqual(stored(self.server, "tablet-1"), (None, True))

    async def test_http_refusals(self) -> None:
        """A missing or bad auth_key is 401, every bad registration is 400
        with its code, a GET is 405; nothing is stored."""
        auth = key("tablet-2")
        forged = key("tablet-2")[:-4] + "AAAA"  # the signature no longer matches
        for body in ({"provider": "fcm", "token": "t"}, {"auth_key": "nope", "provider": "fcm", "token": "t"},
                     {"auth_key": forged, "provider": "fcm", "token": "t"}):
            status, answer = await post(self.server, "/push/register", body)
            self.assertEqual(status, 401, (body, answer))
        for fields, code in BAD_REGISTRATIONS + [({"provider": "fcm", "token": "t", "id": "x"}, "bad_frame")]:
            status, answer = await post(self.server, "/push/register", {"auth_key": auth, **fields})
            self.assertEqual((status, answer["error"]), (400, code), fields)
            self.assertTrue(answer["message"])
        for path, body in (("/push/mute", {"auth_key": auth}), ("/push/mute", {"auth_key": auth, "muted": 1}),
                           ("/push/unregister", {"auth_key": auth, "muted": True})):
            status, answer = await post(self.server, path, body)
            self.assertEqual((status, answer["error"]), (400, "bad_frame"), (path, body))
        self.assertIsNone(stored(self.server, "tablet-2"))
        response = await treq.get(f"{self.server.base_url}/push/register", persistent=False)
        self.assertEqual(response.code, 405)
        await response.content()
        response = await treq.post(f"{self.server.base_url}/push/nothing", b"{}", persistent=False)
        self.assertEqual(response.code, 404)
        await response.content()


class RestartTests(unittest.TestCase):
    """A registration lives in the store, not in the process."""

    timeout = 90

    async def test_registration_and_mute_survive_a_restart(self) -> None:
        """Register and mute, stop the server, start it again on the same
        data directory: the target and the mute are still there (read from
        the file and proven over the socket: unregister removes a target)."""
        server = start_server(self)
        phone = await client_for(self, server, "phone-3")
        await phone.register_push("apns", token=APNS_TOKEN, topic="com.example.chat")
        await phone.mute_push()
        phone.drop()
        server.stop()
        again = ServerProcess(data_dir=server.data_dir, port=server.port).start()
        self.addCleanup(again.stop)
        target, muted = stored(again, "phone-3") or (None, False)
        assert target is not None
        self.assertEqual((target["provider"], target["token"], target["topic"], muted),
                         ("apns", APNS_TOKEN, "com.example.chat", True))
        phone = await client_for(self, again, "phone-3")
        self.assertEqual((await phone.unregister_push())["removed"], True)
