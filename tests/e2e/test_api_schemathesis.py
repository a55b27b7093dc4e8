"""End-to-end: schemathesis against the server API of a real server process.

The OpenAPI document is loaded from the server itself
(``/api/v1/openapi.json``) and schemathesis's CLI (``st run``) tests every
operation with all its checks on (server errors, status codes, content
types, response schemas, headers, negative data rejected, positive data
accepted, unsupported methods, missing auth...), with the bearer key given.
The two drain operations are left out: one success stops the server under
test (``tests/e2e/test_api.py`` covers them).  A node ``alice`` (client
``alice-account``), the document's example, is connected during the run so
that publish and inbox reach past ``unknown_destination``.

Examples per operation: ``ALLSPARK_API_EXAMPLES`` (default 25); the run
is random each time (its seed is printed on a failure).  It must find
nothing, and the server's log must hold no traceback.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import client_for, start_server

API_KEY = "schemathesis-api-key-0123456789"
EXAMPLES = int(os.environ.get("ALLSPARK_API_EXAMPLES", "25"))
#: Seconds the whole schemathesis run may take.
RUN_TIMEOUT = 240


def st_command() -> str:
    """The ``st`` script next to the running interpreter."""
    return os.path.join(os.path.dirname(sys.executable), "st")


class SchemathesisFindsNothing(TestCase):
    timeout = RUN_TIMEOUT + 60

    async def test_every_operation_with_all_checks(self) -> None:
        server = start_server(self, env={"ALLSPARK_API_KEYS": API_KEY})
        await client_for(self, server, "alice", "alice-account")
        reports = tempfile.mkdtemp(prefix="allspark-schemathesis-")
        self.addCleanup(shutil.rmtree, reports, True)
        command = [
            st_command(), "run", f"{server.base_url}/api/v1/openapi.json",
            "--header", f"Authorization: Bearer {API_KEY}",
            "--checks", "all",
            "--max-examples", str(EXAMPLES),
            "--exclude-operation-id", "drainThisServer",
            "--exclude-operation-id", "drainServer",
            "--workers", "1",
            "--request-timeout", "10",
            "--report", "json", "--report-dir", reports,
        ]
        result = await deferToThread(subprocess.run, command, capture_output=True, text=True,
                                     timeout=RUN_TIMEOUT, cwd=reports)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, f"schemathesis found something:\n{output[-8000:]}")
        [report_path] = glob.glob(os.path.join(reports, "*.json"))
        with open(report_path) as f:
            report = json.load(f)
        cases = report["test_cases"]
        self.assertEqual((cases["with_failures"], cases["errored"]), (0, 0), output[-8000:])
        self.assertEqual(report["operations"]["tested"], report["operations"]["selected"])
        self.assertGreater(cases["generated"], 100)
        print(f"\nschemathesis: {cases['generated']} cases over {report['operations']['tested']} operations, "
              f"seed {report['seed']}, nothing found")
        log = server.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("internal error", log)
