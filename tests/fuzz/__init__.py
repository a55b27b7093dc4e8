"""Property tests (hypothesis) over what a hostile client controls: frames,
control op arguments and HTTP parameters.

The budget is ``ALLSPARK_FUZZ_EXAMPLES`` examples per property (default
:data:`DEFAULT_EXAMPLES`, small enough for every run of the suite); a larger
run is one command, described in docs/architecture.md (Testing)::

    ALLSPARK_FUZZ_EXAMPLES=5000 ./dev test tests/fuzz -q

Examples are random on every run (``derandomize=False``), nothing is read from
or written to a local example database (``database=None``: a CI result never
depends on what another run found), and a failure prints the blob that
reproduces it (``print_blob=True``; replay it with ``@reproduce_failure``).
There is no per-example deadline: a loaded CI machine must not make a test
fail, and a hang is caught by the tests' own time bounds instead.
"""

from __future__ import annotations

import functools
import http.client
import os
import re
from typing import Any

from hypothesis import HealthCheck, settings

from tests.support import ROOT, ServerProcess

#: Examples per property when ``ALLSPARK_FUZZ_EXAMPLES`` is not set.
DEFAULT_EXAMPLES = 60


def examples() -> int:
    """Examples per property: ``ALLSPARK_FUZZ_EXAMPLES``, or the default."""
    value = os.environ.get("ALLSPARK_FUZZ_EXAMPLES", "")
    return int(value) if value.strip() else DEFAULT_EXAMPLES


def fuzz_settings(share: float = 1.0, **overrides: Any) -> settings:
    """The settings of one property: ``share`` of the example budget (at
    least 10), no deadline, no example database, reproducible failures."""
    return settings(
        max_examples=max(10, int(examples() * share)),
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
        **overrides,
    )


@functools.cache
def documented_error_codes() -> frozenset[str]:
    """The error frame codes of the contract: the table under ``| code | when |``
    in docs/protocol.md (read once).  A code the server answers must be in
    it, so that code and documentation agree."""
    with open(os.path.join(ROOT, "docs", "protocol.md"), encoding="utf-8") as f:
        text = f.read()
    table = text.split("| code | when |", 1)[1].split("\n\n", 1)[0]
    return frozenset(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE))


#: Codes that report a failure of the server, never an answer to bad input.
SERVER_FAILURE_CODES = frozenset({"internal_error"})


#: Marks of a failure the server logged (a traceback, an unhandled error).
FAILURE_MARKS = ("Traceback", "Unhandled")

#: Seconds one HTTP request may take before it counts as a hang.
REQUEST_TIMEOUT = 10.0


def http_call(server: ServerProcess, method: str, url: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, bytes]:
    """One HTTP request to ``server`` on a new connection; its status and
    body.  Raises on a timeout (a hang) or a connection the server closed."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
    try:
        if chunked:
            conn.request(method, url, body=iter([body]) if body else None, headers=dict(headers or {}),
                         encode_chunked=True)
        else:
            conn.request(method, url, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def log_since(server: ServerProcess, offset: int) -> tuple[str, int]:
    """What ``server`` logged from byte ``offset`` on, and the offset of its end."""
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        data = f.read()
    return data.decode("utf-8", "replace"), offset + len(data)
