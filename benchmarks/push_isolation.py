"""Does a push provider that hangs delay delivery to online clients?  Both
cases in one run.

One Allspark server with a ``--push-config`` whose ``[webhook]`` is a stand-in
in this process (twisted.web on 127.0.0.1).  The same load runs twice:

- ``healthy``: the stand-in answers every push at once (200);
- ``hung``: it never answers (each request waits for the server's
  ``timeout_s`` and is cut off; retries pile up behind them, the breaker
  opens).

The load of each phase: ``--pairs`` online sender/receiver pairs exchange
``--messages`` durable messages (at most ``--window`` unanswered per sender)
while a background sender keeps writing to ``--offline`` registered devices
that are never connected, so the scheduler claims, decides and sends pushes
the whole time.  Reported per phase: the online latency (send to receipt,
one clock) p50/p95/p99/max, messages/s, how many were lost, and what the
stand-in saw (pushes answered, requests left hanging).

    python -m benchmarks.push_isolation [--messages 5000 --pairs 10 --offline 200]
    python -m benchmarks.push_isolation --quick      # seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.web import server as web_server
from twisted.web.resource import Resource

from allspark.client import Client, connect
from benchmarks import procs

SECRET = "push-isolation-benchmark-secret"


class StandIn(Resource):
    """The webhook stand-in: answers 200 at once, or (``hang``) never."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hang = False
        self.answered = 0
        self.hanging: list[web_server.Request] = []

    def render_POST(self, request: web_server.Request) -> Any:
        if self.hang:
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return web_server.NOT_DONE_YET
        self.answered += 1
        return b"{}"

    def release(self) -> None:
        """Answer every hanging request still open (between phases)."""
        hanging, self.hanging = self.hanging, []
        for request in hanging:
            if not request.finished and not request._disconnected:
                request.setResponseCode(503)
                request.finish()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _phase(target: procs.Target, name: str, stand_in: StandIn, args: argparse.Namespace,
                 offline_ids: list[str]) -> dict[str, Any]:
    base = target.urls[0]
    ids: list[tuple[str, str | None]] = [(f"{name}-{role}{i}", None) for role in "sr" for i in range(args.pairs)]
    ids.append((f"{name}-spammer", None))
    keys = target.mint_keys(ids)
    senders = [await connect(base, keys[i], reactor) for i in range(args.pairs)]
    receivers = [await connect(base, keys[args.pairs + i], reactor) for i in range(args.pairs)]
    spammer = await connect(base, keys[-1], reactor)
    per_sender = args.messages // args.pairs
    latencies: list[float] = []
    received = [0] * args.pairs
    answered_before = stand_in.answered
    hung_before = len(stand_in.hanging)

    async def drain(i: int) -> None:
        while received[i] < per_sender:
            message = await receivers[i].next_message(timeout=60)
            latencies.append(time.monotonic() - message["payload"]["t"])
            received[i] += 1

    async def send_all(i: int) -> None:
        in_flight: list[defer.Deferred[Any]] = []
        for n in range(per_sender):
            in_flight.append(senders[i].send(dest_id=f"{name}-r{i}", payload={"t": time.monotonic(), "n": n}))
            if len(in_flight) >= args.window:
                await in_flight.pop(0)
        for d in in_flight:
            await d

    done = False

    async def background() -> int:
        """Messages to the offline devices, round after round, until the phase ends."""
        sent = 0
        for _ in range(100_000):
            if done:
                break
            await defer.gatherResults([spammer.send(dest_id=node, payload={"bg": sent}) for node in offline_ids])
            sent += len(offline_ids)
            await task.deferLater(reactor, args.background_interval)
        return sent

    noise = defer.ensureDeferred(background())
    await task.deferLater(reactor, args.warmup)  # pushes are being claimed and sent (or hung) by now
    started = time.monotonic()
    drains = [defer.ensureDeferred(drain(i)) for i in range(args.pairs)]
    await defer.gatherResults([defer.ensureDeferred(send_all(i)) for i in range(args.pairs)])
    try:
        await defer.gatherResults(drains)
    except Exception:  # noqa: BLE001 - counted as lost below
        pass
    elapsed = time.monotonic() - started
    done = True
    background_sent = await noise
    total = per_sender * args.pairs
    for client in senders + receivers + [spammer]:
        if client.protocol is not None:
            client.protocol.dropConnection(abort=True)
    ms = [v * 1000 for v in latencies]
    return {"phase": name, "messages": total, "seconds": round(elapsed, 2), "msg_per_s": round(total / elapsed),
            "latency_ms": {"p50": round(percentile(ms, 50), 2), "p95": round(percentile(ms, 95), 2),
                           "p99": round(percentile(ms, 99), 2), "max": round(max(ms, default=0.0), 2)},
            "lost": total - sum(received), "background_messages": background_sent,
            "pushes_answered": stand_in.answered - answered_before,
            "push_requests_hung": len(stand_in.hanging) - hung_before}


async def _register(base: str, key: str) -> None:
    client: Client = await connect(base, key, reactor)
    await client.request({"op": "register_push", "provider": "webhook", "token": "bench"})
    if client.protocol is not None:
        client.protocol.dropConnection(abort=True)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = procs.new_workdir()
    stand_in = StandIn()
    site = web_server.Site(stand_in)
    site.noisy = False
    port: Any = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    secret_file = os.path.join(workdir, "webhook.secret")
    with open(secret_file, "w") as f:
        f.write(SECRET)
    config = os.path.join(workdir, "push.toml")
    with open(config, "w") as f:
        f.write(f"[push]\ngrace_s = {args.grace}\nwindow_s = {args.push_window}\ntimeout_s = {args.timeout}\n"
                f"poll_s = 0.5\n\n[webhook]\nurl = \"http://127.0.0.1:{port.getHost().port}/push\"\n"
                f"secret_file = \"{secret_file}\"\n")
    target = procs.start_allspark(workdir, extra_args=(f"--push-config={config}",))
    try:
        offline = [f"offline-{i}" for i in range(args.offline)]
        keys = target.mint_keys([(node, None) for node in offline])
        for i in range(0, len(keys), 50):
            await defer.gatherResults([defer.ensureDeferred(_register(target.urls[0], k)) for k in keys[i:i + 50]])
        results = [await _phase(target, "healthy", stand_in, args, offline)]
        stand_in.hang = True
        results.append(await _phase(target, "hung", stand_in, args, offline))
        target.check_alive()
        return results
    finally:
        stand_in.release()
        target.stop()
        await defer.maybeDeferred(port.stopListening)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.push_isolation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=5000, help="online messages per phase")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--offline", type=int, default=200, help="registered devices never connected")
    p.add_argument("--background-interval", type=float, default=0.5,
                   help="seconds between rounds of messages to the offline devices")
    p.add_argument("--warmup", type=float, default=6.0, help="seconds of background load before measuring")
    p.add_argument("--grace", type=float, default=0.2)
    p.add_argument("--push-window", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=5.0, help="[push] timeout_s of the server")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.messages, args.pairs, args.offline, args.warmup, args.timeout = 200, 2, 10, 1.0, 1.0
    out = procs.run_in_reactor(run, args)
    for row in out:
        print(json.dumps(row))
    if len(out) == 2 and out[0]["latency_ms"]["p99"]:
        print(json.dumps({"hung_over_healthy_p99": round(out[1]["latency_ms"]["p99"] / out[0]["latency_ms"]["p99"], 2)}))
    return 0 if len(out) == 2 and all(r["lost"] == 0 for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
