"""The notification outbox: state changes worth telling (`job_events` rows with `notify_next_at` set when the event
is written, in the same transaction as the change) and their delivery, claimed by the notifier alone.

A claim pushes a row's `notify_next_at` a lease ahead and counts an attempt (`queries.claim_notifications`); the
attempt is the claim's fencing token: an outcome lands only for the claim that made it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from daemon.db import queries
from daemon.db.engine import Connections
from daemon.db.models import utcnow
from daemon.db.queries import rowcount


@dataclass(frozen=True)
class PendingNotification:
    """One claimed outbox row: a job event and what a notification says about its job."""

    event_id: int
    attempt: int  # the claim's fencing token for `finish_notification`
    at: dt.datetime
    from_state: str | None
    state: str
    reason: str | None
    notified_via: frozenset[str]
    job_id: uuid.UUID
    group_id: uuid.UUID
    name: str | None
    service: str
    owner: str
    result_dir: str | None
    finished_at: dt.datetime | None
    #: What the server's quality control reported of the job's input (`jobs.qc`), if anything.
    qc: dict[str, Any] | None = None


class NotificationOutbox:
    def __init__(self, connections: Connections) -> None:
        self._session = connections.session

    def claim_notifications(
        self,
        *,
        states: Collection[str],
        limit: int,
        lease_seconds: float,
        now: dt.datetime | None = None,
    ) -> list[PendingNotification]:
        """Claim up to `limit` due outbox rows for `states`: push their `notify_next_at` a lease ahead and count an
        attempt, so no other notifier takes them until the lease runs out (PostgreSQL: `FOR UPDATE SKIP LOCKED`;
        SQLite: the write lock of `BEGIN IMMEDIATE`)."""
        if limit <= 0 or not states:
            return []
        now = now or utcnow()
        with self._session() as session, session.begin():
            claimed = session.execute(
                queries.claim_notifications(states=states, limit=limit, now=now, lease_seconds=lease_seconds)
            ).scalars().all()
            if not claimed:
                return []
            rows = session.execute(queries.events_with_jobs(claimed)).all()
            return [
                PendingNotification(
                    event_id=event.id, attempt=event.notify_attempts or 0, at=event.at, from_state=event.from_state,
                    state=event.to_state, reason=event.reason,
                    notified_via=frozenset(filter(None, (event.notified_via or "").split(","))),
                    job_id=job.id, group_id=job.group_id, name=job.name, service=job.service, owner=job.owner,
                    result_dir=job.result_dir, finished_at=job.finished_at, qc=job.qc,
                )
                for event, job in rows
            ]

    def note_notification_delivered(self, event_id: int, attempt: int, delivered: Collection[str]) -> bool:
        """Record the channels that have delivered a claimed notification while its other channels are still being
        tried, so that nothing that happens to those (a hang past the lease, a crash) sends these again. Lands only
        for the claim that made attempt `attempt`; returns whether it did."""
        with self._session() as session, session.begin():
            result = session.execute(queries.update_claimed_notification(
                event_id, attempt, notified_via=",".join(sorted(delivered)) or None))
            return rowcount(result) == 1

    def finish_notification(
        self,
        event_id: int,
        attempt: int,
        *,
        delivered: Collection[str],
        done: bool,
        error: str | None = None,
        retry_at: dt.datetime | None = None,
        now: dt.datetime | None = None,
    ) -> bool:
        """Record a claimed notification's outcome: `done` takes it out of the outbox, otherwise it is due again at
        `retry_at`. Lands only for the claim that made attempt `attempt`; returns whether it did."""
        now = now or utcnow()
        values: dict[str, Any] = {
            "notified_via": ",".join(sorted(delivered)) or None,
            "notify_error": error,
            "notify_next_at": None if done else retry_at,
        }
        if done and delivered:
            values["notified_at"] = now
        with self._session() as session, session.begin():
            result = session.execute(queries.update_claimed_notification(event_id, attempt, **values))
            return rowcount(result) == 1

    def drop_notifications(
        self, reason: str, *, keep_states: Collection[str] = (), now: dt.datetime | None = None
    ) -> int:
        """Take due outbox rows out without sending anything (their state is not wanted, or notifications are off),
        except those for `keep_states`. Returns how many."""
        statement = queries.drop_due_notifications(reason, now=now or utcnow(), keep_states=keep_states)
        with self._session() as session, session.begin():
            return rowcount(session.execute(statement))
