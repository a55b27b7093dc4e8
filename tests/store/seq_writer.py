"""A writer process for the store contract's seq-gap tests (``test_contract.py``).

Run as ``python seq_writer.py URL NAME ROUNDS``: opens the store at ``URL``
and, ROUNDS times, submits one round of appends without waiting between them
(so that a SQLite or PostgreSQL store commits them as one batch):

- ``PER_ROUND`` inbox appends: to ``["x", "y"]`` (two recipients, one atomic
  append), every third one to ``["x"]`` only, each with a de-duplication id;
- one session-stream append to session ``s`` (which the test created).

After each round it prints one JSON line per append of that round, flushed,
*after* the store acknowledged it: ``{"key": K, "seqs": {...}}`` where ``K``
is the body (``NAME:round:i``).  A line printed is an append the store said
was stored; a process killed with ``kill -9`` may have stored more than it
printed, never less.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, task

from allspark.store import open_store

PER_ROUND = 12
WINDOW = 600_000


async def main(reactor: Any, url: str, name: str, rounds: int) -> None:
    """Append ``rounds`` rounds, printing each acknowledged append."""
    store = open_store(url, reactor)
    if hasattr(store, "lease_ms"):
        store.lease_ms = 1000  # a killed peer's leases expire quickly here
    await store.start()
    for r in range(rounds):
        pending: list[tuple[str, defer.Deferred[Any]]] = []
        for i in range(PER_ROUND):
            key = f"{name}:{r}:{i}"
            recipients = ["x"] if i % 3 == 2 else ["x", "y"]
            pending.append((key, store.append_inbox(
                name, key, recipients, key.encode(), b"", 1000, WINDOW
            )))
        key = f"{name}:{r}:s"
        pending.append((key, store.append_session("s", name, None, key.encode(), b"", 1000, WINDOW)))
        results = await defer.gatherResults([d for _, d in pending], consumeErrors=True)
        lines = [json.dumps({"key": k, "seqs": res.seqs}) for (k, _), res in zip(pending, results)]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    await store.close()


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(
        main(reactor, sys.argv[1], sys.argv[2], int(sys.argv[3]))
    ))
