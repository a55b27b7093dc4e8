"""Prometheus metrics: what ``GET /metrics`` answers.

Cost is what shapes this module.  The hot paths (a frame in, a frame out, a
stored copy, an ack, a store batch) only add to plain numbers their own
objects own: int attributes and plain dicts (:class:`FrameCounts` of the
client socket factory, ``Inbox.copies_*``, ``Mesh.peer_*``; a
:class:`collections.Counter` costs about 200 ns more per addition, so it is
kept for rare events) and :class:`Distribution` histograms (inbox depth at
sync, store batch sizes and seconds).  Nothing there takes a lock or calls
into ``prometheus_client``.  Everything else is read when Prometheus scrapes:
:class:`ServerCollector` turns those numbers and the state the server keeps
anyway (the registry's size, the peer links, the push dispatcher's
``stats``) into metric families, in a :class:`~prometheus_client.CollectorRegistry`
of this server's own (never the global one, so servers built in one process,
as tests do, never share a metric).

Every name starts with ``allspark_``; labels are bounded sets (frame kinds,
error codes, outcomes), never node ids.  ``docs/operations.md`` lists them
with the panels an operator watches.

prometheus_client's Twisted resource runs the exposition in the reactor's
thread pool, so the collector only reads: it copies each counter with one
``dict()`` (atomic under the GIL) before walking it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from allspark.server import Server

__all__ = [
    "BATCH_SECONDS_BUCKETS", "BATCH_SIZE_BUCKETS", "DEPTH_BUCKETS", "Distribution", "FrameCounts",
    "MetricsPort", "ServerCollector", "metrics_registry", "frame_kind",
]

#: Inbox depths (messages a node had waiting when it synced).
DEPTH_BUCKETS = (0, 1, 5, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000, 100_000)
#: Operations per store batch (one transaction each).
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
#: Seconds a store batch took (SQLite: on the reactor thread; PostgreSQL:
#: from its hand-off to the pool until its results are back).
BATCH_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: The kinds of frames a server writes to clients, by what :func:`frame_kind`
#: reads from their first bytes; anything else is counted as ``other``.
OUT_KINDS = frozenset((
    "accepted", "acked", "error", "hello", "pong", "synced", "sync_done", "reconnect", "session",
    "member", "left", "revealed", "master", "sessions", "presence", "presence_changed",
    "member_joined", "member_left", "member_revealed", "master_changed",
))


class Distribution:
    """A histogram kept as plain numbers: :meth:`observe` is a bisect and
    two additions (no lock); the collector exports it at scrape time.

    ``bounds`` are the upper bounds of the buckets (inclusive, as
    Prometheus's ``le``); values over the last go to ``+Inf``."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """This histogram as a Prometheus metric family (cumulative buckets)."""
        counts, total = list(self.counts), self.sum
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, counts):
            running += count
            buckets.append((_le(bound), running))
        running += counts[-1]
        buckets.append(("+Inf", running))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


class FrameCounts:
    """What the client sockets count (one object per socket factory, so
    per server): frames in and out by kind, error frames by code, handshake
    refusals by code, and policy closes by close code (1008 over the rate
    limit, 4008 send queue overflow, 4009 replaced).

    The per-frame numbers are an int (messages in, copies out) and plain
    dicts the socket adds to with ``d[k] += 1`` (a ``KeyError`` the first
    time: zero-cost ``try`` otherwise); rare events use :class:`Counter`."""

    __slots__ = ("messages_in", "frames_in", "copies_out", "frames_out", "errors", "refused_handshakes",
                 "closes")

    def __init__(self) -> None:
        #: message frames received
        self.messages_in = 0
        #: other frames received: a control op name, ``bad`` (not a valid
        #: frame) or ``over_rate`` (refused by the rate limit before being read);
        #: the last two are there from the start (the socket adds to them as is)
        self.frames_in: dict[str, int] = {"bad": 0, "over_rate": 0}
        #: message copies written (live or by sync)
        self.copies_out = 0
        #: op frames written, keyed by :func:`out_key` (named at scrape time)
        self.frames_out: dict[bytes, int] = {}
        self.errors: Counter[str] = Counter()
        self.refused_handshakes: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()

    def in_kinds(self) -> dict[str, int]:
        """Frames received by kind: ``message``, an op, ``bad``, ``over_rate``."""
        kinds = dict(self.frames_in)
        kinds["message"] = self.messages_in
        return kinds

    def out_kinds(self) -> dict[str, int]:
        """Frames written to clients by kind: ``message`` (a delivered copy,
        live or by sync), an op name of :data:`OUT_KINDS`, or ``other``."""
        kinds: dict[str, int] = {"message": self.copies_out}
        for key, count in dict(self.frames_out).items():
            kind = frame_kind(key)
            kinds[kind] = kinds.get(kind, 0) + count
        return kinds


def out_key(frame: bytes) -> bytes | None:
    """What the socket counts ``frame`` under: for an op frame
    (``{"op":"<name>"...``, the op first, as the server writes them) the 9
    bytes after ``{"op":"`` (enough to tell every op apart); None for a
    message copy (its first field is ``seq``, ``dest_id``, ``session_seq``).
    ``ClientProtocol.send`` inlines the same test; this is its reference."""
    if len(frame) > 2 and frame[2] == 111:  # b"o"
        return frame[7:16]
    return None


def _kind_of_prefix(prefix: str) -> str:
    """The op of :data:`OUT_KINDS` a 9-byte key names: the whole op when it
    is shorter (the key then holds its closing quote), else the one op that
    starts with it."""
    name = prefix.partition('"')[0]
    if name in OUT_KINDS and (len(name) < len(prefix) or len(name) == 9):
        return name
    if len(name) == 9:
        longer = [kind for kind in OUT_KINDS if kind.startswith(name)]
        if len(longer) == 1:
            return longer[0]
    return "other"


def frame_kind(key: bytes | None) -> str:
    """The ``kind`` label of what :func:`out_key` returned."""
    if key is None:
        return "message"
    try:
        return _kind_of_prefix(key.decode())
    except UnicodeDecodeError:
        return "other"


#: Error codes that are refusals of load: the rate limit and the quotas.
REFUSAL_CODES = ("rate_limited", "inbox_full", "session_full")


class ServerCollector(Collector):
    """Reads one server's numbers at scrape time (see the module docstring).

    ``frames``: the client socket factory's :class:`FrameCounts`.
    ``push_stats``: returns the push dispatcher's ``stats`` (a Counter keyed
    ``(provider, outcome)``), or None while push is not configured."""

    def __init__(self, server: "Server", frames: FrameCounts,
                 push_stats: Callable[[], Mapping[tuple[str, str], int] | None] | None = None) -> None:
        self.server = server
        self.frames = frames
        self.push_stats = push_stats

    def collect(self) -> Iterator[Any]:
        server = self.server
        yield from self._connections(server)
        yield from self._frames()
        yield from self._messages(server)
        yield from self._store(server)
        yield from self._mesh(server)
        yield from self._push()

    def _connections(self, server: "Server") -> Iterable[Any]:
        yield GaugeMetricFamily("allspark_connections", "client WebSocket connections open on this server",
                                value=len(server.registry))
        yield GaugeMetricFamily("allspark_connected_nodes", "distinct nodes connected to this server",
                                value=server.registry.node_count())
        state = "draining" if server.draining else "starting" if server.starting else "live"
        states = GaugeMetricFamily("allspark_server_state", "1 for this server's state", labels=["state"])
        for name in ("starting", "live", "draining"):
            states.add_metric([name], 1 if name == state else 0)
        yield states

    def _frames(self) -> Iterable[Any]:
        counts = self.frames
        frames_in = CounterMetricFamily("allspark_frames_in", "frames received from clients, by kind "
                                        "(message, a control op, bad, over_rate)", labels=["kind"])
        for kind, count in sorted(counts.in_kinds().items()):
            frames_in.add_metric([kind], count)
        yield frames_in
        frames_out = CounterMetricFamily("allspark_frames_out", "frames written to clients, by kind "
                                         "(message: a delivered copy, live or by sync; else the op)",
                                         labels=["kind"])
        out = counts.out_kinds()
        for kind, count in sorted(out.items()):
            frames_out.add_metric([kind], count)
        yield frames_out
        yield CounterMetricFamily("allspark_sync_pages", "synced frames written (a sync page, or one part "
                                  "of a full sync)", value=out.get("synced", 0))
        errors = dict(counts.errors)
        by_code = CounterMetricFamily("allspark_errors", "error frames sent to clients, by code",
                                      labels=["code"])
        for code, count in sorted(errors.items()):
            by_code.add_metric([code], count)
        yield by_code
        refusals = CounterMetricFamily("allspark_refusals", "load refused: frames over the rate limit, "
                                       "messages over a quota, handshakes over --max-connections",
                                       labels=["reason"])
        for code in REFUSAL_CODES:
            refusals.add_metric([code], errors.get(code, 0))
        refusals.add_metric(["too_many_connections"], counts.refused_handshakes.get("too_many_connections", 0))
        yield refusals
        handshakes = CounterMetricFamily("allspark_handshakes_refused", "WebSocket handshakes refused, "
                                         "by error code", labels=["code"])
        for code, count in sorted(dict(counts.refused_handshakes).items()):
            handshakes.add_metric([code], count)
        yield handshakes
        closes = dict(counts.closes)
        yield CounterMetricFamily("allspark_send_queue_overflows", "client connections closed with 4008: "
                                  "their send queue overflowed (--max-queue-bytes)", value=closes.get(4008, 0))
        policy = CounterMetricFamily("allspark_policy_closes", "client connections the server closed, by "
                                     "close code (1008 rate limit, 4008 send queue overflow, 4009 replaced)",
                                     labels=["code"])
        for close_code in (1008, 4008, 4009):
            policy.add_metric([str(close_code)], closes.get(close_code, 0))
        yield policy

    def _messages(self, server: "Server") -> Iterable[Any]:
        inbox = server.inbox
        out = self.frames.out_kinds()
        messages = CounterMetricFamily(
            "allspark_messages", "messages: accepted (answers to senders), stored (inbox copies), "
            "delivered_live (stored copies written to a live connection when stored), "
            "acked (inbox copies removed by acks), session_stored (session broadcasts stored as "
            "one stream row each)", labels=["stage"])
        messages.add_metric(["accepted"], out.get("accepted", 0))
        messages.add_metric(["stored"], inbox.copies_stored)
        messages.add_metric(["delivered_live"], inbox.copies_live)
        messages.add_metric(["acked"], inbox.copies_acked)
        messages.add_metric(["session_stored"], getattr(server.sessions, "rows_stored", 0))
        yield messages
        yield inbox.depths.family("allspark_inbox_depth", "messages a node's inbox held for it when it "
                                  "synced (one observation per full sync)")

    def _store(self, server: "Server") -> Iterable[Any]:
        sizes = getattr(server.store, "batch_sizes", None)
        seconds = getattr(server.store, "batch_seconds", None)
        if isinstance(sizes, Distribution):
            yield sizes.family("allspark_store_batch_size", "operations per store batch (one transaction)")
        if isinstance(seconds, Distribution):
            yield seconds.family("allspark_store_batch_seconds", "seconds one store batch took")

    def _mesh(self, server: "Server") -> Iterable[Any]:
        mesh = server.mesh
        if mesh is None:
            return
        yield GaugeMetricFamily("allspark_peer_links", "peer links to other servers that are up",
                                value=len(mesh.links))
        frames = CounterMetricFamily("allspark_peer_frames", "WebSocket messages on peer links, by direction",
                                     labels=["direction"])
        frames.add_metric(["in"], mesh.peer_frames_in)
        frames.add_metric(["out"], mesh.peer_frames_out)
        yield frames
        yield CounterMetricFamily("allspark_peer_queue_overflows", "peer links closed with 4008 (their send "
                                  "queue overflowed)", value=mesh.peer_overflows)

    def _push(self) -> Iterable[Any]:
        stats = self.push_stats() if self.push_stats is not None else None
        if stats is None:
            return
        outcomes = CounterMetricFamily("allspark_push_notifications", "push notifications by provider and "
                                       "outcome", labels=["provider", "outcome"])
        for key, count in sorted(dict(stats).items()):
            provider, outcome = key
            outcomes.add_metric([str(provider), str(getattr(outcome, "value", outcome))], count)
        yield outcomes


def metrics_registry(collector: Collector) -> CollectorRegistry:
    """A registry of this server's own holding ``collector`` (and nothing
    from the process-wide default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def metrics_resource(registry: CollectorRegistry) -> Any:
    """The ``/metrics`` resource: prometheus_client's Twisted resource over
    ``registry`` (the text exposition format, gzip when asked)."""
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(registry)


class MetricsPort(Service):
    """``--metrics-port``: ``/metrics`` on a listener of its own, on
    127.0.0.1 only.  A child of the server's service, so it listens after
    the store is open and before the client ports, and a port in use
    refuses the start with one line, as a client port does."""

    def __init__(self, reactor: Any, port: int, resource: Any) -> None:
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()
        root.putChild(b"metrics", resource)
        self.site = Site(root)
        self.site.noisy = False
        self.reactor = reactor
        self.port_number = port
        self.listening: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet.error import CannotListenError

        from allspark.server import StartFailed

        try:
            self.listening = self.reactor.listenTCP(self.port_number, self.site, interface="127.0.0.1")
        except CannotListenError as e:
            raise StartFailed(f"cannot listen on --metrics-port {self.port_number}: {e.socketError}") from e

    def stopService(self) -> Any:
        super().stopService()
        listening, self.listening = self.listening, None
        return listening.stopListening() if listening is not None else None
