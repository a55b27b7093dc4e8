"""Processes the harness starts: servers under test, reference servers and
load generators; and what it reads about them from ``/proc``.

Every process goes through :func:`spawn`, which records it, so that
:func:`stop_all` (called in a ``finally`` by ``benchmarks.__main__``, also on
Ctrl-C and SIGTERM) leaves nothing running.

A *target* is what a scenario drives: a list of server processes (one today;
several when servers mesh) and the URLs clients are spread over.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
NODE_DIR = os.path.join(BENCH, "node")
CLK_TCK = os.sysconf("SC_CLK_TCK")

_running: list["Proc"] = []
#: every pid started in this run (the report lists them; the test checks they are gone)
started_pids: list[int] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: "Proc", timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout}s: {proc.log_tail()}")


@dataclass
class Proc:
    """One process we started."""

    name: str
    popen: subprocess.Popen[Any]
    log_path: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_s(self) -> float:
        """utime + stime so far (seconds), from /proc/<pid>/stat."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def _status_kb(self, key: str) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def rss_kb(self) -> int:
        return self._status_kb("VmRSS")

    def hwm_kb(self) -> int:
        """Peak RSS (VmHWM)."""
        return self._status_kb("VmHWM")

    def log_tail(self, n: int = 3000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL; always reaps."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for stream in (self.popen.stdin, self.popen.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self in _running:
            _running.remove(self)


def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
          log_path: str | None = None, pipes: bool = False) -> Proc:
    """Start ``cmd``; its output goes to ``log_path`` (or pipes, for load generators)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    sink = open(log_path, "ab") if log_path else None
    try:
        if pipes:
            popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=sink or subprocess.DEVNULL, env=full_env, cwd=cwd, text=True,
                                     bufsize=1, start_new_session=True)
        else:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True)
    finally:
        if sink is not None:
            sink.close()
    proc = Proc(name, popen, log_path)
    _running.append(proc)
    started_pids.append(popen.pid)
    return proc


def stop_all() -> None:
    """Stop every process still running (load generators first)."""
    for proc in sorted(list(_running), key=lambda p: not p.name.startswith("loadgen")):
        try:
            proc.stop()
        except Exception:  # noqa: BLE001 - keep stopping the others
            try:
                proc.popen.kill()
            except OSError:
                pass


# ---------------------------------------------------------------- targets
@dataclass
class Target:
    """What a scenario drives: server processes and the URLs clients use."""

    name: str          # e.g. "allspark", "autobahn-relay"
    label: str         # for tables
    mode: str          # the load generator's mode
    workdir: str
    procs: list[Proc] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    secret: str = ""
    store_path: str = ""   # the shared SQLite file of a cluster target (its locations say who is where)

    def cpu_s(self) -> float:
        return sum(p.cpu_s() for p in self.procs)

    def rss_kb(self) -> int:
        return sum(p.rss_kb() for p in self.procs)

    def hwm_kb(self) -> int:
        return sum(p.hwm_kb() for p in self.procs)

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died ({p.popen.returncode}): {p.log_tail()}")

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def mint_keys(self, ids: list[tuple[str, str | None]]) -> list[str]:
        if self.mode != "allspark":
            return ["" for _ in ids]
        from allspark.auth import mint_auth_key

        return [mint_auth_key(self.secret, node_id, client_id, ttl=3600) for node_id, client_id in ids]


def _venv_bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def start_allspark(workdir: str, servers: int = 1, extra_args: tuple[str, ...] = ()) -> Target:
    """``servers`` Allspark processes on 127.0.0.1, each with its own data dir
    (one today; a meshed scenario will share a store)."""
    secret = secrets.token_urlsafe(32)
    target = Target("allspark", "Allspark", "allspark", workdir, secret=secret)
    env = {"ALLSPARK_AUTH_SECRET": secret, "ALLSPARK_CLUSTER_SECRET": secrets.token_urlsafe(32)}
    try:
        for n in range(servers):
            port = free_port()
            data_dir = os.path.join(workdir, f"allspark-{n}")
            os.makedirs(data_dir, exist_ok=True)
            cmd = [_venv_bin("twistd"), "-n", "--pidfile=", "allspark", "--host_address=127.0.0.1", f"--port={port}",
                   f"--data-dir={data_dir}", "--max-connections=20000", *extra_args]
            proc = spawn(f"allspark-{n}", cmd, env=env, cwd=data_dir, log_path=os.path.join(data_dir, "server.log"))
            target.procs.append(proc)
            target.urls.append(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 30
            while True:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"allspark exited with {proc.popen.returncode}: {proc.log_tail()}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"allspark did not become healthy: {proc.log_tail()}")
                time.sleep(0.05)
    except BaseException:
        target.stop()
        raise
    return target


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        body: dict[str, Any] = json.loads(r.read())
        return body


def start_allspark_cluster(workdir: str, servers: int, young_s: float = 6.0, timeout: float = 60.0) -> Target:
    """``servers`` Allspark processes on one SQLite file in ``workdir``, meshed
    (one cluster secret), returned once every server's ``/health`` shows a
    link to each other one and every record live, and ``young_s`` after the
    last one started: the balancer names another server only once it has run
    5 s (``ClusterRecords.pick``), so pre-connections are spread from the first."""
    store_path = os.path.join(workdir, "shared.db")
    target = start_allspark(workdir, servers=servers, extra_args=(f"--store=sqlite:///{store_path.lstrip('/')}",))
    target.store_path = store_path
    started = time.monotonic()
    deadline = started + timeout
    try:
        while True:
            target.check_alive()
            try:
                views = [_health(url) for url in target.urls]
            except (OSError, ValueError):
                views = []
            if views and all(len(v.get("peers") or {}) == servers - 1 and len(v.get("cluster") or []) == servers
                             and all(r["state"] == "live" for r in v["cluster"]) for v in views):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {servers} servers did not mesh within {timeout:.0f}s: {views}")
            time.sleep(0.2)
        if servers > 1:
            time.sleep(max(0.0, young_s - (time.monotonic() - started)))
    except BaseException:
        target.stop()
        raise
    return target


def placement(target: Target) -> dict[str, str]:
    """node_id -> server_id of every online node of a cluster target, read
    from the locations rows in its shared SQLite file."""
    import sqlite3

    db = sqlite3.connect(f"file:{target.store_path}?mode=ro", uri=True, timeout=10)
    try:
        return {node_id: server_id for node_id, server_id in db.execute("SELECT node_id, server_id FROM locations")}
    finally:
        db.close()


def _listening(target: "Target", port: int, proc: Any) -> "Target":
    """``target`` once ``proc`` listens on ``port`` (stopped if it never does)."""
    try:
        wait_port(port, proc, 20)
    except BaseException:
        target.stop()
        raise
    return target


def start_autobahn_relay(workdir: str) -> Target:
    port = free_port()
    proc = spawn("autobahn-relay", [sys.executable, "-m", "benchmarks.relay_autobahn", str(port)],
                 log_path=os.path.join(workdir, "autobahn-relay.log"))
    return _listening(Target("autobahn-relay", "bare Autobahn relay", "relay", workdir, [proc],
                             [f"ws://127.0.0.1:{port}"]), port, proc)


def node_available() -> str | None:
    """Why Node cannot be used, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    return None


def ensure_node_modules(log: Any) -> str | None:
    """``npm ci`` into benchmarks/node/node_modules when missing; why not, or None."""
    why = node_available()
    if why:
        return why
    stamp = os.path.join(NODE_DIR, "node_modules", ".package-lock.json")
    lock = os.path.join(NODE_DIR, "package-lock.json")
    if os.path.exists(stamp) and os.path.getmtime(stamp) >= os.path.getmtime(lock) - 1:
        return None
    if shutil.which("npm") is None:
        return "npm is not installed"
    log("benchmarks: npm ci in benchmarks/node ...")
    try:
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"npm ci failed: {e}"
    if r.returncode != 0:
        return f"npm ci failed: {r.stderr.strip()[-300:]}"
    return None


def start_node_relay(workdir: str, kind: str) -> Target:
    port = free_port()
    name = {"ws": "node-ws-relay", "socketio": "socketio-relay"}[kind]
    label = {"ws": "Node ws relay", "socketio": "Socket.IO relay"}[kind]
    proc = spawn(name, ["node", os.path.join(NODE_DIR, "relay.js"), kind, str(port)], cwd=NODE_DIR,
                 log_path=os.path.join(workdir, f"{name}.log"))
    scheme = "ws" if kind == "ws" else "http"
    return _listening(Target(name, label, "relay" if kind == "ws" else "socketio", workdir, [proc],
                             [f"{scheme}://127.0.0.1:{port}"]), port, proc)


def nats_available() -> str | None:
    if shutil.which("nats-server") is None:
        return "nats-server is not installed (apt-get install -y nats-server)"
    return None


def start_nats(workdir: str, jetstream: bool) -> Target:
    port = free_port()
    store = os.path.join(workdir, f"nats-{port}")
    os.makedirs(store, exist_ok=True)
    cmd = ["nats-server", "-a", "127.0.0.1", "-p", str(port)]
    if jetstream:
        cmd += ["-js", "-sd", store]
    name = "nats-jetstream" if jetstream else "nats-core"
    proc = spawn(name, cmd, log_path=os.path.join(workdir, f"{name}.log"))
    return _listening(Target(name, "NATS JetStream" if jetstream else "NATS core",
                             "nats-js" if jetstream else "nats-core", workdir, [proc],
                             [f"nats://127.0.0.1:{port}"]), port, proc)


def new_workdir() -> str:
    return tempfile.mkdtemp(prefix="allspark-bench-")


def run_in_reactor(run: Any, args: Any) -> list[Any]:
    """Run the coroutine function ``run(args)`` under the global reactor until
    it ends; the list it returns (empty when it failed: its traceback goes to
    stderr).  For the standalone two-phase benchmarks (cross_server,
    push_isolation)."""
    from twisted.internet import defer, reactor

    out: list[Any] = []

    def done(results: Any) -> None:
        out.extend(results)
        reactor.stop()  # type: ignore[attr-defined]

    def failed(failure: Any) -> None:
        print(failure.getTraceback(), file=sys.stderr)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: defer.ensureDeferred(run(args)).addCallbacks(done, failed))
    reactor.run()  # type: ignore[attr-defined]
    return out
