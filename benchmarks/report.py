"""Results as JSON, a markdown table, the targets of issue 5, and a PNG."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from benchmarks.runner import run_quiet


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "node": run_quiet(["node", "--version"]) or None,
        "nats_server": run_quiet(["nats-server", "--version"]) or None,
        "loadavg_at_end": _loadavg(),
    }


def _loadavg() -> str:
    """Other work on the machine skews a run: the report says how busy it was."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def _find(rows: list[dict[str, Any]], scenario: str, system: str, **kw: Any) -> dict[str, Any] | None:
    for r in rows:
        if r["scenario"] == scenario and r["system"] == system and r.get("status") == "ok" and \
                all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 5 next to the number measured (None when not run)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, target: str, met: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "goal": target, "met": met, "note": note})

    relay = _find(rows, "direct_ephemeral", "autobahn-relay")
    eph = _find(rows, "direct_ephemeral", "allspark")
    dur = _find(rows, "direct_durable", "allspark", ids=None)
    js = _find(rows, "direct_durable", "nats-jetstream")
    if eph and relay and relay["throughput"]:
        ratio = eph["throughput"] / relay["throughput"]
        add("direct ephemeral vs bare Autobahn relay", f"{ratio:.0%} ({eph['throughput']:,.0f} / "
            f"{relay['throughput']:,.0f} msg/s)", ">= 70%", ratio >= 0.7)
    if dur and relay and relay["throughput"]:
        ratio = dur["throughput"] / relay["throughput"]
        add("direct durable vs bare Autobahn relay", f"{ratio:.0%} ({dur['throughput']:,.0f} msg/s)", ">= 50%",
            ratio >= 0.5)
    if dur and js:
        add("direct durable vs NATS JetStream", f"{dur['throughput']:,.0f} vs {js['throughput']:,.0f} msg/s "
            f"({dur['throughput'] / max(1, js['throughput']):.2f}x)", "ahead", dur["throughput"] > js["throughput"])
    if dur:
        ok = dur["duration_s"] <= 2.0 and dur["errors"] == 0 and dur["lost"] == 0 and dur["complete"]
        add(f"{dur.get('messages', 0):,} durable messages, {dur.get('clients', 0)} clients",
            f"{dur['duration_s']:.2f} s, {dur['errors']} errors, {dur['lost']} lost", "<= 2 s, 0 errors", ok)
    for durable in (False, True):
        lat = _find(rows, "latency", "allspark", durable=durable, fraction=0.5)
        if lat:
            add(f"p99 latency at half peak ({'durable' if durable else 'ephemeral'}, {lat['rate']:,} msg/s)",
                f"{lat['latency_ms']['p99']:.2f} ms", "<= 20 ms", lat["latency_ms"]["p99"] <= 20)
    cap = _find(rows, "capacity", "allspark")
    if cap:
        add(f"RSS per idle connection ({cap['connected']:,} connections)", f"{cap['rss_per_connection_kb']:.1f} KB",
            "<= 30 KB", cap["rss_per_connection_kb"] <= 30 and cap["connect_failed"] == 0)
    measured = [r for r in rows if r.get("status") == "ok" and r["system"] == "allspark"]
    bad = [f"{r['scenario']}/{r['label']}: {r['errors']} errors, {r['lost']} lost" for r in measured
           if r["errors"] or r["lost"] or not r.get("complete")]
    add("zero errors and lost messages (Allspark, every scenario)", "; ".join(bad) or "0 / 0", "0", not bad)
    if eph and relay:
        add("load generator not the bottleneck (drives the bare relay faster than Allspark)",
            f"relay {relay['throughput']:,.0f} vs Allspark {eph['throughput']:,.0f} msg/s; load generator CPU "
            f"{relay['loadgen_cpu_util']:.0%} of a core on the relay run", "relay > Allspark",
            relay["throughput"] > eph["throughput"])
    return out


def _fmt(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [f"Command: `{result['command']}`  ", f"Machine: {result['machine']['nproc']} CPUs, "
             f"{result['machine']['cpu']}, {result['machine']['memory_gb']} GB; Python {result['machine']['python']}, "
             f"Node {result['machine']['node'] or '-'}, {result['machine']['nats_server'] or 'no nats-server'}  ",
             f"Load generator: {result['settings']['loadgen']} x{result['settings']['loadgen_procs']}; "
             f"{result['settings']['clients']} clients (half send to the other half), "
             f"{result['settings']['messages']:,} messages, window {result['settings']['window']} per pair", ""]
    relay = _find(rows, "direct_ephemeral", "autobahn-relay")
    base = relay["throughput"] if relay else None
    lines += ["| scenario | system | msg/s | vs bare relay | time s | p50 ms | p95 ms | p99 ms | max ms | errors | lost "
              "| server CPU µs/msg | server peak RSS MB | load gen CPU |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r["scenario"] == "capacity":
            continue
        if r.get("status") != "ok":
            lines.append(f"| {r['scenario']} | {r['label']} | {r['status']}: {r.get('reason', '')[:160]} "
                         "| | | | | | | | | | | |")
            continue
        lat = r["latency_ms"]
        ratio = f"{r['throughput'] / base:.0%}" if base and r["scenario"].startswith("direct") else "-"
        lines.append(
            f"| {r['scenario']} | {r['label']} | {_fmt(r['throughput'])} | {ratio} | {_fmt(r['duration_s'], '.3f')} | "
            f"{_fmt(lat['p50'], '.2f')} | {_fmt(lat['p95'], '.2f')} | {_fmt(lat['p99'], '.2f')} | "
            f"{_fmt(lat['max'], '.1f')} | {r['errors']} | {r['lost']} | {_fmt(r['server_cpu_us_per_msg'], '.1f')} | "
            f"{_fmt(r['server_peak_rss_mb'], '.1f')} | {r['loadgen_cpu_util']:.0%} |")
    caps = [r for r in rows if r["scenario"] == "capacity"]
    if caps:
        lines += ["", "| capacity | connections | connect time s | connections/s | RSS idle MB | RSS connected MB "
                  "| KB per connection | failed |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for r in caps:
            if r.get("status") != "ok":
                lines.append(f"| {r['label']} | {r['status']}: {r.get('reason', '')[:160]} | | | | | | |")
                continue
            lines.append(f"| {r['label']} | {r['connected']:,} | {r['connect_s']:.2f} | {_fmt(r['connect_rate'])} | "
                         f"{r['rss_idle_mb']} | {r['rss_connected_mb']} | {r['rss_per_connection_kb']:.1f} | "
                         f"{r['connect_failed']} |")
    clustered = [r for r in rows if r["scenario"] in ("cluster_durable", "preconnect") and r.get("status") == "ok"]
    if clustered:
        lines += ["", "| cluster | servers | where clients landed / answers named | pairs crossing servers "
                  "| server CPU s per process |", "|---|--:|---|--:|---|"]
        for r in clustered:
            spread = r.get("clients_per_server") or r.get("named") or {}
            crossing = f"{r['cross_pairs']} of {r['pairs']}" if "cross_pairs" in r else "-"
            lines.append(f"| {r['label']} | {r.get('servers', '-')} | {', '.join(str(v) for v in spread.values())} "
                         f"| {crossing} | {', '.join(str(c) for c in r.get('server_cpu_s_each', []))} |")
    lines += ["", "| target (issue 5) | measured | goal | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = "yes" if t["met"] else ("no" if t["met"] is False else "-")
        lines.append(f"| {t['target']} | {t['value']} | {t['goal']} | {met} |")
    if result.get("not_run"):
        lines += ["", "Could not run: " + "; ".join(f"{n['what']} ({n['why']})" for n in result["not_run"])]
    prof = result.get("profile")
    if prof and prof.get("status") == "ok":
        lines += ["", f"Profile (py-spy, durable scenario, {prof['samples']} busy samples; self time):", ""]
        lines += [f"- {share}% {name}" for name, share in prof["self_top"][:12]]
    return "\n".join(lines) + "\n"


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def picture(result: dict[str, Any], path: str) -> str | None:
    """Throughput against the references, and the latency CDFs; why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    bars = [r for r in rows if r["scenario"] in ("direct_ephemeral", "direct_durable", "fanout")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    labels = [f"{r['scenario'].replace('direct_', '')}\n{r['label']}" for r in bars]
    colors = ["#d62728" if r["system"] == "allspark" else "#7f7f7f" for r in bars]
    ax1.barh(range(len(bars)), [r["throughput"] for r in bars], color=colors)
    ax1.set_yticks(range(len(bars)), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("deliveries per second (higher is better)")
    ax1.set_title(f"Throughput, {result['settings']['clients']} clients, {result['settings']['messages']:,} msgs")
    for i, r in enumerate(bars):
        ax1.text(r["throughput"], i, f" {r['throughput']:,.0f}", va="center", fontsize=7)
    for r in rows:
        if not r.get("cdf") or r["scenario"] not in ("direct_ephemeral", "direct_durable", "latency"):
            continue
        xs = [p[0] for p in r["cdf"]]
        ys = [p[1] for p in r["cdf"]]
        style = "-" if r["scenario"] == "latency" else ":"
        ax2.plot(xs, ys, style, label=f"{r['scenario']}: {r['label']}", linewidth=1.5 if r["system"] == "allspark" else 1)
    ax2.set_xscale("log")
    ax2.set_xlabel("latency ms (log)")
    ax2.set_ylabel("fraction of messages")
    ax2.set_title("Latency CDF (dotted: at peak, solid: at a fixed rate)")
    ax2.axvline(20, color="k", linewidth=0.5)
    ax2.legend(fontsize=6, loc="lower right")
    ax2.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
