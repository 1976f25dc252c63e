"""Each service's status row (a pause for maintenance or a rate limit: the whole server's) and each owner's on a
service (a lowered job limit, the server's "Only N jobs per user"; when the owner's token was checked and expires).
What the scheduler, the pipeline and the probes read and write; the block of an owner on a service, which moves
their jobs, is the queue's (`JobQueue.block_owner`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy.orm import Session

from daemon.db import queries
from daemon.db.engine import Connections, is_postgres
from daemon.db.models import OwnerStatus, ServiceStatus, utcnow


class ServiceStatuses:
    def __init__(self, connections: Connections) -> None:
        self._session = connections.session
        self._reading = connections.reading
        self._postgres = connections.postgres

    def ensure_services(self, names: Iterable[str]) -> None:
        """Make sure each configured service has a status row (dispatch locks it on PostgreSQL)."""
        names = list(names)
        if not names:
            return
        now = utcnow()
        statement = queries.add_services([{"name": n, "updated_at": now} for n in names], postgres=self._postgres)
        with self._session() as session, session.begin():
            session.execute(statement)

    def service_statuses(self) -> dict[str, ServiceStatus]:
        with self._reading() as session:
            return {s.name: s for s in session.scalars(queries.SERVICE_STATUSES).all()}

    def pause_service(
        self, service: str, until: dt.datetime, reason: str, *, continuing_within: float = 0.0
    ) -> bool:
        """Hold every call to a service until `until` (maintenance, rate limit). Returns True if newly paused.

        An expired pause stays recorded until `resume_service`: a pause starting at most `continuing_within`
        seconds after the last one ended is the same outage (a maintenance window retried with backoff), not a
        new one."""
        with self._session() as session, session.begin():
            status = service_row(session, service)
            now = utcnow()
            ended_long_ago = now - dt.timedelta(seconds=continuing_within)
            newly = status.paused_until is None or status.paused_until <= ended_long_ago
            if newly or status.paused_until is None or until > status.paused_until:
                status.paused_until, status.pause_reason = until, reason
            return newly

    def resume_service(self, service: str) -> bool:
        """A call to the service worked again: forget its pause. Returns True if it had one."""
        with self._session() as session, session.begin():
            status = service_row(session, service)
            was_paused = status.paused_until is not None
            status.paused_until = status.pause_reason = None
            return was_paused

    def owner_statuses(self) -> dict[tuple[str, str], OwnerStatus]:
        """What is recorded against each (service, owner); a pair with nothing recorded has no entry."""
        with self._reading() as session:
            return {(s.service, s.owner): s for s in session.scalars(queries.OWNER_STATUSES).all()}

    def lower_limit(self, service: str, owner: str, limit: int) -> bool:
        """The server refused the owner's job for too many running ones: use at most `limit` of the owner's slots
        until one of their jobs finishes.

        Returns True when that lowered the limit (False: it was already this low)."""
        with self._session() as session, session.begin():
            status = owner_row(session, service, owner)
            limit = max(1, limit)
            lowered = status.effective_limit is None or status.effective_limit > limit
            status.effective_limit = limit if lowered else status.effective_limit
            return lowered

    def record_token(self, service: str, owner: str, *, expires: dt.datetime | None) -> None:
        with self._session() as session, session.begin():
            status = owner_row(session, service, owner)
            status.token_expires_at = expires
            status.token_checked_at = utcnow()


def service_row(session: Session, service: str) -> ServiceStatus:
    status = session.scalars(queries.locked_service(service)).one_or_none()
    if status is None:
        status = ServiceStatus(name=service, updated_at=utcnow())
        session.add(status)
    return status


def owner_row(session: Session, service: str, owner: str) -> OwnerStatus:
    """The owner's status row on the service, locked; made first when missing. Daemons sharing a database may
    each find it missing at once: the row is inserted unless it exists (waiting for another's insert to commit),
    then locked, so neither fails on the other's row."""
    status = session.scalars(queries.locked_owner_status(service, owner)).one_or_none()
    if status is None:
        session.execute(queries.add_owner_status(service, owner, utcnow(), postgres=is_postgres(session.connection())))
        status = session.scalars(queries.locked_owner_status(service, owner)).one()
    return status
