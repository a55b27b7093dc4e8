"""Identifiers used on the wire: node ids, client ids, session ids, aliases.

Every id in the Allspark protocol is a string of 1-128 characters drawn from
``[A-Za-z0-9_.:@-]``.  This module is the single place that rule is written down.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["ID_MAX_LENGTH", "ID_PATTERN", "is_valid_id", "new_id"]

#: Longest id accepted anywhere in the protocol.
ID_MAX_LENGTH = 128

#: A whole valid id (anchored at both ends; ``\Z`` so a trailing newline does not match).
ID_PATTERN: re.Pattern[str] = re.compile(r"\A[A-Za-z0-9_.:@-]{1,128}\Z")

# Random part of new_id: 16 bytes (128 bits) as url-safe base64, 22 chars of [A-Za-z0-9_-].
_RANDOM_BYTES = 16


def is_valid_id(value: object) -> bool:
    """Return True only if ``value`` is a ``str`` matching :data:`ID_PATTERN`.

    Anything that is not a ``str`` (None, bytes, numbers, lists, ...) is invalid.
    """
    return isinstance(value, str) and ID_PATTERN.match(value) is not None


def new_id(prefix: str = "") -> str:
    """Return a fresh random id, ``prefix`` followed by 128 random bits, url-safe.

    The result always satisfies :func:`is_valid_id`.  ``prefix`` must itself use
    only id characters and leave room for the random part, else ``ValueError``.
    """
    if not isinstance(prefix, str):
        raise TypeError("prefix must be a str")
    if prefix and not is_valid_id(prefix):
        raise ValueError(f"invalid id prefix: {prefix!r}")
    token = secrets.token_urlsafe(_RANDOM_BYTES)
    result = prefix + token
    if len(result) > ID_MAX_LENGTH:
        raise ValueError("id prefix too long")
    return result
