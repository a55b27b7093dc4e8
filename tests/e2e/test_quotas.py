"""Inbox and session quotas, end to end, against a real ``twistd -n allspark``
process (SQLite store): one sender's flood stops at its quota with
``inbox_full`` (``session_full`` for a session stream), nothing of the refused
messages is stored, other senders still get through, and an ack (or the next
quota window) lets the flooder send again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.trial import unittest

from allspark.client import AllsparkError, Client
from tests.e2e.helpers import wait_until
from tests.support import client_for, start_server

PER_SENDER = 40
PER_INBOX = 60


async def flood(client: Client, count: int, **fields: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Send ``count`` messages pipelined; the ``accepted`` answers and the
    error frames, each in sending order."""
    sent: list[Deferred[dict[str, Any]]] = [client.send(payload={"i": i}, **fields) for i in range(count)]
    outcomes = await DeferredList(sent, consumeErrors=True)
    accepted = [value for ok, value in outcomes if ok]
    errors = []
    for ok, value in outcomes:
        if not ok:
            value.trap(AllsparkError)
            errors.append(value.value.frame)
    return accepted, errors


class InboxQuotaTests(unittest.TestCase):
    """--max-inbox-per-sender and --max-inbox on a real server."""

    timeout = 90

    def setUp(self) -> None:
        self.server = start_server(self, f"--max-inbox-per-sender={PER_SENDER}", f"--max-inbox={PER_INBOX}")

    async def test_a_flood_stops_at_the_quota_others_get_through_and_an_ack_makes_room(self) -> None:
        victim = await client_for(self, self.server, "victim", auto_ack=False)
        mallory = await client_for(self, self.server, "mallory")
        alice = await client_for(self, self.server, "alice")

        accepted, errors = await flood(mallory, PER_SENDER + 15, dest_id="victim")
        self.assertEqual(len(accepted), PER_SENDER)
        self.assertEqual(len(errors), 15)
        self.assertEqual({e["code"] for e in errors}, {"inbox_full"})
        self.assertTrue(all(e["op"] == "error" and e["id"] for e in errors))
        await wait_until(lambda: victim.received >= PER_SENDER, 20, what="the victim got the accepted ones")

        # another sender is not affected by mallory's flood
        answer = await alice.send(dest_id="victim", payload="hello")
        self.assertEqual(answer["status"], "delivered")
        message = await wait_message(victim, lambda m: m.get("src_id") == "alice")
        self.assertEqual(message["payload"], "hello")
        # nothing of the refused messages was stored: the victim's inbox ends at seq 41
        self.assertEqual(message["seq"], PER_SENDER + 1)

        # the victim acks: mallory may send again
        acked = await victim.ack(PER_SENDER)
        self.assertEqual(acked["removed"], PER_SENDER)
        again = await mallory.send(dest_id="victim", payload="again")
        self.assertEqual(again["status"], "delivered")

    async def test_the_whole_inbox_is_bounded_too(self) -> None:
        """Two senders at their share still fill no more than --max-inbox."""
        await client_for(self, self.server, "victim", auto_ack=False)
        senders = [await client_for(self, self.server, name) for name in ("one", "two")]
        stored = 0
        codes: set[str] = set()
        for sender in senders:
            accepted, errors = await flood(sender, PER_SENDER, dest_id="victim")
            stored += len(accepted)
            codes.update(e["code"] for e in errors)
        self.assertEqual((stored, codes), (PER_INBOX, {"inbox_full"}))


async def wait_message(client: Client, predicate: Any, limit: int = 1000) -> dict[str, Any]:
    """The first message handed to ``client`` that matches ``predicate``
    (earlier ones are dropped); at most ``limit`` messages are looked at."""
    for _ in range(limit):
        message = await client.next_message(20.0)
        if predicate(message):
            return message
    raise AssertionError(f"no matching message among {limit}")


class SessionQuotaTests(unittest.TestCase):
    """--max-session-rows-per-sender and --max-session-rows on a real server."""

    timeout = 90

    def setUp(self) -> None:
        # a window of an hour: the test never crosses into the next one by chance
        self.server = start_server(self, "--max-session-rows-per-sender=10", "--max-session-rows=15",
                                   "--session-quota-window=3600")

    async def test_a_flooding_member_gets_session_full_and_another_still_gets_through(self) -> None:
        mallory = await client_for(self, self.server, "mallory")
        alice = await client_for(self, self.server, "alice")
        reader = await client_for(self, self.server, "reader")
        created = await mallory.create_session(anyone_can_join=True)
        session_id = created["session_id"]
        await alice.join_session(session_id)
        await reader.join_session(session_id)

        accepted, errors = await flood(mallory, 14, dest_session_id=session_id)
        self.assertEqual(len(accepted), 10)
        self.assertEqual({e["code"] for e in errors}, {"session_full"})
        self.assertEqual(len(errors), 4)
        answer = await alice.send(dest_session_id=session_id, payload="still here")
        self.assertEqual(answer["session_seq"], 11)
        message = await wait_message(reader, lambda m: m.get("src_id") == "alice")
        self.assertEqual(message["session_seq"], 11)
