"""A stateful property test of definite delivery: random sequences of sends
(direct, user-wide, ephemeral, retries with a used id), syncs, acks,
connects and disconnects, through the router, ``Server.control`` and the
memory store, with fake connections and a :class:`~twisted.internet.task.Clock`.

What must hold after every step: each node sees one payload per inbox seq
and each durable payload under one seq only (nothing duplicated, a retry
included); and at the end, once every node is online and has synced from its
acked cursor until nothing new arrives, every durable message that was
accepted has reached every one of its recipients (nothing lost), while acks
never removed a message its node had not received.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.trial import unittest

from allspark.envelope import Control, FrameError, Message, parse_frame
from tests.fuzz import documented_error_codes, fuzz_settings
from tests.fuzz.test_control import ControlConnection, World, build_world

#: node_id -> client_id of the nodes that exchange messages here.
NODES = {"a1": "A", "a2": "A", "b1": "B", "c1": None}
#: Most syncs in the final drain of one node (each brings up to 1000 messages).
MAX_DRAIN_SYNCS = 50


def recipients_of(sender: str, dest_id: str | None, dest_client_id: str | None) -> list[str]:
    """Who a message goes to, by the contract: one node, or every node of the
    client plus the sender's own other nodes (never the sender)."""
    if dest_id is not None:
        return [dest_id]
    nodes = [n for n, c in NODES.items() if c == dest_client_id]
    sender_client = NODES[sender]
    if sender_client is not None and sender_client != dest_client_id:
        nodes += [n for n, c in NODES.items() if c == sender_client]
    return [n for n in dict.fromkeys(nodes) if n != sender]


class RecordingConnection(ControlConnection):
    """A fake connection that also keeps every frame it is sent as bytes,
    in order (``sent``), for the model to read."""

    def __init__(self, node_id: str, client_id: str | None = None) -> None:
        super().__init__(node_id, client_id)
        self.sent: list[bytes] = []
        self.read = 0  # how many of ``sent`` the model has read

    def send(self, frame: bytes) -> None:
        super().send(frame)
        self.sent.append(frame)


class DeliveryMachine(RuleBasedStateMachine):
    """The model: what was accepted for whom, what each node received."""

    world: World

    @initialize()
    def start(self) -> None:
        self.world = build_world()
        for node_id, client_id in NODES.items():
            self.world.store.remember_node(node_id, client_id, 0)
        self.conns: dict[str, list[RecordingConnection]] = {n: [] for n in NODES}
        self.received: dict[str, dict[int, str]] = {n: {} for n in NODES}  # node -> seq -> payload
        self.expected: dict[str, set[str]] = {n: set() for n in NODES}  # node -> durable payloads accepted
        self.acked: dict[str, int] = {n: 0 for n in NODES}
        self.sent_ids: dict[tuple[str, str], dict[str, Any]] = {}  # (sender, id) -> the frame
        self.counter = 0

    # -- helpers ------------------------------------------------------------
    def conn_of(self, node_id: str) -> RecordingConnection:
        """A connection of ``node_id``: a live one, or a disconnected one
        (a control frame can still arrive from a socket that just closed)."""
        live = self.conns[node_id]
        return live[0] if live else RecordingConnection(node_id, NODES[node_id])

    def collect(self) -> None:
        """Read what every connection was written since last time into the
        nodes' views, checking no seq or payload is duplicated."""
        for node_id, conns in self.conns.items():
            for conn in conns:
                for raw in conn.sent[conn.read:]:
                    frame = orjson.loads(raw)
                    if "seq" in frame and "op" not in frame:
                        self.saw(node_id, frame)
                conn.read = len(conn.sent)

    def saw(self, node_id: str, frame: dict[str, Any]) -> None:
        assert frame["dest_id"] == node_id, frame
        seq, payload = frame["seq"], frame["payload"]
        view = self.received[node_id]
        if seq in view:
            assert view[seq] == payload, f"{node_id} seq {seq} carried {view[seq]!r} and {payload!r}"
        else:
            assert payload not in view.values(), f"{node_id} got {payload!r} twice (a second seq {seq})"
            view[seq] = payload

    def prefix(self, node_id: str) -> int:
        """The highest seq up to which ``node_id`` received every seq."""
        seqs = self.received[node_id]
        n = self.acked[node_id]
        while n + 1 in seqs:
            n += 1
        return n

    def control(self, node_id: str, frame: dict[str, Any]) -> dict[str, Any] | None:
        parsed = parse_frame(orjson.dumps(frame))
        assert isinstance(parsed, Control)
        conn = self.conn_of(node_id)
        answer, failure = self.world.run(self.world.server.control(conn, parsed))  # type: ignore[arg-type]
        if failure is not None:
            error = failure.value
            assert isinstance(error, FrameError), failure.getTraceback()
            assert error.code in documented_error_codes(), error.code
            return None
        if answer is not None:
            conn.send(orjson.dumps(answer))
        self.collect()
        return answer

    # -- rules --------------------------------------------------------------
    @rule(node_id=st.sampled_from(sorted(NODES)))
    def connect(self, node_id: str) -> None:
        if len(self.conns[node_id]) < 2:
            conn = RecordingConnection(node_id, NODES[node_id])
            self.world.server.registry.add(conn)
            self.conns[node_id].append(conn)

    @rule(node_id=st.sampled_from(sorted(NODES)))
    def disconnect(self, node_id: str) -> None:
        if self.conns[node_id]:
            self.collect()
            self.world.server.registry.remove(self.conns[node_id].pop(0))

    @rule(sender=st.sampled_from(sorted(NODES)),
          dest=st.one_of(st.sampled_from([("dest_id", n) for n in NODES]),
                         st.sampled_from([("dest_client_id", c) for c in ("A", "B")])),
          ephemeral=st.booleans(), with_id=st.booleans(), count=st.integers(min_value=1, max_value=4))
    def send(self, sender: str, dest: tuple[str, str], ephemeral: bool, with_id: bool, count: int) -> None:
        """``count`` messages from ``sender`` to one destination."""
        for _ in range(count):
            self.counter += 1
            payload = f"m{self.counter}"
            frame: dict[str, Any] = {dest[0]: dest[1], "payload": payload}
            if ephemeral:
                frame["ephemeral"] = True
            if with_id:
                frame["id"] = f"id{self.counter}"
                self.sent_ids[(sender, frame["id"])] = frame
            self.route(sender, frame)

    @precondition(lambda self: bool(self.sent_ids))
    @rule(data=st.data())
    def retry(self, data: Any) -> None:
        """A client sends a frame again with the same id (it did not see the answer)."""
        sender, frame_id = data.draw(st.sampled_from(sorted(self.sent_ids)))
        self.route(sender, dict(self.sent_ids[(sender, frame_id)]), retry=True)

    def route(self, sender: str, frame: dict[str, Any], retry: bool = False) -> None:
        msg = parse_frame(orjson.dumps(frame))
        assert isinstance(msg, Message)
        answer, failure = self.world.run(self.world.server.router.route(self.conn_of(sender).sender, msg))
        if failure is not None:
            error = failure.value
            assert isinstance(error, FrameError), failure.getTraceback()
            assert error.code in documented_error_codes(), error.code
            return
        accepted = orjson.loads(answer)
        assert accepted["op"] == "accepted", accepted
        to = recipients_of(sender, frame.get("dest_id"), frame.get("dest_client_id"))
        if not frame.get("ephemeral"):
            assert accepted["recipients"] == len(to), (accepted, to)
            for node_id in to:
                self.expected[node_id].add(frame["payload"])
        self.collect()

    @rule(node_id=st.sampled_from(sorted(NODES)), limit=st.sampled_from([None, 1, 2, 5, 1000]),
          from_prefix=st.booleans())
    def sync(self, node_id: str, limit: int | None, from_prefix: bool) -> None:
        frame: dict[str, Any] = {"op": "sync", "after": self.prefix(node_id) if from_prefix else self.acked[node_id]}
        if limit is not None:
            frame["limit"] = limit
        self.control(node_id, frame)

    @rule(node_id=st.sampled_from(sorted(NODES)), data=st.data())
    def ack(self, node_id: str, data: Any) -> None:
        """Ack up to a seq the node received with everything before it."""
        top = self.prefix(node_id)
        upto = data.draw(st.integers(min_value=0, max_value=top))
        answer = self.control(node_id, {"op": "ack", "upto": upto})
        if answer is not None:
            self.acked[node_id] = max(self.acked[node_id], upto)

    # -- invariants -----------------------------------------------------------
    @invariant()
    def nothing_received_that_was_not_sent(self) -> None:
        if not hasattr(self, "world"):
            return
        for node_id, view in self.received.items():
            extra = set(view.values()) - self.expected[node_id]
            assert not extra, f"{node_id} received {extra} that nobody sent it durably"

    def teardown(self) -> None:
        """Every node online, synced until nothing new arrives: it has every
        durable message accepted for it."""
        if not hasattr(self, "world"):
            return
        for node_id in NODES:
            self.connect(node_id)
            for _ in range(MAX_DRAIN_SYNCS):
                before = len(self.received[node_id])
                self.control(node_id, {"op": "sync", "after": self.prefix(node_id), "limit": 1000})
                if len(self.received[node_id]) == before:
                    break
            missing = self.expected[node_id] - set(self.received[node_id].values())
            assert not missing, f"{node_id} never got {sorted(missing)}"


class DeliveryStateTests(unittest.SynchronousTestCase):
    """Runs :class:`DeliveryMachine` within the fuzz budget."""

    def test_nothing_accepted_is_lost_or_duplicated(self) -> None:
        DeliveryMachine.TestCase.settings = fuzz_settings(share=0.5, stateful_step_count=40)
        DeliveryMachine.TestCase("runTest").runTest()
