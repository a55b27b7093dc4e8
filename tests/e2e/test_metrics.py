"""``GET /metrics`` of a real server: what it counts, and where it is served."""

from __future__ import annotations

import socket
import tempfile

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from tests.e2e.helpers import http_get, run_to_exit, wait_until
from tests.e2e.test_push import PushTestCase
from tests.support import client_for, free_port, start_server


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of the text exposition at ``url``: (name, sorted labels) -> value."""
    answer = http_get(url)
    assert answer.status == 200, answer
    assert answer.headers["content-type"].startswith("text/plain"), answer.headers
    samples = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsTests(unittest.TestCase):
    timeout = 60

    async def test_a_round_trip_is_counted(self) -> None:
        server = start_server(self)
        url = server.base_url + "/metrics"
        alice = await client_for(self, server, "alice-laptop", "alice")
        bob = await client_for(self, server, "bob-phone", "bob")
        for n in range(3):
            await alice.send(dest_id="bob-phone", payload={"n": n})
        for _ in range(3):
            await bob.next_message()
        alice.send_raw(b"{not json")
        await wait_until(lambda: value(scrape(url), "allspark_messages_total", stage="acked") == 3, 10,
                         what="bob's acks counted")
        samples = scrape(url)
        self.assertEqual(value(samples, "allspark_connections"), 2)
        self.assertEqual(value(samples, "allspark_frames_in_total", kind="message"), 3)
        self.assertEqual(value(samples, "allspark_frames_in_total", kind="bad"), 1)
        self.assertEqual(value(samples, "allspark_frames_in_total", kind="sync"), 2)
        self.assertEqual(value(samples, "allspark_frames_out_total", kind="accepted"), 3)
        self.assertEqual(value(samples, "allspark_frames_out_total", kind="message"), 3)
        self.assertEqual(value(samples, "allspark_frames_out_total", kind="hello"), 2)
        self.assertEqual(value(samples, "allspark_messages_total", stage="accepted"), 3)
        self.assertEqual(value(samples, "allspark_messages_total", stage="stored"), 3)
        self.assertEqual(value(samples, "allspark_messages_total", stage="delivered_live"), 3)
        self.assertEqual(value(samples, "allspark_errors_total", code="bad_frame"), 1)
        self.assertEqual(value(samples, "allspark_sync_pages_total"), 2)
        self.assertEqual(value(samples, "allspark_inbox_depth_count"), 2)  # one full sync each
        self.assertEqual(value(samples, "allspark_inbox_depth_bucket", le="0"), 2)
        self.assertGreater(value(samples, "allspark_store_batch_size_count"), 0)
        self.assertGreater(value(samples, "allspark_store_batch_seconds_sum"), 0)
        self.assertEqual(value(samples, "allspark_peer_links"), 0)
        self.assertEqual(value(samples, "allspark_server_state", state="live"), 1)
        self.assertEqual(value(samples, "allspark_send_queue_overflows_total"), 0)
        self.assertEqual(value(samples, "allspark_refusals_total", reason="rate_limited"), 0)
        # no node id is ever a label
        self.assertFalse([key for key in samples if any("alice" in v or "bob" in v for _, v in key[1])])

    async def test_a_session_broadcast_is_one_stored_row(self) -> None:
        server = start_server(self)
        url = server.base_url + "/metrics"
        alice = await client_for(self, server, "alice-laptop", "alice")
        bob = await client_for(self, server, "bob-phone", "bob")
        await alice.create_session(session_id="club", anyone_can_join=True)
        await bob.join_session("club")
        accepted = await alice.send(dest_session_id="club", payload="hello club")
        self.assertEqual((await bob.next_message())["session_seq"], accepted["session_seq"])
        samples = scrape(url)
        self.assertEqual(value(samples, "allspark_messages_total", stage="session_stored"), 1)
        self.assertEqual(value(samples, "allspark_messages_total", stage="stored"), 0)  # no inbox copy
        self.assertEqual(value(samples, "allspark_frames_in_total", kind="create_session"), 1)
        self.assertEqual(value(samples, "allspark_frames_out_total", kind="member_joined"), 1)

    def test_no_metrics_turns_it_off(self) -> None:
        server = start_server(self, "--no-metrics")
        self.assertEqual(http_get(server.base_url + "/metrics").status, 404)

    def test_metrics_port_serves_it_on_loopback_only(self) -> None:
        port = free_port()
        server = start_server(self, f"--metrics-port={port}")
        self.assertEqual(http_get(server.base_url + "/metrics").status, 404)
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(value(samples, "allspark_connections"), 0)

    def test_a_metrics_port_in_use_refuses_the_start_in_one_line(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            result = run_to_exit(tempfile.mkdtemp(prefix="allspark-metrics-"), free_port(), f"--metrics-port={busy}")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"allspark: cannot start: cannot listen on --metrics-port {busy}", result.stdout.decode())


class PushMetricsTests(PushTestCase):
    async def test_push_outcomes_are_read_from_the_dispatcher(self) -> None:
        server = self.server()
        url = server.base_url + "/metrics"
        self.assertNotIn(("allspark_push_notifications_total", (("outcome", "sent"), ("provider", "webhook"))),
                         scrape(url))
        await self.register(server, "phone")
        alice = await client_for(self, server, "alice")
        await alice.send(dest_id="phone", payload="hi")
        await wait_until(lambda: len(self.pushes("phone")) > 0, 15, what="a push to phone")
        await wait_until(lambda: value(scrape(url), "allspark_push_notifications_total", provider="webhook",
                                       outcome="sent") == 1, 10, what="the push counted as sent")


class ClusterMetricsTests(unittest.TestCase):
    timeout = 90

    async def test_peer_links_and_frames(self) -> None:
        shared = tempfile.mkdtemp(prefix="allspark-metrics-cluster-")
        servers = [start_server(self, f"--store=sqlite:///{shared}/cluster.db") for _ in range(2)]
        urls = [s.base_url + "/metrics" for s in servers]
        await wait_until(lambda: all(value(scrape(url), "allspark_peer_links") == 1 for url in urls), 30,
                         what="one peer link on each server")
        before = sum(value(scrape(url), "allspark_peer_frames_total", direction="out") for url in urls)
        await client_for(self, servers[0], "alice-laptop", "alice")  # its location is announced to the peer
        await wait_until(lambda: sum(value(scrape(url), "allspark_peer_frames_total", direction="out")
                                     for url in urls) > before, 10, what="a peer frame counted")
        received = sum(value(scrape(url), "allspark_peer_frames_total", direction="in") for url in urls)
        self.assertGreater(received, 0)
