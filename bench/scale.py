"""Scale: how long a scheduler tick's due-work queries take on a big jobs table, SQLite and PostgreSQL.

    .venv/bin/python bench/scale.py                      # 1k and 100k jobs, SQLite and PostgreSQL
    .venv/bin/python bench/scale.py --sizes 1000,1000000 --iterations 200 --dialects postgres

Each database gets N jobs (95 % finished over two years, 5 % active across 3 services with a realistic next_poll_at
spread, see `_common.job_rows`), bulk-inserted with Core. Then, alternating between the small and the big database
so both are measured side by side under the same machine load, it runs the three ticks the way
`daemon/scheduler.py` calls the store:

- dispatch: service_statuses, promote_pending for each of the 3 services (each has 2 free slots, so the whole
  promotion runs: count in-flight, pick the oldest pending, update, write events), claim_due(submitting);
- poll: service_statuses, claim_due(queued, running, cancel_requested);
- download: claim_due(downloading).

`limit` is the number of free workers (--workers, default 8 as in the config). Between iterations (untimed) every
claimed job is released and every promoted job put back to pending, so each iteration sees the same steady state.
Targets: median of each tick <= 20 ms at the big size, and big/small <= 2. The query plans of the big database
(EXPLAIN QUERY PLAN / EXPLAIN ANALYZE) are printed for every statement a tick sends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from daemon.db.engine import is_postgres  # noqa: E402
from daemon.db.models import Job, JobEvent  # noqa: E402
from daemon.db.store import JobStore  # noqa: E402
from daemon.states import POLLED, JobState  # noqa: E402

FREE_SLOTS = 2
OWNER = "bench-host:1:scale"
TICKS = ("dispatch", "poll", "download")
TARGET_MS = 20.0
TARGET_RATIO = 2.0


class Subject:
    """One database of one size, ready to be ticked."""

    def __init__(self, dialect: str, url: str, n_total: int, workers: int) -> None:
        self.dialect, self.n_total, self.workers = dialect, n_total, workers
        self.engine = c.migrated_engine(url, pool_size=workers + 4)
        rows = c.job_rows(n_total)
        self.insert_seconds = c.bulk_insert_jobs(self.engine, rows)
        self.active = sum(r["state"] not in c.FINISHED_MIX for r in rows)
        if is_postgres(self.engine):
            # What autovacuum does shortly after a bulk load: statistics and the visibility map.
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE jobs")
                conn.exec_driver_sql("VACUUM ANALYZE job_events")
        self.store = JobStore(self.engine)
        self.store.services.ensure_services(c.SERVICES)
        self.limits = {s: self.in_flight(s) + FREE_SLOTS for s in c.SERVICES}
        self.times: dict[str, list[float]] = {t: [] for t in TICKS}
        self.cpu: dict[str, list[float]] = {t: [] for t in TICKS}
        self.claimed: dict[str, list[int]] = {t: [] for t in TICKS}
        self.promoted: list[int] = []

    def in_flight(self, service: str) -> int:
        return self.store.queue.in_flight_count(service)

    def usable(self) -> list[str]:
        """As the scheduler's `_usable_services`: the owners' blocks read, the services not paused."""
        self.store.services.owner_statuses()
        now = dt.datetime.now(dt.UTC)
        return [n for n, s in self.store.services.service_statuses().items()
                if s.paused_until is None or s.paused_until <= now]

    # ---------------------------------------------------------------- one iteration
    def tick_once(self, reset: bool = True) -> None:
        clock, cpu = time.perf_counter, time.thread_time  # wall, and this thread's CPU (the client side)
        w0, c0 = clock(), cpu()
        services = self.usable()
        promoted = sum(self.store.queue.promote_pending(s, self.limits[s]).promoted for s in services)
        sub = self.store.queue.claim_due(OWNER, states={JobState.SUBMITTING}, services=services, limit=self.workers,
                                         lease_seconds=120)
        w1, c1 = clock(), cpu()
        polled = self.store.queue.claim_due(OWNER, states=POLLED, services=self.usable(), limit=self.workers,
                                            lease_seconds=120)
        w2, c2 = clock(), cpu()
        down = self.store.queue.claim_due(OWNER, states={JobState.DOWNLOADING}, services=list(c.SERVICES),
                                          limit=self.workers, lease_seconds=120)
        w3, c3 = clock(), cpu()
        for tick, wall, used, got in (("dispatch", w1 - w0, c1 - c0, sub), ("poll", w2 - w1, c2 - c1, polled),
                                      ("download", w3 - w2, c3 - c2, down)):
            self.times[tick].append(wall)
            self.cpu[tick].append(used)
            self.claimed[tick].append(len(got))
        self.promoted.append(promoted)
        if reset:
            self.reset()

    def reset(self) -> None:
        """Untimed: release every lease and put promoted jobs back to pending (and drop their events)."""
        jobs = Job.__table__
        events = JobEvent.__table__
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(sa.select(events.c.job_id).where(events.c.to_state == "submitting"))]
            if ids:
                conn.execute(sa.update(jobs).where(jobs.c.id.in_(ids)).values(state="pending", next_poll_at=None))
                conn.execute(sa.delete(events).where(events.c.to_state == "submitting"))
            conn.execute(sa.update(jobs).where(jobs.c.lease_owner == OWNER)
                         .values(lease_owner=None, lease_expires_at=None))

    def clear_times(self) -> None:
        for t in TICKS:
            self.times[t].clear()
            self.cpu[t].clear()
            self.claimed[t].clear()
        self.promoted.clear()

    # ---------------------------------------------------------------- plans
    def plans(self) -> list[tuple[str, str]]:
        """(statement, plan) for every distinct statement one round of ticks sends."""
        seen: dict[str, Any] = {}

        def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
            head = statement.lstrip().split(None, 1)[0].upper()
            if head in ("SELECT", "UPDATE", "INSERT", "DELETE", "WITH") and not executemany:
                seen.setdefault(statement, parameters)

        sa.event.listen(self.engine, "before_cursor_execute", record)
        try:
            self.tick_once(reset=False)
        finally:
            sa.event.remove(self.engine, "before_cursor_execute", record)
        self.reset()
        self.times_pop_last()
        out = []
        raw = self.engine.raw_connection()
        try:
            for statement, params in seen.items():
                cur = raw.cursor()
                if is_postgres(self.engine):
                    cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING ON) " + statement, params)
                    plan = "\n".join(r[0] for r in cur.fetchall())
                    raw.rollback()
                else:
                    cur.execute("EXPLAIN QUERY PLAN " + statement, params)
                    plan = _sqlite_plan(cur.fetchall())
                cur.close()
                out.append((" ".join(statement.split()), plan))
        finally:
            raw.close()
        return out

    def times_pop_last(self) -> None:
        for t in TICKS:
            self.times[t].pop()
            self.cpu[t].pop()
            self.claimed[t].pop()
        self.promoted.pop()


def _sqlite_plan(rows: list[tuple]) -> str:
    """EXPLAIN QUERY PLAN rows (id, parent, -, detail) as an indented tree."""
    parents = {r[0]: r[1] for r in rows}

    def depth(node: int) -> int:
        d = 0
        while node:
            d, node = d + 1, parents.get(node, 0)
        return d

    return "\n".join("  " * depth(r[1]) + r[3] for r in rows)


def run(dialects: list[str], sizes: list[int], iterations: int, workers: int, show_plans: bool,
        warmup: int = 3, cluster: Any = None) -> dict[str, dict[int, Subject]]:
    """`cluster`: a running tests/support/pg.py cluster to use; by default one is started when PostgreSQL is asked
    for."""
    results: dict[str, dict[int, Subject]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="imputationd-bench-scale-"))
    own = cluster is None and "postgres" in dialects
    with c.postgres_cluster() if own else _null(cluster) as cluster:
        try:
            for dialect in dialects:
                if dialect == "postgres" and cluster is None:
                    print("PostgreSQL: no server binaries (apt-get install postgresql); skipped", flush=True)
                    continue
                c.banner(f"{dialect}: building databases")
                subjects: dict[int, Subject] = {}
                for n in sizes:
                    url = (f"sqlite:///{tmp / f'scale-{n}.db'}" if dialect == "sqlite"
                           else cluster.create_database())
                    s = Subject(dialect, url, n, workers)
                    subjects[n] = s
                    print(f"  {n:>9,} jobs ({s.active:,} active): bulk insert {s.insert_seconds:.2f} s "
                          f"({n / s.insert_seconds:,.0f} rows/s); in-flight per service "
                          f"{ {k: v - FREE_SLOTS for k, v in s.limits.items()} }", flush=True)
                for s in subjects.values():
                    for _ in range(warmup):
                        s.tick_once()
                    s.clear_times()
                for _ in range(iterations):  # side by side: one iteration of each size in turn
                    for s in subjects.values():
                        s.tick_once()
                results[dialect] = subjects
                report(dialect, subjects)
                if show_plans:
                    big = subjects[max(subjects)]
                    c.banner(f"{dialect}: query plans at {big.n_total:,} jobs")
                    for statement, plan in big.plans():
                        print(f"-- {statement[:400]}{' …' if len(statement) > 400 else ''}")
                        print("   " + plan.replace("\n", "\n   "))
                for s in subjects.values():
                    s.engine.dispose()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    summary(results, sizes)
    return results


class _null:
    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def _total(series: dict[str, list[float]]) -> list[float]:
    return [sum(x) for x in zip(*(series[t] for t in TICKS), strict=True)]


def report(dialect: str, subjects: dict[int, Subject]) -> None:
    n_iter = len(next(iter(subjects.values())).times["poll"])
    c.banner(f"{dialect}: tick median wall time [p95] (client CPU) over {n_iter} iterations")
    print(f"  {'jobs':>9} " + "".join(f"{t:>27}" for t in (*TICKS, "all three")) + "   claimed d/p/dl, promoted")
    for n, s in subjects.items():
        cols = []
        for wall, used in [(s.times[t], s.cpu[t]) for t in TICKS] + [(_total(s.times), _total(s.cpu))]:
            cols.append(f"{c.median(wall) * 1000:7.2f} [{_p95(wall) * 1000:6.2f}] ({c.median(used) * 1000:5.2f})")
        claimed = "/".join(str(round(c.median(s.claimed[t]))) for t in TICKS)
        print(f"  {n:>9,} " + "".join(f"{x:>27}" for x in cols) + f"   {claimed}, {round(c.median(s.promoted))}")
    print("  (ms; 'client CPU' is this thread's CPU time: the part of a tick that machine load cannot inflate)")


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] if ordered else float("nan")


def _series(subject: Subject, tick: str) -> list[float]:
    return _total(subject.times) if tick == "all three" else subject.times[tick]


def summary(results: dict[str, dict[int, Subject]], sizes: list[int]) -> bool:
    c.banner("scale: targets (each tick: median <= 20 ms at the biggest size, biggest/smallest <= 2)")
    ok_all = True
    small, big = min(sizes), max(sizes)
    for dialect, subjects in results.items():
        for t in (*TICKS, "all three"):
            m_big, m_small = c.median(_series(subjects[big], t)), c.median(_series(subjects[small], t))
            ratio = m_big / m_small
            ok = m_big * 1000 <= TARGET_MS and ratio <= TARGET_RATIO
            if t != "all three":
                ok_all &= ok
            print(f"  {dialect:<8} {t:<9} median at {big:,}: {m_big * 1000:6.2f} ms   "
                  f"{big:,}/{small:,}: {ratio:4.2f}x   {c.verdict(ok) if t != 'all three' else '(info)'}")
    try:
        load = ", ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
        print(f"  machine load average while measuring: {load} (2 cores)")
    except OSError:
        pass
    return ok_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000", help="comma-separated job counts (smallest is the base)")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--workers", type=int, default=8, help="free workers = claim limit (config default 8)")
    parser.add_argument("--dialects", default="sqlite,postgres")
    parser.add_argument("--no-plans", action="store_true")
    args = parser.parse_args(argv)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    run(args.dialects.split(","), sizes, args.iterations, args.workers, not args.no_plans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
