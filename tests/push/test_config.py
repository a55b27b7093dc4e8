"""``--push-config``: the TOML file, its checks and the providers it builds."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial import unittest

from allspark.push import config as push_config
from allspark.push.config import PushSettings, load_push_config, read_secret
from allspark.push.provider import PushConfigError
from allspark.push.webhook import WebhookProvider
from allspark.tap import Options


class ConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.secret = self.write("secret", "0123456789abcdef0123\n")

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def load(self, text: str) -> Any:
        return load_push_config(self.write("push.toml", text), Clock())

    def refused(self, text: str) -> str:
        with self.assertRaises(PushConfigError) as caught:
            self.load(text)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_defaults(self) -> None:
        config = self.load("")
        self.assertEqual(config.settings, PushSettings())
        self.assertEqual((config.settings.grace_s, config.settings.window_s, config.settings.timeout_s),
                         (2.0, 30.0, 10.0))
        self.assertEqual(config.providers, {})

    def test_settings_and_the_webhook(self) -> None:
        config = self.load(f"""
[push]
grace_s = 0.5
window_s = 5
max_attempts = 2
content = "count"

[webhook]
url = "http://127.0.0.1:9/hook"
secret_file = "{self.secret}"
""")
        self.assertEqual((config.settings.grace_s, config.settings.window_s, config.settings.max_attempts,
                          config.settings.content), (0.5, 5.0, 2, "count"))
        provider = config.providers["webhook"]
        self.assertIsInstance(provider, WebhookProvider)
        self.assertEqual(provider.secret, b"0123456789abcdef0123")
        self.assertEqual(config.provider_names, frozenset({"webhook"}))
        self.assertGreaterEqual(config.settings.lease_s, 2 * config.settings.timeout_s)

    def test_a_provider_module_is_imported_by_its_table(self) -> None:
        self.patch(push_config, "PROVIDER_MODULES", {**push_config.PROVIDER_MODULES,
                                                     "fcm": "tests.push.fake_provider"})
        config = self.load('[fcm]\nname = "fcm"\n')
        self.assertEqual(config.providers["fcm"].name, "fcm")
        self.assertIn("has no key 'bogus'", self.refused('[fcm]\nbogus = 1\n'))

    def test_bad_files_are_one_clear_line(self) -> None:
        cases = {
            "[push\n": "not valid TOML",
            "[gcm]\n": "unknown table [gcm]",
            "push = 3\n": "[push] must be a table",
            "[push]\ngrace = 2\n": "[push] has no key 'grace'",
            "[push]\ngrace_s = -1\n": "[push] grace_s must be a positive number",
            "[push]\ngrace_s = \"2\"\n": "[push] grace_s must be a positive number",
            "[push]\nmax_attempts = 1.5\n": "[push] max_attempts must be a positive integer",
            "[push]\nmax_attempts = true\n": "[push] max_attempts must be a positive integer",
            "[push]\ncontent = \"all\"\n": "[push] content must be one of count, sender, text",
            "[push]\nbackoff_base_s = 10\nbackoff_cap_s = 1\n": "backoff_cap_s must be at least backoff_base_s",
            "[webhook]\n": "[webhook] url is required",
            "[webhook]\nurl = \"ftp://x\"\nsecret_env = \"X\"\n": "is not an http:// or https:// URL",
            "[webhook]\nurl = \"http://x/\"\n": "[webhook] needs exactly one of secret_file or secret_env",
            "[webhook]\nurl = \"http://x/\"\nsecret_file = \"/nonexistent/s\"\n": "cannot read it",
            "[webhook]\nurl = \"http://x/\"\nsecret_env = \"ALLSPARK_TEST_UNSET_VARIABLE\"\n": "is not set",
            "[webhook]\nurl = \"http://x/\"\nsecret = \"inline\"\n": "[webhook] has no key 'secret'",
        }
        for text, expected in cases.items():
            self.assertIn(expected, self.refused(text), text)
        with self.assertRaises(PushConfigError) as caught:
            load_push_config(os.path.join(self.dir, "missing.toml"), Clock())
        self.assertIn("cannot read it", str(caught.exception))

    def test_secrets_from_the_environment(self) -> None:
        table = {"secret_env": "HOOK_SECRET"}
        self.assertEqual(read_secret(table, "webhook", "secret", {"HOOK_SECRET": " s3cret \n"}), b"s3cret")
        with self.assertRaises(PushConfigError):
            read_secret({"secret_env": "HOOK_SECRET", "secret_file": self.secret}, "webhook", "secret", {})
        short = self.write("short", "abc")
        self.assertIn("too short", self.refused(f'[webhook]\nurl = "http://x/"\nsecret_file = "{short}"\n'))

    def test_twistd_option_refuses_a_bad_file_at_parse_time(self) -> None:
        os.environ["ALLSPARK_AUTH_SECRET"] = "a-test-secret-long-enough-for-hs256-0123456789"
        self.addCleanup(os.environ.pop, "ALLSPARK_AUTH_SECRET", None)
        path = self.write("bad.toml", "[push]\nwindow_s = 0\n")
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--push-config", path])
        self.assertIn("[push] window_s must be a positive number", str(caught.exception))
        good = self.write("good.toml", f'[webhook]\nurl = "http://127.0.0.1:9/"\nsecret_file = "{self.secret}"\n')
        options = Options()
        options.parseOptions(["--push-config", good])
        self.assertEqual(options["push"].provider_names, frozenset({"webhook"}))
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options["push"])
