"""Finished jobs past the retention period (`storage.keep_days`): the retention's part of the store."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from daemon.db import queries
from daemon.db.engine import Connections
from daemon.db.models import Job
from daemon.states import JobState


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
    def __init__(self, connections: Connections) -> None:
        self._session = connections.session
        self._reading = connections.reading

    def finished_before(self, cutoff: dt.datetime, *, limit: int = 1000) -> list[ExpiredJob]:
        """Finished jobs (completed, failed, cancelled) that finished before `cutoff`, oldest first."""
        with self._reading() as session:
            rows = session.execute(queries.finished_before(cutoff, limit=limit)).all()
        return [ExpiredJob(id=row.id, service=row.service, state=row.state, name=row.name,
                           finished_at=cast(dt.datetime, row.finished_at), result_dir=row.result_dir)
                for row in rows]

    def input_folders(self, root: Path) -> set[Path]:
        """The folders inside `root` that directly hold an input of some job: one query for all of them."""
        with self._reading() as session:
            return {Path(path).parent for path in session.scalars(queries.input_paths_under(str(root)))}

    def delete(
        self, job_id: uuid.UUID, cutoff: dt.datetime, *, before_delete: Callable[[Job], None] | None = None
    ) -> bool:
        """Delete one finished job's row (inputs, outputs and events go with it) if it is still finished before
        `cutoff` and nobody holds it; `before_delete(job)` runs first, inside the transaction holding the row (it
        removes the files; when it raises, the row stays). Returns whether the row was deleted."""
        with self._session() as session, session.begin():
            job = session.scalars(queries.expired_job(job_id, cutoff)).one_or_none()
            if job is None:
                return False
            if before_delete is not None:
                before_delete(job)
            session.execute(queries.delete_job(job_id))
            return True
