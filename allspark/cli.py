"""The ``allspark`` command line tool.

Subcommands are registered in :data:`SUBCOMMANDS`; each has a ``configure``
function that adds its arguments and a ``run`` function returning an exit code.

``allspark keygen --node-id N [--client-id C] [--ttl S] [--auth-secret-file F]
[--algorithm HS256|RS256|ES256 --private-key-file PEM]`` prints an auth key on
stdout.  For HS256 the secret comes from the file named by ``--auth-secret-file``
or else from ``$ALLSPARK_AUTH_SECRET`` (the first secret mints); it is never taken
from the command line itself.  Usage errors and a missing or unsafe secret print a
message on stderr and exit with status 2.

``allspark drain URL [--cluster-secret-file F]`` asks the server at ``URL`` to
drain and stop, as SIGTERM does (``POST /admin/drain`` with a single-use admin
token made from the cluster secret, default ``$ALLSPARK_CLUSTER_SECRET``).

``allspark send URL (--dest-id N | --dest-client-id C | --dest-session-id S)
[--payload JSON | --text T] [--type N] [--ephemeral] [--id I]`` connects
(pre-connection, then the WebSocket) and sends one message; it prints the
``accepted`` answer as JSON and exits 0, or says why on stderr and exits 1
(refused: the error frame; unreachable; no answer within ``--timeout``).
``allspark listen URL [--count N] [--timeout S] [--no-ack]`` connects as a
node, syncs what it missed and prints each message as one JSON line, acking
what it printed, until ``--count`` messages (exit 0; 1 when ``--timeout``
passes first), ``--timeout`` seconds, or Ctrl-C (exit 0, after its last ack).
Both take the auth key from ``--auth-key-file`` or ``$ALLSPARK_AUTH_KEY``, or
mint one for ``--node-id`` (and ``--client-id``) with the auth secret, as
keygen does; ``--need-proxy`` connects through the server's proxy address.

``allspark status --store URL [--json] [--dead-after S]`` reads the server
records from the cluster's store and prints each server's state (``live``,
``draining``, ``dead``), connections, capacity, load and heartbeat age.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from allspark.auth import AUTH_SECRET_ENV, load_secrets, mint_auth_key
from allspark.ids import is_valid_id

__all__ = ["SUBCOMMANDS", "Subcommand", "main"]

#: Exit status for bad usage or configuration (argparse uses the same).
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or configuration; reported on stderr with exit status 2."""


@dataclass(frozen=True)
class Subcommand:
    """One ``allspark <name>`` subcommand."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Mapping[str, str]], int]


# ------------------------------------------------------------------------------ keygen


def _id_arg(value: str) -> str:
    if not is_valid_id(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid id (1-128 of [A-Za-z0-9_.:@-])")
    return value


def _ttl_arg(value: str) -> int:
    try:
        ttl = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of seconds") from None
    if ttl <= 0:
        raise argparse.ArgumentTypeError("ttl must be positive")
    return ttl


def _configure_keygen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-id", required=True, type=_id_arg, help="node id (the sub claim)")
    parser.add_argument("--client-id", type=_id_arg, default=None, help="optional client (user) id")
    parser.add_argument(
        "--ttl", type=_ttl_arg, default=3600, help="lifetime in seconds (default 3600)"
    )
    parser.add_argument(
        "--auth-secret-file",
        default=None,
        metavar="FILE",
        help=f"file with the auth secret(s), one per line (default: ${AUTH_SECRET_ENV})",
    )
    parser.add_argument(
        "--algorithm",
        choices=("HS256", "RS256", "ES256"),
        default="HS256",
        help="HS256 with the auth secret (default), or RS256/ES256 with --private-key-file",
    )
    parser.add_argument(
        "--private-key-file", default=None, metavar="PEM", help="PEM private key for RS256/ES256"
    )


def _run_keygen(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Mint one auth key and print it on stdout."""
    secret: bytes = b""
    private_key: bytes | None = None
    if args.algorithm == "HS256":
        if args.private_key_file is not None:
            raise UsageError("--private-key-file is only used with --algorithm RS256 or ES256")
        try:
            secret = load_secrets(env, args.auth_secret_file)[0]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        if args.private_key_file is None:
            raise UsageError(f"--algorithm {args.algorithm} needs --private-key-file")
        try:
            with open(args.private_key_file, "rb") as handle:
                private_key = handle.read()
        except OSError as exc:
            raise UsageError(
                f"cannot read private key file {args.private_key_file}: {exc.strerror}"
            ) from None
    try:
        key = mint_auth_key(
            secret,
            args.node_id,
            client_id=args.client_id,
            ttl=args.ttl,
            algorithm=args.algorithm,
            private_key=private_key,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(key)
    return 0


# ------------------------------------------------------------------------------- drain


def _configure_drain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the server's HTTP base URL, e.g. http://127.0.0.1:8082")
    parser.add_argument(
        "--cluster-secret-file",
        default=None,
        metavar="FILE",
        help="file holding the cluster secret (default: $ALLSPARK_CLUSTER_SECRET)",
    )


def _run_drain(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Ask one server to drain (``POST /admin/drain`` with an admin token made
    from the cluster secret); prints its answer.  Exit 0 when it drains, 1
    when it refused or could not be reached."""
    import json
    import time
    import urllib.error
    import urllib.request

    from allspark.cluster import admin_token, derive_admin_key

    try:
        if args.cluster_secret_file is not None:
            with open(args.cluster_secret_file, "rb") as handle:
                secret = handle.read().strip()
        else:
            secret = env.get("ALLSPARK_CLUSTER_SECRET", "").strip().encode()
    except OSError as exc:
        raise UsageError(f"cannot read {args.cluster_secret_file}: {exc.strerror}") from None
    if len(secret) < 16:
        raise UsageError("a cluster secret of at least 16 bytes is needed (--cluster-secret-file or "
                         "$ALLSPARK_CLUSTER_SECRET)")
    base = args.url.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as answer:
            server_id = json.loads(answer.read())["node_id"]
        token = admin_token(derive_admin_key(secret), "drain", server_id, time.time())
        request = urllib.request.Request(base + "/admin/drain", data=b"", method="POST",
                                         headers={"Authorization": f"Allspark-Admin {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            print(answer.read().decode())
        return 0
    except urllib.error.HTTPError as exc:
        print(f"allspark drain: refused ({exc.code}): {exc.read().decode(errors='replace')}", file=sys.stderr)
    except (OSError, ValueError, KeyError) as exc:
        print(f"allspark drain: cannot reach {base}: {exc}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------ send / listen

#: Environment variable an auth key can be read from (``send``, ``listen``).
AUTH_KEY_ENV = "ALLSPARK_AUTH_KEY"
#: Exit status when the server refused, could not be reached, or did not answer in time.
EXIT_FAILED = 1


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def _count_arg(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if count <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return count


def _json_arg(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); quote a string as '\"text\"' or use --text") from None


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The server URL and the credentials (``send`` and ``listen``)."""
    parser.add_argument("url", help="the server's HTTP base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--node-id", type=_id_arg, default=None,
                        help="this node's id: a key is minted for it with the auth secret")
    parser.add_argument("--client-id", type=_id_arg, default=None, help="client (user) id of the minted key")
    parser.add_argument("--auth-secret-file", default=None, metavar="FILE",
                        help=f"file with the auth secret(s) to mint with (default: ${AUTH_SECRET_ENV})")
    parser.add_argument("--auth-key-file", default=None, metavar="FILE",
                        help=f"file holding an auth key to use instead of minting one (default: ${AUTH_KEY_ENV} "
                             "when set)")
    parser.add_argument("--need-proxy", action="store_true",
                        help="ask pre-connection for the server's proxy address (a server behind nginx)")


def _auth_key(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """The auth key to connect with: read from ``--auth-key-file`` or
    ``$ALLSPARK_AUTH_KEY``, else minted for ``--node-id`` with the auth secret."""
    if args.auth_key_file is not None:
        try:
            with open(args.auth_key_file) as handle:
                key = handle.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read {args.auth_key_file}: {exc.strerror}") from None
        if not key:
            raise UsageError(f"{args.auth_key_file} holds no auth key")
        return key
    if env.get(AUTH_KEY_ENV, "").strip() and args.node_id is None:
        return env[AUTH_KEY_ENV].strip()
    if args.node_id is None:
        raise UsageError(f"give --node-id (a key is minted with the auth secret), --auth-key-file or ${AUTH_KEY_ENV}")
    try:
        secret = load_secrets(env, args.auth_secret_file)[0]
        return mint_auth_key(secret, args.node_id, client_id=args.client_id, ttl=3600)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _configure_send(parser: argparse.ArgumentParser) -> None:
    _add_connection_args(parser)
    dest = parser.add_mutually_exclusive_group(required=True)
    dest.add_argument("--dest-id", type=_id_arg, help="the node to send to")
    dest.add_argument("--dest-client-id", type=_id_arg, help="the client (user) to send to: all its nodes")
    dest.add_argument("--dest-session-id", type=_id_arg, help="the session to send to")
    content = parser.add_mutually_exclusive_group()
    content.add_argument("--payload", type=_json_arg, default=None, metavar="JSON", help="the payload, as JSON")
    content.add_argument("--text", default=None, help='a text payload: {"text": TEXT}')
    parser.add_argument("--type", type=int, default=None, help="the message's type (an integer)")
    parser.add_argument("--ephemeral", action="store_true", help="not stored: delivered to live nodes only")
    parser.add_argument("--id", type=_id_arg, default=None,
                        help="the message id (de-duplicates a retry; default: a random one)")
    parser.add_argument("--timeout", type=_positive_seconds, default=10.0,
                        help="seconds to wait for the answer (default 10)")


def _run_send(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Connect, send one message, print the ``accepted`` answer as JSON.
    Exit 0 when it was accepted; 1 when it was refused (the error frame on
    stderr) or the server could not be reached in time."""
    key = _auth_key(args, env)
    fields: dict[str, Any] = {}
    for name in ("dest_id", "dest_client_id", "dest_session_id", "payload", "type", "id"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.text is not None:
        fields["payload"] = {"text": args.text}
    if args.ephemeral:
        fields["ephemeral"] = True

    async def send(reactor: Any) -> int:
        from allspark.client import AllsparkError

        client = await _connect(reactor, args.url, key, args.need_proxy, sync=False, auto_ack=False)
        try:
            if "id" in fields:
                answer = await client.request(fields)
            else:
                answer = await client.send(**fields)
        except AllsparkError as exc:
            _say(f"allspark send: refused: {json.dumps(exc.frame)}")
            return EXIT_FAILED
        finally:
            await _close(client)
        print(json.dumps(answer), flush=True)
        return 0

    return _react(send, args.timeout, "send")


def _configure_listen(parser: argparse.ArgumentParser) -> None:
    _add_connection_args(parser)
    parser.add_argument("--count", type=_count_arg, default=None,
                        help="stop after this many messages (exit 1 if --timeout passes first)")
    parser.add_argument("--timeout", type=_positive_seconds, default=None,
                        help="stop after this many seconds (default: until Ctrl-C)")
    parser.add_argument("--no-ack", action="store_true",
                        help="do not ack what was printed (it is synced again next time)")


def _run_listen(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Connect as a node, sync what it missed, print each message as one
    JSON line and ack it once printed (batched), until ``--count`` messages,
    ``--timeout`` seconds or Ctrl-C.  What was printed is acked before the
    command exits, Ctrl-C included."""
    key = _auth_key(args, env)

    async def listen(reactor: Any) -> int:
        from twisted.internet.defer import Deferred

        acker: _Acker | None = None
        client = await _connect(reactor, args.url, key, args.need_proxy, sync=False, auto_ack=False)
        if not args.no_ack:
            acker = _Acker(client, reactor)
            # Ctrl-C stops the reactor: what was printed is acked first
            reactor.addSystemEventTrigger("before", "shutdown", acker.flush_before_exit)
        syncing = Deferred.fromCoroutine(client.sync())
        syncing.addErrback(lambda f: _say(f"allspark listen: sync failed: {f.getErrorMessage()}"))
        deadline = None if args.timeout is None else reactor.seconds() + args.timeout
        printed = 0
        try:
            while args.count is None or printed < args.count:
                wait = 3600.0 if deadline is None else deadline - reactor.seconds()
                if wait <= 0:
                    break
                try:
                    message = await client.messages.get().addTimeout(wait, reactor)
                except Exception as exc:  # the timeout, or the connection closing
                    if client.protocol is None:
                        _say(f"allspark listen: the connection closed ({client.close_code}: "
                             f"{client.close_reason})")
                        return EXIT_FAILED
                    if type(exc).__name__ in ("TimeoutError", "CancelledError"):
                        continue  # the loop checks the deadline
                    raise
                print(json.dumps(message, separators=(",", ":")), flush=True)
                printed += 1
                if acker is not None:
                    acker.printed(message)
        finally:
            if acker is not None:
                await acker.flush()
            await _close(client)
        if args.count is not None and printed < args.count:
            _say(f"allspark listen: {printed} of {args.count} messages within {args.timeout}s")
            return EXIT_FAILED
        return 0

    return _react(listen, None, "listen", interrupted=0)


class _Acker:
    """Acks what ``listen`` printed: the highest inbox ``seq`` and each
    session's highest ``session_seq``, batched (one ack per stream every
    50 ms at most)."""

    def __init__(self, client: Any, reactor: Any) -> None:
        self.client = client
        self.reactor = reactor
        self.upto: dict[str | None, int] = {}
        self.acked: dict[str | None, int] = {}
        self._call: Any = None

    def printed(self, message: dict[str, Any]) -> None:
        if "session_seq" in message:
            stream, seq = message.get("dest_session_id"), message["session_seq"]
        else:
            stream, seq = None, message.get("seq")
        if isinstance(seq, int) and seq > self.upto.get(stream, 0):
            self.upto[stream] = seq
            if self._call is None:
                self._call = self.reactor.callLater(0.05, self._flush_later)

    def _flush_later(self) -> None:
        self._call = None
        from twisted.internet.defer import Deferred

        Deferred.fromCoroutine(self.flush()).addErrback(lambda f: None)

    async def flush(self) -> None:
        """Ack everything printed and not acked yet (errors are reported, not raised)."""
        for stream, upto in list(self.upto.items()):
            if upto <= self.acked.get(stream, 0) or self.client.protocol is None:
                continue
            self.acked[stream] = upto
            try:
                await self.client.ack(upto, stream)
            except Exception as exc:
                _say(f"allspark listen: ack up to {upto} failed: {exc}")

    def flush_before_exit(self) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self.flush()).addTimeout(5, self.reactor).addErrback(lambda f: None)


async def _connect(reactor: Any, url: str, key: str, need_proxy: bool, sync: bool, auto_ack: bool) -> Any:
    """Pre-connect at ``url`` (with ``need_proxy``: the proxy address) and open the socket."""
    from allspark.client import open_socket, pre_connection

    info = await pre_connection(url, key, need_proxy=need_proxy)
    node = info.get("node") or {}
    ws_url = node.get("ws_url")
    if not ws_url:
        raise ConnectionError(f"pre-connection named no server to connect to: {json.dumps(info)}")
    client = await open_socket(reactor, ws_url, auto_ack=auto_ack)
    client.base_url, client.auth_key = url, key
    if sync:
        await client.sync()
    return client


async def _close(client: Any) -> None:
    """Close the socket, waiting at most 2 s for the close handshake."""
    if client.protocol is None:
        return
    try:
        await client.close().addTimeout(2, client.reactor)
    except Exception:
        client.drop()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _react(main: Callable[[Any], Any], timeout: float | None, name: str, interrupted: int = EXIT_FAILED) -> int:
    """Run the coroutine function ``main(reactor)`` on the reactor until it
    returns an exit status (at most ``timeout`` s); a failure is reported in
    one line with exit status 1.  Stopped before (Ctrl-C): ``interrupted``."""
    from twisted.internet import reactor as default_reactor
    from twisted.internet.defer import Deferred

    from allspark.client import PreConnectionError

    reactor: Any = default_reactor
    status = [interrupted]

    def done(code: int) -> None:
        status[0] = code

    def failed(failure: Any) -> None:
        error = failure.value
        if isinstance(error, PreConnectionError):
            _say(f"allspark {name}: pre-connection refused: {error}")
        elif type(error).__name__ in ("TimeoutError", "CancelledError"):
            _say(f"allspark {name}: no answer within {timeout}s")
        else:
            _say(f"allspark {name}: {type(error).__name__}: {error}")

    def start() -> None:
        d = Deferred.fromCoroutine(main(reactor))
        if timeout is not None:
            d.addTimeout(timeout, reactor)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop() if reactor.running else None)

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]


# ------------------------------------------------------------------------------ status


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, metavar="URL",
                        help="the cluster's store: sqlite:///path/allspark.db, postgresql://..., mongodb://...")
    parser.add_argument("--json", action="store_true", help="print the servers as a JSON array")
    parser.add_argument("--dead-after", type=_positive_seconds, default=10.0,
                        help="seconds without a heartbeat after which a server is dead "
                             "(the servers' --server-dead-after, default 10)")


def server_rows(records: Sequence[Any], now_ms: int, dead_after_ms: int) -> list[dict[str, Any]]:
    """The cluster as ``status`` shows it: each server's id, address, state
    (``live``, ``draining``, or ``dead`` when its heartbeat is older than
    ``dead_after_ms``), connections, capacity, load (connections over
    capacity, in percent) and heartbeat age, sorted by id."""
    rows = []
    for r in sorted(records, key=lambda record: record.server_id):
        age = max(0, now_ms - r.heartbeat_ms)
        rows.append({
            "server_id": r.server_id, "host": r.host, "port": r.port, "scheme": r.scheme,
            "proxy_address": r.proxy_address, "state": r.state if age <= dead_after_ms else "dead",
            "connections": r.connections, "capacity": r.capacity,
            "load_percent": round(100.0 * r.connections / r.capacity, 1) if r.capacity else None,
            "heartbeat_age_ms": age, "started_ms": r.started_ms,
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` (from :func:`server_rows`) as an aligned text table."""
    header = ("SERVER", "STATE", "CONNECTIONS", "LOAD", "HEARTBEAT", "ADDRESS")
    lines = [header]
    for row in rows:
        address = f"{row['scheme']}://{row['host']}:{row['port']}"
        if row["proxy_address"]:
            address += f" (proxy {row['proxy_address']})"
        load = "-" if row["load_percent"] is None else f"{row['load_percent']}%"
        lines.append((row["server_id"], row["state"], f"{row['connections']}/{row['capacity']}", load,
                      f"{row['heartbeat_age_ms'] / 1000:.1f}s ago", address))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = ["  ".join([*(cell.ljust(width) for cell, width in zip(line, widths)), line[-1]]).rstrip()
           for line in lines]
    if not rows:
        out.append("(no server records in this store)")
    return "\n".join(out)


def _run_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Read the server records from the store and print them (a table, or
    JSON with ``--json``).  Exit 0 when the store could be read, 1 when not."""
    from allspark.store import open_store

    from twisted.internet import reactor as default_reactor

    url = args.store
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        path = path[2:] if path.startswith("///") else path
        if path and not os.path.exists(path):
            raise UsageError(f"no SQLite store at {path}")
    try:
        store = open_store(url, default_reactor)  # builds it only: no I/O yet
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    async def status(reactor: Any) -> int:
        await store.start()
        try:
            records = await store.list_servers()
        finally:
            await store.close()
        rows = server_rows(records, int(reactor.seconds() * 1000), int(args.dead_after * 1000))
        print(json.dumps(rows, indent=2) if args.json else format_table(rows), flush=True)
        return 0

    return _react(status, 30.0, "status")


#: Every subcommand by name; add new ones here.
SUBCOMMANDS: dict[str, Subcommand] = {
    "keygen": Subcommand(
        help="mint an auth key (JWT) for a node",
        configure=_configure_keygen,
        run=_run_keygen,
    ),
    "drain": Subcommand(
        help="ask a server to drain and stop (its clients move to other servers)",
        configure=_configure_drain,
        run=_run_drain,
    ),
    "send": Subcommand(
        help="connect, send one message, print the accepted answer",
        configure=_configure_send,
        run=_run_send,
    ),
    "listen": Subcommand(
        help="connect as a node, print its messages as JSON lines and ack them",
        configure=_configure_listen,
        run=_run_listen,
    ),
    "status": Subcommand(
        help="the cluster's servers, their state and load, read from the store",
        configure=_configure_status,
        run=_run_status,
    ),
}


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="allspark", description="Allspark realtime messaging router tools"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command.configure(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``allspark`` tool with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    0 on success, 2 for bad usage, a missing or unsafe secret, or an unreadable key file.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports errors (status 2) and --help (0) this way
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("allspark: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        return SUBCOMMANDS[args.command].run(args, os.environ)
    except UsageError as exc:
        print(f"allspark {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
