"""One step of one job: submit, poll, download or cancel, decided by the job's state.

A step runs on a pool thread with the job leased to this daemon. It talks to the service through the adapter, asks
`daemon.decisions` what the answer or the error means (the rules of DESIGN.md: transient errors back off and never
fail a job, a blocked service parks its jobs, a permanent error fails the job with the server's reason), applies
that decision, and writes the typed outcome (`daemon.outcome`) with `JobQueue.finish`.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
import structlog

from daemon.backoff import jittered
from daemon.config import Config, ServiceConfig
from daemon.crypto import PasswordCipher, SecretKeyError
from daemon.db.engine import DatabaseUnavailable
from daemon.db.models import Job, JobOutput, integer_or_none, utcnow
from daemon.db.queue import JobQueue, JobRow, LeaseLost
from daemon.db.service_status import ServiceStatuses
from daemon.decisions import (
    MAX_EMPTY_SUCCESS_POLLS,
    MAX_STEP_CRASHES,
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
from daemon.logging import bind_job, register_secret, scrub
from daemon.metrics import NO_METRICS, Metrics
from daemon.outcome import KEEP, JobColumns, Keep, Outcome, OutputColumns
from daemon.remote import RemoteOutput, SubmitRequest, parameters_of
from daemon.resultfiles import CHECKSUM_SUFFIX, read_md5sum
from daemon.services import Adapters, scrubbing
from daemon.services.base import ServiceAdapter
from daemon.services.errors import NOT_FOUND_KINDS, JobLimitReached, Permanent, ServiceError, Transient
from daemon.states import TERMINAL, JobState, OutputState

if TYPE_CHECKING:  # the download code itself is imported by the first download (see `_download`)
    from daemon.downloads import Published

log = structlog.get_logger("daemon.pipeline")

#: Local failures that need an operator, not another job: retried with backoff however long they last, like an
#: outage of the server (a database that cannot be reached is one too).
ENVIRONMENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
    errno.ENOMEM, errno.ESTALE,
})


def remote_job_name(job: Job) -> str:
    """The name our job carries on the server (Cloudgene `job-name`, WES `tags`): how a lost submit is found again.

    A retried job carries its retry count too, so the failed earlier remote job is never mistaken for the new one."""
    return str(job.id) if job.retries == 0 else f"{job.id}.retry{job.retries}"


def stored_checksum(row: JobOutput) -> tuple[str, str] | None:
    """The checksum the server published for the file, as `job_outputs.remote_checksum` keeps it ("algo:hex")."""
    if not row.remote_checksum:
        return None
    algorithm, _, digest = row.remote_checksum.partition(":")
    return algorithm, digest


def remote_output(row: JobOutput) -> RemoteOutput:
    return RemoteOutput(
        name=row.name,
        url=row.url,
        remote_hash=row.remote_hash,
        size_text=row.size_text,
        downloads_left=row.downloads_left,
        checksum=stored_checksum(row),
        size=row.remote_size,
    )


class Pipeline:
    def __init__(
        self,
        queue: JobQueue,
        services: ServiceStatuses,
        adapters: Adapters,
        config: Config,
        *,
        owner: str,
        stopping: Callable[[], bool] = lambda: False,
        metrics: Metrics = NO_METRICS,
        passwords: PasswordCipher | None = None,
    ) -> None:
        self.queue = queue
        self.services = services
        self.adapters = adapters
        self.config = config
        self.owner = owner
        self.stopping = stopping
        self.metrics = metrics
        #: Opens passwords sealed at rest (`daemon.crypto`); None: only cleartext passwords can be used.
        self.passwords = passwords
        #: The job limit last reported per service: a server whose limit is below ours refuses again after every
        #: finished job (the lowered limit is forgotten then, to probe for a free slot); that is not news.
        self._job_limit_told: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------ entry point

    def run(self, job: Job) -> JobRow | None:
        """Do the step the job's state calls for and return the job as written (None when nothing was).

        A poll that finds the remote job finished goes straight on to the download in this same call, keeping the
        lease: the next step is due at once and the job is ours already, so handing it back to be claimed again
        would only cost a tick and a round of queries.

        Never raises: a pool thread has nobody to raise to."""
        while True:
            finished, go_on = self._run_step(job)
            if not go_on or finished is None:
                return finished
            try:
                # The job as `finish` wrote it, with the outputs the poll recorded: what a download claim loads.
                outputs = self.queue.outputs(job.id)
                job = Job(**finished._mapping)
                job.outputs = outputs
            except Exception:
                # As for a lost outcome: the lease runs out and the download is claimed again.
                log.exception("step_result_not_saved", state=str(JobState.DOWNLOADING), error_kind="database")
                return finished

    def _run_step(self, job: Job) -> tuple[JobRow | None, bool]:
        """One step and its outcome written; True when this worker should take the job's next step at once."""
        register_secret(job.password)  # before anything about this job can be logged
        with bind_job(job_id=str(job.id), service=job.service, owner=job.owner, remote_id=job.remote_id):
            try:
                outcome = self._step(job)
            except ServiceError as exc:
                outcome = self._on_error(job, exc)
            except LeaseLost:
                log.warning("lease_lost", reason="another daemon took the job over; dropping this step's result")
                return None, False
            except Exception as exc:  # keep the daemon alive; see `_crashed`
                outcome = self._crashed(job, exc)
            if outcome is None:
                return None, False
            outcome = self._warn_of_retirement(job, outcome)
            go_on = (
                job.state in (JobState.QUEUED, JobState.RUNNING, JobState.CANCEL_REQUESTED)
                and outcome.state is JobState.DOWNLOADING
                and outcome.next_poll_in == 0
                and not self.stopping()
            )
            try:
                finished = self.queue.finish(job.id, self.owner, outcome, keep_lease=go_on, expected=job.state)
            except LeaseLost:
                log.warning("lease_lost", reason="another daemon took the job over; dropping this step's result")
                return None, False
            except Exception as exc:
                if _unreachable_database(exc):
                    # The database failed under us (restarted, unreachable): this step's outcome is lost, not the
                    # job; its lease runs out and the step is done again. Said here: the pool has nobody to raise to.
                    log.exception("step_result_not_saved", state=str(job.state), error_kind="database")
                    return None, False
                # The database refused this outcome (a value it cannot hold, a constraint): writing it again would
                # fail again, so the failure is written instead, counted like any other unexpected error.
                outcome, go_on = self._crashed(job, exc, what="its outcome could not be saved"), False
                try:
                    finished = self.queue.finish(job.id, self.owner, outcome, expected=job.state)
                except Exception:
                    log.exception("step_result_not_saved", state=str(job.state), error_kind="database")
                    return None, False
            if outcome.state is not None and outcome.state != job.state:
                self._log_transition(job, finished, outcome)
            return finished, go_on

    def _warn_of_retirement(self, job: Job, outcome: Outcome) -> Outcome:
        """`outcome`, with the once-only warning that the job's results retire before they are downloaded when that
        is the case (`decisions.retirement_warning`) and the job is not finishing now."""
        if job.state not in (JobState.QUEUED, JobState.RUNNING, JobState.DOWNLOADING) or (
                outcome.state is not None and outcome.state in TERMINAL):
            return outcome
        retires_at = outcome.columns.retires_at
        now = utcnow()
        warning = retirement_warning(job, job.retires_at if isinstance(retires_at, Keep) else retires_at, now=now,
                                     within=self._service(job).retirement_warning)
        if warning is None:
            return outcome
        log.error("results_retiring", reason=warning)
        return dataclasses.replace(outcome, warning=warning).setting(JobColumns(retirement_warned_at=now))

    def _step(self, job: Job) -> Outcome | None:
        adapter = self._adapter(job)
        match job.state:
            case JobState.SUBMITTING:
                return self._submit(job, adapter)
            case JobState.QUEUED | JobState.RUNNING:
                return self._poll(job, adapter)
            case JobState.DOWNLOADING:
                return self._download(job, adapter)
            case JobState.CANCEL_REQUESTED:
                return self._cancel(job, adapter)
        # Another daemon moved the job on between claim and now; nothing to do but let go of it.
        self.queue.release(job.id, self.owner)
        return None

    def _adapter(self, job: Job) -> ServiceAdapter:
        """The job's service adapter, scrubbing what the server says of this job's secrets too."""
        adapter = self.adapters.get(job.service, job.owner)
        if adapter is None:
            raise Permanent(f"service '{job.service}' is not configured", kind="unknown_service")
        return scrubbing.for_job(adapter, self._secrets(job))

    def _secrets(self, job: Job) -> list[str | None]:
        """What a server might echo back of this job: its password in clear and its download URLs and hashes
        (loaded with the claim of a download only: a job in another state has no outputs recorded yet)."""
        try:
            secrets = [self._password(job)]
        except Transient:
            secrets = []  # the password cannot be opened: the step that needs it says so
        if job.state is JobState.DOWNLOADING:
            secrets += [secret for row in job.outputs for secret in (row.url, row.remote_hash)]
        return secrets

    def _service(self, job: Job) -> ServiceConfig:
        return self.config.services[job.service]

    def _password(self, job: Job) -> str | None:
        """The job's result-zip password in clear (registered with the log redaction by `reveal`)."""
        try:
            if self.passwords is not None:
                return self.passwords.reveal(job.password)
            if job.password is not None and job.password.startswith("aesgcm1:"):
                raise SecretKeyError("the job's password is sealed and this process has no key to open it")
        except SecretKeyError as exc:
            # The operator can fix the key file; the job waits (with backoff) instead of failing.
            raise Transient(f"cannot open the job's password: {exc}", kind="secret_key") from None
        return job.password

    # ------------------------------------------------------------------ submit

    def _submit(self, job: Job, adapter: ServiceAdapter) -> Outcome | None:
        """Send the job, unless an earlier submit of it may still exist (or become) a job on the server.

        `submit_attempts` > 0 says an earlier submit may exist remotely (a refused one resets it to 0); while the job
        has no remote id, `submitted_at` says since when that submit's outcome is unknown (when we stopped
        waiting for its answer), or is None when its daemon died with the request in flight. The server may turn
        such a request into a job long after we gave up on it (Cloudgene copies the whole upload first), so it is
        looked up until `submit_settle` has passed, and only then sent again."""
        carried = remote_job_name(job)
        if job.submit_attempts > 0:
            found = adapter.find_submitted(carried)
            if found is not None:
                return self._submitted(job, found, "found the earlier submission on the server")
            settling = self._settling(job, then="submitting again")
            if settling is not None:
                return settling
        request = self._submit_request(job, carried)
        # Committed before the POST: after a crash from here on, the next attempt looks the job up first, not
        # before the service's request timeout has passed (the lookup would only find nothing yet).
        self.queue.note_submit_attempt(job.id, self.owner, settle=self._service(job).timeout)
        try:
            remote_id = adapter.submit(request)
        except ServiceError as exc:
            return self._submit_failed(job, exc)
        return self._submitted(job, remote_id, "submitted")

    def _settling(self, job: Job, *, then: str) -> Outcome | None:
        """After a lookup that found nothing: an Outcome that looks again later while the earlier submit may still
        become a job (sooner at first, backing off, the last look when the window closes); None once it cannot
        (`then`: what the caller does next, for the log)."""
        settle = self._service(job).settle_seconds
        scheduler = self.config.scheduler
        decision = after_lookup_missed(job, settle=settle, now=utcnow(), initial=scheduler.backoff_initial,
                                       maximum=scheduler.backoff_max)
        if decision.outcome is None:
            log.warning("lost_submit_not_found", reason=f"not on the server {settle:g} s after the attempt; {then}",
                        attempts=job.submit_attempts)
        elif decision.died_in_flight:
            log.info("submit_outcome_unknown", reason="the daemon stopped while the server had the submit; looking "
                     "the job up until the server can no longer create it", settle=settle)
        return decision.outcome

    def _submit_failed(self, job: Job, exc: ServiceError) -> Outcome | None:
        if exc.may_have_created:
            log.info("submit_outcome_unknown", reason="looking the job up until the server can no longer create it",
                     error_kind=exc.kind, settle=self._service(job).settle_seconds)
        return self._on_error(job, exc, also=after_submit_error(exc, now=utcnow()))

    def _submitted(self, job: Job, remote_id: str, how: str) -> Outcome:
        structlog.contextvars.bind_contextvars(remote_id=remote_id)
        self.metrics.submitted(job.service)
        return submitted(remote_id, how, poll_interval=self._service(job).poll_interval, now=utcnow())

    def _submit_request(self, job: Job, carried: str) -> SubmitRequest:
        service = self._service(job)
        panel = service.panels.get(job.panel)
        if panel is None:
            raise Permanent(f"panel '{job.panel}' is no longer configured for service '{job.service}'",
                            kind="unknown_panel")
        files = [Path(i.path) for i in job.inputs]
        for item, path in zip(job.inputs, files, strict=True):
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise Permanent(f"input {path}: {exc.strerror or exc}", kind="input_missing") from None
            if size != item.size:
                raise Permanent(f"input {path} changed since it was submitted ({item.size} → {size} bytes)",
                                kind="input_changed")
        return SubmitRequest(job_id=carried, files=files,
                             **parameters_of(job, panel=panel.remote_id, password=self._password(job)))

    # ------------------------------------------------------------------ poll

    def _poll(self, job: Job, adapter: ServiceAdapter) -> Outcome:
        assert job.remote_id is not None
        status = adapter.status(job.remote_id)
        self.metrics.polled(job.service)
        if job.state is JobState.CANCEL_REQUESTED:
            decision = after_cancel_status(job, status, now=utcnow(), cancel_timeout=self._service(job).cancel_timeout)
        else:
            decision = after_status(job, status, resubmit=self._resubmit_policy(job))
        if decision.recovered:
            log.info("recovered", after_failures=job.failures)
            if decision.resume_service and self.services.resume_service(job.service):
                log.info("service_resumed", service=job.service)
        columns = JobColumns(
            retires_at=status.retires_at if status.retires_at is not None else KEEP,
            qc=status.qc.as_dict() if status.qc is not None else KEEP,
            remote_state=status.raw_state,
            queue_position=integer_or_none(status.queue_position),
            progress=status.progress,
            failures=decision.failures,
            error=decision.error,
            error_kind=decision.error_kind,
        )
        if decision.restart:
            adapter.restart(job.remote_id)
            columns |= JobColumns(restart_attempts=1)
        if decision.resubmit:
            # A fresh remote submission, as an operator's retry makes: carried under a new name (`remote_job_name`),
            # so the lookup of a lost submit never finds the failed remote job.
            log.warning("remote_failure_resubmitted", reason=decision.error, retries=job.retries + 1)
            columns |= JobColumns(remote_id=None, submitted_at=None, submit_attempts=0, restart_attempts=0,
                                  queue_position=None, progress=None, retries=job.retries + 1, cancel_sent_at=None)
        match decision.note:
            case PollNote.UNKNOWN_STATE:
                log.warning(decision.note.value, remote_state=status.raw_state,
                            reason="keeping the job and polling again")
            case PollNote.EMPTY_SUCCESS:
                log.warning(decision.note.value, remote_state=status.raw_state,
                            reason=f"polling again, up to {MAX_EMPTY_SUCCESS_POLLS} times, before failing the job")
            case PollNote.DEAD_RESTART:
                log.warning(decision.note.value, action="restart requested")
            case PollNote.CANCEL_IGNORED:
                log.warning(decision.note.value, remote_state=status.raw_state, reason=decision.error)
        match decision.next_poll:
            case NextPoll.NOW:
                next_poll_in: float | None = 0
            case NextPoll.INTERVAL:
                next_poll_in = jittered(self._service(job).poll_interval)
            case NextPoll.UNCHANGED:
                next_poll_in = None
        return Outcome(state=decision.state, reason=decision.reason, next_poll_in=next_poll_in, columns=columns,
                       outputs=decision.outputs)

    def _resubmit_policy(self, job: Job) -> ResubmitPolicy | None:
        service = self._service(job)
        if not service.resubmit_on or job.adopted:
            return None
        return ResubmitPolicy(service.resubmit_on, service.resubmit_max)

    # ------------------------------------------------------------------ cancel

    def _cancel(self, job: Job, adapter: ServiceAdapter) -> Outcome:
        remote_id = job.remote_id
        if remote_id is None and job.submit_attempts > 0:
            remote_id = adapter.find_submitted(remote_job_name(job))
            # A submit the server may still turn into a job: wait for it, or it would run on, never cancelled.
            settling = None if remote_id is not None else self._settling(job, then="nothing to cancel there")
            if settling is not None:
                return settling
        if remote_id is None:
            return Outcome(state=JobState.CANCELLED, reason="cancelled on request", columns=JobColumns(remote_id=None))
        if job.cancel_sent_at is not None:
            return self._poll(job, adapter)
        try:
            adapter.cancel(remote_id)
        except Permanent as exc:
            log.info("remote_cancel_refused", reason=str(exc))
            if exc.kind in NOT_FOUND_KINDS:  # the server no longer has the remote job: nothing is left to cancel
                return Outcome(state=JobState.CANCELLED, reason=f"cancelled; the server answered: {exc}",
                               columns=JobColumns(remote_id=remote_id))
            # Finished remotely, most likely: the remote job's status, polled next, says how.
        # Cancelled only once the server says so (`after_cancel_status`): a server may acknowledge and run on.
        return Outcome(next_poll_in=min(10.0, self._service(job).poll_interval),
                       columns=JobColumns(remote_id=remote_id, cancel_sent_at=utcnow()))

    # ------------------------------------------------------------------ download

    def _download(self, job: Job, adapter: ServiceAdapter) -> Outcome:
        # The download code (and the zip checks it loads) is imported by the first download: 2.7 MiB of RSS that an
        # idle daemon does not carry (bench/memory.py; the ratio to the Celery stack has no room for it).
        from daemon import downloads

        result_dir = Path(job.result_dir) if job.result_dir else self.config.storage.results_dir / str(job.id)
        downloads.remove_partials(result_dir)
        # The rows were loaded with the claim, and only the lease holder writes them: `_save_output` keeps them
        # as they are stored, so nothing is read again.
        rows = job.outputs
        by_name = {row.name: row for row in rows}
        try:
            # A zip's `.md5` (imputationserver2 writes one beside each) goes first: the zip is checked against it
            # as it streams.
            for row in sorted(rows, key=lambda r: not r.name.endswith(CHECKSUM_SUFFIX)):
                if row.state is not OutputState.PENDING:
                    continue
                if self.stopping():
                    return Outcome(next_poll_in=0, columns=JobColumns(result_dir=str(result_dir)))
                published = self._published(row, by_name)
                if published is None:
                    continue  # given up: its checksum could not be had
                problem = self._download_one(job, adapter, row, result_dir, published)
                if problem is not None:
                    return problem
        finally:
            downloads.remove_partial_dir(result_dir)  # kept for the whole step (see `downloads.download`)
        return self._downloads_done(job, rows, result_dir)

    def _published(self, row: JobOutput, by_name: Mapping[str, JobOutput]) -> Published | None:
        """What the server published about the file's content (a WES checksum and size, a Cloudgene zip's `.md5`),
        to check it against; None when the file is given up here (its `.md5` could not be had, or says nothing of
        it): it would arrive unchecked."""
        from daemon.downloads import Published

        checksum = stored_checksum(row)
        sibling = by_name.get(row.name + CHECKSUM_SUFFIX)
        if sibling is not None and sibling.state is OutputState.VERIFIED and sibling.local_path:
            try:
                checksum = ("md5", read_md5sum(Path(sibling.local_path), row.name))
            except (Permanent, OSError) as exc:
                problem = str(exc) if isinstance(exc, Permanent) else f"{sibling.name}: {exc.strerror or exc}"
                self._give_up(row, f"its published checksum cannot be read: {problem}", "bad_checksum")
                return None
        elif sibling is not None and sibling.state is OutputState.FAILED:
            self._give_up(row, f"its published checksum ({sibling.name}) could not be downloaded", "bad_checksum")
            return None
        return Published(size=row.remote_size, checksum=checksum)

    def _give_up(self, row: JobOutput, reason: str, kind: str) -> None:
        self._save_output(row, OutputColumns(state=OutputState.FAILED, error=reason))
        log.error("download_failed", file=row.name, reason=reason, error_kind=kind)

    def _download_one(
        self, job: Job, adapter: ServiceAdapter, row: JobOutput, result_dir: Path, published: Published
    ) -> Outcome | None:
        """Fetch and verify one file; an Outcome means "stop here for now" (retry later)."""
        from daemon import downloads

        output = remote_output(row)
        try:
            # A full disk must not spend the server's download counts, of which a file has only a few.
            downloads.check_room(result_dir, row.name, row.size_text)
            got = downloads.download(
                lambda: adapter.stream_output(output),
                row.name,
                result_dir=result_dir,
                password=self._password(job),
                should_stop=self.stopping,
                keep_partial_dir=True,
                published=published,
                # A body cut off half way is resumed where it stopped, not fetched again (another download count).
                open_rest=lambda resume: adapter.stream_output(output, resume=resume),
            )
        except downloads.DownloadInterrupted:
            return Outcome(next_poll_in=0, columns=JobColumns(result_dir=str(result_dir)))
        except Permanent as exc:
            self._save_output(row, OutputColumns(state=OutputState.FAILED, error=str(exc), attempts=row.attempts + 1))
            log.error("download_failed", file=row.name, reason=str(exc), error_kind=exc.kind)
            return None
        except downloads.BadDownload as exc:
            changes = after_bad_download(row, str(exc))
            self._save_output(row, changes)
            if changes.state is OutputState.FAILED:
                downloads.forget_resume(result_dir, row.name)
                log.error("download_failed", file=row.name, reason=changes.error, error_kind=exc.kind)
                return None
            return self._backoff(job, exc).setting(JobColumns(result_dir=str(result_dir)))
        except Transient as exc:
            self._save_output(row, OutputColumns(error=str(exc), attempts=row.attempts + 1))
            return self._backoff(job, exc).setting(JobColumns(result_dir=str(result_dir)))
        self._save_output(row, OutputColumns(
            state=OutputState.VERIFIED,
            size=got.size,
            sha256=got.sha256,
            local_path=str(got.path),
            verified_at=utcnow(),
            error=None,
            attempts=row.attempts + 1,
        ))
        log.info("file_downloaded", file=row.name, size=got.size, sha256=got.sha256)
        self.metrics.downloaded(job.service, got.size)
        return None

    def _save_output(self, row: JobOutput, changes: OutputColumns) -> None:
        """Store what became of one file (its own transaction: a verified file is never fetched again, whatever
        happens to the rest of the job) and keep the loaded row the same."""
        self.queue.update_output(row.id, changes)
        for name, value in changes.values().items():
            setattr(row, name, value)

    def _downloads_done(self, job: Job, rows: list[JobOutput], result_dir: Path) -> Outcome:
        from daemon import unpack

        outcome = after_downloads(rows, str(result_dir))
        if outcome.state is JobState.COMPLETED and self.config.storage.extract:
            # Never fails the job: what went wrong is logged and told in the reason of the completed event.
            storage = self.config.storage
            summary = unpack.unpack_outputs(
                rows, result_dir, self._password(job), max_bytes=storage.extract_max_gib << 30,
                max_ratio=storage.extract_max_ratio,
            ).summary()
            outcome = dataclasses.replace(outcome, reason=f"{outcome.reason}; {summary}")
        return outcome

    # ------------------------------------------------------------------ errors, in one place

    def _on_error(self, job: Job, exc: ServiceError, *, also: JobColumns | None = None) -> Outcome | None:
        """The outcome of a step that raised `exc`; `also`: more columns to write with it (a submit's
        bookkeeping)."""
        also = also or JobColumns()
        outcome = self._error_outcome(job, exc, also=also)
        return None if outcome is None else outcome.setting(also)

    def _error_outcome(self, job: Job, exc: ServiceError, *, also: JobColumns) -> Outcome | None:
        self.metrics.error(job.service, exc.kind)
        decision = after_error(job, exc)
        match decision.action:
            case ErrorAction.WAIT_FOR_SLOT:
                assert isinstance(exc, JobLimitReached)
                # What we hold besides this job, and never more than the server's own "Only N": each wrong guess
                # costs a whole upload before the server says no.
                # The server counts per account: what the owner holds there besides this job.
                limit = self.queue.in_flight_count(job.service, job.owner) - 1
                if exc.limit is not None:
                    limit = min(limit, exc.limit)
                # One line when the limit goes down; more refusals at the same limit are the same problem.
                lowered = self.services.lower_limit(job.service, job.owner, limit)
                news = lowered and self._job_limit_told.get((job.service, job.owner)) != max(1, limit)
                self._job_limit_told[(job.service, job.owner)] = max(1, limit)
                (log.warning if news else log.debug)(
                    "service_job_limit", reason=str(exc), error_kind=exc.kind, lowered_to=max(1, limit)
                )
                return dataclasses.replace(self._backoff(job, exc, quiet=True), state=JobState.PENDING,
                                           reason="service has no free job slot; waiting")
            case ErrorAction.RETRY:
                assert isinstance(exc, Transient)
                return self._backoff(job, exc)
            case ErrorAction.BLOCK_AND_RETRY | ErrorAction.BLOCK_AND_PARK:
                newly, parked = self.queue.block_owner(job.service, job.owner, str(exc))
                if newly:
                    log.error("service_blocked", owner=job.owner, reason=str(exc), error_kind=exc.kind,
                              jobs_waiting=parked + 1)
                if decision.action is ErrorAction.BLOCK_AND_RETRY:
                    return self._backoff(job, Transient(str(exc), kind=exc.kind), quiet=True)
                self.queue.park_blocked(job.id, self.owner, str(exc), columns=also)
                return None
            case ErrorAction.CANCEL:
                return Outcome(state=JobState.CANCELLED, reason=decision.reason)
            case ErrorAction.FAIL:
                return Outcome(state=JobState.FAILED, reason=decision.reason,
                               columns=JobColumns(error=decision.reason, error_kind=decision.error_kind))

    def _crashed(self, job: Job, exc: Exception, *, what: str = "internal error") -> Outcome:
        """The outcome of a step that raised something other than a service error.

        A database that cannot be reached, or a local file system that needs an operator (permissions, read-only,
        I/O errors), is waited out with backoff however long it lasts, as a server outage is. Anything else (a bug,
        or the job's own data meeting a case nothing handles) is retried with backoff too, but the job fails once
        the same step has failed with the same exception type MAX_STEP_CRASHES times in a row. The first of a
        series is logged with its traceback, the repeats at debug level."""
        # Stored in jobs.error and shown: an exception's text may quote a URL or a value that holds a secret.
        text = scrub(f"{type(exc).__name__}: {exc}", self._secrets(job))
        signature = f"{what}: {type(exc).__name__}:"
        decision = after_crash(job, signature=signature, database_unreachable=_unreachable_database(exc),
                               environment_error=isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS)
        self.metrics.error(job.service, decision.kind.value)
        if decision.kind is CrashKind.DATABASE:
            return self._backoff(job, Transient(f"database: {text}", kind="database"))
        if decision.kind is CrashKind.LOCAL_IO:
            return self._backoff(job, Transient(f"local file system: {text}", kind="local_io"))
        if decision.first:
            log.error("step_crashed", state=str(job.state), error_kind="internal", exc_info=exc,
                      reason=f"retrying with backoff; the job fails if this happens {MAX_STEP_CRASHES} times in a row")
        else:
            log.debug("step_crashed", state=str(job.state), error_kind="internal", reason=text,
                      crashes=decision.crashes)
        message = f"{what}: {text}"
        if decision.fail:
            reason = f"the {job.state} step failed {decision.crashes} times in a row ({message})"
            return Outcome(state=JobState.FAILED, reason=reason,
                           columns=JobColumns(error=reason, error_kind="internal"))
        return self._backoff(job, Transient(message, kind="internal"), quiet=True).setting(
            JobColumns(failures=decision.crashes))

    def _backoff(self, job: Job, exc: Transient, *, quiet: bool = False) -> Outcome:
        scheduler = self.config.scheduler
        retry = retry_after_failure(job, exc, initial=scheduler.backoff_initial, maximum=scheduler.backoff_max,
                                    now=utcnow())
        failures, delay = retry.failures, retry.delay
        if retry.pause_service_until is not None:
            if self.services.pause_service(job.service, retry.pause_service_until, str(exc),
                                        continuing_within=scheduler.backoff_max):
                log.warning("service_paused", reason=str(exc), error_kind=exc.kind, seconds=round(delay, 1))
        elif not quiet:
            # One line when a problem starts; the repeats of the same problem are debug-level.
            level = log.warning if job.failures == 0 else log.debug
            level("step_failed_will_retry", step=str(job.state), reason=str(exc), error_kind=exc.kind,
                  failures=failures, retry_in=round(delay, 1))
        return Outcome(next_poll_in=delay, columns=JobColumns(failures=failures, error=str(exc), error_kind=exc.kind))

    def _log_transition(self, before: Job, after: JobRow, outcome: Outcome) -> None:
        level = log.error if outcome.state is JobState.FAILED else log.info
        level("job_state", from_state=str(before.state), to_state=str(outcome.state), reason=outcome.reason,
              remote_id=after.remote_id, error_kind=after.error_kind)


def _unreachable_database(exc: BaseException) -> bool:
    """The database could not be reached or went away (as opposed to refusing what was written)."""
    return isinstance(exc, (DatabaseUnavailable, sa.exc.OperationalError, sa.exc.InterfaceError,
                            sa.exc.TimeoutError)) or getattr(exc, "connection_invalidated", False) is True
