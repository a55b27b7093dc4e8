"""Micro benchmark of a store: append N single-recipient messages, then ack each.

Usage::

    .venv/bin/python benchmarks/store_micro.py [--url sqlite:///tmp/x.db] [-n 50000]
        [--nodes 1000] [--window 2000] [--size 200] [--processes 1]

Keeps ``--window`` operations in flight (as many concurrent clients would),
runs the real reactor, and prints messages/s for the append phase, the ack
phase and both together (one append plus one ack per message), and how the
store batched them: transactions, operations per transaction, milliseconds
per transaction.

``--url postgresql`` starts a throwaway PostgreSQL cluster (PostgreSQL's
default durability: fsync on) and uses a new database on it.
``--processes N`` runs N processes at once on the same store (the same SQLite
file or PostgreSQL database, the same inboxes), each appending ``-n``
messages, and reports each and their sum.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from allspark.store import Store, open_store  # noqa: E402


async def _windowed(count: int, window: int, call: Callable[[int], defer.Deferred[Any]]) -> None:
    """Issue ``call(i)`` for i in range(count), at most ``window`` outstanding.

    Completions only count; new calls are issued by a loop, not from inside
    callbacks, so a store whose Deferreds fire synchronously does not recurse.
    """
    state = {"finished": 0}
    wake: list[defer.Deferred[None]] = []

    def finished(_: object) -> None:
        state["finished"] += 1
        # Wake the issuing loop when half the window is free (or at the end),
        # not on every completion: the harness should cost little itself.
        if wake and (issued_now() - state["finished"] <= window // 2 or state["finished"] == count):
            wake.pop().callback(None)

    issued = 0

    def issued_now() -> int:
        return issued

    while issued < count:
        while issued < count and issued - state["finished"] < window:
            call(issued).addCallback(finished)
            issued += 1
        if issued < count:
            d = defer.Deferred[None]()
            wake.append(d)
            await d
    while state["finished"] < count:
        d = defer.Deferred[None]()
        wake.append(d)
        await d


class BatchStats:
    """Counts the store's transactions: wraps its ``_run_batch`` (SQLite and
    PostgreSQL stores both have one; the last argument is the batch)."""

    def __init__(self, store: Any) -> None:
        self.sizes: list[int] = []
        self.seconds: list[float] = []
        run_batch = getattr(store, "_run_batch", None)
        if run_batch is None:
            return

        def counted(*args: Any) -> Any:
            started = time.perf_counter()
            result = run_batch(*args)
            if result is not None:  # SQLite: None is "locked by another process, retried"
                self.sizes.append(len(args[-1]))
                self.seconds.append(time.perf_counter() - started)
            return result

        store._run_batch = counted

    def mark(self) -> int:
        return len(self.sizes)

    def summary(self, since: int, until: int) -> dict[str, float]:
        sizes, seconds = self.sizes[since:until], self.seconds[since:until]
        if not sizes:
            return {"batches": 0, "ops_per_batch": 0.0, "ms_per_batch": 0.0}
        return {"batches": len(sizes), "ops_per_batch": round(sum(sizes) / len(sizes), 1),
                "ms_per_batch": round(1000 * sum(seconds) / len(seconds), 2)}


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """Run both phases and print the rates (one JSON line with ``--json``)."""
    tmp = None
    url = args.url
    if url is None:
        tmp = tempfile.mkdtemp(prefix="allspark-bench-")
        url = f"sqlite:///{tmp}/bench.db"
    store: Store = open_store(url, reactor)
    await store.start()
    stats = BatchStats(store)
    if args.start_at:
        # several processes: start appending together
        await task.deferLater(reactor, max(0.0, args.start_at - time.time()), lambda: None)
    body = b'{"op":"message","dest_id":"n","src_id":"s","payload":"' + b"x" * (args.size - 56) + b'"}'
    nodes = [f"node-{i:05d}" for i in range(args.nodes)]
    seqs: list[int] = [0] * args.n
    now = int(time.time() * 1000)

    def append(i: int) -> defer.Deferred[Any]:
        node = nodes[i % len(nodes)]
        d = store.append_inbox("sender", None, (node,), body, b"", now, 600_000)
        return d.addCallback(lambda r: seqs.__setitem__(i, r.seqs[node]))

    def ack(i: int) -> defer.Deferred[Any]:
        return store.ack_inbox(nodes[i % len(nodes)], seqs[i])

    t0 = time.perf_counter()
    started = time.time()
    m0 = stats.mark()
    await _windowed(args.n, args.window, append)
    t1 = time.perf_counter()
    appended = time.time()
    m1 = stats.mark()
    await _windowed(args.n, args.window, ack)
    t2 = time.perf_counter()
    m2 = stats.mark()
    left = 0
    for node in nodes[:10]:
        left += len((await store.fetch_inbox(node, 0, 10)).messages)
    await store.close()
    if args.json:
        print(json.dumps({"append_s": t1 - t0, "ack_s": t2 - t1, "started": started, "appended": appended,
                          "append_batches": stats.summary(m0, m1), "ack_batches": stats.summary(m1, m2)}))
        return
    print(f"store: {url.split('@')[-1]}  messages: {args.n}  body: {len(body)} bytes  nodes: {args.nodes}")
    print(f"append: {args.n / (t1 - t0):,.0f} msg/s  ({t1 - t0:.2f} s)  {_batches(stats.summary(m0, m1))}")
    print(f"ack:    {args.n / (t2 - t1):,.0f} msg/s  ({t2 - t1:.2f} s)  {_batches(stats.summary(m1, m2))}")
    print(f"append+ack: {args.n / (t2 - t0):,.0f} msg/s  (rows left in 10 inboxes: {left})")


def _batches(summary: dict[str, float]) -> str:
    return (f"{summary['batches']} transactions, {summary['ops_per_batch']} ops and "
            f"{summary['ms_per_batch']} ms each")


def store_url(args: argparse.Namespace) -> str:
    """The store to measure: ``--url``, a new temporary SQLite file, or a new
    database on a throwaway PostgreSQL cluster for ``--url postgresql``."""
    if args.url in ("postgresql", "postgres"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.store.postgres_cluster import shared_cluster

        return shared_cluster(durable=True).create_database("allspark_bench")
    if args.url is None:
        return f"sqlite:///{tempfile.mkdtemp(prefix='allspark-bench-')}/bench.db"
    return str(args.url)


async def _start_and_close(reactor: Any, url: str) -> None:
    store = open_store(url, reactor)
    await store.start()
    await store.close()


def _run_children(args: argparse.Namespace, url: str) -> None:
    start_at = time.time() + 3.0
    cmd = [sys.executable, os.path.abspath(__file__), "--url", url, "-n", str(args.n), "--nodes", str(args.nodes),
           "--window", str(args.window), "--size", str(args.size), "--json", "--start-at", str(start_at)]
    children = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=1800)
        if child.returncode != 0:
            raise SystemExit(f"a writer process failed with {child.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"store: {url.split('@')[-1]}  processes: {args.processes}  messages: {args.n} each  "
          f"nodes: {args.nodes} (shared)  window: {args.window} each")
    for i, r in enumerate(results):
        print(f"  process {i}: append {args.n / r['append_s']:,.0f} msg/s  {_batches(r['append_batches'])}")
    wall = max(r["appended"] for r in results) - min(r["started"] for r in results)
    total = args.n * args.processes
    print(f"append, all processes: {total / wall:,.0f} msg/s  ({total} messages in {wall:.2f} s)")


def main() -> None:
    """Parse arguments and run under the global reactor."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="store URL (default: a temp SQLite file)")
    parser.add_argument("-n", type=int, default=50_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--processes", type=int, default=1, help="processes appending to one store at once")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes > 1:
        url = store_url(args)
        try:
            task.react(lambda reactor: defer.ensureDeferred(_start_and_close(reactor, url)))
        except SystemExit as e:
            if e.code:
                raise
        _run_children(args, url)
        return
    args.url = store_url(args)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
