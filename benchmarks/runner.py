"""Drive one target with one load: split the clients over load-generator
processes, connect, start them together, collect and merge their results,
and read the servers' CPU time and memory around the measured phase."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks.procs import NODE_DIR, Proc, Target, spawn


@dataclass
class Load:
    """One bounded load, before it is split over load-generator processes."""

    scenario: str                      # direct | fanout | idle
    clients: list[dict[str, Any]]      # {"id", "key", "server", "role", "rooms"?}
    pairs: list[tuple[int, int]] = field(default_factory=list)   # direct: (sender, receiver)
    per_pair: int = 0
    sender: int = 0                    # fanout
    members: list[int] = field(default_factory=list)
    messages: int = 0                  # fanout: messages the sender sends
    durable: bool = False
    window: int = 100
    rate: float = 0.0                  # aggregate messages/s; 0 = closed loop
    deadline_s: float = 60.0
    drain_s: float = 5.0
    session_id: str | None = None
    payload_pad: int = 0
    ids: bool = True                   # an "id" on every message (receipts, de-duplication)


class LoadGenerators:
    """The processes that make one load, with the stdin/stdout protocol of
    ``benchmarks/node/loadgen.js`` and ``benchmarks/loadgen.py``."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        for i, p in enumerate(procs):
            threading.Thread(target=self._read, args=(i, p), daemon=True).start()

    def _read(self, i: int, p: Proc) -> None:
        assert p.popen.stdout is not None
        try:
            for line in p.popen.stdout:
                self.lines.put((i, line.rstrip("\n")))
        except (OSError, ValueError):
            pass
        self.lines.put((i, None))

    def collect(self, tag: str, timeout: float) -> list[dict[str, Any]]:
        """One ``tag`` line from every process (a process that exits without
        it gives an error record)."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            left = deadline - time.monotonic()
            if left <= 0:
                for i in range(len(self.procs)):
                    got.setdefault(i, {"errors": 1, "error_samples": [f"load generator {i}: no {tag} in {timeout:.0f}s"]})
                break
            try:
                i, line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                got.setdefault(i, {"errors": 1, "error_samples": [
                    f"load generator {i} exited ({self.procs[i].popen.poll()}) before {tag}: "
                    f"{self.procs[i].log_tail(800)}"]})
            elif line.startswith(tag + " "):
                got[i] = json.loads(line[len(tag) + 1:])
        return [got[i] for i in range(len(self.procs))]

    def tell(self, line: str) -> None:
        for p in self.procs:
            try:
                assert p.popen.stdin is not None
                p.popen.stdin.write(line + "\n")
                p.popen.stdin.flush()
            except (OSError, ValueError):
                pass

    def stop(self) -> None:
        for p in self.procs:
            p.stop(5)


def split(load: Load, parts: int) -> list[dict[str, Any]]:
    """The config of each load-generator process: a share of the pairs (a
    pair stays in one process, so that latency is measured on one clock) or,
    for fan-out, the sender with a share of the members."""
    parts = max(1, parts)
    configs = []
    if load.scenario == "direct":
        shares = [load.pairs[i::parts] for i in range(parts)]
    elif load.scenario == "fanout":
        parts = 1   # one clock for the sender and every member
        shares = [[]]
    else:
        shares = [list(range(i, len(load.clients), parts)) for i in range(parts)]
    for share in shares:
        cfg: dict[str, Any] = {"scenario": load.scenario, "durable": load.durable, "window": load.window,
                               "deadline_s": load.deadline_s, "drain_s": load.drain_s,
                               "payload_pad": load.payload_pad, "ids": load.ids}
        if load.scenario == "direct":
            if not share:
                continue
            index: dict[int, int] = {}
            clients = []
            for s, r in share:
                for c in (s, r):
                    if c not in index:
                        index[c] = len(clients)
                        clients.append(load.clients[c])
            cfg.update(clients=clients, pairs=[[index[s], index[r]] for s, r in share], per_pair=load.per_pair,
                       rate=load.rate * len(share) / max(1, len(load.pairs)))
        elif load.scenario == "fanout":
            order = [load.sender, *load.members]
            cfg.update(clients=[load.clients[c] for c in order], sender=0, members=list(range(1, len(order))),
                       messages=load.messages, session_id=load.session_id)
        else:
            if not share:
                continue
            cfg.update(clients=[load.clients[c] for c in share])
        configs.append(cfg)
    return configs


def loadgen_command(kind: str, config_path: str) -> list[str]:
    if kind == "node":
        return ["node", os.path.join(NODE_DIR, "loadgen.js"), config_path]
    return [sys.executable, "-m", "benchmarks.loadgen", config_path]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def run_load(target: Target, load: Load, loadgen: str, procs: int, workdir: str,
             on_ready: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
             profiler: Callable[[Target], Callable[[], Any]] | None = None) -> dict[str, Any]:
    """Run ``load`` against ``target``; the merged measurement.

    ``on_ready`` runs once every client is connected (session set-up, memory
    readings) and returns what the GO line passes on.  ``profiler`` starts a
    profiler on the target and returns its stop function."""
    configs = split(load, procs)
    gens: list[Proc] = []
    for n, cfg in enumerate(configs):
        cfg["mode"] = target.mode
        cfg["servers"] = target.urls
        path = os.path.join(workdir, f"loadgen-{target.name}-{load.scenario}-{n}-{time.monotonic_ns()}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        gens.append(spawn(f"loadgen-{n}", loadgen_command(loadgen, path), cwd=NODE_DIR if loadgen == "node" else None,
                          log_path=path[:-5] + ".log", pipes=True))
    lg = LoadGenerators(gens)
    extra: dict[str, Any] = {}
    try:
        rss_before = target.rss_kb()
        connect_timeout = max(60.0, len(load.clients) / 100)
        ready = lg.collect("READY", connect_timeout)
        target.check_alive()
        rss_connected = target.rss_kb()
        go: dict[str, Any] = {}
        if on_ready is not None:
            go = on_ready(ready)
        stop_profiler = profiler(target) if profiler is not None else None
        cpu0 = target.cpu_s()
        cpu0_each = [p.cpu_s() for p in target.procs]
        t0 = time.perf_counter()
        lg.tell("GO " + json.dumps(go))
        results = lg.collect("RESULT", load.deadline_s + 3 * load.drain_s + 30)
        wall = time.perf_counter() - t0
        cpu1 = target.cpu_s()
        cpu_each = [round(p.cpu_s() - before, 3) for p, before in zip(target.procs, cpu0_each)]
        if stop_profiler is not None:
            extra["profile"] = stop_profiler()
        alive = all(p.alive() for p in target.procs)
        hwm = target.hwm_kb()
        rss_after = target.rss_kb()
    finally:
        lg.tell("STOP")
        lg.stop()
    merged = merge(results)
    merged.update(extra)
    merged["connect_s"] = max((r.get("connect_s", 0) for r in ready), default=0)
    merged["connected"] = sum(r.get("connected", 0) for r in ready)
    merged["connect_failed"] = sum(r.get("connect_failed", 0) for r in ready)
    merged["errors"] += sum(r.get("errors", 0) for r in ready if "connected" not in r)
    merged["server_cpu_s"] = round(cpu1 - cpu0, 3)
    merged["server_cpu_s_each"] = cpu_each   # per server process, in target.procs order
    deliveries = merged["received"] or 0
    merged["server_cpu_us_per_msg"] = round((cpu1 - cpu0) / deliveries * 1e6, 2) if deliveries else None
    merged["server_peak_rss_mb"] = round(hwm / 1024, 1)
    merged["server_rss_before_mb"] = round(rss_before / 1024, 1)
    merged["server_rss_connected_mb"] = round(rss_connected / 1024, 1)
    merged["server_rss_after_mb"] = round(rss_after / 1024, 1)
    merged["server_alive"] = alive
    merged["loadgen"] = loadgen
    merged["loadgen_procs"] = len(gens)
    merged["loadgen_cpu_util"] = round(merged.pop("cpu_s_total", 0) / max(1e-9, wall) / max(1, len(gens)), 3)
    merged["harness_wall_s"] = round(wall, 3)
    merged["ready"] = ready
    return merged


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum counts, pool latencies, span the clocks."""
    out: dict[str, Any] = {}
    for key in ("sent", "accepted", "received", "duplicates", "errors", "lost", "expected", "not_sent",
                "acks_sent", "acked", "ack_incomplete"):
        out[key] = sum(int(r.get(key, 0) or 0) for r in results)
    out["cpu_s_total"] = sum(float(r.get("cpu_s", 0) or 0) for r in results)
    out["error_samples"] = [e for r in results for e in r.get("error_samples", [])][:20]
    out["complete"] = all(r.get("complete", False) for r in results) and bool(results)
    out["deadline_hit"] = any(r.get("deadline_hit") for r in results)
    out["finish_reasons"] = sorted({str(r.get("finish_reason")) for r in results if r.get("finish_reason")})
    status: dict[str, int] = {}
    for r in results:
        for k, v in (r.get("status_counts") or {}).items():
            status[k] = status.get(k, 0) + v
    out["status_counts"] = status
    starts = [r["t_start"] for r in results if r.get("t_start")]
    ends = [r["t_end"] for r in results if r.get("t_end")]
    duration = (max(ends) - min(starts)) / 1000 if starts and ends else 0.0
    out["duration_s"] = round(duration, 4)
    out["throughput"] = round(out["received"] / duration, 1) if duration > 0 else 0.0
    lat = sorted(x for r in results for x in r.get("latencies_ms", []))
    out["latency_ms"] = {
        "p50": round(percentile(lat, 0.50), 3), "p95": round(percentile(lat, 0.95), 3),
        "p99": round(percentile(lat, 0.99), 3), "max": round(lat[-1], 3) if lat else 0.0,
        "mean": round(sum(lat) / len(lat), 3) if lat else 0.0, "count": len(lat),
    }
    out["_latencies"] = lat   # for the CDF; dropped from the JSON (too big), sampled instead
    return out


def cdf_sample(lat: list[float], points: int = 200) -> list[list[float]]:
    """(latency ms, fraction) pairs, enough to draw the CDF."""
    if not lat:
        return []
    n = len(lat)
    idx = sorted({min(n - 1, int(n * i / points)) for i in range(points)} | {n - 1})
    return [[round(lat[i], 3), round((i + 1) / n, 5)] for i in idx]


def run_quiet(cmd: list[str], timeout: float = 10) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
