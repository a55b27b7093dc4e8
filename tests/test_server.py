"""The identity claim: one running server per (host_address, port) and data dir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.trial import unittest

from allspark.server import IdentityClaim


class IdentityClaimTests(unittest.SynchronousTestCase):
    def claim_file(self, pid: int | None) -> IdentityClaim:
        data_dir = tempfile.mkdtemp(prefix="allspark-claim-")
        self.addCleanup(shutil.rmtree, data_dir)
        claim = IdentityClaim(data_dir, "127.0.0.1", 8080, "127.0.0.1:8080")
        if pid is not None:
            with open(claim.path, "w") as f:
                json.dump({"pid": pid, "server_id": "127.0.0.1:8080"}, f)
        return claim

    def test_fresh_claim_and_clean_release(self) -> None:
        claim = self.claim_file(None)
        claim.claim(force=False)
        with open(claim.path) as f:
            self.assertEqual(json.load(f)["pid"], os.getpid())
        claim.release()
        self.assertFalse(os.path.exists(claim.path))

    def test_a_crashed_claim_needs_force(self) -> None:
        claim = self.claim_file(2**22 + 12345)  # no such process
        with self.assertRaises(RuntimeError) as refused:
            claim.claim(force=False)
        self.assertIn("--force", str(refused.exception))
        claim.claim(force=True)

    def test_a_pid_reused_by_another_program_is_not_a_live_server(self) -> None:
        claim = self.claim_file(1)  # pid 1 is alive, and it is not allspark
        with self.assertRaises(RuntimeError) as refused:
            claim.claim(force=False)
        self.assertIn("--force", str(refused.exception))
        claim.claim(force=True)
