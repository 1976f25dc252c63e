"""Memory: the RSS of a real `imputationd run` process, idle and with thousands of active jobs being polled.

    .venv/bin/python bench/memory.py                          # idle, then 5,000 active jobs for 75 s
    .venv/bin/python bench/memory.py --jobs 20000 --duration 150

Idle: a migrated empty SQLite database, one service pointing at the simulated Cloudgene server (its own process);
the daemon runs every tick a few times (--settle seconds), then its RSS is sampled.

Active: the simulator is started with N jobs that run for ever; the database gets N matching jobs (half queued,
half running, remote ids set) due over the next poll_interval (default 60 s, the config default), and the daemon
polls them (8 workers, 5 s ticks: the config defaults). RSS is sampled every 0.5 s for --duration seconds; the
number of status calls the server answered shows the jobs really were polled.

Idle with the API: the same idle daemon with `api.listen` set (the HTTP API and dashboard loaded and listening).

Targets: idle <= 80 MB (with and without the API), with 5,000 active jobs <= 120 MB (RSS, MiB = 2^20 bytes printed
beside MB = 10^6).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

TARGET_IDLE_MB = 80.0
TARGET_ACTIVE_MB = 120.0
SERVICE = "sim"


def mb(mib: float) -> float:
    return mib * (1 << 20) / 1e6


def active_rows(remote_ids: list[str], poll_interval: float) -> list[dict]:
    rng = random.Random(2)
    now = dt.datetime.now(dt.UTC)
    rows = c.job_rows(len(remote_ids), active_fraction=1.0, services=[SERVICE])
    for i, (row, remote) in enumerate(zip(rows, remote_ids, strict=True)):
        row.update(state="queued" if i % 2 else "running", remote_id=remote, remote_state="1" if i % 2 else "2",
                   next_poll_at=now + dt.timedelta(seconds=rng.uniform(0, poll_interval)), submit_attempts=1,
                   submitted_at=now, password=None)
    return rows


def run_daemon(root: Path, config: Path, seconds: float, label: str, env: dict[str, str], command: Path
               ) -> dict[str, float]:
    """Start `imputationd run`, wait for it, sample its RSS for `seconds`; returns peak/final/median RSS MiB."""
    log_path = root / f"{label}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(command), "run", "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    try:
        deadline = time.monotonic() + 60
        while '"daemon_started"' not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{log_path.read_text()[-3000:]}")
            samples.append(c.rss_mb(proc.pid))
            time.sleep(0.5)
        cpu = c.cpu_seconds(proc.pid)
        return {"peak": max(samples), "final": samples[-1], "median": c.median(samples), "cpu": cpu,
                "threads": len(os.listdir(f"/proc/{proc.pid}/task"))}
    finally:
        c.stop_process(proc)


def setup(root: Path, base_url: str, token: str, db_url: str, poll_interval: float, *, api: bool = False) -> Path:
    token_file = root / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = c.write_config(root / "config.yaml", state_dir=root / "state", db_url=db_url, base_url=base_url,
                            token_file=token_file, services=[SERVICE], workers=8, tick=5.0,
                            poll_interval=poll_interval, max_concurrent=1000, log_level="info")
    if api:
        with open(config, "a", encoding="utf-8") as file:
            file.write(f'api:\n  listen: "127.0.0.1:{c.free_port()}"\n')
    return config


def run(jobs: int, duration: float, settle: float, poll_interval: float, extra_env: dict[str, str] | None = None,
        project_venv: bool = False) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="imputationd-bench-memory-"))
    out: dict[str, float] = {}
    # The daemon is measured as the shipped unit starts it: with the unit's Environment= lines.
    env = {**os.environ, **c.unit_environment(), **(extra_env or {})}
    if project_venv:
        command = Path(sys.executable).with_name("imputationd")
    else:
        print("installing imputationd into the runtime venv (runtime dependencies only) …", flush=True)
        command = c.runtime_venv()
    try:
        # -- idle
        (root / "idle").mkdir()
        db_url = f"sqlite:///{root / 'idle' / 'imputationd.db'}"
        c.migrated_engine(db_url).dispose()
        with c.SimulatorProcess() as sim:
            config = setup(root / "idle", sim.base_url, sim.token, db_url, poll_interval)
            idle = run_daemon(root / "idle", config, settle, "idle", env, command)
            config = setup(root / "idle", sim.base_url, sim.token, db_url, poll_interval, api=True)
            idle_api = run_daemon(root / "idle", config, settle, "idle-api", env, command)
        # -- active
        (root / "active").mkdir()
        db_url = f"sqlite:///{root / 'active' / 'imputationd.db'}"
        started = time.perf_counter()
        with c.SimulatorProcess(timings={"queue": 0, "run": 1e9, "export": 0}, precreate=jobs) as sim:
            engine = c.migrated_engine(db_url)
            c.bulk_insert_jobs(engine, active_rows(sim.job_ids, poll_interval))
            engine.dispose()
            print(f"  {jobs} jobs on the server and in the database in {time.perf_counter() - started:.1f} s",
                  flush=True)
            config = setup(root / "active", sim.base_url, sim.token, db_url, poll_interval)
            before = sim.stats()["requests"].get("GET /api/v2/jobs/{id}/status", 0)
            active = run_daemon(root / "active", config, duration, "active", env, command)
            polls = sim.stats()["requests"].get("GET /api/v2/jobs/{id}/status", 0) - before
        c.banner(f"memory: imputationd run, RSS (idle {settle:g} s; {jobs} active jobs, poll_interval "
                 f"{poll_interval:g} s, {duration:g} s)")
        ok_idle = mb(idle["median"]) <= TARGET_IDLE_MB
        ok_active = mb(active["peak"]) <= TARGET_ACTIVE_MB
        ok_idle_api = mb(idle_api["median"]) <= TARGET_IDLE_MB
        print(f"  idle:   median {idle['median']:.1f} MiB = {mb(idle['median']):.1f} MB (peak {idle['peak']:.1f} MiB, "
              f"{idle['threads']} threads)   target <= {TARGET_IDLE_MB:g} MB   {c.verdict(ok_idle)}")
        print(f"  idle, API listening: median {idle_api['median']:.1f} MiB = {mb(idle_api['median']):.1f} MB (peak "
              f"{idle_api['peak']:.1f} MiB, {idle_api['threads']} threads)   target <= {TARGET_IDLE_MB:g} MB   "
              f"{c.verdict(ok_idle_api)}")
        print(f"  active: peak {active['peak']:.1f} MiB = {mb(active['peak']):.1f} MB (median {active['median']:.1f}, "
              f"final {active['final']:.1f} MiB, {active['threads']} threads)   target <= {TARGET_ACTIVE_MB:g} MB   "
              f"{c.verdict(ok_active)}")
        print(f"  status calls answered while sampling: {polls} ({polls / duration:.1f}/s; "
              f"{jobs / poll_interval:.1f}/s would poll every job once per poll_interval); daemon CPU "
              f"{active['cpu']:.1f} s")
        out = {"idle": mb(idle["median"]), "idle_api": mb(idle_api["median"]), "active": mb(active["peak"]),
               "polls": polls}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=75.0, help="seconds of sampling with the active jobs")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds of sampling the idle daemon")
    parser.add_argument("--poll-interval", type=float, default=60.0)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra daemon environment")
    parser.add_argument("--project-venv", action="store_true",
                        help="run the daemon from the project's .venv (test extras too) instead of a runtime-only one")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    run(args.jobs, args.duration, args.settle, args.poll_interval, extra, args.project_venv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
