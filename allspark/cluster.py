"""This server's record in the store, the cluster view, and the balancer.

Every server keeps one :class:`~allspark.store.ServerRecord` in the shared
store: who it is (id, host, port, proxy address, scheme), its capacity
(``--max-connections``) and current connections, its state (``live`` or
``draining``) and a heartbeat.  The record is written when the server claims
its identity, rewritten every ``--server-heartbeat`` seconds (default 2) and
removed by a clean stop.

**Dead.**  A record whose heartbeat is older than ``--server-dead-after``
seconds (default 10) belongs to a dead server: it is never handed out again
and shows as ``dead`` in ``/health``.  Clocks of servers on different hosts
must agree (NTP): skew eats into that time.

**The identity claim** (``--force``) is this record, so it holds across hosts
sharing a store.  Its ``holder`` is ``<hostname>/<pid>/<random>``.  A record
held by another process is judged live when its heartbeat is fresh, except
that a holder on this same host is judged by its pid (a running ``allspark``
process, as the data-dir claim does): a server killed with ``kill -9`` can be
taken back with ``--force`` at once on its own host, and after the dead time
from any other.  A live holder refuses a second start (even with
``--force``); a record left by a crash refuses a start without ``--force``; a
clean stop removes it.  Writes are compare-and-set on the holder
(:meth:`~allspark.store.Store.put_server`): if another process takes the
identity over (``--force`` while this one still runs), this one's next
heartbeat fails and it stops.

**Balancing** (:meth:`ClusterRecords.pick`): pre-connection on any server
answers with the live server whose connections, plus the clients handed to it
since its last heartbeat, are the smallest fraction of its capacity (never a
draining or dead one; with ``need_proxy`` only servers with a proxy address).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import socket
from dataclasses import replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from allspark.auth import VALIDATION_CLOCK_SKEW
from allspark.logs import logger
from allspark.store import ServerRecord, Store

log = logger(__name__)

#: Seconds between heartbeats of this server's record (--server-heartbeat).
DEFAULT_HEARTBEAT_S = 2.0
#: Seconds without a heartbeat after which a server is dead (--server-dead-after).
DEFAULT_DEAD_AFTER_S = 10.0


class ClaimRefused(Exception):
    """The identity is held by a live server, or was not released (the message says which)."""


def new_holder() -> str:
    """A holder name for this process: ``<hostname>/<pid>/<random>``."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


def _holder_pid_on_this_host(holder: str) -> int | None:
    """The pid in ``holder`` when it names this host, else None."""
    host, _, rest = holder.partition("/")
    pid, _, _ = rest.partition("/")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return int(pid)


class ClusterRecords:
    """This server's record (claim, heartbeat, release) and the cluster view.

    ``identity``: this server's record as configured (connections, state and
    heartbeat are filled in at each write).  ``connections`` and ``state``
    report the current count and ``live``/``draining``.  ``on_lost`` is
    called once if another process took the identity over.
    """

    def __init__(
        self,
        store: Store,
        identity: ServerRecord,
        clock: IReactorTime,
        connections: Callable[[], int],
        state: Callable[[], str],
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        dead_after_s: float = DEFAULT_DEAD_AFTER_S,
    ) -> None:
        self.store = store
        self.identity = identity
        self.clock = clock
        self.connections = connections
        self.state = state
        self.heartbeat_s = heartbeat_s
        self.dead_after_ms = int(dead_after_s * 1000)
        #: ms after its start before another server is handed out (see :meth:`pick`)
        self.young_ms = int(VALIDATION_CLOCK_SKEW * 1000)
        self.on_lost: Callable[[], None] = lambda: None
        self.held = False
        #: the last records read from the store, by server_id (this server's included)
        self.servers: dict[str, ServerRecord] = {}
        # clients handed to a server since its heartbeat, by server_id
        self._handed: dict[str, tuple[int, int]] = {}
        self._loop: LoopingCall | None = None

    @property
    def server_id(self) -> str:
        return self.identity.server_id

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _record(self) -> ServerRecord:
        """This server's record as of now."""
        now = self._now_ms()
        return replace(self.identity, connections=self.connections(), state=self.state(), heartbeat_ms=now)

    # -- claim and release -------------------------------------------------
    def holder_alive(self, record: ServerRecord) -> bool:
        """Whether ``record``'s holder is a live process (see the module docstring)."""
        from allspark.server import _pid_alive

        pid = _holder_pid_on_this_host(record.holder)
        if pid is not None:
            return pid != os.getpid() and _pid_alive(pid)
        return self._now_ms() - record.heartbeat_ms <= self.dead_after_ms

    async def claim(self, force: bool) -> None:
        """Write this server's record, taking the identity; raise
        :class:`ClaimRefused` when a live server holds it, or when a crashed
        one left it and ``force`` is false."""
        existing = await self.store.get_server(self.server_id)
        if existing is not None:
            if self.holder_alive(existing):
                age = max(0, self._now_ms() - existing.heartbeat_ms) / 1000
                raise ClaimRefused(
                    f"server identity {self.server_id} is held by a live server (holder {existing.holder}, "
                    f"heartbeat {age:.1f} s ago); stop it first")
            if not force:
                raise ClaimRefused(
                    f"server identity {self.server_id} was not released (its record in the store was left "
                    f"by {existing.holder}, which did not stop cleanly); start with --force to take it back")
            log.warn("taking back server identity {server_id} from {holder} (--force)",
                     server_id=self.server_id, holder=existing.holder)
        record = replace(self._record(), started_ms=self._now_ms())
        self.identity = replace(self.identity, started_ms=record.started_ms)
        if not await self.store.put_server(record, existing.holder if existing is not None else None):
            raise ClaimRefused(f"server identity {self.server_id} was claimed by another process at the same "
                               f"moment")
        self.held = True
        self.servers[self.server_id] = record

    def start_heartbeat(self) -> None:
        """Rewrite the record every ``heartbeat_s`` seconds (the first now)
        and refresh the cluster view after each write."""
        if self._loop is None:
            self._loop = LoopingCall(lambda: ensureDeferred(self._beat_logged()))
            self._loop.clock = self.clock
            self._loop.start(self.heartbeat_s, now=True)

    async def _beat_logged(self) -> None:
        try:
            await self.beat()
        except Exception:
            log.failure("heartbeat of server record {server_id} failed", server_id=self.server_id)

    async def beat(self) -> None:
        """Write this server's record now (state, connections, heartbeat)
        and read the cluster view."""
        if not self.held:
            return
        record = self._record()
        if not await self.store.put_server(record, record.holder):
            self.held = False
            self.stop_heartbeat()
            log.error("server identity {server_id} was taken over by another process: stopping",
                      server_id=self.server_id)
            self.on_lost()
            return
        await self.refresh()

    async def refresh(self) -> None:
        """Read every server record from the store into :attr:`servers`."""
        records = await self.store.list_servers()
        self.servers = {r.server_id: r for r in records}

    def stop_heartbeat(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    async def release(self) -> None:
        """Remove this server's record (a clean stop)."""
        self.stop_heartbeat()
        if self.held:
            self.held = False
            await self.store.remove_server(self.server_id, self.identity.holder)

    # -- the view ----------------------------------------------------------
    def alive(self, record: ServerRecord) -> bool:
        """Whether ``record``'s heartbeat is within the dead time (this
        server: whether it holds its identity)."""
        if record.server_id == self.server_id:
            return self.held
        return self._now_ms() - record.heartbeat_ms <= self.dead_after_ms

    def view(self) -> list[dict[str, Any]]:
        """The cluster as ``/health`` shows it: each server's id, address,
        state (``live``, ``draining`` or ``dead``), load and heartbeat age."""
        out = []
        now = self._now_ms()
        for server_id in sorted(self.servers):
            r = self._current(self.servers[server_id])
            out.append({
                "server_id": r.server_id, "host": r.host, "port": r.port, "scheme": r.scheme,
                "proxy_address": r.proxy_address, "state": r.state if self.alive(r) else "dead",
                "connections": r.connections, "capacity": r.capacity,
                "heartbeat_age_ms": max(0, now - r.heartbeat_ms), "started_ms": r.started_ms,
            })
        return out

    def _current(self, record: ServerRecord) -> ServerRecord:
        """``record``, with this server's own fields as of now."""
        if record.server_id == self.server_id and self.held:
            return self._record()
        return record

    def pick(self, need_proxy: bool = False, exclude: str | None = None) -> ServerRecord | None:
        """The live server with the lowest load relative to its capacity,
        ``exclude`` aside; with ``need_proxy`` only servers with a proxy
        address; None when there is none.  The load is the connections its
        last heartbeat reported plus the clients handed to it since (counted
        here, reset by its next heartbeat), so a burst of pre-connections
        is spread before any of them connects.  Another server is handed out
        only once it has run :data:`~allspark.auth.VALIDATION_CLOCK_SKEW`
        seconds (5): before that it refuses tokens minted elsewhere."""
        best: tuple[float, str] | None = None
        chosen: ServerRecord | None = None
        now = self._now_ms()
        for r in self.servers.values():
            if r.server_id == exclude or r.state != "live" or not self.alive(r):
                continue
            if r.server_id == self.server_id and self.state() != "live":
                continue
            if need_proxy and not r.proxy_address:
                continue
            if r.server_id != self.server_id and now - r.started_ms < self.young_ms:
                continue  # it refuses tokens other servers mint for it (allspark.auth, "Restarts")
            handed = self._handed_since(r)
            # a full server (load 1 or more) comes last; if all are full, its
            # handshake answers too_many_connections
            key = ((r.connections + handed) / max(1, r.capacity), r.server_id)
            if best is None or key < best:
                best, chosen = key, r
        if chosen is not None:
            self._handed[chosen.server_id] = (chosen.heartbeat_ms, self._handed_since(chosen) + 1)
        return chosen

    def _handed_since(self, record: ServerRecord) -> int:
        """Clients handed to ``record``'s server since that heartbeat."""
        beat, handed = self._handed.get(record.server_id, (record.heartbeat_ms, 0))
        return handed if beat == record.heartbeat_ms else 0


def pre_connection_url(record: ServerRecord) -> str:
    """The HTTP base URL of ``record``'s server (``https`` for a ``wss`` server)."""
    scheme = "https" if record.scheme == "wss" else "http"
    host = f"[{record.host}]" if ":" in record.host else record.host
    return f"{scheme}://{host}:{record.port}"


def beat_now(records: ClusterRecords) -> Deferred[None]:
    """Write ``records``' heartbeat at once (a state change); never fails."""
    return ensureDeferred(records._beat_logged())


# -- the admin drain request ---------------------------------------------------------

#: Seconds an admin token is valid.
ADMIN_TOKEN_TTL = 60.0
_ADMIN_KEY_LABEL = b"allspark admin v1"


class AdminAuthError(Exception):
    """An admin token was refused; ``code`` says why (``bad_token``,
    ``foreign_token``, ``expired_token``, ``replayed_token``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def derive_admin_key(cluster_secret: bytes) -> bytes:
    """The admin key: ``HMAC-SHA256(cluster secret, "allspark admin v1")``,
    distinct from the peer link and token keys, so no peer handshake token
    or validation token is an admin token."""
    return hmac.new(cluster_secret, _ADMIN_KEY_LABEL, hashlib.sha256).digest()


def admin_token(key: bytes, op: str, server_id: str, now: float) -> str:
    """A single-use token asking ``server_id`` to do ``op`` (``drain``):
    ``base64url(JSON {"op", "s": server_id, "i": issued at, "n": nonce}) "."
    base64url(HMAC-SHA256(admin key, first part))``."""
    claims = {"op": op, "s": server_id, "i": now, "n": secrets.token_urlsafe(16)}
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode("ascii")
    mac = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return body + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


class AdminAuth:
    """Checks admin tokens for one server: right MAC, this server, this op,
    issued within :data:`ADMIN_TOKEN_TTL` seconds and not before this process
    started, each nonce once."""

    def __init__(self, key: bytes, server_id: str, clock: IReactorTime) -> None:
        self._key = key
        self.server_id = server_id
        self._clock = clock
        self.started_at = clock.seconds()
        self._seen: dict[str, float] = {}

    def verify(self, token: object, op: str) -> None:
        """Accept ``token`` for ``op`` once, or raise :class:`AdminAuthError`."""
        if not isinstance(token, str) or not 0 < len(token) <= 1024 or token.count(".") != 1:
            raise AdminAuthError("bad_token", "admin token is missing or malformed")
        body, mac_text = token.split(".")
        try:
            mac = base64.urlsafe_b64decode(mac_text + "=" * (-len(mac_text) % 4))
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, binascii.Error):
            raise AdminAuthError("bad_token", "admin token is malformed") from None
        if not hmac.compare_digest(mac, hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()):
            raise AdminAuthError("bad_token", "admin token signature is not valid")
        if not isinstance(claims, dict) or not isinstance(claims.get("n"), str) \
                or not isinstance(claims.get("i"), (int, float)):
            raise AdminAuthError("bad_token", "admin token is malformed")
        if claims.get("s") != self.server_id or claims.get("op") != op:
            raise AdminAuthError("foreign_token", "admin token was issued for another server or operation")
        now = self._clock.seconds()
        issued = float(claims["i"])
        if issued < self.started_at or now - issued > ADMIN_TOKEN_TTL or issued > now + 5:
            raise AdminAuthError("expired_token", "admin token has expired (or predates this process)")
        for nonce in [n for n, expiry in self._seen.items() if expiry < now]:
            del self._seen[nonce]
        if claims["n"] in self._seen:
            raise AdminAuthError("replayed_token", "admin token was already used")
        self._seen[claims["n"]] = issued + ADMIN_TOKEN_TTL
