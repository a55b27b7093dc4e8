"""The HTTP/1.1 client the HTTP push providers share (FCM, Web Push; the
webhook may use it too).

:class:`PushHttpClient` POSTs one request through treq over a pool of
persistent connections and answers an :class:`HttpAnswer` (status, headers,
a body read up to a bound).  Everything that is not an HTTP answer (refused,
reset, TLS, DNS, a body cut short or too large) fails with
:class:`TransportError`, whose ``reason`` a provider reports as a ``RETRY``.
The Deferred it returns is cancellable at every stage: cancelling it while
connecting or waiting for the answer aborts the request (treq/Agent), and
while the body is arriving it stops the transport, so the connection closes.

:func:`retry_after_s` reads a ``Retry-After`` header, in either of its forms
(delta-seconds or an HTTP-date).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from treq.client import HTTPClient
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse

#: Answer bodies longer than this are not read (providers answer a few hundred bytes).
MAX_ANSWER_BYTES = 64 * 1024

#: Idle persistent connections kept per host:port.
PERSISTENT_PER_HOST = 8


class TransportError(Exception):
    """The request got no complete HTTP answer; ``reason`` says why
    (``connect_refused``, ``connect_timeout``, ``dns``, ``tls``,
    ``connection_lost``, ``answer_too_large``, ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class HttpAnswer:
    """An HTTP answer: ``headers`` has lower-case names, the last value of
    each; ``body`` is at most :data:`MAX_ANSWER_BYTES`."""

    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        return self.headers.get(name.lower())


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value: a
    delta-seconds integer, or an HTTP-date (relative to ``now_s``, the Unix
    time); never negative.  None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - now_s)


def transport_reason(failure: Failure | BaseException) -> str:
    """A short name for why a request got no answer."""
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, TransportError):
        return exc.reason
    if isinstance(exc, netError.ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, netError.DNSLookupError):
        return "dns"
    if isinstance(exc, (netError.TimeoutError, netError.TCPTimedOutError)):
        return "connect_timeout"
    if isinstance(exc, netError.ConnectError):
        return "connect"
    if isinstance(exc, (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)):
        # ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed:
        # the connection broke; name TLS failures as such.
        for inner in exc.reasons:
            if type(inner.value).__module__.startswith("OpenSSL"):
                return "tls"
        return "connection_lost"
    if isinstance(exc, (netError.ConnectionLost, netError.ConnectionDone)):
        return "connection_lost"
    return "transport_" + type(exc).__name__


def _was_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is how twisted.web reports a request cancelled before
    its answer came (``ResponseNeverReceived`` wrapping ``CancelledError``)."""
    if isinstance(exc, (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)):
        return any(inner.check(CancelledError) for inner in exc.reasons)
    return False


class _BodyReader(Protocol):
    """Collects an answer body up to a bound into ``finished``."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(TransportError("answer_too_large", f"over {self.limit} bytes"))
            self.stop()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(TransportError("connection_lost", "answer cut short"))

    def stop(self) -> None:
        """Stop reading: the connection is closed, not reused."""
        if self.transport is not None:
            # an IPushProducer (twisted.web's TransportProxyProducer)
            self.transport.stopProducing()  # type: ignore[attr-defined]


def read_body(response: IResponse, limit: int = MAX_ANSWER_BYTES) -> Deferred[bytes]:
    """The body of ``response``, at most ``limit`` bytes (over it:
    :class:`TransportError` ``answer_too_large``).  Cancelling the Deferred
    stops the transport, which closes the connection."""
    reader: _BodyReader

    def cancel(_: Deferred[bytes]) -> None:
        reader.stop()

    finished: Deferred[bytes] = Deferred(cancel)
    reader = _BodyReader(finished, limit)
    response.deliverBody(reader)
    return finished


class PushHttpClient:
    """POSTs push requests over persistent HTTP/1.1 connections (one pool
    per provider)."""

    def __init__(self, reactor: Any, tls_policy: IPolicyForHTTPS | None = None,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = PERSISTENT_PER_HOST
        agent = Agent(reactor, contextFactory=tls_policy or BrowserLikePolicyForHTTPS(),
                      pool=self._pool)
        self._http = HTTPClient(agent)
        self._max_answer_bytes = max_answer_bytes

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Deferred[HttpAnswer]:
        """POST ``body`` to ``url``; fires with the :class:`HttpAnswer`, or
        fails with :class:`TransportError` (or ``CancelledError`` when
        cancelled)."""
        return Deferred.fromCoroutine(self._post(url, body, headers))

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        request_headers = Headers()
        for name, value in headers.items():
            request_headers.setRawHeaders(name, [value])
        try:
            response = await self._http.post(url, data=body, headers=request_headers, unbuffered=True)
        except CancelledError:
            raise
        except Exception as exc:
            if _was_cancelled(exc):
                raise CancelledError() from exc
            raise TransportError(transport_reason(exc), str(exc)) from exc
        answer_body = await read_body(response, self._max_answer_bytes)
        answer_headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders() if values
        }
        return HttpAnswer(int(response.code), answer_headers, answer_body)

    def close(self) -> Deferred[None]:
        """Close the idle persistent connections; fires when they are closed."""
        return self._pool.closeCachedConnections()
