"""Logging: every Allspark module logs through :func:`logger`, whose level is
set once by ``--log_level``; Twisted's and Autobahn's own logs are untouched."""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "warning": LogLevel.warn, "error": LogLevel.error, "critical": LogLevel.critical}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def logger(namespace: str) -> Logger:
    """A :class:`~twisted.logger.Logger` for ``namespace`` that obeys the level."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Set the level of every Allspark logger: debug, info, warn, error, critical."""
    _predicate.setLogLevelForNamespace("", LEVELS[name])
