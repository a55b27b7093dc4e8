"""A pre-connection load process (the ``preconnect`` scenario of
``benchmarks.suite``): a few threads, each with one HTTP/1.1 keep-alive
connection to one server of the cluster, each asking
``GET /?get_pre_connection_info=true&auth_key=K`` a fixed number of times.

It speaks the load generators' stdin/stdout protocol (``benchmarks.runner``):
``READY {...}`` once every connection is open, waits for a ``GO`` line, then
``RESULT {...}``: answers, refusals, errors, latencies, which server each
answer named (the balancer's spread), its own CPU time and the wall span.

    python -m benchmarks.preconnect CONFIG.json
    CONFIG: {"servers": [url, ...], "keys": [auth_key, ...], "threads": 2,
             "requests": 1000 (per thread), "first": 0 (the first thread's server index)}
"""

from __future__ import annotations

import http.client
import json
import resource
import sys
import threading
import time
import urllib.parse
from typing import Any


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Asker:
    """One keep-alive connection asking pre-connection ``requests`` times,
    cycling through ``keys``."""

    def __init__(self, base: str, keys: list[str], requests: int, offset: int) -> None:
        parsed = urllib.parse.urlsplit(base)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.keys, self.requests, self.offset = keys, requests, offset
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        self.latencies_ms: list[float] = []
        self.named: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.errors: list[str] = []
        self.reconnects = 0

    def open(self) -> None:
        self.conn.connect()

    def run(self) -> None:
        for n in range(self.requests):
            key = self.keys[(self.offset + n) % len(self.keys)]
            path = "/?get_pre_connection_info=true&auth_key=" + urllib.parse.quote(key)
            t0 = time.perf_counter()
            try:
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as e:
                if len(self.errors) < 5:
                    self.errors.append(f"{type(e).__name__}: {e}")
                else:
                    self.errors.append("")
                self.conn.close()   # a fresh connection for the next request (counted)
                self.reconnects += 1
                continue
            self.latencies_ms.append((time.perf_counter() - t0) * 1000)
            if response.status != 200:
                self.refused[str(response.status)] = self.refused.get(str(response.status), 0) + 1
                continue
            port = str(json.loads(body)["node"]["port"])
            self.named[port] = self.named.get(port, 0) + 1
            if response.getheader("connection", "").lower() == "close":
                self.conn.close()
                self.reconnects += 1


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        cfg: dict[str, Any] = json.load(f)
    servers: list[str] = cfg["servers"]
    askers = [Asker(servers[(cfg.get("first", 0) + t) % len(servers)], cfg["keys"], cfg["requests"],
                    t * 7919) for t in range(cfg["threads"])]
    for asker in askers:
        asker.open()
    print("READY " + json.dumps({"connected": len(askers)}), flush=True)
    for line in sys.stdin:
        if line.startswith("GO"):
            break
        if line.startswith("STOP"):
            return 0
    cpu0 = _cpu_s()
    t_start = time.time()
    threads = [threading.Thread(target=a.run) for a in askers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_end = time.time()
    named: dict[str, int] = {}
    refused: dict[str, int] = {}
    for a in askers:
        for k, v in a.named.items():
            named[k] = named.get(k, 0) + v
        for k, v in a.refused.items():
            refused[k] = refused.get(k, 0) + v
    result = {
        "answers": sum(sum(a.named.values()) for a in askers),
        "refused": refused, "errors": sum(len(a.errors) for a in askers),
        "error_samples": [e for a in askers for e in a.errors if e][:10],
        "reconnects": sum(a.reconnects for a in askers), "named": named,
        "latencies_ms": [x for a in askers for x in a.latencies_ms],
        "cpu_s": _cpu_s() - cpu0, "t_start": t_start * 1000, "t_end": t_end * 1000,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
