"""One running Allspark server: its parts, its control ops and its life cycle.

:class:`Server` holds the registry, inbox, router and sessions of this process
and answers control frames.  :class:`ServerService` is the Twisted service
that starts the store, claims the server's identity, listens, and on stop
drains: it stops accepting, closes every client socket with 1001 and closes
the store.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Protocol, runtime_checkable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from allspark.logs import logger

from allspark.auth import AuthKeyVerifier, ValidationTokens
from allspark.envelope import DEFAULT_SYNC_LIMIT, Control, FrameError, encode
from allspark.cluster import (
    DEFAULT_DEAD_AFTER_S,
    DEFAULT_HEARTBEAT_S,
    AdminAuth,
    ClaimRefused,
    ClusterRecords,
    beat_now,
    new_holder,
    pre_connection_url,
)
from allspark.delivery import Delivery
from allspark.inbox import DeliveryConfig, Inbox, fetch_rows, now_ms
from allspark.push.registration import PushRegistration
from allspark.registry import Registry
from allspark.revocations import Revocations
from allspark.router import Router
from allspark.store import ServerRecord, Store
from allspark.ws import SocketLimits

if TYPE_CHECKING:
    from allspark.push.scheduler import PushScheduler
    from allspark.ws import ClientProtocol

log = logger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server is told at start (see ``allspark.tap.Options``)."""

    server_id: str
    host: str
    port: int
    listen: tuple[str, ...]
    proxy_address: str | None = None
    scheme: str = "ws"
    ws_path: str = "ws"
    data_dir: str = "data"
    force: bool = False
    max_connections: int = 10_000
    #: connections one node may hold; one more closes its oldest with 4009
    max_connections_per_node: int = 10
    #: seconds a connection has to send a complete HTTP request (slowloris)
    request_timeout: float = 10.0
    #: peers (addresses or CIDR networks) whose X-Forwarded-For is believed
    trusted_proxies: tuple[str, ...] = ()
    #: browser origins besides the server's own that may use it (--allowed-origin; allspark.origins)
    allowed_origins: tuple[str, ...] = ()
    limits: SocketLimits = field(default_factory=SocketLimits)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    drain_timeout: float = 5.0
    #: seconds between heartbeats of this server's record in the store (--server-heartbeat)
    server_heartbeat: float = DEFAULT_HEARTBEAT_S
    #: seconds without a heartbeat after which a server is dead (--server-dead-after)
    server_dead_after: float = DEFAULT_DEAD_AFTER_S
    #: seconds a cached session (membership, options) is served before it is
    #: read from the store again (--session-cache-ttl): the bound on stale
    #: membership when a peer's invalidation was missed
    session_cache_ttl: float = 5.0


class Server:
    """The parts of one server process, wired together."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        verifier: AuthKeyVerifier,
        tokens: ValidationTokens,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self.store = store
        self.verifier = verifier
        self.tokens = tokens
        self.clock = clock
        self.registry = Registry()
        #: the one delivery point; the mesh sets ``delivery.remote``
        self.delivery = Delivery(self.registry, clock)
        self.inbox = Inbox(store, self.delivery, clock, config.delivery)
        self.router = Router(self.delivery, store, self.inbox, clock, config.limits.max_message_size)
        self.sessions: Any = None  # allspark.sessions.Sessions, set by new_sessions()
        #: who is online (allspark.presence.Presence), set by new_sessions()
        self.presence: Any = None
        #: the peer links (allspark.mesh.Mesh), set by the composition root
        self.mesh: Any = None
        #: this server's locations (allspark.locations.LocationTracker), set with the mesh
        self.locations: Any = None
        self.draining = False
        #: true from the service's start until this server's record is claimed:
        #: handshakes and pre-connections are refused meanwhile
        self.starting = False
        self.started_at = now_ms(clock)
        #: checks admin tokens (POST /admin/drain); None without a cluster secret
        self.admin: AdminAuth | None = None
        #: starts a drain, as SIGTERM does (set by ServerService)
        self.request_drain: Callable[[], None] | None = None
        #: this server's record in the store and the cluster view (allspark.cluster)
        self.cluster = ClusterRecords(
            store,
            ServerRecord(config.server_id, new_holder(), config.host, config.port, config.proxy_address,
                         config.scheme, config.max_connections, 0, "live", 0, 0),
            clock,
            connections=lambda: len(self.registry),
            state=lambda: "draining" if self.draining else "live",
            heartbeat_s=config.server_heartbeat,
            dead_after_s=config.server_dead_after,
        )
        # connections with a sync being answered (one at a time each)
        self._syncing: set[Any] = set()
        #: revoked nodes (the server API's disconnect): refused at pre-connection and handshake
        self.revocations = Revocations(store, clock)
        #: register_push, unregister_push, mute_push (socket and HTTP)
        self.push_registration = PushRegistration(store, clock)
        #: the push scheduler (``--push-config``; allspark.push.scheduler), else None
        self.push: PushScheduler | None = None

    @property
    def push_providers(self) -> frozenset[str]:
        """The push providers this server has configured (``--push-config``);
        ``register_push`` answers ``active`` from them.  Empty by default."""
        return self.push_registration.push_providers

    @push_providers.setter
    def push_providers(self, names: frozenset[str]) -> None:
        self.push_registration.push_providers = frozenset(names)

    def new_sessions(self) -> Any:
        """Build this server's :class:`~allspark.sessions.Sessions` from its
        collaborators and wire it to the router; returns it."""
        from allspark.sessions import Sessions

        self.sessions = Sessions(self.store, self.delivery, self.router, self.clock,
                                 self.config.delivery, self.config.limits.max_message_size,
                                 cache_ttl=self.config.session_cache_ttl)
        self.router.sessions = self.sessions
        from allspark.presence import Presence

        self.presence = Presence(self.store, self.delivery, self.sessions, self.clock,
                                 self.config.limits.max_message_size)
        self.sessions.add_op("presence", self.presence.query)
        return self.sessions

    def share_caches(self, mesh: Any) -> None:
        """Keep the caches of this server and its peers consistent over
        ``mesh`` (an :class:`allspark.mesh.Mesh`): a session change made here
        is sent to every peer as ``invalidate`` (``what: "session"``, ``key``:
        the session id), one received drops the cached session, and a link
        coming up drops every cached session (what changed while it was down
        was not reported).  A server that starts draining sends ``invalidate``
        (``what: "server"``, ``key``: its id) once its record says so, and a
        peer that gets it reads the cluster view from the store at once, so
        its balancer stops naming the draining server now rather than at its
        next heartbeat; a link coming up reads it too (the peer may be new).  The router's caches need nothing: known node ids
        only grow (nodes are never forgotten) and a client's nodes are read
        from the store for each message."""
        from functools import partial

        cluster = self.cluster

        def reread_cluster_view(server_id: str) -> None:
            ensureDeferred(cluster.refresh()).addErrback(
                lambda f: log.failure("could not read the cluster view after {server_id} changed", f,
                                      server_id=server_id))

        mesh.invalidation_handlers["server"] = reread_cluster_view
        mesh.on_link_up.append(reread_cluster_view)
        sessions = self.sessions
        if sessions is None:
            return
        sessions.announce = partial(mesh.invalidate, "session")
        mesh.invalidation_handlers["session"] = partial(sessions.membership_changed, from_peer=True)
        mesh.on_link_up.append(sessions.drop_all)

    # -- connections ------------------------------------------------------
    def on_connected(self, conn: "ClientProtocol") -> None:
        """A client finished its handshake: remember its node."""
        d = self.store.remember_node(conn.node_id, conn.client_id, now_ms(self.clock))
        d.addErrback(lambda f: log.failure("could not remember node {node_id}", f, node_id=conn.node_id))
        if self.locations is not None:
            self.locations.connected(conn)  # its sync waits for this (see _sync)

    def close_node(self, node_id: str, reason: str, revoked_until_ms: int | None = None) -> int:
        """Close every connection ``node_id`` has on this server (the server
        API's disconnect, here or from a peer's ``disconnect`` frame): with
        4011 ``revoked: <reason>`` while a revocation is in force, else 4010
        ``disconnected: <reason>``.  ``revoked_until_ms`` (Unix ms, 0: lifted)
        goes into the revocation cache first.  How many were closed."""
        from allspark.ws import CLOSE_DISCONNECTED, CLOSE_REVOKED

        if revoked_until_ms is not None:
            self.revocations.note(node_id, revoked_until_ms)
        revoked = revoked_until_ms is not None and self.revocations.revoked_now(revoked_until_ms)
        code, word = (CLOSE_REVOKED, "revoked") if revoked else (CLOSE_DISCONNECTED, "disconnected")
        # a close reason is at most 123 bytes of UTF-8: cut between characters
        text = (f"{word}: {reason}" if reason else word).encode()[:120].decode("utf-8", "ignore")
        closed = 0
        for conn in list(self.registry.connections(node_id)):
            close = getattr(conn, "close_for_policy", None)
            if close is not None:
                close(code, text)
                closed += 1
        if closed:
            log.info("closed {count} connections of {node_id}: {word}", count=closed, node_id=node_id,
                     word=word, reason=reason, revoked_until=revoked_until_ms)
        return closed

    def on_disconnected(self, conn: "ClientProtocol") -> None:
        """A client connection closed: its location goes."""
        if self.locations is not None:
            self.locations.disconnected(conn)

    # -- control frames ---------------------------------------------------
    async def control(self, conn: "ClientProtocol", frame: Control) -> dict[str, Any] | None:
        """Answer one control frame; the reply frame, or None when the op
        wrote its own frames."""
        args = frame.args
        op = frame.op
        if op == "ping":
            return {"op": "pong", "timestamp": now_ms(self.clock)}
        if op == "sync":
            return await self._sync(conn, frame)
        if op == "ack":
            if "session_id" in args:
                return await self._sessions().ack(conn.sender, args["session_id"], args["upto"])
            return await self.inbox.ack(conn.node_id, args["upto"])
        if op in PushRegistration.OPS:
            assert conn.sender is not None  # set by the handshake, before any frame
            return await self.push_registration.control(conn.sender, frame)
        return await self._sessions().control(conn.sender, frame)

    async def _sync(self, conn: "ClientProtocol", frame: Control) -> dict[str, Any] | None:
        """Answer ``sync``; at most one per connection at a time (another one
        meanwhile is refused with ``sync_in_progress``).

        With ``session_id``: one page of that session's stream (``synced``,
        ``more`` when it stopped early).  Without: everything the node
        missed, in parts: its inbox after ``after``, then every session with
        rows past the member's cursor, each part ending with its ``synced``
        (with ``session_id`` for sessions; all carry the request's ``id``),
        and the answer is ``sync_done``.  It waits for a socket that is
        behind to drain instead of stopping (see :func:`allspark.inbox.write_rows`);
        a connection that closes meanwhile ends it without an answer.
        """
        if conn in self._syncing:
            raise FrameError("sync_in_progress",
                             "this connection's previous sync is still being answered: wait for its answer")
        self._syncing.add(conn)
        try:
            if self.locations is not None:
                # the moving-client order: the sync reads the store only once this
                # connection's location is written and known to every linked peer,
                # so a message committed after the read is forwarded here live
                await self.locations.ready(conn)
            args = frame.args
            limits = self.config.limits
            limit = args.get("limit", DEFAULT_SYNC_LIMIT)
            max_queued = limits.max_queue_bytes // 2
            rows = fetch_rows(limit, limits.max_message_size)
            if "session_id" in args:
                return await self._sessions().sync(conn, args["session_id"], args.get("after"), limit,
                                                   max_queued, rows)
            synced = await self.inbox.sync_all(conn, args.get("after", 0), rows, max_queued)
            if frame.id is not None:
                synced["id"] = frame.id
            conn.send(encode(synced))
            parts = 0
            if self.sessions is not None:
                parts = await self.sessions.sync_all(conn, rows, max_queued, frame.id)
            return {"op": "sync_done", "upto": synced["upto"], "sessions": parts}
        except ConnectionDone:
            return None  # nobody to answer
        finally:
            self._syncing.discard(conn)

    def _sessions(self) -> Any:
        if self.sessions is None:
            raise FrameError("unknown_op", "sessions are not served here")
        return self.sessions

    # -- status -----------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers (``peers``: the open peer links;
        ``cluster``: every server record this server last read, with its
        state ``live``, ``draining`` or ``dead``)."""
        body: dict[str, Any] = {
            "status": "ok",
            "node_id": self.config.server_id,
            "state": "draining" if self.draining else "starting" if self.starting else "live",
            "load": {
                "connections": len(self.registry),
                "nodes": self.registry.node_count(),
                "max_connections": self.config.max_connections,
            },
            "started_at": self.started_at,
        }
        if self.mesh is not None:
            body["peers"] = self.mesh.status()
        body["cluster"] = self.cluster.view()
        return body


class IdentityClaim:
    """The server's claim on its identity (host_address, port) in its data dir.

    A file ``server-<host>-<port>.json`` records the process holding it.  A
    live process holding it refuses a second start; a file left by a process
    that died without stopping (a crash) refuses the start unless ``--force``
    takes the identity back.  A clean stop removes the file.
    """

    def __init__(self, data_dir: str, host: str, port: int, server_id: str) -> None:
        self.path = os.path.join(data_dir, f"server-{host}-{port}.json")
        self.server_id = server_id
        self.held = False

    def claim(self, force: bool) -> None:
        """Take the identity, or raise ``RuntimeError`` saying why not."""
        try:
            with open(self.path) as f:
                held = json.load(f)
        except FileNotFoundError:
            held = None
        except ValueError:  # unreadable content: a claim nobody can be holding
            held = {"pid": None}
        if held is not None:
            pid = held.get("pid")
            alive = isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)
            if alive:
                raise RuntimeError(
                    f"server identity {self.server_id} is held by running process {pid}; stop it first"
                )
            if not force:
                raise RuntimeError(
                    f"server identity {self.server_id} was not released (the last run did not stop "
                    f"cleanly); start with --force to take it back"
                )
            log.warn("taking back server identity {server_id} (--force)", server_id=self.server_id)
        # the data dir, when made here, and the claim are the service user's alone
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump({"pid": os.getpid(), "server_id": self.server_id}, f)
        os.chmod(tmp, 0o600)  # a .tmp left by an older version keeps its mode through O_CREAT
        os.replace(tmp, self.path)
        self.held = True

    def release(self) -> None:
        """Give the identity up (clean stop).  A process that never took it
        (its start was refused) leaves the file alone: it is another
        process's, or a crashed one's that only ``--force`` may take."""
        if not self.held:
            return
        self.held = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running Allspark server (not a process that
    reused the pid of one that crashed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"allspark" in f.read().split(b"\0")  # twistd's subcommand
    except OSError:
        return True  # no /proc: assume it is ours


#: Allocations between young-generation collections (CPython's default: 700).
GC_THRESHOLD = (50_000, 20, 100)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running router.

    Every frame allocates short-lived objects (Deferreds, dicts, bytes) that
    reference counting frees; CPython's default of a young collection every
    700 allocations, and full collections that walk every live connection's
    objects, cost the durable path more than half its throughput when
    measured (benchmarks/, direct_durable).  Objects alive once the server
    is up are frozen out of collections, and collections run less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class StartFailed(Exception):
    """A start step that failed, with the operator's one-line reason."""


class StartRefused(Exception):
    """The server did not start (the reason is the message); raised out of
    :meth:`ServerService.startService` to end twistd with status 1."""


_excepthook_before_refusal: Callable[[type[BaseException], BaseException, Any], Any] = sys.__excepthook__


def _quiet_start_refused(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """``sys.excepthook`` once a start was refused: that refusal was said on
    stderr and in the log already, so it ends the process without a
    traceback; any other exception is printed as usual."""
    if isinstance(value, StartRefused):
        return
    _excepthook_before_refusal(kind, value, tb)


def _install_quiet_excepthook() -> None:
    global _excepthook_before_refusal
    if sys.excepthook is not _quiet_start_refused:
        _excepthook_before_refusal = sys.excepthook
        sys.excepthook = _quiet_start_refused


def _one_line(error: BaseException) -> str:
    """``error`` as one line: its message, or its type when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def _start_failure_reason(failure: Failure) -> str:
    """The one-line reason of a failed start."""
    value = failure.value
    if isinstance(value, StartFailed):
        return str(value)
    return _one_line(value) if isinstance(value, BaseException) else str(value)


def say_on_stderr(line: str) -> None:
    """Write ``line`` to the process's real stderr: twistd sends
    ``sys.stderr`` to its log, which goes to stdout in the foreground."""
    stream = sys.__stderr__ or sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # stderr closed (a daemon): the log has the reason


def exit_status_after_twistd(status: int) -> None:
    """Make the process exit with ``status`` once twistd is done.

    twistd returns normally (status 0) after its reactor stops, however it
    stopped; it has no way to return a status.  An :mod:`atexit` hook runs
    after twistd has cleaned up (the pid file removed, the log closed) and
    ends the process with ``status``, after flushing stdout and stderr.
    """

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    atexit.register(exit_now)


@runtime_checkable
class ClosableConnection(Protocol):
    """What the shutdown needs from a registered connection (client sockets,
    :class:`allspark.ws.ClientProtocol`), beyond the router's
    :class:`~allspark.registry.Connection`."""

    def going_away(self, reason: str) -> None: ...

    def still_connected(self) -> bool: ...

    def dropConnection(self, abort: bool = False) -> None: ...


class ServerService(service.MultiService):
    """Starts and stops one :class:`Server` inside twistd: the process's one
    composed service.

    Start, in order: the store; the mesh (:attr:`mesh`); child services
    added with :meth:`addService` (the push scheduler), each in the order added;
    the listening ports; this server's record in the store (the identity
    claim, :class:`~allspark.cluster.ClusterRecords`) and its heartbeat.
    Only then is the server ``live``: until its record is claimed it
    refuses handshakes and pre-connections (503), so the ports can be bound
    before twistd daemonizes (a port in use is refused at once) while no
    client is served by a server that does not hold its identity.  Stop
    is the reverse: drain (record marked ``draining``, clients told to
    reconnect and closed with 1001), the children in reverse order, the
    mesh, the record removed, the store closed.
    """

    def __init__(self, server: Server, site_factory: Any, reactor: Any) -> None:
        super().__init__()
        self.server = server
        self.site_factory = site_factory
        self.reactor = reactor
        self.ports: list[IListeningPort] = []
        self.claim = IdentityClaim(
            server.config.data_dir, server.config.host, server.config.port, server.config.server_id
        )
        self._retention: LoopingCall | None = None
        self._ready: Deferred[None] | None = None
        #: the peer links (allspark.mesh.Mesh): started after the store, before listening
        self.mesh: service.Service | None = None
        server.request_drain = self._drain_requested
        #: called with the exit status when a start fails after the reactor started
        self.exit_status_on_failure: Callable[[int], None] = exit_status_after_twistd
        #: set by ``--log-format=json``: the observer twistd logs to instead of its text one
        self.log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        """Join twistd's application.  With a :attr:`log_observer`, it becomes
        the application's log observer, which twistd starts logging to
        (instead of its text format) right after this."""
        super().setServiceParent(parent)
        if self.log_observer is not None and isinstance(parent, Componentized) \
                and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.log_observer)

    def startService(self) -> None:
        """Claim the identity, open the store and listen.

        A start that fails ends the process with exit status 1 and one line
        on stderr (``allspark: cannot start: <reason>``), so that a
        supervisor (systemd's ``Restart=on-failure``) sees it.  twistd calls
        this before it runs its reactor: what fails at once (identity
        claim, unwritable data dir, port in use, TLS key file missing, a
        store that cannot be opened) raises :class:`StartRefused` here, after
        giving back what was taken: twistd then exits with status 1 (in the
        foreground without a traceback, see :func:`_quiet_start_refused`; as
        a daemon, its parent prints the reason and exits 1, where a
        :class:`SystemExit` would leave it waiting forever).  What fails later (a store that stays
        locked by another process, a database server that does not answer)
        stops the reactor, which releases everything, and twistd's exit
        status is then made 1 (:func:`exit_status_after_twistd`).
        """
        try:
            self.claim.claim(self.server.config.force)
        except RuntimeError as e:
            self._refuse(str(e))
        except OSError as e:
            self._refuse(f"cannot use the data dir {self.server.config.data_dir!r} for the identity "
                         f"claim: {_one_line(e)}")
        service.Service.startService(self)  # children are started in order by _start
        self.server.starting = True
        self._ready = defer.ensureDeferred(self._start())
        if not self._ready.called:  # waiting for the store: fails later, if at all
            self._ready.addErrback(self._failed_start)
            return
        failed: list[Failure] = []
        self._ready.addErrback(failed.append)
        if failed:
            self._give_back()
            self._refuse(_start_failure_reason(failed[0]), failed[0])

    @staticmethod
    def _refuse(reason: str, failure: Failure | None = None) -> NoReturn:
        """End a start that failed before the reactor ran: the reason in the
        log and on stderr (one line), exit status 1."""
        if failure is not None and not failure.check(StartFailed):
            log.failure("cannot start: {reason}", failure, reason=reason)
        else:
            log.error("cannot start: {reason}", reason=reason)
        say_on_stderr(f"allspark: cannot start: {reason}")
        _install_quiet_excepthook()
        raise StartRefused(reason)

    def _give_back(self) -> None:
        """Undo a start that failed before the reactor ran: stop listening,
        close the store, release the identity claim."""
        for port in self.ports:
            port.stopListening()
        self.ports = []
        for child in reversed(list(self)):
            if child.running:
                child.stopService()
        if self.mesh is not None and self.mesh.running:
            self.mesh.stopService()
        released = defer.ensureDeferred(self.server.cluster.release())
        released.addErrback(lambda f: log.failure("removing this server's record failed", f))
        self.server.store.close().addErrback(lambda f: log.failure("closing the store failed", f))
        self.claim.release()

    async def _start(self) -> None:
        config = self.server.config
        try:
            await self.server.store.start()
        except Exception as e:
            raise StartFailed(f"cannot open the store: {_one_line(e)}") from e
        if self.mesh is not None:
            self.mesh.startService()
        for child in self:
            child.startService()
        for description in config.listen:
            try:
                endpoint = serverFromString(self.reactor, description)
                port = await endpoint.listen(self.site_factory)
            except Exception as e:
                raise StartFailed(f"cannot listen on {description}: {_one_line(e)}") from e
            self.ports.append(port)
            log.info("listening on {description}", description=description)
        cluster = self.server.cluster
        try:
            await cluster.claim(config.force)
        except ClaimRefused as e:
            raise StartFailed(str(e)) from e
        except Exception as e:
            raise StartFailed(f"cannot write this server's record to the store: {_one_line(e)}") from e
        cluster.on_lost = self._identity_lost
        cluster.start_heartbeat()
        if self.server.locations is not None:
            # locations a previous process of this id left (a crash) go before any client is taken
            await self.server.locations.start()
        self.server.starting = False
        self._retention = self.server.inbox.retention_loop()
        self._retention.start(config.delivery.purge_interval_s, now=True)
        tune_gc()
        log.info("server {server_id} is live", server_id=config.server_id)

    async def _reconnect_frame(self) -> dict[str, Any]:
        """The ``reconnect`` frame a draining server sends each client before
        closing it with 1001: ``pre_connection_url`` names the live server
        the balancer picks (none when no other server is live)."""
        frame: dict[str, Any] = {"op": "reconnect", "reason": "server shutting down",
                                 "server_id": self.server.config.server_id}
        cluster = self.server.cluster
        try:
            await cluster.refresh()
        except Exception:
            log.failure("could not read the cluster view while draining")
        target = cluster.pick(exclude=self.server.config.server_id)
        if target is not None:
            frame["pre_connection_url"] = pre_connection_url(target)
        return frame

    def _failed_start(self, failure: Failure) -> None:
        """A start that failed while the reactor ran: say why, stop (which
        releases the claim and closes the store) and exit with status 1."""
        if failure.check(defer.CancelledError):
            return  # stopped while starting: stopService does the rest
        reason = _start_failure_reason(failure)
        if failure.check(StartFailed):
            log.error("cannot start: {reason}", reason=reason)
        else:
            log.failure("cannot start: {reason}", failure, reason=reason)
        say_on_stderr(f"allspark: cannot start: {reason}")
        self.exit_status_on_failure(1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _drain_requested(self) -> None:
        """An admin asked for a drain (``POST /admin/drain``): stop as on
        SIGTERM, once the answer is written; the exit status is 0."""
        log.info("drain requested by an admin: stopping", server_id=self.server.config.server_id)
        self.reactor.callLater(0.2, self.reactor.stop)

    def _identity_lost(self) -> None:
        """Another process took this server's identity (``--force``): stop
        serving under it, exit status 1."""
        say_on_stderr(f"allspark: server identity {self.server.config.server_id} was taken over by "
                      f"another process; stopping")
        self.exit_status_on_failure(1)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)  # children are stopped in reverse order by _stop
        d = defer.ensureDeferred(self._stop())
        # twistd would swallow a failure here: say what went wrong
        return d.addErrback(lambda failure: log.failure("stopping the server failed", failure))

    async def _stop(self) -> None:
        server = self.server
        server.draining = True
        if self._ready is not None and not self._ready.called:
            self._ready.cancel()
        cluster = server.cluster
        if cluster.held:
            await beat_now(cluster)  # the record says draining: no server hands this one out
            if server.mesh is not None:
                # and the peers read it now, not at their next heartbeat
                server.mesh.invalidate("server", server.config.server_id)
        for port in self.ports:
            stopped = port.stopListening()  # a Deferred, or None when it stopped at once
            if stopped is not None:
                await stopped
        self.ports = []
        conns = [conn for conn in server.registry if isinstance(conn, ClosableConnection)]
        reconnect = encode(await self._reconnect_frame())
        log.info("draining: telling {count} clients to reconnect, closing them", count=len(conns))
        for conn in conns:
            try:
                conn.send(reconnect)
            except Exception:
                log.failure("could not send reconnect to {node_id}", node_id=getattr(conn, "node_id", None))
            conn.going_away("server shutting down")
        deadline = self.server.config.drain_timeout
        waited = 0.0
        while any(conn.still_connected() for conn in conns) and waited < deadline:
            await deferLater(self.reactor, 0.05)
            waited += 0.05
        for conn in conns:
            if conn.still_connected():
                conn.dropConnection(abort=True)
        if self._retention is not None and self._retention.running:
            self._retention.stop()
        for child in reversed(list(self)):
            if child.running:
                await defer.maybeDeferred(child.stopService)
        if server.locations is not None:
            server.locations.stop()
        if self.mesh is not None and self.mesh.running:
            await self.mesh.stopService()
        try:
            await cluster.release()
        except Exception:
            log.failure("removing this server's record failed")
        await server.store.close()
        self.claim.release()
        log.info("server {server_id} stopped", server_id=server.config.server_id)
