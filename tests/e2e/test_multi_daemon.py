"""Several daemon processes sharing one database: PostgreSQL (`FOR UPDATE SKIP LOCKED` claims) and SQLite
(`BEGIN IMMEDIATE` claims), against one simulated Cloudgene server over loopback HTTP.

Every job completes, reaches the server exactly once, is polled at most once per poll interval (jitter: -10 %),
and goes through each state once; every daemon takes part; no lease is left and no log shows a traceback.

The default rounds keep the suite fast (300 jobs on PostgreSQL, 60 on SQLite); IMPUTATIOND_STRESS=1 runs ten times
as many jobs and five daemons.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from support.daemon_harness import (
    DaemonConfig,
    DaemonProcess,
    JobDB,
    RequestLog,
    assert_results_match,
    assert_submitted_once,
    create_jobs,
    fast_timings,
    print_logs_of_started,
    simulator,
)

STRESS = os.environ.get("IMPUTATIOND_STRESS", "").strip().lower() not in ("", "0", "false", "no")
DAEMONS = 5 if STRESS else 3
POLL_INTERVAL = 0.5
#: `pipeline.jittered` spreads each poll interval by ±10 %.
JITTER = 0.1


@pytest.fixture(autouse=True)
def _daemon_logs():
    yield
    print_logs_of_started()


@pytest.mark.timeout(1800 if STRESS else 300)
@pytest.mark.parametrize(
    ("db_url", "n_jobs"),
    [
        pytest.param("postgres", 3000 if STRESS else 300, id="postgres", marks=pytest.mark.postgres),
        pytest.param("sqlite", 300 if STRESS else 60, id="sqlite"),
    ],
    indirect=["db_url"],
)
def test_daemons_sharing_one_database_complete_every_job_once(tmp_path: Path, db_url: str, n_jobs: int) -> None:
    with simulator(timings=fast_timings(queue=0.3, run=0.3, export=0.2), max_jobs_per_user=100_000) as sim:
        rec = RequestLog(sim)
        cfg = DaemonConfig(
            tmp_path, db_url, sim, poll_interval=POLL_INTERVAL, max_concurrent_jobs=min(n_jobs, 1000),
            scheduler={"workers": 8, "lease_seconds": 15, "dispatch_interval": 0.2, "poll_tick_interval": 0.1,
                       "download_interval": 0.1, "shutdown_timeout": 5},
            # The simulator makes a job of an upload as soon as it has it all: a submit killed before then is never
            # a job, and waiting the default 1800 s window to be sure of it would outlast the test.
            service={"submit_settle": 30},
        )
        cfg.write()
        with JobDB(db_url) as db:
            ids = create_jobs(cfg, n_jobs, db=db)
            started = time.monotonic()
            daemons = [DaemonProcess(cfg.path, name=f"d{k}").start() for k in range(DAEMONS)]
            try:
                for d in daemons:
                    d.wait_for_event("daemon_started", 60)

                def all_alive() -> None:
                    for d in daemons:
                        d.require_alive()

                db.wait_states(ids, {"completed"}, 1500 if STRESS else 150, also=all_alive)
                took = time.monotonic() - started
                for d in daemons:
                    d.send(signal.SIGTERM)
                codes = [d.wait(20) for d in daemons]
            finally:
                for d in daemons:
                    if d.alive():
                        d.kill()
            assert codes == [0] * DAEMONS, [d.tail() for d in daemons]
            print(f"{n_jobs} jobs, {DAEMONS} daemons: {took:.1f} s")

            for d in daemons:
                d.assert_clean()
                assert not d.events("lease_lost"), f"{d.name}: a step ran while another daemon held the job"
            # Everyone took part: each daemon moved some job on.
            moved = {d.name: len(d.events("job_state")) for d in daemons}
            assert all(moved.values()), moved
            assert sum(moved.values()) == len(db.events(ids)) - 2 * n_jobs, moved  # minus submitted, promoted

            assert_submitted_once(sim, ids)
            assert not [i for i, (owner, _) in db.leases(ids).items() if owner is not None]

            # Each state entered once per job: no step was done twice.
            entered: dict = defaultdict(Counter)
            for job_id, _, _, to_state in db.events(ids):
                entered[job_id][to_state] += 1
            repeated = {str(i): dict(c) for i, c in entered.items() if max(c.values()) > 1}
            assert not repeated, list(repeated.items())[:5]

            # Polled at most once per poll interval, whichever daemon polled.
            jobs = db.jobs(ids)
            status = rec.status_times()
            assert {j.remote_id for j in jobs} <= set(status), "every job was polled"
            floor = POLL_INTERVAL * (1 - JITTER) - 0.02
            gaps = rec.status_gaps()
            too_soon = {job: min(g) for job, g in gaps.items() if g and min(g) < floor}
            assert not too_soon, f"polled again sooner than {floor:.2f} s: {list(too_soon.items())[:5]}"

            assert_results_match(sim, db, ids)
