"""Micro benchmark of a store: append N single-recipient messages, then ack each.

Usage::

    .venv/bin/python benchmarks/store_micro.py [--url sqlite:///tmp/x.db] [-n 50000]
        [--nodes 1000] [--window 2000] [--size 200]

Keeps ``--window`` operations in flight (as many concurrent clients would),
runs the real reactor, and prints messages/s for the append phase, the ack
phase and both together (one append plus one ack per message).
"""

from __future__ import annotations

import argparse
import os
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


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """Run both phases and print the rates."""
    tmp = None
    url = args.url
    if url is None:
        tmp = tempfile.mkdtemp(prefix="allspark-bench-")
        url = f"sqlite:///{tmp}/bench.db"
    store: Store = open_store(url, reactor)
    await store.start()
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
    await _windowed(args.n, args.window, append)
    t1 = time.perf_counter()
    await _windowed(args.n, args.window, ack)
    t2 = time.perf_counter()
    left = 0
    for node in nodes[:10]:
        left += len((await store.fetch_inbox(node, 0, 10)).messages)
    await store.close()
    print(f"store: {url}  messages: {args.n}  body: {len(body)} bytes  nodes: {args.nodes}")
    print(f"append: {args.n / (t1 - t0):,.0f} msg/s  ({t1 - t0:.2f} s)")
    print(f"ack:    {args.n / (t2 - t1):,.0f} msg/s  ({t2 - t1:.2f} s)")
    print(f"append+ack: {args.n / (t2 - t0):,.0f} msg/s  (rows left in 10 inboxes: {left})")


def main() -> None:
    """Parse arguments and run under the global reactor."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="store URL (default: a temp SQLite file)")
    parser.add_argument("-n", type=int, default=50_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--size", type=int, default=200)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
