"""Web Push (RFC 8030) for browsers, with VAPID (RFC 8292) and the
``aes128gcm`` message encryption of RFC 8291.

A target's ``subscription`` is the browser's ``PushSubscription`` JSON:
``endpoint`` (the push service's URL for this browser) and ``keys`` with
``p256dh`` (the browser's P-256 public key) and ``auth`` (its 16-byte auth
secret), both base64url.  A send is one POST to the endpoint of a small JSON
document (:func:`payload`) encrypted for those keys with ``http-ece`` (a new
ephemeral key and salt each time), with the headers ``Authorization: vapid
t=<ES256 JWT>, k=<the VAPID public key>`` (the JWT's ``aud`` is the
endpoint's origin, ``sub`` the configured contact, ``exp`` 12 hours ahead;
reused for an hour per origin), ``TTL``, ``Urgency``, ``Topic`` (from the
collapse key, so a newer push replaces one still queued at the push
service) and ``Content-Encoding: aes128gcm``.  The HTTP part is treq's (never pywebpush's, which blocks).

Classification: 200/201/202 sent; 404/410 a dead subscription; 429 and 5xx a
retry (with ``Retry-After``); 413 and any other status failed; no answer a
retry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from typing import Any, Mapping
from urllib.parse import urlsplit

import http_ece
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from py_vapid import Vapid02, VapidException
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from allspark.logs import logger
from allspark.push.config import check_keys, read_secret
from allspark.push.httpclient import HttpAnswer, PushHttpClient, TransportError, retry_after_s
from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget

log = logger(__name__)

#: Push services accept encrypted bodies of at most 4096 bytes.
MAX_BODY_BYTES = 4096
#: The aes128gcm header with a 65-byte key id (86), the padding delimiter (1)
#: and the tag (16) leave this much for the JSON in one record.
MAX_PAYLOAD_BYTES = MAX_BODY_BYTES - 86 - 1 - 16
#: The VAPID JWT is valid this long (RFC 8292 allows at most 24 hours).
VAPID_LIFETIME_S = 12 * 3600
#: A VAPID token is reused for this long (then at least 11 hours remain).
VAPID_REUSE_S = 3600.0
#: Push service origins whose tokens are kept (there are a handful in practice).
MAX_CACHED_AUDIENCES = 64
DEFAULT_TTL_S = 86400
#: Push services keep a message at most about four weeks.
MAX_TTL_S = 28 * 86400
URGENCIES = ("very-low", "low", "normal", "high")
DEFAULT_URGENCY = "normal"
#: RFC 8030: a Topic is at most 32 characters of the URL-safe base64 alphabet.
MAX_TOPIC_CHARS = 32
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_ENDPOINT_CHARS = 2048

CONFIG_KEYS = frozenset({"vapid_private_key_file", "vapid_private_key_env", "subject", "ttl_s",
                         "urgency", "allow_http_endpoints"})


class BadSubscription(ValueError):
    """A stored subscription this provider cannot send to."""


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without its padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def topic_for(collapse_key: str) -> str:
    """The ``Topic`` header for a collapse key: the key itself when it is
    already at most 32 URL-safe base64 characters, else the first 32
    characters of the base64url SHA-256 of it (the same key always gives
    the same topic)."""
    if _TOPIC.match(collapse_key):
        return collapse_key
    return b64url(hashlib.sha256(collapse_key.encode()).digest())[:MAX_TOPIC_CHARS]


def parse_subscription(subscription: Mapping[str, Any] | None,
                       allow_http: bool = False) -> tuple[str, bytes, bytes]:
    """``(endpoint, p256dh public point, auth secret)`` of a
    ``PushSubscription``; :class:`BadSubscription` says what is wrong.  The
    endpoint must be an https URL (an http one too with ``allow_http``):
    the client chose it, and the server should not POST in clear text
    wherever a client says."""
    if not isinstance(subscription, Mapping):
        raise BadSubscription("no subscription")
    endpoint = subscription.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise BadSubscription("no endpoint")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise BadSubscription(f"endpoint longer than {MAX_ENDPOINT_CHARS} characters")
    try:
        parts = urlsplit(endpoint)
        hostname = parts.hostname
        _ = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        raise BadSubscription("endpoint is not a URL") from exc
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not hostname:
        raise BadSubscription("endpoint is not an https URL" if not allow_http
                              else "endpoint is not an http(s) URL")
    keys = subscription.get("keys")
    if not isinstance(keys, Mapping):
        raise BadSubscription("no keys")
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    if not isinstance(p256dh, str) or not isinstance(auth, str):
        raise BadSubscription("keys.p256dh and keys.auth must be strings")
    try:
        point, secret = b64url_decode(p256dh), b64url_decode(auth)
    except (binascii.Error, ValueError) as exc:
        raise BadSubscription("keys are not base64url") from exc
    if len(secret) != 16:
        raise BadSubscription("keys.auth is not 16 bytes")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise BadSubscription("keys.p256dh is not a P-256 public key") from exc
    return endpoint, point, secret


def origin_of(endpoint: str) -> str:
    """The endpoint's origin (scheme, host and a non-default port): the
    VAPID JWT's ``aud``."""
    parts = urlsplit(endpoint)
    default_port = {"https": 443, "http": 80}[parts.scheme]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != default_port:
        return f"{parts.scheme}://{host}:{parts.port}"
    return f"{parts.scheme}://{host}"


def payload(note: Notification, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The JSON the browser's service worker receives: ``node_id``,
    ``unread``, ``sender_id`` / ``session_id`` / ``text`` / ``data`` when
    given.  Kept within ``limit`` bytes: over it, ``data`` is left out first,
    then ``text`` is shortened."""
    document: dict[str, Any] = {"node_id": note.node_id, "unread": note.unread}
    if note.sender_id is not None:
        document["sender_id"] = note.sender_id
    if note.session_id is not None:
        document["session_id"] = note.session_id
    if note.text:
        document["text"] = note.text
    if note.data:
        document["data"] = note.data
    encoded = orjson.dumps(document)
    if len(encoded) <= limit:
        return encoded
    document.pop("data", None)
    encoded = orjson.dumps(document)
    if len(encoded) > limit and note.text:
        text_bytes = note.text.encode()
        room = len(text_bytes) - (len(encoded) - limit)
        while room > 0:
            document["text"] = text_bytes[:room].decode(errors="ignore") + "\u2026"
            encoded = orjson.dumps(document)
            if len(encoded) <= limit:
                break
            room -= len(encoded) - limit
        if room <= 0:
            document.pop("text")
            encoded = orjson.dumps(document)
    log.info("Web Push payload for {node_id} shortened to {size} bytes", node_id=note.node_id,
             size=len(encoded))
    return encoded


def encrypt(plaintext: bytes, p256dh: bytes, auth: bytes) -> bytes:
    """The RFC 8291 ``aes128gcm`` body of ``plaintext`` for a subscription's
    keys, with a new ephemeral key pair and salt."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    return http_ece.encrypt(plaintext, salt=os.urandom(16), private_key=ephemeral, dh=p256dh,
                            auth_secret=auth, version="aes128gcm")


def classify(answer: HttpAnswer, now: float) -> PushResult:
    """The :class:`PushResult` of a push service's answer."""
    status = answer.status
    if status in (200, 201, 202):
        return PushResult(Outcome.SENT, status)
    if status == 404:
        return PushResult(Outcome.DEAD_TOKEN, status, "not_found")
    if status == 410:
        return PushResult(Outcome.DEAD_TOKEN, status, "gone")
    if status == 429 or status >= 500:
        return PushResult(Outcome.RETRY, status, f"http_{status}",
                          retry_after_s(answer.header("retry-after"), now))
    if status == 413:
        return PushResult(Outcome.FAILED, status, "payload_too_large")
    return PushResult(Outcome.FAILED, status, f"http_{status}")


class WebPushProvider:
    """Sends Web Push messages (see the module docstring)."""

    name = "webpush"

    def __init__(self, reactor: Any, vapid: Vapid02, subject: str, ttl_s: int = DEFAULT_TTL_S,
                 urgency: str = DEFAULT_URGENCY, clock: IReactorTime | None = None,
                 allow_http_endpoints: bool = False) -> None:
        """``vapid`` holds the VAPID private key; ``clock`` (default: the
        reactor) tells the time for the JWT's ``exp``;
        ``allow_http_endpoints`` lets subscriptions name http:// endpoints
        (local stand-ins), refused otherwise."""
        self.vapid = vapid
        self.subject = subject
        self.ttl_s = ttl_s
        self.urgency = urgency
        self.allow_http_endpoints = allow_http_endpoints
        self._clock: IReactorTime = clock or reactor
        self._http = PushHttpClient(reactor)
        self._authorizations: dict[str, tuple[str, float]] = {}
        self.public_key = b64url(vapid.public_key.public_bytes(Encoding.X962,
                                                               PublicFormat.UncompressedPoint))
        """The application server key a browser subscribes with
        (``applicationServerKey``), base64url."""

    def authorization(self, endpoint: str) -> str:
        """The ``Authorization`` header for a request to ``endpoint``: one
        token per origin, signed again once it is :data:`VAPID_REUSE_S` old
        (signing costs about as much as encrypting)."""
        audience = origin_of(endpoint)
        now = self._clock.seconds()
        cached = self._authorizations.get(audience)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims = {"aud": audience, "sub": self.subject, "exp": int(now) + VAPID_LIFETIME_S}
        header = str(self.vapid.sign(claims)["Authorization"])
        if len(self._authorizations) >= MAX_CACHED_AUDIENCES:
            self._authorizations.clear()
        self._authorizations[audience] = (header, now + VAPID_REUSE_S)
        return header

    def send(self, target: PushTarget, note: Notification) -> Deferred[PushResult]:
        """Encrypt ``note`` for the target's subscription and POST it."""
        return Deferred.fromCoroutine(self._send(target, note))

    async def _send(self, target: PushTarget, note: Notification) -> PushResult:
        try:
            endpoint, p256dh, auth = parse_subscription(target.subscription, self.allow_http_endpoints)
        except BadSubscription as exc:
            log.warn("Web Push subscription of {node_id} unusable: {error}",
                     node_id=target.node_id, error=str(exc))
            return PushResult(Outcome.FAILED, 0, "bad_subscription")
        try:
            authorization = self.authorization(endpoint)
        except VapidException as exc:
            log.warn("Web Push VAPID token not signed for {endpoint}: {error}",
                     endpoint=origin_of(endpoint), error=str(exc), node_id=target.node_id)
            return PushResult(Outcome.FAILED, 0, "vapid")
        body = encrypt(payload(note), p256dh, auth)
        headers = {
            "Authorization": authorization,
            "TTL": str(self.ttl_s),
            "Urgency": self.urgency,
            "Topic": topic_for(note.collapse_key),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
        }
        try:
            answer = await self._http.post(endpoint, body, headers)
        except TransportError as exc:
            return PushResult(Outcome.RETRY, 0, exc.reason)
        result = classify(answer, self._clock.seconds())
        if answer.status in (400, 401, 403):
            log.warn("Web Push refused with {status}: {answer}", status=answer.status,
                     answer=answer.body[:200].decode(errors="replace"), node_id=target.node_id)
        return result

    def close(self) -> Deferred[None]:
        """Close the idle connections."""
        return self._http.close()


def load_vapid_key(raw: bytes, where: str = "[webpush] VAPID key") -> Vapid02:
    """The VAPID private key ``raw``: PEM (``openssl ecparam -name
    prime256v1 -genkey``, or py-vapid's ``vapid --gen``), or the raw 32-byte
    key (or its DER form) in base64url, as py-vapid reads it.
    :class:`PushConfigError` says, after ``where``, what is wrong."""
    raw = raw.strip()
    if raw.startswith(b"-----BEGIN"):
        try:
            key = load_pem_private_key(raw, password=None)
        except (ValueError, TypeError) as exc:
            raise PushConfigError(f"{where}: not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise PushConfigError(f"{where}: not a P-256 (prime256v1) EC key")
        return Vapid02(key)
    try:
        vapid = Vapid02.from_string(raw.decode("ascii"))
    except Exception as exc:  # py-vapid raises what the decoders raise
        raise PushConfigError(f"{where}: neither PEM nor a base64url P-256 private key") from exc
    if not isinstance(vapid.private_key.curve, ec.SECP256R1):
        raise PushConfigError(f"{where}: not a P-256 (prime256v1) EC key")
    return vapid


#: RFC 8292's ``sub``: a ``mailto:`` address or an ``https:`` URL (py-vapid's own
#: check refuses URLs with a path, so it is switched off and this one used).
_SUBJECT = re.compile(r"^(mailto:[^@\s]+@[^@\s]+|https://[^\s/?#]+([/?#]\S*)?)$")


def from_config(table: Mapping[str, Any], reactor: Any) -> WebPushProvider:
    """Build the provider from the ``[webpush]`` table: the VAPID private
    key from ``vapid_private_key_file`` or the environment variable
    ``vapid_private_key_env`` (one is required), ``subject`` (``mailto:`` or
    ``https:``, required), ``ttl_s`` (default 86400), ``urgency`` (default
    normal) and ``allow_http_endpoints`` (default false: only https
    subscription endpoints)."""
    check_keys(table, "webpush", CONFIG_KEYS)
    raw = read_secret(table, "webpush", "vapid_private_key")
    where = ("[webpush] vapid_private_key_file " + repr(table["vapid_private_key_file"])
             if "vapid_private_key_file" in table else
             "[webpush] vapid_private_key_env " + repr(table.get("vapid_private_key_env")))
    vapid = load_vapid_key(raw, where)
    subject = table.get("subject")
    if not isinstance(subject, str) or not _SUBJECT.match(subject):
        raise PushConfigError("[webpush] subject is required: a contact for the push services, "
                              f"mailto:someone@example.com or an https:// URL, not {subject!r}")
    ttl_s = table.get("ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 0 <= ttl_s <= MAX_TTL_S:
        raise PushConfigError(f"[webpush] ttl_s must be whole seconds from 0 to {MAX_TTL_S}, "
                              f"not {ttl_s!r}")
    urgency = table.get("urgency", DEFAULT_URGENCY)
    if urgency not in URGENCIES:
        raise PushConfigError(f"[webpush] urgency must be one of {', '.join(URGENCIES)}, "
                              f"not {urgency!r}")
    allow_http = table.get("allow_http_endpoints", False)
    if not isinstance(allow_http, bool):
        raise PushConfigError(f"[webpush] allow_http_endpoints must be true or false, not {allow_http!r}")
    vapid.conf = {"no-strict": True}
    return WebPushProvider(reactor, vapid, subject, ttl_s, urgency,
                           allow_http_endpoints=allow_http)
