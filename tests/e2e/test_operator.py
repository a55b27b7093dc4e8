"""What an operator relies on, against real ``twistd allspark`` processes: a
start that fails exits at once with status 1 and one line on stderr (so that
systemd's ``Restart=on-failure`` works), and the data files are the service
user's alone."""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time

from twisted.trial import unittest

from tests.e2e.helpers import wait_until
from tests.support import CLUSTER_SECRET, ROOT, SECRET, client_for, free_port, start_server, twistd

#: Generous bound for a start that must fail: the fixed code exits in well under a second,
#: the old code never did.
EXIT_BOUND_S = 30.0


class FailedStart:
    """How a ``twistd -n allspark`` that had to fail ended."""

    def __init__(self, returncode: int, stdout: str, stderr: str, seconds: float) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds


def failed_start(data_dir: str, port: int, *args: str) -> FailedStart:
    """Run a server that cannot start; its status, stdout (the log), stderr
    and how long it took to exit.  A process still running after
    :data:`EXIT_BOUND_S` is killed and fails the test."""
    env = dict(os.environ, ALLSPARK_AUTH_SECRET=SECRET, ALLSPARK_CLUSTER_SECRET=CLUSTER_SECRET)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [twistd(), "-n", "--pidfile=", "allspark", "--host_address=127.0.0.1", f"--port={port}",
           f"--data-dir={data_dir}", *args]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, env=env, cwd=data_dir if os.path.isdir(data_dir) else None,
                              capture_output=True, timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the server was still running after {EXIT_BOUND_S}s:\n"
                             f"{(e.stdout or b'').decode(errors='replace')}") from None
    return FailedStart(done.returncode, done.stdout.decode(errors="replace"),
                       done.stderr.decode(errors="replace"), time.monotonic() - started)


class FailedStartTests(unittest.TestCase):
    """A server that cannot start exits with status 1 and says why in one
    line on stderr; it gives its identity claim back, so a restart (by
    systemd, without --force) is not refused for it."""

    timeout = 120

    def data_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="allspark-test-")
        return path

    def assert_refused(self, done: FailedStart, *expected: str) -> str:
        """Status 1 and exactly one line on stderr that contains ``expected``; that line."""
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertTrue(lines[0].startswith("allspark: cannot start: "), lines[0])
        for text in expected:
            self.assertIn(text, lines[0])
        self.assertIn("cannot start: ", done.stdout)  # and in the log
        return lines[0]

    def assert_claim_released(self, data_dir: str) -> None:
        self.assertEqual([n for n in os.listdir(data_dir) if n.startswith("server-")], [])

    def test_port_in_use(self) -> None:
        data_dir = self.data_dir()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = failed_start(data_dir, port)
        self.assert_refused(done, f"cannot listen on tcp:{port}", "Address already in use")
        self.assert_claim_released(data_dir)

    def test_port_in_use_as_a_daemon(self) -> None:
        """Without -n, twistd's parent waits for the daemon to start: it
        must hear of the refusal and exit 1 (not wait forever)."""
        data_dir = self.data_dir()
        env = dict(os.environ, ALLSPARK_AUTH_SECRET=SECRET, ALLSPARK_CLUSTER_SECRET=CLUSTER_SECRET)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        pidfile, logfile = os.path.join(data_dir, "twistd.pid"), os.path.join(data_dir, "twistd.log")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            try:
                done = subprocess.run(
                    [twistd(), f"--pidfile={pidfile}", f"--logfile={logfile}", "allspark",
                     "--host_address=127.0.0.1", f"--port={port}", f"--data-dir={data_dir}"],
                    env=env, cwd=data_dir, capture_output=True, timeout=EXIT_BOUND_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"twistd was still waiting after {EXIT_BOUND_S}s") from None
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(b"cannot listen on", done.stderr)
        with open(logfile) as f:
            self.assertIn("Address already in use", f.read())
        self.assertFalse(os.path.exists(pidfile))
        self.assert_claim_released(data_dir)

    def test_missing_tls_key_file(self) -> None:
        data_dir = self.data_dir()
        port = free_port()
        key = os.path.join(data_dir, "missing-key.pem")
        done = failed_start(data_dir, port,
                            f"--listen=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={key}")
        self.assert_refused(done, f"cannot listen on ssl:{port}", "missing-key.pem")
        self.assert_claim_released(data_dir)

    def test_unwritable_data_dir(self) -> None:
        parent = self.data_dir()
        not_a_dir = os.path.join(parent, "file")
        with open(not_a_dir, "w"):
            pass
        done = failed_start(os.path.join(not_a_dir, "data"), free_port())
        self.assert_refused(done, "cannot use the data dir", "identity claim", not_a_dir)

    def test_store_that_cannot_be_opened(self) -> None:
        data_dir = self.data_dir()
        path = os.path.join(data_dir, "newer.db")
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA user_version = 999")
        done = failed_start(data_dir, free_port(), f"--store=sqlite://{path}")
        self.assert_refused(done, "cannot open the store", "newer.db", "schema version 999")
        self.assert_claim_released(data_dir)
        not_a_database = os.path.join(data_dir, "garbage.db")
        with open(not_a_database, "wb") as f:
            f.write(b"this is not an SQLite file " * 100)
        done = failed_start(data_dir, free_port(), f"--store=sqlite://{not_a_database}")
        self.assert_refused(done, "cannot open the store", "garbage.db")
        self.assert_claim_released(data_dir)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class DataFileModeTests(unittest.TestCase):
    """The SQLite file (with its -wal and -shm), the identity claim and a
    data dir the server makes are private to the service user, whatever the
    umask it was started with (systemd's unit sets 0077; a shell's is 0022)."""

    timeout = 60

    async def test_data_files_are_private_with_a_permissive_umask(self) -> None:
        parent = tempfile.mkdtemp(prefix="allspark-test-")
        data_dir = os.path.join(parent, "made-by-the-server")
        previous = os.umask(0o022)  # inherited by the server process
        try:
            server = start_server(self, f"--data-dir={data_dir}")
        finally:
            os.umask(previous)
        recipient = await client_for(self, server, "bob")
        assert recipient.protocol is not None
        recipient.protocol.dropConnection(abort=True)
        await recipient.closed
        sender = await client_for(self, server, "alice")
        answer = await sender.send(dest_id="bob", payload={"text": "held for bob"})
        self.assertEqual(answer["status"], "stored")  # a message body is in the file now
        db = os.path.join(data_dir, "allspark.db")
        await wait_until(lambda: os.path.exists(db + "-wal") and os.path.exists(db + "-shm"), 10,
                         what="the WAL files")
        claims = [n for n in os.listdir(data_dir) if n.startswith("server-")]
        self.assertEqual(len(claims), 1)
        modes = {name: oct(mode(os.path.join(data_dir, name)))
                 for name in ("allspark.db", "allspark.db-wal", "allspark.db-shm", claims[0])}
        self.assertEqual(modes, dict.fromkeys(modes, oct(0o600)))
        self.assertEqual(oct(mode(data_dir)), oct(0o700))

    async def test_an_older_world_readable_file_is_made_private(self) -> None:
        data_dir = tempfile.mkdtemp(prefix="allspark-test-")
        db = os.path.join(data_dir, "allspark.db")
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE made_by_an_older_version (x)")
        os.chmod(db, 0o644)
        start_server(self, data_dir=data_dir)
        self.assertEqual(oct(mode(db)), oct(0o600))
