"""An in-process daemon driving jobs through simulated Cloudgene servers over real HTTP, for end-to-end tests.

    def test_something(e2e):                        # the fixture (tests/conftest.py registers this module)
        h = e2e()                                   # one service "mis" on SQLite; e2e(db_url=...) for another DB
        [job] = h.submit()                          # a generated chr20 VCF, through the real submission path
        h.start()                                   # Daemon.start(): the real ticks, pool, adapters
        job = h.wait_state(job.id, "completed")
        h.assert_outputs_match(job)                 # sha256 of every file == what the simulator served
        assert h.logs.problems() == []              # warning/error lines, parsed from structlog JSON

Everything is the production path: YAML config through `load_config`, the migrated database, `submission.submit`
(preflight included), `Daemon` with its APScheduler ticks and worker pool, the Cloudgene adapter with its own
`httpx.Client`, streaming downloads. Only the timings are short: ticks every 0.1 s, polls every 0.1 s, backoff from
0.1 s, and simulator phases of 0.1 s (`Harness(timings=...)` / `scheduler=` / `service=` override them).

What the harness adds for assertions:

- `h.logs`: the daemon's log lines as dicts (structlog JSON, level debug), with `select(level=, event=, **fields)`.
- `h.requests[service]`: every request the simulator received (monotonic time, method, path, fault that fired).
- `h.publish_with_fault(...)`: finish a remote job and switch a fault on for one of its files *before* anyone can
  see the job done (under the simulator's lock), so a download fault hits the file the test means.
- `h.force_remote_state(...)`: put a remote job into a state number the simulator never reaches by itself.

Waiting is always bounded polling of the database (`wait_until`), never a fixed sleep.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from daemon.config import Config, LoggingConfig, load_config
from daemon.db.models import Job
from daemon.logging import configure_logging
from daemon.scheduler import Daemon
from daemon.simulator import SimulatedCloudgene, State, Timings, write_sample_vcf
from daemon.states import TERMINAL, JobState
from daemon.submission import Submission, submit

PANEL = "1000g-phase3"
PANEL_ID = "apps@1000g-phase-3-v5@2.0.0"
USER = "alice"
#: Simulator phases (WAITING, RUNNING, EXPORTING): short, about one poll each (a test that must see every phase
#: sets longer ones).
FAST = Timings(queue=0.1, run=0.1, export=0.1)

#: Loggers whose lines are not the daemon's: the simulator runs in the same process.
IGNORED_LOGGERS = ("daemon.simulator", "alembic")

SCHEDULER_DEFAULTS: dict[str, Any] = {
    "workers": 4,
    "dispatch_interval": 0.1,
    "poll_tick_interval": 0.1,
    "download_interval": 0.1,
    "maintenance_interval": 0.2,
    "lease_seconds": 10,
    "backoff_initial": 0.1,
    "backoff_max": 0.4,
    "shutdown_timeout": 3,
}
SERVICE_DEFAULTS: dict[str, Any] = {
    "poll_interval": 0.1,
    "timeout": 5,
    "max_concurrent_jobs": 3,
}


# ---------------------------------------------------------------------------------------------------- log capture


class LogCapture:
    """The daemon's log output as parsed JSON lines (configure_logging with a StringIO stream)."""

    def __init__(self, level: str = "debug") -> None:
        # configure_logging and Daemon() set logger levels process-wide (Daemon quiets "apscheduler"): put every
        # level back afterwards, so tests that run later in this process see logging as they left it.
        self._levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                        if isinstance(logger, logging.Logger)}
        self._root_level = logging.getLogger().level
        self.stream = io.StringIO()
        configure_logging(LoggingConfig(format="json", level=level), stream=self.stream)

    def close(self) -> None:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "imputationd"]:
            if getattr(handler, "stream", None) is self.stream:
                root.removeHandler(handler)
        root.setLevel(self._root_level)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                logger.setLevel(self._levels.get(name, logging.NOTSET))

    def lines(self) -> list[dict[str, Any]]:
        """The daemon's lines: the in-process simulator's own request log and Alembic's chatter left out."""
        out = []
        for raw in self.stream.getvalue().splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = {"event": raw, "level": "unparsed"}
            if not str(line.get("logger", "")).startswith(IGNORED_LOGGERS):
                out.append(line)
        return out

    def select(self, *, level: str | Sequence[str] | None = None, event: str | None = None,
               **fields: Any) -> list[dict[str, Any]]:
        levels = {level} if isinstance(level, str) else set(level) if level else None
        return [
            line for line in self.lines()
            if (levels is None or line.get("level") in levels)
            and (event is None or line.get("event") == event)
            and all(line.get(k) == v for k, v in fields.items())
        ]

    def problems(self, **fields: Any) -> list[dict[str, Any]]:
        """Warning, error and critical lines (optionally only those with these field values)."""
        return self.select(level=("warning", "error", "critical", "unparsed"), **fields)

    def dump(self, *, min_level: str = "info") -> str:
        """The lines at `min_level` or above, compactly, for assertion messages."""
        order = ["debug", "info", "warning", "error", "critical", "unparsed"]
        keep = order[order.index(min_level):]
        return "\n".join(
            f"{line.get('level')}: {line.get('event')} "
            + json.dumps({k: v for k, v in line.items() if k not in ("level", "event", "timestamp", "logger")})
            for line in self.lines() if line.get("level") in keep
        )


# ---------------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SeenRequest:
    at: float  # time.monotonic()
    method: str
    path: str
    fault: str | None  # the response fault that fired on it ("error", "drop", ...), if any


class RequestLog:
    """Every request a simulator handled (control API excluded), recorded where its faults are decided."""

    def __init__(self, sim: SimulatedCloudgene) -> None:
        self._lock = threading.Lock()
        self.seen: list[SeenRequest] = []
        plan = sim.faults.plan

        def recording_plan(method: str, path: str):  # type: ignore[no-untyped-def]
            decided = plan(method, path)
            with self._lock:
                self.seen.append(SeenRequest(time.monotonic(), method, path,
                                             decided.action.kind if decided.action else None))
            return decided

        sim.faults.plan = recording_plan  # type: ignore[method-assign]

    def matching(self, prefix: str = "", method: str | None = None) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.seen if r.path.startswith(prefix) and (method is None or r.method == method)]

    def count(self, prefix: str = "", method: str | None = None) -> int:
        return len(self.matching(prefix, method))


# ---------------------------------------------------------------------------------------------------- harness


@dataclass
class Service:
    name: str
    sim: SimulatedCloudgene
    token: str
    token_file: Path
    requests: RequestLog

    def replace_token(self, token: str) -> None:
        """Write a new token file the way an operator's tooling should: a new file renamed over the old one."""
        tmp = self.token_file.with_suffix(".new")
        tmp.write_text(token + "\n", encoding="utf-8")
        tmp.chmod(0o600)
        os.replace(tmp, self.token_file)
        self.token = token


@dataclass
class Harness:
    root: Path
    db_url: str
    services: dict[str, Service]
    config_path: Path
    config: Config
    logs: LogCapture
    daemon: Daemon | None = None
    _inputs: int = 0
    _stopped: bool = False
    _final_store: Any = None
    _final_engine: Any = None
    extra_cleanup: list[Callable[[], None]] = field(default_factory=list)

    # -- setup

    @property
    def sim(self) -> SimulatedCloudgene:
        """The first service's simulator."""
        return next(iter(self.services.values())).sim

    @property
    def service(self) -> Service:
        return next(iter(self.services.values()))

    @property
    def requests(self) -> dict[str, RequestLog]:
        return {name: s.requests for name, s in self.services.items()}

    @property
    def store(self):  # type: ignore[no-untyped-def]
        if self.daemon is None and self._final_store is not None:
            return self._final_store  # after stop_daemon(): its engine re-opens connections on demand
        return self._daemon().store

    def _daemon(self) -> Daemon:
        if self.daemon is None:
            self.daemon = Daemon(self.config)
        return self.daemon

    def vcf(self, chromosome: str = "20", *, samples: int = 25, variants: int = 120, build: str = "hg19",
            seed: int = 0) -> Path:
        self._inputs += 1
        path = self.root / "inputs" / f"{self._inputs:02d}" / f"chr{chromosome}.vcf.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_sample_vcf(path, chromosome=chromosome, build=build, samples=samples, variants=variants,
                                seed=seed)

    def submit(self, files: Sequence[Path] | None = None, *, services: Sequence[str] | None = None,
               **options: Any) -> list[Job]:
        """Store pending jobs through `submission.submit` (validation and preflight included)."""
        options = {"population": "eur", "phasing": "eagle", "r2_filter": "0.3", "mode": "imputation", **options}
        request = Submission(
            services=list(services or [next(iter(self.services))]),
            panel=PANEL,
            build=options.pop("build", "hg19"),
            files=list(files) if files is not None else [self.vcf()],
            **options,
        )
        return submit(self.config, self.store, request)

    def start(self) -> Daemon:
        daemon = self._daemon()
        daemon.start()
        return daemon

    def stop_daemon(self) -> None:
        """Stop the daemon as SIGTERM would (in-flight steps finish), so every log line is written; the
        simulators and the database stay for assertions."""
        daemon, self.daemon = self.daemon, None
        if daemon is None:
            return
        daemon.request_stop()
        if daemon.scheduler.running:
            daemon.stop()
        else:
            daemon.pool.shutdown(wait=True)
            daemon.adapters.close()
            daemon.engine.dispose()
        self._final_store, self._final_engine = daemon.store, daemon.engine

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.stop_daemon()
            if self._final_engine is not None:
                self._final_engine.dispose()
        finally:
            for cleanup in self.extra_cleanup:
                cleanup()
            for service in self.services.values():
                service.sim.stop()
            self.logs.close()

    # -- waiting (bounded polling of the database)

    def wait_until(self, predicate: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition",
                   interval: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{self.logs.dump()}")
            time.sleep(interval)

    def wait_ticks(self, rounds: int = 2, names: Sequence[str] = ("dispatch", "poll", "maintenance"),
                   timeout: float = 10.0) -> None:
        """Wait until each named tick has run `rounds` more times (at least once after every earlier round)."""
        daemon = self._daemon()
        for _ in range(rounds):
            mark = time.monotonic()
            self.wait_until(lambda mark=mark: all(daemon._last_tick.get(n, 0.0) > mark for n in names), timeout=timeout,
                            what=f"ticks {', '.join(names)}")

    def job(self, job_id: uuid.UUID) -> Job:
        return self.store.admin.get(job_id, with_events=True)

    def wait_state(self, job_id: uuid.UUID, *states: str | JobState, timeout: float = 20.0) -> Job:
        """Wait until the job is in one of `states` (default: any terminal state); a job that reaches another
        terminal state fails the wait at once, with its history."""
        wanted = {JobState(s) for s in states} or set(TERMINAL)

        def reached() -> Job | None:
            job = self.job(job_id)
            if job.state in wanted:
                return job
            if job.state in TERMINAL:
                raise AssertionError(f"job ended {job.state.value} ({job.error}), wanted {sorted(wanted)}\n"
                                     f"{self.history_text(job)}\n{self.logs.dump()}")
            return None

        return self.wait_until(reached, timeout=timeout, what=f"job {job_id} to be {sorted(wanted)}")

    def wait_job(self, job_id: uuid.UUID, predicate: Callable[[Job], Any], *, timeout: float = 20.0,
                 what: str = "job condition") -> Job:
        def check() -> Job | None:
            job = self.job(job_id)
            return job if predicate(job) else None

        return self.wait_until(check, timeout=timeout, what=what)

    def wait_remote_id(self, job_id: uuid.UUID, timeout: float = 20.0) -> str:
        return self.wait_job(job_id, lambda j: j.remote_id is not None, timeout=timeout,
                             what="a remote id").remote_id

    # -- looking at results

    @staticmethod
    def transitions(job: Job) -> list[tuple[str | None, str]]:
        return [(e.from_state, e.to_state) for e in sorted(job.events, key=lambda e: (e.at, e.id))]

    @staticmethod
    def states_visited(job: Job) -> list[str]:
        return [to for _, to in Harness.transitions(job)]

    @staticmethod
    def history_text(job: Job) -> str:
        return "\n".join(f"  {e.from_state} -> {e.to_state}: {e.reason}"
                         for e in sorted(job.events, key=lambda e: (e.at, e.id)))

    def service_for(self, job: Job) -> Service:
        return self.services[job.service]

    def assert_outputs_match(self, job: Job) -> None:
        """Every output verified, stored under its (sub)folder name, with our sha256 equal to the sha256 of the
        bytes the simulator serves for that file and of the bytes on disk; each file fetched exactly once."""
        sim = self.service_for(job).sim
        assert job.remote_id is not None
        served = sorted(sim.file_names(job.remote_id))
        assert sorted(o.name for o in job.outputs) == served, "outputs differ from the files the server published"
        result_dir = Path(job.result_dir)
        for output in job.outputs:
            assert output.state.value == "verified", (output.name, output.state, output.error)
            expected = hashlib.sha256(sim.file_bytes(job.remote_id, output.name)).hexdigest()
            assert output.sha256 == expected == sim.file_sha256(job.remote_id, output.name), output.name
            local = Path(output.local_path)
            assert local == result_dir.joinpath(*output.name.split("/")), output.local_path
            assert hashlib.sha256(local.read_bytes()).hexdigest() == expected, output.name
            assert output.size == local.stat().st_size
        assert not (result_dir / ".partial").exists(), "a partial download was left behind"

    def downloads_of(self, job: Job, name: str) -> list[dict[str, Any]]:
        """What the simulator served for one file of a job: one entry per GET (status, bytes, fault)."""
        sim = self.service_for(job).sim
        return [d for d in sim.stats()["downloads"] if d["job"] == job.remote_id and d["name"] == name]

    # -- steering the simulator

    def publish_with_fault(self, service: str, remote_id: str, file_name: str, kind: str, **params: Any) -> None:
        """Finish a remote job now (it must be EXPORTING) and arm a fault on one of its files before any poll can
        see it finished: both happen under the simulator's lock, which every API answer needs."""
        sim = self.services[service].sim
        with sim.sim.lock:
            state = sim.job_state(remote_id)
            assert state == State.EXPORTING, f"remote job is {State(state).name}, not EXPORTING"
            sim.set_timings(export=0.0)  # advances: SUCCESS, files published with their download hashes
            path = urlsplit(sim.download_url(remote_id, file_name)).path
            sim.faults.add(kind, path=path, **params)

    def force_remote_state(self, service: str, remote_id: str, state: int, *, visible: bool = False) -> None:
        """Put a remote job into state number `state`, which the simulator would not reach by itself (an unknown
        number, or DELETED). The simulator answers 404 for a DELETED job, as Cloudgene does; `visible=True` makes
        it answer the job with state 10 instead, as a server might while the deletion is in progress."""
        sim = self.services[service].sim
        with sim.sim.lock:
            sim.sim.advance()
            job = sim.sim.jobs[remote_id]
            job.state = state  # type: ignore[assignment]  # a plain int for numbers State does not know
            job.since = sim.sim.clock()
            if visible and state == State.DELETED:
                original = sim.sim.get_job

                def get_job(job_id, account):  # type: ignore[no-untyped-def]
                    found = sim.sim.jobs.get(job_id)
                    if found is not None and found.state == State.DELETED and found.username == account.username:
                        return found
                    return original(job_id, account)

                sim.sim.get_job = get_job  # type: ignore[method-assign]


def _write_config(root: Path, db_url: str, services: dict[str, Service], scheduler: dict[str, Any],
                  service_overrides: dict[str, dict[str, Any]]) -> Path:
    data = {
        "storage": {"state_dir": str(root / "state")},
        "database": {"url": db_url},
        "logging": {"format": "json", "level": "debug"},
        "scheduler": {**SCHEDULER_DEFAULTS, **scheduler},
        "services": {
            name: {
                "type": "cloudgene",
                "base_url": s.sim.base_url,
                "token_file": str(s.token_file),
                **SERVICE_DEFAULTS,
                "panels": {PANEL: {"id": PANEL_ID, "builds": ["hg19", "hg38"],
                                   "populations": ["eur", "afr", "amr", "eas", "sas", "all"]}},
                **service_overrides.get(name, {}),
            }
            for name, s in services.items()
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def make_harness(
    root: Path,
    db_url: str,
    *,
    services: Sequence[str] = ("mis",),
    timings: Timings = FAST,
    scheduler: dict[str, Any] | None = None,
    service: dict[str, Any] | None = None,
    per_service: dict[str, dict[str, Any]] | None = None,
    sim_options: dict[str, Any] | None = None,
    log_level: str = "debug",
) -> Harness:
    """Start one simulator per service (its own token, user `alice`) and load a config pointing at them; the
    daemon is built on first use of `store` and started by `start()`."""
    root.mkdir(parents=True, exist_ok=True)
    logs = LogCapture(log_level)
    started: dict[str, Service] = {}
    try:
        for name in services:
            token = f"tok-{name}-{uuid.uuid4().hex}"
            sim = SimulatedCloudgene({token: USER}, timings=timings, **(sim_options or {})).start()
            token_file = root / f"{name}.token"
            token_file.write_text(token + "\n", encoding="utf-8")
            token_file.chmod(0o600)
            started[name] = Service(name, sim, token, token_file, RequestLog(sim))
        overrides = {name: {**(service or {}), **(per_service or {}).get(name, {})} for name in services}
        config_path = _write_config(root, db_url, started, scheduler or {}, overrides)
        config = load_config(config_path)
    except BaseException:
        for s in started.values():
            s.sim.stop()
        logs.close()
        raise
    return Harness(root=root, db_url=db_url, services=started, config_path=config_path, config=config, logs=logs)


@pytest.fixture
def e2e(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """A factory: `e2e(db_url=None, **make_harness options)` -> a Harness, stopped (daemon, simulators, log
    capture) after the test. Without `db_url` it uses a fresh migrated SQLite file (`sqlite_url`)."""
    made: list[Harness] = []

    def make(db_url: str | None = None, **options: Any) -> Harness:
        url = db_url or request.getfixturevalue("sqlite_url")
        harness = make_harness(tmp_path / f"e2e{len(made)}", url, **options)
        made.append(harness)
        return harness

    yield make
    for harness in reversed(made):
        harness.stop()


__all__ = ["FAST", "Harness", "LogCapture", "PANEL", "PANEL_ID", "RequestLog", "Service", "e2e", "make_harness"]
