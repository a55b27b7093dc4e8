"""End-to-end: session membership cached on one server is invalidated by a
change on another (two real servers on one SQLite file).

With the peer link up, a member removed on server A is refused on server B
as soon as A's ``invalidate`` frame arrives, although B's cache would keep
the session for minutes (``--session-cache-ttl=600``).  With no link (B has
another cluster secret, so A's frames never reach it), B serves the stale
membership at most ``--session-cache-ttl`` seconds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import TestCase

from allspark.auth import ValidationTokens, derive_token_key
from allspark.client import AllsparkError, Client, open_socket
from tests.e2e.helpers import health, wait_until
from tests.support import CLUSTER_SECRET, ServerProcess, key, sleep

OTHER_CLUSTER_SECRET = "another-cluster-secret-0123456789abcdef"


def server_id(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.port}"


async def client_on(testcase: TestCase, server: ServerProcess, node_id: str,
                    cluster_secret: str = CLUSTER_SECRET, client_id: str | None = None) -> Client:
    """A client of ``node_id`` connected to ``server`` itself (not where the
    balancer would send it): the validation token is minted here with the
    server's cluster secret.  A server refuses tokens minted elsewhere for
    its first 5 s (allspark.auth, "Restarts"): a refused one is minted again,
    every 0.5 s for at most 20 s."""
    tokens = ValidationTokens(derive_token_key(cluster_secret.encode()), "test", reactor)
    client: Client | None = None
    for _ in range(40):
        token, _ = tokens.issue(node_id, server_id(server))
        url = f"ws://127.0.0.1:{server.port}/ws?auth_key={key(node_id, client_id)}&validation_token={token}"
        try:
            client = await open_socket(reactor, url)
            break
        except ConnectionDone:
            await sleep(0.5)
    assert client is not None, f"{node_id} could not connect to {server.port}"

    def close() -> Any:
        if client.protocol is not None:
            client.protocol.dropConnection(abort=True)
            return client.closed
        return None

    testcase.addCleanup(close)
    return client


class SessionCacheAcrossServers(TestCase):
    timeout = 120

    def two_servers(self, *args_b: str, env_b: dict[str, str] | None = None
                    ) -> tuple[ServerProcess, ServerProcess]:
        a = ServerProcess(args=("--session-cache-ttl=600",))
        a.start()
        self.addCleanup(a.stop)
        b = ServerProcess(data_dir=a.data_dir, args=args_b, env=env_b)  # the same SQLite file
        b.start()
        self.addCleanup(b.stop)
        return a, b

    async def member_cached_on_b(self, a: ServerProcess, b: ServerProcess, b_secret: str = CLUSTER_SECRET
                                 ) -> tuple[Client, Client]:
        """The owner on ``a`` adds ``member``, who sends to the session on
        ``b`` (so ``b`` caches the membership); both clients."""
        owner = await client_on(self, a, "owner")
        member = await client_on(self, b, "member", b_secret)
        await owner.create_session(session_id="room")
        await owner.request({"op": "join_session", "session_id": "room", "node_id": "member"})
        accepted = await member.send(dest_session_id="room", payload="hello")
        self.assertEqual(accepted["op"], "accepted")
        return owner, member

    async def refused_on_b(self, member: Client) -> bool:
        try:
            await member.send(dest_session_id="room", payload="still here?")
        except AllsparkError as e:
            self.assertEqual(e.code, "not_a_member")
            return True
        return False

    async def test_a_member_removed_on_a_is_refused_on_b_at_once_with_the_link_up(self) -> None:
        a, b = self.two_servers("--session-cache-ttl=600")
        await wait_until(lambda: server_id(b) in health(a).get("peers", {})
                         and server_id(a) in health(b).get("peers", {}), 30, 0.1, "the peer link")
        owner, member = await self.member_cached_on_b(a, b)
        await owner.unjoin_session("room", node_id="member")
        # (far inside the 600 s b's cache would have kept it)
        await wait_until(lambda: self.refused_on_b(member), 5, 0.05, "the refusal on b")

    async def test_without_the_link_b_serves_stale_membership_at_most_the_ttl(self) -> None:
        a, b = self.two_servers("--session-cache-ttl=2", env_b={"ALLSPARK_CLUSTER_SECRET": OTHER_CLUSTER_SECRET})
        owner, member = await self.member_cached_on_b(a, b, OTHER_CLUSTER_SECRET)
        self.assertEqual(health(b).get("peers"), {})  # no link: nothing a tells b arrives
        await owner.unjoin_session("room", node_id="member")
        # the ttl (2 s) and slack for a loaded machine
        await wait_until(lambda: self.refused_on_b(member), 2 + 10, 0.1, "the refusal on b")
