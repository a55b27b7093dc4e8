"""Micro benchmark of a store's push state: schedule, claim and finish.

Usage::

    .venv/bin/python benchmarks/push_store.py [--url sqlite:///tmp/x.db | --url postgresql] [-n 10000]
        [--claim 100]

Registers ``-n`` FCM targets, schedules all of them in one ``schedule_push``
call (what a burst to many offline nodes costs the scheduler), then claims
them ``--claim`` at a time and finishes each job as sent, as the push
scheduler does, and prints the time of each phase and per job.  Without
``--url`` it uses a new temporary SQLite file; ``--url postgresql`` a new
database on a throwaway PostgreSQL cluster (as ``store_micro.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from allspark.store import PushTarget, open_store  # noqa: E402
from benchmarks.store_micro import store_url  # noqa: E402

#: Registrations submitted at once while filling the store.
FILL_WINDOW = 500


async def measure(reactor: Any, url: str, count: int, claim: int) -> dict[str, float]:
    """Fill, schedule, claim and finish; the seconds of each phase."""
    store = open_store(url, reactor)
    await store.start()
    try:
        nodes = [f"node-{i}" for i in range(count)]
        for start in range(0, count, FILL_WINDOW):
            await defer.gatherResults([
                store.set_push_target(PushTarget(node, "fcm", f"token-{node}", None, None, None, 1))
                for node in nodes[start:start + FILL_WINDOW]
            ])
        began = time.perf_counter()
        scheduled = await store.schedule_push(nodes, 1000)
        schedule_s = time.perf_counter() - began
        assert len(scheduled) == count, f"scheduled {len(scheduled)} of {count}"
        began = time.perf_counter()
        claimed = 0
        for _ in range(count // max(claim, 1) + 2):
            jobs = await store.claim_due_pushes(2000, "bench", 60_000, claim)
            if not jobs:
                break
            claimed += len(jobs)
            await defer.gatherResults([store.finish_push(job.node_id, "bench", job.gen, 2001, None)
                                       for job in jobs])
        claim_s = time.perf_counter() - began
        assert claimed == count, f"claimed {claimed} of {count}"
        return {"schedule_s": schedule_s, "claim_finish_s": claim_s}
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None)
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--claim", type=int, default=100)
    args = parser.parse_args()
    url = store_url(args)

    async def run(reactor: Any) -> None:
        result = await measure(reactor, url, args.n, args.claim)
        print(f"{url.split(':', 1)[0]}: schedule_push of {args.n} nodes in one call: "
              f"{result['schedule_s'] * 1000:.0f} ms; claim {args.claim} at a time + finish each: "
              f"{result['claim_finish_s'] * 1000:.0f} ms ({result['claim_finish_s'] / args.n * 1e6:.0f} us per job)")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
