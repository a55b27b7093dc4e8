"""``twistd allspark``: the options (the seed's flags and ours) and
:func:`makeService`, the one composition root.

makeService builds objects and does no network or store I/O: twistd calls it
before it binds ports and drops privileges.  It reads the secret files named
by the options, nothing else.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

from twisted.python import usage

DEFAULT_PORT = 8080


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be a positive number")
    return number


class _NamedParameter(usage.CoerceParameter):
    """twistd's coercion of an option value, with a usage error that names
    the option and the value (twistd's says only "Parameter type
    enforcement failed")."""

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} requires a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}={value}: {e}") from None


class Options(usage.Options):
    """Command-line options of ``twistd allspark``."""

    synopsis = "[options]"
    longdesc = (
        "Run one Allspark server node. HTTP (pre-connection, health, sessions) and the "
        "client WebSocket share one port. Secrets come from ALLSPARK_AUTH_SECRET or "
        "--auth-secret-file, never from the command line itself."
    )
    optFlags = [
        ["force", None, "take back this server's identity (host_address, port) after an unclean stop"],
        ["no-metrics", None, "serve no Prometheus metrics (default: /metrics on the client port, or on "
                             "--metrics-port)"],
        ["demo", None, "serve the demo chat page at /demo/ and let ANYONE mint an auth key for any name "
                       "(POST /demo/key): for trying Allspark, never in production"],
    ]
    optParameters = [
        ["host_address", None, "127.0.0.1", "address clients and peers reach this server at"],
        ["port", "p", DEFAULT_PORT, "port clients are sent to, and listened on unless --listen says otherwise "
                                    "(HTTP and WebSocket)", int],
        ["proxy_80_port", None, None, "proxy in front of this node (e.g. nginx): host[:port] for ws://, "
                                      "or a URL such as wss://chat.example.com"],
        ["log_level", None, "info", "debug, info, warn or error"],
        ["metrics-port", None, None, "serve /metrics on this port of 127.0.0.1 only, instead of on the "
                                     "client port", int],
        ["store", None, None, "sqlite:///path/allspark.db (default: allspark.db in --data-dir), "
                              "memory:, postgresql://user@host:port/db, or mongodb://host/db"],
        ["data-dir", None, "data", "directory for the default SQLite store and the identity claim"],
        ["server-id", None, None, "this server's node_id (default: host_address:port)"],
        ["auth-secret-file", None, None, "file of auth secrets, one per line, first one current "
                                         "(default: $ALLSPARK_AUTH_SECRET)"],
        ["cluster-secret-file", None, None, "file holding the cluster secret "
                                            "(default: $ALLSPARK_CLUSTER_SECRET, else derived from the auth secret)"],
        ["api-key-file", None, None, "file of server API keys (Authorization: Bearer), one per line "
                                     "(default: $ALLSPARK_API_KEYS; none: the API under /api/v1 is off)"],
        ["push-config", None, None, "TOML file of push notification settings ([push]) and providers ([fcm], "
                                    "[apns], [webpush], [webhook]); see docs/push.md (default: no pushes)"],
        ["max-connections", None, 10_000, "most client connections this server accepts", _positive_int],
        ["max-connections-per-node", None, 10, "most connections one node_id may hold; one more closes "
                                               "that node's oldest connection with 4009", _positive_int],
        ["request-timeout", None, 10.0, "seconds a client has to send a complete HTTP request or WebSocket "
                                        "handshake (and an idle keep-alive connection stays open)",
         _positive_float],
        ["log-format", None, "text", "text, or json (one JSON object per line, with structured fields)"],
        ["max-message-size", None, 64 * 1024, "largest frame in bytes; bigger closes with 1009", _positive_int],
        ["max-queue-bytes", None, 8 * 1024 * 1024, "send queue bound per connection in bytes", _positive_int],
        ["max-rate", None, 1000.0, "frames per second one connection may send, sustained", _positive_float],
        ["max-burst", None, 5000.0, "frames one connection may send at once before --max-rate applies",
         _positive_float],
        ["max-refused", None, 50_000.0, "frames over the rate limit one connection may send (each refused "
                                        "with rate_limited; drained at --max-rate per second) before it "
                                        "is closed with 1008", _positive_float],
        ["heartbeat", None, 30.0, "seconds between WebSocket pings", _positive_float],
        ["retention-days", None, 30.0, "days an unacked message is kept", _positive_float],
        ["retention-seconds", None, None, "seconds an unacked message is kept (overrides "
                                          "--retention-days; for tests)", _positive_float],
        ["purge-interval", None, 3600.0, "seconds between background retention purges", _positive_float],
        ["max-inbox-per-sender", None, 10_000, "unacked messages one sender may have in one inbox; "
                                               "more are refused with inbox_full", _positive_int],
        ["max-inbox", None, 100_000, "unacked messages one inbox may hold; more are refused with inbox_full",
         _positive_int],
        ["max-session-rows-per-sender", None, 10_000, "messages one sender may add to one session's stream "
                                                      "per --session-quota-window; more get session_full",
         _positive_int],
        ["max-session-rows", None, 100_000, "messages one session's stream takes per --session-quota-window "
                                            "from all senders; more get session_full", _positive_int],
        ["session-quota-window", None, 60.0, "seconds of the window the session quotas count in",
         _positive_float],
        ["peer-tls-ca", None, None, "PEM file of the CA that signs the peers' certificates: a wss:// peer "
                                    "link is verified against it and the peer's host (default: the "
                                    "system's trust store)"],
        ["peer-tls-cert", None, None, "PEM certificate this server presents on its wss:// peer links "
                                      "(mutual TLS; with --peer-tls-key)"],
        ["peer-tls-key", None, None, "PEM private key of --peer-tls-cert"],
        ["peer-heartbeat", None, 5.0, "seconds between pings on a peer link (unanswered for twice that: "
                                      "the link is dropped and dialled again)", _positive_float],
        ["session-cache-ttl", None, 5.0, "seconds a server serves a session's membership from its cache "
                                         "before reading it again (the bound on stale membership when a "
                                         "peer's invalidation is missed)", _positive_float],
        ["peer-max-queue-bytes", None, 64 * 1024 * 1024, "send queue bound per peer link in bytes; an "
                                                         "overflow closes the link", _positive_int],
        ["server-heartbeat", None, 2.0, "seconds between heartbeats of this server's record in the store "
                                        "(state, connections)", _positive_float],
        ["server-dead-after", None, 10.0, "seconds without a heartbeat after which a server is dead: never "
                                          "handed out again (at least twice --server-heartbeat)",
         _positive_float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["auth-public-key-file"] = []
        self["trusted-proxy"] = []
        self["allowed-origin"] = []
        self["peer"] = []
        self["api-sender-id"] = []
        for name, handler in list(self._dispatch.items()):
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedParameter(self, handler.coerce)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse the options.  Under twistd, a usage error is printed as one
        short line (and a pointer to ``--help``) and exits with status 1;
        twistd itself would print its whole help before the error."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            sys.stderr.write(f"twistd allspark: error: {e}\nRun 'twistd allspark --help' for the options.\n")
            raise SystemExit(1) from None

    def opt_allowed_origin(self, origin: str) -> None:
        """browser origin (scheme://host[:port]) whose pages may use the HTTP API (CORS) and open
        WebSockets, besides this server's own (repeatable; none: same origin only)"""
        self["allowed-origin"].append(origin)

    def opt_trusted_proxy(self, network: str) -> None:
        """proxy address or CIDR network whose X-Forwarded-For/X-Real-IP are believed (repeatable)"""
        self["trusted-proxy"].append(network)

    def opt_listen(self, description: str) -> None:
        """endpoint such as tcp:8080:interface=0.0.0.0 or ssl:8443:privateKey=k.pem (repeatable)"""
        self["listen"].append(description)

    def opt_peer(self, spec: str) -> None:
        """a peer server to link with, as SERVER_ID=ws://host:port/peer (or
        wss://; repeatable), besides those found in the store"""
        self["peer"].append(spec)

    def opt_api_sender_id(self, node_id: str) -> None:
        """node id the server API publishes as (src_id for recipients; repeatable: a publish picks one
        with sender_id, default the first; default: app)"""
        self["api-sender-id"].append(node_id)

    def opt_auth_public_key_file(self, path: str) -> None:
        """PEM public key (RS256/ES256) that also verifies auth keys (repeatable)"""
        self["auth-public-key-file"].append(path)

    def postOptions(self) -> None:
        from allspark.auth import load_secrets
        from allspark.ids import is_valid_id
        from allspark.logs import FORMATS, LEVELS
        from allspark.mesh import static_peers
        from allspark.origins import check_allowed_origin

        if self["log_level"] not in LEVELS:
            raise usage.UsageError(f"--log_level must be one of {', '.join(sorted(LEVELS))}")
        if self["log-format"] not in FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}")
        if self["log-format"] == "json" and self.parent is not None and self.parent.get("syslog"):
            raise usage.UsageError("--log-format=json writes to stdout or twistd's --logfile, not to --syslog")
        try:
            self["allowed-origin"] = [check_allowed_origin(o) for o in self["allowed-origin"]]
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        for network in self["trusted-proxy"]:
            try:
                ipaddress.ip_network(network.strip(), strict=False)
            except ValueError:
                raise usage.UsageError(
                    f"--trusted-proxy {network!r} is not an IP address or CIDR network") from None
        if not 0 < self["port"] < 65536:
            raise usage.UsageError("--port must be 1-65535")
        if self["metrics-port"] is not None and not 0 < self["metrics-port"] < 65536:
            raise usage.UsageError("--metrics-port must be 1-65535")
        ports = [_listen_port(d) for d in self["listen"]]
        if self["listen"] and self["port"] not in ports:
            raise usage.UsageError(
                f"--port ({self['port']}) is the port clients are sent to: it must be one of the "
                f"--listen ports ({', '.join(str(p) for p in ports if p is not None) or 'none found'})"
            )
        if self["server-dead-after"] < 2 * self["server-heartbeat"]:
            raise usage.UsageError("--server-dead-after must be at least twice --server-heartbeat")
        if self["server-id"] is None:
            self["server-id"] = f"{self['host_address']}:{self['port']}"
        if not is_valid_id(self["server-id"]):
            raise usage.UsageError("--server-id must be 1-128 characters of [A-Za-z0-9_.:@-]")
        if self["store"] is None:
            self["store"] = "sqlite://" + os.path.abspath(os.path.join(self["data-dir"], "allspark.db"))
        try:
            self["auth-secrets"] = load_secrets(os.environ, self["auth-secret-file"])
            self["public-keys"] = [_read(path) for path in self["auth-public-key-file"]]
            self["cluster-secret"] = _cluster_secret(self["cluster-secret-file"])
            self["api-keys"] = _api_keys(self["api-key-file"], self["api-sender-id"])
            self["peer-tls"] = _peer_tls(self["peer-tls-ca"], self["peer-tls-cert"], self["peer-tls-key"])
            static_peers(self["peer"])  # checks the --peer values
            self["push"] = _push_config(self["push-config"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(str(e)) from None


def _api_keys(key_file: str | None, senders: list[str]) -> list[bytes]:
    """The server API's keys (:func:`allspark.api.load_api_keys`), after
    checking the ``--api-sender-id`` values."""
    from allspark.api import load_api_keys
    from allspark.ids import is_valid_id

    for node_id in senders:
        if not is_valid_id(node_id):
            raise ValueError(f"--api-sender-id {node_id!r} is not 1-128 characters of [A-Za-z0-9_.:@-]")
    return load_api_keys(os.environ, key_file)


def _listen_port(description: str) -> int | None:
    """The port of a ``tcp:``/``ssl:`` endpoint description, if it names one."""
    parts = description.split(":")
    if parts[0] not in ("tcp", "ssl", "tcp6", "ssl6") or len(parts) < 2:
        return None
    for part in parts[1:]:
        key, _, value = part.rpartition("=")
        if key in ("", "port") and value.isdigit():
            return int(value)
    return None


def _endpoint_quote(value: str) -> str:
    """``value`` inside an endpoint description (an IPv6 address has colons)."""
    return value.replace(":", "\\:")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _cluster_secret(path: str | None) -> bytes | None:
    if path is not None:
        secret = _read(path).strip()
    else:
        secret = os.environ.get("ALLSPARK_CLUSTER_SECRET", "").strip().encode()
    if not secret:
        return None
    if len(secret) < 16:
        raise ValueError("the cluster secret is too short to be safe (16 bytes at least)")
    return secret


def _push_config(path: str | None) -> Any:
    """The loaded ``--push-config`` (its providers built, their secrets
    read), or None; a bad file raises ``PushConfigError`` (a ValueError)."""
    if path is None:
        return None
    from twisted.internet import reactor

    from allspark.push.config import load_push_config

    return load_push_config(path, reactor)


def _peer_tls(ca: str | None, cert: str | None, key: str | None) -> Any:
    """The TLS settings of peer links from the ``--peer-tls-*`` files."""
    from allspark.mesh import PeerTLS

    if (cert is None) != (key is None):
        raise ValueError("--peer-tls-cert and --peer-tls-key go together")
    return PeerTLS(ca_pem=_read(ca) if ca else None, cert_pem=_read(cert) if cert else None,
                   key_pem=_read(key) if key else None)


def _retention_ms(days: float, seconds: float | None) -> int:
    """How long unacked messages are kept, in ms: ``seconds`` when given, else ``days``."""
    if seconds is not None:
        return max(1, int(seconds * 1000))
    return int(days * 86_400_000)


def _serve_metrics(server: Any, counts: Any, site: Any, service: Any, port: int | None) -> None:
    """``/metrics`` for Prometheus (allspark.metrics): on the client port's
    site, or, with ``port``, on a site of its own listening on 127.0.0.1
    only (a child of ``service``, started before the client ports)."""
    from twisted.internet import reactor

    from allspark.metrics import MetricsPort, ServerCollector, metrics_registry, metrics_resource

    def push_stats() -> Any:  # the dispatcher's (provider, outcome) counts, when push is configured
        return getattr(getattr(getattr(server, "push", None), "dispatcher", None), "stats", None)

    resource = metrics_resource(metrics_registry(ServerCollector(server, counts, push_stats)))
    if port is None:
        site.resource.putChild(b"metrics", resource)
        return
    MetricsPort(reactor, port, resource).setServiceParent(service)


def _wire_push(push: Any, server: Any, service: Any, reactor: Any) -> None:
    """Push notifications from a loaded ``--push-config``: the scheduler
    hears of stored copies from the inbox and the sessions, and is a child
    service (started after the store, stopped before it closes)."""
    import secrets as random_secrets

    from allspark.push.dispatcher import Dispatcher
    from allspark.push.scheduler import PushScheduler

    owner = f"{server.config.server_id}/{random_secrets.token_hex(6)}"
    scheduler = PushScheduler(server.store, server.delivery, Dispatcher(push.providers, push.settings, reactor),
                              push.settings, reactor, owner)
    server.inbox.push = scheduler
    server.sessions.push = scheduler
    server.push = scheduler
    # register_push answers "active" for the providers configured here
    server.push_providers = push.provider_names
    service.addService(scheduler)


def _server_api(server: Any, mesh: Any, options: Options) -> Any:
    """The server API's ``/api`` resource (:mod:`allspark.api`), and the
    peer frames it sends handled here: ``disconnect`` closes a node's
    connections, ``drain`` drains this server."""
    from allspark.api import DEFAULT_SENDER_ID, ApiConfig, ServerAPI

    def drain_for_peer() -> None:
        if server.request_drain is not None and not server.draining:
            server.request_drain()

    mesh.on_disconnect = server.close_node
    mesh.on_drain = drain_for_peer
    senders = tuple(options["api-sender-id"]) or (DEFAULT_SENDER_ID,)
    return ServerAPI(server, ApiConfig(tuple(options["api-keys"]), senders))


def makeService(options: Options) -> Any:
    """Compose one server from ``options``."""
    from twisted.internet import reactor

    from allspark.auth import AuthKeyVerifier, ValidationTokens, derive_token_key
    from allspark.inbox import DeliveryConfig
    from allspark.logs import json_observer, set_level, twistd_log_file
    from allspark.mesh import PEER_PATH, Mesh, PeerLimits, combined_peers, record_peers, static_peers
    from allspark.cluster import AdminAuth, derive_admin_key
    from allspark.server import Server, ServerConfig, ServerService
    from allspark.push.registration import push_resources
    from allspark.sessions import session_resources
    from allspark.store import open_store
    from allspark.web import build_site
    from allspark.ws import ClientFactory, SocketLimits

    set_level(options["log_level"])
    host = options["host_address"]
    listen = tuple(options["listen"]) or (f"tcp:{options['port']}:interface={_endpoint_quote(host)}",)
    # the scheme of ws_url is that of the listen port clients are sent to
    advertised = next(d for d in listen if _listen_port(d) == options["port"])
    limits = SocketLimits(
        max_message_size=options["max-message-size"],
        max_queue_bytes=options["max-queue-bytes"],
        heartbeat=options["heartbeat"],
        max_rate=options["max-rate"],
        max_burst=options["max-burst"],
        max_refused=options["max-refused"],
        heartbeat_timeout=max(5.0, options["heartbeat"] * 2 / 3),
    )
    config = ServerConfig(
        server_id=options["server-id"],
        host=host,
        port=options["port"],
        listen=listen,
        proxy_address=options["proxy_80_port"],
        scheme="wss" if advertised.startswith("ssl") else "ws",
        data_dir=options["data-dir"],
        force=bool(options["force"]),
        max_connections=options["max-connections"],
        max_connections_per_node=options["max-connections-per-node"],
        request_timeout=options["request-timeout"],
        server_heartbeat=options["server-heartbeat"],
        server_dead_after=options["server-dead-after"],
        session_cache_ttl=options["session-cache-ttl"],
        trusted_proxies=tuple(options["trusted-proxy"]),
        allowed_origins=tuple(options["allowed-origin"]),
        limits=limits,
        delivery=DeliveryConfig(
            retention_ms=_retention_ms(options["retention-days"], options["retention-seconds"]),
            purge_interval_s=options["purge-interval"],
            max_inbox_per_sender=options["max-inbox-per-sender"],
            max_inbox=options["max-inbox"],
            max_session_rows_per_sender=options["max-session-rows-per-sender"],
            max_session_rows=options["max-session-rows"],
            session_quota_window_ms=max(1, int(options["session-quota-window"] * 1000)),
        ),
    )
    secrets = options["auth-secrets"]
    verifier = AuthKeyVerifier(secrets, options["public-keys"])
    token_key = derive_token_key(options["cluster-secret"] or secrets[0])
    tokens = ValidationTokens(token_key, config.server_id, reactor)
    store = open_store(options["store"], reactor)
    server = Server(config, store, verifier, tokens, reactor)
    server.new_sessions()
    # peers: the --peer options, and every live server in the store's records
    peers = combined_peers(static_peers(options["peer"]), record_peers(server.cluster))
    mesh = Mesh(config.server_id, options["cluster-secret"], reactor, peers,
                server.delivery.deliver_local,
                PeerLimits(heartbeat=options["peer-heartbeat"], heartbeat_timeout=options["peer-heartbeat"] * 2,
                           max_queue_bytes=options["peer-max-queue-bytes"]),
                options["peer-tls"])
    server.delivery.remote = mesh
    # no link yet: the delivery point skips the mesh until one comes up
    mesh.on_links_changed.append(server.delivery.links_changed)
    server.delivery.links_changed(bool(mesh.links))
    if options["cluster-secret"]:
        from allspark.locations import LocationTracker

        server.locations = LocationTracker(config.server_id, store, mesh, reactor, server.cluster)
    if options["cluster-secret"]:
        server.admin = AdminAuth(derive_admin_key(options["cluster-secret"]), config.server_id, reactor)
    server.mesh = mesh
    server.share_caches(mesh)
    ws_factory = ClientFactory(server, limits)
    site = build_site(server, ws_factory, {**session_resources(server), **push_resources(server),
                                           PEER_PATH.encode(): mesh.resource(),
                                           b"api": _server_api(server, mesh, options)})
    if options["demo"]:
        from allspark.demo import demo_resource

        site.resource.putChild(b"demo", demo_resource(secrets[0], reactor))
    service = ServerService(server, site, reactor)
    service.mesh = mesh
    if options["push"] is not None:
        _wire_push(options["push"], server, service, reactor)
    if not options["no-metrics"]:
        _serve_metrics(server, ws_factory.counts, site, service, options["metrics-port"])
    if options["log-format"] == "json":
        service.log_observer = json_observer(twistd_log_file(options.parent))
    return service
