"""Prometheus metrics and the optional HTTP listener that serves them, loaded only when `metrics.listen` is set.

`PrometheusMetrics` records the `daemon.metrics.Metrics` calls into its own `CollectorRegistry` (never the
process-global one: tests and several daemons in one process do not clash), plus a collector that asks the database
for jobs by service and state when scraped, cached for a few seconds so a scrape storm costs one query.

`MetricsServer` is a stdlib `HTTPServer` bound to `metrics.listen` (default off) with two pages, served by a few
threads: a connection's request is read in a selector, costing no thread, until it is complete (at most
`MAX_WAITING` connections at once, the oldest closed first, each given `IDLE_TIMEOUT` to send its request), then
one of `MAX_HANDLERS` threads answers it. One thread per connection made 406 threads of 400 idle connections.

- `GET /metrics`: the registry in Prometheus text format (OpenMetrics when the scraper asks for it);
- `GET /healthz`: 200 and `{"status": "ok", "database": "ok", "scheduler": "ok", ...}` when the database answers a
  trivial query and every tick ran recently; 503 with what is wrong otherwise.

Metric names (all prefixed `imputationd_`): `jobs{service,state}` (gauge, from the database),
`submissions_total{service}`, `polls_total{service}`, `errors_total{service,kind}` (service errors by their
stable `kind`: timeout, connection, http_5xx, ...), `download_bytes_total{service}`,
`tick_duration_seconds{tick}` (histogram), `token_days_left{service,owner}` (gauge),
`notifications_total{channel,outcome}`,
`database_up` (gauge: the jobs query of the last scrape worked).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, cast

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from daemon.metrics import Metrics
from daemon.states import JobState

log = structlog.get_logger("daemon.metrics")

#: Seconds a scrape's job counts are reused by the next scrapes.
COUNTS_CACHE_SECONDS = 5.0
TICK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _JobsCollector:
    """`imputationd_jobs{service,state}` from `counts()` (the store's `counts_by_service`), cached briefly."""

    def __init__(self, counts: Callable[[], Mapping[str, Mapping[str, int]]], cache_seconds: float) -> None:
        self._counts = counts
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, Mapping[str, Mapping[str, int]] | None] = (-float("inf"), None)

    def describe(self) -> Iterable[Metric]:
        # Names only: without this the registry would call collect() (a database query) at registration.
        yield GaugeMetricFamily("imputationd_jobs", "Jobs by service and state", labels=["service", "state"])
        yield GaugeMetricFamily("imputationd_database_up", "1 when the last jobs query worked, else 0")

    def collect(self) -> Iterable[Metric]:
        counts = self._current()
        jobs = GaugeMetricFamily("imputationd_jobs", "Jobs by service and state", labels=["service", "state"])
        for service, by_state in sorted((counts or {}).items()):
            for state in JobState:
                jobs.add_metric([service, state.value], by_state.get(state.value, 0))
        yield jobs
        yield GaugeMetricFamily("imputationd_database_up", "1 when the last jobs query worked, else 0",
                                value=0 if counts is None else 1)

    def _current(self) -> Mapping[str, Mapping[str, int]] | None:
        with self._lock:  # one query at a time; concurrent scrapes wait for it and share the answer
            at, counts = self._cached
            if time.monotonic() - at < self._cache_seconds:
                return counts
            try:
                counts = self._counts()
            except Exception as exc:  # the database is away: report it as a metric, not a failed scrape
                log.warning("metrics_jobs_query_failed", reason=type(exc).__name__, error_kind="database")
                counts = None
            self._cached = (time.monotonic(), counts)
            return counts


class PrometheusMetrics(Metrics):
    """Records into `self.registry`, a registry of its own."""

    def __init__(
        self,
        counts: Callable[[], Mapping[str, Mapping[str, int]]] | None = None,
        *,
        cache_seconds: float = COUNTS_CACHE_SECONDS,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._submissions = Counter("imputationd_submissions", "Jobs accepted by a service", ["service"], registry=r)
        self._polls = Counter("imputationd_polls", "Remote status requests", ["service"], registry=r)
        self._errors = Counter("imputationd_errors", "Service errors met by steps, by kind", ["service", "kind"],
                               registry=r)
        self._download_bytes = Counter("imputationd_download_bytes", "Bytes of verified result files",
                                       ["service"], registry=r)
        self._ticks = Histogram("imputationd_tick_duration_seconds", "How long each scheduler tick ran", ["tick"],
                                buckets=TICK_BUCKETS, registry=r)
        self._token_days = Gauge("imputationd_token_days_left", "Days until an owner's API token for the service "
                                 "expires", ["service", "owner"], registry=r)
        self._notifications = Counter("imputationd_notifications", "Notification attempts by channel and outcome",
                                      ["channel", "outcome"], registry=r)
        if counts is not None:
            r.register(_JobsCollector(counts, cache_seconds))

    def submitted(self, service: str) -> None:
        self._submissions.labels(service).inc()

    def polled(self, service: str) -> None:
        self._polls.labels(service).inc()

    def error(self, service: str, kind: str) -> None:
        self._errors.labels(service, kind).inc()

    def downloaded(self, service: str, nbytes: int) -> None:
        self._download_bytes.labels(service).inc(max(0, nbytes))

    def tick(self, name: str, seconds: float) -> None:
        self._ticks.labels(name).observe(max(0.0, seconds))

    def token_days_left(self, service: str, owner: str, days: float) -> None:
        self._token_days.labels(service, owner).set(days)

    def notification(self, channel: str, outcome: str) -> None:
        self._notifications.labels(channel, outcome).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type, in the format the `Accept` header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


# --- the listener ------------------------------------------------------------------------------------------------


#: Threads answering requests: a scrape or health check takes milliseconds, and Prometheus scrapes one at a time.
MAX_HANDLERS = 4
#: Connections handed to those threads and not yet answered, beyond which a new one is closed unanswered.
MAX_QUEUED = 4 * MAX_HANDLERS
#: Connections open without a request yet; past this the oldest is closed.
MAX_WAITING = 64
#: Seconds a connection may take to send its request, and then to read the answer.
IDLE_TIMEOUT = 10.0
#: Most bytes of a request's head.
MAX_HEAD = 8192


class _ReadAhead:
    """A connection whose request head was already read: the handler reads it from memory and writes to the
    socket. Nothing follows the head: the listener speaks HTTP/1.0 (one request per connection) and takes GETs."""

    def __init__(self, conn: socket.socket, head: bytes) -> None:
        self._conn = conn
        self._head = head

    def makefile(self, mode: str, buffering: int = -1) -> io.IOBase:
        if "r" in mode:
            return io.BytesIO(self._head)
        return self._conn.makefile("wb", buffering)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def parse_listen(listen: str) -> tuple[str, int]:
    """"127.0.0.1:9478" -> ("127.0.0.1", 9478); "[::1]:9478" -> ("::1", 9478)."""
    host, _, port = listen.strip().rpartition(":")
    return host.strip("[]"), int(port)


class _Server(HTTPServer):
    allow_reuse_address = True
    request_queue_size = MAX_WAITING  # one thread accepts: let a burst of connections wait for it
    metrics: PrometheusMetrics
    health: Callable[[], tuple[bool, Mapping[str, Any]]]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "imputationd"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server.metrics.render(self.headers.get("Accept"))
            self._reply(HTTPStatus.OK, body, content_type)
        elif path == "/healthz":
            healthy, report = self.server.health()
            body = json.dumps(report, default=str, sort_keys=False).encode("utf-8") + b"\n"
            self._reply(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json")
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found: try /metrics or /healthz\n",
                        "text/plain; charset=utf-8")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # a scrape every 15 s is not news; errors surface as failed scrapes on the Prometheus side


class MetricsServer:
    """The HTTP listener: `start()` binds and serves on threads of its own, `close()` stops and unbinds."""

    def __init__(
        self,
        listen: str,
        metrics: PrometheusMetrics,
        health: Callable[[], tuple[bool, Mapping[str, Any]]],
    ) -> None:
        host, port = parse_listen(listen)
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler, bind_and_activate=False)
        self._server.metrics = metrics
        self._server.health = health
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._handlers: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._queued = 0

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when `listen` asked for port 0."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken or not ours."""
        try:
            self._server.server_bind()
            self._server.server_activate()
        except OSError:
            self._server.server_close()
            raise
        self._handlers = concurrent.futures.ThreadPoolExecutor(MAX_HANDLERS, thread_name_prefix="imputationd-metrics")
        self._thread = threading.Thread(target=self._serve, name="imputationd-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(timeout=5)
            self._thread = None
        if self._handlers is not None:
            self._handlers.shutdown(wait=False, cancel_futures=True)
        self._server.server_close()

    def _serve(self) -> None:
        """Accept connections and read their requests' heads in a selector; hand each complete one to a handler."""
        waiting: dict[socket.socket, tuple[float, bytearray]] = {}  # oldest first
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ)
            while not self._stopping.is_set():
                try:
                    self._serve_round(selector, waiting)
                except Exception:  # a bug here must not silently end the listener
                    log.exception("metrics_listener_failed", error_kind="metrics")
            for conn in list(waiting):
                self._drop(selector, waiting, conn)

    def _serve_round(self, selector: selectors.BaseSelector,
                     waiting: dict[socket.socket, tuple[float, bytearray]]) -> None:
        """One wait for events: accept, read what arrived, hand on complete requests, drop expired connections."""
        for key, _ in selector.select(timeout=0.5):
            if key.fileobj is self._server.socket:
                self._accept(selector, waiting)
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            if conn not in waiting:  # dropped for a newer one while handling this round's events
                continue
            try:
                data = conn.recv(MAX_HEAD)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(selector, waiting, conn)
                continue
            head = waiting[conn][1]
            head += data
            if b"\r\n\r\n" in head or len(head) >= MAX_HEAD:  # a GET has no body; too long: the handler says so
                selector.unregister(conn)
                del waiting[conn]
                self._hand_on(conn, key.data, bytes(head))
        expired = time.monotonic() - IDLE_TIMEOUT
        for conn in [conn for conn, (since, _) in waiting.items() if since < expired]:
            self._drop(selector, waiting, conn)

    def _accept(self, selector: selectors.BaseSelector, waiting: dict[socket.socket, tuple[float, bytearray]]) -> None:
        try:
            conn, peer = self._server.socket.accept()
        except OSError:  # the peer gave up already, or out of file descriptors: the next one may work
            return
        conn.setblocking(False)
        if len(waiting) >= MAX_WAITING:
            self._drop(selector, waiting, next(iter(waiting)))
        selector.register(conn, selectors.EVENT_READ, peer)
        waiting[conn] = (time.monotonic(), bytearray())

    @staticmethod
    def _drop(selector: selectors.BaseSelector, waiting: dict[socket.socket, tuple[float, bytearray]],
              conn: socket.socket) -> None:
        selector.unregister(conn)
        del waiting[conn]
        conn.close()

    def _hand_on(self, conn: socket.socket, peer: Any, head: bytes) -> None:
        with self._lock:
            full = self._queued >= MAX_QUEUED
            if not full:
                self._queued += 1
        if full:  # every handler busy with slow clients and more waiting: this one is not answered
            conn.close()
            return
        assert self._handlers is not None
        try:
            self._handlers.submit(self._answer, conn, peer, head)
        except RuntimeError:  # closing
            conn.close()

    def _answer(self, conn: socket.socket, peer: Any, head: bytes) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT)  # to read the answer
            # The handler only calls makefile() and socket methods on its connection: a _ReadAhead stands in.
            self._server.finish_request(cast(socket.socket, _ReadAhead(conn, head)), peer)
        except OSError:  # a client that hung up: nothing to tell anyone
            pass
        except Exception:
            log.exception("metrics_request_failed", error_kind="metrics")
        finally:
            self._server.shutdown_request(conn)
            with self._lock:
                self._queued -= 1
