"""What the reliability suites (test_chaos, test_db_faults, test_bad_input, test_secrets, test_disk_full) add to
`daemon_harness` (which runs the real `imputationd run` process, writes its config, reads its database):

- `SimProcess`: the simulated Cloudgene server in a process of its own (`python -m daemon.simulator`), driven over
  its `/_sim/` control API, so it keeps running whatever happens to the daemon and does not compete with the test
  for this interpreter's GIL. It accepts the harness's `TOKEN` and has a `base_url`, so `DaemonConfig` takes it
  where it takes an in-process simulator.
- `submit_jobs`: pending jobs through the real submission path (`daemon.submission.submit`: validation and the
  VCF preflight), without a CLI process per job.
- `check_end_state`: every promise of the suite checked after the daemon stopped cleanly, as figures + problems.
- `report`: print a test's figures (and append them to $IMPUTATIOND_FIGURES when set).

No fixed sleeps: every wait is the harness's `wait_until`, a bounded poll.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from daemon.db.models import Job, JobEvent, JobOutput
from daemon.downloads import PARTIAL_DIR, PARTIAL_SUFFIX, sha256_file
from daemon.states import TRANSITIONS, JobState
from support.daemon_harness import PANEL, SERVICE, TOKEN, JobDB, wait_until

__all__ = ["EndState", "SimProcess", "check_end_state", "partial_files", "report", "rows", "submit_jobs"]


def report(title: str, figures: Mapping[str, Any], capsys: pytest.CaptureFixture[str] | None = None) -> str:
    """Print a test's figures and return them as text (for assertion messages, so a failure shows them too).

    With the test's `capsys` they go straight to the terminal, past pytest's capture: visible in every run, with or
    without -s. They are also appended to the file named by $IMPUTATIOND_FIGURES when that is set (CI artefact)."""
    width = max((len(k) for k in figures), default=0)
    text = "\n".join([f"== {title} =="] + [f"  {k.ljust(width)}  {v}" for k, v in figures.items()])
    if capsys is not None:
        with capsys.disabled():
            print("\n" + text, flush=True)
    else:
        print("\n" + text, flush=True)
    sink = os.environ.get("IMPUTATIOND_FIGURES")
    if sink:
        with open(sink, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return text


# ---------------------------------------------------------------------------------------------------- simulator


class SimProcess:
    """`python -m daemon.simulator` in its own process (own session: a signal to the test's process group does not
    reach it), accepting `token`. Stop it with `stop()`."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str, token: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.token = token
        self.client = httpx.Client(base_url=base_url, timeout=30.0)

    @classmethod
    def start(cls, *, token: str = TOKEN, timings: str = "0.2,0.2,0.2", max_jobs: int = 1000,
              download_limit: int = 10, user: str = "harness") -> SimProcess:
        argv = [sys.executable, "-m", "daemon.simulator", "--port", "0", "--token", token, "--user", user,
                "--timings", timings, "--max-jobs", str(max_jobs), "--download-limit", str(download_limit)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        found: list[str] = []

        def read() -> None:  # also keeps the pipe drained
            assert proc.stdout is not None
            for line in proc.stdout:
                match = re.search(r" at (http://\S+)", line)
                if match and not found:
                    found.append(match.group(1))

        threading.Thread(target=read, name="sim-stdout", daemon=True).start()
        try:
            wait_until(lambda: found or proc.poll() is not None, 30, message="the simulator printed no address")
        except AssertionError:
            proc.kill()
            raise
        if not found:
            raise RuntimeError(f"the simulator exited with {proc.returncode} before listening")
        return cls(proc, found[0], token)

    def control(self, method: str, path: str, payload: Any = None) -> Any:
        response = self.client.request(method, path, json=payload)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        return self.control("GET", "/_sim/stats")

    def fault(self, **rule: Any) -> int:
        """Add one fault rule (see daemon/simulator/faults.py); returns its id."""
        return self.control("POST", "/_sim/faults", rule)["added"][0]["id"]

    def remove_fault(self, rule_id: int) -> None:
        self.control("DELETE", f"/_sim/faults/{rule_id}")

    def clear_faults(self) -> None:
        self.control("DELETE", "/_sim/faults")

    def fired(self) -> dict[str, int]:
        return self.control("GET", "/_sim/faults")["fired"]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------- jobs


def submit_jobs(config_path: Path, specs: Iterable[Mapping[str, Any]]) -> list[uuid.UUID]:
    """Pending jobs stored the way `imputationd submit` stores them (validation, preflight, password), one per
    spec: `files`, and optionally `build`, `population`, `name`, `password`."""
    from daemon.config import load_config
    from daemon.db.engine import make_engine
    from daemon.db.store import JobStore
    from daemon.submission import Submission, submit

    config = load_config(config_path)
    engine = make_engine(config.database.url)
    try:
        store = JobStore(engine)
        ids = []
        for spec in specs:
            [job] = submit(config, store, Submission(
                services=[SERVICE], panel=PANEL, build=spec.get("build", "hg19"), files=list(spec["files"]),
                population=spec.get("population"), name=spec.get("name"), password=spec.get("password"),
            ))
            ids.append(job.id)
        return ids
    finally:
        engine.dispose()


def rows(db: JobDB, table: sa.Table, *order: Any) -> list[dict[str, Any]]:
    """Every row of a table as plain dicts (raw column values)."""
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(*order))]


# ---------------------------------------------------------------------------------------------------- checks


@dataclass
class EndState:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 40:
            self.problems.append(text)
        elif len(self.problems) == 40:
            self.problems.append("… more problems left out")


def partial_files(root: Path) -> list[Path]:
    """Download temp files (`.partial/` folders, `*.part` files) anywhere under `root`."""
    if not Path(root).exists():
        return []
    return [p for p in Path(root).rglob("*") if p.name == PARTIAL_DIR or p.name.endswith(PARTIAL_SUFFIX)]


def check_end_state(
    db: JobDB,
    stats: Mapping[str, Any],
    results_dir: Path,
    *,
    expected: Mapping[uuid.UUID, JobState],
    failure_reason: Mapping[uuid.UUID, str] | None = None,
) -> EndState:
    """The suite's promises, checked once the daemon has stopped cleanly:

    - each job in `expected` is in its expected terminal state (its error containing `failure_reason[job]`);
    - the simulator created exactly one remote job per job (by job-name = our job id) and none under other names;
    - every output of a completed job is verified, its file exists inside the job's result dir, and the file's
      sha256 = the sha256 we recorded = the sha256 of the file the simulator served;
    - no download temp file anywhere under `results_dir`; no job holds a lease;
    - each job's history chains (from = previous to, allowed transitions, times not going back), starts with
      `→ pending` and ends in the job's state.
    """
    end = EndState()
    jobs = {r["id"]: r for r in rows(db, Job.__table__)}
    events: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for ev in rows(db, JobEvent.__table__, JobEvent.id):
        events.setdefault(ev["job_id"], []).append(ev)
    outputs: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for out in rows(db, JobOutput.__table__, JobOutput.id):
        outputs.setdefault(out["job_id"], []).append(out)

    states: dict[str, int] = {}
    leased = 0
    for job_id, want in expected.items():
        row = jobs.get(job_id)
        if row is None:
            end.problem(f"job {job_id} is missing from the database")
            continue
        got = JobState(row["state"])
        states[got.value] = states.get(got.value, 0) + 1
        if got is not want:
            end.problem(f"job {job_id}: {got.value}, expected {want.value} (error: {row['error']})")
        reason = (failure_reason or {}).get(job_id)
        if reason and reason not in (row["error"] or ""):
            end.problem(f"job {job_id}: error {row['error']!r} does not say {reason!r}")
        if row["lease_owner"] is not None:
            leased += 1
            end.problem(f"job {job_id} still leased by {row['lease_owner']}")
    end.figures["jobs by state"] = dict(sorted(states.items()))
    end.figures["jobs still leased after the clean stop"] = leased

    submissions: dict[str, int] = stats.get("submissions", {})
    counts = [submissions.get(str(job_id), 0) for job_id in expected]
    end.figures["remote submissions per job (min/max)"] = f"{min(counts, default=0)}/{max(counts, default=0)}"
    for job_id, n in zip(expected, counts, strict=True):
        if n != 1:
            end.problem(f"job {job_id} was submitted {n} times")
    strangers = sorted(set(submissions) - {str(j) for j in expected})
    if strangers:
        end.problem(f"remote jobs under names we never gave: {strangers[:5]}")
    end.figures["remote jobs created"] = sum(submissions.values())

    served_files = {remote_id: info["files"] for remote_id, info in stats.get("jobs", {}).items()}
    checked = total_bytes = 0
    for job_id, want in expected.items():
        row = jobs.get(job_id)
        if row is None or want is not JobState.COMPLETED:
            continue
        served = served_files.get(row["remote_id"] or "", {})
        mine = {o["name"]: o for o in outputs.get(job_id, [])}
        if not served or set(mine) != set(served):
            end.problem(f"job {job_id}: outputs {sorted(mine)}, the server offered {sorted(served)}")
        for name, out in mine.items():
            path = Path(out["local_path"] or "")
            if out["state"] != "verified" or not path.is_file():
                end.problem(f"job {job_id}: output {name} is {out['state']}, file {path}")
                continue
            if not path.resolve().is_relative_to(Path(row["result_dir"]).resolve()):
                end.problem(f"job {job_id}: {name} stored outside its result dir: {path}")
            actual = sha256_file(path)
            served_sha = served.get(name, {}).get("sha256")
            if not actual == out["sha256"] == served_sha:
                end.problem(f"job {job_id}: {name}: file {actual[:12]}, recorded {str(out['sha256'])[:12]}, "
                            f"served {str(served_sha)[:12]}")
            checked += 1
            total_bytes += path.stat().st_size
    end.figures["files byte-identical to what was served"] = f"{checked} ({total_bytes / 1e6:.1f} MB)"

    leftovers = partial_files(results_dir)
    end.figures["temp/partial files left under results"] = len(leftovers)
    for path in leftovers[:5]:
        end.problem(f"left behind: {path}")

    broken = 0
    for job_id in expected:
        chain, row = events.get(job_id, []), jobs.get(job_id)
        ok = bool(chain) and row is not None and chain[0]["from_state"] is None and chain[0]["to_state"] == "pending"
        previous, previous_at = None, None
        for ev in chain:
            if previous is not None and (ev["from_state"] != previous
                                         or JobState(ev["to_state"]) not in TRANSITIONS[JobState(previous)]):
                ok = False
            if previous_at is not None and ev["at"] < previous_at:
                ok = False
            previous, previous_at = ev["to_state"], ev["at"]
        if row is not None and previous != JobState(row["state"]).value:
            ok = False
        if not ok:
            broken += 1
            end.problem(f"job {job_id}: broken history: "
                        + ", ".join(f"{e['from_state']}→{e['to_state']}" for e in chain))
    end.figures["job histories complete and in order"] = f"{len(expected) - broken}/{len(expected)}"
    end.figures["job_events rows"] = sum(len(v) for v in events.values())
    return end
