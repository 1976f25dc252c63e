"""Every statement the store runs, in one place: the store's parts (`queue`, `admin`, `outbox`, `service_status`,
`expired`) hold transactions and turn rows into values; what they send to the database is read here.

The statements every step or tick runs are built once, at import; the rest are built by functions of what varies.
Where a statement takes the values to set at execution, its own parameters are named b_* so they cannot collide
with the column names.

A claim is one statement: `UPDATE … SET <the claim> WHERE id IN (<due candidates> FOR UPDATE SKIP LOCKED)
RETURNING id`. On PostgreSQL the candidates another claimer has locked are skipped, so several daemons share one
database without waiting on each other; on SQLite every write transaction is `BEGIN IMMEDIATE` (see `engine.py`),
which serialises claimers, and the same statement runs. The queue (job leases) and the outbox (notification
attempts) both claim with `claim()`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import raiseload, selectinload
from sqlalchemy.orm.strategy_options import _AbstractLoad

from daemon.db.models import ApiToken, IdempotencyKey, Job, JobEvent, JobInput, JobOutput, OwnerStatus, ServiceStatus
from daemon.states import IN_FLIGHT, TERMINAL, JobState, OutputState

# The models' tables as Core tables: `__table__` is typed as any FromClause.
jobs = cast(sa.Table, Job.__table__)
outputs = cast(sa.Table, JobOutput.__table__)
events = cast(sa.Table, JobEvent.__table__)
services = cast(sa.Table, ServiceStatus.__table__)
service_owners = cast(sa.Table, OwnerStatus.__table__)


def claim(table: sa.Table, candidates: sa.Select[Any], **values: Any) -> sa.Update:
    """The claim of `table`'s rows whose ids `candidates` selects (ordered and limited as the caller wants):
    `values` set on each, their ids returned."""
    locked = candidates.with_for_update(skip_locked=True).scalar_subquery()
    return sa.update(table).where(table.c.id.in_(locked)).values(**values).returning(table.c.id)


def rowcount(result: sa.Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched (its result is a CursorResult; `Session.execute` is typed for any)."""
    return cast(sa.CursorResult[Any], result).rowcount


# ------------------------------------------------------------------ loading whole jobs


def job_load_options() -> tuple[_AbstractLoad, ...]:
    """What a whole job is read with: its inputs and outputs."""
    return (selectinload(Job.inputs), selectinload(Job.outputs))


def step_load_options(states: Collection[JobState]) -> tuple[_AbstractLoad, ...]:
    """What the pipeline's step for jobs in `states` reads besides the job's own columns: loaded so the jobs are
    usable detached; reading another relationship raises instead of silently finding nothing."""
    options = [selectinload(Job.inputs) if JobState.SUBMITTING in states else raiseload(Job.inputs),
               selectinload(Job.outputs) if JobState.DOWNLOADING in states else raiseload(Job.outputs)]
    return (*options, raiseload(Job.events))


# ------------------------------------------------------------------ dispatch (every service, every tick)

#: The job's owner is blocked on its service (a bad or missing token): it is neither promoted nor polled.
OWNER_BLOCKED = (
    sa.exists()
    .where(service_owners.c.service == jobs.c.service, service_owners.c.owner == jobs.c.owner,
           service_owners.c.blocked_reason.is_not(None))
)
_DUE_PENDING = (
    (jobs.c.service == sa.bindparam("of_service"))
    & (jobs.c.state == JobState.PENDING)
    & sa.or_(jobs.c.next_poll_at.is_(None), jobs.c.next_poll_at <= sa.bindparam("now"))
    & ~OWNER_BLOCKED
)
ANY_DUE_PENDING = sa.select(jobs.c.id).where(_DUE_PENDING).limit(1)
#: The service's status row, locked: whoever promotes into this service waits for us.
LOCK_SERVICE = sa.select(services.c.name).where(services.c.name == sa.bindparam("of_service")).with_for_update()
_IN_FLIGHT = (jobs.c.service == sa.bindparam("service")) & jobs.c.state.in_(sorted(IN_FLIGHT))
IN_FLIGHT_COUNT = sa.select(sa.func.count()).select_from(jobs).where(_IN_FLIGHT)
OWNER_IN_FLIGHT_COUNT = IN_FLIGHT_COUNT.where(jobs.c.owner == sa.bindparam("owner"))
_IS_DUE_PENDING = (jobs.c.state == JobState.PENDING) & sa.or_(jobs.c.next_poll_at.is_(None),
                                                              jobs.c.next_poll_at <= sa.bindparam("now"))
#: Per owner of a service's unfinished jobs, in one statement (dispatch runs it for every service every tick): jobs
#: in flight, due pending jobs and the oldest of them, the limit the server lowered, whether the owner is blocked.
OWNER_SLOTS = (
    sa.select(
        jobs.c.owner,
        sa.func.count().filter(jobs.c.state.in_(sorted(IN_FLIGHT))).label("in_flight"),
        sa.func.count().filter(_IS_DUE_PENDING).label("pending"),
        sa.func.min(jobs.c.created_at).filter(_IS_DUE_PENDING).label("oldest"),
        sa.func.max(service_owners.c.effective_limit).label("lowered"),
        sa.func.count(service_owners.c.blocked_reason).label("blocked"),
    )
    .select_from(jobs.outerjoin(service_owners, (service_owners.c.service == jobs.c.service)
                                & (service_owners.c.owner == jobs.c.owner)))
    .where(jobs.c.service == sa.bindparam("of_service"),
           jobs.c.state.in_(sorted({*IN_FLIGHT, JobState.PENDING})))
    .group_by(jobs.c.owner)
)
#: One owner's oldest due pending jobs on a service → submitting, at most `free` of them; rows another daemon is
#: promoting are skipped (PostgreSQL), the SQLite write lock serialises promoters anyway.
PROMOTE = (
    sa.update(jobs)
    .where(
        jobs.c.id.in_(
            sa.select(jobs.c.id)
            .where(_DUE_PENDING, jobs.c.owner == sa.bindparam("of_owner"))
            .order_by(jobs.c.created_at)
            .limit(sa.bindparam("free"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(state=JobState.SUBMITTING, next_poll_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
    .returning(jobs.c.id)
)


# ------------------------------------------------------------------ leases


def claim_due_jobs(
    owner: str, *, states: Collection[JobState], services: Collection[str], limit: int, now: dt.datetime,
    expires: dt.datetime, unblocked_only: bool = True,
) -> sa.Update:
    """Lease up to `limit` jobs in `states` whose `next_poll_at` is due and that nobody holds, soonest due first;
    with `unblocked_only`, none whose owner is blocked on its service."""
    candidates = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.state.in_(list(states)),
            jobs.c.next_poll_at <= now,
            jobs.c.service.in_(list(services)),
            sa.or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now),
            ~OWNER_BLOCKED if unblocked_only else sa.true(),
        )
        # Results the server deletes soonest are fetched first (Cloudgene `deletedOn`); the rest as they fall due.
        .order_by(jobs.c.retires_at.asc().nulls_last(), jobs.c.next_poll_at)
        .limit(limit)
    )
    return claim(jobs, candidates, lease_owner=owner, lease_expires_at=expires)


def leased_jobs(ids: Sequence[uuid.UUID], states: Collection[JobState]) -> sa.Select[Job]:
    """The jobs just leased, with what their step reads (`step_load_options`)."""
    return (
        sa.select(Job).where(Job.id.in_(ids)).order_by(Job.retires_at.asc().nulls_last(), Job.next_poll_at)
        .options(*step_load_options(states))
    )


def claim_job(job_id: uuid.UUID, owner: str, *, now: dt.datetime, expires: dt.datetime) -> sa.Update:
    """Lease one given job if nobody holds it."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id, sa.or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now))
        .values(lease_owner=owner, lease_expires_at=expires)
        .returning(jobs.c.id)
    )


def renew_leases(owner: str, job_ids: Collection[uuid.UUID], *, expires: dt.datetime) -> sa.Update:
    return sa.update(jobs).where(jobs.c.id.in_(list(job_ids)), jobs.c.lease_owner == owner).values(
        lease_expires_at=expires)


def release(job_id: uuid.UUID, owner: str) -> sa.Update:
    return sa.update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner).values(
        lease_owner=None, lease_expires_at=None)


LEASE_OWNERS = sa.select(jobs.c.lease_owner).where(jobs.c.lease_owner.is_not(None)).distinct()


def release_owners(gone: Collection[str]) -> sa.Update:
    return sa.update(jobs).where(jobs.c.lease_owner.in_(list(gone))).values(lease_owner=None, lease_expires_at=None)


def clear_expired_leases(now: dt.datetime) -> sa.Update:
    return sa.update(jobs).where(jobs.c.lease_expires_at < now).values(lease_owner=None, lease_expires_at=None)


# ------------------------------------------------------------------ a step's outcome (every step of every job)

LOCK_JOB = (
    sa.select(jobs.c.state, jobs.c.lease_owner, jobs.c.service, jobs.c.owner)
    .where(jobs.c.id == sa.bindparam("b_job_id"))
    .with_for_update()
)
INSERT_EVENT = sa.insert(events)
#: SET takes whatever columns the parameters name.
UPDATE_JOB_RETURNING = sa.update(jobs).where(jobs.c.id == sa.bindparam("b_job_id")).returning(*jobs.c)
#: The same, only while `b_owner` holds the lease and the job is in `b_state`.
UPDATE_LEASED_JOB_RETURNING = (
    sa.update(jobs)
    .where(
        jobs.c.id == sa.bindparam("b_job_id"),
        jobs.c.lease_owner == sa.bindparam("b_owner"),
        jobs.c.state == sa.bindparam("b_state"),
    )
    .returning(*jobs.c)
)
COUNT_SUBMIT_ATTEMPT = (
    sa.update(jobs)
    .where(jobs.c.id == sa.bindparam("b_job_id"), jobs.c.lease_owner == sa.bindparam("b_owner"))
    .values(submit_attempts=jobs.c.submit_attempts + 1)
    .returning(jobs.c.submit_attempts)
)
OUTPUT_STATES = sa.select(outputs.c.name, outputs.c.state).where(outputs.c.job_id == sa.bindparam("b_job_id"))
JOB_OUTPUTS = sa.select(outputs).where(outputs.c.job_id == sa.bindparam("b_job_id")).order_by(outputs.c.id)
INSERT_OUTPUTS = sa.insert(outputs)
REFRESH_OUTPUT = sa.update(outputs).where(
    outputs.c.job_id == sa.bindparam("b_job_id"), outputs.c.name == sa.bindparam("b_name")
)
UPDATE_OUTPUT = sa.update(outputs).where(outputs.c.id == sa.bindparam("b_output_id"))
#: A finished job frees a slot: its owner's limit lowered by "Only N jobs" is forgotten, so the next dispatch
#: probes again.
FORGET_LOWERED_LIMIT = (
    sa.update(service_owners)
    .where(service_owners.c.service == sa.bindparam("b_service"),
           service_owners.c.owner == sa.bindparam("b_job_owner"), service_owners.c.effective_limit.is_not(None))
    .values(effective_limit=None)
)


# ------------------------------------------------------------------ jobs moved by an owner's block on a service


def blockable_jobs(service: str, owner: str, now: dt.datetime) -> sa.Select[Job]:
    """The owner's waiting jobs on the service that nobody holds (a lease holder meets the block itself), locked."""
    return (
        sa.select(Job)
        .where(
            Job.service == service,
            Job.owner == owner,
            Job.state.in_([JobState.PENDING, JobState.QUEUED, JobState.RUNNING]),
            sa.or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
        )
        .with_for_update(skip_locked=True)
    )


def blocked_jobs(service: str, owner: str) -> sa.Select[Job]:
    return (sa.select(Job).where(Job.service == service, Job.owner == owner, Job.state == JobState.BLOCKED)
            .with_for_update())


# ------------------------------------------------------------------ the operator's reads and actions


def locked_job(job_id: uuid.UUID) -> sa.Select[Job]:
    return sa.select(Job).where(Job.id == job_id).with_for_update()


def job_ids_starting(hexed: str, *, postgres: bool) -> sa.Select[uuid.UUID]:
    """At most two job ids that start with the hex digits `hexed` (two: enough to call a prefix ambiguous)."""
    # UUIDs are stored as 32 hex digits on SQLite and natively on PostgreSQL; compare on text.
    column: sa.ColumnElement[str] = sa.cast(Job.id, sa.String)
    if postgres:
        column = sa.func.replace(column, "-", "", type_=sa.String)
    return sa.select(Job.id).where(column.like(f"{hexed}%")).limit(2)


#: A job's columns as lists show them: all but the secrets and the lease, and whether it has a password.
JOB_SUMMARY_COLUMNS = (*(c for c in jobs.c if c.name not in {"password", "lease_owner", "lease_expires_at"}),
                       jobs.c.password.is_not(None).label("has_password"))


def jobs_page(
    *, states: Collection[JobState] | None, service: str | None, owner: str | None, group: uuid.UUID | None,
    before: tuple[dt.datetime, uuid.UUID] | None, limit: int,
) -> sa.Select[Any]:
    """Job summaries (`JOB_SUMMARY_COLUMNS`), newest first by (created_at, id): the page after the cursor `before`
    (the last job of the previous page). Core rows: the API lists pages of them for many clients at once, and ORM
    objects cost twice the time of the query."""
    query = sa.select(*JOB_SUMMARY_COLUMNS).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if states:
        query = query.where(Job.state.in_(list(states)))
    if service:
        query = query.where(Job.service == service)
    if owner:
        query = query.where(Job.owner == owner)
    if group:
        query = query.where(Job.group_id == group)
    if before is not None:
        at, job_id = before
        query = query.where(sa.or_(Job.created_at < at, sa.and_(Job.created_at == at, Job.id < job_id)))
    return query


def events_after(job_id: uuid.UUID, after: int, limit: int) -> sa.Select[JobEvent]:
    return (sa.select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id)
            .limit(limit))


def newest_jobs(
    *, states: Collection[JobState] | None, service: str | None, limit: int, owner: str | None = None
) -> sa.Select[Job]:
    query = sa.select(Job).order_by(Job.created_at.desc()).limit(limit)
    if states:
        query = query.where(Job.state.in_(list(states)))
    if service:
        query = query.where(Job.service == service)
    if owner:
        query = query.where(Job.owner == owner)
    return query.options(selectinload(Job.outputs))


def group_jobs(group_id: uuid.UUID) -> sa.Select[Job]:
    return (
        sa.select(Job)
        .where(Job.group_id == group_id)
        .order_by(Job.created_at, Job.service)
        .options(*job_load_options(), selectinload(Job.events))
    )


def job_tracking(service: str, remote_id: str) -> sa.Select[Job]:
    """The job of ours that tracks a service's remote job, if any."""
    return sa.select(Job).where(Job.service == service, Job.remote_id == remote_id).order_by(Job.created_at)


COUNTS_BY_SERVICE = sa.select(Job.service, Job.state, sa.func.count()).group_by(Job.service, Job.state)
COUNTS_BY_OWNER = (sa.select(Job.service, Job.owner, Job.state, sa.func.count())
                   .group_by(Job.service, Job.owner, Job.state))


def unverified_outputs(job_id: uuid.UUID) -> sa.Delete:
    """A retried job's files from the failed attempt, except those verified (kept on disk, not fetched again)."""
    return sa.delete(JobOutput).where(JobOutput.job_id == job_id, JobOutput.state != OutputState.VERIFIED)


# ------------------------------------------------------------------ the notification outbox


def claim_notifications(
    *, states: Collection[str], limit: int, now: dt.datetime, lease_seconds: float
) -> sa.Update:
    """Push the `notify_next_at` of up to `limit` due outbox rows for `states` a lease ahead and count an attempt."""
    candidates = (
        sa.select(events.c.id)
        .where(events.c.notify_next_at <= now, _notified(events.c, states))
        .order_by(events.c.notify_next_at, events.c.id)
        .limit(limit)
    )
    return claim(
        events, candidates,
        notify_next_at=now + dt.timedelta(seconds=lease_seconds),
        notify_attempts=sa.func.coalesce(events.c.notify_attempts, 0) + 1,
    )


def events_with_jobs(event_ids: Collection[int]) -> sa.Select[JobEvent, Job]:
    return (
        sa.select(JobEvent, Job).join(Job, Job.id == JobEvent.job_id).where(JobEvent.id.in_(list(event_ids)))
        .order_by(JobEvent.id)
    )


def update_claimed_notification(event_id: int, attempt: int, **values: Any) -> sa.Update:
    """Set `values` on an outbox row only while the claim that made attempt `attempt` is its latest."""
    return (
        sa.update(JobEvent)
        .where(JobEvent.id == event_id, JobEvent.notify_attempts == attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def _notified(columns: Any, states: Collection[str]) -> sa.ColumnElement[bool]:
    """The outbox rows sent: state changes into `states`, and warnings (rows that change no state) always."""
    return sa.or_(columns.to_state.in_(list(states)), columns.from_state == columns.to_state)


def drop_due_notifications(reason: str, *, now: dt.datetime, keep_states: Collection[str]) -> sa.Update:
    query = sa.update(JobEvent).where(JobEvent.notify_next_at <= now)
    if keep_states:
        query = query.where(sa.not_(_notified(JobEvent, keep_states)))
    return query.values(notify_next_at=None, notify_error=reason).execution_options(synchronize_session=False)


# ------------------------------------------------------------------ service status rows

SERVICE_STATUSES = sa.select(ServiceStatus)


def locked_service(service: str) -> sa.Select[ServiceStatus]:
    return sa.select(ServiceStatus).where(ServiceStatus.name == service).with_for_update()


OWNER_STATUSES = sa.select(OwnerStatus)


def locked_owner_status(service: str, owner: str) -> sa.Select[OwnerStatus]:
    return sa.select(OwnerStatus).where(OwnerStatus.service == service, OwnerStatus.owner == owner).with_for_update()


#: The (service, owner) pairs that have unfinished jobs: whose tokens the daemon checks.
ACTIVE_OWNERS = (
    sa.select(jobs.c.service, jobs.c.owner).where(jobs.c.state.not_in(sorted(TERMINAL))).distinct()
)


def add_services(rows: list[dict[str, Any]], *, postgres: bool) -> sa.Executable:
    """Insert service status rows, leaving those that exist."""
    return _insert_missing(ServiceStatus, rows, ["name"], postgres=postgres)


def add_owner_status(service: str, owner: str, at: dt.datetime, *, postgres: bool) -> sa.Executable:
    """Insert an owner's status row on a service unless it exists (another daemon may be inserting it right now)."""
    return _insert_missing(OwnerStatus, [{"service": service, "owner": owner, "updated_at": at}],
                           ["service", "owner"], postgres=postgres)


def _insert_missing(model: type[Any], rows: list[dict[str, Any]], key: list[str], *, postgres: bool) -> sa.Executable:
    """Each dialect's own INSERT … ON CONFLICT (key) DO NOTHING."""
    # Imported here and not at the top: SQLAlchemy's PostgreSQL dialect is 2.9 MiB of a daemon's RSS that one on
    # SQLite never needs (bench/memory.py, and the ratio to the Celery stack has no room for it).
    if postgres:
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(model).values(rows).on_conflict_do_nothing(index_elements=key)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(model).values(rows).on_conflict_do_nothing(index_elements=key)


# ------------------------------------------------------------------ API tokens and idempotency keys

ALL_API_TOKENS = sa.select(ApiToken).order_by(ApiToken.created_at)
idempotency = cast(sa.Table, IdempotencyKey.__table__)
api_tokens = cast(sa.Table, ApiToken.__table__)
TOKEN_BY_ID = sa.select(api_tokens).where(api_tokens.c.id == sa.bindparam("b_id"))
TOKEN_USED = sa.update(api_tokens).where(api_tokens.c.id == sa.bindparam("b_id")).values(
    last_used_at=sa.bindparam("b_at"))
REVOKE_TOKEN = (sa.update(api_tokens).where(api_tokens.c.id == sa.bindparam("b_id"), api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=sa.bindparam("b_at")))
INSERT_IDEMPOTENCY_KEY = sa.insert(idempotency)
IDEMPOTENCY_KEY = sa.select(idempotency).where(
    idempotency.c.owner == sa.bindparam("b_owner"), idempotency.c.key == sa.bindparam("b_key"))
ANSWER_IDEMPOTENCY_KEY = sa.update(idempotency).where(
    idempotency.c.owner == sa.bindparam("b_owner"), idempotency.c.key == sa.bindparam("b_key"))
FORGET_IDEMPOTENCY_KEY = sa.delete(idempotency).where(
    idempotency.c.owner == sa.bindparam("b_owner"), idempotency.c.key == sa.bindparam("b_key"))
#: Keys kept past their use: a client retries within minutes, not days.
EXPIRED_IDEMPOTENCY_KEYS = sa.delete(idempotency).where(idempotency.c.created_at < sa.bindparam("b_before"))


# ------------------------------------------------------------------ retention


def finished_before(
    cutoff: dt.datetime, *, limit: int
) -> sa.Select[uuid.UUID, str, JobState, str | None, dt.datetime | None, str | None]:
    """Finished jobs (completed, failed, cancelled) that finished before `cutoff`, oldest first."""
    return (
        sa.select(Job.id, Job.service, Job.state, Job.name, Job.finished_at, Job.result_dir)
        .where(Job.state.in_(list(TERMINAL)), Job.finished_at < cutoff)
        .order_by(Job.finished_at)
        .limit(limit)
    )


def expired_job(job_id: uuid.UUID, cutoff: dt.datetime) -> sa.Select[Job]:
    """The job if it is still finished before `cutoff` and nobody holds its row, locked."""
    return (
        sa.select(Job)
        .where(Job.id == job_id, Job.state.in_(list(TERMINAL)), Job.finished_at < cutoff)
        .with_for_update(skip_locked=True)
    )


def input_paths_under(folder: str) -> sa.Select[str]:
    """The paths of the job inputs inside `folder` (a prefix compared as text: `LIKE` would read the path's own `_`
    and `%` as wildcards)."""
    prefix = folder.rstrip("/") + "/"
    return sa.select(JobInput.path).where(sa.func.substr(JobInput.path, 1, len(prefix)) == prefix).distinct()


def delete_job(job_id: uuid.UUID) -> sa.Delete:
    # The database's ON DELETE CASCADE removes inputs, outputs and events without loading them.
    return sa.delete(Job).where(Job.id == job_id).execution_options(synchronize_session=False)
