"""The benchmark harness runs end to end at a tiny size (so that it cannot
rot): every scenario produces rows of the expected shape, every tiny run that
could run lost nothing and saw no errors, and every process it started is
gone afterwards.  Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_KEYS = {"scenario", "system", "label", "status", "throughput", "duration_s", "latency_ms", "errors", "lost",
            "sent", "received", "server_cpu_us_per_msg", "server_peak_rss_mb", "loadgen", "complete", "cdf"}


class QuickBenchmarkTests(unittest.TestCase):
    result: dict
    proc: subprocess.CompletedProcess

    @classmethod
    def setUpClass(cls) -> None:
        cls.out = tempfile.mkdtemp(prefix="allspark-bench-test-")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        cls.proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--loadgen", "python", "--out", cls.out], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=600)
        path = os.path.join(cls.out, "latest.json")
        if cls.proc.returncode != 0 or not os.path.exists(path):
            raise AssertionError(f"python -m benchmarks --quick failed ({cls.proc.returncode}):\n"
                                 f"{cls.proc.stdout[-4000:]}\n{cls.proc.stderr[-4000:]}")
        with open(path) as f:
            cls.result = json.load(f)

    def ok_rows(self) -> list[dict]:
        return [r for r in self.result["rows"] if r["status"] == "ok"]

    def test_top_level_structure(self) -> None:
        for key in ("command", "machine", "settings", "rows", "targets", "not_run"):
            self.assertIn(key, self.result)
        for key in ("nproc", "cpu", "memory_gb"):
            self.assertIn(key, self.result["machine"])
        self.assertTrue(self.result["settings"]["quick"])
        self.assertTrue(os.path.exists(os.path.join(self.out, "latest.md")))

    def test_every_scenario_ran_against_allspark(self) -> None:
        allspark = {(r["scenario"], r["status"]) for r in self.result["rows"] if r["system"] == "allspark"}
        for scenario in ("direct_ephemeral", "direct_durable", "capacity", "latency"):
            self.assertIn((scenario, "ok"), allspark, self.result["rows"])
        # fan-out runs, or says cleanly why not (sessions may not be served)
        self.assertTrue({("fanout", "ok"), ("fanout", "unavailable")} & allspark)

    def test_one_server_and_a_meshed_cluster_in_one_run(self) -> None:
        rows = {r["servers"]: r for r in self.ok_rows() if r["scenario"] == "cluster_durable"}
        self.assertEqual(set(rows), {1, 2}, [r for r in self.result["rows"] if r["scenario"] == "cluster_durable"])
        self.assertEqual(len(rows[1]["clients_per_server"]), 1)
        # the balancer spread the clients (pre-connection) over both servers, every one of them placed
        two = rows[2]
        self.assertEqual(len(two["clients_per_server"]), 2, two["clients_per_server"])
        self.assertNotIn("unknown", two["clients_per_server"])
        self.assertEqual(sum(two["clients_per_server"].values()), self.result["settings"]["clients"])
        self.assertEqual(len(two["server_cpu_s_each"]), 2)
        for row in rows.values():
            self.assertEqual(row["status_counts"], {"delivered": row["sent"]})

    def test_pre_connection_answers_from_three_servers(self) -> None:
        row = next(r for r in self.result["rows"] if r["scenario"] == "preconnect")
        self.assertEqual(row["status"], "ok", row.get("reason"))
        self.assertEqual(row["servers"], 3)
        self.assertEqual(row["received"], row["expected"])
        self.assertEqual(row["refused"], {})
        self.assertGreater(row["throughput"], 0)
        # every server was named by the balancer
        self.assertEqual(len(row["named"]), 3, row["named"])
        self.assertEqual(sum(row["named"].values()), row["received"])

    def test_the_bare_relay_always_runs(self) -> None:
        systems = {(r["scenario"], r["system"]) for r in self.ok_rows()}
        self.assertIn(("direct_ephemeral", "autobahn-relay"), systems)

    def test_rows_have_the_measurements(self) -> None:
        for row in self.ok_rows():
            self.assertLessEqual(ROW_KEYS, set(row), row["scenario"])
            self.assertLessEqual({"p50", "p95", "p99", "max"}, set(row["latency_ms"]))
        for row in self.result["rows"]:
            if row["status"] != "ok":
                self.assertIn(row["status"], ("unavailable", "failed"))
                self.assertTrue(row.get("reason"))

    def test_tiny_runs_lost_nothing(self) -> None:
        for row in self.ok_rows():
            if row["scenario"] == "capacity":
                self.assertEqual(row["connect_failed"], 0, row)
                self.assertEqual(row["connected"], self.result["settings"]["connections"])
                self.assertGreater(row["rss_per_connection_kb"], 0)
                continue
            with self.subTest(scenario=row["scenario"], system=row["label"]):
                self.assertEqual(row["errors"], 0, row["error_samples"])
                self.assertEqual(row["lost"], 0)
                self.assertEqual(row["duplicates"], 0)
                self.assertTrue(row["complete"])
                self.assertEqual(row["received"], row["expected"])

    def test_durable_messages_were_stored_and_acked(self) -> None:
        row = next(r for r in self.ok_rows() if r["scenario"] == "direct_durable" and r["system"] == "allspark")
        self.assertEqual(row["status_counts"], {"delivered": row["sent"]})
        self.assertGreater(row["acks_sent"], 0)
        self.assertEqual(row["ack_incomplete"], 0)

    def test_targets_are_reported(self) -> None:
        names = " ".join(t["target"] for t in self.result["targets"])
        for word in ("ephemeral", "durable", "p99", "RSS", "zero errors"):
            self.assertIn(word, names)

    def test_no_process_is_left_running(self) -> None:
        self.assertEqual(self.result["pids_still_running"], [])
        self.assertGreater(len(self.result["pids_started"]), 5)
        for pid in self.result["pids_started"]:
            self.assertFalse(os.path.exists(f"/proc/{pid}/stat") and _state(pid) not in ("Z", "X"), pid)
        for row in self.ok_rows():
            self.assertTrue(row["server_alive"])


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


class PostgresBenchmarkTests(unittest.TestCase):
    """``--stores sqlite,postgresql`` runs Allspark on both stores in one tiny
    run (a throwaway PostgreSQL cluster for it); skipped without PostgreSQL."""

    def test_direct_durable_on_both_stores(self) -> None:
        sys.path.insert(0, ROOT)
        from tests.store.postgres_cluster import find_bin_dir

        if find_bin_dir() is None:
            self.skipTest("PostgreSQL is not installed (./dev test installs Debian's postgresql)")
        out = tempfile.mkdtemp(prefix="allspark-bench-test-")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--loadgen", "python",
                               "--scenarios", "direct_durable", "--stores", "sqlite,postgresql",
                               "--no-references", "--out", out],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        self.assertEqual(proc.returncode, 0, proc.stdout[-4000:] + proc.stderr[-4000:])
        with open(os.path.join(out, "latest.json")) as f:
            rows = {r["system"]: r for r in json.load(f)["rows"] if r.get("ids", True)}
        self.assertEqual(set(rows), {"allspark", "allspark-postgresql"})
        row = rows["allspark-postgresql"]
        self.assertEqual((row["status"], row["label"]), ("ok", "Allspark (PostgreSQL)"), row.get("reason"))
        self.assertEqual((row["errors"], row["lost"]), (0, 0))
        self.assertEqual(row["status_counts"], {"delivered": row["sent"]})
        self.assertGreater(row["acks_sent"], 0)


class PushStoreBenchmarkTests(unittest.TestCase):
    """``benchmarks/push_store.py`` runs at a tiny size on SQLite: every
    scheduled push is claimed and finished once (the script asserts it)."""

    def test_tiny_run(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "push_store.py"), "-n", "50",
                               "--claim", "7"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stdout[-4000:] + proc.stderr[-4000:])
        self.assertIn("schedule_push of 50 nodes", proc.stdout)


class PushIsolationBenchmarkTests(unittest.TestCase):
    """``python -m benchmarks.push_isolation --quick``: both phases (webhook
    healthy, webhook hung) run against one server, nothing online is lost,
    the healthy stand-in got pushes and the hung one held requests open."""

    def test_both_phases_in_one_run(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.push_isolation", "--quick"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stdout[-4000:] + proc.stderr[-4000:])
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        phases = {row["phase"]: row for row in rows if "phase" in row}
        self.assertEqual(set(phases), {"healthy", "hung"})
        for row in phases.values():
            self.assertEqual(row["lost"], 0)
            self.assertEqual(set(row["latency_ms"]), {"p50", "p95", "p99", "max"})
        self.assertGreater(phases["healthy"]["pushes_answered"], 0)
        self.assertEqual(phases["hung"]["pushes_answered"], 0)
        self.assertGreater(phases["hung"]["push_requests_hung"], 0)
