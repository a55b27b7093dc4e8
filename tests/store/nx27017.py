"""A MongoDB *wire-protocol stand-in* for tests: nx-27017, NOT a MongoDB.

`nx-27017 <https://pypi.org/project/nx-27017/>`_ is a server that speaks
MongoDB's wire protocol and keeps the data in SQLite.  It lets the MongoDB
store's txmongo code path (commands, BSON, unique-index errors, cursors) run
here without a MongoDB; it says nothing about MongoDB's own semantics
(concurrency, durability, write concerns), which only a real server
(``ALLSPARK_TEST_MONGODB_URI``) shows.

One patch, here in the test harness only: txmongo 26 decides that a server is
writable from the ``ismaster`` field of its handshake answer, and nx-27017
answers with the newer ``isWritablePrimary`` only, so txmongo refuses it
("host None is not master").  Run as a script, this module adds
``ismaster: true`` to the handshake answers that carry
``isWritablePrimary: true`` and then starts nx-27017 with the given arguments.
Nothing else of nx-27017 is changed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

#: How long :func:`start_nx27017` waits for the server to listen.
START_TIMEOUT_S = 30.0


def available() -> bool:
    """Whether nx-27017 is installed (the ``test`` extra installs it)."""
    try:
        import nx_27017  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nx27017(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start the stand-in on a free 127.0.0.1 port, one SQLite file per
    database under ``data_dir``; the process and its ``mongodb://`` base URL.
    The caller stops the process (``kill``)."""
    port = _free_port()
    log_path = os.path.join(data_dir, "nx-27017.log")
    with open(log_path + ".out", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--data-dir", data_dir,
             "--host", "127.0.0.1", "-p", str(port), "--log-file", log_path,
             "--pid-file", os.path.join(data_dir, "nx-27017.pid")],
            stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"mongodb://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)
    with open(log_path + ".out", "rb") as f:
        raise RuntimeError(f"nx-27017 did not listen on {port}: {f.read()[-2000:]!r}")


def _patch_handshake() -> None:
    """The one test-harness patch: ``ismaster`` beside ``isWritablePrimary``."""
    from nx_27017 import handler

    original = handler.NeoSQLiteHandler.handle_command

    def handle_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        request_id, reply = original(self, *args, **kwargs)
        if isinstance(reply, dict) and reply.get("isWritablePrimary"):
            reply = {**reply, "ismaster": True}
        return request_id, reply

    handler.NeoSQLiteHandler.handle_command = handle_command


if __name__ == "__main__":
    _patch_handshake()
    from nx_27017.nx_27017 import main

    sys.exit(main())
