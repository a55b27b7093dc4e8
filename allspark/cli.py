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
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
