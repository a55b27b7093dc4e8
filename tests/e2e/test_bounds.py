"""Bounded output, end to end: what one client can make the server hold for
it, frames the server adds fields to, answers too big for one frame, and one
``sync`` that brings everything (issue 8, items 1-4 and 14).

Figures (RSS) are printed with ``pytest -s``; they are measured, not asserted
beyond a generous bound.
"""

from __future__ import annotations

import sys
import time

import orjson
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from tests.e2e.helpers import proc_status_kb, raw_socket, wait_until, ws_read_frames, ws_text_frame
from tests.support import ServerProcess, client_for, key, start_server


def cpu_ticks(pid: int) -> int:
    """User + system CPU ticks of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def wait_until_idle(pid: int, timeout: float = 120.0) -> None:
    """Wait until process ``pid`` used no CPU for half a second (bounded)."""
    last = [cpu_ticks(pid), time.monotonic()]

    def idle() -> bool:
        ticks, now = cpu_ticks(pid), time.monotonic()
        if ticks != last[0]:
            last[:] = [ticks, now]
            return False
        return now - last[1] >= 0.5

    await wait_until(idle, timeout, interval=0.1, what=f"process {pid} going idle")


async def meet(testcase: unittest.TestCase, server: ServerProcess, node_id: str) -> None:
    """Connect ``node_id`` once and leave: the cluster now knows the node."""
    client = await client_for(testcase, server, node_id)
    await client.ping()
    await client.close()


class SyncMemoryTests(unittest.TestCase):
    """Item 1: syncs on connections that never read cannot grow the server."""

    timeout = 240

    def setUp(self) -> None:
        self.server = start_server(self, "--max-rate=100000", "--max-burst=100000")

    async def test_syncs_on_sockets_that_never_read_keep_the_server_small(self) -> None:
        server = self.server
        await meet(self, server, "hog")
        filler = await client_for(self, server, "filler")
        payload = "x" * 60_000
        for batch in range(4):
            answers = await gatherResults(
                [filler.send(dest_id="hog", payload=payload) for _ in range(50)], consumeErrors=True)
            self.assertEqual({a["status"] for a in answers}, {"stored"})
        assert server.proc is not None
        pid = server.proc.pid
        rss_before = proc_status_kb(pid, "VmRSS")

        sockets = [raw_socket(server, key("hog"), rcvbuf=4096) for _ in range(10)]
        for sock in sockets:
            self.addCleanup(sock.close)
        syncs = ws_text_frame(b'{"op":"sync","limit":1000}') * 20
        for sock in sockets:
            sock.sendall(syncs)
        await wait_until_idle(pid)

        hwm = proc_status_kb(pid, "VmHWM")
        rss = proc_status_kb(pid, "VmRSS")
        print(f"\n[measure] server RSS before the syncs {rss_before / 1024:.0f} MB, after "
              f"{rss / 1024:.0f} MB, peak {hwm / 1024:.0f} MB", file=sys.stderr)
        self.assertLess(hwm, 400 * 1024)
        # one sync per connection produced, the others were refused at once:
        # a reader that catches up gets every message once, then sync_done
        frames = ws_read_frames(sockets[0], lambda got: any(b'"sync_done"' in f for f in got), timeout=60)
        decoded = [orjson.loads(f) for f in frames]
        messages = [f for f in decoded if "seq" in f]
        self.assertEqual([m["seq"] for m in messages], list(range(1, 201)))
        refused = [f for f in decoded if f.get("op") == "error"]
        self.assertEqual({f["code"] for f in refused}, {"sync_in_progress"})
        self.assertEqual(len(refused), 19)
        # the server still serves everyone else
        other = await client_for(self, server, "bystander")
        self.assertEqual((await other.ping())["op"], "pong")
