"""Bounded output, end to end: what one client can make the server hold for
it, frames the server adds fields to, answers too big for one frame, and one
``sync`` that brings everything (issue 8, items 1-4 and 14).

Figures (RSS) are printed with ``pytest -s``; they are measured, not asserted
beyond a generous bound.
"""

from __future__ import annotations

import sys
import time
from typing import Any
from urllib.parse import urlencode

import orjson
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from allspark.client import AllsparkError, Client
from tests.e2e.helpers import http_get, proc_status_kb, raw_socket, wait_until, ws_read_frames, ws_text_frame
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


class FrameSizeTests(unittest.TestCase):
    """Items 2 and 3: what the server adds to a message never makes it too
    large to deliver; it is refused at accept time instead."""

    timeout = 90

    def setUp(self) -> None:
        self.server = start_server(self)

    async def expect_too_large(self, client: Client, **fields: Any) -> None:
        try:
            answer = await client.send(**fields)
        except AllsparkError as e:
            self.assertEqual((e.code, e.frame["limit"]), ("too_large", 65536), e.frame)
            self.assertGreater(e.frame["size"], 65536)
        else:
            self.fail(f"a message just under the frame limit was answered {answer}")

    async def test_a_message_just_under_the_frame_limit_is_refused_and_the_inbox_stays_usable(self) -> None:
        server = self.server
        await meet(self, server, "bob")
        alice = await client_for(self, server, "alice", "alice-user")
        just_under = "x" * (65536 - 100)  # alice's frame fits; the copy with seq, dest_id... would not
        await self.expect_too_large(alice, dest_id="bob", payload=just_under)  # bob offline
        bob = await client_for(self, server, "bob", auto_ack=False)  # its sync on connect works
        await self.expect_too_large(alice, dest_id="bob", payload=just_under)  # bob online
        await self.expect_too_large(alice, dest_id="bob", payload=just_under, ephemeral=True)
        self.assertEqual(len(bob.messages.pending), 0)
        # the largest messages that are accepted reach the recipient, live and by sync
        fits = "x" * (65536 - 400)
        self.assertEqual((await alice.send(dest_id="bob", payload=fits))["status"], "delivered")
        live = await bob.next_message()
        self.assertEqual((live["seq"], len(live["payload"])), (1, len(fits)))
        await bob.close()
        bob = await client_for(self, server, "bob", auto_ack=False)
        synced = await bob.next_message()
        self.assertEqual((synced["seq"], len(synced["payload"])), (1, len(fits)))

    async def test_a_session_broadcast_just_under_the_limit_breaks_no_other_session(self) -> None:
        server = self.server
        bob = await client_for(self, server, "bob", auto_ack=False)
        await meet(self, server, "carol")
        alice = await client_for(self, server, "alice")
        for session_id in ("s1", "s2"):
            await alice.create_session(session_id=session_id)
            await alice.join_session(session_id, node_id="bob")
        just_under = "x" * (65536 - 100)
        await self.expect_too_large(alice, dest_session_id="s1", payload=just_under)
        await self.expect_too_large(alice, dest_session_id="s1", payload=just_under, ephemeral=True)
        # joins and broadcasts go on, in any session, while bob stays connected
        member = await alice.join_session("s2", node_id="carol")
        self.assertEqual(member["op"], "member")
        for session_id, status in (("s1", "delivered"), ("s2", "stored")):  # carol is offline
            accepted = await alice.send(dest_session_id=session_id, payload="after")
            self.assertEqual(accepted["status"], status)
        got = []
        while len(got) < 2:
            message = await bob.next_message()
            got.append((message["dest_session_id"], message["payload"]))
        self.assertEqual(sorted(got), [("s1", "after"), ("s2", "after")])


class PagedAnswerTests(unittest.TestCase):
    """Item 4: answers that would not fit in one frame are paged, over
    frames and HTTP."""

    timeout = 180

    def setUp(self) -> None:
        self.server = start_server(self, "--max-rate=100000", "--max-burst=100000")

    async def test_get_session_info_with_700_long_named_members(self) -> None:
        server = self.server
        owner = await client_for(self, server, "owner")
        await owner.create_session(session_id="big")
        names = [f"member-{i:04d}-" + "n" * 100 for i in range(700)]
        await gatherResults([owner.request({"op": "join_session", "session_id": "big", "node_id": n})
                             for n in names], consumeErrors=True)

        first = await owner.session_info("big")
        self.assertEqual((first["member_count"], first["more"]), (701, True))
        self.assertLessEqual(len(orjson.dumps(first)), 65536)
        members = await owner.session_members("big")
        self.assertEqual(sorted(m["name"] for m in members), sorted(names + ["owner"]))
        # over HTTP: the same pages
        query = {"auth_key": key("owner"), "session_id": "big", "limit": "1000"}
        seen: list[str] = []
        for _ in range(100):
            answer = http_get(f"{server.base_url}/get_session_info?{urlencode(query)}")
            self.assertEqual(answer.status, 200, answer.body[:200])
            self.assertLessEqual(len(answer.body), 65536)
            page = answer.json()
            seen.extend(m["name"] for m in page["members"])
            if not page["more"]:
                break
            query["after"] = page["next"]
        self.assertEqual(seen, sorted(names + ["owner"]))

    async def test_my_sessions_for_a_node_in_3000_sessions(self) -> None:
        server = self.server
        await meet(self, server, "popular")
        owner = await client_for(self, server, "owner")
        ids = [f"session-{i:04d}-" + "s" * 60 for i in range(3000)]
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            await gatherResults([owner.request({"op": "create_session", "session_id": s}) for s in batch],
                                consumeErrors=True)
            await gatherResults([owner.request({"op": "join_session", "session_id": s, "node_id": "popular"})
                                 for s in batch], consumeErrors=True)
        popular = await client_for(self, server, "popular")
        first = await popular.request({"op": "my_sessions"})
        self.assertTrue(first["more"])
        sessions = await popular.my_sessions()
        self.assertEqual([s["session_id"] for s in sessions], ids)
        answer = http_get(f"{server.base_url}/my_sessions?{urlencode({'auth_key': key('popular')})}")
        self.assertEqual(answer.status, 200)
        self.assertLessEqual(len(answer.body), 65536)
        self.assertEqual(answer.json()["next"], answer.json()["sessions"][-1]["session_id"])


class OneSyncTests(unittest.TestCase):
    """Item 14: one sync without session_id brings the inbox and every
    session with rows past the member's cursor."""

    timeout = 120

    def setUp(self) -> None:
        self.server = start_server(self, "--max-rate=100000", "--max-burst=100000")

    async def test_one_sync_brings_the_inbox_and_every_session_in_parts(self) -> None:
        server = self.server
        await meet(self, server, "bob")
        alice = await client_for(self, server, "alice")
        for session_id in ("s1", "s2", "quiet"):
            await alice.create_session(session_id=session_id)
            await alice.join_session(session_id, node_id="bob")
        await alice.send(dest_id="bob", payload="direct")
        await alice.send(dest_session_id="s1", payload="one")
        await alice.send(dest_session_id="s2", payload="two")
        await alice.send(dest_session_id="s2", payload="three")

        bob = await client_for(self, server, "bob", sync=False, auto_ack=False)
        done = await bob.request({"op": "sync"})  # the first part (the inbox) answers the raw request
        parts = [done]
        for _ in range(10):
            frame = await bob.next_event()
            parts.append(frame)
            if frame["op"] == "sync_done":
                break
        self.assertEqual([(p["op"], p.get("session_id")) for p in parts],
                         [("synced", None), ("synced", "s1"), ("synced", "s2"), ("sync_done", None)])
        self.assertEqual({p["id"] for p in parts}, {done["id"]})
        self.assertEqual([p["more"] for p in parts[:3]], [False, False, False])
        self.assertEqual((parts[3]["upto"], parts[3]["sessions"]), (1, 2))
        got = [(m.get("dest_session_id"), m["payload"]) for m in bob.messages.pending]
        self.assertEqual(got, [(None, "direct"), ("s1", "one"), ("s2", "two"), ("s2", "three")])

        # the bundled client does the same on connect, and acks what it got
        await bob.close()
        bob = await client_for(self, server, "bob")
        self.assertEqual(len(bob.messages.pending), 4)
        await wait_until(lambda: all(s.acked >= s.watermark for s in bob._streams.values()), 10,
                         what="the automatic acks")
        await bob.ping()
        await bob.close()
        bob = await client_for(self, server, "bob")
        self.assertEqual(len(bob.messages.pending), 0)  # acked: nothing comes back

    async def test_a_session_backlog_bigger_than_the_send_queue_arrives_whole(self) -> None:
        server = self.server
        await meet(self, server, "bob")
        alice = await client_for(self, server, "alice")
        await alice.create_session(session_id="s1")
        await alice.join_session("s1", node_id="bob")
        payload = "x" * 60_000
        for _ in range(4):  # 12 MB: more than the 8 MiB send queue holds
            await gatherResults([alice.send(dest_session_id="s1", payload=payload) for _ in range(50)],
                                consumeErrors=True)
        bob = await client_for(self, server, "bob", auto_ack=False)
        seqs = [m["session_seq"] for m in bob.messages.pending]
        self.assertEqual(seqs, list(range(1, 201)))


class LoweredLimitTests(unittest.TestCase):
    """A row stored under a larger --max-message-size is never sent over the
    current limit, and does not hold up what follows it."""

    timeout = 90

    async def test_a_row_over_the_current_limit_becomes_a_too_large_error_frame(self) -> None:
        first = start_server(self, "--max-message-size=200000")
        await meet(self, first, "bob")
        alice = await client_for(self, first, "alice")
        await alice.send(dest_id="bob", payload="x" * 100_000)
        await alice.send(dest_id="bob", payload="small")
        await alice.close()
        first.stop()
        second = start_server(self, data_dir=first.data_dir)  # the default limit, 65536
        bob = await client_for(self, second, "bob", auto_ack=False)
        event = await bob.next_event()
        self.assertEqual((event["op"], event["code"]), ("error", "too_large"))
        self.assertEqual([(m["seq"], m["payload"]) for m in bob.messages.pending], [(2, "small")])
        self.assertIn("over the frame limit", second.log())
