"""Push registration: a device tells the server where its pushes go.

Three ops, the same over the socket (control frames) and over HTTP
(``POST /push/register``, ``/push/unregister``, ``/push/mute`` with the
node's ``auth_key``):

- ``register_push`` ``{"provider": "fcm" | "apns" | "webpush" | "webhook",
  "token": "..."}`` (Web Push: ``"subscription": {"endpoint": URL, "keys":
  {"p256dh": ..., "auth": ...}}`` instead of ``token``; APNs may add
  ``topic`` and ``environment``).  One target per node: the latest wins; the
  node's mute flag and any pending push are kept.  Answered ``push_registered``
  with ``active``: whether *this* server has that provider configured
  (registering never needs it: the servers of a cluster may differ).
- ``unregister_push`` (no fields): forget the node's target; answered
  ``push_unregistered`` with ``removed`` (whether there was one).
- ``mute_push`` ``{"muted": true | false}``: answered ``push_muted``.

The shapes of the fields are checked by the frame parser
(:data:`allspark.envelope.CONTROL_OPS`, ``bad_frame``); what depends on the
provider (which of ``token``/``subscription`` it needs, ``topic`` and
``environment`` on APNs only, the subscription's pieces) is checked here by
:func:`push_target`: ``unknown_provider`` for a provider that does not exist,
``bad_frame`` for the rest.  Nothing is stored for a refused registration.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.web import resource
from twisted.web.iweb import IRequest

from allspark.envelope import PRINTABLE_ASCII, Control, FrameError, control_from
from allspark.logs import logger
from allspark.router import Sender
from allspark.store import PushTarget, Store

if TYPE_CHECKING:
    from allspark.server import Server

log = logger(__name__)

#: The providers a node may register for.
PROVIDERS = ("fcm", "apns", "webpush", "webhook")
#: Longest Web Push endpoint URL.
MAX_ENDPOINT_LENGTH = 2048
#: What the RFC 8291 keys decode to: an uncompressed P-256 point and a 16-byte secret.
P256DH_BYTES = 65
AUTH_BYTES = 16

_HEX = re.compile(r"[0-9A-Fa-f]+")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_SUBSCRIPTION_FIELDS = frozenset({"endpoint", "keys", "expirationTime"})


# -- the target ---------------------------------------------------------------------
def _key(keys: dict[str, Any], name: str, size: int) -> str:
    """``keys[name]``, a base64url string decoding to ``size`` bytes."""
    value = keys.get(name)
    if type(value) is not str or len(value) > 4 * size or not _BASE64URL.fullmatch(value):
        raise FrameError("bad_frame", f"subscription.keys.{name} must be a base64url string")
    try:
        raw = base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise FrameError("bad_frame", f"subscription.keys.{name} must be a base64url string") from None
    if len(raw) != size:
        raise FrameError("bad_frame", f"subscription.keys.{name} must encode {size} bytes, not {len(raw)}")
    if name == "p256dh" and raw[0] != 4:
        raise FrameError("bad_frame", "subscription.keys.p256dh must be an uncompressed P-256 point (0x04 first)")
    return value


def _subscription(value: dict[str, Any]) -> dict[str, Any]:
    """The subscription kept for a Web Push target: ``endpoint`` and ``keys``
    (``p256dh``, ``auth``), checked; the browser's ``expirationTime`` (a
    number or null) is allowed and not kept; anything else is refused."""
    extra = sorted(set(value) - _SUBSCRIPTION_FIELDS)
    if extra:
        raise FrameError("bad_frame", f"subscription takes no field {extra[0][:64]!r}")
    expiration = value.get("expirationTime")
    if expiration is not None and type(expiration) not in (int, float):
        raise FrameError("bad_frame", "subscription.expirationTime must be a number or null")
    endpoint = value.get("endpoint")
    if type(endpoint) is not str or not endpoint:
        raise FrameError("bad_frame", "subscription needs endpoint, the push service's URL")
    if len(endpoint) > MAX_ENDPOINT_LENGTH or not PRINTABLE_ASCII.fullmatch(endpoint):
        raise FrameError("bad_frame", f"subscription.endpoint must be a URL of at most {MAX_ENDPOINT_LENGTH} "
                                      "characters without spaces")
    try:
        url = urlsplit(endpoint)
        host = url.hostname
    except ValueError:
        raise FrameError("bad_frame", "subscription.endpoint is not a URL") from None
    if url.scheme not in ("http", "https") or not host:
        raise FrameError("bad_frame", "subscription.endpoint must be an http:// or https:// URL with a host")
    keys = value.get("keys")
    if type(keys) is not dict:
        raise FrameError("bad_frame", "subscription needs keys, with p256dh and auth")
    extra = sorted(set(keys) - {"p256dh", "auth"})
    if extra:
        raise FrameError("bad_frame", f"subscription.keys takes no field {extra[0][:64]!r}")
    return {"endpoint": endpoint,
            "keys": {"p256dh": _key(keys, "p256dh", P256DH_BYTES), "auth": _key(keys, "auth", AUTH_BYTES)}}


def push_target(node_id: str, args: dict[str, Any], now_ms: int) -> PushTarget:
    """The :class:`PushTarget` ``register_push``'s ``args`` (their shapes
    already checked by the parser) describe for ``node_id``; raises
    :class:`FrameError`: ``unknown_provider``, or ``bad_frame`` naming what
    is missing or not allowed for that provider."""
    provider = args.get("provider")
    if provider not in PROVIDERS:
        raise FrameError("unknown_provider",
                         f"unknown push provider {str(provider)[:64]!r}: use one of {', '.join(PROVIDERS)}")
    if provider != "apns":
        for name in ("topic", "environment"):
            if name in args:
                raise FrameError("bad_frame", f"{name} is an APNs option: not for provider {provider!r}")
    if provider == "webpush":
        if "token" in args:
            raise FrameError("bad_frame", "a webpush registration gives subscription, not token")
        if "subscription" not in args:
            raise FrameError("bad_frame", "a webpush registration needs subscription (the browser's "
                                          "PushSubscription as JSON)")
        return PushTarget(node_id, provider, None, _subscription(args["subscription"]), None, None, now_ms)
    if "subscription" in args:
        raise FrameError("bad_frame", f"subscription is for webpush: provider {provider!r} takes token")
    token = args.get("token")
    if token is None:
        raise FrameError("bad_frame", f"a registration for {provider} needs token")
    if provider == "apns" and not _HEX.fullmatch(token):
        raise FrameError("bad_frame", "an apns token is the device token in hexadecimal")
    return PushTarget(node_id, provider, token, None, args.get("topic"), args.get("environment"), now_ms)


class PushRegistration:
    """The registration ops of one server: ``register_push``,
    ``unregister_push`` and ``mute_push`` (:data:`OPS`), for the socket and
    the HTTP endpoints alike.

    ``push_providers`` names the providers this server has configured (from
    ``--push-config``; empty: none): ``register_push`` answers ``active``
    from it.
    """

    #: the ops, as the frame parser and the HTTP paths know them
    OPS = ("register_push", "unregister_push", "mute_push")

    def __init__(self, store: Store, clock: IReactorTime,
                 push_providers: frozenset[str] = frozenset()) -> None:
        self.store = store
        self.clock = clock
        self.push_providers = push_providers

    async def control(self, sender: Sender, frame: Control) -> dict[str, Any]:
        """Answer one of :data:`OPS` for ``sender``'s node."""
        if frame.op == "register_push":
            return await self.register(sender, frame.args)
        if frame.op == "unregister_push":
            return await self.unregister(sender, frame.args)
        if frame.op == "mute_push":
            return await self.mute(sender, frame.args)
        raise FrameError("unknown_op", f"{frame.op!r} is not a push op")

    async def register(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """Store the node's target (the latest wins); ``push_registered``."""
        target = push_target(sender.node_id, args, int(self.clock.seconds() * 1000))
        await self.store.set_push_target(target)
        active = target.provider in self.push_providers
        log.info("push target registered for {node_id}: {provider}", node_id=sender.node_id,
                 provider=target.provider, active=active)
        return {"op": "push_registered", "registered": True, "provider": target.provider, "active": active}

    async def unregister(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """Forget the node's target; ``push_unregistered`` with ``removed``."""
        removed = await self.store.remove_push_target(sender.node_id)
        log.info("push target unregistered for {node_id}", node_id=sender.node_id, removed=removed)
        return {"op": "push_unregistered", "registered": False, "removed": removed}

    async def mute(self, sender: Sender, args: dict[str, Any]) -> dict[str, Any]:
        """Mute or unmute the node's pushes; ``push_muted`` with ``muted``."""
        muted = bool(args["muted"])
        await self.store.set_push_muted(sender.node_id, muted)
        log.info("push {state} for {node_id}", state="muted" if muted else "unmuted", node_id=sender.node_id)
        return {"op": "push_muted", "muted": muted}


# -- HTTP ---------------------------------------------------------------------------
#: HTTP path (under ``/push/``) -> op
HTTP_PATHS = {b"register": "register_push", b"unregister": "unregister_push", b"mute": "mute_push"}


def push_resources(server: "Server") -> dict[bytes, resource.Resource]:
    """``/push/register``, ``/push/unregister``, ``/push/mute``: POST with a
    JSON body holding the op's fields and ``auth_key`` (a query string or a
    form works too, for the fields that are strings).  The answer is the op's
    answer without ``op``; a bad key is 401 (as for the session endpoints), a
    revoked node 401 ``revoked``, a refused field 400 with the frame's code
    (``bad_frame``, ``unknown_provider``)."""
    from allspark.web import Directory, HTTPError, JSONEndpoint, authenticate

    def endpoint(op: str) -> JSONEndpoint:
        async def handler(request: IRequest, args: dict[str, Any]) -> dict[str, Any]:
            identity = authenticate(server, args)
            fields = {name: value for name, value in args.items() if name != "auth_key"}
            try:
                frame = control_from(op, fields)
            except FrameError as e:
                raise HTTPError(400, e.code, e.message) from None
            revocations = server.revocations
            revoked_until = await revocations.until(identity.node_id)
            if revoked_until and revocations.revoked_now(revoked_until):
                raise HTTPError(401, "revoked", f"this node is revoked until {revoked_until // 1000} (Unix time)")
            try:
                answer = await server.push_registration.control(Sender(identity.node_id, identity.client_id),
                                                                frame)
            except FrameError as e:
                raise HTTPError(400, e.code, e.message) from None
            answer.pop("op", None)
            return answer

        return JSONEndpoint(handler, (b"POST",))

    push = Directory()
    for path, op in HTTP_PATHS.items():
        push.putChild(path, endpoint(op))
    return {b"push": push}
