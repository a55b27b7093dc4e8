"""The JSON log format: one object per line with the event's fields; the
debug switch the hot paths check."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger
from twisted.trial import unittest

from allspark import logs


class JSONFormatTests(unittest.SynchronousTestCase):
    def emit(self) -> tuple[Logger, io.StringIO]:
        out = io.StringIO()
        return Logger(namespace="allspark.test", observer=logs.json_observer(out)), out

    def test_one_object_per_line_with_the_fields(self) -> None:
        log, out = self.emit()
        log.info("connected {node_id}\nfrom {client}", node_id="alice", client="203.0.113.7", code=1000,
                 big=2**70, thing=object(), applied=[1, 2], load={"connections": 3})
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        event = json.loads(lines[0])
        self.assertEqual(event["message"], "connected alice\nfrom 203.0.113.7")
        self.assertEqual((event["level"], event["namespace"]), ("info", "allspark.test"))
        self.assertEqual((event["node_id"], event["client"], event["code"]), ("alice", "203.0.113.7", 1000))
        self.assertEqual(event["big"], str(2**70))
        self.assertEqual((event["applied"], event["load"]), ([1, 2], {"connections": 3}))
        self.assertTrue(event["time"].endswith("Z"))
        self.assertFalse(any(name.startswith("log_") for name in event))

    def test_a_failure_carries_its_traceback(self) -> None:
        log, out = self.emit()
        try:
            raise ValueError("boom")
        except ValueError:
            log.failure("it broke")
        event = json.loads(out.getvalue())
        self.assertEqual(event["level"], "critical")
        self.assertIn("ValueError: boom", event["traceback"])


class LevelTests(unittest.SynchronousTestCase):
    def test_debug_enabled_follows_the_level(self) -> None:
        self.addCleanup(logs.set_level, "info")
        logs.set_level("debug")
        self.assertTrue(logs.debug_enabled())
        self.assertTrue(logs.DEBUG)  # what the per-frame paths read
        logs.set_level("info")
        self.assertFalse(logs.debug_enabled())
        self.assertFalse(logs.DEBUG)
