"""Several hosts, for real: three Allspark servers, each in its own network
namespace with its own address, and the PostgreSQL store in a fourth.

The test builds the hosts itself: a bridge in the root namespace holding
``10.231.N.254/24`` (``N`` a free third octet the test picks), and per host a
namespace with one end of a veth pair on ``10.231.N.<i>/24`` and the other
end on the bridge.  The test process (and its clients) reach the hosts
through the bridge's address; the servers reach each other and the database
over the namespaces' own interfaces.  Every server listens on the same port
in its own namespace and has ``--host_address`` set to its namespace's
address, so its server id, its ``ws_url`` and the peer links all name that
address.  Traffic only ever goes to addresses the test created.

Skipped, with the reason, where namespaces cannot be made (not root, no
``ip``, ``ip netns add`` refused) or PostgreSQL is not installed.  Cleanups
stop the servers and PostgreSQL and remove the namespaces, veths and the
bridge even when the test fails; if the test process itself is killed, a
watchdog process removes them.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import unittest

from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import TestCase

from allspark.client import Client, open_socket
from tests.e2e.cluster_scenarios import CrossServerScenarios
from tests.e2e.helpers import http_get, pre_connect, wait_until
from tests.e2e.test_mesh import make_ca, make_server_cert
from tests.store.postgres_cluster import ClusterUnavailable, PostgresCluster, find_bin_dir
from tests.support import ServerProcess, key

#: The port every server listens on, each in its own namespace.
PORT = 7710
#: With TLS: the port clients are sent to and peers dial (``ssl:``); PORT stays plain HTTP.
TLS_PORT = 7711
#: The port PostgreSQL listens on in the fourth namespace.
PG_PORT = 5432
HEARTBEAT = "0.5"
DEAD_AFTER = 3.0
#: Seconds any one ``ip`` command may take.
IP_TIMEOUT = 20


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (inside ``netns`` when given); raises
    :class:`RuntimeError` with ip's message when ``check`` and it fails."""
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr.strip()}")
    return result


def free_subnet() -> int:
    """A third octet ``N`` such that no interface here has an address in
    ``10.231.N.0/24``."""
    used = ip("-4", "-o", "addr", "show").stdout
    for _ in range(200):
        octet = 1 + secrets.randbelow(250)
        if f" 10.231.{octet}." not in used:
            return octet
    raise unittest.SkipTest("no free 10.231.N.0/24 subnet found")


class Hosts:
    """Network namespaces joined by a bridge, each one a host with one
    address in ``10.231.N.0/24``; the root namespace is ``.254`` on the
    bridge.  :meth:`remove` deletes everything it made (also after a
    partial :meth:`build`)."""

    def __init__(self, count: int) -> None:
        tag = secrets.token_hex(3)
        self.octet = free_subnet()
        self.subnet = f"10.231.{self.octet}.0/24"
        self.bridge = f"asbr{tag}"
        self.namespaces = [f"allspark-{tag}-{i}" for i in range(1, count + 1)]
        self.addresses = [f"10.231.{self.octet}.{i}" for i in range(1, count + 1)]
        self.root_ends = [f"as{tag}h{i}" for i in range(1, count + 1)]
        self._made_namespaces: list[str] = []
        self._made_bridge = False
        self._watchdog: subprocess.Popen[bytes] | None = None

    def build(self) -> "Hosts":
        """Make the bridge and the namespaces; start the watchdog first so
        that nothing outlives a killed test process."""
        self._start_watchdog()
        ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        ip("addr", "add", f"10.231.{self.octet}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for netns, address, root_end in zip(self.namespaces, self.addresses, self.root_ends):
            ip("netns", "add", netns)
            self._made_namespaces.append(netns)
            host_end = f"{root_end[:-2]}n{root_end[-1]}"  # as<tag>n<i>: the host's own interface
            ip("link", "add", root_end, "type", "veth", "peer", "name", host_end)
            ip("link", "set", host_end, "netns", netns)
            ip("link", "set", root_end, "master", self.bridge)
            ip("link", "set", root_end, "up")
            ip("link", "set", "lo", "up", netns=netns)
            ip("addr", "add", f"{address}/24", "dev", host_end, netns=netns)
            ip("link", "set", host_end, "up", netns=netns)
        return self

    def _teardown_commands(self) -> list[list[str]]:
        return ([["ip", "netns", "del", n] for n in self.namespaces]
                + [["ip", "link", "del", e] for e in self.root_ends]
                + [["ip", "link", "del", self.bridge]])

    def _start_watchdog(self) -> None:
        """A small process that removes the namespaces, veths and bridge if
        this process dies without running its cleanups; :meth:`remove` ends
        it.  It gives up after 2 hours."""
        teardown = "; ".join(shlex.join(c) + " 2>/dev/null" for c in self._teardown_commands())
        script = (f"i=0; while kill -0 {os.getpid()} 2>/dev/null && [ $i -lt 7200 ]; do sleep 1; i=$((i+1)); done; "
                  f"{teardown}")
        self._watchdog = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)

    def remove(self) -> None:
        """Kill whatever still runs in the namespaces (only processes this
        test started live there), then delete namespaces, veths and bridge."""
        for netns in self._made_namespaces:
            pids = ip("netns", "pids", netns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        for command in self._teardown_commands():
            subprocess.run(command, capture_output=True, timeout=IP_TIMEOUT)
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait(10)
            self._watchdog = None

    def left_behind(self) -> list[str]:
        """Names of this test's namespaces and links that still exist."""
        namespaces = ip("netns", "list", check=False).stdout
        links = ip("-o", "link", "show", check=False).stdout
        return ([n for n in self.namespaces if n in namespaces]
                + [e for e in [*self.root_ends, self.bridge] if f" {e}:" in links or f" {e}@" in links])


def can_make_namespaces() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); this test runs as uid %d" % os.geteuid()
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2) to make network namespaces with"
    probe = f"allspark-probe-{secrets.token_hex(3)}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if result.returncode != 0:
        return f"ip netns add is not permitted here: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=IP_TIMEOUT)
    return None


class SeveralHosts(CrossServerScenarios, TestCase):
    timeout = 180

    def setUp(self) -> None:
        reason = can_make_namespaces()
        if reason is not None:
            raise unittest.SkipTest(reason)
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise unittest.SkipTest("PostgreSQL not found (install Debian's 'postgresql'; ./dev test does)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("psycopg is not installed: pip install -e '.[test]'") from None
        self.hosts = Hosts(4)
        self.addCleanup(self.assert_nothing_left_behind)
        self.addCleanup(self.hosts.remove)
        self.hosts.build()
        *server_hosts, db_host = zip(self.hosts.namespaces, self.hosts.addresses)
        pg = PostgresCluster(bin_dir, port=PG_PORT, listen_address=db_host[1], trusted_network=self.hosts.subnet,
                             netns=db_host[0])
        self.addCleanup(pg.stop)
        try:
            pg.start()
        except (ClusterUnavailable, OSError, subprocess.TimeoutExpired) as e:
            raise unittest.SkipTest(f"could not start PostgreSQL in a namespace: {e}") from None
        self.store = pg.create_database("allspark_hosts")
        self.server_hosts = server_hosts
        self.servers: list[ServerProcess] = []
        self.scheme, self.client_port = "ws", PORT
        self.tls_trust: Certificate | None = None  # the CA clients verify wss:// servers with

    def start_servers(self, tls: bool = False) -> list[ServerProcess]:
        """One server per host on the shared database.  With ``tls`` each
        also listens with TLS on TLS_PORT (a certificate for its address from
        a CA the test makes), which is the port clients are sent to and peers
        dial, verified against that CA; PORT stays plain for /health and
        pre-connection."""
        tls_args: dict[str, tuple[str, ...]] = {}
        if tls:
            directory = tempfile.mkdtemp(prefix="allspark-hosts-tls-")
            self.addCleanup(shutil.rmtree, directory, True)
            ca = make_ca(directory, "cluster-ca")
            for netns, address in self.server_hosts:
                cert, key_path = make_server_cert(directory, ca, netns, address)
                tls_args[netns] = (
                    f"--port={TLS_PORT}", f"--listen=tcp:{PORT}:interface={address}",
                    f"--listen=ssl:{TLS_PORT}:interface={address}:privateKey={key_path}:certKey={cert}",
                    f"--peer-tls-ca={ca[2]}", f"--peer-tls-cert={cert}", f"--peer-tls-key={key_path}")
            self.scheme, self.client_port = "wss", TLS_PORT
            with open(ca[2], "rb") as f:
                self.tls_trust = Certificate.loadPEM(f.read())
        for netns, address in self.server_hosts:
            server = ServerProcess(port=PORT, host=address, netns=netns,
                                   args=(f"--store={self.store}", f"--server-heartbeat={HEARTBEAT}",
                                         f"--server-dead-after={DEAD_AFTER}", *tls_args.get(netns, ())))
            self.addCleanup(shutil.rmtree, server.data_dir, True)
            self.addCleanup(server.stop)
            self.servers.append(server.start(timeout=30))
        return self.servers

    def server_id(self, server: ServerProcess) -> str:
        """The id ``server`` has: its host's address and the port clients are sent to."""
        return f"{server.host}:{self.client_port}"

    def assert_nothing_left_behind(self) -> None:
        self.assertEqual(self.hosts.left_behind(), [])

    async def meshed(self) -> None:
        """Wait until every server links to the two others, each named by its
        host's address, and all are old enough for the balancer (5 s)."""
        ids = {self.server_id(s) for s in self.servers}

        def linked() -> bool:
            return all(set(http_get(s.base_url + "/health").json().get("peers", {})) == ids - {self.server_id(s)}
                       for s in self.servers)

        await wait_until(linked, 40, interval=0.2, what="three hosts linked pairwise")

        def old_enough() -> bool:
            body = http_get(self.servers[0].base_url + "/health").json()
            return len(body["cluster"]) == 3 and all(
                time.time() * 1000 - e["started_ms"] > 5_500 for e in body["cluster"])

        await wait_until(old_enough, 20, interval=0.2, what="servers running for 5 s")

    async def client_on(self, server: ServerProcess, node_id: str, client_id: str | None = None) -> Client:
        """A synced client of ``node_id`` on ``server`` (pre-connection asked
        until the balancer names it; its ``ws_url`` is the host's address)."""
        auth_key = key(node_id, client_id)
        for _ in range(60):
            info = pre_connect(server, {"auth_key": auth_key}).json()
            if info["node"]["host"] == server.host:
                break
        else:
            raise AssertionError(f"the balancer never named {server.host}")
        self.assertTrue(info["node"]["ws_url"].startswith(f"{self.scheme}://{server.host}:{self.client_port}/"), info)
        client = await open_socket(reactor, info["node"]["ws_url"], tls_trust=self.tls_trust)
        client.base_url, client.auth_key = server.base_url, auth_key
        assert client.hello is not None
        self.assertEqual(client.hello["server_id"], self.server_id(server))
        await client.sync()

        self.close_at_cleanup(client)
        return client

    async def test_direct_user_wide_and_session_messages_cross_hosts_live(self) -> None:
        h1, h2, h3 = self.start_servers()
        await self.meshed()
        await self.messages_cross_live(h1, h2, h3, total=20)

    async def test_kill_9_of_a_host_server_moves_its_client_with_nothing_lost(self) -> None:
        h1, h2, victim = self.start_servers()
        await self.meshed()
        await self.kill_9_moves_the_client(h1, h2, victim, total=60, kill_at=20)

    async def test_peer_links_across_hosts_over_tls_verified_by_address(self) -> None:
        # every server: TLS on TLS_PORT with a certificate for its own address;
        # peers dial wss://<address>:TLS_PORT/peer and verify it against the CA
        h1, h2, h3 = self.start_servers(tls=True)
        await self.meshed()
        for server in self.servers:
            self.assertNotIn("could not open the peer link", server.log())
        alice = await self.client_on(h1, "alice")
        bob = await self.client_on(h2, "bob")
        dave = await self.client_on(h3, "dave")
        await alice.create_session(session_id="tls")
        for member in ("bob", "dave"):
            await alice.join_session("tls", node_id=member)
        direct = await alice.send(dest_id="bob", payload="direct")
        self.assertEqual((direct["status"], direct["live"]), ("delivered", 1), direct)
        await alice.send(dest_session_id="tls", payload="session")
        self.assertEqual(await self.received(bob, 2), ["direct", "session"])
        self.assertEqual(await self.received(dave, 1), ["session"])
