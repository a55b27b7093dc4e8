"""The type hints are checked: mypy (with the zope plugin, for Twisted's
interfaces) over ``allspark/`` and ``twisted/plugins/``, configured in
pyproject.toml's ``[tool.mypy]``."""

from __future__ import annotations

import subprocess
import sys

from twisted.trial import unittest

from tests.support import ROOT


class MypyTests(unittest.SynchronousTestCase):
    def test_mypy_finds_no_error(self) -> None:
        """Fails with mypy's own report (file:line: error ... [code])."""
        done = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        report = done.stdout + done.stderr
        if "No module named mypy" in report:
            self.fail("mypy is not installed: pip install -e '.[test]' (the test extra has mypy and mypy-zope)")
        self.assertEqual(done.returncode, 0, "\n" + report)
