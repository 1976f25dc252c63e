"""SQLAlchemy 2.0 typed models: the jobs queue and everything recorded about each job.

Times are timezone-aware UTC everywhere (`UtcDateTime` normalises what SQLite hands back).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from daemon.owners import DEFAULT_OWNER
from daemon.states import JobState, OutputState

#: The Alembic revision whose schema these models describe: the head of daemon/db/migrations/versions (a test holds
#: the two together). A database at it is ready; the daemon learns that without loading Alembic (`daemon.db.revision`).
SCHEMA_REVISION = "0009"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (SQLite keeps no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


#: The largest value an `sa.Integer` column holds on every database (PostgreSQL's INTEGER is 32 bits).
INTEGER_MAX = 2**31 - 1


def integer_or_none(value: int | None) -> int | None:
    """A server's number as an `sa.Integer` column can hold it: None when it is out of range (a queue position or
    download count beyond 2**31 is no real answer, and would make PostgreSQL refuse the whole write)."""
    return value if value is None or -INTEGER_MAX - 1 <= value <= INTEGER_MAX else None


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


def _state_enum(enum_cls: type, name: str) -> sa.Enum:
    # Stored as plain strings with a CHECK constraint: readable in psql and sqlite3, no PostgreSQL ENUM type to
    # migrate when a state is added.
    return sa.Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    #: Shared by the children of one multi-service submission (equal to `id` for a single-service one).
    group_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, index=True)
    service: Mapped[str] = mapped_column(sa.String(64))
    panel: Mapped[str] = mapped_column(sa.String(200))
    build: Mapped[str] = mapped_column(sa.String(8))
    population: Mapped[str | None] = mapped_column(sa.String(32))
    phasing: Mapped[str | None] = mapped_column(sa.String(32))
    r2_filter: Mapped[str | None] = mapped_column(sa.String(16))
    mode: Mapped[str | None] = mapped_column(sa.String(32))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    #: Password of the result zips; a secret: never logged, never shown by `show`.
    password: Mapped[str | None] = mapped_column(sa.String(200))

    state: Mapped[JobState] = mapped_column(_state_enum(JobState, "job_state"), default=JobState.PENDING)
    # What the server sends is stored as sent, however long (revision 0003): a bound would lose every step.
    remote_state: Mapped[str | None] = mapped_column(sa.Text)
    remote_id: Mapped[str | None] = mapped_column(sa.Text)
    progress: Mapped[str | None] = mapped_column(sa.Text)
    queue_position: Mapped[int | None] = mapped_column(sa.Integer)

    #: Submits sent that may have made a remote job; a refusal in the server's words sets it back to 0.
    submit_attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    restart_attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: How often `imputationd retry` restarted this job; part of the name the remote job carries, so a lookup after
    #: a lost submit never mistakes the failed previous attempt for the new one.
    retries: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: Consecutive transient failures of the current step; drives the backoff and resets on success.
    failures: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_poll_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)

    error: Mapped[str | None] = mapped_column(sa.Text)
    error_kind: Mapped[str | None] = mapped_column(sa.String(64))
    result_dir: Mapped[str | None] = mapped_column(sa.Text)

    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    #: When the server accepted the job. Before that (no `remote_id`): since when the latest submit's outcome is
    #: unknown, from which its `submit_settle` window runs; None while it is in flight (see `Pipeline._submit`).
    submitted_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: When the cancel of the remote job was sent: the job stays `cancel_requested`, polled, until the server says
    #: the remote job is cancelled (or it ends otherwise); None while no cancel has gone out.
    cancel_sent_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: When the server deletes the results (Cloudgene `deletedOn`): downloads go soonest-retiring first.
    retires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: When the job warned (logged and notified) that its results may be deleted before they are downloaded.
    retirement_warned_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: What the server's quality control reported of the input (`remote.QcReport.as_dict`), as last polled.
    qc: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    #: The platform user the job is for: whose token it is submitted with (`daemon.credentials`), who sees it
    #: through the API. The service's own token is `operator`'s, the default owner.
    owner: Mapped[str] = mapped_column(sa.String(200), default=DEFAULT_OWNER, server_default=DEFAULT_OWNER)

    inputs: Mapped[list[JobInput]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobInput.id"
    )
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobEvent.id"
    )
    outputs: Mapped[list[JobOutput]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobOutput.id"
    )

    __table_args__ = (
        # Due work: "state IN (...) AND next_poll_at <= now" walks only active rows, however many finished ones.
        sa.Index("ix_jobs_state_next_poll_at", "state", "next_poll_at"),
        # Pending jobs per service in submission order, and in-flight counts per service.
        sa.Index("ix_jobs_service_state_created_at", "service", "state", "created_at"),
        sa.Index("ix_jobs_created_at", "created_at"),
        sa.Index("ix_jobs_owner_created_at", "owner", "created_at"),
    )

    def __repr__(self) -> str:  # never include the password
        return f"<Job {self.id} {self.service} {self.state}>"


    @property
    def adopted(self) -> bool:
        """Submitted elsewhere and tracked by `imputationd adopt`: no panel and no inputs of ours, so never sent
        again (neither retried nor resubmitted)."""
        return self.panel == ""


class JobInput(Base):
    __tablename__ = "job_inputs"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(sa.Text)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))

    job: Mapped[Job] = relationship(back_populates="inputs")


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    from_state: Mapped[str | None] = mapped_column(sa.String(32))
    to_state: Mapped[str] = mapped_column(sa.String(32))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    # The notification outbox (daemon/notify.py), since revision 0002. `notify_next_at` is set when the event is
    # written for a state that may be notified (terminal, blocked) and cleared when its notification is done (sent,
    # not wanted, or given up); the notify tick claims rows whose `notify_next_at` is due.
    notify_next_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, index=True)
    #: Claims so far; also the fencing token: only the claim that set this number may record the outcome.
    notify_attempts: Mapped[int | None] = mapped_column(sa.Integer)
    notified_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: Channels that delivered ("webhook", "email", comma-separated): a retry sends only to the others.
    notified_via: Mapped[str | None] = mapped_column(sa.String(64))
    notify_error: Mapped[str | None] = mapped_column(sa.Text)

    job: Mapped[Job] = relationship(back_populates="events")


class JobOutput(Base):
    __tablename__ = "job_outputs"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.Text)
    #: Download URL and Cloudgene file hash: URL secrets, stored to download, never logged or shown.
    url: Mapped[str] = mapped_column(sa.Text)
    remote_hash: Mapped[str | None] = mapped_column(sa.Text)
    size_text: Mapped[str | None] = mapped_column(sa.Text)
    downloads_left: Mapped[int | None] = mapped_column(sa.Integer)
    remote_checksum: Mapped[str | None] = mapped_column(sa.Text)  # "algo:hex" when the server publishes one
    state: Mapped[OutputState] = mapped_column(
        _state_enum(OutputState, "output_state"), default=OutputState.PENDING
    )
    size: Mapped[int | None] = mapped_column(sa.BigInteger)  # verified byte count
    sha256: Mapped[str | None] = mapped_column(sa.String(64))  # ours, computed while streaming
    local_path: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    error: Mapped[str | None] = mapped_column(sa.Text)
    verified_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: Downloads the server served (each spent one of its download counts) that came out unusable: cut off, short,
    #: long or a corrupt zip. The file is given up after `decisions.MAX_INTEGRITY_ATTEMPTS` of them.
    bad_downloads: Mapped[int] = mapped_column(sa.Integer, default=0)
    remote_size: Mapped[int | None] = mapped_column(sa.BigInteger)  # bytes, when the server publishes them

    job: Mapped[Job] = relationship(back_populates="outputs")

    __table_args__ = (sa.UniqueConstraint("job_id", "name"),)


class ServiceStatus(Base):
    """Runtime status of a configured service as a whole, shared by every daemon on the database. Its row is also
    the lock that daemons promoting jobs into the service take turns on."""

    __tablename__ = "services"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    #: Set while the whole service asked us to wait (maintenance, rate limit); nothing is sent before then.
    paused_until: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    pause_reason: Mapped[str | None] = mapped_column(sa.Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class OwnerStatus(Base):
    """What holds for one owner's account on a service: a token the server rejected, the server's "Only N jobs per
    user", the token's expiry. A row exists once something was recorded; none means nothing is known against it."""

    __tablename__ = "service_owners"

    service: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    #: Set while the owner's jobs on the service wait for an operator (a bad or missing token).
    blocked_reason: Mapped[str | None] = mapped_column(sa.Text)
    blocked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: Lowered when the server says "Only N jobs per user"; cleared when one of the owner's jobs there finishes.
    effective_limit: Mapped[int | None] = mapped_column(sa.Integer)
    token_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    token_checked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class ApiToken(Base):
    """A bearer token of the HTTP API (`imputationd tokens create`): an owner's, with a scope. Only the SHA-256 of
    the token is kept; the token itself is shown once, when it is made."""

    __tablename__ = "api_tokens"

    #: Public: named by `tokens list` and `tokens revoke`, and the token's first part (`imd_<id>_<secret>`).
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(200))
    scope: Mapped[str] = mapped_column(sa.String(16))  # read, submit or admin
    token_sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)


class IdempotencyKey(Base):
    """The first answer to a POST that carried an `Idempotency-Key`, per owner: a retry gets it again. `status` is
    None while the first request is still being answered."""

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    status: Mapped[int | None] = mapped_column(sa.Integer)
    body: Mapped[str | None] = mapped_column(sa.Text)
