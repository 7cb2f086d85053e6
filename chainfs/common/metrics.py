"""Prometheus metrics of one process, served over HTTP on its event loop.

Every chainfs process (mgmtd, meta, storage, the mount) keeps its metrics in
one registry, :data:`REGISTRY`, and serves it at ``/metrics`` with
:func:`serve_metrics`. Counters and histograms are module-level objects made
with :func:`counter` / :func:`histogram` by the module that counts; state that
already lives in a service (target states, queue lengths, resync progress) is
read when scraped, by a collector registered with :func:`add_collector`.

The HTTP server runs on the process's own asyncio loop, so collectors read the
service's state from the thread that changes it (no locks, no torn reads).
:func:`scrape` is the matching client (``chainfs admin top``, mgmtd's status
page sampler). The metric names are listed in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from chainfs.common.errors import Code

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

CollectFn = Callable[[], Iterable[Metric]]

# Request latencies: 50 us (a cached read) to 10 s (a forward timing out).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# (op, error code) pairs whose error counter child is kept (the rest are looked up).
_MAX_ERROR_CHILDREN_KEPT = 4096

# Bounds of the HTTP server and client (a scrape is a few KiB to a few 100 KiB).
MAX_REQUEST_HEAD_BYTES = 8 * 1024  # request line + headers a client may send
REQUEST_READ_TIMEOUT_S = 5.0  # a client that sends no full request head by then is dropped
MAX_SCRAPE_BYTES = 16 * 1024 * 1024  # largest /metrics answer scrape() accepts


def _find(name: str) -> object | None:
    # The registry keys collectors by every name they expose (name, name_total...).
    return REGISTRY._names_to_collectors.get(name)


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """A counter in :data:`REGISTRY` (the one made before, if ``name`` exists)."""
    found = _find(name + "_total") or _find(name)
    if isinstance(found, Counter):
        return found
    return Counter(name, doc, list(labels), registry=REGISTRY)


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    found = _find(name)
    if isinstance(found, Gauge):
        return found
    return Gauge(name, doc, list(labels), registry=REGISTRY)


def histogram(
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = LATENCY_BUCKETS_S,
) -> Histogram:
    found = _find(name + "_bucket")
    if isinstance(found, Histogram):
        return found
    return Histogram(name, doc, list(labels), buckets=list(buckets), registry=REGISTRY)


class _FunctionCollector(Collector):
    def __init__(self, fn: CollectFn) -> None:
        self.fn = fn

    def collect(self) -> Iterator[Metric]:
        yield from self.fn()

    def describe(self) -> list[Metric]:
        return []  # names known only when collected: never clash-checked at register


def add_collector(fn: CollectFn) -> Callable[[], None]:
    """Call ``fn`` at every scrape for metric families read from live state;
    returns the function that unregisters it (a service that stops calls it)."""
    collector = _FunctionCollector(fn)
    REGISTRY.register(collector)
    return lambda: REGISTRY.unregister(collector)


def code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return str(code)


class RequestMetrics:
    """Latency, errors and concurrency of one service's requests, by op:
    ``{prefix}_seconds`` (a histogram; its ``_count`` is the ops served),
    ``{prefix}_errors_total{op,code}`` and ``{prefix}s_in_flight{op}``."""

    def __init__(self, prefix: str, what: str) -> None:
        self.seconds = histogram(f"{prefix}_seconds", f"{what} latency", ["op"])
        self.errors = counter(f"{prefix}_errors", f"{what}s answered with an error", ["op", "code"])
        self.in_flight = gauge(f"{prefix}s_in_flight", f"{what}s being served now", ["op"])
        # op -> (its in-flight gauge, its histogram): labels() costs a lock and
        # a few lookups, paid once per op instead of twice per request.
        self._children: dict[str, tuple[Any, Any]] = {}
        self._error_children: dict[tuple[str, int], Any] = {}

    def error(self, op: str, code: int) -> None:
        # Errors are common answers too (a lookup of an absent name): the child
        # is kept per (op, code) like the others, the code's name looked up once.
        child = self._error_children.get((op, code))
        if child is None:
            child = self.errors.labels(op, code_name(code))
            if len(self._error_children) < _MAX_ERROR_CHILDREN_KEPT:
                self._error_children[op, code] = child
        child.inc()

    def _op(self, op: str) -> tuple[Any, Any]:
        children = self._children.get(op)
        if children is None:
            children = self._children[op] = (self.in_flight.labels(op), self.seconds.labels(op))
        return children

    def record(self, op: str, seconds: float) -> None:
        """One ``op`` that succeeded and took ``seconds`` (timed by the caller)."""
        self._op(op)[1].observe(seconds)

    def observe(self, op: str) -> RequestTimer:
        """Time the ``with`` block as one ``op``; an exception leaving it counts
        as an error, by its chainfs code or errno (INTERNAL for anything else)."""
        return RequestTimer(self, op, self._op(op))


class RequestTimer:
    """The context manager of :meth:`RequestMetrics.observe`, made once per
    request of every service: a plain class costs ~0.4 us on top of the metric
    updates, a ``contextlib.contextmanager`` generator ~1.4 us."""

    __slots__ = ("_children", "_metrics", "_op", "_start")

    def __init__(self, metrics: RequestMetrics, op: str, children: tuple[Any, Any]) -> None:
        self._metrics = metrics
        self._op = op
        self._children = children
        self._start = 0.0

    def __enter__(self) -> None:
        self._children[0].inc()
        self._start = time.perf_counter()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        in_flight, seconds = self._children
        if exc is not None and isinstance(exc, Exception):
            code = getattr(exc, "code", None) or getattr(exc, "errno", None) or Code.INTERNAL
            self._metrics.error(self._op, code)
        in_flight.dec()
        seconds.observe(time.perf_counter() - self._start)


# ---- HTTP server -----------------------------------------------------------------


@dataclass
class HttpReply:
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    status: int = 200


Route = Callable[[], HttpReply]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[500] = "Internal Server Error"


def metrics_reply() -> HttpReply:
    return HttpReply(generate_latest(REGISTRY), CONTENT_TYPE_LATEST)


@dataclass
class HttpServer:
    """A read-only HTTP/1.1 server (GET and HEAD, one request per connection)
    on the running loop; ``routes`` maps a path to what answers it."""

    routes: dict[str, Route]
    host: str
    port: int
    address: str = ""
    _server: asyncio.Server | None = field(default=None, repr=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_REQUEST_HEAD_BYTES
        )
        bound = self._server.sockets[0].getsockname()
        self.address = f"{self.host}:{bound[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                reply, method = self._answer(head)
            except asyncio.LimitOverrunError:
                reply, method = HttpReply(b"request head too large\n", status=400), "GET"
            writer.write(_encode(reply, with_body=method != "HEAD"))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that went away or stalled gets nothing
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[HttpReply, str]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return HttpReply(b"bad request line\n", status=400), "GET"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return HttpReply(b"read-only: GET and HEAD only\n", status=405), method
        route = self.routes.get(target)
        if route is None:
            return HttpReply(f"no page at {target}\n".encode(), status=404), method
        try:
            return route(), method
        except Exception:
            log.exception("answering %s failed", target)
            return HttpReply(b"internal error (logged)\n", status=500), method


def _encode(reply: HttpReply, with_body: bool) -> bytes:
    reason = _REASONS.get(reply.status, "")
    head = (
        f"HTTP/1.1 {reply.status} {reason}\r\n"
        f"Content-Type: {reply.content_type}\r\n"
        f"Content-Length: {len(reply.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (reply.body if with_body else b"")


async def serve_metrics(
    host: str, port: int, routes: dict[str, Route] | None = None
) -> HttpServer | None:
    """Serve ``/metrics`` (and ``routes``) on ``host:port`` (0 = ephemeral);
    ``port`` < 0 serves nothing and returns None."""
    if port < 0:
        return None
    server = HttpServer({"/metrics": metrics_reply, **(routes or {})}, host, port)
    await server.start()
    return server


# The NodeInfo tag (registration with mgmtd) and ready-file key naming the
# host:port whose /metrics a process serves.
METRICS_ADDRESS = "metrics_address"


class NodeMetrics:
    """A process's ``/metrics`` server and its live-state collector, started and
    stopped together; its address goes into the ready file and the node's tags."""

    def __init__(self, server: HttpServer | None, unregister: Callable[[], None]) -> None:
        self.server = server
        self._unregister = unregister

    @classmethod
    async def start(cls, host: str, port: int, collect: CollectFn | None = None) -> NodeMetrics:
        unregister = add_collector(collect) if collect is not None else (lambda: None)
        try:
            server = await serve_metrics(host, port)
        except BaseException:
            unregister()
            raise
        return cls(server, unregister)

    @property
    def address(self) -> str:
        return self.server.address if self.server is not None else ""

    def tags(self) -> dict[str, str]:
        return {METRICS_ADDRESS: self.address} if self.address else {}

    def ready_info(self) -> dict[str, str]:
        return self.tags()

    async def stop(self) -> None:
        self._unregister()
        self._unregister = lambda: None
        if self.server is not None:
            await self.server.stop()


def check_port(name: str, port: int) -> None:
    """Config validation of a metrics/status port: -1 = off, 0 = ephemeral."""
    if not -1 <= port <= 65535:
        raise ValueError(f"{name} must be -1 (off), 0 (ephemeral) or a port, not {port}")


# ---- client ------------------------------------------------------------------------


async def http_get(address: str, path: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET ``http://address/path``: the body of a 200 answer, else OSError."""
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read(max_bytes + 1)
            while raw and len(raw) <= max_bytes:
                more = await reader.read(max_bytes + 1 - len(raw))
                if not more:
                    break
                raw += more
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    if len(raw) > max_bytes:
        raise OSError(f"http://{address}{path}: answer larger than {max_bytes} bytes")
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status_line.split(" ")[1:2] != ["200"]:
        raise OSError(f"http://{address}{path}: {status_line or 'no answer'}")
    return body


# (metric sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(address: str, timeout_s: float, max_bytes: int = MAX_SCRAPE_BYTES) -> Samples:
    """Every sample ``address``'s ``/metrics`` serves now."""
    body = await http_get(address, "/metrics", timeout_s, max_bytes)
    return parse(body.decode("utf-8", errors="replace"))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# What a dashboard plots for a node or the cluster (status page, `admin top`):
# rate key -> (counter sample, labels it must carry). Writes count once per
# client write (at the chain head), not once per replica.
RATES: dict[str, tuple[str, dict[str, str]]] = {
    "read_bytes": ("chainfs_storage_read_bytes_total", {}),
    "write_bytes": ("chainfs_storage_write_bytes_total", {"source": "client"}),
    "read_ops": ("chainfs_storage_read_ops_total", {}),
    "write_ops": ("chainfs_storage_write_ops_total", {"source": "client"}),
    "meta_ops": ("chainfs_meta_request_seconds_count", {}),
    "errors": ("chainfs_storage_request_errors_total", {}),
}


def rate_totals(samples: Samples) -> dict[str, float]:
    """The counters behind :data:`RATES`, summed over one scrape."""
    return {key: total(samples, name, **labels) for key, (name, labels) in RATES.items()}


def rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Per-second rates between two :func:`rate_totals` (a restarted process's
    counters start again at 0: its drop counts as no traffic)."""
    return {k: max(0.0, after[k] - before.get(k, 0.0)) / seconds for k in after}


class RateTracker:
    """Rates per source (a node id) from its successive scrapes."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, dict[str, float]]] = {}

    def update(self, source: int, samples: Samples) -> dict[str, float] | None:
        """This scrape's rates since ``source``'s last one (None for its first)."""
        now = (time.monotonic(), rate_totals(samples))
        before = self._last.get(source)
        self._last[source] = now
        if before is None or now[0] <= before[0]:
            return None
        return rates(before[1], now[1], now[0] - before[0])

    def keep_only(self, sources: set[int]) -> None:
        """Forget sources that are gone (a node back later starts afresh)."""
        self._last = {k: v for k, v in self._last.items() if k in sources}
