"""A claiming process for the store contract's cross-process push test.

Run as ``python push_claimer.py URL OWNER BARRIER_DIR PEERS``: opens the
store at ``URL``, creates ``BARRIER_DIR/OWNER`` and waits (at most
``BARRIER_S``) until ``PEERS`` files are there, so that every claimer starts
at the same moment; then calls ``claim_due_pushes(now, OWNER, lease, 3)``
with a short pause between calls (so the claimers' calls interleave) until a
call returns nothing (at most ``MAX_CALLS`` calls), printing one line per
claimed node_id, and closes the store.  The test starts two of these on one
store whose nodes are all due, and checks that no node was printed by both.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from twisted.internet import defer, task

from allspark.store import open_store

#: A far-future "now": every node the test scheduled is due, no lease ends.
NOW_MS = 10**12
LEASE_MS = 10**9
PER_CALL = 3
MAX_CALLS = 1000
PAUSE_S = 0.01
BARRIER_S = 60.0


async def main(reactor: Any, url: str, owner: str, barrier: str, peers: int) -> None:
    """Wait for the other claimers, then claim until nothing is left,
    printing each claimed node_id."""
    store = open_store(url, reactor)
    await store.start()
    try:
        open(os.path.join(barrier, owner), "w").close()
        deadline = time.monotonic() + BARRIER_S
        while len(os.listdir(barrier)) < peers:
            if time.monotonic() > deadline:
                raise SystemExit(f"{owner}: the other claimers never came")
            await task.deferLater(reactor, 0.005, lambda: None)
        for _ in range(MAX_CALLS):
            jobs = await store.claim_due_pushes(NOW_MS, owner, LEASE_MS, PER_CALL)
            if not jobs:
                break
            sys.stdout.write("".join(f"{job.node_id}\n" for job in jobs))
            sys.stdout.flush()
            await task.deferLater(reactor, PAUSE_S, lambda: None)
    finally:
        await store.close()


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(
        main(reactor, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ))
