"""Tests for allspark.auth: auth keys, secrets and validation tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.task import Clock

from allspark.auth import (
    AuthError,
    AuthKeyVerifier,
    Identity,
    VALIDATION_CLOCK_SKEW,
    ValidationTokens,
    derive_token_key,
    load_secrets,
    mint_auth_key,
)

SECRET = b"s" * 32
OLD_SECRET = b"o" * 32
OTHER_SECRET = b"x" * 32
NOW = 1_700_000_000.0


def refused(code: str, func: Any, *args: Any, **kwargs: Any) -> AuthError:
    """Call func, assert it raises AuthError with ``code``, return the error."""
    with pytest.raises(AuthError) as info:
        func(*args, **kwargs)
    assert info.value.code == code, (info.value.code, info.value.message)
    assert info.value.message
    return info.value


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_pems() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return pem_pair(key)


def ec_pems(curve: ec.EllipticCurve | None = None) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    return pem_pair(key)


def pem_pair(key: Any) -> tuple[bytes, bytes]:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, bytes]:
    return rsa_pems()


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, bytes]:
    return ec_pems()


# ------------------------------------------------------------------------ auth keys


def test_round_trip_without_client_id() -> None:
    key = mint_auth_key(SECRET, "node-1", now=NOW)
    assert AuthKeyVerifier([SECRET]).verify(key, now=NOW) == Identity("node-1", None)
    claims = jwt.decode(key, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "node-1", "iat": int(NOW), "exp": int(NOW) + 3600}


def test_round_trip_with_client_id() -> None:
    key = mint_auth_key(SECRET, "phone.1", client_id="alice@example.com", ttl=60, now=NOW)
    identity = AuthKeyVerifier([SECRET]).verify(key, now=NOW + 59)
    assert identity == Identity(node_id="phone.1", client_id="alice@example.com")


def test_str_secret_is_utf8_bytes() -> None:
    key = mint_auth_key(SECRET.decode(), "n", now=NOW)
    assert AuthKeyVerifier([SECRET]).verify(key, now=NOW).node_id == "n"


def test_default_now_is_wall_clock() -> None:
    key = mint_auth_key(SECRET, "n", ttl=60)
    assert AuthKeyVerifier([SECRET]).verify(key).node_id == "n"


def test_identity_is_frozen() -> None:
    identity = Identity("n", None)
    with pytest.raises(AttributeError):
        identity.node_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"node_id": ""},
        {"node_id": "bad id"},
        {"node_id": None},
        {"node_id": "n", "client_id": ""},
        {"node_id": "n", "client_id": "bad/id"},
        {"node_id": "n", "ttl": 0},
        {"node_id": "n", "ttl": -5},
        {"node_id": "n", "ttl": True},
        {"node_id": "n", "algorithm": "none"},
        {"node_id": "n", "algorithm": "HS512"},
        {"node_id": "n", "algorithm": "RS256"},
    ],
)
def test_mint_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        mint_auth_key(SECRET, **kwargs)


def test_mint_refuses_empty_secret() -> None:
    with pytest.raises(ValueError):
        mint_auth_key(b"", "n")


def test_rotation() -> None:
    old_key = mint_auth_key(OLD_SECRET, "n1", now=NOW)
    new_key = mint_auth_key(SECRET, "n2", now=NOW)
    both = AuthKeyVerifier([SECRET, OLD_SECRET])
    assert both.verify(old_key, now=NOW).node_id == "n1"
    assert both.verify(new_key, now=NOW).node_id == "n2"
    after = AuthKeyVerifier([SECRET])
    assert after.verify(new_key, now=NOW).node_id == "n2"
    refused("bad_signature", after.verify, old_key, now=NOW)


@pytest.mark.parametrize("token", [None, ""])
def test_missing_key(token: object) -> None:
    refused("missing_key", AuthKeyVerifier([SECRET]).verify, token, now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        b"bytes.are.not",
        123,
        ["a.b.c"],
        {"sub": "n"},
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        "x" * 10000,
        "ünï.cödé.jwt",
        "None",
    ],
)
def test_malformed_key(token: object) -> None:
    refused("malformed_key", AuthKeyVerifier([SECRET]).verify, token, now=NOW)


def test_malformed_payload_with_valid_signature() -> None:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(b"not json")
    signing_input = f"{header}.{payload}".encode()
    signature = b64(hmac.new(SECRET, signing_input, hashlib.sha256).digest())
    token = f"{header}.{payload}.{signature}"
    refused("malformed_key", AuthKeyVerifier([SECRET]).verify, token, now=NOW)


def test_forged_signature() -> None:
    forged = mint_auth_key(OTHER_SECRET, "admin", now=NOW)
    refused("bad_signature", AuthKeyVerifier([SECRET]).verify, forged, now=NOW)


def test_tampered_payload() -> None:
    key = mint_auth_key(SECRET, "alice", now=NOW)
    header, _, signature = key.split(".")
    payload = b64(json.dumps({"sub": "admin", "exp": int(NOW) + 60}).encode())
    refused("bad_signature", AuthKeyVerifier([SECRET]).verify, f"{header}.{payload}.{signature}")


def test_expired_key() -> None:
    key = mint_auth_key(SECRET, "n", ttl=60, now=NOW)
    verifier = AuthKeyVerifier([SECRET])
    assert verifier.verify(key, now=NOW + 59.9).node_id == "n"
    refused("expired_key", verifier.verify, key, now=NOW + 60)
    refused("expired_key", verifier.verify, key, now=NOW + 10**6)


def test_leeway() -> None:
    key = mint_auth_key(SECRET, "n", ttl=60, now=NOW)
    verifier = AuthKeyVerifier([SECRET], leeway=10)
    assert verifier.verify(key, now=NOW + 69).node_id == "n"
    refused("expired_key", verifier.verify, key, now=NOW + 70)


def hs256(claims: dict[str, Any], secret: bytes = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "n"},  # no exp: keys must expire
        {"sub": "n", "exp": "later"},
        {"sub": "n", "exp": None},
        {"sub": "n", "exp": True},
        {"sub": "n", "exp": NOW + 60, "iat": "now"},
        {"sub": "n", "exp": NOW + 60, "nbf": NOW + 30},
        {"exp": NOW + 60},  # no sub
        {"sub": "", "exp": NOW + 60},
        {"sub": None, "exp": NOW + 60},
        {"sub": 42, "exp": NOW + 60},
        {"sub": "has space", "exp": NOW + 60},
        {"sub": "x" * 129, "exp": NOW + 60},
        {"sub": "n", "client_id": "", "exp": NOW + 60},
        {"sub": "n", "client_id": 7, "exp": NOW + 60},
        {"sub": "n", "client_id": "bad/id", "exp": NOW + 60},
    ],
)
def test_bad_claims(claims: dict[str, Any]) -> None:
    refused("bad_claims", AuthKeyVerifier([SECRET]).verify, hs256(claims), now=NOW)


def test_client_id_null_is_absent() -> None:
    token = hs256({"sub": "n", "client_id": None, "exp": NOW + 60})
    assert AuthKeyVerifier([SECRET]).verify(token, now=NOW) == Identity("n", None)


def test_nbf_in_past_is_fine() -> None:
    token = hs256({"sub": "n", "nbf": NOW - 1, "exp": NOW + 60})
    assert AuthKeyVerifier([SECRET]).verify(token, now=NOW).node_id == "n"


def test_alg_none_refused() -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "admin", "exp": NOW + 60}).encode())
    verifier = AuthKeyVerifier([SECRET])
    refused("bad_signature", verifier.verify, f"{header}.{payload}.", now=NOW)
    refused("bad_signature", verifier.verify, f"{header}.{payload}.{b64(b'sig')}", now=NOW)
    none_token = jwt.encode({"sub": "admin", "exp": NOW + 60}, None, algorithm="none")
    refused("bad_signature", verifier.verify, none_token, now=NOW)


@pytest.mark.parametrize("alg", ["HS384", "HS512", "None", "NONE", "PS256", ""])
def test_other_algorithms_refused(alg: str) -> None:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "admin", "exp": NOW + 60}).encode())
    refused("bad_signature", AuthKeyVerifier([SECRET]).verify, f"{header}.{payload}.c2ln", now=NOW)


def test_missing_alg_refused() -> None:
    header = b64(json.dumps({"typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "admin", "exp": NOW + 60}).encode())
    refused("bad_signature", AuthKeyVerifier([SECRET]).verify, f"{header}.{payload}.c2ln", now=NOW)


def signed_raw(header: bytes, claims: bytes, secret: bytes = SECRET) -> str:
    """A token whose header and claims are these raw bytes, correctly signed
    with ``secret``: only the parsing of what is inside can refuse it."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


GOOD_CLAIMS = json.dumps({"sub": "n", "exp": NOW + 60}).encode()


@pytest.mark.parametrize(
    ("header", "claims", "code"),
    [
        # headers PyJWT itself rejects with exceptions that used to escape as a 500
        (b'{"alg":"HS256","crit":["exp"]}', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","crit":"exp"}', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","crit":[]}', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","kid":5}', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","kid":["a"]}', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","kid":null}', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","b64":false}', GOOD_CLAIMS, "malformed_key"),
        (b"[1,2]", GOOD_CLAIMS, "malformed_key"),
        (b'"HS256"', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","x":"\xff"}', GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":"HS256","x":' + b"[" * 2000 + b"]" * 2000 + b"}", GOOD_CLAIMS, "malformed_key"),
        (b'{"alg":["HS256"]}', GOOD_CLAIMS, "bad_signature"),
        (b'{"alg":{"HS256":1}}', GOOD_CLAIMS, "bad_signature"),
        (b'{"alg":null}', GOOD_CLAIMS, "bad_signature"),
        (b'{"alg":"none"}', GOOD_CLAIMS, "bad_signature"),
        # claims that are not what they should be
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":"99999999999"}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":false}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":NaN}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":Infinity}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":-Infinity}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":1e400}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":' + b"9" * 400 + b"}", "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":' + b"9" * 5000 + b"}", "malformed_key"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":1e12,"nbf":' + b"9" * 400 + b"}", "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":1e12,"iat":NaN}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":["n"],"exp":1e12}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":{"n":1},"exp":1e12}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":true,"exp":1e12}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":1.5,"exp":1e12}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"\\ud800","exp":1e12}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"n","client_id":{"a":[]},"exp":1e12}', "bad_claims"),
        (b'{"alg":"HS256"}', b'{"sub":"\xff","exp":1e12}', "malformed_key"),
        (b'{"alg":"HS256"}', b"[1]", "malformed_key"),
        (b'{"alg":"HS256"}', b"null", "malformed_key"),
        (b'{"alg":"HS256"}', b'{"sub":"n","exp":1e12,"x":' + b"[" * 2000 + b"]" * 2000 + b"}", "malformed_key"),
    ],
)
def test_hostile_headers_and_claims_are_refused_with_a_code(header: bytes, claims: bytes, code: str) -> None:
    """Whatever a correctly signed key holds, the verifier answers with an
    AuthError and its code (a 401), never another exception (a 500)."""
    refused(code, AuthKeyVerifier([SECRET]).verify, signed_raw(header, claims), now=NOW)


def test_hostile_header_needs_no_valid_signature() -> None:
    """A crit header with a forged signature is refused like any malformed key."""
    token = signed_raw(b'{"alg":"HS256","crit":["x"]}', GOOD_CLAIMS, OTHER_SECRET)
    refused("malformed_key", AuthKeyVerifier([SECRET]).verify, token, now=NOW)


@pytest.mark.parametrize("header", [b'{"alg":"HS256","crit":["\\ud800"]}', b'{"alg":"HS256","crit":["\\udfff x"]}'])
def test_a_refusal_quoting_the_key_is_valid_utf8(header: bytes) -> None:
    """Found by tests/fuzz: a header the json module parses with a lone
    surrogate was quoted in the message, which could then not be encoded as
    the JSON answer (an unhandled error and an unanswered request)."""
    with pytest.raises(AuthError) as refusal:
        AuthKeyVerifier([SECRET]).verify(signed_raw(header, GOOD_CLAIMS), now=NOW)
    orjson.dumps({"message": refusal.value.message, "str": str(refusal.value)})


def test_unforeseen_parser_error_is_malformed_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception nobody foresaw while parsing an unverified key is a
    refusal, not a crash."""

    def explode(token: str) -> dict[str, Any]:
        raise RuntimeError("surprise")

    monkeypatch.setattr(jwt, "get_unverified_header", explode)
    refused("malformed_key", AuthKeyVerifier([SECRET]).verify, hs256({"sub": "n", "exp": NOW + 60}), now=NOW)


def forge_hs256_with_key_bytes(key_bytes: bytes) -> str:
    """An HS256 token MACed with ``key_bytes`` (PyJWT itself refuses PEM as HMAC key)."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "admin", "exp": NOW + 60}).encode())
    signing_input = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{b64(hmac.new(key_bytes, signing_input, hashlib.sha256).digest())}"


def test_algorithm_confusion_rsa(rsa_keys: tuple[bytes, bytes]) -> None:
    _, public = rsa_keys
    forged = forge_hs256_with_key_bytes(public)
    refused("bad_signature", AuthKeyVerifier([SECRET], [public]).verify, forged, now=NOW)
    refused("bad_signature", AuthKeyVerifier([], [public]).verify, forged, now=NOW)


def test_algorithm_confusion_ec(ec_keys: tuple[bytes, bytes]) -> None:
    _, public = ec_keys
    forged = forge_hs256_with_key_bytes(public)
    refused("bad_signature", AuthKeyVerifier([SECRET], [public]).verify, forged, now=NOW)
    refused("bad_signature", AuthKeyVerifier([], [public]).verify, forged, now=NOW)


def test_rs256_round_trip(rsa_keys: tuple[bytes, bytes]) -> None:
    private, public = rsa_keys
    key = mint_auth_key(b"", "n", client_id="c", now=NOW, algorithm="RS256", private_key=private)
    assert jwt.get_unverified_header(key)["alg"] == "RS256"
    verifier = AuthKeyVerifier([SECRET], [public])
    assert verifier.verify(key, now=NOW) == Identity("n", "c")
    refused("expired_key", verifier.verify, key, now=NOW + 3600)
    # Not verifiable with secrets only, nor with some other RSA key.
    refused("bad_signature", AuthKeyVerifier([SECRET]).verify, key, now=NOW)
    _, other_public = rsa_pems()
    refused("bad_signature", AuthKeyVerifier([], [other_public]).verify, key, now=NOW)


def test_es256_round_trip(ec_keys: tuple[bytes, bytes], rsa_keys: tuple[bytes, bytes]) -> None:
    private, public = ec_keys
    key = mint_auth_key(SECRET, "n", now=NOW, algorithm="ES256", private_key=private.decode())
    assert jwt.get_unverified_header(key)["alg"] == "ES256"
    # An RSA key does not verify ES256; the matching EC key among several does.
    verifier = AuthKeyVerifier([], [rsa_keys[1], public])
    assert verifier.verify(key, now=NOW) == Identity("n", None)
    refused("bad_signature", AuthKeyVerifier([], [rsa_keys[1]]).verify, key, now=NOW)


def test_header_alg_swap_between_rs_and_es(
    rsa_keys: tuple[bytes, bytes], ec_keys: tuple[bytes, bytes]
) -> None:
    key = mint_auth_key(b"", "n", now=NOW, algorithm="RS256", private_key=rsa_keys[0])
    _, payload, signature = key.split(".")
    header = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    verifier = AuthKeyVerifier([], [rsa_keys[1], ec_keys[1]])
    refused("bad_signature", verifier.verify, f"{header}.{payload}.{signature}", now=NOW)


def test_mint_private_key_must_match_algorithm(
    rsa_keys: tuple[bytes, bytes], ec_keys: tuple[bytes, bytes]
) -> None:
    with pytest.raises(ValueError):
        mint_auth_key(b"", "n", algorithm="RS256", private_key=ec_keys[0])
    with pytest.raises(ValueError):
        mint_auth_key(b"", "n", algorithm="ES256", private_key=rsa_keys[0])
    with pytest.raises(ValueError):
        mint_auth_key(b"", "n", algorithm="ES256", private_key=b"not a pem")
    with pytest.raises(ValueError):
        mint_auth_key(b"", "n", algorithm="ES256", private_key=ec_pems(ec.SECP384R1())[0])


def test_verifier_refuses_unusable_configuration() -> None:
    with pytest.raises(ValueError):
        AuthKeyVerifier([])
    with pytest.raises(ValueError):
        AuthKeyVerifier([b""])
    with pytest.raises(TypeError):
        AuthKeyVerifier(SECRET)
    with pytest.raises(ValueError):
        AuthKeyVerifier([SECRET], [b"not a pem"])
    with pytest.raises(ValueError):
        AuthKeyVerifier([SECRET], [ec_pems(ec.SECP384R1())[1]])
    ed = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ValueError):
        AuthKeyVerifier([SECRET], [pem_pair(ed)[1]])
    with pytest.raises(ValueError):
        AuthKeyVerifier([SECRET], leeway=-1)


def test_auth_error_shape() -> None:
    error = AuthError("expired_key", "auth key has expired")
    assert error.code == "expired_key"
    assert error.message == "auth key has expired"
    assert str(error) == "auth key has expired"
    with pytest.raises(ValueError):
        AuthError("whatever", "x")


# -------------------------------------------------------------------------- secrets


ENV = "ALLSPARK_AUTH_SECRET"


def test_load_secrets_from_env() -> None:
    assert load_secrets({ENV: "a" * 16}, None) == [b"a" * 16]


def test_load_secrets_env_several() -> None:
    env = {ENV: f" {'a' * 20} ,{'b' * 20},, {'a' * 20}"}
    assert load_secrets(env, None) == [b"a" * 20, b"b" * 20]


def test_load_secrets_from_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_bytes(b"\n  " + b"n" * 32 + b"  \r\n\n" + b"o" * 32 + b"\n")
    assert load_secrets({}, str(path)) == [b"n" * 32, b"o" * 32]


def test_load_secrets_file_wins_over_env(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("f" * 32 + "\n")
    assert load_secrets({ENV: "e" * 32}, str(path)) == [b"f" * 32]


def test_load_secrets_neither() -> None:
    with pytest.raises(ValueError, match=ENV):
        load_secrets({}, None)
    with pytest.raises(ValueError, match=ENV):
        load_secrets({ENV: " , "}, None)


def test_load_secrets_empty_file_does_not_fall_back(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("\n   \n")
    with pytest.raises(ValueError, match="no secret"):
        load_secrets({ENV: "e" * 32}, str(path))


def test_load_secrets_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_secrets({ENV: "e" * 32}, str(tmp_path / "nope"))


def test_load_secrets_too_short(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too short to be safe"):
        load_secrets({ENV: "short"}, None)
    with pytest.raises(ValueError, match="too short to be safe"):
        load_secrets({ENV: "a" * 32 + ",b" * 1}, None)
    path = tmp_path / "secrets"
    path.write_text("a" * 32 + "\n" + "b" * 15 + "\n")
    with pytest.raises(ValueError, match="too short to be safe"):
        load_secrets({}, str(path))


# ---------------------------------------------------------------- validation tokens


TOKEN_KEY = derive_token_key(SECRET)


def tokens(clock: Clock, server_id: str = "srv-a", ttl: float = 60.0) -> ValidationTokens:
    return ValidationTokens(TOKEN_KEY, server_id, clock, ttl=ttl)


def test_derive_token_key() -> None:
    key = derive_token_key(SECRET)
    assert key == hmac.new(SECRET, b"allspark validation token v1", hashlib.sha256).digest()
    assert key != SECRET
    assert len(key) == 32
    assert derive_token_key(OTHER_SECRET) != key
    with pytest.raises(ValueError):
        derive_token_key(b"")


def test_token_single_use() -> None:
    clock = Clock()
    vt = tokens(clock)
    token, expires_in = vt.issue("node-1", "srv-a")
    assert expires_in == 60
    assert token.count(".") == 1
    vt.redeem(token, "node-1")
    refused("replayed_token", vt.redeem, token, "node-1")
    clock.advance(30)
    refused("replayed_token", vt.redeem, token, "node-1")


def test_tokens_are_unique() -> None:
    vt = tokens(Clock())
    issued = {vt.issue("n", "srv-a")[0] for _ in range(100)}
    assert len(issued) == 100


def test_token_expires_at_60_seconds() -> None:
    clock = Clock()
    vt = tokens(clock)
    early, _ = vt.issue("n", "srv-a")
    late, _ = vt.issue("n", "srv-a")
    clock.advance(59.9)
    vt.redeem(early, "n")
    clock.advance(0.1)
    refused("expired_token", vt.redeem, late, "n")


def test_ttl_clamped_to_60() -> None:
    clock = Clock()
    vt = tokens(clock, ttl=3600)
    assert vt.ttl == 60
    token, expires_in = vt.issue("n", "srv-a")
    assert expires_in == 60
    clock.advance(60)
    refused("expired_token", vt.redeem, token, "n")


def test_short_ttl() -> None:
    clock = Clock()
    vt = tokens(clock, ttl=10.5)
    token, expires_in = vt.issue("n", "srv-a")
    assert expires_in == 10
    clock.advance(10.6)
    refused("expired_token", vt.redeem, token, "n")


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "60", None])
def test_bad_ttl(ttl: Any) -> None:
    with pytest.raises(ValueError):
        tokens(Clock(), ttl=ttl)


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        ValidationTokens(b"short", "srv-a", Clock())
    with pytest.raises(ValueError):
        ValidationTokens(TOKEN_KEY, "bad server id", Clock())


def test_issue_validates_ids() -> None:
    vt = tokens(Clock())
    with pytest.raises(ValueError):
        vt.issue("bad id", "srv-a")
    with pytest.raises(ValueError):
        vt.issue("n", "")


def test_foreign_node() -> None:
    vt = tokens(Clock())
    token, _ = vt.issue("alice-phone", "srv-a")
    refused("foreign_token", vt.redeem, token, "mallory")
    # The rightful node can still use it: a foreign attempt does not burn it.
    vt.redeem(token, "alice-phone")


def test_foreign_server_and_cross_server_issue() -> None:
    clock = Clock()
    a, b = tokens(clock, "srv-a"), tokens(clock, "srv-b")
    clock.advance(VALIDATION_CLOCK_SKEW)  # srv-b has been up long enough to trust others' tokens
    # srv-a chooses srv-b as the least loaded server and issues a token for it.
    token, _ = a.issue("n", "srv-b")
    refused("foreign_token", a.redeem, token, "n")
    b.redeem(token, "n")
    refused("replayed_token", b.redeem, token, "n")


def test_restart_refuses_a_token_the_previous_process_redeemed() -> None:
    """A new process of the same server forgets what the old one redeemed, so
    it refuses every token the old one could have seen, redeemed or not."""
    clock = Clock()
    clock.advance(1000)
    before = tokens(clock)
    redeemed, _ = before.issue("n", "srv-a")
    unused, _ = before.issue("n", "srv-a")
    before.redeem(redeemed, "n")
    clock.advance(0.001)  # restarted at once: the tokens are far from expired
    after = tokens(clock)
    error = refused("expired_token", after.redeem, redeemed, "n")
    assert "before this server started" in error.message
    refused("expired_token", after.redeem, unused, "n")
    fresh, _ = after.issue("n", "srv-a")  # its own tokens work at once
    after.redeem(fresh, "n")


def test_tokens_of_other_servers_count_from_start_plus_skew() -> None:
    """A token another server minted for this one is trusted only when it was
    issued at least VALIDATION_CLOCK_SKEW after this process started: with
    clocks within that skew it cannot have reached an earlier process."""
    clock = Clock()
    clock.advance(1000)
    other = tokens(clock, "srv-b")
    this = tokens(clock, "srv-a")
    clock.advance(VALIDATION_CLOCK_SKEW - 0.5)
    early, _ = other.issue("n", "srv-a")
    refused("expired_token", this.redeem, early, "n")
    clock.advance(0.5)
    token, _ = other.issue("n", "srv-a")
    this.redeem(token, "n")
    refused("replayed_token", this.redeem, token, "n")


def signed_token(claims: dict[str, Any]) -> str:
    payload = b64(json.dumps(claims).encode())
    return f"{payload}.{b64(hmac.new(TOKEN_KEY, payload.encode(), hashlib.sha256).digest())}"


def test_token_without_issue_time_counts_as_issued_a_full_ttl_before_expiry() -> None:
    clock = Clock()
    clock.advance(1000)
    vt = tokens(clock)
    clock.advance(10)
    # issued (by this rule) at 1000 + 10 + 59 - 60 = 1009 >= start + skew: accepted
    vt.redeem(signed_token({"n": "n", "s": "srv-a", "e": clock.seconds() + 59, "j": "late"}), "n")
    # issued at 1000 + 10 + 50 - 60 = 1000 < start + skew: refused
    refused("expired_token", vt.redeem,
            signed_token({"n": "n", "s": "srv-a", "e": clock.seconds() + 50, "j": "early"}), "n")


def test_token_issued_in_the_future_or_with_a_bad_issue_time() -> None:
    clock = Clock()
    clock.advance(1000)
    vt = tokens(clock)
    clock.advance(100)
    now = clock.seconds()
    future = {"n": "n", "s": "srv-a", "e": now + 30, "i": now + VALIDATION_CLOCK_SKEW + 1, "j": "f"}
    refused("bad_token", vt.redeem, signed_token(future), "n")
    for bad in ("x", True, [1], float("nan")):
        refused("bad_token", vt.redeem, signed_token({"n": "n", "s": "srv-a", "e": now + 30, "i": bad, "j": "b"}),
                "n")
    refused("bad_token", vt.redeem, signed_token({"n": "n", "s": "srv-a", "e": now + 30, "i": now, "p": 7,
                                                  "j": "b"}), "n")


def test_other_cluster_key_refused() -> None:
    clock = Clock()
    other = ValidationTokens(derive_token_key(OTHER_SECRET), "srv-a", clock)
    token, _ = other.issue("n", "srv-a")
    refused("bad_token", tokens(clock).redeem, token, "n")


def test_forged_token() -> None:
    clock = Clock()
    vt = tokens(clock)
    token, _ = vt.issue("n", "srv-a")
    payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["n"] = "mallory"
    forged_payload = b64(json.dumps(claims).encode())
    refused("bad_token", vt.redeem, f"{forged_payload}.{signature}", "mallory")
    # MAC with the auth secret itself (not the derived key) is refused too.
    mac = b64(hmac.new(SECRET, forged_payload.encode(), hashlib.sha256).digest())
    refused("bad_token", vt.redeem, f"{forged_payload}.{mac}", "mallory")
    # Flipped signature bytes.
    bad_sig = b64(bytes(b ^ 1 for b in base64.urlsafe_b64decode(signature + "=")))
    refused("bad_token", vt.redeem, f"{payload}.{bad_sig}", "n")


def test_well_signed_but_bad_payload() -> None:
    vt = tokens(Clock())

    def signed(raw: bytes) -> str:
        payload = b64(raw)
        return f"{payload}.{b64(hmac.new(TOKEN_KEY, payload.encode(), hashlib.sha256).digest())}"

    for raw in [
        b"not json",
        b"[1, 2]",
        b"\xff\xfe",
        json.dumps({"n": "n", "s": "srv-a", "e": 30}).encode(),  # no nonce
        json.dumps({"n": "n", "s": "srv-a", "e": "30", "j": "x"}).encode(),
        json.dumps({"n": "n", "s": "srv-a", "e": True, "j": "x"}).encode(),
        json.dumps({"n": 1, "s": "srv-a", "e": 30, "j": "x"}).encode(),
        json.dumps({"n": "n", "s": "srv-a", "e": 10**6, "j": "x"}).encode(),  # too far ahead
    ]:
        refused("bad_token", vt.redeem, signed(raw), "n")


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token: object) -> None:
    refused("missing_token", tokens(Clock()).redeem, token, "n")


@pytest.mark.parametrize(
    "token",
    [
        b"abc.def",
        123,
        1.5,
        ["a.b"],
        {"n": "n"},
        True,
        "garbage",
        "a.b.c",
        ".",
        "a.",
        ".b",
        "!!!.###",
        "é.é",
        "x" * 5000 + "." + "y",
        "None",
    ],
)
def test_garbage_tokens(token: object) -> None:
    refused("bad_token", tokens(Clock()).redeem, token, "n")


def test_validation_token_is_not_an_auth_key() -> None:
    clock = Clock()
    clock.advance(NOW)
    vt = tokens(clock)
    token, _ = vt.issue("n", "srv-a")
    verifier = AuthKeyVerifier([SECRET, TOKEN_KEY])
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=NOW)
    assert info.value.code == "malformed_key"


def test_auth_key_is_not_a_validation_token() -> None:
    clock = Clock()
    clock.advance(NOW)
    vt = tokens(clock)
    for key in (
        mint_auth_key(SECRET, "n", now=NOW),
        mint_auth_key(TOKEN_KEY, "n", now=NOW),
    ):
        refused("bad_token", vt.redeem, key, "n")
        # Nor its first two segments re-joined.
        header, payload, _ = key.split(".")
        refused("bad_token", vt.redeem, f"{payload}.{header}", "n")


def test_nonce_memory_pruned_after_expiry() -> None:
    clock = Clock()
    vt = tokens(clock)
    for i in range(50):
        token, _ = vt.issue(f"n{i}", "srv-a")
        vt.redeem(token, f"n{i}")
    assert vt.remembered == 50
    clock.advance(30)
    token, _ = vt.issue("late", "srv-a")
    vt.redeem(token, "late")
    assert vt.remembered == 51
    clock.advance(30)
    vt.prune()
    assert vt.remembered == 1
    # Redeeming also prunes.
    clock.advance(30)
    fresh, _ = vt.issue("fresh", "srv-a")
    vt.redeem(fresh, "fresh")
    assert vt.remembered == 1


def test_replayed_after_pruning_is_expired_not_accepted() -> None:
    clock = Clock()
    vt = tokens(clock)
    token, _ = vt.issue("n", "srv-a")
    vt.redeem(token, "n")
    clock.advance(60)
    vt.prune()
    assert vt.remembered == 0
    refused("expired_token", vt.redeem, token, "n")
