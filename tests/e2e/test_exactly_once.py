"""Exactly-once submission when the server is slow to create the job (issue 16, item A).

Cloudgene copies the whole upload into its workspace before the job exists and before it answers; a client that stops
waiting meanwhile does not stop it (`slow_submit` in the simulator). Here the server creates each job CREATE_DELAY
seconds after the upload arrived, while the daemon that sent it is killed, restarted, stopped and started again, or
hears a proxy's 504: every job must end with exactly one remote job. The old rule (one lookup `timeout` after the
attempt, then send again) made two in each case.

The four scenarios run at once, each with its own simulator, database and daemons, so the test takes about one
CREATE_DELAY plus daemon start-ups, not four.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
import uuid
from pathlib import Path

import pytest
from support.daemon_harness import (
    DaemonConfig,
    DaemonProcess,
    JobDB,
    assert_results_match,
    create_jobs,
    migrate,
    print_logs_of_started,
    simulator,
    wait_until,
)

#: The server makes the job this long after the upload arrived: at least 15 s after the client gave up (the issue
#: asks for 15–60 s), whether it was killed at once or stopped within the harness's 3 s shutdown budget.
CREATE_DELAY = 20.0
#: The service's per-request timeout: the old rule's single lookup came this long after the attempt.
TIMEOUT = 3.0
#: How long a submit with an unknown outcome may still become a job: covers CREATE_DELAY with room to spare.
SETTLE = 60.0
#: A daemon start (interpreter, imports, schema check) on a loaded 2-core machine.
START = 30.0
SCENARIOS = ("kill", "restart", "stop-start", "proxy-504")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _daemon_logs():
    """Every daemon's log tail in the report of a failed test."""
    yield
    print_logs_of_started()


def run_scenario(kind: str, root: Path, url: str) -> None:
    with simulator() as sim:
        sim.faults.slow_submit(CREATE_DELAY, proxy_status=504 if kind == "proxy-504" else None)
        cfg = DaemonConfig(root, url, sim, service={"timeout": TIMEOUT, "submit_settle": SETTLE})
        cfg.write()
        with JobDB(url) as db:
            [job_id] = create_jobs(cfg, 1, db=db)
            with DaemonProcess(cfg.path, name=f"{kind}-first") as first:
                first.wait_for_event("daemon_started", START)
                # The upload is in; the server copies it (the job does not exist yet) while the daemon waits.
                wait_until(lambda: first.require_alive() or sim.submits_being_copied() == 1, 30,
                           message=f"{kind}: the submit did not reach the server")
                uploaded = time.monotonic()
                assert sim.submissions(str(job_id)) == 0
                if kind == "kill":
                    assert first.kill() == -signal.SIGKILL
                elif kind in ("restart", "stop-start"):
                    assert first.terminate() == 0
                if kind == "stop-start":
                    # Down past the moment the old rule looked the job up (once) and sent it again.
                    wait_until(lambda: time.monotonic() - uploaded > TIMEOUT + 1, 30, interval=0.2)
                if kind == "proxy-504":
                    finish(db, sim, job_id, first)
                    last = first
                else:
                    assert sim.submits_being_copied() == 1, f"{kind}: the job was created before the test was ready"
                    with DaemonProcess(cfg.path, name=f"{kind}-second") as last:
                        finish(db, sim, job_id, last)
            assert sim.submissions(str(job_id)) == 1, f"{kind}: {sim.submissions(str(job_id))} remote jobs"
            # The job was created well after the daemon stopped waiting for it, and found, not sent again.
            job = db.store.admin.get(job_id, with_events=True)
            assert job.submit_attempts == 1
            assert any("found the earlier submission" in (e.reason or "") for e in job.events), job.events
            assert_results_match(sim, db, [job_id])
            assert last.events("submit_outcome_unknown"), f"{kind}: {last.tail()}"
            first.assert_clean()
            last.assert_clean()


def finish(db: JobDB, sim, job_id: uuid.UUID, daemon: DaemonProcess) -> None:
    """Wait (bounded) for the job to complete and for the server to hold no submit that could still become a job."""
    db.wait_states([job_id], {"completed"}, CREATE_DELAY + START + 30, also=daemon.require_alive)
    wait_until(lambda: sim.submits_being_copied() == 0, CREATE_DELAY + 10,
               message="the server still copies a submit")
    assert daemon.terminate() == 0


def test_a_submit_the_server_creates_late_makes_one_remote_job(tmp_path: Path) -> None:
    # Alembic's migration context is not thread-safe: the databases are made here, one after the other.
    urls = {}
    for kind in SCENARIOS:
        (tmp_path / kind).mkdir()
        urls[kind] = migrate(f"sqlite:///{tmp_path / kind / 'jobs.db'}")
    with concurrent.futures.ThreadPoolExecutor(len(SCENARIOS)) as pool:
        runs = {kind: pool.submit(run_scenario, kind, tmp_path / kind, urls[kind]) for kind in SCENARIOS}
        failures = {}
        for kind, run in runs.items():
            try:
                run.result()
            except Exception as exc:  # every scenario's outcome in the report, not just the first one's
                failures[kind] = f"{type(exc).__name__}: {exc}"
    assert not failures, failures
