"""Local stand-ins for push services: a recording HTTP/1.1 server on
127.0.0.1 whose answers a test scripts.

    server = RecordingServer()
    server.start()                                   # listens on a free port
    server.answer(Answer(429, headers={"Retry-After": "7"}), path="/send")
    server.default = Answer(200, {"name": "ok"})     # when nothing is scripted
    ... the code under test POSTs to server.url + "/send" ...
    server.requests[0].json()                        # what it received
    yield server.stop()                              # closes every connection

An answer is an :class:`Answer` or a function of the :class:`Recorded`
request returning one.  ``Answer(hang=True)`` never answers: the request
stays open until the client gives up, and :attr:`RecordingServer.lost`
records it when the client closes the connection.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in received it (header names lower-case,
    the last value of each)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Answer:
    """What the stand-in answers: ``body`` bytes, or anything else as JSON."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    stall_body: bool = False
    """Send the status, the headers and part of ``body``, then nothing more."""


Script = Union[Answer, Callable[[Recorded], Answer]]


class _Channel(http.HTTPChannel):
    """Tells the stand-in which connections are open."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.standin.channels.add(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        standin = self.site.standin
        standin.channels.discard(self)
        for waiter in standin.closed_waiters.pop(self, []):
            waiter.callback(None)


class _Recorder(Resource):
    isLeaf = True

    def __init__(self, standin: "RecordingServer") -> None:
        super().__init__()
        self.standin = standin

    def render(self, request: server.Request) -> Any:
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        assert request.content is not None
        recorded = Recorded(request.method.decode(), request.uri.decode("latin-1"), headers,
                            request.content.read())
        self.standin.requests.append(recorded)
        answer = self.standin.next_answer(recorded)
        if answer.hang:
            self.standin.hung.append(recorded)
            request.notifyFinish().addErrback(lambda _: self.standin.lost.append(recorded))
            return server.NOT_DONE_YET
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        body = answer.body
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            if "content-type" not in {n.lower() for n in answer.headers}:
                request.setHeader("Content-Type", "application/json; charset=UTF-8")
        if answer.stall_body:
            self.standin.hung.append(recorded)
            request.notifyFinish().addErrback(lambda _: self.standin.lost.append(recorded))
            request.setHeader("Content-Length", str(len(body) + 1000))
            request.write(body[: len(body) // 2])
            return server.NOT_DONE_YET
        return body


class RecordingServer:
    """A twisted.web HTTP/1.1 server on 127.0.0.1 that records requests
    (:attr:`requests`) and answers what the test scripted: first the
    answers queued for the request's path, then those queued for any path,
    then :attr:`defaults` for the path, then :attr:`default`."""

    def __init__(self, reactor: Any = None) -> None:
        self.reactor = reactor or global_reactor
        self.requests: list[Recorded] = []
        self.hung: list[Recorded] = []
        self.lost: list[Recorded] = []
        self.default: Script = Answer(200, b"")
        self.defaults: dict[str, Script] = {}
        self._queued: dict[str | None, deque[Script]] = {}
        self.channels: set[_Channel] = set()
        self.closed_waiters: dict[_Channel, list[Deferred[None]]] = {}
        self.port: Any = None

    def start(self, port: int = 0) -> "RecordingServer":
        """Listen on 127.0.0.1:``port`` (0: a free port)."""
        site = server.Site(_Recorder(self))
        site.protocol = _Channel  # type: ignore[assignment]
        site.standin = self  # type: ignore[attr-defined]
        site.noisy = False
        self.port = self.reactor.listenTCP(port, site, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``"""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def origin(self) -> str:
        return self.url

    def answer(self, *answers: Script, path: str | None = None) -> None:
        """Queue answers for the next requests to ``path`` (any path: None)."""
        self._queued.setdefault(path, deque()).extend(answers)

    def next_answer(self, request: Recorded) -> Answer:
        path = request.path.split("?", 1)[0]
        script: Script
        if self._queued.get(path):
            script = self._queued[path].popleft()
        elif self._queued.get(None):
            script = self._queued[None].popleft()
        else:
            script = self.defaults.get(path, self.default)
        return script(request) if callable(script) else script

    def requests_to(self, path: str) -> list[Recorded]:
        """The requests made to ``path``, in order."""
        return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def stop(self) -> Deferred[Any]:
        """Stop listening and close every connection; fires when all are closed."""
        waits: list[Deferred[Any]] = []
        if self.port is not None:
            stopped = self.port.stopListening()
            waits.append(stopped if isinstance(stopped, Deferred) else succeed(None))
            self.port = None
        for channel in list(self.channels):
            closed: Deferred[None] = Deferred()
            self.closed_waiters.setdefault(channel, []).append(closed)
            waits.append(closed)
            assert channel.transport is not None
            channel.transport.abortConnection()  # type: ignore[attr-defined]
        return DeferredList(waits)


def main() -> None:
    """``python -m tests.push.standins [--port N]``: one stand-in for FCM
    (``POST /token`` gives an access token, ``POST /v1/projects/<id>/messages:send``
    answers 200) and Web Push (any other POST answers 201), printing each
    request it records, for trying a server with ``--push-config`` by hand."""
    import argparse
    import itertools
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=9099)
    port = parser.parse_args().port
    counter = itertools.count(1)

    def answer(request: Recorded) -> Answer:
        print(request.method, request.path, {k: v for k, v in request.headers.items()
                                              if k in ("authorization", "ttl", "topic", "urgency")},
              f"{len(request.body)} bytes", flush=True)
        if request.path == "/token":
            return Answer(200, {"access_token": f"stand-in-token-{next(counter)}",
                                "expires_in": 3599, "token_type": "Bearer"})
        if request.path.endswith("/messages:send"):
            return Answer(200, {"name": f"projects/stand-in/messages/{next(counter)}"})
        return Answer(201)

    standin = RecordingServer()
    standin.default = answer
    standin.start(port)
    print(f"push stand-in on {standin.url}", file=sys.stderr, flush=True)
    standin.reactor.run()


if __name__ == "__main__":
    main()
