"""A job's state changes as both the queue and the operator's actions make them: checked against the state machine
and recorded as `job_events` rows, the notifiable ones entering the notification outbox at once."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy.orm import Session

from daemon.db import queries
from daemon.db.models import Job, JobEvent
from daemon.states import NOTIFIABLE, JobState, check_transition


class JobNotFound(LookupError):
    pass


def event_row(job_id: uuid.UUID, old: JobState | None, new: JobState, reason: str | None, now: dt.datetime
              ) -> dict[str, Any]:
    """A job_events row for a state change; the ones that may be notified enter the outbox at once."""
    return {"job_id": job_id, "at": now, "from_state": old, "to_state": new, "reason": reason,
            "notify_next_at": now if new in NOTIFIABLE else None}


def warning_row(job_id: uuid.UUID, state: JobState, reason: str, now: dt.datetime) -> dict[str, Any]:
    """A job_events row that changes no state (from `state` to itself) but enters the notification outbox: a
    warning about the job that its owner must hear of, whatever states `notifications.on` lists."""
    return {"job_id": job_id, "at": now, "from_state": state, "to_state": state, "reason": reason,
            "notify_next_at": now}


def transition(session: Session, job: Job, new: JobState, reason: str | None, now: dt.datetime) -> None:
    """Move a job loaded in `session` to `new` (raises on a transition the state machine forbids), with its event."""
    check_transition(job.state, new)
    session.add(JobEvent(**event_row(job.id, job.state, new, reason, now)))
    job.state = new
    job.updated_at = now


def lock_job(session: Session, job_id: uuid.UUID) -> Job:
    job = session.scalars(queries.locked_job(job_id)).one_or_none()
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job
