"""``--push-config=FILE``: the TOML file that turns push notifications on.

One ``[push]`` table of settings (all optional) and one table per provider
this server sends through (``[fcm]``, ``[apns]``, ``[webpush]``,
``[webhook]``), each built by its module's ``from_config(table, reactor)``
(imported only when its table is present).  A server with no provider table
schedules nothing.  Secrets are named by file (``*_file`` keys) or by an
environment variable (``*_env`` keys), never written in the file given on
the command line itself; :func:`read_secret` is the one way every provider
reads them.

Anything wrong (unreadable file, bad TOML, an unknown table or key, a value
of the wrong type or range, a secret file that cannot be read) raises
:class:`~allspark.push.provider.PushConfigError` with one line naming the
table and key; ``twistd allspark`` prints it and exits with status 1.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

from allspark.push.provider import Provider, PushConfigError

#: The provider tables a file may have, and the module whose
#: ``from_config`` builds each one.
PROVIDER_MODULES: dict[str, str] = {
    "fcm": "allspark.push.fcm",
    "apns": "allspark.push.apns",
    "webpush": "allspark.push.webpush",
    "webhook": "allspark.push.webhook",
}

#: What a push may say besides the unread count (``[push] content``).
CONTENT_LEVELS = ("count", "sender", "text", "payload")

#: The largest ``[push] max_payload_bytes``: with the rest of a push it stays
#: under every provider's 4 KB.
MAX_PAYLOAD_LIMIT = 2048


@dataclass(frozen=True)
class PushSettings:
    """The ``[push]`` table: when to push and how hard to try.

    Times are in seconds.  ``grace_s``: how long after a copy is stored for
    an offline node the push waits (an ack or a connection within it means
    no push).  ``window_s``: at most one push per device per window.
    ``timeout_s``: the bound on every provider request.  ``max_attempts``:
    sends of one push within one claim (retried after ``backoff_base_s``
    doubling up to ``backoff_cap_s``, with jitter, or the provider's
    ``Retry-After`` when it fits under the cap).  ``max_rounds``: claims of
    one push that may end without success (each re-dues it after a backoff
    in the store) before it is dropped.  ``breaker_failures`` consecutive
    failed requests to one provider open its circuit for
    ``breaker_cooldown_s`` (then one probe request decides).
    ``concurrency``: provider requests in flight at once.  ``poll_s``: how
    often the store is asked for due pushes (besides a local timer at each
    due time).  ``content``: ``count`` (the count only), ``sender`` (and
    the sender or session of the latest message), ``text`` (and its
    ``push_text`` when the message gave one; the default) or ``payload``
    (and the message's ``payload`` itself, JSON-encoded as the string
    ``data.payload``, when it encodes in at most ``max_payload_bytes``,
    default 1024, at most :data:`MAX_PAYLOAD_LIMIT`).
    """

    grace_s: float = 2.0
    window_s: float = 30.0
    timeout_s: float = 10.0
    max_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    max_rounds: int = 5
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    concurrency: int = 50
    poll_s: float = 1.0
    content: str = "text"
    max_payload_bytes: int = 1024

    @property
    def lease_s(self) -> float:
        """How long a claimed push is held: every attempt timing out, the
        longest waits between them, and a margin for the store reads."""
        return self.max_attempts * self.timeout_s + (self.max_attempts - 1) * self.backoff_cap_s + 5.0


@dataclass
class PushConfig:
    """A loaded ``--push-config``: the settings and the providers by name."""

    settings: PushSettings = field(default_factory=PushSettings)
    providers: dict[str, Provider] = field(default_factory=dict)

    @property
    def provider_names(self) -> frozenset[str]:
        """The providers this server can send through."""
        return frozenset(self.providers)


def load_push_config(path: str, reactor: Any) -> PushConfig:
    """Read and check ``path``, build its providers (secrets read now);
    :class:`PushConfigError` with one line saying what is wrong."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise PushConfigError(f"--push-config {path}: cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise PushConfigError(f"--push-config {path}: not valid TOML: {e}") from None
    return parse_push_config(document, reactor, where=path)


def parse_push_config(document: Mapping[str, Any], reactor: Any, where: str = "--push-config") -> PushConfig:
    """A :class:`PushConfig` from an already parsed TOML document."""
    unknown = sorted(set(document) - {"push"} - set(PROVIDER_MODULES))
    if unknown:
        raise PushConfigError(
            f"{where}: unknown table [{unknown[0]}] (tables: [push], "
            + ", ".join(f"[{name}]" for name in PROVIDER_MODULES) + ")")
    push_table = document.get("push", {})
    if not isinstance(push_table, Mapping):
        raise PushConfigError(f"{where}: [push] must be a table")
    settings = _settings(push_table, where)
    providers: dict[str, Provider] = {}
    for name, module_name in PROVIDER_MODULES.items():
        table = document.get(name)
        if table is None:
            continue
        if not isinstance(table, Mapping):
            raise PushConfigError(f"{where}: [{name}] must be a table")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise PushConfigError(f"{where}: [{name}]: this server has no {name} provider ({e})") from None
        try:
            providers[name] = module.from_config(table, reactor)
        except PushConfigError as e:
            raise PushConfigError(f"{where}: {e}") from None
    return PushConfig(settings, providers)


def _settings(table: Mapping[str, Any], where: str) -> PushSettings:
    """The ``[push]`` table checked key by key."""
    known = {f.name: f for f in fields(PushSettings)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        spec = known.get(key)
        if spec is None:
            raise PushConfigError(f"{where}: [push] has no key {key!r} (keys: {', '.join(known)})")
        if key == "content":
            if value not in CONTENT_LEVELS:
                raise PushConfigError(f"{where}: [push] content must be one of {', '.join(CONTENT_LEVELS)}")
        elif spec.type == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PushConfigError(f"{where}: [push] {key} must be a positive integer")
            if key == "max_payload_bytes" and value > MAX_PAYLOAD_LIMIT:
                raise PushConfigError(f"{where}: [push] max_payload_bytes must be at most {MAX_PAYLOAD_LIMIT} "
                                      "(a push stays under the providers' 4 KB)")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 10**7:
                raise PushConfigError(f"{where}: [push] {key} must be a positive number of seconds")
            value = float(value)
        values[key] = value
    settings = PushSettings(**values)
    if settings.backoff_cap_s < settings.backoff_base_s:
        raise PushConfigError(f"{where}: [push] backoff_cap_s must be at least backoff_base_s")
    return settings


def check_keys(table: Mapping[str, Any], table_name: str, known: Iterable[str]) -> None:
    """:class:`PushConfigError` naming the first key of ``table`` that is not
    in ``known`` (a misspelt key is refused, never ignored)."""
    known = sorted(known)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PushConfigError(f"[{table_name}] has no key {unknown[0]!r}: unknown (keys: {', '.join(known)})")


def read_secret(table: Mapping[str, Any], table_name: str, key: str,
                environ: Mapping[str, str] | None = None) -> bytes:
    """The secret a provider table names as ``<key>_file`` (a file's
    contents, surrounding whitespace removed) or ``<key>_env`` (an
    environment variable's value): exactly one of the two.
    :class:`PushConfigError` when neither or both are given, or the file or
    variable is missing or empty."""
    environ = os.environ if environ is None else environ
    file_key, env_key = f"{key}_file", f"{key}_env"
    path, variable = table.get(file_key), table.get(env_key)
    if (path is None) == (variable is None):
        raise PushConfigError(f"[{table_name}] needs exactly one of {file_key} or {env_key}")
    if path is not None:
        if not isinstance(path, str):
            raise PushConfigError(f"[{table_name}] {file_key} must be a path")
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise PushConfigError(f"[{table_name}] {file_key} {path}: cannot read it: "
                                  f"{e.strerror or e}") from None
        if not secret:
            raise PushConfigError(f"[{table_name}] {file_key} {path} is empty")
        return secret
    if not isinstance(variable, str):
        raise PushConfigError(f"[{table_name}] {env_key} must be the name of an environment variable")
    value = environ.get(variable, "").strip()
    if not value:
        raise PushConfigError(f"[{table_name}] {env_key}: the environment variable {variable} is not set")
    return value.encode()
