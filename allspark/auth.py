"""Authentication: auth keys (JWTs) and single-use validation tokens.

Two credentials exist, deliberately unlike each other (see docs/LESSONS: the original
server signed both with the same secret and accepted one as the other):

* **auth key** -- a JWT minted by the application's backend.  HS256 with one of the
  cluster's auth secrets by default, or RS256/ES256 with a private key whose public
  half the servers hold.  Claims: ``sub`` (node_id, required), ``client_id``
  (optional), ``exp`` (required), ``iat`` (optional).  :class:`AuthKeyVerifier`
  turns a key into an :class:`Identity` or raises :class:`AuthError`; it never
  returns a default identity.

* **validation token** -- handed out by the pre-connection request, bound to one
  node_id and one server, valid at most 60 seconds and redeemable once.  It is *not*
  a JWT (two dot-separated parts, not three) and is MACed with a key derived from the
  cluster secret under a distinct label (:func:`derive_token_key`), so it can never
  pass as an auth key and an auth key can never pass as a validation token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import math
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from allspark.ids import is_valid_id
from allspark.logs import logger

__all__ = [
    "AUTH_SECRET_ENV",
    "MAX_VALIDATION_TTL",
    "MIN_SECRET_BYTES",
    "AuthError",
    "AuthKeyVerifier",
    "Identity",
    "ValidationTokens",
    "derive_token_key",
    "load_secrets",
    "mint_auth_key",
]

#: Environment variable holding the auth secret(s), comma separated.
AUTH_SECRET_ENV = "ALLSPARK_AUTH_SECRET"

#: Shortest auth secret accepted by :func:`load_secrets`, in bytes.
MIN_SECRET_BYTES = 16

#: Longest lifetime of a validation token, in seconds (protocol: "at most 60 s").
MAX_VALIDATION_TTL = 60.0

#: Allowance for clock differences between the servers of a cluster when a token
#: issued by one server is redeemed by another (seconds).
VALIDATION_CLOCK_SKEW = 5.0

# Refuse absurdly long inputs before doing any parsing or crypto on them.
_MAX_AUTH_KEY_CHARS = 8192
_MAX_VALIDATION_TOKEN_CHARS = 1024

_HMAC_ALGORITHMS = ("HS256",)
_PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")
_MINT_ALGORITHMS = _HMAC_ALGORITHMS + _PUBLIC_KEY_ALGORITHMS

_TOKEN_KEY_LABEL = b"allspark validation token v1"

log = logger(__name__)


@dataclass(frozen=True)
class Identity:
    """Who an authenticated connection is: its node_id and, if any, its client_id."""

    node_id: str
    client_id: str | None


class AuthError(Exception):
    """A credential was refused.

    ``code`` is a short machine-readable reason, one of:
    ``missing_key``, ``malformed_key``, ``bad_signature``, ``expired_key``,
    ``bad_claims`` (auth keys) and ``missing_token``, ``bad_token``,
    ``expired_token``, ``replayed_token``, ``foreign_token`` (validation tokens).
    ``message`` is a human-readable explanation, safe to show to the client;
    ``str(error)`` is the message alone.
    """

    CODES = frozenset(
        {
            "missing_key",
            "malformed_key",
            "bad_signature",
            "expired_key",
            "bad_claims",
            "missing_token",
            "bad_token",
            "expired_token",
            "replayed_token",
            "foreign_token",
        }
    )

    def __init__(self, code: str, message: str) -> None:
        if code not in self.CODES:
            raise ValueError(f"unknown AuthError code: {code!r}")
        # a message may quote the key (a JWT header is parsed by the json
        # module, which lets lone surrogates through): keep it valid UTF-8,
        # or the JSON answer that carries it could not be encoded
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- auth keys


def _as_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    raise TypeError(f"{what} must be str or bytes")


def _is_number(value: object) -> bool:
    """True for a finite int/float that is not a bool (an int too large for a
    float, such as a 400-digit ``exp``, is not a number here either)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def mint_auth_key(
    secret: str | bytes,
    node_id: str,
    client_id: str | None = None,
    ttl: int = 3600,
    now: float | None = None,
    algorithm: str = "HS256",
    private_key: str | bytes | None = None,
) -> str:
    """Mint an auth key (JWT) for ``node_id``.

    Claims: ``sub`` = node_id, ``client_id`` (only when given), ``iat`` = now and
    ``exp`` = now + ttl (whole Unix seconds).  ``now`` defaults to the wall clock.

    With ``algorithm="HS256"`` (default) the key is signed with ``secret``.  With
    ``"RS256"`` or ``"ES256"`` it is signed with ``private_key`` (PEM; an RSA key for
    RS256, a P-256 EC key for ES256) and ``secret`` is ignored.

    Raises ``ValueError`` for an invalid node_id/client_id, ttl <= 0, an unknown
    algorithm, an empty secret, or a missing/mismatched private key.
    """
    if not is_valid_id(node_id):
        raise ValueError(f"invalid node_id: {node_id!r}")
    if client_id is not None and not is_valid_id(client_id):
        raise ValueError(f"invalid client_id: {client_id!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError(f"ttl must be a positive integer number of seconds, got {ttl!r}")
    if algorithm not in _MINT_ALGORITHMS:
        raise ValueError(f"unsupported algorithm {algorithm!r}; use one of {_MINT_ALGORITHMS}")

    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": node_id, "iat": issued, "exp": issued + ttl}
    if client_id is not None:
        claims["client_id"] = client_id

    signing_key: Any
    if algorithm in _HMAC_ALGORITHMS:
        signing_key = _as_bytes(secret, "secret")
        if not signing_key:
            raise ValueError("empty auth secret")
    else:
        if private_key is None:
            raise ValueError(f"{algorithm} needs a PEM private key")
        signing_key = _load_private_key(_as_bytes(private_key, "private_key"), algorithm)
    return jwt.encode(claims, signing_key, algorithm=algorithm)


def _load_private_key(pem: bytes, algorithm: str) -> Any:
    """Load a PEM private key and check that it fits ``algorithm``."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot load PEM private key: {exc}") from None
    if algorithm == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise ValueError(f"private key type does not match algorithm {algorithm}")


def _load_public_key(pem: bytes) -> tuple[str, Any]:
    """Load a PEM public key; return ``(algorithm, key)`` chosen from its type.

    RSA keys verify RS256, P-256 EC keys verify ES256; anything else is refused.
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot load PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ValueError("public key must be RSA (RS256) or EC P-256 (ES256)")


class AuthKeyVerifier:
    """Verify auth keys and return the :class:`Identity` they prove.

    ``secrets`` are HS256 secrets; all are tried in turn, so several may be active
    during a rotation.  ``public_keys`` are PEM public keys; each verifies only the
    algorithm that matches its type (RSA -> RS256, EC P-256 -> ES256).  The
    algorithm named in a key's header only selects which of *our* keys to try:
    ``none``, any other algorithm, and HS256 checked against a public key are never
    possible (no algorithm confusion).  ``leeway`` is the clock skew in seconds
    allowed on ``exp`` and ``nbf``.
    """

    def __init__(
        self,
        secrets: Sequence[bytes],
        public_keys: Sequence[bytes] = (),
        leeway: int = 0,
    ) -> None:
        if isinstance(secrets, (bytes, str)):
            raise TypeError("secrets must be a sequence of bytes, not a single value")
        self._secrets: tuple[bytes, ...] = tuple(secrets)
        for secret in self._secrets:
            if not isinstance(secret, bytes) or not secret:
                raise ValueError("each secret must be non-empty bytes")
        self._public_keys: tuple[tuple[str, Any], ...] = tuple(
            _load_public_key(_as_bytes(pem, "public key")) for pem in public_keys
        )
        if not self._secrets and not self._public_keys:
            raise ValueError("AuthKeyVerifier needs at least one secret or public key")
        if isinstance(leeway, bool) or not _is_number(leeway) or leeway < 0:
            raise ValueError("leeway must be a non-negative number of seconds")
        self._leeway = leeway

    def _candidate_keys(self, algorithm: str) -> list[Any]:
        if algorithm in _HMAC_ALGORITHMS:
            return list(self._secrets)
        return [key for alg, key in self._public_keys if alg == algorithm]

    def verify(self, token: object, now: float | None = None) -> Identity:
        """Return the Identity proven by ``token`` or raise :class:`AuthError`.

        Refusals: ``missing_key`` (None or empty), ``malformed_key`` (not a str, not a
        JWT, undecodable, a header that is not a JSON object, a ``kid`` that is not a
        string, or any ``crit`` header: no critical extension is understood here, so
        RFC 7515 says to refuse it), ``bad_signature`` (forged, signed by an unknown
        key, or an algorithm we do not accept for it, including ``none`` and an
        ``alg`` that is not a string), ``expired_key`` (``now >= exp + leeway``),
        ``bad_claims`` (no ``exp``, time claims that are not finite numbers (strings,
        booleans, NaN, infinity, integers too large for a float), not yet valid by
        ``nbf``, missing/invalid ``sub`` or invalid ``client_id``).  ``now`` defaults
        to the wall clock.  A ``client_id`` of JSON null is treated as absent.

        Every refusal is an :class:`AuthError`, whatever the input: anything else
        raised while looking at an unverified key (a parser error nobody foresaw) is
        logged without a traceback and refused as ``malformed_key``, so hostile input
        never becomes a 500.
        """
        try:
            return self._verify(token, now)
        except AuthError:
            raise
        except Exception as exc:
            log.warn("auth key refused, unexpected {error_type} while parsing it: {error}",
                     error_type=type(exc).__name__, error=str(exc)[:200])
            raise AuthError("malformed_key", "auth key cannot be decoded") from None

    def _verify(self, token: object, now: float | None) -> Identity:
        if token is None or token == "":
            raise AuthError("missing_key", "no auth key given")
        if not isinstance(token, str):
            raise AuthError("malformed_key", "auth key must be a string")
        if len(token) > _MAX_AUTH_KEY_CHARS or not token.isascii():
            raise AuthError("malformed_key", "auth key is not a JWT")
        if token.count(".") != 2:
            raise AuthError("malformed_key", "auth key is not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.InvalidTokenError as exc:  # DecodeError, a bad kid or crit, ...
            raise AuthError("malformed_key", f"auth key header refused: {exc}") from None
        if not isinstance(header, dict):
            raise AuthError("malformed_key", "auth key header is not a JSON object")
        if "crit" in header:
            raise AuthError("malformed_key", "auth key header has a critical extension (crit) we do not support")
        if "kid" in header and not isinstance(header["kid"], str):
            raise AuthError("malformed_key", "auth key header kid must be a string")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in _MINT_ALGORITHMS:
            raise AuthError("bad_signature", f"algorithm {algorithm!r} is not accepted")

        claims = self._decode(token, algorithm)
        return self._identity(claims, time.time() if now is None else now)

    def _decode(self, token: str, algorithm: str) -> dict[str, Any]:
        """Check the signature against each candidate key; return the claims."""
        options: Any = {
            "verify_signature": True,
            # Time and subject claims are checked by _identity against the caller's `now`.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": False,
            "verify_iss": False,
            "verify_sub": False,
            "verify_jti": False,
        }
        for key in self._candidate_keys(algorithm):
            try:
                claims = jwt.decode(token, key, algorithms=[algorithm], options=options)
            except jwt.exceptions.InvalidSignatureError:
                continue
            except jwt.exceptions.InvalidKeyError:
                continue
            except jwt.exceptions.DecodeError:
                raise AuthError("malformed_key", "auth key cannot be decoded") from None
            except jwt.exceptions.InvalidTokenError as exc:
                raise AuthError("bad_claims", f"auth key refused: {exc}") from None
            if not isinstance(claims, dict):
                raise AuthError("malformed_key", "auth key claims are not an object")
            return claims
        raise AuthError("bad_signature", "auth key signature is not valid")

    def _identity(self, claims: dict[str, Any], now: float) -> Identity:
        if "exp" not in claims:
            raise AuthError("bad_claims", "auth key has no exp claim")
        exp = claims["exp"]
        if not _is_number(exp):
            raise AuthError("bad_claims", "exp claim must be a number")
        for name in ("iat", "nbf"):
            if name in claims and not _is_number(claims[name]):
                raise AuthError("bad_claims", f"{name} claim must be a number")
        if now >= exp + self._leeway:
            raise AuthError("expired_key", "auth key has expired")
        if "nbf" in claims and now < claims["nbf"] - self._leeway:
            raise AuthError("bad_claims", "auth key is not valid yet")
        node_id = claims.get("sub")
        if not is_valid_id(node_id):
            raise AuthError("bad_claims", "sub claim must be a valid node id")
        client_id = claims.get("client_id")
        if client_id is not None and not is_valid_id(client_id):
            raise AuthError("bad_claims", "client_id claim must be a valid client id")
        assert isinstance(node_id, str)
        return Identity(node_id=node_id, client_id=client_id)


# ----------------------------------------------------------------------------- secrets


def _check_secret(secret: bytes, origin: str) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"an auth secret from {origin} is {len(secret)} bytes, too short to be safe "
            f"(at least {MIN_SECRET_BYTES} bytes; 32 random bytes recommended)"
        )
    return secret


def load_secrets(env: Mapping[str, str], secret_file: str | None) -> list[bytes]:
    """Return the active auth secrets, the one to mint with first.

    If ``secret_file`` is given (``--auth-secret-file``), secrets come only from it:
    one per non-empty line, surrounding whitespace stripped; the environment is then
    ignored.  Otherwise they come from ``env[ALLSPARK_AUTH_SECRET]``, several
    separated by commas.  Duplicates are dropped, order kept.

    Raises ``ValueError`` with a clear message if the file cannot be read, if no
    secret is found, or if any secret is shorter than 16 bytes.
    """
    found: list[bytes]
    if secret_file is not None:
        origin = f"file {secret_file}"
        try:
            with open(secret_file, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ValueError(f"cannot read auth secret file {secret_file}: {exc.strerror}") from None
        found = [line.strip() for line in data.splitlines()]
    else:
        origin = f"${AUTH_SECRET_ENV}"
        raw = env.get(AUTH_SECRET_ENV, "")
        found = [part.strip().encode("utf-8") for part in raw.split(",")]
    result: list[bytes] = []
    for secret in found:
        if secret and secret not in result:
            result.append(_check_secret(secret, origin))
    if not result:
        if secret_file is not None:
            raise ValueError(f"auth secret file {secret_file} contains no secret")
        raise ValueError(
            f"no auth secret: set {AUTH_SECRET_ENV} or pass --auth-secret-file "
            "(the secret itself is never taken from the command line)"
        )
    return result


# ------------------------------------------------------------------- validation tokens


def derive_token_key(secret: bytes) -> bytes:
    """Derive the validation-token MAC key from a cluster/auth secret.

    ``HMAC-SHA256(secret, b"allspark validation token v1")``: a key distinct from the
    secret itself, so nothing signed for validation tokens is valid as an auth key.
    """
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("secret must be non-empty bytes")
    return hmac.new(secret, _TOKEN_KEY_LABEL, hashlib.sha256).digest()


class _Clock(Protocol):
    def seconds(self) -> float: ...


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict url-safe base64 without padding; raises ValueError on bad input."""
    if not text or len(text) % 4 == 1:
        raise ValueError("bad base64")
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise ValueError("bad base64") from exc


class ValidationTokens:
    """Issue and redeem single-use validation tokens for one server.

    ``key`` is the cluster-wide token key (see :func:`derive_token_key`); every server
    holding it can issue a token naming any server, but only the server whose id is
    ``server_id`` can redeem it.  ``clock`` provides ``seconds()`` (the reactor, or
    ``twisted.internet.task.Clock`` in tests).  ``ttl`` is clamped to at most 60 s.

    Token format (not a JWT): ``base64url(JSON {"n": node_id, "s": server_id,
    "e": expiry, "i": issued_at, "p": issuing instance, "j": nonce}) "."
    base64url(HMAC-SHA256(key, first part))``.  Redeemed nonces are remembered until
    their token expires, then pruned, so memory is bounded by the tokens redeemed
    within the last ttl.

    **Restarts.**  The redeemed nonces live in memory only, so a process refuses every
    token that an earlier process of this server could have redeemed: a token is
    accepted only when this very process issued it (``"p"`` is this object's random
    instance id, drawn at start), or when it was issued at least
    :data:`VALIDATION_CLOCK_SKEW` seconds after this process started
    (``i >= started_at + VALIDATION_CLOCK_SKEW``).  Another server of the cluster may
    mint tokens for this one with its own clock; as long as the clocks agree within
    the skew (the expiry check assumes it too), such a token was issued after this
    process started, so no earlier process saw it.  Anything else, including a token
    from before a restart or a crash, is ``expired_token``: the client asks for a new
    one, as for any token refusal.  This was chosen over writing every redeemed nonce
    to disk before accepting it: no I/O (no fsync per handshake, none in a reconnect
    storm), nothing to prune or to lose, and nothing a cluster must share.  Its cost:
    for the first 5 s after a start, tokens minted by other servers for this one are
    refused once (the client asks again), and a host clock stepped back by more than
    the skew across a restart would reopen the window.  Tokens without ``"i"`` (from
    an older version) count as issued ``MAX_VALIDATION_TTL`` before their expiry.
    """

    def __init__(self, key: bytes, server_id: str, clock: _Clock, ttl: float = 60.0) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"token key must be at least {MIN_SECRET_BYTES} bytes")
        if not is_valid_id(server_id):
            raise ValueError(f"invalid server_id: {server_id!r}")
        if not _is_number(ttl) or ttl <= 0:
            raise ValueError("ttl must be a positive number of seconds")
        self._key = key
        self.server_id = server_id
        self._clock = clock
        self.ttl: float = min(float(ttl), MAX_VALIDATION_TTL)
        self._redeemed: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []
        #: When this process (this object) started; see "Restarts" above.
        self.started_at: float = clock.seconds()
        self._instance = _b64encode(_secrets.token_bytes(9))

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, node_id: str, server_id: str) -> tuple[str, int]:
        """Issue a token for ``node_id`` to connect to server ``server_id``.

        Returns ``(token, expires_in)`` where ``expires_in`` is the whole number of
        seconds the token stays valid (the ttl rounded down).
        """
        if not is_valid_id(node_id):
            raise ValueError(f"invalid node_id: {node_id!r}")
        if not is_valid_id(server_id):
            raise ValueError(f"invalid server_id: {server_id!r}")
        now = self._clock.seconds()
        claims = {
            "n": node_id,
            "s": server_id,
            "e": now + self.ttl,
            "i": now,
            "p": self._instance,
            "j": _b64encode(_secrets.token_bytes(16)),
        }
        payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        token = payload + "." + _b64encode(self._mac(payload.encode("ascii")))
        return token, int(math.floor(self.ttl))

    def redeem(self, token: object, node_id: str) -> None:
        """Accept ``token`` once for ``node_id`` on this server, or raise AuthError.

        Refusals: ``missing_token`` (None or empty), ``bad_token`` (wrong type,
        malformed, forged, or an expiry further ahead than any ttl allows),
        ``foreign_token`` (issued for another node_id or another server),
        ``expired_token`` (now >= expiry, or issued before this process started: see
        "Restarts" in the class docstring), ``replayed_token`` (already redeemed).
        """
        if token is None or token == "":
            raise AuthError("missing_token", "no validation token given")
        if not isinstance(token, str):
            raise AuthError("bad_token", "validation token must be a string")
        if len(token) > _MAX_VALIDATION_TOKEN_CHARS or not token.isascii():
            raise AuthError("bad_token", "validation token is malformed")
        parts = token.split(".")
        if len(parts) != 2:
            raise AuthError("bad_token", "validation token is malformed")
        payload_text, signature_text = parts
        try:
            signature = _b64decode(signature_text)
            payload = _b64decode(payload_text)
        except ValueError:
            raise AuthError("bad_token", "validation token is malformed") from None
        if not hmac.compare_digest(signature, self._mac(payload_text.encode("ascii"))):
            raise AuthError("bad_token", "validation token signature is not valid")
        try:
            claims = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise AuthError("bad_token", "validation token is malformed") from None
        if not isinstance(claims, dict):
            raise AuthError("bad_token", "validation token is malformed")
        token_node, token_server = claims.get("n"), claims.get("s")
        expiry, nonce = claims.get("e"), claims.get("j")
        issued_at, instance = claims.get("i"), claims.get("p")
        if (
            not isinstance(token_node, str)
            or not isinstance(token_server, str)
            or not isinstance(nonce, str)
            or not nonce
            or not _is_number(expiry)
            or (issued_at is not None and not _is_number(issued_at))
            or (instance is not None and not isinstance(instance, str))
        ):
            raise AuthError("bad_token", "validation token is malformed")
        assert isinstance(expiry, (int, float))
        if issued_at is None:
            issued_at = expiry - MAX_VALIDATION_TTL
        assert isinstance(issued_at, (int, float))

        now = self._clock.seconds()
        self.prune(now)
        if token_server != self.server_id:
            raise AuthError("foreign_token", "validation token was issued for another server")
        if token_node != node_id:
            raise AuthError("foreign_token", "validation token was issued for another node")
        if now >= expiry:
            raise AuthError("expired_token", "validation token has expired")
        if expiry > now + MAX_VALIDATION_TTL + VALIDATION_CLOCK_SKEW:
            raise AuthError("bad_token", "validation token expiry is too far in the future")
        if issued_at > now + VALIDATION_CLOCK_SKEW:
            raise AuthError("bad_token", "validation token was issued in the future")
        if instance != self._instance and issued_at < self.started_at + VALIDATION_CLOCK_SKEW:
            raise AuthError(
                "expired_token", "validation token was issued before this server started: ask for a new one"
            )
        if nonce in self._redeemed:
            raise AuthError("replayed_token", "validation token was already used")
        self._redeemed[nonce] = expiry
        heapq.heappush(self._expiries, (expiry, nonce))

    def prune(self, now: float | None = None) -> None:
        """Forget redeemed nonces whose tokens have expired (they are refused anyway)."""
        if now is None:
            now = self._clock.seconds()
        while self._expiries and self._expiries[0][0] <= now:
            _, nonce = heapq.heappop(self._expiries)
            self._redeemed.pop(nonce, None)

    @property
    def remembered(self) -> int:
        """How many redeemed nonces are currently remembered."""
        return len(self._redeemed)
