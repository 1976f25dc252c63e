"""The pipeline's decision table, pure: our states × what the server said (remote kinds) or raised (error kinds)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import pytest

from daemon.decisions import (
    CANCEL_IGNORED,
    MAX_EMPTY_SUCCESS_POLLS,
    MAX_INTEGRITY_ATTEMPTS,
    MAX_STEP_CRASHES,
    NO_OUTPUTS,
    CrashKind,
    ErrorAction,
    NextPoll,
    PollNote,
    ResubmitPolicy,
    after_bad_download,
    after_cancel_status,
    after_crash,
    after_downloads,
    after_error,
    after_lookup_missed,
    after_status,
    after_submit_error,
    retirement_warning,
    retry_after_failure,
    submitted,
)
from daemon.outcome import KEEP, JobColumns, OutputColumns
from daemon.remote import RemoteOutput, RemoteStatus
from daemon.services.errors import Blocked, JobLimitReached, Permanent, ServiceError, Transient
from daemon.states import TERMINAL, TRANSITIONS, JobState, OutputState, RemoteKind

NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
FILE = RemoteOutput(name="chr_20.zip", url="https://x/share/results/h/chr_20.zip", remote_hash="h")


@dataclass(frozen=True)
class FakeJob:
    state: JobState = JobState.RUNNING
    failures: int = 0
    error: str | None = None
    error_kind: str | None = None
    remote_state: str | None = "2"
    restart_attempts: int = 0
    retries: int = 0
    submit_attempts: int = 0
    submitted_at: dt.datetime | None = None
    cancel_sent_at: dt.datetime | None = None
    retires_at: dt.datetime | None = None
    retirement_warned_at: dt.datetime | None = None


@dataclass(frozen=True)
class FakeFile:
    name: str = "chr_20.zip"
    state: OutputState = OutputState.PENDING
    size: int | None = None
    attempts: int = 0
    bad_downloads: int = 0


def status(kind: RemoteKind, *, raw: str = "x", outputs: tuple[RemoteOutput, ...] = (FILE,),
           message: str | None = None, qc_failed: bool = False) -> RemoteStatus:
    return RemoteStatus(kind=kind, raw_state=raw, outputs=outputs, message=message, qc_failed=qc_failed)


# ------------------------------------------------------------------------------------------------ polls


#: remote kind -> (our next state, next poll, error kind) for a healthy running job whose remote job lists files.
POLL_TABLE = {
    RemoteKind.QUEUED: (JobState.QUEUED, NextPoll.INTERVAL, None),
    RemoteKind.RUNNING: (JobState.RUNNING, NextPoll.INTERVAL, None),
    RemoteKind.SUCCEEDED: (JobState.DOWNLOADING, NextPoll.NOW, None),
    RemoteKind.FAILED: (JobState.FAILED, NextPoll.UNCHANGED, "remote_failed"),
    RemoteKind.CANCELLED: (JobState.CANCELLED, NextPoll.UNCHANGED, None),
    RemoteKind.EXPIRED: (JobState.FAILED, NextPoll.UNCHANGED, "expired"),
    RemoteKind.DEAD: (None, NextPoll.INTERVAL, None),
    RemoteKind.UNKNOWN: (None, NextPoll.INTERVAL, None),
}


def test_the_poll_table_covers_every_remote_kind() -> None:
    assert set(POLL_TABLE) == set(RemoteKind)


@pytest.mark.parametrize("ours", [JobState.QUEUED, JobState.RUNNING])
@pytest.mark.parametrize("kind", list(RemoteKind))
def test_a_status_answer_moves_a_polled_job_as_the_table_says(ours: JobState, kind: RemoteKind) -> None:
    decision = after_status(FakeJob(state=ours), status(kind))
    state, next_poll, error_kind = POLL_TABLE[kind]
    assert (decision.state, decision.next_poll, decision.error_kind) == (state, next_poll, error_kind)
    if decision.state is not None:
        assert decision.state in TRANSITIONS[ours] or decision.state is ours  # the state machine allows it
    assert decision.outputs == ((FILE,) if kind is RemoteKind.SUCCEEDED else ())
    assert decision.restart is (kind is RemoteKind.DEAD)
    assert not decision.recovered


def test_a_failed_remote_job_fails_ours_with_the_servers_reason() -> None:
    decision = after_status(FakeJob(), status(RemoteKind.FAILED, raw="-1", message="chr20: no SNPs left"))
    assert (decision.state, decision.reason, decision.error) == (JobState.FAILED, "chr20: no SNPs left",
                                                                 "chr20: no SNPs left")


def test_a_dead_remote_job_is_restarted_once_then_fails_ours() -> None:
    first = after_status(FakeJob(restart_attempts=0), status(RemoteKind.DEAD))
    assert first.restart and first.note is PollNote.DEAD_RESTART and first.state is None
    second = after_status(FakeJob(restart_attempts=1), status(RemoteKind.DEAD))
    assert not second.restart and second.state is JobState.FAILED and second.error_kind == "remote_dead"


@pytest.mark.parametrize("seen_before, noted", [(False, True), (True, False)])
def test_an_unknown_remote_state_is_told_once_and_polled_again(seen_before: bool, noted: bool) -> None:
    job = FakeJob(remote_state="42" if seen_before else "2")
    decision = after_status(job, status(RemoteKind.UNKNOWN, raw="42"))
    assert decision.state is None and decision.next_poll is NextPoll.INTERVAL
    assert (decision.note is PollNote.UNKNOWN_STATE) is noted


@pytest.mark.parametrize("earlier_empty_polls", range(MAX_EMPTY_SUCCESS_POLLS))
def test_a_success_without_files_is_polled_again_then_fails_the_job(earlier_empty_polls: int) -> None:
    job = FakeJob(failures=earlier_empty_polls, error_kind=NO_OUTPUTS if earlier_empty_polls else None)
    decision = after_status(job, status(RemoteKind.SUCCEEDED, outputs=()))
    polls = earlier_empty_polls + 1
    assert decision.error_kind == NO_OUTPUTS
    assert not decision.recovered  # the empty answers are one problem going on
    if polls >= MAX_EMPTY_SUCCESS_POLLS:
        assert (decision.state, decision.next_poll) == (JobState.FAILED, NextPoll.UNCHANGED)
        assert f"{polls} polls in a row" in (decision.reason or "")
    else:
        assert (decision.state, decision.next_poll, decision.failures) == (None, NextPoll.INTERVAL, polls)
        assert (decision.note is PollNote.EMPTY_SUCCESS) is (polls == 1)
    assert decision.outputs == ()  # a job never completes empty


@pytest.mark.parametrize("error_kind, resumes", [("timeout", False), ("unavailable", True), ("rate_limited", True)])
def test_an_answer_after_failures_is_a_recovery_and_ends_a_service_wide_pause(error_kind: str, resumes: bool) -> None:
    decision = after_status(FakeJob(failures=3, error_kind=error_kind), status(RemoteKind.RUNNING))
    assert decision.recovered and decision.resume_service is resumes
    assert (decision.failures, decision.error, decision.error_kind) == (0, None, None)


# ------------------------------------------------------------------------------------------------ errors


ERRORS: dict[str, ServiceError] = {
    "transient": Transient("read timed out", kind="timeout"),
    "service_wide": Transient("maintenance", kind="unavailable", service_wide=True),
    "job_limit": JobLimitReached("Only 3 jobs per user", limit=3),
    "blocked": Blocked("token rejected", kind="unauthorized"),
    "permanent": Permanent("panel unknown", kind="bad_request"),
    "remote_not_found": Permanent("no such job", kind="remote_not_found"),
}
NON_TERMINAL = [state for state in JobState if state not in TERMINAL and state is not JobState.PENDING]


def expected_action(state: JobState, error: str) -> ErrorAction:
    """DESIGN.md's rules, spelled out once more as a table."""
    if error == "job_limit":
        return ErrorAction.WAIT_FOR_SLOT if state is JobState.SUBMITTING else ErrorAction.RETRY
    if error in ("transient", "service_wide"):
        return ErrorAction.RETRY
    if error == "blocked":
        keep = state in (JobState.DOWNLOADING, JobState.CANCEL_REQUESTED)
        return ErrorAction.BLOCK_AND_RETRY if keep else ErrorAction.BLOCK_AND_PARK
    return ErrorAction.CANCEL if state is JobState.CANCEL_REQUESTED else ErrorAction.FAIL


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("state", NON_TERMINAL)
def test_every_error_kind_in_every_working_state(state: JobState, error: str) -> None:
    decision = after_error(FakeJob(state=state), ERRORS[error])
    assert decision.action is expected_action(state, error)
    if decision.action is ErrorAction.FAIL:
        expired = error == "remote_not_found" and state in (JobState.QUEUED, JobState.RUNNING)
        assert decision.error_kind == ("expired" if expired else ERRORS[error].kind)
        assert str(ERRORS[error]) in (decision.reason or "")


def test_a_transient_error_never_fails_a_job_however_often() -> None:
    for failures in (0, 10, 10_000):
        assert after_error(FakeJob(failures=failures), ERRORS["transient"]).action is ErrorAction.RETRY


# ------------------------------------------------------------------------------------------------ backoff


def test_backoff_grows_to_its_maximum_and_follows_retry_after() -> None:
    delays = [retry_after_failure(FakeJob(failures=n), Transient("x"), initial=10, maximum=300, now=NOW).delay
              for n in range(12)]
    assert delays[0] <= 20 and max(delays) <= 300 and delays[-1] >= 150
    told = retry_after_failure(FakeJob(), Transient("slow down", retry_after=120), initial=10, maximum=300, now=NOW)
    assert told.delay >= 120 and told.failures == 1 and told.pause_service_until is None


def test_a_service_wide_error_pauses_the_service_for_the_backoff() -> None:
    outage = Transient("maintenance", kind="unavailable", service_wide=True)
    retry = retry_after_failure(FakeJob(failures=2), outage, initial=10, maximum=300, now=NOW)
    assert retry.failures == 3
    assert retry.pause_service_until == NOW + dt.timedelta(seconds=retry.delay)


# ------------------------------------------------------------------------------------------------ crashes


def test_an_unreachable_database_or_a_local_fs_problem_is_waited_out() -> None:
    job = FakeJob(failures=100, error_kind="internal", error="internal error: RuntimeError: x")
    assert after_crash(job, signature="internal error: RuntimeError:", database_unreachable=True,
                       environment_error=False).kind is CrashKind.DATABASE
    assert after_crash(job, signature="internal error: RuntimeError:", database_unreachable=False,
                       environment_error=True).kind is CrashKind.LOCAL_IO


@pytest.mark.parametrize("earlier", range(MAX_STEP_CRASHES))
def test_the_same_crash_in_a_row_fails_the_job_at_the_limit(earlier: int) -> None:
    signature = "internal error: RuntimeError:"
    job = FakeJob(failures=earlier, error_kind="internal" if earlier else None,
                  error=f"{signature} boom" if earlier else None)
    decision = after_crash(job, signature=signature, database_unreachable=False, environment_error=False)
    assert decision.kind is CrashKind.INTERNAL
    assert decision.crashes == earlier + 1 and decision.first is (earlier == 0)
    assert decision.fail is (earlier + 1 >= MAX_STEP_CRASHES)


def test_a_different_crash_starts_the_count_again() -> None:
    job = FakeJob(failures=4, error_kind="internal", error="internal error: KeyError: 'x'")
    decision = after_crash(job, signature="internal error: RuntimeError:", database_unreachable=False,
                           environment_error=False)
    assert (decision.crashes, decision.first, decision.fail) == (1, True, False)


# ------------------------------------------------------------------------------------------------ submit


def test_a_submitted_job_is_queued_with_its_remote_id_and_its_failures_cleared() -> None:
    outcome = submitted("job-1", "submitted", poll_interval=60, now=NOW)
    assert (outcome.state, outcome.reason, outcome.next_poll_in) == (JobState.QUEUED, "submitted as job-1", 10.0)
    assert outcome.columns == JobColumns(remote_id="job-1", submitted_at=NOW, failures=0, error=None,
                                         error_kind=None)
    assert submitted("job-1", "found", poll_interval=2, now=NOW).next_poll_in == 2


@pytest.mark.parametrize("may_have_created, columns", [
    (False, JobColumns(submit_attempts=0, submitted_at=None)),  # refused: nothing to look up next time
    (True, JobColumns(submitted_at=NOW)),  # unknown: looked up until the settle window from now closes
])
def test_a_failed_submit_says_whether_the_next_attempt_looks_the_job_up(
    may_have_created: bool, columns: JobColumns
) -> None:
    exc = Transient("timed out", kind="timeout")
    exc.may_have_created = may_have_created
    assert after_submit_error(exc, now=NOW) == columns


@pytest.mark.parametrize("sent_ago, failures, shortest, longest", [
    (0, 0, 2.5, 5.0),  # just sent: the first look is soon
    (60, 3, 20.0, 40.0),  # backing off: 5 s × 2³, jittered
    (290, 6, 10.0, 10.0),  # the last look when the window closes, not later
])
def test_a_submit_not_found_yet_is_looked_up_again_within_the_settle_window(
    sent_ago: float, failures: int, shortest: float, longest: float
) -> None:
    since = NOW - dt.timedelta(seconds=sent_ago)
    job = FakeJob(state=JobState.SUBMITTING, submit_attempts=1, submitted_at=since, failures=failures)
    decision = after_lookup_missed(job, settle=300, now=NOW, initial=5, maximum=600)
    assert decision.outcome is not None and not decision.died_in_flight
    assert decision.outcome.state is None
    assert decision.outcome.next_poll_in is not None
    assert shortest - 1e-9 <= decision.outcome.next_poll_in <= longest + 1e-9
    assert decision.outcome.columns == JobColumns(failures=failures + 1, submitted_at=since)


def test_a_submit_not_found_once_the_window_closed_is_sent_again() -> None:
    job = FakeJob(state=JobState.SUBMITTING, submit_attempts=2, submitted_at=NOW - dt.timedelta(seconds=300))
    assert after_lookup_missed(job, settle=300, now=NOW, initial=5, maximum=600).outcome is None


def test_a_submit_whose_daemon_died_in_flight_starts_its_window_now() -> None:
    job = FakeJob(state=JobState.SUBMITTING, submit_attempts=1, submitted_at=None)
    decision = after_lookup_missed(job, settle=300, now=NOW, initial=5, maximum=600)
    assert decision.died_in_flight and decision.outcome is not None
    assert decision.outcome.columns.submitted_at == NOW


# ------------------------------------------------------------------------------------------------ downloads


@pytest.mark.parametrize("earlier", range(MAX_INTEGRITY_ATTEMPTS))
def test_a_file_served_unusable_is_given_up_at_the_limit(earlier: int) -> None:
    changes = after_bad_download(FakeFile(attempts=earlier + 2, bad_downloads=earlier), "zip is corrupt")
    assert (changes.bad_downloads, changes.attempts) == (earlier + 1, earlier + 3)
    if earlier + 1 >= MAX_INTEGRITY_ATTEMPTS:
        assert changes.state is OutputState.FAILED
        assert changes.error == (f"zip is corrupt (gave up after {earlier + 1} attempts, each spending one of the "
                                 "downloads the server allows)")
    else:
        assert (changes.state, changes.error) == (KEEP, "zip is corrupt")


def test_downloads_go_on_while_a_file_is_pending() -> None:
    files = [FakeFile(name="a", state=OutputState.VERIFIED, size=1), FakeFile(name="b")]
    outcome = after_downloads(files, "/results/j")
    assert (outcome.state, outcome.next_poll_in) == (None, 0)
    assert outcome.columns == JobColumns(result_dir="/results/j", failures=0, error=None, error_kind=None)


def test_a_job_whose_file_could_not_be_had_fails_naming_it_escaped() -> None:
    files = [FakeFile(name="a", state=OutputState.VERIFIED, size=1),
             FakeFile(name="b\x1b[2J", state=OutputState.FAILED)]
    outcome = after_downloads(files, "/results/j")
    assert outcome.state is JobState.FAILED
    assert outcome.reason == "1 of 2 result files could not be downloaded: b\\x1b[2J"
    assert (outcome.columns.error, outcome.columns.error_kind) == (outcome.reason, "download_failed")


def test_a_job_with_every_file_verified_completes_counting_them() -> None:
    files = [FakeFile(name="a", state=OutputState.VERIFIED, size=1), FakeFile(name="b", state=OutputState.VERIFIED,
                                                                               size=2047)]
    outcome = after_downloads(files, "/results/j")
    assert (outcome.state, outcome.reason) == (JobState.COMPLETED, "2 files downloaded and verified (2048 bytes)")


# ------------------------------------------------------------------------------------------------ typed columns


def test_columns_a_step_leaves_alone_are_not_written_but_none_is() -> None:
    assert JobColumns(error=None, failures=0).values() == {"error": None, "failures": 0}
    assert OutputColumns().values() == {}


def test_later_columns_are_written_over_earlier_ones() -> None:
    merged = JobColumns(failures=1, error="x") | JobColumns(error=None, result_dir="/r")
    assert merged == JobColumns(failures=1, error=None, result_dir="/r")


# ------------------------------------------------------------------------------------------------ a sent cancel


def cancelling(seconds_ago: float = 5, **fields: object) -> FakeJob:
    return FakeJob(state=JobState.CANCEL_REQUESTED, cancel_sent_at=NOW - dt.timedelta(seconds=seconds_ago),
                   **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "raw", "state", "reason"), [
    (RemoteKind.CANCELLED, "CANCELED", JobState.CANCELLED, "cancelled on the server (CANCELED)"),
    # Cloudgene moves a job it cancelled to 9, as it does a failed one: asked to cancel, that is the cancel.
    (RemoteKind.FAILED, "FAILED_NOTIFIED", JobState.CANCELLED, "cancelled on the server (FAILED_NOTIFIED)"),
    (RemoteKind.DEAD, "DEAD", JobState.CANCELLED, "cancelled; the remote job died (DEAD)"),
    (RemoteKind.SUCCEEDED, "COMPLETE", JobState.DOWNLOADING,
     "the server ignored the cancel; remote job finished (COMPLETE); 1 files"),
    (RemoteKind.FAILED, "EXECUTOR_ERROR", JobState.FAILED, "the server ignored the cancel; boom"),
])
def test_a_cancelled_job_ends_as_the_server_says(kind: RemoteKind, raw: str, state: JobState, reason: str) -> None:
    decision = after_cancel_status(cancelling(), status(kind, raw=raw, message="boom"), now=NOW, cancel_timeout=60)
    assert (decision.state, decision.reason) == (state, reason)
    assert decision.outputs == ((FILE,) if state is JobState.DOWNLOADING else ())


@pytest.mark.parametrize("kind", [RemoteKind.QUEUED, RemoteKind.RUNNING, RemoteKind.UNKNOWN])
def test_a_cancel_not_carried_out_yet_is_polled_and_never_called_cancelled(kind: RemoteKind) -> None:
    decision = after_cancel_status(cancelling(30), status(kind, raw="RUNNING"), now=NOW, cancel_timeout=60)
    assert (decision.state, decision.next_poll, decision.note, decision.error) == (None, NextPoll.INTERVAL, None, None)


def test_a_cancel_the_server_ignores_is_said_once_and_the_job_polled_on() -> None:
    running = status(RemoteKind.RUNNING, raw="RUNNING")
    first = after_cancel_status(cancelling(61), running, now=NOW, cancel_timeout=60)
    assert (first.state, first.note, first.error_kind) == (None, PollNote.CANCEL_IGNORED, CANCEL_IGNORED)
    assert first.error == ("the server has not cancelled the remote job 61 s after the cancel was sent (it says "
                           "RUNNING); still polling it")
    told = cancelling(3600, error=first.error, error_kind=CANCEL_IGNORED)
    again = after_cancel_status(told, running, now=NOW, cancel_timeout=60)
    assert (again.state, again.note, again.error, again.error_kind) == (None, None, first.error, CANCEL_IGNORED)


# ------------------------------------------------------------------------------------------------ resubmit policy

POLICY = ResubmitPolicy((re.compile("pipeline execution failed", re.IGNORECASE), re.compile("DEAD")), most=2)


@pytest.mark.parametrize(("job", "answer", "resubmitted"), [
    (FakeJob(), status(RemoteKind.FAILED, raw="FAILED", message="Pipeline execution failed."), True),
    (FakeJob(retries=1), status(RemoteKind.FAILED, raw="FAILED", message="Pipeline execution failed."), True),
    (FakeJob(retries=2), status(RemoteKind.FAILED, raw="FAILED", message="Pipeline execution failed."), False),
    (FakeJob(), status(RemoteKind.FAILED, raw="FAILED", message="chr20: no variants left"), False),  # not listed
    (FakeJob(), status(RemoteKind.FAILED, raw="FAILED", message="Pipeline execution failed.", qc_failed=True),
     False),  # the input's checks: another submit fails the same
    (FakeJob(restart_attempts=1), status(RemoteKind.DEAD, raw="DEAD"), True),  # lost by the server, twice
    (FakeJob(), status(RemoteKind.EXPIRED, raw="RETIRED"), False),  # results gone: nothing failed to run
])
def test_a_resubmit_policy_sends_listed_server_failures_again(job: FakeJob, answer: RemoteStatus,
                                                             resubmitted: bool) -> None:
    decision = after_status(job, answer, resubmit=POLICY)
    if resubmitted:
        assert (decision.state, decision.next_poll, decision.resubmit) == (JobState.PENDING, NextPoll.NOW, True)
        assert decision.reason is not None and decision.reason.endswith(f"({job.retries + 1} of 2)")
        assert decision.error is not None and decision.error_kind in ("remote_failed", "remote_dead")
    else:
        assert decision.state is not JobState.PENDING and not decision.resubmit
    assert after_status(job, answer).state is not JobState.PENDING  # no policy: never


# ------------------------------------------------------------------------------------------------ retirement


@pytest.mark.parametrize(("hours_left", "warned", "said"), [
    (None, False, None),  # no deletion scheduled
    (48.0, False, None),  # far enough
    (23.5, False, "the server deletes this job's results at 2026-12-06 11:30 UTC, in 23.5 h, and they are not "
                  "downloaded yet"),
    (-1.0, False, "the server deleted (or is deleting) this job's results at 2026-12-05 11:00 UTC, before they "
                  "were downloaded"),
    (1.0, True, None),  # said once already
])
def test_results_retiring_soon_are_warned_of_once(hours_left: float | None, warned: bool, said: str | None) -> None:
    retires = None if hours_left is None else NOW + dt.timedelta(hours=hours_left)
    job = FakeJob(retirement_warned_at=NOW if warned else None)
    assert retirement_warning(job, retires, now=NOW, within=86400) == said
