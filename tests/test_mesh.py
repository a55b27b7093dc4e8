"""Unit tests of allspark.mesh: the peer handshake auth, the frame codec and
what the mesh does with frames (never forwards one it received)."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from allspark.auth import ValidationTokens, derive_token_key, mint_auth_key
from allspark.mesh import (
    MAX_DELIVER_IDS,
    PEER_TOKEN_TTL,
    Mesh,
    PeerAuth,
    PeerLimits,
    _LinkMixin,
    PeerAuthError,
    PeerFrameError,
    decode_peer_frame,
    derive_peer_key,
    encode_peer_frame,
    combined_peers,
    record_peers,
    static_peers,
)

SECRET = b"cluster-secret-0123456789abcdef012345"
KEY = derive_peer_key(SECRET)


def auth_pair(clock: Clock, key: bytes = KEY) -> tuple[PeerAuth, PeerAuth]:
    return PeerAuth(key, "a", clock), PeerAuth(KEY, "b", clock)


class PeerAuthTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.a, self.b = auth_pair(self.clock)

    def refused(self, token: object) -> str:
        with self.assertRaises(PeerAuthError) as caught:
            self.b.verify(token)
        return caught.exception.code

    def test_a_fresh_token_names_its_sender_once(self) -> None:
        token = self.a.token("b")
        self.assertEqual(self.b.verify(token), "a")
        self.assertEqual(self.refused(token), "replayed_token")

    def test_the_key_is_not_the_secret_nor_the_token_key(self) -> None:
        self.assertNotEqual(KEY, SECRET)
        self.assertNotEqual(KEY, derive_token_key(SECRET))

    def test_a_wrong_cluster_secret_is_refused(self) -> None:
        other = PeerAuth(derive_peer_key(b"another-secret-0123456789abcdef"), "a", self.clock)
        self.assertEqual(self.refused(other.token("b")), "bad_token")

    def test_a_token_for_another_server_is_refused(self) -> None:
        self.assertEqual(self.refused(self.a.token("c")), "foreign_token")

    def test_a_token_from_itself_is_refused(self) -> None:
        self.assertEqual(self.refused(self.b.token("b")), "foreign_token")

    def test_an_old_token_is_refused(self) -> None:
        token = self.a.token("b")
        self.clock.advance(PEER_TOKEN_TTL)
        self.assertEqual(self.refused(token), "expired_token")

    def test_a_token_from_before_a_restart_is_refused(self) -> None:
        token = self.a.token("b")
        self.clock.advance(1)
        restarted = PeerAuth(KEY, "b", self.clock)  # its remembered nonces are gone
        with self.assertRaises(PeerAuthError) as caught:
            restarted.verify(token)
        self.assertEqual(caught.exception.code, "expired_token")

    def test_a_client_auth_key_or_validation_token_is_refused(self) -> None:
        auth_key = mint_auth_key(SECRET.decode(), "a", None, ttl=60)
        tokens = ValidationTokens(derive_token_key(SECRET), "b", self.clock)
        validation_token, _ = tokens.issue("a", "b")
        self.assertEqual(self.refused(auth_key), "bad_token")
        self.assertEqual(self.refused(validation_token), "bad_token")

    def test_missing_and_malformed_tokens_are_refused(self) -> None:
        self.assertEqual(self.refused(None), "missing_token")
        self.assertEqual(self.refused(""), "missing_token")
        for bad in ("x", "a.b.c", "!!!.???", "é.é", "a" * 5000, 42):
            self.assertEqual(self.refused(bad), "bad_token", bad)

    def test_nonces_are_forgotten_once_their_tokens_expire(self) -> None:
        for _ in range(3):
            self.b.verify(self.a.token("b"))
        self.assertEqual(self.b.remembered, 3)
        self.clock.advance(PEER_TOKEN_TTL + 1)
        self.b.verify(self.a.token("b"))
        self.assertEqual(self.b.remembered, 1)

    def test_the_acceptor_proves_it_holds_the_key(self) -> None:
        token = self.a.token("b")
        self.assertTrue(self.a.check_proof(token, self.b.proof(token)))
        impostor = PeerAuth(derive_peer_key(b"another-secret-0123456789abcdef"), "b", self.clock)
        self.assertFalse(self.a.check_proof(token, impostor.proof(token)))
        self.assertFalse(self.a.check_proof(token, None))
        self.assertFalse(self.a.check_proof(token, self.b.proof(self.a.token("b"))))


class CodecTests(TestCase):
    def test_round_trip_keeps_the_payload_as_it_is(self) -> None:
        payload = b'{"op":"message","body":"line\\nbreak","dest_id":"n1"}\n\x00raw'
        frame = decode_peer_frame(encode_peer_frame("deliver", payload, to=["n1", "n2"], id=7))
        self.assertEqual(frame.type, "deliver")
        self.assertEqual(frame.fields, {"to": ["n1", "n2"], "id": 7})
        self.assertEqual(frame.payload, payload)

    def test_header_is_versioned_and_typed(self) -> None:
        head = encode_peer_frame("hello", server_id="a").split(b"\n")[0]
        self.assertEqual(orjson.loads(head), {"v": 1, "t": "hello", "server_id": "a"})

    def code_of(self, data: bytes) -> str:
        with self.assertRaises(PeerFrameError) as caught:
            decode_peer_frame(data)
        return caught.exception.code

    def test_unknown_versions_and_types_are_named(self) -> None:
        self.assertEqual(self.code_of(b'{"v":2,"t":"hello","server_id":"a"}\n'), "unsupported_version")
        self.assertEqual(self.code_of(b'{"v":true,"t":"hello","server_id":"a"}\n'), "unsupported_version")
        self.assertEqual(self.code_of(b'{"t":"hello"}\n'), "unsupported_version")
        self.assertEqual(self.code_of(b'{"v":1,"t":"forward","to":["a"]}\nx'), "unknown_type")
        with self.assertRaises(PeerFrameError) as caught:
            decode_peer_frame(b'{"v":1,"t":"nope","id":5}\n')
        self.assertEqual(caught.exception.frame_id, 5)

    def test_malformed_frames(self) -> None:
        for data in (b"", b"no newline", b"[1]\n", b"{bad json\n", b'{"v":1,"t":"deliver","to":["a"]}\n',
                     b'{"v":1,"t":"deliver","to":[]}\nx', b'{"v":1,"t":"deliver","to":["bad id!"]}\nx',
                     b'{"v":1,"t":"deliver","to":"a"}\nx', b'{"v":1,"t":"hello"}\n',
                     b'{"v":1,"t":"invalidate","what":"session"}\n', b'{"v":1,"t":"error"}\n',
                     b'{"v":1,"t":"hello","server_id":"a","id":[1]}\n'):
            self.assertEqual(self.code_of(data), "bad_frame", data)
        too_many = orjson.dumps({"v": 1, "t": "deliver", "to": [f"n{i}" for i in range(MAX_DELIVER_IDS + 1)]})
        self.assertEqual(self.code_of(too_many + b"\nx"), "bad_frame")


class FakeLink:
    def __init__(self, peer_id: str, direction: str = "in") -> None:
        self.peer_id = peer_id
        self.direction = direction
        self.sent: list[bytes] = []
        self.closed: list[int] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


class MeshTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.written: list[tuple[tuple[str, ...], bytes]] = []
        self.here = {"local"}
        self.mesh = Mesh("b", SECRET, self.clock, lambda: succeed([]), self.deliver_local)

    def deliver_local(self, node_ids: Any, frame: bytes) -> int:
        self.written.append((tuple(node_ids), frame))
        return sum(1 for n in node_ids if n in self.here)

    def test_a_received_deliver_is_written_here_only_never_forwarded(self) -> None:
        from_a, to_c = FakeLink("a"), FakeLink("c", "out")
        self.mesh.link_up(from_a)  # type: ignore[arg-type]
        self.mesh.link_up(to_c)  # type: ignore[arg-type]
        # the records (wrongly) say "elsewhere" is on c and "local" is on a
        self.mesh.locations.update({"elsewhere": "c", "local": "a"})
        frame = decode_peer_frame(encode_peer_frame("deliver", b"{}", to=["local", "elsewhere"], id=1))
        self.mesh.handle(from_a, frame)  # type: ignore[arg-type]
        self.assertEqual(self.written, [(("local",), b"{}"), (("elsewhere",), b"{}")])
        self.assertEqual(to_c.sent, [])  # nothing went on to another server
        answer = decode_peer_frame(from_a.sent[-1])
        self.assertEqual((answer.type, answer.fields), ("delivered", {"id": 1, "missing": ["elsewhere"]}))

    def test_forward_sends_one_deliver_per_server_split_at_the_bound(self) -> None:
        to_a, to_c = FakeLink("a", "out"), FakeLink("c")
        self.mesh.link_up(to_a)  # type: ignore[arg-type]
        self.mesh.link_up(to_c)  # type: ignore[arg-type]
        many = [f"n{i}" for i in range(MAX_DELIVER_IDS + 1)]
        self.mesh.locations.update({n: "a" for n in many})
        self.mesh.locations.update({"x": "c", "nowhere": "z"})
        self.assertTrue(self.mesh.holds("x"))
        self.assertFalse(self.mesh.holds("nowhere"))  # no link to z
        self.mesh.forward([*many, "x", "nowhere", "unknown"], b"F")
        frames = [decode_peer_frame(f) for f in to_a.sent]
        self.assertEqual([len(f.fields["to"]) for f in frames], [MAX_DELIVER_IDS, 1])
        self.assertEqual([f.payload for f in frames], [b"F", b"F"])
        self.assertEqual([decode_peer_frame(f).fields["to"] for f in to_c.sent], [["x"]])

    def test_a_newer_link_to_a_peer_replaces_the_older(self) -> None:
        old, new = FakeLink("a"), FakeLink("a")
        self.mesh.link_up(old)  # type: ignore[arg-type]
        self.mesh.link_up(new)  # type: ignore[arg-type]
        self.assertEqual(old.closed, [4009])
        self.mesh.link_down(old)  # type: ignore[arg-type]  # its close arrives later
        self.assertIs(self.mesh.links["a"], new)
        self.assertEqual(list(self.mesh.status()), ["a"])

    def test_invalidate_reaches_the_hook_and_every_link(self) -> None:
        seen: list[tuple[str, str]] = []
        self.mesh.on_invalidate = lambda what, key: seen.append((what, key))
        link = FakeLink("a")
        self.mesh.link_up(link)  # type: ignore[arg-type]
        self.mesh.handle(link, decode_peer_frame(encode_peer_frame("invalidate", what="session", key="s1")))  # type: ignore[arg-type]
        self.assertEqual(seen, [("session", "s1")])
        self.mesh.invalidate("session", "s2")
        self.assertEqual(decode_peer_frame(link.sent[-1]).fields, {"what": "session", "key": "s2"})

    def test_invalidate_goes_to_the_handler_for_its_kind(self) -> None:
        handled: list[str] = []
        others: list[tuple[str, str]] = []
        self.mesh.invalidation_handlers["session"] = handled.append
        self.mesh.on_invalidate = lambda what, key: others.append((what, key))
        link = FakeLink("a")
        self.mesh.link_up(link)  # type: ignore[arg-type]
        for what in ("session", "other"):
            frame = decode_peer_frame(encode_peer_frame("invalidate", what=what, key="k"))
            self.mesh.handle(link, frame)  # type: ignore[arg-type]
        self.assertEqual((handled, others), (["k"], [("other", "k")]))

    def test_each_link_coming_up_calls_the_hooks_with_the_peer(self) -> None:
        seen: list[str] = []

        def broken(peer_id: str) -> None:
            raise RuntimeError("a hook that fails")

        self.mesh.on_link_up.extend([broken, seen.append])
        self.mesh.link_up(FakeLink("a"))  # type: ignore[arg-type]
        self.mesh.link_up(FakeLink("a"))  # type: ignore[arg-type]  # a relink is a link coming up too
        self.assertEqual(seen, ["a", "a"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_links_coming_up_and_going_down_say_whether_any_is_left(self) -> None:
        seen: list[bool] = []
        self.mesh.on_links_changed.append(seen.append)
        a, b = FakeLink("a"), FakeLink("b")
        self.mesh.link_up(a)  # type: ignore[arg-type]
        self.mesh.link_up(b)  # type: ignore[arg-type]
        self.mesh.link_down(a)  # type: ignore[arg-type]
        self.mesh.link_down(b)  # type: ignore[arg-type]
        self.assertEqual(seen, [True, True, True, False])

    def test_only_the_lower_id_dials(self) -> None:
        self.mesh._match([("a", "ws://127.0.0.1:1/peer"), ("c", "ws://127.0.0.1:2/peer"), ("b", "ws://x/peer")])
        self.assertEqual(sorted(self.mesh._dialers), ["c"])
        self.mesh._match([])
        self.assertEqual(self.mesh._dialers, {})

    def test_no_cluster_secret_means_no_links(self) -> None:
        mesh = Mesh("b", None, self.clock, lambda: succeed([("c", "ws://127.0.0.1:2/peer")]), self.deliver_local)
        mesh.startService()
        self.assertIsNone(mesh.auth)
        self.assertEqual(mesh._dialers, {})
        mesh.stopService()

    def test_peers_from_the_records_are_the_other_live_servers(self) -> None:
        from types import SimpleNamespace

        def record(server_id: str, scheme: str, host: str, port: int, dead: bool = False) -> Any:
            return SimpleNamespace(server_id=server_id, scheme=scheme, host=host, port=port, dead=dead)

        cluster = SimpleNamespace(server_id="b", alive=lambda r: not r.dead, servers={
            "a": record("a", "ws", "10.0.0.1", 8080), "b": record("b", "ws", "10.0.0.2", 8080),
            "c": record("c", "wss", "::1", 8443), "d": record("d", "ws", "10.0.0.4", 8080, dead=True)})
        source = combined_peers(static_peers(["a=ws://override:1/peer"]), record_peers(cluster))
        self.assertEqual(sorted(self.successResultOf(source())),
                         [("a", "ws://override:1/peer"), ("c", "wss://[::1]:8443/peer")])

    def test_static_peers(self) -> None:
        source = static_peers(["c=ws://127.0.0.1:2/peer"])
        self.assertEqual(self.successResultOf(source()), [("c", "ws://127.0.0.1:2/peer")])
        for bad in ("c", "c=http://x/peer", "bad id!=ws://x/peer"):
            self.assertRaises(ValueError, static_peers, [bad])


class RecordingLink(_LinkMixin):
    """The link mixin over a recording 'socket' (what Autobahn would write)."""

    peer_id = "a"
    direction = "in"

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.limits = PeerLimits(max_queue_bytes=10)
        self._init_link()
        self._link_open = True
        self.wire: list[bytes] = []
        self.closes: list[int] = []
        self.state = 3  # Autobahn's STATE_OPEN

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.wire.append(payload)

    def sendClose(self, code: int, reason: str) -> None:
        self.closes.append(code)

    def dropConnection(self, abort: bool = False) -> None:
        pass


class LinkQueueTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.mesh = Mesh("b", SECRET, self.clock, lambda: succeed([]), lambda ids, frame: 0)
        self.link = RecordingLink(self.mesh)
        self.mesh.link_up(self.link)

    def test_frames_wait_while_paused_and_go_in_order(self) -> None:
        self.link.pauseProducing()
        self.link.send(b"1234")
        self.link.send(b"5678")
        self.assertEqual((self.link.wire, self.link.queued_bytes), ([], 8))
        self.link.resumeProducing()
        self.assertEqual((self.link.wire, self.link.queued_bytes), ([b"1234", b"5678"], 0))

    def test_frames_of_one_turn_go_as_one_batch_in_order(self) -> None:
        from allspark.mesh import encode_peer_frame, split_batch

        self.link.limits = PeerLimits()
        first = encode_peer_frame("deliver", b"1", to=["n"])
        second = encode_peer_frame("deliver", b"2", to=["n"])
        self.link.send_batched(first)
        self.link.send_batched(second)
        self.assertEqual(self.link.wire, [])
        self.clock.advance(0)
        [message] = self.link.wire
        batch = decode_peer_frame(message)
        self.assertEqual((batch.type, split_batch(batch.payload)), ("batch", [first, second]))
        # a frame sent at once goes after what was batched before it
        self.link.send_batched(first)
        self.link.send(b"now")
        self.assertEqual(self.link.wire[1:], [first, b"now"])
        self.clock.advance(0)
        self.assertEqual(len(self.link.wire), 3)

    def test_a_received_batch_is_handled_frame_by_frame(self) -> None:
        from allspark.mesh import encode_batch, encode_peer_frame

        self.link.limits = PeerLimits()
        handled: list[str] = []
        self.mesh.handle = lambda link, frame: handled.append(frame.type)  # type: ignore[method-assign]
        inner = [encode_peer_frame("hello", server_id="a"), encode_peer_frame("invalidate", what="x", key="y")]
        self.link.onMessage(encode_batch(inner), True)
        self.assertEqual(handled, ["hello", "invalidate"])
        self.link.onMessage(encode_batch([encode_batch(inner)]), True)  # no batch in a batch
        self.link.onMessage(encode_peer_frame("batch", b"\x00\x00\x00\x09ab"), True)  # cut short
        self.assertEqual(handled, ["hello", "invalidate"])
        errors = [decode_peer_frame(f).fields["code"] for f in self.link.wire]
        self.assertEqual(errors, ["bad_frame", "bad_frame"])

    def test_an_overflowing_queue_closes_the_link_with_4008(self) -> None:
        self.link.pauseProducing()
        self.link.send(b"123456")
        self.link.send(b"123456")
        self.assertEqual(self.link.closes, [4008])
        self.assertEqual(self.link.queued_bytes, 0)
        self.assertNotIn("a", self.mesh.links)  # nothing more is sent to it
        self.link.send(b"x")
        self.assertEqual(self.link.queued_bytes, 0)


class DeliveryThroughTheMeshTests(TestCase):
    """Two servers' Delivery objects joined by the mesh, with the links
    replaced by a direct hand-over of the bytes."""

    def setUp(self) -> None:
        from allspark.delivery import Delivery
        from allspark.registry import Registry
        from tests.fakes import FakeConnection

        self.clock = Clock()
        self.registries = {"a": Registry(), "b": Registry()}
        self.deliveries = {sid: Delivery(reg, self.clock) for sid, reg in self.registries.items()}
        self.meshes = {sid: Mesh(sid, SECRET, self.clock, lambda: succeed([]), d.deliver_local)
                       for sid, d in self.deliveries.items()}
        for sid, delivery in self.deliveries.items():
            delivery.remote = self.meshes[sid]
        self.wires: dict[str, "WireLink"] = {}
        for here, there in (("a", "b"), ("b", "a")):
            link = WireLink(there, self)
            self.wires[here] = link
            self.meshes[here].link_up(link)  # type: ignore[arg-type]
        self.on_b = FakeConnection("n-b")
        self.registries["b"].add(self.on_b)

    def test_deliver_forwards_to_the_named_server_which_writes_locally(self) -> None:
        self.meshes["a"].locations["n-b"] = "b"
        frame = b'{"body":"hi","dest_id":"n-b"}'
        self.assertTrue(self.deliveries["a"].is_live("n-b"))
        self.assertTrue(self.deliveries["a"].deliver("n-b", frame))
        self.assertEqual(self.on_b.raw, [frame])

    def test_a_stale_location_on_the_receiver_never_sends_the_frame_back(self) -> None:
        self.meshes["a"].locations["gone"] = "b"
        self.meshes["b"].locations["gone"] = "a"  # b believes it is on a: a loop, if b forwarded
        self.deliveries["a"].deliver("gone", b"{}")
        self.assertEqual([decode_peer_frame(f).type for f in self.wires["a"].carried], ["deliver"])
        # b sends no copy back to a: only the answer that it does not hold the node
        answers = [decode_peer_frame(f) for f in self.wires["b"].carried]
        self.assertEqual([(f.type, f.fields["missing"]) for f in answers], [("delivered", ["gone"])])
        self.assertNotIn("gone", self.meshes["a"].locations)  # a's stale entry is corrected

    def test_a_delivered_node_is_not_answered(self) -> None:
        """A forward that reached its node costs no frame back."""
        self.meshes["a"].locations["n-b"] = "b"
        self.deliveries["a"].deliver("n-b", b"{}")
        self.assertEqual(self.wires["b"].carried, [])
        self.assertIn("n-b", self.meshes["a"].locations)

    def test_a_node_on_two_servers_gets_a_copy_on_each(self) -> None:
        from tests.fakes import FakeConnection

        self.meshes["a"].locations.add("twice", "b", 1)
        self.meshes["a"].locations.add("twice", "c", 1)
        on_b = FakeConnection("twice")
        self.registries["b"].add(on_b)
        self.deliveries["a"].deliver("twice", b"{}")  # c has no link: only b gets it
        self.assertEqual(on_b.raw, [b"{}"])

    def test_location_announcements_are_applied_and_acknowledged(self) -> None:
        """A connection announced by b reaches a's cache; b's Deferred fires
        when a acknowledged; a close is applied without an answer."""
        seen: list[tuple[str, str, int, bool]] = []

        def on_location(peer: str, node: str, epoch: int, online: bool) -> None:
            seen.append((peer, node, epoch, online))
            self.meshes["a"].locations.add(node, peer, epoch) if online else \
                self.meshes["a"].locations.remove(node, peer, epoch)

        self.meshes["a"].on_location = on_location
        done = self.meshes["b"].announce_location("n-b", 7, True, timeout=5.0)
        self.assertEqual(self.successResultOf(done), None)
        self.assertEqual(list(self.meshes["a"].locations.servers_of("n-b")), ["b"])
        self.assertEqual(self.successResultOf(self.meshes["b"].announce_location("n-b", 7, False)), None)
        self.assertEqual(seen, [("b", "n-b", 7, True), ("b", "n-b", 7, False)])
        self.assertNotIn("n-b", self.meshes["a"].locations)
        self.assertEqual([decode_peer_frame(f).type for f in self.wires["a"].carried], ["location_ack"])

    def test_an_unanswered_announcement_gives_up_after_its_timeout(self) -> None:
        silent = WireLink("z", self)
        silent.send = silent.carried.append  # type: ignore[method-assign]  # z never answers
        self.meshes["b"].links["z"] = silent  # type: ignore[assignment]
        done = self.meshes["b"].announce_location("n-b", 1, True, timeout=2.0)
        self.assertNoResult(done)
        self.clock.advance(2.0)
        self.assertIsNone(self.successResultOf(done))

    def test_many_recipients_cross_once_per_server(self) -> None:
        from tests.fakes import FakeConnection

        others = [FakeConnection(f"m{i}") for i in range(3)]
        for conn in others:
            self.registries["b"].add(conn)
            self.meshes["a"].locations[conn.node_id] = "b"
        self.deliveries["a"].deliver_many(b"{}", [c.node_id for c in others])
        self.assertEqual(len(self.wires["a"].carried), 1)
        self.assertEqual([c.raw for c in others], [[b"{}"]] * 3)


class WireLink:
    """A link whose frames are handed straight to the other mesh."""

    direction = "out"

    def __init__(self, peer_id: str, test: DeliveryThroughTheMeshTests) -> None:
        self.peer_id = peer_id
        self.test = test
        self.carried: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.carried.append(frame)
        self.test.meshes[self.peer_id].handle(self.test.wires[self.peer_id], decode_peer_frame(frame))  # type: ignore[arg-type]

    def close(self, code: int, reason: str) -> None:
        pass


class PlainLinkWarningTests(TestCase):
    def test_only_public_hosts_count_as_in_clear(self) -> None:
        from allspark.mesh import _on_a_private_network

        for host in ("127.0.0.1", "::1", "localhost", "10.1.2.3", "192.168.0.9", "fd00::1"):
            self.assertTrue(_on_a_private_network(host), host)
        for host in ("8.8.8.8", "2001:4860::8888", "chat.example.com"):
            self.assertFalse(_on_a_private_network(host), host)


class ServerApiFrameTests(TestCase):
    """The ``disconnect`` and ``drain`` peer frames (sent by the server API)."""

    def setUp(self) -> None:
        self.mesh = Mesh("b", SECRET, Clock(), lambda: succeed([]), lambda node_ids, frame: 0)
        self.links = {peer: FakeLink(peer) for peer in ("a", "c")}
        for link in self.links.values():
            self.mesh.link_up(link)  # type: ignore[arg-type]

    def test_disconnect_goes_to_every_link_and_reaches_the_hook(self) -> None:
        told = self.mesh.disconnect("bob", "abuse", 5000)
        self.assertEqual(told, ["a", "c"])
        frame = decode_peer_frame(self.links["a"].sent[-1])
        self.assertEqual((frame.type, frame.fields), ("disconnect", {"node_id": "bob", "reason": "abuse",
                                                                     "revoked_until": 5000}))
        seen: list[tuple[str, str, int | None]] = []
        self.mesh.on_disconnect = lambda node_id, reason, until: seen.append((node_id, reason, until))
        self.mesh.handle(self.links["a"], frame)  # type: ignore[arg-type]
        self.mesh.disconnect("eve", "")
        self.mesh.handle(self.links["c"], decode_peer_frame(self.links["c"].sent[-1]))  # type: ignore[arg-type]
        self.assertEqual(seen, [("bob", "abuse", 5000), ("eve", "", None)])

    def test_drain_goes_to_the_named_peer_only_and_drains_only_that_server(self) -> None:
        drained: list[bool] = []
        self.mesh.on_drain = lambda: drained.append(True)
        self.assertTrue(self.mesh.drain("c"))
        self.assertFalse(self.mesh.drain("z"))  # no link
        self.assertEqual(self.links["a"].sent, [])
        frame = decode_peer_frame(self.links["c"].sent[-1])
        self.assertEqual((frame.type, frame.fields), ("drain", {"server_id": "c"}))
        self.mesh.handle(self.links["c"], frame)  # type: ignore[arg-type]  # names c, not this server b
        self.assertEqual(drained, [])
        self.mesh.handle(self.links["c"], decode_peer_frame(encode_peer_frame("drain", server_id="b")))  # type: ignore[arg-type]
        self.assertEqual(drained, [True])

    def test_malformed_disconnect_and_drain(self) -> None:
        for data in (b'{"v":1,"t":"disconnect"}\n', b'{"v":1,"t":"disconnect","node_id":"bad id"}\n',
                     b'{"v":1,"t":"disconnect","node_id":"n","reason":3}\n',
                     b'{"v":1,"t":"disconnect","node_id":"n","revoked_until":-1}\n',
                     b'{"v":1,"t":"disconnect","node_id":"n","revoked_until":true}\n',
                     b'{"v":1,"t":"disconnect","node_id":"n","revoked_until":"soon"}\n',
                     b'{"v":1,"t":"drain"}\n', b'{"v":1,"t":"drain","server_id":""}\n'):
            with self.assertRaises(PeerFrameError) as caught:
                decode_peer_frame(data)
            self.assertEqual(caught.exception.code, "bad_frame", data)
