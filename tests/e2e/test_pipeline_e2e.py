"""End to end: the daemon (in-process: real APScheduler ticks, worker pool, Cloudgene adapter, downloads) drives
jobs through simulated Cloudgene servers over real HTTP.

Every test ends in a final state and checks the job's history (`job_events`), the remote state stored raw, the
files (our sha256 equals that of the bytes the simulator served) and the log lines: one clear line per problem,
never one per tick or per retry. Harness: tests/support/e2e_support.py.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from support.e2e_support import PANEL_ID, Harness

import daemon.downloads
import daemon.pipeline
import daemon.scheduler
from daemon import cli
from daemon.db.schema import upgrade_url
from daemon.decisions import MAX_EMPTY_SUCCESS_POLLS, MAX_INTEGRITY_ATTEMPTS, MAX_STEP_CRASHES
from daemon.outcome import JobColumns, Outcome
from daemon.simulator import State, Timings
from daemon.simulator.results import ResultFile
from daemon.states import JobState

pytestmark = pytest.mark.timeout(60)

NORMAL_STATES = {"pending", "submitting", "queued", "running", "downloading", "completed"}


def assert_normal_history(h: Harness, job) -> None:
    """pending → submitting → queued → (running) → downloading → completed, nothing else, no repeats."""
    visited = h.states_visited(job)
    assert visited[:3] == ["pending", "submitting", "queued"], h.history_text(job)
    assert visited[-2:] == ["downloading", "completed"], h.history_text(job)
    assert set(visited) <= NORMAL_STATES and len(visited) == len(set(visited)), h.history_text(job)


def only_events(lines: list[dict]) -> list[str]:
    return [line["event"] for line in lines]


def status_path(remote_id: str) -> str:
    return f"/api/v2/jobs/{remote_id}/status"


def stalled_job(h: Harness, **submit_options):
    """A job whose remote twin stays WAITING until `h.sim.release_job(remote_id)`; the daemon is started."""
    h.sim.faults.stall()
    [job] = h.submit(**submit_options)
    h.start()
    remote_id = h.wait_remote_id(job.id)
    h.wait_job(job.id, lambda j: j.remote_state == "WAITING", what="the first poll")
    return job, remote_id


# ---------------------------------------------------------------------------------------------------- happy paths


def test_happy_path(e2e, db_url, capsys):
    h = e2e(db_url=db_url)
    [job] = h.submit(name="happy")
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    job = h.job(job.id)

    assert_normal_history(h, job)
    assert job.remote_state == "SUCCESS"  # the server's word, stored raw beside ours
    assert job.error is None and job.failures == 0 and job.finished_at is not None
    assert h.sim.submissions(str(job.id)) == 1  # our id travels as job-name
    # The server's QC figures, kept and shown.
    assert job.qc is not None and job.qc["reference_overlap"] == 100.0 and job.qc["matched"] > 0
    assert cli.main(["show", str(job.id), "-c", str(h.config_path)]) == 0
    assert f"reference overlap 100 %, {job.qc['matched']:,} SNPs matched" in capsys.readouterr().out
    h.assert_outputs_match(job)
    for output in job.outputs:  # each file fetched once: a download spends one of the server's counts
        assert len(h.downloads_of(job, output.name)) == 1

    assert h.logs.problems() == [], h.logs.dump()
    job_lines = h.logs.select(job_id=str(job.id))
    assert job_lines and all(line["service"] == "mis" and "remote_id" in line for line in job_lines)
    # One info line per transition the daemon made (pending → submitting is the dispatcher's, logged by none).
    assert len(h.logs.select(event="job_state", job_id=str(job.id))) == len(job.events) - 2
    assert len(h.logs.select(event="file_downloaded", job_id=str(job.id))) == len(job.outputs)


def test_what_cloudgene_takes_beyond_its_lists_reaches_it_as_sent(e2e):
    """No population (sent `off`: AfriGen fails a job without one), TOPMed's r² filter 0.8 (outside the app's list,
    which the server does not check) and the docs' `qconly`: the jobs complete, the QC-only one without zips."""
    h = e2e()
    [imputed] = h.submit(population=None, r2_filter="0.8")
    [checked] = h.submit(mode="qconly")
    h.start()
    imputed, checked = (h.wait_state(job.id, "completed") for job in (imputed, checked))
    h.stop_daemon()
    assert any(o.name.startswith("chr_") for o in h.job(imputed.id).outputs)
    assert not any(o.name.startswith("chr_") for o in h.job(checked.id).outputs)
    assert h.logs.problems() == [], h.logs.dump()


def test_multi_file_outputs_keep_their_subfolders(e2e):
    h = e2e()
    [job] = h.submit([h.vcf("20"), h.vcf("21", seed=1)])
    h.start()
    job = h.wait_state(job.id, "completed")

    names = {o.name for o in job.outputs}
    assert {"chr_20.zip", "chr_21.zip", "qc_report.txt", "statistics/summary.txt"} <= names
    assert any("/" in name for name in names)
    h.assert_outputs_match(job)  # includes: stored under result_dir/<subfolder>/<file>
    h.stop_daemon()
    assert h.logs.problems() == [], h.logs.dump()


def test_group_over_two_services(e2e):
    h = e2e(services=("mis", "tis"))
    jobs = h.submit(services=["mis", "tis"])
    assert len({j.group_id for j in jobs}) == 1 and {j.service for j in jobs} == {"mis", "tis"}
    h.start()
    done = [h.wait_state(j.id, "completed") for j in jobs]
    h.stop_daemon()

    for job in done:
        job = h.job(job.id)
        assert_normal_history(h, job)
        h.assert_outputs_match(job)  # against that service's own simulator
        assert h.services[job.service].sim.submissions(str(job.id)) == 1
        other = "tis" if job.service == "mis" else "mis"
        assert h.services[other].sim.submissions(str(job.id)) == 0
    assert h.logs.problems() == [], h.logs.dump()


# ---------------------------------------------------------------------------------------------------- remote states


def test_waiting_jobs_store_queue_position_and_write_no_history_while_nothing_changes(e2e):
    h = e2e()
    h.sim.faults.stall(times=2)
    jobs = [h.submit(name=f"w{i}")[0] for i in range(2)]
    h.start()
    for job in jobs:
        h.wait_job(job.id, lambda j: j.remote_state == "WAITING" and j.queue_position is not None,
                   what="a queue position")
    positions = sorted(h.job(j.id).queue_position for j in jobs)
    assert positions == [0, 1]  # Cloudgene's 0-based positionInQueue, stored as given
    assert all(h.job(j.id).state is JobState.QUEUED for j in jobs)

    before = {j.id: len(h.job(j.id).events) for j in jobs}
    polls = h.requests["mis"].count("/api/v2/jobs/")
    h.wait_until(lambda: h.requests["mis"].count("/api/v2/jobs/") >= polls + 16, what="16 more polls")
    assert {j.id: len(h.job(j.id).events) for j in jobs} == before  # polled, nothing changed: no rows
    assert h.logs.select(level=("info", "warning", "error"), event="job_state") and not h.logs.problems()
    state_lines = len(h.logs.select(event="job_state"))

    for job in jobs:
        h.sim.release_job(h.job(job.id).remote_id)
    for job in jobs:
        job = h.wait_state(job.id, "completed")
        assert job.queue_position is None  # cleared once the job left the queue
        assert_normal_history(h, job)
    assert len(h.logs.select(event="job_state")) > state_lines


def test_running_and_exporting_are_running_not_done(e2e):
    h = e2e(timings=Timings(queue=0.1, run=0.6, export=0.8))
    [job] = h.submit()
    h.start()
    running = h.wait_job(job.id, lambda j: j.remote_state == "RUNNING", what="remote RUNNING")
    assert running.state is JobState.RUNNING and running.progress  # e.g. "Pre-phasing and Imputation: …"
    exporting = h.wait_job(job.id, lambda j: j.remote_state == "EXPORTING", what="remote EXPORTING")
    assert exporting.state is JobState.RUNNING and not exporting.outputs  # EXPORTING is not done
    job = h.wait_state(job.id, "completed")
    downloading = [e for e in job.events if e.to_state == "downloading"]
    assert len(downloading) == 1 and "(SUCCESS)" in downloading[0].reason
    h.assert_outputs_match(job)


def test_success_notified_is_downloaded(e2e):
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=0.1, notify=0.0))
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    assert job.remote_state == "SUCCESS_NOTIFIED"
    assert "(SUCCESS_NOTIFIED)" in next(e.reason for e in job.events if e.to_state == "downloading")
    h.assert_outputs_match(job)


@pytest.mark.parametrize("notify, raw", [(None, "FAILED"), (0.0, "FAILED_NOTIFIED")])
def test_remote_validation_failure_fails_with_the_servers_messages(e2e, notify, raw):
    # Our preflight is told to accept 5 samples; the server wants 20 and fails the job after queueing it.
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=0.1, notify=notify), service={"min_samples": 1})
    [job] = h.submit([h.vcf(samples=5)])
    h.start()
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    assert job.remote_state == raw
    assert job.error_kind == "remote_failed"
    assert "At least 20 samples must be uploaded (found 5)." in job.error  # the type-1 log message
    assert job.events[-1].reason == job.error
    assert not job.outputs
    problems = h.logs.problems()
    assert only_events(problems) == ["job_state"] and problems[0]["level"] == "error", h.logs.dump()
    assert "At least 20 samples" in problems[0]["reason"]


def test_cancelled_remotely(e2e):
    h = e2e()
    job, remote_id = stalled_job(h)
    # The user cancels in the web UI (the same API call).
    svc = h.service
    answer = httpx.get(f"{h.sim.api_url}/jobs/{remote_id}/cancel", headers={"X-Auth-Token": svc.token})
    assert answer.status_code == 200
    job = h.wait_state(job.id, "cancelled")
    assert job.remote_state == "CANCELED"
    assert job.events[-1].reason == "cancelled on the server"
    h.stop_daemon()
    assert h.logs.problems() == [], h.logs.dump()


@pytest.mark.parametrize("by", ["daemon", "web UI"])
def test_a_cancelled_job_that_the_server_moves_to_state_9_ends_cancelled(e2e, by):
    """Cloudgene moves cancelled jobs to 9 (FAILED_NOTIFIED) with the failed ones (here at once: notify=0). Asked
    by us, 9 is our cancel; cancelled in the web UI, the job's log says so. Neither may end `failed`."""
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=0.1, notify=0.0))
    job, remote_id = stalled_job(h)
    if by == "daemon":
        h.store.admin.request_cancel(job.id)
    else:
        answer = httpx.get(f"{h.sim.api_url}/jobs/{remote_id}/cancel", headers={"X-Auth-Token": h.service.token})
        assert answer.status_code == 200
    job = h.wait_state(job.id, "cancelled")
    h.stop_daemon()
    assert job.remote_state == "FAILED_NOTIFIED" and h.sim.job_state(remote_id) == State.FAILED_NOTIFIED
    assert h.logs.problems() == [], h.logs.dump()


def test_a_server_failure_the_policy_lists_is_submitted_again_and_a_qc_failure_is_not(e2e):
    """resubmit_on: the imputation step failing on the server ("Pipeline execution failed.") sends the job again,
    once, under a new name, its history saying so; a failure of the input's validation is the input's own."""
    h = e2e(service={"resubmit_on": ["pipeline execution failed"], "resubmit_max": 2})
    h.sim.faults.fail_imputation()
    [cured] = h.submit(name="cured")
    h.start()
    cured = h.wait_state(cured.id, "completed")
    h.sim.faults.fail_validation(message="The provided VCF file is malformed.")
    [bad] = h.submit(name="bad input")
    bad = h.wait_state(bad.id, "failed")
    h.stop_daemon()

    # A poll may find the remote job already failed or done, so "running" is not always seen (a loaded machine).
    assert [s for s in h.states_visited(cured) if s != "running"] == [
        "pending", "submitting", "queued", "pending", "submitting", "queued", "downloading", "completed"]
    assert any((e.reason or "").startswith("the server failed the remote job (Pipeline execution failed.); "
                                           "submitting it again (1 of 2)") for e in cured.events)
    assert cured.retries == 1
    assert h.sim.submissions(str(cured.id)) == 1 and h.sim.submissions(f"{cured.id}.retry1") == 1
    h.assert_outputs_match(cured)
    assert bad.retries == 0 and "malformed" in bad.error
    assert only_events(h.logs.problems()) == ["remote_failure_resubmitted", "job_state"], h.logs.dump()


def test_a_zip_that_does_not_match_its_published_md5_is_never_verified(e2e):
    """imputationserver2 publishes chr_N.zip.md5 beside each zip: fetched first, once, and each zip is checked
    against it as it streams. A zip that differs (though it opens: its CRCs are sound) is fetched again, up to
    MAX_INTEGRITY_ATTEMPTS times (each spends one of its downloads), then given up: the job fails saying why."""
    h = e2e()
    [good] = h.submit(name="good")
    h.start()
    good = h.wait_state(good.id, "completed")
    h.sim.faults.wrong_md5()
    [bad] = h.submit(name="bad md5")
    bad = h.wait_state(bad.id, "failed", timeout=60)
    h.stop_daemon()

    names = {o.name for o in good.outputs}
    assert "chr_20.zip" in names and "chr_20.zip.md5" in names
    assert len(h.downloads_of(good, "chr_20.zip.md5")) == 1 and len(h.downloads_of(good, "chr_20.zip")) == 1
    [zip_row] = [o for o in bad.outputs if o.name == "chr_20.zip"]
    assert zip_row.state.value == "failed" and zip_row.bad_downloads == MAX_INTEGRITY_ATTEMPTS
    assert "its md5 is " in zip_row.error and "the server published" in zip_row.error
    assert len(h.downloads_of(bad, "chr_20.zip")) == MAX_INTEGRITY_ATTEMPTS
    assert len(h.downloads_of(bad, "chr_20.zip.md5")) == 1
    assert bad.error == "1 of 6 result files could not be downloaded: chr_20.zip"


def test_a_download_cut_off_half_way_resumes_where_it_stopped_and_spends_no_second_count(e2e):
    """An S3-backed Cloudgene: the share URL (one download count) redirects to a presigned URL that serves Range.
    The zip's first body stops half way: it is resumed from the presigned URL with a Range (206), not fetched
    again from the share URL, and what is stored has the SHA-256 of the zip as the server has it."""
    h = e2e(sim_options={"presigned": True})
    h.sim.faults.truncate(times=1, fraction=0.5, path="/presigned/*/chr_20.zip")
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    h.assert_outputs_match(job)  # our SHA-256 is that of the bytes the server has, each file counted once
    presigned = [r.path for r in h.requests["mis"].matching("/presigned/")]
    assert len([p for p in presigned if p.endswith("/chr_20.zip")]) == 2  # the cut-off body, then the rest
    shared = [r.path for r in h.requests["mis"].matching("/share/results/")]
    assert len([p for p in shared if p.endswith("/chr_20.zip")]) == 1  # one download count spent, not two
    assert len(presigned) == len(job.outputs) + 1
    assert [o.bad_downloads for o in job.outputs if o.name == "chr_20.zip"] == [1]
    assert not (Path(job.result_dir) / ".resume").exists()


@pytest.mark.parametrize("text", ["", "not a checksum\n"], ids=["empty", "malformed"])
def test_a_zip_whose_md5_says_nothing_of_it_is_given_up_unfetched(e2e, text):
    """A `.md5` that arrived but holds no md5sum line for its zip: the zip is failed naming the `.md5`, never
    fetched (it would arrive unchecked; its downloads stay unspent) and the job fails."""
    h = e2e()
    h.sim.faults.wrong_md5(message=text)
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    rows = {o.name: o for o in job.outputs}
    assert rows["chr_20.zip.md5"].state.value == "verified"
    assert (rows["chr_20.zip"].state.value, rows["chr_20.zip"].attempts) == ("failed", 0)
    assert rows["chr_20.zip"].error == ("its published checksum cannot be read: chr_20.zip.md5: not an md5sum "
                                        "line for chr_20.zip (expected 'HASH  NAME')")
    assert h.downloads_of(job, "chr_20.zip") == [] and len(h.downloads_of(job, "chr_20.zip.md5")) == 1
    assert job.error == f"1 of {len(rows)} result files could not be downloaded: chr_20.zip"
    problems = h.logs.problems()
    assert only_events(problems) == ["download_failed", "job_state"], h.logs.dump()
    assert problems[0]["error_kind"] == "bad_checksum" and problems[0]["file"] == "chr_20.zip"


def test_a_zip_whose_md5_cannot_be_downloaded_is_given_up_unfetched(e2e):
    """The server will not serve the `.md5` (404): it fails, and its zip with it, unfetched, never unchecked."""
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    h.publish_with_fault("mis", remote_id, "chr_20.zip.md5", "error", status=404, times=None)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    rows = {o.name: o for o in job.outputs}
    assert rows["chr_20.zip.md5"].state.value == "failed" and "HTTP 404" in rows["chr_20.zip.md5"].error
    assert (rows["chr_20.zip"].state.value, rows["chr_20.zip"].attempts) == ("failed", 0)
    assert rows["chr_20.zip"].error == "its published checksum (chr_20.zip.md5) could not be downloaded"
    assert h.downloads_of(job, "chr_20.zip") == []
    assert all(o.state.value == "verified" for name, o in rows.items() if not name.startswith("chr_20.zip"))
    assert job.error.startswith(f"2 of {len(rows)} result files could not be downloaded: ")
    assert set(job.error.partition(": ")[2].split(", ")) == {"chr_20.zip", "chr_20.zip.md5"}


def test_results_retired_before_download(e2e):
    # Retention 0: the server deletes the results the moment the job succeeds, before any poll sees SUCCESS.
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=0.1, retention=0.0))
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "failed")
    assert job.remote_state == "RETIRED"
    assert job.error_kind == "expired"
    assert "results expired remotely (RETIRED)" in job.error
    assert not job.outputs and h.requests["mis"].count("/share/") == 0


@pytest.mark.parametrize("visible", [True, False], ids=["state-10", "404"])
def test_deleted_before_download(e2e, visible):
    h = e2e()
    job, remote_id = stalled_job(h)
    h.force_remote_state("mis", remote_id, State.DELETED, visible=visible)
    job = h.wait_state(job.id, "failed")
    if visible:
        assert job.remote_state == "DELETED" and job.error_kind == "expired"
        assert "results expired remotely (DELETED)" in job.error
    else:
        # Cloudgene answers 404 "Job X not found." for a deleted job: it expired there, and the reason says why.
        assert job.error_kind == "expired"
        assert "results expired remotely" in job.error and f"Job {remote_id} not found." in job.error
    h.stop_daemon()
    assert only_events(h.logs.problems()) == ["job_state"], h.logs.dump()


def test_dead_job_is_restarted_once_and_recovers(e2e):
    h = e2e()
    h.sim.faults.dead()
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert h.requests["mis"].count(f"/api/v2/jobs/{job.remote_id}/restart") == 1
    assert job.restart_attempts == 1
    assert_normal_history(h, job)
    h.assert_outputs_match(job)
    assert only_events(h.logs.problems()) == ["remote_job_dead"], h.logs.dump()


def test_dead_again_after_the_restart_fails(e2e):
    h = e2e(timings=Timings(queue=0.6, run=0.2, export=0.2))
    h.sim.faults.dead()
    [job] = h.submit()
    h.start()
    remote_id = h.wait_remote_id(job.id)
    restart = f"/api/v2/jobs/{remote_id}/restart"
    h.wait_until(lambda: h.requests["mis"].count(restart) == 1, what="the restart")
    h.sim.kill_job(remote_id)  # the server dies under it again
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()
    assert job.remote_state == "DEAD" and job.error_kind == "remote_dead"
    assert "did not survive a restart" in job.error
    assert h.requests["mis"].count(restart) == 1  # restarted once, not again
    assert only_events(h.logs.problems()) == ["remote_job_dead", "job_state"], h.logs.dump()


def test_unknown_remote_state_keeps_polling_with_one_warning(e2e):
    h = e2e()
    job, remote_id = stalled_job(h)
    h.force_remote_state("mis", remote_id, 42)  # a state number the API table does not have
    h.wait_job(job.id, lambda j: j.remote_state == "42", what="remote state 42 stored")
    polls = h.requests["mis"].count(status_path(remote_id))
    h.wait_until(lambda: h.requests["mis"].count(status_path(remote_id)) >= polls + 8, what="8 more polls")
    stuck = h.job(job.id)
    assert stuck.state is JobState.QUEUED and stuck.remote_state == "42"
    assert h.states_visited(stuck)[-1] == "queued"  # no event for an unknown state

    h.force_remote_state("mis", remote_id, State.WAITING)
    h.sim.release_job(remote_id)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert_normal_history(h, job)
    problems = h.logs.problems()
    assert only_events(problems) == ["unknown_remote_state"], h.logs.dump()
    assert problems[0]["remote_state"] == "42" and problems[0]["job_id"] == str(job.id)


# ---------------------------------------------------------------------------------------------------- transient faults


TRANSIENT_FAULTS = {
    # name: (how to arm it on one path, the error_kind the daemon reports). A proxy's 502 HTML page: below.
    "5xx-burst": (lambda f, path: f.error(500, times=None, path=path), "server_error"),
    "dropped-connection": (lambda f, path: f.drop(times=None, path=path), "connection"),
    "malformed-json": (lambda f, path: f.malformed_json(times=None, path=path), "bad_response"),
    "html-with-200": (lambda f, path: f.html_200(times=None, path=path), "bad_response"),
    "timeout": (lambda f, path: f.latency(1.0, path=path), "timeout"),
}


def test_transient_fault_bursts_never_fail_a_job_and_log_one_line_each(e2e):
    """One job per fault, all at once, each fault on its own job's status calls: every job keeps being retried
    (with backoff) while its fault lasts, says so in exactly one warning line, and completes afterwards."""
    h = e2e(service={"timeout": 0.25, "max_concurrent_jobs": 8}, sim_options={"max_jobs_per_user": 8})
    h.sim.faults.stall(times=len(TRANSIENT_FAULTS))
    jobs = {fault: h.submit(name=fault)[0] for fault in TRANSIENT_FAULTS}
    h.start()
    paths = {}
    for fault, job in jobs.items():
        paths[fault] = status_path(h.wait_remote_id(job.id))
        h.wait_job(job.id, lambda j: j.remote_state == "WAITING", what="the first poll")
    log = h.requests["mis"]
    started = {fault: log.count(path) for fault, path in paths.items()}
    rules = [TRANSIENT_FAULTS[fault][0](h.sim.faults, path) for fault, path in paths.items()]
    for fault, job in jobs.items():
        h.wait_until(lambda fault=fault: log.count(paths[fault]) >= started[fault] + 5,
                     what=f"5 failed polls ({fault})")
        failing = h.wait_job(job.id, lambda j: j.failures >= 4, what=f"4 failures recorded ({fault})")
        assert failing.state is JobState.QUEUED and failing.error_kind == TRANSIENT_FAULTS[fault][1], fault
    for rule in rules:
        h.sim.faults.remove(rule.id)
    for path in paths.values():
        h.sim.release_job(path.split("/")[-2])
    done = {fault: h.wait_state(job.id, "completed") for fault, job in jobs.items()}
    h.stop_daemon()

    for fault, job in done.items():
        job = h.job(job.id)
        assert_normal_history(h, job)
        assert job.failures == 0 and job.error is None
        h.assert_outputs_match(job)
        problems = h.logs.problems(job_id=str(job.id))
        assert only_events(problems) == ["step_failed_will_retry"], (fault, h.logs.dump())
        assert problems[0]["error_kind"] == TRANSIENT_FAULTS[fault][1], fault
        assert len(h.logs.select(event="recovered", job_id=str(job.id))) == 1, fault
    assert len(h.logs.problems()) == len(TRANSIENT_FAULTS), h.logs.dump()


def test_long_502_burst_from_the_proxy_is_one_warning(e2e):
    """Seconds of nginx's 502 HTML page on every API call: many failed attempts, one line."""
    h = e2e()
    job, remote_id = stalled_job(h)
    rule = h.sim.faults.error(502, times=None, path="/api/v2/")
    t0 = time.monotonic()
    h.wait_until(lambda: time.monotonic() - t0 > 2.0, what="2 s of 502s")
    h.sim.faults.remove(rule.id)
    refused = [r for r in h.requests["mis"].matching("/api/v2/") if r.fault == "error"]
    assert len(refused) >= 5
    assert h.job(job.id).state is JobState.QUEUED
    h.sim.release_job(remote_id)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert_normal_history(h, job)
    problems = h.logs.problems()
    assert only_events(problems) == ["step_failed_will_retry"], h.logs.dump()
    assert "HTTP 502 (HTML error page)" in problems[0]["reason"]  # the page itself is not quoted


def test_slow_answers_within_the_timeout_are_no_problem(e2e):
    h = e2e()
    h.sim.faults.latency(0.15, path="/api/v2/")
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert_normal_history(h, job)
    h.assert_outputs_match(job)
    assert h.logs.problems() == [], h.logs.dump()


def test_lost_submit_answer_finds_the_job_instead_of_submitting_twice(e2e):
    h = e2e()
    # The server creates the job, then the connection drops before the answer.
    h.sim.faults.drop(when="after", path="/api/v2/jobs/submit")
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert h.sim.submissions(str(job.id)) == 1
    assert job.submit_attempts == 1
    assert any("found the earlier submission" in (e.reason or "") for e in job.events)
    h.assert_outputs_match(job)
    problems = h.logs.problems()
    assert only_events(problems) == ["step_failed_will_retry"] and problems[0]["error_kind"] == "connection"


def test_a_submit_lost_before_the_server_had_it_is_sent_again_once_the_settle_window_passed(e2e):
    """A proxy's 504 that never reached the server: no job appears, so after submit_settle the job is sent again
    (once), having been looked up meanwhile."""
    settle = 2.0
    h = e2e(service={"timeout": 1, "submit_settle": settle})
    h.sim.faults.error(504, path="/api/v2/jobs/submit", method="POST")  # the proxy answers; nothing reaches the app
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert h.sim.submissions(str(job.id)) == 1
    first, second = [r.at for r in h.requests["mis"].matching("/api/v2/jobs/submit", "POST")]
    lookups = [r.at for r in h.requests["mis"].matching("/api/v2/jobs", "GET") if r.path.rstrip("/") == "/api/v2/jobs"]
    assert second - first >= settle, second - first
    assert len([t for t in lookups if first < t < second]) >= 2  # looked up while it could still appear
    assert job.submit_attempts == 2
    assert [e["event"] for e in h.logs.problems()] == ["step_failed_will_retry", "lost_submit_not_found"]


# ---------------------------------------------------------------------------------------------------- service-wide


@pytest.mark.parametrize("fix", ["token-restored", "token-file-replaced"])
def test_401_mid_job_blocks_the_service_until_the_token_is_fixed(e2e, fix):
    # Nothing changes locally when the token is restored: the daemon finds out by verifying the token again.
    probes = {"blocked_probe_initial": 0.3, "blocked_probe_max": 0.3} if fix == "token-restored" else {}
    h = e2e(scheduler=probes)
    svc = h.service
    job, remote_id = stalled_job(h)
    h.sim.expire_token(svc.token)
    h.wait_state(job.id, "blocked")
    [waiting] = h.submit(name="submitted while blocked")
    probes = h.requests["mis"].count("/api/v2/tokens/verify")
    h.wait_ticks(3)
    if fix == "token-restored":
        h.wait_until(lambda: h.requests["mis"].count("/api/v2/tokens/verify") >= probes + 2, what="probes")
    assert h.job(job.id).state is JobState.BLOCKED
    assert h.job(waiting.id).state is JobState.PENDING  # jobs wait; nothing is submitted to a blocked service
    assert h.sim.submissions(str(waiting.id)) == 0

    if fix == "token-restored":
        h.sim.restore_token(svc.token)
    else:
        new = "tok-new-" + svc.token[-12:]
        h.sim.add_token(new, "alice")
        svc.replace_token(new)
    h.sim.release_job(remote_id)
    job = h.wait_state(job.id, "completed")
    waiting = h.wait_state(waiting.id, "completed")
    h.stop_daemon()

    assert h.states_visited(job)[:5] == ["pending", "submitting", "queued", "blocked", "queued"]
    # Whichever noticed first blocked the service: the job's own 401, or the token check the maintenance tick ran.
    blocked_reason = next(e.reason for e in job.events if e.to_state == "blocked")
    assert "HTTP 401" in blocked_reason or "token rejected" in blocked_reason
    h.assert_outputs_match(job)
    h.assert_outputs_match(waiting)
    problems = h.logs.problems()
    assert only_events(problems) == ["service_blocked"], h.logs.dump()
    assert problems[0]["level"] == "error" and problems[0]["error_kind"] == "unauthorized"
    unblocked = h.logs.select(event="service_unblocked")
    assert len(unblocked) == 1
    assert unblocked[0]["why"] == ("token verified" if fix == "token-restored" else "token changed")


def test_a_blocked_service_is_probed_soon_then_less_often_and_unblocks_when_the_token_works(e2e):
    """A token rejected for a moment must not keep the service blocked for long: the first probe comes
    blocked_probe_initial after the block, each further one after twice the wait before, up to blocked_probe_max."""
    initial, most = 0.4, 1.6
    h = e2e(scheduler={"blocked_probe_initial": initial, "blocked_probe_max": most})
    svc = h.service
    job, remote_id = stalled_job(h)
    h.wait_until(lambda: h.store.services.owner_statuses().get((svc.name, "operator")) is not None,
                 what="the token check at start")

    def verifies() -> list[float]:
        return [r.at for r in h.requests["mis"].matching("/api/v2/tokens/verify", "POST")]

    checked = len(verifies())
    h.sim.expire_token(svc.token)
    h.wait_state(job.id, "blocked")
    refused = max(r.at for r in h.requests["mis"].matching(f"/api/v2/jobs/{remote_id}", "GET"))
    h.wait_until(lambda: len(verifies()) >= checked + 5, timeout=30, what="five probes")
    probes = verifies()[checked:checked + 5]
    # Never earlier than the schedule (a loaded machine may make each later, which is no failure).
    slack = 0.15
    assert probes[0] - refused >= initial - slack, probes[0] - refused
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    for gap, least in zip(gaps, [2 * initial, most, most, most], strict=True):
        assert gap >= least - slack, gaps
    h.sim.restore_token(svc.token)
    h.sim.release_job(remote_id)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert h.states_visited(job)[:5] == ["pending", "submitting", "queued", "blocked", "queued"]
    assert [e["why"] for e in h.logs.select(event="service_unblocked")] == ["token verified"]


def test_403_revoked_token_blocks_until_restored(e2e):
    h = e2e(scheduler={"blocked_probe_initial": 0.3, "blocked_probe_max": 0.3})
    job, remote_id = stalled_job(h)
    # The daemon's token check at start-up has run: revoked after it, the token is first met by the job's poll
    # (403). The token check would call it invalid (401), as the server's token check tells the two apart no more.
    h.wait_until(lambda: h.store.services.owner_statuses().get((h.service.name, "operator")) is not None,
                 what="the token check")
    h.sim.revoke_token(h.service.token)
    blocked = h.wait_state(job.id, "blocked")
    assert blocked.error is None  # blocked, not failed
    h.sim.restore_token(h.service.token)
    h.sim.release_job(remote_id)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert "HTTP 403" in next(e.reason for e in job.events if e.to_state == "blocked")
    problems = h.logs.problems()
    assert only_events(problems) == ["service_blocked"], h.logs.dump()
    assert problems[0]["error_kind"] == "forbidden"


def test_maintenance_window_pauses_the_service_with_one_line(e2e):
    h = e2e()
    job, remote_id = stalled_job(h)
    h.sim.set_maintenance(True)
    path = status_path(remote_id)
    start = h.requests["mis"].count(path)
    # It keeps trying, paused between tries (how many tries fit in a second depends on the machine's load).
    h.wait_until(lambda: h.requests["mis"].count(path) >= start + 3, what="three tries during maintenance")
    assert h.job(job.id).state is JobState.QUEUED
    h.sim.set_maintenance(False)
    h.sim.release_job(remote_id)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()
    assert_normal_history(h, job)
    problems = h.logs.problems()
    assert only_events(problems) == ["service_paused"], h.logs.dump()
    assert problems[0]["error_kind"] == "unavailable" and "maintenance" in problems[0]["reason"]


def test_429_retry_after_is_honoured(e2e):
    h = e2e(scheduler={"backoff_max": 3})
    job, remote_id = stalled_job(h)
    path = status_path(remote_id)
    h.sim.faults.rate_limit(retry_after=1, times=1, path=path)
    h.wait_until(lambda: any(r.fault == "rate_limit" for r in h.requests["mis"].matching(path)), what="the 429")
    h.sim.release_job(remote_id)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()

    seen = h.requests["mis"].matching("/api/v2/jobs")
    limited = next(r for r in seen if r.fault == "rate_limit")
    after = [r for r in seen if r.at > limited.at]
    assert after and after[0].at - limited.at >= 1.0, "the next call came before Retry-After"
    problems = h.logs.problems()
    assert only_events(problems) == ["service_paused"], h.logs.dump()
    assert problems[0]["error_kind"] == "rate_limited" and problems[0]["seconds"] >= 1.0


def test_only_n_jobs_sends_jobs_back_to_pending_until_a_slot_frees(e2e):
    """"Only N jobs" proves that no job was made: the job waits for a slot and its next attempt sends at once,
    without paging through the account's job list first."""
    h = e2e(sim_options={"max_jobs_per_user": 1}, service={"max_concurrent_jobs": 3},
            timings=Timings(queue=0.1, run=0.2, export=0.1))
    jobs = [h.submit(name=f"j{i}")[0] for i in range(3)]
    h.start()
    done = [h.wait_state(j.id, "completed", timeout=30) for j in jobs]
    h.stop_daemon()

    stats = h.sim.stats()
    assert sum(stats["rejected_submissions"].values()) >= 1  # the server did say "Only 1 jobs per user"
    back = [e for j in done for e in j.events if e.from_state == "submitting" and e.to_state == "pending"]
    assert back and all(e.reason == "service has no free job slot; waiting" for e in back)
    for job in done:
        assert h.sim.submissions(str(job.id)) == 1
        assert job.submit_attempts == 1  # a refused attempt is not one that may exist remotely
        h.assert_outputs_match(job)
    job_list = [r for r in h.requests["mis"].matching("/api/v2/jobs", "GET") if r.path.rstrip("/") == "/api/v2/jobs"]
    assert job_list == [], f"{len(job_list)} lookups of the job list after refusals"
    # One line: the server's own N (1) at once, not the 2 we would guess from what we hold, and not again when
    # the limit is probed after each finished job.
    problems = h.logs.problems()
    assert only_events(problems) == ["service_job_limit"], h.logs.dump()
    assert problems[0]["lowered_to"] == 1 and problems[0]["error_kind"] == "job_limit"
    assert "Only 1 jobs per user" in problems[0]["reason"]


# ---------------------------------------------------------------------------------------------------- downloads


def exporting_job(h: Harness):
    [job] = h.submit()
    h.start()
    remote_id = h.wait_remote_id(job.id)
    h.sim.wait_for_state(remote_id, [State.EXPORTING])
    return job, remote_id


def test_truncated_download_is_fetched_again(e2e):
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    h.publish_with_fault("mis", remote_id, "chr_20.zip", "truncate", times=1)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()

    h.assert_outputs_match(job)
    served = h.downloads_of(job, "chr_20.zip")
    assert [d["complete"] for d in served] == [False, True]
    assert next(o for o in job.outputs if o.name == "chr_20.zip").attempts == 2
    problems = h.logs.problems()
    assert only_events(problems) == ["step_failed_will_retry"], h.logs.dump()
    assert problems[0]["error_kind"] == "truncated" and "chr_20.zip" in problems[0]["reason"]


def test_always_corrupt_zip_gives_up_after_the_limit(e2e):
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    h.publish_with_fault("mis", remote_id, "chr_20.zip", "corrupt", times=None)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    bad = next(o for o in job.outputs if o.name == "chr_20.zip")
    assert bad.state.value == "failed" and bad.attempts == 3
    assert "gave up after 3 attempts" in bad.error
    assert len(h.downloads_of(job, "chr_20.zip")) == 3  # three of the ten downloads spent, then stopped
    assert all(o.state.value == "verified" for o in job.outputs if o.name != "chr_20.zip")
    assert job.error_kind == "download_failed" and "chr_20.zip" in job.error
    assert job.error.startswith("1 of ")
    problems = h.logs.problems()
    assert only_events(problems) == ["step_failed_will_retry", "download_failed", "job_state"], h.logs.dump()


def finish_listing_no_outputs(h: Harness, remote_id: str, times: int | None) -> None:
    """Finish the EXPORTING remote job now, its status answers listing no result files `times` times."""
    sim = h.services["mis"].sim
    with sim.sim.lock:  # before any poll can see the job finished
        sim.set_timings(export=0.0)
        sim.faults.no_outputs(times=times, path=status_path(remote_id))


def test_a_success_listing_no_files_is_polled_again_until_it_does(e2e):
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    finish_listing_no_outputs(h, remote_id, times=2)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()

    assert_normal_history(h, job)
    assert h.requests["mis"].count(status_path(remote_id)) >= 3
    h.assert_outputs_match(job)
    assert len(job.outputs) == len(h.sim.file_names(remote_id)) > 0
    assert (job.failures, job.error, job.error_kind) == (0, None, None)
    problems = h.logs.problems()
    assert only_events(problems) == ["remote_success_without_outputs"], h.logs.dump()


def test_a_success_that_never_lists_files_fails_the_job_saying_so(e2e):
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    finish_listing_no_outputs(h, remote_id, times=None)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    assert "completed" not in h.states_visited(job) and "downloading" not in h.states_visited(job)
    assert job.outputs == [] and h.sim.stats()["downloads"] == []
    assert job.error_kind == "no_outputs"
    assert job.error == (f"the server says the remote job finished (SUCCESS) but listed no result files in "
                         f"{MAX_EMPTY_SUCCESS_POLLS} polls in a row; nothing was downloaded")
    assert h.requests["mis"].count(status_path(remote_id)) >= MAX_EMPTY_SUCCESS_POLLS
    problems = h.logs.problems()
    assert only_events(problems) == ["remote_success_without_outputs", "job_state"], h.logs.dump()


def test_every_get_of_a_file_reset_mid_body_spends_at_most_the_limit(e2e):
    """Each GET of chr_20.zip is answered 200 and reset halfway through the body: each spent one of the server's
    ten downloads, so the file is given up after MAX_INTEGRITY_ATTEMPTS of them, saying why."""
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    h.publish_with_fault("mis", remote_id, "chr_20.zip", "reset", times=None)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    # The server records a download after it has reset the connection: maybe just after the daemon saw it.
    h.wait_until(lambda: len(h.downloads_of(job, "chr_20.zip")) >= 3, what="the third download recorded")
    served = h.downloads_of(job, "chr_20.zip")
    assert [(d["status"], d["fault"], d["complete"]) for d in served] == [(200, "reset", False)] * 3
    assert MAX_INTEGRITY_ATTEMPTS == 3
    left = h.sim.stats()["jobs"][remote_id]["files"]["chr_20.zip"]["downloads_left"]
    assert left == 10 - 3
    bad = next(o for o in job.outputs if o.name == "chr_20.zip")
    assert bad.state.value == "failed" and bad.bad_downloads == 3
    assert "connection failed (ReadError) after" in bad.error and "gave up after 3 attempts" in bad.error
    assert all(o.state.value == "verified" and o.bad_downloads == 0 for o in job.outputs if o.name != "chr_20.zip")
    assert job.error_kind == "download_failed" and job.error.startswith("1 of ") and "chr_20.zip" in job.error
    problems = h.logs.problems()
    assert only_events(problems) == ["step_failed_will_retry", "download_failed", "job_state"], h.logs.dump()
    assert problems[0]["error_kind"] == "connection"


def test_failures_before_the_answer_never_give_a_file_up(e2e):
    """Three GETs dropped before any answer (nothing served, no download spent), then two bodies cut off: only the
    two cut-off bodies count against the file, which is fetched on the next try."""
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    sim = h.services["mis"].sim
    with sim.sim.lock:  # both rules armed before any poll sees the job finished
        h.publish_with_fault("mis", remote_id, "chr_20.zip", "drop", times=3)
        sim.faults.truncate(times=2, path=urlsplit(sim.download_url(remote_id, "chr_20.zip")).path)
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()

    h.assert_outputs_match(job)
    h.wait_until(lambda: len(h.downloads_of(job, "chr_20.zip")) >= 3, what="the third download recorded")
    assert [d["complete"] for d in h.downloads_of(job, "chr_20.zip")] == [False, False, True]
    fetched = next(o for o in job.outputs if o.name == "chr_20.zip")
    assert (fetched.attempts, fetched.bad_downloads) == (6, 2)


def test_download_counter_exhausted_fails_that_file_and_names_it(e2e):
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60), sim_options={"download_limit": 1})
    job, remote_id = exporting_job(h)
    h.publish_with_fault("mis", remote_id, "chr_20.zip", "corrupt", times=1)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    bad = next(o for o in job.outputs if o.name == "chr_20.zip")
    assert bad.state.value == "failed"
    assert "allows no more downloads" in bad.error and "number of max downloads exceeded" in bad.error
    assert [d["status"] for d in h.downloads_of(job, "chr_20.zip")] == [200]  # the 400 is not a download
    assert all(o.state.value == "verified" for o in job.outputs if o.name != "chr_20.zip")
    assert "chr_20.zip" in job.error and job.error_kind == "download_failed"
    problems = h.logs.problems()
    assert only_events(problems) == ["step_failed_will_retry", "download_failed", "job_state"], h.logs.dump()
    assert problems[1]["error_kind"] == "downloads_exhausted"


def finish_with_extra_files(h: Harness, remote_id: str, tmp_path, names: list[str]) -> None:
    """Finish the EXPORTING remote job now, with a small extra result file for each of `names` beside its own."""
    sim = h.services["mis"].sim
    with sim.sim.lock:  # before any poll can see the job finished (the files are published at SUCCESS)
        job = sim.sim.jobs[remote_id]
        for i, name in enumerate(names):
            path = tmp_path / f"extra-{i}.txt"
            path.write_bytes(f"extra file {i}\n".encode())
            job.results.append(ResultFile("statistics", name, path, path.stat().st_size,
                                          hashlib.sha256(path.read_bytes()).hexdigest()))
        sim.set_timings(export=0.0)


LONG_NAME = "/".join(["d" * 200] * 21)  # every component fits; the whole path is longer than PATH_MAX

UNSTORABLE = {
    # case: (extra files, the file refused, what its error says, GETs of the extra files)
    "one name twice": (["dup.txt", "dup.txt"], "dup.txt", "the server lists 2 result files of this name", 0),
    "a file and a folder": (["data.txt", "data.txt/inner.txt"], "data.txt/inner.txt",
                            "'data.txt' is a file, so it cannot be a folder too", 1),
    "a path over PATH_MAX": ([LONG_NAME], LONG_NAME, "longer than the file system allows (4095)", 0),
}


@pytest.mark.parametrize("case", UNSTORABLE)
def test_a_result_file_that_cannot_be_stored_fails_the_job_without_spending_downloads(e2e, tmp_path, case):
    """Such a file once left the job stuck (every poll lost to a UNIQUE violation; a traceback per tick) or
    burnt every download of it (fetched, then not storable, fetched again): now it is refused before its GET,
    the job's other files are downloaded, and the job fails naming it."""
    extra, refused, why, gets = UNSTORABLE[case]
    h = e2e(timings=Timings(queue=0.1, run=0.1, export=60))
    job, remote_id = exporting_job(h)
    finish_with_extra_files(h, remote_id, tmp_path, extra)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    assert sum(len(h.downloads_of(job, name)) for name in set(extra)) == gets
    bad = next(o for o in job.outputs if o.name == refused)
    assert bad.state.value == "failed" and why in bad.error
    others = [o for o in job.outputs if o.name not in extra]
    assert others and all(o.state.value == "verified" for o in others)
    assert job.error_kind == "download_failed" and job.error.startswith("1 of ")
    assert not h.logs.select(event="step_result_not_saved") and not h.logs.select(event="step_crashed")


@pytest.mark.postgres
def test_remote_values_longer_than_the_old_columns_on_postgres(e2e, postgres_cluster, monkeypatch):
    """A 300-character Cloudgene job id and 320-character download hashes: PostgreSQL refused every step's write
    (VARCHAR(200)) and the job never moved; since revision 0003 they are stored as sent and the job completes."""
    db_url = postgres_cluster.create_database()
    upgrade_url(db_url)
    h = e2e(db_url=db_url)
    sim = h.services["mis"].sim.sim
    long_id = "job-" + "7" * 296
    monkeypatch.setattr(sim, "_new_id", lambda now: long_id if long_id not in sim.jobs else long_id + "-2")
    publish = sim._publish

    def publish_long_hashes(job):  # type: ignore[no-untyped-def]
        publish(job)
        for download in job.downloads:
            del sim._by_hash[download.hash]
            download.hash *= 5
            sim._by_hash[download.hash] = download

    monkeypatch.setattr(sim, "_publish", publish_long_hashes)
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()

    assert job.remote_id == long_id and len(job.remote_id) == 300
    assert job.outputs and all(len(o.remote_hash) == 320 for o in job.outputs)
    assert_normal_history(h, job)
    h.assert_outputs_match(job)
    assert h.logs.problems() == [], h.logs.dump()


# ---------------------------------------------------------------------------------------------------- unexpected errors


def test_a_step_failing_the_same_way_again_and_again_fails_the_job_saying_so_once(e2e, monkeypatch):
    """An unexpected error that every poll meets (a bug, or the job's data meeting a case nothing handles) no
    longer loops forever, a traceback a tick: after MAX_STEP_CRASHES in a row the job fails with it."""
    h = e2e()
    job, _remote_id = stalled_job(h)

    def broken_poll(self, job, adapter):  # type: ignore[no-untyped-def]
        raise RuntimeError("the poll met something it does not handle")

    monkeypatch.setattr(daemon.pipeline.Pipeline, "_poll", broken_poll)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    assert job.error_kind == "internal"
    assert job.error == (f"the queued step failed {MAX_STEP_CRASHES} times in a row (internal error: RuntimeError: "
                         "the poll met something it does not handle)")
    assert h.states_visited(job)[-2:] == ["queued", "failed"]
    problems = h.logs.problems()
    assert only_events(problems) == ["step_crashed", "job_state"], h.logs.dump()
    assert len(h.logs.select(event="step_crashed")) == MAX_STEP_CRASHES


def test_an_unexpected_error_quoting_a_download_url_is_stored_without_its_secret(e2e, monkeypatch):
    """An exception's text can quote what it was working on, here a result's URL with its download hash: the
    job's error and history keep the rest of the text, never the hash."""
    h = e2e()
    urls = []

    def broken_download(self, job, adapter, row, result_dir, published):  # type: ignore[no-untyped-def]
        urls.append(row.url)
        raise RuntimeError(f"could not open {row.url} for reasons nobody foresaw")

    monkeypatch.setattr(daemon.pipeline.Pipeline, "_download_one", broken_download)
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    assert urls and job.error_kind == "internal"
    assert "for reasons nobody foresaw" in job.error and "[redacted]" in job.error
    stored = [job.error, *(e.reason or "" for e in job.events)]
    assert not [text for text in stored for url in set(urls) if url in text or url.rsplit("/", 2)[-2] in text]


def test_a_local_file_system_needing_an_operator_is_waited_out_like_an_outage(e2e, monkeypatch):
    """Permission denied on the result folder is the operator's to fix, not the job's fault: however many times
    it happens, the download is tried again (with backoff) and the job completes once it is fixed."""
    h = e2e()
    real_check_room = daemon.downloads.check_room
    denied = []

    def check_room(result_dir, name, size_text):  # type: ignore[no-untyped-def]
        if len(denied) < MAX_STEP_CRASHES + 3:
            denied.append(name)
            raise PermissionError(errno.EACCES, "Permission denied", str(result_dir))
        return real_check_room(result_dir, name, size_text)

    monkeypatch.setattr(daemon.downloads, "check_room", check_room)
    [job] = h.submit()
    h.start()
    job = h.wait_state(job.id, "completed")
    h.stop_daemon()

    assert len(denied) == MAX_STEP_CRASHES + 3
    assert_normal_history(h, job)
    h.assert_outputs_match(job)
    problems = h.logs.problems()
    assert only_events(problems) == ["step_failed_will_retry"], h.logs.dump()
    assert problems[0]["error_kind"] == "local_io" and "Permission denied" in problems[0]["reason"]


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_an_outcome_the_database_refuses_ends_the_job_instead_of_losing_every_step(e2e, request, monkeypatch, db):
    """A poll whose outcome the database cannot store (here a number too big for its column; before revision
    0003 a 300-character job id did this on PostgreSQL) was lost on every poll, the job stuck for good: now the
    refusal is recorded as the step's failure, and the job fails once it has happened MAX_STEP_CRASHES times."""
    db_url = None  # the harness's own SQLite database
    if db == "postgres":
        db_url = request.getfixturevalue("postgres_cluster").create_database()
        upgrade_url(db_url)
    h = e2e(db_url=db_url)
    job, _remote_id = stalled_job(h)

    def unstorable_poll(self, job, adapter):  # type: ignore[no-untyped-def]
        return Outcome(next_poll_in=0.1, columns=JobColumns(queue_position=2**70))

    monkeypatch.setattr(daemon.pipeline.Pipeline, "_poll", unstorable_poll)
    job = h.wait_state(job.id, "failed")
    h.stop_daemon()

    assert job.error_kind == "internal" and job.queue_position != 2**70
    assert job.error.startswith(f"the queued step failed {MAX_STEP_CRASHES} times in a row (its outcome could not "
                                "be saved: ")
    assert not h.logs.select(event="step_result_not_saved")
    assert only_events(h.logs.problems()) == ["step_crashed", "job_state"], h.logs.dump()


# ---------------------------------------------------------------------------------------------------- cancel


def test_cancel_of_a_submit_whose_answer_was_lost_waits_for_the_job_and_cancels_it(e2e):
    """The server makes the job after a proxy's 504: a cancel meanwhile must not end with that job left running."""
    h = e2e(service={"timeout": 2, "submit_settle": 30})
    h.sim.faults.slow_submit(3, proxy_status=504)
    h.sim.faults.stall()  # the remote job waits to be cancelled instead of finishing first
    [job] = h.submit()
    h.start()
    h.wait_until(lambda: h.sim.submits_being_copied() == 1, what="the upload (answered with a 504)")
    h.store.admin.request_cancel(job.id)
    job = h.wait_state(job.id, "cancelled", timeout=30)
    h.stop_daemon()
    assert h.sim.submissions(str(job.id)) == 1
    assert job.remote_id is not None and h.sim.job_state(job.remote_id) == State.CANCELED
    assert h.requests["mis"].count(f"/api/v2/jobs/{job.remote_id}/cancel") == 1


def test_a_job_submitted_in_the_web_ui_is_adopted_once_and_downloaded(e2e, capsys):
    """`imputationd adopt`: the remote job is looked up, then tracked like ours (polled, each file downloaded once,
    its zips checked with the password given); adopting it again names the job that tracks it; an id the server
    does not know is refused."""
    h = e2e()
    vcf = h.vcf()
    answer = httpx.post(f"{h.sim.api_url}/jobs/submit/imputationserver2", headers={"X-Auth-Token": h.service.token},
                        data={"refpanel": PANEL_ID, "build": "hg19", "population": "eur", "password": "web-ui-pass-1"},
                        files=[("files", (vcf.name, vcf.read_bytes()))])
    remote_id = answer.json()["id"]
    password_file = h.root / "zip.password"
    password_file.write_text("web-ui-pass-1\n")
    cfg = ["-c", str(h.config_path)]

    assert cli.main(["adopt", *cfg, "--service", "mis", "--password-file", str(password_file), remote_id]) == 0
    [line] = capsys.readouterr().out.splitlines()
    job_id = uuid.UUID(line.split(":")[0])
    assert line.startswith(f"{job_id}: adopted {remote_id} (")
    h.start()
    job = h.wait_state(job_id, "completed")
    assert cli.main(["adopt", *cfg, "--service", "mis", remote_id]) == 0
    assert capsys.readouterr().out == f"{job_id}: already tracks {remote_id} (completed)\n"
    assert cli.main(["adopt", *cfg, "--service", "mis", "job-20200101-000000-000"]) == 1
    assert "job-20200101-000000-000: not adopted: " in capsys.readouterr().err
    h.stop_daemon()

    assert job.remote_id == remote_id and job.events[0].reason == f"adopted from the server as {remote_id}"
    assert [j.id for j in h.store.admin.list_jobs()] == [job.id]
    h.assert_outputs_match(job)
    for output in job.outputs:  # each file fetched once
        assert len(h.downloads_of(job, output.name)) == 1
    assert h.logs.problems() == [], h.logs.dump()


def test_cancel_from_the_cli(e2e, capsys):
    h = e2e(service={"max_concurrent_jobs": 1})
    running, remote_id = stalled_job(h)
    [pending] = h.submit(name="never sent")
    h.wait_until(lambda: h.requests["mis"].count(status_path(remote_id)) >= 3, what="a few polls")
    assert h.job(pending.id).state is JobState.PENDING  # the one slot is taken

    assert cli.main(["cancel", str(pending.id), "-c", str(h.config_path)]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert h.job(pending.id).state is JobState.CANCELLED
    assert h.sim.submissions(str(pending.id)) == 0 and not h.sim.stats()["rejected_submissions"]

    assert cli.main(["cancel", str(running.id), "-c", str(h.config_path)]) == 0
    job = h.wait_state(running.id, "cancelled")
    assert h.sim.job_state(remote_id) == State.CANCELED
    assert h.requests["mis"].count(f"/api/v2/jobs/{remote_id}/cancel") == 1
    assert h.states_visited(job)[-2:] == ["cancel_requested", "cancelled"]
    pending = h.job(pending.id)
    assert h.states_visited(pending) == ["pending", "cancelled"]
    h.stop_daemon()
    assert h.logs.problems() == [], h.logs.dump()
