"""Finished jobs past the retention period (`storage.keep_days`): the retention's part of the store."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa

from daemon.db.engine import make_session_factory, read_only
from daemon.db.models import Job
from daemon.states import TERMINAL, JobState


@dataclass(frozen=True)
class ExpiredJob:
    """A finished job past the retention period (`ExpiredJobs.finished_before`)."""

    id: uuid.UUID
    service: str
    state: JobState
    name: str | None
    finished_at: dt.datetime
    result_dir: str | None


class ExpiredJobs:
    def __init__(self, engine: sa.Engine) -> None:
        self._session = make_session_factory(engine)
        self._reading = make_session_factory(read_only(engine))

    def finished_before(self, cutoff: dt.datetime, *, limit: int = 1000) -> list[ExpiredJob]:
        """Finished jobs (completed, failed, cancelled) that finished before `cutoff`, oldest first."""
        with self._reading() as session:
            rows = session.execute(
                sa.select(Job.id, Job.service, Job.state, Job.name, Job.finished_at, Job.result_dir)
                .where(Job.state.in_(list(TERMINAL)), Job.finished_at < cutoff)
                .order_by(Job.finished_at)
                .limit(limit)
            ).all()
        return [ExpiredJob(id=row.id, service=row.service, state=row.state, name=row.name,
                           finished_at=cast(dt.datetime, row.finished_at), result_dir=row.result_dir)
                for row in rows]

    def delete(
        self, job_id: uuid.UUID, cutoff: dt.datetime, *, before_delete: Callable[[Job], None] | None = None
    ) -> bool:
        """Delete one finished job's row (inputs, outputs and events go with it) if it is still finished before
        `cutoff` and nobody holds it; `before_delete(job)` runs first, inside the transaction holding the row (it
        removes the files; when it raises, the row stays). Returns whether the row was deleted."""
        with self._session() as session, session.begin():
            job = session.scalars(
                sa.select(Job)
                .where(Job.id == job_id, Job.state.in_(list(TERMINAL)), Job.finished_at < cutoff)
                .with_for_update(skip_locked=True)
            ).one_or_none()
            if job is None:
                return False
            if before_delete is not None:
                before_delete(job)
            # The database's ON DELETE CASCADE removes inputs, outputs and events without loading them.
            session.execute(sa.delete(Job).where(Job.id == job_id).execution_options(synchronize_session=False))
            return True
