"""Firebase Cloud Messaging, HTTP v1 API.

A send is one ``POST {endpoint}/v1/projects/{project_id}/messages:send``
with an OAuth 2.0 access token of the service account as ``Bearer``.  The
token comes from Google's token endpoint in exchange for an RS256 JWT
assertion signed with the service account's private key
(:class:`AccessTokens`); it is cached until shortly before it expires,
fetched once for all the sends waiting for it, and dropped when FCM answers
401.

The message is a data message for the registration token (every ``data``
value a string: ``node_id``, ``unread``, and ``sender_id`` / ``session_id``
when given), with ``android.collapse_key`` and high priority, and a
``notification`` with the ``text`` as its body only when the
:class:`~allspark.push.provider.Notification` has one.

Classification: 200 sent; 404 ``UNREGISTERED``, or 400 ``INVALID_ARGUMENT``
about the registration token, a dead token; 401 a retry (with a new access
token); 429 and 5xx a retry (with ``Retry-After``); any other 4xx failed;
no answer at all a retry (the reason names the transport error).  The
access token's own failures: a refused assertion (``oauth_invalid_grant``
...) fails, an unreachable or overloaded token endpoint is a retry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlencode, urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as RequestTimeout, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from allspark.logs import logger
from allspark.push.config import check_keys, read_secret
from allspark.push.httpclient import HttpAnswer, PushHttpClient, TransportError, retry_after_s
from allspark.push.provider import Notification, Outcome, PushConfigError, PushResult
from allspark.store import PushTarget

log = logger(__name__)

DEFAULT_ENDPOINT = "https://fcm.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"

#: Lifetime of the JWT assertion (Google accepts at most one hour).
ASSERTION_LIFETIME_S = 3600
#: An access token is refreshed this long before it expires (at most half its lifetime).
REFRESH_MARGIN_S = 300.0
#: A token is never kept longer than this, whatever ``expires_in`` said.
MAX_TOKEN_LIFETIME_S = 86400.0
#: A token request that takes longer is abandoned (the sends waiting for it are retried).
TOKEN_REQUEST_TIMEOUT_S = 30.0

CONFIG_KEYS = frozenset({"project_id", "service_account_file", "service_account_env", "endpoint",
                         "token_uri"})
_PROJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class ServiceAccount:
    """The parts of a Google service-account JSON key that FCM needs."""

    client_email: str
    private_key: RSAPrivateKey
    private_key_id: str
    token_uri: str
    project_id: str | None = None

    @classmethod
    def from_file(cls, path: str) -> "ServiceAccount":
        """Read a service-account key file; :class:`PushConfigError` names
        what is wrong with it."""
        where = f"[fcm] service_account_file {path!r}"
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise PushConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from exc
        return cls.from_json(raw, where)

    @classmethod
    def from_json(cls, raw: bytes, where: str = "[fcm] service account key") -> "ServiceAccount":
        """Parse a service-account key (Google's JSON); :class:`PushConfigError`
        says, after ``where``, what is wrong with it."""
        try:
            info = json.loads(raw)
        except ValueError as exc:
            raise PushConfigError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(info, dict):
            raise PushConfigError(f"{where}: not a JSON object")
        fields: dict[str, str] = {}
        for name in ("client_email", "private_key", "private_key_id"):
            value = info.get(name)
            if not isinstance(value, str) or not value:
                raise PushConfigError(f"{where}: no {name!r} (is it a service-account key?)")
            fields[name] = value
        token_uri = info.get("token_uri", DEFAULT_TOKEN_URI)
        if not isinstance(token_uri, str):
            raise PushConfigError(f"{where}: 'token_uri' is not a string")
        try:
            key = load_pem_private_key(fields["private_key"].encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise PushConfigError(f"{where}: 'private_key' is not an unencrypted PEM key") from exc
        if not isinstance(key, RSAPrivateKey):
            raise PushConfigError(f"{where}: 'private_key' is not an RSA key")
        project_id = info.get("project_id")
        return cls(fields["client_email"], key, fields["private_key_id"], token_uri,
                   project_id if isinstance(project_id, str) and project_id else None)


class TokenError(Exception):
    """No access token: ``reason`` (``oauth_<error>`` or
    ``oauth_<transport reason>``), whether a later attempt may succeed."""

    def __init__(self, reason: str, retry: bool, status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.status = status
        self.retry_after = retry_after


class AccessTokens:
    """The service account's OAuth 2.0 access token for FCM.

    :meth:`get` answers the cached token while it is more than
    :data:`REFRESH_MARGIN_S` from expiry; otherwise one request to the token
    endpoint is made and every caller waits for it (each with its own
    Deferred: cancelling one waiter leaves the request and the other waiters
    alone).  :meth:`drop` forgets a token FCM refused.
    """

    def __init__(self, account: ServiceAccount, http: PushHttpClient, clock: IReactorTime,
                 token_uri: str | None = None) -> None:
        self.account = account
        self.token_uri = token_uri or account.token_uri
        self._http = http
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._refreshing: Deferred[tuple[str, float]] | None = None
        self._waiters: list[Deferred[str]] = []
        self.fetches = 0
        """Token requests made (for tests and logs)."""

    def get(self) -> Deferred[str]:
        """The access token; fails with :class:`TokenError`."""
        if self._token is not None and self._clock.seconds() < self._refresh_at:
            return succeed(self._token)

        def forget(waiter: Deferred[str]) -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

        waiter: Deferred[str] = Deferred(forget)
        self._waiters.append(waiter)
        if self._refreshing is None:
            self._start_refresh()
        return waiter

    def drop(self, token: str) -> None:
        """Forget ``token`` if it is the cached one (FCM said 401)."""
        if self._token == token:
            self._token = None
            self._refresh_at = 0.0

    def assertion(self, now: float) -> str:
        """The signed JWT assertion for the token request at ``now``."""
        issued = int(now)
        claims = {"iss": self.account.client_email, "scope": SCOPE, "aud": self.token_uri,
                  "iat": issued, "exp": issued + ASSERTION_LIFETIME_S}
        return jwt.encode(claims, self.account.private_key, algorithm="RS256",
                          headers={"kid": self.account.private_key_id})

    def _start_refresh(self) -> None:
        self.fetches += 1
        started = self._clock.seconds()
        refreshing = Deferred.fromCoroutine(self._fetch(started))
        refreshing.addTimeout(TOKEN_REQUEST_TIMEOUT_S, self._clock)
        self._refreshing = refreshing
        refreshing.addBoth(self._fetched, started)

    async def _fetch(self, now: float) -> tuple[str, float]:
        body = urlencode({"grant_type": GRANT_TYPE, "assertion": self.assertion(now)}).encode()
        try:
            answer = await self._http.post(
                self.token_uri, body, {"Content-Type": "application/x-www-form-urlencoded"})
        except TransportError as exc:
            raise TokenError("oauth_" + exc.reason, retry=True) from exc
        if answer.status == 200:
            try:
                info = json.loads(answer.body)
                token = info["access_token"]
                expires_in = float(info.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError) as exc:
                raise TokenError("oauth_bad_answer", retry=True, status=200) from exc
            if not isinstance(token, str) or not token or not 0 < expires_in < math.inf:
                raise TokenError("oauth_bad_answer", retry=True, status=200)
            return token, min(expires_in, MAX_TOKEN_LIFETIME_S)
        if answer.status == 429 or answer.status >= 500:
            raise TokenError(f"oauth_http_{answer.status}", retry=True, status=answer.status,
                             retry_after=retry_after_s(answer.header("retry-after"),
                                                       self._clock.seconds()))
        error = _json_field(answer.body, "error")
        reason = "oauth_" + (error if isinstance(error, str) and error else f"http_{answer.status}")
        raise TokenError(reason, retry=False, status=answer.status)

    def _fetched(self, result: tuple[str, float] | Failure, started: float) -> None:
        self._refreshing = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            if isinstance(result.value, TokenError):
                error = result.value
            elif result.check(CancelledError, RequestTimeout):
                error = TokenError("oauth_timeout", retry=True)
            else:
                log.failure("FCM access token request failed unexpectedly", result)
                error = TokenError("oauth_internal", retry=True)
            log.warn("FCM access token not obtained: {reason}", reason=error.reason,
                     token_uri=self.token_uri, status=error.status)
            for waiter in waiters:
                waiter.errback(error)
            return
        token, expires_in = result
        self._token = token
        self._refresh_at = started + expires_in - min(REFRESH_MARGIN_S, expires_in / 2)
        log.debug("FCM access token obtained, valid {expires_in} s", expires_in=expires_in)
        for waiter in waiters:
            waiter.callback(token)


def _json_field(body: bytes, name: str) -> Any:
    """``body``'s top-level ``name`` if it is a JSON object, else None."""
    try:
        info = json.loads(body)
    except ValueError:
        return None
    return info.get(name) if isinstance(info, dict) else None


def fcm_message(token: str, note: Notification) -> dict[str, Any]:
    """The ``message`` of a send request for ``note`` to ``token``."""
    data: dict[str, str] = {str(k): str(v) for k, v in (note.data or {}).items()}
    data["node_id"] = note.node_id
    data["unread"] = str(note.unread)
    if note.sender_id is not None:
        data["sender_id"] = note.sender_id
    if note.session_id is not None:
        data["session_id"] = note.session_id
    message: dict[str, Any] = {
        "token": token,
        "data": data,
        "android": {"collapse_key": note.collapse_key, "priority": "high"},
    }
    if note.text:
        message["notification"] = {"body": note.text}
    return message


def _names_token(error: Mapping[str, Any]) -> bool:
    """Whether an ``INVALID_ARGUMENT`` error is about the registration token
    (a ``BadRequest`` field violation on ``message.token``, or the message
    says so)."""
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        for violation in detail.get("fieldViolations") or []:
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                return True
    message = error.get("message")
    return isinstance(message, str) and "registration token" in message.lower()


def classify(answer: HttpAnswer, now: float) -> PushResult:
    """The :class:`PushResult` of FCM's answer to a send."""
    status = answer.status
    if 200 <= status < 300:
        return PushResult(Outcome.SENT, status)
    error = _json_field(answer.body, "error")
    if not isinstance(error, dict):
        error = {}
    error_status = error.get("status") if isinstance(error.get("status"), str) else ""
    error_code = ""
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and isinstance(detail.get("errorCode"), str):
            error_code = detail["errorCode"]
            break
    reason = error_code or error_status or f"http_{status}"
    if status == 404 and error_code == "UNREGISTERED":
        return PushResult(Outcome.DEAD_TOKEN, status, "UNREGISTERED")
    if status == 400 and "INVALID_ARGUMENT" in (error_code, error_status) and _names_token(error):
        return PushResult(Outcome.DEAD_TOKEN, status, "INVALID_ARGUMENT")
    if status == 401:
        return PushResult(Outcome.RETRY, status, reason)
    if status == 429 or status >= 500:
        return PushResult(Outcome.RETRY, status, reason,
                          retry_after_s(answer.header("retry-after"), now))
    return PushResult(Outcome.FAILED, status, reason)


class FcmProvider:
    """Sends pushes through FCM HTTP v1 (see the module docstring)."""

    name = "fcm"

    def __init__(self, reactor: Any, project_id: str, account: ServiceAccount,
                 endpoint: str = DEFAULT_ENDPOINT, token_uri: str | None = None,
                 clock: IReactorTime | None = None) -> None:
        """``reactor`` makes the connections; ``clock`` (default: the
        reactor) tells the time for the token cache and the assertion."""
        self.project_id = project_id
        self.send_url = f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self._clock: IReactorTime = clock or reactor
        self._http = PushHttpClient(reactor)
        self.tokens = AccessTokens(account, self._http, self._clock, token_uri)

    def send(self, target: PushTarget, note: Notification) -> Deferred[PushResult]:
        """Send ``note`` to the target's registration token."""
        return Deferred.fromCoroutine(self._send(target, note))

    async def _send(self, target: PushTarget, note: Notification) -> PushResult:
        if not target.token:
            return PushResult(Outcome.FAILED, 0, "no_token")
        try:
            access_token = await self.tokens.get()
        except TokenError as exc:
            return PushResult(Outcome.RETRY if exc.retry else Outcome.FAILED, exc.status,
                              exc.reason, exc.retry_after)
        body = orjson.dumps({"message": fcm_message(target.token, note)})
        headers = {"Authorization": f"Bearer {access_token}",
                   "Content-Type": "application/json; charset=UTF-8"}
        try:
            answer = await self._http.post(self.send_url, body, headers)
        except TransportError as exc:
            return PushResult(Outcome.RETRY, 0, exc.reason)
        if answer.status == 401:
            self.tokens.drop(access_token)
        return classify(answer, self._clock.seconds())

    def close(self) -> Deferred[None]:
        """Close the idle connections."""
        return self._http.close()


def _url(table: Mapping[str, Any], key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise PushConfigError(f"[fcm] {key} must be a string URL, not {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PushConfigError(f"[fcm] {key} must be an http:// or https:// URL, not {value!r}")
    return value


def from_config(table: Mapping[str, Any], reactor: Any) -> FcmProvider:
    """Build the provider from the ``[fcm]`` table: ``project_id`` (default:
    the key's), the service account's JSON key from ``service_account_file``
    or the environment variable ``service_account_env`` (one is required),
    ``endpoint`` (default https://fcm.googleapis.com) and ``token_uri``
    (default: the key's)."""
    check_keys(table, "fcm", CONFIG_KEYS)
    raw = read_secret(table, "fcm", "service_account")
    where = ("[fcm] service_account_file " + repr(table["service_account_file"])
             if "service_account_file" in table else
             "[fcm] service_account_env " + repr(table.get("service_account_env")))
    account = ServiceAccount.from_json(raw, where)
    project_id = table.get("project_id", account.project_id)
    if not isinstance(project_id, str) or not _PROJECT_ID.match(project_id):
        raise PushConfigError(f"[fcm] project_id is required: the Firebase project id "
                              f"(letters, digits, '-', '.', '_', ':'), not {project_id!r}")
    endpoint = _url(table, "endpoint", DEFAULT_ENDPOINT)
    token_uri = _url(table, "token_uri", account.token_uri)
    return FcmProvider(reactor, project_id, account, endpoint, token_uri)


__all__ = ["FcmProvider", "AccessTokens", "ServiceAccount", "TokenError", "classify",
           "fcm_message", "from_config"]
