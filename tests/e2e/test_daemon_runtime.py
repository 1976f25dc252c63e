"""The daemon as systemd runs it: real `imputationd run` processes, real HTTP to the simulated Cloudgene server on
loopback, real SQLite and PostgreSQL databases.

Signals (SIGTERM/SIGINT with steps in flight, SIGHUP reload, SIGKILL and restart in each step), sd_notify from the
process, start-up refusals (un-migrated database, bad config), lease expiry and takeover, per-service concurrency.
Every wait is a bounded poll; every daemon's log is checked for tracebacks, `tick_failed` and `step_crashed`.
"""

from __future__ import annotations

import itertools
import select
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml
from support.daemon_harness import (
    SERVICE,
    DaemonConfig,
    DaemonProcess,
    JobDB,
    NotifySocket,
    RequestLog,
    active_remote_jobs,
    assert_no_partials,
    assert_results_match,
    assert_submitted_once,
    create_jobs,
    max_overlap,
    print_logs_of_started,
    remote_intervals,
    simulator,
    wait_until,
)

from daemon.config import SchedulerConfig
from daemon.downloads import PARTIAL_DIR

#: systemd's TimeoutStopSec for the unit: after it, SIGKILL.
TIMEOUT_STOP_SEC = 15.0
#: A daemon start (interpreter, imports, schema check) on a loaded 2-core machine.
START = 30.0
#: Long enough to hold a request for the whole test; the simulator wakes every sleeper when it stops.
STUCK = 120.0
#: The service the lost-submit jobs use: the same simulator under a short `timeout`, which is also how long a daemon
#: waits before it looks a lost submit up (the server may still be turning the request into a job).
LOST = "lost"
LOST_TIMEOUT = 4.0
SUBMIT = "/api/v2/jobs/submit/"
SHARE = "/share/results/"
STATUS_PREFIX = "/api/v2/jobs/job-"

postgres_only = pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                                        indirect=True)
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture(autouse=True)
def _daemon_logs():
    """Every daemon's log tail in the report of a failed test; no daemon outlives its test."""
    yield
    print_logs_of_started()


@pytest.fixture
def sim():
    with simulator(max_jobs_per_user=50) as server:
        yield server


def submissions_of(sim, ids) -> dict[str, int]:
    counts = sim.stats()["submissions"]
    return {str(i): counts.get(str(i), 0) for i in ids}


def stuck_in(db: JobDB, rec: RequestLog, sim, ids, step: str, daemon: DaemonProcess) -> None:
    """Wait (bounded) until every job in `ids` is inside `step` with its request held by the simulator."""
    alive = daemon.require_alive
    if step == "submitting":
        # The POST reached the simulator and the job exists there; only the answer is held back.
        wait_until(lambda: alive() or all(n == 1 for n in submissions_of(sim, ids).values()), 20,
                   message=lambda: f"submits not all received: {submissions_of(sim, ids)} {db.count_states(ids)}")
        assert set(db.states(ids).values()) == {"submitting"}
    elif step == "polling":
        db.wait_states(ids, {"queued", "running"}, 20, also=alive)

        def polled() -> bool:
            alive()
            remote = {j.remote_id for j in db.jobs(ids)}
            return remote <= set(rec.status_times())

        wait_until(polled, 20, message="status requests not all received")
    elif step == "downloading":
        db.wait_states(ids, {"downloading"}, 20, also=alive)
        wait_until(lambda: alive() or len(rec.downloads()) >= len(ids), 20, message="downloads not all started")
    else:  # pragma: no cover
        raise ValueError(step)


def hold(sim, step: str) -> None:
    """Make the simulator sit on every request of `step` (the request arrives; the answer does not)."""
    if step == "submitting":
        sim.faults.slow(STUCK, times=None, path=SUBMIT, method="POST", when="after")  # the job IS created
    elif step == "polling":
        sim.faults.slow(STUCK, times=None, path=STATUS_PREFIX, method="GET")
    elif step == "downloading":
        sim.faults.slow(STUCK, times=None, path=SHARE, method="GET")


def runtime_config(root: Path, db_url: str, sim, **kwargs) -> DaemonConfig:
    """The harness config plus the `LOST` service (same simulator, short timeout) for jobs whose submit is lost."""
    cfg = DaemonConfig(root, db_url, sim, **kwargs)
    cfg.extra_services[LOST] = (sim, {"timeout": LOST_TIMEOUT})
    cfg.write()
    return cfg


def put_jobs_in_flight(cfg: DaemonConfig, sim, db: JobDB, rec: RequestLog, daemon: DaemonProcess
                       ) -> dict[str, list[uuid.UUID]]:
    """Two jobs held in each of downloading, polling and submitting, each with its request inside the simulator.

    Waves: the first pair runs with downloads held, so it stops there; then polls are held and a second pair
    stops after its submit; then submits are held (answer only: the remote job exists) for the third pair, on the
    `LOST` service."""
    waves: dict[str, list[uuid.UUID]] = {}
    for step in ("downloading", "polling", "submitting"):
        hold(sim, step)
        waves[step] = create_jobs(cfg, 2, db=db, service=LOST if step == "submitting" else SERVICE)
        stuck_in(db, rec, sim, waves[step], step, daemon)
    return waves


def finish_after_restart(cfg: DaemonConfig, sim, db: JobDB, ids: list[uuid.UUID], *, name: str,
                         timeout: float = 60) -> DaemonProcess:
    """Start a fresh daemon on the same config, wait for every job to complete, stop it with SIGTERM (exit 0)."""
    with DaemonProcess(cfg.path, name=name) as again:
        db.wait_states(ids, {"completed"}, timeout, also=again.require_alive)
        assert again.terminate() == 0
    return again


def all_released(db: JobDB, ids) -> dict:
    return {i: owner for i, (owner, _) in db.leases(ids).items() if owner is not None}


# ---------------------------------------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize(
    ("sig", "db_url", "shutdown_timeout"),
    [
        # The shipped default budget (scheduler.shutdown_timeout left out of the file: 8 s).
        pytest.param(signal.SIGTERM, "postgres", None, id="SIGTERM-postgres-default-budget",
                     marks=pytest.mark.postgres),
        pytest.param(signal.SIGINT, "sqlite", 2.0, id="SIGINT-sqlite"),
    ],
    indirect=["db_url"],
)
def test_stop_signal_with_steps_in_flight_exits_in_budget_and_restart_completes_everything(
    tmp_path: Path, db_url: str, sim, sig: int, shutdown_timeout: float | None
) -> None:
    budget = shutdown_timeout or SchedulerConfig().shutdown_timeout
    cfg = runtime_config(tmp_path, db_url, sim, scheduler={"shutdown_timeout": shutdown_timeout})
    rec = RequestLog(sim)
    with JobDB(db_url) as db:
        with DaemonProcess(cfg.path, name="first") as first:
            first.wait_for_event("daemon_started", START)
            waves = put_jobs_in_flight(cfg, sim, db, rec, first)
            ids = [i for wave in waves.values() for i in wave]
            held = {i: owner for i, (owner, _) in db.leases(ids).items()}
            assert all(owner is not None and f":{first.pid}:" in owner for owner in held.values()), held

            code, took = first.stop(sig, timeout=TIMEOUT_STOP_SEC + 5)
        assert code == 0, first.tail()
        # The held steps get the whole budget, then the process goes: well inside systemd's TimeoutStopSec.
        assert budget - 0.5 <= took < min(budget + 4, TIMEOUT_STOP_SEC), took
        stopping = first.events("daemon_stopping")
        assert stopping and stopping[0]["in_flight"] == len(ids)
        assert first.events("released_unfinished_steps")[0]["jobs"] == len(ids)
        assert first.events("daemon_stopped")
        assert not all_released(db, ids), "leases of unfinished steps must be released at stop"
        # Released, not finished: each job waits in the step it was in.
        states = db.states(ids)
        assert {states[i] for i in waves["downloading"]} == {"downloading"}
        assert {states[i] for i in waves["polling"]} <= {"queued", "running"}
        assert {states[i] for i in waves["submitting"]} == {"submitting"}
        first.assert_clean()

        sim.faults.clear()
        again = finish_after_restart(cfg, sim, db, ids, name="second")
        again.assert_clean()
        assert_submitted_once(sim, ids)
        assert_results_match(sim, db, ids)
        assert not all_released(db, ids)
        # The submits whose answers were lost were found on the server, not sent again.
        for job in db.jobs(waves["submitting"]):
            assert job.submit_attempts == 1
        found = [e for e in again.events("job_state") if "found the earlier submission" in (e.get("reason") or "")]
        assert len(found) == len(waves["submitting"])


def test_sigterm_while_a_tick_waits_on_a_slow_service_exits_in_budget(tmp_path: Path, sqlite_url: str,
                                                                     sim) -> None:
    """The maintenance tick checks the token at start (POST /tokens/verify, 30 s timeout): a server that sits on
    the request must not keep the daemon past its stop budget, or systemd SIGKILLs it at TimeoutStopSec."""
    budget = 2.0
    sim.faults.slow(STUCK, times=None, path="/api/v2/tokens/verify", method="POST")
    cfg = DaemonConfig(tmp_path, sqlite_url, sim, scheduler={"shutdown_timeout": budget})
    cfg.write()
    rec = RequestLog(sim)
    with JobDB(sqlite_url) as db, DaemonProcess(cfg.path, name="slow-check") as d:
        d.wait_for_event("daemon_started", START)
        ids = create_jobs(cfg, 1, db=db)
        db.wait_states(ids, {"completed"}, 30, also=d.require_alive)  # steps go on while the check hangs
        assert rec.matching("POST", "/api/v2/tokens/verify")
        code, took = d.stop(signal.SIGTERM, timeout=60)
    assert code == 0, d.tail()
    assert took < budget + 4, f"stopping took {took:.1f} s with a {budget:g} s budget"
    assert d.events("daemon_stopped")
    d.assert_clean()


# ---------------------------------------------------------------------------------------------- SIGKILL and restart


@sqlite_only
def test_sigkill_in_every_step_then_restart_completes_each_job_once(tmp_path: Path, db_url: str, sim) -> None:
    """Killed with a download, a poll and a submit (the POST arrived, its answer did not) in flight: the restarted
    daemon (same host: it releases the dead pid's leases at once) finishes every job, submits none twice, and
    leaves byte-identical files and no partial downloads."""
    cfg = runtime_config(tmp_path, db_url, sim, scheduler={"lease_seconds": 60})
    rec = RequestLog(sim)
    with JobDB(db_url) as db:
        with DaemonProcess(cfg.path, name="killed") as killed:
            killed.wait_for_event("daemon_started", START)
            waves = put_jobs_in_flight(cfg, sim, db, rec, killed)
            ids = [i for wave in waves.values() for i in wave]
            partials = [p for i in waves["downloading"] for p in (cfg.results_dir / str(i) / PARTIAL_DIR).glob("*")]
            assert len(partials) == 2, "each held download has its partial file open"
            assert killed.kill() == -signal.SIGKILL
        killed.assert_clean()
        assert all(owner is not None for owner, _ in db.leases(ids).values()), "SIGKILL releases nothing"
        assert all(p.exists() for p in partials)

        sim.faults.clear()
        started = time.time()
        again = finish_after_restart(cfg, sim, db, ids, name="restarted")
        assert again.events("released_dead_leases"), "the dead local pid's leases go at start, not after 60 s"
        again.assert_clean()
        assert time.time() - started < 60, "the restarted daemon did not wait for the 60 s leases"
        assert_submitted_once(sim, ids)
        assert_results_match(sim, db, ids)
        for job_id in waves["downloading"]:
            assert_no_partials(cfg.results_dir / str(job_id))
        for job in db.jobs(waves["submitting"]):
            assert job.submit_attempts == 1
        found = [e for e in again.events("job_state") if "found the earlier submission" in (e.get("reason") or "")]
        assert len(found) == 2
        # ...and looked up only once the server had had the service's timeout to turn the request into a job.
        lookups = [t for t, path in rec.matching("GET", "/api/v2/jobs") if path.rstrip("/") == "/api/v2/jobs"]
        assert min(lookups) >= max(rec.submits()) + LOST_TIMEOUT - 0.2


# ---------------------------------------------------------------------------------------------- lease expiry


@postgres_only
def test_daemon_on_another_host_takes_over_only_after_the_leases_expire(tmp_path: Path, db_url: str, sim) -> None:
    """A daemon SIGKILLed while holding leases; a daemon on another host (sharing the database) cannot tell the
    first one is dead, so it leaves the jobs alone until their leases expire, then finishes them."""
    lease_seconds = 4.0
    cfg = runtime_config(tmp_path, db_url, sim, scheduler={"lease_seconds": lease_seconds})
    rec = RequestLog(sim)
    with JobDB(db_url) as db:
        with DaemonProcess(cfg.path, name="node-a", hostname="node-a") as a:
            a.wait_for_event("daemon_started", START)
            # Polls and submits held: the jobs stay leased by node-a, the heartbeat renewing the leases.
            hold(sim, "polling")
            polled = create_jobs(cfg, 2, db=db)
            stuck_in(db, rec, sim, polled, "polling", a)
            hold(sim, "submitting")
            submitting = create_jobs(cfg, 2, db=db, service=LOST)
            stuck_in(db, rec, sim, submitting, "submitting", a)
            ids = polled + submitting
            assert a.kill() == -signal.SIGKILL
        killed_at = time.time()
        leases = db.leases(ids)
        assert all(owner and owner.startswith("node-a:") for owner, _ in leases.values()), leases
        assert all(expires.timestamp() > killed_at for _, expires in leases.values()), "leases must still run"

        sim.faults.clear()
        with DaemonProcess(cfg.path, name="node-b", hostname="node-b") as b:
            b.wait_for_event("daemon_started", START)
            db.wait_states(ids, {"completed"}, 60, also=b.require_alive)
            assert b.terminate() == 0
        assert not b.events("released_dead_leases"), "node-b cannot know node-a's pid is dead"
        b.assert_clean()
        a.assert_clean()

        # Each job's first request after the kill (a poll; for a lost submit, the lookup in the job list) came
        # only once that job's lease had expired.
        status = rec.status_times()
        for job in db.jobs(polled):
            first_poll = min(t for t in status[job.remote_id] if t > killed_at)
            assert first_poll >= leases[job.id][1].timestamp(), (
                f"node-b polled {job.id} {leases[job.id][1].timestamp() - first_poll:.2f} s before its lease expired")
        first_lookup = min(t for t, path in rec.matching("GET", "/api/v2/jobs")
                           if path.rstrip("/") == "/api/v2/jobs" and t > killed_at)
        earliest = min(leases[i][1].timestamp() for i in submitting)
        assert first_lookup >= earliest, f"node-b looked up a lost submit {earliest - first_lookup:.2f} s early"
        assert_submitted_once(sim, ids)
        assert_results_match(sim, db, ids)


# ---------------------------------------------------------------------------------------------- SIGHUP


def test_sighup_reload_applies_a_good_file_and_keeps_the_config_on_a_bad_one(tmp_path: Path, sqlite_url: str,
                                                                            sim) -> None:
    with simulator(max_jobs_per_user=50) as other:
        # Three jobs stay WAITING on the server: with max_concurrent_jobs 1 only one may be submitted.
        sim.faults.stall(times=3)
        cfg = DaemonConfig(tmp_path, sqlite_url, sim, max_concurrent_jobs=1)
        cfg.write()
        rec = RequestLog(sim)
        with JobDB(sqlite_url) as db, DaemonProcess(cfg.path, name="reloaded") as d:
            d.wait_for_event("daemon_started", START)
            ids = create_jobs(cfg, 3, db=db)
            [first] = db.wait_any(ids, {"queued"}, 20)
            # The first job has been polled twice: several dispatch ticks went by with a slot taken.
            remote = db.store.admin.get(first).remote_id
            wait_until(lambda: len(rec.status_times().get(remote, [])) >= 2, 10)
            assert sum(submissions_of(sim, ids).values()) == 1
            extra_job = create_jobs(cfg.db_url, 1, service="extra", root=tmp_path, db=db)
            assert db.states(extra_job) == {extra_job[0]: "pending"}  # no such service yet

            # A good file: more slots for "sim", a new service "extra".
            cfg.max_concurrent_jobs = 3
            cfg.extra_services = {"extra": other}
            cfg.write()
            d.send(signal.SIGHUP)
            reloaded = d.wait_for_event("config_reloaded", 10)
            assert reloaded["services"] == ["extra", SERVICE]
            wait_until(lambda: sum(submissions_of(sim, ids).values()) == 3, 20,
                       message=lambda: f"not all three submitted after the reload: {submissions_of(sim, ids)}")
            db.wait_states(extra_job, {"completed"}, 30, also=d.require_alive)
            assert other.stats()["submissions"] == {str(extra_job[0]): 1}

            # A bad file: every problem by key path, the running config kept, the daemon alive.
            good = cfg.path.read_text()
            bad = yaml.safe_load(good)
            bad["scheduler"]["workers"] = "many"
            bad["services"][SERVICE]["poll_interval"] = -1
            bad["services"]["extra"]["bogus"] = True
            cfg.path.write_text(yaml.safe_dump(bad))
            d.send(signal.SIGHUP)
            failed = d.wait_for_event("config_reload_failed", 10)
            problems = "\n".join(failed["problems"])
            for key in ("scheduler.workers", f"services.{SERVICE}.poll_interval", "services.extra.bogus"):
                assert key in problems, problems
            assert failed["level"] == "error" and failed["error_kind"] == "config"
            assert len(d.events("config_reloaded")) == 1
            d.require_alive()
            # Still running on the old (reloaded) config: both services work.
            for job in sim.job_ids():
                sim.release_job(job)
            late = create_jobs(cfg.db_url, 1, service="extra", root=tmp_path, db=db)
            db.wait_states(ids + late, {"completed"}, 30, also=d.require_alive)
            assert d.terminate() == 0
        d.assert_clean(allow_errors={"config_reload_failed"})
        assert_submitted_once(sim, ids)
        assert_submitted_once(other, extra_job + late)


# ---------------------------------------------------------------------------------------------- sd_notify


def test_sd_notify_ready_watchdog_status_stopping_from_the_daemon_process(tmp_path: Path, sqlite_url: str,
                                                                          sim) -> None:
    notify = NotifySocket()
    try:
        cfg = DaemonConfig(tmp_path, sqlite_url, sim)
        cfg.write()
        # WatchdogSec=2s: the daemon pings every second (half of it) while its ticks are healthy.
        with DaemonProcess(cfg.path, env=notify.env(watchdog_usec=2_000_000), name="notified") as d:
            notify.wait_for("READY=1", START)
            ready_at = next(t for t, lines in notify.messages if "READY=1" in lines)
            notify.wait_for("WATCHDOG=1", 10, count=3)
            pings = [t for t, lines in notify.messages if "WATCHDOG=1" in lines]
            assert all(t > ready_at for t in pings), "watchdog pings only once ready"
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert all(g < 2.0 for g in gaps), f"pings must come more often than WatchdogSec: {gaps}"
            notify.wait_for("STATUS=", 10, count=2)  # with READY=1, then the jobs summary
            statuses = [a for a in notify.assignments() if a.startswith("STATUS=")]
            assert statuses[0] == "STATUS=imputationd running"
            assert any(s.endswith("active jobs") for s in statuses), statuses
            assert not [a for a in notify.assignments() if a == "STOPPING=1"]
            d.send(signal.SIGTERM)
            notify.wait_for("STOPPING=1", 10)
            assert d.wait(TIMEOUT_STOP_SEC) == 0
        d.assert_clean()
    finally:
        notify.close()


def test_sighup_and_sigterm_the_moment_ready_arrives_are_handled(tmp_path: Path, sqlite_url: str, sim) -> None:
    """systemd may reload (SIGHUP) or stop (SIGTERM) the service as soon as it reads READY=1: by then the handlers
    must be in place, or the signal's default action kills the daemon (READY=1 used to go out before them: about
    every second daemon died of the SIGHUP here). Three daemons at once, each signalled as its READY=1 arrives."""
    cfg = DaemonConfig(tmp_path, sqlite_url, sim)
    cfg.write()
    sockets = [NotifySocket() for _ in range(3)]
    try:
        daemons = [DaemonProcess(cfg.path, env=n.env(), name=f"early-{k}").start() for k, n in enumerate(sockets)]
        waiting = {n.sock: d for n, d in zip(sockets, daemons, strict=True)}
        deadline = time.monotonic() + START
        while waiting:
            assert time.monotonic() < deadline, "no READY=1 from " + ", ".join(d.name for d in waiting.values())
            readable, _, _ = select.select(list(waiting), [], [], 0.5)
            for sock in readable:
                if "READY=1" in sock.recv(4096).decode().split("\n"):
                    d = waiting.pop(sock)
                    d.send(signal.SIGHUP)
                    d.send(signal.SIGTERM)
        for d in daemons:
            assert d.wait(TIMEOUT_STOP_SEC) == 0, d.tail()
            assert d.events("daemon_stopped")
            d.assert_clean()
    finally:
        for n in sockets:
            n.close()


# ---------------------------------------------------------------------------------------------- start-up refusals


def test_creates_a_new_sqlite_database_quietly(tmp_path: Path, sim) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'new.db'}"
    cfg = DaemonConfig(tmp_path, url, sim)
    cfg.write()
    with DaemonProcess(cfg.path, name="new-sqlite") as d:
        d.wait_for_event("daemon_started", START)
        assert d.terminate(TIMEOUT_STOP_SEC) == 0
    with JobDB(url) as db:
        assert db.states() == {}
    output = d.log_path.read_text() + d.stderr()
    assert "alembic" not in output.lower() and "Context impl" not in output, d.tail()
    d.assert_clean()


@pytest.mark.postgres
def test_refuses_an_unmigrated_postgres_database_and_says_db_upgrade(tmp_path: Path, fresh_postgres_db: str,
                                                                     sim) -> None:
    cfg = DaemonConfig(tmp_path, fresh_postgres_db, sim)
    cfg.write()
    hint = f"imputationd db upgrade -c {cfg.path}"
    with DaemonProcess(cfg.path, name="unmigrated") as d:
        code = d.wait(START)
    assert code == 3, d.tail()
    assert hint in d.stderr()
    [line] = d.events("cannot_start")
    assert hint in line["reason"] and line["error_kind"] == "database"
    assert not d.events("daemon_started")
    assert "Traceback" not in d.stderr() and "Traceback" not in d.log_path.read_text()
    d.assert_clean(allow_errors={"cannot_start"})


def test_bad_config_exits_2_with_every_key_path_and_no_traceback(tmp_path: Path, sqlite_url: str, sim) -> None:
    cfg = DaemonConfig(tmp_path, sqlite_url, sim)
    data = cfg.data()
    data["scheduler"]["lease_seconds"] = "long"
    data["scheduler"]["wokers"] = 3
    data["services"][SERVICE]["max_concurrent_jobs"] = 0
    data["services"][SERVICE]["token"] = "never-in-yaml"
    cfg.path.write_text(yaml.safe_dump(data))
    with DaemonProcess(cfg.path, name="badconfig") as d:
        code = d.wait(START)
    assert code == 2, d.tail()
    err = d.stderr()
    for key in ("scheduler.lease_seconds", "scheduler.wokers", f"services.{SERVICE}.max_concurrent_jobs",
                f"services.{SERVICE}.token"):
        assert key in err, err
    assert "never-in-yaml" not in err + d.log_path.read_text()
    assert "Traceback" not in err and "Traceback" not in d.log_path.read_text()
    assert all(line.startswith("imputationd: ") for line in err.splitlines()), err


# ---------------------------------------------------------------------------------------------- concurrency


def test_per_service_limit_holds_on_the_server_and_jobs_go_in_submission_order(tmp_path: Path, sqlite_url: str,
                                                                               sim) -> None:
    limit, n = 2, 10
    cfg = DaemonConfig(tmp_path, sqlite_url, sim, max_concurrent_jobs=limit)
    cfg.write()
    with JobDB(sqlite_url) as db:
        ids = create_jobs(cfg, n, db=db)
        seen_active = []

        def sample() -> None:
            d.require_alive()
            seen_active.append(active_remote_jobs(sim))

        with DaemonProcess(cfg.path, name="limited") as d:
            d.wait_for_event("daemon_started", START)
            db.wait_states(ids, {"completed"}, 60, also=sample)
            assert d.terminate() == 0
        d.assert_clean()
        assert max(seen_active) <= limit, seen_active
        jobs = {j.id: j for j in db.jobs(ids)}
        intervals = remote_intervals(sim)
        assert max_overlap(intervals[jobs[i].remote_id] for i in ids) == limit
        assert_submitted_once(sim, ids)

        # Submission order: promoted (pending -> submitting) oldest first, and the server saw them in that order
        # (two promoted together may reach it in either order).
        promoted = {i: at for i, at, f, t in db.events(ids) if t == "submitting"}
        order = sorted(ids, key=lambda i: jobs[i].created_at)
        assert order == ids
        times = [promoted[i] for i in order]
        assert times == sorted(times), "pending jobs must be promoted oldest first"
        remote_start = {i: intervals[jobs[i].remote_id][0] for i in ids}
        for a in order:
            for b in order:
                if promoted[a] < promoted[b]:
                    assert remote_start[a] < remote_start[b], (a, b)
