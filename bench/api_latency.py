"""API latency: `GET /api/v1/jobs` (a page of an owner's jobs) and `GET /api/v1/jobs/{id}` (one job with its inputs,
outputs and history) on a database of 100,000 jobs, with 16 clients at once.

    .venv/bin/python bench/api_latency.py                      # 100k jobs, 16 clients, 20 s, SQLite
    .venv/bin/python bench/api_latency.py --jobs 2000 --seconds 3 --postgres

The jobs (95 % finished over two years, `_common.job_rows`) belong to 20 owners; each has a history of five events.
`imputationd api` serves them (its own process, 16 threads, as configured). Each client is a process of its own (so
that no client waits for another's GIL) with a keep-alive connection (httpx) and one owner's read token; it
alternates a list request (the newest 50, every third one a filtered page: state=completed, then the next page by
cursor) and a one-job request for a random job of its owner's. Latency is per request as the client sees it.

Printed: p50, p99 and requests/s per route, and the API process's RSS at the end. One process answers every
request (no forked workers), so with 16 clients always waiting the latency is about 16 / its throughput, and the
throughput is what one interpreter does with the 2 cores it shares with the clients here. On one thread a list page
costs ~2.6 ms and a job ~2.1 ms (Flask's test client, no HTTP). Targets, to catch a request that got costlier:
p50 <= 100 ms and p99 <= 400 ms for each route.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

TARGET_P50_MS = 100.0
TARGET_P99_MS = 400.0
OWNERS = [f"user{n:02d}" for n in range(20)]
CLIENTS = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def populate(db_url: str, jobs: int) -> dict[str, list[uuid.UUID]]:
    """`jobs` rows spread over the owners, five events each; the ids per owner."""
    from daemon.db.models import JobEvent

    rng = random.Random(7)
    rows = c.job_rows(jobs)
    by_owner: dict[str, list[uuid.UUID]] = defaultdict(list)
    for row in rows:
        row["owner"] = rng.choice(OWNERS)
        by_owner[row["owner"]].append(row["id"])
    engine = c.migrated_engine(db_url)
    c.bulk_insert_jobs(engine, rows)
    events = []
    for row in rows:
        at = row["created_at"]
        for step, (before, after) in enumerate([(None, "pending"), ("pending", "submitting"),
                                                 ("submitting", "queued"), ("queued", "running"),
                                                 ("running", row["state"])]):
            events.append({"job_id": row["id"], "at": at + dt.timedelta(minutes=step), "from_state": before,
                           "to_state": after, "reason": "bench"})
    with engine.begin() as conn:
        for i in range(0, len(events), 20_000):
            conn.execute(JobEvent.__table__.insert(), events[i:i + 20_000])
    engine.dispose()
    return by_owner


def client(url: str, token: str, ids: list[uuid.UUID], until: float, seed: int, results: Any) -> None:
    """One client process: its latencies per route and its errors, put on `results` when time is up."""
    out: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    rng = random.Random(seed)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        turn = 0
        while time.monotonic() < until:
            turn += 1
            if turn % 2:
                params: dict[str, object] = {"limit": 50}
                if turn % 3 == 0:
                    params["state"] = "completed"
                started = time.perf_counter()
                response = http.get("/api/v1/jobs", params=params)
                out["list"].append(time.perf_counter() - started)
                cursor = response.json().get("next_cursor") if response.status_code == 200 else None
                if cursor and turn % 3 == 0:
                    started = time.perf_counter()
                    response = http.get("/api/v1/jobs", params={**params, "cursor": cursor})
                    out["list"].append(time.perf_counter() - started)
            else:
                started = time.perf_counter()
                response = http.get(f"/api/v1/jobs/{rng.choice(ids)}")
                out["one"].append(time.perf_counter() - started)
            if response.status_code != 200:
                errors.append(f"{response.status_code} {response.text[:200]}")
    results.put((dict(out), errors))


def run(jobs: int, seconds: float, postgres: bool) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="imputationd-bench-api-"))
    api = None
    cleanup = contextlib.ExitStack()
    try:
        if postgres:
            cluster = cleanup.enter_context(c.postgres_cluster())
            if cluster is None:
                raise SystemExit("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin)")
            db_url = cluster.create_database()
        else:
            db_url = f"sqlite:///{root / 'imputationd.db'}"
        started = time.perf_counter()
        by_owner = populate(db_url, jobs)
        print(f"  {jobs} jobs ({jobs * 5} events) in {time.perf_counter() - started:.1f} s", flush=True)
        engine = c.migrated_engine(db_url)
        from daemon.db.store import JobStore

        tokens = {owner: JobStore(engine).api_tokens.create(owner, "read")[1] for owner in OWNERS}
        engine.dispose()
        (root / "token").write_text("bench-token\n")
        (root / "token").chmod(0o600)
        config = c.write_config(root / "config.yaml", state_dir=root / "state", db_url=db_url,
                                base_url="http://127.0.0.1:9", token_file=root / "token")
        port = c.free_port()
        with open(config, "a", encoding="utf-8") as file:
            file.write(f'api:\n  listen: "127.0.0.1:{port}"\n  threads: {CLIENTS}\n')
        with open(root / "api.log", "wb") as log:
            api = subprocess.Popen([str(Path(sys.executable).with_name("imputationd")), "api", "-c", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/api/v1/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError((root / "api.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        latencies: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        # Processes, not threads: a client's latency must not include waiting for the other clients' GIL.
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        until = time.monotonic() + seconds + 3  # the clients' interpreters start within those 3 s
        clients = [context.Process(target=client, args=(url, tokens[OWNERS[n % len(OWNERS)]],
                                                        by_owner[OWNERS[n % len(OWNERS)]], until, n, results))
                   for n in range(CLIENTS)]
        for process in clients:
            process.start()
        for _ in clients:
            out, failed = results.get(timeout=seconds + 60)
            for route, values in out.items():
                latencies[route] += values
            errors += failed
        for process in clients:
            process.join(10)
        rss = c.rss_mb(api.pid)
        c.banner(f"api_latency: {jobs} jobs, {CLIENTS} clients for {seconds:g} s, "
                 f"{'PostgreSQL' if postgres else 'SQLite'}")
        result: dict[str, float] = {"rss": rss, "errors": len(errors)}
        for route in ("one", "list"):
            values = latencies[route]
            p50, p99 = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
            result |= {f"{route}_p50_ms": p50, f"{route}_p99_ms": p99, f"{route}_per_s": len(values) / seconds}
            label = "GET /api/v1/jobs/{id}" if route == "one" else "GET /api/v1/jobs     "
            ok = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
            print(f"  {label}  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  {len(values) / seconds:6.1f}/s   "
                  f"target p50 <= {TARGET_P50_MS:g}, p99 <= {TARGET_P99_MS:g} ms   {c.verdict(ok)}")
        print(f"  errors: {len(errors)}{' (first: ' + errors[0] + ')' if errors else ''}; API process RSS "
              f"{rss:.1f} MiB")
        return result
    finally:
        if api is not None:
            c.stop_process(api)
        cleanup.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster instead of SQLite")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.jobs, args.seconds, args.postgres)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
