"""Logging: every Allspark module logs through :func:`logger`, whose level is
set once by ``--log_level``; Twisted's and Autobahn's own logs are untouched.

``--log-format=json`` writes every event (Allspark's, Twisted's, the access
log) as one JSON object per line: ``time``, ``level``, ``namespace``,
``message`` (the text the default format shows) and the event's own
structured fields (``node_id``, ``client``, ``code``, ...); a failure adds
its ``traceback``.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import IO, Any

import orjson
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.logfile import LogFile

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "warning": LogLevel.warn, "error": LogLevel.error, "critical": LogLevel.critical}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def logger(namespace: str) -> Logger:
    """A :class:`~twisted.logger.Logger` for ``namespace`` that obeys the level."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Set the level of every Allspark logger: debug, info, warn, error, critical."""
    global DEBUG
    _predicate.setLogLevelForNamespace("", LEVELS[name])
    DEBUG = LEVELS[name] <= LogLevel.debug


#: Whether debug events are kept (set by :func:`set_level`).  Per-frame hot
#: paths read it as ``logs.DEBUG`` (an attribute, not a call) before they build
#: a debug event at all.
DEBUG = False


def debug_enabled() -> bool:
    """Whether debug events are kept (:data:`DEBUG`)."""
    return DEBUG


FORMATS = ("text", "json")

#: Keys of Twisted's legacy (``twisted.python.log``) events that are
#: bookkeeping, not fields.
_LEGACY_KEYS = frozenset(("message", "isError", "system", "time", "format", "why", "failure", "printed"))


def event_as_json(event: LogEvent) -> str:
    """``event`` as one line of JSON (see the module docstring)."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0.0, timezone.utc)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for name, value in event.items():
        if name.startswith("log_") or name in _LEGACY_KEYS or name in record:
            continue
        record[name] = _json_value(value)
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return orjson.dumps(record).decode() + "\n"


def _json_value(value: Any, depth: int = 0) -> Any:
    """``value`` as it goes into a JSON log line: JSON scalars, lists and
    objects as they are (integers beyond 64 bits as text), anything else as
    its text."""
    if value is None or isinstance(value, (str, float, bool)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if depth < 8 and isinstance(value, (list, tuple)):
        return [_json_value(item, depth + 1) for item in value]
    if depth < 8 and isinstance(value, dict) and all(isinstance(name, str) for name in value):
        return {name: _json_value(item, depth + 1) for name, item in value.items()}
    return str(value)


def json_observer(out: IO[Any]) -> ILogObserver:
    """An observer that writes every event to ``out`` with :func:`event_as_json`."""
    return FileLogObserver(out, event_as_json)


def twistd_log_file(twistd_options: Any) -> IO[Any]:
    """Where twistd would write its log: ``--logfile`` (``-`` is stdout), else
    stdout in the foreground (``-n``) and ``twistd.log`` when daemonized."""
    get = getattr(twistd_options, "get", None)
    path = get("logfile") if get else None
    if path == "-" or (not path and (get is None or get("nodaemon"))):
        return sys.stdout
    return LogFile.fromFullPath(path or "twistd.log")
