"""The jobs queue: what the scheduler and the pipeline do to jobs (promote, claim, write a step's outcome, record
files, block a service's jobs). Its statements are in `queries.py`.

Work is handed out by *claims*: an atomic UPDATE that sets a lease (`lease_owner`, `lease_expires_at`) on due jobs
nobody holds (`queries.claim`). A step's outcome is written with `finish()`, which only lands while the caller still
holds the lease: a daemon whose lease expired (it hung, or another daemon took the job over) cannot overwrite newer
state.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple, cast

import sqlalchemy as sa

from daemon.db import queries
from daemon.db.engine import Connections
from daemon.db.models import Job, JobOutput, integer_or_none, utcnow
from daemon.db.queries import rowcount
from daemon.db.service_status import owner_row
from daemon.db.transitions import JobNotFound, event_row, transition, warning_row
from daemon.outcome import JobColumns, Outcome, OutputColumns
from daemon.remote import RemoteOutput
from daemon.states import TERMINAL, JobState, OutputState, check_transition

#: A job's columns as a statement returned them: read like a `Job` (`.state`, `.next_poll_at`), no relationships.
JobRow = sa.Row[Any]


class Promotion(NamedTuple):
    """What `promote_pending` did for a service."""

    promoted: int
    #: Due pending jobs were left without a slot: a job of this service that ends should wake the dispatch rather
    #: than leave its slot empty until the next tick.
    waiting: bool


class LeaseLost(RuntimeError):
    """Another owner holds the job now: its state is newer than ours."""


class JobQueue:
    def __init__(self, connections: Connections) -> None:
        self._db = connections

    # ------------------------------------------------------------------ dispatch

    def in_flight_count(self, service: str, owner: str | None = None) -> int:
        """Jobs in flight on the service: all of them, or `owner`'s."""
        with self._db.reader.connect() as conn:
            if owner is None:
                return conn.execute(queries.IN_FLIGHT_COUNT, {"service": service}).scalar() or 0
            return conn.execute(queries.OWNER_IN_FLIGHT_COUNT, {"service": service, "owner": owner}).scalar() or 0

    def promote_pending(self, service: str, max_concurrent: int, *, per_owner: int | None = None,
                        now: dt.datetime | None = None) -> Promotion:
        """Move the oldest due pending jobs of a service to `submitting`, as many as there are free slots: at most
        `max_concurrent` in flight on the service, and at most `per_owner` of one owner's (the server's "Only N
        jobs per user" is per account; lowered further while the server says so). Owners take the free slots in
        turn, whose oldest job waits longest first; a blocked owner's jobs are not promoted.

        The counts of in-flight jobs and the promotion happen in one transaction that holds the service's status
        row (PostgreSQL `FOR UPDATE`; SQLite's write lock), so several daemons never overfill a service. The lock
        and the counts are separate statements on purpose: under READ COMMITTED the counts then see every
        promotion committed by whoever held the lock before us.

        Runs on every dispatch tick for every service, so it is Core statements built once (no unit of work): the
        pick and the update are one `UPDATE … WHERE id IN (… FOR UPDATE SKIP LOCKED) RETURNING id`."""
        now = now or utcnow()
        due = {"of_service": service, "now": now}
        with self._db.reader.connect() as conn:
            # Nothing pending (an idle daemon, or every job promoted already): no write transaction is needed (on
            # SQLite, no turn at the write lock).
            if conn.execute(queries.ANY_DUE_PENDING, due).first() is None:
                return Promotion(0, waiting=False)
        promoted: list[uuid.UUID] = []
        waiting = False
        with self._db.engine.begin() as conn:
            conn.execute(queries.LOCK_SERVICE, due)
            owners = conn.execute(queries.OWNER_SLOTS, due).all()
            free = max_concurrent - sum(o.in_flight for o in owners)
            waiting_owners = sorted((o for o in owners if o.pending and not o.blocked), key=lambda o: o.oldest)
            for slots in waiting_owners:
                if free <= 0:
                    waiting = True
                    break
                limit = min(x for x in (per_owner, slots.lowered, max_concurrent) if x is not None)
                room = min(free, limit - slots.in_flight)
                ids = conn.execute(queries.PROMOTE, {**due, "of_owner": slots.owner, "free": room}).scalars().all() \
                    if room > 0 else []
                promoted += ids
                free -= len(ids)
                waiting = waiting or len(ids) < slots.pending
            if promoted:
                conn.execute(
                    queries.INSERT_EVENT,
                    [event_row(i, JobState.PENDING, JobState.SUBMITTING, "slot free on service", now)
                     for i in promoted],
                )
            return Promotion(len(promoted), waiting=waiting)

    # ------------------------------------------------------------------ leases

    def claim_due(
        self,
        owner: str,
        *,
        states: Collection[JobState],
        services: Collection[str],
        limit: int,
        lease_seconds: float,
        now: dt.datetime | None = None,
        unblocked_only: bool = True,
    ) -> list[Job]:
        """Lease up to `limit` jobs in `states` whose `next_poll_at` is due and that nobody holds; with
        `unblocked_only`, none whose owner is blocked on its service."""
        if limit <= 0 or not services or not states:
            return []
        now = now or utcnow()
        expires = now + dt.timedelta(seconds=lease_seconds)
        with self._db.engine.begin() as conn:
            # One statement leases the rows; nothing else happens while this holds SQLite's write lock, which every
            # worker's bookkeeping waits for.
            ids = conn.execute(queries.claim_due_jobs(owner, states=states, services=services, limit=limit, now=now,
                                                      expires=expires, unblocked_only=unblocked_only)).scalars().all()
        if not ids:
            return []
        with self._db.reading() as session:
            # The leased jobs, with each relationship the step will read (a submit its inputs, a download its
            # outputs). Only the lease holder writes a job, so reading after the commit finds what was leased (or
            # an operator's cancel since, which the step then handles).
            return list(session.scalars(queries.leased_jobs(ids, states)))

    def claim_one(self, job_id: uuid.UUID, owner: str, *, lease_seconds: float) -> Job | None:
        """Lease one given job if nobody holds it (the CLI's `cancel` uses this)."""
        now = utcnow()
        with self._db.session() as session, session.begin():
            claimed = session.scalar(
                queries.claim_job(job_id, owner, now=now, expires=now + dt.timedelta(seconds=lease_seconds))
            )
            if claimed is None:
                return None
            return session.get(Job, job_id, options=queries.job_load_options(), populate_existing=True)

    def renew_leases(self, owner: str, job_ids: Collection[uuid.UUID], *, lease_seconds: float) -> int:
        if not job_ids:
            return 0
        expires = utcnow() + dt.timedelta(seconds=lease_seconds)
        with self._db.engine.begin() as conn:
            return rowcount(conn.execute(queries.renew_leases(owner, job_ids, expires=expires)))

    def release(self, job_id: uuid.UUID, owner: str) -> None:
        with self._db.engine.begin() as conn:
            conn.execute(queries.release(job_id, owner))

    def release_owners(self, owners: Callable[[str], bool]) -> list[str]:
        """Release every lease whose owner the predicate says is gone (dead processes on this host)."""
        with self._db.engine.begin() as conn:
            held = conn.execute(queries.LEASE_OWNERS).scalars().all()
            gone = [o for o in held if o is not None and owners(o)]
            if gone:
                conn.execute(queries.release_owners(gone))
            return gone

    def clear_expired_leases(self, now: dt.datetime | None = None) -> int:
        with self._db.engine.begin() as conn:
            return rowcount(conn.execute(queries.clear_expired_leases(now or utcnow())))

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
        with self._db.engine.begin() as conn:
            row = None
            if expected is not None:
                values = _finish_values(expected, outcome, now, keep_lease=keep_lease)
                row = conn.execute(
                    queries.UPDATE_LEASED_JOB_RETURNING,
                    {"b_job_id": job_id, "b_owner": owner, "b_state": expected, **values},
                ).one_or_none()
                before = expected
            if row is None:
                current = _lock_leased(conn, job_id, owner)
                values = _finish_values(current.state, outcome, now, keep_lease=keep_lease)
                row = conn.execute(queries.UPDATE_JOB_RETURNING, {"b_job_id": job_id, **values}).one()
                before = current.state
            if outcome.state is not None and outcome.state != before:
                conn.execute(queries.INSERT_EVENT, [event_row(job_id, before, outcome.state, outcome.reason, now)])
                if row.state in TERMINAL:
                    conn.execute(queries.FORGET_LOWERED_LIMIT, {"b_service": row.service, "b_job_owner": row.owner})
            if outcome.warning is not None:
                conn.execute(queries.INSERT_EVENT, [warning_row(job_id, row.state, outcome.warning, now)])
            if outcome.outputs:
                _record_outputs(conn, job_id, outcome.outputs)
            return row

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
        with self._db.single.begin() as conn:  # one write; the read below only says why it changed nothing
            attempts: int | None = conn.execute(queries.COUNT_SUBMIT_ATTEMPT, values).scalar()
            if attempts is None:
                _lock_leased(conn, job_id, owner)  # raises the reason: no such job, or not ours any more
                raise AssertionError("_lock_leased raises when the count changed nothing")
            return attempts

    # ------------------------------------------------------------------ result files

    def record_outputs(self, job_id: uuid.UUID, outputs: Sequence[RemoteOutput]) -> None:
        """Store the files a finished remote job offers; a file already known keeps its download state, but its
        URL and counter are refreshed (a server may re-issue them). A step's outcome records them with `finish`
        (`Outcome.outputs`), in the same transaction."""
        with self._db.engine.begin() as conn:
            _record_outputs(conn, job_id, outputs)

    def update_output(self, output_id: int, changes: OutputColumns) -> None:
        with self._db.single.begin() as conn:
            conn.execute(queries.UPDATE_OUTPUT, {"b_output_id": output_id, **changes.values()})

    def outputs(self, job_id: uuid.UUID) -> list[JobOutput]:
        """The job's files in the order they were recorded, as objects no session holds. A Core read: a poll that
        finds the job finished asks for them before its download, once per job, and an ORM session and load cost
        more than the query."""
        with self._db.reader.connect() as conn:
            return [JobOutput(**row._mapping) for row in conn.execute(queries.JOB_OUTPUTS, {"b_job_id": job_id})]

    # ------------------------------------------------------------------ an owner's jobs on a service, blocked

    def block_owner(self, service: str, job_owner: str, reason: str) -> tuple[bool, int]:
        """Mark the owner's token unusable on the service and park their waiting jobs there in `blocked`; other
        owners' jobs go on.

        Returns (newly blocked, jobs parked). Jobs held by a lease are left to their holder, which meets the same
        error and parks its job itself."""
        now = utcnow()
        with self._db.session() as session, session.begin():
            status = owner_row(session, service, job_owner)
            newly = status.blocked_reason is None
            status.blocked_reason, status.blocked_at = reason, status.blocked_at if not newly else now
            jobs = session.scalars(queries.blockable_jobs(service, job_owner, now)).all()
            for job in jobs:
                transition(session, job, JobState.BLOCKED, reason, now)
            return newly, len(jobs)

    def park_blocked(self, job_id: uuid.UUID, owner: str, reason: str, *, columns: JobColumns | None = None) -> None:
        self.finish(job_id, owner, Outcome(state=JobState.BLOCKED, reason=reason, columns=columns or JobColumns()))

    def unblock_owner(self, service: str, job_owner: str, reason: str) -> int:
        """The owner's token works again: their blocked jobs return to where they can go on (pending, or polled
        again)."""
        now = utcnow()
        with self._db.session() as session, session.begin():
            status = owner_row(session, service, job_owner)
            status.blocked_reason = status.blocked_at = None
            jobs = session.scalars(queries.blocked_jobs(service, job_owner)).all()
            for job in jobs:
                target = JobState.PENDING if job.remote_id is None else JobState.QUEUED
                transition(session, job, target, reason, now)
                job.next_poll_at = now
                job.failures = 0
            return len(jobs)

    def active_owners(self) -> list[tuple[str, str]]:
        """The (service, owner) pairs with unfinished jobs."""
        with self._db.reader.connect() as conn:
            return [(row.service, row.owner) for row in conn.execute(queries.ACTIVE_OWNERS)]


def _finish_values(current: JobState, outcome: Outcome, now: dt.datetime, *, keep_lease: bool) -> dict[str, Any]:
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


def _lock_leased(conn: sa.Connection, job_id: uuid.UUID, owner: str) -> JobRow:
    """Lock the job's row and check that `owner` holds its lease; the row's state, owner and service."""
    current = conn.execute(queries.LOCK_JOB, {"b_job_id": job_id}).one_or_none()
    if current is None:
        raise JobNotFound(f"no job {job_id}")
    if current.lease_owner != owner:
        raise LeaseLost(f"job {job_id} is no longer leased by this daemon")
    return cast(JobRow, current)


def _record_outputs(conn: sa.Connection, job_id: uuid.UUID, outputs: Sequence[RemoteOutput]) -> None:
    known = dict(conn.execute(queries.OUTPUT_STATES, {"b_job_id": job_id}).all())
    new, refreshed = [], []
    # Two files of one name cannot both be stored (nor told apart): the name is recorded once, failed, and neither
    # is fetched. The job's other files are.
    listed = Counter(remote.name for remote in outputs)
    ambiguous = {name for name, count in listed.items() if count > 1}
    for name in ambiguous - known.keys():
        new.append({"job_id": job_id, "name": name, "url": "", "remote_hash": None, "size_text": None,
                    "downloads_left": None, "remote_checksum": None, "remote_size": None,
                    "state": OutputState.FAILED, "attempts": 0,
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
            "remote_size": remote.size,
        }
        state = known.get(remote.name)
        if state is None:
            new.append({"job_id": job_id, "name": remote.name, "size_text": remote.size_text,
                        "state": OutputState.PENDING, "attempts": 0, "bad_downloads": 0, "error": None, **fields})
        elif state is not OutputState.VERIFIED:
            refreshed.append({"b_job_id": job_id, "b_name": remote.name, **fields})
    if new:
        conn.execute(queries.INSERT_OUTPUTS, new)
    if refreshed:
        conn.execute(queries.REFRESH_OUTPUT, refreshed)
