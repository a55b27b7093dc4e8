"""Unit tests of allspark.api: API keys (where they come from, what is
refused, the constant-time check) and the ``--api-*`` options.  The
endpoints themselves are tested through real servers (tests/e2e/test_api.py)
and by schemathesis (tests/e2e/test_api_schemathesis.py)."""

from __future__ import annotations

import os
import tempfile

from twisted.python import usage
from twisted.trial import unittest

from allspark.api import API_KEYS_ENV, ApiKeys, load_api_keys
from tests.support import SECRET
from tests.test_tap import OptionsTestCase

KEY = "a-server-api-key-0123456789"
OLD = "an-older-api-key-9876543210"


def key_file(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="allspark-api-keys-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class ApiKeysTests(unittest.SynchronousTestCase):
    def test_from_a_file_one_per_line_comments_skipped(self) -> None:
        path = key_file(f"# rotated 2026-12-01\n{KEY}\n\n  {OLD}  \n{KEY}\n")
        self.addCleanup(os.unlink, path)
        self.assertEqual(load_api_keys({API_KEYS_ENV: "ignored-when-a-file-is-given"}, path),
                         [KEY.encode(), OLD.encode()])

    def test_from_the_environment_commas_or_newlines(self) -> None:
        self.assertEqual(load_api_keys({API_KEYS_ENV: f"{KEY}, {OLD}\n"}, None), [KEY.encode(), OLD.encode()])
        self.assertEqual(load_api_keys({}, None), [])  # the API is off

    def test_refused(self) -> None:
        for env in ({API_KEYS_ENV: "short"}, {API_KEYS_ENV: "has a space in it 0123456789"},
                    {API_KEYS_ENV: "ü" * 20}, {API_KEYS_ENV: "x" * 513}):
            with self.assertRaises(ValueError):
                load_api_keys(env, None)
        empty = key_file("# nothing yet\n")
        self.addCleanup(os.unlink, empty)
        for path in (empty, "/nonexistent/api-keys"):
            with self.assertRaises(ValueError):
                load_api_keys({}, path)

    def test_check(self) -> None:
        keys = ApiKeys([KEY.encode(), OLD.encode()])
        self.assertTrue(keys)
        self.assertTrue(keys.check(KEY.encode()))
        self.assertTrue(keys.check(OLD.encode()))
        for wrong in (b"", KEY.encode()[:-1], KEY.encode() + b"x", SECRET.encode()):
            self.assertFalse(keys.check(wrong))
        self.assertFalse(ApiKeys([]))


class ApiOptionsTests(OptionsTestCase):

    def test_api_options(self) -> None:
        self.assertEqual((self.parse()["api-keys"], self.parse()["api-sender-id"]), ([], []))
        path = key_file(KEY + "\n")
        self.addCleanup(os.unlink, path)
        options = self.parse(f"--api-key-file={path}", "--api-sender-id=billing", "--api-sender-id=alerts")
        self.assertEqual((options["api-keys"], options["api-sender-id"]), ([KEY.encode()], ["billing", "alerts"]))
        for argv in (["--api-key-file=/nonexistent"], ["--api-sender-id=not an id"]):
            with self.assertRaises(usage.UsageError):
                self.parse(*argv)
