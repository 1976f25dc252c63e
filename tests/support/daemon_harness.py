"""Run real `imputationd run` processes against the simulated Cloudgene server, for tests.

pytest puts tests/ on sys.path (its conftest.py is there), so any test module can
`from support.daemon_harness import ...`.

    with simulator(max_jobs_per_user=50) as sim:                 # real HTTP on loopback, in this process
        cfg = DaemonConfig(tmp_path, db_url, sim, poll_interval=0.3)
        ids = create_jobs(cfg, 5)                                  # pending rows, like `imputationd submit`
        with DaemonProcess(cfg.write()) as d:                      # `imputationd run -c FILE`, JSON logs to a file
            d.wait_for_event("daemon_started")
            db = JobDB(db_url)
            db.wait_states(ids, {"completed"}, timeout=30)
            assert d.terminate() == 0                              # SIGTERM, bounded wait, exit code
        d.assert_clean()                                           # no traceback, tick_failed, step_crashed
        assert_submitted_once(sim, ids)
        assert_results_match(sim, db, ids)

Every wait is a bounded poll against a deadline (`wait_until`); nothing sleeps for a thread. A daemon process that
is still alive when its `with` block ends is SIGKILLed, so a failing test never leaves one behind.

`RequestLog` records when each request reached the simulator (its own stats count requests per route only), e.g. to
check that a job is polled at most once per poll interval.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
import yaml

from daemon.db.admin import NewInput, NewJob
from daemon.db.engine import make_engine
from daemon.db.models import Job, JobEvent, JobOutput
from daemon.db.store import JobStore
from daemon.downloads import PARTIAL_DIR
from daemon.simulator import SimulatedCloudgene, Timings, write_sample_vcf

T = TypeVar("T")

PANEL = "1000g-phase3"
PANEL_ID = "apps@1000g-phase-3-v5@2.0.0"
TOKEN = "harness-token-" + "x" * 20
SERVICE = "sim"
#: Events that mean a bug in the daemon whatever the test does.
BUG_EVENTS = frozenset({"tick_failed", "step_crashed"})


# ---------------------------------------------------------------------------------------------- bounded polls


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call `predicate` until it returns something truthy (returned) or `timeout` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout:g} s: {text}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- the simulator


def fast_timings(queue: float = 0.2, run: float = 0.2, export: float = 0.1) -> Timings:
    return Timings(queue=queue, run=run, export=export)


@contextlib.contextmanager
def simulator(*, timings: Timings | None = None, max_jobs_per_user: int = 50, **kwargs: Any
              ) -> Iterator[SimulatedCloudgene]:
    """A simulated Cloudgene server on loopback accepting `TOKEN`, with short job timings by default."""
    with SimulatedCloudgene({TOKEN: "harness"}, timings=timings or fast_timings(),
                            max_jobs_per_user=max_jobs_per_user, **kwargs) as sim:
        yield sim


_STATUS_PATH = re.compile(r"^/api/v2/jobs/(?P<id>[^/]+)(?:/status)?$")


class RequestLog:
    """Every request the simulator receives, as (arrival time.time(), method, path), recorded before any fault
    (a delayed request counts when it arrived). The simulator's own stats count requests per route only; this
    gives per-job timing, e.g. to check that a job is polled at most once per poll interval.

    Installed by wrapping `sim.faults.plan` (called once per request, on arrival) in this process."""

    def __init__(self, sim: SimulatedCloudgene) -> None:
        self._faults = sim.faults
        self._lock = threading.Lock()
        self.requests: list[tuple[float, str, str]] = []
        original = sim.faults.plan

        def plan(method: str, path: str) -> Any:
            with self._lock:
                self.requests.append((time.time(), method, path))
            return original(method, path)

        sim.faults.plan = plan  # type: ignore[method-assign]

    def uninstall(self) -> None:
        with contextlib.suppress(AttributeError):
            del self._faults.plan

    def matching(self, method: str, prefix: str) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, p) for t, m, p in self.requests if m == method and p.startswith(prefix)]

    def status_times(self) -> dict[str, list[float]]:
        """Arrival times of `GET /jobs/{id}` and `GET /jobs/{id}/status`, per remote job id."""
        times: dict[str, list[float]] = defaultdict(list)
        for t, path in self.matching("GET", "/api/v2/jobs/"):
            found = _STATUS_PATH.match(path)
            if found:
                times[found["id"]].append(t)
        return dict(times)

    def status_gaps(self) -> dict[str, list[float]]:
        """Seconds between consecutive status requests, per remote job."""
        return {job: [b - a for a, b in itertools.pairwise(ts)] for job, ts in self.status_times().items()}

    def downloads(self) -> list[float]:
        return [t for t, _ in self.matching("GET", "/share/results/")]

    def submits(self) -> list[float]:
        return [t for t, _ in self.matching("POST", "/api/v2/jobs/submit/")]


# ---------------------------------------------------------------------------------------------- configuration


def sample_vcf(directory: Path, *, samples: int = 20, variants: int = 40) -> Path:
    """A small valid bgzipped VCF (chr20, hg19): cheap for the simulator to 'impute'."""
    path = directory / f"chr20-{samples}x{variants}.vcf.gz"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_sample_vcf(path, chromosome="20", build="hg19", samples=samples, variants=variants)
    return path


@dataclass
class DaemonConfig:
    """One daemon's YAML config, generated: a service per simulator, fast ticks, JSON logs.

    `scheduler` and `service` entries override the harness's defaults (a `scheduler` value of None leaves the key out
    of the file: imputationd's own default applies); `extra_services` adds services: name -> simulator, or
    name -> (simulator, {setting: value}) for settings that differ from the harness's."""

    root: Path
    db_url: str
    sim: SimulatedCloudgene
    poll_interval: float = 0.3
    max_concurrent_jobs: int = 10
    scheduler: dict[str, Any] = field(default_factory=dict)
    service: dict[str, Any] = field(default_factory=dict)
    extra_services: dict[str, SimulatedCloudgene | tuple[SimulatedCloudgene, dict[str, Any]]] = field(
        default_factory=dict)
    log_level: str = "info"
    name: str = "config.yaml"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_file = self.root / "sim.token"
        self.token_file.write_text(TOKEN + "\n", encoding="utf-8")
        self.token_file.chmod(0o600)
        self.state_dir = self.root / "state"
        self.path = self.root / self.name

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    def _service(self, sim: SimulatedCloudgene, **overrides: Any) -> dict[str, Any]:
        return {
            "type": "cloudgene",
            "base_url": sim.base_url,
            "token_file": str(self.token_file),
            "poll_interval": self.poll_interval,
            "max_concurrent_jobs": self.max_concurrent_jobs,
            "timeout": 30,
            "panels": {PANEL: {"id": PANEL_ID, "builds": ["hg19", "hg38"],
                               "populations": ["eur", "afr", "all", "off"]}},
            **overrides,
        }

    def data(self) -> dict[str, Any]:
        scheduler = {
            "workers": 8,
            "dispatch_interval": 0.2,
            "poll_tick_interval": 0.1,
            "download_interval": 0.2,
            "maintenance_interval": 1.0,
            "lease_seconds": 10,
            "backoff_initial": 0.2,
            "backoff_max": 2,
            "shutdown_timeout": 3,
            **self.scheduler,
        }
        scheduler = {k: v for k, v in scheduler.items() if v is not None}  # None: leave out, use the default
        services = {SERVICE: self._service(self.sim, **self.service)}
        for name, extra in self.extra_services.items():
            sim, overrides = extra if isinstance(extra, tuple) else (extra, {})
            services[name] = self._service(sim, **overrides)
        return {
            "storage": {"state_dir": str(self.state_dir)},
            "database": {"url": self.db_url},
            "logging": {"format": "json", "level": self.log_level},
            "scheduler": scheduler,
            "services": services,
        }

    def write(self, path: Path | None = None) -> Path:
        path = path or self.path
        path.write_text(yaml.safe_dump(self.data(), sort_keys=False), encoding="utf-8")
        return path


# ---------------------------------------------------------------------------------------------- the database


def migrate(url: str) -> str:
    from daemon.db.schema import upgrade_url

    upgrade_url(url)
    return url


class JobDB:
    """The test's own view of the daemon's database (a separate engine; dispose with `close()`)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, pool_size=4)
        self.store = JobStore(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> JobDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, query: Any) -> list[Any]:
        with self.store._db.session() as session:
            return list(session.execute(query).all())

    def states(self, ids: Collection[uuid.UUID] | None = None) -> dict[uuid.UUID, str]:
        query = sa.select(Job.id, Job.state)
        if ids is not None:
            query = query.where(Job.id.in_(list(ids)))
        return {i: s.value for i, s in self._rows(query)}

    def count_states(self, ids: Collection[uuid.UUID] | None = None) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for state in self.states(ids).values():
            counts[state] += 1
        return dict(counts)

    def leases(self, ids: Collection[uuid.UUID] | None = None) -> dict[uuid.UUID, tuple[str | None, Any]]:
        query = sa.select(Job.id, Job.lease_owner, Job.lease_expires_at)
        if ids is not None:
            query = query.where(Job.id.in_(list(ids)))
        return {i: (owner, expires) for i, owner, expires in self._rows(query)}

    def jobs(self, ids: Collection[uuid.UUID]) -> list[Job]:
        return [self.store.admin.get(i) for i in ids]

    def events(self, ids: Collection[uuid.UUID] | None = None) -> list[tuple[uuid.UUID, dt.datetime, str | None, str]]:
        query = sa.select(JobEvent.job_id, JobEvent.at, JobEvent.from_state, JobEvent.to_state).order_by(JobEvent.id)
        if ids is not None:
            query = query.where(JobEvent.job_id.in_(list(ids)))
        return [(i, at, str(f) if f is not None else None, str(t)) for i, at, f, t in self._rows(query)]

    def outputs(self, job_id: uuid.UUID) -> list[JobOutput]:
        return self.store.queue.outputs(job_id)

    def wait_states(self, ids: Collection[uuid.UUID], states: Collection[str], timeout: float,
                    *, also: Callable[[], Any] | None = None) -> dict[uuid.UUID, str]:
        """Bounded poll until every job in `ids` is in one of `states`; `also()` runs on every round (e.g. a
        liveness check of the daemons) and may raise."""
        wanted = set(states)

        def done() -> dict[uuid.UUID, str] | None:
            if also is not None:
                also()
            current = self.states(ids)
            return current if len(current) == len(ids) and set(current.values()) <= wanted else None

        return wait_until(done, timeout, interval=0.1,
                          message=lambda: f"jobs not all {sorted(wanted)}: {self.count_states(ids)}")

    def wait_any(self, ids: Collection[uuid.UUID], states: Collection[str], timeout: float,
                 *, count: int = 1) -> list[uuid.UUID]:
        """Bounded poll until at least `count` of the jobs are in one of `states`; returns those jobs."""
        wanted = set(states)

        def some() -> list[uuid.UUID] | None:
            hits = [i for i, s in self.states(ids).items() if s in wanted]
            return hits if len(hits) >= count else None

        return wait_until(some, timeout, interval=0.05,
                          message=lambda: f"fewer than {count} jobs in {sorted(wanted)}: {self.count_states(ids)}")


def create_jobs(config: DaemonConfig | str, n: int, *, vcf: Path | None = None, service: str = SERVICE,
                root: Path | None = None, db: JobDB | None = None) -> list[uuid.UUID]:
    """Store `n` pending single-service jobs, oldest first (what `imputationd submit` does after its checks)."""
    if isinstance(config, DaemonConfig):
        url, root = config.db_url, root or config.root
    else:
        url = config
    if vcf is None:
        assert root is not None, "give vcf= or root="
        vcf = sample_vcf(root / "inputs")
    data = vcf.read_bytes()
    new_input = NewInput(path=str(vcf), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    own = db is None
    db = db or JobDB(url)
    try:
        ids = []
        for k in range(n):
            [job] = db.store.admin.create_group([NewJob(service=service, panel=PANEL, build="hg19", inputs=[new_input],
                                                        population="eur", name=f"harness job {k}")])
            ids.append(job.id)
        return ids
    finally:
        if own:
            db.close()


# ---------------------------------------------------------------------------------------------- the daemon


def imputationd_command() -> list[str]:
    """The console script next to this interpreter (what systemd runs), else `python -m daemon`."""
    script = Path(sys.executable).with_name("imputationd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon"]


#: Starts the CLI with `socket.gethostname()` answering something else: a daemon "on another machine".
_OTHER_HOST_BOOTSTRAP = (
    "import socket, sys; socket.gethostname = lambda: {host!r}; "
    "from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
)


class DaemonProcess:
    """`imputationd run -c CONFIG` as a child process; stdout (JSON log lines) and stderr go to files.

    `hostname` makes the daemon believe it runs on another host (its lease owner strings say so), to test what a
    second machine sharing the database does. `env` adds to (value None: removes from) the child's environment."""

    #: Every process started in this test session, in order (`print_logs_of_started` shows and forgets them).
    started: list[DaemonProcess] = []

    def __init__(self, config: Path, *, env: Mapping[str, str | None] | None = None, hostname: str | None = None,
                 name: str | None = None, args: Sequence[str] = (), command: str = "run") -> None:
        self.config = Path(config)
        self.command = command
        self.name = name or f"daemon-{uuid.uuid4().hex[:6]}"
        self.log_path = self.config.parent / f"{self.name}.stdout.log"
        self.err_path = self.config.parent / f"{self.name}.stderr.log"
        self.hostname = hostname
        self.args = list(args)
        self._env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.started_at = 0.0

    # -- life cycle
    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "IMPUTATIOND_CONFIG", "JOURNAL_STREAM")}
        env["PYTHONUNBUFFERED"] = "1"
        for key, value in self._env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        argv = [self.command, "-c", str(self.config), *self.args]
        if self.hostname is None:
            command = [*imputationd_command(), *argv]
        else:
            command = [sys.executable, "-c", _OTHER_HOST_BOOTSTRAP.format(host=self.hostname), *argv]
        with open(self.log_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                         cwd=self.config.parent)
        self.started_at = time.monotonic()
        DaemonProcess.started.append(self)
        return self

    def __enter__(self) -> DaemonProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.kill()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code (negative: killed by that signal); AssertionError if still running after `timeout`."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running {timeout:g} s later\n{self.tail()}") from None
        return self.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, float]:
        """Send `sig` and wait for the exit: (exit code, seconds it took)."""
        started = time.monotonic()
        self.send(sig)
        code = self.wait(timeout)
        return code, time.monotonic() - started

    def terminate(self, timeout: float = 15.0) -> int:
        return self.stop(signal.SIGTERM, timeout)[0]

    def kill(self) -> int:
        """SIGKILL: no handler runs, leases stay, partial files stay."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.wait(10)

    def require_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"{self.name} exited with {self.proc.returncode if self.proc else None}\n"
                                 f"{self.tail()}")

    # -- logs
    def lines(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed; a line that is not JSON (cut by SIGKILL, or a stray print) is {"_raw": …}."""
        out = []
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        for raw in text.splitlines():
            raw = raw.strip()
            if not raw:
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = {"_raw": raw}
            out.append(line if isinstance(line, dict) else {"_raw": raw})
        return out

    def stderr(self) -> str:
        try:
            return self.err_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [line for line in self.lines()
                if line.get("event") == event and all(line.get(k) == v for k, v in match.items())]

    def wait_for_event(self, event: str, timeout: float = 15.0, *, count: int = 1, **match: Any) -> dict[str, Any]:
        """Bounded poll of the log until `event` (with fields equal to `match`) appeared `count` times; fails early
        if the process exits first."""

        def seen() -> dict[str, Any] | None:
            found = self.events(event, **match)
            if len(found) >= count:
                return found[count - 1]
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode if self.proc else None}) before "
                                     f"logging {event}\n{self.tail()}")
            return None

        return wait_until(seen, timeout, interval=0.05,
                          message=lambda: f"{self.name} did not log {event} {match or ''}\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()[-n:] if self.log_path.exists() else []
        err = self.stderr().splitlines()[-n:]
        return "--- stdout\n" + "\n".join(lines) + "\n--- stderr\n" + "\n".join(err)

    def problems(self, *, allow_errors: Collection[str] = ()) -> list[str]:
        """What in the logs means a bug: a traceback anywhere, `tick_failed`/`step_crashed`, and (unless allowed)
        any error-level event."""
        found = []
        for line in self.lines():
            if "_raw" in line:
                if "Traceback" in line["_raw"]:
                    found.append(line["_raw"])
                continue
            event = line.get("event")
            if event in BUG_EVENTS or "exception" in line or "stack" in line:
                found.append(json.dumps(line))
            elif line.get("level") in ("error", "critical") and event not in allow_errors:
                found.append(json.dumps(line))
        if "Traceback" in self.stderr():
            found.append("stderr: " + self.stderr()[-3000:])
        return found

    def assert_clean(self, *, allow_errors: Collection[str] = ()) -> None:
        problems = self.problems(allow_errors=allow_errors)
        assert not problems, f"{self.name} logged problems:\n" + "\n".join(problems[:10])


def print_logs_of_started(n: int = 40) -> None:
    """Print the log tails of every daemon started since the last call (pytest shows them for a failed test),
    SIGKILL any still running, and forget them. Use from an autouse fixture after `yield`."""
    started, DaemonProcess.started = DaemonProcess.started, []
    for d in started:
        if d.alive():
            d.kill()
        print(f"===== {d.name} (pid {d.proc.pid if d.proc else '-'}, exit {d.returncode})\n{d.tail(n)}")


def assert_all_clean(daemons: Iterable[DaemonProcess], *, allow_errors: Collection[str] = ()) -> None:
    for d in daemons:
        d.assert_clean(allow_errors=allow_errors)


# ---------------------------------------------------------------------------------------------- sd_notify


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's; `env()` is what the child needs."""

    def __init__(self, directory: Path | None = None) -> None:
        # sun_path holds ~107 bytes: pytest's tmp paths can be longer, so use a short dir under /tmp.
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="sdn-", dir=str(directory) if directory else "/tmp"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def drain(self) -> list[tuple[float, list[str]]]:
        """Read whatever arrived (non-blocking after the first 0.1 s); returns and keeps every message."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return self.messages
            self.messages.append((time.monotonic(), data.decode("utf-8", "replace").split("\n")))

    def assignments(self) -> list[str]:
        self.drain()
        return [a for _, lines in self.messages for a in lines]

    def wait_for(self, assignment: str, timeout: float, *, count: int = 1) -> None:
        """Bounded wait until a message holding `assignment` (exact, or a prefix ending in '=') arrived `count`
        times."""

        def matches(a: str) -> bool:
            return a.startswith(assignment) if assignment.endswith("=") else a == assignment

        wait_until(lambda: sum(1 for a in self.assignments() if matches(a)) >= count, timeout, interval=0.0,
                   message=lambda: f"no {assignment!r} x{count} on the notify socket: {self.assignments()[-10:]}")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


# ---------------------------------------------------------------------------------------------- end-state checks


def assert_submitted_once(sim: SimulatedCloudgene, ids: Iterable[uuid.UUID]) -> None:
    """Every job reached the simulator exactly once (its job-name is our job id)."""
    submissions = sim.stats()["submissions"]
    wrong = {str(i): submissions.get(str(i), 0) for i in ids if submissions.get(str(i), 0) != 1}
    assert not wrong, f"jobs not submitted exactly once (job-name -> count): {dict(list(wrong.items())[:10])}"


def assert_results_match(sim: SimulatedCloudgene, db: JobDB, ids: Iterable[uuid.UUID]) -> None:
    """Every job completed with every file the simulator published, byte-identical on disk, no partials left."""
    for job in db.jobs(list(ids)):
        assert job.state.value == "completed", f"job {job.id} is {job.state.value}: {job.error}"
        assert job.remote_id is not None
        names = sim.file_names(job.remote_id)
        outputs = {o.name: o for o in db.outputs(job.id)}
        assert sorted(outputs) == sorted(names), f"job {job.id}: files {sorted(outputs)} != served {sorted(names)}"
        for name in names:
            expected = sim.file_bytes(job.remote_id, name)
            output = outputs[name]
            assert output.local_path, f"job {job.id} file {name} has no local path"
            local = Path(output.local_path).read_bytes()
            assert local == expected, f"job {job.id}: {name} differs from what the simulator served"
            assert output.sha256 == hashlib.sha256(expected).hexdigest()
        if job.result_dir:
            assert_no_partials(Path(job.result_dir))


def assert_no_partials(directory: Path) -> None:
    leftovers = [p for p in Path(directory).rglob("*") if PARTIAL_DIR in p.parts]
    assert not leftovers, f"partial downloads left behind: {leftovers[:5]}"


def active_remote_jobs(sim: SimulatedCloudgene) -> int:
    """Jobs the simulator counts against the per-user limit now (WAITING, RUNNING, EXPORTING)."""
    return sum(1 for j in sim.stats()["jobs"].values() if j["state_name"] in ("WAITING", "RUNNING", "EXPORTING"))


def remote_intervals(sim: SimulatedCloudgene) -> dict[str, tuple[float, float]]:
    """Per remote job: (submitted, end) in the simulator's clock; a job still active ends at +inf."""
    with sim.sim.lock:
        sim.sim.advance()
        return {j.id: (j.submitted, j.end if j.end else float("inf")) for j in sim.sim.jobs.values()}


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals [start, end) open at one instant."""
    intervals = list(intervals)
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best

