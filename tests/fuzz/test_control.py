"""Property tests of every control op's arguments, through the real parser
and :meth:`allspark.server.Server.control` (sessions included), on the memory
store with fake connections and a :class:`~twisted.internet.task.Clock`.

Each example builds a small world (three online nodes and one that is not,
a group, an anonymous and a game session, stored messages and broadcasts),
then lets callers send random control frames made of the ops of
:data:`~allspark.envelope.CONTROL_OPS`, with arguments drawn mostly from
names that exist in the world (so that the ops get past their lookups) and
sometimes from anything.  Every frame gets an answer frame or a
:class:`~allspark.envelope.FrameError` with a documented code, at once (the
store answers at once, so a pending answer is a hang); never another
exception, and everything written to a connection is valid JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from allspark.auth import AuthKeyVerifier, ValidationTokens
from allspark.envelope import CONTROL_OPS, Control, FrameError, Message, encode, parse_frame
from allspark.router import Sender
from allspark.server import Server, ServerConfig
from allspark.store.memory import MemoryStore
from tests.fakes import FakeConnection
from tests.fuzz import SERVER_FAILURE_CODES, documented_error_codes, fuzz_settings
from tests.fuzz.test_frames import EDGE_INTS, ID_LIKE, json_values


class ControlConnection(FakeConnection):
    """A fake connection with the ``sender`` that ``Server.control`` reads
    from a socket."""

    @property
    def sender(self) -> Sender:
        return Sender(self.node_id, self.client_id)


#: Online callers (node_id, client_id); ``dave`` calls without being in the registry.
ONLINE = (("alice", "alice-app"), ("alice-tab", "alice-app"), ("bob", None), ("carol", "carol-app"))
OFFLINE = ("dave", None)
SESSIONS = ("grp", "anon", "game")


@dataclass
class World:
    """One server's state, built the way clients would build it."""

    clock: Clock
    store: MemoryStore
    server: Server
    conns: dict[str, ControlConnection]
    aliases: list[str]

    def run(self, d: Deferred[Any] | Any) -> tuple[Any, Failure | None]:
        """The result of ``d`` (a Deferred or a coroutine), after letting
        queued fan-outs run; a pending result fails the test as a hang."""
        if not isinstance(d, Deferred):
            d = ensureDeferred(d)
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(20):
            self.clock.advance(0)
        if not results:
            raise AssertionError("the answer never came (a hang)")
        result = results[0]
        return (None, result) if isinstance(result, Failure) else (result, None)


def build_world() -> World:
    """alice owns a group (bob in it), an anonymous session anyone can join
    (carol and bob joined) and a game (bob in it); messages are stored in
    inboxes and streams."""
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore()
    config = ServerConfig(server_id="srv", host="127.0.0.1", port=1, listen=())
    tokens = ValidationTokens(b"k" * 32, "srv", clock)
    server = Server(config, store, AuthKeyVerifier([b"secret-0123456789abcdef"]), tokens, clock)
    server.new_sessions()
    server.router.sessions = server.sessions
    conns: dict[str, ControlConnection] = {}
    for node_id, client_id in ONLINE:
        conn = conns[node_id] = ControlConnection(node_id, client_id)
        server.registry.add(conn)
        store.remember_node(node_id, client_id, 0)
    conns["dave"] = ControlConnection(*OFFLINE)
    store.remember_node("dave", None, 0)
    world = World(clock, store, server, conns, [])

    def control(caller: str, frame: dict[str, Any]) -> dict[str, Any]:
        parsed = parse_frame(orjson.dumps(frame))
        assert isinstance(parsed, Control)
        answer, failure = world.run(server.control(conns[caller], parsed))  # type: ignore[arg-type]
        assert failure is None, failure
        return answer

    def send(caller: str, frame: dict[str, Any]) -> None:
        msg = parse_frame(orjson.dumps(frame))
        assert isinstance(msg, Message)
        answer, failure = world.run(server.router.route(conns[caller].sender, msg))
        assert failure is None, failure

    control("alice", {"op": "create_session", "session_id": "grp"})
    control("alice", {"op": "create_session", "session_id": "anon", "anonymous": True, "anyone_can_join": True})
    control("alice", {"op": "create_session", "session_id": "game", "session_type": "game"})
    control("alice", {"op": "join_session", "session_id": "grp", "node_id": "bob"})
    control("alice", {"op": "join_session", "session_id": "game", "node_id": "bob"})
    control("carol", {"op": "join_session", "session_id": "anon"})
    control("bob", {"op": "join_session", "session_id": "anon", "anonymous": False})
    send("alice", {"dest_id": "bob", "id": "m1", "payload": "hi bob"})
    send("bob", {"dest_id": "alice", "id": "m2", "payload": "hi alice"})
    send("carol", {"dest_client_id": "alice-app", "id": "m3", "payload": "hi both"})
    send("dave", {"dest_id": "carol", "id": "m4", "payload": "from offline"})
    send("alice", {"dest_session_id": "grp", "id": "b1", "payload": "to grp"})
    send("carol", {"dest_session_id": "anon", "id": "b2", "payload": "to anon"})
    send("bob", {"dest_session_id": "game", "id": "b3", "payload": "to the master"})
    info = control("alice", {"op": "get_session_info", "session_id": "anon"})
    world.aliases = [member["alias"] for member in info["members"]]
    return world


def arguments(world: World) -> dict[str, st.SearchStrategy[Any]]:
    """For each argument name, values that mostly make sense in ``world``."""
    node_ids = [n for n, _ in ONLINE] + ["dave", "nobody"]
    cursors = st.one_of(st.integers(min_value=0, max_value=6), st.sampled_from(EDGE_INTS))
    return {
        "session_id": st.sampled_from(SESSIONS * 3 + ("nosuch", "grp2")),  # existing ones more often
        "node_id": st.sampled_from(node_ids + world.aliases),
        "alias": st.sampled_from(world.aliases + node_ids),
        "upto": cursors,
        "after": cursors,
        "limit": st.one_of(st.integers(min_value=0, max_value=1001), st.sampled_from(EDGE_INTS)),
        "anonymous": st.booleans(),
        "anyone_can_join": st.booleans(),
        "session_type": st.sampled_from(["group", "game", "Game", ""]),
    }


@st.composite
def control_frames(draw: Any, world: World) -> dict[str, Any]:
    """A control frame: a known op (or, rarely, not), some of its arguments
    with sensible or arbitrary values, and rarely an argument it does not take."""
    op = draw(st.sampled_from(sorted(CONTROL_OPS) + ["frobnicate"]))
    pools = arguments(world)
    frame: dict[str, Any] = {"op": op}
    if draw(st.integers(min_value=0, max_value=3)) > 0:
        frame["id"] = draw(st.from_regex(r"\A[a-z0-9-]{1,8}\Z"))
    names = list(CONTROL_OPS.get(op, {}))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        names.append(draw(st.sampled_from(sorted(pools))))
    for name in names:
        if draw(st.integers(min_value=0, max_value=5)) == 0:
            continue  # left out (required ones too, sometimes)
        if draw(st.integers(min_value=0, max_value=11)) == 0:
            frame[name] = draw(st.one_of(json_values, ID_LIKE))
        else:
            frame[name] = draw(pools.get(name, json_values))
    return frame


def anonymous_members(world: World, session_ids: set[str]) -> dict[str, str]:
    """alias -> node_id of every member that is anonymous now in one of
    ``session_ids``."""
    found: dict[str, str] = {}
    for session_id in session_ids:
        members, failure = world.run(world.store.get_members(session_id))
        assert failure is None, failure
        found.update({m.alias: m.node_id for m in members if m.anonymous})
    return found


def dicts_in(value: Any) -> list[dict[str, Any]]:
    """Every JSON object inside ``value`` (itself included)."""
    out: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


class ControlProperties(unittest.SynchronousTestCase):
    """Server.control answers every control frame or refuses it with a
    documented code, and no answer or event unmasks an anonymous member."""

    def check(self, world: World, caller: str, frame: dict[str, Any]) -> None:
        """Parse and run one frame from ``caller``, the way the socket does."""
        codes = documented_error_codes()
        try:
            parsed = parse_frame(json.dumps(frame).encode())
        except FrameError as e:
            self.assertIn(e.code, {"bad_frame", "unknown_op"}, e.message)
            return
        assert isinstance(parsed, Control), frame
        answer, failure = world.run(world.server.control(world.conns[caller], parsed))  # type: ignore[arg-type]
        if failure is not None:
            if not failure.check(FrameError):
                self.fail(f"{caller} {frame} raised {failure.getTraceback()}")
            error = failure.value
            assert isinstance(error, FrameError)
            self.assertIn(error.code, codes, f"{frame}: {error.code} is not a documented code")
            self.assertNotIn(error.code, SERVER_FAILURE_CODES)
            orjson.loads(error.to_frame())
            return
        self.assertIsInstance(answer, dict, frame)
        self.assertIsInstance(answer.get("op"), str, answer)
        orjson.loads(encode(answer))
        self.check_anonymity(world, caller, parsed, answer)

    def check_anonymity(self, world: World, caller: str, request: Control, answer: dict[str, Any]) -> None:
        """No answer ties an anonymous member's node_id to its alias (issue 8,
        item 7), for anyone but that member: not in one object, and not as
        the answer to a request that named the member by node_id."""
        session_ids = set(SESSIONS)
        for conn in world.conns.values():
            session_ids.update(f["session_id"] for f in conn.frames if isinstance(f.get("session_id"), str))
        if isinstance(answer.get("session_id"), str):
            session_ids.add(answer["session_id"])
        anonymous = anonymous_members(world, session_ids)
        named = request.args.get("node_id")
        if named is not None and named != caller:
            for alias, node_id in anonymous.items():
                if node_id == named:
                    self.assertNotIn(alias, json.dumps(answer),
                                     f"{caller}'s {request} was answered the alias of {named}: {answer}")
        seen: list[tuple[str, Any]] = [(caller, answer)]
        seen += [(conn.node_id, f) for conn in world.conns.values() for f in conn.frames]
        for recipient, written in seen:
            for obj in dicts_in(written):
                alias_seen = obj.get("alias")
                if isinstance(alias_seen, str) and alias_seen in anonymous and recipient != anonymous[alias_seen]:
                    self.assertNotEqual(obj.get("node_id"), anonymous[alias_seen],
                                        f"{recipient} was told the node_id of anonymous {alias_seen}: {written}")

    def check_written(self, world: World) -> None:
        """Every frame written to any connection is a JSON object."""
        for conn in world.conns.values():
            for written in conn.frames:
                self.assertIsInstance(written, dict)

    @fuzz_settings()
    @given(st.data())
    def test_random_control_frames_from_any_caller(self, data: Any) -> None:
        world = build_world()
        callers = sorted(world.conns)
        for _ in range(data.draw(st.integers(min_value=1, max_value=12), label="frames")):
            caller = data.draw(st.sampled_from(callers + ["alice"]), label="caller")  # the owner twice as often
            self.check(world, caller, data.draw(control_frames(world), label="frame"))
        self.check_written(world)

    @fuzz_settings()
    @given(st.data(), st.sampled_from(sorted(CONTROL_OPS)))
    def test_each_op_with_arguments_of_any_shape(self, data: Any, op: str) -> None:
        world = build_world()
        spec = CONTROL_OPS[op]
        frame: dict[str, Any] = {"op": op}
        for name in spec:
            if data.draw(st.booleans(), label=f"give {name}"):
                frame[name] = data.draw(st.one_of(json_values, ID_LIKE, arguments(world).get(name, json_values)),
                                        label=name)
        self.check(world, data.draw(st.sampled_from(sorted(world.conns)), label="caller"), frame)
        self.check_written(world)
