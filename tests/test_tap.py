"""``twistd allspark`` options: defaults, refusals, and what they compose."""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial import unittest

from allspark.tap import Options, _listen_port
from tests.support import SECRET


class OptionsTestCase(unittest.SynchronousTestCase):
    """A test of the twistd options, with an auth secret in the environment."""

    def setUp(self) -> None:
        os.environ["ALLSPARK_AUTH_SECRET"] = SECRET
        self.addCleanup(os.environ.pop, "ALLSPARK_AUTH_SECRET", None)

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options


class OptionsTests(OptionsTestCase):

    def test_defaults(self) -> None:
        options = self.parse("--data-dir=/tmp/x")
        self.assertEqual(options["port"], 8080)
        self.assertEqual(options["server-id"], "127.0.0.1:8080")
        self.assertEqual(options["store"], "sqlite:///tmp/x/allspark.db")
        self.assertEqual(options["auth-secrets"], [SECRET.encode()])

    def test_port_must_be_one_of_the_listen_ports(self) -> None:
        self.parse("--port=8443", "--listen=ssl:8443:privateKey=k.pem:certKey=c.pem")
        with self.assertRaises(usage.UsageError) as refused:
            self.parse("--listen=ssl:8443:privateKey=k.pem:certKey=c.pem")
        self.assertIn("--port (8080)", str(refused.exception))

    def test_listen_port_parsing(self) -> None:
        self.assertEqual(_listen_port("tcp:8080:interface=0.0.0.0"), 8080)
        self.assertEqual(_listen_port("tcp:port=9000"), 9000)
        self.assertEqual(_listen_port("ssl:8443:privateKey=k.pem"), 8443)
        self.assertIsNone(_listen_port("unix:/run/allspark.sock"))

    def test_refusals(self) -> None:
        for argv in (["--log_level=loud"], ["--port=0"], ["--server-id=has space"], ["--max-connections=0"]):
            with self.assertRaises((usage.UsageError, ValueError)):
                self.parse(*argv)

    def test_no_secret_is_a_usage_error(self) -> None:
        del os.environ["ALLSPARK_AUTH_SECRET"]
        with self.assertRaises(usage.UsageError):
            self.parse()

    def test_allowed_origins_and_demo(self) -> None:
        """--allowed-origin is repeatable, canonical, and reaches the config
        and the site; none by default.  --demo (off by default) adds /demo."""
        from allspark.tap import makeService

        default = makeService(self.parse("--store=memory:"))
        self.assertEqual(default.server.config.allowed_origins, ())
        self.assertNotIn(b"demo", default.site_factory.resource.children)
        options = self.parse("--store=memory:", "--demo", "--allowed-origin=HTTPS://App.Example.com:443",
                             "--allowed-origin", "http://localhost:3000")
        service = makeService(options)
        self.assertEqual(service.server.config.allowed_origins, ("https://app.example.com", "http://localhost:3000"))
        self.assertTrue(service.site_factory.origins.allows("http://localhost:3000", "127.0.0.1:8080"))
        self.assertIn(b"demo", service.site_factory.resource.children)
        for bad in ("*", "app.example.com", "https://app.example.com/path"):
            with self.assertRaises(usage.UsageError) as refused:
                self.parse(f"--allowed-origin={bad}")
            self.assertIn("is not an origin", str(refused.exception))

    def test_quota_options_reach_the_delivery_config(self) -> None:
        """The inbox and session quota options (defaults and given values)
        end up in the config the inbox and sessions read."""
        from allspark.tap import makeService

        defaults = makeService(self.parse("--store=memory:")).server.config.delivery
        self.assertEqual(
            (defaults.max_inbox_per_sender, defaults.max_inbox, defaults.max_session_rows_per_sender,
             defaults.max_session_rows, defaults.session_quota_window_ms),
            (10_000, 100_000, 10_000, 100_000, 60_000),
        )
        given = makeService(self.parse(
            "--store=memory:", "--max-inbox-per-sender=3", "--max-inbox=7",
            "--max-session-rows-per-sender=2", "--max-session-rows=5", "--session-quota-window=1.5",
        )).server.config.delivery
        self.assertEqual(
            (given.inbox_quota.per_sender, given.inbox_quota.per_inbox, given.stream_quota.per_sender,
             given.stream_quota.per_session, given.stream_quota.window_ms),
            (3, 7, 2, 5, 1500),
        )
        for argv in (["--max-inbox=0"], ["--max-inbox-per-sender=-1"], ["--session-quota-window=0"]):
            with self.assertRaises((usage.UsageError, ValueError)):
                self.parse(*argv)


class PeerOptionsTests(OptionsTestCase):
    """The --peer* options and what they compose."""

    def test_refusals_name_the_option(self) -> None:
        for argv, says in ((["--peer=no-url"], "--peer"), (["--peer=a=http://x/peer"], "--peer"),
                           (["--peer-tls-cert=/etc/hostname"], "--peer-tls-key"),
                           (["--peer-tls-ca=/nonexistent/ca.pem"], "/nonexistent/ca.pem")):
            with self.assertRaises(usage.UsageError) as refused:
                self.parse(*argv)
            self.assertIn(says, str(refused.exception))

    def test_the_mesh_is_composed_and_is_the_remote_route(self) -> None:
        from allspark.tap import makeService

        os.environ["ALLSPARK_CLUSTER_SECRET"] = "cluster-secret-0123456789abcdef"
        self.addCleanup(os.environ.pop, "ALLSPARK_CLUSTER_SECRET", None)
        service = makeService(self.parse("--store=memory:", "--peer=b=ws://127.0.0.1:1/peer",
                                         "--peer-heartbeat=2", "--peer-max-queue-bytes=1000"))
        mesh = service.server.mesh
        self.assertIs(service.mesh, mesh)
        self.assertIs(service.server.delivery.remote, mesh)
        self.assertIn(service.server.delivery.links_changed, mesh.on_links_changed)
        self.assertIsNotNone(mesh.auth)
        self.assertEqual((mesh.limits.heartbeat, mesh.limits.heartbeat_timeout, mesh.limits.max_queue_bytes),
                         (2.0, 4.0, 1000))
        self.assertIn(b"peer", service.site_factory.resource.children)

    def test_no_cluster_secret_no_peer_auth(self) -> None:
        from allspark.tap import makeService

        os.environ.pop("ALLSPARK_CLUSTER_SECRET", None)
        self.assertIsNone(makeService(self.parse("--store=memory:")).server.mesh.auth)
