"""``allspark send``, ``listen`` and ``status`` against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from tests.support import ROOT, SECRET, ServerProcess, start_server


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m allspark.cli *args`` with the test servers' auth secret."""
    env = {k: v for k, v in os.environ.items() if k != "ALLSPARK_AUTH_KEY"}
    env["ALLSPARK_AUTH_SECRET"] = SECRET
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "allspark.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class SendListenTests(unittest.TestCase):
    timeout = 90

    def test_what_send_sends_listen_prints_and_acks(self) -> None:
        server = start_server(self)
        url = server.base_url
        # bob connects once so that he is a known destination
        first = cli("listen", url, "--node-id", "bob", "--timeout", "0.5")
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertEqual(first.stdout, "")
        for n in range(2):
            sent = cli("send", url, "--node-id", "alice", "--client-id", "al", "--dest-id", "bob",
                       "--payload", json.dumps({"n": n}), "--type", "7", "--id", f"m{n}")
            self.assertEqual(sent.returncode, 0, sent.stderr)
            accepted = json.loads(sent.stdout)
            self.assertEqual((accepted["op"], accepted["status"], accepted["id"]), ("accepted", "stored", f"m{n}"))
        got = cli("listen", url, "--node-id", "bob", "--count", "2", "--timeout", "20")
        self.assertEqual(got.returncode, 0, got.stderr)
        lines = [json.loads(line) for line in got.stdout.splitlines()]
        self.assertEqual([m["payload"] for m in lines], [{"n": 0}, {"n": 1}])
        self.assertEqual({(m["src_id"], m["src_client_id"], m["type"]) for m in lines}, {("alice", "al", 7)})
        self.assertEqual([m["seq"] for m in lines], [1, 2])
        # acked before it exited: nothing is synced again
        again = cli("listen", url, "--node-id", "bob", "--count", "1", "--timeout", "1")
        self.assertEqual(again.returncode, 1)
        self.assertEqual(again.stdout, "")
        self.assertIn("0 of 1 messages", again.stderr)

    def test_a_refused_send_exits_1_with_the_error(self) -> None:
        server = start_server(self)
        sent = cli("send", server.base_url, "--node-id", "alice", "--dest-id", "nobody", "--text", "hi")
        self.assertEqual(sent.returncode, 1)
        self.assertEqual(sent.stdout, "")
        self.assertIn("unknown_destination", sent.stderr)

    def test_a_bad_key_exits_1(self) -> None:
        server = start_server(self)
        with tempfile.NamedTemporaryFile("w", suffix=".key") as key_file:
            key_file.write("not-a-key\n")
            key_file.flush()
            sent = cli("send", server.base_url, "--auth-key-file", key_file.name, "--dest-id", "b", "--text", "x")
        self.assertEqual(sent.returncode, 1)
        self.assertIn("pre-connection refused", sent.stderr)


class StatusTests(unittest.TestCase):
    timeout = 90

    def test_status_lists_the_servers_of_a_store(self) -> None:
        shared = tempfile.mkdtemp(prefix="allspark-status-")
        store = f"sqlite:///{shared}/cluster.db"
        first = start_server(self, f"--store={store}")
        second = ServerProcess(args=(f"--store={store}",)).start()
        self.addCleanup(second.stop)
        listed = cli("status", "--store", store, "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        rows = json.loads(listed.stdout)
        self.assertEqual(sorted(r["server_id"] for r in rows),
                         sorted(f"127.0.0.1:{s.port}" for s in (first, second)))
        self.assertEqual({r["state"] for r in rows}, {"live"})
        table = cli("status", "--store", store)
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertEqual(table.stdout.splitlines()[0].split()[:2], ["SERVER", "STATE"])
        self.assertEqual(len(table.stdout.splitlines()), 3)
        second.stop()  # a clean stop removes its record
        after = json.loads(cli("status", "--store", store, "--json").stdout)
        self.assertEqual([r["server_id"] for r in after], [f"127.0.0.1:{first.port}"])
