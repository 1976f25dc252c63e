"""What a step's result means for a job: pure functions of the job as it is and what the server said or raised,
each returning a typed decision. The pipeline applies them (adapter calls, store writes, service pauses, logs) and
decides nothing itself, so the whole table of our states × remote states × error kinds is tested without a
database or a server (tests/unit/test_decisions.py). The shape follows procrastinate's
`RetryStrategy.get_retry_decision()` returning a `RetryDecision`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from daemon.backoff import backoff_delay
from daemon.outcome import JobColumns, Outcome, OutputColumns
from daemon.remote import RemoteOutput, RemoteStatus
from daemon.services.errors import Blocked, JobLimitReached, Permanent, ServiceError, Transient
from daemon.states import CANCELLED_WHEN_ASKED, JobState, OutputState, RemoteKind
from daemon.text import counted, printable

#: Polls in a row that may find the remote job finished without any result file listed before our job fails: a
#: server may publish the files a moment after it says SUCCESS, but a job completed without them would never
#: fetch them.
MAX_EMPTY_SUCCESS_POLLS = 5
NO_OUTPUTS = "no_outputs"
#: Steps in a row that may fail with the same unexpected error (a bug, or something in the job's own data that
#: nothing here handles) before that fails the job: retrying a deterministic failure only repeats it, forever.
MAX_STEP_CRASHES = 5
#: Served downloads of one file that came out unusable (`downloads.BadDownload`: cut off, short, corrupt) tolerated
#: before that file is given up: each spent one of the server's limited download counts (Cloudgene: 10 per file).
#: Failures before the server answered spend none that we can know of, and never give a file up.
MAX_INTEGRITY_ATTEMPTS = 3
#: The error kind of a job whose sent cancel the server has not carried out within the service's cancel_timeout.
CANCEL_IGNORED = "cancel_ignored"
#: Error kinds that pause the whole service (`Transient.service_wide`); a job recovering from one ends the pause.
SERVICE_WIDE_KINDS = frozenset({"unavailable", "rate_limited"})


class JobView(Protocol):
    """What the decisions read of a job (a `daemon.db.models.Job` is one)."""

    @property
    def state(self) -> JobState: ...
    @property
    def failures(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def error_kind(self) -> str | None: ...
    @property
    def remote_state(self) -> str | None: ...
    @property
    def restart_attempts(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def submit_attempts(self) -> int: ...
    @property
    def submitted_at(self) -> dt.datetime | None: ...
    @property
    def cancel_sent_at(self) -> dt.datetime | None: ...
    @property
    def retires_at(self) -> dt.datetime | None: ...
    @property
    def retirement_warned_at(self) -> dt.datetime | None: ...


class NextPoll(enum.Enum):
    UNCHANGED = "unchanged"  # a finished job: nothing more to poll
    NOW = "now"  # the next step (the download) is due at once
    INTERVAL = "interval"  # the service's poll interval, jittered


class PollNote(enum.Enum):
    """Something a poll's answer says that the log should tell once."""

    UNKNOWN_STATE = "unknown_remote_state"  # a state we do not know, new since the last poll
    EMPTY_SUCCESS = "remote_success_without_outputs"  # the first success without files
    DEAD_RESTART = "remote_job_dead"  # a dead remote job: ask the server to restart it
    CANCEL_IGNORED = "remote_cancel_ignored"  # the cancel went unconfirmed past the service's cancel_timeout


@dataclass(frozen=True)
class PollDecision:
    """What one status answer means: the job's next state and the error columns to write with it."""

    state: JobState | None  # None: unchanged
    reason: str | None
    next_poll: NextPoll
    failures: int = 0
    error: str | None = None
    error_kind: str | None = None
    #: Files to record and download (the remote job finished with them).
    outputs: tuple[RemoteOutput, ...] = ()
    #: Ask the server to restart the remote job (Cloudgene DEAD, the first time).
    restart: bool = False
    #: The remote job failed in a way the service's resubmit policy sends again: the job goes back to pending,
    #: its remote bookkeeping reset, `retries` counted up.
    resubmit: bool = False
    #: The job had failed steps before this answer: they are over (and a service-wide pause with them).
    recovered: bool = False
    resume_service: bool = False
    note: PollNote | None = None


@dataclass(frozen=True)
class ResubmitPolicy:
    """A service's opt-in: remote failures whose reason (or remote state) matches one of `patterns` are submitted
    again, up to `most` times per job; failures of the input's checks never are."""

    patterns: tuple[re.Pattern[str], ...]
    most: int


def after_status(job: JobView, status: RemoteStatus, *, resubmit: ResubmitPolicy | None = None) -> PollDecision:
    """The decision for a job in a polled state (queued, running) given the remote job's status."""
    empty_success = status.kind is RemoteKind.SUCCEEDED and not status.outputs
    recovered = bool(job.failures) and not (empty_success and job.error_kind == NO_OUTPUTS)
    decision = _status_decision(job, status, empty_success)
    if decision.state is JobState.FAILED and resubmit is not None and _resubmitted(job, status, decision, resubmit):
        reason = (f"the server failed the remote job ({decision.reason}); submitting it again "
                  f"({job.retries + 1} of {resubmit.most})")
        decision = PollDecision(JobState.PENDING, reason, NextPoll.NOW, error=decision.reason,
                                error_kind=decision.error_kind, resubmit=True)
    return dataclasses.replace(decision, recovered=recovered,
                               resume_service=recovered and job.error_kind in SERVICE_WIDE_KINDS)


def _resubmitted(job: JobView, status: RemoteStatus, failed: PollDecision, policy: ResubmitPolicy) -> bool:
    if job.retries >= policy.most or status.qc_failed or failed.error_kind not in ("remote_failed", "remote_dead"):
        return False
    said = failed.reason or ""
    return any(pattern.search(said) or pattern.search(status.raw_state) for pattern in policy.patterns)


def _status_decision(job: JobView, status: RemoteStatus, empty_success: bool) -> PollDecision:
    raw = status.raw_state
    match status.kind:
        case RemoteKind.QUEUED | RemoteKind.RUNNING:
            new = JobState.QUEUED if status.kind is RemoteKind.QUEUED else JobState.RUNNING
            return PollDecision(new, f"remote state {raw}", NextPoll.INTERVAL)
        case RemoteKind.SUCCEEDED if empty_success:
            polls = job.failures + 1 if job.error_kind == NO_OUTPUTS else 1
            if polls >= MAX_EMPTY_SUCCESS_POLLS:
                reason = (f"the server says the remote job finished ({raw}) but listed no result files "
                          f"in {polls} polls in a row; nothing was downloaded")
                return PollDecision(JobState.FAILED, reason, NextPoll.UNCHANGED, error=reason, error_kind=NO_OUTPUTS)
            reason = f"remote job finished ({raw}) but lists no result files yet"
            return PollDecision(None, None, NextPoll.INTERVAL, failures=polls, error=reason, error_kind=NO_OUTPUTS,
                                note=PollNote.EMPTY_SUCCESS if polls == 1 else None)
        case RemoteKind.SUCCEEDED:
            return PollDecision(JobState.DOWNLOADING, f"remote job finished ({raw}); {len(status.outputs)} files",
                                NextPoll.NOW, outputs=status.outputs)
        case RemoteKind.FAILED:
            reason = status.message or f"remote job failed ({raw})"
            return PollDecision(JobState.FAILED, reason, NextPoll.UNCHANGED, error=reason, error_kind="remote_failed")
        case RemoteKind.CANCELLED:
            return PollDecision(JobState.CANCELLED, "cancelled on the server", NextPoll.UNCHANGED)
        case RemoteKind.EXPIRED:
            reason = f"results expired remotely ({raw}) before they were downloaded"
            return PollDecision(JobState.FAILED, reason, NextPoll.UNCHANGED, error=reason, error_kind="expired")
        case RemoteKind.DEAD if job.restart_attempts == 0:
            return PollDecision(None, None, NextPoll.INTERVAL, restart=True, note=PollNote.DEAD_RESTART)
        case RemoteKind.DEAD:
            reason = "remote job died (DEAD) and did not survive a restart"
            return PollDecision(JobState.FAILED, reason, NextPoll.UNCHANGED, error=reason, error_kind="remote_dead")
        case _:
            note = PollNote.UNKNOWN_STATE if raw != job.remote_state else None
            return PollDecision(None, None, NextPoll.INTERVAL, note=note)


def after_cancel_status(job: JobView, status: RemoteStatus, *, now: dt.datetime, cancel_timeout: float
                        ) -> PollDecision:
    """The decision for a job whose cancel was sent (`cancel_requested`, `cancel_sent_at` set) given the remote
    job's status. It is cancelled only when the server says so: a server may acknowledge a cancel and run on. A
    remote job that finishes anyway completes (downloaded) or fails as any other, its history saying that the cancel
    was ignored; one still running past `cancel_timeout` seconds is reported once and polled on."""
    raw = status.raw_state
    if status.kind is RemoteKind.CANCELLED or (status.kind is RemoteKind.FAILED and raw in CANCELLED_WHEN_ASKED):
        return PollDecision(JobState.CANCELLED, f"cancelled on the server ({raw})", NextPoll.UNCHANGED)
    if status.kind is RemoteKind.DEAD:
        return PollDecision(JobState.CANCELLED, f"cancelled; the remote job died ({raw})", NextPoll.UNCHANGED)
    if status.kind in (RemoteKind.SUCCEEDED, RemoteKind.FAILED, RemoteKind.EXPIRED):
        decision = after_status(job, status)
        if decision.state is None:  # a success that lists no files yet: polled again, as any other
            return decision
        return dataclasses.replace(decision, reason=f"the server ignored the cancel; {decision.reason}")
    if job.error_kind == CANCEL_IGNORED:  # said already: kept, not said again
        return PollDecision(None, None, NextPoll.INTERVAL, failures=job.failures, error=job.error,
                            error_kind=CANCEL_IGNORED)
    waited = (now - (job.cancel_sent_at or now)).total_seconds()
    if waited < cancel_timeout:
        return PollDecision(None, None, NextPoll.INTERVAL)
    message = (f"the server has not cancelled the remote job {waited:.0f} s after the cancel was sent (it says "
               f"{raw}); still polling it")
    return PollDecision(None, None, NextPoll.INTERVAL, error=message, error_kind=CANCEL_IGNORED,
                        note=PollNote.CANCEL_IGNORED)


class ErrorAction(enum.Enum):
    WAIT_FOR_SLOT = "wait_for_slot"  # the server's "Only N jobs": back to pending, the service's limit lowered
    RETRY = "retry"  # back off and try the same step again
    BLOCK_AND_RETRY = "block_and_retry"  # block the service; keep this job's step, retried once unblocked
    BLOCK_AND_PARK = "block_and_park"  # block the service and park the job until it is unblocked
    CANCEL = "cancel"  # a cancel the server cannot carry out: nothing is left to cancel
    FAIL = "fail"


@dataclass(frozen=True)
class ErrorDecision:
    action: ErrorAction
    #: For CANCEL and FAIL: the reason recorded, and (FAIL) the error kind.
    reason: str | None = None
    error_kind: str | None = None


def after_error(job: JobView, exc: ServiceError) -> ErrorDecision:
    """The decision for a step that raised one of the service errors (DESIGN.md: transient errors back off and never
    fail a job, a blocked service parks its jobs, a permanent error fails the job with the server's reason)."""
    if isinstance(exc, JobLimitReached) and job.state is JobState.SUBMITTING:
        return ErrorDecision(ErrorAction.WAIT_FOR_SLOT)
    if isinstance(exc, Transient):
        return ErrorDecision(ErrorAction.RETRY)
    if isinstance(exc, Blocked):
        # Keep what a downloading or cancelling job is doing (a finished remote job, an operator's cancel) and
        # retry it when the service is usable again, instead of parking it where that would be forgotten.
        keep = job.state in (JobState.DOWNLOADING, JobState.CANCEL_REQUESTED)
        return ErrorDecision(ErrorAction.BLOCK_AND_RETRY if keep else ErrorAction.BLOCK_AND_PARK)
    assert isinstance(exc, Permanent), f"not a service error: {exc!r}"
    if job.state is JobState.CANCEL_REQUESTED:
        return ErrorDecision(ErrorAction.CANCEL, reason=f"cancelled; the server answered: {exc}")
    if exc.kind == "remote_not_found" and job.state in (JobState.QUEUED, JobState.RUNNING):
        # A job the server once accepted and no longer knows was deleted there (Cloudgene DELETED answers 404).
        return ErrorDecision(ErrorAction.FAIL, f"results expired remotely: the server no longer has this job ({exc})",
                             "expired")
    return ErrorDecision(ErrorAction.FAIL, str(exc), exc.kind)


@dataclass(frozen=True)
class RetryDecision:
    """When to try a failed step again, and whether the whole service waits that long too."""

    failures: int  # failed steps in a row, this one included
    delay: float  # seconds
    pause_service_until: dt.datetime | None = None


def retry_after_failure(job: JobView, exc: Transient, *, initial: float, maximum: float,
                        now: dt.datetime) -> RetryDecision:
    """Backoff for the job's next attempt (the server's Retry-After when it gave one); a service-wide error (an
    outage, a rate limit) holds every job of the service for as long."""
    failures = job.failures + 1
    delay = backoff_delay(failures, initial=initial, maximum=maximum, retry_after=exc.retry_after)
    until = now + dt.timedelta(seconds=delay) if exc.service_wide else None
    return RetryDecision(failures, delay, until)


class CrashKind(enum.Enum):
    DATABASE = "database"  # the database could not be reached: waited out like a server outage
    LOCAL_IO = "local_io"  # the local file system needs an operator: waited out too
    INTERNAL = "internal"  # anything else: retried, and the job fails after MAX_STEP_CRASHES in a row


@dataclass(frozen=True)
class CrashDecision:
    kind: CrashKind
    #: INTERNAL: the same step's same exception type in a row, this one included, and whether that fails the job.
    crashes: int = 0
    fail: bool = False
    #: INTERNAL: the first of a series (logged with its traceback; the repeats are quiet).
    first: bool = False


def after_crash(job: JobView, *, signature: str, database_unreachable: bool, environment_error: bool
                ) -> CrashDecision:
    """The decision for a step that raised something other than a service error. `signature`: what failed and the
    exception's type (`"{what}: {type}:"`), which the job's stored error starts with when it is the same crash."""
    if database_unreachable:
        return CrashDecision(CrashKind.DATABASE)
    if environment_error:
        return CrashDecision(CrashKind.LOCAL_IO)
    same = job.error_kind == "internal" and (job.error or "").startswith(signature)
    crashes = job.failures + 1 if same else 1
    return CrashDecision(CrashKind.INTERNAL, crashes=crashes, fail=crashes >= MAX_STEP_CRASHES, first=crashes == 1)


# ------------------------------------------------------------------------------------------------ submit


def submitted(remote_id: str, how: str, *, poll_interval: float, now: dt.datetime) -> Outcome:
    """The outcome of a job the server now has as `remote_id` (`how`: sent now, or found from an earlier send)."""
    return Outcome(
        state=JobState.QUEUED,
        reason=f"{how} as {remote_id}",
        next_poll_in=min(10.0, poll_interval),
        columns=JobColumns(remote_id=remote_id, submitted_at=now, failures=0, error=None, error_kind=None),
    )


def after_submit_error(exc: ServiceError, *, now: dt.datetime) -> JobColumns:
    """The submit bookkeeping written with a failed submit's outcome. A refusal created no remote job, so the next
    attempt needs no lookup; a request whose outcome is unknown (a lost answer, a proxy's 504) may still become a
    job, so it is looked up from now on, and sent again only once `submit_settle` has passed since `now`."""
    if not exc.may_have_created:
        return JobColumns(submit_attempts=0, submitted_at=None)
    return JobColumns(submitted_at=now)


@dataclass(frozen=True)
class SettleDecision:
    """After a lookup found no trace of an earlier submit on the server."""

    #: Look again after this outcome (sooner at first, backing off, the last look when the window closes); None:
    #: the window has closed and the request can no longer become a job.
    outcome: Outcome | None
    #: The daemon died while the server had the request: when it was sent is unknown, so the window starts now.
    died_in_flight: bool = False


def after_lookup_missed(job: JobView, *, settle: float, now: dt.datetime, initial: float, maximum: float
                        ) -> SettleDecision:
    """Whether an earlier submit (`job.submit_attempts` > 0) may still become a job (Cloudgene copies the whole
    upload before it creates one) and when to look for it again; `settle`: the service's `submit_settle`."""
    since = job.submitted_at or now
    left = (since + dt.timedelta(seconds=settle) - now).total_seconds()
    if left <= 0:
        return SettleDecision(None)
    failures = job.failures + 1
    wait = min(left, backoff_delay(failures, initial=initial, maximum=maximum))
    return SettleDecision(Outcome(next_poll_in=wait, columns=JobColumns(failures=failures, submitted_at=since)),
                          died_in_flight=job.submitted_at is None)


# ------------------------------------------------------------------------------------------------ downloads


class FileView(Protocol):
    """What the decisions read of a result file (a `daemon.db.models.JobOutput` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> OutputState: ...
    @property
    def size(self) -> int | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def bad_downloads(self) -> int: ...


def after_bad_download(file: FileView, problem: str) -> OutputColumns:
    """What a served download that came out unusable (cut off, short, corrupt: `downloads.BadDownload`) makes of its
    file: another try later, or given up after MAX_INTEGRITY_ATTEMPTS, since each spent one of the few downloads
    the server allows."""
    bad = file.bad_downloads + 1
    if bad >= MAX_INTEGRITY_ATTEMPTS:
        reason = f"{problem} (gave up after {bad} attempts, each spending one of the downloads the server allows)"
        return OutputColumns(state=OutputState.FAILED, error=reason, attempts=file.attempts + 1, bad_downloads=bad)
    return OutputColumns(error=problem, attempts=file.attempts + 1, bad_downloads=bad)


def after_downloads(files: Sequence[FileView], result_dir: str) -> Outcome:
    """The job's outcome once every file had its try this step: more to fetch (at once), failed when a file could
    not be had, completed when all are verified (the reason counts them)."""
    columns = JobColumns(result_dir=result_dir, failures=0, error=None, error_kind=None)
    if any(f.state is OutputState.PENDING for f in files):
        return Outcome(next_poll_in=0, columns=columns)
    failed = [f for f in files if f.state is OutputState.FAILED]
    if failed:
        # A server-given name may hold control characters (terminal escapes): show it escaped.
        names = ", ".join(printable(f.name) for f in failed[:5]) + (" …" if len(failed) > 5 else "")
        reason = f"{len(failed)} of {len(files)} result files could not be downloaded: {names}"
        return Outcome(state=JobState.FAILED, reason=reason,
                       columns=columns | JobColumns(error=reason, error_kind="download_failed"))
    total = sum(f.size or 0 for f in files)
    reason = f"{counted(len(files), 'file')} downloaded and verified ({counted(total, 'byte')})"
    return Outcome(state=JobState.COMPLETED, reason=reason, columns=columns)


# ------------------------------------------------------------------------------------------------ retirement


def retirement_warning(job: JobView, retires_at: dt.datetime | None, *, now: dt.datetime, within: float
                       ) -> str | None:
    """The warning, given once per job, that its results are deleted by the server within `within` seconds (or
    were) while they are not downloaded yet; None when there is nothing to say (or it was said)."""
    if retires_at is None or job.retirement_warned_at is not None:
        return None
    left = (retires_at - now).total_seconds()
    if left >= within:
        return None
    when = retires_at.strftime("%Y-%m-%d %H:%M UTC")
    if left <= 0:
        return f"the server deleted (or is deleting) this job's results at {when}, before they were downloaded"
    return (f"the server deletes this job's results at {when}, in {left / 3600:.1f} h, and they are not "
            "downloaded yet")
