"""The operator's part of the store: storing submitted jobs, reading jobs for `jobs`/`show`, and what an operator does
to a job (cancel, retry, a note in its history). Its statements are in `queries.py`."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import selectinload

from daemon.db import queries
from daemon.db.engine import Connections
from daemon.db.models import Job, JobEvent, JobInput, utcnow
from daemon.db.service_status import service_row
from daemon.db.transitions import JobNotFound, lock_job, transition
from daemon.owners import DEFAULT_OWNER
from daemon.remote import JobParameters
from daemon.states import TERMINAL, JobState


@dataclass(frozen=True)
class NewInput:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class NewJob(JobParameters):
    service: str
    inputs: Sequence[NewInput]
    owner: str = DEFAULT_OWNER


class PasswordSealer(Protocol):
    """Seals a job password before it is stored (`daemon.crypto.PasswordCipher`)."""

    def seal(self, password: str | None) -> str | None: ...


class JobAdmin:
    def __init__(self, connections: Connections, *, sealer: PasswordSealer | None = None) -> None:
        self._db = connections
        #: Seals job passwords before they are stored; None stores them as given.
        self._sealer = sealer

    # ------------------------------------------------------------------ submission

    def create_group(self, jobs: Sequence[NewJob]) -> list[Job]:
        """Store one pending job per service, sharing a group id, with their inputs and a first event."""
        group_id = uuid.uuid4()
        now = utcnow()
        created: list[Job] = []
        with self._db.session() as session, session.begin():
            for index, spec in enumerate(jobs):
                job_id = group_id if index == 0 else uuid.uuid4()
                job = Job(
                    id=job_id,
                    group_id=group_id,
                    service=spec.service,
                    owner=spec.owner,
                    panel=spec.panel,
                    build=spec.build,
                    population=spec.population,
                    phasing=spec.phasing,
                    r2_filter=spec.r2_filter,
                    mode=spec.mode,
                    name=spec.name,
                    password=self._sealer.seal(spec.password) if self._sealer else spec.password,
                    state=JobState.PENDING,
                    created_at=now,
                    updated_at=now,
                    submit_attempts=0,
                    restart_attempts=0,
                    retries=0,
                    failures=0,
                )
                job.inputs = [JobInput(path=i.path, size=i.size, sha256=i.sha256) for i in spec.inputs]
                job.events = [JobEvent(at=now, from_state=None, to_state=JobState.PENDING, reason="submitted")]
                session.add(job)
                created.append(job)
        return created

    def adopt(self, service: str, remote_id: str, *, password: str | None = None, name: str | None = None,
              remote_state: str | None = None, owner: str = DEFAULT_OWNER) -> tuple[Job, bool]:
        """Track a job submitted elsewhere (the server's web UI, another tool) by its remote id: a `queued` job the
        daemon polls and downloads like its own. Returns (the job, whether it was adopted now); a remote job that a
        job of ours already tracks is that job, never a second one."""
        now = utcnow()
        with self._db.session() as session, session.begin():
            # The service's status row, locked: adopters of one service take turns (PostgreSQL; SQLite's write
            # lock serialises them anyway), so two cannot both find the remote job untracked.
            service_row(session, service)
            existing = session.scalars(queries.job_tracking(service, remote_id)).first()
            if existing is not None:
                return existing, False
            job = Job(
                id=uuid.uuid4(), service=service, owner=owner, panel="", build="", name=name, remote_id=remote_id,
                remote_state=remote_state,
                password=self._sealer.seal(password) if self._sealer else password,
                state=JobState.QUEUED, created_at=now, updated_at=now, submitted_at=now, next_poll_at=now,
                submit_attempts=0, restart_attempts=0, retries=0, failures=0,
            )
            job.group_id = job.id
            job.events = [JobEvent(at=now, from_state=None, to_state=JobState.QUEUED,
                                   reason=f"adopted from the server as {remote_id}")]
            session.add(job)
            return job, True

    # ------------------------------------------------------------------ reads

    def get(self, job_id: uuid.UUID, *, with_events: bool = False) -> Job:
        options = [*queries.job_load_options()]
        if with_events:
            options.append(selectinload(Job.events))
        with self._db.reading() as session:
            job = session.get(Job, job_id, options=options)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            return job

    def resolve_id(self, text: str) -> uuid.UUID:
        """A full job id, or a unique prefix of one (as `git` accepts short hashes)."""
        text = text.strip().lower()
        try:
            return uuid.UUID(text)
        except ValueError:
            pass
        if len(text) < 4 or any(c not in "0123456789abcdef-" for c in text):
            raise JobNotFound(f"'{text}' is not a job id")
        with self._db.reading() as session:
            ids = session.scalars(queries.job_ids_starting(text.replace("-", ""), postgres=self._db.postgres)).all()
        if not ids:
            raise JobNotFound(f"no job with id {text}")
        if len(ids) > 1:
            raise JobNotFound(f"job id prefix {text} is ambiguous")
        return ids[0]

    def list_jobs(
        self,
        *,
        states: Collection[JobState] | None = None,
        service: str | None = None,
        owner: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        with self._db.reading() as session:
            query = queries.newest_jobs(states=states, service=service, owner=owner, limit=limit)
            return list(session.scalars(query).all())

    def jobs_page(self, *, states: Collection[JobState] | None = None, service: str | None = None,
                  owner: str | None = None, group: uuid.UUID | None = None,
                  before: tuple[dt.datetime, uuid.UUID] | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Job summaries as `job_snapshot` makes them, newest first, after the cursor `before` (the (created_at,
        id) of the previous page's last job)."""
        query = queries.jobs_page(states=states, service=service, owner=owner, group=group, before=before,
                                  limit=limit)
        with self._db.reader.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def events_after(self, job_id: uuid.UUID, after: int = 0, *, limit: int = 500) -> list[JobEvent]:
        with self._db.reading() as session:
            return list(session.scalars(queries.events_after(job_id, after, limit)).all())

    def group(self, group_id: uuid.UUID) -> list[Job]:
        with self._db.reading() as session:
            return list(session.scalars(queries.group_jobs(group_id)).all())

    def counts_by_service(self) -> dict[str, dict[str, int]]:
        with self._db.reading() as session:
            rows = session.execute(queries.COUNTS_BY_SERVICE).all()
        counts: dict[str, dict[str, int]] = {}
        for service, state, count in rows:
            counts.setdefault(service, {})[JobState(state).value] = count
        return counts

    def counts_by_owner(self) -> dict[tuple[str, str], dict[str, int]]:
        """Jobs per (service, owner) and state."""
        with self._db.reading() as session:
            rows = session.execute(queries.COUNTS_BY_OWNER).all()
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for service, owner, state, count in rows:
            counts.setdefault((service, owner), {})[JobState(state).value] = count
        return counts

    # ------------------------------------------------------------------ operator actions

    def request_cancel(self, job_id: uuid.UUID, *, reason: str = "cancelled by operator") -> JobState:
        """Cancel at once what never reached the server; ask the daemon to cancel remotely otherwise."""
        now = utcnow()
        with self._db.session() as session, session.begin():
            job = lock_job(session, job_id)
            if job.state in TERMINAL or job.state is JobState.CANCEL_REQUESTED:
                return job.state
            # A pending or blocked job may still have a submit whose outcome is unknown (parked, then unblocked, while
            # its lost submit was being looked up): the daemon must wait for that remote job and cancel it there
            # (see `Pipeline._cancel`) rather than forget it.
            never_sent = job.submit_attempts == 0
            if job.remote_id is None and job.state in (JobState.PENDING, JobState.BLOCKED) and never_sent:
                transition(session, job, JobState.CANCELLED, reason, now)
                job.finished_at = now
            elif job.state is JobState.DOWNLOADING:
                # The remote job is done; cancelling only stops our download.
                transition(session, job, JobState.CANCELLED, reason, now)
                job.finished_at = now
            else:
                transition(session, job, JobState.CANCEL_REQUESTED, reason, now)
                job.next_poll_at = now
            return job.state

    def retry(self, job_id: uuid.UUID) -> Job:
        """failed → pending: a fresh remote submission, keeping the inputs and the history."""
        now = utcnow()
        with self._db.session() as session, session.begin():
            job = lock_job(session, job_id)
            if job.state is not JobState.FAILED:
                raise ValueError(f"job {job.id} is {job.state}; only failed jobs can be retried")
            if job.adopted:
                raise ValueError(f"job {job.id} was adopted from the server: there are no input files to submit again")
            transition(session, job, JobState.PENDING, "retried by operator", now)
            job.retries += 1
            job.remote_id = job.remote_state = job.progress = job.error = job.error_kind = None
            job.queue_position = job.next_poll_at = job.finished_at = job.submitted_at = job.cancel_sent_at = None
            job.submit_attempts = job.restart_attempts = job.failures = 0
            # Verified files from the failed attempt stay on disk and are not re-fetched by name.
            session.execute(queries.unverified_outputs(job.id))
            return job

    def note(self, job_id: uuid.UUID, reason: str) -> None:
        """Write `reason` into the job's history without changing its state (an event from its state to the same
        one, never notified): something done to the job that its owner should be able to see later."""
        with self._db.session() as session, session.begin():
            job = lock_job(session, job_id)
            session.add(JobEvent(job_id=job.id, at=utcnow(), from_state=job.state, to_state=job.state, reason=reason))


def job_detail(job: Job) -> dict[str, Any]:
    """A whole job as `show --json` prints it and the API answers it: its columns, inputs, outputs and events."""
    data = job_snapshot(job)
    data["inputs"] = [{"path": i.path, "size": i.size, "sha256": i.sha256} for i in job.inputs]
    data["outputs"] = [
        {"name": o.name, "state": o.state.value, "size": o.size, "sha256": o.sha256, "local_path": o.local_path,
         "downloads_left": o.downloads_left, "attempts": o.attempts, "error": o.error}
        for o in job.outputs
    ]
    data["events"] = [event_snapshot(e) for e in job.events]
    return data


def group_state(states: Sequence[str]) -> str:
    """One word for a group's jobs together."""
    if all(s == "completed" for s in states):
        return "completed"
    if all(s == "cancelled" for s in states):
        return "cancelled"
    if all(JobState(s) in TERMINAL for s in states):
        return "failed" if all(s != "completed" for s in states) else "partly failed"
    return "in progress"


def event_snapshot(event: JobEvent) -> dict[str, Any]:
    return {"id": event.id, "at": event.at, "from": event.from_state, "to": event.to_state, "reason": event.reason}


def job_snapshot(job: Job) -> dict[str, Any]:
    """A job as plain data for `--json` output and notifications; secrets (password, URLs, hashes) left out."""
    data = {
        c.name: getattr(job, c.name)
        for c in Job.__table__.columns
        if c.name not in {"password", "lease_owner", "lease_expires_at"}
    }
    data["has_password"] = job.password is not None
    return data
