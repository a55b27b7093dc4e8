"""The demo chat page, served at ``/demo/`` only when the server runs with
``--demo`` (never in production: anyone can sign in as anyone).

- ``GET /demo/``: ``index.html``; ``/demo/app.js`` and ``/demo/style.css``:
  the page (plain HTML, CSS and an ES module, no build step), files of this
  package.
- ``GET /demo/allspark.js``: the JavaScript client, ``clients/js/allspark.js``
  (in a checkout ``allspark/demo/allspark.js`` is a symbolic link to it; an
  installed package holds a copy of the file, as setuptools follows links).
- ``POST /demo/key`` with ``{"name": N, "device": D}``: an auth key signed
  with the server's own auth secret for node ``N@D`` of client ``N``
  (``N`` and ``D``: 1-32 of ``[A-Za-z0-9_-]``; the page keeps ``D`` per
  browser and name, so a reopened tab is the same device and syncs what it
  missed).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from twisted.web import resource, server
from twisted.web.iweb import IRequest

from allspark.auth import mint_auth_key
from allspark.logs import logger
from allspark.web import HTTPError, JSONEndpoint, NotFound, write_json

log = logger(__name__)

#: Where the page's files are (this package's directory).
HERE = Path(__file__).resolve().parent

#: The files served, by name under /demo/, with their content types.
FILES: dict[bytes, tuple[str, bytes]] = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"index.html": ("index.html", b"text/html; charset=utf-8"),
    b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"style.css": ("style.css", b"text/css; charset=utf-8"),
    b"allspark.js": ("allspark.js", b"text/javascript; charset=utf-8"),
}

#: What a demo name and a device id may hold.
NAME_RULE = re.compile(r"[A-Za-z0-9_-]{1,32}")

#: Seconds a demo auth key lives.
KEY_TTL = 12 * 3600

#: The page's rules for the browser: its own scripts and styles only; it may
#: open WebSockets to any server of the cluster.
CONTENT_SECURITY_POLICY = (b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                           b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class StaticFile(resource.Resource):
    """One file of the page, read at each request (so an edited page shows
    on reload), answered with its content type; a missing file is a JSON 404
    that names it."""

    isLeaf = True

    def __init__(self, path: Path, content_type: bytes) -> None:
        super().__init__()
        self.path = path
        self.content_type = content_type

    def render(self, request: IRequest) -> Any:
        if request.postpath and request.postpath != [b""]:
            return NotFound().render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            write_json(request, 405, {"error": "method_not_allowed", "message": "use GET, HEAD"})
            return server.NOT_DONE_YET
        try:
            data = self.path.read_bytes()
        except OSError as e:
            log.warn("demo file {path} cannot be read: {error}", path=str(self.path), error=e.strerror)
            write_json(request, 404, {"error": "not_found",
                                      "message": f"the demo file {self.path.name} is missing from this installation"})
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"content-length", str(len(data)).encode())
        return b"" if request.method == b"HEAD" else data


class Demo(resource.Resource):
    """``/demo``: redirects to ``/demo/``; its children are :data:`FILES`
    and ``key``; anything else is a JSON 404."""

    def __init__(self, auth_secret: bytes, clock: Any = None) -> None:
        super().__init__()
        self.auth_secret = auth_secret
        self.clock = clock
        for name, (filename, content_type) in FILES.items():
            self.putChild(name, StaticFile(HERE / filename, content_type))
        self.putChild(b"key", JSONEndpoint(self.mint_key, (b"POST",)))

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        return NotFound()

    def render(self, request: IRequest) -> Any:
        request.setResponseCode(302)
        request.setHeader(b"location", b"/demo/")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"see /demo/\n"

    def mint_key(self, request: IRequest, args: dict[str, Any]) -> dict[str, Any]:
        """``POST /demo/key``: an auth key for the demo user ``name`` on the
        device ``device`` (node ``name@device``, client ``name``)."""
        name, device = args.get("name"), args.get("device")
        for field, value in (("name", name), ("device", device)):
            if not isinstance(value, str) or not NAME_RULE.fullmatch(value):
                raise HTTPError(400, "bad_request", f"{field} must be 1-32 letters, digits, '_' or '-'")
        assert isinstance(name, str) and isinstance(device, str)
        node_id = f"{name}@{device}"
        now = self.clock.seconds() if self.clock is not None else time.time()
        key = mint_auth_key(self.auth_secret, node_id, name, ttl=KEY_TTL, now=now)
        log.info("demo key minted for {node_id}", node_id=node_id)
        return {"auth_key": key, "node_id": node_id, "client_id": name, "expires_in": KEY_TTL}


def demo_resource(auth_secret: bytes, clock: Any = None) -> Demo:
    """The ``/demo`` resource, minting keys with ``auth_secret``; logs the
    warning that anyone can now sign in as anyone."""
    log.warn("--demo is on: the demo page is served at /demo/ and ANYONE who can reach this server can "
             "mint an auth key for any name with POST /demo/key. Never run --demo in production.")
    return Demo(auth_secret, clock)
