"""``python -m benchmarks`` (or ``./dev bench``): start the servers, drive
them, stop them, and report.

    python -m benchmarks                 the full run (about 2-4 minutes)
    python -m benchmarks --quick         everything at a tiny size, in seconds
    python -m benchmarks --scenarios direct_durable --profile
    python -m benchmarks --scenarios direct_durable --stores sqlite,postgresql

Writes ``OUT/bench-<time>.json``, ``OUT/latest.json``, ``OUT/latest.md`` and
``OUT/performance.png`` (OUT defaults to benchmarks/results, which git
ignores) and prints the markdown table.  See docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import signal
import sys
import time
from typing import Any

from benchmarks import procs, report, suite


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", "--tiny", action="store_true", help="tiny sizes; Node, NATS, matplotlib optional")
    p.add_argument("--scenarios", default=",".join(suite.SCENARIOS),
                   help=f"comma-separated, from {', '.join(suite.SCENARIOS)}")
    p.add_argument("--stores", "--store", default="sqlite",
                   help="Allspark's stores for direct_durable, comma-separated: sqlite, postgresql "
                        "(a throwaway PostgreSQL cluster is started for it); default sqlite")
    p.add_argument("--clients", type=int, help="clients of the direct scenarios (half send to the other half)")
    p.add_argument("--messages", type=int, help="messages per direct run")
    p.add_argument("--window", type=int, help="unanswered messages per sender")
    p.add_argument("--connections", type=int, help="idle connections of the capacity scenario")
    p.add_argument("--fanout-members", type=int)
    p.add_argument("--fanout-messages", type=int)
    p.add_argument("--deadline", type=float, help="seconds a run may take at most")
    p.add_argument("--servers", type=int, help="cluster_durable: meshed servers set against one (default 2)")
    p.add_argument("--preconnect-servers", type=int, help="preconnect: meshed servers (default 3)")
    p.add_argument("--preconnect-requests", type=int, help="preconnect: requests in all (default 20,000)")
    p.add_argument("--loadgen", choices=("auto", "node", "python"), default="auto")
    p.add_argument("--loadgen-procs", type=int, help="load generator processes (default: 1 Node, 3 Python)")
    p.add_argument("--no-references", action="store_true", help="only Allspark and the bare relay")
    p.add_argument("--repeat", type=int, default=1, help="repeat each direct run, keep the median (default 1)")
    p.add_argument("--profile", action="store_true", help="py-spy on Allspark during one more durable run")
    p.add_argument("--out", default=os.path.join(procs.BENCH, "results"), help="output directory")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> suite.Settings:
    s = suite.Settings()
    if args.quick:
        s = suite.Settings(clients=10, messages=500, window=20, connections=200, fanout_members=10,
                           fanout_messages=20, fanout_window=5, deadline_s=20.0, drain_s=3.0, quick=True,
                           preconnect_requests=300)
    for name, attr in (("clients", "clients"), ("messages", "messages"), ("window", "window"),
                       ("connections", "connections"), ("fanout_members", "fanout_members"),
                       ("fanout_messages", "fanout_messages"), ("deadline", "deadline_s"),
                       ("servers", "cluster_servers"), ("preconnect_servers", "preconnect_servers"),
                       ("preconnect_requests", "preconnect_requests")):
        value = getattr(args, name)
        if value is not None:
            setattr(s, attr, value)
    s.scenarios = tuple(x.strip() for x in args.scenarios.split(",") if x.strip())
    unknown = set(s.scenarios) - set(suite.SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    s.stores = tuple(x.strip() for x in args.stores.split(",") if x.strip())
    if not s.stores or set(s.stores) - {"sqlite", "postgresql"}:
        raise SystemExit(f"--stores: sqlite and/or postgresql, not {args.stores!r}")
    s.references = not args.no_references
    s.profile = args.profile
    s.repeat = max(1, args.repeat)
    s.out_dir = args.out
    return s


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    s = settings_from(args)
    os.makedirs(s.out_dir, exist_ok=True)
    raise_fd_limit()
    not_run: list[dict[str, str]] = []
    log = s.log

    # the load generator: Node when it can run, else several Python processes
    node_why = procs.ensure_node_modules(log) if args.loadgen in ("auto", "node") else "not chosen (--loadgen python)"
    if args.loadgen == "node" and node_why:
        raise SystemExit(f"--loadgen node: {node_why}")
    s.loadgen = "node" if node_why is None else "python"
    s.node_missing = node_why
    s.nats_missing = procs.nats_available()
    s.loadgen_procs = args.loadgen_procs or (1 if s.loadgen == "node" else 3)
    if node_why:
        not_run.append({"what": "Node load generator, Node ws relay, Socket.IO relay, NATS", "why": node_why})
    elif s.nats_missing:
        not_run.append({"what": "NATS core and JetStream", "why": s.nats_missing})
    if s.connections > 10_000 or s.connections * 2 + 100 > resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 2:
        log(f"benchmarks: note: {s.connections} connections need as many file descriptors in the server "
            f"(limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})")

    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log(f"benchmarks: {command.strip()} -- load generator: {s.loadgen} x{s.loadgen_procs}")
    rows: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        if "direct_ephemeral" in s.scenarios:
            rows += suite.direct(s, durable=False)
        if "direct_durable" in s.scenarios:
            rows += suite.direct(s, durable=True)
        if "fanout" in s.scenarios:
            rows += suite.fanout(s)
        if "capacity" in s.scenarios:
            rows += suite.capacity(s)
        if "latency" in s.scenarios:
            peaks = {(r["system"], r.get("durable")): r["throughput"] for r in rows
                     if r["scenario"].startswith("direct_") and r.get("status") == "ok"}
            rows += suite.latency(s, peaks)
        if "cluster_durable" in s.scenarios:
            rows += suite.cluster_durable(s)
        if "preconnect" in s.scenarios:
            rows += suite.preconnect(s)
        if s.profile:
            profile = suite.profile_durable(s)
    except KeyboardInterrupt:
        log("benchmarks: interrupted; stopping every process")
        return 130
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)

    for r in rows:
        if r.get("status") == "unavailable":
            not_run.append({"what": f"{r['scenario']}: {r['label']}", "why": r.get("reason", "")})
    result: dict[str, Any] = {
        "command": command.strip(), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1), "machine": report.machine(),
        "settings": {k: v for k, v in vars(s).items() if k not in ("log", "skipped")},
        "rows": rows, "not_run": not_run, "profile": profile,
        "pids_started": list(procs.started_pids), "pids_still_running": [p.pid for p in procs._running],
    }
    result["targets"] = report.targets(rows, result["settings"])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    png = os.path.join(s.out_dir, "performance.png")
    why = report.picture(result, png)
    result["png"] = None if why else png
    if why:
        not_run.append({"what": "the PNG", "why": why})
    md = report.markdown(result)
    report.write_json(result, os.path.join(s.out_dir, f"bench-{stamp}.json"))
    report.write_json(result, os.path.join(s.out_dir, "latest.json"))
    with open(os.path.join(s.out_dir, "latest.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    print(f"benchmarks: wrote {s.out_dir}/latest.json, latest.md" + (f", {png}" if not why else "")
          + f" in {result['elapsed_s']} s")
    return 0


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
