"""Chaos: the real daemon process SIGKILLed at random (and at aimed) moments, restarted each time, with 200 jobs in
flight against a simulated Cloudgene server that lives in its own process and survives every kill.

Half the jobs are stored before the first start, half halfway through the kills (as `imputationd submit` would,
while daemons come and go), so work is in flight at every kill. Every 20th job asks for a population the remote
panel lacks and must end failed with the server's reason; every 10th has a larger input (a ~430 KB result zip).

Nothing may be lost and nothing submitted twice: at the end every job is in the terminal state it should be in,
the server created exactly one remote job per job, every downloaded file is byte-identical to what the server
served, no temp file is left under the results, and no job is leased after a clean stop.

Kill moments, cycled in a shuffled order (seeded; the seed is printed):

- `random`: 0.5–4 s after the daemon logged `daemon_started` (the other aimed modes count from there too);
- `early`: 0.05–2 s after the process was spawned (imports, schema check, leases of the dead process released,
  first ticks);
- `submit`: the simulator answers submits 0.6 s late *after* creating the job; the kill is sent once the server
  holds a job whose id the daemon has not stored yet — the window exactly-once submission is about;
- `held`: the simulator sits 3 s on each submit *before* reading it; the kill is sent while the request is held, so
  the server creates the job after the daemon died — and after its successor started and looked for it (the
  successor must wait for the request to land before it looks, or it submits a second job);
- `download`: every download answer comes 0.05 s late after the server counted it; the kill is sent the moment a
  download temp file exists under the results (the daemon is inside a download);
- `commit`: the test probes the SQLite database with `BEGIN IMMEDIATE` (timeout 0) until the probe is refused
  because the daemon holds the write lock (on PostgreSQL: until one of the daemon's sessions has a transaction id,
  i.e. has written in a transaction not yet committed) — the daemon is between BEGIN and COMMIT (or in the commit
  itself) — and sends SIGKILL at once. Random timing hits commits too; this aims at them.

Two kinds of run: `test_sigkill_chaos`, on SQLite with a new seed each time (printed), and smaller replays of fixed
seeds, one on SQLite and one on PostgreSQL, each killing once in every mode, so that every CI run also repeats
schedules that passed before.

Defaults fit CI (about 1–2.5 minutes on 2 cores for the random run, depending on load). Bigger runs:
IMPUTATIOND_CHAOS_ROUNDS (kills, default 20), IMPUTATIOND_CHAOS_JOBS (default 200), IMPUTATIOND_CHAOS_SEED (to
replay a run's kill schedule), IMPUTATIOND_CHAOS_MODES (a comma-separated subset of the modes above).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.chaos_support import SimProcess, check_end_state, partial_files, report, submit_jobs
from support.daemon_harness import PANEL, PANEL_ID, DaemonConfig, DaemonProcess, JobDB, wait_until

from daemon.simulator import write_sample_vcf
from daemon.states import JobState

ROUNDS = int(os.environ.get("IMPUTATIOND_CHAOS_ROUNDS", "20"))
JOBS = int(os.environ.get("IMPUTATIOND_CHAOS_JOBS", "200"))
SEED = int(os.environ.get("IMPUTATIOND_CHAOS_SEED") or random.SystemRandom().randrange(10**9))
MODES = tuple(os.environ.get("IMPUTATIOND_CHAOS_MODES", "random,early,submit,held,download,commit").split(","))
FAIL_EVERY = 20  # every 20th job asks for a population the remote panel lacks: it must end failed, not retried
BIG_EVERY = 10  # every 10th job has a larger input, so larger result files
EXPECTED_FAILURE = "Population 'AA' is not supported"
#: Replayed on every run, each with one kill per mode: (seed, database, jobs). With the six modes, these seeds put
#: a `submit` or `held` kill first in each wave of jobs, while their submits are still going out.
FIXED_RUNS = [
    pytest.param(101, "sqlite", 40, id="seed101-sqlite"),
    pytest.param(18, "postgres", 40, id="seed18-postgres", marks=pytest.mark.postgres),
]


def _started(daemon: DaemonProcess) -> int:
    """How many runs logged daemon_started so far (the runs share one log file)."""
    try:
        return daemon.log_path.read_bytes().count(b'"event": "daemon_started"')
    except FileNotFoundError:
        return 0


def _unfinished(db: JobDB) -> int:
    counts = db.count_states()
    return sum(n for state, n in counts.items() if state not in ("completed", "failed", "cancelled"))


def _submits_in_flight(db: JobDB) -> set[str]:
    """Jobs whose submit request is out (attempt committed before the POST) and whose remote id is not stored."""
    with db.engine.connect() as conn:
        found = conn.execute(sa.text(
            "SELECT id FROM jobs WHERE state = 'submitting' AND submit_attempts > 0 AND remote_id IS NULL "
            "AND lease_owner IS NOT NULL")).scalars().all()
    # SQLite stores UUIDs as 32 hex digits; the job-name is the dashed form.
    return {str(uuid.UUID(hex=str(i))) for i in found}


def _orphans(db: JobDB, sim: SimProcess) -> set[str]:
    """Remote jobs the server created whose id the (dead) daemon never stored: each must be found, not resubmitted."""
    with db.engine.connect() as conn:
        unknown = {str(uuid.UUID(hex=str(i))) for i in conn.execute(
            sa.text("SELECT id FROM jobs WHERE remote_id IS NULL")).scalars().all()}
    return unknown & set(sim.stats()["submissions"])


class Aim:
    """Waits for the moment a kill mode wants; returns what it found (or that it gave up at its deadline)."""

    def __init__(self, rng: random.Random, db: JobDB, sim: SimProcess, sqlite_path: str | None, results: Path
                 ) -> None:
        self.rng, self.db, self.sim, self.sqlite_path, self.results = rng, db, sim, sqlite_path, results

    def pause(self, low: float, high: float) -> str:
        # The chaos moment itself, not a wait for a thread: a random instant in the daemon's life.
        time.sleep(self.rng.uniform(low, high))
        return "timed"

    def submit(self, deadline: float = 6.0) -> str:
        """The server has created the job but its answer is held back: the daemon has not stored it."""
        return self._during_slow_submits(0.6, "after", self._created_not_stored, deadline)

    def _created_not_stored(self) -> bool:
        out = _submits_in_flight(self.db)
        return bool(out) and bool(out & set(self.sim.stats()["submissions"]))

    def held(self, deadline: float = 6.0) -> str:
        """The request was sent and the server holds it before creating the job."""
        return self._during_slow_submits(3.0, "before", self._sent_not_created, deadline)

    def _during_slow_submits(self, seconds: float, when: str, moment: Callable[[], bool], deadline: float) -> str:
        """Slow every submit down (`when` the server creates the job) and wait for `moment`: "hit" or "missed"."""
        self.pause(0.1, 1.0)
        rule = self.sim.fault(kind="delay", seconds=seconds, times=None, path="/api/v2/jobs/submit", when=when)
        try:
            try:
                wait_until(moment, deadline, interval=0.02)
            except AssertionError:
                return "missed"
            return "hit"
        finally:
            self.sim.remove_fault(rule)

    def _sent_not_created(self) -> bool:
        out = _submits_in_flight(self.db)
        return bool(out - set(self.sim.stats()["submissions"]))

    def download(self, deadline: float = 6.0) -> str:
        self.pause(0.1, 1.5)
        try:
            wait_until(lambda: any(p.name.endswith(".part") for p in partial_files(self.results)), deadline,
                       interval=0.005)
        except AssertionError:
            return "missed"
        return "hit"

    def commit(self, deadline: float = 6.0) -> str:
        self.pause(0.1, 1.5)
        with self._sqlite_writing() if self.sqlite_path else self._postgres_writing() as writing:
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                if writing():
                    return "hit"
                time.sleep(self.rng.uniform(0.0, 0.003))
            return "missed"

    @contextlib.contextmanager
    def _sqlite_writing(self) -> Iterator[Callable[[], bool]]:
        """Whether another connection holds the write lock: our BEGIN IMMEDIATE is refused at once."""
        probe = sqlite3.connect(self.sqlite_path, timeout=0, isolation_level=None)

        def writing() -> bool:
            try:
                probe.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    return True
                raise
            probe.execute("ROLLBACK")
            return False

        try:
            yield writing
        finally:
            probe.close()

    @contextlib.contextmanager
    def _postgres_writing(self) -> Iterator[Callable[[], bool]]:
        """Whether another session is in a transaction that has written (a backend gets a transaction id then)."""
        query = sa.text("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL)")
        # Autocommit: pg_stat_activity is read once per transaction, so each probe must be a transaction of its own.
        with self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield lambda: bool(conn.execute(query).scalar())


def test_sigkill_chaos(tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_chaos(tmp_path, sqlite_url, capsys, seed=SEED, rounds=ROUNDS, jobs=JOBS)


@pytest.mark.parametrize(("seed", "db_url", "jobs"), FIXED_RUNS, indirect=["db_url"])
def test_sigkill_chaos_fixed_seed(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str], seed: int,
                                  jobs: int) -> None:
    run_chaos(tmp_path, db_url, capsys, seed=seed, rounds=len(MODES), jobs=jobs)


def run_chaos(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str], *, seed: int, rounds: int,
              jobs: int) -> None:
    """`rounds` SIGKILLs of the daemon at moments drawn from `seed`, `jobs` jobs; then the end state is checked."""
    rng = random.Random(seed)
    started = time.monotonic()
    sim = SimProcess.start(timings="0.2,0.2,0.2", max_jobs=1000, download_limit=10)
    db = JobDB(db_url)
    daemon: DaemonProcess | None = None
    try:
        cfg = DaemonConfig(
            tmp_path, db_url, sim,  # type: ignore[arg-type]  # a SimProcess has what DaemonConfig reads
            poll_interval=0.3, max_concurrent_jobs=50,
            scheduler={"workers": 6, "dispatch_interval": 0.2, "poll_tick_interval": 0.2, "download_interval": 0.2,
                       "maintenance_interval": 1.0, "lease_seconds": 20, "backoff_initial": 0.2, "backoff_max": 1.0,
                       "shutdown_timeout": 5, "batch_size": 50},
            # The simulator makes a job of an upload as soon as it has it all: a submit killed before then is
            # never a job, and waiting the default 1800 s window to be sure of it would outlast the test.
            service={"timeout": 10, "submit_settle": 10,
                     "panels": {PANEL: {"id": PANEL_ID, "builds": ["hg19"], "populations": ["eur", "AA"]}}},
        )
        config_path = cfg.write()
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        small = write_sample_vcf(inputs / "chr20.vcf.gz", chromosome="20", samples=25, variants=200)
        big = write_sample_vcf(inputs / "chr21.vcf.gz", chromosome="21", samples=30, variants=3000)
        specs = []
        for i in range(jobs):
            fail = i % FAIL_EVERY == FAIL_EVERY // 2
            specs.append({"files": [big if i % BIG_EVERY == 3 else small], "population": "AA" if fail else "eur",
                          "name": f"chaos {i}"})
        # Half the jobs now, half halfway through the kills (submitted while daemons come and go), so there is
        # work in flight at every kill.
        first_wave = jobs // 2
        ids = submit_jobs(config_path, specs[:first_wave])
        # Every download answered late after the server counted it: the daemon sits inside downloads longer.
        sim.fault(kind="delay", seconds=0.05, times=None, path="/share/", when="after")

        url = sa.make_url(db_url)
        aim = Aim(rng, db, sim, url.database if url.get_backend_name() == "sqlite" else None, cfg.results_dir)
        schedule: list[str] = []
        while len(schedule) < rounds:
            cycle = list(MODES)
            rng.shuffle(cycle)
            schedule += cycle
        schedule = schedule[:rounds]

        daemon = DaemonProcess(config_path, name="chaos")
        outcome: Counter[str] = Counter()
        orphans: set[str] = set()
        partials: set[Path] = set()
        busy_kills = started_runs = 0
        for round_no, mode in enumerate(schedule):
            if round_no == rounds // 2:
                ids += submit_jobs(config_path, specs[first_wave:])
            daemon.start()
            if mode != "early":
                # Starting takes a second or two (imports, schema check); aimed kills count from the daemon's start.
                started_runs += 1
                wait_until(lambda runs=started_runs: _started(daemon) >= runs, 60, interval=0.02,
                           message=lambda: f"the daemon did not start\n{daemon.tail()}")
            if mode == "random":
                result = aim.pause(0.5, 4.0)
            elif mode == "early":
                result = aim.pause(0.05, 2.0)
            else:
                result = getattr(aim, mode)()
            code = daemon.kill()
            started_runs = _started(daemon)
            assert code == -9, f"the daemon exited with {code} on its own before the kill ({mode})\n{daemon.tail()}"
            outcome[f"{mode}:{result}"] += 1
            busy_kills += _unfinished(db) > 0
            partials |= {p for p in partial_files(cfg.results_dir) if p.name.endswith(".part")}
            orphans |= _orphans(db, sim)
        kills_done = time.monotonic()
        if len(ids) < jobs:  # fewer rounds than it takes to reach the second wave
            ids += submit_jobs(config_path, specs[len(ids):])
        expected = {job_id: JobState.FAILED if spec["population"] == "AA" else JobState.COMPLETED
                    for job_id, spec in zip(ids, specs, strict=True)}
        reasons = {job_id: EXPECTED_FAILURE for job_id, state in expected.items() if state is JobState.FAILED}

        daemon.start()
        # Started before it is stopped: a SIGTERM while Python is still importing is the signal's default death.
        wait_until(lambda: _started(daemon) > started_runs, 60, interval=0.02,
                   message=lambda: f"the daemon did not start\n{daemon.tail()}")
        db.wait_states(ids, {"completed", "failed"}, timeout=150, also=daemon.require_alive)
        assert daemon.terminate(timeout=30) == 0, daemon.tail()
        stats = sim.stats()
        end = check_end_state(db, stats, cfg.results_dir, expected=expected, failure_reason=reasons)

        served = [f["served"] for job in stats["jobs"].values() for f in job["files"].values()]
        lines = daemon.lines()
        cut_lines = sum(1 for line in lines if "_raw" in line)
        figures = {
            "seed (IMPUTATIOND_CHAOS_SEED)": seed,
            "database": url.get_backend_name(),
            "jobs": f"{jobs} ({len(reasons)} made to fail on purpose)",
            "SIGKILLs (each answered by exit -9)": sum(outcome.values()),
            "kills by mode:result": dict(sorted(outcome.items())),
            "kills while jobs were unfinished": busy_kills,
            "jobs created remotely whose id a kill kept from the DB": len(orphans),
            "download temp files a kill left on disk": len(partials),
            "restarts": len(schedule),
            **end.figures,
            "downloads served (files / GETs / most GETs of one file)":
                f"{len(served)} / {sum(served)} / {max(served, default=0)}",
            "dead-process leases released at start": len(daemon.events("released_dead_leases")),
            "log lines cut by SIGKILL": cut_lines,
            "time: kill rounds / final run / total (s)":
                f"{kills_done - started:.1f} / {time.monotonic() - kills_done:.1f} / {time.monotonic() - started:.1f}",
        }
        text = report("chaos: SIGKILL rounds", figures, capsys)
        assert not end.problems, text + "\n" + "\n".join(end.problems)
        problems = daemon.problems(allow_errors={"job_state"})
        assert not problems, text + "\nlog problems:\n" + "\n".join(problems[:10])
        failed_lines = daemon.events("job_state", to_state="failed")
        assert all(EXPECTED_FAILURE in (line.get("reason") or "") for line in failed_lines), failed_lines[:3]
        assert sum(outcome.values()) >= min(rounds, 20)
    finally:
        if daemon is not None and daemon.alive():
            daemon.kill()
        db.close()
        sim.stop()


#: `imputationd run` with SIGTERM sent to itself the moment `Daemon.start()` returns: the ticks are running (and
#: may be claiming work) but the main loop has not begun.
_TERM_AFTER_START = (
    "import os, signal, sys\n"
    "from daemon import scheduler\n"
    "start = scheduler.Daemon.start\n"
    "def start_then_term(self):\n"
    "    start(self)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "scheduler.Daemon.start = start_then_term\n"
    "from daemon.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_sigterm_while_starting_is_a_clean_stop(tmp_path: Path, sqlite_url: str) -> None:
    """Found by the chaos run: its last daemon, SIGTERMed as soon as every job was done, died of the signal (exit
    -15) instead of stopping. A SIGTERM between the start of the ticks and the main loop must stop cleanly too."""
    from support.daemon_harness import create_jobs, simulator

    with simulator() as sim:
        cfg = DaemonConfig(tmp_path, sqlite_url, sim)
        config_path = cfg.write()
        ids = create_jobs(cfg, 3)
        done = subprocess.run([sys.executable, "-c", _TERM_AFTER_START, "run", "-c", str(config_path)],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    assert '"event": "daemon_stopped"' in done.stdout
    db = JobDB(sqlite_url)
    try:
        assert not [i for i, (owner, _) in db.leases(ids).items() if owner is not None]
    finally:
        db.close()
