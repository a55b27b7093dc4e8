"""Helpers for tests that run real ``twistd -n allspark`` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from allspark.auth import mint_auth_key
from allspark.client import Client, connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "test-secret-0123456789abcdef0123456789"
CLUSTER_SECRET = "cluster-secret-0123456789abcdef012345"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the test process dies, so
    that no server outlives a test run that was killed."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key(node_id: str, client_id: str | None = None, ttl: int = 3600, **kw: Any) -> str:
    """An auth key for ``node_id`` signed with the test secret."""
    return mint_auth_key(SECRET, node_id, client_id, ttl=ttl, **kw)


def twistd() -> str:
    """The twistd script next to the running interpreter."""
    return os.path.join(os.path.dirname(sys.executable), "twistd")


class ServerProcess:
    """One real server process with its own data directory."""

    def __init__(self, data_dir: str | None = None, port: int | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, host: str = "127.0.0.1", netns: str | None = None) -> None:
        """``host`` is its ``--host_address`` (listened on and reached at);
        ``netns`` a network namespace to run it in (``ip netns exec``)."""
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="allspark-test-")
        self.port = port or free_port()
        self.host = host
        self.netns = netns
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.data_dir, f"server-{self.port}.log")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, force: bool = False, timeout: float = 20.0) -> "ServerProcess":
        env = dict(os.environ)
        env["ALLSPARK_AUTH_SECRET"] = SECRET
        env["ALLSPARK_CLUSTER_SECRET"] = CLUSTER_SECRET
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env or {})
        cmd = [twistd(), "-n", "--pidfile=", "allspark", f"--host_address={self.host}",
               f"--port={self.port}", f"--data-dir={self.data_dir}", *self.args]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]  # ip execs twistd: proc.pid is the server
        if force:
            cmd.append("--force")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
                                     preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=1) as r:
                    # "starting": listening, its record in the store not claimed yet
                    if r.status == 200 and json.loads(r.read()).get("state") != "starting":
                        return self
                    time.sleep(0.05)
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop however it takes: SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.terminate(10)
        except subprocess.TimeoutExpired:
            self.kill()


def start_server(testcase: Any, *args: str, **kw: Any) -> ServerProcess:
    """Start a server for ``testcase`` and stop it when the test ends."""
    server = ServerProcess(args=args, **kw).start()
    testcase.addCleanup(server.stop)
    return server


async def client_for(testcase: Any, server: ServerProcess, node_id: str, client_id: str | None = None,
                     **kw: Any) -> Client:
    """A connected client for ``node_id``; closed when the test ends."""
    client = await connect(server.base_url, key(node_id, client_id), reactor, **kw)

    async def close() -> None:
        if client.protocol is not None:
            client.protocol.dropConnection(abort=True)
            await client.closed

    testcase.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return client


def sleep(seconds: float) -> Deferred[None]:
    """Wait on the reactor."""
    return deferLater(reactor, seconds, lambda: None)
