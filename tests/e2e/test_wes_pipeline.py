"""The daemon drives WES jobs exactly like Cloudgene ones: same scheduler, state machine, store and downloads.

A real sapporo WES server on loopback (tests/support/wes/sapporo_server.py), a real SQLite database, the Daemon
in-process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest
from support.e2e_support import LogCapture
from support.wes.late_proxy import LateProxy
from support.wes.sapporo_server import DEFAULT_PARAMS, SapporoServer

from daemon.config import Config, DatabaseConfig, PanelConfig, SchedulerConfig, StorageConfig
from daemon.decisions import MAX_INTEGRITY_ATTEMPTS
from daemon.scheduler import Daemon
from daemon.services.wes import TAG_JOB_ID
from daemon.simulator import write_sample_vcf
from daemon.states import TERMINAL, JobState, OutputState
from daemon.submission import Submission, submit

pytestmark = pytest.mark.timeout(120)

FAST = SchedulerConfig(
    workers=4, dispatch_interval=0.2, poll_tick_interval=0.2, download_interval=0.2, maintenance_interval=30,
    lease_seconds=30, backoff_initial=0.2, backoff_max=2,
)


def make_config(tmp_path: Path, sqlite_url: str, server: SapporoServer, params: dict | None = None) -> Config:
    service = server.service_config(
        "wes", wes=server.wes_config(params), poll_interval=0.3,
        panels={"1000g": PanelConfig(name="1000g", remote_id="1000g-phase3")},
    )
    state = tmp_path / "state"
    return Config(
        database=DatabaseConfig(url=sqlite_url),
        storage=StorageConfig(state_dir=state, results_dir=state / "results", temp_dir=state / "tmp"),
        scheduler=FAST,
        services={"wes": service},
    )


@pytest.fixture
def vcf(tmp_path: Path) -> Path:
    path = tmp_path / "chr20.vcf.gz"
    write_sample_vcf(path, chromosome="20", build="hg19", samples=25, variants=80)
    return path


def run_until(daemon: Daemon, job_id, done, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = daemon.store.admin.get(job_id, with_events=True)
        if done(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job still {job.state} after {timeout} s: {job.error}")


def start(config: Config, vcf: Path) -> tuple[Daemon, object]:
    daemon = Daemon(config)
    [job] = submit(config, daemon.store, Submission(services=["wes"], panel="1000g", build="hg19", files=[vcf]))
    daemon.start()
    return daemon, job


def run_to_end(config: Config, vcf: Path, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    """Submit one job, run the daemon until the job has finished, stop it; the job as it ended."""
    daemon, job = start(config, vcf)
    try:
        return run_until(daemon, job.id, lambda j: j.state in TERMINAL, timeout=timeout)
    finally:
        daemon.request_stop()
        daemon.stop()


def test_wes_job_completes_with_verified_outputs(tmp_path, sqlite_url, sapporo: SapporoServer, vcf) -> None:
    job = run_to_end(make_config(tmp_path, sqlite_url, sapporo), vcf)
    assert job.state is JobState.COMPLETED, job.error
    assert [e.to_state for e in job.events][:3] == ["pending", "submitting", "queued"]
    assert job.remote_state == "COMPLETE"
    served = sapporo.outputs_dir(job.remote_id)
    assert job.outputs and all(o.state is OutputState.VERIFIED for o in job.outputs)
    for output in job.outputs:
        local = Path(output.local_path)
        assert local.is_relative_to(Path(job.result_dir))
        original = served / output.name
        assert hashlib.sha256(original.read_bytes()).hexdigest() == output.sha256 == hashlib.sha256(
            local.read_bytes()).hexdigest()


def test_wes_executor_error_fails_the_job_with_stderr(tmp_path, sqlite_url, sapporo: SapporoServer, vcf) -> None:
    config = make_config(tmp_path, sqlite_url, sapporo, {**DEFAULT_PARAMS, "simulate": "fail"})
    job = run_to_end(config, vcf)
    assert job.state is JobState.FAILED
    assert job.remote_state == "EXECUTOR_ERROR" and job.error_kind == "remote_failed"
    assert "EXECUTOR_ERROR" in job.error


def test_wes_cancel_reaches_the_server(tmp_path, sqlite_url, sapporo: SapporoServer, vcf) -> None:
    config = make_config(tmp_path, sqlite_url, sapporo, {**DEFAULT_PARAMS, "sleep": 30})
    daemon, job = start(config, vcf)
    try:
        job = run_until(daemon, job.id, lambda j: j.state is JobState.RUNNING)
        daemon.store.admin.request_cancel(job.id)
        job = run_until(daemon, job.id, lambda j: j.state in TERMINAL)
    finally:
        daemon.request_stop()
        daemon.stop()
    assert job.state is JobState.CANCELLED
    # Cancelled only once the server said so: sapporo says CANCELING until its run.sh got the signal and stopped
    # the workflow, and CANCELED after.
    assert job.events[-1].reason == "cancelled on the server (CANCELED)"
    assert job.cancel_sent_at is not None
    state = httpx.get(f"{sapporo.api_root}/runs/{job.remote_id}/status", timeout=5).json()["state"]
    assert state == "CANCELED"
    run_log = httpx.get(f"{sapporo.api_root}/runs/{job.remote_id}", timeout=5).json()["run_log"]
    assert run_log["end_time"], run_log  # the run's process really ended


def test_wes_cancel_the_server_ignores_is_never_called_cancelled(tmp_path, sqlite_url, sapporo: SapporoServer,
                                                                  vcf) -> None:
    """A server that acknowledges the cancel and runs on: the job stays cancel_requested (said once, after the
    service's cancel_timeout) and, the run completing anyway, ends completed with its results, its history saying
    the cancel was ignored."""
    logs = LogCapture()
    try:
        with LateProxy(sapporo.origin, lost=None, ignore_cancel=True) as proxy:
            config = make_config(tmp_path, sqlite_url, sapporo, {**DEFAULT_PARAMS, "sleep": 4})
            service = dataclasses.replace(config.services["wes"], base_url=proxy.origin, cancel_timeout=1.0)
            daemon, job = start(dataclasses.replace(config, services={"wes": service}), vcf)
            try:
                job = run_until(daemon, job.id, lambda j: j.state is JobState.RUNNING)
                daemon.store.admin.request_cancel(job.id)
                told = run_until(daemon, job.id, lambda j: j.error_kind == "cancel_ignored")
                job = run_until(daemon, job.id, lambda j: j.state in TERMINAL)
            finally:
                daemon.request_stop()
                daemon.stop()
            ignored = list(proxy.ignored_cancels)
    finally:
        logs.close()
    assert told.state is JobState.CANCEL_REQUESTED
    assert told.error.startswith("the server has not cancelled the remote job ")
    assert ignored == [job.remote_id]
    assert job.state is JobState.COMPLETED, job.error
    assert [o.state for o in job.outputs] and all(o.state is OutputState.VERIFIED for o in job.outputs)
    assert any((e.reason or "").startswith("the server ignored the cancel; remote job finished (COMPLETE)")
               for e in job.events), [e.reason for e in job.events]
    assert len([line for line in logs.lines() if line["event"] == "remote_cancel_ignored"]) == 1



def test_wes_run_the_server_records_after_a_504_is_found_not_submitted_again(tmp_path, sqlite_url,
                                                                            sapporo: SapporoServer, vcf) -> None:
    """A proxy answers the submit with 504 and hands it to the server 15 s later: the daemon looks the run up until
    it appears (within submit_settle) instead of submitting a second one."""
    with LateProxy(sapporo.origin, delay=15) as proxy:
        config = make_config(tmp_path, sqlite_url, sapporo)
        service = dataclasses.replace(config.services["wes"], base_url=proxy.origin, submit_settle=60.0)
        job = run_to_end(dataclasses.replace(config, services={"wes": service}), vcf, timeout=90)
        proxy.wait_for_late_submit(30)
        forwarded = proxy.forwarded_submits
    assert forwarded == 1, f"{forwarded} runs submitted"
    runs = httpx.get(f"{sapporo.api_root}/runs", params={"page_size": 1000}, timeout=10).json()["runs"]
    ours = [r["run_id"] for r in runs if (r.get("tags") or {}).get(TAG_JOB_ID) == str(job.id)]
    assert ours == [job.remote_id]
    assert job.state is JobState.COMPLETED, job.error
    assert any("found the earlier submission" in (e.reason or "") for e in job.events)


def test_wes_run_answered_too_late_is_found_on_a_server_that_lists_workflows(tmp_path, sqlite_url,
                                                                            sapporo: SapporoServer, vcf) -> None:
    """The server creates the run at once but answers the submit only after 8 s, past the service's 3 s timeout,
    and lists its runs as the reference server `wes-service` does (under `workflows`, unpaged, unordered, without
    tags). The daemon must find the run there, not read the list as empty and submit a second run once
    submit_settle has passed."""
    with LateProxy(sapporo.origin, delay=8, lost="after", wes03_listing=True) as proxy:
        config = make_config(tmp_path, sqlite_url, sapporo)
        service = dataclasses.replace(config.services["wes"], base_url=proxy.origin, timeout=3.0, submit_settle=10.0)
        job = run_to_end(dataclasses.replace(config, services={"wes": service}), vcf, timeout=90)
        forwarded = proxy.forwarded_submits
    assert forwarded == 1, f"{forwarded} runs submitted ({job.state}: {job.error})"
    runs = httpx.get(f"{sapporo.api_root}/runs", params={"page_size": 1000}, timeout=10).json()["runs"]
    ours = [r["run_id"] for r in runs if (r.get("tags") or {}).get(TAG_JOB_ID) == str(job.id)]
    assert ours == [job.remote_id], (job.state, job.error, [e.reason for e in job.events])
    assert job.state is JobState.COMPLETED, job.error
    assert any("found the earlier submission" in (e.reason or "") for e in job.events)


@pytest.mark.parametrize("published", ["right", "wrong", "wrong_size"])
def test_wes_outputs_are_checked_against_their_published_checksum_and_size(tmp_path, sqlite_url,
                                                                         sapporo: SapporoServer, vcf, published):
    """Outputs published as CWL File objects with `checksum: sha1$…` and `size`: a file whose SHA-1 or size
    differs is never verified (fetched MAX_INTEGRITY_ATTEMPTS times, then given up) and the job fails saying why."""
    with LateProxy(sapporo.origin, lost=None, publish_checksums=published) as proxy:
        config = make_config(tmp_path, sqlite_url, sapporo)
        service = dataclasses.replace(config.services["wes"], base_url=proxy.origin)
        job = run_to_end(dataclasses.replace(config, services={"wes": service}), vcf, timeout=90)
    assert job.outputs and all(o.remote_checksum and o.remote_checksum.startswith("sha1:") for o in job.outputs)
    assert all(o.remote_size is not None for o in job.outputs)
    if published == "right":
        assert job.state is JobState.COMPLETED, job.error
        assert all(o.state is OutputState.VERIFIED and o.size == o.remote_size for o in job.outputs)
    else:
        assert job.state is JobState.FAILED
        assert all(o.state is OutputState.FAILED and o.bad_downloads == MAX_INTEGRITY_ATTEMPTS for o in job.outputs)
        said = "its sha1 is " if published == "wrong" else " bytes arrived, but the server published "
        assert all(said in o.error and "the server published" in o.error for o in job.outputs)


def test_a_cwl_workflow_gets_its_inputs_as_file_objects(tmp_path, sqlite_url, sapporo: SapporoServer, vcf) -> None:
    """`{cwl_files}`: the inputs reach the run as CWL File objects and the job completes on them."""
    params = {**DEFAULT_PARAMS, "files": "{cwl_files}"}
    job = run_to_end(make_config(tmp_path, sqlite_url, sapporo, params), vcf)
    assert job.state is JobState.COMPLETED, job.error
    request = httpx.get(f"{sapporo.api_root}/runs/{job.remote_id}", timeout=5).json()["request"]
    sent = request["workflow_params"]
    sent = json.loads(sent) if isinstance(sent, str) else sent
    assert sent["files"] == [{"class": "File", "location": vcf.name}]
    assert any(o.name == "chr20.dose.vcf.gz" for o in job.outputs)


@pytest.mark.parametrize("allowed", [True, False], ids=["under-the-root", "outside-the-root"])
def test_wes_outputs_published_as_paths_are_copied_only_from_under_the_root(tmp_path, sqlite_url,
                                                                           sapporo: SapporoServer, vcf, allowed):
    """outputs_as: path (a server on a shared file system publishes file:// paths): each is copied and verified as a
    download is, but only from under wes.outputs_root; a path elsewhere fails its file, naming the root."""
    elsewhere = tmp_path / "not-the-runs"
    elsewhere.mkdir()
    with LateProxy(sapporo.origin, lost=None,
                   local_outputs=lambda run_id, name: sapporo.outputs_dir(run_id) / name) as proxy:
        config = make_config(tmp_path, sqlite_url, sapporo)
        service = config.services["wes"]
        wes = dataclasses.replace(service.wes, outputs_as="path",
                                  outputs_root=sapporo.run_dir if allowed else elsewhere)
        service = dataclasses.replace(service, base_url=proxy.origin, wes=wes)
        job = run_to_end(dataclasses.replace(config, services={"wes": service}), vcf, timeout=90)
    assert job.outputs and all(o.url.startswith("file://") for o in job.outputs)
    if allowed:
        assert job.state is JobState.COMPLETED, job.error
        for output in job.outputs:
            source = sapporo.outputs_dir(job.remote_id) / output.name
            assert output.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    else:
        assert job.state is JobState.FAILED
        assert all(o.state is OutputState.FAILED and "is not under wes.outputs_root" in o.error for o in job.outputs)


@pytest.mark.parametrize("published", ["right", "wrong"])
def test_cwl_file_objects_at_server_paths_are_checked_against_their_checksum_and_size(tmp_path, sqlite_url,
                                                                                     sapporo: SapporoServer, vcf,
                                                                                     published):
    """outputs_as: path with outputs as a CWL engine on a shared file system publishes them: File objects whose
    `location` is a file:// path, with `checksum: sha1$…` and `size`. A copy is held to those as a download is."""
    with LateProxy(sapporo.origin, lost=None, publish_checksums=published,
                   local_outputs=lambda run_id, name: sapporo.outputs_dir(run_id) / name) as proxy:
        config = make_config(tmp_path, sqlite_url, sapporo)
        service = config.services["wes"]
        wes = dataclasses.replace(service.wes, outputs_as="path", outputs_root=sapporo.run_dir)
        service = dataclasses.replace(service, base_url=proxy.origin, wes=wes)
        job = run_to_end(dataclasses.replace(config, services={"wes": service}), vcf, timeout=90)
    assert job.outputs and all(o.url.startswith("file://") for o in job.outputs)
    assert all(o.remote_checksum and o.remote_checksum.startswith("sha1:") and o.remote_size for o in job.outputs)
    if published == "right":
        assert job.state is JobState.COMPLETED, job.error
        for output in job.outputs:
            source = sapporo.outputs_dir(job.remote_id) / output.name
            assert output.state is OutputState.VERIFIED and output.size == output.remote_size
            assert output.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    else:
        assert job.state is JobState.FAILED
        assert all(o.state is OutputState.FAILED and o.bad_downloads == MAX_INTEGRITY_ATTEMPTS for o in job.outputs)
        assert all("its sha1 is " in o.error and "the server published" in o.error for o in job.outputs)
