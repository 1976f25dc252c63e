"""Against the stack imputationd replaces: Celery worker (prefork, concurrency 4) + celery beat + Redis, polling the
same simulated Cloudgene server the way the old worker did, next to one `imputationd run`.

    .venv/bin/python bench/celery_compare.py                  # 200 jobs, 60 s each side
    .venv/bin/python bench/celery_compare.py --jobs 5000 --seconds 120

Installs what it needs on first use: Debian's `redis-server` (apt-get, when missing) and a venv of its own at
bench/.venv with celery[redis] and httpx (celery is not a dependency of the project). imputationd runs from the
runtime-only venv that bench/memory.py uses (`_common.runtime_venv`).

The old stack, minimal but faithful: beat sends a `dispatch` task every 5 s; dispatch enqueues one `track` task per
job not yet enqueued; `track` holds its worker slot until the job is done, polling every poll_interval seconds with
`asyncio.run()` around a fresh `httpx.AsyncClient` per poll (what the old worker did, and what died with "Event
loop is closed"). The simulator's jobs run for ever, so a slot once taken is never given back.

Printed for both: memory = sum of RSS of every process of the stack (PSS beside it: forked workers share pages, so
the RSS sum counts shared pages once per process), and jobs in flight = how many distinct jobs were being tracked
(polled) during the run. Targets: imputationd uses >= 5x less memory (RSS sum), and has no fixed cap on jobs in
flight (all N are polled; Celery's are capped at its concurrency).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

BENCH_VENV = c.BENCH_DIR / ".venv"
TARGET_MEMORY_RATIO = 5.0
CONCURRENCY = 4

CELERY_APP = r'''
"""The old worker, as small as it gets: one task per job that holds its slot while the remote job runs."""
import asyncio, json, os, time

import httpx
import redis
from celery import Celery

SETTINGS = json.loads(os.environ["BENCH_SETTINGS"])
app = Celery("oldstack", broker=SETTINGS["broker"])
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True, broker_connection_retry_on_startup=True,
                beat_schedule={"dispatch": {"task": "oldstack_app.dispatch", "schedule": 5.0}})
_redis = redis.Redis.from_url(SETTINGS["broker"])


async def _status(remote_id):
    async with httpx.AsyncClient(base_url=SETTINGS["api"], timeout=30) as client:
        response = await client.get(f"/jobs/{remote_id}/status", headers={"X-Auth-Token": SETTINGS["token"]})
        return response.json()["state"]


@app.task
def dispatch():
    for remote_id in SETTINGS["jobs"]:
        if _redis.sadd("bench:enqueued", remote_id):
            track.delay(remote_id)


@app.task
def track(remote_id):
    _redis.sadd("bench:tracking", remote_id)
    while True:
        state = asyncio.run(_status(remote_id))
        _redis.incr("bench:polls")
        if state in (4, 5, 6, 7, 8, 9, 10):  # finished one way or another
            return state
        time.sleep(SETTINGS["poll_interval"])
'''

REDIS_COUNTS = r'''
import json, sys, redis
r = redis.Redis.from_url(sys.argv[1])
print(json.dumps({"tracking": r.scard("bench:tracking"), "enqueued": r.scard("bench:enqueued"),
                  "polls": int(r.get("bench:polls") or 0), "queued": r.llen("celery")}))
'''


def ensure_redis() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    print("installing redis-server (apt-get) …", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"], check=True,
                   env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    # The package starts its own service on 6379 where there is an init system; ours runs on a port of its own.
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def ensure_bench_venv() -> Path:
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {BENCH_VENV} with celery[redis] and httpx …", flush=True)
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(BENCH_VENV)], check=True)
    check = subprocess.run([str(python), "-c", "import celery, redis, httpx"], capture_output=True)
    if check.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "celery[redis]",
                        "httpx"], check=True)
    return python


def sample(pids_of, seconds: float) -> dict[str, float]:
    """Sample the memory of the processes `pids_of()` returns every second; the medians of the last half."""
    rss, pss, count = [], [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r, p, n = c.tree_memory(pids_of())
        rss.append(r)
        pss.append(p)
        count.append(n)
        time.sleep(1.0)
    half = len(rss) // 2
    return {"rss": c.median(rss[half:]), "pss": c.median(pss[half:]), "processes": max(count),
            "rss_peak": max(rss)}


def run_celery(work: Path, python: Path, redis_server: str, sim: c.SimulatorProcess, seconds: float,
               poll_interval: float) -> dict[str, float]:
    port = c.free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        redis_log = open(work / "redis.log", "w")
        logs.append(redis_log)
        procs.append(subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--daemonize", "no"], stdout=redis_log,
                                      stderr=subprocess.STDOUT, cwd=work))
        deadline = time.monotonic() + 20
        while subprocess.run([str(python), "-c", REDIS_COUNTS, broker], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis did not start: {(work / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.2)
        (work / "oldstack_app.py").write_text(CELERY_APP)
        env = {**os.environ, "BENCH_SETTINGS": json.dumps({
            "broker": broker, "api": sim.base_url + "/api/v2", "token": sim.token, "jobs": sim.job_ids,
            "poll_interval": poll_interval}), "PYTHONPATH": str(work)}
        celery = str(python.with_name("celery"))
        for name, args in (("worker", ["worker", "--pool", "prefork", "--concurrency", str(CONCURRENCY),
                                       "--loglevel", "WARNING"]),
                           ("beat", ["beat", "--loglevel", "WARNING", "--schedule", str(work / "beat-schedule")])):
            log = open(work / f"celery-{name}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen([celery, "-A", "oldstack_app", *args], stdout=log,
                                          stderr=subprocess.STDOUT, cwd=work, env=env))
        time.sleep(3)
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a process of the Celery stack exited: {p.args}\n"
                                   + "\n".join(f.name + ":\n" + Path(f.name).read_text()[-1500:] for f in logs))
        memory = sample(lambda: [p.pid for p in procs], seconds)
        counts = json.loads(subprocess.run([str(python), "-c", REDIS_COUNTS, broker], capture_output=True,
                                           text=True, check=True).stdout)
        return {**memory, "in_flight": counts["tracking"], "waiting": counts["enqueued"] - counts["tracking"],
                "polls": counts["polls"]}
    finally:
        for p in reversed(procs):
            c.stop_process(p)
        for log in logs:
            log.close()


def run_imputationd(work: Path, command: Path, sim: c.SimulatorProcess, seconds: float, poll_interval: float
                    ) -> dict[str, float]:
    import datetime as dt

    import sqlalchemy as sa

    sys.path.insert(0, str(c.BENCH_DIR))
    from memory import active_rows

    db_url = f"sqlite:///{work / 'state' / 'imputationd.db'}"
    (work / "state").mkdir()
    engine = c.migrated_engine(db_url)
    c.bulk_insert_jobs(engine, active_rows(sim.job_ids, poll_interval))
    token_file = work / "token"
    token_file.write_text(sim.token + "\n")
    token_file.chmod(0o600)
    config = c.write_config(work / "config.yaml", state_dir=work / "state", db_url=db_url, base_url=sim.base_url,
                            token_file=token_file, services=["sim"], workers=8, tick=5.0,
                            poll_interval=poll_interval, max_concurrent=1000, log_level="info")
    started = dt.datetime.now(dt.UTC)
    with open(work / "imputationd.log", "w") as log:
        proc = subprocess.Popen([str(command), "run", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                cwd=work, env={**os.environ, **c.unit_environment()})
    try:
        time.sleep(3)
        if proc.poll() is not None:
            raise RuntimeError(f"imputationd exited:\n{(work / 'imputationd.log').read_text()[-3000:]}")
        memory = sample(lambda: [proc.pid], seconds)
    finally:
        c.stop_process(proc)
    jobs = sa.table("jobs", sa.column("updated_at"), sa.column("remote_state"))
    with engine.connect() as conn:
        # A poll writes the job (updated_at); the rows were inserted with an older updated_at.
        polled = conn.execute(sa.select(sa.func.count()).select_from(jobs)
                              .where(jobs.c.updated_at >= started.replace(tzinfo=None))).scalar()
    engine.dispose()
    return {**memory, "in_flight": polled, "waiting": len(sim.job_ids) - polled}


def run(n_jobs: int, seconds: float, poll_interval: float) -> dict[str, float]:
    redis_server = ensure_redis()
    python = ensure_bench_venv()
    print("installing imputationd into the runtime venv …", flush=True)
    command = c.runtime_venv()
    work = Path(tempfile.mkdtemp(prefix="imputationd-bench-celery-"))
    try:
        (work / "celery").mkdir()
        (work / "imputationd").mkdir()
        timings = {"queue": 0, "run": 1e9, "export": 0}
        with c.SimulatorProcess(timings=timings, precreate=n_jobs) as sim:
            print(f"Celery stack: {n_jobs} jobs, {seconds:g} s …", flush=True)
            old = run_celery(work / "celery", python, redis_server, sim, seconds, poll_interval)
        with c.SimulatorProcess(timings=timings, precreate=n_jobs) as sim:
            print(f"imputationd: {n_jobs} jobs, {seconds:g} s …", flush=True)
            new = run_imputationd(work / "imputationd", command, sim, seconds, poll_interval)
        ratio = old["rss"] / new["rss"]
        c.banner(f"celery_compare: {n_jobs} jobs that run for ever, poll_interval {poll_interval:g} s, "
                 f"{seconds:g} s each")
        print(f"  {'':34} {'RSS sum':>10} {'PSS sum':>10} {'processes':>10} {'jobs in flight':>15} {'waiting':>8}")
        for name, r in ((f"Celery prefork x{CONCURRENCY} + beat + Redis", old), ("imputationd run", new)):
            print(f"  {name:34} {r['rss']:7.1f} MiB {r['pss']:7.1f} MiB {r['processes']:10d} "
                  f"{r['in_flight']:15d} {r['waiting']:8d}")
        print(f"  memory: Celery stack / imputationd = {ratio:.1f}x (RSS sum; {old['pss'] / new['pss']:.1f}x by PSS)"
              f"   target >= {TARGET_MEMORY_RATIO:g}x   {c.verdict(ratio >= TARGET_MEMORY_RATIO)}")
        capped = old["in_flight"] <= CONCURRENCY and old["waiting"] > 0
        uncapped = new["in_flight"] >= n_jobs * 0.95 or new["in_flight"] > CONCURRENCY * 10
        print(f"  in flight: Celery {old['in_flight']} of {n_jobs} (capped by --concurrency {CONCURRENCY}: "
              f"{'yes' if capped else 'no'}); imputationd {new['in_flight']} of {n_jobs} polled   "
              f"{c.verdict(uncapped)}")
        return {"ratio": ratio, "celery_in_flight": old["in_flight"], "imputationd_in_flight": new["in_flight"],
                "celery_rss": old["rss"], "imputationd_rss": new["rss"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each stack runs while sampled")
    parser.add_argument("--poll-interval", type=float, default=20.0,
                        help="seconds between two polls of one job (both stacks)")
    args = parser.parse_args(argv)
    run(args.jobs, args.seconds, args.poll_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
