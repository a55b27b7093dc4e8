"""The JavaScript client's tests (clients/js/test/*.test.mjs), run under Node's
own test runner (``node --test``) against real server processes.

This module starts one server (tests/support.py) that the JS files share,
writes what they need to a JSON file (the twistd to run, the repository root,
the test secrets, the shared server's URL, a test CA and a certificate for
127.0.0.1 it signed) named by ``ALLSPARK_JS_TEST``, and
runs each file with Node; the files start the servers a test of their own needs
(a restart, a two-server cluster).  ``ws`` is installed with ``npm ci`` (from
clients/js/package-lock.json, preferring npm's cache) when missing, with
``typescript`` for the check of allspark.d.ts.  Without Node 20+ or without
those packages the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import unittest

from tests.e2e.test_mesh import make_ca, make_server_cert
from tests.support import CLUSTER_SECRET, ROOT, SECRET, ServerProcess, twistd

JS_DIR = os.path.join(ROOT, "clients", "js")
#: Seconds one test file may run (it starts its own servers).
FILE_TIMEOUT = 240


def node_missing() -> str | None:
    """Why Node 20+ cannot be used here, or None."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed (./dev test installs Debian's nodejs and npm)"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return f"node --version failed: {e}"
    if major < 20:
        return f"node {version} is too old: the JS client needs Node 20 or later"
    return None


#: What ``npm ci`` installs into clients/js/node_modules (package-lock.json).
NODE_PACKAGES = ("ws", "typescript")


def packages_missing() -> str | None:
    """Install ``ws`` and ``typescript`` into clients/js/node_modules when they
    are not there; why they cannot be had, or None."""
    if all(os.path.exists(os.path.join(JS_DIR, "node_modules", p, "package.json")) for p in NODE_PACKAGES):
        return None
    if shutil.which("npm") is None:
        return "npm is not installed (./dev test installs Debian's npm), so the ws package cannot be installed"
    try:
        r = subprocess.run(["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
                           cwd=JS_DIR, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"npm ci in clients/js failed: {e}"
    if r.returncode != 0:
        return f"npm ci in clients/js failed (offline, no cache?): {r.stderr.strip()[-400:]}"
    return None


class JavaScriptClientTests(unittest.TestCase):
    """One test per file of clients/js/test/; a failure shows Node's report."""

    server: ServerProcess
    config_path: str

    @classmethod
    def setUpClass(cls) -> None:
        why = node_missing() or packages_missing()
        if why:
            raise unittest.SkipTest(why)
        cls.server = ServerProcess().start()
        cls.workdir = tempfile.mkdtemp(prefix="allspark-js-test-")
        cls.config_path = os.path.join(cls.workdir, "config.json")
        # a CA, a certificate for 127.0.0.1 it signed, and a CA that signed nothing (tls.test.mjs)
        ca, other_ca = make_ca(cls.workdir, "ca"), make_ca(cls.workdir, "other-ca")
        cert, cert_key = make_server_cert(cls.workdir, ca, "server")
        with open(cls.config_path, "w") as f:
            json.dump({"twistd": twistd(), "root": ROOT, "auth_secret": SECRET,
                       "cluster_secret": CLUSTER_SECRET, "shared_url": cls.server.base_url,
                       "tls": {"ca": ca[2], "other_ca": other_ca[2], "cert": cert, "key": cert_key}}, f)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        shutil.rmtree(cls.server.data_dir, ignore_errors=True)
        shutil.rmtree(cls.workdir, ignore_errors=True)

    def run_node_tests(self, *names: str, node_options: str = "") -> None:
        """``node --test clients/js/test/<name>...``; fails with Node's output unless it exits 0."""
        env = dict(os.environ, ALLSPARK_JS_TEST=self.config_path)
        if node_options:
            env["NODE_OPTIONS"] = node_options
        name = " ".join(names)
        proc = subprocess.Popen(
            ["node", "--test", "--test-concurrency=1", "--test-reporter=spec",
             *(os.path.join("test", n) for n in names)],
            cwd=JS_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its servers are in its process group, killed below
        try:
            output, _ = proc.communicate(timeout=FILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            self.fail(f"node --test {name} did not finish in {FILE_TIMEOUT} s:\n{output}")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # any server a failed test left behind
            except ProcessLookupError:
                pass
        self.assertEqual(proc.returncode, 0, f"node --test {name} failed:\n{output}")

    def test_messaging(self) -> None:
        """hello, both pre-connection forms, refused keys, send/receive, user-wide, errors, bad input."""
        self.run_node_tests("messaging.test.mjs")

    def test_delivery(self) -> None:
        """offline then sync, de-dup, a resend after a lost answer, queued sends, batched acks."""
        self.run_node_tests("delivery.test.mjs")

    def test_sessions(self) -> None:
        """session ops and events, broadcasts, an offline member's sync and acks, private messages, presence."""
        self.run_node_tests("sessions.test.mjs")

    def test_reconnect(self) -> None:
        """a crash and restart, a draining server in a cluster, need_proxy, 4009."""
        self.run_node_tests("reconnect.test.mjs")

    def test_tls(self) -> None:
        """wss:// with a private CA: trusted through a ws subclass or NODE_EXTRA_CA_CERTS, refused otherwise."""
        self.run_node_tests("tls.test.mjs")

    def test_types(self) -> None:
        """allspark.d.ts type-checks an app's use of the client (tsc --strict)."""
        self.run_node_tests("types.test.mjs")

    def test_global_websocket(self) -> None:
        """The same client on a WHATWG WebSocket, the one browsers have (Node's own, behind
        --experimental-websocket in Node 20, the default from Node 22), instead of ws."""
        for flags in ([], ["--experimental-websocket"]):
            probe = subprocess.run(["node", *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
                                   capture_output=True, timeout=30)
            if probe.returncode == 0:
                break
        else:
            self.skipTest("this Node has no global WebSocket (Node 20.10+ with --experimental-websocket, or 22+)")
        self.run_node_tests("messaging.test.mjs", "delivery.test.mjs", "sessions.test.mjs",
                            node_options=" ".join(flags))

    def test_every_js_test_file_is_run_here(self) -> None:
        files = sorted(f for f in os.listdir(os.path.join(JS_DIR, "test")) if f.endswith(".test.mjs"))
        run_here = sorted(f"{name[len('test_'):]}.test.mjs" for name in dir(self) if name.startswith("test_")
                          and name not in ("test_every_js_test_file_is_run_here", "test_global_websocket"))
        self.assertEqual(files, run_here)
