"""The jobs queue: every query the daemon and the CLI run against jobs, their inputs, outputs and services, named,
in one place (the notification outbox, the notifier's part, is `outbox.py`; the claim both use, `claims.py`).

Work is handed out by *claims*: an atomic UPDATE that sets a lease (`lease_owner`, `lease_expires_at`) on due jobs
nobody holds (`daemon.db.claims`). A step's outcome is written with `finish()`, which only lands while the caller
still holds the lease: a daemon whose lease expired (it hung, or another daemon took the job over) cannot overwrite
newer state.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, raiseload, selectinload
from sqlalchemy.orm.strategy_options import _AbstractLoad

from daemon.db.claims import claim, rowcount
from daemon.db.engine import is_postgres, make_session_factory, read_only, single_write
from daemon.db.expired import ExpiredJobs
from daemon.db.models import Job, JobEvent, JobInput, JobOutput, ServiceStatus, integer_or_none, utcnow
from daemon.db.outbox import NotificationOutbox
from daemon.db.service_status import ServiceStatuses, service_row
from daemon.outcome import JobColumns, Outcome, OutputColumns
from daemon.remote import JobParameters, RemoteOutput
from daemon.states import IN_FLIGHT, NOTIFIABLE, TERMINAL, JobState, OutputState, check_transition


@dataclass(frozen=True)
class NewInput:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class NewJob(JobParameters):
    service: str
    inputs: Sequence[NewInput]


#: A job's columns as a statement returned them: read like a `Job` (`.state`, `.next_poll_at`), no relationships.
JobRow = sa.Row[Any]


class Promotion(NamedTuple):
    """What `promote_pending` did for a service."""

    promoted: int
    #: Due pending jobs may be left without a slot (every free slot was used, or there was none): a job of this
    #: service that ends should wake the dispatch rather than leave its slot empty until the next tick.
    waiting: bool


class LeaseLost(RuntimeError):
    """The job's lease is no longer ours: another daemon took it over after it expired."""


class JobNotFound(LookupError):
    pass


class PasswordSealer(Protocol):
    """What the store needs of `daemon.crypto.PasswordCipher`: seal a password before it is stored."""

    def seal(self, password: str | None) -> str | None: ...


def _load_options() -> tuple[_AbstractLoad, ...]:
    return (selectinload(Job.inputs), selectinload(Job.outputs))


def _step_load_options(states: Collection[JobState]) -> tuple[_AbstractLoad, ...]:
    """What the pipeline's step for jobs in `states` reads besides the job's own columns."""
    options = [selectinload(Job.inputs) if JobState.SUBMITTING in states else raiseload(Job.inputs),
               selectinload(Job.outputs) if JobState.DOWNLOADING in states else raiseload(Job.outputs)]
    return (*options, raiseload(Job.events))


# Statements of the dispatch tick, built once (the tick runs them for every service every few seconds).
# The models' tables as Core tables: `__table__` is typed as any FromClause.
_jobs = cast(sa.Table, Job.__table__)
_DUE_PENDING = (
    (_jobs.c.service == sa.bindparam("of_service"))
    & (_jobs.c.state == JobState.PENDING)
    & sa.or_(_jobs.c.next_poll_at.is_(None), _jobs.c.next_poll_at <= sa.bindparam("now"))
)
_ANY_DUE_PENDING = sa.select(_jobs.c.id).where(_DUE_PENDING).limit(1)
#: The service's lowered limit, locking its status row: whoever promotes into this service waits for us.
_SERVICE_LIMIT = (
    sa.select(ServiceStatus.effective_limit).where(ServiceStatus.name == sa.bindparam("service")).with_for_update()
)
_IN_FLIGHT_COUNT = (
    sa.select(sa.func.count())
    .select_from(_jobs)
    .where(_jobs.c.service == sa.bindparam("service"), _jobs.c.state.in_(sorted(IN_FLIGHT)))
)
#: Oldest due pending jobs of a service → submitting, at most `free` of them; rows another daemon is promoting
#: are skipped (PostgreSQL), the SQLite write lock serialises promoters anyway.
_PROMOTE = (
    sa.update(_jobs)
    .where(
        _jobs.c.id.in_(
            sa.select(_jobs.c.id)
            .where(_DUE_PENDING)
            .order_by(_jobs.c.created_at)
            .limit(sa.bindparam("free"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(state=JobState.SUBMITTING, next_poll_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
    .returning(_jobs.c.id)
)


# Statements every step of every job runs (`finish`, `note_submit_attempt`, the download bookkeeping), built once.
# Where a statement takes the values to set at execution, its own parameters are named b_* so they cannot collide
# with the column names.
_outputs = cast(sa.Table, JobOutput.__table__)
_LOCK_JOB = (
    sa.select(_jobs.c.state, _jobs.c.lease_owner, _jobs.c.service)
    .where(_jobs.c.id == sa.bindparam("b_job_id"))
    .with_for_update()
)
_INSERT_EVENT = sa.insert(cast(sa.Table, JobEvent.__table__))
#: SET takes whatever columns the parameters name.
_UPDATE_JOB_RETURNING = sa.update(_jobs).where(_jobs.c.id == sa.bindparam("b_job_id")).returning(*_jobs.c)
#: The same, only while `b_owner` holds the lease and the job is in `b_state`.
_UPDATE_LEASED_JOB_RETURNING = (
    sa.update(_jobs)
    .where(
        _jobs.c.id == sa.bindparam("b_job_id"),
        _jobs.c.lease_owner == sa.bindparam("b_owner"),
        _jobs.c.state == sa.bindparam("b_state"),
    )
    .returning(*_jobs.c)
)
_COUNT_SUBMIT_ATTEMPT = (
    sa.update(_jobs)
    .where(_jobs.c.id == sa.bindparam("b_job_id"), _jobs.c.lease_owner == sa.bindparam("b_owner"))
    .values(submit_attempts=_jobs.c.submit_attempts + 1)
    .returning(_jobs.c.submit_attempts)
)
_OUTPUT_STATES = sa.select(_outputs.c.name, _outputs.c.state).where(_outputs.c.job_id == sa.bindparam("b_job_id"))
_JOB_OUTPUTS = sa.select(_outputs).where(_outputs.c.job_id == sa.bindparam("b_job_id")).order_by(_outputs.c.id)
_REFRESH_OUTPUT = sa.update(_outputs).where(
    _outputs.c.job_id == sa.bindparam("b_job_id"), _outputs.c.name == sa.bindparam("b_name")
)
_UPDATE_OUTPUT = sa.update(_outputs).where(_outputs.c.id == sa.bindparam("b_output_id"))
_services = cast(sa.Table, ServiceStatus.__table__)
_FORGET_LOWERED_LIMIT = (
    sa.update(_services)
    .where(_services.c.name == sa.bindparam("b_service"), _services.c.effective_limit.is_not(None))
    .values(effective_limit=None)
)


class JobStore:
    def __init__(self, engine: sa.Engine, *, sealer: PasswordSealer | None = None) -> None:
        self._engine = engine
        #: ORM sessions for what reads or writes whole jobs; the statements every step runs use `_engine` directly.
        self._session = make_session_factory(engine)
        #: Sessions that only read: on SQLite they neither take nor wait for the write lock, which the daemon's
        #: steps take turns on (a read that queued behind them was a good part of a busy daemon's wait for it).
        self._reader = read_only(engine)
        self._reading = make_session_factory(self._reader)
        #: For blocks of one writing statement (`single_write`).
        self._single = single_write(engine)
        self._postgres = is_postgres(engine)
        #: Seals job passwords before they are stored; None stores them as given.
        self._sealer = sealer
        #: The notification outbox: the notifier's part of the store.
        self.outbox = NotificationOutbox(engine)
        #: Finished jobs past the retention period: the retention's part of the store.
        self.expired = ExpiredJobs(engine)
        #: Each service's pause, lowered limit and token check: what the scheduler and the probes read and write.
        self.services = ServiceStatuses(engine)

    # ------------------------------------------------------------------ submission and operator actions

    def create_group(self, jobs: Sequence[NewJob]) -> list[Job]:
        """Store one pending job per service, sharing a group id, with their inputs and a first event."""
        group_id = uuid.uuid4()
        now = utcnow()
        created: list[Job] = []
        with self._session() as session, session.begin():
            for index, spec in enumerate(jobs):
                job_id = group_id if index == 0 else uuid.uuid4()
                job = Job(
                    id=job_id,
                    group_id=group_id,
                    service=spec.service,
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

    def get(self, job_id: uuid.UUID, *, with_events: bool = False) -> Job:
        options = [*_load_options()]
        if with_events:
            options.append(selectinload(Job.events))
        with self._reading() as session:
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
        with self._reading() as session:
            # UUIDs are stored as 32 hex digits on SQLite and natively on PostgreSQL; compare on text.
            column: sa.ColumnElement[str] = sa.cast(Job.id, sa.String)
            hexed = text.replace("-", "")
            if self._postgres:
                column = sa.func.replace(column, "-", "", type_=sa.String)
            ids = session.scalars(sa.select(Job.id).where(column.like(f"{hexed}%")).limit(2)).all()
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
        limit: int = 100,
    ) -> list[Job]:
        query = sa.select(Job).order_by(Job.created_at.desc()).limit(limit)
        if states:
            query = query.where(Job.state.in_(list(states)))
        if service:
            query = query.where(Job.service == service)
        with self._reading() as session:
            return list(session.scalars(query.options(selectinload(Job.outputs))).all())

    def group(self, group_id: uuid.UUID) -> list[Job]:
        with self._reading() as session:
            query = sa.select(Job).where(Job.group_id == group_id).order_by(Job.created_at, Job.service)
            return list(session.scalars(query.options(*_load_options(), selectinload(Job.events))).all())

    def counts_by_service(self) -> dict[str, dict[str, int]]:
        with self._reading() as session:
            rows = session.execute(
                sa.select(Job.service, Job.state, sa.func.count()).group_by(Job.service, Job.state)
            ).all()
        counts: dict[str, dict[str, int]] = {}
        for service, state, count in rows:
            counts.setdefault(service, {})[JobState(state).value] = count
        return counts

    def request_cancel(self, job_id: uuid.UUID, *, reason: str = "cancelled by operator") -> JobState:
        """Cancel at once what never reached the server; ask the daemon to cancel remotely otherwise."""
        now = utcnow()
        with self._session() as session, session.begin():
            job = self._lock(session, job_id)
            if job.state in TERMINAL or job.state is JobState.CANCEL_REQUESTED:
                return job.state
            # A pending or blocked job may still have a submit whose outcome is unknown (parked, then unblocked, while
            # its lost submit was being looked up): the daemon must wait for that remote job and cancel it there
            # (see `Pipeline._cancel`) rather than forget it.
            never_sent = job.submit_attempts == 0
            if job.remote_id is None and job.state in (JobState.PENDING, JobState.BLOCKED) and never_sent:
                self._transition(session, job, JobState.CANCELLED, reason, now)
                job.finished_at = now
            elif job.state is JobState.DOWNLOADING:
                # The remote job is done; cancelling only stops our download.
                self._transition(session, job, JobState.CANCELLED, reason, now)
                job.finished_at = now
            else:
                self._transition(session, job, JobState.CANCEL_REQUESTED, reason, now)
                job.next_poll_at = now
            return job.state

    def retry(self, job_id: uuid.UUID) -> Job:
        """failed → pending: a fresh remote submission, keeping the inputs and the history."""
        now = utcnow()
        with self._session() as session, session.begin():
            job = self._lock(session, job_id)
            if job.state is not JobState.FAILED:
                raise ValueError(f"job {job.id} is {job.state}; only failed jobs can be retried")
            self._transition(session, job, JobState.PENDING, "retried by operator", now)
            job.retries += 1
            job.remote_id = job.remote_state = job.progress = job.error = job.error_kind = None
            job.queue_position = job.next_poll_at = job.finished_at = job.submitted_at = None
            job.submit_attempts = job.restart_attempts = job.failures = 0
            # Verified files from the failed attempt stay on disk and are not re-fetched by name.
            session.execute(
                sa.delete(JobOutput).where(JobOutput.job_id == job.id, JobOutput.state != OutputState.VERIFIED)
            )
            return job

    # ------------------------------------------------------------------ the scheduler's due-work queries

    def note(self, job_id: uuid.UUID, reason: str) -> None:
        """Write `reason` into the job's history without changing its state (an event from its state to the same
        one, never notified): something done to the job that its owner should be able to see later."""
        with self._session() as session, session.begin():
            job = self._lock(session, job_id)
            session.add(JobEvent(job_id=job.id, at=utcnow(), from_state=job.state, to_state=job.state, reason=reason))

    def in_flight_count(self, service: str) -> int:
        with self._reader.connect() as conn:
            return conn.execute(_IN_FLIGHT_COUNT, {"service": service}).scalar() or 0

    def promote_pending(self, service: str, max_concurrent: int, *, now: dt.datetime | None = None) -> Promotion:
        """Move the oldest due pending jobs of a service to `submitting`, as many as the service has free slots.

        The count of in-flight jobs and the promotion happen in one transaction that holds the service's status
        row (PostgreSQL `FOR UPDATE`; SQLite's write lock), so several daemons never overfill a service. The lock
        and the count are separate statements on purpose: under READ COMMITTED the count then sees every promotion
        committed by whoever held the lock before us.

        Runs on every dispatch tick for every service, so it is Core statements built once (no unit of work): the
        pick and the update are one `UPDATE … WHERE id IN (… FOR UPDATE SKIP LOCKED) RETURNING id`."""
        now = now or utcnow()
        with self._reader.connect() as conn:
            # Nothing pending (an idle daemon, or every job promoted already): no write transaction is needed (on
            # SQLite, no turn at the write lock).
            if conn.execute(_ANY_DUE_PENDING, {"of_service": service, "now": now}).first() is None:
                return Promotion(0, waiting=False)
        with self._engine.begin() as conn:
            effective = conn.execute(_SERVICE_LIMIT, {"service": service}).scalar()
            limit = max_concurrent if effective is None else min(max_concurrent, effective)
            free = limit - (conn.execute(_IN_FLIGHT_COUNT, {"service": service}).scalar() or 0)
            if free <= 0:
                waiting = conn.execute(_ANY_DUE_PENDING, {"of_service": service, "now": now}).first() is not None
                return Promotion(0, waiting)
            ids = conn.execute(_PROMOTE, {"of_service": service, "now": now, "free": free}).scalars().all()
            if ids:
                conn.execute(
                    _INSERT_EVENT,
                    [_event(i, JobState.PENDING, JobState.SUBMITTING, "slot free on service", now) for i in ids],
                )
            return Promotion(len(ids), waiting=len(ids) == free)

    def claim_due(
        self,
        owner: str,
        *,
        states: Collection[JobState],
        services: Collection[str],
        limit: int,
        lease_seconds: float,
        now: dt.datetime | None = None,
    ) -> list[Job]:
        """Lease up to `limit` jobs in `states` whose `next_poll_at` is due and that nobody holds."""
        if limit <= 0 or not services or not states:
            return []
        now = now or utcnow()
        expires = now + dt.timedelta(seconds=lease_seconds)
        candidates = (
            sa.select(_jobs.c.id)
            .where(
                _jobs.c.state.in_(list(states)),
                _jobs.c.next_poll_at <= now,
                _jobs.c.service.in_(list(services)),
                sa.or_(_jobs.c.lease_expires_at.is_(None), _jobs.c.lease_expires_at < now),
            )
            .order_by(_jobs.c.next_poll_at)
            .limit(limit)
        )
        with self._engine.begin() as conn:
            # One statement leases the rows; nothing else happens while this holds SQLite's write lock, which every
            # worker's bookkeeping waits for.
            ids = conn.execute(claim(_jobs, candidates, lease_owner=owner, lease_expires_at=expires)).scalars().all()
        if not ids:
            return []
        with self._reading() as session:
            # The leased jobs, with each relationship the step will read (a submit its inputs, a download its
            # outputs) loaded so they are usable detached; reading another one raises instead of silently finding
            # nothing. Only the lease holder writes a job, so reading after the commit finds what was leased (or
            # an operator's cancel since, which the step then handles).
            return list(
                session.scalars(
                    sa.select(Job)
                    .where(Job.id.in_(ids))
                    .order_by(Job.next_poll_at)
                    .options(*_step_load_options(states))
                )
            )

    def claim_one(self, job_id: uuid.UUID, owner: str, *, lease_seconds: float) -> Job | None:
        """Lease one given job if nobody holds it (the CLI's `cancel` uses this)."""
        now = utcnow()
        with self._session() as session, session.begin():
            claimed = session.scalar(
                sa.update(Job)
                .where(Job.id == job_id, sa.or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now))
                .values(lease_owner=owner, lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
                .returning(Job.id)
                .execution_options(synchronize_session=False)
            )
            if claimed is None:
                return None
            return session.get(Job, job_id, options=_load_options(), populate_existing=True)

    def renew_leases(self, owner: str, job_ids: Collection[uuid.UUID], *, lease_seconds: float) -> int:
        if not job_ids:
            return 0
        expires = utcnow() + dt.timedelta(seconds=lease_seconds)
        with self._session() as session, session.begin():
            result = session.execute(
                sa.update(Job)
                .where(Job.id.in_(list(job_ids)), Job.lease_owner == owner)
                .values(lease_expires_at=expires)
                .execution_options(synchronize_session=False)
            )
            return rowcount(result)

    def release(self, job_id: uuid.UUID, owner: str) -> None:
        with self._session() as session, session.begin():
            session.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )

    def release_owners(self, owners: Callable[[str], bool]) -> list[str]:
        """Release every lease whose owner the predicate says is gone (dead processes on this host)."""
        with self._session() as session, session.begin():
            held = session.scalars(sa.select(Job.lease_owner).where(Job.lease_owner.is_not(None)).distinct()).all()
            gone = [o for o in held if o is not None and owners(o)]
            if gone:
                session.execute(
                    sa.update(Job)
                    .where(Job.lease_owner.in_(gone))
                    .values(lease_owner=None, lease_expires_at=None)
                    .execution_options(synchronize_session=False)
                )
            return gone

    def clear_expired_leases(self, now: dt.datetime | None = None) -> int:
        now = now or utcnow()
        with self._session() as session, session.begin():
            result = session.execute(
                sa.update(Job)
                .where(Job.lease_expires_at < now)
                .values(lease_owner=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )
            return rowcount(result)

    # ------------------------------------------------------------------ writing a step's outcome

    def finish(
        self,
        job_id: uuid.UUID,
        owner: str,
        outcome: Outcome,
        *,
        keep_lease: bool = False,
        expected: JobState | None = None,
    ) -> JobRow:
        """Apply a step's outcome and (unless `keep_lease`) release the lease, in one transaction; return the job's
        columns as written (a row: `.state`, `.next_poll_at`, …).

        Raises `LeaseLost` when another owner holds the job now: its state is newer than ours.

        Every step of every job ends here, so it is prebuilt Core statements, not an ORM load and flush. With
        `expected` (the state the step started from) one `UPDATE … RETURNING` checks the lease and the state and
        writes; only when that matches nothing (the lease is gone, or an operator's cancel changed the state
        meanwhile) is the row locked and read first. An event is written when the state changes, and the files of a
        finished remote job (`outcome.outputs`) are recorded in the same transaction, so a job is never
        `downloading` without them."""
        now = utcnow()
        with self._engine.begin() as conn:
            row = None
            if expected is not None:
                values = self._finish_values(expected, outcome, now, keep_lease=keep_lease)
                row = conn.execute(
                    _UPDATE_LEASED_JOB_RETURNING, {"b_job_id": job_id, "b_owner": owner, "b_state": expected, **values}
                ).one_or_none()
                before = expected
            if row is None:
                current = self._lock_leased(conn, job_id, owner)
                values = self._finish_values(current.state, outcome, now, keep_lease=keep_lease)
                row = conn.execute(_UPDATE_JOB_RETURNING, {"b_job_id": job_id, **values}).one()
                before = current.state
            if outcome.state is not None and outcome.state != before:
                conn.execute(_INSERT_EVENT, [_event(job_id, before, outcome.state, outcome.reason, now)])
                if row.state in TERMINAL:
                    self._job_left_service(conn, row.service)
            if outcome.outputs:
                self._record_outputs(conn, job_id, outcome.outputs)
            return row

    @staticmethod
    def _finish_values(
        current: JobState, outcome: Outcome, now: dt.datetime, *, keep_lease: bool
    ) -> dict[str, Any]:
        """The columns `finish` sets for `outcome` on a job in state `current` (raises on a transition the state
        machine forbids)."""
        values: dict[str, Any] = outcome.columns.values()
        if outcome.state is not None and outcome.state != current:
            check_transition(current, outcome.state)
            values["state"] = outcome.state
            if outcome.state in TERMINAL:
                values["finished_at"] = now
                values["next_poll_at"] = None
        if outcome.next_poll_in is not None:
            values["next_poll_at"] = now + dt.timedelta(seconds=outcome.next_poll_in)
        if not keep_lease:
            values["lease_owner"] = values["lease_expires_at"] = None
        values["updated_at"] = now
        return values

    def note_submit_attempt(self, job_id: uuid.UUID, owner: str, *, settle: float = 0.0) -> int:
        """Count a submit attempt and commit it *before* the request goes out (exactly-once submission); its
        `submitted_at` is None while it is in flight (see `Pipeline._submit`).

        `settle`: should this attempt's outcome be lost (the daemon killed while the server still works on the
        request), the job is not taken up again — looked up — for that many seconds, so a request the server
        already holds has had time to become a job before the first look. A written outcome sets `next_poll_at`
        afresh."""
        now = utcnow()
        values: dict[str, Any] = {"b_job_id": job_id, "b_owner": owner, "updated_at": now, "submitted_at": None}
        if settle > 0:
            values["next_poll_at"] = now + dt.timedelta(seconds=settle)
        with self._single.begin() as conn:  # one write; the read below only says why it changed nothing
            attempts: int | None = conn.execute(_COUNT_SUBMIT_ATTEMPT, values).scalar()
            if attempts is None:
                self._lock_leased(conn, job_id, owner)  # raises the reason: no such job, or not ours any more
                raise AssertionError("_lock_leased raises when the count changed nothing")
            return attempts

    def record_outputs(self, job_id: uuid.UUID, outputs: Sequence[RemoteOutput]) -> None:
        """Store the files a finished remote job offers; a file already known keeps its download state, but its
        URL and counter are refreshed (a server may re-issue them). A step's outcome records them with `finish`
        (`Outcome.outputs`), in the same transaction."""
        with self._engine.begin() as conn:
            self._record_outputs(conn, job_id, outputs)

    @staticmethod
    def _record_outputs(conn: sa.Connection, job_id: uuid.UUID, outputs: Sequence[RemoteOutput]) -> None:
        known = dict(conn.execute(_OUTPUT_STATES, {"b_job_id": job_id}).all())
        new, refreshed = [], []
        # Two files of one name cannot both be stored (nor told apart): the name is recorded once, failed, and
        # neither is fetched. The job's other files are.
        listed = Counter(remote.name for remote in outputs)
        ambiguous = {name for name, count in listed.items() if count > 1}
        for name in ambiguous - known.keys():
            new.append({"job_id": job_id, "name": name, "url": "", "remote_hash": None, "size_text": None,
                        "downloads_left": None, "remote_checksum": None, "state": OutputState.FAILED, "attempts": 0,
                        "bad_downloads": 0, "error": f"the server lists {listed[name]} result files of this name; "
                        "they cannot be told apart, so neither was downloaded"})
        for remote in outputs:
            if remote.name in ambiguous:
                continue
            fields = {
                "url": remote.url,
                "remote_hash": remote.remote_hash,
                "downloads_left": integer_or_none(remote.downloads_left),
                "remote_checksum": ":".join(remote.checksum) if remote.checksum else None,
            }
            state = known.get(remote.name)
            if state is None:
                new.append({"job_id": job_id, "name": remote.name, "size_text": remote.size_text,
                            "state": OutputState.PENDING, "attempts": 0, "bad_downloads": 0, "error": None,
                            **fields})
            elif state is not OutputState.VERIFIED:
                refreshed.append({"b_job_id": job_id, "b_name": remote.name, **fields})
        if new:
            conn.execute(sa.insert(_outputs), new)
        if refreshed:
            conn.execute(_REFRESH_OUTPUT, refreshed)

    def update_output(self, output_id: int, changes: OutputColumns) -> None:
        with self._single.begin() as conn:
            conn.execute(_UPDATE_OUTPUT, {"b_output_id": output_id, **changes.values()})

    def outputs(self, job_id: uuid.UUID) -> list[JobOutput]:
        """The job's files in the order they were recorded, as objects no session holds. A Core read: a poll that
        finds the job finished asks for them before its download, once per job, and an ORM session and load cost
        more than the query."""
        with self._reader.connect() as conn:
            return [JobOutput(**row._mapping) for row in conn.execute(_JOB_OUTPUTS, {"b_job_id": job_id})]

    # ------------------------------------------------------------------ service status

    def block_service(self, service: str, reason: str) -> tuple[bool, int]:
        """Mark a service unusable and park its waiting jobs in `blocked`.

        Returns (newly blocked, jobs parked). Jobs held by a lease are left to their holder, which meets the same
        error and parks its job itself."""
        now = utcnow()
        with self._session() as session, session.begin():
            status = service_row(session, service)
            newly = status.blocked_reason is None
            status.blocked_reason, status.blocked_at = reason, status.blocked_at if not newly else now
            jobs = session.scalars(
                sa.select(Job)
                .where(
                    Job.service == service,
                    Job.state.in_([JobState.PENDING, JobState.QUEUED, JobState.RUNNING]),
                    sa.or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
                )
                .with_for_update(skip_locked=True)
            ).all()
            for job in jobs:
                self._transition(session, job, JobState.BLOCKED, reason, now)
            return newly, len(jobs)

    def park_blocked(self, job_id: uuid.UUID, owner: str, reason: str, *, columns: JobColumns | None = None) -> None:
        self.finish(job_id, owner, Outcome(state=JobState.BLOCKED, reason=reason, columns=columns or JobColumns()))

    def unblock_service(self, service: str, reason: str) -> int:
        """The service works again: blocked jobs return to where they can go on (pending, or polled again)."""
        now = utcnow()
        with self._session() as session, session.begin():
            status = service_row(session, service)
            status.blocked_reason = status.blocked_at = None
            jobs = session.scalars(
                sa.select(Job).where(Job.service == service, Job.state == JobState.BLOCKED).with_for_update()
            ).all()
            for job in jobs:
                target = JobState.PENDING if job.remote_id is None else JobState.QUEUED
                self._transition(session, job, target, reason, now)
                job.next_poll_at = now
                job.failures = 0
            return len(jobs)

    # ------------------------------------------------------------------ health

    def ping(self) -> None:
        """A trivial query: raises when the database does not answer."""
        with self._reading() as session:
            session.execute(sa.select(1)).one()

    # ------------------------------------------------------------------ internals

    def _lock(self, session: Session, job_id: uuid.UUID) -> Job:
        job = session.scalars(sa.select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job

    @staticmethod
    def _lock_leased(conn: sa.Connection, job_id: uuid.UUID, owner: str) -> JobRow:
        """Lock the job's row and check that `owner` holds its lease; the row's state, owner and service."""
        current = conn.execute(_LOCK_JOB, {"b_job_id": job_id}).one_or_none()
        if current is None:
            raise JobNotFound(f"no job {job_id}")
        if current.lease_owner != owner:
            raise LeaseLost(f"job {job_id} is no longer leased by this daemon")
        return cast(JobRow, current)

    @staticmethod
    def _job_left_service(conn: sa.Connection, service: str) -> None:
        # A finished job frees a slot: forget a limit lowered by "Only N jobs" so the next dispatch probes again.
        conn.execute(_FORGET_LOWERED_LIMIT, {"b_service": service})

    @staticmethod
    def _transition(session: Session, job: Job, new: JobState, reason: str | None, now: dt.datetime) -> None:
        check_transition(job.state, new)
        session.add(JobEvent(**_event(job.id, job.state, new, reason, now)))
        job.state = new
        job.updated_at = now


def _event(job_id: uuid.UUID, old: JobState | None, new: JobState, reason: str | None, now: dt.datetime
           ) -> dict[str, Any]:
    """A job_events row for a state change; the ones that may be notified enter the outbox at once."""
    return {"job_id": job_id, "at": now, "from_state": old, "to_state": new, "reason": reason,
            "notify_next_at": now if new in NOTIFIABLE else None}


def job_snapshot(job: Job) -> dict[str, Any]:
    """A job as plain data for `--json` output and notifications; secrets (password, URLs, hashes) left out."""
    data = {
        c.name: getattr(job, c.name)
        for c in Job.__table__.columns
        if c.name not in {"password", "lease_owner", "lease_expires_at"}
    }
    data["has_password"] = job.password is not None
    return data


__all__ = [
    "JobNotFound",
    "JobRow",
    "JobStore",
    "LeaseLost",
    "NewInput",
    "NewJob",
    "PasswordSealer",
    "Promotion",
    "job_snapshot",
]
