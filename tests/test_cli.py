"""Tests for the ``allspark`` command line tool (run as a subprocess, like users do)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from allspark.auth import AuthError, AuthKeyVerifier, Identity
from allspark.cli import SUBCOMMANDS, format_table, main, server_rows
from allspark.store import ServerRecord

REPO = Path(__file__).resolve().parent.parent
SECRET = "k" * 32
OTHER = "q" * 32


def run(*args: str, secret: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m allspark.cli *args`` with a clean auth environment."""
    env = {k: v for k, v in os.environ.items() if k != "ALLSPARK_AUTH_SECRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if secret is not None:
        env["ALLSPARK_AUTH_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "allspark.cli", *args],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )


def key_of(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    return lines[0]


def test_keygen_with_env_secret() -> None:
    result = run("keygen", "--node-id", "phone-1", "--client-id", "alice", secret=SECRET)
    identity = AuthKeyVerifier([SECRET.encode()]).verify(key_of(result))
    assert identity == Identity("phone-1", "alice")


def test_keygen_first_env_secret_mints() -> None:
    result = run("keygen", "--node-id", "n", secret=f"{SECRET},{OTHER}")
    key = key_of(result)
    assert AuthKeyVerifier([SECRET.encode()]).verify(key).node_id == "n"
    with pytest.raises(AuthError) as info:
        AuthKeyVerifier([OTHER.encode()]).verify(key)
    assert info.value.code == "bad_signature"


def test_keygen_with_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"\n{OTHER}\n{SECRET}\n")
    result = run("keygen", "--node-id", "n", "--auth-secret-file", str(path), secret=SECRET)
    identity = AuthKeyVerifier([OTHER.encode()]).verify(key_of(result))
    assert identity == Identity("n", None)


def test_keygen_ttl() -> None:
    before = time.time()
    key = key_of(run("keygen", "--node-id", "n", "--ttl", "120", secret=SECRET))
    verifier = AuthKeyVerifier([SECRET.encode()])
    assert verifier.verify(key, now=before).node_id == "n"
    with pytest.raises(AuthError) as info:
        verifier.verify(key, now=before + 122)
    assert info.value.code == "expired_key"


def test_keygen_rs256_and_es256(tmp_path: Path) -> None:
    for algorithm, private in [
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
    ]:
        pem = tmp_path / f"{algorithm}.pem"
        pem.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # No auth secret needed for public-key algorithms.
        result = run(
            "keygen", "--node-id", "n", "--algorithm", algorithm, "--private-key-file", str(pem)
        )
        assert AuthKeyVerifier([], [public]).verify(key_of(result)) == Identity("n", None)


def assert_usage_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr


def test_keygen_without_secret() -> None:
    assert_usage_error(run("keygen", "--node-id", "n"), "ALLSPARK_AUTH_SECRET")


def test_keygen_short_secret() -> None:
    assert_usage_error(run("keygen", "--node-id", "n", secret="short"), "too short to be safe")


def test_keygen_missing_secret_file(tmp_path: Path) -> None:
    result = run("keygen", "--node-id", "n", "--auth-secret-file", str(tmp_path / "none"))
    assert_usage_error(result, "cannot read")


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((), "command"),
        (("keygen",), "--node-id"),
        (("keygen", "--node-id", "bad id"), "not a valid id"),
        (("keygen", "--node-id", "n", "--client-id", "a/b"), "not a valid id"),
        (("keygen", "--node-id", "n", "--ttl", "0"), "positive"),
        (("keygen", "--node-id", "n", "--ttl", "soon"), "whole number"),
        (("keygen", "--node-id", "n", "--algorithm", "none"), "invalid choice"),
        (("keygen", "--node-id", "n", "--algorithm", "RS256"), "--private-key-file"),
        (("keygen", "--node-id", "n", "--private-key-file", "x.pem"), "RS256"),
        (("keygen", "--node-id", "n", "--secret", SECRET), "unrecognized"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_usage_errors(args: tuple[str, ...], fragment: str) -> None:
    assert_usage_error(run(*args, secret=SECRET), fragment)


def test_unreadable_private_key(tmp_path: Path) -> None:
    result = run(
        "keygen", "--node-id", "n", "--algorithm", "ES256",
        "--private-key-file", str(tmp_path / "missing.pem"),
    )  # fmt: skip
    assert_usage_error(result, "cannot read private key file")


def test_invalid_private_key(tmp_path: Path) -> None:
    pem = tmp_path / "bad.pem"
    pem.write_text("not a key")
    result = run(
        "keygen", "--node-id", "n", "--algorithm", "ES256", "--private-key-file", str(pem)
    )
    assert_usage_error(result, "private key")


def test_main_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ALLSPARK_AUTH_SECRET", SECRET)
    assert main(["keygen", "--node-id", "n", "--client-id", "c"]) == 0
    key = capsys.readouterr().out.strip()
    assert AuthKeyVerifier([SECRET.encode()]).verify(key) == Identity("n", "c")
    assert main(["keygen"]) == 2
    assert main(["keygen", "--help"]) == 0
    monkeypatch.delenv("ALLSPARK_AUTH_SECRET")
    assert main(["keygen", "--node-id", "n"]) == 2
    assert "ALLSPARK_AUTH_SECRET" in capsys.readouterr().err


def test_subcommands_registry() -> None:
    assert "keygen" in SUBCOMMANDS


# -- send, listen, status: usage and output (tests/e2e/test_cli.py runs them against servers)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("send", "http://127.0.0.1:1", "--node-id", "a"), "one of the arguments --dest-id"),
        (("send", "http://127.0.0.1:1", "--node-id", "a", "--dest-id", "b", "--dest-client-id", "c"),
         "not allowed with"),
        (("send", "http://127.0.0.1:1", "--node-id", "a", "--dest-id", "b", "--payload", "{x"), "not JSON"),
        (("send", "http://127.0.0.1:1", "--node-id", "a", "--dest-id", "b", "--payload", "1", "--text", "t"),
         "not allowed with"),
        (("send", "http://127.0.0.1:1", "--node-id", "a", "--dest-id", "bad id"), "not a valid id"),
        (("send", "http://127.0.0.1:1", "--node-id", "a", "--dest-id", "b", "--timeout", "0"), "more than 0"),
        (("send", "http://127.0.0.1:1", "--dest-id", "b"), "--node-id"),
        (("listen", "http://127.0.0.1:1", "--node-id", "a", "--count", "0"), "at least 1"),
        (("listen", "http://127.0.0.1:1", "--node-id", "a", "--timeout", "soon"), "number of seconds"),
        (("listen", "http://127.0.0.1:1", "--auth-key-file", "/nonexistent/key"), "cannot read"),
        (("status",), "--store"),
        (("status", "--store", "ftp://x"), "ftp://x"),
        (("status", "--store", "sqlite:////nonexistent/allspark.db"), "no SQLite store"),
    ],
)
def test_send_listen_status_usage_errors(args: tuple[str, ...], fragment: str) -> None:
    assert_usage_error(run(*args, secret=SECRET), fragment)


def test_send_without_any_secret_is_a_usage_error() -> None:
    assert_usage_error(run("send", "http://127.0.0.1:1", "--node-id", "a", "--dest-id", "b"),
                       "ALLSPARK_AUTH_SECRET")


def test_send_to_a_server_that_is_not_there_exits_1() -> None:
    from tests.support import free_port

    result = run("send", f"http://127.0.0.1:{free_port()}", "--node-id", "a", "--dest-id", "b",
                 "--text", "hi", secret=SECRET)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "allspark send:" in result.stderr and "refused" in result.stderr


def _record(server_id: str, connections: int, heartbeat_ms: int, state: str = "live",
            proxy: str | None = None) -> ServerRecord:
    return ServerRecord(server_id, "h/1/x", "10.0.0.1", 8080, proxy, "ws", 200, connections, state,
                        heartbeat_ms, 1_000)


def test_server_rows_state_load_and_dead() -> None:
    rows = server_rows([_record("s2", 50, 9_000, "draining"), _record("s1", 10, 10_000),
                        _record("s3", 0, 1_000)], now_ms=10_500, dead_after_ms=5_000)
    assert [r["server_id"] for r in rows] == ["s1", "s2", "s3"]
    assert [r["state"] for r in rows] == ["live", "draining", "dead"]
    assert [r["load_percent"] for r in rows] == [5.0, 25.0, 0.0]
    assert [r["heartbeat_age_ms"] for r in rows] == [500, 1_500, 9_500]


def test_format_table() -> None:
    table = format_table(server_rows([_record("s1", 10, 10_000, proxy="chat.example.com:80")], 10_500, 5_000))
    header, line = table.splitlines()
    assert header.split() == ["SERVER", "STATE", "CONNECTIONS", "LOAD", "HEARTBEAT", "ADDRESS"]
    assert line.split()[:5] == ["s1", "live", "10/200", "5.0%", "0.5s"]
    assert "ws://10.0.0.1:8080 (proxy chat.example.com:80)" in line
    assert "no server records" in format_table([])
