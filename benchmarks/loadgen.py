"""The Python load generator: the twin of ``benchmarks/node/loadgen.js``.

Used when Node is missing (the harness then runs several of these processes
side by side, since one Python process is slower than the servers it drives).
Same config, same protocol on stdin/stdout::

    python -m benchmarks.loadgen CONFIG.json
    -> READY {...}        every client connected
    <- GO {...}           start the load (the harness may pass a session_id)
    -> RESULT {...}       one JSON line, then exit

Modes ``allspark`` and ``relay`` only (Socket.IO and NATS need Node).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor, task
import warnings

from twisted.web.client import Agent, readBody

warnings.filterwarnings("ignore", category=DeprecationWarning)


class Conn(WebSocketClientProtocol):
    on_frame: Any = None
    hello: Any = None
    ready: defer.Deferred[Any]
    gen: "LoadGen"

    def onOpen(self) -> None:
        if self.gen.cfg["mode"] != "allspark":
            self.ready.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = orjson.loads(payload)
        if self.hello is None and frame.get("op") == "hello":
            # sync on connect, as every client must: the server answers it
            # once this connection's location is known to its peers, so a
            # message from a client on another server reaches it live
            self.hello = frame
            self.send({"op": "sync", "id": "connect-sync"})
            return
        if not self.ready.called:
            if frame.get("op") == "sync_done":
                self.ready.callback(self)
            return
        if self.on_frame is not None:
            self.on_frame(frame)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"closed before open: {code} {reason}"))
        elif not self.gen.stopping:
            self.gen.error(f"connection closed by server: {code}")

    def send(self, frame: dict[str, Any]) -> None:
        self.sendMessage(orjson.dumps(frame))

    def open_now(self) -> bool:
        return self.state == WebSocketClientProtocol.STATE_OPEN


class LoadGen:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.stopping = False
        self.agent = Agent(reactor)
        self.r: dict[str, Any] = {
            "mode": cfg["mode"], "scenario": cfg["scenario"], "sent": 0, "accepted": 0, "received": 0,
            "duplicates": 0, "errors": 0, "error_samples": [], "lost": 0, "expected": 0, "not_sent": 0,
            "complete": False, "t_start": 0, "t_end": 0, "latencies_ms": [], "connect_s": 0,
            "connected": 0, "connect_failed": 0, "acks_sent": 0, "acked": 0, "ack_incomplete": 0,
            "status_counts": {}, "cpu_s": 0, "deadline_hit": False,
        }

    def error(self, what: str) -> None:
        self.r["errors"] += 1
        if len(self.r["error_samples"]) < 20:
            text = str(what)
            self.r["error_samples"].append(text[:300] if len(text) <= 600 else text[:200] + " ... " + text[-400:])

    # -- connecting ----------------------------------------------------------
    async def _pre_connection(self, base: str, key: str) -> str:
        url = f"{base}/?get_pre_connection_info=true&auth_key={quote(key)}"
        response = await self.agent.request(b"GET", url.encode())
        body = json.loads(await readBody(response))
        if response.code != 200:
            raise RuntimeError(f"pre-connection HTTP {response.code}: {body}")
        return body["node"]["ws_url"]

    async def connect_one(self, client: dict[str, Any]) -> Conn:
        servers = self.cfg["servers"]
        base = servers[client.get("server", 0) % len(servers)]
        if self.cfg["mode"] == "allspark":
            url = await self._pre_connection(base, client["key"])
        else:
            url = f"{base}/?id={quote(client['id'])}"
            if client.get("rooms"):
                url += "&rooms=" + quote(",".join(client["rooms"]))
        factory = WebSocketClientFactory(url)
        factory.setProtocolOptions(openHandshakeTimeout=30)
        ready: defer.Deferred[Any] = defer.Deferred()
        gen = self

        class P(Conn):
            def __init__(self) -> None:
                super().__init__()
                self.ready = ready
                self.gen = gen

        factory.protocol = P
        connectWS(factory, timeout=30)
        return await ready

    async def connect_all(self) -> list[Conn | None]:
        clients = self.cfg["clients"]
        conns: list[Conn | None] = [None] * len(clients)
        it = iter(range(len(clients)))

        async def worker() -> None:
            for i in it:
                try:
                    conns[i] = await self.connect_one(clients[i])
                    self.r["connected"] += 1
                except Exception as e:  # noqa: BLE001 - reported, never raised
                    self.r["connect_failed"] += 1
                    self.error(f"connect {clients[i]['id']}: {e}")

        t0 = time.perf_counter()
        n = min(self.cfg.get("connect_concurrency", 200), len(clients))
        await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(n)])
        self.r["connect_s"] = time.perf_counter() - t0
        return conns

    # -- the load ------------------------------------------------------------
    async def run_direct(self, conns: list[Conn | None], go: dict[str, Any]) -> None:
        cfg, r = self.cfg, self.r
        per_pair = cfg["per_pair"]
        durable = bool(cfg.get("durable"))
        ephemeral = cfg["mode"] == "allspark" and not durable
        ack_every = cfg.get("ack_every", 100)
        ack_delay = cfg.get("ack_delay_ms", 50) / 1000
        pad = "x" * cfg["payload_pad"] if cfg.get("payload_pad") else None
        rate = cfg.get("rate", 0)
        pairs = []
        for k, (s, rcv) in enumerate(cfg["pairs"]):
            pairs.append({"k": k, "s": conns[s], "r": conns[rcv], "rid": cfg["clients"][rcv]["id"], "sent": 0,
                          "got": 0, "seen": bytearray(per_pair), "max_seq": 0, "acked_sent": 0,
                          "acked_ok": 0, "pending": 0, "timer": None})
        live = [p for p in pairs if p["s"] is not None and p["r"] is not None]
        r["expected"] = per_pair * len(pairs)
        done: defer.Deferred[str] = defer.Deferred()
        state = {"last_send": 0.0, "all_sent": False, "t0": 0.0}
        window = cfg["window"]
        perf = time.perf_counter

        def finish(why: str) -> None:
            if not done.called:
                done.callback(why)

        def check() -> None:
            if not state["all_sent"] and r["sent"] >= len(live) * per_pair:
                state["all_sent"] = True
            if state["all_sent"] and r["received"] >= r["sent"]:
                finish("complete")

        def send_one(p: dict[str, Any]) -> None:
            i = p["sent"]
            p["sent"] = i + 1
            payload: dict[str, Any] = {"s": p["k"], "i": i, "t": perf() * 1000}
            if pad:
                payload["x"] = pad
            frame: dict[str, Any] = {"dest_id": p["rid"], "payload": payload}
            if cfg.get("ids", True):
                frame["id"] = f"{p['k']}-{i}"   # without an id: no de-duplication record
            if ephemeral:
                frame["ephemeral"] = True
            p["s"].send(frame)
            r["sent"] += 1
            state["last_send"] = perf()

        def top_up(p: dict[str, Any]) -> None:
            if rate:
                return
            while p["sent"] < per_pair and p["sent"] - p["got"] < window:
                send_one(p)

        def make_handlers(p: dict[str, Any]) -> None:
            def on_sender(f: dict[str, Any]) -> None:
                op = f.get("op")
                if op == "accepted":
                    r["accepted"] += 1
                    st = f.get("status")
                    r["status_counts"][st] = r["status_counts"].get(st, 0) + 1
                    if st == "dropped":
                        self.error(f"message dropped: {f.get('id')}")
                elif op == "error":
                    self.error(f"error frame: {f}")

            def send_ack() -> None:
                if p["timer"] is not None and p["timer"].active():
                    p["timer"].cancel()
                p["timer"] = None
                if p["max_seq"] > p["acked_sent"] and p["r"].open_now():
                    p["r"].send({"op": "ack", "upto": p["max_seq"]})
                    p["acked_sent"] = p["max_seq"]
                    p["pending"] = 0
                    r["acks_sent"] += 1

            p["flush"] = send_ack

            def on_receiver(f: dict[str, Any]) -> None:
                op = f.get("op")
                if op is not None:
                    if op == "acked":
                        r["acked"] += 1
                        p["acked_ok"] = max(p["acked_ok"], f["upto"])
                    elif op == "error":
                        self.error(f"error frame to receiver: {f}")
                    return
                pl = f.get("payload") or {}
                if pl.get("s") != p["k"]:
                    self.error(f"unexpected message at {p['rid']}")
                    return
                i = pl["i"]
                if p["seen"][i]:
                    r["duplicates"] += 1
                else:
                    p["seen"][i] = 1
                    p["got"] += 1
                    r["received"] += 1
                    r["latencies_ms"].append(perf() * 1000 - pl["t"])
                    r["t_end"] = time.time() * 1000
                seq = f.get("seq")
                if durable and seq is not None:
                    p["max_seq"] = max(p["max_seq"], seq)
                    p["pending"] += 1
                    if p["pending"] >= ack_every:
                        send_ack()
                    elif p["timer"] is None:
                        p["timer"] = reactor.callLater(ack_delay, send_ack)  # type: ignore[attr-defined]
                top_up(p)
                check()

            p["s"].on_frame = on_sender
            p["r"].on_frame = on_receiver

        for p in live:
            make_handlers(p)

        ticker = None
        if rate:
            pair_rate = rate / max(1, len(live))
            cap = cfg.get("max_inflight", 1000)

            def tick() -> None:
                elapsed = perf() - state["t0"]
                target = min(per_pair, int(pair_rate * elapsed))
                for p in live:
                    while p["sent"] < target and p["sent"] - p["got"] < cap:
                        send_one(p)
                check()
                if state["all_sent"] and ticker is not None and ticker.running:
                    ticker.stop()

            ticker = task.LoopingCall(tick)

        state["t0"] = perf()
        r["t_start"] = time.time() * 1000
        self.finish = finish
        if ticker is not None:
            ticker.start(0.002)
        else:
            for p in live:
                top_up(p)
            check()
        if not live:
            finish("nothing to do")
        deadline = reactor.callLater(cfg["deadline_s"], lambda: (r.__setitem__("deadline_hit", True),  # type: ignore[attr-defined]
                                                                 finish("deadline")))

        def drain_check() -> None:
            if state["all_sent"] and perf() - state["last_send"] > cfg["drain_s"]:
                finish("drain timeout")

        drainer = task.LoopingCall(drain_check)
        drainer.start(0.1, now=False)
        r["finish_reason"] = await done
        drainer.stop()
        if ticker is not None and ticker.running:
            ticker.stop()
        if deadline.active():
            deadline.cancel()
        if durable:
            for p in live:
                p["flush"]()
            until = perf() + cfg["drain_s"]
            while perf() < until and any(p["acked_ok"] < p["max_seq"] for p in live):
                await task.deferLater(reactor, 0.02, lambda: None)
            r["ack_incomplete"] = sum(1 for p in live if p["acked_ok"] < p["max_seq"])
        r["not_sent"] = r["expected"] - r["sent"]
        r["lost"] = r["sent"] - r["received"]
        r["complete"] = r["not_sent"] == 0 and r["lost"] == 0

    async def run_fanout(self, conns: list[Conn | None], go: dict[str, Any]) -> None:
        cfg, r = self.cfg, self.r
        session_id = go.get("session_id") or cfg.get("session_id")
        sender = conns[cfg["sender"]]
        total = cfg["messages"]
        durable = bool(cfg.get("durable"))
        ephemeral = cfg["mode"] == "allspark" and not durable
        members = [{"conn": conns[i], "seen": bytearray(total), "max_seq": 0, "acked": 0, "acked_ok": 0,
                    "timer": None} for i in cfg["members"]]
        live = [m for m in members if m["conn"] is not None]
        r["expected"] = total * len(members)
        st = {"sent": 0, "accepted": 0, "last_send": 0.0}
        done: defer.Deferred[str] = defer.Deferred()
        perf = time.perf_counter

        def finish(why: str) -> None:
            if not done.called:
                done.callback(why)

        def check() -> None:
            if st["sent"] >= total and r["received"] >= r["expected"]:
                finish("complete")

        def top_up() -> None:
            while st["sent"] < total and st["sent"] - st["accepted"] < cfg["window"]:
                i = st["sent"]
                st["sent"] += 1
                frame: dict[str, Any] = {"id": f"f-{i}", "dest_session_id": session_id,
                                         "payload": {"s": -1, "i": i, "t": perf() * 1000}}
                if ephemeral:
                    frame["ephemeral"] = True
                assert sender is not None
                sender.send(frame)
                r["sent"] += 1
                st["last_send"] = perf()
            check()

        def on_sender(f: dict[str, Any]) -> None:
            op = f.get("op")
            if op == "accepted":
                st["accepted"] += 1
                r["accepted"] += 1
                s = f.get("status")
                r["status_counts"][s] = r["status_counts"].get(s, 0) + 1
                top_up()
            elif op == "error":
                self.error(f"error frame: {f}")
                st["accepted"] += 1
                top_up()

        def make(m: dict[str, Any]) -> None:
            def send_ack() -> None:
                if m["timer"] is not None and m["timer"].active():
                    m["timer"].cancel()
                m["timer"] = None
                if m["max_seq"] > m["acked"] and m["conn"].open_now():
                    m["conn"].send({"op": "ack", "session_id": session_id, "upto": m["max_seq"]})
                    m["acked"] = m["max_seq"]
                    r["acks_sent"] += 1

            m["flush"] = send_ack

            def on_member(f: dict[str, Any]) -> None:
                op = f.get("op")
                if op is not None:
                    if op == "acked":
                        r["acked"] += 1
                        m["acked_ok"] = max(m["acked_ok"], f.get("upto", 0))
                    elif op == "error":
                        self.error(f"error frame to member: {f}")
                    return
                pl = f.get("payload") or {}
                if pl.get("s") != -1:
                    return
                i = pl["i"]
                if m["seen"][i]:
                    r["duplicates"] += 1
                else:
                    m["seen"][i] = 1
                    r["received"] += 1
                    r["latencies_ms"].append(perf() * 1000 - pl["t"])
                    r["t_end"] = time.time() * 1000
                seq = f.get("session_seq", f.get("seq"))
                if durable and seq is not None:
                    m["max_seq"] = max(m["max_seq"], seq)
                    if m["max_seq"] - m["acked"] >= cfg.get("ack_every", 100):
                        send_ack()
                    elif m["timer"] is None:
                        m["timer"] = reactor.callLater(cfg.get("ack_delay_ms", 50) / 1000, send_ack)  # type: ignore[attr-defined]
                check()

            m["conn"].on_frame = on_member

        for m in live:
            make(m)
        r["t_start"] = time.time() * 1000
        self.finish = finish
        if sender is not None:
            sender.on_frame = on_sender
        if sender is not None and live:
            top_up()
        else:
            finish("nothing to do")
        deadline = reactor.callLater(cfg["deadline_s"], lambda: (r.__setitem__("deadline_hit", True),  # type: ignore[attr-defined]
                                                                 finish("deadline")))

        def drain_check() -> None:
            if st["sent"] >= total and perf() - st["last_send"] > cfg["drain_s"]:
                finish("drain timeout")

        drainer = task.LoopingCall(drain_check)
        drainer.start(0.1, now=False)
        r["finish_reason"] = await done
        drainer.stop()
        if deadline.active():
            deadline.cancel()
        if durable:
            for m in live:
                m["flush"]()
            until = perf() + cfg["drain_s"]
            while perf() < until and any(m["acked_ok"] < m["max_seq"] for m in live):
                await task.deferLater(reactor, 0.02, lambda: None)
            r["ack_incomplete"] = sum(1 for m in live if m["acked_ok"] < m["max_seq"])
        r["not_sent"] = (total - st["sent"]) * len(members)
        r["lost"] = st["sent"] * len(members) - r["received"]
        r["complete"] = r["not_sent"] == 0 and r["lost"] == 0

    async def main(self) -> None:
        self.finish = lambda why: None
        conns = await self.connect_all()
        emit("READY", {"connected": self.r["connected"], "connect_failed": self.r["connect_failed"],
                       "connect_s": self.r["connect_s"], "errors": self.r["errors"],
                       "error_samples": self.r["error_samples"]})
        go = await wait_go(self)
        c0 = os.times()
        scenario = self.cfg["scenario"]
        if scenario == "direct":
            await self.run_direct(conns, go)
        elif scenario == "fanout":
            await self.run_fanout(conns, go)
        else:
            self.r["complete"] = self.r["connect_failed"] == 0
        c1 = os.times()
        self.r["cpu_s"] = (c1.user - c0.user) + (c1.system - c0.system)
        self.r["wall_s"] = (self.r["t_end"] - self.r["t_start"]) / 1000 if self.r["t_end"] else 0
        self.stopping = True
        for c in conns:
            if c is not None:
                c.dropConnection(abort=True)
        emit("RESULT", self.r)


def emit(tag: str, obj: dict[str, Any]) -> None:
    sys.stdout.write(tag + " " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go(gen: LoadGen) -> defer.Deferred[dict[str, Any]]:
    """The GO line from stdin (read by the reactor); STOP ends the run early."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    d: defer.Deferred[dict[str, Any]] = defer.Deferred()

    class Lines(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            text = line.decode().strip()
            if text.startswith("GO") and not d.called:
                rest = text[2:].strip()
                d.callback(json.loads(rest) if rest else {})
            elif text.startswith("STOP"):
                gen.finish("stopped by the harness")

        def connectionLost(self, reason: Any = None) -> None:
            gen.finish("stdin closed")

    stdio.StandardIO(Lines())
    return d


def run(path: str) -> None:
    with open(path) as f:
        cfg = json.load(f)
    gen = LoadGen(cfg)

    def go() -> None:
        d = defer.ensureDeferred(gen.main())

        def failed(f: Any) -> None:
            gen.error(f"fatal: {f.getTraceback()}")
            emit("RESULT", gen.r)

        d.addErrback(failed)
        d.addBoth(lambda _: reactor.callLater(0.05, reactor.stop))  # type: ignore[attr-defined]

    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    run(sys.argv[1])
