"""Which browser origins may use this server: CORS on the HTTP API and the
``Origin`` check of WebSocket handshakes, decided in one place.

An origin is allowed when it is this server's own (the ``Origin``'s host and
port are those of the request's ``Host`` header; the loopback names count as
one host) or one of the
``--allowed-origin`` values.  None are listed by default: same origin only.

- HTTP (:class:`allspark.web.JSONEndpoint`): an allowed origin gets
  ``Access-Control-Allow-Origin: <origin>``; every answer carries
  ``Vary: Origin``.  A preflight (``OPTIONS`` with ``Origin`` and
  ``Access-Control-Request-Method``) from an allowed origin is answered 204
  with the methods, the one header (``Content-Type``) and how long to cache
  it; from another origin it is refused 403 ``origin_not_allowed``.  A
  simple request from another origin is answered as usual, without CORS
  headers, so a browser does not let the page read it.
- WebSocket (:meth:`allspark.ws.ClientProtocol.onConnect`): a handshake
  whose ``Origin`` is not allowed is refused 403 ``origin_not_allowed``
  before any credential is looked at.  No ``Origin`` header (a non-browser
  client) is allowed.

Only ``Content-Type`` is allowed as a request header, so a browser can never
send an ``Authorization`` header across origins: browsers pass ``auth_key``
as an argument, as the protocol says.
"""

from __future__ import annotations

from typing import Iterable
from urllib.parse import urlsplit

#: The ports a browser leaves out of an ``Origin``.
DEFAULT_PORTS = {"http": 80, "https": 443}

#: Names of this machine: a page at http://localhost:8080 talking to
#: ws://127.0.0.1:8080 (the ws_url of a server at 127.0.0.1) is the same
#: server on the same port, so the same origin.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

#: Seconds a browser may cache a preflight's answer.
PREFLIGHT_MAX_AGE = 600

#: Request headers a cross-origin page may send (besides the CORS-safelisted ones).
ALLOWED_HEADERS = "Content-Type"


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """``value`` as ``(scheme, host, port)`` (lower case, the default port
    filled in), or None when it is not an ``http``/``https`` origin: a
    path, query, user name or fragment, ``null``, another scheme or an
    unparsable port all give None."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme]


def origin_text(origin: tuple[str, str, int]) -> str:
    """An origin as a browser writes it: ``scheme://host[:port]``, the
    default port left out."""
    scheme, host, port = origin
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if DEFAULT_PORTS[scheme] == port else f"{scheme}://{shown}:{port}"


def check_allowed_origin(value: str) -> str:
    """An ``--allowed-origin`` value in its canonical form, or ValueError
    saying what an origin looks like."""
    origin = parse_origin(value)
    if origin is None or value.strip().endswith("/"):
        raise ValueError(f"--allowed-origin {value!r} is not an origin: write scheme://host[:port], "
                         "e.g. https://app.example.com (http or https, no path)")
    return origin_text(origin)


def _host_and_port(host_header: str, default_port: int) -> tuple[str, int] | None:
    """A ``Host`` header as ``(host, port)``; without a port, ``default_port``."""
    try:
        parts = urlsplit("//" + host_header.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else default_port


class OriginPolicy:
    """The allowed origins (``--allowed-origin``) and the same-origin rule."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(o for o in (parse_origin(v) for v in allowed) if o is not None)

    def is_same_origin(self, origin: str, host_header: str | None) -> bool:
        """Whether ``origin`` names the server the request reached: its host
        and port are those of ``host_header`` (a ``Host`` without a port
        means the default port of the origin's scheme; ``localhost``,
        ``127.0.0.1`` and ``::1`` are one host)."""
        parsed = parse_origin(origin)
        if parsed is None or not host_header:
            return False
        scheme, host, port = parsed
        reached = _host_and_port(host_header, DEFAULT_PORTS[scheme])
        if reached is None or reached[1] != port:
            return False
        return reached[0] == host or (reached[0] in LOOPBACK_HOSTS and host in LOOPBACK_HOSTS)

    def allows(self, origin: str, host_header: str | None) -> bool:
        """Whether a page from ``origin`` may use this server: its own
        origin, or one of the allowed ones."""
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        return parsed in self.allowed or self.is_same_origin(origin, host_header)
