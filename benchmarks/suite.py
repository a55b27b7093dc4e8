"""The scenarios: which targets each one starts, what load it drives, what it
records.  Every scenario produces rows (one per system it ran or could not
run); ``benchmarks.report`` turns them into JSON, markdown and a picture.

Each run starts fresh server processes (a list per target, so that a meshed
multi-server scenario only has to start more of them) and stops them in a
``finally``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks import procs
from benchmarks.procs import Target
from benchmarks.runner import Load, LoadGenerators, cdf_sample, percentile, run_load

SCENARIOS = ("direct_ephemeral", "direct_durable", "fanout", "capacity", "latency", "cluster_durable", "preconnect")


class Unavailable(Exception):
    """A system or scenario that cannot run here; reported, never fatal."""


@dataclass
class Settings:
    clients: int = 100
    messages: int = 50_000
    window: int = 100
    connections: int = 10_000
    fanout_members: int = 100
    fanout_messages: int = 500
    fanout_window: int = 20
    deadline_s: float = 60.0
    drain_s: float = 5.0
    loadgen: str = "node"             # node | python
    loadgen_procs: int = 1
    references: bool = True
    profile: bool = False
    repeat: int = 1                   # direct runs: repeat and keep the median (the machine is shared)
    quick: bool = False
    scenarios: tuple[str, ...] = SCENARIOS
    stores: tuple[str, ...] = ("sqlite",)  # Allspark's stores in direct_durable: sqlite, postgresql
    cluster_servers: int = 2          # cluster_durable: one server, then this many meshed on one SQLite file
    preconnect_servers: int = 3       # preconnect: meshed servers asked
    preconnect_requests: int = 20_000  # preconnect: requests in all
    preconnect_procs: int = 3         # preconnect: asking processes ...
    preconnect_threads: int = 2       # ... each with this many keep-alive connections
    out_dir: str = ""
    log: Callable[[str], None] = print
    node_missing: str | None = None   # why Node (relays, Socket.IO, NATS client) cannot run
    nats_missing: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------- targets
def _starter(system: str, s: Settings) -> Callable[[str], Target]:
    """A function that starts ``system`` in a work dir; raises Unavailable."""
    if system == "allspark":
        return lambda wd: procs.start_allspark(wd)
    if system == "allspark-postgresql":
        return _start_allspark_postgresql
    if system.startswith("allspark-cluster-"):
        return lambda wd: _start_allspark_cluster(wd, int(system.rsplit("-", 1)[1]))
    if system == "autobahn-relay":
        return procs.start_autobahn_relay
    if system in ("node-ws-relay", "socketio-relay"):
        if s.node_missing:
            raise Unavailable(s.node_missing)
        if system == "socketio-relay" and s.loadgen != "node":
            raise Unavailable("the Socket.IO client needs the Node load generator")
        return lambda wd: procs.start_node_relay(wd, "ws" if system == "node-ws-relay" else "socketio")
    if system in ("nats-core", "nats-jetstream"):
        if s.nats_missing:
            raise Unavailable(s.nats_missing)
        if s.loadgen != "node":
            raise Unavailable("the NATS client needs the Node load generator")
        return lambda wd: procs.start_nats(wd, system == "nats-jetstream")
    raise ValueError(system)


def _start_allspark_postgresql(workdir: str) -> Target:
    """Allspark on a new database of the throwaway PostgreSQL cluster (started
    once per benchmark run with PostgreSQL's default durability, fsync on;
    stopped when the run exits: ``tests/store/postgres_cluster.py``)."""
    from tests.store.postgres_cluster import ClusterUnavailable, shared_cluster

    try:
        cluster = shared_cluster(durable=True)
    except ClusterUnavailable as e:
        raise Unavailable(str(e)) from None
    url = cluster.create_database("allspark_bench")
    target = procs.start_allspark(workdir, extra_args=(f"--store={url}",))
    target.name, target.label = "allspark-postgresql", "Allspark (PostgreSQL)"
    return target


def _start_allspark_cluster(workdir: str, servers: int) -> Target:
    """``servers`` meshed Allspark processes on one SQLite file (one process
    too: the same store and options, so one and several compare fairly)."""
    target = procs.start_allspark_cluster(workdir, servers)
    target.name = f"allspark-cluster-{servers}"
    target.label = ("Allspark, 1 server" if servers == 1 else
                    f"Allspark, {servers} servers (meshed, one SQLite file)")
    return target


def _direct_load(target: Target, s: Settings, durable: bool, rate: float = 0.0, ids: bool = True,
                 messages: int | None = None) -> Load:
    n = max(2, s.clients - s.clients % 2)
    half = n // 2
    names = [(f"bench-s{i}", f"user-s{i}") for i in range(half)] + [(f"bench-r{i}", f"user-r{i}") for i in range(half)]
    keys = target.mint_keys(names)
    clients = []
    for i, ((node_id, _), key) in enumerate(zip(names, keys)):
        clients.append({"id": node_id, "key": key, "server": i % max(1, len(target.urls)),
                        "role": "sender" if i < half else "receiver"})
    per_pair = max(1, (messages or s.messages) // half)
    return Load("direct", clients, pairs=[(i, half + i) for i in range(half)], per_pair=per_pair, durable=durable,
                window=s.window, rate=rate, deadline_s=s.deadline_s, drain_s=s.drain_s, ids=ids)


def _row(scenario: str, system: str, label: str, **kw: Any) -> dict[str, Any]:
    return {"scenario": scenario, "system": system, "label": label, **kw}


def _measure(scenario: str, system: str, s: Settings, make_load: Callable[[Target], Load],
             on_ready: Callable[[Target, list[dict[str, Any]]], dict[str, Any]] | None = None,
             profiler: Callable[[Target], Callable[[], Any]] | None = None, **info: Any) -> dict[str, Any]:
    """Start ``system``, run one load, stop it; one row."""
    try:
        start = _starter(system, s)
    except Unavailable as e:
        s.log(f"  {scenario:18} {system:16} not available: {e}")
        return _row(scenario, system, system, status="unavailable", reason=str(e), **info)
    workdir = procs.new_workdir()
    target: Target | None = None
    try:
        target = start(workdir)
        load = make_load(target)
        hook = (lambda ready: on_ready(target, ready)) if on_ready is not None else None  # type: ignore[arg-type]
        result = run_load(target, load, s.loadgen, s.loadgen_procs, workdir, on_ready=hook, profiler=profiler)
    except Unavailable as e:
        s.log(f"  {scenario:18} {system:16} not available: {e}")
        return _row(scenario, system, target.label if target else system, status="unavailable", reason=str(e), **info)
    except Exception as e:  # noqa: BLE001 - one failed system must not stop the others
        s.log(f"  {scenario:18} {system:16} FAILED: {e}")
        return _row(scenario, system, target.label if target else system, status="failed", reason=str(e)[:2000],
                    **info)
    finally:
        if target is not None:
            target.stop()
    lat = result.pop("_latencies")
    result["cdf"] = cdf_sample(lat)
    result.pop("ready", None)
    row = _row(scenario, system, target.label, status="ok", **info, **result)
    s.log(f"  {scenario:18} {target.label:22} {row['throughput']:>10,.0f} msg/s  {row['duration_s']:7.3f} s  "
          f"p50 {row['latency_ms']['p50']:7.2f}  p99 {row['latency_ms']['p99']:7.2f} ms  "
          f"errors {row['errors']}  lost {row['lost']}  server {row['server_cpu_us_per_msg']} us/msg  "
          f"rss {row['server_peak_rss_mb']} MB  loadgen cpu {row['loadgen_cpu_util']:.0%}")
    return row


def _median_of(runs: int, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``measure`` ``runs`` times; the run with the median throughput,
    with every run's throughput, errors and losses beside it."""
    rows = [measure() for _ in range(max(1, runs))]
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return rows[0]
    ok.sort(key=lambda r: r["throughput"])
    chosen = dict(ok[len(ok) // 2])
    if len(rows) > 1:
        chosen["runs_throughput"] = [r.get("throughput") for r in rows]
        chosen["runs_errors"] = sum(r.get("errors", 0) for r in ok)
        chosen["runs_lost"] = sum(r.get("lost", 0) for r in ok)
        chosen["runs_failed"] = len(rows) - len(ok)
    return chosen


# ---------------------------------------------------------------- scenarios
def direct(s: Settings, durable: bool, profiler: Any = None) -> list[dict[str, Any]]:
    scenario = "direct_durable" if durable else "direct_ephemeral"
    if durable:
        systems = [name for store, name in (("sqlite", "allspark"), ("postgresql", "allspark-postgresql"))
                   if store in s.stores]
        systems += ["nats-jetstream"] if s.references else []
    else:
        systems = ["allspark", "autobahn-relay", "node-ws-relay", "socketio-relay", "nats-core"]
        if not s.references:
            systems = ["allspark", "autobahn-relay"]
    rows = []
    for system in systems:
        rows.append(_median_of(s.repeat, lambda: _measure(scenario, system, s, lambda t: _direct_load(t, s, durable),
                                                         durable=durable, clients=s.clients, messages=s.messages)))
    if durable and "sqlite" in s.stores:
        # the store's fast path: messages without an id skip the de-duplication record
        row = _median_of(s.repeat, lambda: _measure(scenario, "allspark", s,
                                                   lambda t: _direct_load(t, s, durable, ids=False),
                                                   durable=durable, clients=s.clients, messages=s.messages,
                                                   ids=False))
        row["label"] = row["label"] + " (no message ids)"
        rows.insert(1, row)
    return rows


def profile_durable(s: Settings) -> dict[str, Any]:
    """One more durable run against Allspark with py-spy attached (its
    numbers are not in the tables: sampling slows the server)."""
    pyspy = os.path.join(os.path.dirname(os.sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        return {"status": "unavailable", "reason": "py-spy is not installed (pip install py-spy)"}
    out = os.path.join(s.out_dir, "profile-direct_durable.txt")

    def start(target: Target) -> Callable[[], Any]:
        proc = subprocess.Popen([pyspy, "record", "--pid", str(target.procs[0].pid), "--format", "raw",
                                 "--rate", "200", "--output", out, "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(1.0)   # let py-spy attach

        def stop() -> Any:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            return out

        return stop

    row = _measure("profile", "allspark", s, lambda t: _direct_load(t, s, True), profiler=start, durable=True)
    if row.get("status") != "ok" or not os.path.exists(out):
        return {"status": "failed", "reason": row.get("reason", "py-spy wrote nothing (ptrace not allowed?)")}
    return {"status": "ok", "file": out, "run": {k: row[k] for k in ("throughput", "duration_s", "errors", "lost")},
            **summarize_profile(out)}


def summarize_profile(path: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw
    (collapsed stacks) output."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    line_no = re.compile(r":\d+\)$")
    with open(path) as f:
        for line in f:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            try:
                count = int(count_s)
            except ValueError:
                continue
            frames = [line_no.sub(")", fr) for fr in stack.split(";")
                      if fr and not fr.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += count
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
            for fr in set(frames):
                incl_counts[fr] = incl_counts.get(fr, 0) + count

    def table(counts: dict[str, int]) -> list[list[Any]]:
        return [[name, round(100 * c / total, 1)] for name, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self_top": table(self_counts), "inclusive_top": table(incl_counts)}


def fanout(s: Settings) -> list[dict[str, Any]]:
    rows = []
    systems = [("allspark", True), ("allspark", False), ("autobahn-relay", False)]
    if s.references:
        systems.append(("node-ws-relay", False))
    for system, durable in systems:
        def make(target: Target, durable: bool = durable) -> Load:
            ids = [("fan-sender", "fan-user-0")] + [(f"fan-m{i}", f"fan-user-{i + 1}") for i in range(s.fanout_members)]
            keys = target.mint_keys(ids)
            clients = [{"id": n, "key": k, "server": i % max(1, len(target.urls)),
                        "rooms": ["room1"] if target.mode != "allspark" else None}
                       for i, ((n, _), k) in enumerate(zip(ids, keys))]
            clients[0]["rooms"] = None
            return Load("fanout", clients, sender=0, members=list(range(1, len(clients))), messages=s.fanout_messages,
                        durable=durable, window=s.fanout_window, deadline_s=s.deadline_s, drain_s=s.drain_s,
                        session_id=None if target.mode == "allspark" else "room1")

        def ready(target: Target, _ready: list[dict[str, Any]]) -> dict[str, Any]:
            if target.mode != "allspark":
                return {}
            return {"session_id": _create_session(target, s.fanout_members)}

        row = _measure("fanout", system, s, make, on_ready=ready, durable=durable,
                       members=s.fanout_members, messages=s.fanout_messages)
        row["label"] = row["label"] + (" (durable)" if durable and system == "allspark" else
                                       " (ephemeral)" if system == "allspark" else "")
        rows.append(row)
    return rows


def _http(base: str, path: str, args: dict[str, Any]) -> tuple[int, Any]:
    body = json.dumps(args).encode()
    req = urllib.request.Request(base + path, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


def _create_session(target: Target, members: int) -> str:
    """Create a session owned by the sender and join every member; raises
    Unavailable when this server has no session endpoints yet."""
    base = target.urls[0]
    status, _ = _http(base, "/create_session", {})
    if status == 404:
        raise Unavailable("this server has no /create_session endpoint (sessions are not built yet)")
    keys = target.mint_keys([("fan-sender", "fan-user-0")] + [(f"fan-m{i}", f"fan-user-{i + 1}")
                                                               for i in range(members)])
    status, body = _http(base, "/create_session", {"auth_key": keys[0], "anyone_can_join": True})
    if status != 200 or not isinstance(body, dict) or "session_id" not in body:
        raise Unavailable(f"create_session answered {status}: {body}")
    session_id = body["session_id"]
    for key in keys[1:]:
        status, body = _http(base, "/join_session", {"auth_key": key, "session_id": session_id})
        if status != 200:
            raise Unavailable(f"join_session answered {status}: {body}")
    return session_id


def capacity(s: Settings) -> list[dict[str, Any]]:
    rows = []
    for system in ("allspark", "autobahn-relay"):
        settle: dict[str, Any] = {}

        def make(target: Target) -> Load:
            ids = [(f"idle-{i}", f"idle-user-{i}") for i in range(s.connections)]
            keys = target.mint_keys(ids)
            settle["rss_before_kb"] = target.rss_kb()
            clients = [{"id": n, "key": k, "server": i % max(1, len(target.urls))}
                       for i, ((n, _), k) in enumerate(zip(ids, keys))]
            return Load("idle", clients, deadline_s=s.deadline_s, drain_s=s.drain_s)

        def ready(target: Target, ready_lines: list[dict[str, Any]]) -> dict[str, Any]:
            time.sleep(1.0)   # let the store catch up with the connections it remembers
            settle["rss_connected_kb"] = target.rss_kb()
            return {}

        row = _measure("capacity", system, s, make, on_ready=ready, connections=s.connections)
        if row["status"] == "ok":
            connected = max(1, row["connected"])
            grown = settle["rss_connected_kb"] - settle["rss_before_kb"]
            row["rss_per_connection_kb"] = round(grown / connected, 2)
            row["rss_connected_mb"] = round(settle["rss_connected_kb"] / 1024, 1)
            row["rss_idle_mb"] = round(settle["rss_before_kb"] / 1024, 1)
            row["connect_rate"] = round(row["connected"] / row["connect_s"], 1) if row["connect_s"] else 0
            s.log(f"  capacity           {row['label']:22} {row['connected']} connected in {row['connect_s']:.2f} s, "
                  f"{row['rss_per_connection_kb']} KB RSS each, {row['connect_failed']} failed")
        rows.append(row)
    return rows


def latency(s: Settings, peaks: dict[tuple[str, bool], float]) -> list[dict[str, Any]]:
    """Allspark (ephemeral and durable) at half the peak rate measured in
    this run (measured first when the direct scenarios did not run)."""
    rows = []
    for durable in (False, True):
        peak = peaks.get(("allspark", durable))
        if not peak:
            probe = _measure("latency_probe", "allspark", s, lambda t: _direct_load(t, s, durable), durable=durable)
            peak = probe.get("throughput") or 0
        if not peak:
            rows.append(_row("latency", "allspark", "Allspark", status="failed", durable=durable,
                             reason="no peak rate was measured"))
            continue
        for fraction, name in ((0.5, "half"), (0.25, "quarter")):
            rate = round(peak * fraction)
            # bounded in time too: at most ~8 s of load
            messages = max(s.clients, min(s.messages, int(rate * 8)))
            row = _measure("latency", "allspark", s,
                           lambda t: _direct_load(t, s, durable, rate=rate, messages=messages),
                           durable=durable, rate=rate, peak=peak, fraction=fraction, clients=s.clients,
                           messages=messages)
            row["label"] = row["label"] + (" durable" if durable else " ephemeral") + f" @ {name} peak"
            rows.append(row)
    return rows


# ---------------------------------------------------------------- clusters
def _placed(target: Target, node_ids: list[str], timeout: float = 15.0) -> dict[str, str]:
    """Where each of ``node_ids`` is connected (server id), from the cluster's
    locations rows; polled until every one is there (a connection's row is
    written as it opens) or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        where = procs.placement(target)
        if all(n in where for n in node_ids) or time.monotonic() > deadline:
            return where
        time.sleep(0.2)


def cluster_durable(s: Settings) -> list[dict[str, Any]]:
    """The headline durable load (``s.clients`` clients, half sending
    ``s.messages`` in all to the other half) against one server, then against
    ``s.cluster_servers`` meshed servers on one SQLite file, in one run.  Every
    client asks pre-connection (on the servers in turn) and connects where
    the balancer names, so a pair whose two ends land on different servers
    has every message stored by the sender's server and forwarded over the
    peer link.  Each row says where the clients landed (``clients_per_server``),
    how many pairs crossed (``cross_pairs``, ``forwarded``: their messages)
    and each process's CPU (``server_cpu_s_each``)."""
    rows = []
    for servers in (1, s.cluster_servers):
        def one(servers: int = servers) -> dict[str, Any]:
            placed: dict[str, Any] = {}
            loads: list[Load] = []

            def make(target: Target) -> Load:
                load = _direct_load(target, s, durable=True)
                # sender i and receiver i ask pre-connection in a fixed rhythm, so the balancer's
                # deterministic spread would decide which pairs cross; a seeded shuffle of the
                # receivers makes a pair's two ends independent (about half cross on 2 servers)
                receivers = [r for _, r in load.pairs]
                random.Random(9).shuffle(receivers)
                load.pairs = [(sender, receiver) for (sender, _), receiver in zip(load.pairs, receivers)]
                loads.append(load)
                return load

            def ready(target: Target, _ready: list[dict[str, Any]]) -> dict[str, Any]:
                load = loads[0]
                ids = [c["id"] for c in load.clients]
                where = _placed(target, ids)
                per_server: dict[str, int] = {}
                for node_id in ids:
                    per_server[where.get(node_id, "unknown")] = per_server.get(where.get(node_id, "unknown"), 0) + 1
                cross = sum(1 for a, b in load.pairs if where.get(ids[a]) != where.get(ids[b]))
                placed.update(clients_per_server=dict(sorted(per_server.items())), pairs=len(load.pairs),
                              cross_pairs=cross, forwarded=cross * load.per_pair)
                return {}

            row = _measure("cluster_durable", f"allspark-cluster-{servers}", s, make, on_ready=ready, durable=True,
                           clients=s.clients, messages=s.messages, servers=servers)
            row.update(placed)
            if row.get("status") == "ok":
                s.log(f"  cluster_durable    {servers} server(s): clients per server {placed['clients_per_server']}, "
                      f"{placed['cross_pairs']} of {placed['pairs']} pairs cross servers, "
                      f"CPU s per server {row['server_cpu_s_each']}")
            return row

        rows.append(_median_of(s.repeat, one))
    return rows


def preconnect(s: Settings) -> list[dict[str, Any]]:
    """Pre-connection answers per second from ``s.preconnect_servers`` meshed
    servers: ``s.preconnect_procs`` processes (``benchmarks/preconnect.py``),
    each with ``s.preconnect_threads`` HTTP/1.1 keep-alive connections spread
    over the servers, ask ``s.preconnect_requests`` times in all (100
    distinct auth keys in turn).  One row: answers/s (first request to last
    answer), latency, refusals and errors, server CPU per answer, and how
    many answers named each server (``named``: port -> answers)."""
    servers = s.preconnect_servers
    scenario, system = "preconnect", f"allspark-cluster-{servers}"
    info = {"servers": servers, "requests": s.preconnect_requests,
            "connections": s.preconnect_procs * s.preconnect_threads}
    workdir = procs.new_workdir()
    target: Target | None = None
    try:
        target = _starter(system, s)(workdir)
        keys = target.mint_keys([(f"pc-{i}", f"pc-user-{i}") for i in range(100)])
        per_thread = max(1, s.preconnect_requests // (s.preconnect_procs * s.preconnect_threads))
        gens = []
        for n in range(s.preconnect_procs):
            path = os.path.join(workdir, f"preconnect-{n}.json")
            with open(path, "w") as f:
                json.dump({"servers": target.urls, "keys": keys, "threads": s.preconnect_threads,
                           "requests": per_thread, "first": n * s.preconnect_threads}, f)
            gens.append(procs.spawn(f"loadgen-preconnect-{n}", [sys.executable, "-m", "benchmarks.preconnect", path],
                                    log_path=path[:-5] + ".log", pipes=True))
        lg = LoadGenerators(gens)
        try:
            ready = lg.collect("READY", 30)
            if any("connected" not in r for r in ready):
                raise RuntimeError(f"a pre-connection process did not start: {ready}")
            cpu0, each0 = target.cpu_s(), [p.cpu_s() for p in target.procs]
            t0 = time.perf_counter()
            lg.tell("GO {}")
            results = lg.collect("RESULT", s.deadline_s + 30)
            wall = time.perf_counter() - t0
            cpu = target.cpu_s() - cpu0
            each = [round(p.cpu_s() - b, 3) for p, b in zip(target.procs, each0)]
            hwm = target.hwm_kb()
            alive = all(p.alive() for p in target.procs)
        finally:
            lg.tell("STOP")
            lg.stop()
    except Exception as e:  # noqa: BLE001 - reported as a failed row
        s.log(f"  {scenario:18} {system:16} FAILED: {e}")
        return [_row(scenario, system, target.label if target else system, status="failed", reason=str(e)[:2000],
                     **info)]
    finally:
        if target is not None:
            target.stop()
    expected = per_thread * s.preconnect_procs * s.preconnect_threads
    answers = sum(int(r.get("answers", 0)) for r in results)
    refused: dict[str, int] = {}
    named: dict[str, int] = {}
    for r in results:
        for k, v in (r.get("refused") or {}).items():
            refused[k] = refused.get(k, 0) + v
        for k, v in (r.get("named") or {}).items():
            named[k] = named.get(k, 0) + v
    errors = sum(int(r.get("errors", 0)) for r in results) + sum(refused.values())
    lat = sorted(x for r in results for x in r.get("latencies_ms", []))
    starts = [r["t_start"] for r in results if r.get("t_start")]
    ends = [r["t_end"] for r in results if r.get("t_end")]
    duration = (max(ends) - min(starts)) / 1000 if starts and ends else 0.0
    row = _row(scenario, system, f"Allspark pre-connection, {servers} servers", status="ok", **info,
               sent=expected, expected=expected, received=answers, lost=expected - answers - sum(refused.values()),
               duplicates=0, errors=errors, refused=refused, complete=answers == expected,
               error_samples=[e for r in results for e in r.get("error_samples", [])][:10],
               reconnects=sum(int(r.get("reconnects", 0)) for r in results), named=dict(sorted(named.items())),
               duration_s=round(duration, 4), throughput=round(answers / duration, 1) if duration > 0 else 0.0,
               latency_ms={"p50": round(percentile(lat, 0.5), 3), "p95": round(percentile(lat, 0.95), 3),
                           "p99": round(percentile(lat, 0.99), 3), "max": round(lat[-1], 3) if lat else 0.0},
               cdf=cdf_sample(lat), server_cpu_s=round(cpu, 3), server_cpu_s_each=each,
               server_cpu_us_per_msg=round(cpu / answers * 1e6, 2) if answers else None,
               server_peak_rss_mb=round(hwm / 1024, 1), server_alive=alive, loadgen="python",
               loadgen_procs=len(gens), harness_wall_s=round(wall, 3),
               loadgen_cpu_util=round(sum(float(r.get("cpu_s", 0)) for r in results) / max(1e-9, wall) / len(gens), 3))
    s.log(f"  {scenario:18} {row['label']:22} {row['throughput']:>10,.0f} answers/s  {duration:7.3f} s  "
          f"p50 {row['latency_ms']['p50']:.2f}  p99 {row['latency_ms']['p99']:.2f} ms  errors {errors}  "
          f"server {row['server_cpu_us_per_msg']} us/answer (per server {each})  named {row['named']}  "
          f"loadgen cpu {row['loadgen_cpu_util']:.0%}")
    return [row]
