"""The webhook provider: a signed JSON POST to the app's own backend, which
may then use any push service it likes.

Configuration (``[webhook]`` in ``--push-config``): ``url`` (http or
https), and the signing secret as ``secret_file`` (a file holding it) or
``secret_env`` (an environment variable naming it).

Each push is one ``POST url`` with ``Content-Type: application/json`` and
the body::

    {"node_id": ..., "token": ..., "unread": 3, "sender_id": ..., "session_id": ...,
     "text": ..., "data": {...}, "collapse_key": ..., "timestamp": 1733000000}

(``sender_id``, ``session_id``, ``text`` and ``data`` are null when there
is nothing to show; ``token`` is what the device registered).  It is
signed: ``X-Allspark-Timestamp`` is the Unix time in seconds and
``X-Allspark-Signature`` is ``v1=`` followed by the lower-case hex
HMAC-SHA256, keyed with the secret, of ``<timestamp>.<body>`` (the exact
bytes of the body).  A backend checks it with :func:`verify_signature`,
which also refuses a timestamp more than five minutes away from its clock,
so a captured request cannot be replayed later.

The answer: 2xx is sent; 429 and 5xx are retried (``Retry-After``
respected); 404 and 410 mean the target is gone (the registration is
removed); any other status is a permanent failure of this push.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Mapping
from urllib.parse import urlsplit

import orjson
from twisted.internet.defer import Deferred

from allspark.push.config import check_keys, read_secret
from allspark.push.httpclient import HttpAnswer, PushHttpClient, TransportError, retry_after_s
from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget

TIMESTAMP_HEADER = "X-Allspark-Timestamp"
SIGNATURE_HEADER = "X-Allspark-Signature"
#: The version prefix of a signature: a later scheme gets ``v2=``.
SIGNATURE_VERSION = "v1"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Allspark-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify_signature(secret: bytes, timestamp: str | int, body: bytes, signature: str,
                     now: float, tolerance_s: float = 300) -> bool:
    """Whether a webhook request is genuine and fresh: ``signature`` (the
    ``X-Allspark-Signature`` header) is the HMAC of ``timestamp`` (the
    ``X-Allspark-Timestamp`` header) and ``body`` (the raw request body)
    under ``secret``, and ``timestamp`` is within ``tolerance_s`` seconds of
    ``now`` (the receiver's Unix time).  A backend should also refuse a
    signature it has already accepted within the tolerance, if replays
    inside those five minutes matter to it."""
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(now - sent_at) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, sent_at, body).encode(), signature.strip().encode())


def classify(answer: HttpAnswer, now_s: float) -> PushResult:
    """The :class:`PushResult` of the backend's answer."""
    status = answer.status
    if 200 <= status < 300:
        return PushResult(Outcome.SENT, status)
    if status == 429 or status >= 500:
        return PushResult(Outcome.RETRY, status, "rate_limited" if status == 429 else "server_error",
                          retry_after_s(answer.header("retry-after"), now_s))
    if status in (404, 410):
        return PushResult(Outcome.DEAD_TOKEN, status, "gone")
    if status == 408:
        return PushResult(Outcome.RETRY, status, "request_timeout")
    return PushResult(Outcome.FAILED, status, f"http_{status}")


class WebhookProvider:
    """Sends each push as a signed POST to one URL."""

    name = "webhook"

    def __init__(self, url: str, secret: bytes, reactor: Any, http: PushHttpClient | None = None) -> None:
        self.url = url
        self.secret = secret
        self.reactor = reactor
        self.http = http if http is not None else PushHttpClient(reactor)

    def body(self, target: PushTarget, note: Notification, timestamp: int) -> bytes:
        """The JSON body of ``note`` for ``target``."""
        return orjson.dumps({
            "node_id": note.node_id,
            "token": target.token,
            "unread": note.unread,
            "sender_id": note.sender_id,
            "session_id": note.session_id,
            "text": note.text,
            "data": note.data,
            "collapse_key": note.collapse_key,
            "timestamp": timestamp,
        })

    def send(self, target: PushTarget, note: Notification) -> Deferred[PushResult]:
        """POST ``note``; fires with the classified answer (a request that got
        no answer is a ``RETRY`` naming why).  Cancelling aborts it."""
        timestamp = int(self.reactor.seconds())
        body = self.body(target, note, timestamp)
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        d = self.http.post(self.url, body, headers)

        def answered(answer: HttpAnswer) -> PushResult:
            return classify(answer, self.reactor.seconds())

        def no_answer(failure: Any) -> PushResult:
            failure.trap(TransportError)
            return PushResult(Outcome.RETRY, 0, failure.value.reason)

        return d.addCallbacks(answered, no_answer)

    def close(self) -> Deferred[None]:
        """Close the idle connections to the backend."""
        return self.http.close()


def from_config(table: Mapping[str, Any], reactor: Any) -> WebhookProvider:
    """The provider of a ``[webhook]`` table: ``url`` and ``secret_file`` or
    ``secret_env``."""
    check_keys(table, "webhook", ("url", "secret_file", "secret_env"))
    url = table.get("url")
    if not isinstance(url, str) or not url:
        raise PushConfigError("[webhook] url is required: the http(s) URL the pushes are POSTed to")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PushConfigError(f"[webhook] url {url!r} is not an http:// or https:// URL")
    secret = read_secret(table, "webhook", "secret")
    if len(secret) < 16:
        raise PushConfigError("[webhook] the secret is too short to be safe (16 bytes at least)")
    return WebhookProvider(url, secret, reactor)
