"""Initial schema: jobs, their inputs, events and outputs, and service status.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Frozen copy of `daemon/db/models.py` at this revision: plain SQLAlchemy types (the column types the models'
`UtcDateTime` and non-native `Enum`s render as), constraint names from the models' naming convention spelled out
with `op.f()`, and the states allowed by each CHECK constraint listed here rather than read from `daemon.states`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATES = (
    "pending",
    "submitting",
    "queued",
    "running",
    "downloading",
    "completed",
    "failed",
    "cancelled",
    "cancel_requested",
    "blocked",
)
OUTPUT_STATES = ("pending", "verified", "failed")


def _one_of(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("group_id", sa.Uuid(), nullable=False),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("panel", sa.String(200), nullable=False),
        sa.Column("build", sa.String(8), nullable=False),
        sa.Column("population", sa.String(32), nullable=True),
        sa.Column("phasing", sa.String(32), nullable=True),
        sa.Column("r2_filter", sa.String(16), nullable=True),
        sa.Column("mode", sa.String(32), nullable=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("password", sa.String(200), nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("remote_state", sa.String(64), nullable=True),
        sa.Column("remote_id", sa.String(200), nullable=True),
        sa.Column("progress", sa.Text(), nullable=True),
        sa.Column("queue_position", sa.Integer(), nullable=True),
        sa.Column("submit_attempts", sa.Integer(), nullable=False),
        sa.Column("restart_attempts", sa.Integer(), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("next_poll_at", _utc(), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_kind", sa.String(64), nullable=True),
        sa.Column("result_dir", sa.Text(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("submitted_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.CheckConstraint(_one_of("state", JOB_STATES), name=op.f("ck_jobs_job_state")),
    )
    op.create_index(op.f("ix_jobs_group_id"), "jobs", ["group_id"])
    op.create_index(op.f("ix_jobs_state_next_poll_at"), "jobs", ["state", "next_poll_at"])
    op.create_index(op.f("ix_jobs_service_state_created_at"), "jobs", ["service", "state", "created_at"])
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"])

    op.create_table(
        "job_inputs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_inputs")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_inputs_job_id_jobs"), ondelete="CASCADE"
        ),
    )
    op.create_index(op.f("ix_job_inputs_job_id"), "job_inputs", ["job_id"])

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
    )
    op.create_index(op.f("ix_job_events_job_id"), "job_events", ["job_id"])

    op.create_table(
        "job_outputs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("remote_hash", sa.String(200), nullable=True),
        sa.Column("size_text", sa.String(64), nullable=True),
        sa.Column("downloads_left", sa.Integer(), nullable=True),
        sa.Column("remote_checksum", sa.String(200), nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("local_path", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("verified_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_outputs")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_outputs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_job_outputs_job_id_name")),
        sa.CheckConstraint(_one_of("state", OUTPUT_STATES), name=op.f("ck_job_outputs_output_state")),
    )
    op.create_index(op.f("ix_job_outputs_job_id"), "job_outputs", ["job_id"])

    op.create_table(
        "services",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("blocked_reason", sa.Text(), nullable=True),
        sa.Column("blocked_at", _utc(), nullable=True),
        sa.Column("paused_until", _utc(), nullable=True),
        sa.Column("pause_reason", sa.Text(), nullable=True),
        sa.Column("effective_limit", sa.Integer(), nullable=True),
        sa.Column("token_expires_at", _utc(), nullable=True),
        sa.Column("token_checked_at", _utc(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_services")),
    )


def downgrade() -> None:
    for table in ("job_outputs", "job_events", "job_inputs", "jobs", "services"):
        op.drop_table(table)
