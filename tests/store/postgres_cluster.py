"""A throwaway PostgreSQL cluster for tests and benchmarks.

:func:`shared_cluster` starts one cluster per process (``initdb`` and
``pg_ctl`` in a temporary directory, listening on a free port on 127.0.0.1
only, no Unix socket, ``fsync=off``) the first time it is asked for, and stops
it and removes its directory when the process exits.  Nothing depends on a
database that happens to be running on the machine.

When the process runs as root the cluster runs as the ``postgres`` user
(PostgreSQL refuses to run as root) and its directory is owned by it.  The
cluster's superuser is ``allspark``, authenticated by ``trust`` on 127.0.0.1.

The binaries are looked up in ``$ALLSPARK_PG_BIN``, then in Debian's
``/usr/lib/postgresql/<version>/bin`` (newest first), then on ``PATH``.
When none are found, :func:`shared_cluster` raises :class:`ClusterUnavailable`
with the reason; tests turn it into a skip (``./dev test`` installs Debian's
``postgresql`` package, so on a developer's machine and in CI they run).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import unittest
import uuid
from typing import Any

SUPERUSER = "allspark"


class ClusterUnavailable(Exception):
    """No PostgreSQL cluster can be started here; the message says why."""


def find_bin_dir() -> str | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates = []
    if os.environ.get("ALLSPARK_PG_BIN"):
        candidates.append(os.environ["ALLSPARK_PG_BIN"])

    def version(path: str) -> float:
        try:
            return float(path.split(os.sep)[-2])
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for directory in candidates:
        if all(os.access(os.path.join(directory, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One PostgreSQL cluster in its own temporary directory.

    :meth:`start` creates and starts it; :meth:`create_database` makes a new,
    empty database and returns its ``postgresql://`` URL; :meth:`stop` stops
    the server (immediate shutdown: it holds nothing worth keeping) and
    removes the directory.
    """

    def __init__(self, bin_dir: str, port: int | None = None, durable: bool = False,
                 listen_address: str = "127.0.0.1", trusted_network: str | None = None,
                 netns: str | None = None) -> None:
        """``listen_address`` is the one address it listens on (and that
        :meth:`url` names); ``trusted_network`` (a CIDR, e.g.
        ``10.231.7.0/24``) is let in by ``trust`` besides 127.0.0.1;
        ``netns`` is a network namespace to run it in (``ip netns exec``)."""
        self.bin_dir = bin_dir
        self.durable = durable
        self.listen_address = listen_address
        self.trusted_network = trusted_network
        self.netns = netns
        self.port = port or _free_port()
        self.base_dir = ""
        self.data_dir = ""
        self.log_path = ""
        self.running = False
        self._run_as: pwd.struct_passwd | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def _cmd(self, tool: str, *args: str, in_netns: bool = False) -> list[str]:
        """The command line for ``tool``; ``in_netns`` runs it in ``netns``
        (only starting the server needs it: its processes inherit the
        namespace, and stopping goes by the pid file and signals)."""
        command = [os.path.join(self.bin_dir, tool), *args]
        if self._run_as is not None:
            command = ["runuser", "-u", self._run_as.pw_name, "--", *command]
        if in_netns and self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
        return command

    def _run(self, tool: str, *args: str, timeout: float = 120, in_netns: bool = False) -> None:
        result = subprocess.run(
            self._cmd(tool, *args, in_netns=in_netns), capture_output=True, text=True, timeout=timeout,
            cwd=self.base_dir,
        )
        if result.returncode != 0:
            raise ClusterUnavailable(
                f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
            )

    def start(self) -> "PostgresCluster":
        """initdb, write the settings, pg_ctl start (waits until it accepts connections)."""
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterUnavailable(
                    "running as root and there is no 'postgres' user to run PostgreSQL as"
                ) from None
        self.base_dir = tempfile.mkdtemp(prefix="allspark-pg-")
        if self._run_as is not None:
            os.chown(self.base_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        self.data_dir = os.path.join(self.base_dir, "data")
        self.log_path = os.path.join(self.base_dir, "server.log")
        self._run(
            "initdb", "-D", self.data_dir, "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as conf:
            conf.write(
                "\n# allspark test cluster\n"
                f"listen_addresses = '{self.listen_address}'\n"
                f"port = {self.port}\n"
                "unix_socket_directories = ''\n"
                + ("" if self.durable else "fsync = off\nfull_page_writes = off\n") +
                "max_connections = 200\n"
                "shared_buffers = 128MB\n"
            )
        if self.trusted_network is not None:
            with open(os.path.join(self.data_dir, "pg_hba.conf"), "a") as hba:
                hba.write(f"host all all {self.trusted_network} trust\n")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data_dir, "-l", self.log_path, in_netns=True)
        self.running = True
        self._start_watchdog()
        return self

    def _start_watchdog(self) -> None:
        """A small process that stops the cluster and removes its directory
        if this process dies without running its exit handlers (``kill -9``,
        a CI time-out); :meth:`stop` ends it.  It gives up after 12 hours."""
        stop = " ".join(shlex.quote(part) for part in self._cmd(
            "pg_ctl", "stop", "-m", "immediate", "-D", self.data_dir))
        script = (
            f"i=0; while kill -0 {os.getpid()} 2>/dev/null && [ $i -lt 43200 ]; do sleep 1; i=$((i+1)); done; "
            f"{stop} >/dev/null 2>&1; rm -rf {shlex.quote(self.base_dir)}"
        )
        self._watchdog = subprocess.Popen(
            ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this cluster, as the superuser."""
        return f"postgresql://{SUPERUSER}@{self.listen_address}:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self, prefix: str = "allspark_test") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database named by ``url`` (disconnecting whoever is still on it)."""
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server at once and remove the directory."""
        if self.running:
            self.running = False
            try:
                self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data_dir, timeout=60)
            except (ClusterUnavailable, subprocess.TimeoutExpired):
                pass
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = ""
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait(10)
            self._watchdog = None


_shared: PostgresCluster | None = None
_failure: str | None = None


def shared_cluster(durable: bool = False) -> PostgresCluster:
    """This process's cluster, started on first use and stopped at exit.

    ``durable`` (for benchmarks; the first call decides) keeps PostgreSQL's
    defaults, ``fsync = on``: a commit waits for its WAL flush.  Tests use
    ``fsync = off``.

    Raises :class:`ClusterUnavailable` (every time, with the first reason)
    when PostgreSQL is not installed or does not start.
    """
    global _shared, _failure
    if _shared is not None:
        return _shared
    if _failure is not None:
        raise ClusterUnavailable(_failure)
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _failure = (
            "PostgreSQL not found (no initdb/pg_ctl/postgres in $ALLSPARK_PG_BIN, "
            "/usr/lib/postgresql/*/bin or PATH): install Debian's 'postgresql' package "
            "(./dev test does)"
        )
        raise ClusterUnavailable(_failure)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _failure = "psycopg is not installed: pip install -e '.[test]' (./dev test does)"
        raise ClusterUnavailable(_failure) from None
    cluster = PostgresCluster(bin_dir, durable=durable)
    atexit.register(cluster.stop)
    try:
        cluster.start()
    except (ClusterUnavailable, OSError, subprocess.TimeoutExpired) as e:
        cluster.stop()
        _failure = f"could not start a throwaway PostgreSQL cluster: {e}"
        raise ClusterUnavailable(_failure) from None
    _shared = cluster
    return cluster


def database_for(case: Any) -> str:
    """A new empty database on the shared cluster for test ``case``, dropped
    when it ends (cleanups run last-in first-out, so a store closed by a
    later cleanup is closed first).  Skips the test, with the reason, when
    no cluster can be had."""
    try:
        cluster = shared_cluster()
    except ClusterUnavailable as e:
        raise unittest.SkipTest(str(e)) from None
    url = cluster.create_database()
    case.addCleanup(cluster.drop_database, url)
    return url
