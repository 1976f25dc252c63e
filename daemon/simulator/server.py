"""The HTTP side: a ThreadingHTTPServer on loopback, the request handler applying faults around the API, the
`/_sim/...` control API for tests in other processes, and the `SimulatedCloudgene` object tying it together.

Control API (JSON in, JSON out; never subject to faults):
    GET    /_sim/stats                      counters, jobs, files (size/sha256), downloads, submissions per job-name
    GET    /_sim/faults                     active rules and how often each kind fired
    POST   /_sim/faults                     {"kind": ..., params} or {"rules": [{...}, ...]} -> the added rules
    DELETE /_sim/faults[/<id>]              remove all rules, or one
    POST   /_sim/maintenance                {"enabled": true|false}
    POST   /_sim/tokens                     {"action": "create"|"expire"|"revoke"|"restore", "token": ...,
                                             "username": ... (create), "expires_in": seconds (create/restore)}
    POST   /_sim/jobs/<id>                  {"action": "kill"|"stall"|"release"|"retire"}
    POST   /_sim/timings                    {"queue": s, "run": s, "export": s, "notify": s|null, "retention": s}
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from daemon.simulator.api import (
    NGINX_REASONS,
    CloudgeneApi,
    Request,
    Response,
    error_response,
    json_response,
    proxy_error_response,
    text_response,
)
from daemon.simulator.faults import FaultRule, Faults
from daemon.simulator.model import (
    DEFAULT_APP_VERSION,
    DEFAULT_PANELS,
    TOKEN_LIFETIME,
    Account,
    ApiError,
    Panel,
    Simulation,
    State,
    Timings,
    replace_timings,
)
from daemon.simulator.multipart import BodyReader, MalformedBody
from daemon.simulator.results import ResultFile

log = logging.getLogger("daemon.simulator")

_SECRET_IN_PATH = re.compile(r"(/share/results/)[^/\s]+")
_DRAIN_LIMIT = 64 << 20
_STREAM_CHUNK = 1 << 16



def redact(text: str) -> str:
    """Download hashes are secrets: never let one reach a log line. The simulator stands for a remote server and
    shares no code with the daemon (see pyproject's import contracts), so it has this rule of its own: it knows where
    its secrets are (the hash in a result URL's path), where the daemon's `scrub` must find any secret anywhere."""
    return _SECRET_IN_PATH.sub(r"\1<redacted>", text)


def _fault_response(rule: FaultRule, path: str) -> Response:
    if rule.kind == "rate_limit":
        page = proxy_error_response(429)
        page.headers.append(("Retry-After", str(rule.retry_after)))
        return page
    if rule.kind == "html_200":
        html_page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Imputation Server</title></head>"
                "<body><h1>We&rsquo;ll be back soon!</h1><p>The service is temporarily unavailable. "
                "Please try again later.</p></body></html>\n")
        return Response(200, html_page.encode(), content_type="text/html; charset=utf-8")
    status = rule.status
    if status == 500:  # the application itself (Micronaut's error shape)
        return json_response({"message": "Internal Server Error",
                              "_links": {"self": {"href": path, "templated": False}},
                              "_embedded": {"errors": [{"message": "Internal Server Error: simulated fault"}]}}, 500)
    if status in NGINX_REASONS:  # the proxy in front of it
        return proxy_error_response(status)
    return text_response(rule.message or "simulated error", status)


def _without_outputs(body: bytes) -> bytes:
    """A job (status) or job list answer whose jobs list no result files."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    jobs: list[Any] = answer["data"] if isinstance(answer, dict) and isinstance(answer.get("data"), list) else [answer]
    for job in jobs:
        params = job.get("outputParams") if isinstance(job, dict) else None
        for param in params if isinstance(params, list) else []:
            if isinstance(param, dict):
                param["files"] = []
    return json.dumps(answer).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: SimulatedCloudgene) -> None:
        self.app = app
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[no-untyped-def]
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            log.debug("connection error: %s", exc.__class__.__name__)
        else:
            log.exception("simulator request failed")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # idle keep-alive connections are closed after this
    server: _Server

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK cost 40 ms per answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return "nginx"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s", redact(format % args))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # ------------------------------------------------------------------------------------------------ flow
    def _handle(self, method: str) -> None:
        app = self.server.app
        split = urlsplit(self.path)
        path = unquote(split.path)
        try:
            body = BodyReader(self.rfile, self.headers)
        except MalformedBody:
            self._send(text_response("Bad Request", 400), close=True)
            return
        request = Request(method, path, parse_qs(split.query), self.headers, body)
        if path == "/_sim" or path.startswith("/_sim/"):
            self._finish(request, app._control(request))
            return
        api = app.api
        assert api is not None, "start() makes the API before the server takes requests"
        route, handler, params = api.match(method, path)
        app.sim.count_request(route)
        plan = app.faults.plan(method, path)
        if plan.delay_before:
            app._sleep(plan.delay_before)
        action = plan.action
        if action is not None and action.when == "before":
            self._apply_fault(request, action, None)
            return
        answered: list[Response] = []

        def answer_early(early: Response) -> None:
            answered.append(early)
            self._finish(request, early, close=True)

        request.answer_early = answer_early
        if handler is None:
            response = api.not_routed(request, route)
        else:
            try:
                response = handler(request, **params)
            except ApiError as exc:
                response = error_response(exc)
            except Exception:  # a bug in the simulator: answer like a server would, and say so in the log
                log.exception("simulator route %s failed", route)
                response = json_response({"message": "Internal Server Error"}, 500)
        if answered:  # the "proxy" answered already and closed the connection: this answer reaches nobody
            return
        if plan.delay_after:
            app._sleep(plan.delay_after)
        if action is not None:
            self._apply_fault(request, action, response)
        else:
            self._finish(request, response)

    def _finish(self, request: Request, response: Response, **spoil: Any) -> None:
        if not request.body.done and not request.body.drain(_DRAIN_LIMIT):
            response.close = True
        self._send(response, **spoil)

    def _apply_fault(self, request: Request, rule: FaultRule, response: Response | None) -> None:
        kind = rule.kind
        if kind == "drop":
            request.body.drain(_DRAIN_LIMIT)
            if response is not None and response.download is not None:
                self.server.app.sim.log_download(response.download, status=response.status, sent=0,
                                                 sha256=hashlib.sha256().hexdigest(), fault="drop")
            self._drop()
        elif kind in ("error", "rate_limit", "html_200"):
            self._finish(request, _fault_response(rule, request.path))
        elif response is None:  # body faults need an answer to spoil; FaultRule forces when="after"
            self._finish(request, _fault_response(rule, request.path))
        elif kind == "malformed_json":
            if response.is_json and response.file is None:
                response.body = response.body[: max(1, len(response.body) // 2)]
                response.length = len(response.body)
            self._finish(request, response)
        elif kind == "truncate":
            self._finish(request, response, truncate=rule.fraction, fault="truncate")
        elif kind == "reset":
            self._finish(request, response, truncate=rule.fraction, fault="reset")
        elif kind == "no_outputs":
            if response.is_json and response.file is None:
                response.body = _without_outputs(response.body)
                response.length = len(response.body)
            self._finish(request, response)
        elif kind == "corrupt":
            self._finish(request, response, corrupt=rule.nbytes, fault="corrupt")
        else:
            self._finish(request, response)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self) -> None:
        """Close the connection abortively (RST, no FIN first): the client's read fails with "connection reset"."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the last other holder of the socket: closing it now really closes it
            self.connection.close()
        except OSError:
            pass

    # ------------------------------------------------------------------------------------------------ bytes
    def _send(
        self,
        response: Response,
        *,
        close: bool = False,
        truncate: float | None = None,
        corrupt: int | None = None,
        fault: str | None = None,
    ) -> None:
        length = response.length
        limit = length if truncate is None else int(length * truncate)
        flip_from = length // 2
        flip_to = min(length, flip_from + (corrupt or 0)) if corrupt else flip_from
        digest = hashlib.sha256()
        sent = 0
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(length))
            for key, value in response.headers:
                self.send_header(key, value)
            if close or response.close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                for offset, chunk in self._chunks(response):
                    if corrupt and offset < flip_to and offset + len(chunk) > flip_from:
                        buf = bytearray(chunk)
                        for i in range(max(flip_from, offset), min(flip_to, offset + len(chunk))):
                            buf[i - offset] ^= 0xFF
                        chunk = bytes(buf)
                    if offset + len(chunk) > limit:
                        chunk = chunk[: max(0, limit - offset)]
                    if chunk:
                        self.wfile.write(chunk)
                        digest.update(chunk)
                        sent += len(chunk)
                    if sent >= limit:
                        break
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            self.close_connection = True
        if fault == "reset":
            self._reset()
        elif truncate is not None:
            self._drop()
        if response.download is not None:
            self.server.app.sim.log_download(response.download, status=response.status, sent=sent,
                                             sha256=digest.hexdigest(), fault=fault)

    @staticmethod
    def _chunks(response: Response) -> Iterable[tuple[int, bytes]]:
        if response.file is None:
            yield 0, response.body
            return
        offset = 0
        with open(response.file, "rb") as f:
            f.seek(response.offset)
            while offset < response.length:
                chunk = f.read(min(_STREAM_CHUNK, response.length - offset))
                if not chunk:
                    break
                yield offset, chunk
                offset += len(chunk)


class SimulatedCloudgene:
    """A simulated Cloudgene 3 server (imputationserver2) on a real loopback socket.

    `tokens` maps API token -> username; `token_expiry` optionally maps token -> seconds until it expires
    (default 30 days). Use as a context manager or call `start()`/`stop()`. `faults` holds the switchable faults.
    `clock` (epoch seconds) drives job progression and token expiry; tests may pass a fake one to travel in time.
    `presigned`: an S3-backed server, whose share URLs (each GET counted) redirect to presigned URLs that serve
    Range requests for an hour and count nothing; without it, the local workspace, which ignores Range.
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timings: Timings | None = None,
        max_jobs_per_user: int = 3,
        download_limit: int = 10,
        panels: Iterable[Panel] | None = None,
        app_version: str = DEFAULT_APP_VERSION,
        token_expiry: Mapping[str, float] | None = None,
        strict: bool = True,
        presigned: bool = False,
        max_upload_bytes: int = 5000 * 1024 * 1024,
        server_name: str = "Imputation Server (simulated)",
        control: bool = True,
        workdir: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        now = clock()
        expiry = dict(token_expiry or {})
        accounts = {
            token: Account(token, user, now + expiry.get(token, TOKEN_LIFETIME), name=user.title(),
                           mail=f"{user}@example.org")
            for token, user in (tokens or {}).items()
        }
        self.sim = Simulation(
            accounts=accounts,
            timings=timings or Timings(),
            max_jobs_per_user=max_jobs_per_user,
            download_limit=download_limit,
            panels=tuple(panels) if panels is not None else DEFAULT_PANELS,
            app_version=app_version,
            clock=clock,
        )
        self.faults = Faults()
        self.host = host
        self._requested_port = port
        self.control = control
        self._own_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else None
        self._presigned = presigned
        self._strict = strict
        self._max_upload = max_upload_bytes
        self._server_name = server_name
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.api: CloudgeneApi | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> SimulatedCloudgene:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="imputationd-sim-"))
        else:
            self._workdir.mkdir(parents=True, exist_ok=True)
        self.api = CloudgeneApi(self.sim, self.faults, workdir=self._workdir, strict=self._strict,
                                max_upload_bytes=self._max_upload, server_name=self._server_name, sleep=self._sleep,
                                presigned=self._presigned)
        self._stopping.clear()
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="simulated-cloudgene", daemon=True)
        self._thread.start()
        log.info("simulated Cloudgene server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> SimulatedCloudgene:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`: the Cloudgene base URL (the API is under /api/v2)."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.base_url + "/api/v2"

    # ------------------------------------------------------------------------------------------ server state
    def set_maintenance(self, enabled: bool) -> None:
        with self.sim.lock:
            self.sim.maintenance = enabled

    def add_token(self, token: str, username: str, *, expires_in: float = TOKEN_LIFETIME) -> None:
        self.sim.add_token(token, username, expires_in=expires_in)

    def expire_token(self, token: str) -> None:
        self.sim.expire_token(token)

    def revoke_token(self, token: str) -> None:
        self.sim.revoke_token(token)

    def restore_token(self, token: str, *, expires_in: float = TOKEN_LIFETIME) -> None:
        self.sim.restore_token(token, expires_in=expires_in)

    def kill_job(self, job_id: str) -> None:
        """Put an active job into DEAD(-1), as a server restart does."""
        self.sim.kill_job(job_id)

    def stall_job(self, job_id: str) -> None:
        """Keep a job WAITING until `release_job`."""
        self.sim.stall_job(job_id, True)

    def release_job(self, job_id: str) -> None:
        self.sim.stall_job(job_id, False)

    def retire_job(self, job_id: str) -> None:
        """Delete a finished job's results now (RETIRED(7); downloads answer 404)."""
        self.sim.retire_job(job_id)

    def set_timings(self, **changes: Any) -> None:
        replace_timings(self.sim, **changes)

    # ------------------------------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        """Everything `/_sim/stats` answers: requests by route, submissions by job-name, jobs and their files
        (size, sha256, downloads left), every download served (bytes and sha256 actually sent), faults fired."""
        data = self.sim.stats()
        data["faults_fired"] = self.faults.counts()
        return data

    def submits_being_copied(self) -> int:
        """Submits a `slow_submit` fault holds: received, not yet a job (nor refused)."""
        return self.api.copying if self.api is not None else 0

    def submissions(self, job_name: str) -> int:
        """How many jobs were created with this job-name (the exactly-once check)."""
        with self.sim.lock:
            return self.sim.submissions.get(job_name, 0)

    def job_ids(self) -> list[str]:
        with self.sim.lock:
            return list(self.sim.jobs)

    def job_state(self, job_id: str) -> int:
        with self.sim.lock:
            self.sim.advance()
            return int(self.sim.jobs[job_id].state)

    def wait_for_state(self, job_id: str, states: Iterable[int], timeout: float = 10.0) -> int:
        """Poll (bounded) until the job is in one of `states`; returns the state or raises TimeoutError."""
        wanted = {int(s) for s in states}
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still in state {State(state).name}")
            time.sleep(0.01)

    def job_password(self, job_id: str) -> str:
        """The password the job's zips are encrypted with (as the server stored it: HTML-escaped)."""
        with self.sim.lock:
            return self.sim.jobs[job_id].params.password

    def job_name(self, job_id: str) -> str | None:
        with self.sim.lock:
            return self.sim.jobs[job_id].raw_name

    def _result(self, job_id: str, name: str) -> ResultFile:
        with self.sim.lock:
            for f in self.sim.jobs[job_id].results:
                if f.name == name:
                    return f
        raise KeyError(f"job {job_id} has no file {name!r}")

    def file_names(self, job_id: str) -> list[str]:
        with self.sim.lock:
            return [f.name for f in self.sim.jobs[job_id].results]

    def file_bytes(self, job_id: str, name: str) -> bytes:
        """The exact bytes of a result file (what an unspoiled download serves)."""
        return self._result(job_id, name).path.read_bytes()

    def file_sha256(self, job_id: str, name: str) -> str:
        return self._result(job_id, name).sha256

    def download_url(self, job_id: str, name: str) -> str:
        with self.sim.lock:
            self.sim.advance()
            for d in self.sim.jobs[job_id].downloads:
                if d.file.name == name:
                    return f"{self.base_url}/share/results/{d.hash}/{name}"
        raise KeyError(f"job {job_id} has no published file {name!r}")

    # ------------------------------------------------------------------------------------------ control API
    def _control(self, request: Request) -> Response:
        if not self.control:
            return json_response({"message": "Page Not Found"}, 404)
        try:
            payload = self._json_body(request)
            return self._control_route(request.method, request.path.rstrip("/"), payload)
        except (ValueError, KeyError, TypeError) as exc:
            return json_response({"error": str(exc.args[0]) if exc.args else exc.__class__.__name__}, 400)

    @staticmethod
    def _json_body(request: Request) -> Any:
        raw = b""
        while not request.body.done:
            raw += request.body.read(1 << 16)
            if len(raw) > 1 << 20:
                raise ValueError("control request too large")
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc.msg}") from None

    def _control_route(self, method: str, path: str, payload: Any) -> Response:
        if not isinstance(payload, dict):
            raise ValueError("expected a JSON object")
        if (method, path) == ("GET", "/_sim/stats"):
            return json_response(self.stats())
        if (method, path) == ("GET", "/_sim/faults"):
            return json_response({"rules": self.faults.rules(), "fired": self.faults.counts()})
        if (method, path) == ("POST", "/_sim/faults"):
            specs = payload.get("rules", [payload]) if "rules" in payload else [payload]
            added = []
            for spec in specs:
                spec = dict(spec)
                kind = spec.pop("kind")
                added.append(self.faults.add(kind, **spec).to_dict())
            return json_response({"added": added})
        if (method, path) == ("DELETE", "/_sim/faults"):
            self.faults.clear()
            return json_response({"cleared": True})
        if method == "DELETE" and path.startswith("/_sim/faults/"):
            return json_response({"removed": self.faults.remove(int(path.rsplit("/", 1)[1]))})
        if (method, path) == ("POST", "/_sim/maintenance"):
            self.set_maintenance(bool(payload["enabled"]))
            return json_response({"maintenance": self.sim.maintenance})
        if (method, path) == ("POST", "/_sim/tokens"):
            action, token = payload["action"], payload["token"]
            if action == "create":
                self.add_token(token, payload["username"], expires_in=float(payload.get("expires_in", TOKEN_LIFETIME)))
            elif action == "expire":
                self.expire_token(token)
            elif action == "revoke":
                self.revoke_token(token)
            elif action == "restore":
                self.restore_token(token, expires_in=float(payload.get("expires_in", TOKEN_LIFETIME)))
            else:
                raise ValueError(f"unknown token action {action!r}")
            return json_response({"ok": True})
        if method == "POST" and path.startswith("/_sim/jobs/"):
            job_id = path.removeprefix("/_sim/jobs/")
            actions = {"kill": self.kill_job, "stall": self.stall_job, "release": self.release_job,
                       "retire": self.retire_job}
            action = payload["action"]
            if action not in actions:
                raise ValueError(f"unknown job action {action!r}")
            actions[action](job_id)
            return json_response({"id": job_id, "state": self.job_state(job_id)})
        if (method, path) == ("POST", "/_sim/timings"):
            self.set_timings(**payload)
            t = self.sim.timings
            return json_response({"queue": t.queue, "run": t.run, "export": t.export, "notify": t.notify,
                                  "retention": t.retention})
        return json_response({"message": "Page Not Found"}, 404)


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    *,
    username: str = "demo",
    timings: Timings | None = None,
    max_jobs_per_user: int = 3,
    download_limit: int = 10,
    out: TextIO | None = None,
    on_ready: Callable[[SimulatedCloudgene], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run a simulated server in the foreground until Ctrl-C/SIGTERM (or `stop` is set); returns an exit code.

    Prints the base URL and the API token (generated when not given) for a human to paste into a config.
    """
    out = out or sys.stdout
    token = token or secrets.token_urlsafe(24)
    stop = stop or threading.Event()
    sim = SimulatedCloudgene({token: username}, host=host, port=port, timings=timings,
                             max_jobs_per_user=max_jobs_per_user, download_limit=download_limit)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with sim:
            print(f"Simulated Cloudgene server (imputationserver2) at {sim.base_url}", file=out)
            print(f"API token for user '{username}': {token}", file=out)
            print(f"Control API: {sim.base_url}/_sim/stats, /_sim/faults. Stop with Ctrl-C.", file=out, flush=True)
            if on_ready is not None:
                on_ready(sim)
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
