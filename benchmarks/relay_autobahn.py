"""The bare Autobahn/Twisted relay: the ceiling of Allspark's own stack.

Same reactor, same WebSocket library and same JSON library (orjson) as the
server, and nothing else: no auth, no validation, no storage, no back-pressure
queue.  It speaks the harness's relay protocol (see ``benchmarks/node/relay.js``)::

    python -m benchmarks.relay_autobahn PORT

Connect to ``ws://127.0.0.1:PORT/?id=NODE[&rooms=R]``; send
``{"id", "dest_id" | "dest_session_id", "payload"}``; the destination gets
``{"src_id", "dest_id", "payload", "id"}`` and the sender
``{"op": "accepted", "id", "status": "delivered"}`` (unless the environment
sets ``BENCH_RELAY_NO_ACCEPTED=1``: a calibration knob, forward only).  A room message is
encoded once and sent as one Autobahn prepared message to every member.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest


ACCEPTED = os.environ.get("BENCH_RELAY_NO_ACCEPTED") != "1"


class RelayProtocol(WebSocketServerProtocol):
    factory: "RelayFactory"
    node_id = ""
    rooms: list[str] = []

    def onConnect(self, request: ConnectionRequest) -> None:
        self.node_id = request.params.get("id", [""])[0]
        self.rooms = [r for r in request.params.get("rooms", [""])[0].split(",") if r]

    def onOpen(self) -> None:
        self.factory.nodes[self.node_id] = self
        for room in self.rooms:
            self.factory.room_members.setdefault(room, set()).add(self)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self.factory.nodes.get(self.node_id) is self:
            del self.factory.nodes[self.node_id]
        for room in self.rooms:
            self.factory.room_members.get(room, set()).discard(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        m = orjson.loads(payload)
        if "op" in m:
            return
        out = {"src_id": self.node_id, "dest_id": m.get("dest_id"), "payload": m.get("payload"), "id": m.get("id")}
        room = m.get("dest_session_id")
        if room is not None:
            out["dest_session_id"] = room
            prepared = self.factory.prepareMessage(orjson.dumps(out))
            for peer in self.factory.room_members.get(room, ()):
                if peer is not self:
                    peer.sendPreparedMessage(prepared)
        else:
            peer = self.factory.nodes.get(m.get("dest_id"))
            if peer is not None:
                peer.sendMessage(orjson.dumps(out))
        if ACCEPTED:
            self.sendMessage(orjson.dumps({"op": "accepted", "id": m.get("id"), "status": "delivered"}))


class RelayFactory(WebSocketServerFactory):
    protocol = RelayProtocol

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, RelayProtocol] = {}
        self.room_members: dict[str, set[RelayProtocol]] = {}
        self.setProtocolOptions(allowNullOrigin=True, openHandshakeTimeout=30)


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    port = int(argv[1])
    reactor.listenTCP(port, RelayFactory(), interface="127.0.0.1", backlog=4096)  # type: ignore[attr-defined]
    reactor.callWhenRunning(lambda: print(f"LISTENING {port}", flush=True))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
