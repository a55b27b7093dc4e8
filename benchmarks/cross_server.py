"""Cross-server direct messages against same-server ones, in one run.

Two Allspark processes on 127.0.0.1 share one SQLite file and are meshed
(a cluster secret).  Two phases with the same load, one after the other:

- ``same``: every sender and every receiver on server A;
- ``cross``: senders on A, receivers on B (each message is stored by A and
  forwarded over the peer link to B, which writes it to the socket).

Each phase: ``--pairs`` senders each send ``--messages / pairs`` durable
messages to their own receiver, at most ``--window`` unanswered; receivers
are the bundled client (auto-ack).  Reported per phase: msg/s (first send to
last receipt), server CPU per message summed over both processes
(utime + stime from /proc), how many arrived live, and how many were lost
(never received, even after a final sync).

    python -m benchmarks.cross_server --messages 20000 --pairs 10 --window 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.request
from typing import Any

from twisted.internet import defer, reactor, task

from allspark.client import Client, open_socket, pre_connection
from benchmarks import procs


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        body: dict[str, Any] = json.loads(r.read())
        return body


async def _wait(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.2)


async def _client_on(target: procs.Target, index: int, auth_key: str) -> Client:
    """A client connected to server ``index`` itself (pre-connection asked there
    until the balancer names it)."""
    base = target.urls[index]
    port = int(base.rsplit(":", 1)[1])
    for _ in range(200):
        info = await pre_connection(base, auth_key)
        if info["node"]["port"] == port:
            client = await open_socket(reactor, info["node"]["ws_url"])
            await client.sync()
            return client
    raise RuntimeError(f"the balancer never named {base}")


async def _phase(target: procs.Target, name: str, receiver_server: int, pairs: int, messages: int,
                 window: int) -> dict[str, Any]:
    ids: list[tuple[str, str | None]] = [(f"{name}-{role}{i}", None) for role in "sr" for i in range(pairs)]
    keys = target.mint_keys(ids)
    senders = [await _client_on(target, 0, keys[i]) for i in range(pairs)]
    receivers = [await _client_on(target, receiver_server, keys[pairs + i]) for i in range(pairs)]
    per_sender = messages // pairs
    statuses: dict[str, int] = {}
    received = [0] * pairs

    async def drain(i: int) -> None:
        while received[i] < per_sender:
            await receivers[i].next_message(timeout=120)
            received[i] += 1

    async def send_all(i: int) -> None:
        in_flight: list[defer.Deferred[Any]] = []
        for n in range(per_sender):
            d = senders[i].send(dest_id=f"{name}-r{i}", payload=n)

            def count(accepted: dict[str, Any]) -> None:
                statuses[accepted["status"]] = statuses.get(accepted["status"], 0) + 1

            d.addCallback(count)
            in_flight.append(d)
            if len(in_flight) >= window:
                await in_flight.pop(0)
        for d in in_flight:
            await d

    cpu_before = target.cpu_s()
    each_before = [proc.cpu_s() for proc in target.procs]
    started = time.monotonic()
    drains = [defer.ensureDeferred(drain(i)) for i in range(pairs)]
    await defer.gatherResults([defer.ensureDeferred(send_all(i)) for i in range(pairs)])
    try:
        await defer.gatherResults(drains)
    except Exception:  # noqa: BLE001 - counted as lost below
        pass
    elapsed = time.monotonic() - started
    cpu = target.cpu_s() - cpu_before
    each = [round(proc.cpu_s() - before, 2) for proc, before in zip(target.procs, each_before)]
    for client in receivers:  # anything not received live comes now, or is lost
        await client.sync()
    for i, client in enumerate(receivers):
        while client.messages.pending and received[i] < per_sender:
            client.messages.pending.pop(0)
            received[i] += 1
    total = per_sender * pairs
    for client in senders + receivers:
        if client.protocol is not None:
            client.protocol.dropConnection(abort=True)
    return {"phase": name, "messages": total, "seconds": round(elapsed, 2),
            "msg_per_s": round(total / elapsed), "server_cpu_s": round(cpu, 2),
            "server_cpu_us_per_msg": round(cpu / total * 1e6, 1), "server_cpu_s_a_b": each, "accepted": statuses,
            "lost": total - sum(received)}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = procs.new_workdir()
    store = "sqlite:///" + os.path.join(workdir, "shared.db").lstrip("/")
    target = procs.start_allspark(workdir, servers=2, extra_args=(f"--store={store}",))
    try:
        await _wait("the two servers linked", lambda: all(_health(u).get("peers") for u in target.urls), 30)
        # the balancer hands out a server only once it has run 5 s
        await task.deferLater(reactor, 6)
        results = []
        for name, receiver_server in (("same", 0), ("cross", 1)):
            results.append(await _phase(target, name, receiver_server, args.pairs, args.messages, args.window))
        return results
    finally:
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cross_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--window", type=int, default=50)
    args = p.parse_args(argv)
    out = procs.run_in_reactor(run, args)
    for row in out:
        print(json.dumps(row))
    if len(out) == 2 and out[0]["server_cpu_us_per_msg"]:
        print(json.dumps({"cross_over_same_cpu": round(out[1]["server_cpu_us_per_msg"] /
                                                       out[0]["server_cpu_us_per_msg"], 2)}))
    return 0 if len(out) == 2 and all(r["lost"] == 0 for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
