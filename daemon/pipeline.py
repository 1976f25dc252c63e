"""One step of one job: submit, poll, download or cancel, decided by the job's state.

A step runs on a pool thread with the job leased to this daemon. It talks to the service through the adapter, then
writes its outcome with `JobStore.finish`. Every adapter error is handled here, in one place, by the rules of
DESIGN.md: transient errors back off and never fail a job, a blocked service parks its jobs, a permanent error fails
the job with the server's reason.
"""

from __future__ import annotations

import datetime as dt
import errno
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from daemon.backoff import backoff_delay, jittered
from daemon.config import Config, ServiceConfig
from daemon.crypto import PasswordCipher, SecretKeyError
from daemon.db.engine import DatabaseUnavailable
from daemon.db.models import Job, JobOutput, integer_or_none, utcnow
from daemon.db.store import JobRow, JobStore, LeaseLost, Outcome
from daemon.logging import bind_job, register_secret, scrub
from daemon.metrics import NO_METRICS, Metrics
from daemon.remote import RemoteOutput, RemoteStatus, SubmitRequest, parameters_of
from daemon.services import scrubbing
from daemon.services.base import ServiceAdapter
from daemon.services.errors import Blocked, JobLimitReached, Permanent, ServiceError, Transient
from daemon.states import JobState, OutputState, RemoteKind
from daemon.text import counted, printable

log = structlog.get_logger("daemon.pipeline")

#: Served downloads of one file that came out unusable (`downloads.BadDownload`: cut off, short, corrupt) tolerated
#: before that file is given up: each spent one of the server's limited download counts (Cloudgene: 10 per file).
#: Failures before the server answered spend none that we can know of, and never give a file up.
MAX_INTEGRITY_ATTEMPTS = 3
#: Polls in a row that may find the remote job finished without any result file listed before our job fails: a
#: server may publish the files a moment after it says SUCCESS, but a job completed without them would never
#: fetch them.
MAX_EMPTY_SUCCESS_POLLS = 5
NO_OUTPUTS = "no_outputs"
#: Steps in a row that may fail with the same unexpected error (a bug, or something in the job's own data that
#: nothing here handles) before that fails the job: retrying a deterministic failure only repeats it, forever.
MAX_STEP_CRASHES = 5
#: Local failures that need an operator, not another job: retried with backoff however long they last, like an
#: outage of the server (a database that cannot be reached is one too).
ENVIRONMENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
    errno.ENOMEM, errno.ESTALE,
})
#: Error kinds that pause the whole service (`Transient.service_wide`); a job recovering from one ends the pause.
SERVICE_WIDE_KINDS = frozenset({"unavailable", "rate_limited"})


def remote_job_name(job: Job) -> str:
    """The name our job carries on the server (Cloudgene `job-name`, WES `tags`): how a lost submit is found again.

    A retried job carries its retry count too, so the failed earlier remote job is never mistaken for the new one."""
    return str(job.id) if job.retries == 0 else f"{job.id}.retry{job.retries}"


def remote_output(row: JobOutput) -> RemoteOutput:
    checksum = tuple(row.remote_checksum.split(":", 1)) if row.remote_checksum else None
    return RemoteOutput(
        name=row.name,
        url=row.url,
        remote_hash=row.remote_hash,
        size_text=row.size_text,
        downloads_left=row.downloads_left,
        checksum=checksum,  # type: ignore[arg-type]
    )


class Pipeline:
    def __init__(
        self,
        store: JobStore,
        adapters: Mapping[str, ServiceAdapter],
        config: Config,
        *,
        owner: str,
        stopping: Callable[[], bool] = lambda: False,
        metrics: Metrics = NO_METRICS,
        passwords: PasswordCipher | None = None,
    ) -> None:
        self.store = store
        self.adapters = adapters
        self.config = config
        self.owner = owner
        self.stopping = stopping
        self.metrics = metrics
        #: Opens passwords sealed at rest (`daemon.crypto`); None: only cleartext passwords can be used.
        self.passwords = passwords
        #: The job limit last reported per service: a server whose limit is below ours refuses again after every
        #: finished job (the lowered limit is forgotten then, to probe for a free slot); that is not news.
        self._job_limit_told: dict[str, int] = {}

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
                outputs = self.store.outputs(job.id)
                job = Job(**finished._mapping)
                job.outputs = outputs
            except Exception:
                # As for a lost outcome: the lease runs out and the download is claimed again.
                log.exception("step_result_not_saved", state=str(JobState.DOWNLOADING), error_kind="database")
                return finished

    def _run_step(self, job: Job) -> tuple[JobRow | None, bool]:
        """One step and its outcome written; True when this worker should take the job's next step at once."""
        register_secret(job.password)  # before anything about this job can be logged
        with bind_job(job_id=str(job.id), service=job.service, remote_id=job.remote_id):
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
            go_on = (
                job.state in (JobState.QUEUED, JobState.RUNNING)
                and outcome.state is JobState.DOWNLOADING
                and outcome.next_poll_in == 0
                and not self.stopping()
            )
            try:
                finished = self.store.finish(job.id, self.owner, outcome, keep_lease=go_on, expected=job.state)
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
                    finished = self.store.finish(job.id, self.owner, outcome, expected=job.state)
                except Exception:
                    log.exception("step_result_not_saved", state=str(job.state), error_kind="database")
                    return None, False
            if outcome.state is not None and outcome.state != job.state:
                self._log_transition(job, finished, outcome)
            return finished, go_on

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
        self.store.release(job.id, self.owner)
        return None

    def _adapter(self, job: Job) -> ServiceAdapter:
        """The job's service adapter, scrubbing what the server says of this job's secrets too."""
        adapter = self.adapters.get(job.service)
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
        self.store.note_submit_attempt(job.id, self.owner, settle=self._service(job).timeout)
        try:
            remote_id = adapter.submit(request)
        except ServiceError as exc:
            return self._submit_failed(job, exc)
        return self._submitted(job, remote_id, "submitted")

    def _settling(self, job: Job, *, then: str) -> Outcome | None:
        """After a lookup that found nothing: an Outcome that looks again later while the earlier submit may still
        become a job (sooner at first, backing off, the last look when the window closes); None once it cannot
        (`then`: what the caller does next, for the log)."""
        now = utcnow()
        # None: the daemon died while it waited for the answer; when exactly is unknown, so the window starts now.
        since = job.submitted_at or now
        settle = self._service(job).settle_seconds
        left = (since + dt.timedelta(seconds=settle) - now).total_seconds()
        if left <= 0:
            log.warning("lost_submit_not_found", reason=f"not on the server {settle:g} s after the attempt; {then}",
                        attempts=job.submit_attempts)
            return None
        failures = job.failures + 1
        scheduler = self.config.scheduler
        wait = min(left, backoff_delay(failures, initial=scheduler.backoff_initial, maximum=scheduler.backoff_max))
        if job.submitted_at is None:
            log.info("submit_outcome_unknown", reason="the daemon stopped while the server had the submit; looking "
                     "the job up until the server can no longer create it", settle=settle)
        return Outcome(next_poll_in=wait, fields={"failures": failures, "submitted_at": since})

    def _submit_failed(self, job: Job, exc: ServiceError) -> Outcome | None:
        if not exc.may_have_created:
            # A refusal: no remote job exists, so the next attempt needs no lookup.
            return self._on_error(job, exc, fields={"submit_attempts": 0, "submitted_at": None})
        # The server may still make a job of this request (a lost answer, a proxy's 504): from now on it is looked
        # up, and nothing is sent again before `submit_settle` has passed since this moment.
        log.info("submit_outcome_unknown", reason="looking the job up until the server can no longer create it",
                 error_kind=exc.kind, settle=self._service(job).settle_seconds)
        return self._on_error(job, exc, fields={"submitted_at": utcnow()})

    def _submitted(self, job: Job, remote_id: str, how: str) -> Outcome:
        structlog.contextvars.bind_contextvars(remote_id=remote_id)
        self.metrics.submitted(job.service)
        return Outcome(
            state=JobState.QUEUED,
            reason=f"{how} as {remote_id}",
            next_poll_in=min(10.0, self._service(job).poll_interval),
            fields={"remote_id": remote_id, "submitted_at": utcnow(), "failures": 0, "error": None,
                    "error_kind": None},
        )

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
        fields = {
            "remote_state": status.raw_state,
            "queue_position": integer_or_none(status.queue_position),
            "progress": status.progress,
            "failures": 0,
            "error": None,
            "error_kind": None,
        }
        empty_success = status.kind is RemoteKind.SUCCEEDED and not status.outputs
        if job.failures and not (empty_success and job.error_kind == NO_OUTPUTS):
            log.info("recovered", after_failures=job.failures)
            if job.error_kind in SERVICE_WIDE_KINDS and self.store.resume_service(job.service):
                log.info("service_resumed", service=job.service)
        interval = jittered(self._service(job).poll_interval)
        match status.kind:
            case RemoteKind.QUEUED | RemoteKind.RUNNING:
                new = JobState.QUEUED if status.kind is RemoteKind.QUEUED else JobState.RUNNING
                return Outcome(state=new, reason=f"remote state {status.raw_state}", next_poll_in=interval,
                               fields=fields)
            case RemoteKind.SUCCEEDED if empty_success:
                return self._success_without_outputs(job, status, fields, interval)
            case RemoteKind.SUCCEEDED:
                return Outcome(state=JobState.DOWNLOADING,
                               reason=f"remote job finished ({status.raw_state}); {len(status.outputs)} files",
                               next_poll_in=0, fields=fields, outputs=status.outputs)
            case RemoteKind.FAILED:
                reason = status.message or f"remote job failed ({status.raw_state})"
                return Outcome(state=JobState.FAILED, reason=reason,
                               fields={**fields, "error": reason, "error_kind": "remote_failed"})
            case RemoteKind.CANCELLED:
                return Outcome(state=JobState.CANCELLED, reason="cancelled on the server", fields=fields)
            case RemoteKind.EXPIRED:
                reason = f"results expired remotely ({status.raw_state}) before they were downloaded"
                return Outcome(state=JobState.FAILED, reason=reason,
                               fields={**fields, "error": reason, "error_kind": "expired"})
            case RemoteKind.DEAD:
                return self._dead(job, adapter, status, fields)
            case _:
                if status.raw_state != job.remote_state:
                    log.warning("unknown_remote_state", remote_state=status.raw_state,
                                reason="keeping the job and polling again")
                return Outcome(next_poll_in=interval, fields=fields)

    def _success_without_outputs(self, job: Job, status: RemoteStatus, fields: dict[str, Any], interval: float
                                 ) -> Outcome:
        """A finished remote job that lists no result file: polled again, and failed after a few such answers."""
        polls = job.failures + 1 if job.error_kind == NO_OUTPUTS else 1
        if polls >= MAX_EMPTY_SUCCESS_POLLS:
            reason = (f"the server says the remote job finished ({status.raw_state}) but listed no result files "
                      f"in {polls} polls in a row; nothing was downloaded")
            return Outcome(state=JobState.FAILED, reason=reason,
                           fields={**fields, "error": reason, "error_kind": NO_OUTPUTS})
        reason = f"remote job finished ({status.raw_state}) but lists no result files yet"
        if polls == 1:
            log.warning("remote_success_without_outputs", remote_state=status.raw_state,
                        reason=f"polling again, up to {MAX_EMPTY_SUCCESS_POLLS} times, before failing the job")
        return Outcome(next_poll_in=interval,
                       fields={**fields, "failures": polls, "error": reason, "error_kind": NO_OUTPUTS})

    def _dead(self, job: Job, adapter: ServiceAdapter, status: RemoteStatus, fields: dict[str, Any]) -> Outcome:
        assert job.remote_id is not None
        if job.restart_attempts == 0:
            adapter.restart(job.remote_id)
            log.warning("remote_job_dead", action="restart requested")
            return Outcome(next_poll_in=jittered(self._service(job).poll_interval),
                           fields={**fields, "restart_attempts": 1})
        reason = "remote job died (DEAD) and did not survive a restart"
        return Outcome(state=JobState.FAILED, reason=reason,
                       fields={**fields, "error": reason, "error_kind": "remote_dead"})

    # ------------------------------------------------------------------ cancel

    def _cancel(self, job: Job, adapter: ServiceAdapter) -> Outcome:
        remote_id = job.remote_id
        if remote_id is None and job.submit_attempts > 0:
            remote_id = adapter.find_submitted(remote_job_name(job))
            # A submit the server may still turn into a job: wait for it, or it would run on, never cancelled.
            settling = None if remote_id is not None else self._settling(job, then="nothing to cancel there")
            if settling is not None:
                return settling
        if remote_id is not None:
            try:
                adapter.cancel(remote_id)
            except Permanent as exc:
                # Gone or finished remotely: there is nothing left to cancel.
                log.info("remote_cancel_refused", reason=str(exc))
        return Outcome(state=JobState.CANCELLED, reason="cancelled on request",
                       fields={"remote_id": remote_id})

    # ------------------------------------------------------------------ download

    def _download(self, job: Job, adapter: ServiceAdapter) -> Outcome:
        # The download code (and the zip checks it loads) is imported by the first download, not by an idle daemon.
        from daemon import downloads

        result_dir = Path(job.result_dir) if job.result_dir else self.config.storage.results_dir / str(job.id)
        downloads.remove_partials(result_dir)
        # The rows were loaded with the claim, and only the lease holder writes them: `_save_output` keeps them
        # as they are stored, so nothing is read again.
        rows = job.outputs
        try:
            for row in rows:
                if row.state is not OutputState.PENDING:
                    continue
                if self.stopping():
                    return Outcome(next_poll_in=0, fields={"result_dir": str(result_dir)})
                problem = self._download_one(job, adapter, row, result_dir)
                if problem is not None:
                    return problem
        finally:
            downloads.remove_partial_dir(result_dir)  # kept for the whole step (see `downloads.download`)
        return self._downloads_done(job, rows, result_dir)

    def _download_one(
        self, job: Job, adapter: ServiceAdapter, row: JobOutput, result_dir: Path
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
            )
        except downloads.DownloadInterrupted:
            return Outcome(next_poll_in=0, fields={"result_dir": str(result_dir)})
        except Permanent as exc:
            self._save_output(row, state=OutputState.FAILED, error=str(exc), attempts=row.attempts + 1)
            log.error("download_failed", file=row.name, reason=str(exc), error_kind=exc.kind)
            return None
        except downloads.BadDownload as exc:
            bad = row.bad_downloads + 1
            if bad >= MAX_INTEGRITY_ATTEMPTS:
                reason = f"{exc} (gave up after {bad} attempts, each spending one of the downloads the server allows)"
                self._save_output(row, state=OutputState.FAILED, error=reason, attempts=row.attempts + 1,
                                  bad_downloads=bad)
                log.error("download_failed", file=row.name, reason=reason, error_kind=exc.kind)
                return None
            self._save_output(row, error=str(exc), attempts=row.attempts + 1, bad_downloads=bad)
            outcome = self._backoff(job, exc)
            outcome.fields["result_dir"] = str(result_dir)
            return outcome
        except Transient as exc:
            self._save_output(row, error=str(exc), attempts=row.attempts + 1)
            outcome = self._backoff(job, exc)
            outcome.fields["result_dir"] = str(result_dir)
            return outcome
        self._save_output(
            row,
            state=OutputState.VERIFIED,
            size=got.size,
            sha256=got.sha256,
            local_path=str(got.path),
            verified_at=utcnow(),
            error=None,
            attempts=row.attempts + 1,
        )
        log.info("file_downloaded", file=row.name, size=got.size, sha256=got.sha256)
        self.metrics.downloaded(job.service, got.size)
        return None

    def _save_output(self, row: JobOutput, **fields: object) -> None:
        """Store what became of one file (its own transaction: a verified file is never fetched again, whatever
        happens to the rest of the job) and keep the loaded row the same."""
        self.store.update_output(row.id, **fields)
        for name, value in fields.items():
            setattr(row, name, value)

    def _downloads_done(self, job: Job, rows: list[JobOutput], result_dir: Path) -> Outcome:
        from daemon import unpack

        failed = [r for r in rows if r.state is OutputState.FAILED]
        pending = [r for r in rows if r.state is OutputState.PENDING]
        fields = {"result_dir": str(result_dir), "failures": 0, "error": None, "error_kind": None}
        if pending:
            return Outcome(next_poll_in=0, fields=fields)
        if failed:
            # A server-given name may hold control characters (terminal escapes): show it escaped.
            names = ", ".join(printable(r.name) for r in failed[:5]) + (" …" if len(failed) > 5 else "")
            reason = f"{len(failed)} of {len(rows)} result files could not be downloaded: {names}"
            return Outcome(state=JobState.FAILED, reason=reason,
                           fields={**fields, "error": reason, "error_kind": "download_failed"})
        total = sum(r.size or 0 for r in rows)
        reason = f"{counted(len(rows), 'file')} downloaded and verified ({counted(total, 'byte')})"
        if self.config.storage.extract:
            # Never fails the job: what went wrong is logged and told in the reason of the completed event.
            storage = self.config.storage
            reason += "; " + unpack.unpack_outputs(
                rows, result_dir, self._password(job), max_bytes=storage.extract_max_gib << 30,
                max_ratio=storage.extract_max_ratio,
            ).summary()
        return Outcome(state=JobState.COMPLETED, reason=reason, fields=fields)

    # ------------------------------------------------------------------ errors, in one place

    def _on_error(self, job: Job, exc: ServiceError, *, fields: dict[str, object] | None = None) -> Outcome | None:
        """The outcome of a step that raised `exc`; `fields`: more columns to write with it (a submit's
        bookkeeping)."""
        fields = fields or {}
        outcome = self._error_outcome(job, exc, fields=fields)
        if outcome is not None:
            outcome.fields.update(fields)
        return outcome

    def _error_outcome(self, job: Job, exc: ServiceError, *, fields: dict[str, object]) -> Outcome | None:
        self.metrics.error(job.service, exc.kind)
        if isinstance(exc, JobLimitReached) and job.state is JobState.SUBMITTING:
            # What we hold besides this job, and never more than the server's own "Only N": each wrong guess
            # costs a whole upload before the server says no.
            limit = self.store.in_flight_count(job.service) - 1
            if exc.limit is not None:
                limit = min(limit, exc.limit)
            # One line when the limit goes down; more refusals at the same limit are the same problem.
            lowered = self.store.lower_limit(job.service, limit)
            news = lowered and self._job_limit_told.get(job.service) != max(1, limit)
            self._job_limit_told[job.service] = max(1, limit)
            (log.warning if news else log.debug)(
                "service_job_limit", reason=str(exc), error_kind=exc.kind, lowered_to=max(1, limit)
            )
            outcome = self._backoff(job, exc, quiet=True)
            outcome.state, outcome.reason = JobState.PENDING, "service has no free job slot; waiting"
            return outcome
        if isinstance(exc, Transient):
            return self._backoff(job, exc)
        if isinstance(exc, Blocked):
            newly, parked = self.store.block_service(job.service, str(exc))
            if newly:
                log.error("service_blocked", reason=str(exc), error_kind=exc.kind, jobs_waiting=parked + 1)
            if job.state in (JobState.DOWNLOADING, JobState.CANCEL_REQUESTED):
                # Keep what these jobs are doing (a finished remote job, an operator's cancel) and retry it when
                # the service is usable again, instead of parking them where that would be forgotten.
                return self._backoff(job, Transient(str(exc), kind=exc.kind), quiet=True)
            self.store.park_blocked(job.id, self.owner, str(exc), fields=fields)
            return None
        assert isinstance(exc, Permanent)
        if job.state is JobState.CANCEL_REQUESTED:
            return Outcome(state=JobState.CANCELLED, reason=f"cancelled; the server answered: {exc}")
        if exc.kind == "remote_not_found" and job.state in (JobState.QUEUED, JobState.RUNNING):
            # A job the server once accepted and no longer knows was deleted there (Cloudgene DELETED answers 404).
            reason = f"results expired remotely: the server no longer has this job ({exc})"
            return Outcome(state=JobState.FAILED, reason=reason, fields={"error": reason, "error_kind": "expired"})
        return Outcome(state=JobState.FAILED, reason=str(exc), fields={"error": str(exc), "error_kind": exc.kind})

    def _crashed(self, job: Job, exc: Exception, *, what: str = "internal error") -> Outcome:
        """The outcome of a step that raised something other than a service error.

        A database that cannot be reached, or a local file system that needs an operator (permissions, read-only,
        I/O errors), is waited out with backoff however long it lasts, as a server outage is. Anything else (a bug,
        or the job's own data meeting a case nothing handles) is retried with backoff too, but the job fails once
        the same step has failed with the same exception type MAX_STEP_CRASHES times in a row. The first of a
        series is logged with its traceback, the repeats at debug level."""
        # Stored in jobs.error and shown: an exception's text may quote a URL or a value that holds a secret.
        text = scrub(f"{type(exc).__name__}: {exc}", self._secrets(job))
        if _unreachable_database(exc):
            self.metrics.error(job.service, "database")
            return self._backoff(job, Transient(f"database: {text}", kind="database"))
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            self.metrics.error(job.service, "local_io")
            return self._backoff(job, Transient(f"local file system: {text}", kind="local_io"))
        self.metrics.error(job.service, "internal")
        signature = f"{what}: {type(exc).__name__}:"
        same = job.error_kind == "internal" and (job.error or "").startswith(signature)
        crashes = job.failures + 1 if same else 1
        if crashes == 1:
            log.error("step_crashed", state=str(job.state), error_kind="internal", exc_info=exc,
                      reason=f"retrying with backoff; the job fails if this happens {MAX_STEP_CRASHES} times in a row")
        else:
            log.debug("step_crashed", state=str(job.state), error_kind="internal", reason=text, crashes=crashes)
        message = f"{what}: {text}"
        if crashes >= MAX_STEP_CRASHES:
            reason = f"the {job.state} step failed {crashes} times in a row ({message})"
            return Outcome(state=JobState.FAILED, reason=reason, fields={"error": reason, "error_kind": "internal"})
        outcome = self._backoff(job, Transient(message, kind="internal"), quiet=True)
        outcome.fields["failures"] = crashes
        return outcome

    def _backoff(self, job: Job, exc: Transient, *, quiet: bool = False) -> Outcome:
        failures = job.failures + 1
        scheduler = self.config.scheduler
        delay = backoff_delay(
            failures, initial=scheduler.backoff_initial, maximum=scheduler.backoff_max, retry_after=exc.retry_after
        )
        if exc.service_wide:
            until = utcnow() + dt.timedelta(seconds=delay)
            if self.store.pause_service(job.service, until, str(exc), continuing_within=scheduler.backoff_max):
                log.warning("service_paused", reason=str(exc), error_kind=exc.kind, seconds=round(delay, 1))
        elif not quiet:
            # One line when a problem starts; the repeats of the same problem are debug-level.
            level = log.warning if job.failures == 0 else log.debug
            level("step_failed_will_retry", step=str(job.state), reason=str(exc), error_kind=exc.kind,
                  failures=failures, retry_in=round(delay, 1))
        return Outcome(next_poll_in=delay,
                       fields={"failures": failures, "error": str(exc), "error_kind": exc.kind})

    def _log_transition(self, before: Job, after: JobRow, outcome: Outcome) -> None:
        level = log.error if outcome.state is JobState.FAILED else log.info
        level("job_state", from_state=str(before.state), to_state=str(outcome.state), reason=outcome.reason,
              remote_id=after.remote_id, error_kind=outcome.fields.get("error_kind"))


def _unreachable_database(exc: BaseException) -> bool:
    """The database could not be reached or went away (as opposed to refusing what was written)."""
    return isinstance(exc, (DatabaseUnavailable, sa.exc.OperationalError, sa.exc.InterfaceError,
                            sa.exc.TimeoutError)) or getattr(exc, "connection_invalidated", False) is True
