"""Helpers shared by the benchmark scripts (not a benchmark itself).

- databases: a migrated SQLite file or a database on a throwaway PostgreSQL cluster (tests/support/pg.py,
  imported by path),
  and a fast Core bulk insert of realistic job rows;
- processes: RSS / PSS / CPU of a process tree read from /proc;
- the simulated Cloudgene server in its own process, with its control API;
- small formatting helpers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TESTS_DIR = REPO / "tests"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------------- printing


def banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------------------- databases


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster from tests/support/pg.py (imported by path, not copied); None without
    binaries."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from support import pg  # tests/support/pg.py

    if pg.find_bindir() is None:
        yield None
        return
    cluster = pg.PostgresCluster.create()
    try:
        yield cluster
    finally:
        cluster.close()


def migrated_engine(url: str, *, pool_size: int = 5):
    from daemon.db.engine import make_engine
    from daemon.db.schema import upgrade

    engine = make_engine(url, pool_size=pool_size)
    upgrade(engine)
    return engine


#: How the active 5 % of a realistic table is spread over our states (fractions of the active jobs).
ACTIVE_MIX = {
    "pending": 0.20,
    "submitting": 0.006,
    "queued": 0.30,
    "running": 0.44,
    "downloading": 0.012,
    "cancel_requested": 0.002,
    "blocked": 0.04,
}
FINISHED_MIX = {"completed": 0.90, "failed": 0.08, "cancelled": 0.02}
SERVICES = ("michigan", "topmed", "h3africa")


def _pick(rng: random.Random, mix: dict[str, float], n: int) -> list[str]:
    out: list[str] = []
    names = list(mix)
    for name in names[:-1]:
        out += [name] * round(n * mix[name])
    out += [names[-1]] * (n - len(out))
    rng.shuffle(out)
    return out


def job_rows(
    n_total: int,
    *,
    active_fraction: float = 0.05,
    now: dt.datetime | None = None,
    seed: int = 1,
    services: Sequence[str] = SERVICES,
    poll_interval: float = 60.0,
) -> list[dict[str, Any]]:
    """Rows for the jobs table: (1 - active_fraction) finished over the last two years, the rest active across
    `services` with a realistic `next_poll_at` spread:

    - queued/running: polled every `poll_interval` (jittered) → due times spread over [now - 5 s, now + interval];
      1 in 20 is backing off after errors (due within the next 15 minutes);
    - submitting/downloading/cancel_requested: due now (a tick lag of up to 5 s);
    - pending: waiting for a free slot (no next_poll_at); blocked: parked (no next_poll_at).
    """
    rng = random.Random(seed)
    now = now or dt.datetime.now(dt.UTC)
    n_active = round(n_total * active_fraction)
    states = _pick(rng, FINISHED_MIX, n_total - n_active) + _pick(rng, ACTIVE_MIX, n_active)
    rows = []
    for state in states:
        job_id = uuid.uuid4()
        finished = state in FINISHED_MIX
        created = now - dt.timedelta(seconds=rng.uniform(0, 2 * 365 * 86400) if finished else rng.uniform(0, 86400))
        next_poll = None
        if state in ("queued", "running"):
            if rng.random() < 0.05:
                next_poll = now + dt.timedelta(seconds=rng.uniform(0, 900))
            else:
                next_poll = now + dt.timedelta(seconds=rng.uniform(-5, poll_interval * 1.1))
        elif state in ("submitting", "downloading", "cancel_requested"):
            next_poll = now - dt.timedelta(seconds=rng.uniform(0, 5))
        remote = state not in ("pending", "submitting", "blocked") or (state == "blocked" and rng.random() < 0.5)
        rows.append({
            "id": job_id,
            "group_id": job_id,
            "service": services[rng.randrange(len(services))],
            "panel": "1000g-phase3",
            "build": "hg19",
            "population": "eur",
            "phasing": "eagle",
            "r2_filter": "0.3",
            "mode": "imputation",
            "name": f"cohort batch {rng.randrange(10000)}",
            "password": None,
            "state": state,
            "remote_state": "4" if state == "completed" else ("2" if state == "running" else None),
            "remote_id": f"job-{rng.randrange(10**12):012d}" if remote else None,
            "progress": None,
            "queue_position": None,
            "submit_attempts": 1 if remote else 0,
            "restart_attempts": 0,
            "retries": 0,
            "failures": 0,
            "next_poll_at": next_poll,
            "lease_owner": None,
            "lease_expires_at": None,
            "error": "remote job failed" if state == "failed" else None,
            "error_kind": "remote_failed" if state == "failed" else None,
            "result_dir": f"/var/lib/imputationd/results/{job_id}" if state == "completed" else None,
            "created_at": created,
            "updated_at": created + dt.timedelta(hours=3) if finished else created,
            "submitted_at": created if remote else None,
            "finished_at": created + dt.timedelta(hours=3) if finished else None,
        })
    return rows


def bulk_insert_jobs(engine, rows: list[dict[str, Any]], *, batch: int = 10_000) -> float:
    """Insert job rows with Core executemany in batches; returns seconds taken."""
    from daemon.db.models import Job

    table = Job.__table__
    started = time.perf_counter()
    with engine.begin() as conn:
        for i in range(0, len(rows), batch):
            conn.execute(table.insert(), rows[i:i + batch])
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------- processes

_KB = re.compile(r"(\d+)\s*kB")


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(_KB.search(line).group(1))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_mb(pid: int | None = None) -> float:
    """Resident set size (VmRSS) of a process in MiB."""
    return _status_kb(pid or os.getpid(), "VmRSS") / 1024


def pss_mb(pid: int) -> float:
    """Proportional set size (shared pages divided among their sharers) in MiB; falls back to RSS."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(_KB.search(line).group(1)) / 1024
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        pass
    return rss_mb(pid)


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc/*/stat parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_memory(pids: Sequence[int]) -> tuple[float, float, int]:
    """(sum RSS MiB, sum PSS MiB, process count) over `pids` and all their descendants."""
    every = set()
    for pid in pids:
        every.add(pid)
        every.update(children(pid))
    every = {p for p in every if os.path.exists(f"/proc/{p}")}
    return sum(rss_mb(p) for p in every), sum(pss_mb(p) for p in every), len(every)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds a process has used."""
    return sum(cpu_times(pid))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process we started, SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------------------------------------------- venvs

#: imputationd installed as production installs it (see `runtime_venv`); outside the checkout.
RUNTIME_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imputationd-bench" / "runtime-venv"


def runtime_venv() -> Path:
    """A venv holding imputationd as deployed: `pip install` of this checkout with its runtime dependencies only
    (no test extras: the project's .venv also has click, pygments, cffi… which httpx and pycryptodomex import when
    they find them, ~5 MiB a production daemon does not carry), compiled to bytecode as a wheel install is.
    Created once, the package itself reinstalled on every call so it is this checkout's code. Returns the path of
    its `imputationd` script."""
    python = RUNTIME_VENV / "bin" / "python"
    if not python.exists():
        RUNTIME_VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(RUNTIME_VENV)],
                       check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(REPO)], check=True, env=env)  # dependencies (no-op when satisfied)
    subprocess.run([*pip, "--no-deps", "--force-reinstall", str(REPO)], check=True, env=env)
    return RUNTIME_VENV / "bin" / "imputationd"


# ---------------------------------------------------------------------------------------------------- simulator

SIM_SCRIPT = r"""
import json, shutil, sys, threading, signal, tempfile
from pathlib import Path
from daemon.simulator import SimulatedCloudgene, Timings
from daemon.simulator.model import Job
from daemon.simulator.results import JobParams
opts = json.loads(sys.argv[1])
timings = Timings(**opts.pop("timings"))
latency = opts.pop("latency")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
files = Path(tempfile.mkdtemp(prefix="imputationd-bench-sim-", dir=opts["files_in"]))
with SimulatedCloudgene({opts["token"]: "bench"}, timings=timings, max_jobs_per_user=opts["max_jobs"],
                        download_limit=-1, workdir=files) as sim:
    if latency:
        sim.faults.latency(latency, path="/")
    ids = []
    if opts["precreate"]:
        # Jobs that exist on the server without an upload (they never finish with the timings the caller chose).
        account = sim.sim.accounts[opts["token"]]
        params = JobParams(refpanel="apps@1000g-phase-3-v5@2.0.0", build="hg19", r2_filter=0.3, phasing="eagle",
                           population="eur", mode="imputation", aes=False, meta=False, password="bench-password",
                           password_generated=False)
        workdir = files / "precreated"
        workdir.mkdir()
        with sim.sim.lock:  # straight into the model: add_job re-counts every job per call (quadratic)
            for i in range(opts["precreate"]):
                now = sim.sim.clock()
                job_id = sim.sim._new_id(now)
                sim.sim.jobs[job_id] = Job(id=job_id, username=account.username, name=f"bench-{i}",
                                           raw_name=f"bench-{i}", app_id="imputationserver2",
                                           app_version=sim.sim.app_version, user_agent="bench", params=params,
                                           workdir=workdir, submitted=now, since=now)
                ids.append(job_id)
    print(json.dumps({"base_url": sim.base_url, "ids": ids}), flush=True)
    stop.wait()
shutil.rmtree(files, ignore_errors=True)
"""

#: Where the simulator keeps its uploads and results: in memory when the machine has a tmpfs for it. The server's
#: disk work is not the daemon's, but on these VMs creating a file costs real CPU (ext4 without a journal scans
#: for recently deleted inodes): on the simulator's files, it was half of its CPU per job in bench/throughput.py,
#: taken from the two cores the daemon under test runs on.
SIM_FILES_IN = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class SimulatorProcess:
    """The simulated Cloudgene server in a process of its own (so its CPU and memory are not ours)."""

    def __init__(self, *, token: str = "bench-token", latency: float = 0.0, timings: dict | None = None,
                 max_jobs: int = 1_000_000, precreate: int = 0) -> None:
        opts = {"token": token, "latency": latency, "timings": timings or {"queue": 0, "run": 0, "export": 0},
                "max_jobs": max_jobs, "precreate": precreate, "files_in": SIM_FILES_IN}
        self.token = token
        self.proc = subprocess.Popen([sys.executable, "-c", SIM_SCRIPT, json.dumps(opts)], cwd=REPO,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator did not start")
        started = json.loads(line)
        self.base_url = started["base_url"]
        #: Ids of the jobs created at start (`precreate`).
        self.job_ids: list[str] = started["ids"]

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.base_url + "/_sim/stats", timeout=60).json()

    def close(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_config(path: Path, *, state_dir: Path, db_url: str, base_url: str, token_file: Path,
                 services: Sequence[str] = ("sim",), workers: int = 8, tick: float = 5.0, poll_interval: float = 60.0,
                 max_concurrent: int = 1000, batch_size: int = 200, lease_seconds: float = 120.0,
                 log_level: str = "warning") -> Path:
    """A daemon config for the simulator at `base_url` (one entry per service name, all pointing at it)."""
    lines = [
        "storage:",
        f"  state_dir: {state_dir}",
        "database:",
        f"  url: {db_url}",
        "logging:",
        "  format: json",
        f"  level: {log_level}",
        "scheduler:",
        f"  workers: {workers}",
        f"  dispatch_interval: {tick}",
        f"  poll_tick_interval: {tick}",
        f"  download_interval: {tick}",
        "  maintenance_interval: 60",
        f"  lease_seconds: {lease_seconds}",
        f"  batch_size: {batch_size}",
        "  backoff_initial: 0.5",
        "  backoff_max: 5",
        "services:",
    ]
    for name in services:
        lines += [
            f"  {name}:",
            "    type: cloudgene",
            f"    base_url: {base_url}",
            f"    token_file: {token_file}",
            f"    poll_interval: {poll_interval}",
            f"    max_concurrent_jobs: {max_concurrent}",
            "    panels:",
            "      1000g-phase3:",
            "        id: apps@1000g-phase-3-v5@2.0.0",
            "        builds: [hg19, hg38]",
            "        populations: [eur, afr, amr, eas, sas, all]",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def unit_environment() -> dict[str, str]:
    """The variables `systemd/imputationd.service` sets with Environment= (MALLOC_ARENA_MAX among them): a daemon
    is measured as the shipped unit starts it."""
    env: dict[str, str] = {}
    for line in (REPO / "systemd" / "imputationd.service").read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.split("=", 1)[1]):
                key, _, value = item.partition("=")
                env[key] = value
    return env
