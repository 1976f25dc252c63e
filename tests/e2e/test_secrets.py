"""Secrets never leak: a whole run of the real daemon at debug level, with a known API token and job password, and
faults switched on so the error paths run too — a 401 whose body echoes the token, a 507 whose body echoes the
token and the password, 5xx, 429, HTML and cut-off JSON answers, a submit answered with 502 after the job was
created, truncated and dropped downloads.

Afterwards the token, the password and every download hash (the secret in `/share/results/<hash>/…`) must appear
in no line the daemon wrote (stdout and stderr), in no text the database keeps about jobs, events, outputs and
services (the columns that *must* hold them — the password, the download URL and hash — excepted), and in nothing
`imputationd show`, `show --json`, `jobs`, `jobs --json` and `services --json` print.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml
from support.chaos_support import report, rows, submit_jobs
from support.daemon_harness import (
    TOKEN,
    DaemonConfig,
    DaemonProcess,
    JobDB,
    fast_timings,
    imputationd_command,
    sample_vcf,
    simulator,
    wait_until,
)
from support.ops_support import SmtpServer, WebhookReceiver

from daemon.db.models import Job, JobEvent, JobOutput, OwnerStatus, ServiceStatus

PASSWORD = "Pw-" + secrets.token_hex(12)
JOBS = 6
#: Columns that hold a secret on purpose (stored to be used, never shown).
SECRET_COLUMNS = {"password", "url", "remote_hash"}


def _leaks(text: str, needles: dict[str, str]) -> list[str]:
    return [label for label, value in needles.items() if value in text]


def _sample(db: JobDB, seen: list[str]) -> None:
    """Add what the text columns of the database hold now (but the secret ones) to `seen`."""
    for table in (Job.__table__, JobEvent.__table__, JobOutput.__table__, ServiceStatus.__table__,
                  OwnerStatus.__table__):
        for row in rows(db, table):
            seen.extend(str(v) for k, v in row.items() if k not in SECRET_COLUMNS and v is not None)


def test_no_secret_in_logs_database_or_cli_output(tmp_path: Path, sqlite_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with simulator() as sim:
        # A submit answered 5xx may have made a job: it is looked up for submit_settle before it is sent again.
        cfg = DaemonConfig(tmp_path, sqlite_url, sim, poll_interval=0.2, log_level="debug",
                           scheduler={"backoff_initial": 0.2, "backoff_max": 1.0, "maintenance_interval": 0.5},
                           service={"timeout": 5, "submit_settle": 5})
        config_path = cfg.write()
        vcf = sample_vcf(tmp_path / "inputs", samples=25)
        ids = submit_jobs(config_path, [{"files": [vcf], "population": "eur", "password": PASSWORD}] * JOBS)

        f = sim.faults
        f.error(507, times=1, path="/api/v2/jobs/submit",
                message=f"Insufficient Storage for the job with password {PASSWORD} (token {TOKEN})")
        f.error(502, times=2, path="/api/v2/jobs/submit", when="after")  # created, answer lost
        f.error(401, times=1, path="/api/v2/jobs/", method="GET",
                message=f"Unauthorized: token {TOKEN} has expired")
        f.error(500, times=2, path="/api/v2/jobs/", method="GET")
        f.error(503, times=1, path="/api/v2/jobs/", method="GET")
        f.rate_limit(retry_after=1, times=1, path="/api/v2/jobs/")
        f.html_200(times=1, path="/api/v2/jobs/")
        f.malformed_json(times=2, path="/api/v2/jobs/")
        f.truncate(times=2)
        f.drop(times=2, path="/share/")
        f.error(500, times=1, path="/share/")

        db = JobDB(sqlite_url)
        try:
            with DaemonProcess(config_path, name="secrets") as daemon:
                # The 401 blocks the service; an operator installs the (same) token again: a new file replaces it.
                wait_until(lambda: any(r["blocked_reason"] for r in rows(db, OwnerStatus.__table__)), 60,
                           message="the 401 never blocked the service")
                fresh = cfg.token_file.with_suffix(".new")
                fresh.write_text(TOKEN + "\n", encoding="utf-8")
                fresh.chmod(0o600)
                os.replace(fresh, cfg.token_file)
                db.wait_states(ids, {"completed"}, timeout=90, also=daemon.require_alive)
                assert daemon.terminate() == 0
            with sim.sim.lock:
                hashes = {h for job in sim.sim.jobs.values()
                          for h in [*(d.hash for d in job.downloads), *job.param_hashes.values()]}
            fired = sim.faults.counts()

            needles = {"token": TOKEN, "password": PASSWORD}
            needles.update({f"download hash {h[:8]}…": h for h in hashes})

            log_text = daemon.log_path.read_text(errors="replace") + daemon.err_path.read_text(errors="replace")
            log_leaks = _leaks(log_text, needles)

            db_text = []
            for table in (Job.__table__, JobEvent.__table__, JobOutput.__table__, ServiceStatus.__table__,
                  OwnerStatus.__table__):
                for row in rows(db, table):
                    db_text += [str(v) for k, v in row.items() if k not in SECRET_COLUMNS and v is not None]
            db_leaks = _leaks("\n".join(db_text), needles)
            stored_errors = sum(1 for r in rows(db, Job.__table__) if r["error"]) + sum(
                1 for r in rows(db, JobEvent.__table__) if r["reason"]) + sum(
                1 for r in rows(db, JobOutput.__table__) if r["error"])

            cli = [*imputationd_command()]
            calls = [["jobs", "--json"], ["jobs"], ["services", "--json"]]
            calls += [["show", "--json", str(i)] for i in ids] + [["show", str(ids[0])]]
            cli_text = ""
            for argv in calls:
                done = subprocess.run([*cli, *argv, "-c", str(config_path)], capture_output=True, text=True,
                                      timeout=120, stdin=subprocess.DEVNULL)
                assert done.returncode == 0, (argv, done.stderr)
                cli_text += done.stdout + done.stderr
            cli_leaks = _leaks(cli_text, needles)
        finally:
            db.close()

    lines = log_text.splitlines()
    loud = sum(1 for line in lines if any(f'"level": "{lv}"' in line for lv in ("warning", "error")))
    text = report("secrets: nothing leaks", {
        "secrets looked for": f"token, job password, {len(hashes)} download hashes",
        "faults fired": dict(sorted(fired.items())),
        "daemon log lines (debug) / warnings+errors": f"{len(lines)} / {loud}",
        "redactions in the log": log_text.count("[redacted]"),
        "error texts stored (jobs.error, job_events.reason, job_outputs.error)": stored_errors,
        "CLI calls checked": len(calls),
        "leaks: log / database / CLI": f"{log_leaks or 0} / {db_leaks or 0} / {cli_leaks or 0}",
    }, capsys)
    assert fired.get("error", 0) >= 6 and fired.get("truncate", 0) and fired.get("drop", 0), text
    assert not log_leaks and not db_leaks and not cli_leaks, text
    assert "[redacted]" in log_text, "the echoed secrets should have been redacted somewhere: " + text


def test_secrets_a_server_echoes_back_are_stored_shown_and_sent_nowhere(tmp_path: Path, sqlite_url: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The simulator's `echo_secrets` fault: the token and the job's password in every progress line and failure
    reason, the download hashes in the export message (longer than the progress line, so cut in the middle of a
    hash), and a 500 quoting a file's hash on its first download. Whatever the database held while the jobs ran,
    what the CLI prints and what the webhook and the e-mails carry must hold none of them."""
    with simulator() as sim, WebhookReceiver() as hook, SmtpServer() as smtp:
        cfg = DaemonConfig(tmp_path, sqlite_url, sim, poll_interval=0.2,
                           scheduler={"backoff_initial": 0.3, "backoff_max": 1.0})
        data = cfg.data()
        data["notifications"] = {
            "webhook": {"url": hook.url},
            "email": {"host": "127.0.0.1", "port": smtp.port, "starttls": False, "from": "d@example.org",
                      "to": ["lab@example.org"]},
        }
        cfg.path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        vcf = sample_vcf(tmp_path / "inputs", samples=25)
        sim.faults.echo_secrets(times=3)
        sim.faults.fail_validation(times=1)  # with the first job's echo: a failure reason quoting the secrets
        ids = submit_jobs(cfg.path, [{"files": [vcf], "password": PASSWORD, "name": f"echo-{i}"} for i in range(3)])

        db = JobDB(sqlite_url)
        seen: list[str] = []  # every value the text columns held at any moment
        try:
            with DaemonProcess(cfg.path, name="echo") as daemon:
                def settled() -> bool:
                    _sample(db, seen)
                    daemon.require_alive()
                    return set(db.states(ids).values()) <= {"completed", "failed"} and len(hook.delivered()) == 3
                wait_until(settled, 90, interval=0.05, message=lambda: f"states {db.states(ids)}")
                wait_until(lambda: len(smtp.received()) == 3, 30, message="not every e-mail arrived")
                assert daemon.terminate() == 0
            _sample(db, seen)
            states = Counter(db.states(ids).values())
            with sim.sim.lock:
                hashes = {d.hash for job in sim.sim.jobs.values() for d in job.downloads}
            cli_text = ""
            for argv in [["jobs", "--json"], ["jobs"], *(["show", "--json", str(i)] for i in ids)]:
                done = subprocess.run([*imputationd_command(), *argv, "-c", str(cfg.path)], capture_output=True,
                                      text=True, timeout=120, stdin=subprocess.DEVNULL)
                assert done.returncode == 0, (argv, done.stderr)
                cli_text += done.stdout + done.stderr
        finally:
            db.close()
        webhook_text = json.dumps(hook.delivered())
        mail_text = "\n".join(mail.as_string() for mail in smtp.received())
        log_text = daemon.log_path.read_text(errors="replace")
        fired = sim.faults.counts()

    needles = {"token": TOKEN, "password": PASSWORD}
    for h in hashes:  # a hash cut short is a leak too
        needles[f"download hash {h[:8]}…"] = h
        needles[f"start of download hash {h[:8]}…"] = h[:16]
    db_text = "\n".join(seen)
    leaks = {where: _leaks(text, needles) for where, text in
             {"database": db_text, "CLI": cli_text, "webhook": webhook_text, "e-mail": mail_text}.items()}
    text = report("secrets echoed by the server", {
        "jobs": dict(states), "faults fired": dict(sorted(fired.items())),
        "download hashes looked for": len(hashes), "database values sampled": len(seen),
        "redacted values in the database": sum("[redacted]" in v for v in seen),
        "leaks": {where: found or 0 for where, found in leaks.items()},
    }, capsys)
    assert states == {"completed": 2, "failed": 1} and fired.get("echo_secrets") == 3 and hashes, text
    assert not any(leaks.values()), text
    # The echoes reached everything checked, scrubbed: the failure reason, the progress lines, the download errors.
    assert "[redacted]" in webhook_text and "[redacted]" in mail_text and "[redacted]" in cli_text, text
    assert "Exported [redacted]" in db_text and "Could not read file [redacted]" in log_text, text


def test_a_restarted_daemon_knows_the_secrets_of_the_jobs_it_polls(tmp_path: Path, sqlite_url: str) -> None:
    """The daemon that submitted a job knew its password; the one that polls it after a restart must know it too,
    though it never opened it to submit: the pipeline hands each job's secrets to the adapters' boundary."""
    with simulator(timings=fast_timings(queue=3.0, run=0.5)) as sim:
        cfg = DaemonConfig(tmp_path, sqlite_url, sim, poll_interval=0.2)
        cfg.write()
        vcf = sample_vcf(tmp_path / "inputs", samples=25)
        sim.faults.echo_secrets(times=2)
        sim.faults.fail_validation(times=1)
        ids = []
        for _ in range(2):  # the CLI seals the password (storage.secret_key_file): the rows never hold it in clear
            done = subprocess.run([*imputationd_command(), "submit", "--service", "sim", "--panel", "1000g-phase3",
                                   "--build", "hg19", "--password", PASSWORD, "--json", str(vcf), "-c", str(cfg.path)],
                                  capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stderr
            ids += [uuid.UUID(job["id"]) for job in json.loads(done.stdout)["jobs"]]
        db = JobDB(sqlite_url)
        seen: list[str] = []
        try:
            with DaemonProcess(cfg.path, name="submitter") as daemon:
                db.wait_states(ids, {"queued"}, timeout=60, also=daemon.require_alive)
                assert daemon.terminate() == 0
            with DaemonProcess(cfg.path, name="poller") as daemon:
                wait_until(lambda: (_sample(db, seen), daemon.require_alive(),
                                    set(db.states(ids).values()) <= {"completed", "failed"})[-1],
                           60, interval=0.05, message=lambda: f"states {db.states(ids)}")
                assert daemon.terminate() == 0
            _sample(db, seen)
            states = Counter(db.states(ids).values())
            stored = rows(db, Job.__table__)
        finally:
            db.close()
    assert states == {"completed": 1, "failed": 1}
    assert all(PASSWORD not in str(row["password"]) for row in stored)  # sealed
    assert not _leaks("\n".join(seen), {"password": PASSWORD})
    assert any("password [redacted]" in value for value in seen)  # the echo reached the database, scrubbed
