"""The one small interface every push provider implements.

A provider turns a :class:`Notification` for a :class:`~allspark.store.PushTarget`
into one request to its service and classifies the answer as a
:class:`PushResult`.  It does not retry, back off, time out or queue: the
dispatcher (``allspark.push.dispatcher``) does that for every provider alike.
The Deferred a provider returns must be cancellable (cancelling aborts the
request), because the dispatcher cancels a request that outlives its timeout.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from allspark.store import PushTarget


class PushConfigError(ValueError):
    """A ``--push-config`` table is wrong (a missing key, an unreadable
    secret file, a bad value); the message names the table and key."""


@dataclass(frozen=True)
class Notification:
    """What one push says.

    ``unread``: the node's unacked messages (inbox plus session streams) when
    the push was decided.  ``collapse_key``: the same for every push to one
    device (providers that coalesce use it: ``apns-collapse-id``, FCM
    ``collapse_key``, Web Push ``Topic``).  ``sender_id`` / ``session_id``:
    what the app may show for the latest message (the sender's public id, or
    the session), None when not to be shown.  ``text``: the short visible
    ``push_text`` of the latest message that had one, else None (a silent
    wake-up).  ``data``: extra string fields the server configuration allows.
    """

    node_id: str
    unread: int
    collapse_key: str
    sender_id: str | None = None
    session_id: str | None = None
    text: str | None = None
    data: dict[str, str] | None = None


class Outcome(enum.Enum):
    """How a send ended, as far as the dispatcher cares."""

    SENT = "sent"
    """The provider accepted it."""
    RETRY = "retry"
    """A transient failure (5xx, 429, connection error): try again later."""
    DEAD_TOKEN = "dead_token"
    """The provider says the target no longer exists: remove it, do not retry."""
    FAILED = "failed"
    """A permanent failure for this notification (a 4xx that is not about the
    token): log it, do not retry."""


@dataclass(frozen=True)
class PushResult:
    """A classified provider answer.

    ``retry_after_s``: the provider's ``Retry-After`` in seconds, when it gave
    one.  ``status``: the HTTP status (0 when there was no answer).
    ``reason``: a short machine-readable cause for logs and metrics (the
    provider's error code such as ``UNREGISTERED`` or ``BadDeviceToken``, or
    ``timeout``, ``connect``...).
    """

    outcome: Outcome
    status: int = 0
    reason: str = ""
    retry_after_s: float | None = None


class Provider(Protocol):
    """One push service (FCM, APNs, Web Push, a webhook)."""

    name: str
    """The ``provider`` value of the targets this provider serves."""

    def send(self, target: PushTarget, note: Notification) -> Deferred[PushResult]:
        """Send one push; fires with its classified result.  Errors the
        provider can classify (HTTP statuses, connection refused) fire as a
        :class:`PushResult`, never as a failure; a failure means a bug."""

    def close(self) -> Deferred[None]:
        """Release connections (APNs keeps one open); called at shutdown."""


# Every provider module (fcm, apns, webpush, webhook) also has
#   def from_config(table: Mapping[str, Any], reactor: Any) -> Provider
# building the provider from its ``--push-config`` table (secrets read from the
# files or environment variables the table names), raising PushConfigError.
